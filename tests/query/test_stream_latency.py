"""Streamed broadcasts pass answers on as they come, even while a large fleet is still
being asked, and ask a 1,000-exporter fleet all at once with the default limits (issue 11's
streaming bar: the last line within 50 ms of the slowest exporter; bench/bench_search.py)."""

from __future__ import annotations

import asyncio
import threading
import time

from aiohttp import web
from query_testing import make_config, serve_aiohttp

from query.fanout import Fanout, list_call
from query.fleet import Exporter


def test_an_answer_is_passed_on_while_the_fleet_is_still_being_asked():
    """Exporters in maintenance are handed to the stream as they are met, and with a
    one-result queue and a reader that waits, meeting 300 of them keeps the loop asking for
    as long as the reader likes. The one exporter called answers meanwhile: its result must
    come then, not after the 300th has been met."""
    answered = threading.Event()

    async def handler(request: web.Request) -> web.Response:
        answered.set()
        return web.json_response({"hostname": "fast", "processes": []})

    with serve_aiohttp({"/process": handler}) as url:
        exporters = [Exporter("fast", url)] + [
            Exporter(f"resting-{i:03d}", url, maintenance=True) for i in range(300)]
        with Fanout(exporter_timeout=10, request_timeout=30) as fanout:
            stream = fanout.stream(exporters, list_call({}), bound=1)
            results = iter(stream)
            seen = [next(results)]
            assert answered.wait(10), "the exporter was not asked"
            time.sleep(0.3)  # for the loop to read the answer (it polls the queue meanwhile)
            seen += list(results)
    assert sorted(r.hostname for r in seen) == sorted(e.hostname for e in exporters)
    position = [r.hostname for r in seen].index("fast")
    assert seen[position].kind == "ok"
    # Before: after all 300 (position 300). Now: at the next batch of asking (64 exporters).
    assert position < 150, position


def test_the_default_limits_ask_a_thousand_exporters_at_once():
    """Every call of a 1,000-exporter broadcast is in flight at once with the default
    configuration: each fake answers only once all have been asked (or after 3 s). With
    256 calls in flight, 1,000 exporters answering in 20-200 ms cannot all have answered
    before 431 ms (the slowest first) to 523 ms (in order), and the stream's last line
    could not be within 50 ms of the slowest exporter."""
    size = 1000
    lock = threading.Lock()
    asked = [0]
    peak = [0]
    everyone = asyncio.Event()
    waiting = [0]

    async def handler(request: web.Request) -> web.Response:
        with lock:
            asked[0] += 1
            waiting[0] += 1
            peak[0] = max(peak[0], waiting[0])
            if asked[0] >= size:
                everyone.set()
        try:
            await asyncio.wait_for(everyone.wait(), 3)
        except TimeoutError:
            pass
        with lock:
            waiting[0] -= 1
        return web.json_response({"hostname": "fake", "processes": []})

    with serve_aiohttp({"/process": handler}) as url:
        config = make_config([{"hostname": f"sim-{i:04d}", "url": url} for i in range(size)],
                             timeouts={"exporter": 10, "request": 20})
        exporters = [Exporter(f"sim-{i:04d}", url) for i in range(size)]
        with Fanout.from_config(config) as fanout:
            results = list(fanout.stream(exporters, list_call({})))
    assert [r.kind for r in results] == ["ok"] * size
    assert peak[0] == size, f"at most {peak[0]} of {size} calls were in flight at once"
