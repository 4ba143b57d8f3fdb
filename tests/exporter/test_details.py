"""`?expand=` and `?start_time=` on GET /process/{pid} (issue 10), against real children checked
with psutil, plus table-driven cgroup layouts and a scripted /proc for bounds and failures."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

import falcon.testing
import psutil
import pytest

from exporter.app import create_app
from exporter.config import Config, from_mapping
from exporter.details import (
    CHILDREN_MAX,
    _socket_fds,
    _sockets_by_diag,
    _sockets_by_pidfd,
    _sockets_by_proc,
    parse_cgroup,
    read_details,
)
from exporter.procs import ProcDir
from procfleet.params import EXPAND_NAMES
from procfleet.process import DETAIL_FIELDS, EXPAND_GROUPS, SEED_FIELDS
from procfleet.testing import wait_until

C64 = "4f1c8d2e" * 8  # a 64-hex container id
POD = "0b5e3c1a-7d2f-4e9b-8a6c-1f2e3d4c5b6a"
POD_ = POD.replace("-", "_")


@pytest.mark.parametrize("path, expected", [
    # systemd services and user sessions
    ("/system.slice/nginx.service", {"systemd_unit": "nginx.service"}),
    ("/init.scope", {"systemd_unit": "init.scope"}),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/"
     "app-org.gnome.Terminal.slice/vte-spawn-1d2c.scope", {"systemd_unit": "vte-spawn-1d2c.scope"}),
    ("/user.slice/user-1000.slice/session-3.scope", {"systemd_unit": "session-3.scope"}),
    # Docker: cgroupfs driver, systemd driver
    (f"/docker/{C64}", {"container_id": C64}),
    (f"/system.slice/docker-{C64}.scope",
     {"systemd_unit": f"docker-{C64}.scope", "container_id": C64}),
    # Kubernetes with containerd: systemd driver, cgroupfs driver, containerd's own join
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/"
     f"cri-containerd-{C64}.scope",
     {"systemd_unit": f"cri-containerd-{C64}.scope", "container_id": C64, "pod_uid": POD}),
    (f"/kubepods/besteffort/pod{POD}/{C64}", {"container_id": C64, "pod_uid": POD}),
    (f"/system.slice/containerd.service/kubepods-besteffort-pod{POD_}.slice:cri-containerd:{C64}",
     {"systemd_unit": "containerd.service", "container_id": C64, "pod_uid": POD}),
    # CRI-O (and its conmon), guaranteed QoS has no QoS slice
    (f"/kubepods.slice/kubepods-pod{POD_}.slice/crio-{C64}.scope",
     {"systemd_unit": f"crio-{C64}.scope", "container_id": C64, "pod_uid": POD}),
    (f"/kubepods.slice/kubepods-pod{POD_}.slice/crio-conmon-{C64}.scope",
     {"systemd_unit": f"crio-conmon-{C64}.scope", "container_id": C64, "pod_uid": POD}),
    # podman, rootful and rootless (the process sits in a `container` child cgroup)
    (f"/machine.slice/libpod-{C64}.scope", {"systemd_unit": f"libpod-{C64}.scope",
                                            "container_id": C64}),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{C64}.scope/container",
     {"systemd_unit": f"libpod-{C64}.scope", "container_id": C64}),
    # nothing to name
    ("/", {}),
    ("/kubepods.slice", {}),
    ("/system.slice/docker-short.scope", {"systemd_unit": "docker-short.scope"}),
])
def test_cgroup_layouts(path: str, expected: dict[str, str]) -> None:
    assert parse_cgroup(path) == {"cgroup": path, **expected}


# -- a real child ------------------------------------------------------------------------------

CHILD = """
import os, socket, subprocess, sys, time
os.nice(3)
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
client = socket.create_connection(server.getsockname())  # two established ends, both ours
accepted, _ = server.accept()
kid = subprocess.Popen(["sleep", "600"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{server.getsockname()[1]} {kid.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(1)
"""


@pytest.fixture
def rich_child(children, tmp_path: Path):
    """A child with a nice value, a listening socket, a child of its own and a secret in its
    environment; yields (process, port, grandchild pid)."""
    ready = tmp_path / "ready"
    env = dict(os.environ, PGPASSWORD="hunter2", PROCFLEET_PLAIN="visible")
    child = children.spawn(str(ready), code=CHILD, cwd=str(tmp_path), env=env)
    wait_until(ready.exists, what="the child to listen")
    port, grandchild = (int(x) for x in ready.read_text().split())
    yield psutil.Process(child.pid), port, grandchild
    try:
        os.kill(grandchild, 9)
    except ProcessLookupError:
        pass


def _client(**config: object) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(from_mapping(config) if config else Config()))


def test_expand_all_matches_psutil(rich_child, tmp_path: Path) -> None:
    proc, port, grandchild = rich_child
    body = _client().simulate_get(f"/process/{proc.pid}", query_string="expand=all").json
    with proc.oneshot():
        assert body["ppid"] == os.getpid() == proc.ppid()
        assert body["nice"] == 3 == proc.nice()
        assert body["num_threads"] == proc.num_threads()
        assert body["vms"] == pytest.approx(proc.memory_info().vms, rel=0.1)
        assert body["uids"] == {"real": proc.uids().real, "effective": proc.uids().effective}
        assert body["gids"] == {"real": proc.gids().real, "effective": proc.gids().effective}
        assert body["cpu_user_seconds"] == pytest.approx(proc.cpu_times().user, abs=0.05)
        assert body["num_fds"] == proc.num_fds()
        assert body["fd_soft_limit"] == proc.rlimit(psutil.RLIMIT_NOFILE)[0]
        assert body["fd_ratio"] == pytest.approx(body["num_fds"] / body["fd_soft_limit"],
                                                 abs=1e-4)
        io = proc.io_counters()
        assert (body["read_bytes"], body["write_bytes"]) == (io.read_bytes, io.write_bytes)
        assert body["exe"] == proc.exe() and body["exe_deleted"] is False
        assert body["cwd"] == str(tmp_path) == proc.cwd()
    assert body["listening"] == [{"proto": "tcp", "address": "127.0.0.1", "port": port}]
    assert body["children"] == [{"pid": grandchild, "name": "sleep", "ppid": proc.pid}]
    with open(f"/proc/{proc.pid}/cgroup") as f:
        assert body["cgroup"] in f.read()
    soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
    assert body["limits"]["open_files"] == {"soft": soft, "hard": hard}
    assert set(body["limits"]) == {"open_files", "processes", "address_space", "core"}
    assert "environ" not in body  # off unless the exporter's config enables it
    assert set(body) <= {*SEED_FIELDS, *DETAIL_FIELDS}
    for name, value in body.items():
        if name in DETAIL_FIELDS:
            assert isinstance(value, DETAIL_FIELDS[name]), name


def test_connections_are_counted_by_state(rich_child) -> None:
    proc, port, _ = rich_child
    body = _client().simulate_get(f"/process/{proc.pid}", query_string="expand=sockets").json
    by_state: dict[str, int] = {}
    for conn in proc.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN:
            by_state[conn.status.lower()] = by_state.get(conn.status.lower(), 0) + 1
    assert body["connections"] == by_state == {"established": 2}
    assert body["listening"] == [{"proto": "tcp", "address": "127.0.0.1", "port": port}]
    assert "ppid" not in body  # only the group asked for


def test_the_three_ways_of_reading_sockets_agree(rich_child) -> None:
    """pidfd_getfd (the fast path), sock_diag and /proc/PID/net tables (the fallbacks)."""
    proc, port, _ = rich_child
    files = ProcDir()
    fds = _socket_fds(files, proc.pid)
    inodes = set(fds.values())
    by_pidfd = sorted(_sockets_by_pidfd(proc.pid, fds))
    assert by_pidfd == sorted(_sockets_by_diag(inodes))
    assert by_pidfd == sorted(_sockets_by_proc(files, proc.pid, inodes))
    assert ("tcp", "127.0.0.1", port, 10) in by_pidfd and len(by_pidfd) == 3


def test_environ_is_masked_and_only_when_enabled(rich_child) -> None:
    proc, _, _ = rich_child
    body = _client(expand={"environ": True}).simulate_get(
        f"/process/{proc.pid}", query_string="expand=environ").json
    assert body["environ"]["PGPASSWORD"] == "***"
    assert body["environ"]["PROCFLEET_PLAIN"] == "visible"


def test_tree_reaches_grandchildren(children, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = CHILD.replace('["sleep", "600"]', '["sh", "-c", "sleep 600 & wait"]')
    child = children.spawn(str(ready), code=code)
    wait_until(ready.exists, what="the child to start its own")
    _, shell = (int(x) for x in ready.read_text().split())
    try:
        wait_until(lambda: len(psutil.Process(shell).children()) == 1, what="the shell's sleep")
        client = _client()
        one = client.simulate_get(f"/process/{child.pid}", query_string="expand=children").json
        assert [c["pid"] for c in one["children"]] == [shell]
        two = client.simulate_get(f"/process/{child.pid}",
                                  query_string="expand=children&tree=2").json
        sleep = psutil.Process(shell).children()[0].pid
        assert two["children"] == [{"pid": shell, "name": "sh", "ppid": child.pid},
                                   {"pid": sleep, "name": "sleep", "ppid": shell}]
    finally:
        psutil.Process(shell).kill()


def test_a_replaced_binary_is_flagged(children, tmp_path: Path) -> None:
    copy = tmp_path / "pyexe"
    shutil.copy(os.path.realpath(sys.executable), copy)
    child = children.spawn_argv([str(copy), "-c", "import time; time.sleep(600)"])
    copy.unlink()
    body = _client().simulate_get(f"/process/{child.pid}", query_string="expand=exe").json
    assert body["exe"] == str(copy) and body["exe_deleted"] is True


# -- parameters -------------------------------------------------------------------------------

@pytest.mark.parametrize("query, complaint", [
    ("expand=basic,bogus", "unknown expand group 'bogus'"),
    ("expand=", "expand must be a comma-separated list"),
    ("tree=4", "tree must be an integer from 1 to 3"),
    ("tree=0", "tree must be an integer from 1 to 3"),
    ("start_time=yesterday", "start_time must be an RFC 3339 timestamp"),
    ("start_time=2026-02-30T00:00:00Z", "start_time must be an RFC 3339 timestamp"),
])
def test_bad_lookup_parameters_are_400(query: str, complaint: str) -> None:
    result = _client().simulate_get(f"/process/{os.getpid()}", query_string=query)
    assert result.status_code == 400
    assert complaint in result.json["details"]


def test_start_time_pins_the_process(children, marker) -> None:
    child = children.spawn(marker)
    client = _client()
    started = client.simulate_get(f"/process/{child.pid}").json["start_time"]
    same = client.simulate_get(f"/process/{child.pid}", query_string=f"start_time={started}")
    assert same.status_code == 200 and same.json["pid"] == child.pid
    other = client.simulate_get(f"/process/{child.pid}",
                                query_string="start_time=2001-09-09T01:46:40Z")
    assert other.status_code == 404
    assert other.json == {"error": "process not found", "code": 404,
                          "details": f"pid {child.pid} now belongs to a process started at "
                                     f"{started}"}


# -- a scripted /proc: bounds and unreadable groups -------------------------------------------

class ScriptedFiles:
    """/proc files for `read_details`: a process tree, some files failing with an errno."""

    def __init__(self, tree: dict[int, list[int]], errors: dict[str, int] | None = None) -> None:
        self.tree = tree
        self.errors = errors or {}

    def _check(self, name: str) -> None:
        code = self.errors.get(name.split("/")[0])
        if code is not None:
            raise OSError(code, os.strerror(code), name)

    def read(self, pid: int, name: str) -> bytes:
        self._check(name)
        if name.startswith("task/"):
            return " ".join(str(k) for k in self.tree.get(pid, [])).encode()
        if name == "comm":
            return f"p{pid}\n".encode()
        if name == "io":
            return b"rchar: 1\nwchar: 2\nread_bytes: 4096\nwrite_bytes: 8192\n"
        if name == "limits":
            return (b"Limit                     Soft Limit           Hard Limit           Units\n"
                    b"Max open files            1024                 4096                 files\n")
        raise FileNotFoundError(errno.ENOENT, "no such file", name)

    def read_table(self, pid: int, name: str) -> bytes:
        return self.read(pid, name)

    def readlink(self, pid: int, name: str) -> str:
        self._check(name)
        raise FileNotFoundError(errno.ENOENT, "no such file", name)

    def listdir(self, pid: int, name: str) -> list[str]:
        self._check(name)
        return [str(pid)] if name == "task" else []

    def count_fds(self, pid: int) -> int:
        self._check("fd")
        return 10


def test_children_stop_at_the_cap() -> None:
    tree = {1: list(range(100, 400))}  # 300 children
    found = read_details(ScriptedFiles(tree), 1, ["children"], mask=str, clock_ticks=100)
    assert len(found["children"]) == CHILDREN_MAX and found["children_truncated"] is True
    small = read_details(ScriptedFiles({1: [2, 3], 2: [4]}), 1, ["children"], mask=str,
                         clock_ticks=100, generations=3)
    assert [c["pid"] for c in small["children"]] == [2, 3, 4]
    assert "children_truncated" not in small


def test_an_unreadable_group_is_left_out_and_the_others_answer() -> None:
    files = ScriptedFiles({}, errors={"io": errno.EACCES, "fd": errno.EACCES})
    found = read_details(files, 1, EXPAND_NAMES, mask=str, clock_ticks=100,
                         environ_allowed=True)
    assert "read_bytes" not in found and "num_fds" not in found  # denied
    assert "ppid" not in found and "exe" not in found  # files missing
    assert found["limits"]["open_files"] == {"soft": 1024, "hard": 4096}
    assert found["children"] == []


def test_a_process_whose_files_are_all_denied_has_no_groups() -> None:
    denied = ScriptedFiles({}, errors={n: errno.EACCES for n in
                                       ("stat", "status", "io", "limits", "cgroup", "fd",
                                        "exe", "cwd", "task", "environ")})
    assert read_details(denied, 1, EXPAND_NAMES, mask=str, clock_ticks=100,
                        environ_allowed=True) == {}


def test_expand_of_a_kernel_thread_answers(children) -> None:
    # kthreadd (pid 2) has no executable, environment or sockets: those groups are left out.
    result = _client(expand={"environ": True}).simulate_get("/process/2",
                                                             query_string="expand=all")
    assert result.status_code == 200
    assert result.json["ppid"] == 0 and "exe" not in result.json


def test_every_group_is_documented_in_the_process_module() -> None:
    assert tuple(EXPAND_GROUPS) == EXPAND_NAMES
    assert sorted(f for fields in EXPAND_GROUPS.values() for f in fields) == sorted(DETAIL_FIELDS)
