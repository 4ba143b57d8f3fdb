"""The signal action's request rules, shared by the exporter, the query service and the CLI.

Standard library only, so every layer may import it (docs/api.md#signal-a-process). Each
`check_*` function returns the clean value or raises `SignalRequestError` naming the field;
the services turn that into their 400.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, TypedDict

# The signals the action may send, by the names the API uses (no SIG prefix). A short list on
# purpose: STOP/CONT, SEGV and friends are debugging tools, not fleet operations.
SIGNAL_NAMES = ("TERM", "KILL", "HUP", "INT", "USR1", "USR2")
# RFC 3339 in whole seconds, UTC, as the process object's start_time is written.
_START_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
NAME_MAX_LENGTH = 256  # as a list filter (procfleet.web.FILTER_MAX_LENGTH)
BODY_MAX_BYTES = 4096  # a signal request is a few dozen bytes; anything bigger is refused
AUDIT_TEXT_MAX = 128  # job ids and key names relayed to an exporter's audit log
# The body keys both services take; each adds its own (the query service its rollout, the
# exporter the job id and key it is relayed).
COMMON_KEYS = frozenset({"signal", "start_time", "match", "dry_run"})


class SignalRequestError(ValueError):
    """A signal request body that breaks the rules; the message names the field."""


def check_signal(value: Any) -> str:
    """The signal name (`TERM`, ...); absent or anything else is an error."""
    if value is None:
        raise SignalRequestError(f"signal is required: one of {', '.join(SIGNAL_NAMES)}")
    if not isinstance(value, str) or value not in SIGNAL_NAMES:
        shown = repr(value[:32]) if isinstance(value, str) else type(value).__name__
        raise SignalRequestError(f"signal must be one of {', '.join(SIGNAL_NAMES)}, "
                                 f"got {shown}")
    return value


def check_start_time(value: Any) -> str | None:
    """None, or an RFC 3339 UTC time in whole seconds (`2026-01-15T10:30:00Z`)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _START_TIME.fullmatch(value):
        raise SignalRequestError("start_time must be the process's start_time as the lookup "
                                 "shows it, like 2026-01-15T10:30:00Z")
    return value


def check_match(value: Any) -> str | None:
    """The process name of `"match": {"name": ...}`, or None when no match is given."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {"name"}:
        raise SignalRequestError('match must be {"name": "<process name>"}')
    name = value["name"]
    if not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX_LENGTH:
        raise SignalRequestError(f"match.name must be 1 to {NAME_MAX_LENGTH} characters")
    return name


def check_bool(value: Any, key: str) -> bool:
    """A JSON boolean, absent meaning false."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SignalRequestError(f"{key} must be true or false")
    return value


def check_object(data: Any, allowed: frozenset[str]) -> Mapping[str, Any]:
    """The decoded body as an object with only `allowed` keys."""
    if not isinstance(data, dict):
        raise SignalRequestError('the body must be a JSON object like {"signal": "TERM"}')
    unknown = sorted(k for k in data if k not in allowed)
    if unknown:
        raise SignalRequestError(f"unknown key {unknown[0][:64]!r}: use "
                                 f"{', '.join(sorted(allowed))}")
    return data


def decode_body(raw: bytes, allowed: frozenset[str]) -> Mapping[str, Any]:
    """The request body decoded as a JSON object with only `allowed` keys."""
    try:
        decoded = json.loads(raw) if raw else None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise SignalRequestError("the body is not valid JSON") from None
    return check_object(decoded, allowed)


class CommonFields(TypedDict):
    """The checked COMMON_KEYS, named as both services' SignalRequest names them."""

    signal: str
    start_time: str | None
    name: str | None
    dry_run: bool


def check_common(data: Mapping[str, Any]) -> CommonFields:
    """The COMMON_KEYS of a decoded body, each checked (signal first)."""
    return CommonFields(signal=check_signal(data.get("signal")),
                        start_time=check_start_time(data.get("start_time")),
                        name=check_match(data.get("match")),
                        dry_run=check_bool(data.get("dry_run"), "dry_run"))
