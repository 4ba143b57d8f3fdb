"""The HTTP conventions both services share: one error body, pid parsing, a JSON 500."""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

import falcon

from procfleet.timefmt import rfc3339 as rfc3339  # re-exported: query.app imports it here

PID_MAX = 2147483647
# GET /process and GET /node/{target}/process share these filter rules.
SORT_KEYS = ("cpu", "mem", "rss", "start")
LIST_LIMIT_MAX = 100_000
FILTER_MAX_LENGTH = 256
_PID_RE = re.compile(r"[0-9]{1,32}")


class PidError(ValueError):
    """A pid path segment that is not a decimal integer in 1..2147483647."""


def parse_pid(text: str) -> int:
    """Return the pid in `text`, or raise PidError saying why it is not one.

    Only plain ASCII decimal digits are accepted (`007` is 7): `+7`, `0x10`, `1.5` or `٣`
    (non-ASCII digits that int() would take) are refused rather than converted, and so is
    anything past 2147483647, never truncated. At most 32 characters are parsed.
    """
    if not _PID_RE.fullmatch(text):
        raise PidError(f"pid must be decimal digits 1 to {PID_MAX}, got {text[:32]!r}")
    pid = int(text)
    if not 1 <= pid <= PID_MAX:
        raise PidError(f"pid must be between 1 and {PID_MAX}, got {text[:32]!r}")
    return pid


def pid_or_400(text: str) -> int:
    """parse_pid for resources: a bad pid becomes a 400 with the standard body."""
    try:
        return parse_pid(text)
    except PidError as exc:
        raise falcon.HTTPBadRequest(title="invalid pid", description=str(exc)) from None


def error_body(status: int, error: str, details: str) -> dict[str, object]:
    """The one error shape of every procfleet API: all three keys always set."""
    return {"error": error, "details": details, "code": status}


def _status_code(exc: falcon.HTTPError) -> int:
    return int(str(exc.status).split(" ", 1)[0]) if not isinstance(exc.status, int) else exc.status


def serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Falcon error serializer: every HTTPError is written as {error, details, code} JSON."""
    code = _status_code(exc)
    phrase = HTTPStatus(code).phrase.lower() if code in HTTPStatus._value2member_map_ else "error"
    title = exc.title or phrase
    # Falcon's own titles look like "404 Not Found"; keep the words only.
    if title.split(" ", 1)[0] == str(code):
        title = phrase
    details = exc.description or title
    resp.content_type = falcon.MEDIA_JSON
    resp.media = error_body(code, title, details)


def install_error_handling(app: falcon.App, logger: logging.Logger) -> None:
    """Route every error through one serializer and turn surprises into a logged JSON 500."""

    def unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params) -> None:
        if isinstance(ex, falcon.HTTPError):
            raise ex
        logger.exception("unhandled error on %s %s", req.method, req.path)
        raise falcon.HTTPInternalServerError(
            title="internal error", description="the server failed; the error was logged"
        )

    app.add_error_handler(Exception, unexpected)
    app.set_error_serializer(serialize_error)
