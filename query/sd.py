"""`GET /sd`: the known exporters as Prometheus `http_sd` target groups, behind node:read."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

import falcon

from query.discovery import Discovery
from query.fleet import Exporter


class ServiceDiscoveryResource:
    """`GET /sd`: the known exporters as Prometheus `http_sd` target groups."""

    permission = "node:read"

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = http_sd(self.discovery.fleet.exporters)


def http_sd(exporters: Iterable[Exporter]) -> list[dict[str, Any]]:
    """The exporters as Prometheus `http_sd` target groups, one per exporter.

        [{"targets": ["10.0.0.1:9256"], "labels": {"hostname": "web-01", "group": "web.prod"}}]

    Label names Prometheus would refuse get `_` for each bad character; `job` and `instance`
    are left to the scraping Prometheus; https and a path prefix become `__scheme__` and
    `__metrics_path__`; an exporter in maintenance carries `maintenance="true"`.
    """
    groups = []
    for exporter in exporters:
        parts = urllib.parse.urlsplit(exporter.url)
        labels: dict[str, str] = {}
        for key, value in exporter.labels.items():
            name = re.sub(r"[^a-zA-Z0-9_]", "_", key)
            if name[:1].isdigit():
                name = "_" + name
            if name.startswith("__") or name in ("job", "instance", "hostname"):
                continue
            labels.setdefault(name, value)
        labels["hostname"] = exporter.hostname
        if exporter.maintenance:
            labels["maintenance"] = "true"
        if parts.scheme == "https":
            labels["__scheme__"] = "https"
        if parts.path.strip("/"):
            labels["__metrics_path__"] = parts.path.rstrip("/") + "/metrics"
        groups.append({"targets": [parts.netloc], "labels": labels})
    return groups
