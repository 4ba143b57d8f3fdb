"""A small HTTP/1.1 keep-alive client for calling exporters: GET only, redirects not followed.

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
once on a new connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

BodyCap = Callable[[int], "int | None"]

IDLE_SECONDS = 15.0  # close idle connections before the exporters' servers do (waitress: 30 s)
MAX_IDLE_PER_ORIGIN = 64
DNS_TTL = 60.0
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
    """An answer: its status and body (empty when not read); `too_large` past the cap."""

    status: int
    body: bytes = b""
    too_large: bool = False


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an exporter listens: scheme, host, port and the base URL's path prefix."""

    scheme: str
    host: str
    port: int
    host_header: str
    prefix: str = ""  # "/procfleet" for http://gw/procfleet/: requests go below it

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        default = port == (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, host, port, shown if default else f"{shown}:{port}",
                   parts.path.rstrip("/"))


def request_bytes(origin: Origin, target: str, headers: dict[str, str]) -> bytes:
    """The request head for `GET target` with `headers` (values may not hold line breaks)."""
    lines = [f"GET {origin.prefix}{target} HTTP/1.1", f"Host: {origin.host_header}"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name} holds a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- the response parser ------------------------------------------------------------------

class _Reader:
    """Parses one response from the bytes fed to it (sans I/O).

    `feed()` returns True once the answer is complete; `response` and `keep_alive` then say
    what it was and whether the connection can carry another request.
    """

    __slots__ = ("body_cap", "buffer", "status", "started", "keep_alive", "response",
                 "_mode", "_length", "_cap", "_body", "_encoding", "_chunk_left")

    def __init__(self, body_cap: BodyCap) -> None:
        self.body_cap = body_cap
        self.buffer = b""
        self.status = 0
        self.started = False  # any byte of an answer has arrived
        self.keep_alive = False
        self.response: Response | None = None
        self._mode = "head"
        self._body = bytearray()

    def feed(self, data: bytes) -> bool:
        self.started = True
        if self._mode == "head":
            self.buffer = self.buffer + data if self.buffer else data
            if not self._head():
                return False
            if self.response is not None:
                return True
            data, self.buffer = self.buffer, b""
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
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    raise ProtocolError("answer headers larger than 64 KiB")
                if self.buffer and not b"HTTP/"[:len(self.buffer)] == self.buffer[:5]:
                    raise ProtocolError("answer does not start with HTTP/")
                return False
            head = self.buffer[:end].decode("latin-1")
            self.buffer = self.buffer[end + 4:]
            lines = head.split("\r\n")
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if version not in ("HTTP/1.1", "HTTP/1.0") or not (code.isdigit() and
                                                                code.isascii()):
                raise ProtocolError("malformed status line")
            status = int(code)
            if 100 <= status < 200 and status != 101:
                continue  # an interim answer (100 Continue): the real one follows
            break
        self.status = status
        length = chunked = None
        encoding = ""
        keep_alive = version == "HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError("malformed header line")
            name = name.strip().lower()
            if name == "content-length":
                value = value.strip()
                if not (value.isdigit() and value.isascii()) or (
                        length is not None and int(value) != length):
                    raise ProtocolError("malformed Content-Length")
                length = int(value)
            elif name == "transfer-encoding":
                chunked = value.strip().lower() == "chunked"
                if not chunked:
                    raise ProtocolError(f"unsupported Transfer-Encoding {value.strip()!r}")
            elif name == "connection":
                tokens = value.lower()
                if "close" in tokens:
                    keep_alive = False
                elif "keep-alive" in tokens:
                    keep_alive = True
            elif name == "content-encoding":
                encoding = value.strip().lower()
        self.keep_alive = keep_alive
        if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
            raise BodyError(f"unsupported Content-Encoding {encoding!r}")
        self._encoding = encoding if encoding not in ("", "identity") else None
        cap = self.body_cap(status)
        if cap is None:  # the body is not wanted: the connection cannot be reused
            self._finish(keep_alive=False)
            return True
        self._cap = cap
        if status in (204, 304):
            self._mode = "length"
            self._length = 0
        elif chunked:
            self._mode = "chunked"
            self._chunk_left = -1
        elif length is not None:
            if length > cap:
                self._finish(keep_alive=False, too_large=True)
                return True
            self._mode = "length"
            self._length = length
        else:
            self._mode = "eof"
            self.keep_alive = False
        return True

    def _fixed(self, data: bytes) -> bool:
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
        buffer = self.buffer + data if self.buffer else data
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
                end = buffer.find(b"\r\n", pos)
                if end < 0:
                    if len(buffer) - pos > 1024:
                        raise BodyError("malformed chunk size")
                    break
                size = buffer[pos:end].split(b";", 1)[0].strip()
                if not size or not all(c in b"0123456789abcdefABCDEF" for c in size):
                    raise BodyError("malformed chunk size")
                pos = end + 2
                self._chunk_left = int(size, 16) or -2
            else:  # trailers: skip them up to the blank line
                if buffer.startswith(b"\r\n", pos):
                    pos += 2
                else:
                    end = buffer.find(b"\r\n\r\n", pos)
                    if end < 0:
                        if len(buffer) - pos > 65536:
                            raise BodyError("trailers larger than 64 KiB")
                        break
                    pos = end + 4
                self._finish(self.keep_alive and pos == len(buffer))
        self.buffer = buffer[pos:]
        return self.response is not None

    def _append(self, data: bytes) -> None:
        if self.response is not None:
            return
        self._body += data
        if self._encoding is None and len(self._body) > self._cap:
            self._finish(keep_alive=False, too_large=True)

    def _finish(self, keep_alive: bool, too_large: bool = False) -> None:
        self.keep_alive = keep_alive
        body = b""
        if not too_large and self._mode != "head":
            body = bytes(self._body)
            if self._encoding is not None:
                body, too_large = _decode(body, self._encoding, self._cap)
                if too_large:
                    body = b""
        self.response = Response(self.status, body, too_large)


def _decode(body: bytes, encoding: str, cap: int) -> tuple[bytes, bool]:
    """A gzip or deflate body decoded, at most `cap` bytes; (b"", True) when larger."""
    wbits = 31 if "gzip" in encoding else 15
    try:
        inflater = zlib.decompressobj(wbits)
        data = inflater.decompress(body, cap + 1)
    except zlib.error:
        if wbits == 15:  # some servers send raw deflate without the zlib wrapper
            try:
                inflater = zlib.decompressobj(-15)
                data = inflater.decompress(body, cap + 1)
            except zlib.error:
                raise BodyError("malformed compressed body") from None
        else:
            raise BodyError("malformed compressed body") from None
    if len(data) > cap:
        return b"", True
    return data, False


# -- name resolution ------------------------------------------------------------------------

class Resolver:
    """Host names to addresses, cached for DNS_TTL seconds; IP addresses pass straight through."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], tuple[float, list[tuple]]] = {}

    def cached(self, host: str, port: int) -> list[tuple] | None:
        """The addresses (family, sockaddr) for `host`, or None when they must be looked up."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            entry = self._cache.get((host, port))
            if entry is not None and entry[0] > time.monotonic():
                return entry[1]
            return None
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        return [(family, (host, port))]

    async def resolve(self, host: str, port: int) -> list[tuple]:
        addresses = self.cached(host, port)
        if addresses is not None:
            return addresses
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise ResolveError(f"cannot resolve {host!r}") from None
        addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
        if not addresses:
            raise ResolveError(f"cannot resolve {host!r}")
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[(host, port)] = (time.monotonic() + DNS_TTL, addresses)
        return addresses


_TLS: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context()
    return _TLS


# -- blocking transport ---------------------------------------------------------------------

class SyncClient:
    """Blocking keep-alive calls from the calling thread; thread-safe.

    `resolve(host, port, timeout)` looks up a name not in the resolver's cache (the fan-out
    runs it on its loop, so a slow DNS server is bounded by the caller's deadline too).
    """

    def __init__(self, resolver: Resolver,
                 resolve: Callable[[str, int, float], list[tuple]]) -> None:
        self._resolver = resolver
        self._resolve = resolve
        self._idle: dict[Origin, list[tuple[socket.socket, float]]] = {}
        self._lock = threading.Lock()
        self._swept = time.monotonic()

    def get(self, origin: Origin, request: bytes, until: float, body_cap: BodyCap) -> Response:
        """Send `request` (from `request_bytes`) and read the answer by `until` (monotonic)."""
        sock = self._take(origin)
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
                    sock = _tls_context().wrap_socket(sock, server_hostname=origin.host)
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
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(origin)
            while idle:
                sock, since = idle.pop()
                if now - since < IDLE_SECONDS:
                    return sock
                sock.close()
        return None

    def _put(self, origin: Origin, sock: socket.socket) -> None:
        now = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < MAX_IDLE_PER_ORIGIN:
                idle.append((sock, now))
                sock = None  # type: ignore[assignment]
            if now - self._swept > IDLE_SECONDS:
                self._swept = now
                for key, conns in list(self._idle.items()):
                    for old in [c for c in conns if now - c[1] >= IDLE_SECONDS]:
                        conns.remove(old)
                        old[0].close()
                    if not conns:
                        del self._idle[key]
        if sock is not None:
            sock.close()

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for sock, _ in conns:
                    sock.close()
            self._idle.clear()


class _Stale(Exception):
    """A reused connection failed before any answer: the exporter had closed it."""

    def __init__(self, os_error: OSError) -> None:
        self.os_error = os_error


def _remaining(until: float) -> float:
    left = until - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


# -- asyncio transport ----------------------------------------------------------------------

class _Connection(asyncio.Protocol):
    """One keep-alive connection on the loop; carries one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reader: _Reader | None = None
        self._waiter: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, data: bytes, body_cap: BodyCap) -> asyncio.Future:
        self._reader = _Reader(body_cap)
        self._waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:  # nothing was asked: a confused server; do not reuse
            self.close()
            return
        try:
            done = reader.feed(data)
        except HTTPError as exc:
            self._settle(exc)
            self.close()
            return
        if done:
            if not reader.keep_alive:
                self.close()
            self._settle(reader.response)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost settles the waiter

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reader = self._reader
        if reader is None or self._waiter is None or self._waiter.done():
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

    def _settle(self, outcome: object) -> None:
        waiter, self._waiter, self._reader = self._waiter, None, None
        if waiter is None or waiter.done():
            return
        if isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class AsyncClient:
    """Keep-alive calls on one event loop; callers bound the time (asyncio.timeout)."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._idle: dict[Origin, list[_Connection]] = {}
        self._swept = time.monotonic()

    async def get(self, origin: Origin, request: bytes, body_cap: BodyCap) -> Response:
        conn = self._take(origin)
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

    async def _exchange(self, origin: Origin, conn: _Connection, request: bytes,
                        body_cap: BodyCap) -> Response:
        try:
            response = await conn.request(request, body_cap)
        except BaseException:  # an error, or cancelled (a timeout): the state is unknown
            conn.close()
            raise
        if not conn.closed:
            self._put(origin, conn)
        return response

    async def _connect(self, origin: Origin) -> _Connection:
        addresses = await self._resolver.resolve(origin.host, origin.port)
        loop = asyncio.get_running_loop()
        tls = _tls_context() if origin.scheme == "https" else None
        error: OSError | None = None
        for family, sockaddr in addresses:
            try:
                _, conn = await loop.create_connection(
                    _Connection, sockaddr[0], sockaddr[1], family=family, ssl=tls,
                    server_hostname=origin.host if tls else None)
                return conn
            except OSError as exc:  # ssl.SSLError is an OSError too
                error = exc
        assert error is not None
        raise ConnectError(error)

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.close()
        return None

    def _put(self, origin: Origin, conn: _Connection) -> None:
        now = time.monotonic()
        conn.idle_since = now
        idle = self._idle.setdefault(origin, [])
        if len(idle) < MAX_IDLE_PER_ORIGIN:
            idle.append(conn)
        else:
            conn.close()
        if now - self._swept > IDLE_SECONDS:
            self._swept = now
            for key, conns in list(self._idle.items()):
                keep = [c for c in conns if not c.closed and now - c.idle_since < IDLE_SECONDS]
                for old in conns:
                    if old not in keep:
                        old.close()
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
