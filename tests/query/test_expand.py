"""`?expand=`, `?tree=` and `?start_time=` through the query service to a real exporter
(issue 10): checked by the same rule, passed through, and `environ` behind its permission."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from query_testing import make_config

from procfleet.testing import Server, free_port
from query.auth import key_hash, new_key

PLAIN = new_key()
ENVIRON = new_key()


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real exporter, started as users start it, that may show environments."""
    tmp = tmp_path_factory.mktemp("exporter")
    config = tmp / "exporter.yml"
    config.write_text("expand:\n  environ: true\n")
    port = free_port()
    exe = str(Path(sys.executable).with_name("procfleet-exporter"))
    server = Server([exe, "--listen", f"127.0.0.1:{port}", "--config", str(config)], port,
                    tmp / "exporter.log")
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def client(exporter: Server, make_client):
    keys = [{"name": "plain", "sha256": key_hash(PLAIN), "permissions": ["process:read"]},
            {"name": "environ", "sha256": key_hash(ENVIRON),
             "permissions": ["process:read", "process:read-environ"]}]
    config = make_config([{"hostname": "web-01", "url": exporter.url}],
                         auth={"enabled": True, "api_keys": keys})
    return make_client(config)


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                            env=dict(os.environ, DB_PASSWORD="hunter2"),
                            stdin=subprocess.DEVNULL)
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def _get(client, pid: int, query: str, key: str = PLAIN):
    return client.simulate_get(f"/node/web-01/process/{pid}", query_string=query,
                               headers={"Authorization": f"Bearer {key}"})


def test_expanded_groups_are_passed_through(client, child) -> None:
    result = _get(client, child.pid, "expand=basic,fds,children&tree=2")
    assert result.status_code == 200, result.text
    process = result.json["results"][0]["process"]
    assert process["pid"] == child.pid and process["ppid"] == os.getpid()
    assert process["num_fds"] >= 3 and "fd_soft_limit" in process
    assert process["children"] == []
    assert "environ" not in process and "exe" not in process


def test_all_leaves_environ_out_for_a_key_without_the_permission(client, child) -> None:
    plain = _get(client, child.pid, "expand=all").json["results"][0]["process"]
    assert "environ" not in plain and "exe" in plain
    assert _get(client, child.pid, "expand=environ").status_code == 403
    allowed = _get(client, child.pid, "expand=all", key=ENVIRON).json["results"][0]["process"]
    assert allowed["environ"]["DB_PASSWORD"] == "***"


@pytest.mark.parametrize("query, complaint", [
    ("expand=nope", "unknown expand group 'nope'"),
    ("tree=9", "tree must be an integer from 1 to 3"),
    ("start_time=2026-01-15", "start_time must be an RFC 3339 timestamp"),
])
def test_bad_options_are_400_before_any_exporter_is_asked(client, query: str,
                                                          complaint: str) -> None:
    result = _get(client, 1, query)
    assert result.status_code == 400 and complaint in result.json["details"]


def test_start_time_of_another_process_is_a_404(client, child) -> None:
    started = _get(client, child.pid, "").json["results"][0]["process"]["start_time"]
    assert _get(client, child.pid, f"start_time={started}").status_code == 200
    other = _get(client, child.pid, "start_time=2001-09-09T01:46:40Z")
    assert other.status_code == 404
