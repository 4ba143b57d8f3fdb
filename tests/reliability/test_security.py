"""Security properties of both services, checked against real servers (see SECURITY.md).

Token and keys enforced, never logged, never echoed; request size limits; slow clients do
not hold up others; command-line secrets masked by default; no auth-off on a public address.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from reliability_testing import (
    TOKEN,
    TOKEN_SHA256,
    new_api_key,
    query_config,
    raw_exchange,
    token_config,
)

from procfleet.testing import (
    EXPORTER,
    QUERY,
    Server,
    free_port,
    reap,
    spawn_python,
    start_exporter,
    start_query,
    wait_until,
)

BEARER = {"Authorization": f"Bearer {TOKEN}"}
ERROR_KEYS = {"error", "details", "code"}
# Near misses of the real token: none may work, and none may be written to a log.
WRONG_TOKENS = [TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "wrong-" + TOKEN, TOKEN_SHA256]
DEADLINE = 5.0  # seconds an ordinary request may take while the server is under attack


def assert_reveals_nothing(response: requests.Response, *secrets: str) -> None:
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body.keys() == ERROR_KEYS and body["code"] == response.status_code
    text = response.text
    for secret in secrets:
        assert secret not in text
        assert hashlib.sha256(secret.encode()).hexdigest() not in text
    assert "Traceback" not in text and "sha256" not in text.lower()


# -- the exporter's token ------------------------------------------------------------------

PROTECTED = ["/metrics", "/process", "/process/1", "/process/abc", "/process?sort=bogus",
             "/openapi.json", "/nope", "/process/1/extra", "/metrics/"]


@pytest.mark.parametrize("path", PROTECTED)
def test_exporter_token_required(path: str, token_exporter: Server) -> None:
    """Every path but / and /healthz: 401 (checked before the path is even valid)."""
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {TOKEN}"},
                    *({"Authorization": f"Bearer {w}"} for w in WRONG_TOKENS)):
        response = requests.get(token_exporter.url + path, headers=headers, timeout=5)
        assert response.status_code == 401, (path, headers)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert_reveals_nothing(response, TOKEN, *WRONG_TOKENS)
    response = requests.get(token_exporter.url + path, headers=BEARER, timeout=5)
    assert response.status_code != 401 and response.status_code < 500


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_exporter_token_required_for_every_method(method: str, token_exporter: Server) -> None:
    response = requests.request(method, token_exporter.url + "/process/1", timeout=5)
    assert response.status_code == 401
    response = requests.request(method, token_exporter.url + "/process/1", headers=BEARER,
                                timeout=5)
    assert response.status_code in (200, 405)  # OPTIONS is answered by falcon itself


@pytest.mark.parametrize("path", ["/", "/healthz"])
def test_exporter_open_paths(path: str, token_exporter: Server) -> None:
    assert requests.get(token_exporter.url + path, timeout=5).status_code == 200


def test_exporter_metrics_may_be_left_open(tmp: Path) -> None:
    server = start_exporter(tmp, config=token_config(protect_metrics=False))
    try:
        assert requests.get(server.url + "/metrics", timeout=10).status_code == 200
        assert requests.get(server.url + "/process/1", timeout=5).status_code == 401
        assert requests.get(server.url + "/process", timeout=5).status_code == 401
    finally:
        server.stop()


def test_exporter_never_logs_the_token(tmp: Path) -> None:
    server = start_exporter(tmp, "--log-level", "debug", config=token_config())
    try:
        session = requests.Session()
        for _ in range(3):
            for wrong in WRONG_TOKENS:
                for path in ("/process/1", "/metrics", "/process?limit=1", "/nope"):
                    session.get(server.url + path, headers={"Authorization": f"Bearer {wrong}"},
                                timeout=5)
            for path in ("/process/1", "/metrics", "/process?limit=1", "/nope", "/process/0"):
                assert session.get(server.url + path, headers=BEARER, timeout=5).status_code \
                    < 500
    finally:
        assert server.stop() == 0
    log = server.output()
    assert "listening" in log  # the log is the server's, and it did log
    for secret in (TOKEN, *WRONG_TOKENS):
        assert secret not in log


# -- request size limits and slow clients (waitress settings, procfleet/serve.py) -----------


def _status(reply: bytes) -> int | None:
    if not reply.startswith(b"HTTP/1."):
        return None  # connection closed without an answer
    return int(reply.split(b" ", 2)[1])


OVERSIZED = [
    ("header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"),
    ("many headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(2000)) + b"\r\n"),
    ("request line", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("body", b"POST /process HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n"
     + b"x" * 200_000),
    ("declared body", b"GET /process/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n"
     b"\r\n" + b"x" * 1000),
    ("chunked body", b"POST /process HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"".join(b"8000\r\n" + b"x" * 0x8000 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"),
    ("bad content-length", b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
    ("not http", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 200 + b"\r\n\r\n"),
]


@pytest.mark.parametrize("kind", ["exporter", "query"])
@pytest.mark.parametrize(("what", "data"), OVERSIZED, ids=[w for w, _ in OVERSIZED])
def test_oversized_requests(what: str, data: bytes, kind: str, exporter: Server,
                            query: Server) -> None:
    """4xx or a closed connection, never a 5xx, and the server keeps serving."""
    server = exporter if kind == "exporter" else query
    status = _status(raw_exchange(server.port, data))
    assert status is None or 400 <= status < 500, (what, status)
    assert server.healthy()


def _trickle(port: int, stop: threading.Event, sent: list[int]) -> None:
    """A client that sends a request a byte at a time, every 0.2 s, and never finishes."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"s" * 1000:
                if stop.wait(0.2):
                    return
                sock.sendall(bytes([byte]))
                sent.append(1)
    except OSError:
        pass  # closed by the server: allowed


@pytest.mark.parametrize("kind", ["exporter", "query"])
def test_slow_clients_do_not_block_others(kind: str, exporter: Server, query: Server) -> None:
    """50 trickling clients and 200 idle connections (many more than the worker threads):
    ordinary requests still answer within the deadline."""
    server = exporter if kind == "exporter" else query
    stop = threading.Event()
    sent: list[int] = []
    trickles = [threading.Thread(target=_trickle, args=(server.port, stop, sent))
                for _ in range(50)]
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
            for _ in range(200)]
    for t in trickles:
        t.start()
    try:
        time.sleep(0.5)  # let every slow client get going
        for _ in range(20):
            started = time.monotonic()
            response = requests.get(server.url + "/healthz", timeout=DEADLINE)
            assert response.status_code == 200
            assert time.monotonic() - started < DEADLINE
        assert len(sent) >= 50  # the slow clients were really sending
    finally:
        stop.set()
        for t in trickles:
            t.join(timeout=15)
        for sock in idle:
            sock.close()
    assert server.healthy()


# -- masking command-line secrets ------------------------------------------------------------

SECRETS = ["hunter2", "s3cr3tPG", "pa55url", "tok-abc-123", "topsecretkey", "bearerXYZ"]
SECRET_ARGV = ["--password=hunter2", "PGPASSWORD=s3cr3tPG", "postgres://admin:pa55url@db/x",
               "--token", "tok-abc-123", "api_key=topsecretkey", "Authorization: Bearer bearerXYZ"]


@pytest.fixture(scope="module")
def secret_child() -> Iterator[subprocess.Popen]:
    child = spawn_python(*SECRET_ARGV)
    yield child
    reap(child)


def test_masking_on_by_default(secret_child: subprocess.Popen, exporter: Server) -> None:
    """An exporter started with no config masks credentials in /process/{pid} and /process."""
    one = requests.get(f"{exporter.url}/process/{secret_child.pid}", timeout=5)
    assert one.status_code == 200
    command = one.json()["command"]
    assert "--password=***" in command and "--token ***" in command
    assert "postgres://admin:***@db/x" in command
    listing = requests.get(exporter.url + "/process", timeout=10).text
    assert str(secret_child.pid) in listing
    for text in (command, listing):
        for secret in SECRETS:
            assert secret not in text


def test_masking_through_the_query_service(secret_child: subprocess.Popen,
                                           query: Server, reader_key: str) -> None:
    response = requests.get(f"{query.url}/node/_all/process/{secret_child.pid}",
                            headers={"X-API-Key": reader_key}, timeout=10)
    assert response.status_code == 200
    for secret in SECRETS:
        assert secret not in response.text


# -- the query service's API keys ------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[str, str]]:
    return {"reader": new_api_key("reader", "process:read"),
            "nodes": new_api_key("nodes", "node:read")}


@pytest.fixture(scope="module")
def reader_key(keys: dict[str, tuple[str, str]]) -> str:
    return keys["reader"][0]


@pytest.fixture(scope="module")
def query(tmp_path_factory: pytest.TempPathFactory, exporter: Server,
          token_exporter: Server, keys: dict[str, tuple[str, str]]) -> Iterator[Server]:
    """A query service with API keys at debug log level, over an open and a token exporter."""
    tmp = tmp_path_factory.mktemp("query")
    config = query_config([("rel-open", exporter.url), ("rel-token", token_exporter.url)],
                          key_entries=[entry for _, entry in keys.values()],
                          exporter_token=TOKEN, log_level="debug")
    server = start_query(tmp, config)
    yield server
    server.stop()


# Open like the exporter's /metrics for Prometheus, and the contract: no secret in either.
PUBLIC_QUERY_PATHS = {"/metrics", "/openapi.json"}
QUERY_PATHS = ["/node/_all/process/1", "/node/rel-open/process/1", "/node/_all/process/abc",
               "/node/%00/process/1", "/node", "/node/_all/process", "/metrics", "/nope",
               "/openapi.json"]


@pytest.mark.parametrize("path", QUERY_PATHS)
def test_query_key_required(path: str, query: Server, reader_key: str) -> None:
    """401 without a key or with a wrong one, before the request itself is looked at."""
    wrong = [reader_key[:-1], reader_key + "x", reader_key.upper(), "pfq_nothing"]
    attempts = [{}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {reader_key}"},
                {"X-API-Key": ""}, {"Authorization": f"Bearer {reader_key}", "X-API-Key": "x"}]
    attempts += [{"Authorization": f"Bearer {w}"} for w in wrong]
    attempts += [{"X-API-Key": w} for w in wrong]
    for headers in attempts:
        response = requests.get(query.url + path, headers=headers, timeout=10)
        if path in PUBLIC_QUERY_PATHS and response.status_code == 200:
            for secret in (reader_key, *wrong, TOKEN):
                assert secret not in response.text
            continue
        assert response.status_code == 401, (path, headers, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert_reveals_nothing(response, reader_key, *wrong)


def test_query_403_reveals_nothing(query: Server, keys: dict[str, tuple[str, str]]) -> None:
    nodes_key = keys["nodes"][0]
    response = requests.get(query.url + "/node/_all/process/1",
                            headers={"Authorization": f"Bearer {nodes_key}"}, timeout=10)
    assert response.status_code == 403
    assert_reveals_nothing(response, nodes_key, keys["reader"][0])
    assert "node:read" not in response.text  # the key's own permissions are not listed
    assert "nodes" not in response.text  # nor its name


def test_query_never_logs_keys_or_the_exporter_token(
        tmp: Path, exporter: Server, token_exporter: Server,
        keys: dict[str, tuple[str, str]]) -> None:
    """Good and bad keys in both headers, lookups that use the exporter token: none logged,
    and the exporter token is never shown to a client."""
    config = query_config([("rel-open", exporter.url), ("rel-token", token_exporter.url)],
                          key_entries=[entry for _, entry in keys.values()],
                          exporter_token=TOKEN, log_level="debug")
    server = start_query(tmp, config)
    reader, nodes = keys["reader"][0], keys["nodes"][0]
    wrong = [reader[:-1], reader + "x", "pfq_" + "A" * 43]
    try:
        session = requests.Session()
        bodies = []
        for key in (reader, nodes, *wrong):
            for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
                for path in ("/node/_all/process/1", "/node/rel-token/process/1", "/node",
                             "/node/_all/process?limit=1", "/node/bad%20name/process/1"):
                    response = session.get(server.url + path, headers=headers, timeout=10)
                    assert response.status_code < 500 or path.startswith("/node/rel")
                    bodies.append(response.text)
        # The lookup through the token exporter really used the token.
        ok = session.get(server.url + "/node/rel-token/process/1",
                         headers={"X-API-Key": reader}, timeout=10)
        assert ok.status_code == 200, ok.text
    finally:
        assert server.stop() == 0
    log = server.output()
    assert "request" in log
    for secret in (reader, nodes, *wrong, TOKEN):
        assert secret not in log
    assert all(TOKEN not in body for body in bodies)


# -- auth off only on loopback -----------------------------------------------------------------


def _run(argv: list[str], timeout: float = 15.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_query_refuses_auth_off_on_a_public_address(host: str, tmp: Path) -> None:
    config = tmp / "query.yml"
    config.write_text(query_config([("a", "http://127.0.0.1:9")]))
    listen = f"[{host}]:{free_port()}" if ":" in host else f"{host}:{free_port()}"
    result = _run([QUERY, "--config", str(config), "--listen", listen])
    assert result.returncode != 0
    assert "authentication is disabled" in result.stderr
    assert "Traceback" not in result.stderr


def test_query_auth_off_on_a_public_address_when_forced(tmp: Path) -> None:
    config = tmp / "query.yml"
    config.write_text(query_config([("a", "http://127.0.0.1:9")]))
    port = free_port()
    server = Server([QUERY, "--config", str(config), "--listen", f"0.0.0.0:{port}",
                     "--allow-unauthenticated-nonloopback"], port, tmp / "forced.log")
    try:
        server.wait_ready()
    finally:
        assert server.stop() == 0


def test_exporter_refuses_no_token_on_a_public_address(tmp: Path) -> None:
    """Command lines are sensitive: an exporter without a token stays on loopback."""
    port = free_port()
    server = Server([EXPORTER, "--listen", f"0.0.0.0:{port}"], port, tmp / "public.log")
    try:
        def settled() -> bool:
            return server.proc.poll() is not None or server.healthy()

        wait_until(settled, timeout=20, what="the exporter to exit or serve")
        assert server.proc.poll() is not None, "the exporter served without a token on 0.0.0.0"
    finally:
        code = server.stop()
    assert code != 0
    assert "Traceback" not in server.output() and "token" in server.output()


def test_exporter_no_token_on_a_public_address_when_forced(tmp: Path) -> None:
    port = free_port()
    server = Server([EXPORTER, "--listen", f"0.0.0.0:{port}",
                     "--allow-unauthenticated-nonloopback"], port, tmp / "forced.log")
    try:
        server.wait_ready()
    finally:
        assert server.stop() == 0


def test_exporter_with_token_may_listen_publicly(tmp: Path) -> None:
    config = tmp / "exporter.yml"
    config.write_text(token_config())
    port = free_port()
    server = Server([EXPORTER, "--config", str(config), "--listen", f"0.0.0.0:{port}"], port,
                    tmp / "public.log")
    try:
        server.wait_ready()
    finally:
        assert server.stop() == 0


def test_token_command_prints_only_a_hash_for_the_config() -> None:
    out = _run([EXPORTER, "token"]).stdout
    token = next(line.split()[-1] for line in out.splitlines() if line.startswith("token"))
    digest = hashlib.sha256(token.encode()).hexdigest()
    config_part = out.split("exporter config:", 1)[1]
    assert digest in config_part and token not in config_part


def test_help_documents_the_override() -> None:
    """The way to serve auth-off on a public address is a documented, explicit flag."""
    result = _run([sys.executable, "-m", "query", "--help"])
    assert result.returncode == 0 and "--allow-unauthenticated-nonloopback" in result.stdout
