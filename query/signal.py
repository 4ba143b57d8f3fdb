"""`POST /node/{target}/process/{pid}/signal`: signal a process on the targeted exporters.

Permission `process:execute` (docs/api.md#signal-a-process). The body:

    {"signal": "TERM", "start_time": "2026-01-15T10:30:00Z", "match": {"name": "nginx"},
     "dry_run": false, "max_hosts": 10, "batch": "25%"}

The guard rails here, before any exporter is asked: the body is valid (400 naming the field);
`_any` is refused (a signal goes to a host one names, not to whichever answers); a broadcast
(`_all`, selectors) needs `start_time` or `match`; `max_hosts` refuses a target that resolves
to more exporters. Then the exporters are asked batch by batch (`batch`: a number or a
percentage; all at once without it, and always for a dry run): the first batch with a failed
host ends the rollout, and the hosts not reached are `skipped`. Each exporter checks its own
policy, the process's identity and `match` when it sends (exporter/actions.py).

Per host, what an exporter's answer becomes:

    signalled                      ok       changed: true
    dry_run                        ok       changed: false, with the process that would get it
    refused, failed                failed   the exporter says why
    mismatch (pid is another one)  failed on a unicast; skipped on a broadcast
    no such process                404 on a unicast; skipped on a broadcast
    maintenance / not reached      skipped
    timeout, unreachable, bad ...  failed

Every request, refused or not, is one audit line (logger `query.signal.audit`) and one
count in `procfleet_query_signals_total{outcome}`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import falcon
from prometheus_client import Counter

from procfleet.signals import (
    BODY_MAX_BYTES,
    COMMON_KEYS,
    SignalRequestError,
    check_common,
    decode_body,
)
from procfleet.web import pid_or_400, read_body_or_413
from query.discovery import Discovery, Exporter
from query.fanout import BadBody, Call, Fanout, Result, clean_process
from query.lookup import ResultObserver
from query.metrics import Metrics
from query.targets import Target, TargetError, parse_target, resolve

log = logging.getLogger(__name__)
audit_log = log.getChild("audit")  # a name of its own: operators route audit lines apart

MAX_HOSTS_LIMIT = 1_000_000
_BODY_KEYS = COMMON_KEYS | {"max_hosts", "batch"}
_EXPORTER_OUTCOMES = frozenset({"signalled", "dry_run", "refused", "mismatch", "failed"})
ANSWER_MAX_BYTES = 64 * 1024  # an exporter's answer: one process object and a few fields


@dataclass(frozen=True)
class SignalRequest:
    """A validated request body."""

    signal: str
    start_time: str | None = None
    name: str | None = None
    dry_run: bool = False
    max_hosts: int | None = None
    batch: int | str | None = None  # a count, or "N%"

    def batch_size(self, hosts: int) -> int:
        """Hosts per batch for `hosts` hosts: all of them without `batch`; at least one."""
        if self.batch is None:
            return max(hosts, 1)
        if isinstance(self.batch, int):
            return self.batch
        return max(1, math.ceil(hosts * int(self.batch[:-1]) / 100))


def parse_body(raw: bytes) -> SignalRequest:
    """The body as a SignalRequest, or SignalRequestError naming what is wrong."""
    data = decode_body(raw, _BODY_KEYS)
    max_hosts = data.get("max_hosts")
    if max_hosts is not None and (isinstance(max_hosts, bool) or not isinstance(max_hosts, int)
                                  or not 1 <= max_hosts <= MAX_HOSTS_LIMIT):
        raise SignalRequestError(f"max_hosts must be a whole number from 1 to {MAX_HOSTS_LIMIT}")
    return SignalRequest(**check_common(data), max_hosts=max_hosts,
                         batch=_batch(data.get("batch")))


def _batch(value: Any) -> int | str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_HOSTS_LIMIT:
        return value
    if isinstance(value, str) and value.endswith("%") and value[:-1].isascii() \
            and value[:-1].isdigit() and 1 <= int(value[:-1]) <= 100:
        return f"{int(value[:-1])}%"
    raise SignalRequestError('batch must be a number of hosts (1 or more) or a percentage '
                             'like "10%" (1% to 100%)')


@dataclass(frozen=True)
class HostResult:
    """One host's line of the answer."""

    hostname: str
    status: str  # ok, failed, skipped
    changed: bool = False
    error: str | None = None
    process: dict[str, Any] | None = None  # dry run: what would be signalled

    def to_json(self, pid: int, signal_name: str) -> dict[str, Any]:
        body: dict[str, Any] = {"hostname": self.hostname, "status": self.status, "pid": pid,
                                "signal": signal_name, "changed": self.changed}
        if self.error is not None:
            body["error"] = self.error
        if self.process is not None:
            body["process"] = self.process
        return body


@dataclass(frozen=True)
class SignalAnswer:
    """200 with per-host results, or an error code with error and details."""

    code: int
    results: tuple[HostResult, ...] = ()
    error: str | None = None
    details: str | None = None
    outcome: str = "rejected"  # for the audit line and procfleet_query_signals_total


class Rejected(Exception):
    """A request refused before any exporter is asked: a 4xx with error and details."""

    def __init__(self, code: int, error: str, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.error = error
        self.details = details


def signal_call(pid: int, request: SignalRequest, *, job_id: str | None,
                key: str | None) -> Call:
    """`POST /process/{pid}/signal` on an exporter; its 404 "process not found" is an answer."""
    body: dict[str, Any] = {"signal": request.signal}
    if request.start_time is not None:
        body["start_time"] = request.start_time
    if request.name is not None:
        body["match"] = {"name": request.name}
    if request.dry_run:
        body["dry_run"] = True
    if job_id:
        body["job_id"] = job_id
    if key:
        body["key"] = key

    def decode(data: Any) -> dict[str, Any]:
        if not isinstance(data, dict) or data.get("outcome") not in _EXPORTER_OUTCOMES:
            raise BadBody("exporter answered JSON without a known signal outcome")
        if data.get("pid") != pid or not isinstance(data.get("changed"), bool):
            raise BadBody(f"exporter answered for another pid than {pid}, or without changed")
        if (data["outcome"] == "signalled") != data["changed"]:
            raise BadBody("exporter answered changed that does not fit its outcome")
        error = data.get("error")
        answer: dict[str, Any] = {"outcome": data["outcome"], "changed": data["changed"],
                                  "error": error[:1000] if isinstance(error, str) else None}
        if data.get("process") is not None:
            answer["process"] = clean_process(data["process"])
        return answer

    return Call(f"/process/{pid}/signal", decode, ANSWER_MAX_BYTES, not_found_is_answer=True,
                method="POST", body=json.dumps(body).encode())


def host_result(result: Result, *, unicast: bool) -> HostResult:
    """What one exporter's call means for the answer (the table in the module docstring)."""
    if result.kind == "ok":
        data = result.data
        outcome = data["outcome"]
        if outcome in ("signalled", "dry_run"):
            return HostResult(result.hostname, "ok", data["changed"],
                              process=data.get("process") if outcome == "dry_run" else None)
        status = "skipped" if outcome == "mismatch" and not unicast else "failed"
        return HostResult(result.hostname, status, False,
                          data["error"] or f"exporter answered {outcome}")
    return HostResult(result.hostname, result.status, False, result.error)


class SignalService:
    """Resolves the target, applies the guard rails, rolls the signal out batch by batch."""

    def __init__(self, discovery: Discovery, fanout: Fanout,
                 observer: ResultObserver | None = None) -> None:
        self.discovery = discovery
        self.fanout = fanout
        self.observer = observer

    def signal(self, target: Target, pid: int, request: SignalRequest, *,
               job_id: str | None = None, key: str | None = None) -> SignalAnswer:
        """The whole request; Rejected for what is refused before asking any exporter."""
        if target.kind == "any":
            raise Rejected(400, "invalid target", "a signal needs a host name, _all or "
                           "selectors: _any would pick a host for you")
        if not target.unicast and request.start_time is None and request.name is None:
            raise Rejected(400, "invalid signal request",
                           "a signal to _all or a selector needs start_time or "
                           'match {"name": ...}, checked by each exporter when it sends')
        exporters = sorted(resolve(target, self.discovery.fleet.exporters),
                           key=lambda e: e.hostname)
        if not exporters:
            raise Rejected(404, "target not found",
                           f"no exporter matches target {str(target)!r}")
        if request.max_hosts is not None and len(exporters) > request.max_hosts:
            raise Rejected(400, "too many hosts",
                           f"target {str(target)!r} resolves to {len(exporters)} exporters, "
                           f"more than max_hosts {request.max_hosts}; nothing was signalled")
        call = signal_call(pid, request, job_id=job_id, key=key)
        size = len(exporters) if request.dry_run else request.batch_size(len(exporters))
        results = self._rollout(exporters, call, size, unicast=target.unicast)
        return decide(results, unicast=target.unicast, pid=pid, dry_run=request.dry_run)

    def _rollout(self, exporters: Sequence[Exporter], call: Call, size: int, *,
                 unicast: bool) -> list[tuple[Result | None, HostResult]]:
        done: list[tuple[Result | None, HostResult]] = []
        for start in range(0, len(exporters), size):
            batch = exporters[start:start + size]
            results = self.fanout.all(batch, call)
            self._observe(results)
            mapped = [(r, host_result(r, unicast=unicast)) for r in results]
            done += mapped
            failed = [h.hostname for _, h in mapped if h.status == "failed"]
            if failed:
                why = f"not reached: rollout stopped after a failure on {failed[0]}"
                done += [(None, HostResult(e.hostname, "skipped", False, why))
                         for e in exporters[start + size:]]
                break
        return done

    def _observe(self, results: Sequence[Result]) -> None:
        health = self.discovery.health
        for result in results:
            if result.valid or result.failure:
                health.record(result.hostname, result.valid, result.error)
        if self.observer is not None:
            self.observer.exporter_results(results)


def decide(results: Sequence[tuple[Result | None, HostResult]], *, unicast: bool, pid: int,
           dry_run: bool) -> SignalAnswer:
    """The status code and outcome for the hosts' results (module docstring)."""
    hosts = tuple(h for _, h in results)
    raw = [r for r, _ in results if r is not None]
    if unicast and raw and raw[-1].kind == "not_found":
        return SignalAnswer(404, error="process not found",
                            details=f"exporter {raw[-1].hostname} has no process with pid {pid}",
                            outcome="not_found")
    skipped_only = all(h.status == "skipped" for h in hosts)
    if raw and not any(r.valid for r in raw) and not (
            skipped_only and all(r.kind == "maintenance" for r in raw)):
        failed = "; ".join(f"{h.hostname}: {h.error}" for h in hosts
                           if h.status == "failed")[:2000]
        return SignalAnswer(500, hosts, error="no exporter answered",
                            details=f"none of the targeted exporters gave a valid answer: "
                                    f"{failed}", outcome="failed")
    hosts = tuple(_not_found_skipped(r, h, pid) for r, h in results)
    delivered = sum(1 for h in hosts if h.changed)
    failed_count = sum(1 for h in hosts if h.status == "failed")
    if dry_run:
        outcome = "dry_run"
    elif delivered and failed_count:
        outcome = "partial"
    elif delivered:
        outcome = "signalled"
    elif failed_count:
        outcome = "failed"
    else:
        outcome = "nothing"
    return SignalAnswer(200, hosts, outcome=outcome)


def _not_found_skipped(result: Result | None, host: HostResult, pid: int) -> HostResult:
    if result is not None and result.kind == "not_found":
        return HostResult(host.hostname, "skipped", False, f"no process with pid {pid}")
    return host


# -- HTTP ---------------------------------------------------------------------------------------

class SignalResource:
    """`POST /node/{hostname}/process/{pid}/signal`: thin; `SignalService` decides."""

    permission = "process:execute"

    def __init__(self, service: SignalService) -> None:
        self.service = service

    def on_post(self, req: falcon.Request, resp: falcon.Response, hostname: str, pid: str
                ) -> None:
        audit: dict[str, Any] = {"target": hostname[:200], "pid": pid[:32]}
        req.context.signal_audit = audit
        try:
            target = parse_target(hostname)
        except TargetError as exc:
            raise falcon.HTTPBadRequest(title="invalid target", description=str(exc)) from None
        number = pid_or_400(pid)
        try:
            request = parse_body(read_body_or_413(req, BODY_MAX_BYTES, "a signal request"))
        except SignalRequestError as exc:
            raise falcon.HTTPBadRequest(title="invalid signal request",
                                        description=str(exc)) from None
        audit.update(signal=request.signal, start_time=request.start_time or "-",
                     dry_run=request.dry_run)
        try:
            answer = self.service.signal(target, number, request,
                                         job_id=req.context.job_id, key=req.context.api_key)
        except Rejected as exc:
            raise falcon.HTTPError(exc.code, title=exc.error, description=exc.details) \
                from None
        audit.update(outcome=answer.outcome, hosts=len(answer.results),
                     changed=sum(1 for h in answer.results if h.changed),
                     failed=sum(1 for h in answer.results if h.status == "failed"))
        if answer.code != 200:
            raise falcon.HTTPError(answer.code, title=answer.error, description=answer.details)
        resp.media = {"job_id": req.context.job_id,
                      "results": [h.to_json(number, request.signal) for h in answer.results]}


class SignalAudit:
    """One audit line and one count per signal request, whatever became of it.

    Runs after the response is decided, so requests refused by the key check (401, 403) or
    the body check (400) are audited as well as the ones that reached the exporters.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.counter = Counter(
            "procfleet_query_signals", "Signal requests by outcome (signalled, partial, failed, "
            "nothing, dry_run, not_found, rejected).", ["outcome"], registry=metrics.registry)

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        if req.method != "POST" or not _is_signal_path(req.path):
            return
        audit = dict(getattr(req.context, "signal_audit", None) or {})
        outcome = audit.pop("outcome", None) or "rejected"
        parts = req.path.split("/")
        fields: dict[str, Any] = {
            "job_id": getattr(req.context, "job_id", None) or "-",
            "key": getattr(req.context, "api_key", None) or "-",
            "target": audit.pop("target", parts[2][:200] if len(parts) > 2 else "-"),
            "pid": audit.pop("pid", parts[4][:32] if len(parts) > 4 else "-"),
            "start_time": audit.pop("start_time", "-"),
            "signal": audit.pop("signal", "-"),
            "outcome": outcome, "status": resp.status_code, **audit}
        audit_log.info("signal", extra={"fields": fields})
        self.counter.labels(outcome).inc()


def _is_signal_path(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 6 and parts[1] == "node" and parts[3] == "process" \
        and parts[5] == "signal"


__all__ = ["HostResult", "Rejected", "SignalAnswer", "SignalAudit", "SignalRequest",
           "SignalResource", "SignalService", "decide", "host_result", "parse_body",
           "signal_call"]
