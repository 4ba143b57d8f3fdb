"""Credentials in command lines are masked by default; patterns are configurable."""

from __future__ import annotations

import pytest

from exporter.config import from_mapping
from exporter.masking import Masker
from procfleet.configcheck import ConfigError

CASES = [
    (["mysql", "--password=hunter2", "-u", "root"], ["mysql", "--password=***", "-u", "root"]),
    (["app", "--token", "abc123", "-v"], ["app", "--token", "***", "-v"]),
    (["app", "--api-key=k1", "--client-secret", "s"], ["app", "--api-key=***",
                                                       "--client-secret", "***"]),
    (["env", "PGPASSWORD=abc", "psql"], ["env", "PGPASSWORD=***", "psql"]),
    (["env", "MYSQL_PWD=abc"], ["env", "MYSQL_PWD=***"]),
    (["psql", "postgres://bob:s3cret@db:5432/x"], ["psql", "postgres://bob:***@db:5432/x"]),
    (["curl", "https://u:p@h/x?api_key=zz&a=1"], ["curl", "https://u:***@h/x?api_key=***&a=1"]),
    (["curl", "-H", "Authorization: Bearer eyJ.a-b"], ["curl", "-H", "Authorization: Bearer ***"]),
    (["java", "-Djavax.net.ssl.keyStorePassword=ch"],
     ["java", "-Djavax.net.ssl.keyStorePassword=***"]),
    (["redis-server", "--requirepass", "foo"], ["redis-server", "--requirepass", "***"]),
    (["x", "token=abc", "user=bob"], ["x", "token=***", "user=bob"]),
    # Not secrets: left alone.
    (["nginx:", "master", "process", "/usr/sbin/nginx"], ["nginx:", "master", "process",
                                                         "/usr/sbin/nginx"]),
    (["rsync", "--passes=3", "--auth-required", "x"], ["rsync", "--passes=3",
                                                       "--auth-required", "x"]),
    (["ssh", "bob@host", "http://host:8080/p"], ["ssh", "bob@host", "http://host:8080/p"]),
    ([], []),
]


@pytest.mark.parametrize("argv, masked", CASES)
def test_default_masking(argv, masked):
    assert Masker.build()(argv) == masked


def test_configured_patterns_add_to_defaults():
    config = from_mapping({"masking": {"extra_patterns": [r"--license (?P<value>\S+)",
                                                          r"^LIC-(?P<value>\w+)$"]}})
    assert config.masker(["tool", "LIC-1234", "--password=x"]) == [
        "tool", "LIC-***", "--password=***"]


def test_replacing_patterns_and_flags():
    config = from_mapping({"masking": {"patterns": [r"pin=(?P<value>\d+)"],
                                       "secret_flags": ["--pin"]}})
    assert config.masker(["x", "pin=1234", "--password=x", "--pin", "99"]) == [
        "x", "pin=***", "--password=x", "--pin", "***"]


def test_disabled():
    config = from_mapping({"masking": {"enabled": False}})
    assert config.masker(["x", "--password=x"]) == ["x", "--password=x"]


@pytest.mark.parametrize("masking, problem", [
    ({"patterns": ["(unclosed"]}, "masking.patterns[0]: invalid regex"),
    ({"patterns": ["token=\\S+"]}, "masking.patterns[0]: needs a group named 'value'"),
    ({"extra_patterns": [7]}, "masking.extra_patterns[0]: must be a string"),
    ({"secret_flags": ["[x"]}, "masking.secret_flags[0]: invalid regex"),
    ({"enabled": "yes"}, "masking.enabled: must be a boolean"),
    ({"colour": 1}, "masking.colour: unknown key"),
])
def test_bad_masking_config_is_named(masking, problem):
    with pytest.raises(ConfigError) as err:
        from_mapping({"masking": masking})
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems
