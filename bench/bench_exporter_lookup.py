"""Lookup throughput: GET /process/{pid} under wrk -c16, against /healthz of the same server.

Run: .venv/bin/python bench/bench_exporter_lookup.py [--rounds 3] [--seconds 10]
Bar (issue 2): >= 2,500 req/s with fresh data; aim >= 4,000.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from benchlib import BIN, median, rss_bytes, save, start, stop, wrk

from procfleet.testing import free_port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)",
                              "--password=hunter2"])
    server = start([str(BIN / "procfleet-exporter"), "--listen", f"127.0.0.1:{port}"],
                   base + "/healthz")
    rounds: list[dict] = []
    try:
        for i in range(args.rounds):
            health = wrk(base + "/healthz", seconds=args.seconds)
            lookup = wrk(f"{base}/process/{child.pid}", seconds=args.seconds)
            rounds.append({"healthz": health, "lookup": lookup})
            print(f"round {i + 1}/{args.rounds}: lookup {lookup['rps']:.0f} req/s "
                  f"(p50 {lookup['p50_ms']:.2f} ms, p99 {lookup['p99_ms']:.2f} ms), "
                  f"healthz {health['rps']:.0f} req/s", flush=True)
        rss = rss_bytes(server.pid)
    finally:
        stop(server)
        child.kill()
        child.wait()

    def med(kind: str, key: str) -> float:
        return median([r[kind][key] for r in rounds])

    summary = {
        "lookup_rps": med("lookup", "rps"),
        "lookup_p50_ms": med("lookup", "p50_ms"),
        "lookup_p99_ms": med("lookup", "p99_ms"),
        "healthz_rps": med("healthz", "rps"),
        "healthz_p99_ms": med("healthz", "p99_ms"),
        "errors": sum(r[k]["non_2xx"] + r[k]["socket_errors"] for r in rounds
                      for k in ("lookup", "healthz")),
        "exporter_rss_mb": round(rss / 2**20, 1),
    }
    summary["ratio_lookup_vs_healthz"] = round(summary["lookup_rps"] / summary["healthz_rps"], 3)
    print(f"\nmedian of {args.rounds} rounds, wrk -c16 -d{args.seconds}s:")
    print(f"  GET /process/{{pid}}  {summary['lookup_rps']:8.0f} req/s  "
          f"p50 {summary['lookup_p50_ms']:.2f} ms  p99 {summary['lookup_p99_ms']:.2f} ms")
    print(f"  GET /healthz        {summary['healthz_rps']:8.0f} req/s  "
          f"p99 {summary['healthz_p99_ms']:.2f} ms  (same-run baseline)")
    print(f"  lookup/healthz ratio {summary['ratio_lookup_vs_healthz']:.2f}; "
          f"errors {summary['errors']}; bar >= 2500 req/s: "
          f"{'PASS' if summary['lookup_rps'] >= 2500 else 'FAIL'}")
    save("exporter_lookup", {"rounds": rounds, "median": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
