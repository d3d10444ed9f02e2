"""``targetcli-evlu``: the stock targetcli tree plus an /encryption node (configshell-fb)."""
