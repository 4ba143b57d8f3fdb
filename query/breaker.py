"""Keep one bad exporter from taking the query service's threads: a breaker and a bulkhead.

Every exporter call passes through `Guards`, which keeps, per exporter hostname:

    a circuit breaker  closed: calls go through. An exporter timeout, or `failures_to_open`
                       connection failures in a row, opens it for `cooldown` seconds, during
                       which calls fail at once ("circuit open after timeout at 10:30:00Z;
                       retrying in 4.2 s"). Then it is half-open: ONE call goes through as a
                       probe while the others still fail at once; an answer (any answer: the
                       exporter is responsive) closes it, a failure opens it again.
    a bulkhead         at most `max_waiting` requests (each holds one of the service's
                       threads) may wait on one exporter at a time once it is stalled (none
                       of its requests finished for `slow_after` seconds, or for
                       STALL_FACTOR times its slowest answer of the last LATENCY_WINDOW
                       seconds if that is longer: an exporter whose answers take 300 ms now
                       and then under load is not stalled after 50 ms); beyond that a
                       request fails at once for that exporter. This is what keeps threads
                       free for /healthz and healthy hosts before the first timeout opens the
                       circuit. An exporter that keeps answering is not stalled: a request
                       over the bound waits (at most its patience) for one to finish, so a
                       burst on one healthy host is served, not refused.

State is kept only for exporters that have something to remember (a request waiting, a
failure counted, an open circuit, an answer time of the last LATENCY_WINDOW seconds), at
most `max_entries` of them (least recently used first out), and `retain()` drops exporters
that left discovery. Thread-safe: request threads and the fan-out loop both use one instance.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from procfleet.timefmt import rfc3339

# An exporter is stalled when silent this many times longer than its slowest recent answer
# took (answers of the last LATENCY_WINDOW seconds).
STALL_FACTOR = 2.0
LATENCY_WINDOW = 10.0

# What a finished call says about the exporter's liveness.
Outcome = Literal["answered", "timeout", "connect_failed", "inconclusive"]


@dataclass(slots=True)
class _State:
    progress: float  # monotonic: when a request on it last finished, or the first came
    waiting: int = 0
    failures: int = 0  # consecutive connection failures
    open_until: float = 0.0  # monotonic; 0 when closed
    # "circuit open after timeout at 10:30:00Z", made once when it opens: while open, every
    # request on the exporter is refused with it, thousands a second under a flood.
    opened: str = ""
    probing: bool = False
    slowest: float = 0.0  # seconds: its slowest answer since `slowest_at` (0: none yet)
    slowest_at: float = 0.0  # monotonic

    def patience(self, slow_after: float) -> float:
        """How long it may go without a request finishing before it counts as stalled."""
        return max(slow_after, STALL_FACTOR * self.slowest)

    def answered_in(self, seconds: float, now: float) -> None:
        if seconds >= self.slowest or now - self.slowest_at > LATENCY_WINDOW:
            self.slowest, self.slowest_at = seconds, now

    def idle(self) -> bool:
        """Nothing to remember: no request waiting, no failure, no answer time that still
        counts (within LATENCY_WINDOW)."""
        return not (self.waiting or self.failures or self.open_until or self.probing
                    or (self.slowest and time.monotonic() - self.slowest_at <= LATENCY_WINDOW))


class Guards:
    """Per-exporter circuit breakers and bulkheads, bounded in count."""

    def __init__(self, *, max_waiting: int, cooldown: float = 5.0, failures_to_open: int = 3,
                 slow_after: float = 0.05, max_entries: int = 65_536) -> None:
        if min(max_waiting, cooldown, failures_to_open, slow_after, max_entries) <= 0:
            raise ValueError("guard limits must be positive")
        self.max_waiting = max_waiting
        self.cooldown = cooldown
        self.failures_to_open = failures_to_open
        self.slow_after = slow_after
        self.max_entries = max_entries
        self._states: OrderedDict[str, _State] = OrderedDict()
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)  # a waiting request left some exporter
        self._blocked = 0  # threads waiting on `_freed`

    def __len__(self) -> int:
        return len(self._states)

    def waiting(self) -> int:
        """Requests counted by `enter()` and not yet `leave()`d, on every exporter."""
        with self._lock:
            return sum(state.waiting for state in self._states.values())

    def enter(self, hostname: str, *, block: bool = True) -> str | None:
        """Count a request as waiting on `hostname`; the reason instead if it must fail fast.

        Over the bound on an exporter that is not stalled, waits (at most `slow_after`) for
        another request to leave, or with `block=False` (the event loop cannot wait) is let
        in anyway. A None answer must be matched by one `leave()`.
        """
        now = time.monotonic()
        with self._lock:
            state = self._states.get(hostname)
            if state is None:
                state = self._states[hostname] = _State(progress=now)
                if len(self._states) > self.max_entries:
                    self._states.popitem(last=False)
            else:
                self._states.move_to_end(hostname)
            while True:
                refused = self._refusal(state, now)
                if refused is not None or state.waiting < self.max_waiting:
                    break
                stalled = now - state.progress
                patience = state.patience(self.slow_after)
                if stalled >= patience:
                    refused = (f"{state.waiting} requests already wait on this exporter and "
                               f"none finished for {stalled:.2f} s (at most "
                               f"{self.max_waiting} may wait); not asked")
                    break
                if not block:
                    break
                self._blocked += 1
                try:
                    self._freed.wait(patience - stalled)
                finally:
                    self._blocked -= 1
                now = time.monotonic()
            if refused is None:
                if not state.waiting:
                    state.progress = now  # the first to wait: the clock starts
                state.waiting += 1
            elif state.idle() and self._states.get(hostname) is state:
                del self._states[hostname]
            return refused

    def leave(self, hostname: str) -> None:
        """The request counted by `enter()` no longer waits on `hostname`."""
        with self._lock:
            state = self._states.get(hostname)
            if state is None:
                return  # dropped meanwhile (left discovery, or pushed out of the bound)
            state.waiting = max(0, state.waiting - 1)
            state.progress = time.monotonic()
            if state.idle():
                del self._states[hostname]
            if self._blocked:
                self._freed.notify_all()

    def start_call(self, hostname: str) -> str | None:
        """Before a real call: None to go ahead (perhaps as the probe), else why not.

        Requests that share another's call in flight do not start one, so they skip this.
        """
        now = time.monotonic()
        with self._lock:
            state = self._states.get(hostname)
            if state is None:
                return None
            refused = self._refusal(state, now)
            if refused is None and state.open_until:
                state.probing = True  # half-open: this call is the one probe
            return refused

    def finish_call(self, hostname: str, outcome: Outcome, seconds: float | None = None
                    ) -> None:
        """What a call started with `start_call()` came to, and how long it took."""
        with self._lock:
            state = self._states.get(hostname)
            if state is None:
                if outcome == "answered" or outcome == "inconclusive":
                    return
                state = self._states[hostname] = _State(progress=time.monotonic())
                if len(self._states) > self.max_entries:
                    self._states.popitem(last=False)
            state.probing = False
            if outcome == "answered":
                state.failures = 0
                state.open_until = 0.0
                if seconds is not None:
                    state.answered_in(seconds, time.monotonic())
            elif outcome == "timeout":
                self._open(state, "timeout")
            elif outcome == "connect_failed":
                state.failures += 1
                if state.failures >= self.failures_to_open or state.open_until:
                    self._open(state, f"{state.failures} failed connections")
            if state.idle():
                del self._states[hostname]

    def retain(self, hostnames: Collection[str]) -> None:
        """Forget every exporter not in `hostnames` (those that left discovery)."""
        with self._lock:
            for hostname in [h for h in self._states if h not in hostnames]:
                del self._states[hostname]

    def is_open(self, hostname: str) -> bool:
        """True while calls to `hostname` fail at once (open, or half-open with a probe out)."""
        with self._lock:
            state = self._states.get(hostname)
            return state is not None and self._refusal(state, time.monotonic()) is not None

    def _open(self, state: _State, reason: str) -> None:
        state.open_until = time.monotonic() + self.cooldown
        state.opened = f"circuit open after {reason} at {rfc3339(time.time())}"

    def _refusal(self, state: _State, now: float) -> str | None:
        if not state.open_until:
            return None
        if now < state.open_until:
            return f"{state.opened}; retrying in {state.open_until - now:.1f} s"
        if state.probing:
            return f"{state.opened}; a probe call is under way"
        return None
