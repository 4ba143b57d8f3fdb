"""Helpers for the reliability tests: real servers, real child processes, bounded waits.

Everything here starts programs as users start them (the installed console scripts), on free
127.0.0.1 ports, and cleans up after itself; every loop is bounded in count and in time.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from http.client import HTTPResponse
from pathlib import Path

import requests

BIN = Path(sys.executable).parent
EXPORTER = str(BIN / "procfleet-exporter")
QUERY = str(BIN / "procfleet-query")
SLEEPER = "import time\nwhile True: time.sleep(1)"
# A fixed token for tests; only its SHA-256 goes into the exporter's config.
TOKEN = "reliability-test-token-Zq7u2Lw9"
TOKEN_SHA256 = hashlib.sha256(TOKEN.encode()).hexdigest()
ERROR_KEYS = {"error", "details", "code"}


def free_port() -> int:
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

    def wait_ready(self, path: str = "/healthz", timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.argv[0]} exited early:\n{self.output()}")
            try:
                return requests.get(self.url + path, timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, timeout=timeout, what=f"{self.url}{path}")

    def healthy(self) -> bool:
        try:
            return requests.get(self.url + "/healthz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

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


def start_exporter(tmp: Path, *extra: str, config: str | None = None,
                   hostname: str | None = None) -> Server:
    """`procfleet-exporter --listen 127.0.0.1:PORT [--config FILE] [--hostname NAME]`."""
    port = free_port()
    argv = [EXPORTER, "--listen", f"127.0.0.1:{port}", *extra]
    if hostname is not None:
        argv += ["--hostname", hostname]
    if config is not None:
        path = tmp / f"exporter-{port}.yml"
        path.write_text(config)
        argv += ["--config", str(path)]
    server = Server(argv, port, tmp / f"exporter-{port}.log")
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def token_config(*, protect_metrics: bool = True) -> str:
    return (f"auth:\n  token_sha256: {TOKEN_SHA256}\n"
            f"  protect_metrics: {'true' if protect_metrics else 'false'}\n")


def spawn_sleeper(*args: str) -> subprocess.Popen:
    """A child that sleeps until killed, with `args` on its command line; visible on return."""
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def visible() -> bool:
        try:
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                return f.read().split(b"\0")[1:2] == [b"-c"]
        except OSError:
            return False

    wait_until(visible, what=f"child {proc.pid} to exec")
    return proc


def reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def new_api_key(name: str, *permissions: str) -> tuple[str, str]:
    """(key, config lines) from `procfleet-query keygen`, as an operator makes them."""
    argv = [QUERY, "keygen", "--name", name]
    for permission in permissions:
        argv += ["--permission", permission]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    key = next(line.split()[-1] for line in out.splitlines() if line.startswith("#   "))
    entry = "\n".join("    " + line for line in out.splitlines() if not line.startswith("#"))
    return key, entry


def query_config(exporters: list[tuple[str, str]], *, key_entries: list[str] | None = None,
                 exporter_token: str | None = None, timeouts: tuple[float, float] = (2.0, 5.0),
                 log_level: str = "info", extra: str = "") -> str:
    """Query service YAML: static exporters (hostname, url), API keys (or auth off)."""
    lines = [f"log_level: {log_level}",
             f"timeouts: {{exporter: {timeouts[0]}, request: {timeouts[1]}}}"]
    if key_entries:
        lines += ["auth:", "  enabled: true", "  api_keys:", *key_entries]
    else:
        lines += ["auth:", "  enabled: false"]
    if exporter_token is not None:
        lines.append(f"exporter_token: {exporter_token}")
    lines.append("exporters:")
    lines += [f"  - {{hostname: {name}, url: \"{url}\"}}" for name, url in exporters]
    return "\n".join(lines) + "\n" + extra


def start_query(tmp: Path, config: str, *extra: str) -> Server:
    """`procfleet-query --config FILE --listen 127.0.0.1:PORT`, ready when /healthz answers."""
    port = free_port()
    path = tmp / f"query-{port}.yml"
    path.write_text(config)
    argv = [QUERY, "--config", str(path), "--listen", f"127.0.0.1:{port}", *extra]
    server = Server(argv, port, tmp / f"query-{port}.log")
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def raw_request(port: int, target: bytes, headers: Sequence[tuple[bytes, bytes]] = (),
                timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send one GET with exactly this request-target and these header lines; read the answer."""
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        response = HTTPResponse(sock)
        response.begin()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def assert_error_body(status: int, headers: dict[str, str], body: bytes) -> dict:
    """The one error shape: JSON {error, details, code}, all set, code equal to the status."""
    assert headers.get("content-type", "").startswith("application/json"), headers
    doc = json.loads(body)
    assert doc.keys() == ERROR_KEYS, doc
    assert doc["code"] == status and doc["error"] and doc["details"], doc
    return doc
