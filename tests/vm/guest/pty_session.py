"""Guest side of tests/vm/test_targetcli_ext.py: an interactive shell on a pty.

Run as ``python3 - PROGRAM INPUT...`` (sent over the agent): starts PROGRAM on a
new pseudo-terminal, waits for its prompt, then types each INPUT (a literal
TAB triggers completion) and waits for the next prompt; prints the screen
(ANSI sequences removed) as JSON: one transcript per input.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import sys
import time

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-B]|\r")
PROMPT = re.compile(rb"/[^\n>]*> $")


def read_until_prompt(fd: int, timeout: float = 120.0, settle: float = 0.0) -> bytes:
    """Everything the program writes until it shows a prompt (or ``settle`` s of quiet)."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], settle or 0.5)
        if not ready:
            if settle or PROMPT.search(ANSI.sub(b"", out)):
                return out
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the program exited
            return out
        if not chunk:
            return out
        out += chunk
    raise TimeoutError(f"no prompt within {timeout} s; screen so far: {out[-500:]!r}")


def main(program: str, inputs: list[str]) -> list[dict[str, str]]:
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(program, [program])
    screens = [{"input": "", "screen": ANSI.sub(b"", read_until_prompt(fd)).decode()}]
    for line in inputs:
        os.write(fd, line.encode())
        if line.endswith("\t"):  # completion: the screen settles, no new prompt
            screen = read_until_prompt(fd, settle=1.5)
        else:
            os.write(fd, b"\n")
            screen = read_until_prompt(fd)
        screens.append({"input": line, "screen": ANSI.sub(b"", screen).decode()})
    os.write(fd, b"exit\n")
    screens.append({"input": "exit", "screen": ANSI.sub(b"", read_until_prompt(
        fd, settle=2.0)).decode()})
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    screens.append({"input": "(exited)", "screen": f"exit status {code}"})
    return screens


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
