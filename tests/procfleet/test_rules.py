"""One rule in one place: the process object, list filters, query parameters and hostnames.

The definitions live in procfleet/process.py, procfleet/params.py and procfleet/hostnames.py;
these tests keep every other statement of them (both OpenAPI documents, the CLI's columns,
the exporter's sort order) in step, and run the one query-parameter rule through both
services' real apps.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from typing import Any

import falcon.testing
import pytest

from exporter.app import create_app as create_exporter_app
from exporter.config import Config as ExporterConfig
from exporter.lookup import SORT_ORDER
from procfleet import cli
from procfleet.hostnames import HOSTNAME_MAX_LENGTH, hostname_problem, is_hostname
from procfleet.params import (
    FILTER_MAX_LENGTH,
    LIST_LIMIT_MAX,
    LIST_PARAMS,
    QUERY_LIST_PARAMS,
    SORT_FIELDS,
    SORT_KEYS,
    ListFilters,
    ParamError,
    parse_list_filters,
    single_values,
)
from procfleet.process import PROCESS_FIELDS, ProcessInfo
from query.app import create_app as create_query_app
from query.config import parse as parse_query_config
from query.fanout import Fanout

JSON_TYPES = {"integer": (int,), "number": (int, float), "string": (str,)}


def _doc(package: str) -> dict[str, Any]:
    return json.loads(resources.files(package).joinpath("openapi.json").read_text("utf-8"))


DOCS = {"exporter": _doc("exporter"), "query": _doc("query")}
LIST_PATHS = {"exporter": "/process", "query": "/node/{hostname}/process"}


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def _query_params(doc: dict[str, Any], path: str,
                  method: str = "get") -> dict[str, dict[str, Any]]:
    operation = doc["paths"][path][method]
    return {p["name"]: p for p in (_resolve(doc, x) for x in operation.get("parameters", []))
            if p["in"] == "query"}


# -- the process object ------------------------------------------------------------------

def test_process_info_has_the_process_fields_in_order() -> None:
    assert [f.name for f in dataclasses.fields(ProcessInfo)] == list(PROCESS_FIELDS)
    assert ProcessInfo(pid=1, name="x").to_json() == {"pid": 1, "name": "x"}


@pytest.mark.parametrize("service", DOCS)
def test_openapi_process_schema_is_the_process_object(service: str) -> None:
    schema = DOCS[service]["components"]["schemas"]["Process"]
    assert list(schema["properties"]) == list(PROCESS_FIELDS)
    assert schema["required"] == ["pid"] and schema["additionalProperties"] is False
    for name, kinds in PROCESS_FIELDS.items():
        assert JSON_TYPES[schema["properties"][name]["type"]] == kinds, name


def test_cli_columns_show_every_process_field() -> None:
    assert cli.COLUMNS == ("HOST", *cli.COLUMN_FIELDS)
    # window_seconds is the exporter's rate interval, the same on every row: not a column.
    assert sorted(cli.COLUMN_FIELDS.values()) == sorted(set(PROCESS_FIELDS) - {"window_seconds"})
    # Each field lands in its own column: a distinct value per field shows up where it should.
    row = {"host": "h", "pid": 41, "name": "n4", "user": "u4", "state": "s4",
           "cpu_percent": 1.5, "cpu_percent_recent": 3.5, "mem_percent": 2.5, "mem_rss": 2048,
           "read_bytes_per_second": 4096.0, "write_bytes_per_second": 3 * 2**20,
           "command": "c4", "start_time": "2026-01-15T10:30:00Z", "window_seconds": 5.0}
    assert set(row) - {"host"} == set(PROCESS_FIELDS)
    assert cli.table_row(row) == ("h", "41", "n4", "u4", "s4", "1.5", "3.5", "2.5", "2.0K",
                                  "4.0K", "3.0M", "2026-01-15 10:30:00", "c4")


# -- list filters ---------------------------------------------------------------------------

@pytest.mark.parametrize("service", DOCS)
def test_openapi_list_parameters_are_the_filter_rules(service: str) -> None:
    params = _query_params(DOCS[service], LIST_PATHS[service])
    assert tuple(params) == (QUERY_LIST_PARAMS if service == "query" else LIST_PARAMS)
    assert tuple(params["sort"]["schema"]["enum"]) == SORT_KEYS
    assert params["limit"]["schema"]["minimum"] == 1
    assert params["limit"]["schema"]["maximum"] == LIST_LIMIT_MAX
    for name in ("name", "user"):
        assert params[name]["schema"]["minLength"] == 1
        assert params[name]["schema"]["maxLength"] == FILTER_MAX_LENGTH


def test_every_sort_key_has_an_order_and_the_cli_offers_each() -> None:
    assert tuple(SORT_ORDER) == SORT_KEYS
    # The fleet ranking orders by the process field of each key.
    assert tuple(SORT_FIELDS) == SORT_KEYS
    assert set(SORT_FIELDS.values()) <= set(PROCESS_FIELDS)
    for key in SORT_KEYS:
        assert cli.build_parser().parse_args(["ps", "_all", "--sort", key]).sort == key


@pytest.mark.parametrize("values, expected", [
    ({}, ListFilters()),
    ({"name": "nginx*", "user": "www-data", "sort": "rss", "limit": "007"},
     ListFilters(name="nginx*", user="www-data", sort="rss", limit=7)),
    ({"limit": str(LIST_LIMIT_MAX)}, ListFilters(limit=LIST_LIMIT_MAX)),
    ({"name": "x" * FILTER_MAX_LENGTH}, ListFilters(name="x" * FILTER_MAX_LENGTH)),
])
def test_valid_filters(values: dict[str, str], expected: ListFilters) -> None:
    assert parse_list_filters(values) == expected
    assert parse_list_filters(expected.to_params()) == expected


@pytest.mark.parametrize("values, parameter, complaint", [
    ({"sort": "CPU"}, "sort", "sort must be one of cpu, mem, rss, start, cpu_recent, got 'CPU'"),
    ({"sort": ""}, "sort", "sort must be one of"),
    ({"limit": "0"}, "limit", "limit must be an integer from 1 to 100000, got '0'"),
    ({"limit": "100001"}, "limit", "limit must be an integer from 1 to 100000"),
    ({"limit": "1e3"}, "limit", "limit must be"),
    ({"limit": "\u0663"}, "limit", "limit must be"),  # an Arabic-Indic 3: int() would take it
    ({"limit": " 1"}, "limit", "limit must be"),
    # Past 4,300 digits int() raises ValueError itself: that was a 500.
    ({"limit": "9" * 5000}, "limit", "limit must be"),
    ({"name": ""}, "name", "name must be 1 to 256 characters"),
    ({"user": "x" * 257}, "user", "user must be 1 to 256 characters"),
])
def test_invalid_filters_name_the_parameter(values: dict[str, str], parameter: str,
                                            complaint: str) -> None:
    with pytest.raises(ParamError) as caught:
        parse_list_filters(values)
    assert caught.value.parameter == parameter
    assert complaint in str(caught.value)


@pytest.mark.parametrize("params, allowed, parameter, complaint", [
    ({"foo": "bar"}, LIST_PARAMS, "foo", "unknown parameter 'foo'"),
    ({"name": ["a", "b"]}, LIST_PARAMS, "name", "name is given more than once"),
    ({"": ""}, LIST_PARAMS, "", "unknown parameter ''"),
    ({"x": "1"}, (), "x", "unknown parameter 'x' (this endpoint takes: none)"),
])
def test_unknown_and_repeated_parameters(params: dict[str, Any], allowed: tuple[str, ...],
                                         parameter: str, complaint: str) -> None:
    with pytest.raises(ParamError) as caught:
        single_values(params, allowed)
    assert caught.value.parameter == parameter
    assert complaint in str(caught.value)


# -- hostnames ------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["web-01", "Web_01.example.com", "10.0.0.1", "a", "9",
                                  "a" * HOSTNAME_MAX_LENGTH, "web_"])
def test_hostnames(text: str) -> None:
    assert is_hostname(text) and hostname_problem(text) is None


@pytest.mark.parametrize("text, complaint", [
    ("", "must not be empty"),
    ("_any", "must start with a letter or digit ('_' begins target keywords)"),
    ("-web", "must start with a letter or digit, got '-web'"),
    (".web", "must start with a letter or digit, got '.web'"),
    ("web 01", "must be letters, digits"),
    ("wéb", "must be letters, digits"),
    ("web/01", "must be letters, digits"),
    ("a" * (HOSTNAME_MAX_LENGTH + 1), "at most 253 characters"),
])
def test_not_hostnames(text: str, complaint: str) -> None:
    assert not is_hostname(text)
    assert complaint in (hostname_problem(text) or "")


def test_both_services_take_the_same_hostnames() -> None:
    """The exporter's own name and the query service's targets follow one grammar."""
    from exporter.config import valid_hostname
    from query.targets import TargetError, parse_target

    for text in ("web-01", "-web", ".web", "web..01", "a" * 253, "a" * 254, "x_y"):
        try:
            parse_target(text)
            as_target = True
        except TargetError:
            as_target = False
        assert valid_hostname(text) == as_target == is_hostname(text), text


def test_the_exporter_refuses_a_bad_hostname_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "exporter", "--hostname=-web"],
                            capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "--hostname must start with a letter or digit, got '-web'" in result.stderr


# -- the query-parameter rule, through both apps ----------------------------------------------

@pytest.fixture(scope="module")
def clients() -> Iterator[dict[str, falcon.testing.TestClient]]:
    """Both services' real apps: the exporter on this host's /proc, a query service with one
    exporter entry that is never reached (every request here is refused before that)."""
    config = parse_query_config({"auth": {"enabled": False}, "exporters": [
        {"hostname": "web-01", "url": "http://127.0.0.1:9"}]})
    with Fanout.from_config(config) as fanout:
        yield {"exporter": falcon.testing.TestClient(create_exporter_app(ExporterConfig())),
               "query": falcon.testing.TestClient(create_query_app(config, fanout=fanout))}


def _concrete(path: str) -> str:
    return path.replace("{pid}", "1").replace("{hostname}", "web-01")


def _operations() -> list[tuple[str, str, str]]:
    return [(service, method, path) for service, doc in DOCS.items()
            for path, item in doc["paths"].items() for method in item]


def _bad_request(result: falcon.testing.Result) -> dict[str, Any]:
    assert result.status_code == 400, (result.status_code, result.text[:300])
    body = result.json
    assert body["error"] == "invalid query parameter" and body["code"] == 400
    return body


@pytest.mark.parametrize("service, method, path", _operations())
def test_an_unknown_parameter_is_a_400_naming_it(service: str, method: str, path: str,
                                                 clients: dict[str, Any]) -> None:
    result = clients[service].simulate_request(method.upper(), _concrete(path),
                                               query_string="foo=bar")
    body = _bad_request(result)
    assert "unknown parameter 'foo'" in body["details"]
    documented = DOCS[service]["paths"][path][method]["responses"]
    assert "400" in documented, f"{service} {path} does not document its 400"


@pytest.mark.parametrize("service, method, path", _operations())
def test_a_repeated_parameter_is_a_400_naming_it(service: str, method: str, path: str,
                                                 clients: dict[str, Any]) -> None:
    params = _query_params(DOCS[service], path, method)
    for name, spec in params.items():
        value = str(spec.get("example") or (spec["schema"].get("enum") or ["1"])[0])
        if name == "target":
            value = "_all"
        single = clients[service].simulate_request(method.upper(), _concrete(path),
                                                   query_string=f"{name}={value}")
        assert not (single.status_code == 400
                    and single.json["error"] == "invalid query parameter"), single.text
        twice = clients[service].simulate_request(method.upper(), _concrete(path),
                                                  query_string=f"{name}={value}&{name}={value}")
        assert f"{name} is given more than once" in _bad_request(twice)["details"]


@pytest.mark.parametrize("service", DOCS)
def test_list_filters_are_refused_alike(service: str, clients: dict[str, Any]) -> None:
    path = _concrete(LIST_PATHS[service])
    for query, complaint in [("sort=name", "sort must be one of cpu, mem, rss, start, cpu_recent"),
                             ("limit=" + "9" * 5000, "limit must be an integer from 1"),
                             ("user=", "user must be 1 to 256 characters")]:
        body = _bad_request(clients[service].simulate_get(path, query_string=query))
        assert complaint in body["details"]


# -- SHA-256 digests and log levels ------------------------------------------------------

def test_both_services_take_a_sha256_in_either_case() -> None:
    from exporter.config import from_mapping

    digest = "AB" * 32
    exporter_config = from_mapping({"auth": {"token_sha256": digest}})
    assert exporter_config.auth.token_sha256 == digest.lower()
    query_config = parse_query_config({"auth": {"enabled": True, "api_keys": [
        {"name": "k", "sha256": digest, "permissions": ["process:read"]}]}})
    assert query_config.auth.api_keys[0].sha256 == digest.lower()
