"""Malformed configuration: one message naming every problem by key path, never a traceback.

Each case runs the real command line (`procfleet-exporter` / `procfleet-query`) on a config
file and expects a non-zero exit, every listed key path (or phrase) in its stderr, and no
Python traceback. The commands run a few at a time, each bounded in time; a config that is
wrongly accepted makes the service start serving, which the timeout turns into a failure.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from procfleet.testing import EXPORTER, QUERY, free_port

RUN_TIMEOUT = 20.0
GOOD_SHA = "a" * 64


@dataclass(frozen=True)
class Case:
    id: str
    service: str  # "exporter" or "query"
    text: str | bytes
    expect: tuple[str, ...]  # each must appear in stderr: key paths and key phrases


EXPORTER_CASES = [
    Case("yaml-syntax", "exporter", "listen: [127.0.0.1:9256\n", ("YAML syntax error", "line")),
    Case("yaml-tab", "exporter", "auth:\n\tprotect_metrics: true\n", ("YAML syntax error",)),
    Case("yaml-python-tag", "exporter", "listen: !!python/object/apply:os.system [id]\n",
         ("YAML",)),
    Case("not-utf8", "exporter", b"listen: \xff\xfe127.0.0.1:9256\n", ("UTF-8",)),
    Case("top-level-list", "exporter", "- listen\n- hostname\n", ("must be a mapping",)),
    Case("top-level-scalar", "exporter", "just a string\n", ("must be a mapping",)),
    Case("listen-type", "exporter", "listen: 9256\n", ("listen",)),
    Case("listen-syntax", "exporter", "listen: localhost\n", ("listen",)),
    Case("listen-port", "exporter", "listen: 127.0.0.1:70000\n", ("listen",)),
    Case("log-level", "exporter", "log_level: verbose\n", ("log_level",)),
    Case("hostname", "exporter", "hostname: 'web 01'\n", ("hostname",)),
    Case("unknown-top", "exporter", "lisen: 127.0.0.1:9256\n", ("lisen", "unknown key")),
    Case("unknown-nested", "exporter", "auth:\n  token: abc\n", ("auth.token", "unknown key")),
    Case("auth-type", "exporter", "auth: yes\n", ("auth", "mapping")),
    Case("token-sha", "exporter", "auth: {token_sha256: not-hex}\n", ("auth.token_sha256",)),
    Case("protect-type", "exporter", f"auth: {{token_sha256: {GOOD_SHA}, protect_metrics: 1}}\n",
         ("auth.protect_metrics",)),
    Case("masking-regex", "exporter", "masking:\n  extra_patterns: ['(?P<value>[a-']\n",
         ("masking.extra_patterns[0]",)),
    Case("masking-flag-regex", "exporter", "masking:\n  secret_flags: ['--pass(']\n",
         ("masking.secret_flags[0]",)),
    Case("masking-type", "exporter", "masking: {enabled: 'no'}\n", ("masking.enabled",)),
    Case("group-regex", "exporter", "groups:\n  - cmdline: ['(?P<app>[^/ ]+']\n",
         ("groups[0].cmdline[0]", "regex")),
    Case("group-no-selector", "exporter", "groups:\n  - name: x\n", ("groups[0]",)),
    Case("group-unknown-key", "exporter", "groups:\n  - comm: [bash]\n    cmd: [x]\n",
         ("groups[0].cmd",)),
    Case("group-template", "exporter", "groups:\n  - name: '{{.Nope}}'\n    comm: [bash]\n",
         ("groups[0].name",)),
    Case("groups-type", "exporter", "groups: {comm: bash}\n", ("groups",)),
    Case("metrics-range", "exporter", "metrics: {per_process_top_n: 100000}\n",
         ("metrics.per_process_top_n",)),
    Case("metrics-by", "exporter", "metrics: {per_process_by: disk}\n",
         ("metrics.per_process_by",)),
    Case("many-at-once", "exporter",
         "listen: nowhere\nlog_level: loud\nbogus: 1\nauth: {token_sha256: xyz}\n"
         "groups:\n  - cmdline: ['(']\n",
         ("listen", "log_level", "bogus", "auth.token_sha256", "groups[0].cmdline[0]")),
]

KEY = f"{{name: grafana, sha256: \"{GOOD_SHA}\", permissions: [process:read]}}"
AUTH = f"auth:\n  enabled: true\n  api_keys:\n    - {KEY}\n"
QUERY_CASES = [
    Case("yaml-syntax", "query", "exporters:\n  - {hostname: a, url: http://x\n",
         ("YAML syntax error",)),
    Case("not-utf8", "query", b"listen: \xff127.0.0.1:8080\n", ("UTF-8",)),
    Case("top-level-list", "query", "- a\n", ("must be a mapping",)),
    Case("unknown-top", "query", AUTH + "exporter: []\n", ("exporter", "unknown key")),
    Case("unknown-exporter-key", "query",
         AUTH + "exporters:\n  - {hostnme: a, url: 'http://127.0.0.1:9256'}\n",
         ("exporters[0].hostnme", "exporters[0].hostname")),
    Case("threads-type", "query", AUTH + "threads: '16'\n", ("threads",)),
    Case("timeouts-type", "query", AUTH + "timeouts: {exporter: 2s}\n", ("timeouts.exporter",)),
    Case("timeouts-order", "query", AUTH + "timeouts: {exporter: 9, request: 1}\n",
         ("timeouts.exporter",)),
    Case("timeouts-negative", "query", AUTH + "timeouts: {request: -1}\n",
         ("timeouts.request",)),
    Case("auth-enabled-type", "query", "auth: {enabled: 'yes', api_keys: []}\n",
         ("auth.enabled",)),
    Case("auth-without-keys", "query", "auth: {enabled: true}\n", ("auth.api_keys",)),
    Case("key-sha", "query",
         "auth:\n  api_keys:\n    - {name: g, sha256: abc, permissions: [process:read]}\n",
         ("auth.api_keys[0].sha256",)),
    Case("key-permission", "query",
         f"auth:\n  api_keys:\n    - {{name: g, sha256: {GOOD_SHA}, permissions: [root]}}\n",
         ("auth.api_keys[0].permissions[0]",)),
    Case("exporters-type", "query", AUTH + "exporters: {a: b}\n", ("exporters",)),
    Case("url-scheme", "query", AUTH + "exporters:\n  - {hostname: a, url: 'ftp://h:1'}\n",
         ("exporters[0].url",)),
    Case("url-no-host", "query", AUTH + "exporters:\n  - {hostname: a, url: 'http://'}\n",
         ("exporters[0].url",)),
    Case("url-port", "query", AUTH + "exporters:\n  - {hostname: a, url: 'http://h:99999'}\n",
         ("exporters[0].url",)),
    Case("url-not-url", "query", AUTH + "exporters:\n  - {hostname: a, url: 'not a url'}\n",
         ("exporters[0].url",)),
    Case("url-credentials", "query",
         AUTH + "exporters:\n  - {hostname: a, url: 'http://u:p@h:1'}\n", ("exporters[0].url",)),
    Case("url-missing", "query", AUTH + "exporters:\n  - {hostname: a}\n",
         ("exporters[0].url",)),
    Case("hostname-bad", "query", AUTH + "exporters:\n  - {hostname: 'a b', url: 'http://h:1'}\n",
         ("exporters[0].hostname",)),
    Case("hostname-underscore", "query",
         AUTH + "exporters:\n  - {hostname: _all, url: 'http://h:1'}\n",
         ("exporters[0].hostname",)),
    Case("hostname-duplicate", "query",
         AUTH + "exporters:\n  - {hostname: a, url: 'http://h:1'}\n"
                "  - {hostname: b, url: 'http://h:2'}\n  - {hostname: a, url: 'http://h:3'}\n",
         ("exporters[2].hostname", "exporters[0]")),
    Case("label-key", "query",
         AUTH + "exporters:\n  - {hostname: a, url: 'http://h:1', labels: {'bad key!': x}}\n",
         ("exporters[0].labels",)),
    Case("label-value", "query",
         AUTH + "exporters:\n  - {hostname: a, url: 'http://h:1', labels: {group: web..prod}}\n",
         ("exporters[0].labels.group",)),
    Case("label-type", "query",
         AUTH + "exporters:\n  - {hostname: a, url: 'http://h:1', labels: {group: [a]}}\n",
         ("exporters[0].labels.group",)),
    Case("labels-type", "query",
         AUTH + "exporters:\n  - {hostname: a, url: 'http://h:1', labels: [group]}\n",
         ("exporters[0].labels",)),
    Case("maintenance-type", "query",
         AUTH + "exporters:\n  - {hostname: a, url: 'http://h:1', maintenance: maybe}\n",
         ("exporters[0].maintenance",)),
    Case("many-at-once", "query",
         "listen: here\nthreads: 0\nauth: {enabled: true}\nexporters:\n"
         "  - {hostname: a, url: 'ftp://x'}\n  - {hostname: a, url: 'http://h:1', labels: "
         "{'k k': v}}\n",
         ("listen", "threads", "auth.api_keys", "exporters[0].url", "exporters[1].hostname",
          "exporters[1].labels")),
]

CASES = EXPORTER_CASES + QUERY_CASES


def _run(case: Case, tmp: Path) -> subprocess.CompletedProcess:
    path = tmp / f"{case.service}-{case.id}.yml"
    if isinstance(case.text, bytes):
        path.write_bytes(case.text)
    else:
        path.write_text(case.text)
    program = EXPORTER if case.service == "exporter" else QUERY
    argv = [program, "--config", str(path), "--listen", f"127.0.0.1:{free_port()}"]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(argv, "timeout", exc.stdout or "", exc.stderr or "")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Every case's result, run four at a time (each is a short-lived CLI start-up)."""
    tmp = tmp_path_factory.mktemp("configs")
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {f"{c.service}-{c.id}": pool.submit(_run, c, tmp) for c in CASES}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.service}-{c.id}" for c in CASES])
def test_malformed_config(case: Case, outcomes: dict[str, subprocess.CompletedProcess]) -> None:
    result = outcomes[f"{case.service}-{case.id}"]
    output = f"{result.stdout}{result.stderr}"
    assert result.returncode != "timeout", f"the config was accepted and the service ran:\n" \
                                           f"{output[-2000:]}"
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert result.stderr.strip(), "no message"
    for expected in case.expect:
        assert expected in result.stderr, (expected, result.stderr)


@pytest.mark.parametrize("service", ["exporter", "query"])
def test_missing_file(service: str, tmp: Path) -> None:
    program = EXPORTER if service == "exporter" else QUERY
    for path in (tmp / "nope.yml", tmp):  # missing, and a directory
        result = subprocess.run([program, "--config", str(path)], capture_output=True,
                                text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "cannot read" in result.stderr and str(path) in result.stderr


@pytest.mark.parametrize(("service", "flags", "expect"), [
    ("exporter", ["--listen", "nowhere"], "listen"),
    ("exporter", ["--listen", "127.0.0.1:99999"], "port"),
    ("exporter", ["--hostname", "bad name"], "--hostname"),
    ("query", ["--listen", "nowhere"], "--listen"),
    ("query", ["--listen", "127.0.0.1:-5"], "--listen"),
])
def test_bad_flags(service: str, flags: list[str], expect: str) -> None:
    program = EXPORTER if service == "exporter" else QUERY
    result = subprocess.run([program, *flags], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert expect in result.stderr
