"""GET /process with issue 11's search filters, against real child processes (and /proc)."""

from __future__ import annotations

import os
import socket

import falcon.testing
import psutil
import pytest

from exporter.app import create_app
from exporter.config import Config
from exporter.procs import STATE_WORDS, ProcfsReader
from exporter.search import CMDLINE_MATCH_MAX, container_of, unit_of
from procfleet.params import STATE_NAMES
from procfleet.testing import SPINNER, state_of, wait_until
from procfleet.timefmt import rfc3339


@pytest.fixture
def client() -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(Config(), reader=ProcfsReader()))


def pids(client: falcon.testing.TestClient, **params: str) -> set[int]:
    got = client.simulate_get("/process", params=params)
    assert got.status_code == 200, got.json
    return {p["pid"] for p in got.json["processes"]}


def test_cmdline_substring_and_regex_match_the_shown_command(client, children, marker):
    child = children.spawn(marker, "--mode=alpha")
    other = children.spawn(marker, "--mode=beta")
    assert pids(client, cmdline=f"{marker} --mode=alpha") == {child.pid}
    assert pids(client, cmdline=marker) == {child.pid, other.pid}
    assert pids(client, cmdline_re=f"{marker} --mode=(alpha|beta)$") == {child.pid, other.pid}
    assert pids(client, cmdline_re=f"{marker} --mode=b") == {other.pid}
    assert pids(client, cmdline=marker, name="no-such-name") == set()  # AND, not OR


def test_a_masked_secret_cannot_be_found_by_searching(client, children, marker):
    child = children.spawn(marker, "--password=hunter2", "postgres://bob:s3cret@db/x")
    shown = client.simulate_get(f"/process/{child.pid}").json["command"]
    assert "hunter2" not in shown and "s3cret" not in shown
    assert pids(client, cmdline=marker) == {child.pid}  # the process itself is searchable
    assert pids(client, cmdline="--password=***") >= {child.pid}  # what is shown matches
    # Neither the secret nor a prefix of it (a character-at-a-time guess) matches.
    for guess in ("hunter2", "--password=h", "--password=hunter", "bob:s3", "s3cret"):
        assert child.pid not in pids(client, cmdline=guess), guess
    for pattern in ("hunter2", "password=h", "password=[a-z]", "bob:s[0-9]", "bob:[^*]"):
        assert child.pid not in pids(client, cmdline_re=pattern), pattern


def test_state_ppid_rss_and_start_time(client, children, marker):
    sleeper = children.spawn(marker)
    spinner = children.spawn(marker, code=SPINNER)
    wait_until(lambda: state_of(spinner.pid) == "R", what="the spinner to run")
    mine = {sleeper.pid, spinner.pid}
    assert pids(client, cmdline=marker, state="running") & mine == {spinner.pid}
    assert pids(client, cmdline=marker, state="running,sleep") & mine == mine
    assert pids(client, ppid=str(os.getpid()), cmdline=marker) == mine
    assert pids(client, ppid="1", cmdline=marker) == set()
    rss = psutil.Process(sleeper.pid).memory_info().rss
    assert sleeper.pid in pids(client, cmdline=marker, min_rss=str(rss // 2))
    assert pids(client, cmdline=marker, min_rss=str(rss * 1000)) == set()
    created = psutil.Process(sleeper.pid).create_time()
    assert sleeper.pid in pids(client, cmdline=marker,
                               started_after=rfc3339(created - 120),
                               started_before=rfc3339(created + 120))
    assert sleeper.pid not in pids(client, cmdline=marker,
                                   started_before=rfc3339(created - 120))
    assert sleeper.pid not in pids(client, cmdline=marker,
                                   started_after="2099-01-01T00:00:00+02:00")


def test_port_finds_this_process_while_it_listens(client):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    probe.listen()
    try:
        port = probe.getsockname()[1]
        assert os.getpid() in pids(client, port=str(port))
        assert os.getpid() not in pids(client, port=str(port), cmdline="no-such-cmdline")
    finally:
        probe.close()
    assert os.getpid() not in pids(client, port=str(port))  # closed: no longer listening


def test_port_of_a_child(client, children, marker, tmp_path):
    where = tmp_path / "port"
    child = children.spawn(marker, str(where), code=(
        "import socket, sys, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "open(sys.argv[2] + '.tmp', 'w').write(str(s.getsockname()[1]))\n"
        "import os; os.rename(sys.argv[2] + '.tmp', sys.argv[2])\n"
        "while True: time.sleep(1)\n"))
    wait_until(where.exists, what="the child to listen")
    port = where.read_text()
    assert pids(client, port=port) == {child.pid}
    assert pids(client, port=port, state="zombie") == set()


def test_unit_and_container_from_cgroup_paths():
    assert unit_of(["/system.slice/nginx.service"]) == "nginx.service"
    assert unit_of(["/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service"]
                   ) == "foo.service"
    assert unit_of(["/", "/process_api/3b64"]) is None
    docker = "a" * 64
    assert container_of([f"/system.slice/docker-{docker}.scope"]) == docker
    assert container_of([f"/kubepods/burstable/pod1/cri-containerd-{docker}.scope"]) == docker
    assert container_of([f"/docker/{docker}"]) == docker
    assert container_of(["/system.slice/nginx.service", "/"]) is None


def test_unit_and_container_of_a_real_child(client, children, marker):
    """Whatever cgroup this machine puts us in, the filter agrees with the child's file."""
    child = children.spawn(marker)
    with open(f"/proc/{child.pid}/cgroup") as file:
        paths = [line.split(":", 2)[2] for line in file.read().splitlines()]
    unit, container = unit_of(paths), container_of(paths)
    if unit is not None:
        assert child.pid in pids(client, unit=unit, cmdline=marker)
    assert pids(client, unit="no-such-unit-here.service", cmdline=marker) == set()
    if container is not None:
        assert child.pid in pids(client, container=container[:6], cmdline=marker)
    other = "0" * 12 if container is None or not container.startswith("0") else "f" * 12
    assert pids(client, container=other, cmdline=marker) == set()


@pytest.mark.parametrize("params, parameter", [
    ({"cmdline": ""}, "cmdline"),
    ({"cmdline": "x" * 257}, "cmdline"),
    ({"cmdline_re": "(a)\\1"}, "cmdline_re"),  # a backreference: RE2 has none
    ({"cmdline_re": "(?=a)b"}, "cmdline_re"),
    ({"cmdline_re": "x" * 257}, "cmdline_re"),
    ({"cmdline_re": "("}, "cmdline_re"),
    ({"state": "sleeping"}, "state"),
    ({"state": "running,"}, "state"),
    ({"port": "0"}, "port"),
    ({"port": "65536"}, "port"),
    ({"port": "http"}, "port"),
    ({"unit": "nginx service"}, "unit"),
    ({"container": "ABC"}, "container"),
    ({"container": "g00d"}, "container"),
    ({"ppid": "-1"}, "ppid"),
    ({"min_rss": "1.5"}, "min_rss"),
    ({"started_before": "2026-01-15"}, "started_before"),
    ({"started_after": "2026-01-15T10:30:00"}, "started_after"),  # no offset
    ({"started_after": "2026-02-30T10:30:00Z"}, "started_after"),  # no such day
])
def test_bad_filters_are_a_400_naming_the_parameter(client, params, parameter):
    got = client.simulate_get("/process", params=params)
    assert got.status_code == 400, got.json
    assert parameter in got.json["details"]


def test_hostile_patterns_run_in_linear_time(client, children):
    """Patterns that take a backtracking engine exponential time are just patterns to RE2:
    a child with a long hostile command line is searched, and answered, like any other."""
    hostile = "a" * 5000 + "!"
    child = children.spawn(hostile)
    for pattern in ("(a+)+$", "(a|aa)*!b", "(a*)*!b", "(a|a?)+!b"):
        assert child.pid not in pids(client, cmdline_re=pattern), pattern
    assert child.pid in pids(client, cmdline_re="(a+)+!$")
    assert CMDLINE_MATCH_MAX >= len(hostile)


def test_state_words_are_the_exporters_words():
    assert set(STATE_NAMES) == set(STATE_WORDS.values())
