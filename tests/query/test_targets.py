"""Target syntax and resolution, as tables (docs/api.md#targets)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from query.targets import Selector, Target, TargetError, parse_target, resolve


@pytest.mark.parametrize("text, expected", [
    ("web-01", Target("hostname", hostname="web-01")),
    ("Web_01.example.com", Target("hostname", hostname="Web_01.example.com")),
    ("10.0.0.1", Target("hostname", hostname="10.0.0.1")),
    ("a", Target("hostname", hostname="a")),
    ("_any", Target("any")),
    ("_all", Target("all")),
    ("group:web", Target("selectors", selectors=(Selector("group", "web"),))),
    ("group:web.dev.us-east",
     Target("selectors", selectors=(Selector("group", "web.dev.us-east"),))),
    ("k_1:v-1,k-2:v_2", Target("selectors", selectors=(Selector("k_1", "v-1"),
                                                       Selector("k-2", "v_2")))),
    ("group:web,group:web.dev", Target("selectors", selectors=(Selector("group", "web"),
                                                               Selector("group", "web.dev")))),
])
def test_valid_targets(text: str, expected: Target) -> None:
    assert parse_target(text) == expected
    assert str(parse_target(text)) == text


@pytest.mark.parametrize("text, complaint", [
    ("", "must not be empty"),
    ("_", "reserved"),
    ("_web", "reserved"),
    ("_ALL", "reserved"),
    ("_any_", "reserved"),
    ("web 01", "not a hostname"),
    ("web/01", "not a hostname"),
    ("web@01", "not a hostname"),
    ("wéb", "not a hostname"),
    ("*", "not a hostname"),
    ("group:", "invalid value"),
    (":web", "invalid key"),
    ("group:web.", "invalid value"),
    ("group:.web", "invalid value"),
    ("group:web..dev", "invalid value"),
    ("group:web:dev", "invalid value"),
    ("gr oup:web", "invalid key"),
    ("group:w*", "invalid value"),
    ("group:web,", "selector 2 is empty"),
    (",group:web", "selector 1 is empty"),
    ("group:web,,dc:x", "selector 2 is empty"),
    ("group:web,dc", "selector 2 ('dc') must be key:value"),
    ("web-01,web-02", "selector 1 ('web-01') must be key:value"),
])
def test_invalid_targets_say_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(TargetError, match=None) as caught:
        parse_target(text)
    assert complaint in str(caught.value)


@dataclass(frozen=True)
class Node:
    hostname: str
    labels: dict[str, str] = field(default_factory=dict)


NODES = [
    Node("db-01", {"group": "db.prod", "dc": "us-east"}),
    Node("web-01", {"group": "web.dev.us-east", "dc": "us-east"}),
    Node("web-02", {"group": "web.prod", "dc": "eu-west"}),
    Node("webby-01", {"group": "webby", "dc": "us-east"}),
    Node("bare"),
]


@pytest.mark.parametrize("text, hostnames", [
    ("web-01", ["web-01"]),
    ("WEB-01", []),  # case-sensitive
    ("web", []),  # hostnames match exactly, not by prefix
    ("_all", ["db-01", "web-01", "web-02", "webby-01", "bare"]),
    ("_any", ["db-01", "web-01", "web-02", "webby-01", "bare"]),
    ("group:web", ["web-01", "web-02"]),  # whole segments: not webby
    ("group:web.dev", ["web-01"]),
    ("group:web.dev.us-east", ["web-01"]),
    ("group:web.de", []),
    ("group:webby", ["webby-01"]),
    ("group:web,dc:us-east", ["web-01"]),
    ("group:web,dc:nowhere", []),
    ("dc:us-east", ["db-01", "web-01", "webby-01"]),
    ("nolabel:x", []),
])
def test_resolve(text: str, hostnames: list[str]) -> None:
    assert [n.hostname for n in resolve(parse_target(text), NODES)] == hostnames


@pytest.mark.parametrize("text, unicast", [
    ("web-01", True), ("_any", True), ("_all", False), ("group:web", False),
])
def test_unicast_or_broadcast(text: str, unicast: bool) -> None:
    assert parse_target(text).unicast is unicast
