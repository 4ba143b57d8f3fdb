"""Benchmark helpers: spawn many sleepers, start servers, read a process's CPU and memory."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_nofile(wanted: int = 65536) -> int:
    """Raise the soft open-files limit towards `wanted` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def live_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


class Sleepers:
    """Idle children under `kinds` distinct comm names; they end on their own after `lifetime`.

    Distinct names give the exporters a realistic number of groups to aggregate and expose.
    """

    def __init__(self, workdir: Path, kinds: int = 50, lifetime: int = 600) -> None:
        self.links = []
        for i in range(kinds):
            link = workdir / f"bsleep-{i:02d}"
            if not link.exists():
                link.symlink_to("/bin/sleep")
            self.links.append(str(link))
        self.lifetime = str(lifetime)
        self.children: list[subprocess.Popen[bytes]] = []

    def spawn(self, count: int) -> None:
        for i in range(count):
            self.children.append(subprocess.Popen(
                [self.links[i % len(self.links)], self.lifetime],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))

    def top_up(self, total: int) -> int:
        """Spawn until about `total` processes are live on the host; return how many now."""
        missing = total - len(live_pids())
        if missing > 0:
            self.spawn(missing)
        return len(live_pids())

    def reap(self) -> None:
        for child in self.children:
            if child.poll() is None:
                try:
                    child.kill()
                except ProcessLookupError:
                    pass
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.children.clear()


class Server:
    """A server process started as users start it, stopped (and reaped) by `stop()`."""

    def __init__(self, name: str, argv: Sequence[str], url: str, ready_path: str,
                 log: Path) -> None:
        self.name = name
        self.url = url
        self._log = open(log, "wb")  # closed in stop()
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(url + ready_path)

    def _wait_ready(self, url: str, deadline: float = 30.0) -> None:
        until = time.monotonic() + deadline
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"see {self._log.name}")
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready at {url} after {deadline} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
