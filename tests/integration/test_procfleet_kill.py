"""`procfleet kill` as users run it: real exporters, the real query service, real children.

web-01 may signal; web-02 has signals disabled. The CLI looks the child up, shows it, asks
(on a terminal) and sends the start time it saw.
"""

from __future__ import annotations

import hashlib
import os
import pty
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from procfleet.testing import Server, free_port, hups, wait_until

EXPORTER_TOKEN = "kill-test-exporter-token"
OPS_KEY = "pfq_kill-test-ops"
READER_KEY = "pfq_kill-test-reader"
BIN = Path(sys.executable).parent


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[str]:
    """The query service's URL, over web-01 (signals on) and web-02 (signals off)."""
    tmp = tmp_path_factory.mktemp("kill")
    servers: list[Server] = []
    try:
        entries = []
        for name, enabled in (("web-01", "true"), ("web-02", "false")):
            config = tmp / f"{name}.yml"
            config.write_text(f"hostname: {name}\nauth: {{token_sha256: {_sha(EXPORTER_TOKEN)}}}"
                              f"\nactions: {{signal: {{enabled: {enabled}, allow_root: true}}}}\n")
            port = free_port()
            servers.append(Server([str(BIN / "procfleet-exporter"), "--listen",
                                   f"127.0.0.1:{port}", "--config", str(config)],
                                  port, tmp / f"{name}.log"))
            # Ready before the next free_port(): an unbound port may be handed out twice.
            servers[-1].wait_ready()
            entries.append(f"  - {{hostname: {name}, url: \"http://127.0.0.1:{port}\", "
                           f"token: {EXPORTER_TOKEN}, labels: {{group: web}}}}\n")
        query_config = tmp / "query.yml"
        query_config.write_text(
            "auth:\n  api_keys:\n"
            f"    - {{name: ops, sha256: {_sha(OPS_KEY)}, "
            "permissions: [process:read, process:execute]}\n"
            f"    - {{name: reader, sha256: {_sha(READER_KEY)}, permissions: [process:read]}}\n"
            "timeouts: {exporter: 5.0, request: 10.0}\n"
            "exporters:\n" + "".join(entries))
        os.chmod(query_config, 0o600)
        port = free_port()
        query = Server([sys.executable, "-m", "query", "--listen", f"127.0.0.1:{port}",
                        "--config", str(query_config)], port, tmp / "query.log")
        servers.append(query)
        query.wait_ready()
        yield query.url
    finally:
        for server in servers:
            server.stop()


def procfleet(url: str, *args: str, key: str = OPS_KEY, stdin: int | None = subprocess.DEVNULL
              ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROCFLEET_URL": url, "PROCFLEET_API_KEY": key}
    return subprocess.run([str(BIN / "procfleet"), *args], capture_output=True, text=True,
                          timeout=60, env=env, stdin=stdin)


def test_kill_shows_the_process_and_ends_it_with_yes(fleet, children):
    child = children.spawn()
    done = procfleet(fleet, "kill", "web-01", str(child.pid), "--yes")
    assert done.returncode == 0, done.stderr
    assert "Sending SIGTERM to:" in done.stdout
    shown = next(line for line in done.stdout.splitlines() if line.startswith("web-01 "))
    assert str(child.pid) in shown and "root" in shown and "-c" in shown
    assert "web-01: ok: signalled" in done.stdout
    assert child.wait(timeout=10) == -signal.SIGTERM


def test_kill_without_a_terminal_or_yes_sends_nothing(fleet, children):
    child = children.spawn()
    done = procfleet(fleet, "kill", "web-01", str(child.pid))
    assert done.returncode == 2
    assert "--yes" in done.stderr
    assert child.poll() is None


@pytest.mark.parametrize(("answer", "signalled"), [("y\n", True), ("n\n", False)])
def test_kill_asks_on_a_terminal(fleet, children, answer, signalled):
    child = children.spawn()
    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer.encode())  # typed ahead: the terminal keeps it for read
        done = procfleet(fleet, "kill", "web-01", str(child.pid), stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert "[y/N]" in done.stdout
    if signalled:
        assert done.returncode == 0, done.stderr
        assert child.wait(timeout=10) == -signal.SIGTERM
    else:
        assert done.returncode == 2 and "not confirmed" in done.stderr
        assert child.poll() is None


def test_dry_run_and_hup(fleet, children, tmp_path):
    child, out = children.spawn_hup_counter(tmp_path)
    dry = procfleet(fleet, "kill", "web-01", str(child.pid), "--signal", "hup", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "Would send SIGHUP" in dry.stdout and "would be signalled" in dry.stdout
    real = procfleet(fleet, "kill", "web-01", str(child.pid), "-s", "HUP", "--yes")
    assert real.returncode == 0, real.stderr
    wait_until(lambda: hups(out) == 1, what="one HUP")
    assert child.poll() is None


def test_a_refusing_host_and_a_missing_permission(fleet, children):
    child = children.spawn()
    refused = procfleet(fleet, "kill", "web-02", str(child.pid), "--yes")
    assert refused.returncode == 4
    assert "web-02: failed: signals are disabled" in refused.stdout
    reader = procfleet(fleet, "kill", "web-01", str(child.pid), "--yes", key=READER_KEY)
    assert reader.returncode == 3 and "process:execute" in reader.stderr
    rollout = procfleet(fleet, "kill", "group:web", str(child.pid), "--yes", "--batch", "1",
                        "--signal", "INT")
    # web-01 is first in the rollout and signals; web-02 refuses.
    assert rollout.returncode == 4, rollout.stderr
    assert "web-01: ok: signalled" in rollout.stdout
    assert "web-02: failed" in rollout.stdout
    assert child.wait(timeout=10) == -signal.SIGINT
