"""GET /process/{pid} and GET /process against real child processes, checked with psutil."""

from __future__ import annotations

import os
import pwd
import signal
import time
from datetime import UTC, datetime

import falcon.testing
import psutil
import pytest

from exporter.app import create_app
from exporter.config import Config
from exporter.procs import ProcessError, ProcessGone, ProcfsReader, PsutilReader, UserNames
from procfleet.testing import SPINNER, wait_until

READERS = {"procfs": ProcfsReader, "psutil": PsutilReader}


@pytest.fixture(params=sorted(READERS))
def client(request: pytest.FixtureRequest) -> falcon.testing.TestClient:
    """The app over each reader: the /proc fast path must agree with psutil's."""
    return falcon.testing.TestClient(create_app(Config(), reader=READERS[request.param]()))


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_fields_match_psutil_and_proc(client, children, marker):
    child = children.spawn(marker, "--password=hunter2", "postgres://bob:s3cret@db/x")
    got = client.simulate_get(f"/process/{child.pid}")
    assert got.status_code == 200
    body = got.json
    ref = psutil.Process(child.pid)
    with ref.oneshot():
        times, create = ref.cpu_times(), ref.create_time()
        expected_cpu = 100 * (times.user + times.system) / (time.time() - create)
        assert body["pid"] == child.pid
        assert body["name"] == ref.name()
        assert body["user"] == pwd.getpwuid(ref.uids().real).pw_name
        assert body["state"] == "sleep"
        assert body["cpu_percent"] == pytest.approx(expected_cpu, abs=5)
        assert body["mem_rss"] == pytest.approx(ref.memory_info().rss, rel=0.05)
        assert body["mem_percent"] == pytest.approx(ref.memory_percent(), abs=0.02)
        assert body["start_time"] == rfc3339(create)
    argv = ref.cmdline()
    assert body["command"] == " ".join(
        argv[:-2] + ["--password=***", "postgres://bob:***@db/x"])
    # The raw /proc view agrees on pid, comm and state letter.
    with open(f"/proc/{child.pid}/stat", "rb") as f:
        stat = f.read()
    assert stat.split()[0] == str(child.pid).encode()
    assert stat[stat.find(b"(") + 1: stat.rfind(b")")].decode() == body["name"][:15]
    assert set(body) == {"pid", "name", "user", "state", "cpu_percent", "mem_percent",
                         "mem_rss", "command", "start_time"}


def test_busy_child_lifetime_cpu_percent(client, children, marker):
    child = children.spawn(marker, code=SPINNER)
    ref = psutil.Process(child.pid)

    def lifetime_percent() -> float:
        t = ref.cpu_times()
        return 100 * (t.user + t.system) / (time.time() - ref.create_time())

    # A loaded machine gives the spinner CPU slowly: wait for it rather than sleep a guess.
    wait_until(lambda: sum(ref.cpu_times()[:2]) >= 0.3, timeout=30, what="the child to spin")
    before = lifetime_percent()
    body = client.simulate_get(f"/process/{child.pid}").json
    after = lifetime_percent()
    assert body["state"] == "running"
    assert before > 5
    # Lifetime percent drifts between the three reads; the API's value lies between them.
    assert min(before, after) - 2 <= body["cpu_percent"] <= max(before, after) + 2


def test_not_found_after_exit(client, children, marker):
    child = children.spawn(marker)
    assert client.simulate_get(f"/process/{child.pid}").status_code == 200
    child.kill()
    child.wait(timeout=10)
    got = client.simulate_get(f"/process/{child.pid}")
    assert got.status_code == 404
    assert got.json == {"error": "process not found",
                        "details": f"no process with pid {child.pid}", "code": 404}


@pytest.mark.parametrize("pid", ["0", "-1", "abc", "1.5", "+7", "0x10", "2147483648", "000",
                                 "00000000000000000000002147483648", "1" + "0" * 40,
                                 "99999999999999999999", "%201", "1%00", "\u0661"])
def test_bad_pid_is_400(client, pid):
    got = client.simulate_get(f"/process/{pid}")
    assert got.status_code == 400
    assert got.json["code"] == 400
    assert got.json["error"] == "invalid pid"
    assert got.json["details"]


@pytest.mark.parametrize("path", ["/process/1%2F2", "/process/1/2", "/process/%2F"])
def test_a_slash_in_the_pid_is_400_not_an_unknown_path(client, path):
    got = client.simulate_get(path)
    assert got.status_code == 400
    assert got.json["error"] == "invalid pid"


def test_leading_zeros_are_the_same_pid(client):
    got = client.simulate_get("/process/0001")
    assert got.status_code == 200
    assert got.json["pid"] == 1


def test_max_pid_is_valid_but_absent(client):
    got = client.simulate_get("/process/2147483647")
    assert got.status_code == 404


def test_user_without_name_is_uid(client, children, marker):
    uid = 54321
    assert not any(p.pw_uid == uid for p in pwd.getpwall())
    # The test's own Python may sit in a directory that uid cannot enter; sleep can run.
    child = children.spawn_argv(["sleep", "600"], user=uid)
    body = client.simulate_get(f"/process/{child.pid}").json
    assert body["user"] == str(uid)


def test_stopped_and_zombie_states(client, children, marker):
    stopped = children.spawn(marker, "stopped")
    os.kill(stopped.pid, signal.SIGSTOP)
    wait_until(lambda: psutil.Process(stopped.pid).status() == psutil.STATUS_STOPPED,
               what="child to stop")
    assert client.simulate_get(f"/process/{stopped.pid}").json["state"] == "stop"

    dead = children.spawn(marker, "zombie")
    dead.send_signal(signal.SIGKILL)  # not reaped: stays a zombie until the fixture waits
    wait_until(lambda: psutil.Process(dead.pid).status() == psutil.STATUS_ZOMBIE,
               what="child to become a zombie")
    body = client.simulate_get(f"/process/{dead.pid}").json
    assert body["state"] == "zombie"
    assert body["command"] == ""


def test_kernel_thread_has_empty_command(client):
    kthreadd = psutil.Process(2)
    assert kthreadd.name() == "kthreadd"
    body = client.simulate_get("/process/2").json
    assert body["name"] == "kthreadd"
    assert body["command"] == ""


def test_long_name_completed_from_argv(client, children, tmp_path, marker):
    long_name = "procfleet-long-process-name"
    link = tmp_path / long_name
    link.symlink_to(os.path.realpath(os.sys.executable))
    child = children.spawn(marker, executable=str(link))
    # The kernel keeps 15 bytes of comm; the API completes it from argv[0] as psutil does.
    body = client.simulate_get(f"/process/{child.pid}").json
    assert body["name"] == psutil.Process(child.pid).name()


def test_masking_can_be_turned_off(children, marker):
    from exporter.config import from_mapping

    app = create_app(from_mapping({"masking": {"enabled": False}}))
    child = children.spawn(marker, "--password=hunter2")
    body = falcon.testing.TestClient(app).simulate_get(f"/process/{child.pid}").json
    assert body["command"].endswith("--password=hunter2")


def test_list_filters_sort_and_limit(client, children, marker):
    kids = [children.spawn(marker, str(i)) for i in range(3)]
    busy = children.spawn(marker, "busy", code=SPINNER)
    time.sleep(0.3)
    name = psutil.Process(kids[0].pid).name()
    body = client.simulate_get("/process", params={"name": name}).json
    pids = {p["pid"] for p in body["processes"]}
    assert {k.pid for k in kids} | {busy.pid} <= pids
    assert all(p["name"] == name for p in body["processes"])
    assert body["hostname"]

    glob = client.simulate_get("/process", params={"name": name[:3] + "*"}).json
    assert {k.pid for k in kids} <= {p["pid"] for p in glob["processes"]}

    for key, field in (("cpu", "cpu_percent"), ("mem", "mem_percent"), ("rss", "mem_rss")):
        top = client.simulate_get("/process", params={"sort": key, "limit": "3"}).json
        values = [p[field] for p in top["processes"]]
        assert len(values) == 3
        assert values == sorted(values, reverse=True)

    newest = client.simulate_get("/process", params={"sort": "start", "limit": "2"}).json
    starts = [p["start_time"] for p in newest["processes"]]
    assert starts == sorted(starts, reverse=True)

    me = pwd.getpwuid(os.getuid()).pw_name
    mine = client.simulate_get("/process", params={"user": me}).json["processes"]
    assert mine and all(p["user"] == me for p in mine)
    nobody = client.simulate_get("/process", params={"user": "no-such-user-x"}).json
    assert nobody["processes"] == []


@pytest.mark.parametrize("params, needle", [
    ({"sort": "bogus"}, "sort"),
    ({"limit": "0"}, "limit"),
    ({"limit": "-3"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": "999999999"}, "limit"),
    ({"name": ""}, "name"),
])
def test_list_bad_parameters(client, params, needle):
    got = client.simulate_get("/process", params=params, params_csv=False)
    assert got.status_code == 400, got.text
    assert needle in got.json["details"]


def test_held_proc_files_stay_bounded_and_never_show_a_dead_process(children, marker):
    reader = ProcfsReader()
    kids = [children.spawn(marker, str(i)) for i in range(3)]
    open_before = len(os.listdir("/proc/self/fd"))
    for pid in reader.pids()[:100]:  # more pids than a thread holds files for
        try:
            reader.lookup(pid)
        except ProcessError:
            pass
    for kid in kids:
        assert reader.lookup(kid.pid).pid == kid.pid  # now held
    assert len(os.listdir("/proc/self/fd")) - open_before <= 3 * 16
    kids[0].kill()
    kids[0].wait(timeout=10)
    with pytest.raises(ProcessGone):
        reader.lookup(kids[0].pid)
    # A held file of a running process is re-read, not served from the past.
    os.kill(kids[1].pid, signal.SIGSTOP)
    wait_until(lambda: psutil.Process(kids[1].pid).status() == psutil.STATUS_STOPPED,
               what="child to stop")
    assert reader.lookup(kids[1].pid).state == "T"


THREADED = "import threading, time\nthreading.Thread(target=time.sleep, args=(600,)).start()\n" \
           "while True: time.sleep(1)"


def test_a_thread_id_is_not_a_process(client, children, marker):
    child = children.spawn(marker, code=THREADED)
    wait_until(lambda: psutil.Process(child.pid).num_threads() == 2, what="the second thread")
    tid = next(t.id for t in psutil.Process(child.pid).threads() if t.id != child.pid)
    assert os.path.exists(f"/proc/{tid}/stat")  # the kernel answers for threads too
    assert client.simulate_get(f"/process/{child.pid}").status_code == 200
    got = client.simulate_get(f"/process/{tid}")
    assert got.status_code == 404
    assert got.json["error"] == "process not found"


def test_the_user_name_cache_is_bounded_in_entries() -> None:
    names = UserNames(max_entries=8)
    me = os.getuid()
    assert names(me) == pwd.getpwuid(me).pw_name
    unknown = [4_000_000_000 + i for i in range(20)]  # no passwd entry: the uid as text
    for uid in unknown:
        assert names(uid) == str(uid)
        assert len(names) <= 8
    assert names(unknown[-1]) == str(unknown[-1]) and len(names) <= 8
