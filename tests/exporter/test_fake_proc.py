"""The reader and the collector on a scripted /proc (tests/exporter/fakeproc.py).

The real-process tests (test_collector.py, test_lookup.py) show procfleet agrees with psutil
on this host; these make the rare cases happen every time: pid reuse between scrapes, ESRCH
from smaps_rollup, denied processes, a process exiting between two of its files, errnos
/proc should never give. The collector's whole exposition for each scripted table is pinned
byte for byte in tests/exporter/golden/*.prom (as prometheus-pve-exporter's tests/golden).

To regenerate the golden files after an intended change of the exposition:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/exporter/test_fake_proc.py

then read `git diff tests/exporter/golden` before committing: the diff is the change users see.
"""

from __future__ import annotations

import difflib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import falcon.testing
import psutil
import pytest
from fakeproc import BOOT_TIME, FakeProc, FakeProcess
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import create_app
from exporter.collector import ProcessCollector
from exporter.config import Config, MetricsOptions, from_mapping
from exporter.groups import parse_groups
from exporter.procs import (
    ProcessDenied,
    ProcessError,
    ProcessGone,
    wrap_exceptions,
)
from procfleet.configcheck import Problems

G = "namedprocess_namegroup_"
GOLDEN = Path(__file__).parent / "golden"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
USERS = {0: "root", 33: "www-data", 111: "postgres", 1000: "alice"}


def user_name(uid: int) -> str:
    return USERS.get(uid, str(uid))


class StepClock:
    """A clock that advances a fixed 1/8 s per reading: scrape durations are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.125
        return self.now


class Scraper:
    """The real collector over a FakeProc, on a private registry.

    `config` (a whole exporter config mapping, loaded by `from_mapping`) replaces `groups`
    and `options`."""

    def __init__(self, proc: FakeProc, groups: object = None, *,
                 config: dict[str, object] | None = None, **options: object) -> None:
        if config is not None:
            loaded = from_mapping(config)
            matchers, metrics = loaded.groups, loaded.metrics
        else:
            problems = Problems()
            matchers = parse_groups(groups, problems)
            assert problems.items == []
            metrics = MetricsOptions(**options)
        self.collector = ProcessCollector(proc.reader(), matchers, metrics,
                                          version="9.9.9-test", user_name=user_name,
                                          clock=StepClock())
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def values_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(values: dict, name: str, **labels: str) -> float | None:
    return values.get((name, tuple(sorted(labels.items()))))


def group_names(values: dict) -> set[str]:
    return {dict(labels)["groupname"] for name, labels in values if name == G + "num_procs"}


def assert_golden(name: str, text: str) -> None:
    """`text` equals tests/exporter/golden/NAME.prom byte for byte (UPDATE_GOLDEN=1 rewrites)."""
    path = GOLDEN / f"{name}.prom"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_bytes(text.encode())
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 (see module docstring)"
    expected = path.read_bytes()
    if text.encode() != expected:
        diff = difflib.unified_diff(expected.decode().splitlines(), text.splitlines(),
                                    str(path), "this run", lineterm="")
        pytest.fail(f"exposition differs from {path} (UPDATE_GOLDEN=1 rewrites it if the "
                    "change is intended):\n" + "\n".join(diff), pytrace=False)


# -- one translation of OS errors ----------------------------------------------------------

def test_denied_and_gone_are_siblings() -> None:
    assert not issubclass(ProcessDenied, ProcessGone)
    assert not issubclass(ProcessGone, ProcessDenied)
    assert issubclass(ProcessDenied, ProcessError) and issubclass(ProcessGone, ProcessError)


@pytest.mark.parametrize("code, raised", [
    (errno.ENOENT, ProcessGone),
    (errno.ESRCH, ProcessGone),
    (errno.EACCES, ProcessDenied),
    (errno.EPERM, ProcessDenied),
    (errno.EIO, OSError),  # not gone, not denied: passes unchanged
    (errno.EINVAL, OSError),
])
def test_wrap_exceptions_translates_only_gone_and_denied(code: int, raised: type) -> None:
    class Source:
        @wrap_exceptions
        def read(self, pid: int) -> bytes:
            raise OSError(code, os.strerror(code))

    with pytest.raises(raised) as caught:
        Source().read(42)
    if issubclass(raised, ProcessError):
        assert caught.value.pid == 42
        assert isinstance(caught.value.__cause__, OSError)  # the errno stays inspectable
    else:
        assert not isinstance(caught.value, ProcessError)
        assert caught.value.errno == code


@pytest.mark.parametrize("error, raised", [
    (psutil.NoSuchProcess(42), ProcessGone),
    (psutil.ZombieProcess(42), ProcessGone),
    (psutil.AccessDenied(42), ProcessDenied),
])
def test_wrap_exceptions_translates_psutils_errors_alike(error: Exception, raised: type) -> None:
    class Source:
        @wrap_exceptions
        def read(self, pid: int) -> bytes:
            raise error

    with pytest.raises(raised):
        Source().read(42)


def test_wrap_exceptions_catches_nothing_but_os_errors() -> None:
    class Source:
        @wrap_exceptions
        def read(self, pid: int) -> bytes:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Source().read(1)


@pytest.mark.parametrize("file, code, outcome", [
    ("stat", errno.ENOENT, ProcessGone),
    ("stat", errno.ESRCH, ProcessGone),
    ("stat", errno.EACCES, ProcessDenied),
    ("stat", errno.EIO, OSError),
    ("status", errno.ENOENT, ProcessGone),
    ("status", errno.EACCES, "uid"),  # status unreadable: no uid, no switches, no swap
    ("cmdline", errno.ESRCH, ProcessGone),
    ("cmdline", errno.EPERM, "cmdline"),
    ("io", errno.EACCES, "read_bytes"),  # optional fields: None, the process still counts
    ("io", errno.ENOENT, "read_bytes"),
    ("fd", errno.EACCES, "num_fds"),
    ("limits", errno.ESRCH, "max_fds"),
])
def test_reader_answers_each_file_error_once(file: str, code: int,
                                             outcome: type | str) -> None:
    proc = FakeProc(FakeProcess(7, "target", cmdline=["target", "--serve"], read_bytes=5,
                                errors={file: code}))
    reader = proc.reader()
    if isinstance(outcome, type):
        with pytest.raises(outcome) as caught:
            reader.sample(7, cmdline=True, detail=True)
        if outcome is OSError:
            assert not isinstance(caught.value, ProcessError) and caught.value.errno == code
        return
    sample = reader.sample(7, cmdline=True, detail=True)
    assert getattr(sample, outcome) is None
    assert sample.comm == "target" and sample.pid == 7
    unread = {"uid": ["uid", "voluntary_ctxt", "swap"], "cmdline": ["cmdline"],
              "read_bytes": ["read_bytes", "write_bytes"], "num_fds": ["num_fds"],
              "max_fds": ["max_fds"]}[outcome]
    for name in ("uid", "cmdline", "read_bytes", "num_fds", "max_fds", "swap"):
        assert (getattr(sample, name) is None) == (name in unread), name


def test_smaps_esrch_of_a_live_process_is_no_pss_and_of_a_gone_one_is_gone() -> None:
    kthread = FakeProcess(2, "kthreadd", ppid=0, kernel_thread=True, swap_kb=None)
    exits = FakeProcess(9, "exits", errors={"smaps_rollup": errno.ENOENT})
    denied = FakeProcess(10, "private", errors={"smaps_rollup": errno.EACCES})
    proc = FakeProc(kthread, exits, denied, FakeProcess(11, "normal", pss_kb=12, swap_pss_kb=3))
    reader = proc.reader()
    assert reader.proportional_memory(2) == (None, None)
    assert reader.proportional_memory(10) == (None, None)
    assert reader.proportional_memory(11) == (12 * 1024, 3 * 1024)
    assert reader.proportional_memory(9) == (None, None)  # /proc/9 still there
    proc.remove(9)
    with pytest.raises(ProcessGone):
        reader.proportional_memory(9)


def test_lookup_on_scripted_files_reads_them_not_the_hosts_proc() -> None:
    proc = FakeProc(FakeProcess(os.getpid(), "scripted", cmdline=["scripted"]))
    sample = proc.reader().lookup(os.getpid())
    assert sample.comm == "scripted"
    assert (os.getpid(), "stat") in proc.reads


# -- the exporter's HTTP answers for denied and gone ---------------------------------------

@pytest.fixture
def client() -> Iterator[falcon.testing.TestClient]:
    proc = FakeProc(
        FakeProcess(50, "visible", cmdline=["visible", "--x"]),
        FakeProcess(51, "hidden", errors={"stat": errno.EACCES}),
        FakeProcess(52, "leaving", vanish_after="stat"),
        FakeProcess(53, "noargs", errors={"cmdline": errno.EACCES}),
    )
    yield falcon.testing.TestClient(create_app(Config(), reader=proc.reader()))


@pytest.mark.parametrize("pid, status", [(50, 200), (51, 404), (52, 404), (53, 200), (54, 404)])
def test_lookup_answers_denied_and_gone_as_not_found(client, pid: int, status: int) -> None:
    got = client.simulate_get(f"/process/{pid}")
    assert got.status_code == status, got.text
    if status == 404:
        assert got.json["error"] == "process not found"
    else:
        assert got.json["pid"] == pid


def test_list_skips_denied_and_vanished_processes(client) -> None:
    got = client.simulate_get("/process")
    assert got.status_code == 200, got.text
    assert [p["pid"] for p in got.json["processes"]] == [50, 53]
    assert "command" not in got.json["processes"][1]  # denied cmdline: the field is omitted


# -- the collector on scripted tables, pinned by golden files ------------------------------

def _table() -> list[FakeProcess]:
    """A small host: init, two kernel threads, an nginx with workers and a shell, postgres."""
    return [
        FakeProcess(1, "systemd", ppid=0, uid=0, start_ticks=10, cmdline=["/sbin/init"],
                    rss_pages=3000, vsize=170_000_000, pss_kb=9000, fds=90),
        FakeProcess(2, "kthreadd", ppid=0, uid=0, start_ticks=11, kernel_thread=True,
                    swap_kb=None, fds=0),
        FakeProcess(3, "kworker/0:1", ppid=2, uid=0, start_ticks=12, state="I",
                    kernel_thread=True, swap_kb=None, fds=0),
        FakeProcess(100, "nginx", uid=0, start_ticks=5000, utime=150, stime=50,
                    cmdline=["nginx: master process /usr/sbin/nginx"], rss_pages=400,
                    vsize=50_000_000, pss_kb=900, fds=8, minflt=700, read_bytes=4096),
        FakeProcess(101, "nginx", ppid=100, uid=33, start_ticks=5010, utime=900, stime=300,
                    cmdline=["nginx: worker process"], rss_pages=900, vsize=52_000_000,
                    pss_kb=2500, swap_pss_kb=40, fds=40, max_fds=64, state="R",
                    voluntary_ctxt=1000, nonvoluntary_ctxt=20, write_bytes=1 << 20),
        FakeProcess(102, "nginx", ppid=100, uid=33, start_ticks=5010, utime=300, stime=100,
                    cmdline=["nginx: worker process"], rss_pages=880, vsize=52_000_000,
                    pss_kb=2400, fds=30, num_threads=2),
        FakeProcess(103, "sh", ppid=101, uid=33, start_ticks=9000,
                    cmdline=["sh", "-c", "logrotate"], rss_pages=100, vsize=2_000_000,
                    pss_kb=100),
        FakeProcess(200, "postgres", uid=111, start_ticks=3000, utime=4000, stime=1000,
                    cmdline=["/usr/lib/postgresql/16/bin/postgres", "-D", "/var/lib/pg"],
                    rss_pages=5000, vsize=220_000_000, pss_kb=15000, swap_kb=1024,
                    state="D", majflt=3),
    ]


TABLE_GROUPS = [
    {"name": "nginx", "comm": ["nginx"]},
    {"name": "db:{{.Username}}", "exe": ["postgres"]},
    {"name": "kernel", "comm": ["kthreadd", "kworker/0:1"]},
]


def _advance(proc: FakeProc) -> None:
    """What changes between two scrapes of _table(): CPU, faults, I/O, a new process."""
    t = proc.table
    t[100].utime += 10
    t[101].utime, t[101].stime, t[101].minflt = t[101].utime + 250, t[101].stime + 50, 40
    t[101].read_bytes, t[101].voluntary_ctxt = 8192, 1100
    t[102].utime += 75
    t[200].utime, t[200].majflt = t[200].utime + 500, 5
    del t[103]  # the shell exited
    proc.add(FakeProcess(104, "sh", ppid=102, uid=33, start_ticks=9500, utime=30,
                         cmdline=["sh", "-c", "gzip"], pss_kb=80))


def test_golden_table_two_scrapes() -> None:
    proc = FakeProc(*_table())
    scraper = Scraper(proc, TABLE_GROUPS, smaps=True, per_process_top_n=2,
                      per_process_groups=("kernel",))
    first = values_of(scraper.text())
    # The first scrape is the baseline: counters start at zero, gauges are what is.
    assert group_cpu(first, "nginx") == 0
    assert value(first, G + "num_procs", groupname="nginx") == 4  # the shell joined its parent
    _advance(proc)
    text = scraper.text()
    assert_golden("table", text)

    values = values_of(text)
    assert group_names(values) == {"nginx", "db:postgres", "kernel"}
    assert value(values, G + "num_procs", groupname="kernel") == 2
    # Kernel threads answer ESRCH for smaps_rollup: counted, with no PSS of their own.
    assert value(values, G + "memory_bytes", groupname="kernel",
                 memtype="proportionalResident") == 0
    assert value(values, G + "memory_bytes", groupname="nginx",
                 memtype="proportionalResident") == (900 + 2500 + 2400 + 80) * 1024
    # Since the first scrape: 10 + 250 + 75 ticks of user time, plus the new shell's 30.
    assert value(values, G + "cpu_seconds_total", groupname="nginx",
                 mode="user") == pytest.approx(3.65)
    assert value(values, "procfleet_read_errors_total", kind="vanished") == 0
    assert value(values, "procfleet_scrape_duration_seconds") == 0.125


def group_cpu(values: dict, group: str) -> float:
    return sum(value(values, G + "cpu_seconds_total", groupname=group, mode=m) or 0.0
               for m in ("user", "system"))


def test_golden_pid_reuse() -> None:
    proc = FakeProc(
        FakeProcess(300, "worker", start_ticks=1000, utime=500, cmdline=["worker"]),
        FakeProcess(301, "worker", start_ticks=1000, utime=100, minflt=900,
                    cmdline=["worker"]),
        FakeProcess(302, "bash", start_ticks=1000, utime=70, cmdline=["bash"]),
    )
    scraper = Scraper(proc, [{"comm": ["worker"]}, {"comm": ["other"]}], children=False)
    first = values_of(scraper.text())
    assert value(first, G + "num_procs", groupname="worker") == 2
    assert "other" not in group_names(first)  # no member yet: not exported

    # Between scrapes every pid is reused by a new process (a new start time):
    proc.add(
        # ... by one of another group,
        FakeProcess(300, "other", start_ticks=5000, utime=100, cmdline=["other"]),
        # ... by one of the same group that has used less CPU than its predecessor,
        FakeProcess(301, "worker", start_ticks=6000, utime=50, minflt=10,
                    cmdline=["worker", "--again"]),
        # ... and, where no group wanted the old process, by one a group wants.
        FakeProcess(302, "worker", start_ticks=7000, utime=20, cmdline=["worker"]),
    )
    proc.reads.clear()
    text = scraper.text()
    assert_golden("pid_reuse", text)

    values = values_of(text)
    # A reused pid is a new process: it counts in full, not as a delta from another.
    assert value(values, G + "num_procs", groupname="worker") == 2
    assert value(values, G + "cpu_seconds_total", groupname="worker",
                 mode="user") == pytest.approx(0.5 + 0.2)
    assert value(values, G + "minor_page_faults_total", groupname="worker") == 10
    assert value(values, G + "num_procs", groupname="other") == 1
    assert value(values, G + "cpu_seconds_total", groupname="other",
                 mode="user") == pytest.approx(1.0)
    # The new incarnations were read in full, command lines included, to group them anew.
    assert {pid for pid, name in proc.reads if name == "cmdline"} == {300, 301, 302}


def test_golden_read_errors() -> None:
    proc = FakeProc(
        FakeProcess(10, "denied", errors={"stat": errno.EACCES}),
        FakeProcess(11, "gone-mid", vanish_after="stat"),  # exits between stat and status
        FakeProcess(12, "gone-late", vanish_after="status", cmdline=["gone-late"]),
        FakeProcess(13, "kthread", ppid=2, kernel_thread=True, swap_kb=None),
        FakeProcess(14, "exits", vanish_after="limits", cmdline=["exits"]),  # then smaps
        FakeProcess(15, "private", cmdline=["private"],
                    errors={"status": errno.EACCES, "io": errno.EACCES}),
        FakeProcess(16, "weird", errors={"stat": errno.EIO}),
        FakeProcess(17, "nosmaps", cmdline=["nosmaps"], errors={"smaps_rollup": errno.EPERM}),
        FakeProcess(18, "fine", cmdline=["fine"], pss_kb=64),
    )
    scraper = Scraper(proc, smaps=True)  # default groups: one per comm, kernel threads one
    text = scraper.text()
    assert_golden("read_errors", text)

    values = values_of(text)
    assert group_names(values) == {"kernel_threads", "private", "nosmaps", "fine"}
    assert value(values, "procfleet_read_errors_total", kind="denied") == 1
    assert value(values, "procfleet_read_errors_total", kind="vanished") == 3
    assert value(values, "procfleet_read_errors_total", kind="other") == 1
    assert value(values, "procfleet_read_errors_total", kind="partial") == 1  # private's io


def _wchan_table() -> list[FakeProcess]:
    """_table() with each thread's wchan: nginx workers in epoll, postgres in I/O."""
    table = {p.pid: p for p in _table()}
    table[1].wchans = ["do_epoll_wait"]
    table[3].wchans = ["worker_thread"]
    table[100].wchans = ["sigsuspend"]
    table[101].wchans = ["0"]  # running: no wchan
    table[102].wchans = ["do_epoll_wait", "futex_wait_queue"]
    table[103].wchans = ["do_wait"]
    table[200].wchans = ["io_schedule"]
    return list(table.values())


WCHAN_CONFIG: dict[str, object] = {
    "groups": [*TABLE_GROUPS, {"name": "cron", "comm": ["cron"], "expected": True}],
    "expected_groups": ["backup", "nginx"],
    "metrics": {"threads_wchan": True, "drop_empty_groups": True},
}


def test_golden_wchan_and_expected_groups() -> None:
    proc = FakeProc(*_wchan_table())
    scraper = Scraper(proc, config=WCHAN_CONFIG)
    text = scraper.text()
    assert_golden("wchan_expected", text)

    values = values_of(text)
    wchan = G + "threads_wchan"
    # Every thread once, by its own task's wchan; a running thread has none.
    assert value(values, wchan, groupname="nginx", wchan="do_epoll_wait") == 1
    assert value(values, wchan, groupname="nginx", wchan="futex_wait_queue") == 1
    assert value(values, wchan, groupname="nginx", wchan="sigsuspend") == 1
    assert value(values, wchan, groupname="nginx", wchan="do_wait") == 1  # the adopted shell
    assert value(values, wchan, groupname="nginx", wchan="0") is None
    assert value(values, wchan, groupname="db:postgres", wchan="io_schedule") == 1
    assert value(values, wchan, groupname="kernel", wchan="worker_thread") == 1
    assert {dict(labels)["groupname"] for name, labels in values if name == wchan} == {
        "nginx", "db:postgres", "kernel"}  # systemd is in no group
    # Only multi-threaded processes have their task directory listed.
    assert {pid for pid, name in proc.reads if name == "task"} == {102}

    # Expected groups: there from the first scrape, with no process of theirs, kept
    # though drop_empty_groups is on; their counters are 0, not absent.
    for group in ("cron", "backup"):
        assert value(values, G + "num_procs", groupname=group) == 0
        assert value(values, G + "cpu_seconds_total", groupname=group, mode="user") == 0
        assert value(values, G + "oldest_start_time_seconds", groupname=group) == 0
    assert value(values, G + "num_procs", groupname="nginx") == 4  # expected and running
    assert {dict(labels)["groupname"] for name, labels in values
            if name == "procfleet_group_expected"} == {"cron", "backup", "nginx"}

    # The group's process starts: it counts in full, from the counters' 0.
    proc.add(FakeProcess(400, "cron", start_ticks=9500, utime=20, cmdline=["/usr/sbin/cron"]))
    del proc.table[100], proc.table[101], proc.table[102], proc.table[103]
    later = values_of(scraper.text())
    assert value(later, G + "num_procs", groupname="cron") == 1
    assert value(later, G + "cpu_seconds_total", groupname="cron",
                 mode="user") == pytest.approx(0.2)
    assert value(later, G + "num_procs", groupname="nginx") == 0  # expected: kept empty
    assert value(later, G + "num_procs", groupname="kernel") == 2


def test_wchan_of_a_thread_that_exits_is_left_out() -> None:
    proc = FakeProc(FakeProcess(7, "app", cmdline=["app"], num_threads=3,
                                wchans=["ep_poll", "futex_wait_queue", "futex_wait_queue"],
                                errors={"task/7002/wchan": errno.ENOENT}),
                    FakeProcess(8, "app", cmdline=["app"], wchans=["ep_poll"],
                                errors={"wchan": errno.EACCES}))  # not ours to see
    values = values_of(Scraper(proc, threads_wchan=True).text())
    assert value(values, G + "threads_wchan", groupname="app", wchan="ep_poll") == 1
    assert value(values, G + "threads_wchan", groupname="app", wchan="futex_wait_queue") == 1
    assert value(values, G + "num_procs", groupname="app") == 2
    assert value(values, "procfleet_read_errors_total", kind="partial") == 0


def test_wchan_is_off_by_default_and_reads_nothing() -> None:
    proc = FakeProc(*_wchan_table())
    text = Scraper(proc, TABLE_GROUPS).text()
    assert "threads_wchan" not in text
    assert "procfleet_group_expected{" not in text  # none declared
    assert not [name for _, name in proc.reads if "wchan" in name or name == "task"]


@pytest.mark.parametrize("name", ["table", "pid_reuse", "read_errors", "wchan_expected"])
def test_promtool_accepts_the_golden_files(name: str) -> None:
    done = subprocess.run([PROMTOOL, "check", "metrics"],
                          input=(GOLDEN / f"{name}.prom").read_bytes(),
                          capture_output=True, timeout=30)
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and output.strip() == "", output


def test_boot_time_of_the_table_is_fixed() -> None:
    # The golden files hold start times: they depend on the fake host's boot time alone.
    sample = FakeProc(FakeProcess(5, "x", start_ticks=250)).reader().sample(5)
    assert sample.create_time == BOOT_TIME + 2.5
