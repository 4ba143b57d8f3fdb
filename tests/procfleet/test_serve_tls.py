"""Both services served over TLS by their own loop (procfleet.serve + waitress_adapter), as
users start them with --web.config.file: verified against a CA made at test time, basic auth,
client certificates, and the request deadline covering the handshake."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from tls_fixtures import PASSWORD, USER, TLSSet, password_hash, web_config_text

from procfleet.basicauth import Credentials
from procfleet.testing import (
    EXPORTER,
    QUERY,
    Server,
    basic_auth_header,
    free_port,
    start_exporter,
    start_query,
    wait_until,
)
from procfleet.waitress_adapter import TLSChannel, WaitressServer
from procfleet.webconfig import parse
from query.auth import key_hash

GOOD = basic_auth_header(USER, PASSWORD)


def web_file(tmp_path: Path, text: str, name: str = "web.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tls_exporter(tls_set: TLSSet, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Server]:
    """An exporter over TLS with basic auth and a 2 s request deadline."""
    tmp = tmp_path_factory.mktemp("tls-exporter")
    web = web_file(tmp, web_config_text(tls_set, users={USER: password_hash()}))
    server = start_exporter(tmp, "--web.config.file", str(web), "--head-timeout", "2",
                            ca_file=tls_set.ca.cert, headers=GOOD)
    yield server
    server.stop()


def test_exporter_answers_over_tls_verified_against_the_ca(tls_exporter: Server,
                                                           tls_set: TLSSet) -> None:
    assert tls_exporter.url.startswith("https://")
    answer = requests.get(f"{tls_exporter.url}/metrics", headers=GOOD,
                          verify=str(tls_set.ca.cert), timeout=10)
    assert answer.status_code == 200
    assert "namedprocess_namegroup_num_procs" in answer.text
    # A list answer of many kilobytes: written in several TLS records.
    answer = requests.get(f"{tls_exporter.url}/process", headers=GOOD,
                          verify=str(tls_set.ca.cert), timeout=10)
    assert answer.status_code == 200 and len(answer.json()["processes"]) > 1
    assert "listening on https://127.0.0.1" in tls_exporter.output()


@pytest.mark.parametrize("headers", [{}, basic_auth_header(USER, "wrong"),
                                     basic_auth_header("mallory", PASSWORD)])
def test_exporter_over_tls_refuses_missing_or_wrong_credentials(
        tls_exporter: Server, tls_set: TLSSet, headers: dict[str, str]) -> None:
    answer = requests.get(f"{tls_exporter.url}/healthz", headers=headers,
                          verify=str(tls_set.ca.cert), timeout=10)
    assert answer.status_code == 401
    assert answer.json()["error"] == "unauthorized"
    assert answer.headers["WWW-Authenticate"] == 'Basic realm="procfleet"'


def test_a_client_that_trusts_another_ca_refuses_the_exporter(tls_exporter: Server,
                                                              tls_set: TLSSet) -> None:
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(f"{tls_exporter.url}/healthz", headers=GOOD,
                     verify=str(tls_set.other_ca.cert), timeout=10)
    assert tls_exporter.healthy()  # and the failed handshake left the server serving


def test_plain_http_to_the_tls_port_gets_no_answer_and_the_server_carries_on(
        tls_exporter: Server) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{tls_exporter.port}/healthz", timeout=10)
    assert tls_exporter.healthy()


def tls_socket(server: Server, ca: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def read_answers(sock: ssl.SSLSocket, count: int) -> list[bytes]:
    """The status lines of `count` answers with Content-Length bodies, read in order."""
    buffer = b""
    statuses = []
    while len(statuses) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {len(statuses)} answers"
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(buffer) < length:
            chunk = sock.recv(65536)
            assert chunk
            buffer += chunk
        buffer = buffer[length:]
        statuses.append(head.split(b"\r\n")[0])
    return statuses


def test_pipelined_requests_in_one_tls_record_are_all_answered(tls_exporter: Server,
                                                               tls_set: TLSSet) -> None:
    # 40 requests, 13 KB: one TLS record (at most 16 KiB), more than waitress reads at once
    # (8 KiB). What is left is decrypted in OpenSSL's buffer, where poll() cannot see it:
    # unless the channel takes it all, the last requests wait forever.
    auth = GOOD["Authorization"]
    request = (f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
               f"X-Pad: {'a' * 220}\r\n\r\n").encode()
    assert 8192 < len(request) * 40 < 16384
    with tls_socket(tls_exporter, tls_set.ca.cert) as sock:
        sock.sendall(request * 40)
        assert read_answers(sock, 40) == [b"HTTP/1.1 200 OK"] * 40
        sock.sendall(request)  # and the connection is kept alive after them
        assert read_answers(sock, 1) == [b"HTTP/1.1 200 OK"]


@pytest.mark.parametrize("sends", [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
                         ids=["silent", "half-a-client-hello"])
def test_the_request_deadline_closes_a_connection_stuck_in_its_handshake(
        tls_exporter: Server, sends: bytes) -> None:
    with socket.create_connection(("127.0.0.1", tls_exporter.port), timeout=30) as sock:
        sock.sendall(sends)
        # The deadline is 2 s; the socket's own 30 s timeout fails the test if it never comes.
        assert sock.recv(1024) == b""
    wait_until(lambda: "sent no complete request within 2 s" in tls_exporter.output(),
               what="the deadline's log line")


def test_client_certificates_are_required_and_verified(tls_set: TLSSet,
                                                       tmp_path: Path) -> None:
    web = web_file(tmp_path, web_config_text(tls_set, extra_tls=(
        f"client_auth_type: RequireAndVerifyClientCert\nclient_ca_file: {tls_set.ca.cert}\n"
        "client_allowed_sans: [scraper.test]\n")))
    port = free_port()
    argv = [EXPORTER, "--listen", f"127.0.0.1:{port}", "--web.config.file", str(web)]
    server = Server(argv, port,
                    tmp_path / "exporter.log", ca_file=tls_set.ca.cert)
    try:
        client_cert = (str(tls_set.client.cert), str(tls_set.client.key))
        wait_until(lambda: requests.get(f"{server.url}/healthz", cert=client_cert,
                                        verify=str(tls_set.ca.cert), timeout=5).ok,
                   retry_on=(OSError,), timeout=20, what="the exporter with client certs")
        with pytest.raises(requests.exceptions.ConnectionError):  # SSLError is one
            requests.get(f"{server.url}/healthz", verify=str(tls_set.ca.cert), timeout=10)
        # Signed by the CA, but its SANs (127.0.0.1, localhost) are not allowed ones.
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"{server.url}/healthz", verify=str(tls_set.ca.cert), timeout=10,
                         cert=(str(tls_set.server.cert), str(tls_set.server.key)))
        assert requests.get(f"{server.url}/healthz", cert=client_cert,
                            verify=str(tls_set.ca.cert), timeout=10).status_code == 200
    finally:
        server.stop()


def test_a_bad_web_config_stops_the_start_with_every_problem(tmp_path: Path) -> None:
    web = web_file(tmp_path, "tls_server_config: {cert_file: nope.crt}\nrate_limit: {}\n")
    config = tmp_path / "query.yml"
    config.write_text("auth: {enabled: false}\n")
    for argv in ([EXPORTER], [QUERY, "--config", str(config)]):
        done = subprocess.run([*argv, "--web.config.file", str(web)], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 2, done.stderr
        assert f"invalid configuration in {web}" in done.stderr
        assert "tls_server_config.cert_file: no such file" in done.stderr
        assert "tls_server_config.key_file: is required" in done.stderr
        assert "rate_limit: is not supported" in done.stderr
        assert "Traceback" not in done.stderr


def test_query_service_over_tls_with_basic_auth_and_keys(tls_set: TLSSet,
                                                         tmp_path: Path) -> None:
    key = "pfq_tls-test-key"
    web = web_file(tmp_path, web_config_text(tls_set, users={USER: password_hash()}))
    config = (f"auth:\n  enabled: true\n  api_keys:\n    - {{name: t, sha256: {key_hash(key)}, "
              "permissions: [node:read]}\nexporters: []\n")
    server = start_query(tmp_path, config, "--web.config.file", str(web),
                         ca_file=tls_set.ca.cert, headers=GOOD)
    try:
        ca = str(tls_set.ca.cert)
        assert requests.get(f"{server.url}/healthz", verify=ca, timeout=10).status_code == 401
        assert requests.get(f"{server.url}/healthz", verify=ca, headers=GOOD,
                            timeout=10).status_code == 200
        assert requests.get(f"{server.url}/node", verify=ca, headers=GOOD,
                            timeout=10).status_code == 401
        assert requests.get(f"{server.url}/node", verify=ca, timeout=10,
                            headers={**GOOD, "X-API-Key": key}).status_code == 200
        assert requests.get(f"{server.url}/node", verify=ca, timeout=10,
                            headers={"Authorization": f"Bearer {key}"}).status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{server.url}/healthz", verify=str(tls_set.other_ca.cert),
                         timeout=10)
    finally:
        server.stop()


# -- the adapter's TLS channel, driven here one poll at a time -----------------------------

def _app(environ: dict, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


@pytest.fixture
def adapter(tls_set: TLSSet) -> Iterator[WaitressServer]:
    web = parse({"tls_server_config": {"cert_file": str(tls_set.server.cert),
                                       "key_file": str(tls_set.server.key)}})
    # waitress counts its listener and its wake-up pipe against the limit: 4 connections.
    built = WaitressServer(_app, "127.0.0.1", 0, head_timeout=5.0, threads=1,
                           connection_limit=6, tls=web.tls_context)
    yield built
    built.close()


def test_tls_connections_count_against_the_connection_limit(adapter: WaitressServer) -> None:
    assert issubclass(adapter.channel_class, TLSChannel)
    clients = [socket.create_connection(("127.0.0.1", adapter.bound[1]), timeout=5)
               for _ in range(10)]
    try:
        for _ in range(20):
            adapter.poll(0.05)
        assert adapter.connections() == 4  # the other six wait in the kernel's backlog
    finally:
        for client in clients:
            client.close()


def test_failed_handshakes_are_counted_and_closed(adapter: WaitressServer) -> None:
    with socket.create_connection(("127.0.0.1", adapter.bound[1]), timeout=5) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP
        wait_until(lambda: adapter.poll(0.05) or adapter.handshake_failures() == 1,
                   what="the failed handshake")
        for _ in range(5):
            adapter.poll(0.05)
        assert adapter.connections() == 0


def test_a_password_check_waits_for_its_turn_at_most_wait_seconds() -> None:
    # One slow check (cost 14: about a second) holds bcrypt; another may wait only 10 ms.
    slow = Credentials({USER: password_hash(cost=14)}, wait_seconds=0.01)
    worker = threading.Thread(target=slow.check, args=(USER, b"wrong"))
    worker.start()
    try:
        wait_until(lambda: slow.bcrypt_checks == 1, what="the slow check to start")
        with pytest.raises(TimeoutError):
            slow.check(USER, PASSWORD.encode())
    finally:
        worker.join(timeout=60)
