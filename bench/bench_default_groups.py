"""How many groups (so series) the default grouping makes on this host, against alternatives.

    .venv/bin/python bench/bench_default_groups.py [--seconds 60] [--every 5]

Starts, side by side on this host's processes, procfleet's exporter with its built-in
default (user processes by comm, kernel threads as one group `kernel_threads`), procfleet with
the former default (every comm its own group, kernel threads included), and Debian's
prometheus-process-exporter with its packaged config (`{{.Comm}}` of processes with a
command line, which leaves kernel threads out). Scrapes each every --every seconds for
--seconds, and reports the groups at the first scrape and at the end (both exporters keep an
emptied group): kernel worker threads rename themselves (kworker/u8:2-events_unbound), so
groups named by their comm keep growing. Writes bench/results/default_groups.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from procfleet.testing import EXPORTER, Server, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "default_groups.json"
THEIRS = "/usr/bin/prometheus-process-exporter"
PACKAGED = "/usr/share/doc/prometheus-process-exporter/examples/all.yaml"
FORMER_DEFAULT = ('groups:\n  - {name: "{{.Comm}}", kernel_thread: true}\n'
                  '  - {name: "{{.Comm}}", kernel_thread: false}\n')
KERNEL_PREFIXES = ("kworker/", "cpuhp/", "irq/", "ksoftirqd/", "migration/", "rcu", "idle_inject/")


def groups(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {s.labels["groupname"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "namedprocess_namegroup_num_procs"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--every", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="procfleet-groups-") as tmp:
        work = Path(tmp)
        (work / "former.yml").write_text(FORMER_DEFAULT)
        setups = {
            "procfleet default": [EXPORTER],
            "procfleet former default (every comm)": [EXPORTER, "--config",
                                                      str(work / "former.yml")],
            "process-exporter packaged config": [THEIRS, "-threads=false",
                                                 "-gather-smaps=false", "-config.path",
                                                 PACKAGED],
        }
        servers: dict[str, Server] = {}
        try:
            for name, argv in setups.items():
                port = free_port()
                flag = "--listen" if argv[0] == EXPORTER else "-web.listen-address"
                servers[name] = Server.start([*argv, flag, f"127.0.0.1:{port}"], port,
                                             work / f"{port}.log", path="/metrics")
            first = {name: groups(s.url) for name, s in servers.items()}
            deadline = time.monotonic() + args.seconds
            last = first
            while time.monotonic() < deadline:  # bounded by --seconds
                time.sleep(args.every)
                last = {name: groups(s.url) for name, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()

    result = {}
    print(f"{'setup':<40} {'groups at start':>16} {'kernel-named':>13} "
          f"{'after ' + str(int(args.seconds)) + ' s':>10} {'non-empty':>10}")
    for name in setups:
        start, end = first[name], last[name]
        kernel = sum(1 for g in start if g.startswith(KERNEL_PREFIXES) or g == "kthreadd")
        live = sum(1 for v in end.values() if v > 0)
        result[name] = {"groups_first_scrape": len(start), "kernel_named_first_scrape": kernel,
                        "groups_end": len(end), "non_empty_end": live}
        print(f"{name:<40} {len(start):>16} {kernel:>13} {len(end):>10} {live:>10}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"seconds": args.seconds, "every": args.every,
                                   "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "results": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
