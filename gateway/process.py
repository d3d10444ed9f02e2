"""Process-wide protections for daemons that hold keys."""

from __future__ import annotations

import ctypes
import ctypes.util

PR_SET_DUMPABLE = 4


def make_undumpable() -> bool:
    """No core dumps and no ptrace by unprivileged users: keys stay in this process.

    Returns whether the kernel accepted it."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    return bool(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
