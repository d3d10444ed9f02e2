"""gatewayd's Prometheus metrics: cheap counters on the command path, collected on scrape.

The ring executes a :class:`Metered` logical unit: per command two clock
reads, a table lookup of the opcode, a bisect and a few integer increments
under a lock of the LUN's own.  Everything else (states, key lookups, KMS
reachability) is read when Prometheus scrapes.  Metric names:

* ``evlu_lun_state{lun,state}`` 1 for the LUN's state, 0 for the others
* ``evlu_lun_ops_total{lun,op}`` commands: op = read, write, other
* ``evlu_lun_bytes_total{lun,op}`` bytes read / written (commands that succeeded)
* ``evlu_lun_latency_seconds{lun,op}`` histogram of the time the logical unit took
* ``evlu_key_lookups_total{outcome,source}`` granted (kms, cache), refused, unreachable,
  revalidated (granted, refused)
* ``evlu_kms_reachable{profile}`` 1 when the last probe of the profile's KMS answered
* ``evlu_gatewayd_ready`` 1 when gatewayd is ready (see :mod:`.health`)
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.registry import Collector

from ..kms.audit import AuditLog
from ..scsi.batch import CachedReader, ReadBatch
from ..scsi.sense import GOOD
from ..tcmu.device import Executor, Reply
from ..tcmu.transfer import IovecTransfer
from ..volume import State

OPS = ("read", "write", "other")
READ, WRITE, OTHER = range(3)
_READS = (0x08, 0x28, 0xA8, 0x88)
_WRITES = (0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E)  # WRITE 6/10/12/16, WRITE AND VERIFY
_OP_OF = tuple(READ if op in _READS else WRITE if op in _WRITES else OTHER for op in range(256))
#: latency bucket upper bounds, seconds
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0, 10.0)
_BUCKETS_NS = tuple(int(b * 1e9) for b in BUCKETS)


class LunMeter:
    """Command counters of one LUN."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops = [0, 0, 0]
        self.bytes = [0, 0, 0]
        self.latency_ns = [0, 0, 0]
        self.buckets = [[0] * (len(BUCKETS) + 1) for _ in OPS]  # the last one is +Inf

    def record(self, op: int, nbytes: int, elapsed_ns: int) -> None:
        slot = bisect.bisect_left(_BUCKETS_NS, elapsed_ns)
        with self.lock:
            self.ops[op] += 1
            self.bytes[op] += nbytes
            self.latency_ns[op] += elapsed_ns
            self.buckets[op][slot] += 1

    def snapshot(self) -> tuple[list[int], list[int], list[int], list[list[int]]]:
        with self.lock:
            return (list(self.ops), list(self.bytes), list(self.latency_ns),
                    [list(b) for b in self.buckets])


class Metered:
    """A logical unit whose commands are counted (what the ring executes)."""

    def __init__(self, lu: Executor, meter: LunMeter) -> None:
        self.lu = lu
        self.meter = meter

    def read_batch(self) -> ReadBatch | None:
        make = getattr(self.lu, "read_batch", None)
        return _MeteredBatch(make().reader, self.meter) if make is not None else None

    def execute(self, cdb: bytes, xfer: IovecTransfer, *,
                nowait: bool | ReadBatch = False) -> Reply:
        start = time.perf_counter_ns()
        batch = nowait if isinstance(nowait, _MeteredBatch) else None
        queued = len(batch) if batch is not None else 0
        reply = self.lu.execute(cdb, xfer, nowait=nowait)  # WouldBlock: nothing to count
        if batch is not None and len(batch) > queued:
            batch.started.append((start, reply.data_in_len))  # counted if the batch reads it
            return reply
        elapsed = time.perf_counter_ns() - start
        op = _OP_OF[cdb[0]] if cdb else OTHER
        nbytes = 0
        if reply.status == GOOD:
            nbytes = reply.data_in_len if op == READ else xfer.length if op == WRITE else 0
        self.meter.record(op, nbytes, elapsed)
        return reply


class _MeteredBatch(ReadBatch):
    """A read batch that counts each READ it reads, from its execute to the batch's end
    (one it cannot read is counted when it runs again)."""

    def __init__(self, reader: CachedReader, meter: LunMeter) -> None:
        super().__init__(reader)
        self.meter = meter
        self.started: list[tuple[int, int]] = []  # (start ns, bytes) per queued READ

    def run(self) -> list[bool]:
        done = super().run()
        end = time.perf_counter_ns()
        for (start, nbytes), read in zip(self.started, done):
            if read:
                self.meter.record(READ, nbytes, end - start)
        self.started = []
        return done


class CountingAuditLog(AuditLog):
    """The audit log, also counting key lookups by outcome and source."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lookups: Counter[tuple[str, str]] = Counter()
        self._count_lock = threading.Lock()

    def record(self, event: str, *, outcome: str = "ok", **kwargs: Any) -> None:
        if event in ("lookup", "revalidate"):
            source = "revalidation" if event == "revalidate" else kwargs.get("source", "kms")
            with self._count_lock:
                self.lookups[(outcome, source)] += 1
        super().record(event, outcome=outcome, **kwargs)

    def counts(self) -> dict[tuple[str, str], int]:
        with self._count_lock:
            return dict(self.lookups)


@dataclass(frozen=True)
class LunSample:
    """What the collector needs of one LUN."""

    name: str
    state: State
    meter: LunMeter


class GatewayCollector(Collector):
    """Reads gatewayd's state on every scrape."""

    def __init__(self, luns: Callable[[], list[LunSample]], audit: CountingAuditLog,
                 kms: Callable[[], dict[str, bool]], ready: Callable[[], bool]) -> None:
        self._luns, self._audit, self._kms, self._ready = luns, audit, kms, ready

    def collect(self) -> Iterator[Any]:
        state = GaugeMetricFamily("evlu_lun_state", "1 for the LUN's volume state",
                                  labels=["lun", "state"])
        ops = CounterMetricFamily("evlu_lun_ops", "SCSI commands executed",
                                  labels=["lun", "op"])
        nbytes = CounterMetricFamily("evlu_lun_bytes", "Bytes read or written by commands "
                                     "that succeeded", labels=["lun", "op"])
        latency = HistogramMetricFamily("evlu_lun_latency_seconds", "Time the logical unit "
                                        "took per command", labels=["lun", "op"])
        for lun in self._luns():
            for s in State:
                state.add_metric([lun.name, s.value], 1.0 if lun.state is s else 0.0)
            counts, sizes, sums, buckets = lun.meter.snapshot()
            for i, op in enumerate(OPS):
                ops.add_metric([lun.name, op], counts[i])
                if i != OTHER:
                    nbytes.add_metric([lun.name, op], sizes[i])
                cumulative, running = [], 0
                for bound, n in zip((*map(str, BUCKETS), "+Inf"), buckets[i]):
                    running += n
                    cumulative.append((bound, running))
                latency.add_metric([lun.name, op], cumulative, sums[i] / 1e9)
        yield from (state, ops, nbytes, latency)
        lookups = CounterMetricFamily("evlu_key_lookups", "Key lookups by outcome and source",
                                      labels=["outcome", "source"])
        for (outcome, source), n in sorted(self._audit.counts().items()):
            lookups.add_metric([outcome, source], n)
        yield lookups
        reachable = GaugeMetricFamily("evlu_kms_reachable", "1 when the last probe of the KMS "
                                      "answered", labels=["profile"])
        for profile, ok in sorted(self._kms().items()):
            reachable.add_metric([profile], 1.0 if ok else 0.0)
        yield reachable
        yield GaugeMetricFamily("evlu_gatewayd_ready", "1 when gatewayd is ready",
                                value=1.0 if self._ready() else 0.0)
