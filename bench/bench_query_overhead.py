"""Overhead benchmark: a unicast lookup through the query service vs the exporter directly.

Starts the real exporter (`python -m exporter`) and the real query service (`python -m query`,
auth on, one API key, that exporter as its only static target), spawns a sleeping child to
look up, and drives both with `wrk -c16` in the same run, alternating rounds so drifting
machine load hits both alike:

    direct        GET http://exporter/process/{pid}
    via query     GET http://query/node/{hostname}/process/{pid}   (Authorization: Bearer …)

The query service runs only during its own rounds (started, warmed up, measured, stopped):
the connections it keeps alive to the exporter would otherwise sit idle in the exporter
during the direct rounds, and waitress pays for every open connection on each turn of its
loop (16 idle ones cut the exporter's direct requests/s by a third or more), which would
flatter the ratio.

The ratio of requests/s (via query ÷ direct) must be at least 50% (aim: 60%).

    .venv/bin/python bench/bench_query_overhead.py [--duration 10] [--rounds 2]

Prints a table and writes bench/results/bench_query_overhead.json; exits 1 below the bar.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from benchlib import stop

from procfleet.testing import free_port, wait_ready

BAR, AIM = 0.50, 0.60
RESULTS = Path(__file__).resolve().parent / "results"
HOSTNAME = "bench-host"


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT)


def wrk(url: str, seconds: int, headers: dict[str, str], conns: int = 16) -> dict:
    command = ["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    output = subprocess.run(command + [url], capture_output=True, text=True, check=True,
                            timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors:.*", output)
    p50 = re.search(r"50%\s+([\d.]+\w+)", output)
    p99 = re.search(r"99%\s+([\d.]+\w+)", output)
    return {"rps": rps, "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(0) if errors else None,
            "p50": p50.group(1) if p50 else None, "p99": p99.group(1) if p99 else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="direct/via-query pairs")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (make debs)", file=sys.stderr)
        return 2

    key = "pfq_" + secrets.token_urlsafe(32)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    processes: list[subprocess.Popen] = []
    rows = {"direct": [], "via query": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
            workdir = Path(tmp)
            exporter_port, query_port = free_port(), free_port()
            exporter_log = workdir / "exporter.log"
            processes.append(start(["-m", "exporter", "--listen", f"127.0.0.1:{exporter_port}",
                                    "--hostname", HOSTNAME], exporter_log))
            exporter = f"http://127.0.0.1:{exporter_port}"
            wait_ready(exporter + "/healthz", processes[-1], log=exporter_log)
            config = workdir / "query.yml"
            config.write_text(
                "auth:\n  api_keys:\n"
                f"    - {{name: bench, sha256: \"{hashlib.sha256(key.encode()).hexdigest()}\", "
                "permissions: [process:read]}\n"
                f"exporters:\n  - {{hostname: {HOSTNAME}, url: \"{exporter}\"}}\n")
            query_log = workdir / "query.log"
            query = f"http://127.0.0.1:{query_port}"
            direct_target = (f"{exporter}/process/{child.pid}", {})
            via_target = (f"{query}/node/{HOSTNAME}/process/{child.pid}",
                   {"Authorization": f"Bearer {key}"})

            def warm_up(url: str, headers: dict[str, str]) -> None:
                request = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(request, timeout=5) as response:
                    assert response.status == 200, (url, response.status)
                wrk(url, 1, headers)

            warm_up(*direct_target)
            for _ in range(args.rounds):
                rows["direct"].append(wrk(direct_target[0], args.duration, direct_target[1]))
                service = start(["-m", "query", "--config", str(config),
                                 "--listen", f"127.0.0.1:{query_port}"], query_log)
                processes.append(service)
                try:
                    wait_ready(query + "/healthz", service, log=query_log)
                    warm_up(*via_target)
                    rows["via query"].append(wrk(via_target[0], args.duration, via_target[1]))
                finally:
                    stop(service)
                    processes.remove(service)
    finally:
        for process in reversed(processes):
            stop(process)
        child.kill()
        child.wait()

    direct = statistics.median(r["rps"] for r in rows["direct"])
    via = statistics.median(r["rps"] for r in rows["via query"])
    ratio = via / direct
    failures = sum(r["non_2xx"] for rs in rows.values() for r in rs)
    print(f"\nquery overhead: unicast lookup, wrk -t2 -c16 -d{args.duration}s × {args.rounds} "
          f"rounds ({os.cpu_count()} CPUs; exporter, query service and wrk share them)")
    print(f"{'target':<10} {'req/s (median)':>15} {'rounds':>24} {'p50':>9} {'p99':>9}")
    for name, runs in rows.items():
        each = ", ".join(f"{r['rps']:.0f}" for r in runs)
        print(f"{name:<10} {statistics.median(r['rps'] for r in runs):>15.0f} {each:>24} "
              f"{runs[-1]['p50']:>9} {runs[-1]['p99']:>9}")
    verdict = "PASS" if ratio >= BAR and not failures else "FAIL"
    print(f"ratio via query / direct: {ratio:.1%} (bar {BAR:.0%}, aim {AIM:.0%}) {verdict}")
    if failures:
        print(f"{failures} responses were not 2xx")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_query_overhead.json"
    out.write_text(json.dumps({
        "bench": "query_overhead", "wrk": f"-t2 -c16 -d{args.duration}s",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "direct": rows["direct"], "via_query": rows["via query"],
        "direct_rps": direct, "via_query_rps": via, "ratio": round(ratio, 3),
        "bar": BAR, "aim": AIM, "pass": verdict == "PASS"}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
