"""Ask many exporters at once: one asyncio loop thread, one shared aiohttp session.

Request threads (waitress workers) hand a batch to `Fanout.all()` or `Fanout.first()`, which
submit one coroutine to the loop thread and wait, bounded, for its results. Inside the loop
every exporter call is a task; a semaphore bounds how many are in flight across all requests,
connections are kept alive between requests, and no thread is started per exporter.

A failing exporter is data, not an exception: every exporter gets a `Result`, and `_ask` is
the one place that turns what happened into a kind:

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
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from yarl import URL

import procfleet
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
    """Calls exporters in parallel from a dedicated event-loop thread.

    Use as a context manager, or call `close()`: it closes the shared session and stops the
    loop thread.
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
        self._base_urls: dict[str, URL] = {}
        self._inbox: list[_Job] = []
        self._inbox_lock = threading.Lock()
        self._wake_pending = False
        self._session: aiohttp.ClientSession
        self._slots: asyncio.Semaphore
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=10)

    @classmethod
    def from_config(cls, config: Config) -> Fanout:
        return cls(exporter_timeout=config.timeouts.exporter,
                   request_timeout=config.timeouts.request,
                   max_in_flight=config.fanout.max_in_flight)

    async def _open(self) -> None:
        self._slots = asyncio.Semaphore(self.max_in_flight)
        connector = aiohttp.TCPConnector(
            limit=self.max_in_flight, limit_per_host=0,
            # Close idle connections before the exporters' servers do (waitress: 30 s), so a
            # request rarely meets a connection the other side has just dropped.
            keepalive_timeout=15, ttl_dns_cache=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # exporters set none; skip the jar's work
            timeout=aiohttp.ClientTimeout(total=None),  # _ask applies its own
            headers={"User-Agent": f"procfleet-query/{procfleet.__version__}",
                     "Accept": "application/json"},
            auto_decompress=True,
        )

    def close(self) -> None:
        """Close the session and stop the loop thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def __enter__(self) -> Fanout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what request threads call -------------------------------------------------------

    def all(self, exporters: Sequence[Exporter], call: Call) -> list[Result]:
        """Ask every exporter at once; one result each, in the order given."""
        return self._run(self._all(exporters, call))

    def first(self, exporters: Sequence[Exporter], call: Call) -> list[Result]:
        """Ask one exporter after another until one gives a valid answer.

        Returns every result in the order tried; the last one is the answer when it is valid.
        """
        return self._run(self._first(exporters, call))

    def _run(self, coro: Any) -> Any:
        """Run `coro` on the loop thread and wait for its result, bounded.

        Like asyncio.run_coroutine_threadsafe(...).result(), but cheaper per request, which a
        unicast lookup feels: the thread waits on a bare lock instead of a concurrent Future,
        and submissions made while the loop has not yet picked up earlier ones share one
        wake-up of the loop (each wake-up is a write to its self-pipe: a system call).
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
        if len(exporters) == 1:  # a unicast: no tasks to gather, just the deadline
            try:
                async with asyncio.timeout(self.request_timeout):
                    return [await self._ask(exporters[0], call)]
            except TimeoutError:
                return [self._deadline_result(exporters[0])]
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

    async def _first(self, exporters: Iterable[Exporter], call: Call) -> list[Result]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        tried: list[Result] = []
        for exporter in exporters:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    result = await self._ask(exporter, call)
            except TimeoutError:
                result = self._deadline_result(exporter)
            tried.append(result)
            if result.valid:
                break
        return tried

    def _deadline_result(self, exporter: Exporter) -> Result:
        return Result(exporter.hostname, "timeout",
                      f"timeout after {self.request_timeout:.1f} s (request deadline)")

    async def _ask(self, exporter: Exporter, call: Call) -> Result:
        """Call one exporter and classify what happened; never raises (but may be cancelled)."""
        name = exporter.hostname
        if exporter.maintenance:
            return Result(name, "maintenance", MAINTENANCE_ERROR)
        async with self._slots:
            # One retry when a kept-alive connection turns out to be closed by the other end.
            for attempt in (1, 2):
                try:
                    async with asyncio.timeout(self.exporter_timeout):
                        return await self._request(exporter, call)
                except TimeoutError:
                    return Result(name, "timeout", f"timeout after {self.exporter_timeout:.1f} s")
                except aiohttp.ServerDisconnectedError:
                    if attempt == 2:
                        return Result(name, "unreachable",
                                      "exporter closed the connection without answering")
                except aiohttp.ClientConnectorDNSError:
                    return Result(name, "unreachable", "cannot resolve the exporter's host")
                except aiohttp.ClientConnectorError as exc:
                    if exc.os_error.errno == errno.ECONNREFUSED:
                        return Result(name, "unreachable", "connection refused")
                    reason = exc.os_error.strerror or type(exc.os_error).__name__
                    return Result(name, "unreachable", f"cannot connect: {reason}")
                except aiohttp.ClientResponseError:  # not parseable as HTTP
                    return Result(name, "bad_body", "exporter answered malformed HTTP")
                except aiohttp.ClientPayloadError:
                    return Result(name, "bad_body", "exporter answered a malformed HTTP body")
                except aiohttp.ClientOSError as exc:
                    reason = exc.strerror or type(exc).__name__
                    return Result(name, "unreachable", f"connection failed: {reason}")
                except aiohttp.ClientError as exc:
                    return Result(name, "unreachable", f"request failed: {type(exc).__name__}")
            raise AssertionError("unreachable")  # pragma: no cover

    def _base_url(self, url: str) -> URL:
        # Parsing each exporter's URL once saves a parse per call (yarl's cache is small).
        base = self._base_urls.get(url)
        if base is None:
            if len(self._base_urls) > 100_000:
                self._base_urls.clear()
            base = self._base_urls[url] = URL(url)
        return base

    async def _request(self, exporter: Exporter, call: Call) -> Result:
        name = exporter.hostname
        headers = {"Authorization": f"Bearer {exporter.token}"} if exporter.token else None
        url = self._base_url(exporter.url).with_path(call.path, encoded=True)
        async with self._session.get(url, params=call.params or None,
                                     headers=headers, allow_redirects=False) as response:
            status = response.status
            if status == 200:
                body = await _read_capped(response, call.max_body_bytes)
                if body is None:
                    return Result(name, "bad_body",
                                  f"exporter answer exceeds {call.max_body_bytes} bytes")
                try:
                    return Result(name, "ok", data=call.decode(json.loads(body)))
                except ValueError as exc:  # JSONDecodeError and BadBody
                    if isinstance(exc, BadBody):
                        return Result(name, "bad_body", str(exc))
                    return Result(name, "bad_body", "exporter answered invalid JSON")
            if status == 404 and call.not_found_is_answer:
                if _says_not_found(await _read_capped(response, 64 * 1024)):
                    return Result(name, "not_found", NOT_FOUND_ERROR)
            if status == 501:
                return Result(name, "unsupported", UNSUPPORTED_ERROR)
            return Result(name, "bad_status", _status_message(status))


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """The body, or None when it is larger than `cap` bytes (checked before reading it all)."""
    length = response.content_length
    if length is not None:
        return None if length > cap else await response.read()
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)


def _says_not_found(body: bytes | None) -> bool:
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
    if 300 <= status < 400:
        return message + " (redirects are not followed)"
    if status in (401, 403):
        return message + " (check the exporter token)"
    return message
