"""Every failure kind the fan-out can give is named where operators read it: the metric's help
text and the results table of docs/api.md. A new kind added to `FAILURE_KINDS` without its
documentation fails here."""

from __future__ import annotations

import re
from pathlib import Path

import prometheus_client

from query.fanout import FAILURE_KINDS
from query.metrics import Metrics

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_the_failure_metric_help_names_every_kind() -> None:
    text = prometheus_client.generate_latest(Metrics().registry).decode()
    help_line = next(line for line in text.splitlines()
                     if line.startswith("# HELP procfleet_query_exporter_failures_total "))
    missing = [kind for kind in FAILURE_KINDS if not re.search(rf"\b{kind}\b", help_line)]
    assert missing == [], help_line


def test_the_results_table_of_the_contract_has_a_row_per_kind() -> None:
    results = API_MD.read_text("utf-8").split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([a-z_]+)` \| (?:ok|failed|skipped) \|", results, re.M))
    assert set(FAILURE_KINDS) <= rows, sorted(set(FAILURE_KINDS) - rows)
