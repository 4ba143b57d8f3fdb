"""The exporter's Falcon app: `create_app(config)` wires the resources to their collaborators."""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
from importlib import resources

import falcon
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from exporter.collector import ProcessCollector
from exporter.config import Config
from exporter.lookup import OtherProcess, ProcessLookup
from exporter.procs import ProcessError, Reader, UserNames, make_reader
from exporter.rates import RateSampler
from procfleet import __version__
from procfleet.params import LIST_PARAMS, LOOKUP_PARAMS
from procfleet.process import NOT_FOUND_ERROR
from procfleet.web import (
    QueryParamRule,
    install_error_handling,
    list_filters_or_400,
    lookup_options_or_400,
    pid_or_400,
)

log = logging.getLogger("procfleet.exporter")

OPEN_PATHS = frozenset({"/", "/healthz"})


class TokenAuth:
    """Middleware: every path but the open ones needs `Authorization: Bearer <token>`."""

    def __init__(self, token_sha256: str, *, protect_metrics: bool) -> None:
        self._digest = bytes.fromhex(token_sha256)
        self._open = OPEN_PATHS if protect_metrics else OPEN_PATHS | {"/metrics"}

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.path in self._open:
            return
        scheme, _, token = (req.get_header("Authorization") or "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self._digest):
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


def _slashed_pid(req: falcon.Request, resp: falcon.Response, **params: object) -> None:
    # /process/1%2F2 reaches routing as /process/1/2: a bad pid, not an unknown path.
    raise falcon.HTTPBadRequest(title="invalid pid",
                                description="pid must be decimal digits, without '/'")


def create_app(config: Config, *, reader: Reader | None = None,
               registry: CollectorRegistry | None = None,
               sampler: RateSampler | None = None) -> falcon.App:
    """Build the exporter app. Tests pass their own reader, registry or rate sampler."""
    reader = reader or make_reader(config.reader)
    if sampler is None:
        # Its thread starts with the first lookup or list, and ends with the app.
        sampler = RateSampler(reader, interval=config.rates.interval_seconds,
                              max_processes=config.rates.max_processes)
    user_names = UserNames()
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ProcessCollector(reader, config.groups, config.metrics,
                                           version=__version__, user_name=user_names))
    middleware: list[object] = []
    if config.auth.enabled:
        middleware.append(TokenAuth(config.auth.token_sha256 or "",
                                    protect_metrics=config.auth.protect_metrics))
    middleware.append(QueryParamRule())
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    install_error_handling(app, log)
    lookup = ProcessLookup(reader, config.masker, user_names, sampler=sampler,
                           environ_allowed=config.expand.environ)
    app.add_route("/", LandingResource(config.hostname))
    app.add_route("/healthz", HealthResource(config.hostname))
    app.add_route("/process", ProcessListResource(lookup, config.hostname))
    app.add_route("/process/{pid}", ProcessResource(lookup))
    app.add_route("/metrics", MetricsResource(registry))
    app.add_route("/openapi.json", OpenApiResource())
    app.add_sink(_slashed_pid, prefix=r"^/process/[^/]*/")
    return app
