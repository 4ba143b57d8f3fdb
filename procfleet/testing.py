"""Helpers for testing and benchmarking procfleet's services: ports, waiting, reaping.

Shipped with the package (as falcon ships falcon.testing) so the test suites and the
benchmarks share one copy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], *, timeout: float = 10.0,
               what: str = "condition") -> None:
    """Poll `check` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_ready(url: str, proc: subprocess.Popen[Any], timeout: float = 30.0,
               log: Path | None = None) -> None:
    """Wait until `url` answers 200, failing early (with `log`'s tail) if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = f"\n{log.read_text(errors='replace')[-2000:]}" if log is not None else ""
            raise RuntimeError(f"{url}: server exited with {proc.returncode}{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def reap(proc: subprocess.Popen[Any]) -> None:
    """Kill `proc` if it still runs and wait for it, so no zombie or warning is left."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _comm_and_state(pid: int) -> tuple[str, str] | None:
    """(comm, one-letter state) once `pid` has exec'd; None before that or when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if not f.read():
                return None  # between fork and exec, or a zombie
    except (FileNotFoundError, ProcessLookupError):
        return None
    rpar = stat.rfind(b")")
    comm = stat[stat.find(b"(") + 1: rpar].decode(errors="replace")
    return comm, stat[rpar + 2: rpar + 3].decode()


def wait_for_comm(pid: int, comm: str, *, timeout: float = 5.0, settled: bool = False) -> None:
    """Wait until `pid` has exec'd as `comm` (and, if `settled`, sleeps: done loading)."""

    def ready() -> bool:
        seen = _comm_and_state(pid)
        return seen is not None and seen[0] == comm and (not settled or seen[1] == "S")

    wait_until(ready, timeout=timeout, what=f"pid {pid} to show comm {comm!r}")


class NamedChildren:
    """Children under a distinctive comm (the name of a symlink to the program); reaped.

    Each instance has its own tag, so its comms ("pf1a2b3c-web") match no other process.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = "pf" + os.urandom(3).hex()
        self.children: list[subprocess.Popen[bytes]] = []

    def comm(self, suffix: str) -> str:
        """The comm of children spawned with `suffix` (the kernel keeps 15 bytes)."""
        return f"{self.tag}-{suffix}"[:15]

    def start(self, suffix: str, program: str, *args: str,
              settled: bool = False) -> subprocess.Popen[bytes]:
        """Run `program args...` as comm(suffix), stdin a pipe; wait until it has exec'd."""
        comm = self.comm(suffix)
        link = self.tmp / comm
        if not link.exists():
            link.symlink_to(program)
        child = subprocess.Popen([str(link), *args], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.children.append(child)
        wait_for_comm(child.pid, comm, settled=settled)
        return child

    def reap(self) -> None:
        for child in self.children:
            reap(child)
            if child.stdin:
                child.stdin.close()


class Server:
    """A service started as users start it, its stdout and stderr kept in a log file."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.argv = argv
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def healthy(self, path: str = "/healthz", timeout: float = 5.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                ok: bool = resp.status == 200
                return ok
        except OSError:
            return False

    def wait_ready(self, path: str = "/healthz", timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.argv[0]} exited early:\n{self.output()}")
            return self.healthy(path, timeout=1)

        wait_until(ready, timeout=timeout, what=f"{self.url}{path}")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def stop(self) -> int:
        """SIGTERM, wait (bounded), and return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=5)
        self._log_file.close()
        return code
