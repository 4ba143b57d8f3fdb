"""Fleet-wide ranking (`scope=fleet`): one top-N across every targeted exporter's list.

Each exporter was asked for its own top `limit` by the same key (the filters are pushed
down), so ranking reads at most hosts × limit processes, whatever the fleet's size. The
answer keeps the documented shape: each host's `processes` hold only its entries of the
global top-N, in rank order, and `ranked` gives the global order:

    {"job_id": "…", "results": [...], "ranked": [{"hostname": "db-02", "pid": 812}, ...]}
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

from procfleet.params import SORT_FIELDS
from query.fanout import Result


def rank(results: Sequence[Result], sort: str, limit: int, field: str = "processes"
         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The results as the API shows them, cut to the global top `limit` by `sort`, and the
    `ranked` list. Largest first (for `start`, the newest); a process without the sort
    field ranks last; ties keep the hosts' order (by hostname), then each host's own."""
    key_field = SORT_FIELDS[sort]
    candidates: list[tuple[tuple[bool, Any], int, int]] = []
    for number, result in enumerate(results):
        if result.kind != "ok":
            continue
        for index, process in enumerate(result.data):
            value = process.get(key_field)
            candidates.append(((value is not None, value if value is not None else 0),
                               number, index))
    top = heapq.nlargest(limit, candidates, key=lambda c: c[0])
    kept: dict[int, list[int]] = {}
    ranked: list[dict[str, Any]] = []
    for _, number, index in top:
        kept.setdefault(number, []).append(index)
        ranked.append({"hostname": results[number].hostname,
                       "pid": results[number].data[index]["pid"]})
    shown: list[dict[str, Any]] = []
    for number, result in enumerate(results):
        body = result.to_json(field)
        if result.kind == "ok":
            body[field] = [result.data[i] for i in kept.get(number, ())]
        shown.append(body)
    return shown, ranked
