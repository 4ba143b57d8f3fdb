"""Hostile clients for the tests and benchmarks: floods of idle and of trickling connections.

Like procfleet.testing, shipped with the package so tests and benchmarks share one copy, and
never imported by the services. Every loop is bounded in count and in time, and every socket
goes to 127.0.0.1.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import threading
import time
from dataclasses import dataclass, field

# A request head that never ends: the header line grows one byte at a time.
TRICKLE_HEAD = b"GET /healthz HTTP/1.1\r\nHost: trickle\r\nX-Slow: " + b"s" * 4096


def raise_open_files() -> int:
    """Lift this process's soft open-files limit to the hard one; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def fd_numbers(pid: int) -> list[int]:
    """The open file descriptor numbers of process `pid`."""
    return sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd"))


def socket_fd_numbers(pid: int) -> list[int]:
    """The fd numbers of process `pid` that are sockets (what its poll loop watches)."""
    numbers = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                numbers.append(int(name))
        except OSError:
            continue  # closed meanwhile
    return sorted(numbers)


def open_idle(port: int, count: int, timeout: float = 10.0) -> list[socket.socket]:
    """`count` connections to 127.0.0.1:port that never send a byte."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=timeout))
    except BaseException:
        close_all(sockets)
        raise
    return sockets


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
    sockets.clear()


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed `sock` (without blocking)."""
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:  # reset
        return True


@dataclass
class _Conn:
    sock: socket.socket
    opened: float
    sent: int = 0


@dataclass
class Trickle:
    """`count` connections each sending one byte of a never-ending request head per `interval`.

    A connection the server closes is counted (with how long it lived) and, when `reconnect`
    is set, replaced at once, as an attacker would. Run it in a thread with `start()`; `stop()`
    ends it and closes every socket. Bounded: at most `seconds` of trickling.
    """

    port: int
    count: int = 1000
    interval: float = 1.0
    reconnect: bool = True
    seconds: float = 120.0
    lifetimes: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    _conns: list[_Conn] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def _connect(self) -> _Conn:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))  # completes in the background
        return _Conn(sock, time.monotonic())

    def start(self) -> Trickle:
        self._conns = [self._connect() for _ in range(self.count)]
        self._thread = threading.Thread(target=self._run, name="trickle", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            for i, conn in enumerate(self._conns):
                if self._stop.is_set():
                    break
                if self._send_one(conn):
                    continue
                self.lifetimes.append(time.monotonic() - conn.opened)
                conn.sock.close()
                if self.reconnect:
                    self._conns[i] = self._connect()
            self.ready.set()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def _send_one(self, conn: _Conn) -> bool:
        """Send the next byte; False once the server has closed the connection."""
        if closed_by_peer(conn.sock):
            return False
        try:
            conn.sock.send(TRICKLE_HEAD[conn.sent % len(TRICKLE_HEAD):][:1])
        except (BlockingIOError, InterruptedError):
            return True  # still connecting, or a full buffer: try again next round
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:  # the handshake is not complete yet
                return True
            return False
        conn.sent += 1
        self.bytes_sent += 1
        return True

    @property
    def closed_by_server(self) -> int:
        return len(self.lifetimes)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for conn in self._conns:
            conn.sock.close()
        self._conns.clear()
