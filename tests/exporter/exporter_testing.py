"""Helpers for exporter tests: real child processes and real servers, always cleaned up."""

from __future__ import annotations

import subprocess
import sys

import psutil

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


