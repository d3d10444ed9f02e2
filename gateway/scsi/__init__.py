"""SPC-4/SBC-3 emulation of a block logical unit over an eVLU (sans-IO).

A :class:`LogicalUnit` takes a CDB and a :class:`Transfer` (the command's
data buffer), drives its backend (a :class:`gateway.volume.Volume`) and
returns a :class:`Result`: SCSI status, fixed-format sense data and how many
bytes of data-in it produced.  It knows nothing of rings, sockets or files.
"""

from .device import Backend, Identity, Limits, naa_from_serial
from .lu import LogicalUnit
from .registry import REGISTRY, Command
from .sense import Result
from .transfer import BytesTransfer, Transfer

__all__ = ["REGISTRY", "Backend", "BytesTransfer", "Command", "Identity", "Limits",
           "LogicalUnit", "Result", "Transfer", "naa_from_serial"]
