"""Fixtures shared by every test folder: real children, the hostile exporter
(tests/hostile_exporter.py) and the certificates of the TLS tests (tests/tls_fixtures.py)."""

from collections.abc import Iterator

import pytest
from hostile_exporter import hostile_exporter  # noqa: F401  (pytest registers the fixture)
from tls_fixtures import tls_set  # noqa: F401

from procfleet.testing import Children


@pytest.fixture
def children() -> Iterator[Children]:
    """Real Python children (see procfleet.testing.Children), all reaped after the test."""
    with Children() as kids:
        yield kids
