"""Every use of waitress's internals, in one module, checked against the version it was written for.

waitress's public API is `serve()`/`create_server()` and its settings. procfleet needs a little
more, and all of it lives here:

* strict request framing: a request with both Content-Length and Transfer-Encoding is refused
  (400) instead of being read as chunked (`StrictParser`, installed as the channel's parser);
* a request deadline: a connection that has not delivered a complete request within
  `head_timeout` seconds of opening (or of its first byte after the previous answer) is closed,
  so clients that trickle a header byte at a time cannot hold the connection slots
  (`Channel.waiting_since`, enforced by `WaitressServer.sweep`);
* waitress's own error answers (400, 413, 431, 500, 501) in the one JSON error shape
  (`JsonErrorTask`), per channel instead of patching `waitress.utilities.Error` process-wide;
* the event loop run one poll() at a time, with a drain on shutdown (listening sockets closed,
  answers in flight finished, workers stopped);
* fair queueing (`FairQueue`, the workers' queue): connections waiting for a worker are served
  round-robin by what their request asks for, not first come first served, so a flood of
  requests for one target (64 clients asking a hung exporter) cannot keep `/healthz` and the
  other targets waiting behind it;
* a bound on how long a worker waits for a client to read (`Channel`'s
  `_flush_outbufs_below_high_watermark`): waitress makes a worker writing a streamed answer
  wait, without a timeout, while more than `outbuf_high_watermark` bytes are unsent, so a
  client that asks for a stream and never reads would hold the thread for ever; the
  connection is closed once the client has taken nothing for WRITE_STALL_TIMEOUT seconds;
* a pause on reading (`pause_reading`): the app may ask, while it answers, that the
  connection's next request be read only after a short while, so a client that loops on
  answers costing next to nothing (a circuit open) cannot take the whole CPU;
* TLS (`TLSChannel`): each accepted socket is wrapped in the server's SSLContext without a
  handshake; the handshake then runs step by step on the loop's read and write events (a
  non-blocking SSLSocket says SSLWantReadError / SSLWantWriteError where a plain one would
  block), so a slow or silent client holds no thread and the request deadline covers it.

`waitress_problems()` lists every way the installed waitress differs from what this module was
written for (version range, and the presence and signature of each internal it uses);
tests/procfleet/test_waitress_adapter.py fails on any of them, and `create_server` logs them.

types-waitress describes waitress's public API; where this module goes past it, or the stubs
disagree with waitress 3.0 itself, a `# type: ignore[code]` says which (mypy --strict).
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import json
import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import waitress.server
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import BaseWSGIServer, MultiSocketServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from procfleet.web import error_body

log = logging.getLogger(__name__)

# Connections accepted per wake-up of a listening socket. waitress accepts one per pass of the
# loop, and a pass polls every connection: after a wave of closes (the deadline expiring
# for a flood of slow clients, who reconnect at once) a client in the backlog would wait for
# a thousand passes.
ACCEPT_BURST = 64

# Lowest supported version (inclusive) and the first one not yet reviewed (exclusive).
SUPPORTED = ((3, 0, 0), (3, 1, 0))

# (object, attribute, parameters its signature must have, or None for a plain attribute).
# Each is an internal this module reads, overrides or calls; keep the list in step with the code.
INTERNALS: tuple[tuple[Any, str, tuple[str, ...] | None], ...] = (
    (waitress.server, "create_server",
     ("application", "map", "_start", "_sock", "_dispatcher", "kw")),
    (BaseWSGIServer, "channel_class", None),
    (BaseWSGIServer, "accepting", None),
    (BaseWSGIServer, "pull_trigger", ("self",)),
    (BaseWSGIServer, "readable", ("self",)),
    (BaseWSGIServer, "handle_accept", ("self",)),
    (MultiSocketServer, "__init__",
     ("self", "map", "adj", "effective_listen", "dispatcher", "log_info")),
    (ThreadedTaskDispatcher, "shutdown", ("self", "cancel_pending", "timeout")),
    (ThreadedTaskDispatcher, "__init__", ("self",)),
    (ThreadedTaskDispatcher, "handler_thread", ("self", "thread_no")),
    (ThreadedTaskDispatcher, "add_task", ("self", "task")),
    (ThreadedTaskDispatcher, "set_thread_count", ("self", "count")),
    (HTTPChannel, "__init__", ("self", "server", "sock", "addr", "adj", "map")),
    (HTTPChannel, "received", ("self", "data")),
    (HTTPChannel, "parser_class", None),
    (HTTPChannel, "error_task_class", None),
    (HTTPChannel, "will_close", None),
    (HTTPChannel, "total_outbufs_len", None),
    (HTTPChannel, "handle_read", ("self",)),
    (HTTPChannel, "handle_write", ("self",)),
    (HTTPChannel, "readable", ("self",)),
    (HTTPChannel, "service", ("self",)),
    (HTTPChannel, "_flush_outbufs_below_high_watermark", ("self",)),
    (HTTPChannel, "_flush_exception", ("self", "flush", "do_close")),
    (HTTPChannel, "_flush_some", ("self", "do_close")),
    (HTTPChannel, "writable", ("self",)),
    (HTTPChannel, "handle_close", ("self",)),
    (HTTPChannel, "last_activity", None),
    (HTTPChannel, "connected", None),
    (HTTPRequestParser, "__init__", ("self", "adj")),
    (HTTPRequestParser, "received", ("self", "data")),
    (HTTPRequestParser, "parse_header", ("self", "header_plus")),
    (HTTPRequestParser, "completed", None),
    (HTTPRequestParser, "empty", None),
    (ErrorTask, "execute", ("self",)),
    (ErrorTask, "set_close_on_finish", ("self",)),
    (ErrorTask, "write", ("self", "data")),
    (wasyncore, "loop", ("timeout", "use_poll", "map", "count")),
    (wasyncore, "close_all", ("map", "ignore_all")),
    (wasyncore.dispatcher, "close", ("self",)),
    (wasyncore.dispatcher, "send", ("self", "data", "do_close")),
)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts + [0] * (3 - len(parts)))


def waitress_problems(version: str | None = None) -> list[str]:
    """Every difference between the installed waitress and what this module expects."""
    version = version or importlib.metadata.version("waitress")
    low, high = SUPPORTED
    problems: list[str] = []
    if not low <= _version_tuple(version) < high:
        problems.append(f"waitress {version} is outside the supported range "
                        f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}: review "
                        f"procfleet/waitress_adapter.py against it and widen SUPPORTED")
    for owner, name, params in INTERNALS:
        where = f"{getattr(owner, '__name__', owner)}.{name}"
        if not hasattr(owner, name):
            problems.append(f"{where} is gone")
            continue
        if params is None:
            continue
        try:
            got = tuple(inspect.signature(getattr(owner, name)).parameters)
        except (TypeError, ValueError):
            problems.append(f"{where} has no inspectable signature")
            continue
        if got != params:
            problems.append(f"{where} takes {got}, expected {params}")
    return problems


class StrictParser(HTTPRequestParser):
    """waitress's request parser, refusing framing that proxies and servers read differently.

    With both Content-Length and Transfer-Encoding, waitress reads the body as chunked (as
    RFC 9112 section 6.3 allows) but a proxy in front may use the length: a request smuggling
    vector. The RFC also allows rejecting it, which h11 and most servers do; so do we (400).
    """

    def __init__(self, adj: Any, on_complete: Callable[[], None] | None = None) -> None:
        super().__init__(adj)
        self._on_complete = on_complete

    def parse_header(self, header_plus: bytes) -> None:
        names = {line.split(b":", 1)[0].lower()
                 for line in header_plus.split(b"\r\n")[1:]
                 if line[:1] not in (b" ", b"\t")}  # obs-fold continuation, not a name
        if b"content-length" in names and b"transfer-encoding" in names:
            raise ParsingError("a request must not carry both Content-Length and "
                               "Transfer-Encoding")
        super().parse_header(header_plus)

    def received(self, data: bytes) -> int:
        consumed: int = super().received(data)
        # Blank lines complete an "empty" request that is dropped: they must not count as a
        # request, or a client sending CRLF now and then would never meet the deadline.
        if self.completed and not self.empty and self._on_complete is not None:
            self._on_complete()
            self._on_complete = None
        return consumed


class JsonErrorTask(ErrorTask):
    """waitress's own error answers (bad request line, 413, 431, 501, 500) as JSON."""

    def execute(self) -> None:
        # An ErrorTask is given the parser, which holds the error; the stubs say the Error.
        error = self.request.error  # type: ignore[attr-defined]
        reason = str(error.reason)
        body = json.dumps(error_body(int(error.code), reason.lower(),
                                     str(error.body) or reason)).encode("utf-8")
        self.status = f"{error.code} {reason}"
        # A list at run time; the stubs declare a read-only Sequence.
        self.response_headers.append(("Content-Type", "application/json"))  # type: ignore[attr-defined]
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


# The channel a worker thread is serving (set around HTTPChannel.service), for pause_reading.
_serving = threading.local()
# How long the loop sleeps at most while a connection's reading is paused (pause_reading).
PAUSE_TICK = 0.05
# Seconds a worker waits for a client that takes none of an answer's unsent bytes (past the
# high watermark) before the connection is closed and the worker freed.
WRITE_STALL_TIMEOUT = 30.0


def pause_reading(seconds: float) -> None:
    """Called by the app while it answers a request: read the connection's next request no
    sooner than `seconds` from now (at most PAUSE_TICK later). Outside a waitress worker, or
    on a server not made with `pausable=True`, it does nothing."""
    channel = getattr(_serving, "channel", None)
    if channel is not None:
        channel.paused_until = time.monotonic() + seconds


class Channel(HTTPChannel):
    """One client connection, with the clock of the request deadline.

    `waiting_since` is the monotonic time since which the connection owes a complete request:
    set when it is accepted and at its first byte after an answer, cleared when a request
    (head and any body) has fully arrived. None means idle between requests, which waitress's
    own channel_timeout bounds. `paused_until`: not read before then (`pause_reading`).
    """

    error_task_class = JsonErrorTask
    paused_until = 0.0

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
        self.waiting_since: float | None = time.monotonic()
        super().__init__(server, sock, addr, adj, map)
        # An instance-level parser factory, so the parser can report a complete request back.
        # waitress only calls parser_class(adj), so a factory serves where a class is declared.
        self.parser_class = self._new_parser  # type: ignore[assignment]

    def _new_parser(self, adj: Any) -> StrictParser:
        return StrictParser(adj, on_complete=self._request_complete)

    def _request_complete(self) -> None:
        self.waiting_since = None

    def received(self, data: bytes) -> bool:
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()
        return bool(super().received(data))

    def _flush_outbufs_below_high_watermark(self) -> None:
        # waitress's own, with a bound: it waits on outbuf_lock with no timeout for the loop
        # thread to send (a worker writing a streamed answer, past the high watermark).
        if self.total_outbufs_len <= self.adj.outbuf_high_watermark:
            return
        with self.outbuf_lock:
            # Both are waitress 3.0's own (INTERNALS checks them); the stubs leave them out.
            _, exception = self._flush_exception(  # type: ignore[attr-defined]
                self._flush_some, do_close=False)  # type: ignore[attr-defined]
            if exception:
                self.server.pull_trigger()
                self.outbuf_lock.wait(WRITE_STALL_TIMEOUT)
                return
            unsent, since = self.total_outbufs_len, time.monotonic()
            while self.connected and self.total_outbufs_len > self.adj.outbuf_high_watermark:
                self.server.pull_trigger()
                self.outbuf_lock.wait(min(1.0, WRITE_STALL_TIMEOUT))
                now = time.monotonic()
                if self.total_outbufs_len < unsent:
                    unsent, since = self.total_outbufs_len, now
                elif now - since >= WRITE_STALL_TIMEOUT:
                    self._abandon()
                    return

    def _abandon(self) -> None:
        """Close a connection whose client reads nothing, from the worker waiting on it.

        Flags alone would not do: waitress closes a channel in handle_write, which needs the
        socket writable, and it never is while the client reads nothing. A shut-down socket
        is, at once (an error), so the loop thread closes it; the worker returns, and its
        next write finds the channel disconnected (ClientDisconnected in write_soon). Not
        raised here: HTTPChannel.service also calls the flush, outside its own handler.
        """
        log.info("closing a connection whose client read nothing of its answer for %g s",
                 WRITE_STALL_TIMEOUT)
        self.will_close = True
        sock = self.socket
        if sock is not None:  # None: closed meanwhile by the loop thread
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server.pull_trigger()

    def service(self) -> None:
        _serving.channel = self
        try:
            super().service()
        finally:
            _serving.channel = None


class PausableChannel(Channel):
    """A channel that honours `pause_reading`, for a server whose app calls it.

    Only such a server gets it: an overridden readable(), asked of every connection on every
    turn of the loop, measured 30% off the exporter's lookups per second (wrk -c16), which
    never pauses a connection.
    """

    def readable(self) -> bool:
        # Never reset here: a worker may set a new pause at any moment (pause_reading).
        if self.paused_until and time.monotonic() < self.paused_until:
            return False
        return bool(super().readable())


class TLSChannel(Channel):
    """A client connection over TLS: handshake on the loop, then waitress's channel.

    The server's context is a class attribute of a subclass made per server
    (`WaitressServer`), since waitress builds channels as channel_class(server, sock, ...).
    Until the handshake is done the channel waits for whichever event OpenSSL asked for;
    the request deadline (`waiting_since`, set on accept) counts the handshake too.
    Decrypted bytes OpenSSL holds are not seen by poll(), so a read takes all of them.
    """

    tls_context: ssl.SSLContext
    # Checks a verified client certificate (getpeercert()) past what OpenSSL checks.
    tls_allows: Callable[[Any], bool] | None = None
    handshake_failures = 0  # per server subclass; read by WaitressServer

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
        self._handshaken = False
        self._wants_write = False  # OpenSSL needs to write before it can go on
        self._tls: ssl.SSLSocket | None = None
        try:
            sock = self._tls = self.tls_context.wrap_socket(sock, server_side=True,
                                                            do_handshake_on_connect=False)
        except OSError:  # the client is gone already; an exception here would reach the
            pass  # listener's error handler, which closes the listening socket
        super().__init__(server, sock, addr, adj, map)
        if self._tls is None:
            self.will_close = True  # closed by the next pass, never read

    def readable(self) -> bool:
        if not self._handshaken:
            return not self.will_close and not self._wants_write
        return bool(super().readable())

    def writable(self) -> bool:
        if not self._handshaken:
            return self.will_close or self._wants_write
        return bool(super().writable()) or self._wants_write

    def handle_read(self) -> None:
        if not self._handshaken:
            self._handshake()
            return
        self._wants_write = False
        sock = self._tls
        if sock is None:
            return
        try:
            data = sock.recv(self.adj.recv_bytes)
            while data:
                self.last_activity = time.time()
                self.received(data)
                # Decrypted bytes still held by OpenSSL: poll() will not report them.
                pending = sock.pending()
                if not pending or self.will_close:
                    return
                data = sock.recv(pending)
        except ssl.SSLWantReadError:
            return  # a partial record: the rest comes with the next read event
        except ssl.SSLWantWriteError:
            self._wants_write = True
            return
        except OSError:  # ssl.SSLError too: a broken or tampered stream
            self.handle_close()
            return
        self.handle_close()  # b"": the client closed (or sent close_notify)

    def handle_write(self) -> None:
        if not self._handshaken:
            if self.will_close:
                self.handle_close()
            else:
                self._handshake()
            return
        if self._wants_write:
            self.handle_read()
        super().handle_write()

    def send(self, data: bytes, do_close: bool = True) -> int:
        if self._tls is None:
            return 0
        try:
            return self._tls.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0  # retried with the same bytes on the next write event, as OpenSSL asks
        except ssl.SSLError:
            if do_close:
                self.handle_close()
            return 0
        except OSError:
            return int(super().send(data, do_close))

    def _handshake(self) -> None:
        sock = self._tls
        if sock is None:
            return
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._wants_write = False
            return
        except ssl.SSLWantWriteError:
            self._wants_write = True
            return
        except OSError as exc:  # a plain-HTTP client, a scanner, an unknown client cert
            type(self).handshake_failures += 1
            log.debug("TLS handshake with %s failed: %s", self.addr, exc)
            self.handle_close()
            return
        self._wants_write = False
        if self.tls_allows is not None and not self.tls_allows(sock.getpeercert()):
            type(self).handshake_failures += 1
            log.debug("TLS client %s: certificate names no allowed SAN", self.addr)
            self.handle_close()
            return
        self._handshaken = True
        self.handle_read()  # a request sent with the handshake's last flight


def tls_channel_class(context: ssl.SSLContext, allows: Callable[[Any], bool] | None = None
                      ) -> type[TLSChannel]:
    """A TLSChannel subclass for one server: its context, its client certificate check and
    its own count of failed handshakes."""
    attributes: dict[str, Any] = {"tls_context": context, "handshake_failures": 0}
    if allows is not None:
        attributes["tls_allows"] = staticmethod(allows)
    return type("ServerTLSChannel", (TLSChannel,), attributes)


def _accept_burst(listener: BaseWSGIServer) -> None:
    """Accept up to ACCEPT_BURST waiting connections, within waitress's connection limit."""
    # The socket map waitress counts against connection_limit (private: not in the stubs).
    connections = listener._map  # type: ignore[attr-defined]
    for _ in range(ACCEPT_BURST):
        before = len(connections)
        BaseWSGIServer.handle_accept(listener)
        if len(connections) == before or len(connections) >= listener.adj.connection_limit:
            return  # nothing more waiting (or a failed accept, logged), or the limit


class FairQueue:
    """The channels waiting for a worker, served round-robin by flow: the first two segments
    of the path of the request each one waits to have served (`/node/web-01`, `/healthz`).

    Stands in for ThreadedTaskDispatcher's deque (append, popleft, len), under its lock. A
    channel has at most one request queued at a time, so the queue is bounded by the
    connection limit, and so is the number of flows.
    """

    def __init__(self) -> None:
        self._flows: OrderedDict[str, deque[Any]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, channel: Any) -> None:
        flow = _flow(channel)
        waiting = self._flows.get(flow)
        if waiting is None:
            waiting = self._flows[flow] = deque()
        waiting.append(channel)
        self._count += 1

    def popleft(self) -> Any:
        flow, waiting = next(iter(self._flows.items()))
        channel = waiting.popleft()
        if waiting:
            self._flows.move_to_end(flow)  # its next channel waits for the other flows' turn
        else:
            del self._flows[flow]
        self._count -= 1
        return channel


def _flow(channel: Any) -> str:
    # `requests` is set per channel in HTTPChannel.__init__ (not a class attribute that
    # INTERNALS could check): without it every channel is one flow, first come first served.
    requests = getattr(channel, "requests", None)
    if not requests:
        return ""
    path = getattr(requests[0], "path", None) or ""
    return "/".join(path.split("/", 3)[:3])


class FairDispatcher(ThreadedTaskDispatcher):
    """waitress's worker threads, taking channels from a `FairQueue`."""

    def __init__(self) -> None:
        super().__init__()
        self.queue = FairQueue()  # type: ignore[assignment]  # its deque's methods, duck-typed


class WaitressServer:
    """A waitress server driven one poll() at a time by procfleet.serve."""

    def __init__(self, app: Callable[..., Any], host: str, port: int, *, head_timeout: float,
                 tls: ssl.SSLContext | None = None,
                 tls_allows: Callable[[Any], bool] | None = None, pausable: bool = False,
                 **settings: Any) -> None:
        for problem in waitress_problems():
            log.warning("%s", problem)
        # poll() instead of select(): select() fails on fd numbers past 1023, which a service
        # with a raised open-files limit reaches under load.
        settings["asyncore_use_poll"] = True
        dispatcher = FairDispatcher()
        dispatcher.set_thread_count(int(settings.get("threads", 4)))
        self._server = waitress.server.create_server(app, host=host, port=port,
                                                     _dispatcher=dispatcher, **settings)
        # A single listener is returned itself; several (e.g. a name resolving to v4 and v6)
        # come wrapped in a MultiSocketServer holding the shared map. The stubs type that map
        # as fd -> socket (it holds dispatchers) and leave out a listener's private _map.
        self.map: dict[int, Any] = (self._server.map  # type: ignore[assignment]
                                    if hasattr(self._server, "map")
                                    else self._server._map)  # type: ignore[attr-defined]
        self.listeners = [d for d in self.map.values() if isinstance(d, BaseWSGIServer)]
        channel_class: type[Channel] = (
            Channel if tls is None else tls_channel_class(tls, tls_allows))
        if pausable:  # pause_reading honoured (PausableChannel's readable() first)
            channel_class = type(f"Pausable{channel_class.__name__}",
                                 (PausableChannel, channel_class), {})
        self.channel_class = channel_class
        for listener in self.listeners:
            listener.channel_class = self.channel_class  # per server object, not process-wide
            # An instance attribute shadowing the method, on purpose (mypy: method-assign).
            listener.handle_accept = functools.partial(  # type: ignore[method-assign]
                _accept_burst, listener)
        self.head_timeout = head_timeout
        # getnameinfo() gives the port as text. BaseWSGIServer.__init__ sets both attributes;
        # the stubs leave them out.
        self.bound = (str(self.listeners[0].effective_host),  # type: ignore[attr-defined]
                      int(self.listeners[0].effective_port))  # type: ignore[attr-defined]

    def poll(self, timeout: float) -> None:
        """Handle what is ready (accepts, reads, writes), waiting at most `timeout` seconds
        (PAUSE_TICK at most: a paused connection is not polled, so no event resumes it)."""
        wasyncore.loop(timeout=min(timeout, PAUSE_TICK), map=self.map, use_poll=True, count=1)

    def sweep(self, now: float | None = None) -> int:
        """Close connections that owe a request past the deadline; return how many."""
        now = time.monotonic() if now is None else now
        cutoff = now - self.head_timeout
        closed = 0
        for channel in list(self.map.values()):
            if (isinstance(channel, Channel) and not channel.requests
                    and channel.waiting_since is not None and channel.waiting_since < cutoff
                    and not channel.will_close):
                # Closed by the loop's next pass, as waitress's own channel_timeout does.
                channel.will_close = True
                closed += 1
        return closed

    def handshake_failures(self) -> int:
        """TLS handshakes that failed or were refused so far (0 without TLS)."""
        channel_class = self.channel_class
        return channel_class.handshake_failures if issubclass(channel_class, TLSChannel) else 0

    def wake(self) -> None:
        """Make a poll() in progress return now (safe from a signal handler)."""
        self.listeners[0].pull_trigger()

    def stop_accepting(self) -> None:
        """Close the listening sockets; connections already accepted carry on."""
        for listener in self.listeners:
            # dispatcher.close, not the server's close: that would also close the trigger
            # the drain still needs to wake the loop.
            wasyncore.dispatcher.close(listener)

    def busy(self) -> bool:
        """True while some connection has a request in progress or an answer to send."""
        return any(isinstance(c, HTTPChannel) and (c.requests or c.total_outbufs_len)
                   for c in list(self.map.values()))

    def connections(self) -> int:
        return sum(isinstance(c, HTTPChannel) for c in list(self.map.values()))

    def close(self, worker_timeout: float = 1.0) -> None:
        """Stop the worker threads (bounded) and close every socket."""
        # waitress adds the timeout to time.time(): a float works where the stubs say int.
        self._server.task_dispatcher.shutdown(timeout=worker_timeout)  # type: ignore[arg-type]
        wasyncore.close_all(self.map)
