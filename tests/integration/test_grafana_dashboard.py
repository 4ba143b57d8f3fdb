"""config/grafana/procfleet.json: every panel's PromQL runs on the real Prometheus and has data.

Template variables are filled the way Grafana fills them: multi-value variables become an
escaped regex alternation `(a|b)`, `$__rate_interval` and friends become durations.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

import pytest
from integration_testing import (
    Exporter,
    Groups,
    PrometheusAPI,
    fill_variables,
    load_dashboard,
    panel_queries,
    parse_label_values,
    template_variables,
    wait_until,
)

DASHBOARD = load_dashboard()
QUERIES = panel_queries(DASHBOARD)

# The metrics the issue asks the dashboard to show; every one must appear in some panel.
REQUIRED_METRICS = [
    "namedprocess_namegroup_num_procs",
    "namedprocess_namegroup_cpu_seconds_total",
    "namedprocess_namegroup_memory_bytes",
    "namedprocess_namegroup_read_bytes_total",
    "namedprocess_namegroup_write_bytes_total",
    "namedprocess_namegroup_open_filedesc",
    "namedprocess_namegroup_worst_fd_ratio",
    "namedprocess_namegroup_num_threads",
    "namedprocess_namegroup_states",
    "namedprocess_namegroup_oldest_start_time_seconds",
    "procfleet_process_cpu_seconds_total",
    "procfleet_process_resident_memory_bytes",
    "up",
    "procfleet_scrape_duration_seconds",
    "procfleet_read_errors_total",
]
MEMTYPES = ("resident", "virtual", "swapped")

# Grafana's built-in interval variables, for a 1 s scrape interval.
BUILTINS = {"__rate_interval": "5s", "__interval": "2s", "__range": "1m", "topn": "5"}


def grafana_regex(values: Iterable[str]) -> str:
    """What Grafana substitutes for a multi-value variable inside `=~"…"` (Prometheus
    datasource: regex metacharacters escaped with a doubled backslash, values joined by |)."""
    escaped = [re.sub(r"[$^*{}\[\]'+?.()|\\]", lambda m: "\\\\" + m.group(0), v)
               for v in values]
    return "(" + "|".join(escaped) + ")"


@pytest.fixture(scope="module")
def variables(exporters: list[Exporter], groups: Groups) -> dict[str, str]:
    return {
        **BUILTINS,
        "instance": grafana_regex(e.instance for e in exporters),
        "groupname": grafana_regex([groups.busy, groups.idle]),
    }


def test_dashboard_is_a_standard_grafana_dashboard() -> None:
    assert DASHBOARD["uid"] and DASHBOARD["title"] and DASHBOARD["schemaVersion"] >= 30
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_dashboard_has_the_variables_and_panels_asked_for() -> None:
    variables = template_variables(DASHBOARD)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["definition"] == (
        "label_values(namedprocess_namegroup_num_procs, instance)")
    assert parse_label_values(variables["groupname"]["definition"])[1] == "groupname"
    exprs = " ".join(expr for _, _, expr in QUERIES)
    used = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*[{\[(])", exprs))
    missing = [m for m in REQUIRED_METRICS if m not in used]
    assert not missing, f"no panel shows {missing}"
    for memtype in MEMTYPES:
        assert f'memtype="{memtype}"' in exprs
    # Every group panel honours the host and group filters.
    for title, ref, expr in QUERIES:
        assert 'instance=~"$instance"' in expr, f"{title} {ref} ignores $instance"


@pytest.mark.parametrize("name", ["instance", "groupname"])
def test_template_variable_queries_find_the_test_series(
        name: str, prometheus: PrometheusAPI, exporters: list[Exporter], groups: Groups,
        variables: dict[str, str]) -> None:
    match, label = parse_label_values(template_variables(DASHBOARD)[name]["definition"])
    assert match is not None
    found = set(prometheus.label_values(label, fill_variables(match, variables)))
    expected = ({e.instance for e in exporters} if name == "instance"
                else {groups.busy, groups.idle})
    assert expected <= found


@pytest.mark.parametrize(("title", "ref", "expr"), QUERIES,
                         ids=[f"{title}/{ref}" for title, ref, _ in QUERIES])
def test_every_panel_query_parses_and_returns_data(
        title: str, ref: str, expr: str, prometheus: PrometheusAPI,
        variables: dict[str, str]) -> None:
    promql = fill_variables(expr, variables)
    # Instant query now (what stat and table panels run) and the last 20 s as a range
    # (what graphs run); a rate() needs a few scrapes, hence the deadline.
    wait_until(lambda: prometheus.query(promql), timeout=10,
               what=f"data for panel {title!r} {ref}: {promql}")
    end = time.time()
    series = prometheus.query_range(promql, end - 20, end, 2)
    assert series and any(s["values"] for s in series), promql
