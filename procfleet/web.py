"""The HTTP conventions both services share: one error body, one query-parameter rule, pid
parsing, a JSON 500.

The rules themselves are plain functions elsewhere in procfleet (`procfleet.params`,
`procfleet.process`); this module only turns their errors into falcon's 400s.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, TypeAlias

import falcon

from procfleet.params import (
    LIST_PARAMS,
    LOOKUP_PARAMS,
    ListFilters,
    LookupOptions,
    ParamError,
    parse_list_filters,
    parse_lookup_options,
    single_values,
)
from procfleet.timefmt import rfc3339 as rfc3339  # re-exported: its old home

# falcon.App is generic in its request and response classes; both services use falcon's own.
App: TypeAlias = "falcon.App[falcon.Request, falcon.Response]"

PID_MAX = 2147483647
PARAM_ERROR = "invalid query parameter"
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


def read_body_or_413(req: falcon.Request, limit: int, what: str) -> bytes:
    """The request body, at most `limit` bytes; 413 naming `what` if it is longer.

    Content-Length decides before anything is read; the read has its own bound as well, so
    the limit does not rest on how the server filled in the length.
    """
    length = req.content_length
    if length is None or length <= limit:
        raw: bytes = req.bounded_stream.read(limit + 1)
        if len(raw) <= limit:
            return raw
    raise falcon.HTTPContentTooLarge(title="body too large",
                                     description=f"{what} is at most {limit} bytes")


class QueryParamRule:
    """Middleware: the one query-parameter rule of both services, on every routed endpoint.

    A resource lists the parameters it takes in `query_params` (none when it has no such
    attribute); any other parameter, or one given twice, is a 400 naming it (see
    procfleet.params). It runs after authentication: an unauthenticated client learns nothing
    about parameters.
    """

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         params: dict[str, Any]) -> None:
        if resource is None:  # no route matched: the 404 (or sink) says so
            return
        allowed: Sequence[str] = getattr(resource, "query_params", ())
        try:
            single_values(req.params, allowed)
        except ParamError as exc:
            raise falcon.HTTPBadRequest(title=PARAM_ERROR, description=str(exc)) from None


def list_filters_or_400(req: falcon.Request, allowed: Sequence[str] = LIST_PARAMS
                        ) -> ListFilters:
    """The list filters of a request (name, user, sort, limit, ...); a bad one is a 400."""
    try:
        return parse_list_filters(single_values(req.params, allowed))
    except ParamError as exc:
        raise falcon.HTTPBadRequest(title=PARAM_ERROR, description=str(exc)) from None


def lookup_options_or_400(req: falcon.Request) -> LookupOptions:
    """The options of a PID lookup (expand, tree, start_time); a bad one is a 400."""
    try:
        return parse_lookup_options(single_values(req.params, LOOKUP_PARAMS))
    except ParamError as exc:
        raise falcon.HTTPBadRequest(title=PARAM_ERROR, description=str(exc)) from None


def error_body(status: int, error: str, details: str) -> dict[str, object]:
    """The one error shape of every procfleet API: all three keys always set."""
    return {"error": error, "details": details, "code": status}


def serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Falcon error serializer: every HTTPError is written as {error, details, code} JSON."""
    code = exc.status_code
    phrase = HTTPStatus(code).phrase.lower() if code in HTTPStatus._value2member_map_ else "error"
    title = exc.title or phrase
    # Falcon's own titles look like "404 Not Found"; keep the words only.
    if title.split(" ", 1)[0] == str(code):
        title = phrase
    details = exc.description or title
    resp.content_type = falcon.MEDIA_JSON
    resp.media = error_body(code, title, details)


def install_error_handling(app: App, logger: logging.Logger) -> None:
    """Route every error through one serializer and turn surprises into a logged JSON 500."""

    # Falcon picks the handler of the most specific class, and HTTPError (with HTTPStatus)
    # has its own: an HTTPError never reaches this one.
    def unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception,
                   params: dict[str, Any]) -> None:
        logger.exception("unhandled error on %s %s", req.method, req.path)
        raise falcon.HTTPInternalServerError(
            title="internal error", description="the server failed; the error was logged"
        )

    app.add_error_handler(Exception, unexpected)
    app.set_error_serializer(serialize_error)
