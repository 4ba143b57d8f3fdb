"""The /metrics collector on real child processes: values, counter semantics, options, promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import falcon.testing
import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import create_app
from exporter.collector import EMPTY_GROUPS_KEPT, ERROR_KINDS, ProcessCollector
from exporter.config import MAX_TOP_N, MetricsOptions, from_mapping, parse_metrics_options
from exporter.groups import GROUP_NAME_MAX, parse_groups
from exporter.procs import UserNames, make_reader
from procfleet.configcheck import Problems
from procfleet.testing import (
    Children,
    NamedChildren,
    assert_prefixes,
    wait_for_comm,
    wait_until,
)

G = "namedprocess_namegroup_"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


class Spawner(NamedChildren):
    """Shells under a distinctive comm, by default blocked reading stdin."""

    def spawn(self, suffix: str, script: str = "read _") -> subprocess.Popen[bytes]:
        # Blocked on stdin it sleeps: done loading, its memory stable.
        return self.start(suffix, "/bin/sh", "-c", script, settled=script == "read _")

    def busy(self, suffix: str) -> subprocess.Popen[bytes]:
        return self.spawn(suffix, "while :; do :; done")


def kill(child: subprocess.Popen[bytes]) -> None:
    child.kill()
    child.wait(timeout=10)


@pytest.fixture
def spawner(tmp_path: Path) -> Iterator[Spawner]:
    s = Spawner(tmp_path)
    try:
        yield s
    finally:
        s.reap()


class Exporter:
    """A collector on a private registry, scraped through the text exposition."""

    def __init__(self, groups_raw: object = None, reader: str = "procfs",
                 empty_groups_kept: int = EMPTY_GROUPS_KEPT, **options) -> None:
        problems = Problems()
        groups = parse_groups(groups_raw, problems)
        assert problems.items == []
        self.collector = ProcessCollector(make_reader(reader), groups, MetricsOptions(**options),
                                          version="9.9.9-test", user_name=UserNames(),
                                          empty_groups_kept=empty_groups_kept)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        values = {}
        for family in text_string_to_metric_families(self.text()):
            for s in family.samples:
                values[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return values


def value(values, name: str, **labels: str) -> float | None:
    return values.get((name, tuple(sorted(labels.items()))))


def group_cpu(values, group: str) -> float:
    return (value(values, G + "cpu_seconds_total", groupname=group, mode="user")
            + value(values, G + "cpu_seconds_total", groupname=group, mode="system"))


def cpu_of(child: subprocess.Popen[bytes]) -> float:
    times = psutil.Process(child.pid).cpu_times()
    return times.user + times.system


# -- values against psutil ---------------------------------------------------------------

@pytest.mark.parametrize("reader", ["procfs", "psutil"])
def test_group_values_match_psutil(spawner: Spawner, reader: str) -> None:
    children = [spawner.spawn("idle") for _ in range(3)]
    group = spawner.comm("idle")
    values = Exporter(reader=reader).scrape()  # default groups: one per comm

    procs = [psutil.Process(c.pid) for c in children]
    assert value(values, G + "num_procs", groupname=group) == 3
    rss = sum(p.memory_info().rss for p in procs)
    # /proc/PID/stat (read here, as process-exporter does) and statm (psutil) can differ
    # by a few per-CPU counter batches of pages.
    assert value(values, G + "memory_bytes", groupname=group, memtype="resident") == \
        pytest.approx(rss, rel=0.1, abs=3 * 256 * 1024)
    vms = sum(p.memory_info().vms for p in procs)
    assert value(values, G + "memory_bytes", groupname=group, memtype="virtual") == \
        pytest.approx(vms, rel=0.1)
    assert value(values, G + "memory_bytes", groupname=group, memtype="swapped") is not None
    assert value(values, G + "num_threads", groupname=group) == 3
    assert value(values, G + "open_filedesc", groupname=group) == \
        sum(p.num_fds() for p in procs)
    limit = psutil.Process(children[0].pid).rlimit(psutil.RLIMIT_NOFILE)[0]
    assert value(values, G + "worst_fd_ratio", groupname=group) == \
        pytest.approx(max(p.num_fds() for p in procs) / limit)
    assert value(values, G + "oldest_start_time_seconds", groupname=group) == \
        pytest.approx(min(p.create_time() for p in procs), abs=1.01)
    assert value(values, G + "states", groupname=group, state="Sleeping") == 3
    for state in ("Running", "Waiting", "Zombie", "Other"):
        assert value(values, G + "states", groupname=group, state=state) == 0
    for ctx in ("voluntary", "nonvoluntary"):
        assert value(values, G + "context_switches_total", groupname=group,
                     ctxswitchtype=ctx) is not None
    for name in ("read_bytes_total", "write_bytes_total", "major_page_faults_total",
                 "minor_page_faults_total"):
        assert value(values, G + name, groupname=group) is not None


def test_every_group_series_has_the_originals_labels(spawner: Spawner) -> None:
    spawner.spawn("lbl")
    group = spawner.comm("lbl")
    families = {f.name: f for f in text_string_to_metric_families(Exporter().text())}
    expected = {
        "num_procs": ("gauge", set()), "cpu_seconds": ("counter", {"mode"}),
        "read_bytes": ("counter", set()), "write_bytes": ("counter", set()),
        "major_page_faults": ("counter", set()), "minor_page_faults": ("counter", set()),
        "context_switches": ("counter", {"ctxswitchtype"}),
        "memory_bytes": ("gauge", {"memtype"}), "open_filedesc": ("gauge", set()),
        "worst_fd_ratio": ("gauge", set()), "oldest_start_time_seconds": ("gauge", set()),
        "num_threads": ("gauge", set()), "states": ("gauge", {"state"}),
    }
    for short, (kind, extra) in expected.items():
        family = families[G + short]
        assert family.type == kind
        mine = [s for s in family.samples if s.labels["groupname"] == group]
        assert mine, short
        assert all(set(s.labels) == {"groupname"} | extra for s in mine)
        if kind == "counter":
            assert all(s.name == G + short + "_total" for s in mine)


def test_text_exposition_names_counters_as_the_original() -> None:
    text = Exporter().text()
    assert f"# TYPE {G}cpu_seconds_total counter\n" in text
    assert f"# TYPE {G}context_switches_total counter\n" in text
    assert "# TYPE procfleet_read_errors_total counter\n" in text
    assert 'procfleet_build_info{version="9.9.9-test"} 1.0\n' in text
    assert "procfleet_scrape_duration_seconds " in text
    for kind in ERROR_KINDS:
        assert f'procfleet_read_errors_total{{kind="{kind}"}}' in text


# -- counters ----------------------------------------------------------------------------

def test_counters_do_not_go_back_when_a_member_exits(spawner: Spawner) -> None:
    a, b = spawner.busy("busy"), spawner.busy("busy")
    group = spawner.comm("busy")
    exporter = Exporter([{"comm": [group]}])
    exporter.scrape()
    time.sleep(0.4)
    before = exporter.scrape()
    assert value(before, G + "num_procs", groupname=group) == 2
    assert group_cpu(before, group) > 0.05

    kill(a)
    after = exporter.scrape()
    assert value(after, G + "num_procs", groupname=group) == 1
    for mode in ("user", "system"):
        assert value(after, G + "cpu_seconds_total", groupname=group, mode=mode) >= \
            value(before, G + "cpu_seconds_total", groupname=group, mode=mode)
    minor = value(after, G + "minor_page_faults_total", groupname=group)
    assert minor >= value(before, G + "minor_page_faults_total", groupname=group)

    kill(b)
    empty = exporter.scrape()  # an empty group is still exported, with its counters
    assert value(empty, G + "num_procs", groupname=group) == 0
    assert value(empty, G + "memory_bytes", groupname=group, memtype="resident") == 0
    assert group_cpu(empty, group) >= group_cpu(after, group)
    assert value(empty, G + "minor_page_faults_total", groupname=group) >= minor


def test_a_process_started_after_the_first_scrape_counts_in_full(spawner: Spawner) -> None:
    group = spawner.comm("late")
    exporter = Exporter([{"comm": [group]}])
    exporter.scrape()
    child = spawner.busy("late")
    time.sleep(0.3)
    low = cpu_of(child)
    values = exporter.scrape()
    high = cpu_of(child)
    assert low - 0.02 <= group_cpu(values, group) <= high + 0.02


def test_processes_running_at_the_first_scrape_count_from_then(spawner: Spawner) -> None:
    child = spawner.busy("base")
    deadline = time.monotonic() + 20  # a loaded machine gives the child CPU slowly
    while cpu_of(child) <= 0.1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cpu_of(child) > 0.1
    group = spawner.comm("base")
    exporter = Exporter([{"comm": [group]}])
    assert group_cpu(exporter.scrape(), group) == 0  # as process-exporter: a baseline


def test_drop_empty_groups(spawner: Spawner) -> None:
    child = spawner.spawn("gone")
    group = spawner.comm("gone")
    exporter = Exporter(drop_empty_groups=True)
    assert value(exporter.scrape(), G + "num_procs", groupname=group) == 1
    kill(child)
    values = exporter.scrape()
    assert all(labels != (("groupname", group),) for _, labels in values)
    assert not any(dict(labels).get("groupname") == group for _, labels in values)


def test_empty_groups_kept_are_bounded_longest_empty_first(spawner: Spawner) -> None:
    children = [spawner.spawn("emp") for _ in range(5)]
    # One group per process: what a name carrying argv text or {{.PID}} makes of churn.
    exporter = Exporter([{"comm": [spawner.comm("emp")], "name": "emp-{{.PID}}"}],
                        empty_groups_kept=2)

    def groups() -> set[str]:
        return {dict(labels)["groupname"] for name, labels in exporter.scrape()
                if name == G + "num_procs"}

    assert groups() == {f"emp-{c.pid}" for c in children}
    for child in children[:3]:
        kill(child)
        groups()
    # The first to go empty is forgotten; the two latest empty ones and the live ones stay.
    assert groups() == {f"emp-{c.pid}" for c in children[1:]}


def test_group_names_are_cut(spawner: Spawner) -> None:
    child = spawner.start("long", "/bin/sh", "-c", "read _", "a" * 1000, "b" * 1000, "c" * 1000)
    values = Exporter([{"comm": [spawner.comm("long")], "cmdline": ["read _ (?P<args>.*)"],
                        "name": "{{.Matches.args}}"}]).scrape()
    (name,) = {dict(labels)["groupname"] for name, labels in values if name == G + "num_procs"}
    assert name == ("a" * 1000 + " " + "b" * 1000)[:GROUP_NAME_MAX], child.pid


# -- grouping ----------------------------------------------------------------------------

def test_unmatched_children_join_their_parents_group(spawner: Spawner) -> None:
    parent_comm = spawner.comm("par")
    parent = spawner.spawn("par", "sleep 60 & wait")
    deadline = time.monotonic() + 5
    while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
        time.sleep(0.01)
    (child,) = psutil.Process(parent.pid).children()
    wait_for_comm(child.pid, "sleep")
    config = [{"comm": [parent_comm], "name": "parent-group-" + spawner.tag}]
    on = Exporter(config).scrape()
    off = Exporter(config, children=False).scrape()
    assert value(on, G + "num_procs", groupname="parent-group-" + spawner.tag) == 2
    assert value(off, G + "num_procs", groupname="parent-group-" + spawner.tag) == 1


def test_processes_no_group_wants_are_left_out(spawner: Spawner) -> None:
    spawner.spawn("only")
    exporter = Exporter([{"comm": [spawner.comm("only")]}], children=False)
    for _ in range(2):  # the second scrape sees the left-out processes as known
        values = exporter.scrape()
        groups = {dict(labels)["groupname"] for name, labels in values
                  if name == G + "num_procs"}
        assert groups == {spawner.comm("only")}


def test_group_membership_is_decided_once_per_incarnation(spawner: Spawner) -> None:
    child = spawner.spawn("once", "read _; exec sleep 60")
    group = spawner.comm("once")
    exporter = Exporter()
    assert value(exporter.scrape(), G + "num_procs", groupname=group) == 1
    child.stdin.write(b"\n")  # the shell now execs sleep: same pid, new comm and cmdline
    child.stdin.flush()
    wait_for_comm(child.pid, "sleep")
    values = exporter.scrape()
    assert value(values, G + "num_procs", groupname=group) == 1


# -- per-process series ------------------------------------------------------------------

def test_top_n_by_cpu_shows_the_busy_process(spawner: Spawner) -> None:
    busy = spawner.busy("hot")
    exporter = Exporter(per_process_top_n=10, per_process_by="cpu")
    exporter.scrape()
    # Until the child has used CPU enough to rank on a loaded 2-core host: between two
    # scrapes, 10 others can each use more only if the window is far longer.
    start = cpu_of(busy)
    wait_until(lambda: cpu_of(busy) - start >= 0.3, timeout=20, what="the child to spin")
    values = exporter.scrape()
    per_process = {labels for name, labels in values if name.startswith("procfleet_process_")}
    pids = {dict(labels)["pid"] for labels in per_process}
    assert str(busy.pid) in pids  # other busy processes on this host may rank too
    assert len(pids) == 10
    user = value(values, "procfleet_process_cpu_seconds_total",
                 groupname=spawner.comm("hot"), pid=str(busy.pid), mode="user")
    assert user is not None and user > 0


def test_top_n_by_memory_and_selected_groups(spawner: Spawner) -> None:
    idle = [spawner.spawn("sel") for _ in range(2)]
    exporter = Exporter(per_process_top_n=3, per_process_by="memory",
                        per_process_groups=(spawner.comm("sel"),))
    values = exporter.scrape()
    rss = {dict(labels)["pid"]: v for (name, labels), v in values.items()
           if name == "procfleet_process_resident_memory_bytes"}
    assert {str(c.pid) for c in idle} <= set(rss)
    assert 3 <= len(rss) <= 5
    biggest = sorted((p.info["memory_info"].rss for p in psutil.process_iter(["memory_info"])
                      if p.info["memory_info"]), reverse=True)
    assert max(rss.values()) >= biggest[2]


def test_per_process_series_are_off_by_default() -> None:
    assert "procfleet_process_" not in Exporter().text()


# -- group labels follow the masking config ----------------------------------------------

@pytest.mark.parametrize(("masking", "label"), [
    (None, "read _ # --password=*** pin=4321"),
    ({"enabled": False}, "read _ # --password=S3cr3tK pin=4321"),
    ({"extra_patterns": [r"pin=(?P<value>\d+)"]}, "read _ # --password=*** pin=***"),
], ids=["default", "disabled", "extra-pattern"])
def test_group_labels_follow_the_masking_config(spawner: Spawner, masking: object,
                                                label: str) -> None:
    spawner.spawn("lbl", "read _ # --password=S3cr3tK pin=4321")
    raw: dict[str, object] = {"groups": [{"comm": [spawner.comm("lbl")],
                                          "cmdline": ["-c (?P<script>.*)"],
                                          "name": "{{.Matches.script}}"}]}
    if masking is not None:
        raw["masking"] = masking
    # The whole app, as the exporter builds it: the collector gets the configured masker.
    client = falcon.testing.TestClient(create_app(from_mapping(raw), reader=make_reader("procfs")))
    got = client.simulate_get("/metrics")
    assert got.status_code == 200
    groups = {s.labels["groupname"] for f in text_string_to_metric_families(got.text)
              for s in f.samples if s.name == G + "num_procs"}
    assert groups == {label}


# -- exposition quality ------------------------------------------------------------------

def test_promtool_accepts_a_real_scrape(spawner: Spawner) -> None:
    spawner.spawn("prom")
    exporter = Exporter(per_process_top_n=5, per_process_groups=(spawner.comm("prom"),),
                        smaps=True, threads_wchan=True)
    exporter.scrape()
    text = exporter.text()
    assert 'memtype="proportionalResident"' in text
    assert G + 'threads_wchan{groupname="' in text
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=30)
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and output.strip() == "", output


# Four threads that never wake up while the test runs: their wchans hold still.
THREADED_SLEEPER = """import sys, threading, time
for _ in range(3):
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
time.sleep(3600)
"""


def test_threads_wchan_counts_each_sleeping_thread_of_a_real_process(tmp_path: Path) -> None:
    marker = f"wchan-{tmp_path.name[-8:]}"
    with Children() as children:
        child = children.spawn(marker, code=THREADED_SLEEPER)

        def four_threads() -> list[str] | None:
            tids = os.listdir(f"/proc/{child.pid}/task")
            return tids if len(tids) == 4 else None

        tids = wait_until(four_threads, what="the child's 4 threads")
        wait_until(lambda: all(_wchan(child.pid, t) for t in tids),
                   what="all 4 threads asleep")
        exporter = Exporter([{"name": "sleepy", "cmdline": [marker]}], threads_wchan=True)
        values = exporter.scrape()
        # Read independently of the exporter's reader, straight after its scrape.
        seen: dict[str, int] = {}
        for tid in tids:
            seen[_wchan(child.pid, tid)] = seen.get(_wchan(child.pid, tid), 0) + 1
    got = {dict(labels)["wchan"]: v for (name, labels), v in values.items()
           if name == G + "threads_wchan" and dict(labels)["groupname"] == "sleepy"}
    assert sum(got.values()) == 4 == sum(seen.values())
    assert set(got) == set(seen), (got, seen)
    assert value(values, G + "num_threads", groupname="sleepy") == 4
    assert "threads_wchan" not in Exporter([{"cmdline": [marker]}]).text()


def _wchan(pid: int, tid: str) -> str:
    with open(f"/proc/{pid}/task/{tid}/wchan") as f:
        text = f.read().strip()
    return "" if text == "0" else text


def test_concurrent_scrapes_are_consistent(spawner: Spawner) -> None:
    for _ in range(3):
        spawner.spawn("conc")
    group = spawner.comm("conc")
    exporter = Exporter()
    seen: list[float | None] = []
    failures: list[BaseException] = []

    def scrape() -> None:
        try:
            for _ in range(5):
                seen.append(value(exporter.scrape(), G + "num_procs", groupname=group))
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=scrape) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert failures == []
    assert seen == [3] * 20


# -- options -----------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("yes", ["metrics: must be a mapping, got str"]),
    ({"smap": True}, ["metrics.smap: unknown key"]),
    ({"smaps": "yes"}, ["metrics.smaps: must be a boolean, got str"]),
    ({"drop_empty_groups": 1}, ["metrics.drop_empty_groups: must be a boolean, got int"]),
    ({"per_process_top_n": True}, ["metrics.per_process_top_n: must be an integer"]),
    ({"per_process_top_n": -1}, ["metrics.per_process_top_n: must be between 0 and"]),
    ({"per_process_top_n": MAX_TOP_N + 1}, ["metrics.per_process_top_n: must be between"]),
    ({"per_process_by": "rss"}, ["metrics.per_process_by: must be one of cpu, memory"]),
    ({"per_process_groups": "nginx"}, ["metrics.per_process_groups: must be a list"]),
    ({"per_process_groups": ["ok", 7]}, ["metrics.per_process_groups[1]: must be a group"]),
    ({"children": "no", "bogus": 1}, ["metrics.bogus: unknown key",
                                      "metrics.children: must be a boolean"]),
])
def test_option_problems_are_named_by_key_path(raw: object, expected: list[str]) -> None:
    problems = Problems()
    parse_metrics_options(raw, problems)
    assert_prefixes(problems.items, expected)


def test_options_parse() -> None:
    problems = Problems()
    options = parse_metrics_options({
        "drop_empty_groups": True, "per_process_top_n": 10, "per_process_by": "memory",
        "per_process_groups": ["nginx"], "smaps": True, "children": False}, problems)
    assert problems.items == []
    assert options == MetricsOptions(drop_empty_groups=True, per_process_top_n=10,
                                     per_process_by="memory", per_process_groups=("nginx",),
                                     smaps=True, children=False)
    assert parse_metrics_options(None, problems) == MetricsOptions()


# -- smaps and kernel threads ------------------------------------------------------------

def _counted_pids(values) -> set[int]:
    return {int(dict(labels)["pid"]) for name, labels in values
            if name == "procfleet_process_resident_memory_bytes"}


@pytest.mark.parametrize("reader", ["procfs", "psutil"])
def test_smaps_counts_kernel_threads_as_psutil_sees_them(reader: str) -> None:
    # Kernel threads answer ESRCH for /proc/PID/smaps_rollup while they run; smaps used to
    # drop them as vanished (94 -> 35 processes). psutil reports them with PSS 0.
    def processes() -> dict[int, int]:
        return {p.pid: p.info["ppid"] for p in psutil.process_iter(["ppid"])}

    before = processes()
    kernel = {pid for pid, ppid in before.items() if pid == 2 or ppid == 2}
    assert 2 in kernel and len(kernel) > 1, "this test needs kthreadd and its threads"
    assert len(before) < MAX_TOP_N, "every process must fit in the per-process series"
    assert psutil.Process(2).memory_full_info().pss == 0

    # Default groups (kernel threads in one, user processes one per comm) take every
    # process, and each gets a per-process series: the pids counted are visible.
    exporter = Exporter(reader=reader, smaps=True, per_process_top_n=MAX_TOP_N)
    values = exporter.scrape()
    after = processes()
    counted = _counted_pids(values)
    # Processes alive before and after the scrape were alive during it (churn aside).
    stable = set(before) & set(after)
    stable = {pid for pid in stable if before[pid] == after[pid]}
    missing = stable - counted
    assert missing == set(), f"not counted: {sorted(missing)[:20]} of {len(stable)}"
    assert kernel & stable <= counted
    assert value(values, G + "num_procs", groupname="kernel_threads") >= len(kernel & stable)
    assert value(values, G + "num_procs", groupname="kthreadd") is None
    assert value(values, G + "memory_bytes", groupname="kernel_threads",
                 memtype="proportionalResident") == 0
