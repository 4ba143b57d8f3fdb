"""The Makefile's dependency graph, as make itself resolves it (`make -n` on a missing venv):
`make run` installs only what running needs, the test targets add the test tools."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def dry_run(tmp_path: Path, *args: str) -> str:
    """What `make` would run for `args` with the venv at a path that does not exist yet."""
    result = subprocess.run(["make", "-n", f"VENV={tmp_path / 'venv'}", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_run_installs_the_package_without_test_extras(tmp_path: Path) -> None:
    out = dry_run(tmp_path, "run")
    assert re.search(r"pip install -q -e \.$", out, re.M), out
    assert "[test]" not in out
    assert "-m procfleet.runlocal --exporter-port 9256 --query-port 8080" in out


@pytest.mark.parametrize("target", ["test", "lint", "bench"])
def test_test_targets_add_the_test_tools(tmp_path: Path, target: str) -> None:
    out = dry_run(tmp_path, target)
    plain = out.index("pip install -q -e .\n")
    assert out.index("pip install -q -e '.[test]'") > plain, out


def test_run_ports_are_settable(tmp_path: Path) -> None:
    out = dry_run(tmp_path, "run", "EXPORTER_PORT=19256", "QUERY_PORT=18080")
    assert "--exporter-port 19256 --query-port 18080" in out


def test_ci_runs_make_test() -> None:
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_help_lists_every_target_with_one_line() -> None:
    makefile = (REPO / "Makefile").read_text()
    phony = set(re.findall(r"^\.PHONY: (\S+)", makefile, re.M))
    out = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True,
                         timeout=30, check=True).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert phony <= listed, phony - listed
    assert "PYTHON=" in out
