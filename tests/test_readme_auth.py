"""The README's "turn authentication on" steps work when pasted as they are: its two shell
blocks run with bash, in a folder laid out like the checkout, beside a running exporter in
the place of `make run`'s, with only the port numbers changed to free ones."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from procfleet import runlocal
from procfleet.testing import Server, free_port, start_exporter
from query import config as query_config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
WALKTHROUGH_PORT = "8081"  # the second query service's port in the README


def auth_blocks() -> tuple[str, str]:
    """(the block that makes the key and starts the service, the block that uses it)."""
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    for i, block in enumerate(blocks):
        if "keygen" in block and "--config my-query.yml" in block:
            return block, blocks[i + 1]
    raise AssertionError("README.md has no authentication walkthrough block")


def command_lines(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")
            and not line.startswith(" ")]


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[tuple[Path, Server]]:
    """A folder with what the steps use (.venv, config/query.yml) and the exporter `make
    run` would have started, the copy of config/query.yml pointing at it."""
    folder = tmp_path / "procfleet"
    (folder / "config").mkdir(parents=True)
    os.chmod(tmp_path, 0o700)  # the service checks every directory above its config
    (folder / ".venv").symlink_to(sys.prefix)
    exporter = start_exporter(tmp_path)
    text = (REPO / "config" / "query.yml").read_text()
    assert "http://127.0.0.1:9256" in text
    (folder / "config" / "query.yml").write_text(
        text.replace("http://127.0.0.1:9256", exporter.url))
    yield folder, exporter
    exporter.stop()


def test_the_steps_avoid_make_runs_ports() -> None:
    setup, use = auth_blocks()
    defaults = runlocal.build_parser().parse_args([])
    taken = {str(defaults.exporter_port), str(defaults.query_port)}
    for port in re.findall(r"127\.0\.0\.1:(\d+)", setup + use):
        assert port not in taken, f"the steps use port {port}, which make run holds"
    assert f"--listen 127.0.0.1:{WALKTHROUGH_PORT}" in setup
    assert "auth.enabled" not in README.split("To try authentication")[1].split("##")[0], \
        "config/query.yml has auth on already"


def test_the_auth_walkthrough_runs_as_pasted(checkout: tuple[Path, Server],
                                             tmp_path: Path) -> None:
    folder, _ = checkout
    setup, use = auth_blocks()
    port = free_port()
    setup, use = (block.replace(WALKTHROUGH_PORT, str(port)) for block in (setup, use))
    # The last line serves in the foreground: `exec` it, so the server is bash's own pid.
    *prepare, serve = command_lines(setup)
    assert "procfleet-query --config" in serve
    script = setup.replace(serve, f"exec {serve}")
    service = Server.start(["bash", "-e", "-c", f"cd {folder}\n{script}"], port,
                           tmp_path / "walkthrough-query.log")
    try:
        for name in ("me.key", "my-query.yml"):
            mode = stat.S_IMODE((folder / name).stat().st_mode)
            assert mode & 0o077 == 0, f"{name} has mode {mode:o}"
        assert yaml.safe_load((folder / "me.key").read_text())[0]["name"] == "me"
        loaded = query_config.load(folder / "my-query.yml")
        assert "me" in {key.name for key in loaded.auth.api_keys}
        hostname = subprocess.run(["hostname"], capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()
        assert [e.hostname for e in loaded.exporters] == [hostname]

        used = subprocess.run(["bash", "-e", "-c", f"echo pid=$$\n{use}"], cwd=folder,
                              capture_output=True, text=True, timeout=60)
        assert used.returncode == 0, used.stdout + used.stderr
        lines = used.stdout.splitlines()
        pid = lines[0].removeprefix("pid=")
        # procfleet get: a table whose row is this shell, on this host.
        assert any(re.search(rf"\b{re.escape(hostname)}\b.*\b{pid}\b", line)
                   for line in lines[1:]), used.stdout
        assert '"code": 401' in used.stdout
        nodes = next(line for line in lines if line.startswith('{"exporters"'))
        assert f'"hostname": "{hostname}"' in nodes
    finally:
        assert service.stop() == 0
    log = service.output()
    assert "Traceback" not in log
    key = next(line.removeprefix("#   ") for line in log.splitlines()
               if line.startswith("#   pfq_"))  # what `cat me.key` showed
    service_lines = [line for line in log.splitlines() if line.startswith("ts=")]
    assert any("msg=request" in line and "key=me" in line for line in service_lines)
    assert not any(key in line for line in service_lines), "the service logged the key"
