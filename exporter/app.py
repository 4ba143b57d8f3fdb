"""The exporter's Falcon app: `create_app(config)` wires the resources to their collaborators."""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import re
from importlib import resources

import falcon
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import choose_encoder

from exporter.actions import Signaller, SignalRequest
from exporter.collector import ProcessCollector
from exporter.config import Config
from exporter.lookup import OtherProcess, ProcessLookup
from exporter.procs import ProcessError, Reader, UserNames, make_reader
from exporter.rates import RateSampler
from procfleet import __version__
from procfleet.basicauth import WebMiddleware, web_middleware
from procfleet.params import LIST_PARAMS, LOOKUP_PARAMS
from procfleet.process import NOT_FOUND_ERROR
from procfleet.signals import (
    AUDIT_TEXT_MAX,
    BODY_MAX_BYTES,
    COMMON_KEYS,
    SignalRequestError,
    check_common,
    decode_body,
)
from procfleet.web import (
    App,
    QueryParamRule,
    install_error_handling,
    list_filters_or_400,
    lookup_options_or_400,
    pid_or_400,
    read_body_or_413,
)
from procfleet.webconfig import WebConfig

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/", "/healthz"})


def bearer_matches(req: falcon.Request, digest: bytes) -> bool:
    """True if `req` has `Authorization: Bearer <token>` for the token whose SHA-256 is `digest`.

    Compared as digests, in constant time: the token's length and prefix do not show.
    """
    scheme, _, token = (req.get_header("Authorization") or "").partition(" ")
    presented = hashlib.sha256(token.strip().encode()).digest()
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, digest)


class TokenAuth:
    """Middleware: every path but the open ones needs `Authorization: Bearer <token>`."""

    def __init__(self, token_sha256: str, *, protect_metrics: bool) -> None:
        self._digest = bytes.fromhex(token_sha256)
        self._open = OPEN_PATHS if protect_metrics else OPEN_PATHS | {"/metrics"}

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.path in self._open:
            return
        if not bearer_matches(req, self._digest):
            raise falcon.HTTPUnauthorized(
                title="unauthorized",
                description="this exporter needs 'Authorization: Bearer <token>'",
                challenges=["Bearer"],
            )


class LandingResource:
    def __init__(self, hostname: str) -> None:
        template = resources.files("exporter").joinpath("landing.html").read_text("utf-8")
        self._page = template.replace("{hostname}", html.escape(hostname)).replace(
            "{version}", html.escape(__version__)).replace("{{pid}}", "{pid}")

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.text = self._page


class HealthResource:
    def __init__(self, hostname: str) -> None:
        self._body = {"status": "ok", "hostname": hostname, "version": __version__}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self._body


class ProcessResource:
    """GET /process/{pid}: one process, read now; `?expand=` adds groups of detail."""

    query_params = LOOKUP_PARAMS

    def __init__(self, lookup: ProcessLookup) -> None:
        self._lookup = lookup

    def on_get(self, req: falcon.Request, resp: falcon.Response, pid: str) -> None:
        number = pid_or_400(pid)
        options = lookup_options_or_400(req)
        try:
            info, details = self._lookup.get_with(number, options)
        except ProcessError:  # denied answers as gone: a pid we may not read is not shown
            raise falcon.HTTPNotFound(
                title=NOT_FOUND_ERROR, description=f"no process with pid {number}"
            ) from None
        except OtherProcess as exc:  # the process asked for is gone; its pid was reused
            raise falcon.HTTPNotFound(title=NOT_FOUND_ERROR, description=str(exc)) from None
        body = info.to_json()
        body.update(details)
        resp.media = body


class ProcessListResource:
    """GET /process: every process, filtered and optionally sorted into a top-N."""

    query_params = LIST_PARAMS

    def __init__(self, lookup: ProcessLookup, hostname: str) -> None:
        self._lookup = lookup
        self._hostname = hostname

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        found = self._lookup.list(list_filters_or_400(req))
        resp.media = {"hostname": self._hostname, "processes": [p.to_json() for p in found]}


class OpenApiResource:
    """GET /openapi.json: the exporter's API contract, as shipped in the package."""

    def __init__(self) -> None:
        self._doc = resources.files("exporter").joinpath("openapi.json").read_bytes()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._doc


class MetricsResource:
    """GET /metrics: the private registry in whichever exposition format the scraper asks."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        encoder, content_type = choose_encoder(req.get_header("Accept") or "")
        resp.data = encoder(self._registry)
        resp.content_type = content_type


class SignalResource:
    """POST /process/{pid}/signal: the one action; it always needs the exporter's token.

    Without `auth.token_sha256` it is refused (403) even if reads are open: anyone who can
    connect may read, nobody unauthenticated may act. The decision is `Signaller`'s.
    """

    def __init__(self, signaller: Signaller, token_sha256: str | None, hostname: str) -> None:
        self._signaller = signaller
        self._digest = bytes.fromhex(token_sha256) if token_sha256 else None
        self._hostname = hostname

    def on_post(self, req: falcon.Request, resp: falcon.Response, pid: str) -> None:
        if self._digest is None:
            # A refusal like any other (a failed result on the query side, not an exporter
            # failure); with no token, reads are open, so this tells nobody anything new.
            request = _signal_request(req, pid_or_400(pid))
            outcome = self._signaller.refuse(
                request, "signals need the exporter token: set auth.token_sha256")
            req.context.signal_audited = True
            resp.media = outcome.to_json(request, self._hostname)
            return
        if not bearer_matches(req, self._digest):
            raise falcon.HTTPUnauthorized(
                title="unauthorized",
                description="signals need 'Authorization: Bearer <exporter token>'",
                challenges=["Bearer"])
        request = _signal_request(req, pid_or_400(pid))
        outcome = self._signaller.handle(request)
        req.context.signal_audited = True
        if outcome.kind == "not_found":
            raise falcon.HTTPNotFound(title="process not found",
                                      description=outcome.reason or "no such process")
        resp.media = outcome.to_json(request, self._hostname)


_SIGNAL_KEYS = COMMON_KEYS | {"job_id", "key"}


def _signal_request(req: falcon.Request, pid: int) -> SignalRequest:
    """The body of a signal request, bounded and validated; 400 or 413 naming the problem."""
    raw = read_body_or_413(req, BODY_MAX_BYTES, "a signal request")
    try:
        data = decode_body(raw, _SIGNAL_KEYS)
        relayed = {}
        for key in ("job_id", "key"):
            value = data.get(key)
            if value is not None and (not isinstance(value, str)
                                      or not 1 <= len(value) <= AUDIT_TEXT_MAX):
                raise SignalRequestError(f"{key} must be 1 to {AUDIT_TEXT_MAX} characters")
            relayed[key] = value
        return SignalRequest(pid=pid, **check_common(data), **relayed)
    except SignalRequestError as exc:
        raise falcon.HTTPBadRequest(title="invalid signal request", description=str(exc)) \
            from None


_SIGNAL_PATH = re.compile(r"/process/[^/]*/signal")
_REJECTED = {400: "bad_request", 401: "unauthorized", 403: "unauthorized", 413: "bad_request"}


class SignalAudit:
    """Audits signal requests turned away before a decision (token, body): one line each."""

    def __init__(self, signaller: Signaller) -> None:
        self._signaller = signaller

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        if req.method != "POST" or not _SIGNAL_PATH.fullmatch(req.path):
            return
        if getattr(req.context, "signal_audited", False):
            return
        outcome = _REJECTED.get(resp.status_code, "bad_request")
        self._signaller.audit(outcome, pid=req.path.split("/")[2][:32], signal_name=None,
                              reason=f"HTTP {resp.status_code}")


def _slashed_pid(req: falcon.Request, resp: falcon.Response, **params: object) -> None:
    # /process/1%2F2 reaches routing as /process/1/2: a bad pid, not an unknown path.
    raise falcon.HTTPBadRequest(title="invalid pid",
                                description="pid must be decimal digits, without '/'")


def create_app(config: Config, *, reader: Reader | None = None,
               registry: CollectorRegistry | None = None,
               signaller: Signaller | None = None,
               sampler: RateSampler | None = None, web: WebConfig | None = None) -> App:
    """Build the exporter app. Tests pass their own reader, registry, signaller or sampler.

    `web` (--web.config.file): basic auth in front of everything, the bearer token also
    accepted there; the token still guards what it guards (procfleet/basicauth.py).
    """
    reader = reader or make_reader(config.reader)
    if sampler is None:
        # Its thread starts with the first lookup or list, and ends with the app.
        sampler = RateSampler(reader, interval=config.rates.interval_seconds,
                              max_processes=config.rates.max_processes)
    user_names = UserNames()
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ProcessCollector(reader, config.groups, config.metrics,
                                           version=__version__, user_name=user_names,
                                           masker=config.masker))
    lookup = ProcessLookup(reader, config.masker, user_names, sampler=sampler,
                           environ_allowed=config.expand.environ)
    if signaller is None:
        signals_total = Counter(
            "procfleet_signals", "Signal requests by signal and outcome (signalled, dry_run, "
            "refused, mismatch, not_found, failed, unauthorized, bad_request).",
            ["signal", "outcome"], registry=registry)
        signaller = Signaller(config.signal, lookup,
                              lambda name, outcome: signals_total.labels(name, outcome).inc())
    token = config.auth.token_sha256 if config.auth.enabled else None
    middleware: list[SignalAudit | TokenAuth | QueryParamRule | WebMiddleware] = [
        SignalAudit(signaller), *web_middleware(web, bearer_sha256=token)]
    if config.auth.enabled:
        middleware.append(TokenAuth(config.auth.token_sha256 or "",
                                    protect_metrics=config.auth.protect_metrics))
    middleware.append(QueryParamRule())
    app: App = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    install_error_handling(app, log)
    app.add_route("/", LandingResource(config.hostname))
    app.add_route("/healthz", HealthResource(config.hostname))
    app.add_route("/process", ProcessListResource(lookup, config.hostname))
    app.add_route("/process/{pid}", ProcessResource(lookup))
    app.add_route("/process/{pid}/signal",
                  SignalResource(signaller, config.auth.token_sha256, config.hostname))
    app.add_route("/metrics", MetricsResource(registry))
    app.add_route("/openapi.json", OpenApiResource())
    app.add_sink(_slashed_pid, prefix=r"^/process/[^/]*/")
    return app
