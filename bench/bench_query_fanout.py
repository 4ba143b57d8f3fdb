"""Fan-out benchmark: time `GET /node/_all/process/{pid}` through the real query service.

Simulated exporters (many ports per helper process, each answering `/process/{pid}` after
20 ms over keep-alive HTTP/1.1) stand in for a fleet; the real query service is started with
`python -m query` and a generated config listing N of them (defaults otherwise: 2 s exporter
timeout, 5 s deadline, 1,024 calls in flight). For each N the median wall time of several
lookups is reported against the bars (≤ 60 ms at 200, ≤ 250 ms at 1,000 and ≤ 1 s at 10,000;
aim 40 and 150), and the query service's RSS once it keeps a connection to every exporter
(bar at 10,000: 200 MB). 10,000 is measured when the file-descriptor limit allows it.

Variants run in the same session against the same simulated exporters, so they compare on
one (possibly loaded) machine: `--baseline PYTHON` runs the query service of another checkout
too (e.g. /work/main/.venv/bin/python: the before-figure); `--h11` runs this checkout with
h11 parsing the answers instead of our parser (bench/_h11_reader.py). For each variant the
CPU time of one 63 KiB answer head fed to the parser a byte at a time is measured as well.

    .venv/bin/python bench/bench_query_fanout.py [--sizes 200,1000,10000] [--runs 7]
        [--baseline /work/main/.venv/bin/python] [--h11]

Prints a table and writes bench/results/bench_query_fanout.json; exits 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import rss_bytes, stop

from procfleet.testing import free_port

DELAY = 0.020
PORTS_PER_HELPER = 2500  # a helper holds a listening socket and a connection per port
BARS_MS = {200: (60, 40), 1000: (250, 150), 10000: (1000, 1000)}  # exporters: (bar, aim)
RSS_BARS_MB = {10000: 200}
BENCH = Path(__file__).resolve().parent
# Run the query service with h11 reading the answers (only the parser changes).
H11_LAUNCHER = (f"import sys, runpy; sys.path.insert(0, {str(BENCH)!r});"
                " import _h11_reader, query.httpclient;"
                " query.httpclient._Reader = _h11_reader.H11Reader;"
                " runpy.run_module('query', run_name='__main__', alter_sys=True)")
HEAD_CPU = r"""
import sys, time
from query.httpclient import _Reader
if sys.argv[1] == "h11":
    sys.path.insert(0, sys.argv[2])
    from _h11_reader import H11Reader as _Reader
head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
while len(head) < 63 * 1024 - 1010:
    head += b"X-Pad: " + b"a" * 1000 + b"\r\n"
raw = head + b"\r\n{}"
reader = _Reader(lambda status: 1024)
started = time.process_time()
for i in range(len(raw)):
    done = reader.feed(raw[i:i + 1])
assert done and reader.response.body == b"{}", reader.response
print(time.process_time() - started, len(head))
"""
RESULTS = Path(__file__).resolve().parent / "results"
PID = 4242
PROCESS_TEMPLATE = ('{"pid": %d, "name": "nginx", "user": "www-data", "state": "sleep", '
                    '"cpu_percent": 2.5, "mem_percent": 1.2, "mem_rss": 12345678, '
                    '"command": "nginx: master process /usr/sbin/nginx", '
                    '"start_time": "2026-01-15T10:30:00Z"}')


def raise_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- simulated exporters (helper process) -------------------------------------------------

class SimulatedExporter(asyncio.Protocol):
    """Minimal keep-alive HTTP/1.1: every request is answered after `delay` seconds.

    Deliberately cheap, so the benchmark measures the query service and not the fakes.
    """

    delay = DELAY

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def delay_for(self) -> float:
        """How long this exporter takes to answer (bench_search's vary by port)."""
        return self.delay

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        loop = asyncio.get_running_loop()
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            loop.call_later(self.delay_for(), self.answer, target)

    def answer(self, target: bytes) -> None:
        if self.transport.is_closing():
            return
        if target.startswith(b"/process/") and target[9:].isdigit():
            self.respond((PROCESS_TEMPLATE % int(target[9:])).encode())
        else:
            self.respond(b'{"status": "ok"}')

    def respond(self, body: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def serve_exporters(count: int, delay: float) -> None:
    SimulatedExporter.delay = delay
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(SimulatedExporter, "127.0.0.1", 0, backlog=64)
               for _ in range(count)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    sys.stdout.write(json.dumps({"ports": ports}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


def start_helpers(total: int, delay: float = DELAY) -> tuple[list[subprocess.Popen], list[int]]:
    """Start helper processes serving `total` simulated exporters; their ports."""
    helpers, ports = [], []
    remaining = total
    while remaining > 0:
        count = min(PORTS_PER_HELPER, remaining)
        remaining -= count
        helpers.append(subprocess.Popen([sys.executable, __file__, "--serve", str(count),
                                         "--delay", str(delay)],
                                        stdout=subprocess.PIPE, text=True))
    for helper in helpers:
        line = helper.stdout.readline()  # type: ignore[union-attr]  # stdout=PIPE: never None
        if not line:
            raise RuntimeError("a simulated-exporter helper failed to start")
        ports += json.loads(line)["ports"]
    return helpers, ports


# -- the query service -------------------------------------------------------------------

def start_query(ports: list[int], workdir: Path, python: str = sys.executable,
                h11: bool = False) -> tuple[subprocess.Popen, int, Path]:
    """Start the query service on a free port; tried again on another when a neighbour on
    this shared machine took the port first (our service then exits: cannot listen)."""
    config = workdir / f"query-{len(ports)}.yml"
    lines = ["auth: {enabled: false}", "exporters:"]
    lines += [f"  - {{hostname: sim-{i:05d}, url: \"http://127.0.0.1:{port}\"}}"
              for i, port in enumerate(ports)]
    config.write_text("\n".join(lines) + "\n")
    for _ in range(5):
        started = _start_query_once(config, workdir, python, h11, len(ports))
        if started is not None:
            return started
    raise RuntimeError("query service did not start on any of 5 free ports")


def _start_query_once(config: Path, workdir: Path, python: str, h11: bool, size: int
                      ) -> tuple[subprocess.Popen, int, Path] | None:
    port = free_port()
    log_path = workdir / f"query-{size}.log"
    entry = ["-c", H11_LAUNCHER] if h11 else ["-m", "query"]
    with open(log_path, "wb") as log:
        # cwd: the interpreter's own installed checkout is run, not the one we are in.
        process = subprocess.Popen([python, *entry, "--config", str(config),
                                    "--listen", f"127.0.0.1:{port}"],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if b"cannot listen" in log_path.read_bytes():
                return None
            raise RuntimeError(f"query service exited: {log_path.read_text()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request("GET", "/healthz")
                body = connection.getresponse().read()
            finally:
                connection.close()
        except OSError:
            time.sleep(0.05)
            continue
        if b'"exporters": %d' % size in body and process.poll() is None:
            return process, port, log_path
        stop(process)  # someone else answers on this port
        return None
    stop(process)
    raise RuntimeError("query service not ready in 30 s")


def time_lookups(port: int, count: int, runs: int, warmups: int) -> dict:
    """Time `runs` lookups after up to `warmups` that open the connections to every exporter.

    A run where some exporter did not answer ok (e.g. the 5 s deadline cut it) still counts
    in the times, and is reported in `incomplete_runs` with its lowest ok count.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def once() -> tuple[float, int, list]:
        started = time.perf_counter()
        connection.request("GET", f"/node/_all/process/{PID}")
        response = connection.getresponse()
        body = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:300]!r}")
        results = json.loads(body)["results"]
        if len(results) != count:
            raise RuntimeError(f"{len(results)} results for {count} exporters")
        failed = [r for r in results if r["status"] != "ok"]
        return elapsed, count - len(failed), failed[:2]

    times, incomplete, lowest_ok, examples = [], 0, count, []
    try:
        for _ in range(warmups):
            if once()[1] == count:
                break
        for _ in range(runs):
            elapsed, ok, failed = once()
            times.append(elapsed)
            if ok < count:
                incomplete += 1
                lowest_ok = min(lowest_ok, ok)
                examples = examples or failed
    finally:
        connection.close()
    return {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1),
            "max_ms": round(max(times), 1), "runs": len(times),
            "all_ms": [round(t, 1) for t in times], "incomplete_runs": incomplete,
            "lowest_ok": lowest_ok, "failure_examples": examples}


def measure_head_cpu(python: str, h11: bool) -> float | None:
    """CPU seconds for the parser of `python`'s checkout to read a head fed a byte at a time."""
    with tempfile.TemporaryDirectory(prefix="bench-head-") as tmp:
        done = subprocess.run([python, "-c", HEAD_CPU, "h11" if h11 else "ours", str(BENCH)],
                              capture_output=True, text=True, timeout=300, cwd=tmp)
    if done.returncode != 0:
        print(f"head CPU ({python}, h11={h11}) failed: {done.stderr[-500:]}", file=sys.stderr)
        return None
    return float(done.stdout.split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,1000,10000")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--baseline", help="another checkout's python, measured as 'before'")
    parser.add_argument("--h11", action="store_true", help="measure h11 as the parser too")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--delay", type=float, default=DELAY, help=argparse.SUPPRESS)
    args = parser.parse_args()
    hard = raise_file_limit()
    if args.serve:
        asyncio.run(serve_exporters(args.serve, args.delay))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    skipped = {}
    for size in list(sizes):
        if size + 1000 > hard:  # the query service holds a connection per exporter
            skipped[size] = f"file-descriptor hard limit {hard} is too low for {size} exporters"
            sizes.remove(size)
    variants = [("this", sys.executable, False)]
    if args.baseline:
        variants.insert(0, ("baseline", args.baseline, False))
    if args.h11:
        variants.append(("h11", sys.executable, True))
    head_cpu = {name: measure_head_cpu(python, h11) for name, python, h11 in variants}
    helpers, ports = start_helpers(max(sizes))
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
            for size in sizes:
                for name, python, h11 in variants:
                    query, port, _ = start_query(ports[:size], Path(tmp), python, h11)
                    try:
                        measured = time_lookups(port, size, args.runs if size < 10000 else 5,
                                                warmups=2 if size < 10000 else 4)
                        # After the lookups: a kept-alive connection to every exporter.
                        measured["rss_mb"] = round(rss_bytes(query.pid) / 2**20, 1)
                    finally:
                        stop(query)
                    bar, aim = BARS_MS.get(size, (None, None))
                    complete = measured["incomplete_runs"] == 0 and \
                        measured["rss_mb"] <= RSS_BARS_MB.get(size, measured["rss_mb"])
                    rows.append({"variant": name, "exporters": size, **measured, "bar_ms": bar,
                                 "aim_ms": aim, "pass": None if bar is None
                                 else complete and measured["median_ms"] <= bar})
    finally:
        for helper in helpers:
            helper.terminate()
        for helper in helpers:
            helper.wait(timeout=10)
            helper.stdout.close()  # type: ignore[union-attr]  # stdout=PIPE: never None

    print(f"\nquery fan-out: GET /node/_all/process/{{pid}}, exporters answering after "
          f"{DELAY * 1000:.0f} ms ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    print(f"{'variant':>8} {'exporters':>9} {'median ms':>10} {'min':>7} {'max':>7} {'bar':>5} "
          f"{'aim':>5} {'RSS MB':>7}  verdict")
    for row in rows:
        verdict = {True: "PASS", False: "FAIL", None: "-"}[row["pass"]]
        print(f"{row['variant']:>8} {row['exporters']:>9} {row['median_ms']:>10.1f} "
              f"{row['min_ms']:>7.1f} {row['max_ms']:>7.1f} {row['bar_ms'] or '-':>5} "
              f"{row['aim_ms'] or '-':>5} {row['rss_mb']:>7.1f}  {verdict}")
    for row in rows:
        if row["incomplete_runs"]:
            print(f"{row['variant']:>8} {row['exporters']:>9} {row['incomplete_runs']} of "
                  f"{row['runs']} runs had exporters not ok (as few as {row['lowest_ok']} ok), "
                  f"e.g. {row['failure_examples'][0]['error']}")
    for size, reason in skipped.items():
        print(f"{size:>9} skipped: {reason}")
    for name, seconds in head_cpu.items():
        print(f"{name:>8} CPU for a 63 KiB head fed one byte at a time: "
              + (f"{seconds * 1000:.0f} ms" if seconds is not None else "failed"))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_query_fanout.json"
    passed = all(r["pass"] is not False for r in rows if r["variant"] == "this")
    out.write_text(json.dumps({
        "bench": "query_fanout", "exporter_delay_ms": DELAY * 1000,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": rows, "skipped": {str(k): v for k, v in skipped.items()},
        "head_byte_at_a_time_cpu_s": head_cpu, "pass": passed}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
