"""Fixtures for the query service tests; they live in query_testing so tests can import the
helpers by a unique module name (several test folders have a conftest.py)."""

from query_testing import *  # noqa: F403  (pytest registers the fixtures it finds here)
