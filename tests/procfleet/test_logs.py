"""logfmt lines: one event per line, whatever a request path or process name holds."""

from __future__ import annotations

import logging
import threading

import pytest

from procfleet.logs import BackgroundWriter, LogfmtFormatter


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


class _StuckStream:
    """A stderr that blocks in write() until released, as a full pipe does."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.text: list[str] = []

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(timeout=30)
        self.text.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_a_stuck_stderr_costs_bounded_memory_and_the_drops_are_reported():
    stream = _StuckStream()
    writer = BackgroundWriter(stream, max_lines=100)
    writer.setFormatter(LogfmtFormatter())
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "line", None, None)
    writer.handle(record)
    assert stream.entered.wait(timeout=10)  # the writer thread now hangs in write()
    for _ in range(1000):
        writer.handle(record)
    assert writer._lines.qsize() == 100  # the bound, reached
    assert writer.dropped == 900
    stream.release.set()
    writer.close()
    lines = "".join(stream.text).splitlines()
    assert len(lines) == 1 + 100 + 1
    assert 'msg="log writer fell behind; dropped 900 lines"' in lines[-1]
