"""The query service's Falcon app: thin resources over `Lookup`, `Discovery` and `Metrics`.

Routes (see openapi.json for the shapes):

    GET /node/{hostname}/process/{pid}   one process on the targeted exporters   process:read
    GET /node/{hostname}/process         each targeted exporter's process list   process:read
    POST /node/{hostname}/process/{pid}/signal   signal it (query/signal.py)   process:execute
    GET /node                            known exporters, labels, last-seen health  node:read
    GET /sd                              the exporters in Prometheus http_sd format  node:read
    GET /metrics                         the service's own metrics    node:read, or public
                                         with auth.protect_metrics: false
    GET /, /healthz, /openapi.json                                               public
"""

from __future__ import annotations

import atexit
import html
import logging
import random
import threading
import time
from dataclasses import replace
from importlib import resources
from typing import Any

import falcon

import procfleet
from procfleet.basicauth import web_middleware
from procfleet.params import (
    LOOKUP_PARAMS,
    QUERY_LIST_PARAMS,
    ParamError,
    check_scope,
    single_values,
)
from procfleet.serve import pause_reading
from procfleet.streaming import NDJSON, TARGETED_HEADER
from procfleet.timefmt import rfc3339
from procfleet.web import (
    PARAM_ERROR,
    App,
    QueryParamRule,
    error_body,
    install_error_handling,
    list_filters_or_400,
    lookup_options_or_400,
    pid_or_400,
)
from procfleet.webconfig import WebConfig
from query import metrics as query_metrics
from query import openapi
from query.auth import (
    CHALLENGE,
    ENVIRON_PERMISSION,
    PUBLIC,
    Authenticator,
    AuthMiddleware,
    NotFoundSink,
)
from query.config import Config
from query.discovery import Discovery
from query.failurelog import ExporterFailureLog, ResultObservers
from query.fanout import Fanout
from query.lookup import Answer, Lookup, Streamed
from query.metrics import Metrics
from query.rank import rank
from query.sd import ServiceDiscoveryResource
from query.signal import SignalAudit, SignalResource, SignalService
from query.stream import ndjson_lines, wants_ndjson
from query.targets import Target, TargetError, parse_target, resolve

log = logging.getLogger(__name__)



def create_app(config: Config, *, discovery: Discovery | None = None,
               fanout: Fanout | None = None, metrics: Metrics | None = None,
               web: WebConfig | None = None) -> App:
    """Build the app. Collaborators not given are made from `config`.

    `web` (--web.config.file): basic auth in front of every path, an API key also accepted
    there; keys and permissions still apply past it (procfleet/basicauth.py).

    The caller owns a `fanout` it passes in (and closes it); one made here is closed at exit.
    """
    if discovery is None:
        discovery = Discovery.from_config(config)
    if fanout is None:
        fanout = Fanout.from_config(config)
        atexit.register(fanout.close)
    if metrics is None:
        metrics = Metrics(exporter_count=lambda: len(discovery.fleet.exporters),
                          reload_stats=discovery.reload_stats)
    lookup = Lookup(discovery, fanout, limits=config.fanout,
                    observer=ResultObservers(metrics, ExporterFailureLog()))
    authenticator = Authenticator(config.auth)

    gate = web_middleware(web, accepts=authenticator.accepts if config.auth.enabled else None,
                          own_scheme=CHALLENGE)
    app: App = falcon.App(middleware=[RequestLog(metrics), SignalAudit(metrics), *gate,
                                      AuthMiddleware(authenticator), QueryParamRule()])
    app.req_options.strip_url_path_trailing_slash = True
    install_error_handling(app, log)
    app.add_route("/node/{hostname}/process/{pid}", ProcessResource(lookup, authenticator))
    app.add_route("/node/{hostname}/process/{pid}/signal",
                  SignalResource(SignalService(discovery, fanout, observer=metrics)))
    app.add_route("/node/{hostname}/process", ProcessListResource(lookup))
    app.add_route("/node", NodesResource(discovery))
    app.add_route("/sd", ServiceDiscoveryResource(discovery))
    app.add_route("/healthz", HealthResource(discovery))
    app.add_route("/metrics", MetricsResource(
        metrics, permission="node:read" if config.auth.protect_metrics else PUBLIC))
    app.add_route("/openapi.json", OpenAPIResource())
    app.add_route("/", LandingResource())
    app.add_sink(NotFoundSink(authenticator), prefix="/")
    return app


class RequestLog:
    """Gives each request its job id (also `X-Request-Id`), then logs and times it.

    Every request is logged in full except fast-fail answers (see `FastFailLog`), which a
    flood of clients on one broken exporter can ask for by the thousand a second.
    """

    def __init__(self, metrics: Metrics, fast_fails: FastFailLog | None = None) -> None:
        self.metrics = metrics
        self.fast_fails = fast_fails or FastFailLog()

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        req.context.job_id = new_job_id()
        req.context.api_key = None
        resp.set_header("X-Request-Id", req.context.job_id)

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         req_succeeded: bool) -> None:
        seconds = time.perf_counter() - req.context.started
        code = resp.status_code
        self.metrics.observe_request(req.uri_template or "unmatched", code, seconds)
        context = req.context
        rejected = context.get("rejected")
        if rejected is not None:
            if self.fast_fails.absorb(rejected):
                return
        elif self.fast_fails.due():
            self.fast_fails.flush()
        fields = {"method": req.method, "path": req.path[:300], "status": code,
                  "duration_ms": f"{seconds * 1000:.1f}", "job_id": context.job_id}
        if context.api_key:
            fields["key"] = context.api_key
        summary = context.get("summary")
        if summary:
            fields.update(summary)
        log.info("request", extra={"fields": fields})


class FastFailLog:
    """Logs fast-fail answers (no exporter asked: circuits open, bulkheads full) in summary.

    Such an answer costs the service next to nothing, and a line per answer would cost more
    than the answer (and flood the log). So per `interval` the first is logged in full, like
    any request, and the others are counted: one line, written with the next request after
    the interval, says how many and on which exporters:

        msg="requests failed fast" count=2113 seconds=1.0 exporters="hung=2113"

    With log_level debug every one is logged in full. Thread-safe; bounded: at most
    `MAX_NAMED` exporters are named, the rest are counted as `others`.
    """

    MAX_NAMED = 16

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._until = 0.0  # monotonic end of the current interval
        self._since = 0.0
        self._count = 0
        self._exporters: dict[str, int] = {}

    def absorb(self, exporters: tuple[str, ...]) -> bool:
        """Count one fast-fail answer; False when it is to be logged in full after all."""
        if log.isEnabledFor(logging.DEBUG):
            return False
        now = time.monotonic()
        with self._lock:
            if now < self._until:
                self._count += 1
                named = self._exporters
                for name in exporters:
                    if name in named or len(named) < self.MAX_NAMED:
                        named[name] = named.get(name, 0) + 1
                    else:
                        named["others"] = named.get("others", 0) + 1
                return True
            self._until = now + self.interval
        self.flush()
        return False

    def due(self) -> bool:
        """True when counted answers wait for their summary line (cheap, unlocked)."""
        return self._count > 0 and time.monotonic() >= self._until

    def flush(self) -> None:
        """Write the summary of the answers counted so far, if any."""
        now = time.monotonic()
        with self._lock:
            count, exporters, since = self._count, self._exporters, self._since
            self._count, self._exporters, self._since = 0, {}, now
        if count:
            log.info("requests failed fast", extra={"fields": {
                "count": count, "seconds": f"{now - since:.1f}",
                "exporters": ",".join(f"{name}={n}" for name, n in exporters.items())}})


def _target_or_400(text: str) -> Target:
    try:
        return parse_target(text)
    except TargetError as exc:
        raise falcon.HTTPBadRequest(title="invalid target", description=str(exc)) from None


# How long a connection's next request waits after an answer that asked no exporter (circuit
# open, bulkhead full); bench/bench_hostile.py measures what it spares the other requests.
FAST_FAIL_PAUSE = 0.1


def _respond(req: falcon.Request, resp: falcon.Response, answer: Answer, field: str) -> None:
    results = answer.results
    req.context.summary = {
        "exporters": len(results),
        "failed": sum(1 for r in results if r.status == "failed"),
    }
    if answer.code != 200:
        if results and all(r.kind == "rejected" for r in results):
            req.context.rejected = tuple(r.hostname for r in results)
            # Nobody was asked: the answer costs next to nothing, so a client looping on it
            # could take every thread and the whole CPU. Its next request waits a little.
            pause_reading(FAST_FAIL_PAUSE)
        # What raising falcon.HTTPError would write (procfleet.web.serialize_error), without
        # the exception's trip through falcon's handler look-up: a fast-fail answer is
        # mostly this.
        resp.status = answer.code
        resp.content_type = falcon.MEDIA_JSON
        resp.media = error_body(answer.code, answer.error or "exporter failed",
                                answer.details or answer.error or "exporter failed")
        return
    resp.media = {"job_id": req.context.job_id,
                  "results": [r.to_json(field) for r in answer.results]}


def _stream_or_respond(req: falcon.Request, resp: falcon.Response,
                       answer: Answer | Streamed, field: str) -> None:
    """A decided answer as JSON; results still coming as NDJSON lines (query/stream.py).

    Everything that decides the status (auth, parameters, the target) ran before: once the
    stream starts it is a 200 that ends with its summary line. Its head says how many
    exporters it targets (TARGETED_HEADER), so a client can show progress out of a total.
    """
    if isinstance(answer, Answer):
        _respond(req, resp, answer, field)
        return
    req.context.summary = {"streamed": True, "exporters": answer.targeted}
    resp.content_type = NDJSON
    resp.set_header(TARGETED_HEADER, str(answer.targeted))
    resp.stream = ndjson_lines(answer.results, field, req.context.job_id, req.context.started)


class ProcessResource:
    """`GET /node/{hostname}/process/{pid}`: one process, per targeted exporter.

    `?expand=`, `?tree=` and `?start_time=` are checked here by the exporters' own rule and
    passed on; `environ` also needs the key's process:read-environ permission.
    """

    permission = "process:read"
    query_params = LOOKUP_PARAMS

    def __init__(self, lookup: Lookup, authenticator: Authenticator | None = None) -> None:
        self.lookup = lookup
        self.authenticator = authenticator

    def on_get(self, req: falcon.Request, resp: falcon.Response, hostname: str, pid: str
               ) -> None:
        target = _target_or_400(hostname)
        number = pid_or_400(pid)
        options = lookup_options_or_400(req)
        if "environ" in options.expand and self.authenticator is not None:
            try:
                self.authenticator.check(req, ENVIRON_PERMISSION)
            except falcon.HTTPForbidden:
                if "environ" in (req.get_param("expand") or "").split(","):
                    raise  # asked for by name
                # `all` means every group this key may see.
                options = replace(options, expand=tuple(
                    g for g in options.expand if g != "environ"))
        if wants_ndjson(req):
            _stream_or_respond(req, resp, self.lookup.stream_process(
                target, number, options.to_params()), "process")
            return
        answer = self.lookup.process(target, number, options.to_params())
        _respond(req, resp, answer, "process")


class ProcessListResource:
    """`GET /node/{hostname}/process?name=&user=&sort=&limit=&…&scope=`: each exporter's
    list, or (`scope=fleet`) one ranking across them (query/rank.py)."""

    permission = "process:read"
    query_params = QUERY_LIST_PARAMS

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup

    def on_get(self, req: falcon.Request, resp: falcon.Response, hostname: str) -> None:
        target = _target_or_400(hostname)
        filters = list_filters_or_400(req, QUERY_LIST_PARAMS)
        try:
            scope = check_scope(single_values(req.params, QUERY_LIST_PARAMS), filters)
        except ParamError as exc:
            raise falcon.HTTPBadRequest(title=PARAM_ERROR, description=str(exc)) from None
        if scope == "fleet":  # a ranking needs every host's answer: never streamed
            answer = self.lookup.processes(target, filters.to_params())
            if answer.code != 200:
                _respond(req, resp, answer, "processes")
                return
            assert filters.sort is not None and filters.limit is not None  # check_scope
            shown, ranked = rank(answer.results, filters.sort, filters.limit)
            req.context.summary = {"exporters": len(shown), "failed": sum(
                1 for r in answer.results if r.status == "failed"), "ranked": len(ranked)}
            resp.media = {"job_id": req.context.job_id, "results": shown, "ranked": ranked}
            return
        if wants_ndjson(req):
            _stream_or_respond(req, resp, self.lookup.stream_processes(
                target, filters.to_params()), "processes")
            return
        answer = self.lookup.processes(target, filters.to_params())
        _respond(req, resp, answer, "processes")


def _maybe_rfc3339(timestamp: float | None) -> str | None:
    return rfc3339(timestamp) if timestamp is not None else None


def new_job_id() -> str:
    """A fresh version-4 UUID. Not secret, so from `random`: uuid4() costs a urandom call.

    The version and variant bits are set by hand: uuid.UUID(...) and its str() cost more
    than the rest of a fast-fail answer's bookkeeping.
    """
    bits = random.getrandbits(128) & _UUID_CLEAR | _UUID_V4
    text = f"{bits:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


# Version 4 (bits 76-79 = 0100) and the RFC 4122 variant (bits 62-63 = 10).
_UUID_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_UUID_V4 = (0x4 << 76) | (0x2 << 62)


class NodesResource:
    """`GET /node[?target=…]`: the known exporters, their labels and last-seen health."""

    permission = "node:read"
    query_params = ("target",)

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        exporters = self.discovery.fleet.exporters
        target_text = req.get_param("target")
        if target_text is not None:
            exporters = tuple(resolve(_target_or_400(target_text), exporters))
        resp.media = {"exporters": [self._describe(e) for e in exporters]}

    def _describe(self, exporter: Any) -> dict[str, Any]:
        health = self.discovery.health.get(exporter.hostname)
        described: dict[str, Any] = {"status": health.status}
        for key, value in (("last_checked", _maybe_rfc3339(health.last_checked)),
                           ("last_seen", _maybe_rfc3339(health.last_seen)),
                           ("last_error", health.last_error)):
            if value is not None:
                described[key] = value
        return {"hostname": exporter.hostname, "url": exporter.url,
                "labels": dict(exporter.labels), "maintenance": exporter.maintenance,
                "source": exporter.source, "health": described}


class HealthResource:
    """`GET /healthz`: the service is up (exporters' health is in `GET /node`)."""

    permission = PUBLIC

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok", "version": procfleet.__version__,
                      "exporters": len(self.discovery.fleet.exporters)}


class MetricsResource:
    """`GET /metrics`: the query service's own metrics in Prometheus text format.

    Its series name every exporter (failures by exporter), which `/node` keeps behind
    node:read; so does this, unless `auth.protect_metrics` is false.
    """

    def __init__(self, metrics: Metrics, *, permission: str = "node:read") -> None:
        self.metrics = metrics
        self.permission = permission

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = query_metrics.CONTENT_TYPE
        resp.data = self.metrics.exposition()


class OpenAPIResource:
    """`GET /openapi.json`: the OpenAPI 3 document of this service."""

    permission = PUBLIC

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = openapi.document()


class LandingResource:
    """`GET /`: a small HTML page linking the other endpoints (public, like the exporter's)."""

    permission = PUBLIC

    def __init__(self) -> None:
        template = resources.files("query").joinpath("landing.html").read_text("utf-8")
        self._page = template.replace("{version}", html.escape(procfleet.__version__)).replace(
            "{{hostname}}", "{hostname}").replace("{{pid}}", "{pid}")

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.text = self._page
