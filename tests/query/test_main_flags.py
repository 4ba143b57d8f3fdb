"""`procfleet-query --version` and `--log-level`, as the exporter has them, on the real
console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import procfleet
from procfleet.testing import free_port, wait_ready

SCRIPT = str(Path(sys.executable).parent / "procfleet-query")


def test_version_prints_the_package_version() -> None:
    result = subprocess.run([SCRIPT, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.strip() == f"procfleet-query {procfleet.__version__}"


def test_log_level_rejects_an_unknown_level() -> None:
    result = subprocess.run([SCRIPT, "--log-level", "loud"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "--log-level" in result.stderr and "invalid choice" in result.stderr


@pytest.mark.parametrize(("flag", "info_logged"), [(None, True), ("warning", False)])
def test_log_level_beats_the_file(tmp_path: Path, flag: str | None, info_logged: bool) -> None:
    config = tmp_path / "query.yml"
    config.write_text("log_level: info\nauth: {enabled: false}\nexporters: []\n")
    port = free_port()
    log = tmp_path / "query.log"
    argv = [SCRIPT, "--config", str(config), "--listen", f"127.0.0.1:{port}"]
    if flag:
        argv += ["--log-level", flag]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", proc, log=log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    # The start-up warning (auth off) shows at both levels; the info lines only at info.
    assert "authentication is disabled" in text
    assert ('msg="configuration loaded"' in text) is info_logged, text
