"""Exporter faults, through the real query service.

Misbehaving exporters (see reliability_testing.FAULTS) sit in the query service's discovery
beside a real exporter. Every fault must come back as its own `failed` result with a clear
error, the whole answer inside the request deadline, and the service healthy afterwards: its
open file descriptors and threads do not grow with the number of faulty requests.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from reliability_testing import FAULTS, query_config, start_fakes

from procfleet.testing import Server, reap, spawn_python, start_query, wait_until

EXPORTER_TIMEOUT = 1.0
REQUEST_DEADLINE = 2.5
WARM_ROUNDS, ROUNDS = 2, 8  # rounds of faulty requests before counting, and then
MARGIN = 1.5  # process start-up noise on a loaded CI machine; far below any real hang

# What a clear error says for each fault (the query service's words, loosely).
# A timed-out exporter's circuit stays open a while (query.breaker): later calls say so.
_TIMEOUT = r"timeout after 1\.0 s|circuit open after timeout at .*; retrying in"
EXPECTED_ERROR = {
    "hang": _TIMEOUT,
    "slow": _TIMEOUT,
    "trickle": _TIMEOUT,
    "html": r"invalid JSON|not JSON",
    "truncated": r"malformed|invalid JSON|closed|incomplete",
    "cut": r"invalid JSON",
    "big": r"exceeds \d+ bytes",
    "redirect": r"HTTP 302.*redirects are not followed",
    "drop": r"closed the connection|connection",
    "reset": r"closed the connection|connection|reset",
    "garbage": r"malformed HTTP|closed the connection|connection",
    "killed": r"closed the connection|connection|reset|refused",
}


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, str]]:
    proc, urls = start_fakes(FAULTS)
    yield urls
    proc.terminate()
    reap(proc)


@pytest.fixture(scope="module")
def victim() -> Iterator[tuple[subprocess.Popen, str]]:
    """A fake exporter in its own process that hangs, to be killed mid-broadcast."""
    proc, urls = start_fakes(["hang"])
    yield proc, urls["hang"]
    reap(proc)


@pytest.fixture(scope="module")
def child() -> Iterator[subprocess.Popen]:
    proc = spawn_python()
    yield proc
    reap(proc)


@pytest.fixture(scope="module")
def faulty_query(tmp_path_factory: pytest.TempPathFactory, exporter: Server,
                 fakes: dict[str, str], victim: tuple[subprocess.Popen, str]
                 ) -> Iterator[Server]:
    exporters = [("real", exporter.url), ("killed", victim[1])]
    exporters += [(f"f-{name}", url) for name, url in fakes.items()]
    config = query_config(exporters, timeouts=(EXPORTER_TIMEOUT, REQUEST_DEADLINE))
    server = start_query(tmp_path_factory.mktemp("faults"), config)
    yield server
    server.stop()


def timed_get(url: str) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.get(url, timeout=REQUEST_DEADLINE + 10)
    return response, time.monotonic() - started


def check_failed(result: dict, fault: str) -> None:
    assert result["status"] == "failed", result
    assert "process" not in result
    assert re.search(EXPECTED_ERROR[fault], result["error"]), (fault, result["error"])


def test_broadcast_reports_each_fault(faulty_query: Server, child: subprocess.Popen,
                                      victim: tuple[subprocess.Popen, str]) -> None:
    """`_all` while one exporter is killed mid-request: each fault its own result, in time."""
    box: dict[str, tuple[requests.Response, float]] = {}

    def broadcast() -> None:
        box["answer"] = timed_get(f"{faulty_query.url}/node/_all/process/{child.pid}")

    def victim_is_asked() -> bool:
        # The query service's request reached the victim: it holds an accepted connection.
        conns = psutil.Process(victim[0].pid).net_connections(kind="tcp")
        return any(c.status == psutil.CONN_ESTABLISHED for c in conns)

    thread = threading.Thread(target=broadcast)
    thread.start()
    wait_until(victim_is_asked, timeout=REQUEST_DEADLINE, what="the broadcast to reach the victim")
    victim[0].send_signal(signal.SIGKILL)  # mid-request: it has read the request, not answered
    thread.join(timeout=REQUEST_DEADLINE + 15)
    response, elapsed = box["answer"]
    assert elapsed < REQUEST_DEADLINE + MARGIN
    assert response.status_code == 200, response.text  # the real exporter answered
    results = response.json()["results"]
    names = [r["hostname"] for r in results]
    assert names == sorted(names) and len(names) == len(FAULTS) + 2
    by_name = {r["hostname"]: r for r in results}
    assert by_name["real"]["status"] == "ok" and by_name["real"]["process"]["pid"] == child.pid
    check_failed(by_name["killed"], "killed")
    for fault in FAULTS:
        check_failed(by_name[f"f-{fault}"], fault)
    print(f"\n_all in {elapsed:.2f} s: " + "; ".join(
        f"{r['hostname']}: {r.get('error', r['status'])}" for r in results))


@pytest.mark.parametrize("fault", FAULTS)
def test_unicast_fault_is_a_clear_500(fault: str, faulty_query: Server,
                                      child: subprocess.Popen) -> None:
    response, elapsed = timed_get(f"{faulty_query.url}/node/f-{fault}/process/{child.pid}")
    assert elapsed < REQUEST_DEADLINE + MARGIN
    assert response.status_code == 500
    body = response.json()
    assert body.keys() == {"error", "details", "code"} and body["code"] == 500
    assert f"f-{fault}" in body["details"]  # names the exporter...
    assert re.search(EXPECTED_ERROR[fault], body["details"]), body  # ...and why


def test_all_faulty_broadcast_is_a_500(tmp: Path, fakes: dict[str, str],
                                       child: subprocess.Popen) -> None:
    """No exporter gives a valid answer: 500, `details` names every one of them."""
    config = query_config([(f"f-{name}", url) for name, url in fakes.items()],
                          timeouts=(EXPORTER_TIMEOUT, REQUEST_DEADLINE))
    server = start_query(tmp, config)
    try:
        response, elapsed = timed_get(f"{server.url}/node/_all/process/{child.pid}")
        assert elapsed < REQUEST_DEADLINE + MARGIN
        assert response.status_code == 500
        details = response.json()["details"]
        for name in fakes:
            assert f"f-{name}" in details
    finally:
        assert server.stop() == 0


def _settled_counts(server: Server) -> tuple[int, int]:
    """fds and threads once in-flight work has drained (bounded wait for a stable pair)."""
    last: list[tuple[int, int]] = []

    def stable() -> bool:
        last.append((server.open_fds(), server.threads()))
        return len(last) >= 5 and len(set(last[-5:])) == 1

    try:
        wait_until(stable, timeout=10, what="stable fd and thread counts")
    except AssertionError:
        pass  # still moving: take the last reading, the comparison below decides
    return last[-1]


def test_no_leaks_after_faults(faulty_query: Server, child: subprocess.Popen) -> None:
    """Rounds of faulty unicasts and a broadcast, all at once: fds and threads do not grow
    with them."""
    pid = child.pid
    urls = [f"{faulty_query.url}/node/_all/process/{pid}"]
    urls += [f"{faulty_query.url}/node/f-{fault}/process/{pid}" for fault in FAULTS]

    def one_round() -> None:
        threads = [threading.Thread(target=timed_get, args=(url,)) for url in urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=REQUEST_DEADLINE + 15)

    for _ in range(WARM_ROUNDS):
        one_round()
    fds_before, threads_before = _settled_counts(faulty_query)
    for _ in range(ROUNDS):
        one_round()
    fds_after, threads_after = _settled_counts(faulty_query)
    print(f"\nquery service after {WARM_ROUNDS} rounds: {fds_before} fds, {threads_before} "
          f"threads; after {ROUNDS} more: {fds_after} fds, {threads_after} threads")
    # Kept-alive connections come and go a little; a leak of even one fd per round (there
    # are 12 requests in each) would add ROUNDS.
    assert fds_after < fds_before + ROUNDS // 2, (fds_before, fds_after)
    assert threads_after <= threads_before + 1, (threads_before, threads_after)
    response, elapsed = timed_get(f"{faulty_query.url}/node/real/process/{pid}")
    assert response.status_code == 200 and elapsed < REQUEST_DEADLINE
    assert faulty_query.healthy()
