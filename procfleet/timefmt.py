"""Timestamps as the APIs write them. Standard library only: any layer may import it."""

from __future__ import annotations

import datetime as dt


def rfc3339(epoch: float) -> str:
    """Whole-second UTC timestamp with a Z suffix, e.g. 2026-01-15T10:30:00Z."""
    return dt.datetime.fromtimestamp(int(epoch), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
