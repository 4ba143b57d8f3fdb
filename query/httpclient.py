"""A small HTTP/1.1 keep-alive client for calling exporters: GET (and the signal action's small
POST), redirects not followed.

One response parser (`_Reader`: fed bytes, says when the answer is complete) serves two
transports, each with per-exporter pools of idle keep-alive connections:

    SyncClient.get()    blocking sockets used by the calling thread: a unicast lookup costs
                        no hand-over to another thread (see fanout.py)
    AsyncClient.get()   asyncio Protocol connections on the fan-out's loop: a broadcast to
                        thousands of exporters needs no thread per exporter

Both raise the same errors, subclasses of `HTTPError`, and the builtin TimeoutError; what they
mean for a lookup is decided in one place, `query.fanout.classify`. A body is read only when
`body_cap(status)` gives a cap; above it the answer is marked `too_large` and the connection
dropped. A request on a kept-alive connection that the exporter closed meanwhile is retried
once on a new connection; a POST is not (it may have acted): it always gets a new connection
(`fresh=True`), so a stale kept-alive one cannot make it fail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

BodyCap = Callable[[int], "int | None"]

IDLE_SECONDS = 15.0  # close idle connections before the exporters' servers do (waitress: 30 s)
MAX_IDLE_PER_ORIGIN = 64
MAX_IDLE_TOTAL = 16384  # above the largest fleet one fan-out keeps a connection to
DNS_TTL = 60.0
NEGATIVE_TTL = 5.0  # a failed lookup is retried after this long, not on every call
MAX_NAMES = 65536
MAX_FAILED_NAMES = 4096
MAX_HEAD = 64 * 1024  # an exporter's answer head is a few hundred bytes
MAX_INTERIM = 8  # 1xx answers before the real one
MAX_CHUNK_LINE = 8 * 1024  # a chunk-size line, or all of the trailers
_READ_SIZE = 64 * 1024  # below malloc's mmap threshold: no map and unmap per read


class HTTPError(Exception):
    """An exporter call that came to no HTTP answer (the subclasses say why)."""


class ResolveError(HTTPError):
    """The exporter's host name does not resolve."""


class ConnectError(HTTPError):
    """No connection could be made; `os_error` is the reason (refused, unreachable, TLS...)."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class Disconnected(HTTPError):
    """The exporter closed the connection before answering anything."""


class NetworkError(HTTPError):
    """The connection failed (reset, broken pipe...) while asking or reading the answer."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class ProtocolError(HTTPError):
    """The answer's status line or headers are not HTTP/1.x."""


class BodyError(HTTPError):
    """The answer's body is cut short or its framing (chunks, encoding) is malformed."""


@dataclass(frozen=True, slots=True)
class Response:
    """An answer: its status and body (empty when not read); `too_large` past the cap, or
    (`over_budget`) when reading it would have taken the answers being read past their
    shared `ByteBudget`."""

    status: int
    body: bytes = b""
    too_large: bool = False
    over_budget: bool = False


class ByteBudget:
    """Bytes of answer bodies being read at once by one event loop's calls (not locked:
    one loop thread uses it). The count of calls in flight bounds sockets; this bounds the
    memory their answers hold until each is complete."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """How to check an https exporter: the CA that signs its certificate (else the
    system's), the name its certificate holds (else the URL's host), and a client
    certificate to present (for an exporter with client_auth_type set)."""

    ca_file: str | None = None
    server_name: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the exporter; ssl.SSLError or OSError when a file
        cannot be used."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an exporter listens: scheme, host, port and the base URL's path prefix; for
    https, how its certificate is checked (`tls`, part of the pool key: a connection
    verified against one CA is never handed to a caller that trusts another)."""

    scheme: str
    host: str
    port: int
    host_header: str
    prefix: str = ""  # "/procfleet" for http://gw/procfleet/: requests go below it
    tls: ClientTLS | None = None

    @property
    def server_name(self) -> str:
        """The name the exporter's certificate must hold (and the SNI sent)."""
        return self.tls.server_name if self.tls and self.tls.server_name else self.host

    @classmethod
    def parse(cls, url: str, tls: ClientTLS | None = None) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        default = port == (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, host, port, shown if default else f"{shown}:{port}",
                   parts.path.rstrip("/"), tls if parts.scheme == "https" else None)


MAX_REQUEST_BODY = 64 * 1024  # a signal request is a few hundred bytes


def request_bytes(origin: Origin, target: str, headers: dict[str, str], *,
                  method: str = "GET", body: bytes = b"") -> bytes:
    """The request for `method target` with `headers` (values may not hold line breaks).

    Only GET and POST; a POST's `body` is JSON of at most MAX_REQUEST_BODY bytes.
    """
    if method not in ("GET", "POST"):
        raise ValueError(f"method {method!r} is not supported")
    if len(body) > MAX_REQUEST_BODY or (body and method != "POST"):
        raise ValueError(f"a request body is POST only, at most {MAX_REQUEST_BODY} bytes")
    # Accept-Encoding: identity says what the parser enforces: no encoded answer is read.
    lines = [f"{method} {origin.prefix}{target} HTTP/1.1", f"Host: {origin.host_header}",
             "Accept-Encoding: identity"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name} holds a line break")
        lines.append(f"{name}: {value}")
    if method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- the response parser ------------------------------------------------------------------

# The response grammar of RFC 9112, as h11 writes it in h11/_abnf.py. Anything else is a
# ProtocolError: a lenient parser lets a hostile exporter choose the framing.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VCHAR = rb"[\x21-\x7e\x80-\xff]"
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t \x21-\x7e\x80-\xff]*)?")
# No whitespace before the colon; a line starting with SP/HT (obs-fold) has no name; CR, LF
# and NUL are not field characters, so a bare CR or a NUL fails the match.
_HEADER = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR
                     + rb"+)*)?[ \t]*")
_HTTP = b"HTTP/"


class _Reader:
    """Parses one response from the bytes fed to it (sans I/O).

    `feed()` returns True once the answer is complete; `response` and `keep_alive` then say
    what it was and whether the connection can carry another request. Every buffer is
    bounded (MAX_HEAD for the head, the body cap for the body, MAX_CHUNK_LINE for chunk
    framing), checked as bytes arrive, and the end of the head is searched only in the bytes
    not yet searched, so a head fed one byte at a time costs linear time.
    """

    __slots__ = ("body_cap", "status", "started", "keep_alive", "response", "_buffer",
                 "_scanned", "_interim", "_mode", "_length", "_cap", "_body", "_chunk_left",
                 "_budget", "_counted")

    def __init__(self, body_cap: BodyCap, budget: ByteBudget | None = None) -> None:
        self.body_cap = body_cap
        self._budget = budget
        self._counted = 0  # bytes of `_body` taken from the budget
        self.status = 0
        self.started = False  # any byte of an answer has arrived
        self.keep_alive = False
        self.response: Response | None = None
        self._buffer = bytearray()  # the head (or chunk framing) not yet parsed
        self._scanned = 0  # how far the buffer holds no end of head / of line
        self._interim = 0
        self._mode = "head"
        self._body = bytearray()

    def feed(self, data: bytes) -> bool:
        self.started = True
        if self.response is not None:
            if data:  # bytes after a complete answer: the connection is not reusable
                self.keep_alive = False
            return True
        if self._mode == "head":
            self._buffer += data
            if not self._head():
                return False
            if self.response is not None:
                if self._buffer:
                    self.keep_alive = False
                return True
            data = bytes(self._buffer)
            self._buffer.clear()
            self._scanned = 0
        if self._mode == "length":
            return self._fixed(data)
        if self._mode == "eof":
            self._append(data)
            return self.response is not None
        return self._chunked(data)

    def feed_eof(self) -> Response:
        """The connection closed: the answer if it was complete by then, else the error."""
        if self.response is not None:
            return self.response
        if not self.started:
            raise Disconnected("exporter closed the connection without answering")
        if self._mode == "head":
            raise ProtocolError("connection closed within the answer's headers")
        if self._mode == "eof":
            self._finish(keep_alive=False)
            assert self.response is not None
            return self.response
        raise BodyError("connection closed before the whole body arrived")

    def _head(self) -> bool:
        """Parse the head once it is complete (interim 1xx answers skipped); False: wait."""
        buffer = self._buffer
        while True:
            if buffer[:5] != _HTTP[:len(buffer)]:
                raise ProtocolError("answer does not start with HTTP/")
            end = buffer.find(b"\r\n\r\n", self._scanned)
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    raise ProtocolError(f"answer head larger than {MAX_HEAD} bytes")
                self._scanned = max(0, len(buffer) - 3)
                return False
            if end > MAX_HEAD:
                raise ProtocolError(f"answer head larger than {MAX_HEAD} bytes")
            lines = bytes(buffer[:end]).split(b"\r\n")
            del buffer[:end + 4]
            self._scanned = 0
            status_line = _STATUS_LINE.fullmatch(lines[0])
            if status_line is None:
                raise ProtocolError("malformed status line")
            status = int(status_line[2])
            if status == 101:
                raise ProtocolError("exporter switched protocols unasked")
            if status >= 200:
                break
            self._interim += 1  # 100 Continue, 103 Early Hints: the real answer follows
            if self._interim > MAX_INTERIM:
                raise ProtocolError("too many interim (1xx) answers")
        self.status = status
        length: int | None = None
        chunked = False
        keep_alive = status_line[1] == b"1"  # HTTP/1.0 is never kept alive (as h11)
        for line in lines[1:]:
            header = _HEADER.fullmatch(line)
            if header is None:
                raise ProtocolError("malformed header line")
            name = header[1].lower()
            value = header[2] or b""
            if name == b"content-length":
                if not value.isdigit() or len(value) > 18 or (
                        length is not None and int(value) != length):
                    raise ProtocolError("malformed Content-Length")
                length = int(value)
            elif name == b"transfer-encoding":
                if chunked or value.lower() != b"chunked":
                    raise ProtocolError("unsupported Transfer-Encoding")
                chunked = True
            elif name == b"connection":
                if b"close" in (t.strip() for t in value.lower().split(b",")):
                    keep_alive = False
            elif name == b"content-encoding" and value.lower() != b"identity":
                # The client never asks for an encoding (Accept-Encoding: identity): an
                # encoded answer is refused before its body is read, so no body is ever
                # decoded, let alone one that inflates a thousandfold.
                raise BodyError("exporter answered a Content-Encoding it was not asked for")
        if chunked and length is not None:
            raise ProtocolError("both Transfer-Encoding and Content-Length")
        if chunked and not keep_alive and status_line[1] == b"0":
            raise ProtocolError("chunked framing in an HTTP/1.0 answer")
        self.keep_alive = keep_alive
        if status in (204, 304):  # never a body, whatever the headers say
            self._mode = "length"
            self._finish(keep_alive)
            return True
        cap = self.body_cap(status)
        if cap is None:  # the body is not wanted: the connection cannot be reused
            self._finish(keep_alive=False)
            return True
        self._cap = cap
        if chunked:
            self._mode = "chunked"
            self._chunk_left = -1
        elif length is not None:
            if length > cap:
                self._finish(keep_alive=False, too_large=True)
                return True
            self._mode = "length"
            self._length = length
            if length == 0:
                self._finish(keep_alive)
        else:
            self._mode = "eof"
            self.keep_alive = False
        return True

    def _fixed(self, data: bytes) -> bool:
        if self.response is not None:
            self.keep_alive = self.keep_alive and not data
            return True
        need = self._length - len(self._body)
        if len(data) > need:  # bytes after the answer: do not reuse the connection
            self.keep_alive = False
            data = data[:need]
        self._append(data)
        if self.response is None and len(self._body) == self._length:
            self._finish(self.keep_alive)
        return self.response is not None

    def _chunked(self, data: bytes) -> bool:
        # _chunk_left: > 0 bytes of chunk data still to come; -1 at a size line; -3 at the
        # CRLF after a chunk's data; -2 in the trailers after the last chunk.
        buffer = self._buffer
        buffer += data
        pos = 0
        while self.response is None:
            left = self._chunk_left
            if left > 0:
                piece = buffer[pos:pos + left]
                if not piece:
                    break
                self._append(piece)
                pos += len(piece)
                self._chunk_left = -3 if len(piece) == left else left - len(piece)
            elif left == -3:
                if len(buffer) - pos < 2:
                    break
                if buffer[pos:pos + 2] != b"\r\n":
                    raise BodyError("malformed chunk")
                pos += 2
                self._chunk_left = -1
            elif left == -1:
                end = buffer.find(b"\r\n", max(pos, self._scanned))
                if end < 0:
                    if len(buffer) - pos > MAX_CHUNK_LINE:
                        raise BodyError("malformed chunk size")
                    self._scanned = max(pos, len(buffer) - 1)
                    break
                self._scanned = 0
                size = bytes(buffer[pos:end]).split(b";", 1)[0].strip()
                if not size or len(size) > 15 or not all(c in b"0123456789abcdefABCDEF"
                                                         for c in size):
                    raise BodyError("malformed chunk size")
                pos = end + 2
                self._chunk_left = int(size, 16) or -2
            else:  # trailers: skip them up to the blank line
                if buffer[pos:pos + 2] == b"\r\n":
                    pos += 2
                else:
                    end = buffer.find(b"\r\n\r\n", max(pos, self._scanned))
                    if end < 0:
                        if len(buffer) - pos > MAX_CHUNK_LINE:
                            raise BodyError(f"trailers larger than {MAX_CHUNK_LINE} bytes")
                        self._scanned = max(pos, len(buffer) - 3)
                        break
                    pos = end + 4
                self._finish(self.keep_alive and pos == len(buffer))
        del buffer[:pos]
        self._scanned = max(0, self._scanned - pos)
        return self.response is not None

    def _append(self, data: bytes | bytearray) -> None:
        if self.response is not None:
            return
        budget = self._budget
        if budget is not None:
            if budget.used + len(data) > budget.limit:
                self._finish(keep_alive=False, too_large=True, over_budget=True)
                return
            budget.used += len(data)
            self._counted += len(data)
        self._body += data
        if len(self._body) > self._cap:
            self._finish(keep_alive=False, too_large=True)

    def _finish(self, keep_alive: bool, too_large: bool = False,
                over_budget: bool = False) -> None:
        self.keep_alive = keep_alive
        body = b"" if too_large else bytes(self._body)
        self._body = bytearray()
        self.release()
        self.response = Response(self.status, body, too_large, over_budget)

    def release(self) -> None:
        """Give the body's bytes back to the budget (the answer is done, or abandoned)."""
        if self._counted and self._budget is not None:
            self._budget.used -= self._counted
        self._counted = 0


# -- the pool -------------------------------------------------------------------------------

Conn = TypeVar("Conn")


class Pool(Generic[Conn]):
    """Idle keep-alive connections by origin, for both transports; thread-safe.

    Bounded per origin and in total (a connection past either bound is closed, not kept).
    A connection is handed out only when `usable(conn)` says so: one that became readable
    while idle (closed by the exporter, or holding bytes nobody asked for) is closed, as
    urllib3's is_connection_dropped does. `sweep()` closes those idle past `idle_seconds` or
    no longer `alive(conn)` (by default: usable); the transports call it on a timer, so idle
    sockets go even if their origin is never asked again.
    """

    def __init__(self, close: Callable[[Conn], None], usable: Callable[[Conn], bool], *,
                 alive: Callable[[Conn], bool] | None = None,
                 idle_seconds: float = IDLE_SECONDS, per_origin: int = MAX_IDLE_PER_ORIGIN,
                 total: int = MAX_IDLE_TOTAL) -> None:
        self.idle_seconds = idle_seconds
        self.per_origin = per_origin
        self.total = total
        self._close = close
        self._usable = usable
        self._alive = alive or usable
        self._idle: dict[Origin, list[tuple[Conn, float]]] = {}
        self._count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    def take(self, origin: Origin) -> Conn | None:
        """An idle, usable connection to `origin` (the most recently used), or None."""
        now = time.monotonic()
        dead: list[Conn] = []
        found: Conn | None = None
        with self._lock:
            idle = self._idle.get(origin)
            while idle:
                conn, since = idle.pop()
                self._count -= 1
                if now - since < self.idle_seconds and self._usable(conn):
                    found = conn
                    break
                dead.append(conn)
            if idle is not None and not idle:
                del self._idle[origin]
        for conn in dead:
            self._close(conn)
        return found

    def put(self, origin: Origin, conn: Conn) -> bool:
        """Keep `conn` idle for `origin`; False (and closed) when a bound is reached."""
        with self._lock:
            idle = self._idle.get(origin)
            if self._count < self.total and (idle is None or len(idle) < self.per_origin):
                if idle is None:
                    idle = self._idle[origin] = []
                idle.append((conn, time.monotonic()))
                self._count += 1
                return True
        self._close(conn)
        return False

    def sweep(self) -> int:
        """Close the connections idle too long or no longer usable; how many were closed."""
        now = time.monotonic()
        dead: list[Conn] = []
        with self._lock:
            for origin, idle in list(self._idle.items()):
                keep = []
                for conn, since in idle:
                    if now - since < self.idle_seconds and self._alive(conn):
                        keep.append((conn, since))
                    else:
                        dead.append(conn)
                if keep:
                    self._idle[origin] = keep
                else:
                    del self._idle[origin]
            self._count -= len(dead)
        for conn in dead:
            self._close(conn)
        return len(dead)

    def close(self) -> None:
        with self._lock:
            conns = [conn for idle in self._idle.values() for conn, _ in idle]
            self._idle.clear()
            self._count = 0
        for conn in conns:
            self._close(conn)


def _readable(sock: socket.socket | Any) -> bool:
    """True when `sock` has bytes (or an EOF) waiting: an idle connection must not have."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        return _fd_readable(sock.fileno())
    except (OSError, ValueError):  # closed meanwhile: fileno() is -1
        return True


def _fd_readable(fd: int) -> bool:
    """poll(), not select(): descriptors past 1023 are ordinary in a service that raises its
    open-files limit."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


# -- name resolution ------------------------------------------------------------------------

class Resolver:
    """Host names to addresses, cached for DNS_TTL seconds; IP addresses pass straight through.

    A name that failed to resolve is remembered for NEGATIVE_TTL seconds, so a fleet listing
    a dead name does not send a DNS query per exporter call. Both caches are bounded in
    count; past the bound the expired entries go, then the oldest.
    """

    def __init__(self, max_names: int = MAX_NAMES, max_failed: int = MAX_FAILED_NAMES,
                 negative_ttl: float = NEGATIVE_TTL) -> None:
        self.max_names = max_names
        self.max_failed = max_failed
        self.negative_ttl = negative_ttl
        self._cache: dict[tuple[str, int], tuple[float, list[tuple[int, Any]]]] = {}
        self._failed: dict[tuple[str, int], float] = {}

    def __len__(self) -> int:
        return len(self._cache) + len(self._failed)

    def cached(self, host: str, port: int) -> list[tuple[int, Any]] | None:
        """The addresses (family, sockaddr) for `host`, or None when they must be looked up.

        Raises ResolveError while a recent lookup of `host` failed.
        """
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            now = time.monotonic()
            entry = self._cache.get((host, port))
            if entry is not None and entry[0] > now:
                return entry[1]
            failed_until = self._failed.get((host, port))
            if failed_until is not None and failed_until > now:
                raise ResolveError(f"cannot resolve {host!r} (failed moments ago)") from None
            return None
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        return [(family, (host, port))]

    async def resolve(self, host: str, port: int) -> list[tuple[int, Any]]:
        addresses = self.cached(host, port)
        if addresses is not None:
            return addresses
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM)
        except OSError:
            infos = []
        addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
        now = time.monotonic()
        if not addresses:
            _bounded_put(self._failed, (host, port), now + self.negative_ttl,
                         self.max_failed, now, lambda until: until)
            raise ResolveError(f"cannot resolve {host!r}")
        self._failed.pop((host, port), None)
        _bounded_put(self._cache, (host, port), (now + DNS_TTL, addresses), self.max_names,
                     now, lambda entry: entry[0])
        return addresses


def _bounded_put(cache: dict[Any, Any], key: Any, value: Any, bound: int, now: float,
                 expiry: Callable[[Any], float]) -> None:
    cache.pop(key, None)
    if len(cache) >= bound:
        for old in [k for k, v in cache.items() if expiry(v) <= now]:
            del cache[old]
        while len(cache) >= bound:  # dicts keep insertion order: the first is the oldest
            del cache[next(iter(cache))]
    cache[key] = value


# Client contexts by TLS settings: one per CA and client certificate configured, so a few.
# Bounded all the same (discovery could name many); past it the cache starts over.
MAX_TLS_CONTEXTS = 256
_TLS_CONTEXTS: dict[ClientTLS | None, ssl.SSLContext] = {}
_TLS_LOCK = threading.Lock()


def _tls_context(tls: ClientTLS | None = None) -> ssl.SSLContext:
    """The context for `tls` (None: the system's CAs), made once; ssl.SSLError or OSError
    when its files cannot be used (a ConnectError for the caller, as a refused connection)."""
    with _TLS_LOCK:
        context = _TLS_CONTEXTS.get(tls)
    if context is None:
        context = tls.context() if tls is not None else ssl.create_default_context()
        with _TLS_LOCK:
            if len(_TLS_CONTEXTS) >= MAX_TLS_CONTEXTS:
                _TLS_CONTEXTS.clear()
            context = _TLS_CONTEXTS.setdefault(tls, context)
    return context


# -- blocking transport ---------------------------------------------------------------------

class SyncClient:
    """Blocking keep-alive calls from the calling thread; thread-safe.

    `resolve(host, port, timeout)` looks up a name not in the resolver's cache (the fan-out
    runs it on its loop, so a slow DNS server is bounded by the caller's deadline too).
    """

    def __init__(self, resolver: Resolver,
                 resolve: Callable[[str, int, float], list[tuple[int, Any]]], *,
                 idle_seconds: float = IDLE_SECONDS, per_origin: int = MAX_IDLE_PER_ORIGIN,
                 total: int = MAX_IDLE_TOTAL) -> None:
        self._resolver = resolver
        self._resolve = resolve
        self.pool: Pool[socket.socket] = Pool(
            _close_socket, lambda sock: not _readable(sock), idle_seconds=idle_seconds,
            per_origin=per_origin, total=total)
        self._sweeper: threading.Thread | None = None
        self._sweeper_lock = threading.Lock()
        self._closing = threading.Event()

    def get(self, origin: Origin, request: bytes, until: float, body_cap: BodyCap, *,
            fresh: bool = False) -> Response:
        """Send `request` (from `request_bytes`) and read the answer by `until` (monotonic).

        `fresh`: on a new connection, never retried (for a request that is not idempotent).
        """
        sock = None if fresh else self._take(origin)
        if sock is not None:
            try:
                return self._exchange(origin, sock, request, until, body_cap)
            except (Disconnected, _Stale):
                pass  # closed by the exporter while idle: once more on a new connection
        sock = self._connect(origin, until)
        try:
            return self._exchange(origin, sock, request, until, body_cap)
        except _Stale as exc:
            raise NetworkError(exc.os_error) from None

    def _exchange(self, origin: Origin, sock: socket.socket, request: bytes, until: float,
                  body_cap: BodyCap) -> Response:
        reader = _Reader(body_cap)
        response: Response | None  # as reader.response; both ways out of the loop leave one
        try:
            sock.settimeout(_remaining(until))
            try:
                sock.sendall(request)
            except OSError as exc:
                if isinstance(exc, TimeoutError):
                    raise
                raise _Stale(exc) from None
            while True:
                sock.settimeout(_remaining(until))
                try:
                    data = sock.recv(_READ_SIZE)
                except OSError as exc:
                    if isinstance(exc, TimeoutError):
                        raise
                    if not reader.started and isinstance(exc, ConnectionError):
                        raise _Stale(exc) from None
                    raise NetworkError(exc) from None
                if not data:
                    response = reader.feed_eof()
                    reader.keep_alive = False
                    break
                if reader.feed(data):
                    response = reader.response
                    assert response is not None
                    break
        except BaseException:
            sock.close()
            raise
        if reader.keep_alive:
            self._put(origin, sock)
        else:
            sock.close()
        return response

    def _connect(self, origin: Origin, until: float) -> socket.socket:
        addresses = self._resolver.cached(origin.host, origin.port)
        if addresses is None:
            addresses = self._resolve(origin.host, origin.port, _remaining(until))
        error: OSError | None = None
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(_remaining(until))
                sock.connect(sockaddr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if origin.scheme == "https":
                    sock = _tls_context(origin.tls).wrap_socket(
                        sock, server_hostname=origin.server_name)
                return sock
            except TimeoutError:
                sock.close()
                raise
            except OSError as exc:
                sock.close()
                error = exc
        assert error is not None
        raise ConnectError(error)

    def _take(self, origin: Origin) -> socket.socket | None:
        return self.pool.take(origin)

    def _put(self, origin: Origin, sock: socket.socket) -> None:
        if self._closing.is_set() or not self.pool.put(origin, sock):
            return
        with self._sweeper_lock:
            if self._sweeper is None:
                self._sweeper = threading.Thread(target=self._sweep, name="httpclient-sweep",
                                                 daemon=True)
                self._sweeper.start()

    def _sweep(self) -> None:
        # Runs while connections are idle; ends when none are left (a put starts it again).
        while not self._closing.wait(self.pool.idle_seconds / 2):
            self.pool.sweep()
            with self._sweeper_lock:
                if not len(self.pool):
                    self._sweeper = None
                    return

    def close(self) -> None:
        self._closing.set()
        with self._sweeper_lock:
            sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.join(timeout=5)
        self.pool.close()


def _close_socket(sock: socket.socket) -> None:
    sock.close()


class _Stale(Exception):
    """A reused connection failed before any answer: the exporter had closed it."""

    def __init__(self, os_error: OSError) -> None:
        self.os_error = os_error


# What a request on a kept-alive connection may end in when the exporter had closed it while
# idle: asked again once, on a new connection.
STALE = (Disconnected, _Stale)


def _remaining(until: float) -> float:
    left = until - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


# -- asyncio transport ----------------------------------------------------------------------

Settle = Callable[["Response | BaseException"], None]


class Connection(asyncio.Protocol):
    """One keep-alive connection on the loop; carries one request at a time.

    `send()` hands the outcome (the Response, or the error) to a callback when the answer is
    complete: a broadcast to thousands of exporters then needs no future, task or timer
    object per call (see fanout.py). `request()` is the same as an awaitable.
    """

    __slots__ = ("transport", "closed", "fd", "_reader", "_settled")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.fd = -1
        self._reader: _Reader | None = None
        self._settled: Settle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport is a Transport; the Protocol API names the base class.
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def usable(self) -> bool:
        """Still open and silent: the loop may not have run data_received for bytes that
        arrived while idle, so the socket itself is asked (with a 0 timeout). A TLS
        connection's buffered bytes are the transport's, which reads them as they come."""
        return not self.closed and (self.fd < 0 or not _fd_readable(self.fd))

    def alive(self) -> bool:
        """Not closed: what the idle sweep asks. Bytes or an EOF on an idle connection reach
        data_received/connection_lost, which close it, so no system call is needed."""
        return not self.closed

    def send(self, data: bytes, body_cap: BodyCap, settled: Settle,
             budget: ByteBudget | None = None) -> None:
        """Send one request; `settled` gets the Response or the error, once."""
        self._reader = _Reader(body_cap, budget)
        self._settled = settled
        assert self.transport is not None
        self.transport.write(data)

    def request(self, data: bytes, body_cap: BodyCap, budget: ByteBudget | None = None
                ) -> asyncio.Future[Response]:
        waiter: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        def settled(outcome: Response | BaseException) -> None:
            if waiter.done():
                return
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)

        self.send(data, body_cap, settled, budget)
        return waiter

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:  # nothing was asked: a confused server; do not reuse
            self.close()
            return
        try:
            done = reader.feed(data)
        except HTTPError as exc:
            self.close()
            self._settle(exc)
            return
        if done:
            if not reader.keep_alive:
                self.close()
            assert reader.response is not None  # feed() is done when the answer is
            self._settle(reader.response)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost settles the waiter

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reader = self._reader
        if reader is None or self._settled is None:
            return
        if exc is None:
            try:
                self._settle(reader.feed_eof())
            except HTTPError as error:
                self._settle(error)
        elif not reader.started and isinstance(exc, ConnectionError):
            self._settle(_Stale(exc))
        elif isinstance(exc, OSError):
            self._settle(NetworkError(exc))
        else:
            self._settle(NetworkError(OSError(str(exc))))

    def _settle(self, outcome: Response | BaseException) -> None:
        settled, self._settled, reader, self._reader = self._settled, None, self._reader, None
        if reader is not None:
            reader.release()
        if settled is not None:
            settled(outcome)

    def forget(self) -> None:
        """Give up on the request under way: close, and never call its callback."""
        self._settled = None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.release()
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class AsyncClient:
    """Keep-alive calls on one event loop; callers bound the time (a timer, or
    asyncio.timeout). `get()` is the whole call; `take()`, `Connection.send()` and `put()`
    are its steps without a coroutine, for a caller that makes thousands at once."""

    def __init__(self, resolver: Resolver, *, idle_seconds: float = IDLE_SECONDS,
                 per_origin: int = MAX_IDLE_PER_ORIGIN, total: int = MAX_IDLE_TOTAL,
                 max_buffered_bytes: int | None = None) -> None:
        self._resolver = resolver
        self.budget = ByteBudget(max_buffered_bytes) if max_buffered_bytes else None
        self.pool: Pool[Connection] = Pool(
            Connection.close, Connection.usable, alive=Connection.alive,
            idle_seconds=idle_seconds, per_origin=per_origin, total=total)
        self._sweeper: asyncio.TimerHandle | None = None

    async def get(self, origin: Origin, request: bytes, body_cap: BodyCap, *,
                  fresh: bool = False) -> Response:
        conn = None if fresh else self.take(origin)
        if conn is not None:
            try:
                return await self._exchange(origin, conn, request, body_cap)
            except (Disconnected, _Stale):
                pass  # closed by the exporter while idle: once more on a new connection
        conn = await self._connect(origin)
        try:
            return await self._exchange(origin, conn, request, body_cap)
        except _Stale as exc:
            raise NetworkError(exc.os_error) from None

    async def _exchange(self, origin: Origin, conn: Connection, request: bytes,
                        body_cap: BodyCap) -> Response:
        try:
            response = await conn.request(request, body_cap, self.budget)
        except BaseException:  # an error, or cancelled (a timeout): the state is unknown
            conn.close()
            raise
        if not conn.closed:
            self.put(origin, conn)
        return response

    async def _connect(self, origin: Origin) -> Connection:
        addresses = await self._resolver.resolve(origin.host, origin.port)
        loop = asyncio.get_running_loop()
        try:
            tls = _tls_context(origin.tls) if origin.scheme == "https" else None
        except OSError as exc:  # a CA or client certificate file gone since the config load
            raise ConnectError(exc) from None
        error: OSError | None = None
        for family, sockaddr in addresses:
            try:
                _, conn = await loop.create_connection(
                    Connection, sockaddr[0], sockaddr[1], family=family, ssl=tls,
                    server_hostname=origin.server_name if tls else None)
                return conn
            except OSError as exc:  # ssl.SSLError is an OSError too
                error = exc
        assert error is not None
        raise ConnectError(error)

    def take(self, origin: Origin) -> Connection | None:
        """An idle kept-alive connection to `origin` to `send()` on, or None."""
        return self.pool.take(origin)

    def put(self, origin: Origin, conn: Connection) -> None:
        """Keep `conn` (its answer complete, the connection not closed) for the next call."""
        if self.pool.put(origin, conn) and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(
                self.pool.idle_seconds / 2, self._sweep)

    def _sweep(self) -> None:
        # Runs on the loop while connections are idle; a put starts it again.
        self.pool.sweep()
        self._sweeper = None
        if len(self.pool):
            self._sweeper = asyncio.get_running_loop().call_later(
                self.pool.idle_seconds / 2, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.pool.close()
