"""The NDJSON form of a broadcast's answer: a line per exporter's result, then a summary.

    {"hostname": "web-01", "status": "ok", "processes": [...]}
    {"hostname": "web-02", "status": "failed", "error": "connection refused"}
    {"job_id": "…", "summary": {"targeted": 2, "ok": 1, "failed": 1, "skipped": 0,
                                "not_found": 0, "duration_ms": 41.2}}

Each result line is the object `results` holds in the JSON answer (`Result.to_json`). The
summary line is always the last one: the result iterator ends by the request deadline (it
makes up a timeout result for every exporter that did not answer in time), and the summary
follows it. See docs/api.md#streaming.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator

import falcon

from procfleet.streaming import NDJSON
from query.fanout import Result


def wants_ndjson(req: falcon.Request) -> bool:
    """True when the client asks for NDJSON at least as much as for JSON, by name.

    `*/*` or no Accept keeps the JSON answer (older clients), so does a lower q for NDJSON.
    """
    accept = req.get_header("Accept")
    if not accept or NDJSON not in accept.lower():
        return False
    return req.client_prefers([NDJSON, falcon.MEDIA_JSON]) == NDJSON


def summary(counts: dict[str, int], started: float) -> dict[str, object]:
    return {**counts, "duration_ms": round((time.perf_counter() - started) * 1000, 1)}


def ndjson_lines(results: Iterable[Result], field: str, job_id: str, started: float
                 ) -> Iterator[bytes]:
    """The body of a streamed answer: one line per result as it comes, then the summary."""
    counts = {"targeted": 0, "ok": 0, "failed": 0, "skipped": 0, "not_found": 0}
    iterator = iter(results)
    try:
        for result in iterator:
            counts["targeted"] += 1
            if result.kind == "not_found":
                counts["not_found"] += 1
            else:
                counts[result.status] += 1
            yield json.dumps(result.to_json(field), separators=(",", ":")).encode() + b"\n"
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    yield json.dumps({"job_id": job_id, "summary": summary(counts, started)},
                     separators=(",", ":")).encode() + b"\n"
