"""What the last call to each exporter showed: a small store the fan-out writes and /node reads.

Health is passive: `Lookup` records every fan-out result here (`record`), `GET /node` says
when each exporter last gave a valid answer and what its last failure was, and `_any` asks the
exporters last seen up first. `Discovery` forgets the exporters that leave the fleet
(`retain`), so the store holds at most one entry per known exporter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal

HealthStatus = Literal["unknown", "up", "down"]


@dataclass(frozen=True)
class Health:
    """What the last call to an exporter showed. Times are Unix seconds."""

    status: HealthStatus = "unknown"
    last_checked: float | None = None
    last_seen: float | None = None  # last valid answer
    last_error: str | None = None


class HealthStore:
    """The last `Health` of each exporter, by hostname; safe to use from any thread."""

    def __init__(self) -> None:
        self._health: dict[str, Health] = {}
        self._lock = threading.Lock()

    def get(self, hostname: str) -> Health:
        """The exporter's last health; `unknown` when it was never called."""
        return self._health.get(hostname, Health())

    def record(self, hostname: str, valid: bool, error: str | None, when: float | None = None
               ) -> None:
        """Note the outcome of one call to an exporter (valid answer or the failure)."""
        self.record_many(((hostname, valid, error),), when)

    def record_many(self, outcomes: Iterable[tuple[str, bool, str | None]],
                    when: float | None = None) -> None:
        """`record` for each (hostname, valid, error): a broadcast's results in one go."""
        now = time.time() if when is None else when
        up = Health("up", now, now, None)  # the same for every exporter that answered
        with self._lock:
            health = self._health
            for hostname, valid, error in outcomes:
                if valid:
                    health[hostname] = up
                else:
                    previous = health.get(hostname)
                    health[hostname] = Health("down", now,
                                              previous.last_seen if previous else None, error)

    def retain(self, hostnames: Collection[str]) -> None:
        """Forget every exporter not in `hostnames` (those that left the fleet)."""
        with self._lock:
            for hostname in set(self._health) - set(hostnames):
                del self._health[hostname]

    def __len__(self) -> int:
        return len(self._health)
