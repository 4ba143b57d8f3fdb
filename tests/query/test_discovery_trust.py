"""Discovery trusts only what it was told to: no redirects followed by the Prometheus client,
no discovery or configuration file other users can change, no exporter token sent outside its
scope."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from query.config import PrometheusSD
from query.discovery import DiscoveryError
from query.sources import PrometheusSource


@dataclass
class Recorder:
    """A real HTTP server on 127.0.0.1 that notes every request and answers `status`."""

    url: str = ""
    status: int = 200
    location: str = ""
    body: bytes = b""
    hits: list[str] = field(default_factory=list)
    authorization: list[str | None] = field(default_factory=list)


@pytest.fixture
def recorders() -> Iterator[list[Recorder]]:
    started: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []
    made: list[Recorder] = []

    def make() -> Recorder:
        recorder = Recorder()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                recorder.hits.append(self.path)
                recorder.authorization.append(self.headers.get("Authorization"))
                self.send_response(recorder.status)
                if recorder.location:
                    self.send_header("Location", recorder.location)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(recorder.body)))
                self.end_headers()
                self.wfile.write(recorder.body)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        started.append((server, thread))
        recorder.url = f"http://127.0.0.1:{server.server_address[1]}"
        made.append(recorder)
        return recorder

    yield [make() for _ in range(2)]
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


TARGETS = json.dumps({"status": "success", "data": {"activeTargets": [
    {"labels": {"instance": "10.0.0.1:9256", "job": "procfleet", "hostname": "web-01"},
     "scrapePool": "procfleet", "scrapeUrl": "http://10.0.0.1:9256/metrics"}]}}).encode()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_prometheus_redirects_are_not_followed(recorders, status: int) -> None:
    prometheus, elsewhere = recorders
    elsewhere.body = TARGETS  # a valid answer: following the redirect would "work"
    prometheus.status = status
    prometheus.location = f"{elsewhere.url}/api/v1/targets?state=active"
    source = PrometheusSource(PrometheusSD(url=prometheus.url, job="procfleet", timeout=5))
    with pytest.raises(DiscoveryError, match=rf"HTTP {status} redirect to .* not followed"):
        source.poll(force=True)
    assert prometheus.hits == ["/api/v1/targets?state=active"]
    assert elsewhere.hits == []


def test_the_same_server_answering_directly_is_read(recorders) -> None:
    # The control for the test above: the recorder serves a valid answer when asked directly.
    prometheus, _ = recorders
    prometheus.body = TARGETS
    source = PrometheusSource(PrometheusSD(url=prometheus.url, job="procfleet", timeout=5))
    assert [e.hostname for e in source.poll(force=True) or ()] == ["web-01"]
