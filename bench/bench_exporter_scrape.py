"""Exporter CPU per /metrics scrape at ~1,000 processes: procfleet vs. process-exporter.

    .venv/bin/python bench/bench_exporter_scrape.py [--processes 1000] [--rounds 5]

Spawns idle sleepers (50 distinct comm names) until about --processes are live, then starts
(a) procfleet's exporter as users run it, `python -m exporter --listen ... --config ...`,
and (b) Debian's /usr/bin/prometheus-process-exporter with -threads=false
-gather-smaps=false, both grouping every process by comm (`name: "{{.Comm}}",
cmdline: ['.+']`, process-exporter's packaged default). Each round, for each server in turn:
3 warm-up scrapes, then the server's own CPU time (utime+stime of all its threads, from
/proc/PID/stat) across --scrapes scrapes. Reports the medians over the rounds per scrape and
per live process, the ratio ours/theirs and our RSS, prints a table and writes
bench/results/exporter_scrape.json. The bars (issue): ratio <= 0.5 (aim 0.25), RSS <= 40 MB.

A third server, procfleet with `metrics: {threads_wchan: true}`, runs in the same rounds:
the ratio "wchan on / off" is what namedprocess_namegroup_threads_wchan costs (one read of
/proc/PID/wchan per process, plus a task directory listing and one read per thread for
multi-threaded processes). The sleepers have one thread each; the host's other processes
bring their threads.

Also times collect() + generate_latest in this process (time.process_time) to split the
cost between reading /proc and writing the exposition. Every child is cleaned up, even on
error or Ctrl-C; the whole run is bounded (--budget seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from procfleet.testing import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from _procs import (  # noqa: E402
    Server,
    Sleepers,
    cpu_seconds,
    live_pids,
    raise_nofile,
    rss_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "exporter_scrape.json"
THEIRS = "/usr/bin/prometheus-process-exporter"
GROUP_BY_COMM = [{"name": "{{.Comm}}", "cmdline": [".+"]}]
RATIO_BAR, RATIO_AIM, RSS_BAR = 0.5, 0.25, 40 * 1024 * 1024


def scrape(url: str) -> int:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as answer:
        return len(answer.read())


def measure(server: Server, scrapes: int, warmup: int) -> dict[str, float]:
    """The server's CPU seconds and the client's wall seconds per scrape."""
    for _ in range(warmup):
        scrape(server.url)
    pid = server.proc.pid
    live = len(live_pids())
    cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
    size = 0
    for _ in range(scrapes):
        size = scrape(server.url)
    cpu1, wall1 = cpu_seconds(pid), time.perf_counter()
    cpu = (cpu1 - cpu0) / scrapes
    return {"cpu_s_per_scrape": cpu, "wall_s_per_scrape": (wall1 - wall0) / scrapes,
            "cpu_us_per_process": cpu / live * 1e6, "live_processes": live,
            "body_bytes": size}


def in_process(scrapes: int) -> dict[str, float]:
    """collect() and generate_latest timed separately in this process, as a breakdown."""
    from prometheus_client import CollectorRegistry, generate_latest

    from exporter.collector import ProcessCollector
    from exporter.config import MetricsOptions
    from exporter.groups import parse_groups
    from exporter.procs import UserNames, make_reader
    from procfleet.configcheck import Problems

    collector = ProcessCollector(make_reader(), parse_groups(GROUP_BY_COMM, Problems()),
                                 MetricsOptions(), version="bench", user_name=UserNames())
    registry = CollectorRegistry()
    registry.register(collector)
    for _ in range(3):
        generate_latest(registry)
    collect = expose = 0.0
    for _ in range(scrapes):
        t0 = time.process_time()
        families = list(collector.collect())
        t1 = time.process_time()

        class Frozen:  # expose the already collected families only
            def collect(self, families=families):
                return families

        frozen = CollectorRegistry()
        frozen.register(Frozen())
        generate_latest(frozen)
        t2 = time.process_time()
        collect += t1 - t0
        expose += t2 - t1
    live = len(live_pids())
    return {"collect_s": collect / scrapes, "exposition_s": expose / scrapes,
            "collect_us_per_process": collect / scrapes / live * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=140.0,
                        help="start no new round after this many seconds")
    args = parser.parse_args()
    started = time.monotonic()
    # SIGTERM/SIGHUP become SystemExit so that the finally below reaps every child.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))
    nofile = raise_nofile()

    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="procfleet-bench-") as tmp:
        work = Path(tmp)
        sleepers = Sleepers(work)
        try:
            live = sleepers.top_up(args.processes)
            print(f"{live} processes live ({len(sleepers.children)} sleepers spawned), "
                  f"RLIMIT_NOFILE {nofile}", flush=True)
            ours_config = work / "procfleet-exporter.yml"
            ours_config.write_text(json.dumps({"groups": GROUP_BY_COMM}))  # JSON is YAML
            wchan_config = work / "procfleet-exporter-wchan.yml"
            wchan_config.write_text(json.dumps({"groups": GROUP_BY_COMM,
                                                "metrics": {"threads_wchan": True}}))
            theirs_config = work / "process-exporter.yml"
            theirs_config.write_text(json.dumps({"process_names": GROUP_BY_COMM}))

            port = free_port()
            ours_mode = "served: python -m exporter"
            if (ROOT / "exporter" / "__main__.py").exists():
                servers.append(Server(
                    "procfleet", [sys.executable, "-m", "exporter", "--listen",
                                  f"127.0.0.1:{port}", "--config", str(ours_config)],
                    f"http://127.0.0.1:{port}", "/healthz", work / "procfleet.log"))
                port = free_port()
                servers.append(Server(
                    "procfleet+wchan", [sys.executable, "-m", "exporter", "--listen",
                                        f"127.0.0.1:{port}", "--config", str(wchan_config)],
                    f"http://127.0.0.1:{port}", "/healthz", work / "procfleet-wchan.log"))
            else:
                ours_mode = "in-process only (exporter/__main__.py missing)"
            if Path(THEIRS).exists():
                port = free_port()
                servers.append(Server(
                    "process-exporter", [THEIRS, "-threads=false", "-gather-smaps=false",
                                         "-web.listen-address", f"127.0.0.1:{port}",
                                         "-config.path", str(theirs_config)],
                    f"http://127.0.0.1:{port}", "/metrics", work / "process-exporter.log"))

            rounds: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
            for i in range(args.rounds):
                if time.monotonic() - started > args.budget:
                    print(f"budget of {args.budget} s reached after {i} rounds")
                    break
                sleepers.top_up(args.processes)  # sleepers do not exit; others may have
                order = servers if i % 2 == 0 else servers[::-1]
                for server in order:
                    rounds[server.name].append(measure(server, args.scrapes, args.warmup))
                print(f"round {i + 1}: " + ", ".join(
                    f"{name} {r[-1]['cpu_s_per_scrape'] * 1e3:.1f} ms"
                    for name, r in rounds.items()), flush=True)

            breakdown = in_process(args.scrapes)
            rss = {s.name: rss_bytes(s.proc.pid) for s in servers}
        finally:
            for server in servers:
                server.stop()
            sleepers.reap()

    result = report(rounds, breakdown, rss, ours_mode, args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)} in {time.monotonic() - started:.0f} s")
    return 0


def report(rounds: dict[str, list[dict[str, float]]], breakdown: dict[str, float],
           rss: dict[str, int], ours_mode: str, args: argparse.Namespace) -> dict:
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in rounds.items() if runs}
    ours, theirs = medians.get("procfleet"), medians.get("process-exporter")
    ratio = (ours["cpu_s_per_scrape"] / theirs["cpu_s_per_scrape"]
             if ours and theirs and theirs["cpu_s_per_scrape"] else None)
    wchan = medians.get("procfleet+wchan")
    wchan_ratio = (wchan["cpu_s_per_scrape"] / ours["cpu_s_per_scrape"]
                   if wchan and ours and ours["cpu_s_per_scrape"] else None)
    print()
    print(f"{'exporter':<18} {'CPU ms/scrape':>14} {'CPU us/process':>15} {'wall ms':>8} "
          f"{'RSS MB':>7} {'procs':>6} {'body KB':>8}")
    for name, m in medians.items():
        print(f"{name:<18} {m['cpu_s_per_scrape'] * 1e3:>14.2f} "
              f"{m['cpu_us_per_process']:>15.1f} {m['wall_s_per_scrape'] * 1e3:>8.1f} "
              f"{rss.get(name, 0) / 2**20:>7.1f} {m['live_processes']:>6.0f} "
              f"{m['body_bytes'] / 1024:>8.1f}")
    print(f"in-process: collect {breakdown['collect_s'] * 1e3:.2f} ms "
          f"({breakdown['collect_us_per_process']:.1f} us/process), "
          f"exposition {breakdown['exposition_s'] * 1e3:.2f} ms")
    if ratio is not None:
        verdict = ("meets the aim" if ratio <= RATIO_AIM else
                   "meets the bar" if ratio <= RATIO_BAR else "OVER THE BAR")
        print(f"ratio ours/theirs CPU per scrape: {ratio:.2f} "
              f"(bar {RATIO_BAR}, aim {RATIO_AIM}): {verdict}")
    if wchan_ratio is not None:
        print(f"threads_wchan on / off, CPU per scrape: {wchan_ratio:.2f}")
    if "procfleet" in rss:
        ok = "ok" if rss["procfleet"] <= RSS_BAR else "OVER THE BAR"
        print(f"procfleet RSS {rss['procfleet'] / 2**20:.1f} MB (bar 40 MB): {ok}")
    return {
        "benchmark": "exporter CPU per /metrics scrape",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                 "python": platform.python_version(), "theirs": _their_version()},
        "settings": {"processes": args.processes, "rounds": len(next(iter(rounds.values()),
                                                                     [])),
                     "scrapes_per_round": args.scrapes, "warmup": args.warmup,
                     "groups": GROUP_BY_COMM, "ours": ours_mode,
                     "theirs_flags": "-threads=false -gather-smaps=false"},
        "medians": medians,
        "rounds": rounds,
        "ratio_ours_over_theirs": ratio,
        "ratio_wchan_on_over_off": wchan_ratio,
        "rss_bytes": rss,
        "in_process": breakdown,
        "bars": {"ratio": RATIO_BAR, "ratio_aim": RATIO_AIM, "rss_bytes": RSS_BAR},
    }


def _their_version() -> str | None:
    try:
        done = subprocess.run([THEIRS, "-version"], capture_output=True, timeout=10)
        return (done.stdout + done.stderr).decode().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


if __name__ == "__main__":
    sys.exit(main())
