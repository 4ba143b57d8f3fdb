"""The loop's two bounds on what broadcasts hold at once: calls in flight
(`fanout.max_in_flight`; the rest wait their turn, first come first served), and the answer
bytes those calls are reading (`fanout.max_buffered_bytes`: the count bounds sockets, not
memory). An answer that would take the budget past its limit is its exporter's `bad_body`
result, and the others are read whole."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

from aiohttp import web
from query_testing import serve_aiohttp

from query.fanout import OVER_BUDGET_ERROR, Fanout, process_call
from query.fleet import Exporter

PID = 4242
FIRST = 24_000  # sent at once; three of these pass the budget, two do not
BUDGET = 65_536


def _answer(size: int) -> bytes:
    body = {"pid": PID, "name": "fat", "command": ""}
    padding = size - len(json.dumps(body).encode())
    body["command"] = "x" * padding
    data = json.dumps(body).encode()
    assert len(data) == size
    return data


async def _slow_fat_answer(request: web.Request) -> web.StreamResponse:
    """28,000 bytes: 24,000 at once, the rest 0.5 s later, so that every exporter holds
    its first part while the others arrive."""
    data = _answer(FIRST + 4_000)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(data)
    await response.prepare(request)
    await response.write(data[:FIRST])
    await asyncio.sleep(0.5)
    await response.write(data[FIRST:])
    await response.write_eof()
    return response


def test_answers_past_the_shared_budget_fail_alone_and_the_budget_is_given_back() -> None:
    with serve_aiohttp({f"/process/{PID}": _slow_fat_answer}) as url:
        exporters = [Exporter(f"fat-{i}", url) for i in range(3)]
        call = process_call(PID, max_body_bytes=BUDGET)
        with Fanout(exporter_timeout=10, request_timeout=20,
                    max_buffered_bytes=BUDGET) as fanout:
            results = fanout.all(exporters, call)
            kinds = sorted(r.kind for r in results)
            assert kinds == ["bad_body", "ok", "ok"], [(r.kind, r.error) for r in results]
            assert [r.error for r in results if r.kind == "bad_body"] == [OVER_BUDGET_ERROR]
            assert all(len(r.data["command"]) > FIRST for r in results if r.kind == "ok")
            # Every byte taken was given back: the next broadcast of two fits whole.
            assert fanout._client.budget is not None and fanout._client.budget.used == 0
            again = fanout.all(exporters[:2], call)
            assert [r.kind for r in again] == ["ok", "ok"], [r.error for r in again]


def test_a_call_timed_out_mid_answer_gives_its_bytes_back() -> None:
    with serve_aiohttp({f"/process/{PID}": _slow_fat_answer}) as url:
        exporters = [Exporter(f"fat-{i}", url) for i in range(2)]
        with Fanout(exporter_timeout=0.2, request_timeout=5,
                    max_buffered_bytes=BUDGET) as fanout:
            results = fanout.all(exporters, process_call(PID, max_body_bytes=BUDGET))
            assert [r.kind for r in results] == ["timeout", "timeout"]
            assert fanout._client.budget is not None and fanout._client.budget.used == 0


def test_calls_past_the_in_flight_bound_wait_their_turn() -> None:
    lock = threading.Lock()
    now = [0]
    peak = [0]

    async def counted(request: web.Request) -> web.Response:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        await asyncio.sleep(0.05)
        with lock:
            now[0] -= 1
        return web.json_response({"pid": PID, "name": "sleepy"})

    with serve_aiohttp({f"/process/{PID}": counted}) as url:
        exporters = [Exporter(f"host-{i:02d}", url) for i in range(12)]
        with Fanout(exporter_timeout=10, request_timeout=20, max_in_flight=3) as fanout:
            results = fanout.all(exporters, process_call(PID))
    assert [r.kind for r in results] == ["ok"] * 12, [r.error for r in results]
    assert peak[0] == 3, peak[0]


def test_timeouts_come_in_order_and_settled_calls_leave_the_deadline_queue() -> None:
    """One queue of deadlines (the calls in the order they began) and one timer for its
    head time calls out: hung exporters time out while the answered ones stay answered, and
    the answered calls' entries leave the queue when the timer next fires (so it holds at
    most the calls begun within one exporter timeout)."""

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)  # past the exporter timeout, done before the server stops
        return web.json_response({"pid": PID})

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"pid": PID, "name": "quick"})

    with serve_aiohttp({f"/process/{PID}": answer}) as quick, \
            serve_aiohttp({f"/process/{PID}": hang}) as hung:
        with Fanout(exporter_timeout=0.3, request_timeout=5) as fanout:
            answered = [Exporter(f"quick-{i:02d}", quick) for i in range(12)]
            assert [r.kind for r in fanout.all(answered, process_call(PID))] == ["ok"] * 12
            assert len(fanout._deadlines) == 12  # settled, waiting for the timer
            time.sleep(0.5)
            assert len(fanout._deadlines) == 0
            mixed = [Exporter(f"host-{i:02d}", hung if i % 3 == 0 else quick)
                     for i in range(12)]
            results = fanout.all(mixed, process_call(PID))
            assert [r.kind for r in results] == [
                "timeout" if i % 3 == 0 else "ok" for i in range(12)]
            assert {r.error for r in results if r.kind == "timeout"} == {"timeout after 0.3 s"}
            assert len(fanout._deadlines) == 0


def test_one_deadline_timer_however_many_calls_time_out_while_others_wait() -> None:
    """200 calls through 4 slots to a server that never answers: 50 waves of timeouts, each
    beginning queued calls from inside the timer's own run. One timer at a time must serve
    them all (a timer left behind by each wave would fire again at every deadline after)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(512)  # connections complete in the kernel; nothing is ever read or answered
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    runs = [0]
    try:
        exporters = [Exporter(f"silent-{i:03d}", url) for i in range(200)]
        with Fanout(exporter_timeout=0.05, request_timeout=30, max_in_flight=4) as fanout:
            expire_due = fanout._expire_due

            def counted() -> None:
                runs[0] += 1
                expire_due()

            fanout._expire_due = counted  # type: ignore[method-assign]  # counts its runs
            results = fanout.all(exporters, process_call(PID))
            assert {r.kind for r in results} == {"timeout"}
            assert fanout._deadline_timer is None or len(fanout._deadlines) > 0
    finally:
        silent.close()
    # One run per wave of 4 (and a few for the stragglers); the leak made it thousands.
    assert runs[0] <= 120, runs[0]


def test_an_answer_cut_off_by_the_budget_says_so_whatever_its_status() -> None:
    async def not_found(request: web.Request) -> web.Response:
        return web.json_response({"error": "process not found", "details": "x" * 4096},
                                 status=404)

    with serve_aiohttp({f"/process/{PID}": not_found}) as url:
        with Fanout(exporter_timeout=10, request_timeout=20, max_buffered_bytes=2048) as fanout:
            results = fanout.all([Exporter("a", url), Exporter("b", url)], process_call(PID))
    assert [(r.kind, r.error) for r in results] == [("bad_body", OVER_BUDGET_ERROR)] * 2
