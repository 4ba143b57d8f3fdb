"""`procfleet get|ps` run as users run it, against a real query service and real exporters.

The query service knows four hosts: itest-0 and itest-1 (real exporters), itest-2 (in
maintenance) and itest-3 (refuses connections). Children spawned by the session fixtures
are the processes looked up.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from integration_testing import (
    CHILD_MARKER,
    VENV_BIN,
    Groups,
    QueryService,
    spawn_child,
)

from procfleet.cli import (
    COLUMNS,
    CliError,
    Reply,
    check_reply,
    format_table,
    human_bytes,
    problem_lines,
    visible_json,
)
from procfleet.testing import spawn, terminate

CLI = str(VENV_BIN / "procfleet")


@dataclass(frozen=True)
class Run:
    status: int
    out: str
    err: str


def procfleet(*args: str, env: dict[str, str] | None = None, url: str | None = None,
              key: str | None = None, module: bool = False) -> Run:
    """Run the CLI in a fresh process; PROCFLEET_URL / PROCFLEET_API_KEY from url / key."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROCFLEET_")}
    if url is not None:
        environ["PROCFLEET_URL"] = url
    if key is not None:
        environ["PROCFLEET_API_KEY"] = key
    environ.update(env or {})
    argv = [sys.executable, "-m", "procfleet.cli"] if module else [CLI]
    done = subprocess.run([*argv, *args], capture_output=True, text=True, env=environ,
                          timeout=30)
    assert "Traceback" not in done.stderr, done.stderr
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def service(query_service: QueryService) -> dict[str, str]:
    """url and key for `procfleet()`: the real query service with a process:read key."""
    return {"url": query_service.url, "key": query_service.key}


def table(out: str) -> tuple[str, list[str], list[str]]:
    """(header, process rows, failed/skipped lines) of the CLI's table output; a broadcast's
    closing summary line (`4 hosts: 2 answered ...`) is none of them."""
    lines = [line for line in out.splitlines()
             if not re.match(r"^\d+ hosts?: \d+ answered \(", line)]
    assert lines and lines[0].split() == list(COLUMNS), out
    rows = [line for line in lines[1:] if not re.match(r"^\S+: (failed|skipped): ", line)]
    problems = [line for line in lines[1:] if line not in rows]
    return lines[0], rows, problems


def columns_aligned(header: str, rows: list[str], marker: str) -> None:
    """COMMAND starts at the same offset on every line: the table is aligned."""
    start = header.index("COMMAND")
    for row in rows:
        assert row.index(marker) >= start and row[start - 2:start] == "  ", (header, row)
        assert row[start] != " ", (header, row)


# -- get ---------------------------------------------------------------------------------

def test_get_prints_an_aligned_row_for_the_child(service: dict[str, str],
                                                 tagged_children: dict, groups: Groups) -> None:
    child = tagged_children["idle"][0]
    run = procfleet("get", "itest-0", str(child.pid), **service)
    assert run.status == 0, run.err
    header, rows, problems = table(run.out)
    assert problems == [] and len(rows) == 1
    cells = rows[0].split()
    assert cells[:2] == ["itest-0", str(child.pid)]
    assert cells[3] == pwd.getpwuid(os.getuid()).pw_name  # the user running the tests
    assert cells[4] in ("sleep", "running")
    assert re.fullmatch(r"\d+(\.\d)?[BKMGT]", cells[8]), cells[8]  # RSS in human units
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", cells[11]) and re.fullmatch(r"\d\d:\d\d:\d\d",
                                                                        cells[12])
    assert f"procfleet-itest-{groups.idle}" in rows[0]
    # The child's argv holds newlines: shown escaped, the process stays on one line.
    assert "time.sleep(0.2)\\n" in rows[0]
    columns_aligned(header, rows, str(sys.executable))
    assert run.err == ""


# Characters a process may put in its argv to fool a reader or drive the terminal: bidi
# overrides and isolates, a colour escape, a C1 CSI, zero-width and line-separator characters.
HOSTILE_ARGS = {"name\u202egpj.exe": "name\\u202egpj.exe",
                "\u2066isolated\u2069": "\\u2066isolated\\u2069",
                "\u200fmark\u061c": "\\u200fmark\\u061c",
                "\x1b[31mred": "\\x1b[31mred",
                "c1\x9bcsi": "c1\\x9bcsi",
                "zero\u200bwidth\u2028line": "zero\\u200bwidth\\u2028line"}


def test_controls_in_a_command_line_are_printed_escaped(service: dict[str, str]) -> None:
    """A real child with bidi and control characters in its argv, looked up through the real
    services: the table and --json show each as an escape, never the character itself."""
    tag = "hostile"
    child = spawn([sys.executable, "-c", "import time; time.sleep(60)", *HOSTILE_ARGS,
                   CHILD_MARKER + tag])
    try:
        run = procfleet("--wide", "get", "itest-0", str(child.pid), **service)
        assert run.status == 0, run.err
        raw = [c for c in run.out if not c.isprintable() and c != "\n"]
        assert raw == [], raw
        for shown in HOSTILE_ARGS.values():
            assert shown in run.out, (shown, run.out)
        as_json = procfleet("--json", "get", "itest-0", str(child.pid), **service)
        assert as_json.status == 0, as_json.err
        assert [c for c in as_json.out if not c.isprintable() and c != "\n"] == []
        # The same data for jq: the escapes decode to the very characters of the argv.
        command = json.loads(as_json.out)["results"][0]["process"]["command"]
        assert all(arg in command for arg in HOSTILE_ARGS)
    finally:
        terminate(child)


def test_every_printed_field_is_escaped() -> None:
    hostile = "a\u202eb\x1b]0;title\x07"
    row = {"host": hostile, "pid": 7, "name": hostile, "user": hostile, "state": hostile,
           "command": hostile, "start_time": hostile}
    lines = format_table([row], width=None)
    assert all(c.isprintable() for line in lines for c in line), lines
    assert lines[1].count("a\\u202eb\\x1b]0;title\\x07") == 6  # every text column
    [problem] = problem_lines([{"hostname": hostile, "status": "failed", "error": hostile}])
    assert problem.isprintable() and problem.count("\\u202e") == 2
    with pytest.raises(CliError) as caught:
        check_reply(Reply(500, b"", {"error": hostile, "details": hostile}), "http://q")
    assert caught.value.message.isprintable()
    body = json.dumps({"x": hostile + "\U0001f600\U000e0041"}, ensure_ascii=False)
    assert visible_json(body).isprintable()
    assert json.loads(visible_json(body)) == json.loads(body)


def test_get_on_a_broadcast_target_lists_every_host(service: dict[str, str],
                                                    tagged_children: dict) -> None:
    child = tagged_children["busy"][0]
    run = procfleet("get", "_all", str(child.pid), **service)
    assert run.status == 0, run.err
    _, rows, problems = table(run.out)
    # Piped, a broadcast streams: hosts come in the order they answer.
    assert sorted(row.split()[0] for row in rows) == ["itest-0", "itest-1"]
    problems = sorted(problems)
    assert problems[0] == "itest-2: skipped: exporter is in maintenance"
    assert problems[1].startswith("itest-3: failed: ")
    assert len(problems) == 2


def test_get_of_a_reaped_child_is_not_found(service: dict[str, str], groups: Groups) -> None:
    child = spawn_child(groups.idle)
    terminate(child)
    run = procfleet("get", "itest-0", str(child.pid), **service)
    assert run.status == 1
    assert run.out == ""
    assert run.err == "procfleet: process not found: " + run.err.split(": ", 2)[2]
    broadcast = procfleet("get", "group:itest", str(child.pid), **service)
    assert broadcast.status == 1
    assert "itest-0: failed: process not found" in broadcast.out
    # itest-2 is in maintenance and itest-3 refuses connections: never "not found" there.
    assert broadcast.err.strip() == (
        f"procfleet: process {child.pid} not found on the 2 of 4 hosts targeted by "
        "'group:itest' that answered; 2 did not answer (failed or skipped)")


def test_json_prints_the_service_body(service: dict[str, str], tagged_children: dict) -> None:
    child = tagged_children["idle"][1]
    run = procfleet("--json", "get", "group:itest.0", str(child.pid), **service)
    assert run.status == 0, run.err
    body = json.loads(run.out)
    assert set(body) == {"job_id", "results"}
    [result] = body["results"]
    assert result["hostname"] == "itest-0" and result["status"] == "ok"
    assert result["process"]["pid"] == child.pid
    assert set(result["process"]) <= {"pid", "name", "user", "state", "cpu_percent",
                                      "mem_percent", "mem_rss", "command", "start_time",
                                      "cpu_percent_recent", "read_bytes_per_second",
                                      "write_bytes_per_second", "window_seconds"}


def test_json_of_an_error_prints_the_error_body_and_fails(service: dict[str, str]) -> None:
    run = procfleet("get", "nosuchhost", "1", "--json", **service)
    assert run.status == 1
    body = json.loads(run.out)
    assert body["code"] == 404 and body["error"] == "target not found"
    assert run.err.startswith("procfleet: target not found")


# -- ps ----------------------------------------------------------------------------------

def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_ps_filters_and_sorts_by_cpu(service: dict[str, str], tagged_children: dict) -> None:
    busy = tagged_children["busy"][0]
    idle = {c.pid for c in tagged_children["idle"]}
    name = _comm(busy.pid)
    run = procfleet("ps", "itest-1", "--name", name, "--sort", "cpu", **service)
    assert run.status == 0, run.err
    header, rows, problems = table(run.out)
    assert problems == []
    pids = [int(row.split()[1]) for row in rows]
    assert busy.pid in pids and idle <= set(pids)
    cpu_at = header.index("CPU%") + len("CPU%")
    cpus = [float(row[:cpu_at].split()[-1]) for row in rows]
    assert cpus == sorted(cpus, reverse=True)
    assert pids.index(busy.pid) < min(pids.index(p) for p in idle)
    assert {row.split()[2] for row in rows} == {name}


def test_ps_limit_is_per_host_and_glob_names_work(service: dict[str, str],
                                                  tagged_children: dict) -> None:
    name = _comm(tagged_children["idle"][0].pid)
    run = procfleet("ps", "group:itest", "--name", name[:3] + "*", "--sort", "rss",
                    "--limit", "2", **service)
    assert run.status == 0, run.err
    _, rows, problems = table(run.out)
    hosts = [row.split()[0] for row in rows]
    # Piped, a broadcast streams: each host's rows come together, hosts in answer order.
    assert sorted(hosts) == ["itest-0", "itest-0", "itest-1", "itest-1"]
    assert hosts[0] == hosts[1] and hosts[2] == hosts[3]
    assert sorted(p.split(":")[0] for p in problems) == ["itest-2", "itest-3"]


def test_ps_with_no_match_exits_1(service: dict[str, str]) -> None:
    run = procfleet("ps", "itest-0", "--name", "no-such-process-name-xyz", **service)
    assert run.status == 1
    assert run.err.strip() == ("procfleet: no process matched on 1 host targeted by "
                               "'itest-0'")


def test_python_dash_m_works_too(service: dict[str, str], tagged_children: dict) -> None:
    run = procfleet("get", "itest-0", str(tagged_children["idle"][0].pid), module=True,
                    **service)
    assert run.status == 0, run.err


# -- configuration: flags beat the environment ------------------------------------------

def test_url_and_key_flags_beat_the_environment(query_service: QueryService,
                                                tagged_children: dict) -> None:
    pid = str(tagged_children["idle"][0].pid)
    run = procfleet("--url", query_service.url, "get", "itest-0", pid, "--key",
                    query_service.key, url="http://127.0.0.1:1", key="wrong")
    assert run.status == 0, run.err


# -- failures: the message on stderr, the documented exit status, never a traceback -----

@pytest.fixture
def silent_server() -> Iterator[str]:
    """A socket that accepts connections and never answers: a hung service."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(("args", "key", "status", "message"), [
    (["get", "itest-0", "abc"], "key", 2, "procfleet: invalid pid: "),
    (["get", "itest-0", "0"], "key", 2, "procfleet: invalid pid: "),
    (["get", "_bogus", "1"], "key", 2, "procfleet: invalid target: "),
    (["get", "nosuchhost", "1"], "key", 1, "procfleet: target not found: "),
    (["ps", "nosuchhost"], "key", 1, "procfleet: target not found: "),
    (["get", "itest-0", "1"], None, 3, "procfleet: query service error 401: "),
    (["get", "itest-0", "1"], "not-a-key", 3, "procfleet: query service error 401: "),
    (["ps", "itest-0"], "node_key", 3, "procfleet: query service error 403: "),
    (["get", "itest-3", "1"], "key", 3, "procfleet: query service error 500: "),
], ids=["pid-abc", "pid-0", "bad-target", "unknown-host", "ps-unknown-host", "no-key",
        "wrong-key", "no-permission", "exporter-down"])
def test_service_errors(args: list[str], key: str | None, status: int, message: str,
                        query_service: QueryService) -> None:
    api_key = getattr(query_service, key, key) if key else None
    run = procfleet(*args, url=query_service.url, key=api_key)
    assert run.status == status, (run.out, run.err)
    assert run.err.startswith(message), run.err
    assert run.err.count("\n") == 1, run.err  # one line
    assert run.out == ""
    if status == 3 and "401" in message:
        assert "PROCFLEET_API_KEY" in run.err


def test_unreachable_service_exits_3() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        run = procfleet("get", "web-01", "1", url=f"http://127.0.0.1:{port}")
    assert run.status == 3
    assert run.err == (f"procfleet: cannot reach the query service at http://127.0.0.1:{port}: "
                       "Connection refused\n")


def test_hung_service_times_out_with_exit_3(silent_server: str) -> None:
    run = procfleet("--timeout", "0.5", "get", "web-01", "1", url=silent_server)
    assert run.status == 3
    assert run.err.startswith("procfleet: ") and "0.5 s" in run.err, run.err


@pytest.mark.parametrize("args", [
    [], ["get"], ["get", "web-01"], ["ps", "web-01", "--sort", "bogus"],
    ["ps", "web-01", "--limit", "0"], ["ps", "web-01", "--limit", "x"], ["frobnicate"],
    ["--url", "ftp://example.net", "get", "web-01", "1"], ["--timeout", "0", "get", "a", "1"],
], ids=["nothing", "get-no-target", "get-no-pid", "bad-sort", "limit-0", "limit-x",
        "unknown-command", "bad-url", "timeout-0"])
def test_usage_errors_exit_2(args: list[str]) -> None:
    run = procfleet(*args, url="http://127.0.0.1:1")
    assert run.status == 2, (run.out, run.err)
    assert "procfleet" in run.err and run.out == ""


def test_help_documents_targets_environment_and_exit_status() -> None:
    run = procfleet("--help")
    assert run.status == 0
    for text in ("get", "ps", "PROCFLEET_URL", "PROCFLEET_API_KEY", "--json", "exit status",
                 "_all", "group:web", "3  the query service failed"):
        assert text in run.out, text
    ps_help = procfleet("ps", "--help").out
    for text in ("--name", "--user", "--sort", "{cpu,mem,rss,start,cpu_recent}", "--limit",
                 "--url"):
        assert text in ps_help, text


# -- formatting, on the CLI's own functions ---------------------------------------------

@pytest.mark.parametrize(("count", "text"), [
    (None, "-"), (0, "0B"), (1023, "1023B"), (1536, "1.5K"), (12 * 1024**2, "12M"),
    (5 * 1024**3 + 1, "5.0G"), (3 * 1024**5, "3072T"),
])
def test_human_bytes(count: int | None, text: str) -> None:
    assert human_bytes(count) == text


def test_table_cuts_the_command_to_the_width_and_marks_missing_fields() -> None:
    row = {"host": "h", "pid": 7, "name": "kworker/0:1", "command": ""}
    [header, line] = format_table([row], width=200)
    assert line.split() == ["h", "7", "kworker/0:1", *["-"] * 9, "[kworker/0:1]"]
    long = {"host": "h", "pid": 7, "name": "x", "command": "y" * 500}
    assert all(len(text) <= 80 for text in format_table([long], width=80))


def test_a_200_that_is_not_the_documented_shape_is_a_service_error() -> None:
    for data in (None, [], {"results": "x"}, {"results": [{"status": "ok"}]}):
        with pytest.raises(CliError) as caught:
            check_reply(Reply(200, b"", data), "http://q")
        assert caught.value.status == 3
    with pytest.raises(CliError) as caught:
        check_reply(Reply(502, b"<html>bad gateway</html>", None), "http://q")
    assert caught.value.status == 3
    assert "HTTP 502 without the documented error JSON" in caught.value.message


# -- top (issue 10) ---------------------------------------------------------------------------

def test_top_piped_prints_the_busiest_once(service: dict[str, str]) -> None:
    from procfleet.cli import TOP_COLUMNS

    run = procfleet("top", "_all", "--limit", "3", "--interval", "0.5", **service)
    assert run.status == 0, run.err
    lines = run.out.splitlines()
    assert lines[0].split() == list(TOP_COLUMNS)
    rows = [line for line in lines[1:] if not re.match(r"^\S+: (failed|skipped): ", line)]
    assert 1 <= len(rows) <= 3
    assert "\x1b[" not in run.out  # piped: no redraw codes


def test_top_orders_every_host_by_recent_cpu() -> None:
    from procfleet.cli import top_lines

    rows = [{"host": "a", "pid": 1, "cpu_percent_recent": 5.0, "command": "x"},
            {"host": "b", "pid": 2, "cpu_percent_recent": 150.0, "command": "y"},
            {"host": "a", "pid": 3, "command": "young"},  # no window yet: idle
            {"host": "b", "pid": 4, "cpu_percent_recent": 20.0, "command": "z"}]
    lines = top_lines(rows, 3, None)
    assert [line.split()[1] for line in lines[1:]] == ["2", "4", "1"]


def test_top_on_a_terminal_redraws_until_ctrl_c(service: dict[str, str]) -> None:
    import pty
    import select
    import signal
    import subprocess
    import time

    leader, follower = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROCFLEET_")}
    environ.update(PROCFLEET_URL=service["url"], PROCFLEET_API_KEY=service["key"])
    exe = os.path.join(os.path.dirname(sys.executable), "procfleet")
    proc = subprocess.Popen([exe, "top", "_all", "--interval", "0.5"], stdin=follower,
                            stdout=follower, stderr=follower, env=environ)
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while seen.count(b"\x1b[H\x1b[2J") < 2 and time.monotonic() < deadline:
            if select.select([leader], [], [], 1.0)[0]:
                seen += os.read(leader, 65536)
        assert seen.count(b"\x1b[H\x1b[2J") >= 2, seen[-500:]  # redrawn in place
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        while select.select([leader], [], [], 0)[0]:
            try:
                more = os.read(leader, 65536)
            except OSError:
                break
            if not more:
                break
            seen += more
        os.close(leader)
    assert b"Traceback" not in seen
