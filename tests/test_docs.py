"""The contract lives in the repository: docs/api.md covers both APIs, and nothing points outside.

A clone must be able to read everything the code refers to, so no file may point at the
original specification or the directory it came from; every endpoint of both OpenAPI
documents and every field of the process object is documented in docs/api.md; and every
section of docs/api.md the code cites, and every link inside docs/api.md, lands on a heading.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API_MD = ROOT / "docs" / "api.md"

# Built from pieces so that this file does not match its own patterns.
_SPEC_NAME = "SP" "EC"
_SHARED = "sha" "red"
_OUTSIDE = re.compile(
    rf"\b{_SPEC_NAME}\b"  # the original specification, by name, with or without .md
    rf"|\.\./{_SHARED}\b"  # the directory beside the repository it lived in
    rf"|/work/{_SHARED}\b"
)
_SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
_SKIP_SUFFIXES = (".pyc", ".png", ".jpg", ".gz")
_MAX_SCAN_BYTES = 4 * 1024 * 1024


def repository_files() -> list[Path]:
    """Files a clone has: git's tracked and not-ignored files, else a walk of the tree."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, timeout=30, check=True).stdout
        names = [n for n in out.decode("utf-8", "replace").split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = []
    if names:
        return sorted({ROOT / n for n in names if (ROOT / n).is_file()})
    found = []
    for directory, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        found.extend(Path(directory) / f for f in files)
    return sorted(found)


def outside_pointers(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line that points outside the repository."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)
            if _OUTSIDE.search(line)]


def _texts() -> Iterator[tuple[Path, str]]:
    for path in repository_files():
        if path.suffix in _SKIP_SUFFIXES or path.stat().st_size > _MAX_SCAN_BYTES:
            continue
        yield path, path.read_bytes().decode("utf-8", "replace")


def github_slugs(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of `markdown` (duplicates get -1, -2, …)."""
    slugs: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        match = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if in_fence or not match:
            continue
        base = re.sub(r"[^\w\- ]", "", match.group(2).lower()).replace(" ", "-")
        count = seen.get(base, 0)
        seen[base] = count + 1
        slugs.add(base if count == 0 else f"{base}-{count}")
    return slugs


def section(markdown: str, heading: str) -> str:
    """The text under the `## heading` of `markdown`, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, f"docs/api.md has no '## {heading}' section"
    return match.group(1)


def openapi(service: str) -> dict:
    return json.loads((ROOT / service / "openapi.json").read_text("utf-8"))


# -- the checks -------------------------------------------------------------------------------

def test_the_scanner_finds_pointers_outside_the_repository() -> None:
    # The check below is only as good as this: it must flag each form that was in the code.
    planted = "\n".join([
        "ok line",
        f'"""The forms ({_SPEC_NAME}.md, "the target")."""',
        f'    # {_SPEC_NAME}: the query service calls exactly /process/{{pid}}',
        f"Read ../{_SHARED}/seed/get-process-by-pid.txt first",
        f"see /work/{_SHARED}/STYLE.md",
        "docs/api.md#targets is fine, and so are SPECIAL and spec and inspect",
    ])
    assert [n for n, _ in outside_pointers(planted)] == [2, 3, 4, 5]


def test_no_file_points_outside_the_repository() -> None:
    files = repository_files()
    assert ROOT / "README.md" in files and API_MD in files
    offenders = [f"{path.relative_to(ROOT)}:{n}: {line[:120]}"
                 for path, text in _texts() for n, line in outside_pointers(text)]
    assert offenders == [], "point at docs/api.md instead:\n" + "\n".join(offenders)


@pytest.mark.parametrize(("service", "heading"), [("exporter", "Exporter API"),
                                                  ("query", "Query service API")])
def test_every_openapi_endpoint_is_documented(service: str, heading: str) -> None:
    documented = section(API_MD.read_text("utf-8"), heading)
    operations = [f"{method.upper()} {path}"
                  for path, item in openapi(service)["paths"].items()
                  for method in item if method in ("get", "post", "put", "patch", "delete")]
    assert operations, f"{service}/openapi.json lists no operation"
    missing = [op for op in operations if f"`{op}`" not in documented]
    assert missing == [], f"not in docs/api.md '## {heading}': {missing}"
    # And nothing documented there that the service does not serve.
    served = set(operations)
    extra = [op for op in re.findall(r"^### `([A-Z]+ /[^`]*)`", documented, re.M)
             if op not in served]
    assert extra == [], f"documented under '## {heading}' but not in {service}/openapi.json"


def test_the_process_fields_are_the_openapi_fields() -> None:
    table = section(API_MD.read_text("utf-8"), "Process object")
    documented = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    for service in ("exporter", "query"):
        fields = list(openapi(service)["components"]["schemas"]["Process"]["properties"])
        assert documented == fields, f"docs/api.md#process-object vs {service}/openapi.json"


def test_every_cited_anchor_exists() -> None:
    markdown = API_MD.read_text("utf-8")
    anchors = github_slugs(markdown)
    cited = [(path, anchor) for path, text in _texts()
             for anchor in re.findall(r"docs/api\.md#([\w-]+)", text)]
    cited += [(API_MD, anchor) for anchor in re.findall(r"\]\(#([\w-]+)\)", markdown)]
    assert len(cited) > 10, "the code and docs/api.md should cite its sections"
    broken = [f"{path.relative_to(ROOT)}: #{anchor}" for path, anchor in cited
              if anchor not in anchors]
    assert broken == [], "no such heading in docs/api.md:\n" + "\n".join(broken)


def test_relative_links_in_the_docs_resolve() -> None:
    broken = []
    for page in [API_MD, ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "docs" / "deploy.md"]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#([\w-]+))?\)", page.read_text("utf-8")):
            path, anchor = (page.parent / target[0]).resolve(), target[1]
            if not path.is_file():
                broken.append(f"{page.name}: {target[0]} does not exist")
            elif anchor and path.suffix == ".md" and anchor not in github_slugs(
                    path.read_text("utf-8")):
                broken.append(f"{page.name}: {target[0]}#{anchor} has no such heading")
    assert broken == [], "\n".join(broken)
