"""Fixtures shared by every test folder: the hostile exporter (tests/hostile_exporter.py)."""

from hostile_exporter import hostile_exporter  # noqa: F401  (pytest registers the fixture)
