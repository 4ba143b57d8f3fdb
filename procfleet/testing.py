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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], *, timeout: float = 10.0,
               what: str = "condition") -> None:
    """Poll `check` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 30.0,
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


def reap(proc: subprocess.Popen) -> None:
    """Kill `proc` if it still runs and wait for it, so no zombie or warning is left."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


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
                return resp.status == 200
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
