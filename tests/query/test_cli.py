"""The command line as users run it: `python -m query …`, keygen, config errors, SIGTERM."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import falcon.testing
import psutil
import pytest
import yaml
from query_testing import EXPORTER_TIMEOUT, KNOWN_PID, PROCESS

from procfleet.testing import Server, free_port, reap, spawn
from query.app import create_app
from query.config import parse
from query.fanout import Fanout


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "query", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_real_service_answers_and_stops_cleanly_on_sigterm(fake_exporters, start_service
                                                           ) -> None:
    keygen = _run("keygen", "--name", "ci", "--permission", "process:read")
    key = keygen.stdout.splitlines()[1].removeprefix("#").strip()
    config = (f"timeouts: {{exporter: {EXPORTER_TIMEOUT}, request: 1.0}}\n"
              "auth:\n  api_keys:\n" + "".join(f"    {line}\n"
                                               for line in keygen.stdout.splitlines()[3:]) +
              "exporters:\n"
              f"  - {{hostname: web-01, url: \"{fake_exporters.url('ok')}\"}}\n"
              f"  - {{hostname: web-02, url: \"{fake_exporters.url('hang')}\"}}\n")
    service = start_service(config)
    status, headers, body = service.get(f"/node/web-01/process/{KNOWN_PID}",
                                        {"Authorization": f"Bearer {key}"})
    assert status == 200
    assert body["results"] == [{"hostname": "web-01", "status": "ok", "process": PROCESS}]
    assert headers["X-Request-Id"] == body["job_id"]
    status, _, body = service.get(f"/node/_all/process/{KNOWN_PID}", {"X-API-Key": key})
    assert status == 200
    assert body["results"][1]["error"] == f"timeout after {EXPORTER_TIMEOUT:.1f} s"
    status, headers, body = service.get(f"/node/web-01/process/{KNOWN_PID}")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    status, _, body = service.get("/node/web-01/process/0", {"X-API-Key": key})
    assert (status, body["code"]) == (400, 400)

    assert service.stop() == 0
    log = service.log()
    assert "Traceback" not in log
    request_lines = [line for line in log.splitlines() if 'msg=request' in line]
    assert len(request_lines) >= 4
    assert all("level=" in line and "job_id=" in line for line in request_lines)
    assert key not in log


def test_keygen_output_works_as_configuration(fake_exporters) -> None:
    result = _run("keygen", "--name", "grafana", "--permission", "process:read",
                  "--permission", "node:read")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    key = lines[1].removeprefix("#").strip()
    entries = yaml.safe_load(result.stdout)  # the comments hide the key from YAML
    assert entries == [{"name": "grafana", "sha256": hashlib.sha256(key.encode()).hexdigest(),
                        "permissions": ["process:read", "node:read"]}]
    config = parse({"auth": {"api_keys": entries},
                    "exporters": [{"hostname": "ok", "url": fake_exporters.url("ok")}]})
    with Fanout.from_config(config) as fanout:
        client = falcon.testing.TestClient(create_app(config, fanout=fanout))
        ok = client.simulate_get(f"/node/ok/process/{KNOWN_PID}", headers={"X-API-Key": key})
        nodes = client.simulate_get("/node", headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200 and nodes.status_code == 200
    # Every run prints a different key.
    again = _run("keygen", "--name", "grafana", "--permission", "process:read")
    assert again.stdout.splitlines()[1] != lines[1]


@pytest.mark.parametrize("args, message", [
    (["keygen", "--name", "x"], "--permission"),
    (["keygen", "--name", "x", "--permission", "process:write"], "invalid choice"),
    (["keygen", "--name", "bad name", "--permission", "process:read"], "--name must be"),
    (["--listen", "nowhere"], "listen address must be HOST:PORT"),
    (["--listen", "0.0.0.0:0"], "authentication is disabled, so refusing to listen"),
])
def test_command_line_errors_exit_2(args, message) -> None:
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_config_errors_print_every_problem_and_exit_2(tmp_path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("listen: nowhere\nauth: {enabled: maybe}\n"
                    "exporters:\n  - {hostname: _x, url: ftp://a}\n")
    result = _run("--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for where in ("listen:", "auth.enabled:", "exporters[0].hostname:", "exporters[0].url:"):
        assert where in result.stderr


def test_nonloopback_without_auth_needs_the_flag(tmp_path) -> None:
    path = tmp_path / "open.yml"
    path.write_text("auth: {enabled: false}\n")
    refused = _run("--config", str(path), "--listen", "0.0.0.0:0")
    assert refused.returncode == 2
    assert "--allow-unauthenticated-nonloopback" in refused.stderr
    port = free_port()
    server = Server([sys.executable, "-m", "query", "--config", str(path), "--listen",
                     f"0.0.0.0:{port}", "--allow-unauthenticated-nonloopback"],
                    port, tmp_path / "query.log")
    try:
        server.wait_ready()
    finally:
        assert server.stop() == 0


def test_no_config_uses_the_built_in_default(tmp_path) -> None:
    port = free_port()
    server = Server([sys.executable, "-m", "query", "--listen", f"127.0.0.1:{port}"],
                    port, tmp_path / "query.log")
    try:
        server.wait_ready()
        import urllib.request
        with urllib.request.urlopen(f"{server.url}/node", timeout=5) as response:
            nodes = json.load(response)["exporters"]
        assert [n["url"] for n in nodes] == ["http://127.0.0.1:9256"]
    finally:
        assert server.stop() == 0


# -- end to end with the real exporter ----------------------------------------------------

@pytest.fixture
def real_exporter(tmp_path):
    """`python -m exporter` on a free port, as users start it, stopped afterwards."""
    port = free_port()
    server = Server.start([sys.executable, "-m", "exporter", "--listen", f"127.0.0.1:{port}",
                           "--hostname", "e2e-host"], port, tmp_path / "exporter.log")
    yield server.url
    server.stop()


@pytest.fixture
def child():
    """A sleeping child process, visible before the test runs and always reaped."""
    process = spawn([sys.executable, "-c", "import time; time.sleep(60)", "--password=hunter2"])
    yield process
    reap(process)


def test_end_to_end_with_the_real_exporter(real_exporter, child, start_service) -> None:
    service = start_service("auth: {enabled: false}\n"
                            "exporters:\n"
                            f"  - {{hostname: e2e-host, url: \"{real_exporter}\", "
                            "labels: {group: test.e2e}}\n")
    for target in ("e2e-host", "_any", "_all", "group:test"):
        status, _, body = service.get(f"/node/{target}/process/{child.pid}")
        assert status == 200, body
        (result,) = body["results"]
        assert result["hostname"] == "e2e-host" and result["status"] == "ok"
    process = result["process"]
    expected = psutil.Process(child.pid)
    with expected.oneshot():
        assert process["pid"] == child.pid
        assert process["name"] == expected.name()
        assert process["user"] == expected.username()
        assert process["mem_rss"] > 0
        assert process["command"].startswith(expected.cmdline()[0])
        assert "hunter2" not in process["command"]
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(expected.create_time())))
        assert process["start_time"] == started
    assert set(process) <= {"pid", "name", "user", "state", "cpu_percent", "mem_percent",
                            "mem_rss", "command", "start_time"}

    status, _, body = service.get(f"/node/e2e-host/process?name={process['name']}")
    assert status == 200
    assert child.pid in [p["pid"] for p in body["results"][0]["processes"]]

    child.kill()
    child.wait()
    status, _, body = service.get(f"/node/e2e-host/process/{child.pid}")
    assert status == 404
    assert body["error"] == "process not found"
    status, _, body = service.get(f"/node/_all/process/{child.pid}")
    assert status == 200
    assert body["results"] == [{"hostname": "e2e-host", "status": "failed",
                                "error": "process not found"}]
    assert service.stop() == 0


def test_keygen_output_pastes_under_api_keys_of_the_shipped_config() -> None:
    result = _run("keygen", "--name", "pasted", "--permission", "node:read")
    shipped = (Path(__file__).resolve().parents[2] / "config" / "query.yml").read_text()
    anchor = "\n  api_keys:\n"
    assert shipped.count(anchor) == 1
    pasted = shipped.replace(anchor, anchor + result.stdout)
    config = parse(yaml.safe_load(pasted))
    assert [k.name for k in config.auth.api_keys] == ["pasted", "example"]
    assert config.auth.api_keys[0].permissions == frozenset({"node:read"})
