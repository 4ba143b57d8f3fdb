"""Hostile clients against the real services (issue 8, items 1, 2 and the CL+TE part of 14).

* More than 1,023 file descriptors in use (idle connections, /proc files held by 24 threads):
  both services stay up and answer (waitress's select() loop died past fd 1023).
* 1,000 connections trickling one header byte a second: the request deadline closes them and
  a fresh /healthz answers within the deadline plus 1 s (the bound issue 8 allows).
* Content-Length together with Transfer-Encoding: a JSON 400, never read as chunked.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from reliability_testing import assert_error_body, query_config, raw_exchange

from procfleet.floods import (
    Trickle,
    close_all,
    closed_by_peer,
    fd_numbers,
    open_idle,
    raise_open_files,
    socket_fd_numbers,
)
from procfleet.testing import (
    EXPORTER,
    QUERY,
    Children,
    Server,
    start_exporter,
    start_query,
    wait_until,
)

IDLE = 1100  # connections: with the services' other files, fd numbers pass 1023


@pytest.fixture(scope="module", autouse=True)
def open_files_limit() -> None:
    """This process holds over a thousand sockets at once."""
    assert raise_open_files() >= 4 * IDLE, "the hard open-files limit is too low for this test"


@pytest.fixture
def sleepers() -> Iterator[list[int]]:
    """40 short-lived children whose pids the exporter can look up."""
    with Children() as children:
        yield [children.spawn_argv(["sleep", "300"]).pid for _ in range(40)]


def _alive(server: Server) -> bool:
    return server.proc.poll() is None


def _healthz_seconds(server: Server, timeout: float) -> float:
    """Time a /healthz on a fresh connection; fail if it does not answer 200 in `timeout`."""
    started = time.monotonic()
    with urllib.request.urlopen(server.url + "/healthz", timeout=timeout) as resp:
        assert resp.status == 200
    return time.monotonic() - started


def _pids(doc: object) -> set[int]:
    """Every "pid" value anywhere in a JSON document (unicast answers wrap the process)."""
    if isinstance(doc, dict):
        found = {doc["pid"]} if isinstance(doc.get("pid"), int) else set()
        return found.union(*(_pids(v) for v in doc.values()))
    if isinstance(doc, list):
        return set().union(*(_pids(v) for v in doc))
    return set()


def _lookups(server: Server, pids: list[int], clients: int, rounds: int) -> None:
    """`clients` keep-alive clients, each looking every pid up `rounds` times, shuffled."""
    def client(seed: int) -> None:
        order = pids * rounds
        random.Random(seed).shuffle(order)
        with requests.Session() as session:
            for pid in order:
                got = session.get(f"{server.url}/process/{pid}", timeout=30)
                assert got.status_code == 200, (pid, got.status_code, got.text[:200])

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client, seed) for seed in range(clients)]:
            future.result(timeout=120)


# -- more than 1,023 file descriptors ----------------------------------------------------------


def _hold_idle(server: Server, idle: list[socket.socket], who: str) -> None:
    """Open IDLE idle connections to `server` into `idle` (the caller closes them) and check
    that it accepted them all, on socket fds past 1023, and lives."""
    idle.extend(open_idle(server.port, IDLE))
    wait_until(lambda: len(fd_numbers(server.pid)) > IDLE, timeout=30,
               what=f"{who} to accept {IDLE} connections")
    fds = fd_numbers(server.pid)
    print(f"{who}: {len(fds)} open fds, highest {fds[-1]}")
    assert socket_fd_numbers(server.pid)[-1] > 1023 and _alive(server)


def test_exporter_survives_1100_idle_connections_after_lookups(tmp_path: Path,
                                                               sleepers: list[int]) -> None:
    server = start_exporter(tmp_path)
    idle: list[socket.socket] = []
    try:
        _lookups(server, sleepers[:20], clients=4, rounds=2)
        _hold_idle(server, idle, "the exporter")
        assert server.healthy(timeout=5)  # under the connection limit: answered at once
        # The idle connections owe a request: the default 10 s deadline closes them.
        wait_until(lambda: all(closed_by_peer(s) for s in idle), timeout=60,
                   what="the exporter to close the idle connections")
        assert _alive(server) and server.healthy(timeout=5)
        _lookups(server, sleepers[:5], clients=2, rounds=1)
        assert len(fd_numbers(server.pid)) < 500  # the connections' fds were released
    finally:
        close_all(idle)
        assert server.stop() == 0
    assert "connection(s) that sent no complete request within 10 s" in server.output()


def test_exporter_with_24_threads_survives_the_proc_files_they_hold(tmp_path: Path,
                                                                   sleepers: list[int]) -> None:
    """Each request thread keeps the /proc files of its last 16 pids: with 24 threads those
    fill fd numbers up to past 1023, so the next connections get numbers above it."""
    server = start_exporter(tmp_path, "--threads", "24")
    fresh: list[socket.socket] = []
    try:
        _lookups(server, sleepers, clients=24, rounds=2)
        fds = fd_numbers(server.pid)
        assert fds[-1] > 1023, "the lookups did not hold enough /proc files to test fd > 1023"
        # New connections take the lowest free numbers: the few gaps, then past 1023.
        fresh = open_idle(server.port, 100)
        for sock in fresh:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in fresh:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sockets = socket_fd_numbers(server.pid)
        print(f"exporter --threads 24: {len(fds)} open fds, highest {fds[-1]}; "
              f"highest socket fd {sockets[-1]}")
        assert sockets[-1] > 1023 and _alive(server)
        _lookups(server, sleepers, clients=24, rounds=1)  # served with fds past 1023 in use
        assert _alive(server) and server.healthy(timeout=5)
    finally:
        close_all(fresh)
        assert server.stop() == 0


def test_query_service_survives_1100_idle_connections(tmp_path: Path,
                                                      sleepers: list[int]) -> None:
    exporter = start_exporter(tmp_path, hostname="hostile-1")
    query = start_query(tmp_path, query_config([("hostile-1", exporter.url)]))
    idle: list[socket.socket] = []
    try:
        _hold_idle(query, idle, "the query service")
        got = requests.get(f"{query.url}/node/hostile-1/process/{sleepers[0]}", timeout=10)
        assert got.status_code == 200 and sleepers[0] in _pids(got.json()), got.text[:300]
        close_all(idle)
        wait_until(lambda: len(fd_numbers(query.pid)) < 500, timeout=30,
                   what="the query service to release the connections")
        assert _alive(query) and query.healthy(timeout=5)
    finally:
        close_all(idle)
        assert query.stop() == 0
        assert exporter.stop() == 0


# -- trickling clients and the request deadline ------------------------------------------------

HEAD_TIMEOUT = 2.0


@pytest.mark.parametrize("kind", ["exporter", "query"])
def test_1000_trickling_connections_do_not_lock_others_out(tmp_path: Path, kind: str) -> None:
    """With the deadline at 2 s, every fresh /healthz answers within 3 s while 1,000 clients
    trickle (and reconnect at once when closed), and the server closes the tricklers."""
    if kind == "exporter":
        server = start_exporter(tmp_path, "--head-timeout", str(HEAD_TIMEOUT))
    else:
        server = start_query(tmp_path, query_config([("x", "http://127.0.0.1:9")],
                                                    extra=f"head_timeout: {HEAD_TIMEOUT}\n"))
    trickle = Trickle(server.port, count=1000, interval=1.0, seconds=60).start()
    try:
        assert trickle.ready.wait(timeout=30)
        waits = []
        probe_until = time.monotonic() + 3 * HEAD_TIMEOUT + 1  # past three rounds of closing
        while time.monotonic() < probe_until:
            waits.append(_healthz_seconds(server, timeout=HEAD_TIMEOUT + 1))
            time.sleep(0.25)
        print(f"{kind}: /healthz under 1,000 trickling connections: max {max(waits):.3f} s "
              f"over {len(waits)} probes; {trickle.closed_by_server} trickling connections "
              f"closed by the server")
        assert max(waits) <= HEAD_TIMEOUT + 1
        assert trickle.closed_by_server >= 1000  # the deadline, not the client, ended them
        # The server's clock starts at accept, after the client's connect.
        assert min(trickle.lifetimes) >= HEAD_TIMEOUT
        assert _alive(server)
    finally:
        trickle.stop()
    assert _alive(server) and server.healthy(timeout=5)
    assert server.stop() == 0


@pytest.mark.parametrize(("argv", "config", "message"), [
    ([EXPORTER, "--head-timeout", "0"], None, "--head-timeout: must be a number of seconds"),
    ([EXPORTER, "--head-timeout", "301"], None, "--head-timeout: must be a number of seconds"),
    ([QUERY], "head_timeout: 0.5\n", "head_timeout: must be 1 to 300 seconds"),
    ([QUERY], "head_timeout: soon\n", "head_timeout"),
])
def test_bad_head_timeout_is_a_clear_usage_error(tmp_path: Path, argv: list[str],
                                                 config: str | None, message: str) -> None:
    if config is not None:
        path = tmp_path / "query.yml"
        path.write_text("auth: {enabled: false}\n" + config)
        argv = [*argv, "--config", str(path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# -- Content-Length with Transfer-Encoding -----------------------------------------------------

SMUGGLING = [
    ("chunked then length", b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                            b"Content-Length: 5\r\n\r\n0\r\n\r\n"),
    ("length then chunked", b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("other case", b"GET /healthz HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n"
                   b"TRANSFER-ENCODING: chunked\r\n\r\n0\r\n\r\n"),
    ("http/1.0", b"GET /healthz HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n"
                 b"\r\n0\r\n\r\n"),
    ("not chunked", b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n"
                    b"Content-Length: 5\r\n\r\nhello"),
]


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("smuggling")
    exporter = start_exporter(tmp, hostname="smuggle-1")
    query = start_query(tmp, query_config([("smuggle-1", exporter.url)]))
    yield {"exporter": exporter, "query": query}
    query.stop()
    exporter.stop()


@pytest.mark.parametrize("kind", ["exporter", "query"])
@pytest.mark.parametrize(("what", "data"), SMUGGLING, ids=[w for w, _ in SMUGGLING])
def test_content_length_with_transfer_encoding_is_refused(services: dict[str, Server],
                                                          kind: str, what: str,
                                                          data: bytes) -> None:
    server = services[kind]
    reply = raw_exchange(server.port, data)
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.split(" ")[1] == "400", reply[:300]
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    doc = assert_error_body(400, headers, body)
    assert "Content-Length and Transfer-Encoding" in doc["details"]
    assert reply.count(b"HTTP/1.") == 1  # nothing smuggled behind it was answered
    assert headers.get("connection") == "close"
    assert json.loads(body) == doc
    assert server.healthy()


def test_trickle_client_is_bounded() -> None:
    """The flood helper itself stops when told, even against a server that never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        trickle = Trickle(listener.getsockname()[1], count=4, interval=0.05, seconds=5).start()
        assert trickle.ready.wait(timeout=10)
        stopper = threading.Timer(0.3, trickle.stop)
        stopper.start()
        stopper.join(timeout=10)
        assert trickle._thread is not None and not trickle._thread.is_alive()
        assert trickle.bytes_sent > 0 and trickle.closed_by_server == 0
