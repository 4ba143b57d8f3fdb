"""logfmt lines: one event per line, whatever a request path or process name holds."""

from __future__ import annotations

import logging

import pytest

from procfleet.logs import LogfmtFormatter


def line(msg: str, **fields: object) -> str:
    record = logging.LogRecord("procfleet.t", logging.INFO, __file__, 1, msg, None, None)
    record.fields = fields
    return LogfmtFormatter().format(record)


@pytest.mark.parametrize("value, shown", [
    ("plain", "path=plain"),
    ("a b", 'path="a b"'),
    ('say "hi"', 'path="say \\"hi\\""'),
    ("x\nlevel=error forged", 'path="x\\nlevel=error forged"'),
    ("cr\rhere", 'path="cr\\rhere"'),
    ("esc\x1b[31mred", 'path="esc\\x1b[31mred"'),
    ("", 'path=""'),
])
def test_values_are_quoted_and_escaped(value, shown):
    text = line("request", path=value)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert text.endswith(shown)


def test_line_shape():
    text = line("hello world", job_id="abc")
    assert text.startswith("ts=")
    assert text.split(" ", 1)[1] == 'level=info logger=procfleet.t msg="hello world" job_id=abc'
