"""Expected groups on a real exporter: exported at 0 from the first scrape, then counting."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import from_mapping
from procfleet.testing import Children, start_exporter, wait_until

G = "namedprocess_namegroup_"
README = Path(__file__).resolve().parents[2] / "README.md"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_an_expected_group_is_there_before_its_process_and_counts_it_after(
        tmp_path: Path) -> None:
    tag = f"exp{tmp_path.name[-6:]}".replace("_", "")
    config = (f"groups:\n  - {{name: {tag}-app, cmdline: ['{tag}-marker'], expected: true}}\n"
              f"expected_groups: [{tag}-never]\n")
    server = start_exporter(tmp_path, config=config)
    try:
        first = scrape(server.url)  # the very first scrape
        for group in (f"{tag}-app", f"{tag}-never"):
            assert first[(G + "num_procs", (("groupname", group),))] == 0
            assert first[(G + "cpu_seconds_total", (("groupname", group), ("mode", "user")))] == 0
            assert first[("procfleet_group_expected", (("groupname", group),))] == 1

        with Children() as children:
            children.spawn(f"{tag}-marker")

            def running() -> dict | None:
                values = scrape(server.url)
                key = (G + "num_procs", (("groupname", f"{tag}-app"),))
                return values if values[key] == 1 else None

            later = wait_until(running, timeout=20, what="the expected group's process")
            assert later[(G + "num_procs", (("groupname", f"{tag}-never"),))] == 0
    finally:
        server.stop()


def test_the_readme_example_of_expected_groups_loads() -> None:
    section = README.read_text().split("### Expected groups", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    config = from_mapping(yaml.safe_load(block.group(1)))
    assert config.metrics.expected_groups == ("nginx", "backup-agent")
