"""The ``evlu`` command line."""
