"""Ask exporters: one at a time from the request thread, or many at once on a loop thread.

A unicast lookup (one exporter, or `_any`'s exporters one after another) is asked straight
from the request thread (a waitress worker) over a pool of kept-alive connections: handing it
to another thread and back would cost as much as the exporter's whole answer. A broadcast is
handed to `Fanout.all()`, which submits one coroutine to the loop thread and waits, bounded,
for its results. Inside the loop every exporter call is a task; a semaphore bounds how many
are in flight across all requests, connections are kept alive between requests, and no
thread is started per exporter. Both ways use `query.httpclient` (one response parser).

A failing exporter is data, not an exception: every exporter gets a `Result`, and `classify`
is the one place that turns what happened (an answer or an error) into a kind:

    ok           200 with a valid JSON answer
    not_found    404 {"error": "process not found", ...}      (a valid answer)
    unsupported  501: the lookup does not exist on its platform (a valid answer, skipped)
    maintenance  marked in maintenance by discovery; not called (skipped)
    timeout      no answer within the per-exporter timeout or the request deadline
    unreachable  refused, unresolvable, reset or closed before an answer
    bad_status   any other HTTP status (redirects are not followed)
    bad_body     not JSON, not the documented shape, or larger than the caps
    rejected     not asked: its circuit is open after a failure, or too many requests
                 already wait on it (see query.breaker); fails at once

Concurrent identical calls (same exporter, same request) share one call in flight: a
request that finds one under way waits for its result instead of asking again.

An answer's JSON is checked before it is decoded, so a hostile answer cannot cost more than a
bounded amount of memory or stack: at most `MAX_JSON_DEPTH` levels of nesting, and for lists
at most `max_processes` objects and 12 JSON values per process (see `json_budget`).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import math
import queue
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode

import procfleet
from procfleet.params import LIST_LIMIT_MAX
from procfleet.process import DETAIL_FIELDS, NOT_FOUND_ERROR, PROCESS_FIELDS
from query import httpclient
from query.breaker import Guards, Outcome
from query.config import Config
from query.discovery import Exporter

log = logging.getLogger(__name__)

Kind = Literal["ok", "not_found", "replaced", "unsupported", "maintenance", "timeout",
               "unreachable", "bad_status", "bad_body", "rejected"]
FAILURE_KINDS: tuple[Kind, ...] = ("timeout", "unreachable", "bad_status", "bad_body",
                                   "rejected")
# `replaced`: asked with start_time, the exporter answered that the pid now belongs to a process
# started at another time. A valid answer (the exporter is fine), shown as that host's failure.
_VALID: frozenset[str] = frozenset({"ok", "not_found", "replaced", "unsupported"})
_STATUS: Mapping[str, str] = {"ok": "ok", "maintenance": "skipped", "unsupported": "skipped"}

MAINTENANCE_ERROR = "exporter is in maintenance"
UNSUPPORTED_ERROR = "process lookup is unsupported on the exporter's platform"
# Answer bytes a broadcast's calls may hold at once while reading them (a 1 MiB lookup answer
# from each of 256 exporters); the count of calls in flight does not bound memory by itself.
MAX_BUFFERED_BYTES = 256 * 1024 * 1024
OVER_BUDGET_ERROR = ("exporter answer not read: the answers being read at once would exceed "
                     "fanout.max_buffered_bytes")
NOT_FOUND_BODY_CAP = 64 * 1024  # an exporter's 404 error body is a few dozen bytes
# The documented answers nest three levels ({"processes": [{...}]}); anything far deeper is
# hostile, and json.loads would recurse once per level (RecursionError past ~1,000).
MAX_JSON_DEPTH = 32
# JSON values one listed process may bring: its 9 fields and itself, plus room to grow. What
# decoding costs is bounded by values (each at most ~70 bytes as Python objects), not bytes.
VALUES_PER_PROCESS = 16  # 13 fields (issue 10 added four rates), and room for a few more
# Request heads kept for reuse (exporter URL, token, path): more than one per exporter of the
# largest fleet; past it they are all dropped and made again.
MAX_KEPT_REQUESTS = 65_536
# A streamed broadcast (`Fanout.stream`): results waiting for their reader at most, and how
# long the loop keeps trying to hand one to a reader that does not take it before it gives
# up on that reader (the exporters' results still reach every other request).
STREAM_QUEUE_MAX = 64
SLOW_READER_TIMEOUT = 10.0
SLOW_READER_ERROR = "not streamed: the client read too slowly"
_STREAM_POLL = 0.005
# Exporters a streamed broadcast asks before it lets their calls go out and passes on the
# answers already in: asking 1,000 exporters keeps the loop busy for tens of milliseconds,
# longer than the fastest of them take to answer.
_STREAM_BATCH = 64


@dataclass(frozen=True, slots=True)
class Result:
    """What one exporter's call came to. `data` is the decoded answer when `kind` is ok."""

    hostname: str
    kind: Kind
    error: str | None = None
    data: Any = None

    @property
    def status(self) -> str:
        """`ok`, `failed` or `skipped`, as the API reports it."""
        return _STATUS.get(self.kind, "failed")

    @property
    def valid(self) -> bool:
        """True when the exporter gave a valid answer (found, not found or unsupported)."""
        return self.kind in _VALID

    @property
    def failure(self) -> bool:
        """True when the exporter could not give a valid answer (timeout, unreachable, ...)."""
        return self.kind in FAILURE_KINDS

    @property
    def observed(self) -> bool:
        """True when the exporter was asked and this says how it is (valid or failed)."""
        return self.kind != "rejected" and (self.valid or self.failure)

    def to_json(self, field_name: str) -> dict[str, Any]:
        """The API's result object: `field_name` (process/processes) only on ok, else `error`."""
        if self.kind == "ok":
            return {"hostname": self.hostname, "status": "ok", field_name: self.data}
        return {"hostname": self.hostname, "status": self.status, "error": self.error}


class BadBody(ValueError):
    """An exporter's 200 answer that is not the documented shape; the message says how."""


@dataclass(frozen=True)
class Call:
    """What to ask every exporter: a path, query parameters and how to decode the answer."""

    path: str
    decode: Callable[[Any], Any]
    max_body_bytes: int
    params: Mapping[str, str] = field(default_factory=dict)
    not_found_is_answer: bool = False
    max_values: int | None = None  # JSON values an answer may hold; None: bytes bound it
    method: str = "GET"  # or POST, with a JSON `body` (the signal action)
    body: bytes = b""

    def body_cap(self, status: int) -> int | None:
        """How much of an answer with `status` to read; None: the status alone decides."""
        if status == 200:
            return self.max_body_bytes
        if status == 404 and self.not_found_is_answer:
            return NOT_FOUND_BODY_CAP
        return None

    @functools.cached_property
    def target(self) -> str:
        """The request target: the path and the query string (made once: a broadcast asks
        for it twice per exporter)."""
        return f"{self.path}?{urlencode(self.params)}" if self.params else self.path


def process_call(pid: int, max_body_bytes: int = 1024 * 1024,
                 params: Mapping[str, str] | None = None) -> Call:
    """`GET /process/{pid}`: a 404 "process not found" is a valid answer.

    `params` (expand, tree, start_time: procfleet.params.LookupOptions.to_params) are passed
    through; the expanded groups' fields (procfleet.process.DETAIL_FIELDS) are kept when the
    exporter answers them with their documented JSON types.
    """
    expanded = bool(params and "expand" in params)

    def decode(data: Any) -> dict[str, Any]:
        process = clean_process(data)
        if process["pid"] != pid:
            raise BadBody(f"exporter answered for pid {process['pid']} instead of {pid}")
        if expanded:
            for name, kinds in DETAIL_FIELDS.items():
                value = data.get(name)
                if value is None:
                    continue
                if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                    raise BadBody(f"exporter answered a process whose {name!r} is "
                                  f"{type(value).__name__}")
                process[name] = value
        return process

    return Call(f"/process/{pid}", decode, max_body_bytes, params=dict(params or {}),
                not_found_is_answer=True)


def list_call(filters: Mapping[str, str], max_body_bytes: int = 16 * 1024 * 1024,
              max_processes: int = LIST_LIMIT_MAX) -> Call:
    """`GET /process?name=&user=&sort=&limit=`: the exporter's list, filters passed through.

    An answer with more than `max_processes` processes is a failure (bad_body), found before
    it is decoded: decoding is what costs memory (a 16 MiB list of tiny objects is millions
    of Python objects), so the JSON is counted first (`json_budget`).
    """

    def decode(data: Any) -> list[dict[str, Any]]:
        if not isinstance(data, dict) or not isinstance(data.get("processes"), list):
            raise BadBody("exporter answered JSON without a processes list")
        if len(data["processes"]) > max_processes:
            raise BadBody(f"exporter answered more than {max_processes} processes")
        return [clean_process(p) for p in data["processes"]]

    return Call("/process", decode, max_body_bytes, params=dict(filters),
                max_values=max_processes * VALUES_PER_PROCESS + 64)


def clean_process(data: Any) -> dict[str, Any]:
    """The documented process object from an exporter's JSON, or BadBody saying what is off."""
    if not isinstance(data, dict):
        raise BadBody("exporter answered JSON that is not a process object")
    process: dict[str, Any] = {}
    for name, kinds in PROCESS_FIELDS.items():
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise BadBody(f"exporter answered a process whose {name!r} is "
                          f"{type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            # json.loads takes NaN/Infinity; passing them on would break clients' JSON.
            raise BadBody(f"exporter answered a process whose {name!r} is {value}")
        process[name] = value
    if "pid" not in process:
        raise BadBody("exporter answered a process without a pid")
    return process


class FanoutError(RuntimeError):
    """The fan-out itself failed (its loop is stopped or did not answer in time)."""


class _Job:
    """A coroutine handed from a request thread to the loop; `done` is released when over."""

    __slots__ = ("coro", "done", "task")

    def __init__(self, coro: Any) -> None:
        self.coro = coro
        self.done = threading.Lock()
        self.done.acquire()
        self.task: asyncio.Task[Any] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.task = loop.create_task(self.coro)
        self.task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.done.release()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class _Waiter:
    """What waits on loop flights: told each one's result, once, as it arrives."""

    __slots__ = ()

    def arrived(self, index: int, result: Result) -> None:
        raise NotImplementedError


class _LoopFlight:
    """One call in flight on the loop, and how many broadcasts wait on it (each entered the
    exporter's bulkhead once, and leaves it when the call ends or its deadline passes).

    Driven by callbacks, not a task: the answer's callback, or the exporter timeout (see
    `Fanout._expire_due`), settles it and tells its waiters. A task exists only while a
    connection is being made (`_connecting`); every other step is a plain call on the loop.
    """

    __slots__ = ("exporter", "call", "key", "sharers", "result", "waiters", "started",
                 "began", "begun_at", "origin", "deadline", "conn", "task")

    def __init__(self, exporter: Exporter, call: Call, key: FlightKey) -> None:
        self.exporter = exporter
        self.call = call
        self.key = key
        self.sharers = 0
        self.result: Result | None = None
        self.waiters: list[tuple[_Waiter, int]] = []
        self.started = False  # told to the breaker (start_call): finish_call is owed
        self.began = False  # holds one of the in-flight slots
        self.begun_at = 0.0  # loop time it was sent at
        self.origin: httpclient.Origin | None = None
        self.deadline: list[Any] | None = None  # its [when, flight] in Fanout._deadlines
        self.conn: httpclient.Connection | None = None  # the kept-alive one it went out on
        self.task: asyncio.Task[httpclient.Response] | None = None


class _Gather(_Waiter):
    """A broadcast's results by index; `done` is set when the last awaited one arrives."""

    __slots__ = ("results", "pending", "sealed", "done", "closed")

    def __init__(self, results: list[Result | None], done: asyncio.Future[None]) -> None:
        self.results = results
        self.pending = 0
        self.sealed = False  # every flight is counted in `pending` (calls may end before)
        self.done = done
        self.closed = False

    def wait_for(self, index: int, flight: _LoopFlight) -> None:
        self.pending += 1
        flight.waiters.append((self, index))

    def seal(self) -> None:
        self.sealed = True
        if self.pending == 0 and not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        """The broadcast is over; a flight still under way keeps this waiter until it ends,
        and must not keep the request's results alive with it."""
        self.closed = True
        self.results = []

    def arrived(self, index: int, result: Result) -> None:
        if self.closed:
            return
        self.results[index] = result
        self.pending -= 1
        if self.sealed and self.pending == 0 and not self.done.done():
            self.done.set_result(None)


class _Arrivals(_Waiter):
    """A streamed broadcast's results in the order they arrive, and an event that says so."""

    __slots__ = ("ready", "wake", "closed")

    def __init__(self) -> None:
        self.ready: deque[tuple[int, Result]] = deque()
        self.wake = asyncio.Event()
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.ready = deque()

    def arrived(self, index: int, result: Result) -> None:
        if not self.closed:
            self.ready.append((index, result))
            self.wake.set()


class _Flight:
    """One call in flight from a request thread, which others asking the same may wait for."""

    __slots__ = ("done", "result")

    def __init__(self, result: Result) -> None:
        self.done = threading.Event()
        self.result = result  # replaced by the leader's result before `done` is set


FlightKey = tuple[str, str, "str | None", str, int, "int | None", object]


def _flight_key(exporter: Exporter, call: Call) -> FlightKey:
    # The hostname is in the key because results carry it (two hostnames may share a URL).
    # An action (POST) is never shared: each request must send, and report, its own.
    action: object = None if call.method == "GET" else object()
    return (exporter.hostname, exporter.url, exporter.token, call.target, call.max_body_bytes,
            call.max_values, action)


class _ReaderGone(Exception):
    """The stream's reader left, or read too slowly: stop handing it results."""


class ResultStream:
    """A broadcast's results in the order they arrive, for one reading thread.

    Iterating yields one `Result` per exporter, each exactly once: those the loop handed over
    (bounded queue of STREAM_QUEUE_MAX), then, when the request deadline (or the reader's
    slowness) ended the broadcast, a result for each exporter not yet reported. `streamed`
    tells the two apart (only the former say how an exporter is). Closing it early (the
    client left) stops the broadcast's waiting on the loop.
    """

    def __init__(self, fanout: Fanout, exporters: Sequence[Exporter], bound: int,
                 slow_reader_timeout: float) -> None:
        self.exporters = exporters
        self.slow_reader_timeout = slow_reader_timeout
        self.queue: queue.Queue[tuple[int, Result]] = queue.Queue(bound)
        self.left = False  # the reader closed the stream
        self.dropped = False  # the loop gave up on a reader too slow
        self.finished = False  # the loop has handed over all it will
        self.streamed = False  # whether the last result yielded came from the loop
        self._fanout = fanout
        self._job: _Job | None = None
        self._until = time.monotonic() + fanout.request_timeout + 5.0

    def __iter__(self) -> Iterator[Result]:
        seen = bytearray(len(self.exporters))
        try:
            while not (self.finished and self.queue.empty()):
                try:
                    index, result = self.queue.get(
                        timeout=max(0.0, self._until - time.monotonic()))
                except queue.Empty:
                    break  # the loop is stuck: the rest are deadline results
                if index < 0:
                    break
                seen[index] = 1
                self.streamed = True
                yield result
            self.streamed = False
            for index, exporter in enumerate(self.exporters):
                if not seen[index]:
                    yield (Result(exporter.hostname, "timeout", SLOW_READER_ERROR)
                           if self.dropped else self._fanout._deadline_result(exporter))
        finally:
            self.close()

    def close(self) -> None:
        """Stop the broadcast's waiting for this reader (idempotent)."""
        if self.left:
            return
        self.left = True
        job = self._job
        if job is not None and not self.finished and not self._fanout._closed:
            self._fanout._loop.call_soon_threadsafe(job.cancel)


class Fanout:
    """Calls exporters: unicasts from the calling thread, broadcasts from an event-loop thread.

    Use as a context manager, or call `close()`: it closes the kept-alive connections and
    stops the loop thread. `max_waiting_per_exporter` and `circuit_cooldown` configure the
    per-exporter bulkhead and circuit breaker (`query.breaker`).
    """

    def __init__(self, *, exporter_timeout: float = 2.0, request_timeout: float = 5.0,
                 max_in_flight: int = 1024, max_waiting_per_exporter: int = 4,
                 circuit_cooldown: float = 5.0,
                 max_buffered_bytes: int = MAX_BUFFERED_BYTES) -> None:
        self.exporter_timeout = exporter_timeout
        self.request_timeout = request_timeout
        self.max_in_flight = max_in_flight
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fanout",
                                         daemon=True)
        self._thread.start()
        self._closed = False
        self._requests: dict[tuple[str, str | None, str, httpclient.ClientTLS | None],
                             tuple[httpclient.Origin, bytes]] = {}
        self._inbox: list[_Job] = []
        self._inbox_lock = threading.Lock()
        self._wake_pending = False
        self._headers = {"User-Agent": f"procfleet-query/{procfleet.__version__}",
                         "Accept": "application/json"}
        self._timeout_error = f"timeout after {exporter_timeout:.1f} s"
        self._resolver = httpclient.Resolver()  # shared: a name is looked up once a minute
        self._sync = httpclient.SyncClient(self._resolver, self._resolve_on_loop)
        # Unicasts run in request threads: they get their own bound, like the loop's.
        self._sync_slots = threading.BoundedSemaphore(max_in_flight)
        self._client = httpclient.AsyncClient(self._resolver,
                                              max_buffered_bytes=max_buffered_bytes)
        # Loop calls holding a slot, and those waiting for one (FIFO): a counter and a deque
        # rather than an asyncio.Semaphore, whose release scans the waiters already woken
        # (quadratic when hundreds of answers arrive in one loop iteration).
        self._active = 0
        self._queued: deque[_LoopFlight] = deque()
        self._draining = False
        # [when, flight] of the calls begun, in order of `when`; flight None once settled.
        # At most the calls begun within one exporter timeout.
        self._deadlines: deque[list[Any]] = deque()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self.guards = Guards(max_waiting=max_waiting_per_exporter, cooldown=circuit_cooldown)
        # Calls in flight, by what they ask: from request threads, and on the loop. Each
        # holds only calls under way, so they are bounded by the threads and `_slots`.
        self._flights: dict[FlightKey, _Flight] = {}
        self._flights_lock = threading.Lock()
        self._loop_flights: dict[FlightKey, _LoopFlight] = {}

    @classmethod
    def from_config(cls, config: Config) -> Fanout:
        return cls(exporter_timeout=config.timeouts.exporter,
                   request_timeout=config.timeouts.request,
                   max_in_flight=config.fanout.max_in_flight,
                   max_waiting_per_exporter=config.fanout.max_waiting_per_exporter,
                   circuit_cooldown=config.fanout.circuit_cooldown,
                   max_buffered_bytes=config.fanout.max_buffered_bytes)

    def close(self) -> None:
        """Close the kept-alive connections and stop the loop thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sync.close()
        try:
            asyncio.run_coroutine_threadsafe(self._close_client(), self._loop).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    async def _close_client(self) -> None:
        self._queued.clear()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        flights = list(self._loop_flights.values())
        connecting = [flight.task for flight in flights if flight.task is not None]
        for flight in flights:
            self._complete(flight, self._deadline_result(flight.exporter), "inconclusive")
        await asyncio.gather(*connecting, return_exceptions=True)  # cancelled just above
        self._client.close()
        await asyncio.sleep(0)  # let the transports finish closing their sockets
        await asyncio.sleep(0)

    def __enter__(self) -> Fanout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def retain(self, hostnames: Collection[str]) -> None:
        """Forget the breaker state of exporters not in `hostnames` (they left discovery)."""
        self.guards.retain(hostnames)

    # -- what request threads call -------------------------------------------------------

    def all(self, exporters: Sequence[Exporter], call: Call) -> list[Result]:
        """Ask every exporter at once; one result each, in the order given."""
        if len(exporters) == 1:  # a unicast: no other thread needed
            return self.first(exporters, call)
        results: list[Result] = self._run(self._all(exporters, call))
        return results

    def stream(self, exporters: Sequence[Exporter], call: Call, *,
               bound: int = STREAM_QUEUE_MAX,
               slow_reader_timeout: float = SLOW_READER_TIMEOUT) -> ResultStream:
        """Ask every exporter at once; their results as they arrive (see ResultStream)."""
        stream = ResultStream(self, exporters, bound, slow_reader_timeout)
        stream._job = self._submit(self._stream(exporters, call, stream))
        return stream

    def first(self, exporters: Sequence[Exporter], call: Call) -> list[Result]:
        """Ask one exporter after another until one gives a valid answer.

        Returns every result in the order tried; the last one is the answer when it is valid.
        Runs in the calling thread, within the request deadline.
        """
        if self._closed:
            raise FanoutError("the fan-out is closed")
        request_until = time.monotonic() + self.request_timeout
        tried: list[Result] = []
        for exporter in exporters:
            if time.monotonic() >= request_until:
                break
            result = self._ask_sync(exporter, call, request_until)
            tried.append(result)
            if result.valid:
                break
        return tried

    def _ask_sync(self, exporter: Exporter, call: Call, request_until: float) -> Result:
        """Call one exporter from this thread by `request_until`, or share a call under way.

        Never raises. Fails at once (`rejected`) when the exporter's circuit is open or too
        many requests already wait on it.
        """
        name = exporter.hostname
        if exporter.maintenance:
            return Result(name, "maintenance", MAINTENANCE_ERROR)
        refused = self.guards.enter(name)
        if refused is not None:
            return Result(name, "rejected", refused)
        try:
            key = _flight_key(exporter, call)
            with self._flights_lock:
                flight = self._flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._flights[key] = _Flight(
                        Result(name, "unreachable", "the shared call failed"))
            if not leader:
                if flight.done.wait(timeout=max(0.0, request_until - time.monotonic())):
                    return flight.result
                return self._deadline_result(exporter)
            try:
                flight.result = self._call_sync(exporter, call, request_until)
            finally:
                with self._flights_lock:
                    del self._flights[key]
                flight.done.set()
            return flight.result
        finally:
            self.guards.leave(name)

    def _call_sync(self, exporter: Exporter, call: Call, request_until: float) -> Result:
        """The one real call behind `_ask_sync`, told to the circuit breaker."""
        name = exporter.hostname
        refused = self.guards.start_call(name)
        if refused is not None:
            return Result(name, "rejected", refused)
        liveness: Outcome = "inconclusive"
        seconds: float | None = None  # how long the exporter took to answer
        try:
            if not self._sync_slots.acquire(
                    timeout=max(0.0, request_until - time.monotonic())):
                return self._deadline_result(exporter)
            try:
                started = time.monotonic()
                exporter_until = started + self.exporter_timeout
                until = min(exporter_until, request_until)
                try:
                    origin, request = self._request(exporter, call)
                    outcome: httpclient.Response | Exception = self._sync.get(
                        origin, request, until, call.body_cap, fresh=call.method != "GET")
                except TimeoutError as exc:
                    if request_until <= exporter_until:
                        return self._deadline_result(exporter)
                    outcome = exc
                except (httpclient.HTTPError, ValueError) as exc:
                    outcome = exc
                result, liveness = self._settle(name, call, outcome)
                seconds = time.monotonic() - started
                return result
            finally:
                self._sync_slots.release()
        finally:
            self.guards.finish_call(name, liveness, seconds)

    def _resolve_on_loop(self, host: str, port: int, timeout: float) -> list[tuple[int, Any]]:
        # A name not yet in the resolver's cache: looked up by the loop (getaddrinfo in its
        # executor), so a request thread waits no longer than its own deadline.
        future = asyncio.run_coroutine_threadsafe(self._resolver.resolve(host, port),
                                                  self._loop)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _run(self, coro: Any) -> Any:
        """Run `coro` on the loop thread and wait for its result, bounded.

        Like asyncio.run_coroutine_threadsafe(...).result(), but cheaper per request: the
        thread waits on a bare lock instead of a concurrent Future, and submissions made while
        the loop has not yet picked up earlier ones share one wake-up of the loop (each
        wake-up is a write to its self-pipe: a system call).
        """
        job = self._submit(coro)
        # The coroutine enforces the deadline itself; this bound only guards against a
        # stuck loop, so a request thread can never wait forever.
        if not job.done.acquire(timeout=self.request_timeout + 5.0):
            self._loop.call_soon_threadsafe(job.cancel)
            raise FanoutError(f"the fan-out did not finish within "
                              f"{self.request_timeout + 5.0:.1f} s")
        assert job.task is not None
        return job.task.result()

    def _submit(self, coro: Any) -> _Job:
        """Hand `coro` to the loop thread (FanoutError when the fan-out is closed)."""
        if self._closed:
            coro.close()
            raise FanoutError("the fan-out is closed")
        job = _Job(coro)
        with self._inbox_lock:
            self._inbox.append(job)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._loop.call_soon_threadsafe(self._start_jobs)
        return job

    def _start_jobs(self) -> None:
        with self._inbox_lock:
            jobs = list(self._inbox)
            self._inbox.clear()
            self._wake_pending = False
        for job in jobs:
            job.start(self._loop)

    # -- inside the loop -----------------------------------------------------------------

    def _join(self, exporter: Exporter, call: Call) -> Result | _LoopFlight:
        """On the loop: the call of a broadcast to `exporter`, new or shared with one under
        way (its `sharers` counted: the call leaves the bulkhead for each when it ends, or the
        asker does at its deadline); or at once the result of not asking (maintenance,
        circuit open, bulkhead full). The flight returned may already hold its result."""
        name = exporter.hostname
        if exporter.maintenance:
            return Result(name, "maintenance", MAINTENANCE_ERROR)
        refused = self.guards.enter(name, block=False)
        if refused is not None:
            return Result(name, "rejected", refused)
        key = _flight_key(exporter, call)
        flight = self._loop_flights.get(key)
        if flight is not None:
            flight.sharers += 1
            return flight
        flight = self._loop_flights[key] = _LoopFlight(exporter, call, key)
        flight.sharers = 1
        refused = self.guards.start_call(name)
        if refused is not None:
            self._complete(flight, Result(name, "rejected", refused), None)
        else:
            flight.started = True
            if self._active < self.max_in_flight:
                self._begin(flight)
            else:
                self._queued.append(flight)
        return flight

    def _begin(self, flight: _LoopFlight) -> None:
        """Take a slot and send the call: on a kept-alive connection with a callback, else
        (a new connection is needed, or an action) in a task; the exporter timeout runs from
        here (`_expire_due`)."""
        self._active += 1
        flight.began = True
        flight.begun_at = self._loop.time()
        exporter, call = flight.exporter, flight.call
        try:
            origin, request = self._request(exporter, call)
        except ValueError as exc:
            self._finish(flight, exc)
            return
        loop = self._loop
        flight.origin = origin
        self._watch(flight, loop.time() + self.exporter_timeout)
        conn = self._client.take(origin) if call.method == "GET" else None
        if conn is not None:
            flight.conn = conn
            conn.send(request, call.body_cap, functools.partial(self._answered, flight),
                      self._client.budget)
        else:
            self._connecting(flight, request, fresh=call.method != "GET")

    def _connecting(self, flight: _LoopFlight, request: bytes, *, fresh: bool) -> None:
        assert flight.origin is not None
        task = flight.task = self._loop.create_task(
            self._client.get(flight.origin, request, flight.call.body_cap, fresh=fresh))
        task.add_done_callback(functools.partial(self._connected, flight))

    def _answered(self, flight: _LoopFlight, outcome: httpclient.Response | BaseException
                  ) -> None:
        """The kept-alive connection's outcome: keep the connection, or retry once on a new
        one when the exporter had closed it while idle."""
        conn, flight.conn = flight.conn, None
        assert conn is not None  # _complete() forgets the connection before clearing it
        if flight.result is not None:  # timed out meanwhile: the connection state is unknown
            conn.forget()
            return
        if isinstance(outcome, httpclient.Response):
            if not conn.closed:
                assert flight.origin is not None
                self._client.put(flight.origin, conn)
            self._finish(flight, outcome)
            return
        conn.forget()
        if isinstance(outcome, httpclient.STALE):
            request = self._request(flight.exporter, flight.call)[1]
            self._connecting(flight, request, fresh=True)
            return
        self._finish(flight, outcome)

    def _connected(self, flight: _LoopFlight, task: asyncio.Task[httpclient.Response]
                   ) -> None:
        flight.task = None
        if flight.result is not None or task.cancelled():
            return
        exc = task.exception()
        self._finish(flight, task.result() if exc is None else exc)

    def _watch(self, flight: _LoopFlight, when: float) -> None:
        """Time `flight` out at `when`. Every call gets the same exporter timeout from when
        it begins, so the deadlines come in order: a queue and one timer for its head,
        rather than a timer per call."""
        flight.deadline = [when, flight]
        self._deadlines.append(flight.deadline)
        if self._deadline_timer is None:
            self._deadline_timer = self._loop.call_at(when, self._expire_due)

    def _expire_due(self) -> None:
        """Time out the calls whose deadline passed; wake again at the next one's."""
        self._deadline_timer = None
        deadlines = self._deadlines
        now = self._loop.time()
        while deadlines:
            when, flight = deadlines[0]
            if flight is not None and when > now:
                if self._deadline_timer is not None:  # set by a call begun meanwhile
                    self._deadline_timer.cancel()
                self._deadline_timer = self._loop.call_at(when, self._expire_due)
                return
            deadlines.popleft()
            if flight is not None:
                self._finish(flight, TimeoutError())

    def _finish(self, flight: _LoopFlight, outcome: httpclient.Response | BaseException
                ) -> None:
        """What the call came to, classified and told to the breaker and the waiters."""
        if flight.result is not None:
            return
        if not isinstance(outcome, (httpclient.Response, TimeoutError, httpclient.HTTPError,
                                    ValueError)):
            log.error("exporter call failed unexpectedly", exc_info=outcome)
            outcome = httpclient.HTTPError(type(outcome).__name__)
        result, liveness = self._settle(flight.exporter.hostname, flight.call, outcome)
        self._complete(flight, result, liveness)

    def _complete(self, flight: _LoopFlight, result: Result, liveness: Outcome | None) -> None:
        """Settle `flight` with `result`: free what it holds, then tell its waiters."""
        if flight.result is not None:
            return
        flight.result = result
        name = flight.exporter.hostname
        if flight.deadline is not None:
            flight.deadline[1] = None  # the queue keeps [when, None] until `when`
            flight.deadline = None
        if flight.conn is not None:
            flight.conn.forget()
            flight.conn = None
        if flight.task is not None:
            flight.task.cancel()
            flight.task = None
        if flight.started:
            self.guards.finish_call(name, liveness or "inconclusive",
                                    self._loop.time() - flight.begun_at if flight.began else None)
        if self._loop_flights.get(flight.key) is flight:
            del self._loop_flights[flight.key]
        for _ in range(flight.sharers):
            self.guards.leave(name)
        flight.sharers = 0
        for waiter, index in flight.waiters:
            waiter.arrived(index, result)
        flight.waiters.clear()
        if flight.began:
            self._active -= 1
            self._drain()

    def _drain(self) -> None:
        """Begin queued calls while slots are free. Not re-entered: a call that ends at once
        (an unusable URL) would otherwise nest one level per queued call."""
        if self._draining:
            return
        self._draining = True
        try:
            queued = self._queued
            while queued and self._active < self.max_in_flight:
                self._begin(queued.popleft())
        finally:
            self._draining = False

    def _leave(self, flight: _LoopFlight) -> None:
        """An asker's deadline passed before `flight` ended: it no longer waits on it."""
        if flight.result is None and flight.sharers > 0:
            flight.sharers -= 1
            self.guards.leave(flight.exporter.hostname)

    async def _all(self, exporters: Sequence[Exporter], call: Call) -> list[Result]:
        """Ask every exporter on the loop (or share a call under way); one result each.

        Nothing per exporter but its flight (shared by every request asking the same) and a
        place in this request's list. The request deadline does not cancel the calls: one
        shared with another request goes on, bounded by the exporter timeout.
        """
        results: list[Result | None] = [None] * len(exporters)
        gather = _Gather(results, self._loop.create_future())
        asked: list[tuple[int, _LoopFlight]] = []
        try:
            for index, exporter in enumerate(exporters):
                joined = self._join(exporter, call)
                if isinstance(joined, Result):
                    results[index] = joined
                elif joined.result is not None:
                    results[index] = joined.result
                else:
                    gather.wait_for(index, joined)
                    asked.append((index, joined))
            gather.seal()
            if not gather.done.done():
                try:
                    async with asyncio.timeout(self.request_timeout):
                        await gather.done
                except TimeoutError:
                    pass
        finally:
            gather.close()
            for index, flight in asked:
                if results[index] is None:
                    self._leave(flight)
                    results[index] = self._deadline_result(exporters[index])
        return results  # type: ignore[return-value]  # every index was filled above

    async def _stream(self, exporters: Sequence[Exporter], call: Call,
                      stream: ResultStream) -> None:
        """`_all`, handing each result to `stream` as it comes instead of all at the end.

        The loop never blocks on the reader: a full queue is retried every few milliseconds
        for at most `stream.slow_reader_timeout`, then the reader is dropped. Answers already
        in are passed on every `_STREAM_BATCH` exporters asked, not only once the last
        exporter has been asked.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        arrivals = _Arrivals()
        asked: dict[int, _LoopFlight] = {}
        ready = arrivals.ready

        async def hand_ready() -> None:
            while ready:
                index, result = ready.popleft()
                del asked[index]
                await self._hand(stream, index, result)

        try:
            for index, exporter in enumerate(exporters):
                if index and not index % _STREAM_BATCH:
                    await asyncio.sleep(0)  # the calls just made go out, answers come in
                    await hand_ready()
                joined = self._join(exporter, call)
                if isinstance(joined, Result):
                    await self._hand(stream, index, joined)
                elif joined.result is not None:
                    await self._hand(stream, index, joined.result)
                else:
                    joined.waiters.append((arrivals, index))
                    asked[index] = joined
            while asked:
                await hand_ready()
                if not asked:
                    break
                arrivals.wake.clear()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        await arrivals.wake.wait()
                except TimeoutError:
                    break
        except _ReaderGone:
            pass
        finally:
            arrivals.close()
            for flight in asked.values():
                self._leave(flight)
            stream.finished = True
            try:
                stream.queue.put_nowait((-1, Result("", "timeout")))  # wakes a waiting reader
            except queue.Full:
                pass  # the reader finds `finished` once it has emptied the queue

    async def _hand(self, stream: ResultStream, index: int, result: Result) -> None:
        """Put one result in the stream's queue, waiting (without blocking the loop) for
        room at most `stream.slow_reader_timeout`; _ReaderGone when the reader is gone."""
        item = (index, result)
        give_up: float | None = None
        while True:
            if stream.left:
                raise _ReaderGone
            try:
                stream.queue.put_nowait(item)
                return
            except queue.Full:
                now = time.monotonic()
                if give_up is None:
                    give_up = now + stream.slow_reader_timeout
                elif now >= give_up:
                    stream.dropped = True
                    log.warning("stream reader too slow: dropped", extra={"fields": {
                        "waited_s": stream.slow_reader_timeout,
                        "exporters": len(stream.exporters)}})
                    raise _ReaderGone from None
            await asyncio.sleep(_STREAM_POLL)

    def _deadline_result(self, exporter: Exporter) -> Result:
        return Result(exporter.hostname, "timeout",
                      f"timeout after {self.request_timeout:.1f} s (request deadline)")

    def _settle(self, name: str, call: Call, outcome: httpclient.Response | Exception
                ) -> tuple[Result, Outcome]:
        """What one call came to, and what that says to the circuit breaker: the step after
        the call, the same for both ways of calling. A TimeoutError here is the exporter's
        own timeout (the caller answers a request deadline itself)."""
        if isinstance(outcome, TimeoutError):
            return Result(name, "timeout", self._timeout_error), "timeout"
        result = classify(name, call, outcome)
        return result, _liveness(result)

    def _request(self, exporter: Exporter, call: Call) -> tuple[httpclient.Origin, bytes]:
        """Where to send the call and its request head (ValueError for an unusable URL)."""
        # Kept per exporter and request: a broadcast to 10,000 exporters would otherwise
        # parse 10,000 URLs and build 10,000 heads that are the same as last time.
        key = (exporter.url, exporter.token, call.target, exporter.tls)
        made = self._requests.get(key) if call.method == "GET" else None
        if made is None:
            origin = httpclient.Origin.parse(exporter.url, exporter.tls)
            headers = self._headers
            if exporter.token:
                headers = {**headers, "Authorization": f"Bearer {exporter.token}"}
            made = origin, httpclient.request_bytes(origin, call.target, headers,
                                                    method=call.method, body=call.body)
            if call.method != "GET":  # an action's head carries its own body: never kept
                return made
            if len(self._requests) >= MAX_KEPT_REQUESTS:
                self._requests.clear()
            self._requests[key] = made
        return made


def classify(hostname: str, call: Call, outcome: httpclient.Response | Exception) -> Result:
    """What one exporter call came to: the answer or the error, as a `Result` of some kind.

    The one place that decides kinds for both ways of calling (timeouts excepted: which
    limit was hit is known only to the caller, and `timeout` is all there is to it).
    """
    if isinstance(outcome, Exception):
        return Result(hostname, *_failure(outcome))
    if outcome.over_budget:  # whatever the status: its answer was not read
        return Result(hostname, "bad_body", OVER_BUDGET_ERROR)
    status = outcome.status
    if status == 200:
        if outcome.too_large:
            return Result(hostname, "bad_body",
                          f"exporter answer exceeds {call.max_body_bytes} bytes")
        try:
            return Result(hostname, "ok",
                          data=call.decode(loads(outcome.body, max_values=call.max_values)))
        except BadBody as exc:
            return Result(hostname, "bad_body", str(exc))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            return Result(hostname, "bad_body", "exporter answered invalid JSON")
    if status == 404 and call.not_found_is_answer and not outcome.too_large:
        said = _not_found_body(outcome.body)
        if said is not None:
            details = said.get("details")
            if isinstance(details, str) and _REPLACED.fullmatch(details):
                return Result(hostname, "replaced", details)
            return Result(hostname, "not_found", NOT_FOUND_ERROR)
    if status == 501:
        return Result(hostname, "unsupported", UNSUPPORTED_ERROR)
    return Result(hostname, "bad_status", _status_message(status))


def _liveness(result: Result) -> Outcome:
    """What a call's result says to the circuit breaker (timeouts are told by the caller)."""
    if result.kind == "unreachable":
        return "connect_failed"
    if result.kind == "timeout":
        return "timeout"
    return "answered"  # even a bad answer: the exporter is there and responsive


# What decides a JSON text's shape once its escaped backslashes and quotes are gone: string
# ends, brackets, and the separators that keep one string's end from the next one's start.
_SKELETON_DELETE = bytes(c for c in range(256) if c not in b'"[]{},:')
_JSON_STRING = re.compile(rb'"[^"]*"')
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")
# Smaller answers are too short to nest deeply or hold many values: skip the scan.
_SCAN_ABOVE = 512
_SCAN_PIECE = 256 * 1024


def json_budget(body: bytes, *, max_depth: int = MAX_JSON_DEPTH,
                max_values: int | None = None) -> None:
    """Raise BadBody when `body` nests deeper than `max_depth` or holds too many values.

    Cheap: a few passes of bytes methods in C, and no Python object per value or string.
    Exact for valid UTF-8 JSON (in UTF-8 no byte of a multi-byte character is a quote, a
    backslash or a bracket); for invalid JSON exact up to the first error, which is where
    json.loads stops too. Values are over-counted as commas plus containers, which every
    value but a first one in its container follows or is.
    """
    if len(body) <= _SCAN_ABOVE:
        return
    skeleton = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(
        None, _SKELETON_DELETE)
    # Strings that held nothing structural are now "": gone in one pass. In valid JSON a
    # string's end is followed by , : ] or }, so "" is never one end and the next start.
    skeleton = skeleton.replace(b'""', b"")
    if b'"' in skeleton:
        skeleton = _cut_strings(skeleton)
    values = skeleton.count(b",") + skeleton.count(b"{") + skeleton.count(b"[") + 1
    if max_values is not None and values > max_values:
        raise BadBody(f"exporter answered more than {max_values} JSON values")
    # Depth: each pass removes the innermost pairs (replace never pairs what it just joined).
    nesting = skeleton.translate(_AS_SQUARE, b",:")
    del skeleton
    depth = 0
    while nesting:
        if depth == max_depth:
            raise BadBody(f"exporter answered malformed JSON (nested deeper than "
                          f"{max_depth} levels)")
        shorter = nesting.replace(b"[]", b"")
        if len(shorter) == len(nesting):
            raise BadBody("exporter answered malformed JSON (unbalanced brackets)")
        nesting = shorter
        depth += 1


def _cut_strings(skeleton: bytes) -> bytes:
    """`skeleton` without its strings, cut out piece by piece so that a million strings never
    make a million objects at once. A piece that starts or ends inside a string gets the
    quote it lacks: every quote left opens or closes one, so counting them says which."""
    kept: list[bytes] = []
    inside = False
    for start in range(0, len(skeleton), _SCAN_PIECE):
        piece = skeleton[start:start + _SCAN_PIECE]
        ends_inside = inside != (piece.count(b'"') % 2 == 1)
        if inside:
            piece = b'"' + piece
        if ends_inside:
            piece += b'"'
        kept.append(_JSON_STRING.sub(b"", piece))
        inside = ends_inside
    return b"".join(kept)


def loads(body: bytes, *, max_values: int | None = None) -> Any:
    """An exporter's UTF-8 JSON answer decoded within `json_budget` (BadBody if over it).

    ValueError for anything that is not UTF-8 JSON (RFC 8259 allows no other encoding).
    """
    json_budget(body, max_values=max_values)
    try:
        return json.loads(body.decode("utf-8"))
    except RecursionError:  # the depth scan makes this unreachable; a last guard
        raise BadBody("exporter answered malformed JSON (nested too deeply)") from None


def _failure(error: Exception) -> tuple[Kind, str]:
    """The kind and error text of a call that came to no answer."""
    if isinstance(error, httpclient.Disconnected):
        return "unreachable", "exporter closed the connection without answering"
    if isinstance(error, httpclient.ResolveError):
        return "unreachable", "cannot resolve the exporter's host"
    if isinstance(error, httpclient.ConnectError):
        if error.os_error.errno == errno.ECONNREFUSED:
            return "unreachable", "connection refused"
        return "unreachable", f"cannot connect: {_reason(error.os_error)}"
    if isinstance(error, httpclient.NetworkError):
        return "unreachable", f"connection failed: {_reason(error.os_error)}"
    if isinstance(error, httpclient.ProtocolError):
        return "bad_body", "exporter answered malformed HTTP"
    if isinstance(error, httpclient.BodyError):
        return "bad_body", "exporter answered a malformed HTTP body"
    return "unreachable", f"request failed: {type(error).__name__}"


def _reason(error: OSError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):  # the CA or name in its tls: key
        return f"TLS certificate not trusted: {error.verify_message}"
    return error.strerror or str(error) or type(error).__name__


# The exporter's details when a start_time guard failed (exporter/lookup.py says it so).
_REPLACED = re.compile(r"pid [0-9]{1,10} now belongs to a process started at "
                       r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def _not_found_body(body: bytes) -> dict[str, Any] | None:
    """The exporter's "process not found" error body, or None when the 404 is not one.

    A 404 only means "no such process" when it is the exporter's error body; a 404 page from
    something else at that URL (a wrong port, a proxy) is a misconfiguration.
    """
    if not body:
        return None
    try:
        data = loads(body)
    except ValueError:  # BadBody too
        return None
    if isinstance(data, dict) and data.get("error") == NOT_FOUND_ERROR:
        return data
    return None


def _status_message(status: int) -> str:
    message = f"exporter answered HTTP {status}"
    if status in (301, 302, 303, 307, 308):  # 304 Not Modified is no redirect
        return message + " (redirects are not followed)"
    if status in (401, 403):
        return message + " (check the exporter token)"
    return message
