"""The grammar of an exporter's hostname, one rule for the exporter and the query service.

A hostname starts with an ASCII letter or digit, goes on with letters, digits, `.`, `-` and
`_`, and is at most 253 characters (DNS's limit for a whole name). `.web` and `-web` are not
hostnames, nor is anything beginning with `_`: that prefix is reserved for target keywords
(`_any`, `_all`), so a hostname can never be mistaken for one. `_` inside a name is allowed:
container and NetBIOS names use it, and the exporter reports whatever the host calls itself.

    >>> hostname_problem("web-01.example.net") is None
    True
    >>> hostname_problem("-web")
    "must start with a letter or digit, got '-web'"
"""

from __future__ import annotations

import re

HOSTNAME_MAX_LENGTH = 253
RESERVED_PREFIX = "_"
GRAMMAR = "letters, digits, '.', '-' and '_', starting with a letter or digit"

_HOSTNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ALLOWED_RE = re.compile(r"[A-Za-z0-9._-]*")
_SHOWN = 64


def hostname_problem(text: str) -> str | None:
    """Why `text` is not a hostname, or None when it is one."""
    shown = repr(text[:_SHOWN])
    if not text:
        return "must not be empty"
    if len(text) > HOSTNAME_MAX_LENGTH:
        return f"must be at most {HOSTNAME_MAX_LENGTH} characters, got {len(text)}"
    if _HOSTNAME_RE.fullmatch(text):
        return None
    if text.startswith(RESERVED_PREFIX):
        return f"must start with a letter or digit ('_' begins target keywords), got {shown}"
    if _ALLOWED_RE.fullmatch(text):
        return f"must start with a letter or digit, got {shown}"
    return f"must be {GRAMMAR}, got {shown}"


def is_hostname(text: str) -> bool:
    """True when `text` may be an exporter's hostname (see the module's docstring)."""
    return len(text) <= HOSTNAME_MAX_LENGTH and bool(_HOSTNAME_RE.fullmatch(text))
