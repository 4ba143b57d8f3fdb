"""Helpers for the integration tests: tagged children, keys, Prometheus's API, dashboards.

Nothing here fakes the thing under test: servers are started as users start them
(`procfleet-exporter …`, `python -m query …`, `/usr/bin/prometheus …`) and children are real
processes that are always reaped.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from procfleet import testing

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
DASHBOARD = REPO / "config" / "grafana" / "procfleet.json"
PROMETHEUS_CONFIG = REPO / "config" / "prometheus.yml"

# Children carry this marker in their argv; the exporter config of the tests groups them by
# the part after it (process-exporter's `{{.Matches.tag}}`).
CHILD_MARKER = "procfleet-itest-"
CHILD_LIFETIME = 300.0  # seconds; children exit on their own even if pytest is killed
IDLE_CHILDREN = 3  # sleeping children in the `idle` group; one busy child besides
SCRAPE_INTERVAL = "1s"  # Prometheus scrapes the test exporters this often


@dataclass(frozen=True)
class Groups:
    """The group names the tagged children fall into (unique per session)."""

    idle: str
    busy: str


@dataclass(frozen=True)
class Exporter:
    url: str
    instance: str  # host:port, Prometheus's `instance` label
    hostname: str


@dataclass(frozen=True)
class QueryService:
    """A running query service and the API keys made for it with `procfleet-query keygen`."""

    url: str
    key: str  # process:read
    node_key: str  # node:read only: a 403 for process lookups
    instance: str


# Prometheus and the services refuse or half-answer while they start: "not yet", not a failure.
wait_until = functools.partial(testing.wait_until, interval=0.1,
                               retry_on=(OSError, ValueError, KeyError))


def keygen(name: str, permission: str) -> tuple[str, dict]:
    """Run `procfleet-query keygen` as users do: (the key, its auth.api_keys entry)."""
    out = subprocess.run([str(VENV_BIN / "procfleet-query"), "keygen", "--name", name,
                          "--permission", permission], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    keys = [line.split()[-1] for line in out.splitlines()
            if line.startswith("#") and len(line.split()) == 2]
    assert len(keys) == 1, f"no key in keygen output:\n{out}"
    entry = yaml.safe_load("\n".join(line for line in out.splitlines()
                                     if not line.startswith("#")))
    assert isinstance(entry, list) and len(entry) == 1, out
    return keys[0], entry[0]


def spawn_child(tag: str, *, busy: bool = False) -> subprocess.Popen[bytes]:
    """A real child whose argv carries `procfleet-itest-<tag>`, once /proc shows it; busy
    ones spin on a CPU. It exits on its own after CHILD_LIFETIME even if pytest is killed."""
    work = "pass" if busy else "time.sleep(0.2)"
    code = ("import sys, time\n"
            f"end = time.monotonic() + {CHILD_LIFETIME}\n"
            "while time.monotonic() < end:\n"
            f"    {work}\n")
    return testing.spawn([sys.executable, "-c", code, CHILD_MARKER + tag])


class PrometheusAPI:
    """The parts of Prometheus's HTTP API the tests use; errors fail the test with the body."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str, **params: Any) -> Any:
        response = requests.get(f"{self.url}{path}", params=params, timeout=10)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise PromQLError(f"{path} {params}: HTTP {response.status_code}: "
                              f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query; returns the result vector (or matrix) list."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self._get("/api/v1/query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        data = self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)
        return data["result"]

    def values(self, expr: str) -> dict[str, float]:
        """An instant query as {instance: value} (sum of series per instance)."""
        out: dict[str, float] = {}
        for series in self.query(expr):
            key = series["metric"].get("instance", "")
            out[key] = out.get(key, 0.0) + float(series["value"][1])
        return out

    def targets(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/targets", state="active")["activeTargets"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": match})


class PromQLError(AssertionError):
    """Prometheus rejected a query or failed to run it."""


# -- Grafana dashboards ------------------------------------------------------------------

_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(?P<match>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$")


def iter_panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including the ones nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every Prometheus target of every panel."""
    found = []
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if "expr" in target:
                found.append((panel.get("title", "?"), target.get("refId", "?"), target["expr"]))
    return found


def template_variables(dashboard: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def parse_label_values(query: str) -> tuple[str | None, str]:
    """`label_values(metric{…}, label)` → (match or None, label)."""
    found = _LABEL_VALUES.match(query)
    if found is None:
        raise ValueError(f"not a label_values() query: {query!r}")
    return found.group("match"), found.group("label")


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def fill_variables(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana's `$name`, `${name}`, `${name:fmt}` and `[[name]]` by `values`.

    An unknown variable is an error, so a typo in the dashboard fails the test.
    """
    def replace(found: re.Match[str]) -> str:
        name = found.group(1) or found.group(2) or found.group(3)
        if name not in values:
            raise KeyError(f"unknown template variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
