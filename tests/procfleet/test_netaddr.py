"""procfleet.netaddr: listen addresses and the loopback test, with no dependencies."""

from __future__ import annotations

import subprocess
import sys

import pytest

from procfleet.netaddr import ListenError, is_loopback, parse_listen


def test_imports_only_the_standard_library():
    """Config parsing uses this module: it must not load a web server or framework."""
    code = ("import sys; before = set(sys.modules); import procfleet.netaddr; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, check=True).stdout.split()
    outside = [m for m in loaded if m.split(".")[0] not in sys.stdlib_module_names
               and m.split(".")[0] != "procfleet"]
    assert "procfleet.netaddr" in loaded and outside == []


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9256", ("127.0.0.1", 9256)),
    ("[::1]:8080", ("::1", 8080)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9256", ":9256", "host:", "host:port", "h:70000"])
def test_parse_listen_rejects(text):
    with pytest.raises(ListenError):
        parse_listen(text)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("example.org", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback
