"""POST /node/{target}/process/{pid}/signal: the query service over real exporters.

Three real `procfleet-exporter` servers on this host: web-01 and web-03 may signal, web-02
has signals disabled. They see the same processes (one host), which the rollout tests use:
a HUP-counting child shows how many exporters actually sent.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import psutil
import pytest

from procfleet.signals import SignalRequestError
from procfleet.testing import Server, free_port, hups, wait_until
from procfleet.timefmt import rfc3339
from query.config import parse
from query.signal import SignalRequest, parse_body

EXPORTER_TOKEN = "signal-exporter-token"
KEYS = {"ops": "pfq_ops-key", "reader": "pfq_reader-key"}
PERMISSIONS = {"ops": ["process:read", "process:execute", "node:read"],
               "reader": ["process:read"]}
OPS = {"Authorization": f"Bearer {KEYS['ops']}"}



@pytest.fixture(scope="module")
def exporters(tmp_path_factory) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("exporters")
    digest = hashlib.sha256(EXPORTER_TOKEN.encode()).hexdigest()
    exe = str(Path(sys.executable).with_name("procfleet-exporter"))
    servers: dict[str, Server] = {}
    try:
        for name, enabled in (("web-01", True), ("web-02", False), ("web-03", True)):
            config = tmp / f"{name}.yml"
            config.write_text(f"hostname: {name}\nauth: {{token_sha256: {digest}}}\n"
                              f"actions: {{signal: {{enabled: {str(enabled).lower()}, "
                              "allow_root: true}}\n")
            port = free_port()
            server = Server([exe, "--listen", f"127.0.0.1:{port}", "--config", str(config)],
                            port, tmp / f"{name}.log")
            servers[name] = server
            # Ready before the next free_port(): an unbound port may be handed out twice.
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def query_config(exporters: dict[str, Server], *, token: bool = True, **extra: Any):
    entries = [{"hostname": name, "url": server.url, "labels": {"group": "web"},
                **({"token": EXPORTER_TOKEN} if token else {})}
               for name, server in exporters.items()]
    entries.append({"hostname": "gone-01", "url": f"http://127.0.0.1:{free_port()}",
                    "labels": {"group": "gone"}})
    keys = [{"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(),
             "permissions": PERMISSIONS[name]} for name, key in KEYS.items()]
    return parse({"auth": {"enabled": True, "api_keys": keys},
                  "timeouts": {"exporter": 5.0, "request": 10.0},
                  "exporters": entries, **extra})


@pytest.fixture
def query(exporters, make_client) -> falcon.testing.TestClient:
    return make_client(query_config(exporters))


def started(pid: int) -> str:
    return rfc3339(psutil.Process(pid).create_time())


def post(query, path: str, body: Any, headers: dict[str, str] | None = None):
    return query.simulate_post(path, json=body, headers=OPS if headers is None else headers)


# -- the action reaches real processes -----------------------------------------------------------

def test_term_ends_a_child_on_one_host(query, children):
    child = children.spawn()
    answer = post(query, f"/node/web-01/process/{child.pid}/signal",
                  {"signal": "TERM", "start_time": started(child.pid)})
    assert answer.status_code == 200, answer.text
    assert answer.json["job_id"] == answer.headers["X-Request-Id"]
    assert answer.json["results"] == [{"hostname": "web-01", "status": "ok", "pid": child.pid,
                                       "signal": "TERM", "changed": True}]
    assert child.wait(timeout=10) == -signal.SIGTERM


def test_hup_reaches_the_handler(query, children, tmp_path):
    child, out = children.spawn_hup_counter(tmp_path)
    answer = post(query, f"/node/web-03/process/{child.pid}/signal", {"signal": "HUP"})
    assert answer.json["results"][0]["changed"] is True
    wait_until(lambda: hups(out) == 1, what="one HUP")
    assert child.poll() is None


def test_a_reused_pid_is_refused(query, children):
    child = children.spawn()
    earlier = rfc3339(psutil.Process(child.pid).create_time() - 600)
    answer = post(query, f"/node/web-01/process/{child.pid}/signal",
                  {"signal": "KILL", "start_time": earlier})
    assert answer.status_code == 200
    [result] = answer.json["results"]
    assert result["status"] == "failed" and result["changed"] is False
    assert "another process" in result["error"]
    assert child.poll() is None


def test_a_disabled_exporter_refuses(query, children):
    child = children.spawn()
    answer = post(query, f"/node/web-02/process/{child.pid}/signal", {"signal": "TERM"})
    [result] = answer.json["results"]
    assert result["status"] == "failed" and "disabled" in result["error"]
    assert child.poll() is None


def test_a_dry_run_changes_nothing(query, children, tmp_path):
    child, out = children.spawn_hup_counter(tmp_path)
    answer = post(query, f"/node/group:web/process/{child.pid}/signal",
                  {"signal": "HUP", "dry_run": True, "start_time": started(child.pid)})
    assert answer.status_code == 200
    by_host = {r["hostname"]: r for r in answer.json["results"]}
    assert by_host["web-01"]["status"] == "ok" and by_host["web-01"]["changed"] is False
    assert by_host["web-01"]["process"]["pid"] == child.pid
    assert by_host["web-02"]["status"] == "failed"  # what the real run would meet
    assert by_host["web-03"]["status"] == "ok"  # a dry run asks every host, no rollout
    # A real HUP to one host now counts one: the dry run sent nothing.
    post(query, f"/node/web-01/process/{child.pid}/signal", {"signal": "HUP"})
    wait_until(lambda: hups(out) == 1, what="one HUP")
    assert hups(out) == 1


@pytest.mark.parametrize("batch", [1, "34%"])
def test_a_rollout_stops_at_the_first_failing_batch(query, children, tmp_path, batch):
    child, out = children.spawn_hup_counter(tmp_path)
    name = psutil.Process(child.pid).name()
    answer = post(query, f"/node/group:web/process/{child.pid}/signal",
                  {"signal": "HUP", "match": {"name": name}, "batch": batch})
    assert answer.status_code == 200, answer.text
    results = answer.json["results"]
    assert [(r["hostname"], r["status"], r["changed"]) for r in results] == [
        ("web-01", "ok", True), ("web-02", "failed", False), ("web-03", "skipped", False)]
    assert results[2]["error"] == "not reached: rollout stopped after a failure on web-02"
    wait_until(lambda: hups(out) == 1, what="web-01's HUP")
    assert hups(out) == 1


def test_a_broadcast_without_batch_asks_everyone(query, children, tmp_path):
    child, out = children.spawn_hup_counter(tmp_path)
    answer = post(query, f"/node/group:web/process/{child.pid}/signal",
                  {"signal": "HUP", "start_time": started(child.pid)})
    outcomes = [(r["status"], r["changed"]) for r in answer.json["results"]]
    assert outcomes == [("ok", True), ("failed", False), ("ok", True)]
    # Two HUPs sent at once may merge into one pending signal: at least one arrives.
    wait_until(lambda: hups(out) >= 1, what="the HUPs")


def test_a_broadcast_match_skips_hosts_where_the_pid_is_another_process(query, children):
    child = children.spawn()
    answer = post(query, f"/node/group:web/process/{child.pid}/signal",
                  {"signal": "TERM", "match": {"name": "not-this-one"}})
    statuses = [(r["hostname"], r["status"]) for r in answer.json["results"]]
    assert statuses == [("web-01", "skipped"), ("web-02", "failed"), ("web-03", "skipped")]
    assert child.poll() is None


# -- guard rails of the query service ------------------------------------------------------------

def test_a_key_without_process_execute_gets_403(query, children):
    child = children.spawn()
    reader = {"Authorization": f"Bearer {KEYS['reader']}"}
    answer = post(query, f"/node/web-01/process/{child.pid}/signal", {"signal": "KILL"},
                  headers=reader)
    assert answer.status_code == 403
    assert "process:execute" in answer.json["details"]
    assert post(query, f"/node/web-01/process/{child.pid}/signal", {"signal": "KILL"},
                headers={}).status_code == 401
    assert child.poll() is None


def test_get_is_405(query, children):
    child = children.spawn()
    assert query.simulate_get(f"/node/web-01/process/{child.pid}/signal",
                              headers=OPS).status_code == 405


def test_broadcast_needs_start_time_or_match_and_any_is_refused(query, children):
    child = children.spawn()
    answer = post(query, f"/node/_all/process/{child.pid}/signal", {"signal": "TERM"})
    assert answer.status_code == 400 and "start_time or match" in answer.json["details"]
    answer = post(query, f"/node/_any/process/{child.pid}/signal",
                  {"signal": "TERM", "start_time": started(child.pid)})
    assert answer.status_code == 400 and "_any" in answer.json["details"]
    assert child.poll() is None


def test_max_hosts_refuses_a_larger_target(query, children):
    child = children.spawn()
    answer = post(query, f"/node/group:web/process/{child.pid}/signal",
                  {"signal": "TERM", "start_time": started(child.pid), "max_hosts": 2})
    assert answer.status_code == 400
    assert "resolves to 3 exporters, more than max_hosts 2" in answer.json["details"]
    assert child.poll() is None


def test_status_codes_as_for_the_lookup(query, children):
    child = children.spawn()
    child.kill()
    child.wait(timeout=10)
    gone = post(query, f"/node/web-01/process/{child.pid}/signal", {"signal": "TERM"})
    assert gone.status_code == 404 and gone.json["error"] == "process not found"
    unknown = post(query, "/node/nope-01/process/123/signal", {"signal": "TERM"})
    assert unknown.status_code == 404 and unknown.json["error"] == "target not found"
    down = post(query, "/node/gone-01/process/123/signal", {"signal": "TERM"})
    assert down.status_code == 500 and "gone-01" in down.json["details"]
    assert post(query, "/node/web-01/process/0/signal", {"signal": "TERM"}).status_code == 400


def test_without_the_exporter_token_the_exporter_refuses(exporters, make_client, children):
    query = make_client(query_config(exporters, token=False))
    child = children.spawn()
    answer = post(query, f"/node/web-01/process/{child.pid}/signal", {"signal": "TERM"})
    assert answer.status_code == 500
    assert "HTTP 401" in answer.json["details"]
    assert child.poll() is None


@pytest.mark.parametrize(("body", "says"), [
    (b"", "JSON object"),
    (b"{", "not valid JSON"),
    (b'{"signal": "STOP"}', "signal must be one of"),
    (b"{}", "signal is required"),
    (b'{"signal": "TERM", "force": 1}', "unknown key 'force'"),
    (b'{"signal": "TERM", "batch": "0%"}', "batch"),
    (b'{"signal": "TERM", "batch": true}', "batch"),
    (b'{"signal": "TERM", "max_hosts": 0}', "max_hosts"),
    (b'{"signal": "TERM", "start_time": 5}', "start_time"),
])
def test_bad_bodies_are_400(query, body, says):
    answer = query.simulate_post("/node/web-01/process/123/signal", body=body, headers=OPS)
    assert answer.status_code == 400
    assert says in answer.json["details"]


def test_a_body_past_the_bound_is_413(query):
    body = b'{"signal": "TERM", "x": "' + b"a" * 5000 + b'"}'
    answer = query.simulate_post("/node/web-01/process/123/signal", body=body, headers=OPS)
    assert answer.status_code == 413


def test_batch_sizes():
    assert SignalRequest("TERM", batch="10%").batch_size(40) == 4
    assert SignalRequest("TERM", batch="10%").batch_size(3) == 1
    assert SignalRequest("TERM", batch=5).batch_size(3) == 5
    assert SignalRequest("TERM").batch_size(7) == 7
    assert parse_body(b'{"signal": "INT", "batch": "050%"}').batch == "50%"
    with pytest.raises(SignalRequestError):
        parse_body(b'{"signal": "INT", "batch": "101%"}')


# -- audit ------------------------------------------------------------------------------------

def test_every_request_is_audited_and_counted(query, children, caplog):
    child = children.spawn()
    caplog.set_level(logging.INFO, logger="query.signal.audit")
    post(query, f"/node/web-01/process/{child.pid}/signal",
         {"signal": "TERM", "dry_run": True})
    post(query, f"/node/web-01/process/{child.pid}/signal", {"signal": "KILL"},
         headers={"Authorization": f"Bearer {KEYS['reader']}"})
    post(query, f"/node/web-01/process/{child.pid}/signal",
         {"signal": "TERM", "start_time": started(child.pid)})
    child.wait(timeout=10)
    lines = [r.fields for r in caplog.records if r.name == "query.signal.audit"]
    assert [f["outcome"] for f in lines] == ["dry_run", "rejected", "signalled"]
    assert lines[0]["key"] == "ops" and lines[1]["key"] == "reader"
    assert lines[2]["signal"] == "TERM" and lines[2]["start_time"].endswith("Z")
    assert lines[0]["start_time"] == "-" and lines[1]["signal"] == "-"
    for fields in lines:
        assert {"job_id", "key", "target", "pid", "start_time", "signal", "outcome"} <= set(
            fields)
        assert fields["target"] == "web-01" and fields["pid"] == str(child.pid)
    exposition = query.simulate_get("/metrics", headers=OPS).text
    for outcome in ("dry_run", "rejected", "signalled"):
        assert f'procfleet_query_signals_total{{outcome="{outcome}"}} 1.0' in exposition


def test_the_client_posts_a_bounded_body_only():
    from query.httpclient import MAX_REQUEST_BODY, Origin, request_bytes
    origin = Origin.parse("http://127.0.0.1:9")
    head = request_bytes(origin, "/process/1/signal", {}, method="POST", body=b'{"a":1}')
    assert head.startswith(b"POST /process/1/signal HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 7\r\n" in head and head.endswith(b'\r\n\r\n{"a":1}')
    with pytest.raises(ValueError):
        request_bytes(origin, "/", {}, method="POST", body=b"x" * (MAX_REQUEST_BODY + 1))
    with pytest.raises(ValueError):
        request_bytes(origin, "/", {}, method="DELETE")
    with pytest.raises(ValueError):
        request_bytes(origin, "/", {}, body=b"x")  # a GET has no body
