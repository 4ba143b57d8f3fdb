"""The README's command summaries list every flag the parsers accept, and the Makefile
targets and requirements a newcomer needs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

import exporter.__main__
import query.__main__

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def summary(program: str) -> str:
    """The ```sh block whose first line starts with `program [`."""
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        if block.startswith(f"{program} ["):
            return block
    raise AssertionError(f"no command summary for {program} in README.md")


@pytest.mark.parametrize(("program", "parser"), [
    ("procfleet-exporter", exporter.__main__.build_parser()),
    ("procfleet-query", query.__main__.build_parser()),
])
def test_summary_lists_every_flag(program: str, parser: argparse.ArgumentParser) -> None:
    flags = {opt for action in parser._actions
             for opt in action.option_strings if opt.startswith("--") and opt != "--help"}
    block = summary(program)
    missing = sorted(f for f in flags if not re.search(rf"\[{re.escape(f)}[ \]]", block))
    assert not missing, f"README's {program} summary lacks {missing}"


def test_readme_names_the_python_version_and_the_make_variables() -> None:
    assert "Python ≥ 3.11" in README
    assert "make PYTHON=" in README
    for target in ("debs", "dist", "EXPORTER_PORT=", "QUERY_PORT="):
        assert target in README, target


def test_the_path_parameter_is_hostname_and_said_once_to_take_any_target() -> None:
    api_md = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    for name, text in (("README.md", README), ("docs/api.md", api_md)):
        assert "{target}" not in text, f"{name} names the path parameter {{target}}"
        said = re.findall(r"`\{hostname\}`[^.]*takes any[^.]*target[^.]*`_all`", text, re.S)
        assert len(said) == 1, f"{name} should say once that {{hostname}} takes any target"
