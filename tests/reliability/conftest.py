"""Fixtures for the reliability tests: exporters started as users start them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from procfleet.testing import Server, start_exporter

pytest.register_assert_rewrite("reliability_testing")

from reliability_testing import token_config  # noqa: E402


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An exporter with built-in defaults: no token."""
    server = start_exporter(tmp_path_factory.mktemp("exporter"), hostname="rel-open")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An exporter configured with a token that also protects /metrics."""
    server = start_exporter(tmp_path_factory.mktemp("exporter"), config=token_config(),
                            hostname="rel-token")
    yield server
    server.stop()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
