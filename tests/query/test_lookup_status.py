"""The table of docs/api.md#status-codes through create_app, against fake exporters on 127.0.0.1."""

from __future__ import annotations

import time
import uuid

import pytest
from query_testing import (
    EXPORTER_TIMEOUT,
    EXPORTER_TOKEN,
    KNOWN_PID,
    PROCESS,
    REQUEST_TIMEOUT,
    exporter_entries,
    make_config,
)

ROUTE = "/node/{hostname}/process/{pid}"
LIST_ROUTE = "/node/{hostname}/process"

# What each failing fake comes to, as the result's error text.
FAILURES = {
    "hang": f"timeout after {EXPORTER_TIMEOUT:.1f} s",
    "refused": "connection refused",
    "garbage": "exporter answered invalid JSON",
    "error": "exporter answered HTTP 500",
    "not_http": "exporter answered malformed HTTP",
    "big": "exporter answer exceeds 1048576 bytes",
    "redirect": "exporter answered HTTP 302 (redirects are not followed)",
    "wrong_pid": f"exporter answered for pid 7 instead of {KNOWN_PID}",
    "html_404": "exporter answered HTTP 404",
}


@pytest.fixture
def fleet_client(fake_exporters, make_client):
    """Every fake as an exporter named after its behaviour, plus one in maintenance."""
    entries = exporter_entries(fake_exporters, "ok", "slow", "unsupported", *FAILURES)
    entries += [{"hostname": "token", "url": fake_exporters.url("token"),
                 "token": EXPORTER_TOKEN},
                {"hostname": "resting", "url": fake_exporters.url("hang"), "maintenance": True},
                {"hostname": "ok-2", "url": fake_exporters.url("ok"),
                 "labels": {"group": "web.prod"}},
                {"hostname": "slow-2", "url": fake_exporters.url("slow"),
                 "labels": {"group": "web.dev"}},
                {"hostname": "webby", "url": fake_exporters.url("ok"),
                 "labels": {"group": "webby"}}]
    for entry in entries:
        if entry["hostname"] in FAILURES or entry["hostname"].replace("-", "_") in FAILURES:
            entry.setdefault("labels", {"kind": "failing"})
    return make_client(make_config(entries))


def _error(result, code: int, error: str) -> dict:
    assert result.status_code == code, result.json
    body = result.json
    assert set(body) == {"error", "details", "code"}
    assert body["code"] == code and body["error"] == error and body["details"]
    assert uuid.UUID(result.headers["X-Request-Id"]).version == 4
    return body


def test_unicast_found(fleet_client, check_doc) -> None:
    result = fleet_client.simulate_get(f"/node/ok/process/{KNOWN_PID}")
    assert result.status_code == 200
    body = result.json
    assert body == {"job_id": body["job_id"],
                    "results": [{"hostname": "ok", "status": "ok", "process": PROCESS}]}
    assert result.headers["X-Request-Id"] == body["job_id"]
    assert uuid.UUID(body["job_id"]).version == 4
    check_doc(ROUTE, result)


def test_job_id_is_fresh_per_request(fleet_client) -> None:
    first = fleet_client.simulate_get(f"/node/ok/process/{KNOWN_PID}").json["job_id"]
    second = fleet_client.simulate_get(f"/node/ok/process/{KNOWN_PID}").json["job_id"]
    assert first != second


def test_unicast_slow_but_in_time(fleet_client) -> None:
    result = fleet_client.simulate_get(f"/node/slow/process/{KNOWN_PID}")
    assert result.status_code == 200
    assert result.json["results"][0]["process"] == PROCESS


def test_unicast_with_exporter_token(fleet_client) -> None:
    result = fleet_client.simulate_get(f"/node/token/process/{KNOWN_PID}")
    assert result.status_code == 200, result.json


def test_unicast_not_found_is_404(fleet_client, check_doc) -> None:
    result = fleet_client.simulate_get("/node/ok/process/12345")
    body = _error(result, 404, "process not found")
    assert "ok" in body["details"] and "12345" in body["details"]
    check_doc(ROUTE, result)


@pytest.mark.parametrize("target", ["nosuchhost", "group:nosuch", "kind:failing,group:web"])
def test_target_matching_nothing_is_404(fleet_client, target: str, check_doc) -> None:
    result = fleet_client.simulate_get(f"/node/{target}/process/{KNOWN_PID}")
    body = _error(result, 404, "target not found")
    assert target in body["details"]
    check_doc(ROUTE, result)


@pytest.mark.parametrize("behaviour", sorted(FAILURES))
def test_unicast_failure_is_500_naming_exporter_and_why(fleet_client, behaviour: str,
                                                       check_doc) -> None:
    hostname = behaviour.replace("_", "-")
    result = fleet_client.simulate_get(f"/node/{hostname}/process/{KNOWN_PID}")
    body = _error(result, 500, "exporter failed")
    assert body["details"].startswith(f"{hostname}: {FAILURES[behaviour]}"), body["details"]
    check_doc(ROUTE, result)


@pytest.mark.parametrize("hostname, error", [
    ("resting", "exporter is in maintenance"),
    ("unsupported", "process lookup is unsupported on the exporter's platform"),
])
def test_unicast_skipped_is_200_with_the_reason(fleet_client, hostname, error, check_doc) -> None:
    result = fleet_client.simulate_get(f"/node/{hostname}/process/{KNOWN_PID}")
    assert result.status_code == 200
    assert result.json["results"] == [{"hostname": hostname, "status": "skipped", "error": error}]
    check_doc(ROUTE, result)


@pytest.mark.parametrize("path, complaint", [
    ("/node/ok/process/0", "pid must be between 1 and 2147483647"),
    ("/node/ok/process/-1", "pid must be decimal digits"),
    ("/node/ok/process/abc", "pid must be decimal digits"),
    ("/node/ok/process/1.5", "pid must be decimal digits"),
    ("/node/ok/process/0x10", "pid must be decimal digits"),
    ("/node/ok/process/+7", "pid must be decimal digits"),
    ("/node/ok/process/2147483648", "pid must be between 1 and 2147483647"),
    ("/node/ok/process/99999999999999999999", "pid must be between 1 and 2147483647"),
    ("/node/web%2F01/process/1", "a target may not contain '/'"),
    ("/node/ok/process/1%2F2", "pid must be decimal digits, without '/'"),
    ("/node/_bogus/process/1", "reserved"),
    ("/node/web*/process/1", "not a hostname"),
    ("/node/group:/process/1", "invalid value"),
    ("/node/group:web,/process/1", "selector 2 is empty"),
])
def test_bad_pid_or_target_is_400(fleet_client, path: str, complaint: str, check_doc) -> None:
    result = fleet_client.simulate_get(path)
    body = _error(result, 400, "invalid pid" if "pid" in complaint else "invalid target")
    assert complaint in body["details"]
    check_doc(ROUTE, result)


def test_broadcast_partial_results_name_each_failure(fleet_client, check_doc) -> None:
    result = fleet_client.simulate_get(f"/node/_all/process/{KNOWN_PID}")
    assert result.status_code == 200
    check_doc(ROUTE, result)
    by_host = {r["hostname"]: r for r in result.json["results"]}
    hostnames = [r["hostname"] for r in result.json["results"]]
    assert hostnames == sorted(hostnames)
    for behaviour, error in FAILURES.items():
        assert by_host[behaviour.replace("_", "-")] == {
            "hostname": behaviour.replace("_", "-"), "status": "failed", "error": error}
    for ok in ("ok", "slow", "token", "ok-2", "slow-2", "webby"):
        assert by_host[ok] == {"hostname": ok, "status": "ok", "process": PROCESS}
    assert by_host["resting"] == {"hostname": "resting", "status": "skipped",
                                  "error": "exporter is in maintenance"}
    assert by_host["unsupported"]["status"] == "skipped"
    for item in result.json["results"]:  # never null, never both
        assert None not in item.values()
        assert ("process" in item) != ("error" in item)


def test_broadcast_not_found_everywhere_is_still_200(fleet_client) -> None:
    result = fleet_client.simulate_get("/node/group:web/process/12345")
    assert result.status_code == 200
    assert result.json["results"] == [
        {"hostname": "ok-2", "status": "failed", "error": "process not found"},
        {"hostname": "slow-2", "status": "failed", "error": "process not found"},
    ]


def test_selector_matches_whole_segments(fleet_client) -> None:
    result = fleet_client.simulate_get(f"/node/group:web/process/{KNOWN_PID}")
    assert [r["hostname"] for r in result.json["results"]] == ["ok-2", "slow-2"]


def test_broadcast_where_nobody_answers_is_500_naming_each(fleet_client, check_doc) -> None:
    started = time.monotonic()
    result = fleet_client.simulate_get(f"/node/kind:failing/process/{KNOWN_PID}")
    elapsed = time.monotonic() - started
    body = _error(result, 500, "no exporter answered")
    check_doc(ROUTE, result)
    for behaviour, error in FAILURES.items():
        assert f"{behaviour.replace('_', '-')}: {error}" in body["details"]
    assert elapsed < REQUEST_TIMEOUT + 1.0


def test_any_skips_unreachable_exporters(fake_exporters, make_client) -> None:
    entries = exporter_entries(fake_exporters, "refused", "error", "ok", "garbage")
    client = make_client(make_config(entries))
    for _ in range(5):  # the order is random; whichever comes first, ok answers
        result = client.simulate_get(f"/node/_any/process/{KNOWN_PID}")
        assert result.status_code == 200, result.json
        assert result.json["results"] == [{"hostname": "ok", "status": "ok",
                                           "process": PROCESS}]
    # After that the failing ones are known to be down, so ok is tried first.
    nodes = {n["hostname"]: n["health"] for n in client.simulate_get("/node").json["exporters"]}
    assert nodes["ok"]["status"] == "up"


def test_any_not_found_is_404(fake_exporters, make_client) -> None:
    client = make_client(make_config(exporter_entries(fake_exporters, "refused", "ok")))
    result = client.simulate_get("/node/_any/process/12345")
    _error(result, 404, "process not found")


def test_any_when_none_can_be_reached_is_500(fake_exporters, make_client) -> None:
    client = make_client(make_config(exporter_entries(fake_exporters, "refused", "error")))
    body = _error(client.simulate_get(f"/node/_any/process/{KNOWN_PID}"), 500, "exporter failed")
    assert "refused: connection refused" in body["details"]
    assert "error: exporter answered HTTP 500" in body["details"]


def test_all_in_maintenance(fake_exporters, make_client) -> None:
    entries = exporter_entries(fake_exporters, "ok", "slow", maintenance=True)
    client = make_client(make_config(entries))
    skipped = [{"hostname": h, "status": "skipped", "error": "exporter is in maintenance"}
               for h in ("ok", "slow")]
    for target in ("_all", "_any"):
        result = client.simulate_get(f"/node/{target}/process/{KNOWN_PID}")
        assert result.status_code == 200
        assert result.json["results"] == skipped


def test_deadline_holds_against_hanging_exporters(fake_exporters, make_client) -> None:
    """Per-exporter timeout above the deadline: the deadline decides, and the answer is on time."""
    deadline = 0.5
    entries = exporter_entries(fake_exporters, "hang", "ok")
    entries.append({"hostname": "hang-2", "url": fake_exporters.url("hang")})
    client = make_client(make_config(entries, timeouts={"exporter": deadline,
                                                        "request": deadline}))
    started = time.monotonic()
    result = client.simulate_get(f"/node/_all/process/{KNOWN_PID}")
    elapsed = time.monotonic() - started
    assert result.status_code == 200
    assert elapsed < deadline + 0.5
    by_host = {r["hostname"]: r for r in result.json["results"]}
    assert by_host["ok"]["status"] == "ok"
    assert by_host["hang"]["error"].startswith("timeout after 0.5 s")


def test_request_deadline_cuts_exporters_still_queued(fake_exporters, make_client) -> None:
    """With one call in flight at a time, exporters queued past the deadline time out too."""
    entries = [{"hostname": f"hang-{i}", "url": fake_exporters.url("hang")} for i in range(4)]
    config = make_config(entries, timeouts={"exporter": 0.3, "request": 0.5},
                         fanout={"max_in_flight": 1})
    client = make_client(config)
    started = time.monotonic()
    result = client.simulate_get(f"/node/_all/process/{KNOWN_PID}")
    elapsed = time.monotonic() - started
    body = _error(result, 500, "no exporter answered")
    assert elapsed < 0.5 + 0.5
    assert "hang-0: timeout after 0.3 s" in body["details"]
    assert "hang-3: timeout after 0.5 s (request deadline)" in body["details"]


def test_list_across_the_fleet(fleet_client, check_doc) -> None:
    result = fleet_client.simulate_get("/node/group:web/process",
                                       params={"name": "ngi*", "sort": "cpu", "limit": "5"})
    assert result.status_code == 200, result.json
    check_doc(LIST_ROUTE, result)
    for item in result.json["results"]:
        assert item["status"] == "ok"
        assert item["processes"][0]["name"] == "limit=5,name=ngi*,sort=cpu"
        assert item["processes"][1] == dict(PROCESS, pid=1, name="init")


def test_list_partial_and_failed(fleet_client, check_doc) -> None:
    result = fleet_client.simulate_get("/node/_all/process")
    assert result.status_code == 200
    check_doc(LIST_ROUTE, result)
    by_host = {r["hostname"]: r for r in result.json["results"]}
    assert by_host["error"]["error"] == "exporter answered HTTP 500"
    assert by_host["ok"]["processes"][0]["name"] == "all"
    failing = fleet_client.simulate_get("/node/error/process")
    _error(failing, 500, "exporter failed")
    check_doc(LIST_ROUTE, failing)


@pytest.mark.parametrize("query, complaint", [
    ("sort=name", "sort must be one of cpu, mem, rss, start"),
    ("limit=0", "limit must be an integer from 1"),
    ("limit=ten", "limit must be an integer from 1"),
    ("color=red", "unknown parameter 'color'"),
    ("name=a&name=b", "name is given more than once"),
    ("user=", "user must be 1 to 256 characters"),
])
def test_list_filters_are_checked(fleet_client, query: str, complaint: str, check_doc) -> None:
    result = fleet_client.simulate_get("/node/ok/process", query_string=query)
    body = _error(result, 400, "invalid query parameter")
    assert complaint in body["details"]
    check_doc(LIST_ROUTE, result)


def test_unknown_path_is_json_404(fleet_client) -> None:
    _error(fleet_client.simulate_get("/nothing/here"), 404, "not found")
    _error(fleet_client.simulate_post(f"/node/ok/process/{KNOWN_PID}"), 405,
           "method not allowed")


def test_concurrent_requests_each_get_their_own_answer(fake_exporters, make_client) -> None:
    """Many request threads share the one loop; answers must not cross between them."""
    from concurrent.futures import ThreadPoolExecutor

    entries = exporter_entries(fake_exporters, "ok", "slow", "refused", "error")
    # All 16 threads may wait on the slow exporter here (by default a quarter of the threads
    # may: the bulkhead has its own tests); the answers' routing is what this test is about.
    client = make_client(make_config(entries, fanout={"max_waiting_per_exporter": 16}))
    cases = [("ok", KNOWN_PID, 200), ("slow", KNOWN_PID, 200), ("ok", 12345, 404),
             ("refused", KNOWN_PID, 500), ("error", KNOWN_PID, 500), ("_all", KNOWN_PID, 200)]

    def ask(case):
        target, pid, _ = case
        result = client.simulate_get(f"/node/{target}/process/{pid}")
        return result.status_code, result.json, result.headers["X-Request-Id"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(ask, cases * 8))
    for (target, _, code), (status, body, request_id) in zip(cases * 8, answers, strict=True):
        assert status == code, (target, body)
        if status == 200:
            assert body["job_id"] == request_id
            hosts = [r["hostname"] for r in body["results"]]
            assert hosts == (["error", "ok", "refused", "slow"] if target == "_all" else [target])
    assert len({a[2] for a in answers}) == len(answers)
