"""The one table of supported commands: dispatch and REPORT SUPPORTED OPERATION CODES."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sense import Result

if TYPE_CHECKING:
    from .lu import LogicalUnit

# (lu, cdb, xfer), and for a command registered with nowait=True also (..., nowait)
Handler = Callable[..., Result]

#: CDB USAGE DATA of the CONTROL byte: NACA is evaluated (and refused)
CONTROL = 0x04


@dataclass(frozen=True)
class Command:
    """A supported command.  ``usage`` is its CDB USAGE DATA (SPC-4 6.35):
    the opcode, then a mask of the CDB bits the handler evaluates, ending
    with the CONTROL byte; its length is the CDB length."""

    opcode: int
    service_action: int | None
    name: str
    usage: bytes
    handler: Handler
    unit_attention: bool  # False: runs, and does not report, with a unit attention pending
    available: Callable[[LogicalUnit], bool] | None  # None: always supported
    nowait: bool  # the handler takes a fourth argument, nowait (see LogicalUnit.execute)
    cdb_length: int = field(init=False)  # len(usage), kept: dispatch reads it every command

    def __post_init__(self) -> None:
        object.__setattr__(self, "cdb_length", len(self.usage))

    def supported_by(self, lu: LogicalUnit) -> bool:
        return self.available is None or self.available(lu)


class Registry:
    """Commands by opcode (and service action)."""

    def __init__(self) -> None:
        self._table: list[Command | dict[int, Command] | None] = [None] * 256

    def command(self, opcode: int, name: str, *usage: int, service_action: int | None = None,
                unit_attention: bool = True, available: Callable[[LogicalUnit], bool] | None = None,
                nowait: bool = False) -> Callable[[Handler], Handler]:
        """Register the decorated handler; ``usage`` is the CDB usage mask after the opcode.
        ``available(lu)`` tells whether a logical unit supports the command; ``nowait``
        that the handler can be asked not to wait for the medium (a fourth argument)."""
        def register(handler: Handler) -> Handler:
            cmd = Command(opcode, service_action, name, bytes((opcode, *usage)), handler,
                          unit_attention, available, nowait)
            slot = self._table[opcode]
            if service_action is None:
                assert slot is None, f"opcode {opcode:#04x} registered twice"
                self._table[opcode] = cmd
            else:
                assert usage[0] & 0x1F == 0x1F, "the service action field must be evaluated"
                actions = slot if isinstance(slot, dict) else {}
                assert not isinstance(slot, Command) and service_action not in actions
                actions[service_action] = cmd
                self._table[opcode] = actions
            return handler
        return register

    def lookup(self, cdb: bytes) -> Command | None:
        """The command a CDB (at least one byte) asks for, or None if unsupported."""
        slot = self._table[cdb[0]]
        if isinstance(slot, dict):
            return slot.get(cdb[1] & 0x1F) if len(cdb) > 1 else None
        return slot

    def get(self, opcode: int, service_action: int | None = None) -> Command | None:
        slot = self._table[opcode]
        if isinstance(slot, dict):
            return slot.get(service_action) if service_action is not None else None
        return slot if service_action is None else None

    def has_service_actions(self, opcode: int) -> bool:
        return isinstance(self._table[opcode], dict)

    def __iter__(self) -> Iterator[Command]:
        """Every command, by opcode then service action."""
        for slot in self._table:
            if isinstance(slot, dict):
                yield from (slot[sa] for sa in sorted(slot))
            elif slot is not None:
                yield slot


REGISTRY = Registry()
command = REGISTRY.command
