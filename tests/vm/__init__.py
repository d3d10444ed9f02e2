"""The appliance VM tier (QEMU): a package, so its conftest does not shadow tests/conftest.py."""
