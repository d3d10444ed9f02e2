"""How the kernel and the handler wake each other.

With uio, a ``read`` of 4 bytes from ``/dev/uioN`` returns the event count
(the kernel queued something) and a ``write`` of 4 bytes tells the kernel to
reap completions.  The simulated kernel uses two eventfds the same way.
"""

from __future__ import annotations

import os


class UioDoorbell:
    """``/dev/uioN``: read 4 bytes to acknowledge, write 4 bytes to kick."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def ack(self) -> bool:
        """Consume the pending event count; False when the device is gone (EIO)."""
        try:
            os.read(self.fd, 4)
        except BlockingIOError:
            pass
        except OSError:
            return False
        return True

    def kick(self) -> None:
        os.write(self.fd, bytes(4))


class EventfdDoorbell:
    """The simulated kernel's side channel: one eventfd each way."""

    def __init__(self, from_kernel: int, to_kernel: int) -> None:
        self.from_kernel, self.to_kernel = from_kernel, to_kernel

    def fileno(self) -> int:
        return self.from_kernel

    def ack(self) -> bool:
        try:
            os.eventfd_read(self.from_kernel)
        except BlockingIOError:
            pass
        return True

    def kick(self) -> None:
        os.eventfd_write(self.to_kernel, 1)
