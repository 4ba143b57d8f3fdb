"""Fixtures shared by every test folder: the hostile exporter (tests/hostile_exporter.py) and
the certificates of the TLS tests (tests/tls_fixtures.py)."""

from hostile_exporter import hostile_exporter  # noqa: F401  (pytest registers the fixture)
from tls_fixtures import tls_set  # noqa: F401
