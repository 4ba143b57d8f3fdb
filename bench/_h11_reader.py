"""The alternative measured against our parser: h11 (the sans-IO parser under httpx) behind
`query.httpclient._Reader`'s interface, so the same transports and pool run on it.

Benchmark-only: bench_query_fanout.py swaps it in with `--h11` to compare the two at 1,000 and
10,000 exporters. Needs `pip install 'h11>=0.14,<1'` (not a runtime dependency; the README's
"Why our own HTTP parser" says why).
"""

from __future__ import annotations

import h11

from query.httpclient import (
    MAX_HEAD,
    BodyCap,
    BodyError,
    Disconnected,
    ProtocolError,
    Response,
)

# h11 keeps client and server state: it must see a request before it reads a response.
_REQUEST = h11.Request(method="GET", target="/", headers=[("Host", "exporter")])


class H11Reader:
    """One response read by an h11.Connection; same contract as httpclient._Reader."""

    __slots__ = ("body_cap", "status", "started", "keep_alive", "response", "_conn", "_cap",
                 "_body")

    def __init__(self, body_cap: BodyCap) -> None:
        self.body_cap = body_cap
        self.status = 0
        self.started = False
        self.keep_alive = False
        self.response: Response | None = None
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self._conn.send(_REQUEST)
        self._conn.send(h11.EndOfMessage())
        self._cap = 0
        self._body = bytearray()

    def feed(self, data: bytes) -> bool:
        self.started = True
        if self.response is not None:
            self.keep_alive = self.keep_alive and not data
            return True
        self._conn.receive_data(data)
        return self._drain()

    def feed_eof(self) -> Response:
        if self.response is not None:
            return self.response
        if not self.started:
            raise Disconnected("exporter closed the connection without answering")
        self._conn.receive_data(b"")
        if self._drain():
            assert self.response is not None
            return self.response
        raise BodyError("connection closed before the whole answer arrived")

    def _drain(self) -> bool:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ProtocolError(str(exc)) from None
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                self.status = event.status_code
                length = None
                for name, value in event.headers:
                    if name == b"content-encoding" and value.lower() != b"identity":
                        raise BodyError("exporter answered a Content-Encoding")
                    if name == b"content-length":
                        length = int(value)
                cap = self.body_cap(self.status)
                if cap is None or (length is not None and length > cap):
                    self._finish(False, too_large=cap is not None)
                    return True
                self._cap = cap
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._cap:
                    self._finish(False, too_large=True)
                    return True
            elif isinstance(event, h11.EndOfMessage):
                reusable = (self._conn.their_state is h11.DONE
                            and not self._conn.trailing_data[0])
                self._finish(reusable)
                return True
            else:  # ConnectionClosed before the end
                raise BodyError("connection closed before the whole answer arrived")

    def _finish(self, keep_alive: bool, too_large: bool = False) -> None:
        self.keep_alive = keep_alive
        self.response = Response(self.status, b"" if too_large else bytes(self._body),
                                 too_large)
