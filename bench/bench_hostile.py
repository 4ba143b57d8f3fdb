"""Hostile exporters against the query service: /healthz and healthy-host p99 with and without
64 clients on a hung exporter, and peak RSS growth for one 16 MiB list answer of tiny objects.

    python bench/bench_hostile.py [--runs 3] [--code DIR]

`--code DIR` runs the query service from another checkout's sources (PYTHONPATH=DIR), e.g. a
`git archive` of the commit before a change, for a before/after in the same run. Results go to
bench/results/hostile.json. Medians of `--runs` runs, the versions taking turns run by run;
each run notes the 1-minute load average when it started. Every load is bounded in time and
count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchlib import BIN, ROOT, median, save, stop

from procfleet.testing import free_port, wait_ready

sys.path.insert(0, str(ROOT / "tests"))
from hostile_exporter import HostileExporter  # noqa: E402

HAMMER = ROOT / "bench" / "hammer.py"


def start_query(config: str, code: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    path = Path(tempfile.mkdtemp()) / "query.yml"
    path.write_text(config)
    env = dict(os.environ, PYTHONPATH=code) if code else None
    proc = subprocess.Popen([sys.executable, "-m", "query", "--config", str(path), "--listen",
                             f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/healthz", proc)
    return proc, url


def latency(url: str) -> float:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        exc.close()
    return time.perf_counter() - started


def sample(urls: list[str], seconds: float) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {u: [] for u in urls}
    until = time.monotonic() + seconds
    while time.monotonic() < until and len(samples[urls[0]]) < 1000:
        for url in urls:
            samples[url].append(latency(url))
        time.sleep(0.01)
    return samples


def p99_ms(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] * 1000


def hung_run(hostile: HostileExporter, exporter_url: str, exporter_pid: int,
             code: str | None, seconds: float) -> dict:
    config = ("auth: {enabled: false}\nthreads: 16\ntimeouts: {exporter: 2.0, request: 5.0}\n"
              f"exporters:\n  - {{hostname: hung, url: \"{hostile.url('hang')}\"}}\n"
              f"  - {{hostname: healthy, url: \"{exporter_url}\"}}\n")
    proc, url = start_query(config, code)
    try:
        urls = [url + "/healthz", f"{url}/node/healthy/process/{exporter_pid}"]
        quiet = sample(urls, seconds)
        load = subprocess.Popen([sys.executable, str(HAMMER), f"{url}/node/hung/process/1",
                                 "--clients", "64", "--seconds", str(seconds)],
                                stdout=subprocess.PIPE, text=True)
        loaded = sample(urls, seconds)
        out, _ = load.communicate(timeout=seconds + 120)
        return {"healthz_p99_ms": p99_ms(quiet[urls[0]]),
                "healthy_p99_ms": p99_ms(quiet[urls[1]]),
                "healthz_p99_ms_loaded": p99_ms(loaded[urls[0]]),
                "healthy_p99_ms_loaded": p99_ms(loaded[urls[1]]),
                "hung_requests": json.loads(out)["requests"]}
    finally:
        stop(proc)


def kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def biglist_run(hostile: HostileExporter, code: str | None) -> dict:
    config = ("auth: {enabled: false}\ntimeouts: {exporter: 20.0, request: 30.0}\n"
              f"exporters:\n  - {{hostname: big, url: \"{hostile.url('biglist')}\"}}\n")
    proc, url = start_query(config, code)
    try:
        before = kib(proc.pid, "VmRSS")
        seconds = latency(url + "/node/big/process")
        return {"rss_growth_mib": (kib(proc.pid, "VmHWM") - before) / 1024,
                "seconds": seconds}
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--code", help="run the query service from these sources as well")
    parser.add_argument("--skip-biglist", action="store_true",
                        help="only the hung-exporter runs (no 16 MiB list answer)")
    options = parser.parse_args()
    exporter_port = free_port()
    exporter = subprocess.Popen([str(BIN / "procfleet-exporter"), "--listen",
                                 f"127.0.0.1:{exporter_port}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    results: dict[str, dict] = {}
    try:
        wait_ready(f"http://127.0.0.1:{exporter_port}/healthz", exporter)
        versions = {"this": None, **({"other": options.code} if options.code else {})}
        runs: dict[str, list[dict]] = {name: [] for name in versions}
        with HostileExporter(lifetime=3600) as hostile:
            # Versions take turns run by run: on a shared machine the load drifts over
            # minutes, and a same-run comparison should see the same drift on both sides.
            for _ in range(options.runs):
                for name, code in versions.items():
                    loadavg = os.getloadavg()[0]
                    run = hung_run(hostile, f"http://127.0.0.1:{exporter_port}", exporter.pid,
                                   code, options.seconds)
                    if not options.skip_biglist:
                        run.update(biglist_run(hostile, code))
                    run["loadavg"] = loadavg
                    runs[name].append(run)
                    print(name, json.dumps({k: round(v, 1) for k, v in run.items()}),
                          flush=True)
        for name, done in runs.items():
            results[name] = {key: median([r[key] for r in done]) for key in done[0]}
            print("median", name, json.dumps({k: round(v, 1)
                                              for k, v in results[name].items()}), flush=True)
    finally:
        stop(exporter)
    save("hostile", {"runs": options.runs, "results": results,
                     "note": "medians; 2-core machine shared with other work"})


if __name__ == "__main__":
    main()
