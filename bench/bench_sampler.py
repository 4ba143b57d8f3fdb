"""Issue 10's costs: the rate sampler at ~1,000 processes, `expand=all`, and lookup throughput.

1. Sampler CPU: CPU seconds of one `RateSampler.sweep()` over every process on the host
   (topped up to --procs with idle sleepers), as % of one core at the default 5 s interval
   (target <= 1%), and the memory its history holds (tracemalloc).
2. `GET /process/{pid}?expand=all` for an ordinary process (a sleeping child with a socket
   and a child of its own): milliseconds per lookup in-process (target <= 5 ms), against the
   plain lookup of the same process.
3. Lookup throughput: wrk -c16 on GET /process/{pid} of this tree's exporter (sampler running)
   against the baseline exporter (--baseline, default /work/main's), rounds alternated so
   both see the same load; the ratio must stay >= 0.9.

Run: .venv/bin/python bench/bench_sampler.py [--procs 1000] [--rounds 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from _procs import Sleepers, live_pids, raise_nofile
from benchlib import BIN, save, start, stop, wrk

from procfleet.testing import free_port

CHILD = ("import socket, subprocess, time\n"
         "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
         "k = subprocess.Popen(['sleep', '600'])\n"
         "time.sleep(600)\n")


def sampler_cost(sweeps: int) -> dict[str, float]:
    from exporter.procs import ProcfsReader
    from exporter.rates import DEFAULT_INTERVAL, RateSampler

    # CPU first, without tracemalloc (it slows every allocation several times over).
    sampler = RateSampler(ProcfsReader(), background=False)
    cpu: list[float] = []
    for _ in range(sweeps):
        t0 = time.thread_time()
        sampler.sweep()
        cpu.append(time.thread_time() - t0)
        time.sleep(0.2)
    per_sweep = statistics.median(cpu)
    # Memory: what a fresh sampler holds after two readings (every process with rates).
    reader = ProcfsReader()
    reader.counters(1)  # warm: first-call allocations are not the history's
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    fresh = RateSampler(reader, background=False)
    fresh.sweep()
    fresh.sweep()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(s.size_diff for s in after.compare_to(before, "filename"))
    return {"processes": len(sampler), "sweep_cpu_ms": round(per_sweep * 1000, 2),
            "cpu_percent_of_core_at_5s": round(100 * per_sweep / DEFAULT_INTERVAL, 3),
            "history_kib": round(held / 1024, 1),
            "history_bytes_per_process": round(held / max(len(fresh), 1))}


def expand_cost(pid: int, runs: int) -> dict[str, float]:
    from exporter.lookup import ProcessLookup
    from exporter.masking import Masker
    from exporter.procs import ProcfsReader
    from procfleet.params import LookupOptions, check_expand

    lookup = ProcessLookup(ProcfsReader(), Masker.build())
    every = LookupOptions(expand=check_expand("all"))
    plain = LookupOptions()

    def per_call(options: LookupOptions) -> float:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            lookup.get_with(pid, options)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    info, details = lookup.get_with(pid, every)
    return {"expand_all_ms": round(per_call(every), 3), "plain_ms": round(per_call(plain), 3),
            "groups_answered": sorted(details)}


def throughput(baseline: Path, pid: int, rounds: int, seconds: int) -> dict[str, float]:
    servers = {}
    for name, exe in (("ours", BIN / "procfleet-exporter"), ("baseline", baseline)):
        port = free_port()
        servers[name] = (start([str(exe), "--listen", f"127.0.0.1:{port}"],
                               f"http://127.0.0.1:{port}/healthz"), port)
    rps: dict[str, list[float]] = {"ours": [], "baseline": []}
    try:
        for i in range(rounds):
            order = ("ours", "baseline") if i % 2 == 0 else ("baseline", "ours")
            for name in order:
                url = f"http://127.0.0.1:{servers[name][1]}/process/{pid}"
                rps[name].append(wrk(url, seconds=seconds)["rps"])
            print(f"round {i + 1}/{rounds}: ours {rps['ours'][-1]:.0f} req/s, "
                  f"baseline {rps['baseline'][-1]:.0f} req/s", flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    ours, base = statistics.median(rps["ours"]), statistics.median(rps["baseline"])
    return {"ours_rps": ours, "baseline_rps": base, "ratio": round(ours / base, 3),
            "rounds": rps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, default=1000)
    parser.add_argument("--sweeps", type=int, default=15)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--baseline", type=Path,
                        default=Path("/work/main/.venv/bin/procfleet-exporter"))
    args = parser.parse_args()
    raise_nofile()

    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        sleepers = Sleepers(Path(tmp), lifetime=600)
        try:
            host = sleepers.top_up(args.procs)
            time.sleep(1.0)  # let the sleepers exec
            print(f"{host} processes on the host", flush=True)
            sampler = sampler_cost(args.sweeps)
            print(f"sampler: {sampler}", flush=True)
            expand = expand_cost(child.pid, args.runs)
            print(f"expand: {expand}", flush=True)
        finally:
            sleepers.reap()
    tput = throughput(args.baseline, child.pid, args.rounds, args.seconds)
    child.kill()
    child.wait()
    summary = {"host_processes": len(live_pids()), **sampler, **expand,
               **{k: v for k, v in tput.items() if k != "rounds"}}
    print("\nmedians (machine shared and loaded; see the issue 10 report):")
    print(f"  sampler: {sampler['sweep_cpu_ms']} ms CPU per sweep of {sampler['processes']} "
          f"processes = {sampler['cpu_percent_of_core_at_5s']}% of a core at 5 s "
          f"(target <= 1%); history {sampler['history_kib']} KiB "
          f"({sampler['history_bytes_per_process']} B/process)")
    print(f"  expand=all: {expand['expand_all_ms']} ms per lookup (plain {expand['plain_ms']} "
          f"ms; target <= 5 ms)")
    print(f"  lookup throughput: ours {tput['ours_rps']:.0f} vs baseline "
          f"{tput['baseline_rps']:.0f} req/s, ratio {tput['ratio']} (target >= 0.9)")
    save("sampler", {"median": summary, "throughput_rounds": tput["rounds"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
