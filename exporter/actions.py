"""The signal action: whether this exporter may signal a process, and sending it. No HTTP.

Config (`actions.signal`, off by default; docs/api.md#signal-a-process):

    actions:
      signal:
        enabled: true
        signals: [TERM, HUP]       # default: all of TERM, KILL, HUP, INT, USR1, USR2
        users: [www-data, app]     # default: any user but root
        allow_root: false          # root's processes only when true
        groups:                    # default: any process; else it must match one of these
          - comm: [nginx]          #   (the `groups:` matchers, process-exporter's format)

`Signaller.handle(request)` answers every request with an `Outcome`; the checks, in order:
enabled, signal allowed, never pid 1 or this exporter, the process exists, never a kernel
thread or a zombie, identity (`start_time`, `match.name`), user, groups. Then a dry run stops;
a real one sends through a pidfd opened *before* the process was read, so if the pid is
reused between the checks and the send, the signal goes nowhere instead of to a stranger.
Each request is one audit line (logger `exporter.actions.audit`) and one count in
`procfleet_signals_total{signal,outcome}`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal as signals
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from exporter.groups import GroupMatcher, parse_groups
from exporter.info import to_info
from exporter.lookup import ProcessLookup
from exporter.procs import ProcessDenied, ProcessGone, Sample
from procfleet.configcheck import Problems
from procfleet.process import ProcessInfo
from procfleet.signals import SIGNAL_NAMES
from procfleet.timefmt import rfc3339

log = logging.getLogger(__name__)
audit_log = log.getChild("audit")  # a name of its own: operators route audit lines apart

OutcomeKind = Literal["signalled", "dry_run", "refused", "mismatch", "not_found", "failed"]
_POLICY_KEYS = {"enabled", "signals", "users", "allow_root", "groups"}
ROOT_UID = 0


@dataclass(frozen=True)
class SignalPolicy:
    """What `actions.signal` allows; the default allows nothing."""

    enabled: bool = False
    signals: frozenset[str] = frozenset(SIGNAL_NAMES)
    users: frozenset[str] | None = None  # None: any user (root's only with allow_root)
    allow_root: bool = False
    groups: tuple[GroupMatcher, ...] | None = None  # None: any process


def parse_actions(raw: Any, problems: Problems, path: str = "actions") -> SignalPolicy:
    """Validate the `actions:` mapping (only `signal:` so far), problems by key path."""
    data = problems.mapping(raw, path)
    problems.unknown_keys(data, {"signal"}, path)
    return parse_signal_policy(data.get("signal"), problems, f"{path}.signal")


def parse_signal_policy(raw: Any, problems: Problems, path: str = "actions.signal"
                        ) -> SignalPolicy:
    """Validate `actions.signal`; an absent section is the default (disabled)."""
    data = problems.mapping(raw, path)
    problems.unknown_keys(data, _POLICY_KEYS, path)
    enabled = problems.typed(data, "enabled", bool, False, path)
    allow_root = problems.typed(data, "allow_root", bool, False, path)
    allowed = SignalPolicy().signals
    if "signals" in data:
        names = _names(data, "signals", problems, path)
        for i, name in enumerate(names):
            if name not in SIGNAL_NAMES:
                problems.add(f"{path}.signals[{i}]", f"must be one of "
                             f"{', '.join(SIGNAL_NAMES)}, got {name!r}")
        allowed = frozenset(n for n in names if n in SIGNAL_NAMES)
    users = frozenset(_names(data, "users", problems, path)) if "users" in data else None
    if users is not None and "root" in users and not allow_root:
        problems.add(f"{path}.users", "lists root: set allow_root: true as well, so that "
                     "signalling root's processes is a decision of its own")
    groups = None
    if "groups" in data:
        groups = parse_groups(data["groups"], problems, f"{path}.groups")
    return SignalPolicy(enabled=enabled, signals=allowed, users=users, allow_root=allow_root,
                        groups=groups)


def _names(data: Any, key: str, problems: Problems, path: str) -> list[str]:
    items = problems.typed(data, key, list, [], path)
    if not items:
        problems.add(f"{path}.{key}", "must list at least one name (leave it out for any)")
    good = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item:
            good.append(item)
        else:
            problems.add(f"{path}.{key}[{i}]", f"must be a non-empty string, got {item!r}")
    return good


@dataclass(frozen=True)
class SignalRequest:
    """One validated request: which process, which signal, how to know it is the right one."""

    pid: int
    signal: str
    start_time: str | None = None
    name: str | None = None
    dry_run: bool = False
    job_id: str | None = None  # the query service's, for the audit line
    key: str | None = None  # the query service's API key name, for the audit line


@dataclass(frozen=True)
class Outcome:
    """What became of a request; `changed` only when the signal was delivered."""

    kind: OutcomeKind
    reason: str | None = None
    process: ProcessInfo | None = None

    @property
    def changed(self) -> bool:
        return self.kind == "signalled"

    def to_json(self, request: SignalRequest, hostname: str) -> dict[str, Any]:
        body: dict[str, Any] = {"hostname": hostname, "pid": request.pid,
                                "signal": request.signal, "outcome": self.kind,
                                "changed": self.changed}
        if self.reason is not None:
            body["error"] = self.reason
        if self.process is not None:
            body["process"] = self.process.to_json()
        return body


def is_kernel_thread(sample: Sample) -> bool:
    """kthreadd (pid 2) and its children; or no memory and no argv outside a zombie.

    The ppid test is exact in the host's pid namespace; the memory test also catches kernel
    threads where kthreadd is not visible.
    """
    return (sample.pid == 2 or sample.ppid == 2
            or (sample.vsize == 0 and not sample.cmdline and sample.state not in "ZX"))


def refusal(policy: SignalPolicy, request: SignalRequest, sample: Sample, *,
            user: Callable[[], str], self_pid: int) -> Outcome | None:
    """Why this process may not get this signal (refused or mismatch), or None: it may."""
    pid = sample.pid
    if pid == 1 or pid == self_pid:
        return Outcome("refused", f"pid {pid} is {'init' if pid == 1 else 'this exporter'}: "
                       "never signalled")
    if is_kernel_thread(sample):
        return Outcome("refused", f"pid {pid} is a kernel thread: never signalled")
    if sample.state in "ZX":
        return Outcome("refused", f"pid {pid} is a zombie: a signal cannot reach it")
    started = rfc3339(sample.create_time)
    if request.start_time is not None and request.start_time != started:
        return Outcome("mismatch", f"pid {pid} now belongs to another process: it started at "
                       f"{started}, not {request.start_time}; not signalled")
    if request.name is not None and request.name != sample.name:
        return Outcome("mismatch", f"pid {pid} is {sample.name!r}, not {request.name!r}; "
                       "not signalled")
    if sample.uid is None:
        return Outcome("refused", f"the owner of pid {pid} cannot be read")
    name = user()
    if sample.uid == ROOT_UID and not policy.allow_root:
        return Outcome("refused", f"pid {pid} runs as root: this exporter does not signal "
                       "root's processes (actions.signal.allow_root)")
    if policy.users is not None and name not in policy.users:
        return Outcome("refused", f"pid {pid} runs as {name!r}, not one of the users this "
                       "exporter may signal (actions.signal.users)")
    if policy.groups is not None and not any(
            g.match(sample, user) is not None for g in policy.groups):
        return Outcome("refused", f"pid {pid} is in none of the groups this exporter may "
                       "signal (actions.signal.groups)")
    return None


class Signaller:
    """Decides and sends signals for `POST /process/{pid}/signal`; audits every request."""

    def __init__(self, policy: SignalPolicy, lookup: ProcessLookup,
                 count: Callable[[str, str], None] = lambda signal_name, outcome: None, *,
                 self_pid: int | None = None) -> None:
        self.policy = policy
        self.lookup = lookup
        self.count = count  # (signal, outcome): procfleet_signals_total, kept by the app
        self.self_pid = os.getpid() if self_pid is None else self_pid

    def handle(self, request: SignalRequest) -> Outcome:
        """Check everything, then send (or, dry run, report); audited and counted."""
        outcome = self._decide_and_send(request)
        self.audit(outcome.kind, pid=request.pid, signal_name=request.signal,
                   start_time=request.start_time, job_id=request.job_id, key=request.key,
                   reason=outcome.reason)
        return outcome

    def refuse(self, request: SignalRequest, reason: str) -> Outcome:
        """Refuse without looking at the process (no token configured); audited and counted."""
        outcome = Outcome("refused", reason)
        self.audit(outcome.kind, pid=request.pid, signal_name=request.signal,
                   start_time=request.start_time, job_id=request.job_id, key=request.key,
                   reason=reason)
        return outcome

    def audit(self, outcome: str, *, pid: int | str | None, signal_name: str | None,
              start_time: str | None = None, job_id: str | None = None,
              key: str | None = None, reason: str | None = None) -> None:
        """One structured line per request, allowed or not, and one count."""
        fields = {"job_id": job_id or "-", "key": key or "-", "target": "self",
                  "pid": pid if pid is not None else "-", "start_time": start_time or "-",
                  "signal": signal_name or "-", "outcome": outcome}
        if reason:
            fields["reason"] = reason
        audit_log.info("signal", extra={"fields": fields})
        self.count(signal_name if signal_name in SIGNAL_NAMES else "invalid", outcome)

    def _decide_and_send(self, request: SignalRequest) -> Outcome:
        policy = self.policy
        if not policy.enabled:
            return Outcome("refused", "signals are disabled on this exporter "
                           "(actions.signal.enabled)")
        if request.signal not in policy.signals:
            return Outcome("refused", f"signal {request.signal} is not allowed on this exporter "
                           f"(actions.signal.signals: {', '.join(sorted(policy.signals))})")
        pid = request.pid
        if pid == 1 or pid == self.self_pid:  # before any read: nothing to learn about them
            return Outcome("refused", f"pid {pid} is {'init' if pid == 1 else 'this exporter'}"
                           ": never signalled")
        handle = _open_pidfd(pid)
        if handle == -2:
            return Outcome("not_found", f"no process with pid {pid}")
        try:
            try:
                sample = self.lookup.reader.sample(pid)
            except ProcessGone:
                return Outcome("not_found", f"no process with pid {pid}")
            except ProcessDenied:
                return Outcome("refused", f"pid {pid} may not be read by this exporter")
            names = self.lookup.user_names

            def user() -> str:
                return names(sample.uid) if sample.uid is not None else ""

            refused = refusal(policy, request, sample, user=user, self_pid=self.self_pid)
            info = to_info(sample, system=self.lookup.reader.system, user_name=names,
                           mask=self.lookup.mask)
            if refused is not None:
                return Outcome(refused.kind, refused.reason, info)
            if request.dry_run:
                return Outcome("dry_run", None, info)
            return _send(handle, pid, getattr(signals, f"SIG{request.signal}"), info)
        finally:
            if handle >= 0:
                os.close(handle)


def _open_pidfd(pid: int) -> int:
    """A pidfd for `pid`; -2 when there is no such process, -1 where pidfds do not exist."""
    if not hasattr(os, "pidfd_open"):
        return -1
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return -2
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # a thread id, not a process
            return -2
        return -1  # ENOSYS (kernel before 5.3), EMFILE...: fall back to kill()


def _send(handle: int, pid: int, signum: int, info: ProcessInfo) -> Outcome:
    try:
        if handle >= 0:
            signals.pidfd_send_signal(handle, signum)
        else:
            # Without a pidfd there is a window between the read and kill() in which the pid
            # could be reused; the checks above narrow it to microseconds, not to nothing.
            os.kill(pid, signum)
    except ProcessLookupError:
        return Outcome("not_found", f"pid {pid} exited before the signal; not signalled", info)
    except PermissionError:
        return Outcome("failed", f"this exporter may not signal pid {pid} (permission denied)",
                       info)
    except OSError as exc:
        return Outcome("failed", f"sending failed: {exc.strerror or exc}", info)
    return Outcome("signalled", None, info)
