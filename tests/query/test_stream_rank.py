"""Issue 11 on the query service: NDJSON streaming, scope=fleet ranking, filters passed on.

Streaming is checked without timing: a gated fake exporter answers only after the test has
read the first line, so a service that waited for every exporter before writing would hang
the gate (and the test would see the deadline's timeout instead of the gated answer).
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from query_testing import KNOWN_PID, PROCESS, exporter_entries, serve_aiohttp

from procfleet import cli
from procfleet.testing import Server, start_query, wait_until
from query.fanout import SLOW_READER_ERROR, Fanout, list_call
from query.fleet import Exporter

NDJSON = "application/x-ndjson"


def _lister(processes: list[dict[str, Any]], seen: list[dict[str, str]] | None = None,
            gate: threading.Event | None = None) -> Callable[..., Any]:
    async def handler(request: web.Request) -> web.Response:
        if seen is not None:
            seen.append(dict(request.query))
        if gate is not None:
            while not gate.is_set():
                await asyncio.sleep(0.01)
        listed = [p for p in processes if request.query.get("name", p["name"]) == p["name"]]
        if "limit" in request.query:  # what a real exporter does with sort and limit
            listed.sort(key=lambda p: p["cpu_percent"], reverse=True)
            listed = listed[: int(request.query["limit"])]
        return web.json_response({"hostname": "fake", "processes": listed})
    return handler


def _process(gate: threading.Event | None = None) -> Callable[..., Any]:
    async def handler(request: web.Request) -> web.Response:
        if gate is not None:
            while not gate.is_set():
                await asyncio.sleep(0.01)
        return web.json_response(PROCESS)
    return handler


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # never leave a fake waiting


@pytest.fixture
def fleet(tmp_path: Path, gate: threading.Event, fake_exporters) -> Iterator[dict[str, Any]]:
    """A real query service over: fast (answers at once), gated (after the test opens the
    gate), refused, and one in maintenance. `seen` records what the fast one was asked."""
    seen: list[dict[str, str]] = []
    with ExitStack() as stack:
        fast = stack.enter_context(serve_aiohttp({
            "/process": _lister([dict(PROCESS, pid=p, cpu_percent=c)
                                 for p, c in ((10, 5.0), (11, 50.0), (12, 0.5))], seen),
            "/process/{pid}": _process(), "/healthz": _process()}))
        gated = stack.enter_context(serve_aiohttp({
            "/process": _lister([dict(PROCESS, pid=p, cpu_percent=c)
                                 for p, c in ((20, 40.0), (21, 60.0))], gate=gate),
            "/process/{pid}": _process(gate), "/healthz": _process()}))
        entries = [{"hostname": "fast", "url": fast, "labels": {"group": "web"}},
                   {"hostname": "gated", "url": gated, "labels": {"group": "web"}},
                   {"hostname": "resting", "url": fast, "maintenance": True,
                    "labels": {"group": "web"}},
                   *[dict(e, labels={"group": "web"}) for e in
                     exporter_entries(fake_exporters, "refused")]]
        config = {"auth": {"enabled": False}, "timeouts": {"exporter": 5, "request": 8},
                  "exporters": entries}
        server = start_query(tmp_path, json.dumps(config))
        try:
            yield {"server": server, "seen": seen}
        finally:
            server.stop()


def _get(server: Server, path: str, accept: str = NDJSON
         ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", path, headers={"Accept": accept})
    return connection, connection.getresponse()


def _read(server: Server, path: str, accept: str = NDJSON
          ) -> tuple[http.client.HTTPResponse, bytes]:
    connection, response = _get(server, path, accept)
    try:
        return response, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path, field", [
    (f"/node/group:web/process/{KNOWN_PID}", "process"),
    ("/node/_all/process?sort=cpu&limit=5", "processes"),
])
def test_broadcast_streams_each_result_as_it_comes_then_the_summary(fleet, gate, path, field):
    connection, response = _get(fleet["server"], path)
    try:
        assert response.status == 200
        assert response.getheader("Content-Type") == NDJSON
        # Said before the first line: the result lines to come (group:web and _all: 4).
        assert response.getheader("X-Procfleet-Targeted") == "4"
        lines = []
        # Three results need no gate (fast, resting, refused): they come before the gated one.
        for _ in range(3):
            lines.append(json.loads(response.readline()))
        assert {line["hostname"] for line in lines} == {"fast", "resting", "refused"}
        gate.set()
        rest = [json.loads(line) for line in response.read().splitlines()]
    finally:
        connection.close()
    results, summary = lines + rest[:-1], rest[-1]
    by_host = {r["hostname"]: r for r in results}
    assert by_host["gated"]["status"] == "ok" and field in by_host["gated"]
    assert by_host["fast"]["status"] == "ok"
    assert by_host["resting"]["status"] == "skipped"
    assert by_host["refused"] == {"hostname": "refused", "status": "failed",
                                  "error": "connection refused"}
    assert set(summary) == {"job_id", "summary"}
    counts = dict(summary["summary"])
    assert counts.pop("duration_ms") >= 0
    assert counts == {"targeted": 4, "ok": 2, "failed": 1, "skipped": 1, "not_found": 0}
    # The same objects as the JSON answer's results.
    body = json.loads(_read(fleet["server"], path, accept="application/json")[1])
    assert sorted(body["results"], key=lambda r: r["hostname"]) == \
        sorted(results, key=lambda r: r["hostname"])


def test_the_deadline_still_ends_with_a_summary(tmp_path, gate):
    """The gate never opens: the gated exporter's result is the deadline's timeout."""
    with serve_aiohttp({"/process": _lister([], gate=gate), "/healthz": _process(),
                        "/process/{pid}": _process(gate)}) as gated, \
            serve_aiohttp({"/process": _lister([dict(PROCESS)]), "/healthz": _process(),
                           "/process/{pid}": _process()}) as fast:
        config = {"auth": {"enabled": False}, "timeouts": {"exporter": 0.5, "request": 0.8},
                  "exporters": [{"hostname": "gated", "url": gated},
                                {"hostname": "fast", "url": fast}]}
        server = start_query(tmp_path, json.dumps(config))
        try:
            response, raw = _read(server, "/node/_all/process")
            lines = [json.loads(line) for line in raw.splitlines()]
        finally:
            server.stop()
    assert response.status == 200
    assert lines[0]["hostname"] == "fast"
    assert lines[1]["hostname"] == "gated" and lines[1]["status"] == "failed"
    assert "timeout" in lines[1]["error"]
    assert lines[2]["summary"]["failed"] == 1 and lines[2]["summary"]["ok"] == 1


@pytest.mark.parametrize("path, code", [
    ("/node/group:nothing/process", 404),
    ("/node/_all/process?state=bogus", 400),
    ("/node/_all/process?port=99999", 400),
    ("/node/_all/process/0", 400),
    ("/node/_all/process?scope=fleet", 400),
    ("/node/_all/process?scope=world&sort=cpu&limit=1", 400),
])
def test_errors_are_decided_before_the_first_byte(fleet, path, code):
    response, raw = _read(fleet["server"], path)
    body = json.loads(raw)
    assert response.status == code
    assert response.getheader("Content-Type").startswith("application/json")
    assert set(body) == {"error", "details", "code"}


def test_unicast_and_json_clients_get_json(fleet, gate):
    gate.set()
    for path, accept in ((f"/node/fast/process/{KNOWN_PID}", NDJSON),
                         (f"/node/_all/process/{KNOWN_PID}", "*/*"),
                         (f"/node/_all/process/{KNOWN_PID}", ""),
                         (f"/node/_all/process/{KNOWN_PID}",
                          f"{NDJSON};q=0.5, application/json")):
        response, raw = _read(fleet["server"], path, accept)
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("application/json"), accept
        assert {r["hostname"] for r in json.loads(raw)["results"]} >= {"fast"}


def test_fleet_scope_ranks_across_hosts_and_pushes_the_limit_down(fleet, gate):
    gate.set()
    response, raw = _read(fleet["server"],
                          "/node/_all/process?scope=fleet&sort=cpu&limit=3&cmdline=x",
                          accept="application/json")
    body = json.loads(raw)
    assert response.status == 200
    assert set(body) == {"job_id", "results", "ranked"}
    assert body["ranked"] == [{"hostname": "gated", "pid": 21}, {"hostname": "fast", "pid": 11},
                              {"hostname": "gated", "pid": 20}]
    by_host = {r["hostname"]: r for r in body["results"]}
    assert [p["pid"] for p in by_host["gated"]["processes"]] == [21, 20]
    assert [p["pid"] for p in by_host["fast"]["processes"]] == [11]
    assert by_host["refused"]["status"] == "failed"
    # Each exporter was asked for its own top 3 by the same key, with the filter.
    assert fleet["seen"][-1] == {"sort": "cpu", "limit": "3", "cmdline": "x"}


def test_filters_pass_through_to_the_exporters(fleet, gate):
    gate.set()
    path = ("/node/fast/process?cmdline=nginx&cmdline_re=ngi.x&state=running,sleep&port=80"
            "&unit=nginx.service&container=ab12&ppid=1&min_rss=1024"
            "&started_before=2026-01-15T10:30:00Z&started_after=2020-01-01T00:00:00%2B02:00")
    response, _ = _read(fleet["server"], path, accept="application/json")
    assert response.status == 200
    assert fleet["seen"][-1] == {
        "cmdline": "nginx", "cmdline_re": "ngi.x", "state": "running,sleep", "port": "80",
        "unit": "nginx.service", "container": "ab12", "ppid": "1", "min_rss": "1024",
        "started_before": "2026-01-15T10:30:00Z", "started_after": "2020-01-01T00:00:00+02:00"}


def test_a_slow_reader_is_dropped_without_stalling_other_requests(fake_exporters):
    """A reader that takes nothing: the loop gives up on it after the slow-reader timeout,
    while another broadcast over the same exporters is answered meanwhile."""
    exporters = [Exporter(f"ok-{i}", fake_exporters.url("ok")) for i in range(6)]
    with Fanout(exporter_timeout=2, request_timeout=5) as fanout:
        stream = fanout.stream(exporters, list_call({}), bound=2, slow_reader_timeout=0.2)
        wait_until(lambda: stream.dropped, what="the slow reader to be dropped")
        others = fanout.all(exporters, list_call({"name": "x"}))
        assert [r.kind for r in others] == ["ok"] * 6
        results = list(stream)
        wait_until(lambda: fanout.guards.waiting() == 0, what="every exporter's waiting to end")
    assert len(results) == 6
    assert [r.kind for r in results[:2]] == ["ok", "ok"]  # what the queue held
    assert {r.error for r in results[2:]} == {SLOW_READER_ERROR}
    assert sorted(r.hostname for r in results) == sorted(e.hostname for e in exporters)


def test_a_reader_that_leaves_frees_the_broadcast(fake_exporters):
    exporters = [Exporter("hang", fake_exporters.url("hang")),
                 Exporter("ok", fake_exporters.url("ok"))]
    with Fanout(exporter_timeout=30, request_timeout=60) as fanout:
        stream = fanout.stream(exporters, list_call({}))
        first = next(iter(stream))
        assert first.hostname == "ok"
        stream.close()
        # The hung call goes on (bounded by the exporter timeout) but no request waits on it.
        wait_until(lambda: stream.finished, what="the broadcast to stop waiting")
        assert fanout.guards.waiting() == 0  # "hang" waited on by this request until it left


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_streams_broadcasts_and_says_who_answered(fleet, gate):
    gate.set()
    url = fleet["server"].url
    piped = io.StringIO()
    status = cli.run(["--url", url, "ps", "_all", "--sort", "cpu", "--limit", "2",
                      "--cmdline", "nginx", "--state", "sleep,running"],
                     out=piped, environ={})
    assert status == cli.EXIT_OK
    text = piped.getvalue()
    assert text.count("HOST") == 1  # one header, rows as they came
    assert "refused: failed: connection refused" in text
    assert text.rstrip().endswith("4 hosts: 2 answered (0 found nothing), 1 failed, 1 skipped")
    assert fleet["seen"][-1] == {"sort": "cpu", "limit": "2", "cmdline": "nginx",
                                 "state": "sleep,running"}


def test_cli_get_on_a_terminal_shows_progress_then_the_table(fleet, gate):
    gate.set()
    terminal = _Terminal()
    status = cli.run(["--url", fleet["server"].url, "get", "group:web", str(KNOWN_PID)],
                     out=terminal, environ={})
    assert status == cli.EXIT_OK
    text = terminal.getvalue()
    assert re.search(r"\r1/4 hosts, [01] failed\x1b\[K", text)  # of the total its head says
    assert "\r4/4 hosts, 1 failed\x1b[K" in text  # the last progress line, then cleared
    table = text.rpartition("\r\x1b[K")[2].splitlines()
    assert table[0].startswith("HOST")
    assert sorted(line.split()[0] for line in table[1:3]) == ["fast", "gated"]
    assert table[-1] == "4 hosts: 2 answered (0 found nothing), 1 failed, 1 skipped"


def test_cli_nothing_found_names_the_hosts_that_did_not_answer(fleet, gate):
    gate.set()
    out = io.StringIO()
    with pytest.raises(cli.CliError) as caught:
        cli.run(["--url", fleet["server"].url, "ps", "_all", "--name", "none"], out=out,
                environ={})
    assert caught.value.status == cli.EXIT_NOT_FOUND
    assert caught.value.message == ("no process matched on the 2 of 4 hosts targeted by "
                                    "'_all' that answered; 2 did not answer")
    assert out.getvalue().rstrip().endswith(
        "4 hosts: 2 answered (2 found nothing), 1 failed, 1 skipped")


def test_cli_fleet_ranking(fleet, gate):
    gate.set()
    out = io.StringIO()
    status = cli.run(["--url", fleet["server"].url, "ps", "_all", "--fleet", "--sort", "cpu",
                      "--limit", "3"], out=out, environ={})
    assert status == cli.EXIT_OK
    rows = [line.split()[:2] for line in out.getvalue().splitlines()[1:4]]
    assert rows == [["gated", "21"], ["fast", "11"], ["gated", "20"]]
    with pytest.raises(cli.CliError) as caught:
        cli.run(["--url", fleet["server"].url, "ps", "_all", "--fleet", "--sort", "cpu"],
                out=io.StringIO(), environ={})
    assert caught.value.status == cli.EXIT_USAGE
