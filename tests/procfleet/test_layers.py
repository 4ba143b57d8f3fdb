"""Lower layers load no web framework: reading /proc or a config needs no server; and no
service module loads the test helpers (procfleet.testing and friends).

Each import runs in a fresh interpreter, so what the test process already loaded hides nothing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

WEB_PACKAGES = ("falcon", "waitress", "prometheus_client")


def modules_after_import(module: str) -> set[str]:
    """sys.modules of a fresh interpreter once it has run `import module`."""
    code = f"import json, sys\nimport {module}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def loaded_by(module: str) -> set[str]:
    """Top-level packages among WEB_PACKAGES that `import module` loads."""
    return {name.split(".")[0] for name in modules_after_import(module)} & set(WEB_PACKAGES)


@pytest.mark.parametrize("module", [
    "exporter.procs", "exporter.config", "exporter.info", "exporter.rates", "exporter.search",
    "exporter.details", "exporter.masking", "exporter.groups", "query.config",
    "query.breaker", "query.httpclient", "query.targets", "query.health", "query.fleet",
    "procfleet.timefmt", "procfleet.params", "procfleet.process", "procfleet.signals",
    "procfleet.streaming",
])
def test_lower_layers_load_no_web_framework(module: str) -> None:
    assert loaded_by(module) == set()


def test_the_check_sees_what_an_import_loads() -> None:
    # The web layer does load them: the test above can fail.
    assert loaded_by("exporter.collector") >= {"prometheus_client"}
    assert loaded_by("procfleet.web") == {"falcon"}


# -- the test helpers stay out of the services ---------------------------------------------

RUNTIME_PACKAGES = ("procfleet", "exporter", "query")
# Shipped with the package for the tests and benchmarks only.
TEST_ONLY = {"procfleet.testing", "procfleet.testing_fuzz", "procfleet.floods"}


def runtime_modules() -> list[str]:
    """Every module of the three packages except the test-only ones, found on disk."""
    found = []
    for package in RUNTIME_PACKAGES:
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in sorted(root.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            if name not in TEST_ONLY:
                found.append(name)
    return found


def helpers_loaded_by(module: str) -> set[str]:
    """The test-only modules that `import module` loads."""
    return modules_after_import(module) & TEST_ONLY


def test_every_runtime_module_is_checked() -> None:
    modules = set(runtime_modules())
    assert {"exporter.app", "exporter.__main__", "query.app", "query.__main__",
            "procfleet.runlocal", "procfleet.cli", "procfleet.serve"} <= modules
    assert not modules & TEST_ONLY


@pytest.mark.parametrize("module", runtime_modules())
def test_no_service_module_loads_the_test_helpers(module: str) -> None:
    assert helpers_loaded_by(module) == set()


def test_the_check_sees_the_helpers() -> None:
    # What imports a helper loads it: the test above can fail.
    assert helpers_loaded_by("procfleet.testing") == {"procfleet.testing"}
    assert helpers_loaded_by("procfleet.floods") == {"procfleet.floods"}
