"""Masking credentials in command lines before they leave the host.

Command lines routinely carry secrets (`--password=…`, `PGPASSWORD=…`, `https://u:p@host`).
Each argument is matched against value patterns; the text captured by a pattern's group
named `value` becomes `***`. A flag that looks like a credential (`--password`, `--token`)
also masks the whole argument that follows it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

MASK = "***"
_CACHE_SIZE = 4096

_SECRET_WORD = (
    r"(?:pass(?:word|wd|phrase)?s?(?![a-z])|pwd(?![a-z])|secret|token|api[-_]?key|access[-_]?key"
    r"|private[-_]?key|credentials?|auth[-_]?token|authorization|session[-_]?key)"
)

DEFAULT_PATTERNS: tuple[str, ...] = (
    # name=value where the name contains a secret word: --password=x, token=x, PGPASSWORD=x,
    # MYSQL_PWD=x, -Djavax.net.ssl.keyStorePassword=x, api_key=x in a query string.
    rf"(?i)[\w.-]*{_SECRET_WORD}[\w.-]*=(?P<value>[^\s&]+)",
    # name:value pairs in one argument: password:hunter2
    rf"(?i)\b[\w.-]*{_SECRET_WORD}[\w.-]*:(?P<value>[^\s/@][^\s&]*)",
    # user:password@ in URLs of any scheme.
    r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:(?P<value>[^@\s/]+)@",
    # HTTP credentials passed as header arguments: "Authorization: Bearer x", "Basic x".
    r"(?i)\b(?:bearer|basic|token)\s+(?P<value>[A-Za-z0-9._~+/=-]+)",
)

DEFAULT_SECRET_FLAGS: tuple[str, ...] = (
    # A flag whose next argument is a secret: --password x, -password x, --api-key x.
    rf"(?i)--?[\w.-]*{_SECRET_WORD}[\w.-]*",
)


@dataclass(frozen=True)
class Masker:
    """Masks credential values in an argv. Call it: `masker(argv) -> argv`."""

    patterns: tuple[re.Pattern[str], ...]
    secret_flags: tuple[re.Pattern[str], ...]
    enabled: bool = True
    # Command lines repeat across lookups and scrapes; masking the same argv twice is waste.
    _cache: dict[tuple[str, ...], list[str]] = field(default_factory=dict, compare=False,
                                                     repr=False)

    @classmethod
    def build(cls, patterns: Sequence[str] = DEFAULT_PATTERNS,
              secret_flags: Sequence[str] = DEFAULT_SECRET_FLAGS,
              enabled: bool = True) -> Masker:
        return cls(tuple(re.compile(p) for p in patterns),
                   tuple(re.compile(p) for p in secret_flags), enabled)

    def __call__(self, argv: Sequence[str]) -> list[str]:
        if not self.enabled:
            return list(argv)
        key = tuple(argv)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._mask(argv)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = hit
        return list(hit)

    def _mask(self, argv: Sequence[str]) -> list[str]:
        out: list[str] = []
        mask_next = False
        for arg in argv:
            if mask_next and not arg.startswith("-"):
                out.append(MASK)
                mask_next = False
                continue
            mask_next = any(f.fullmatch(arg) for f in self.secret_flags)
            out.append(self.mask_arg(arg))
        return out

    def mask_arg(self, arg: str) -> str:
        for pattern in self.patterns:
            arg = _replace_value(pattern, arg)
        return arg


def _replace_value(pattern: re.Pattern[str], text: str) -> str:
    pieces: list[str] = []
    last = 0
    for match in pattern.finditer(text):
        start, end = match.span("value")
        if start < 0 or text[start:end] == MASK:
            continue
        pieces.append(text[last:start])
        pieces.append(MASK)
        last = end
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


def check_pattern(pattern: str) -> str | None:
    """Why `pattern` cannot be a value pattern (None when it can)."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return f"invalid regex: {exc}"
    if "value" not in compiled.groupindex:
        return "needs a group named 'value' (the part replaced by ***), e.g. token=(?P<value>\\S+)"
    return None
