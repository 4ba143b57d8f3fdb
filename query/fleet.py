"""The discovery model: an `Exporter`, the `Fleet` snapshot of them, and the merge of sources.

Nothing here does I/O. The sources that produce exporters are in `query.sources`; the
`Discovery` that polls them, merges and serves the current `Fleet` is in `query.discovery`
(docs/api.md, "Discovery").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from query.httpclient import ClientTLS


@dataclass(frozen=True)
class Exporter:
    """One exporter the query service may call: its name, base URL and labels.

    `source` is static, file_sd or prometheus; `origin` says where exactly (a file, a URL).
    `tls` says how an https exporter's certificate is checked (None: the system's CAs).
    """

    hostname: str
    url: str
    labels: Mapping[str, str] = field(default_factory=dict)
    maintenance: bool = False
    token: str | None = field(default=None, repr=False)
    source: str = "static"
    origin: str = ""
    tls: ClientTLS | None = None


@dataclass(frozen=True)
class SourceStats:
    """Reloads of one source so far, and when the last one succeeded (Unix seconds)."""

    successes: int = 0
    failures: int = 0
    last_success: float | None = None


class DiscoveryError(Exception):
    """A source could not produce its exporters, or the merged set is invalid."""


class Source(Protocol):
    """A discovery source.

    `poll(force)` returns the source's exporters when they may have changed since the last
    poll (always when `force`), None when they have not, or raises DiscoveryError.
    `interval` is the seconds between polls, None for "only on a reload".
    `required` sources must load at start; others may be unavailable then.
    """

    name: str
    interval: float | None
    required: bool

    def poll(self, force: bool) -> Sequence[Exporter] | None: ...


@dataclass(frozen=True)
class Fleet:
    """An immutable snapshot of the known exporters, sorted by hostname."""

    exporters: tuple[Exporter, ...]
    by_hostname: Mapping[str, Exporter]

    @classmethod
    def of(cls, exporters: Iterable[Exporter]) -> Fleet:
        ordered = tuple(sorted(exporters, key=lambda e: e.hostname))
        return cls(ordered, {e.hostname: e for e in ordered})


def merge(latest: Mapping[str, Sequence[Exporter]]) -> list[Exporter]:
    """Every source's exporters as one list; DiscoveryError when a hostname comes twice."""
    merged: dict[str, Exporter] = {}
    for exporters in latest.values():
        for exporter in exporters:
            other = merged.get(exporter.hostname)
            if other is not None:
                raise DiscoveryError(
                    f"hostname {exporter.hostname!r} is defined by both {_where(other)} "
                    f"and {_where(exporter)}")
            merged[exporter.hostname] = exporter
    return list(merged.values())


def _where(exporter: Exporter) -> str:
    return f"{exporter.source} ({exporter.origin})" if exporter.origin else exporter.source
