"""A config error names the file, the position and the kind of problem, never the file's text.

`--config /etc/shadow` once printed a password hash: the unknown-key message quoted each line,
and PyYAML's messages quote aliases and tags. Each case writes a file holding a fake secret
where a secret would stand, runs the service as users do (`python -m exporter --config F`,
`python -m query --config F`), and expects a non-zero exit, a message with the file and the
position, and no trace of the secret.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from procfleet.testing import free_port

SECRET = "FAKESECRET7Qx"
RUN_TIMEOUT = 30.0

CASES = [
    # (id, file text, what the message must say besides the file name)
    ("shadow-line", f"root:$6${SECRET}$Zk1:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
     ["unknown key at line 1, column 1", "unknown key at line 2, column 1"]),
    ("undefined-alias", f"listen: 127.0.0.1:9256\nlog_level: *{SECRET}_alias\n",
     ["YAML syntax error at line 2, column 12", "undefined alias"]),
    ("unknown-tag", f"auth:\n  token_sha256: !{SECRET} abc\n",
     ["YAML syntax error at line 2, column 17", "tag"]),
    ("unclosed-flow", f"hostname: web-01\npassword: [{SECRET}, x\n",
     ["YAML syntax error at line 3, column 1"]),
    ("token-shaped-key", f"auth:\n  {SECRET}-0123456789abcdef0123: x\n",
     ["auth: unknown key at line 2, column 3"]),
]


def _run(module: str, config: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", module, "--config", str(config),
            "--listen", f"127.0.0.1:{free_port()}"]
    # A config wrongly accepted would start serving: the timeout ends that as a failure.
    return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("module", ["exporter", "query"])
@pytest.mark.parametrize(("text", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_config_errors_name_the_place_not_the_content(module: str, text: str,
                                                      expect: list[str], tmp_path: Path) -> None:
    config = tmp_path / "secrets.yml"
    config.write_text(text)
    result = _run(module, config)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert str(config) in result.stderr, result.stderr
    for phrase in expect:
        assert phrase in result.stderr, (phrase, result.stderr)
    assert SECRET not in output, output


def test_a_discovery_file_error_does_not_quote_the_file(tmp_path: Path) -> None:
    """The query service's file_sd files are read with the same YAML error text."""
    targets = tmp_path / "targets.yml"
    targets.write_text(f"- targets: ['127.0.0.1:9256']\n  labels: {{group: *{SECRET}}}\n")
    config = tmp_path / "query.yml"
    config.write_text(f"auth: {{enabled: false}}\nfile_sd: ['{targets}']\n")
    result = _run("query", config)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"{targets}: YAML syntax error at line 2, column 19" in result.stderr, output
    assert SECRET not in output, output


def test_a_mistyped_setting_is_still_named(tmp_path: Path) -> None:
    """Setting-shaped keys are quoted back: the message stays useful for typos."""
    config = tmp_path / "typo.yml"
    config.write_text("lisen: 127.0.0.1:9256\nauth:\n  token: x\n")
    result = _run("exporter", config)
    assert result.returncode != 0
    assert "lisen: unknown key" in result.stderr and "auth.token: unknown key" in result.stderr
