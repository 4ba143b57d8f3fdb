"""Structured (logfmt) logging for both services: one `key=value` line per event."""

from __future__ import annotations

import argparse
import logging
import queue
import re
import sys
import threading
import time
from typing import TextIO

# The `log_level` values of both services' configs and their --log-level.
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_log_level_flag(parser: argparse.ArgumentParser) -> None:
    """`--log-level LEVEL`, as both services take it: it beats the file's `log_level`."""
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        help="log verbosity (default: info, or log_level from the file)")


class LogfmtFormatter(logging.Formatter):
    """Render records as `ts=… level=… logger=… msg="…" key=value …`.

    Extra fields come from `extra={"fields": {...}}` so a log line can carry a request id or
    an exporter name that log shippers can index.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        for key, value in getattr(record, "fields", {}).items():
            parts.append(f"{key}={_quote(str(value))}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


_PLAIN = re.compile(r'[^\s"=\\\x00-\x1f\x7f]+')
_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')


def _quote(text: str) -> str:
    if _PLAIN.fullmatch(text):
        return text
    # Escape quotes, backslashes and every control character: a request path or process
    # name must not be able to forge a log line or a terminal escape.
    return '"' + _ESCAPE.sub(_escape_char, text) + '"'


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\t": "\\t", "\r": "\\r", '"': '\\"', "\\": "\\\\"}.get(
        char, f"\\x{ord(char):02x}")


MAX_QUEUED_LINES = 10_000


class BackgroundWriter(logging.Handler):
    """Formats in the caller, writes from one thread: request threads never wait on stderr.

    Under load a plain StreamHandler makes every request thread queue on one lock while
    another writes its line, a system call each. Here a line is a queue put, and the writer
    thread sends whatever has queued up in one write. `close()` (run by logging at exit)
    writes what is left. At most `max_lines` wait: when stderr is slower than the lines come
    (a blocked pipe, a stalled journald), later lines are dropped and counted, and the count
    is written as a line of its own once the writer catches up, so memory stays bounded.
    """

    def __init__(self, stream: TextIO, max_lines: int = MAX_QUEUED_LINES) -> None:
        super().__init__()
        self._stream = stream
        self._lines: queue.Queue[str | None] = queue.Queue(maxsize=max_lines)
        self.dropped = 0
        self._thread = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: the queue is thread-safe, and the lock is what threads queued on.
        if not self.filter(record):
            return False
        try:
            self._lines.put_nowait(self.format(record))
        except queue.Full:
            self.dropped += 1  # not exact under races between threads; a count to report
        except Exception:
            self.handleError(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def _write(self) -> None:
        while True:
            line = self._lines.get()
            batch = []
            while line is not None:
                batch.append(line)
                try:
                    line = self._lines.get_nowait()
                except queue.Empty:
                    break
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                batch.append(f'level=warning logger={__name__} msg="log writer fell behind; '
                             f'dropped {dropped} lines"')
            if batch:
                try:
                    self._stream.write("\n".join(batch) + "\n")
                    self._stream.flush()
                except (OSError, ValueError):
                    pass  # stderr closed: nothing useful left to do with a log line
            if line is None:
                return

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._lines.put(None, timeout=5)
            except queue.Full:
                pass  # the writer is stuck on its stream; do not hang the exit on it
            self._thread.join(timeout=5)
        super().close()


def setup_logging(level: str = "info") -> None:
    """Send every log line to stderr in logfmt at `level`."""
    handler = BackgroundWriter(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # waitress logs each queue-depth warning at WARNING; keep those, drop its INFO chatter.
    logging.getLogger("waitress").setLevel(logging.WARNING)
