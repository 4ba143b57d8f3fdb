"""Fixtures for exporter tests: real child processes and real exporter servers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from procfleet.testing import Server
from procfleet.testing import start_exporter as start_exporter_server


@pytest.fixture
def marker() -> str:
    return f"procfleet-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def start_exporter(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(*extra: str, config: str | None = None) -> Server:
        server = start_exporter_server(tmp_path, *extra, config=config)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
