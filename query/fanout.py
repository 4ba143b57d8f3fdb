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
    bad_body     not JSON, not the documented shape, or larger than the cap
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode

import procfleet
from query import httpclient
from query.config import Config
from query.discovery import Exporter

log = logging.getLogger("query.fanout")

Kind = Literal["ok", "not_found", "unsupported", "maintenance", "timeout", "unreachable",
               "bad_status", "bad_body"]
FAILURE_KINDS: tuple[Kind, ...] = ("timeout", "unreachable", "bad_status", "bad_body")
_VALID: frozenset[str] = frozenset({"ok", "not_found", "unsupported"})
_STATUS: Mapping[str, str] = {"ok": "ok", "maintenance": "skipped", "unsupported": "skipped"}

MAINTENANCE_ERROR = "exporter is in maintenance"
UNSUPPORTED_ERROR = "process lookup is unsupported on the exporter's platform"
NOT_FOUND_ERROR = "process not found"
NOT_FOUND_BODY_CAP = 64 * 1024  # an exporter's 404 error body is a few dozen bytes

# The process object's fields and their JSON types; anything else an exporter sends is dropped
# so the answer always has the documented shape. `pid` is required, the rest may be absent.
PROCESS_FIELDS: Mapping[str, tuple[type, ...]] = {
    "pid": (int,), "name": (str,), "user": (str,), "state": (str,),
    "cpu_percent": (int, float), "mem_percent": (int, float), "mem_rss": (int,),
    "command": (str,), "start_time": (str,),
}


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
    method: str = "GET"  # or POST, with a JSON `body` (the signal action)
    body: bytes = b""

    def body_cap(self, status: int) -> int | None:
        """How much of an answer with `status` to read; None: the status alone decides."""
        if status == 200:
            return self.max_body_bytes
        if status == 404 and self.not_found_is_answer:
            return NOT_FOUND_BODY_CAP
        return None

    @property
    def target(self) -> str:
        """The request target: the path and the query string."""
        return f"{self.path}?{urlencode(self.params)}" if self.params else self.path


def process_call(pid: int, max_body_bytes: int = 1024 * 1024) -> Call:
    """`GET /process/{pid}`: a 404 "process not found" is a valid answer."""

    def decode(data: Any) -> dict[str, Any]:
        process = clean_process(data)
        if process["pid"] != pid:
            raise BadBody(f"exporter answered for pid {process['pid']} instead of {pid}")
        return process

    return Call(f"/process/{pid}", decode, max_body_bytes, not_found_is_answer=True)


def list_call(filters: Mapping[str, str], max_body_bytes: int = 16 * 1024 * 1024) -> Call:
    """`GET /process?name=&user=&sort=&limit=`: the exporter's list, filters passed through."""

    def decode(data: Any) -> list[dict[str, Any]]:
        if not isinstance(data, dict) or not isinstance(data.get("processes"), list):
            raise BadBody("exporter answered JSON without a processes list")
        return [clean_process(p) for p in data["processes"]]

    return Call("/process", decode, max_body_bytes, params=dict(filters))


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
        self.task: asyncio.Task | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.task = loop.create_task(self.coro)
        self.task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self.done.release()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class Fanout:
    """Calls exporters: unicasts from the calling thread, broadcasts from an event-loop thread.

    Use as a context manager, or call `close()`: it closes the kept-alive connections and
    stops the loop thread.
    """

    def __init__(self, *, exporter_timeout: float = 2.0, request_timeout: float = 5.0,
                 max_in_flight: int = 256) -> None:
        self.exporter_timeout = exporter_timeout
        self.request_timeout = request_timeout
        self.max_in_flight = max_in_flight
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fanout",
                                         daemon=True)
        self._thread.start()
        self._closed = False
        self._origins: dict[str, httpclient.Origin] = {}
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
        self._client = httpclient.AsyncClient(self._resolver)
        self._slots: asyncio.Semaphore
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=10)

    @classmethod
    def from_config(cls, config: Config) -> Fanout:
        return cls(exporter_timeout=config.timeouts.exporter,
                   request_timeout=config.timeouts.request,
                   max_in_flight=config.fanout.max_in_flight)

    async def _open(self) -> None:
        self._slots = asyncio.Semaphore(self.max_in_flight)

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
        self._client.close()
        await asyncio.sleep(0)  # let the transports finish closing their sockets
        await asyncio.sleep(0)

    def __enter__(self) -> Fanout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what request threads call -------------------------------------------------------

    def all(self, exporters: Sequence[Exporter], call: Call) -> list[Result]:
        """Ask every exporter at once; one result each, in the order given."""
        if len(exporters) == 1:  # a unicast: no other thread needed
            return self.first(exporters, call)
        return self._run(self._all(exporters, call))

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
        """Call one exporter from this thread by `request_until`; never raises."""
        name = exporter.hostname
        if exporter.maintenance:
            return Result(name, "maintenance", MAINTENANCE_ERROR)
        if not self._sync_slots.acquire(timeout=max(0.0, request_until - time.monotonic())):
            return self._deadline_result(exporter)
        try:
            exporter_until = time.monotonic() + self.exporter_timeout
            until = min(exporter_until, request_until)
            try:
                origin, request = self._request(exporter, call)
                outcome: httpclient.Response | Exception = self._sync.get(
                    origin, request, until, call.body_cap, fresh=call.method != "GET")
            except TimeoutError:
                if request_until <= exporter_until:
                    return self._deadline_result(exporter)
                return Result(name, "timeout", self._timeout_error)
            except (httpclient.HTTPError, ValueError) as exc:
                outcome = exc
            return classify(name, call, outcome)
        finally:
            self._sync_slots.release()

    def _resolve_on_loop(self, host: str, port: int, timeout: float) -> list[tuple]:
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
        # The coroutine enforces the deadline itself; this bound only guards against a
        # stuck loop, so a request thread can never wait forever.
        if not job.done.acquire(timeout=self.request_timeout + 5.0):
            self._loop.call_soon_threadsafe(job.cancel)
            raise FanoutError(f"the fan-out did not finish within "
                              f"{self.request_timeout + 5.0:.1f} s")
        assert job.task is not None
        return job.task.result()

    def _start_jobs(self) -> None:
        with self._inbox_lock:
            jobs = list(self._inbox)
            self._inbox.clear()
            self._wake_pending = False
        for job in jobs:
            job.start(self._loop)

    # -- inside the loop -----------------------------------------------------------------

    async def _all(self, exporters: Sequence[Exporter], call: Call) -> list[Result]:
        tasks = [asyncio.create_task(self._ask(e, call)) for e in exporters]
        if not tasks:
            return []
        _, pending = await asyncio.wait(tasks, timeout=self.request_timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        late = self._deadline_result
        return [late(e) if t in pending or t.cancelled() else t.result()
                for e, t in zip(exporters, tasks, strict=True)]

    def _deadline_result(self, exporter: Exporter) -> Result:
        return Result(exporter.hostname, "timeout",
                      f"timeout after {self.request_timeout:.1f} s (request deadline)")

    async def _ask(self, exporter: Exporter, call: Call) -> Result:
        """Call one exporter on the loop; never raises (but may be cancelled by the deadline)."""
        name = exporter.hostname
        if exporter.maintenance:
            return Result(name, "maintenance", MAINTENANCE_ERROR)
        async with self._slots:
            try:
                origin, request = self._request(exporter, call)
                async with asyncio.timeout(self.exporter_timeout):
                    outcome: httpclient.Response | Exception = await self._client.get(
                        origin, request, call.body_cap, fresh=call.method != "GET")
            except TimeoutError:
                return Result(name, "timeout", self._timeout_error)
            except (httpclient.HTTPError, ValueError) as exc:
                outcome = exc
            return classify(name, call, outcome)

    def _request(self, exporter: Exporter, call: Call) -> tuple[httpclient.Origin, bytes]:
        """Where to send the call and its request head (ValueError for an unusable URL)."""
        # Parsing each exporter's URL once saves a parse per call.
        origin = self._origins.get(exporter.url)
        if origin is None:
            if len(self._origins) > 100_000:
                self._origins.clear()
            origin = self._origins[exporter.url] = httpclient.Origin.parse(exporter.url)
        headers = self._headers
        if exporter.token:
            headers = {**headers, "Authorization": f"Bearer {exporter.token}"}
        return origin, httpclient.request_bytes(origin, call.target, headers,
                                                method=call.method, body=call.body)


def classify(hostname: str, call: Call, outcome: httpclient.Response | Exception) -> Result:
    """What one exporter call came to: the answer or the error, as a `Result` of some kind.

    The one place that decides kinds for both ways of calling (timeouts excepted: which
    limit was hit is known only to the caller, and `timeout` is all there is to it).
    """
    if isinstance(outcome, Exception):
        return Result(hostname, *_failure(outcome))
    status = outcome.status
    if status == 200:
        if outcome.too_large:
            return Result(hostname, "bad_body",
                          f"exporter answer exceeds {call.max_body_bytes} bytes")
        try:
            return Result(hostname, "ok", data=call.decode(json.loads(outcome.body)))
        except BadBody as exc:
            return Result(hostname, "bad_body", str(exc))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            return Result(hostname, "bad_body", "exporter answered invalid JSON")
    if status == 404 and call.not_found_is_answer and not outcome.too_large \
            and _says_not_found(outcome.body):
        return Result(hostname, "not_found", NOT_FOUND_ERROR)
    if status == 501:
        return Result(hostname, "unsupported", UNSUPPORTED_ERROR)
    return Result(hostname, "bad_status", _status_message(status))


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
    return error.strerror or str(error) or type(error).__name__


def _says_not_found(body: bytes) -> bool:
    # A 404 only means "no such process" when it is the exporter's error body; a 404 page
    # from something else at that URL (a wrong port, a proxy) is a misconfiguration.
    if not body:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("error") == NOT_FOUND_ERROR


def _status_message(status: int) -> str:
    message = f"exporter answered HTTP {status}"
    if status in (301, 302, 303, 307, 308):  # 304 Not Modified is no redirect
        return message + " (redirects are not followed)"
    if status in (401, 403):
        return message + " (check the exporter token)"
    return message
