"""`make dist`'s wheel, installed into a fresh venv away from this checkout, runs: both
services and the CLI start from its console scripts and serve their data files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from procfleet.testing import free_port, reap, wait_ready

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("procfleet", "exporter", "query")
HOSTNAME = "wheel-host"


def data_files() -> set[str]:
    """Every non-Python file of the packages in this checkout (what the services read)."""
    return {str(path.relative_to(REPO)) for pkg in PACKAGES
            for path in (REPO / pkg).rglob("*")
            if path.is_file() and path.suffix not in (".py", ".pyc")
            and "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What `make dist` runs, on a copy of the checkout (a build writes build/ and
    *.egg-info next to setup.py)."""
    tmp = tmp_path_factory.mktemp("dist")
    source = tmp / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "results"))
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist",
                    "--outdir", str(tmp / "out"), str(source)], check=True,
                   capture_output=True, timeout=120)
    wheels, sdists = list((tmp / "out").glob("*.whl")), list((tmp / "out").glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list((tmp / "out").iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, dist: dict[str, Path]) -> Path:
    """A fresh venv with only the wheel and the dependencies pip resolves for it."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=60)
    # This venv's pip installs into the new one (pip --python): no ensurepip round.
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"),
                             "install", "--quiet", "--disable-pip-version-check",
                             str(dist["wheel"])], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


@pytest.fixture(scope="module")
def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_wheel_has_every_data_file_and_the_console_scripts(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    assert data_files() <= names, data_files() - names
    assert {"exporter/openapi.json", "query/openapi.json", "exporter/landing.html",
            "query/landing.html"} <= names
    for script in ("procfleet-exporter", "procfleet-query", "procfleet"):
        assert f"{script} = " in entry_points
    assert not any(n.startswith("tests/") for n in names)


def test_sdist_carries_the_configs_and_docs(dist: dict[str, Path]) -> None:
    listing = subprocess.run(["tar", "tzf", str(dist["sdist"])], capture_output=True,
                             text=True, check=True, timeout=30).stdout.splitlines()
    inside = {name.split("/", 1)[1] for name in listing if "/" in name}
    assert {"setup.py", "pyproject.toml", "README.md", "config/prometheus.yml",
            "config/prometheus/alerts.yml", "docs/api.md"} <= inside
    assert data_files() <= inside


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, venv: Path,
             clean_env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """The installed exporter and query service on free ports, run from an empty folder."""
    run = tmp_path_factory.mktemp("run")
    bin_dir = venv / "bin"
    exporter_url = f"http://127.0.0.1:{free_port()}"
    query_url = f"http://127.0.0.1:{free_port()}"
    config = run / "query.yml"
    config.write_text(json.dumps({"auth": {"enabled": False}, "exporters": [
        {"hostname": HOSTNAME, "url": exporter_url}]}))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for argv, url, name in (
                ([str(bin_dir / "procfleet-exporter"), "--hostname", HOSTNAME, "--listen",
                  exporter_url.removeprefix("http://")], exporter_url, "exporter"),
                ([str(bin_dir / "procfleet-query"), "--config", str(config), "--listen",
                  query_url.removeprefix("http://")], query_url, "query")):
            log = run / f"{name}.log"
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(argv, cwd=run, env=clean_env, stdout=out,
                                              stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL))
            wait_ready(f"{url}/healthz", procs[-1], timeout=60, log=log)
        yield exporter_url, query_url
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                reap(proc)


def test_installed_packages_come_from_the_venv_not_the_checkout(
        venv: Path, clean_env: dict[str, str], tmp_path: Path) -> None:
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import procfleet, exporter, query; "
                          "print(procfleet.__file__, exporter.__file__, query.__file__)"],
                         cwd=tmp_path, env=clean_env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert len(out) == 3
    for path in out:
        assert Path(path).is_relative_to(venv) and not Path(path).is_relative_to(REPO), path


def test_installed_services_answer_health_lookups_and_their_contracts(
        services: tuple[str, str]) -> None:
    exporter_url, query_url = services
    for url in services:
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        spec = requests.get(f"{url}/openapi.json", timeout=10)
        assert spec.status_code == 200 and spec.json()["openapi"].startswith("3.")
    for url in services:  # each page is a package data file the wheel must carry
        landing = requests.get(f"{url}/", timeout=10)
        assert landing.status_code == 200 and "<html" in landing.text.lower()
    child = subprocess.Popen(["sleep", "60"])
    try:
        answer = requests.get(f"{query_url}/node/{HOSTNAME}/process/{child.pid}",
                              timeout=10).json()
    finally:
        reap(child)
    assert [(r["hostname"], r["status"]) for r in answer["results"]] == [(HOSTNAME, "ok")]
    assert answer["results"][0]["process"]["pid"] == child.pid


def test_installed_cli_looks_a_process_up(services: tuple[str, str], venv: Path,
                                          clean_env: dict[str, str], tmp_path: Path) -> None:
    _, query_url = services
    child = subprocess.Popen(["sleep", "60"])
    try:
        result = subprocess.run([str(venv / "bin" / "procfleet"), "--url", query_url, "--json",
                                 "get", HOSTNAME, str(child.pid)], cwd=tmp_path, env=clean_env,
                                capture_output=True, text=True, timeout=60)
    finally:
        reap(child)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["process"]["pid"] == child.pid
    for script in ("procfleet-exporter", "procfleet-query", "procfleet"):
        version = subprocess.run([str(venv / "bin" / script), "--version"], cwd=tmp_path,
                                 env=clean_env, capture_output=True, text=True, timeout=60)
        assert version.returncode == 0 and "0.1.0" in version.stdout, (script, version)
