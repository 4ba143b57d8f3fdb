"""Helpers for exporter tests: real child processes and real servers, always cleaned up."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import requests

from procfleet.testing import reap, wait_until

SLEEPER = "import sys, time\nwhile True: time.sleep(1)"
SPINNER = "import sys\nwhile True: pass"


class Children:
    """Spawns real child processes, waits until each is visible, and always reaps them."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, *args: str, code: str = SLEEPER, **popen) -> subprocess.Popen:
        argv = [sys.executable, "-c", code, *args]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, **popen)
        self.procs.append(proc)

        def visible() -> bool:
            try:
                return psutil.Process(proc.pid).cmdline()[1:] == ["-c", code, *args]
            except (psutil.NoSuchProcess, psutil.ZombieProcess, IndexError):
                return False

        wait_until(visible, what=f"child {proc.pid} to exec")
        if code == SLEEPER:
            # Past its start-up the sleeper spends its life in S; tests rely on that.
            wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_SLEEPING,
                       what=f"child {proc.pid} to sleep")
        return proc

    def spawn_argv(self, argv: list[str], **popen) -> subprocess.Popen:
        """Run any program (not the test's Python) as a child and wait until it has exec'd."""
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, **popen)
        self.procs.append(proc)

        def visible() -> bool:
            try:
                return psutil.Process(proc.pid).cmdline() == argv
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return False

        wait_until(visible, what=f"child {proc.pid} to exec")
        return proc

    def reap_all(self) -> None:
        for proc in self.procs:
            reap(proc)


class Server:
    """A service started as users start it, on a free loopback port."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def wait_ready(self, path: str = "/healthz", timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log.read_text()}")
            try:
                return requests.get(self.url + path, timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, timeout=timeout, what=f"{self.url}{path}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=5)
        self._log_file.close()
        return code
