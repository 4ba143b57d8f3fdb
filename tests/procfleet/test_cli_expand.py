"""`procfleet get --expand/--tree/--start-time` and its detail view (issue 10)."""

from __future__ import annotations

import pytest

from procfleet import cli


def _path(*argv: str) -> str:
    return cli.request_path(cli.build_parser().parse_args(["get", "_all", "12", *argv]))


def test_the_options_reach_the_request_as_typed() -> None:
    assert _path() == "/node/_all/process/12"
    assert _path("--expand", "all", "--tree", "2", "--start-time", "2026-01-15T10:30:00Z") == (
        "/node/_all/process/12?expand=all&tree=2&start_time=2026-01-15T10%3A30%3A00Z")


@pytest.mark.parametrize("argv", [["--expand", "bogus"], ["--tree", "4"],
                                  ["--start-time", "yesterday"]])
def test_bad_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["get", "_all", "12", *argv])
    assert caught.value.code == cli.EXIT_USAGE


def test_the_detail_view_shows_every_field_per_host() -> None:
    rows = [{"host": "web-01", "pid": 5, "name": "nginx", "mem_rss": 4096,
             "listening": [{"proto": "tcp", "address": "0.0.0.0", "port": 80},
                           {"proto": "udp6", "address": "::", "port": 53}],
             "children": [{"pid": 6, "name": "nginx", "ppid": 5}],
             "limits": {"open_files": {"soft": 1024, "hard": None}},
             "environ": {"LANG": "C\u202e"}, "write_bytes_per_second": 2048.0},
            {"host": "web-02", "pid": 5, "name": "other"}]
    lines = cli.detail_lines(rows)
    assert lines[0] == "web-01  pid 5"
    text = "\n".join(lines)
    for expected in ("tcp 0.0.0.0:80", "udp6 :::53", "6 nginx (parent 5)",
                     "open_files: soft 1024, hard unlimited", "2.0K/s (2048.0)", "4.0K (4096)",
                     "web-02  pid 5"):
        assert expected in text, expected
    assert "\u202e" not in text  # bidi controls escaped, as in the table
    assert lines.index("") == len(lines) - 3  # hosts apart by a blank line
