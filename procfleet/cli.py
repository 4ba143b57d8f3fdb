"""`procfleet`: the command-line client of the query service.

    procfleet get TARGET PID
    procfleet ps TARGET [--name NAME] [--user USER] [--sort cpu|mem|rss|start] [--limit N]
                 [--cmdline TEXT] [--cmdline-re RE2] [--state WORDS] [--port N] [--unit UNIT]
                 [--container ID] [--ppid N] [--min-rss BYTES] [--min-cpu PERCENT]
                 [--started-before TIME] [--started-after TIME] [--fleet]
    procfleet kill TARGET PID [--signal TERM] [--dry-run] [--batch 10%] [--yes]
    procfleet top TARGET [--limit N] [--interval S]

It calls `GET /node/{target}/process/{pid}` or `GET /node/{target}/process` and prints one
aligned table with a row per process, grouped by host, then a line per host that failed or
was skipped; `--json` prints the service's body unchanged. On a broadcast target (`_all`,
selectors) the answer is streamed (NDJSON, docs/api.md#streaming): on a terminal a progress
line counts hosts as they answer, piped the rows print as they come; a summary line says how
many hosts answered, found nothing, failed and were skipped. Only the standard library is used,
so the client installs anywhere Python does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn, TextIO

from procfleet import __version__

# Both are standard library only, so the client still installs anywhere Python does.
from procfleet.params import (
    EXPAND_NAMES,
    LIST_PARAMS,
    SORT_KEYS,
    TREE_MAX,
    ParamError,
    check_cmdline_re,
    check_container,
    check_expand,
    check_limit,
    check_number,
    check_percent,
    check_start_time,
    check_states,
    check_text,
    check_time,
    check_tree,
    check_unit,
)
from procfleet.streaming import NDJSON, TARGETED_HEADER

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 10.0

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_SERVICE = 3

COLUMNS = ("HOST", "PID", "NAME", "USER", "STATE", "CPU%", "NOW%", "MEM%", "RSS", "READ/s",
           "WRITE/s", "STARTED", "COMMAND")
# The process field each column after HOST shows; a test keeps it equal to PROCESS_FIELDS
# (but window_seconds: the exporter's rate interval, the same on every row of a host).
# CPU% is over the process's life, NOW% over the last window; blank where not measured yet.
COLUMN_FIELDS = {"PID": "pid", "NAME": "name", "USER": "user", "STATE": "state",
                 "CPU%": "cpu_percent", "NOW%": "cpu_percent_recent", "MEM%": "mem_percent",
                 "RSS": "mem_rss", "READ/s": "read_bytes_per_second",
                 "WRITE/s": "write_bytes_per_second", "STARTED": "start_time",
                 "COMMAND": "command"}
_RIGHT_ALIGNED = frozenset({"PID", "CPU%", "NOW%", "MEM%", "RSS", "READ/s", "WRITE/s"})

EPILOG = f"""\
targets:
  web-01              the exporter with this host name
  _any                any one healthy exporter
  _all                every exporter
  group:web           every exporter whose label group is web or starts with web.
  group:web,env:prod  the exporters matching all the selectors

environment:
  PROCFLEET_URL       query service URL when --url is not given (default {DEFAULT_URL})
  PROCFLEET_API_KEY   API key when --key is not given; sent as 'Authorization: Bearer'

exit status:
  0  something was found (hosts that failed or were skipped are listed after the table)
  1  nothing was found: no such process, no process matched, or no exporter matches TARGET
  2  usage error: bad arguments, or the service rejected the PID or TARGET (400)
  3  the query service failed or could not be reached: refused, timed out, 401/403, 5xx,
     or an answer that is not the documented JSON

examples:
  procfleet get web-01 1234
  procfleet ps group:web --name 'nginx*' --sort cpu --limit 5
  procfleet get web-01 1234 --expand all
  procfleet top group:web --limit 20
  PROCFLEET_URL=https://procfleet.example.net procfleet --json get _all 1 | jq .
"""


class CliError(Exception):
    """Ends the command with `message` on stderr and `status` as exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Reply:
    """An HTTP answer of the query service: status, raw body, and the body parsed as JSON."""

    status: int
    body: bytes
    data: Any


class _Parser(argparse.ArgumentParser):
    """argparse that exits with EXIT_USAGE and a one-line hint, never a traceback."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n"
                              f"Try '{self.prog} --help' for more.\n")


def build_parser() -> argparse.ArgumentParser:
    # Shared options may come before or after the command; SUPPRESS keeps a subcommand
    # from resetting what was given before it.
    common = _Parser(add_help=False)  # argparse's types want parents of the subparsers' class
    common.add_argument("--url", default=argparse.SUPPRESS, metavar="URL",
                        help=f"query service base URL (default: $PROCFLEET_URL, else "
                             f"{DEFAULT_URL})")
    common.add_argument("--key", default=argparse.SUPPRESS, metavar="KEY",
                        help="API key, sent as 'Authorization: Bearer KEY' (default: "
                             "$PROCFLEET_API_KEY; none when unset)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help=f"give up after this many seconds (default {DEFAULT_TIMEOUT:g})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the service's JSON body unchanged instead of a table")
    common.add_argument("--wide", action="store_true", default=argparse.SUPPRESS,
                        help="never cut the COMMAND column to the terminal width")

    parser = _Parser(
        prog="procfleet", parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Look up processes across the fleet through the procfleet query service.",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    get = commands.add_parser(
        "get", parents=[common], help="one process by PID on the targeted hosts",
        description="Show the process with this PID on every host TARGET selects.",
        epilog="exit status: 0 found on at least one host, 1 not found, 2 usage, "
               "3 service error")
    get.add_argument("target", metavar="TARGET",
                     help="a host name, _any, _all, or label selectors like group:web")
    get.add_argument("pid", metavar="PID", help="a process id (1 to 2147483647)")
    # Sent as typed: `all` stays `all`, which the service narrows to what the key may see.
    get.add_argument("--expand", metavar="GROUPS",
                     type=_checked(lambda text: check_expand(text) and text),
                     help="add groups and print a detail view per host: comma-separated "
                          f"{','.join(EXPAND_NAMES)}, or all")
    get.add_argument("--tree", metavar="N", type=_checked(check_tree),
                     help=f"with --expand children: generations of descendants, 1 to {TREE_MAX}")
    get.add_argument("--start-time", metavar="RFC3339", dest="start_time",
                     type=_checked(lambda text: check_start_time(text) and text),
                     help="only the process started at this time (as start_time shows it): "
                          "a reused pid is then not found")

    ps = commands.add_parser(
        "ps", parents=[common],
        help="list processes (filtered, sorted, top-N) on the targeted hosts",
        description="List the processes of every host TARGET selects, filtered and sorted "
                    "by each exporter.",
        epilog="exit status: 0 some process listed, 1 none matched, 2 usage, 3 service error")
    ps.add_argument("target", metavar="TARGET",
                    help="a host name, _any, _all, or label selectors like group:web")
    ps.add_argument("--name", metavar="NAME", type=_checked(check_text, "name"),
                    help="process name, exact or a glob like 'nginx*'")
    ps.add_argument("--user", metavar="USER", type=_checked(check_text, "user"),
                    help="only processes of this user")
    ps.add_argument("--sort", choices=SORT_KEYS,
                    help="largest first: cpu (over the process's life), cpu_recent (over the "
                         "exporters' last window: a real top), mem (percent), rss, or start "
                         "(newest first)")
    ps.add_argument("--limit", type=_checked(check_limit), metavar="N",
                    help="at most N processes per host (a top-N with --sort; with --fleet, "
                         "across all hosts)")
    ps.add_argument("--cmdline", metavar="TEXT", type=_checked(check_text, "cmdline"),
                    help="command line (as shown, masked) contains TEXT")
    ps.add_argument("--cmdline-re", metavar="RE2", type=_checked(check_cmdline_re, "cmdline_re"),
                    help="command line (as shown, masked) matches this RE2 pattern")
    ps.add_argument("--state", metavar="WORDS", type=_checked(check_states, "state"),
                    help="one or more states, comma-separated: running,blocked")
    ps.add_argument("--port", metavar="N", type=_int_check("port", 1, 65535),
                    help="listening on this TCP port")
    ps.add_argument("--unit", metavar="UNIT", type=_checked(check_unit, "unit"),
                    help="in this systemd unit (a bare name means NAME.service)")
    ps.add_argument("--container", metavar="ID", type=_checked(check_container, "container"),
                    help="in a container whose id starts with ID")
    ps.add_argument("--ppid", metavar="N", type=_int_check("ppid", 0, 2147483647),
                    help="child of this process id")
    ps.add_argument("--min-rss", metavar="BYTES", type=_int_check("min_rss", 0, 1 << 62),
                    help="at least this many bytes resident")
    ps.add_argument("--min-cpu", dest="min_cpu_recent", metavar="PERCENT",
                    type=_checked(check_percent, "min_cpu_recent"),
                    help="using at least this CPU%% over the exporters' last window "
                         "(cpu_percent_recent; 100 is one core)")
    ps.add_argument("--started-before", metavar="TIME", type=_checked(check_time,
                                                                      "started_before"),
                    help="started before this RFC 3339 time (2026-01-15T10:30:00Z)")
    ps.add_argument("--started-after", metavar="TIME", type=_checked(check_time,
                                                                     "started_after"),
                    help="started after this RFC 3339 time")
    ps.add_argument("--fleet", action="store_true",
                    help="rank across all targeted hosts: one top --limit by --sort")
    add_kill_command(commands, common)
    top = commands.add_parser(
        "top", parents=[common],
        help="the busiest processes on the targeted hosts, refreshed in place",
        description="The processes using the most CPU over the exporters' last window "
                    "(cpu_percent_recent) on every host TARGET selects, redrawn every "
                    "interval on a terminal and printed once when piped. Ctrl-C exits.",
        epilog="exit status: 0, 2 usage, 3 service error")
    top.add_argument("target", metavar="TARGET",
                     help="a host name, _any, _all, or label selectors like group:web")
    top.add_argument("--limit", type=_checked(check_limit), default=10, metavar="N",
                     help="processes shown, busiest first, over all hosts (default 10)")
    top.add_argument("--interval", type=_interval, default=2.0, metavar="S",
                     help="seconds between refreshes, 0.5 to 3600 (default 2)")
    return parser


TOP_COLUMNS = ("HOST", "PID", "USER", "NOW%", "RSS", "READ/s", "WRITE/s", "COMMAND")


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.5 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be seconds from 0.5 to 3600, got {text!r}")
    return value


def top_lines(rows: Sequence[Mapping[str, Any]], limit: int, width: int | None) -> list[str]:
    """The busiest `limit` of `rows` (all hosts together) by cpu_percent_recent, aligned."""
    busiest = sorted(rows, key=lambda r: -(r.get("cpu_percent_recent") or 0.0))[:limit]
    cells = [TOP_COLUMNS, *((
        _text(r.get("host")), _text(r.get("pid")), _text(r.get("user")),
        _percent(r.get("cpu_percent_recent")), human_bytes(r.get("mem_rss")),
        human_bytes(r.get("read_bytes_per_second")), human_bytes(r.get("write_bytes_per_second")),
        _text(r.get("command") or (f"[{r['name']}]" if r.get("name") else None)))
        for r in busiest)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TOP_COLUMNS) - 1)]
    lines = []
    for line in cells:
        text = "  ".join([*(cell.rjust(w) if name not in ("HOST", "USER") else cell.ljust(w)
                           for name, cell, w in zip(TOP_COLUMNS, line, widths, strict=False)),
                          line[-1]])
        if width and len(text) > width:
            text = text[: max(width - 1, 0)] + "…"
        lines.append(text.rstrip())
    return lines


def run_top(args: argparse.Namespace, base_url: str, key: str | None, timeout: float,
            out: TextIO) -> int:
    """`procfleet top`: redraw in place on a TTY until Ctrl-C; once when piped."""
    target = urllib.parse.quote(args.target, safe=":,_-.")
    path = f"/node/{target}/process?" + urllib.parse.urlencode(
        {"sort": "cpu_recent", "limit": str(args.limit)})
    tty = out.isatty()
    try:
        while True:
            results = check_reply(call_service(base_url, path, key=key, timeout=timeout),
                                  base_url)
            width = shutil.get_terminal_size().columns if tty else None
            lines = top_lines(rows_of(results, "processes"), args.limit, width)
            lines += problem_lines(results)
            if tty:
                out.write("\x1b[H\x1b[2J")  # home and clear: redraw in place
            out.write("\n".join(lines) + "\n")
            out.flush()
            if not tty:
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _checked(check: Callable[..., Any], *names: str) -> Callable[[str], Any]:
    """An argparse type from a procfleet.params check: the service's own rule, said early."""

    def convert(text: str) -> Any:
        try:
            return check(*names, text)
        except ParamError as exc:
            raise argparse.ArgumentTypeError(_text(str(exc))) from None

    return convert


def _int_check(name: str, low: int, high: int) -> Callable[[str], Any]:
    return _checked(lambda text: check_number(name, text, low, high))


# ps options are the list's query parameters (--state's words are joined by commas).
PS_PARAMS = LIST_PARAMS


# -- talking to the query service ----------------------------------------------------------

def request_path(args: argparse.Namespace) -> str:
    """The path and query string of the call `args` asks for."""
    target = urllib.parse.quote(args.target, safe=":,_-.")
    if args.command == "get":
        path = f"/node/{target}/process/{urllib.parse.quote(args.pid, safe='')}"
        options = {"expand": args.expand,
                   "tree": None if args.tree is None else str(args.tree),
                   "start_time": args.start_time}
        query = urllib.parse.urlencode({k: v for k, v in options.items() if v is not None})
        return path + (f"?{query}" if query else "")
    params: dict[str, Any] = {}
    for name in PS_PARAMS:
        value = getattr(args, name, None)
        if value is not None:
            params[name] = ",".join(value) if isinstance(value, tuple) else value
    if getattr(args, "fleet", False):
        params["scope"] = "fleet"
    query = urllib.parse.urlencode(params)
    return f"/node/{target}/process" + (f"?{query}" if query else "")


def is_broadcast(target: str) -> bool:
    """`_all` and label selectors ask many hosts; a hostname and `_any` ask one."""
    return target == "_all" or ":" in target


LINE_MAX_BYTES = 64 * 1024 * 1024  # one host's list: the service caps it at 16 MiB of JSON


def call_service(base_url: str, path: str, *, key: str | None, timeout: float,
                 body: bytes | None = None,
                 on_line: Callable[[Mapping[str, Any]], None] | None = None,
                 on_start: Callable[[int | None], None] | None = None) -> Reply:
    """GET `path` (POST `body`, JSON) from the query service; no answer is a CliError(3).

    With `on_line`, NDJSON is asked for: each result line of a streamed answer is handed to
    it as it arrives, and the Reply's data is `{"job_id", "results", "summary"}` at the end.
    `on_start` is told, when a stream starts, how many exporters it targets (if said).
    """
    url = base_url.rstrip("/") + path
    accept = f"{NDJSON}, application/json;q=0.9" if on_line else "application/json"
    headers = {"Accept": accept, "User-Agent": f"procfleet-cli/{__version__}"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, headers=headers, data=body,
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if on_line is not None and response.status == 200 and \
                    response.headers.get_content_type() == NDJSON:
                if on_start is not None:
                    on_start(_targeted(response.headers.get(TARGETED_HEADER)))
                return _read_stream(response, on_line)
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
        exc.close()
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            why = f"no answer within {timeout:g} s"
        else:
            why = getattr(reason, "strerror", None) or str(reason)
        raise CliError(f"cannot reach the query service at {base_url}: {why}",
                       EXIT_SERVICE) from None
    except TimeoutError:
        raise CliError(f"the query service at {base_url} gave no answer within {timeout:g} s",
                       EXIT_SERVICE) from None
    except OSError as exc:  # reset connections, TLS errors mid-read, ...
        raise CliError(f"talking to the query service at {base_url} failed: "
                       f"{exc.strerror or exc}", EXIT_SERVICE) from None
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    return Reply(status, body, data)


def _targeted(value: str | None) -> int | None:
    """The stream head's count of targeted exporters; None when absent or not a count."""
    if value is None or not value.isdigit() or len(value) > 9:
        return None
    return int(value)


def _read_stream(response: Any, on_line: Callable[[Mapping[str, Any]], None]) -> Reply:
    """The lines of a streamed answer: results to `on_line`, the summary kept; a Reply as if
    the whole had been one JSON answer (with `summary`). A stream cut before its summary
    line is a service failure."""
    results: list[Mapping[str, Any]] = []
    while True:
        line = response.readline(LINE_MAX_BYTES)
        if not line:
            raise CliError("the query service's stream ended before its summary line",
                           EXIT_SERVICE)
        try:
            item = json.loads(line)
        except ValueError:
            raise CliError("the query service streamed a line that is not JSON",
                           EXIT_SERVICE) from None
        if not isinstance(item, dict):
            raise CliError("the query service streamed a line that is not a JSON object",
                           EXIT_SERVICE)
        if "summary" in item and "hostname" not in item:
            data = {"job_id": item.get("job_id"), "results": results,
                    "summary": item["summary"]}
            return Reply(200, json.dumps(data).encode(), data)
        if not isinstance(item.get("hostname"), str):
            raise CliError("the query service streamed a result without a hostname",
                           EXIT_SERVICE)
        results.append(item)
        on_line(item)


def summary_line(results: Sequence[Mapping[str, Any]], field: str) -> str:
    """`1000 hosts: 996 answered (3 found nothing), 3 failed, 1 skipped`."""
    answered = failed = skipped = empty = 0
    for result in results:
        status = result.get("status")
        if status == "ok":
            answered += 1
            empty += not result.get(field)
        elif status == "skipped":
            skipped += 1
        elif result.get("error") == "process not found":
            answered += 1
            empty += 1
        else:
            failed += 1
    hosts = len(results)
    return (f"{hosts} host{'s' if hosts != 1 else ''}: {answered} answered "
            f"({empty} found nothing), {failed} failed, {skipped} skipped")


class Progress:
    """What a streamed answer shows while it arrives: on a terminal one progress line,
    rewritten in place (`37/1000 hosts, 2 failed`); piped, each host's rows as they come."""

    def __init__(self, out: TextIO, field: str, width: int | None) -> None:
        self.out = out
        self.field = field
        self.width = width
        self.tty = out.isatty()
        self.hosts = 0
        self.total: int | None = None  # targeted, when the service says
        self.failed = 0
        self.header = False

    def start(self, total: int | None) -> None:
        self.total = total

    def __call__(self, result: Mapping[str, Any]) -> None:
        self.hosts += 1
        if result.get("status") == "failed" and result.get("error") != "process not found":
            self.failed += 1
        if self.tty:
            hosts = f"{self.hosts}/{self.total}" if self.total else str(self.hosts)
            self.out.write(f"\r{hosts} hosts, {self.failed} failed\x1b[K")
            self.out.flush()
            return
        rows = rows_of([result], self.field)
        if rows:
            lines = format_table(rows, self.width)
            for line in lines if not self.header else lines[1:]:
                print(line, file=self.out)
            self.header = True
            self.out.flush()

    def done(self) -> None:
        if self.tty and self.hosts:
            self.out.write("\r\x1b[K")


# -- deciding what the answer means ----------------------------------------------------------

def check_reply(reply: Reply, base_url: str) -> list[Mapping[str, Any]]:
    """The results of a 200, or a CliError with the service's error and the exit status."""
    data = reply.data
    if reply.status == 200:
        if (isinstance(data, dict) and isinstance(data.get("results"), list)
                and all(isinstance(r, dict) and isinstance(r.get("hostname"), str)
                        for r in data["results"])):
            results: list[Mapping[str, Any]] = data["results"]
            return results
        raise CliError(f"the service at {base_url} answered 200 with a body that is not the "
                       "documented {job_id, results} JSON", EXIT_SERVICE)
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        message = data["error"]
        if data.get("details"):
            message += f": {data['details']}"
    else:
        message = f"HTTP {reply.status} without the documented error JSON"
    hint = {401: " (give an API key with --key or PROCFLEET_API_KEY)",
            403: " (the API key needs the process:read permission)"}.get(reply.status, "")
    status = {400: EXIT_USAGE, 404: EXIT_NOT_FOUND}.get(reply.status, EXIT_SERVICE)
    if status == EXIT_SERVICE:
        message = f"query service error {reply.status}: {message}"
    raise CliError(_text(message) + hint, status)


def rows_of(results: Sequence[Mapping[str, Any]], field: str) -> list[dict[str, Any]]:
    """(host, process) rows of the ok results, in the service's order (sorted by host)."""
    rows = []
    for result in results:
        if result.get("status") != "ok":
            continue
        found = result.get(field)
        processes = [found] if field == "process" else found
        for process in processes or ():
            if isinstance(process, dict):
                rows.append({"host": result["hostname"], **process})
    return rows


def problem_lines(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per host that failed or was skipped."""
    lines = []
    for result in results:
        status = result.get("status")
        if status != "ok":
            reason = _text(result.get("error", "no reason given"))
            lines.append(f"{_text(result['hostname'])}: {_text(status)}: {reason}")
    return lines


# -- formatting -------------------------------------------------------------------------------

def human_bytes(count: float | None) -> str:
    """1536 -> '1.5K', binary units as ps and top print them; '-' when unknown."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            if unit == "B":
                return f"{int(value)}B"
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _percent(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def _started(text: Any) -> str:
    """RFC 3339 start time as `2026-01-15 10:30:00` (UTC), or '-'."""
    if not isinstance(text, str):
        return "-"
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return _text(text)
    return when.strftime("%Y-%m-%d %H:%M:%S")


# Command lines may hold newlines, terminal escape sequences and bidi controls (argv is
# whatever a process was given; U+202E turns `gpj.exe` into `exe.jpg` on screen): every
# character Python does not call printable (C0 and C1 controls, Unicode format characters
# such as the bidi controls and zero-width ones, line and paragraph separators, unassigned
# and private-use code points, spaces other than ' ') is shown as an escape, so one process
# stays one line, reads in its real order, and cannot drive the terminal.
_SHORT_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(char: str) -> str:
    code = ord(char)
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: str) -> str:
    """`text` with every character that is not printable written as an escape (`\\u202e`)."""
    if text.isprintable():  # the common case: nothing to do
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else visible(str(value))


def visible_json(body: str) -> str:
    """A JSON document with its non-printable characters as `\\uXXXX` escapes: the same data.

    In valid JSON such characters can only stand inside strings, where the escape means the
    same character, so `jq` sees an identical document and the terminal sees no controls.
    """
    if body.isprintable():
        return body
    out = []
    for char in body:
        if char.isprintable() or char in " \t\n\r":
            out.append(char)
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:  # JSON spells astral characters as a UTF-16 surrogate pair
            high, low = divmod(ord(char) - 0x10000, 0x400)
            out.append(f"\\u{0xd800 + high:04x}\\u{0xdc00 + low:04x}")
    return "".join(out)


def table_row(row: Mapping[str, Any]) -> tuple[str, ...]:
    command = row.get(COLUMN_FIELDS["COMMAND"])
    if command == "" and row.get("name"):
        command = f"[{row['name']}]"  # a kernel thread, as ps shows it
    field = COLUMN_FIELDS
    return (_text(row["host"]), _text(row.get(field["PID"])), _text(row.get(field["NAME"])),
            _text(row.get(field["USER"])), _text(row.get(field["STATE"])),
            _percent(row.get(field["CPU%"])), _percent(row.get(field["NOW%"])),
            _percent(row.get(field["MEM%"])), human_bytes(row.get(field["RSS"])),
            human_bytes(row.get(field["READ/s"])), human_bytes(row.get(field["WRITE/s"])),
            _started(row.get(field["STARTED"])), _text(command))


def format_table(rows: Sequence[Mapping[str, Any]], width: int | None = None) -> list[str]:
    """Aligned lines, header first; COMMAND is last and cut to `width` when given."""
    cells = [COLUMNS, *(table_row(r) for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS) - 1)]
    lines = []
    for line in cells:
        parts = [cell.rjust(w) if name in _RIGHT_ALIGNED else cell.ljust(w)
                 for name, cell, w in zip(COLUMNS, line, widths, strict=False)]
        text = "  ".join([*parts, line[-1]])
        if width and len(text) > width:
            text = text[: max(width - 1, 0)] + "…"
        lines.append(text.rstrip())
    return lines


def _limit(value: Any) -> str:
    return "unlimited" if value is None else _text(value)


def _detail_value(name: str, value: Any) -> list[str]:
    """One field of the detail view as lines (nested groups spread over several)."""
    if name == "listening":
        return [f"{_text(s.get('proto'))} {_text(s.get('address'))}:{_text(s.get('port'))}"
                for s in value if isinstance(s, dict)] or ["-"]
    if name == "children":
        return [f"{_text(c.get('pid'))} {_text(c.get('name'))} (parent {_text(c.get('ppid'))})"
                for c in value if isinstance(c, dict)] or ["-"]
    if name == "limits" and isinstance(value, dict):
        return [f"{_text(k)}: soft {_limit(v.get('soft'))}, hard {_limit(v.get('hard'))}"
                for k, v in value.items() if isinstance(v, dict)]
    if isinstance(value, dict):
        return [f"{_text(k)}={_text(v)}" for k, v in value.items()] or ["-"]
    if name in ("mem_rss", "vms", "swap", "read_bytes", "write_bytes",
                "read_bytes_per_second", "write_bytes_per_second"):
        suffix = "/s" if name.endswith("per_second") else ""
        return [f"{human_bytes(value)}{suffix} ({_text(value)})"]
    return [_text(value)]


def detail_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The `get --expand` view: per host, one `field: value` line per field (not a table)."""
    lines: list[str] = []
    for row in rows:
        if lines:
            lines.append("")
        lines.append(f"{_text(row.get('host'))}  pid {_text(row.get('pid'))}")
        width = max(len(k) for k in row)
        for name, value in row.items():
            if name in ("host", "pid"):
                continue
            values = _detail_value(name, value)
            lines.append(f"  {name:<{width}}  {values[0] if values else '-'}")
            lines += [f"  {'':<{width}}  {more}" for more in values[1:]]
    return lines


def print_results(results: Sequence[Mapping[str, Any]], field: str, *, out: TextIO,
                  width: int | None, detail: bool = False) -> int:
    """Print the table and the failed/skipped lines; the exit status they imply."""
    rows = rows_of(results, field)
    if rows:
        for line in (detail_lines(rows) if detail else format_table(rows, width)):
            print(line, file=out)
    for line in problem_lines(results):
        print(line, file=out)
    return EXIT_OK if rows else EXIT_NOT_FOUND


def nothing_found_message(args: argparse.Namespace, results: Sequence[Mapping[str, Any]]
                          ) -> str:
    hosts = len(results)
    where = f"{hosts} host{'s' if hosts != 1 else ''}"
    ok = sum(1 for r in results if r.get("status") == "ok")
    not_found = sum(1 for r in results if r.get("error") == "process not found")
    silent = hosts - ok - not_found  # failed or skipped: they said nothing either way
    if args.command == "get":
        answered = ok + not_found
        if silent:
            return (f"process {_text(args.pid)} not found on the {answered} of {where} "
                    f"targeted by {args.target!r} that answered; {silent} did not answer "
                    "(failed or skipped)")
        return (f"process {_text(args.pid)} not found on any of {where} targeted by "
                f"{args.target!r}")
    if ok:
        if silent:
            return (f"no process matched on the {ok} of {where} targeted by "
                    f"{args.target!r} that answered; {silent} did not answer")
        return f"no process matched on {where} targeted by {args.target!r}"
    return f"no host targeted by {args.target!r} could list its processes ({where})"


# -- entry point -------------------------------------------------------------------------------

def run(argv: Sequence[str], *, out: TextIO, environ: Mapping[str, str]) -> int:
    """The whole command; returns the exit status (see EPILOG)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.command is None:
        parser.error("say what to do: 'get TARGET PID' or 'ps TARGET'")
    base_url = getattr(args, "url", None) or environ.get("PROCFLEET_URL") or DEFAULT_URL
    key = getattr(args, "key", None) or environ.get("PROCFLEET_API_KEY") or None
    timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
    as_json = getattr(args, "json", False)
    wide = getattr(args, "wide", False)

    scheme = urllib.parse.urlsplit(base_url)
    if scheme.scheme not in ("http", "https") or not scheme.netloc:
        raise CliError(f"--url / PROCFLEET_URL must be an http:// or https:// URL, "
                       f"got {base_url!r}", EXIT_USAGE)
    if not timeout > 0:
        raise CliError("--timeout must be more than 0 seconds", EXIT_USAGE)

    if args.command == "kill":
        return run_kill(args, base_url=base_url, key=key, timeout=timeout, out=out,
                        stdin=sys.stdin)
    if args.command == "top":
        return run_top(args, base_url, key, timeout, out)
    fleet = getattr(args, "fleet", False)
    if fleet and (args.sort is None or args.limit is None):
        raise CliError("--fleet ranks across hosts: give --sort and --limit too", EXIT_USAGE)
    field = "process" if args.command == "get" else "processes"
    width = None if wide or not out.isatty() else shutil.get_terminal_size().columns
    progress = None
    if is_broadcast(args.target) and not as_json and not fleet:
        progress = Progress(out, field, width)
    try:
        reply = call_service(base_url, request_path(args), key=key, timeout=timeout,
                             on_line=progress, on_start=progress.start if progress else None)
    finally:
        if progress is not None:
            progress.done()
    if as_json and reply.data is not None:
        out.write(visible_json(reply.body.decode("utf-8", errors="replace").rstrip("\n")) + "\n")
    results = check_reply(reply, base_url)
    if fleet and isinstance(reply.data, dict) and isinstance(reply.data.get("ranked"), list):
        results = _in_rank_order(results, reply.data["ranked"])
    if as_json:
        status = EXIT_OK if rows_of(results, field) else EXIT_NOT_FOUND
    elif progress is not None and not progress.tty and progress.hosts:
        # Piped and streamed: the rows are out already; the hosts' problems and the summary.
        status = EXIT_OK if rows_of(results, field) else EXIT_NOT_FOUND
        for line in problem_lines(results):
            print(line, file=out)
    else:
        width = None if wide or not out.isatty() else shutil.get_terminal_size().columns
        status = print_results(results, field, out=out, width=width,
                               detail=bool(getattr(args, "expand", None)))
    if not as_json and is_broadcast(args.target):
        print(summary_line(results, field), file=out)
    if status == EXIT_NOT_FOUND:
        raise CliError(nothing_found_message(args, results), EXIT_NOT_FOUND)
    return status


def _in_rank_order(results: Sequence[Mapping[str, Any]], ranked: Sequence[Any]
                   ) -> list[Mapping[str, Any]]:
    """A fleet ranking's results as one host-per-row list in the global order, so the table
    reads top to bottom (failed and skipped hosts after)."""
    by_host = {r["hostname"]: r for r in results}
    ordered: list[Mapping[str, Any]] = []
    for entry in ranked:
        if not isinstance(entry, dict):
            continue
        result = by_host.get(str(entry.get("hostname")))
        if result is None:
            continue
        process = next((p for p in result.get("processes") or () if isinstance(p, dict)
                        and p.get("pid") == entry.get("pid")), None)
        if process is not None:
            ordered.append({"hostname": result["hostname"], "status": "ok",
                            "processes": [process]})
    return ordered + [r for r in results if r.get("status") != "ok"]


# -- procfleet kill ----------------------------------------------------------------------------
# As procfleet.signals.SIGNAL_NAMES; repeated so the client needs only the standard library.
KILL_SIGNALS = ("TERM", "KILL", "HUP", "INT", "USR1", "USR2")
EXIT_REFUSED = 4  # kill: some host refused or failed; nothing else went wrong


def add_kill_command(commands: Any, common: argparse.ArgumentParser) -> None:
    """`procfleet kill TARGET PID [--signal TERM] [--dry-run] [--batch 10%] [--yes]`."""
    kill = commands.add_parser(
        "kill", parents=[common], help="signal a process on the targeted hosts, after a look",
        description="Look the process up, show what will be signalled, ask (on a terminal) "
                    "and send the signal with the start time seen, so a pid reused meanwhile "
                    "is not hit. Needs the process:read and process:execute permissions, and "
                    "exporters with actions.signal.enabled.",
        epilog="exit status: 0 signalled (or, --dry-run, would be) on every host that has "
               "the process, 1 not found, 2 usage or not confirmed, 3 service error, "
               "4 some host refused or failed")
    kill.add_argument("target", metavar="TARGET",
                      help="a host name, _all, or label selectors like group:web (not _any)")
    kill.add_argument("pid", metavar="PID", help="a process id (1 to 2147483647)")
    kill.add_argument("--signal", "-s", default="TERM", type=str.upper, choices=KILL_SIGNALS,
                      help="the signal (default TERM)")
    kill.add_argument("--dry-run", action="store_true",
                      help="check everything on every host and report; send nothing")
    kill.add_argument("--batch", metavar="N|P%",
                      help="signal the hosts N (or P percent) at a time, stopping at the first "
                           "batch with a failure")
    kill.add_argument("--yes", "-y", action="store_true",
                      help="do not ask for confirmation (required when stdin is not a terminal)")


def kill_body(args: argparse.Namespace, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The signal request for what the lookup showed: always with its start time."""
    starts = {row.get("start_time") for row in rows}
    names = {row.get("name") for row in rows}
    if len(starts) != 1 or None in starts:
        raise CliError(f"process {args.pid} started at different times on the targeted hosts "
                       "(or without a start time): signal one host at a time", EXIT_USAGE)
    body: dict[str, Any] = {"signal": args.signal, "start_time": starts.pop()}
    if len(names) == 1 and None not in names:
        body["match"] = {"name": names.pop()}
    if args.dry_run:
        body["dry_run"] = True
    if args.batch is not None:
        text = args.batch.strip()
        body["batch"] = text if text.endswith("%") else _batch_count(text)
    return body


def _batch_count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise CliError(f"--batch must be a number of hosts or a percentage like 10%, "
                       f"got {text!r}", EXIT_USAGE)
    return int(text)


def confirm(question: str, *, stdin: TextIO, out: TextIO) -> bool:
    """Ask on a terminal; anything but y/yes is no. Not a terminal: no (use --yes)."""
    if not stdin.isatty():
        raise CliError("stdin is not a terminal: pass --yes to signal without asking",
                       EXIT_USAGE)
    out.write(question + " [y/N] ")
    out.flush()
    answer = stdin.readline(64)
    return answer.strip().lower() in ("y", "yes")


def run_kill(args: argparse.Namespace, *, base_url: str, key: str | None, timeout: float,
             out: TextIO, stdin: TextIO) -> int:
    """Look up, show, confirm, signal, report; the exit status (see the kill epilog)."""
    target = urllib.parse.quote(args.target, safe=":,_-.")
    pid = urllib.parse.quote(args.pid, safe="")
    looked = check_reply(call_service(base_url, f"/node/{target}/process/{pid}", key=key,
                                      timeout=timeout), base_url)
    rows = rows_of(looked, "process")
    if not rows:
        raise CliError(f"process {args.pid} not found on any host targeted by "
                       f"{args.target!r}", EXIT_NOT_FOUND)
    body = kill_body(args, rows)
    verb = "Would send" if args.dry_run else "Sending"
    print(f"{verb} SIG{args.signal} to:", file=out)
    for line in format_table(rows):
        print(line, file=out)
    if not args.dry_run and not args.yes:
        hosts = len(rows)
        if not confirm(f"Send SIG{args.signal} to pid {args.pid} on {hosts} "
                       f"host{'s' if hosts != 1 else ''}?", stdin=stdin, out=out):
            raise CliError("not confirmed: nothing was signalled", EXIT_USAGE)
    reply = call_service(base_url, f"/node/{target}/process/{pid}/signal", key=key,
                         timeout=timeout, body=json.dumps(body).encode())
    if reply.status == 403:
        raise CliError("the API key may not signal: it needs the process:execute permission",
                       EXIT_SERVICE)
    results = check_reply(reply, base_url)
    for result in results:
        status = _text(result.get("status"))
        what = ("signalled" if result.get("changed") else
                "would be signalled" if status == "ok" else _text(result.get("error")))
        print(f"{_text(result['hostname'])}: {status}: {what}", file=out)
    if any(r.get("status") == "failed" for r in results):
        return EXIT_REFUSED
    if not any(r.get("status") == "ok" for r in results):
        raise CliError("nothing was signalled", EXIT_NOT_FOUND)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: `procfleet = procfleet.cli:main`."""
    try:
        return run(sys.argv[1:] if argv is None else argv, out=sys.stdout, environ=os.environ)
    except CliError as exc:
        sys.stdout.flush()
        print(f"procfleet: {visible(exc.message)}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("procfleet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `procfleet ps _all | head`: the reader left. Point stdout at /dev/null so the
        # flush at exit does not complain, and say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
