"""procfleet.serve as the services use it: a real waitress server in a child process."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from procfleet.testing import free_port, wait_ready

APP = """
import logging, sys, time
from procfleet.logs import setup_logging
from procfleet.serve import serve

def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(1.5)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"done"]

setup_logging("info")
serve(app, "127.0.0.1", int(sys.argv[1]), logger=logging.getLogger("t"), name="t", threads=2)
"""


@pytest.fixture
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", APP, str(port)], stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/", proc, timeout=15)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def test_sigterm_finishes_the_request_in_flight_then_refuses(server):
    proc, url = server
    answers: list[object] = []

    def slow() -> None:
        try:
            answers.append(requests.get(url + "/slow", timeout=10))
        except requests.RequestException as exc:
            answers.append(exc)

    worker = threading.Thread(target=slow)
    worker.start()
    time.sleep(0.4)  # the request is being computed
    proc.send_signal(signal.SIGTERM)
    worker.join(timeout=15)
    (answer,) = answers
    assert isinstance(answer, requests.Response), answer
    assert answer.status_code == 200 and answer.text == "done"
    assert proc.wait(timeout=15) == 0
    log = proc.stderr.read()
    assert "received SIGTERM" in log and "t stopped" in log
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/", timeout=2)


@pytest.mark.parametrize("headers, status", [
    ({"X-Big": "x" * 20000}, 431),
])
def test_errors_waitress_answers_itself_are_json(server, headers, status):
    _, url = server
    got = requests.get(url + "/", headers=headers, timeout=5)
    assert got.status_code == status
    assert got.headers["content-type"] == "application/json"
    body = got.json()
    assert set(body) == {"error", "details", "code"} and body["code"] == status


def test_oversized_body_is_a_json_413(server):
    _, url = server
    got = requests.post(url + "/", data=b"x" * 70000, timeout=5)
    assert got.status_code == 413
    assert got.json()["code"] == 413
