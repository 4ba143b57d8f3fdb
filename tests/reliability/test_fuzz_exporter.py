"""Fuzzing the exporter's contract over HTTP: schemathesis cases and a table of nasty inputs.

Every case goes to a real exporter on 127.0.0.1, started with a token, and is sent twice: with
the token and without it. Success means no 5xx and every response (200s and errors alike)
matching the served OpenAPI document (`exporter/openapi.json`). Hypothesis runs derandomized
(a fixed seed) and without its example database, so CI sees the same cases every run.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import requests
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from reliability_testing import TOKEN, assert_error_body, raw_request
from schemathesis import GenerationMode

from procfleet.testing import Server, spawn_python
from procfleet.testing_fuzz import CASES, FUZZ_SETTINGS, SCHEMA_CHECKS, fuzz_operation

BEARER = {"Authorization": f"Bearer {TOKEN}"}
OPEN_PATHS = {"/", "/healthz"}
PARAM_ERROR = "invalid query parameter"


@pytest.fixture(scope="module")
def schema(token_exporter: Server) -> schemathesis.BaseSchema:
    """The OpenAPI document as the exporter serves it (it needs the token like any path)."""
    return schemathesis.openapi.from_url(token_exporter.url + "/openapi.json", headers=BEARER)


def test_served_document_is_the_shipped_file(token_exporter: Server) -> None:
    served = requests.get(token_exporter.url + "/openapi.json", headers=BEARER, timeout=5)
    assert served.status_code == 200
    shipped = resources.files("exporter").joinpath("openapi.json").read_bytes()
    assert served.json() == json.loads(shipped)
    assert served.json()["paths"].keys() == {"/", "/healthz", "/metrics", "/process",
                                              "/process/{pid}", "/process/{pid}/signal",
                                              "/openapi.json"}


def _operations() -> list[str]:
    doc = json.loads(Path(str(resources.files("exporter").joinpath("openapi.json"))).read_text())
    return [f"{method.upper()} {path}" for path, item in doc["paths"].items() for method in item]


def _has_parameters(label: str) -> bool:
    # The signal action (against an exporter with signals off, the default) gets positive
    # cases only: its token is required, not optional, so negative cases break the token
    # itself, and this test's check that the right token is never refused would misfire.
    return label in ("GET /process", "GET /process/{pid}")


def _runs() -> list[tuple[str, GenerationMode]]:
    """Positive cases for every operation; negative ones where there is a parameter to break."""
    runs = []
    for label in _operations():
        runs.append((label, GenerationMode.POSITIVE))
        if _has_parameters(label):
            runs.append((label, GenerationMode.NEGATIVE))
    return runs


def _token_when_asked(case: schemathesis.Case, generated: dict[str, Any], with_token: bool,
                      sent: int) -> dict[str, str] | None:
    return BEARER if with_token else None


@pytest.mark.parametrize(("label", "mode"), _runs(),
                         ids=[f"{label}-{mode.value}" for label, mode in _runs()])
def test_schemathesis(schema: schemathesis.BaseSchema, token_exporter: Server, label: str,
                      mode: GenerationMode) -> None:
    """Generated requests, with and without the token: no 5xx, every answer as documented.

    Operations without parameters have one possible request; the free-form test below sends
    them 500 varied ones.
    """
    method, path = label.split(" ", 1)
    run = fuzz_operation(schema[path][method].as_strategy(generation_mode=mode),
                         base_url=token_exporter.url, authorize=_token_when_asked,
                         protected=path not in OPEN_PATHS,
                         negative=mode is GenerationMode.NEGATIVE, refused={401}, timeout=10)
    print(f"\n{label} [{mode.value}]: {run.summary()}")
    assert not run.failures, (f"{len(run.failures)} bad responses, first ones:\n"
                              + "\n".join(run.failures[:5]))
    if _has_parameters(label):
        assert run.sent >= 2 * CASES
    assert token_exporter.healthy()


# -- raw requests: bytes on the wire, nothing normalised by a client library ---------------


BAD_PIDS = [
    b"0", b"-1", b"+7", b"0x10", b"1.5", b"1e3", b"abc", b"2147483648", b"99999999999",
    b"9" * 300, b"1" * 5000,
    b"%00", b"1%00", b"%001", b"1%002",  # NULs
    b"%20%31", b"1%20", b"%091", b"1%0a",  # whitespace around digits
    b"%D9%A1",  # ARABIC-INDIC DIGIT ONE
    b"%EF%BC%91",  # FULLWIDTH DIGIT ONE
    b"%C2%B9",  # SUPERSCRIPT ONE
    b"%E2%91%A0",  # CIRCLED DIGIT ONE
    b"l", b"O", b"I",  # letters that look like digits
    b"1;x=1", b"1,2", b"%2B7", b"%2D1", b"1%2E5",
]


@pytest.mark.parametrize("pid", BAD_PIDS, ids=lambda p: p.decode()[:24])
@pytest.mark.parametrize("auth", ["open", "token"])
def test_bad_pids_are_400(pid: bytes, auth: str, exporter: Server,
                          token_exporter: Server) -> None:
    server = exporter if auth == "open" else token_exporter
    headers = [(b"Authorization", f"Bearer {TOKEN}".encode())] if auth == "token" else []
    status, head, body = raw_request(server.port, b"/process/" + pid, headers)
    assert status == 400, body
    assert assert_error_body(status, head, body)["error"] == "invalid pid"


# Paths that are not a process lookup at all, or only look like one: a 4xx with the error
# body, or (where the path normalises to a real one) the real answer. Never a 5xx.
ODD_PATHS = [
    (b"/process/1%2F2", {400}),  # percent-encoded slash: decoded to /process/1/2, a bad pid
    (b"/process/%2F", {400, 404}),
    (b"/process/1/2", {400}),
    (b"/process//1", {400}),
    (b"/process/1/", {200}),  # trailing slash is stripped
    (b"/process//", {200, 400, 404}),  # an empty pid segment
    (b"//process/1", {200, 404}),
    (b"/process/%2e%2e/healthz", {400}),
    (b"/process/../metrics", {200, 400}),
    (b"/%00", {404}),
    (b"/healthz%00", {404}),
    (b"/metrics%2F", {200, 404}),  # decodes to /metrics/, the trailing slash is stripped
    (b"/process%00", {404}),
    (b"/proc%65ss/1", {200}),  # an encoded letter decodes to the real path
    (b"/PROCESS/1", {404}),
    (b"/process/1?pid=2", {400}),  # the lookup takes no query parameter
    (b"/process/" + b"%FF" * 10, {400}),  # not UTF-8
    (b"/" + b"a" * 8000, {404}),
]


@pytest.mark.parametrize(("target", "allowed"), ODD_PATHS,
                         ids=[t.decode()[:32] for t, _ in ODD_PATHS])
def test_odd_paths(target: bytes, allowed: set[int], exporter: Server,
                   token_exporter: Server) -> None:
    own_pid = str(exporter.pid).encode()
    target = target.replace(b"/1", b"/" + own_pid, 1) if b"/1" in target else target
    status, head, body = raw_request(exporter.port, target)
    assert status in allowed, (status, body[:200])
    if status >= 400:
        assert_error_body(status, head, body)
    # The same path without the token on the protected exporter: never answered with data.
    status, head, body = raw_request(token_exporter.port, target)
    assert status in {401, 400} | ({404} & allowed), (status, body[:200])
    assert_error_body(status, head, body)


# Unknown and repeated parameters are refused, as by the query service (procfleet.params).
QUERIES = [
    ("sort=cpu&sort=mem", {400}),
    ("limit=1&limit=2", {400}),
    ("limit=1&limit=x", {400}),
    ("name=a&name=b", {400}),
    ("sort=CPU", {400}),
    ("sort=", {400}),  # blank is a value, and not a sort key
    ("sort=cpu%00", {400}),
    ("limit=0", {400}),
    ("limit=-1", {400}),
    ("limit=100001", {400}),
    ("limit=1e3", {400}),
    ("limit=%EF%BC%91", {400}),  # fullwidth 1
    ("limit=%D9%A1", {400}),  # arabic-indic 1
    ("limit=" + "9" * 400, {400}),
    ("limit=" + "9" * 5000, {400}),  # past int()'s 4,300 digits: once a 500
    ("limit=%201", {400}),
    ("name=" + "a" * 257, {400}),
    ("name=%00", {200}),
    ("name=[", {200}),  # unclosed glob bracket: a literal
    ("name=" + "*" * 256, {200}),
    ("name=%FF%FE", {200, 400}),
    ("user=%00", {200}),
    ("user=" + "x" * 257, {400}),
    ("unknown=1", {400}),
    ("foo=bar&name=x", {400}),
    ("&&&=&=", {400}),  # parameters named ''
    ("%00=%00", {400}),
    ("limit", {400}),  # blank: not an integer
    ("&&", {200}),  # no parameter at all
]


@pytest.mark.parametrize(("query", "allowed"), QUERIES, ids=[q[:32] for q, _ in QUERIES])
def test_list_queries(query: str, allowed: set[int], exporter: Server) -> None:
    status, head, body = raw_request(exporter.port, b"/process?" + query.encode())
    assert status in allowed, (status, body[:200])
    if status == 400:
        doc = assert_error_body(status, head, body)
        # The 400 names the bad parameter: the first one, decoded (escaped when odd).
        name = unquote(query.split("&", 1)[0].split("=", 1)[0])
        assert repr(name)[1:-1] in doc["details"], doc
    else:
        doc = json.loads(body)
        assert doc.keys() == {"hostname", "processes"}


AUTH_HEADERS = [
    # (header lines, accepted?)
    ([b"Bearer " + TOKEN.encode()], True),
    ([b"bearer " + TOKEN.encode()], True),  # the scheme is case-insensitive (RFC 9110)
    ([b"Bearer  " + TOKEN.encode() + b"  "], True),
    ([b"Bearer " + TOKEN.encode(), b"Bearer wrong"], False),
    ([b"Bearer wrong", b"Bearer " + TOKEN.encode()], False),
    ([b"Bearer " + TOKEN.encode(), b"Bearer " + TOKEN.encode()], False),
    ([b"Bearer " + TOKEN.encode() + b", Bearer wrong"], False),
    ([b"Bearer"], False),
    ([b"Bearer "], False),
    ([b""], False),
    ([b"Basic " + TOKEN.encode()], False),
    ([TOKEN.encode()], False),
    ([b"Bearer " + TOKEN.encode()[:-1]], False),
    ([b"Bearer " + TOKEN.encode() + b"x"], False),
    ([b"Bearer " + TOKEN.upper().encode()], False),
    # A NUL in a header line: waitress's parser answers its own plain 400 before the app.
    ([b"Bearer " + TOKEN.encode() + b"\x00"], None),
    ([b"Bearer \xff\xfe" + TOKEN.encode()], False),
    ([b"Bearer " + b"A" * 8000], False),
]


@pytest.mark.parametrize(("values", "accepted"), AUTH_HEADERS,
                         ids=[f"case{i}" for i in range(len(AUTH_HEADERS))])
def test_authorization_headers(values: list[bytes], accepted: bool | None,
                               token_exporter: Server) -> None:
    """Several Authorization headers, odd spacing, wrong schemes: only the exact token works."""
    headers = [(b"Authorization", v) for v in values] + [(b"X-API-Key", TOKEN.encode())]
    for path in (b"/process/1", b"/metrics", b"/process?limit=1"):
        status, head, body = raw_request(token_exporter.port, path, headers)
        if accepted:
            assert status == 200, (path, status, body[:200])
        elif accepted is None:
            assert status == 400, (path, status, body[:200])
            assert TOKEN.encode() not in body
        else:
            assert status == 401, (path, status, body[:200])
            assert head.get("www-authenticate", "").startswith("Bearer")
            doc = assert_error_body(status, head, body)
            assert TOKEN not in json.dumps(doc)


# -- free-form fuzz: every endpoint, including the ones without parameters ------------------

_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
_QUERY = st.lists(st.tuples(_TEXT, _TEXT), max_size=4)
# Any legal field value (RFC 9110: visible ASCII, space, tab and obs-text), so the request
# reaches the app rather than waitress's own parser errors.
_HEADER_VALUE = st.binary(max_size=60).map(
    lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F or c == 0x09).strip())


def _quote(text: str) -> str:
    return requests.utils.quote(text, safe="")


def _free_form(path: str, check: Callable[[int, dict[str, str], bytes], None],
               server: Server) -> int:
    sent = 0
    failures: list[str] = []

    @FUZZ_SETTINGS
    @given(query=_QUERY, accept=_HEADER_VALUE, suffix=st.sampled_from(["", "/", "?", "?&"]),
           with_token=st.booleans())
    def run(query: list[tuple[str, str]], accept: bytes, suffix: str, with_token: bool) -> None:
        nonlocal sent
        qs = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in query)
        target = (path + suffix + ("?" + qs if qs and "?" not in suffix else qs)).encode()
        headers = [(b"Accept", accept)]
        if with_token:
            headers.append((b"Authorization", f"Bearer {TOKEN}".encode()))
        status, head, body = raw_request(server.port, target, headers)
        sent += 1
        try:
            assert status < 500, body[:200]
            if not with_token and path not in OPEN_PATHS:
                assert status == 401
                assert_error_body(status, head, body)
            elif query and path != "/process":
                # Only GET /process takes parameters; anywhere else any one is a 400.
                assert status == 400, status
                assert assert_error_body(status, head, body)["error"] == PARAM_ERROR
            else:
                check(status, head, body)
        except (AssertionError, ValueError) as exc:
            failures.append(f"{target!r} token={with_token} -> {status}: {exc!r}"[:400])

    run()
    assert not failures, f"{len(failures)} bad responses:\n" + "\n".join(failures[:5])
    return sent


def _check_any(status: int, head: dict[str, str], body: bytes) -> None:
    if status >= 400:
        assert_error_body(status, head, body)


def _check_health(status: int, head: dict[str, str], body: bytes) -> None:
    assert status == 200
    assert json.loads(body).keys() == {"status", "hostname", "version"}


def _check_landing(status: int, head: dict[str, str], body: bytes) -> None:
    assert status == 200 and head["content-type"].startswith("text/html")


def _check_metrics(status: int, head: dict[str, str], body: bytes) -> None:
    if status == 200:
        assert b"namedprocess_namegroup_num_procs" in body
    else:
        assert status in (401, 406), status
        assert_error_body(status, head, body)


def _check_list(status: int, head: dict[str, str], body: bytes) -> None:
    if status == 200:
        assert json.loads(body).keys() == {"hostname", "processes"}
    else:
        assert status in (400, 401), status
        assert_error_body(status, head, body)


FREE_FORM = {
    "/": _check_landing,
    "/healthz": _check_health,
    "/metrics": _check_metrics,
    "/process": _check_list,
    "/process/1": _check_any,
    "/openapi.json": _check_any,
}


@pytest.mark.parametrize("path", list(FREE_FORM))
def test_free_form(path: str, token_exporter: Server) -> None:
    """≥ 500 requests per endpoint with arbitrary query strings and Accept headers."""
    sent = _free_form(path, FREE_FORM[path], token_exporter)
    print(f"\nfree-form {path}: {sent} requests")
    assert sent >= CASES
    assert token_exporter.healthy()


def test_lookup_of_live_child_matches_schema(token_exporter: Server,
                                             schema: schemathesis.BaseSchema) -> None:
    """A real child found by pid: the full process object, valid against the document."""
    child = spawn_python("--password=hunter2")
    try:
        case = schema["/process/{pid}"]["GET"].Case(path_parameters={"pid": child.pid})
        response = case.call(base_url=token_exporter.url, headers=BEARER, timeout=5)
        assert response.status_code == 200
        case.validate_response(response, checks=SCHEMA_CHECKS)
        doc = response.json()
        assert doc["pid"] == child.pid
        assert "hunter2" not in doc["command"] and "--password=***" in doc["command"]
    finally:
        child.kill()
        child.wait(timeout=10)


def test_no_unexpected_characters_in_error_details(exporter: Server) -> None:
    """A hostile pid is quoted (and cut) in `details`, not echoed raw."""
    status, head, body = raw_request(exporter.port, b"/process/" + b"%3Cscript%3E" * 50)
    doc = assert_error_body(status, head, body)
    assert status == 400 and len(doc["details"]) < 200
    assert all(c in string.printable for c in doc["details"])
