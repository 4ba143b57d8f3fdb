"""/healthz latency while 1,000 connections trickle one header byte a second, against a baseline.

Starts one exporter with default settings (request deadline 10 s), then, --runs times:

    baseline   fresh-connection GET /healthz, one after another, for --seconds
    trickle    the same while --connections clients each send one byte of a never-ending
               request head per second, reconnecting as soon as the exporter closes them

and reports p50/p99/max of each phase (medians over the runs), their p99 ratio, and how many
trickling connections the deadline closed. Bounded: about 2 x runs x seconds plus start-up.

Run: .venv/bin/python bench/bench_trickle.py [--seconds 25] [--runs 3] [--connections 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import urllib.request

from benchlib import BIN, median, raise_fd_limit, save, start, stop

from procfleet.floods import Trickle
from procfleet.testing import free_port


def probe(url: str, seconds: float) -> list[float]:
    """Latencies (ms) of back-to-back /healthz on fresh connections for `seconds`."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                resp.read()
        except OSError:
            latencies.append(30_000.0)  # counted as the timeout: never silently dropped
            continue
        latencies.append((time.monotonic() - started) * 1000)
        time.sleep(0.02)
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50_ms": round(statistics.median(ordered), 2), "p99_ms": round(p99, 2),
            "max_ms": round(ordered[-1], 2), "probes": len(ordered)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=25.0, help="per phase and run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=1000, help="trickling clients")
    args = parser.parse_args()
    raise_fd_limit()
    port = free_port()
    url = f"http://127.0.0.1:{port}/healthz"
    exporter = start([str(BIN / "procfleet-exporter"), "--listen", f"127.0.0.1:{port}",
                      "--log-level", "warning"], url)
    runs: list[dict] = []
    try:
        for run in range(1, args.runs + 1):
            baseline = summary(probe(url, args.seconds))
            trickle = Trickle(port, count=args.connections, interval=1.0,
                              seconds=args.seconds + 30).start()
            try:
                trickle.ready.wait(timeout=30)
                under = summary(probe(url, args.seconds))
            finally:
                trickle.stop()
            alive = exporter.poll() is None
            runs.append({"baseline": baseline, "trickle": under, "alive": alive,
                         "closed_by_deadline": trickle.closed_by_server})
            print(f"run {run}: baseline p50 {baseline['p50_ms']} ms p99 {baseline['p99_ms']} ms"
                  f" | trickle p50 {under['p50_ms']} ms p99 {under['p99_ms']} ms"
                  f" max {under['max_ms']} ms | {trickle.closed_by_server} tricklers closed,"
                  f" exporter alive: {alive}", flush=True)
            time.sleep(2)  # let the last tricklers' sockets go
    finally:
        stop(exporter)

    def med(phase: str, key: str) -> float:
        return round(median([r[phase][key] for r in runs]), 2)

    result = {
        "connections": args.connections, "seconds": args.seconds, "runs": runs,
        "median": {phase: {k: med(phase, k) for k in ("p50_ms", "p99_ms", "max_ms")}
                   for phase in ("baseline", "trickle")},
    }
    result["p99_ratio"] = round(result["median"]["trickle"]["p99_ms"]
                                / max(result["median"]["baseline"]["p99_ms"], 0.001), 1)
    print(f"\n/healthz with {args.connections} trickling connections (deadline 10 s), medians of "
          f"{args.runs} runs of {args.seconds:g} s:")
    for phase in ("baseline", "trickle"):
        m = result["median"][phase]
        print(f"  {phase:<9} p50 {m['p50_ms']:8.2f} ms  p99 {m['p99_ms']:8.2f} ms  "
              f"max {m['max_ms']:8.2f} ms")
    print(f"  p99 ratio trickle/baseline: {result['p99_ratio']}")
    save("trickle", result)
    return 0 if all(r["alive"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
