"""Search benchmark (issue 11): fleet-wide ranking and NDJSON streaming through the real
query service, against simulated exporters (many ports per helper process).

1. Ranking: `GET /node/_all/process?scope=fleet&sort=cpu&limit=10` over 1,000 exporters that
   each hold 300 processes and answer after 20 ms (honouring sort and limit, as a real
   exporter does: the pushdown). Median of several runs against the bar (300 ms), and the
   query service's RSS growth over the runs (bar 100 MB). Baseline in the same run: the same
   list without scope (per-host top 10, no ranking).
2. Streaming: `GET /node/_all/process` with `Accept: application/x-ndjson` over 1,000
   exporters answering after 20 to 200 ms (spread evenly): time to the first line (bar
   60 ms) and the last line's lag behind the slowest exporter (bar 50 ms). Baseline in the
   same run: the JSON answer of the same request (it waits for the slowest).

    .venv/bin/python bench/bench_search.py [--exporters 1000] [--runs 7] [--only stream]

The sort key is `cpu` here: `cpu_recent` (issue 10) is not in this branch. Prints a table
with the load average (the machine is shared) and writes bench/results/bench_search.json.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_query_fanout
from bench_query_fanout import raise_file_limit, start_query
from benchlib import rss_bytes, save, stop

PROCESSES = 300
PORTS_PER_HELPER = 1000
BARS = {"rank_median_ms": 300, "rank_rss_growth_mb": 100, "first_line_ms": 60,
        "last_line_lag_ms": 50}


def _process(pid: int, cpu: float) -> dict:
    return {"pid": pid, "name": "nginx", "user": "www-data", "state": "sleep",
            "cpu_percent": cpu, "mem_percent": 1.2, "mem_rss": 12345678,
            "command": f"nginx: worker process {pid}", "start_time": "2026-01-15T10:30:00Z"}


class SimulatedExporter(bench_query_fanout.SimulatedExporter):
    """Keep-alive HTTP/1.1; `/process?...limit=N` answers its top N of 300 by cpu, after the
    delay of its port."""

    delays: dict[int, float] = {}
    processes: dict[int, list[dict]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.port = transport.get_extra_info("sockname")[1]

    def delay_for(self) -> float:
        return self.delays[self.port]

    def answer(self, target: bytes) -> None:
        if self.transport.is_closing():
            return
        path, _, query = target.decode().partition("?")
        if path == "/process":
            params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
            listed = self.processes[self.port]  # sorted by cpu, largest first
            if "limit" in params:
                listed = listed[: int(params["limit"])]
            self.respond(json.dumps({"hostname": "sim", "processes": listed}).encode())
        else:
            self.respond(b'{"status": "ok"}')


async def serve(count: int, first: int, total: int, spread: bool) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for i in range(count):
        server = await loop.create_server(SimulatedExporter, "127.0.0.1", 0, backlog=64)
        port = server.sockets[0].getsockname()[1]
        n = first + i
        SimulatedExporter.delays[port] = (0.020 + 0.180 * n / max(total - 1, 1)) if spread \
            else 0.020
        SimulatedExporter.processes[port] = sorted(
            (_process(1000 + k, round((n * 7919 + k * 104729) % 10007 / 100, 2))
             for k in range(PROCESSES)), key=lambda p: p["cpu_percent"], reverse=True)
        servers.append(server)
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    sys.stdout.write(json.dumps({"ports": ports}) + "\n")
    sys.stdout.flush()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()


def start_helpers(total: int, spread: bool) -> tuple[list[subprocess.Popen], list[int]]:
    helpers, ports = [], []
    for first in range(0, total, PORTS_PER_HELPER):
        count = min(PORTS_PER_HELPER, total - first)
        helpers.append(subprocess.Popen(
            [sys.executable, __file__, "--serve", str(count), "--first", str(first),
             "--total", str(total)] + (["--spread"] if spread else []),
            stdout=subprocess.PIPE, text=True))
    for helper in helpers:
        line = helper.stdout.readline()  # type: ignore[union-attr]  # stdout=PIPE
        ports += json.loads(line)["ports"]
    return helpers, ports


def stop_helpers(helpers: list[subprocess.Popen]) -> None:
    for helper in helpers:
        helper.terminate()
    for helper in helpers:
        helper.wait(timeout=10)
        helper.stdout.close()  # type: ignore[union-attr]  # stdout=PIPE


def timed_get(port: int, path: str, accept: str = "application/json"
              ) -> tuple[float, float, bytes]:
    """(ms to the first body line, ms to the end, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        started = time.perf_counter()
        connection.request("GET", path, headers={"Accept": accept})
        response = connection.getresponse()
        first = response.readline()
        first_ms = (time.perf_counter() - started) * 1000
        rest = response.read()
        end_ms = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(first + rest)[:300]!r}")
        return first_ms, end_ms, first + rest
    finally:
        connection.close()


def bench_rank(size: int, runs: int, workdir: Path) -> dict:
    helpers, ports = start_helpers(size, spread=False)
    try:
        query, port, _ = start_query(ports, workdir)
        try:
            for _ in range(2):  # open the connections to every exporter
                timed_get(port, "/node/_all/process?sort=cpu&limit=10")
            rss_before = rss_bytes(query.pid)
            ranked, per_host = [], []
            for _ in range(runs):
                _, ms, body = timed_get(port, "/node/_all/process?scope=fleet&sort=cpu&limit=10")
                data = json.loads(body)
                assert len(data["ranked"]) == 10, data["ranked"]
                assert all(r["status"] == "ok" for r in data["results"])
                ranked.append(ms)
                per_host.append(timed_get(port, "/node/_all/process?sort=cpu&limit=10")[1])
            growth = (rss_bytes(query.pid) - rss_before) / 2**20
        finally:
            stop(query)
    finally:
        stop_helpers(helpers)
    return {"rank_median_ms": round(statistics.median(ranked), 1),
            "rank_all_ms": [round(t, 1) for t in ranked],
            "baseline_per_host_median_ms": round(statistics.median(per_host), 1),
            "rank_rss_growth_mb": round(growth, 1),
            "rank_rss_mb": round(rss_before / 2**20, 1)}


def bench_stream(size: int, runs: int, workdir: Path) -> dict:
    helpers, ports = start_helpers(size, spread=True)
    slowest_ms = 200.0
    try:
        query, port, _ = start_query(ports, workdir)
        try:
            for _ in range(2):
                timed_get(port, "/node/_all/process?limit=1")
            firsts, lags, json_ends = [], [], []
            for _ in range(runs):
                first, end, body = timed_get(port, "/node/_all/process?limit=1",
                                             "application/x-ndjson")
                lines = body.splitlines()
                summary = json.loads(lines[-1])["summary"]
                assert summary["targeted"] == size and summary["ok"] == size, summary
                firsts.append(first)
                lags.append(end - slowest_ms)
                json_ends.append(timed_get(port, "/node/_all/process?limit=1")[1])
        finally:
            stop(query)
    finally:
        stop_helpers(helpers)
    return {"first_line_ms": round(statistics.median(firsts), 1),
            "first_all_ms": [round(t, 1) for t in firsts],
            "last_line_lag_ms": round(statistics.median(lags), 1),
            "lag_all_ms": [round(t, 1) for t in lags],
            "baseline_json_median_ms": round(statistics.median(json_ends), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exporters", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--only", choices=("rank", "stream"),
                        help="run one part only (its bars alone are judged)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--spread", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_file_limit()
    if args.serve:
        asyncio.run(serve(args.serve, args.first, args.total, args.spread))
        return 0
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        figures = {**(bench_rank(args.exporters, args.runs, Path(tmp))
                      if args.only != "stream" else {}),
                   **(bench_stream(args.exporters, args.runs, Path(tmp))
                      if args.only != "rank" else {})}
    load_after = os.getloadavg()[0]
    bars = {k: bar for k, bar in BARS.items() if k in figures}
    verdicts = {k: figures[k] <= bar for k, bar in bars.items()}
    print(f"\nsearch: {args.exporters} exporters, {args.runs} runs, {os.cpu_count()} CPUs, "
          f"load {load_before:.1f} -> {load_after:.1f}")
    for key, bar in bars.items():
        print(f"  {key:>20}: {figures[key]:>8.1f}  (bar {bar})  "
              f"{'PASS' if verdicts[key] else 'FAIL'}")
    if "baseline_per_host_median_ms" in figures:
        print(f"  per-host top-10 list (baseline) median "
              f"{figures['baseline_per_host_median_ms']} ms")
    if "baseline_json_median_ms" in figures:
        print(f"  JSON answer of the streamed request (baseline) median "
              f"{figures['baseline_json_median_ms']} ms; slowest exporter 200 ms; "
              f"first {figures['first_all_ms']}, lag {figures['lag_all_ms']}")
    out = save("bench_search", {"bench": "search", "exporters": args.exporters,
                                "load": [load_before, load_after], **figures,
                                "bars": bars, "pass": verdicts})
    print(f"wrote {out}")
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
