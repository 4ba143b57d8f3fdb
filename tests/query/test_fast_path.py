"""The query service's fast-fail path stays cheap without losing what it reports: fast-fail
log lines summarised, metric children cached within a bound, request heads kept within one."""

from __future__ import annotations

import logging
import uuid

import falcon.testing
import pytest

from query import fanout as fanout_module
from query.app import FastFailLog, create_app, new_job_id
from query.config import parse
from query.discovery import Discovery, Exporter
from query.fanout import Fanout, Result, process_call
from query.metrics import MAX_CACHED_CHILDREN, Metrics

# A closed port on loopback: nothing is ever asked there, the circuit is opened by hand.
CONFIG = parse({"auth": {"enabled": False},
                "exporters": [{"hostname": "hung", "url": "http://127.0.0.1:9"}]})


@pytest.fixture
def open_circuit():
    discovery = Discovery.from_config(CONFIG)
    with Fanout.from_config(CONFIG) as fanout:
        fanout.guards.start_call("hung")
        fanout.guards.finish_call("hung", "timeout")  # as after a real timeout
        yield falcon.testing.TestClient(create_app(CONFIG, discovery=discovery, fanout=fanout))


def _lines(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "query.app" and r.getMessage() == message]


def test_fast_fail_answers_are_summarised_at_info(open_circuit, caplog) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(40):
        result = open_circuit.simulate_get("/node/hung/process/1")
        assert result.status_code == 500
        assert result.json["error"] == "exporter failed"
        assert result.json["details"].startswith("hung: circuit open after timeout at ")
        assert result.headers["X-Request-Id"]
    # One in full per second; 40 answers take far less on any machine that runs the suite.
    full = _lines(caplog, "request")
    assert 1 <= len(full) < 20
    assert full[0].fields["status"] == 500 and full[0].fields["failed"] == 1


def test_every_fast_fail_answer_is_logged_at_debug(open_circuit, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(10):
        open_circuit.simulate_get("/node/hung/process/1")
    assert len(_lines(caplog, "request")) == 10


def test_summary_counts_every_absorbed_answer_and_names_at_most_16(caplog) -> None:
    caplog.set_level(logging.INFO)
    log = FastFailLog(interval=3600.0)
    assert log.absorb(("first",)) is False  # the first of an interval is logged in full
    names = [f"e{n}" for n in range(20)]
    for name in names:
        assert log.absorb((name,)) is True
    assert log.absorb(("e0",)) is True
    assert not log.due()  # the interval has not ended
    log.flush()
    (summary,) = _lines(caplog, "requests failed fast")
    assert summary.fields["count"] == 21
    named = dict(part.split("=") for part in summary.fields["exporters"].split(","))
    assert len(named) == FastFailLog.MAX_NAMED + 1
    assert named["e0"] == "2" and named["others"] == str(20 - FastFailLog.MAX_NAMED)
    log.flush()  # nothing counted since: no line
    assert len(_lines(caplog, "requests failed fast")) == 1


def test_job_ids_are_uuid4() -> None:
    for _ in range(2000):
        text = new_job_id()
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)


def test_metric_children_cache_is_bounded_and_counts_stay_right() -> None:
    metrics = Metrics()
    total = MAX_CACHED_CHILDREN + 100
    for _ in range(2):
        metrics.exporter_results([Result(f"e{n}", "timeout", "x") for n in range(total)])
        metrics.exporter_results([Result("solo", "rejected", "x")])
    assert len(metrics._failures) == MAX_CACHED_CHILDREN
    text = metrics.exposition().decode()
    series = "procfleet_query_exporter_failures_total"
    assert f'{series}{{exporter="e{total - 1}",kind="timeout"}} 2.0' in text
    assert f'{series}{{exporter="e0",kind="timeout"}} 2.0' in text
    assert f'{series}{{exporter="solo",kind="rejected"}} 2.0' in text
    for _ in range(3):
        metrics.observe_request("/healthz", 200, 0.001)
    assert 'procfleet_query_request_duration_seconds_count{code="200",route="/healthz"} 3.0' \
        in metrics.exposition().decode()


def test_kept_request_heads_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(fanout_module, "MAX_KEPT_REQUESTS", 8)
    exporter = Exporter("web-01", "http://127.0.0.1:9/base/", token="t0k")
    with Fanout() as fanout:
        for pid in range(1, 30):
            origin, head = fanout._request(exporter, process_call(pid))
            assert head.startswith(f"GET /base/process/{pid} HTTP/1.1\r\n".encode())
            assert b"\r\nAuthorization: Bearer t0k\r\n" in head
            assert origin.port == 9
            assert len(fanout._requests) <= 8
        assert fanout._request(exporter, process_call(29))[1] is head  # kept, not rebuilt
