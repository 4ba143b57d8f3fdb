"""Fuzzing the query service's contract over HTTP: schemathesis cases and nasty inputs.

A real query service on 127.0.0.1, with API keys, in front of two real exporters (one open,
one behind a token). Every generated case is sent with a valid key and without one. Success
means no 5xx other than the documented "no exporter gave a valid answer" 500, and every
response matching the served OpenAPI document. Hypothesis runs derandomized (fixed seed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import strategies as st
from reliability_testing import TOKEN, assert_error_body, new_api_key, query_config, raw_request
from schemathesis import GenerationMode

from procfleet.testing import Server, reap, spawn_python, start_query
from procfleet.testing_fuzz import CASES, SCHEMA_CHECKS, fuzz_operation

AUTH_HEADERS = {"authorization", "x-api-key"}


@pytest.fixture(scope="module")
def api_key() -> tuple[str, str]:
    # process:execute: the fuzzed signals reach exporters with signals off (the default).
    return new_api_key("fuzz", "process:read", "node:read", "process:execute")


@pytest.fixture(scope="module")
def query(tmp_path_factory: pytest.TempPathFactory, exporter: Server, token_exporter: Server,
          api_key: tuple[str, str]) -> Iterator[Server]:
    config = query_config([("rel-open", exporter.url), ("rel-token", token_exporter.url)],
                          key_entries=[api_key[1]], exporter_token=TOKEN)
    server = start_query(tmp_path_factory.mktemp("query"), config)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def schema(query: Server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(query.url + "/openapi.json")


def _document() -> dict:
    from importlib import resources
    return json.loads(resources.files("query").joinpath("openapi.json").read_text())


def _runs() -> list[tuple[str, GenerationMode]]:
    """Positive cases for every operation; negative ones where there is a parameter to break."""
    runs = []
    for path, item in _document()["paths"].items():
        for method, operation in item.items():
            label = f"{method.upper()} {path}"
            runs.append((label, GenerationMode.POSITIVE))
            if operation.get("parameters"):
                runs.append((label, GenerationMode.NEGATIVE))
    return runs


def _protected(label: str) -> bool:
    doc = _document()
    method, path = label.split(" ", 1)
    security = doc["paths"][path][method.lower()].get("security", doc.get("security", []))
    return bool(security) and {} not in security


@pytest.mark.parametrize(("label", "mode"), _runs(),
                         ids=[f"{label}-{mode.value}" for label, mode in _runs()])
def test_schemathesis(schema: schemathesis.BaseSchema, query: Server, api_key: tuple[str, str],
                      label: str, mode: GenerationMode) -> None:
    """Generated requests, with and without a key: no 5xx but the documented one, every
    answer as documented. Operations without parameters have one possible request."""
    method, path = label.split(" ", 1)
    operation = schema[path][method]
    key_headers = ({"X-API-Key": api_key[0]}, {"Authorization": f"Bearer {api_key[0]}"})

    def authorize(case: schemathesis.Case, generated: dict[str, Any], with_key: bool,
                  sent: int) -> None:
        # schemathesis fills the security schemes' headers with generated (invalid) keys:
        # without a key those stay (any invalid key must be a 401); with one, they go.
        if with_key:
            case.headers = {k: v for k, v in generated.items()
                            if k.lower() not in AUTH_HEADERS}
            case.headers.update(key_headers[sent // 2 % 2])
        else:
            case.headers = generated

    strategy = operation.as_strategy(generation_mode=mode)
    if "{hostname}" in path and mode is GenerationMode.POSITIVE:
        # Random targets rarely name a configured exporter: a share of the cases goes to real
        # ones (unicast through the token, and broadcast) so fan-out answers get checked too.
        strategy = st.one_of(strategy, *(
            operation.as_strategy(generation_mode=mode, path_parameters={"hostname": target})
            for target in ("rel-token", "_all", "_any")))

    run = fuzz_operation(strategy, base_url=query.url, authorize=authorize,
                         protected=_protected(label), negative=mode is GenerationMode.NEGATIVE,
                         refused={401, 403}, timeout=15)
    print(f"\n{label} [{mode.value}]: {run.summary()}")
    assert not run.failures, (f"{len(run.failures)} bad responses, first ones:\n"
                              + "\n".join(run.failures[:5]))
    if _document()["paths"][path][method.lower()].get("parameters"):
        assert run.sent >= 2 * CASES
    assert query.healthy()


# -- hand-written nasty inputs ------------------------------------------------------------------

# (request target, allowed statuses): the rules of docs/api.md#targets and #pid.
NASTY = [
    (b"/node/rel-open%2Frel-token/process/1", {400, 404}),  # encoded slash in the target
    (b"/node/rel-open%00/process/1", {400}),  # NUL
    (b"/node/%00/process/1", {400}),
    (b"/node/rel%2Dopen/process/1", {200, 404}),  # an encoded '-' is just '-'
    (b"/node/" + b"a" * 5000 + b"/process/1", {400, 404}),  # overlong hostname
    (b"/node/_all/process/" + b"9" * 5000, {400}),  # overlong pid
    (b"/node/_all/process/2147483648", {400}),
    (b"/node/_all/process/0", {400}),
    (b"/node/_all/process/-1", {400}),
    (b"/node/_all/process/%2B7", {400}),
    (b"/node/_all/process/0x10", {400}),
    (b"/node/_all/process/1.5", {400}),
    (b"/node/_all/process/%D9%A1", {400}),  # ARABIC-INDIC DIGIT ONE
    (b"/node/_all/process/%EF%BC%91", {400}),  # FULLWIDTH DIGIT ONE
    (b"/node/_all/process/1%00", {400}),
    (b"/node/rel%E2%80%90open/process/1", {400}),  # U+2010 HYPHEN, looks like '-'
    (b"/node/r%D0%B5l-open/process/1", {400}),  # Cyrillic 'е' in place of 'e'
    (b"/node/%EF%BC%BFall/process/1", {400}),  # FULLWIDTH LOW LINE in place of '_'
    (b"/node/_ALL/process/1", {400}),
    (b"/node/_all_/process/1", {400}),
    (b"/node/_/process/1", {400}),
    (b"/node//process/1", {400, 404}),  # empty target
    (b"/node/_all/process/", {200, 400, 404}),  # empty pid: trailing slash, the list route
    (b"/node/_all//process/1", {400, 404}),
    (b"/node/group:/process/1", {400}),
    (b"/node/:web/process/1", {400}),
    (b"/node/group:web,,role:db/process/1", {400}),
    (b"/node/group:web,group:web/process/1", {200, 400, 404}),  # repeated selector
    (b"/node/group:web,group:db/process/1", {200, 400, 404}),
    (b"/node/group:web./process/1", {400}),
    (b"/node/group:.web/process/1", {400}),
    (b"/node/group:web..prod/process/1", {400}),
    (b"/node/gr%20oup:web/process/1", {400}),
    (b"/node/group%3Aweb/process/1", {400, 404}),  # encoded ':'
    (b"/node/_all%2C_any/process/1", {400}),
    (b"/node/_any/process/1;x", {400}),
    (b"/node/rel-open/process/1/extra", {400}),  # a pid with a slash
    (b"/node/rel-open/process?limit=1&limit=2", {400}),  # repeated filter
    (b"/node/rel-open/process?bogus=1", {400}),
    (b"/node/rel-open/process?limit=%EF%BC%91", {400}),
    (b"/node/rel-open/process?name=" + b"a" * 300, {400}),
    (b"/node?target=%00", {400}),
    # One query-parameter rule on every endpoint of both services (procfleet.params).
    (b"/node?target=_all&target=_any", {400}),
    (b"/node?target=_all&bogus=1", {400}),
    (b"/node/rel-open/process/1?pid=2", {400}),
    (b"/node/_all/process/1?name=x", {400}),
    (b"/sd?format=json", {400}),
]


@pytest.mark.parametrize(("target", "allowed"), NASTY, ids=[t.decode()[:40] for t, _ in NASTY])
def test_nasty_inputs(target: bytes, allowed: set[int], query: Server,
                      api_key: tuple[str, str]) -> None:
    pid = str(query.pid).encode()  # a live pid on this host, where both exporters run
    target = target.replace(b"/process/1", b"/process/" + pid, 1)
    status, head, body = raw_request(query.port, target, [(b"X-API-Key", api_key[0].encode())])
    assert status in allowed, (status, body[:300])
    if status >= 400:
        assert_error_body(status, head, body)
    else:
        assert "results" in json.loads(body) or "exporters" in json.loads(body)
    # Without a key the answer is 401, whatever is wrong with the request.
    status, head, body = raw_request(query.port, target)
    assert status == 401, (status, body[:300])
    assert_error_body(status, head, body)


KEY_HEADERS = [
    # (header lines, accepted?)
    ("both headers, same key", lambda k: [(b"Authorization", b"Bearer " + k), (b"X-API-Key", k)],
     True),
    ("both headers, different keys", lambda k: [(b"Authorization", b"Bearer " + k),
                                                (b"X-API-Key", k + b"x")], False),
    ("two Authorization", lambda k: [(b"Authorization", b"Bearer " + k),
                                     (b"Authorization", b"Bearer nope")], False),
    ("two Authorization, same key", lambda k: [(b"Authorization", b"Bearer " + k)] * 2, False),
    ("two X-API-Key", lambda k: [(b"X-API-Key", k), (b"X-API-Key", b"nope")], False),
    ("empty X-API-Key", lambda k: [(b"X-API-Key", b"")], False),
    ("key with NUL-free junk", lambda k: [(b"X-API-Key", k + b"\xff")], False),
    ("Bearer without key", lambda k: [(b"Authorization", b"Bearer")], False),
    ("Basic", lambda k: [(b"Authorization", b"Basic " + k)], False),
    ("overlong key", lambda k: [(b"X-API-Key", b"k" * 10000)], False),
]


@pytest.mark.parametrize(("what", "make", "accepted"), KEY_HEADERS,
                         ids=[w for w, _, _ in KEY_HEADERS])
def test_key_headers(what: str, make, accepted: bool, query: Server,
                     api_key: tuple[str, str]) -> None:
    key = api_key[0].encode()
    status, head, body = raw_request(query.port, b"/node", make(key))
    if accepted:
        assert status == 200, body[:300]
    else:
        assert status == 401, (status, body[:300])
        doc = assert_error_body(status, head, body)
        assert api_key[0] not in json.dumps(doc)


def test_lookup_through_both_exporters(query: Server, api_key: tuple[str, str],
                                       schema: schemathesis.BaseSchema) -> None:
    """A real child, found by both exporters (one via its token): valid against the document."""
    child = spawn_python("--password=hunter2")
    try:
        case = schema["/node/{hostname}/process/{pid}"]["GET"].Case(
            path_parameters={"hostname": "_all", "pid": child.pid})
        response = case.call(base_url=query.url, headers={"X-API-Key": api_key[0]}, timeout=10)
        case.validate_response(response, checks=SCHEMA_CHECKS)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["hostname"] for r in results] == ["rel-open", "rel-token"]
        assert all(r["status"] == "ok" and r["process"]["pid"] == child.pid for r in results)
    finally:
        reap(child)

