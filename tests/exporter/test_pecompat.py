"""A process-exporter user's files and command line start procfleet's exporter unchanged.

The reference is Debian's prometheus-process-exporter, run on the same config file with the
same flags next to ours: both must form the same groups, of the same processes.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import MetricsOptions, load
from exporter.pecompat import CompatError, translate
from procfleet.configcheck import ConfigError
from procfleet.testing import EXPORTER, Children, Server, free_port, wait_until

THEIRS = Path("/usr/bin/prometheus-process-exporter")
PACKAGED = Path("/usr/share/doc/prometheus-process-exporter/examples/all.yaml")
G = "namedprocess_namegroup_"

# process-exporter's README ("Using a config file: process selectors"), verbatim.
README_EXAMPLE = r"""
process_names:
  # comm is the second field of /proc/<pid>/stat minus parens.
  # It is the base executable name, truncated at 15 chars.
  # It cannot be modified by the program, unlike exe.
  - comm:
    - bash

  # exe is argv[0]. If no slashes, only basename of argv[0] need match.
  # If exe contains slashes, argv[0] must match exactly.
  - exe:
    - postgres
    - /usr/local/bin/prometheus

  # cmdline is a list of regexps applied to argv.
  # Each must match, and any captures are added to the .Matches map.
  - name: "{{.ExeFull}}:{{.Matches.Cfgfile}}"
    exe:
    - /usr/local/bin/process-exporter
    cmdline:
    - -config.path\s+(?P<Cfgfile>\S+)
"""

KNOWN = {"--config", "--listen", "--threads", "--log-level", "--version", "--hostname"}


# -- the flag spellings ------------------------------------------------------------------

@pytest.mark.parametrize("argv, want_argv, want_metrics", [
    (["-config.path", "pe.yml"], ["--config", "pe.yml"], {}),
    (["--config.path=pe.yml"], ["--config", "pe.yml"], {}),
    (["-web.listen-address", ":9256"], ["--listen", "0.0.0.0:9256"], {}),
    (["-web.listen-address=127.0.0.1:9300"], ["--listen", "127.0.0.1:9300"], {}),
    (["-children=false", "-gather-smaps", "--remove-empty-groups=true"], [],
     {"children": False, "smaps": True, "drop_empty_groups": True}),
    (["-gather-smaps=0", "-children=T"], [], {"smaps": False, "children": True}),
    (["-procfs", "/proc", "-threads=false", "-recheck=false"], [], {}),
    (["-procfs=/proc/"], [], {}),
    (["-web.telemetry-path", "/metrics"], [], {}),
    (["-debug"], ["--log-level", "debug"], {}),
    (["-version"], ["--version"], {}),
    # procfleet's own --threads N (request threads) is left alone.
    (["--threads", "8", "--config", "x.yml"], ["--threads", "8", "--config", "x.yml"], {}),
    (["--threads=8"], ["--threads=8"], {}),
    (["--listen", "127.0.0.1:1", "--hostname", "web-1"],
     ["--listen", "127.0.0.1:1", "--hostname", "web-1"], {}),
])
def test_flags_are_mapped(argv: list[str], want_argv: list[str],
                          want_metrics: dict[str, bool]) -> None:
    got = translate(argv, KNOWN)
    assert got.argv == want_argv
    assert got.metrics == want_metrics
    MetricsOptions(**got.metrics)  # every field named exists


@pytest.mark.parametrize("argv, why", [
    (["-procfs", "/host/proc"], "-procfs /host/proc: procfleet reads this host's /proc only"),
    (["-threads"], "-threads: per-thread series (namedprocess_namegroup_thread_*) are not"),
    (["--threads=true"], "--threads=true: per-thread series"),
    (["-recheck"], "-recheck: procfleet names a process once"),
    (["-children=maybe"], "-children=maybe: -children takes true or false, got 'maybe'"),
    (["-procnames", "bash,sshd"], "-procnames bash,sshd: process-exporter's -procnames is not "
                                  "supported: use a config file with `process_names:`"),
    (["-namemapping=python,(x)"], "-namemapping=python,(x): process-exporter's -namemapping"),
    (["-web.telemetry-path=/m"], "-web.telemetry-path=/m: procfleet serves metrics at "
                                 "/metrics only"),
    (["-web.config.file", "web.yml"], "-web.config.file web.yml: this build of "
                                      "procfleet-exporter has no --web.config.file"),
    (["-config.path"], "-config.path: needs a value"),
])
def test_flags_procfleet_cannot_honour_are_refused_saying_why(argv: list[str], why: str) -> None:
    with pytest.raises(CompatError) as refused:
        translate(argv, KNOWN)
    assert str(refused.value).startswith(why), str(refused.value)


def test_web_config_file_passes_through_where_the_build_has_it() -> None:
    got = translate(["-web.config.file", "web.yml"], {*KNOWN, "--web.config.file"})
    assert got.argv == ["--web.config.file", "web.yml"]


@pytest.mark.parametrize("argv, message", [
    (["-procfs", "/host/proc"], "procfleet reads this host's /proc only"),
    (["-threads"], "pass -threads=false"),
    (["-children=maybe"], "-children takes true or false"),
])
def test_the_command_line_exits_2_with_the_reason(argv: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "exporter", *argv], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("procfleet-exporter: ") and message in done.stderr
    assert "Traceback" not in done.stderr


# -- the config file ---------------------------------------------------------------------

def test_the_packaged_default_config_loads_as_it_is() -> None:
    config = load(PACKAGED)
    assert PACKAGED.read_text().lstrip().startswith("process_names:")
    assert len(config.groups) == 1 and config.groups[0].name == "{{.Comm}}"


def test_process_names_and_groups_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "both.yml"
    path.write_text("groups: [{comm: [a]}]\nprocess_names: [{comm: [b]}]\n")
    with pytest.raises(ConfigError, match="give either `groups:` or process-exporter's "
                                         "`process_names:`, not both"):
        load(path)


# -- side by side with process-exporter --------------------------------------------------

def _groups(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {s.labels["groupname"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == G + "num_procs"}


@pytest.fixture
def children() -> Iterator[Children]:
    with Children() as kids:
        yield kids


def test_a_process_exporter_setup_runs_unchanged_and_groups_alike(
        tmp_path: Path, children: Children) -> None:
    config = tmp_path / "process-exporter.yml"
    config.write_text(README_EXAMPLE)
    wanted = f"/usr/local/bin/process-exporter:{tmp_path}/pe.yml"
    # argv[0] is what the README's third item matches; the shell's `sleep` child has no
    # group of its own and joins its parent's (-children, on by default in both).
    shell = children.spawn_argv(
        ["/usr/local/bin/process-exporter", "-c", "while :; do sleep 300; done",
         "-config.path", f"{tmp_path}/pe.yml"], executable="/bin/sh")
    wait_until(lambda: len(_child_pids(shell.pid)) == 1, what="the shell's sleep child")

    flags = ["-threads=false", "-gather-smaps=false", "-config.path", str(config)]
    servers = []
    try:
        for name, program in (("theirs", str(THEIRS)), ("ours", EXPORTER)):
            port = free_port()
            servers.append(Server.start(
                [program, *flags, "-web.listen-address", f"127.0.0.1:{port}"], port,
                tmp_path / f"{name}.log", path="/metrics"))
        theirs, ours = servers

        def alike() -> tuple[dict[str, float], dict[str, float]] | None:
            a, b = _groups(theirs.url), _groups(ours.url)
            return (a, b) if a == b else None

        # Both keep every group they saw; a bash that came and went between two scrapes
        # settles within a scrape or two.
        found = wait_until(alike, timeout=15, interval=0.5,
                           what="the same groups with the same process counts")
        assert found[1][wanted] == 2  # the shell and its sleep
        assert "process-exporter flag -config.path" in ours.output()
    finally:
        for server in servers:
            server.stop()


def _child_pids(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children()]
