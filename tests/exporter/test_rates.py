"""Live rates (issue 10): the sampler's arithmetic on a scripted /proc, its accuracy on real
children, its bound, and the four fields and `?sort=cpu_recent` through the real app."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path

import falcon.testing
import psutil
import pytest
from fakeproc import CLOCK_TICKS, FakeProc, FakeProcess

from exporter.app import create_app
from exporter.config import Config, from_mapping
from exporter.procs import ProcfsReader
from exporter.rates import RateSampler
from procfleet.configcheck import ConfigError
from procfleet.process import RATE_FIELDS
from procfleet.testing import SPINNER, wait_until

# -- arithmetic on a scripted /proc ------------------------------------------------------------


def _scripted(*procs: FakeProcess, cap: int = 1000) -> tuple[FakeProc, RateSampler]:
    fake = FakeProc(*procs)
    return fake, RateSampler(fake.reader(), interval=5.0, max_processes=cap, background=False)


def test_rates_over_the_window() -> None:
    fake, sampler = _scripted(FakeProcess(pid=10, comm="web", utime=100, stime=50,
                                          read_bytes=1000, write_bytes=5000))
    sampler.sweep(now=100.0)
    assert sampler.rates(10, 1000, now=100.0) is None  # one reading: younger than a window
    proc = fake.table[10]
    # In 5 s: 2.5 s of CPU (250 ticks), 10,000 bytes read, 50,000 written.
    proc.utime, proc.stime = 100 + 200, 50 + 50
    proc.read_bytes, proc.write_bytes = 11_000, 55_000
    sampler.sweep(now=105.0)
    rates = sampler.rates(10, 1000, now=106.0)
    assert rates is not None
    assert rates.cpu_percent == 100.0 * 250 / CLOCK_TICKS / 5.0  # 50%, not divided by CPUs
    assert rates.read_bytes_per_second == 2000.0
    assert rates.write_bytes_per_second == 10_000.0
    assert rates.window_seconds == 5.0


def test_more_than_one_core_reads_over_100_percent() -> None:
    fake, sampler = _scripted(FakeProcess(pid=10, comm="make", num_threads=4))
    sampler.sweep(now=0.0)
    fake.table[10].utime = 4 * 5 * CLOCK_TICKS  # four threads busy for 5 s
    sampler.sweep(now=5.0)
    assert sampler.rates(10, 1000, now=5.0).cpu_percent == 400.0


def test_a_reused_pid_never_inherits_rates() -> None:
    fake, sampler = _scripted(FakeProcess(pid=10, comm="old", start_ticks=1000))
    sampler.sweep(now=0.0)
    fake.add(FakeProcess(pid=10, comm="new", start_ticks=9000, utime=500))
    sampler.sweep(now=5.0)
    assert sampler.rates(10, 9000, now=5.0) is None  # seen once: no window yet
    assert sampler.rates(10, 1000, now=5.0) is None  # the old process is gone
    sampler.sweep(now=10.0)
    assert sampler.rates(10, 9000, now=10.0).cpu_percent == 0.0


def test_unreadable_io_leaves_only_the_io_rates_out() -> None:
    fake, sampler = _scripted(FakeProcess(pid=10, comm="other", errors={"io": errno.EACCES}))
    sampler.sweep(now=0.0)
    fake.table[10].utime = 100
    sampler.sweep(now=5.0)
    rates = sampler.rates(10, 1000, now=5.0)
    assert rates.cpu_percent == 20.0
    assert rates.read_bytes_per_second is None and rates.write_bytes_per_second is None


def test_stale_rates_are_not_shown() -> None:
    fake, sampler = _scripted(FakeProcess(pid=10, comm="web"))
    sampler.sweep(now=0.0)
    sampler.sweep(now=5.0)
    assert sampler.rates(10, 1000, now=19.0) is not None
    assert sampler.rates(10, 1000, now=21.0) is None  # over three windows old


def test_the_history_holds_live_processes_only_and_at_most_the_cap() -> None:
    fake, sampler = _scripted(*(FakeProcess(pid=p, comm=f"p{p}") for p in range(10, 20)),
                              cap=4)
    sampler.sweep(now=0.0)
    assert len(sampler) == 4 and sampler.skipped == 6  # the bound is hit, and counted
    fake.remove(10, 11, 12)
    sampler.sweep(now=5.0)
    assert len(sampler) == 4  # exited ones dropped, the cap still holds
    assert sampler.rates(10, 1000, now=5.0) is None
    assert sampler.rates(13, 1000, now=5.0) is not None
    fake.remove(*range(13, 20))
    sampler.sweep(now=10.0)
    assert len(sampler) == 0


def test_only_the_rate_files_are_read() -> None:
    fake, sampler = _scripted(FakeProcess(pid=10, comm="web"), FakeProcess(pid=11, comm="db"))
    sampler.sweep(now=0.0)
    assert {name for _, name in fake.reads} == {"stat", "io"}


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.5, 301, "5", True, None])
def test_a_bad_interval_is_refused_at_load(value: object) -> None:
    raw = {"rates": {"interval_seconds": value}} if value is not None else {
        "rates": {"interval": 5}}
    with pytest.raises(ConfigError) as caught:
        from_mapping(raw)
    assert "rates.interval" in str(caught.value)


def test_interval_from_the_file_and_the_flag() -> None:
    config = from_mapping({"rates": {"interval_seconds": 2, "max_processes": 100}})
    assert config.rates.interval_seconds == 2.0 and config.rates.max_processes == 100
    assert config.with_overrides(rate_interval=7.5).rates.interval_seconds == 7.5
    bad = subprocess.run([sys.executable, "-m", "exporter", "--rate-interval", "0"],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "--rate-interval" in bad.stderr
    assert "from 1 to 300" in bad.stderr


# -- accuracy on real children ----------------------------------------------------------------

# Burns CPU in 10 ms slices whenever it is behind DUTY of the wall time since it started, else
# sleeps 10 ms: a known duty cycle that catches up after the scheduler made it wait.
DUTY_CYCLE = """
import sys, time
duty = float(sys.argv[1]) / 100
start_wall, start_cpu = time.monotonic(), time.process_time()
while True:
    if time.process_time() - start_cpu < duty * (time.monotonic() - start_wall):
        until = time.process_time() + 0.010
        while time.process_time() < until:
            pass
    else:
        time.sleep(0.010)
"""
# The example is 50%; on this 2-core machine shared by ~8 sessions a process gets about
# a quarter of a core (autogroup scheduling: nice does not help across sessions), so the child
# could not run at 50% and the test would measure the load, not the sampler. 25% it can run.
DUTY_PERCENT = 25

# Appends 64 KiB to a new file every 1/64 s on an absolute schedule: 4 MiB/s of fresh pages.
WRITER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
chunk = os.urandom(65536)
start = time.monotonic()
for n in range(64 * 60):
    os.write(fd, chunk)
    delay = start + (n + 1) / 64 - time.monotonic()
    if delay > 0:
        time.sleep(delay)
"""
WRITE_RATE = 4 * 2**20


def _window(sampler: RateSampler, proc: psutil.Process, seconds: float
            ) -> tuple[float, float]:
    """(sampler's CPU% of `proc` over one window, psutil's over the same window)."""
    sampler.sweep()
    t0, cpu0 = time.monotonic(), sum(proc.cpu_times()[:2])
    time.sleep(seconds)
    sampler.sweep()
    t1, cpu1 = time.monotonic(), sum(proc.cpu_times()[:2])
    rates = sampler.rates(proc.pid, _start_ticks(proc.pid))
    assert rates is not None
    return rates.cpu_percent, 100 * (cpu1 - cpu0) / (t1 - t0)


def _start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rfind(b")") + 2:].split()[19])


def test_a_duty_cycle_child_reads_its_duty(children) -> None:
    child = children.spawn(str(DUTY_PERCENT), code=DUTY_CYCLE)
    proc = psutil.Process(child.pid)
    sampler = RateSampler(ProcfsReader(), interval=2.0, background=False)
    # On a loaded machine the child may not get its share in every window: the sampler must
    # agree with psutil in each window, and read the duty +- 10 once the child ran it.
    seen = []
    for _ in range(10):
        recent, truth = _window(sampler, proc, 2.0)
        assert recent == pytest.approx(truth, abs=3)
        seen.append(recent)
        if abs(truth - DUTY_PERCENT) <= 5:
            break
    assert abs(seen[-1] - DUTY_PERCENT) <= 10, seen


def test_a_writing_child_reads_its_bytes_per_second(children, tmp_path: Path) -> None:
    child = children.spawn(str(tmp_path / "out.bin"), code=WRITER)
    sampler = RateSampler(ProcfsReader(), interval=2.0, background=False)
    wait_until(lambda: (tmp_path / "out.bin").exists(), what="the writer to open its file")
    sampler.sweep()
    time.sleep(3.0)
    sampler.sweep()
    rates = sampler.rates(child.pid, _start_ticks(child.pid))
    assert rates is not None and rates.write_bytes_per_second is not None
    assert rates.write_bytes_per_second == pytest.approx(WRITE_RATE, rel=0.2)
    assert rates.window_seconds == pytest.approx(3.0, abs=1.0)


# -- through the app ------------------------------------------------------------------------------


def test_lookup_and_list_show_rates_and_sort_by_recent_cpu(children, marker) -> None:
    reader = ProcfsReader()
    sampler = RateSampler(reader, interval=1.0, background=False)
    client = falcon.testing.TestClient(create_app(Config(), reader=reader, sampler=sampler))
    idle = children.spawn(marker)
    busy = children.spawn(marker, code=SPINNER)
    sampler.sweep()
    young = children.spawn(marker, "young")  # started after the window began
    time.sleep(1.0)
    sampler.sweep()
    body = client.simulate_get(f"/process/{busy.pid}").json
    assert set(RATE_FIELDS) <= set(body)
    assert body["cpu_percent_recent"] > 20
    assert body["cpu_percent_recent"] > client.simulate_get(
        f"/process/{idle.pid}").json["cpu_percent_recent"]
    assert not set(RATE_FIELDS) & set(client.simulate_get(f"/process/{young.pid}").json)
    listed = client.simulate_get("/process", query_string="sort=cpu_recent&limit=100000").json
    ours = [p["pid"] for p in listed["processes"] if marker in (p.get("command") or "")]
    assert ours.index(busy.pid) < ours.index(idle.pid)
    recent = [p.get("cpu_percent_recent", 0.0) for p in listed["processes"]]
    assert recent == sorted(recent, reverse=True)


def test_min_cpu_recent_keeps_the_busy_child_and_never_a_process_without_a_rate(
        children, marker) -> None:
    reader = ProcfsReader()
    sampler = RateSampler(reader, interval=1.0, background=False)
    client = falcon.testing.TestClient(create_app(Config(), reader=reader, sampler=sampler))
    idle = children.spawn(marker)
    busy = children.spawn(marker, code=SPINNER)
    sampler.sweep()
    young = children.spawn(marker, code=SPINNER)  # busy, but no window measured yet
    time.sleep(1.0)
    sampler.sweep()
    listed = client.simulate_get("/process", query_string=f"cmdline={marker}&min_cpu_recent=10")
    pids = {p["pid"] for p in listed.json["processes"]}
    assert busy.pid in pids
    assert idle.pid not in pids and young.pid not in pids
    assert all(p["cpu_percent_recent"] >= 10 for p in listed.json["processes"])
    bad = client.simulate_get("/process", query_string="min_cpu_recent=-1")
    assert bad.status_code == 400 and "min_cpu_recent" in bad.json["details"]
