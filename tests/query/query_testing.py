"""Fixtures for the query service: fake exporters on 127.0.0.1 and apps built on them.

`fake_exporters` runs one aiohttp loop thread serving a port per behaviour:

    ok            /process/4242 is a process; any other pid is a 404 "process not found"
    slow          like ok, answering after SLOW_SECONDS (in time for the test timeouts)
    hang          a listening socket that is never accepted: the request is never answered
    refused       a port nothing listens on
    garbage       200 with a body that is not JSON
    error         500
    not_http      answers bytes that are not HTTP at all
    big           200 with a body larger than the 1 MiB cap
    redirect      302 to the ok exporter (must not be followed)
    unsupported   501: the lookup is not available on its platform
    wrong_pid     200 with a process whose pid is not the one asked for
    html_404      404 with an HTML page (not an exporter)
    token         like ok but requires `Authorization: Bearer EXPORTER_TOKEN`
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import falcon.testing
import pytest
from aiohttp import web

from procfleet.testing import Server, free_port, query_argv, reap
from query.app import create_app
from query.config import Config, parse
from query.fanout import Fanout
from query.openapi import document

KNOWN_PID = 4242
SLOW_SECONDS = 0.25
EXPORTER_TOKEN = "exporter-secret"
# Short timeouts keep the suite fast; they are still far above a local answer's time.
EXPORTER_TIMEOUT = 0.6
REQUEST_TIMEOUT = 1.2

PROCESS = {"pid": KNOWN_PID, "name": "nginx", "user": "www-data", "state": "sleep",
           "cpu_percent": 2.5, "mem_percent": 1.2, "mem_rss": 12345678,
           "command": "nginx: master process /usr/sbin/nginx",
           "start_time": "2026-01-15T10:30:00Z"}
NOT_FOUND = {"error": "process not found", "details": "no such pid", "code": 404}


def _process_handler(delay: float = 0.0, token: str | None = None):
    async def handler(request: web.Request) -> web.Response:
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return web.json_response({"error": "unauthorized", "details": "token",
                                      "code": 401}, status=401)
        if delay:
            await asyncio.sleep(delay)
        if request.match_info["pid"] == str(KNOWN_PID):
            return web.json_response(PROCESS)
        return web.json_response(NOT_FOUND, status=404)
    return handler


async def _list_handler(request: web.Request) -> web.Response:
    # Echo the filters back in the process names so tests can see they were passed through.
    echoed = ",".join(f"{k}={v}" for k, v in sorted(request.query.items()))
    return web.json_response({"hostname": "fake", "processes": [
        dict(PROCESS, name=echoed or "all"), dict(PROCESS, pid=1, name="init")]})


def _fixed(status: int, body: bytes, content_type: str = "application/json", **headers: str):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type=content_type,
                            headers=headers)
    return handler


def _app(process: Any, listing: Any = _list_handler) -> web.Application:
    app = web.Application()
    app.router.add_get("/process/{pid}", process)
    app.router.add_get("/process", listing)
    app.router.add_get("/healthz", _fixed(200, b'{"status": "ok"}'))
    return app


async def _not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(b"SSH-2.0-OpenSSH_9.6 this is not HTTP\r\n\r\n")
    await writer.drain()
    writer.close()


@dataclass
class FakeExporters:
    """The running fakes: `url(behaviour)` is the base URL of that fake exporter."""

    urls: dict[str, str] = field(default_factory=dict)

    def url(self, behaviour: str) -> str:
        return self.urls[behaviour]


@pytest.fixture(scope="session")
def fake_exporters() -> Iterator[FakeExporters]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fakes = FakeExporters()
    runners: list[web.AppRunner] = []
    servers: list[asyncio.AbstractServer] = []

    async def start() -> None:
        big = b'{"pid": 4242, "name": "' + b"x" * (1024 * 1024 + 10) + b'"}'
        apps = {
            "ok": _app(_process_handler()),
            "slow": _app(_process_handler(delay=SLOW_SECONDS)),
            "garbage": _app(_fixed(200, b"<html>this is not JSON", "text/html")),
            "error": _app(_fixed(500, b'{"error": "boom"}'), _fixed(500, b'{"error": "boom"}')),
            "big": _app(_fixed(200, big)),
            "unsupported": _app(_fixed(501, b'{"error": "unsupported"}')),
            "wrong_pid": _app(_fixed(200, json.dumps(dict(PROCESS, pid=7)).encode())),
            "html_404": _app(_fixed(404, b"<h1>Not Found</h1>", "text/html")),
            "token": _app(_process_handler(token=EXPORTER_TOKEN)),
        }
        for name, app in apps.items():
            runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            port = runner.addresses[0][1]
            fakes.urls[name] = f"http://127.0.0.1:{port}"
        redirect = _app(_fixed(302, b"", "text/plain", Location=fakes.urls["ok"] + "/process/4242"))
        runner = web.AppRunner(redirect, shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        fakes.urls["redirect"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        server = await asyncio.start_server(_not_http, "127.0.0.1", 0)
        servers.append(server)
        fakes.urls["not_http"] = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(64)
    fakes.urls["hang"] = f"http://127.0.0.1:{hang.getsockname()[1]}"
    fakes.urls["refused"] = f"http://127.0.0.1:{free_port()}"
    try:
        yield fakes
    finally:
        async def stop() -> None:
            for runner in runners:
                await runner.cleanup()
            for server in servers:
                server.close()
                await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
        hang.close()


@contextmanager
def serve_aiohttp(routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]
                  ) -> Iterator[str]:
    """A one-off aiohttp app (GET `routes`) on 127.0.0.1 in its own loop thread: its base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def exporter_entries(fakes: FakeExporters, *behaviours: str, **extra: Any) -> list[dict]:
    """`exporters:` config entries named after their behaviour (`ok` → hostname `ok`)."""
    return [{"hostname": b.replace("_", "-"), "url": fakes.url(b), **extra} for b in behaviours]


def make_config(exporters: list[dict], **overrides: Any) -> Config:
    """A validated Config with auth off and the suite's short timeouts, unless overridden."""
    data: dict[str, Any] = {
        "auth": {"enabled": False},
        "timeouts": {"exporter": EXPORTER_TIMEOUT, "request": REQUEST_TIMEOUT},
        "exporters": exporters,
    }
    data.update(overrides)
    return parse(data)


@pytest.fixture
def make_client() -> Iterator[Callable[[Config], falcon.testing.TestClient]]:
    """Build a TestClient over create_app(config) with a real Fanout, closed afterwards."""
    fanouts: list[Fanout] = []

    def build(config: Config) -> falcon.testing.TestClient:
        fanout = Fanout.from_config(config)
        fanouts.append(fanout)
        return falcon.testing.TestClient(create_app(config, fanout=fanout))

    yield build
    for fanout in fanouts:
        fanout.close()


# -- the OpenAPI document as a checker --------------------------------------------------

def _resolve_ref(doc: dict, node: dict) -> dict:
    while "$ref" in node:
        path = node["$ref"].removeprefix("#/").split("/")
        node = doc
        for part in path:
            node = node[part]
    return node


def schema_errors(doc: dict, schema: dict, value: Any, where: str = "$") -> list[str]:
    """Check `value` against the subset of JSON Schema the document uses; list mismatches."""
    schema = _resolve_ref(doc, schema)
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not schema_errors(doc, s, value, where)]
        return [] if len(matching) == 1 else [f"{where}: matches {len(matching)} of oneOf"]
    errors: list[str] = []
    kind = schema.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool,
              "integer": int, "number": (int, float)}
    if kind is not None:
        if isinstance(value, bool) and kind not in ("boolean",) or \
                not isinstance(value, checks[kind]):
            return [f"{where}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if kind == "object":
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{where}: missing {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                errors += schema_errors(doc, properties[name], item, f"{where}.{name}")
            elif extra is False:
                errors.append(f"{where}: unexpected {name!r}")
            elif isinstance(extra, dict):
                errors += schema_errors(doc, extra, item, f"{where}.{name}")
    if kind == "array":
        for i, item in enumerate(value):
            errors += schema_errors(doc, schema.get("items", {}), item, f"{where}[{i}]")
    return errors


@pytest.fixture(scope="session")
def openapi_doc() -> dict:
    return document()


@pytest.fixture
def check_doc(openapi_doc: dict) -> Callable[[str, Any], None]:
    """Assert a TestClient result matches what the document says for its route and status."""

    def check(template: str, result: Any) -> None:
        operation = openapi_doc["paths"][template]["get"]
        status = str(result.status_code)
        assert status in operation["responses"], f"{template} does not document {status}"
        response = _resolve_ref(openapi_doc, operation["responses"][status])
        content_type = result.headers["content-type"].split(";")[0]
        assert content_type in response["content"], (template, status, content_type)
        if content_type == "application/json":
            schema = response["content"][content_type]["schema"]
            errors = schema_errors(openapi_doc, schema, result.json)
            assert not errors, errors

    return check


# -- the real service, started as users do -----------------------------------------------

class Service(Server):
    """The query service started as `python -m query`; `get` answers (status, headers, body)."""

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.proc

    @property
    def base(self) -> str:
        return self.url

    def log(self) -> str:
        """What the service logged so far (stdout and stderr)."""
        return self.output()

    def get(self, path: str, headers: dict[str, str] | None = None,
            timeout: float = 10.0) -> tuple[int, Any, Any]:
        request = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
                status, response_headers = response.status, response.headers
        except urllib.error.HTTPError as exc:
            body = exc.read()
            status, response_headers = exc.code, exc.headers
            exc.close()
        ctype = response_headers.get("Content-Type", "")
        return status, response_headers, json.loads(body) if "json" in ctype else body


@pytest.fixture
def start_service(tmp_path) -> Iterator[Callable[..., Service]]:
    """Start `python -m query --config FILE --listen 127.0.0.1:PORT` and wait for /healthz."""
    started: list[Service] = []

    def start(config_text: str, *args: str) -> Service:
        path = tmp_path / f"query-{len(started)}.yml"
        path.write_text(config_text)
        port = free_port()
        service = Service.start(query_argv(path, port, *args, module=True), port,
                                tmp_path / f"query-{len(started)}.log", timeout=15.0)
        started.append(service)
        return service

    yield start
    for service in started:
        reap(service.process)
