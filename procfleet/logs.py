"""Structured (logfmt) logging for both services: one `key=value` line per event."""

from __future__ import annotations

import logging
import re
import sys
import time


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


def setup_logging(level: str = "info") -> None:
    """Send every log line to stderr in logfmt at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # waitress logs each queue-depth warning at WARNING; keep those, drop its INFO chatter.
    logging.getLogger("waitress").setLevel(logging.WARNING)
