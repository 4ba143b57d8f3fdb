"""Conventions that a reader relies on, checked: module loggers, honest `# type: ignore`s, and
mypy in `make lint` (which does the type checking itself)."""

from __future__ import annotations

import ast
import importlib
import io
import re
import subprocess
import tokenize
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("procfleet", "exporter", "query")
SOURCES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
# Where an ignore pragma may also stand: everything ruff checks.
ALL_SOURCES = sorted({*SOURCES, *(REPO / "tests").rglob("*.py"), *(REPO / "bench").rglob("*.py")})
# The one module that configures loggers other than its own: the root's and waitress's.
LOGGING_SETUP = REPO / "procfleet" / "logs.py"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def _get_logger_calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "getLogger"]


@pytest.mark.parametrize("path", SOURCES, ids=_module_name)
def test_loggers_are_named_by_module(path: Path) -> None:
    """`logging.getLogger(__name__)` everywhere; no logger named by hand."""
    calls = _get_logger_calls(ast.parse(path.read_text(encoding="utf-8")))
    named_by_hand = [ast.unparse(c) for c in calls
                     if any(isinstance(a, ast.Constant) for a in c.args)]
    if path == LOGGING_SETUP:
        assert named_by_hand == ["logging.getLogger('waitress')"]
    else:
        assert named_by_hand == []


LOGGING_MODULES = [p for p in SOURCES if p != LOGGING_SETUP
                   and _get_logger_calls(ast.parse(p.read_text(encoding="utf-8")))]


@pytest.mark.parametrize("path", LOGGING_MODULES, ids=_module_name)
def test_module_logger_carries_the_module_path(path: Path) -> None:
    """Each module's `log` is named after its import path, `__main__` modules included (under
    `python -m`, __name__ is "__main__", which would name both services' loggers alike)."""
    name = _module_name(path)
    module = importlib.import_module(name)
    assert module.log.name == name


def test_the_logger_check_sees_the_services() -> None:
    names = {_module_name(p) for p in LOGGING_MODULES}
    assert {"exporter.__main__", "query.__main__", "query.discovery"} <= names


def _ignores(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line number, the pragma comment, the three lines above) per `# type: ignore`."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = []
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT and "type: ignore" in token.string:
            row = token.start[0]
            found.append((row, token.string, lines[max(0, row - 4):row - 1]))
    return found


IGNORES = [(path, *ignore) for path in ALL_SOURCES for ignore in _ignores(path)]
PRAGMA = re.compile(r"# type: ignore\[[a-z-]+(?:, [a-z-]+)*\](?P<rest>.*)")


@pytest.mark.parametrize(("path", "row", "comment", "above"), IGNORES,
                         ids=[f"{p.relative_to(REPO)}:{row}" for p, row, _, _ in IGNORES])
def test_type_ignores_name_a_code_and_say_why(path: Path, row: int, comment: str,
                                              above: list[str]) -> None:
    """mypy reports an ignore that is unused (strict) or has no code; the reason is ours."""
    pragma = PRAGMA.fullmatch(comment)
    assert pragma is not None, f"{comment!r}: name the error code, e.g. type: ignore[attr-defined]"
    reason_after = pragma.group("rest").strip().startswith("#")
    reason_above = any(line.strip().startswith("#") for line in above)
    assert reason_after or reason_above, f"{comment!r}: say why in a comment beside or above it"


def test_the_ignore_check_reads_pragmas() -> None:
    # The table above is not empty by accident: the adapter of waitress's internals has some.
    assert any(path.name == "waitress_adapter.py" for path, *_ in IGNORES)
    assert PRAGMA.fullmatch("# type: ignore") is None


def test_make_lint_runs_mypy(tmp_path: Path) -> None:
    out = subprocess.run(["make", "-n", f"VENV={tmp_path / 'venv'}", "lint"], cwd=REPO,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    ruff, mypy = out.index("/bin/ruff check"), out.index("/bin/mypy")
    assert ruff < mypy, out
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    assert config["strict"] is True
    assert set(config["packages"]) == set(PACKAGES)
