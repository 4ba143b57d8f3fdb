"""Process churn: the exporter keeps answering while processes come and go under it.

A spawner starts and reaps short-lived processes (`true`, `sleep 0.02`, `sleep 0.3`) at up to
200 a second for CHURN_SECONDS. Meanwhile other threads scrape /metrics, list /process, look
up pids that were just reaped and pids that are alive. Every answer must be a clean one: no
failed scrape, no 5xx, reaped pids are 404, and the processes that exited mid-scrape are
counted in `procfleet_read_errors_total{kind="vanished"}`.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from procfleet.testing import Server

CHURN_SECONDS = 30.0
SPAWN_RATE = 200  # per second
MAX_SPAWNS = int(CHURN_SECONDS * SPAWN_RATE)
SHORT_LIVED = [[shutil.which("true") or "/bin/true"],
               [shutil.which("sleep") or "/bin/sleep", "0.02"],
               [shutil.which("sleep") or "/bin/sleep", "0.3"]]


def read_errors(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "procfleet_read_errors":
            return {s.labels["kind"]: s.value for s in family.samples
                    if s.name == "procfleet_read_errors_total"}
    raise AssertionError("no procfleet_read_errors_total in /metrics")


class Churn:
    """What the threads saw; each list is appended to by one thread only."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.spawned = 0
        self.reaped: collections.deque[int] = collections.deque(maxlen=50)
        self.alive: collections.deque[int] = collections.deque(maxlen=50)
        self.scrapes = 0
        self.lists = 0
        self.vanished_lookups = 0
        self.live_lookups: collections.Counter[int] = collections.Counter()
        self.problems: list[str] = []

    def note(self, problem: str) -> None:
        if len(self.problems) < 100:
            self.problems.append(problem)


def spawner(churn: Churn) -> None:
    """Start processes on a 1/SPAWN_RATE schedule and reap every one that has exited."""
    running: list[subprocess.Popen] = []
    started = time.monotonic()
    try:
        while not churn.stop.is_set() and churn.spawned < MAX_SPAWNS:
            due = started + churn.spawned / SPAWN_RATE
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, 0.05))
                continue
            argv = SHORT_LIVED[churn.spawned % len(SHORT_LIVED)]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            churn.spawned += 1
            churn.alive.append(proc.pid)
            running.append(proc)
            still = []
            for p in running:
                if p.poll() is None:
                    still.append(p)
                else:
                    churn.reaped.append(p.pid)
            running = still
    finally:
        for p in running:
            p.wait(timeout=10)


def worker(churn: Churn, step: Callable[[requests.Session], None]) -> None:
    session = requests.Session()
    while not churn.stop.is_set():
        try:
            step(session)
        except requests.RequestException as exc:
            churn.note(f"{step.__name__}: {exc!r}")
        time.sleep(0.001)


@pytest.fixture
def churned(exporter: Server) -> Iterator[tuple[Churn, dict[str, float], dict[str, float]]]:
    url = exporter.url
    before = read_errors(url)
    churn = Churn()

    def scrape(session: requests.Session) -> None:
        response = session.get(url + "/metrics", timeout=10)
        churn.scrapes += 1
        if response.status_code != 200 or b"namedprocess_namegroup_num_procs" not in \
                response.content:
            churn.note(f"scrape {churn.scrapes}: {response.status_code}")

    def listing(session: requests.Session) -> None:
        response = session.get(url + "/process?sort=start&limit=20", timeout=10)
        churn.lists += 1
        if response.status_code != 200:
            churn.note(f"list: {response.status_code} {response.text[:200]}")

    def lookup_vanished(session: requests.Session) -> None:
        if not churn.reaped:
            return
        pid = churn.reaped.popleft()  # reaped: this pid is free, and not reused so soon
        response = session.get(f"{url}/process/{pid}", timeout=10)
        churn.vanished_lookups += 1
        if response.status_code != 404 or response.json().get("error") != "process not found":
            churn.note(f"reaped pid {pid}: {response.status_code} {response.text[:200]}")

    def lookup_alive(session: requests.Session) -> None:
        if not churn.alive:
            return
        pid = churn.alive.popleft()  # may exit any moment: 200 or 404, never anything else
        response = session.get(f"{url}/process/{pid}", timeout=10)
        churn.live_lookups[response.status_code] += 1
        if response.status_code not in (200, 404):
            churn.note(f"live pid {pid}: {response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=spawner, args=(churn,), name="spawner")]
    threads += [threading.Thread(target=worker, args=(churn, step), name=step.__name__)
                for step in (scrape, scrape, listing, lookup_vanished, lookup_alive)]
    for t in threads:
        t.start()
    try:
        churn.stop.wait(CHURN_SECONDS)
    finally:
        churn.stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a churn thread did not stop"
    yield churn, before, read_errors(url)


def test_exporter_holds_under_churn(churned: tuple[Churn, dict[str, float], dict[str, float]],
                                   exporter: Server) -> None:
    churn, before, after = churned
    print(f"\nchurn: {churn.spawned} processes in {CHURN_SECONDS:.0f} s, {churn.scrapes} scrapes, "
          f"{churn.lists} listings, {churn.vanished_lookups} lookups of reaped pids, "
          f"live lookups {dict(churn.live_lookups)}, read errors before {before} after {after}")
    assert not churn.problems, "\n".join(churn.problems[:10])
    assert churn.spawned >= MAX_SPAWNS // 4, "the spawner fell far behind; churn too weak"
    assert churn.scrapes >= 20 and churn.lists >= 10
    assert churn.vanished_lookups >= 100
    assert after["vanished"] > before["vanished"], "processes that exited mid-read not counted"
    assert all(after[kind] >= before[kind] for kind in before), "a counter went down"
    assert exporter.healthy()
