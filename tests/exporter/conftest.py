"""Fixtures for exporter tests: real child processes and real exporter servers."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from exporter_testing import Children

from procfleet.testing import Server, free_port


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.reap_all()


@pytest.fixture
def marker() -> str:
    return f"procfleet-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def start_exporter(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(*extra: str, config: str | None = None) -> Server:
        port = free_port()
        exe = str(Path(sys.executable).with_name("procfleet-exporter"))
        argv = [exe, "--listen", f"127.0.0.1:{port}", *extra]
        if config is not None:
            path = tmp_path / f"exporter-{port}.yml"
            path.write_text(config)
            argv += ["--config", str(path)]
        server = Server(argv, port, tmp_path / f"exporter-{port}.log")
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()

