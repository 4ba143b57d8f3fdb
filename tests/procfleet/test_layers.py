"""Lower layers load no web framework: reading /proc or a config needs no server.

Each import runs in a fresh interpreter, so what the test process already loaded hides nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

WEB_PACKAGES = ("falcon", "waitress", "prometheus_client")


def loaded_by(module: str) -> set[str]:
    """Top-level packages among WEB_PACKAGES that `import module` loads."""
    code = (f"import json, sys\nimport {module}\n"
            "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout)) & set(WEB_PACKAGES)


@pytest.mark.parametrize("module", [
    "exporter.procs", "exporter.config", "query.config", "procfleet.timefmt",
])
def test_lower_layers_load_no_web_framework(module: str) -> None:
    assert loaded_by(module) == set()


def test_the_check_sees_what_an_import_loads() -> None:
    # The web layer does load them: the test above can fail.
    assert loaded_by("exporter.collector") >= {"prometheus_client"}
    assert loaded_by("procfleet.web") == {"falcon"}
