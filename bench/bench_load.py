"""Load at saturation: wrk against the exporter and the query service, RSS before and after.

Starts EXPORTERS exporters and one query service over them (auth off, loopback), warms every
target up, then runs wrk for --seconds against each of:

    exporter lookup    GET /process/{pid}                  (exporter 1)
    query unicast      GET /node/bench-1/process/{pid}
    query _all         GET /node/_all/process/{pid}        (every exporter)
    exporter metrics   GET /metrics                        (exporter 1)

and reports req/s, p50/p99 latency, errors (non-2xx + socket errors; zero expected), and the
RSS of each service after the warm-up and at the end. Bounded: about 4 x --seconds plus a
few seconds of warm-up.

Run: .venv/bin/python bench/bench_load.py [--seconds 60] [--connections 32] [--exporters 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlib import BIN, raise_fd_limit, rss_bytes, save, start, stop, wrk

from procfleet.testing import free_port

WARMUP_SECONDS = 5


def settle(urls: list[str], timeout: float = 60.0) -> None:
    """Wait until every service answers /healthz quickly again (wrk leaves queued requests
    behind when it stops), so one phase's backlog does not count against the next."""
    deadline = time.monotonic() + timeout
    for url in urls:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=5):
                    pass
            except OSError:
                pass
            if time.monotonic() - started < 0.05:
                break
            time.sleep(0.2)


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="wrk duration per target")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--exporters", type=int, default=3, help="exporters behind the query")
    args = parser.parse_args()
    raise_fd_limit()

    tmp = Path(tempfile.mkdtemp(prefix="procfleet-bench-"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)",
                              "--password=hunter2"])
    services: dict[str, subprocess.Popen] = {}
    exporter_urls: list[tuple[str, str]] = []
    try:
        for i in range(1, args.exporters + 1):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            name = f"bench-{i}"
            services[f"exporter {name}"] = start(
                [str(BIN / "procfleet-exporter"), "--listen", f"127.0.0.1:{port}",
                 "--hostname", name, "--log-level", "warning"], url + "/healthz")
            exporter_urls.append((name, url))
        config = tmp / "query.yml"
        config.write_text(
            "log_level: warning\nauth: {enabled: false}\nexporters:\n"
            + "".join(f"  - {{hostname: {n}, url: \"{u}\"}}\n" for n, u in exporter_urls))
        qport = free_port()
        query = f"http://127.0.0.1:{qport}"
        services["query"] = start([str(BIN / "procfleet-query"), "--config", str(config),
                                   "--listen", f"127.0.0.1:{qport}"], query + "/healthz")

        first = exporter_urls[0][1]
        # /metrics last: a backlog of queued scrapes on exporter 1 would slow the query phases.
        targets = {
            "exporter lookup": f"{first}/process/{child.pid}",
            "query unicast": f"{query}/node/bench-1/process/{child.pid}",
            "query _all": f"{query}/node/_all/process/{child.pid}",
            "exporter metrics": f"{first}/metrics",
        }
        print(f"warm-up: {WARMUP_SECONDS} s per target", flush=True)
        for url in targets.values():
            wrk(url, seconds=WARMUP_SECONDS, connections=args.connections, threads=args.threads)
            settle([u + "/healthz" for _, u in exporter_urls] + [query + "/healthz"])
        rss_start = {name: rss_bytes(proc.pid) for name, proc in services.items()}

        results: dict[str, dict] = {}
        for label, url in targets.items():
            print(f"{label}: wrk -c{args.connections} -d{args.seconds}s {url}", flush=True)
            results[label] = wrk(url, seconds=args.seconds, connections=args.connections,
                                 threads=args.threads)
            settle([u + "/healthz" for _, u in exporter_urls] + [query + "/healthz"])
            r = results[label]
            print(f"  {r['rps']:8.0f} req/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms"
                  f"  errors {r['non_2xx'] + r['socket_errors']}", flush=True)
        rss_end = {name: rss_bytes(proc.pid) for name, proc in services.items()}
        alive = {name: proc.poll() is None for name, proc in services.items()}
    finally:
        for proc in services.values():
            stop(proc)
        child.kill()
        child.wait()

    errors = sum(r["non_2xx"] + r["socket_errors"] for r in results.values())
    print(f"\nwrk -c{args.connections} -t{args.threads} -d{args.seconds}s, "
          f"{args.exporters} exporters:")
    print(f"  {'target':<18}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for label, r in results.items():
        print(f"  {label:<18}{r['rps']:9.0f}{r['p50_ms']:9.2f}{r['p99_ms']:9.2f}"
              f"{r['non_2xx'] + r['socket_errors']:8d}")
    print(f"  {'service':<18}{'RSS after warm-up':>19}{'RSS at end':>12}")
    for name in services:
        print(f"  {name:<18}{mib(rss_start[name]):>15} MiB{mib(rss_end[name]):>8} MiB")
    print(f"  errors: {errors} (zero expected); services alive at the end: {all(alive.values())}")
    save("load", {
        "seconds": args.seconds, "connections": args.connections, "threads": args.threads,
        "exporters": args.exporters, "results": results,
        "rss_mib_after_warmup": {k: mib(v) for k, v in rss_start.items()},
        "rss_mib_at_end": {k: mib(v) for k, v in rss_end.items()},
        "errors": errors,
    })
    return 0 if errors == 0 and all(alive.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
