"""The shared test helpers themselves (procfleet.testing): ports, children, readiness."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from procfleet import testing
from procfleet.testing import Children, free_port, state_of, wait_ready


def test_free_port_hands_out_each_port_once() -> None:
    # The kernel gives a closed port to bind(0) again readily; servers started from a batch
    # of ports would collide.
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


def test_the_record_of_handed_out_ports_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testing, "_HANDED_OUT", set())
    monkeypatch.setattr(testing, "_HANDED_OUT_MAX", 10)
    for _ in range(25):
        free_port()
        assert len(testing._HANDED_OUT) <= 10


def test_children_are_visible_when_returned_and_reaped_after() -> None:
    with Children() as children:
        program = children.spawn_argv(["sleep", "30"])
        sleeper = children.spawn("--tag")
        with open(f"/proc/{program.pid}/cmdline", "rb") as f:
            assert f.read() == b"sleep\x0030\x00"
        assert state_of(sleeper.pid) == "S"
    assert program.returncode is not None and sleeper.returncode is not None


def test_wait_ready_fails_at_once_with_the_log_when_the_server_exits(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "print('no config'); raise SystemExit(3)"],
                                stdout=out, stderr=subprocess.STDOUT)
    with pytest.raises(AssertionError, match=r"exited with 3\nno config"):
        wait_ready(f"http://127.0.0.1:{free_port()}/healthz", proc, timeout=60, log=log)


@pytest.mark.parametrize(("messages", "expected"), [
    (["a.b: must be a list", "c: unknown key"], ["a.b: must be a list"]),  # one too many
    (["a.b: must be a list"], ["a.b: must be a list", "c:"]),  # one missing
    (["a.b: must be a list", "c: unknown key"], ["c:", "a.b:"]),  # another order
])
def test_assert_prefixes_fails_on_a_count_or_a_prefix(messages: list[str],
                                                      expected: list[str]) -> None:
    testing.assert_prefixes(messages, messages)  # each message is its own prefix
    with pytest.raises(AssertionError):
        testing.assert_prefixes(messages, expected)


def test_a_hup_counter_counts_the_hups_it_gets(tmp_path: Path) -> None:
    with Children() as children:
        child, out = children.spawn_hup_counter(tmp_path)
        assert testing.hups(out) == 0
        child.send_signal(signal.SIGHUP)
        testing.wait_until(lambda: testing.hups(out) == 1, what="one HUP counted")
        assert child.poll() is None  # the handler kept it alive
