"""KEK lookup latency against the embedded PyKMIP server, on 127.0.0.1.

Measures, in one run and interleaved so drift hits both alike:

* reused:  ``KmipKeyManager.fetch`` over one kept-open mutual-TLS connection
  (State check + Get: two KMIP round trips), as the gateway's lookup service does;
* fresh:   the same fetch with a new TLS connection (handshake) every time;

and prints p50/p90/p99/max in milliseconds and the fresh/reused ratio.  Run
from the repository root: ``python bench/kms.py [--lookups N]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.kms import Config  # noqa: E402
from gateway.kms import server as kms_server  # noqa: E402
from gateway.kms.kmip_client import KmipKeyManager  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p90": pct(90), "p99": pct(99),
            "max": ordered[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookups", type=int, default=300, help="lookups per method")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="evlu-bench-kms-") as tmp:
        config = Config(tmp)
        port = _free_port()
        kms_server.init(config, port=port)
        kms_server.enroll(config, "bench")
        env = dict(os.environ, EVLU_CONFIG_DIR=tmp)
        server = subprocess.Popen([sys.executable, "-m", "gateway.cli.main", "kms", "serve",
                                   "--log-level", "WARNING"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT,
                                  cwd=Path(__file__).resolve().parent.parent)
        try:
            assert server.stdout is not None
            server.stdout.readline()
            profile, identity = config.profile(), config.identity("bench")
            reused = KmipKeyManager(profile, identity)
            key_id = reused.provision("bench")
            reused.fetch(key_id)  # warm up: imports, first handshake
            times: dict[str, list[float]] = {"reused": [], "fresh": []}
            for _ in range(args.lookups):
                start = time.perf_counter()
                reused.fetch(key_id)
                times["reused"].append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                with KmipKeyManager(profile, identity) as fresh:
                    fresh.fetch(key_id)
                times["fresh"].append((time.perf_counter() - start) * 1e3)
            reused.close()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    print(f"KEK lookup latency, embedded PyKMIP server on 127.0.0.1, {args.lookups} lookups "
          "each (ms)")
    print(f"{'connection':>12} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    stats = {name: _percentiles(samples) for name, samples in times.items()}
    for name, s in stats.items():
        print(f"{name:>12} {s['p50']:8.2f} {s['p90']:8.2f} {s['p99']:8.2f} {s['max']:8.2f}")
    print(f"fresh/reused p50 ratio: {stats['fresh']['p50'] / stats['reused']['p50']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
