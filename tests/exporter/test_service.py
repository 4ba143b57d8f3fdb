"""The exporter as users run it: `procfleet-exporter --listen …`, answered, stopped by SIGTERM."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import falcon.testing
import pytest
import requests

from exporter.app import create_app
from exporter.config import from_mapping

TOKEN = "correct-horse-battery-staple"
TOKEN_SHA = hashlib.sha256(TOKEN.encode()).hexdigest()


def test_started_as_users_do_answers_and_stops_on_sigterm(start_exporter, children, marker):
    child = children.spawn(marker)
    server = start_exporter("--hostname", "web-01")
    health = requests.get(server.url + "/healthz", timeout=5)
    assert health.json()["status"] == "ok"
    assert health.json()["hostname"] == "web-01"
    got = requests.get(f"{server.url}/process/{child.pid}", timeout=5)
    assert got.status_code == 200
    assert got.json()["pid"] == child.pid
    metrics = requests.get(server.url + "/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "namedprocess_namegroup_num_procs" in metrics.text
    landing = requests.get(server.url + "/", timeout=5)
    assert landing.headers["content-type"].startswith("text/html")
    assert 'href="metrics"' in landing.text and "web-01" in landing.text
    missing = requests.get(server.url + "/nope", timeout=5)
    assert missing.status_code == 404
    assert set(missing.json()) == {"error", "details", "code"}
    assert server.stop() == 0
    log = server.output()
    assert "received SIGTERM" in log and "stopped" in log


def test_config_file_and_flags(start_exporter):
    server = start_exporter("--hostname", "from-flag", config="hostname: from-file\n")
    assert requests.get(server.url + "/healthz", timeout=5).json()["hostname"] == "from-flag"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("procfleet-exporter"))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)


def test_help_documents_every_flag():
    out = run_cli("--help").stdout
    for flag in ("--config", "--listen", "--hostname", "--log-level"):
        assert flag in out


def test_bad_config_exits_with_every_problem_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("listen: nowhere\nreader: magic\nauth: {token_sha256: xyz}\nextra: 1\n")
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    for problem in ("listen:", "reader:", "auth.token_sha256:", "extra: unknown key"):
        assert problem in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("listen: [unclosed\n")
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    assert "YAML syntax error" in result.stderr and "line" in result.stderr


def test_port_in_use_is_a_clear_error(start_exporter):
    server = start_exporter()
    result = run_cli("--listen", f"127.0.0.1:{server.port}")
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_token_command_prints_working_config():
    out = run_cli("token").stdout
    token = out.split("): ", 1)[1].split("\n", 1)[0].strip()
    assert f"token_sha256: {hashlib.sha256(token.encode()).hexdigest()}" in out


@pytest.fixture
def protected() -> falcon.testing.TestClient:
    config = from_mapping({"auth": {"token_sha256": TOKEN_SHA}})
    return falcon.testing.TestClient(create_app(config))


@pytest.mark.parametrize("path", ["/process/1", "/process", "/metrics"])
@pytest.mark.parametrize("header, status", [
    (None, 401),
    ("Bearer wrong", 401),
    ("Basic " + TOKEN, 401),
    (f"Bearer {TOKEN}", 200),
])
def test_token_protects_everything_but_landing_and_health(protected, path, header, status):
    headers = {"Authorization": header} if header else {}
    got = protected.simulate_get(path, headers=headers)
    assert got.status_code == status
    if status == 401:
        assert got.headers["www-authenticate"] == "Bearer"
        assert set(got.json) == {"error", "details", "code"}
        assert TOKEN not in got.text


@pytest.mark.parametrize("path", ["/", "/healthz"])
def test_open_paths_need_no_token(protected, path):
    assert protected.simulate_get(path).status_code == 200


def test_metrics_can_be_left_open_for_prometheus():
    app = create_app(from_mapping({"auth": {"token_sha256": TOKEN_SHA,
                                            "protect_metrics": False}}))
    client = falcon.testing.TestClient(app)
    assert client.simulate_get("/metrics").status_code == 200
    assert client.simulate_get("/process/1").status_code == 401


@pytest.mark.parametrize("raw, problem", [
    ([1, 2], "must be a mapping"),
    ({"listen": "127.0.0.1"}, "listen: listen address must be HOST:PORT"),
    ({"listen": "127.0.0.1:99999"}, "listen: port must be"),
    ({"listen": 9256}, "listen: must be a string"),
    ({"hostname": "bad host"}, "hostname: must be letters"),
    ({"reader": "kvm"}, "reader: must be one of auto"),
    ({"log_level": "loud"}, "log_level: must be one of"),
    ({"auth": {"token_sha256": "ABC"}}, "auth.token_sha256: must be 64"),
    ({"auth": {"token": "plain"}}, "auth.token: unknown key"),
    ({"auth": {"protect_metrics": "no"}}, "auth.protect_metrics: must be a boolean"),
    ({"auth": []}, "auth: must be a mapping"),
    ({"bogus": 1}, "bogus: unknown key"),
])
def test_config_problems_named_by_key_path(raw, problem):
    from procfleet.configcheck import ConfigError

    with pytest.raises(ConfigError) as err:
        from_mapping(raw)
    assert any(problem in p for p in err.value.problems), err.value.problems
