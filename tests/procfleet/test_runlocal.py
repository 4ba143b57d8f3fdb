"""`python -m procfleet.runlocal` (what `make run` runs), as a real process with real children:
settable ports, a taken port named in the last line, signals to its process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from procfleet.testing import free_port, reap, wait_until

# Generous bounds (the issue allows them): on a loaded 2-core machine each service needs a
# few seconds to import and bind.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class Run:
    """One runner process, its own process group, its stderr in a file."""

    def __init__(self, tmp_path: Path, exporter_port: int, query_port: int, *,
                 ignore_sigint: bool = False) -> None:
        self.exporter_port = exporter_port
        self.query_port = query_port
        self.log = tmp_path / "runlocal.log"
        # A shell running `make run &` starts it with SIGINT ignored; do the same.
        preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint \
            else None
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "procfleet.runlocal", "--exporter-port",
                 str(exporter_port), "--query-port", str(query_port)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                process_group=0, preexec_fn=preexec, cwd=tmp_path)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def last_line(self) -> str:
        lines = [line for line in self.stderr().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def wait_running(self) -> list[psutil.Process]:
        """Wait until both services answer on the chosen ports; their processes."""
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"runner exited {self.proc.returncode}:\n{self.stderr()}")
            try:
                return all(requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
                           for port in (self.exporter_port, self.query_port))
            except requests.RequestException:
                return False

        wait_until(up, timeout=START_TIMEOUT, what="both services of the runner")
        children = self.children()
        assert len(children) == 2, children
        return children


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        for child in run.children():
            child.kill()
        reap(run.proc)


def listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_services_run_on_the_ports_given_and_the_query_service_finds_the_exporter(
        tmp_path: Path, runs: list[Run]) -> None:
    run = Run(tmp_path, free_port(), free_port())
    runs.append(run)
    run.wait_running()
    exporter = requests.get(f"http://127.0.0.1:{run.exporter_port}/healthz", timeout=5).json()
    answer = requests.get(f"http://127.0.0.1:{run.query_port}/node/{exporter['hostname']}"
                          f"/process/{run.proc.pid}", timeout=10).json()
    assert [r["status"] for r in answer["results"]] == ["ok"]
    assert answer["results"][0]["process"]["pid"] == run.proc.pid


@pytest.mark.parametrize("taken", ["exporter", "query service"])
def test_a_taken_port_fails_fast_naming_the_service(tmp_path: Path, runs: list[Run],
                                                    taken: str) -> None:
    exporter_port, query_port = free_port(), free_port()
    with listener(exporter_port if taken == "exporter" else query_port):
        run = Run(tmp_path, exporter_port, query_port)
        runs.append(run)
        code = run.proc.wait(timeout=START_TIMEOUT)
        last = run.last_line()
    assert code != 0
    assert f"the {taken} cannot listen on" in last and "address already in use" in last, last
    flag = "--exporter-port" if taken == "exporter" else "--query-port"
    assert flag in last
    # Nothing it started is left behind, and it never claimed to be running.
    assert not run.children()
    assert "procfleet is running" not in run.stderr()


def test_a_service_that_dies_is_named_in_the_last_line(tmp_path: Path,
                                                       runs: list[Run]) -> None:
    run = Run(tmp_path, free_port(), free_port())
    runs.append(run)
    children = run.wait_running()
    exporter = next(c for c in children if "exporter" in c.cmdline())
    exporter.kill()
    code = run.proc.wait(timeout=STOP_TIMEOUT)
    assert code == 1
    assert run.last_line().startswith("make run: the exporter killed by SIGKILL"), run.last_line()
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


@pytest.mark.parametrize(("signum", "ignore_sigint"), [
    (signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["SIGINT", "SIGINT-ignored-at-start", "SIGTERM"])
def test_a_signal_to_the_process_group_stops_both_and_exits_0(
        tmp_path: Path, runs: list[Run], signum: signal.Signals, ignore_sigint: bool) -> None:
    run = Run(tmp_path, free_port(), free_port(), ignore_sigint=ignore_sigint)
    runs.append(run)
    children = run.wait_running()
    started = time.monotonic()
    os.killpg(run.proc.pid, signum)
    code = run.proc.wait(timeout=STOP_TIMEOUT)
    took = time.monotonic() - started
    assert code == 0, run.stderr()
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, alive
    assert f"received {signum.name}; both services stopped" in run.last_line()
    assert "a service exited" not in run.stderr()
    assert took < STOP_TIMEOUT  # generous bound, as the issue allows
