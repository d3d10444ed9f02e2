"""targetcli shell extension with an /encryption tree (built in a later issue)."""
