"""The whole picture of one process: the groups `?expand=` adds to a PID lookup.

Each group (procfleet.process.EXPAND_GROUPS names its fields) is read from /proc through a
`DetailFiles` (the kernel's `exporter.procs.ProcDir`) and is left out when it cannot be read:
a group never fails the lookup. Every string that comes from the process (paths, cgroup,
environment) goes through the same masking as the command line. A sample of `expand=all`:

    {"ppid": 1, "num_threads": 4, "nice": 0, "vms": 23068672, "swap": 0,
     "cpu_user_seconds": 1.2, "cpu_system_seconds": 0.3,
     "uids": {"real": 33, "effective": 33}, "gids": {"real": 33, "effective": 33},
     "num_fds": 12, "fd_soft_limit": 1024, "fd_ratio": 0.0117,
     "read_bytes": 4096, "write_bytes": 0,
     "exe": "/usr/sbin/nginx", "exe_deleted": false, "cwd": "/",
     "cgroup": "/system.slice/nginx.service", "systemd_unit": "nginx.service",
     "listening": [{"proto": "tcp", "address": "0.0.0.0", "port": 80}],
     "connections": {"established": 3},
     "children": [{"pid": 1235, "name": "nginx", "ppid": 1234}],
     "limits": {"open_files": {"soft": 1024, "hard": 524288}, "processes": {...}, ...}}
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

CHILDREN_MAX = 256  # entries of `children`, all generations together
SOCKET_FDS_MAX = 16_384  # fds looked at for sockets: past this, a busy server's tail is skipped
ENVIRON_MAX = 4096  # variables shown

Details = dict[str, Any]
Mask = Callable[[str], str]


class DetailFiles(Protocol):
    """What the groups read: /proc/PID's files, links and directories (OSError as /proc's)."""

    def read(self, pid: int, name: str) -> bytes: ...

    def read_table(self, pid: int, name: str) -> bytes: ...

    def readlink(self, pid: int, name: str) -> str: ...

    def listdir(self, pid: int, name: str) -> list[str]: ...

    def count_fds(self, pid: int) -> int: ...


def _stat_fields(stat: bytes) -> list[bytes]:
    return stat[stat.rfind(b")") + 2:].split()


def _status_ints(status: bytes, key: bytes) -> list[int] | None:
    at = status.find(b"\n" + key)
    if at < 0:
        return None
    end = status.find(b"\n", at + 1)
    words = status[at + len(key) + 1: end if end >= 0 else None].split()
    return [int(x) for x in words if x.isdigit()]  # `VmSwap: 0 kB`: the unit is not a value


# -- groups -----------------------------------------------------------------------------------

def basic(files: DetailFiles, pid: int, *, clock_ticks: int) -> Details:
    f = _stat_fields(files.read(pid, "stat"))
    status = files.read(pid, "status")
    found: Details = {
        "ppid": int(f[1]), "num_threads": int(f[17]), "nice": int(f[16]), "vms": int(f[20]),
        "cpu_user_seconds": round(int(f[11]) / clock_ticks, 2),
        "cpu_system_seconds": round(int(f[12]) / clock_ticks, 2),
    }
    swap = _status_ints(status, b"VmSwap:")
    if swap:
        found["swap"] = swap[0] * 1024
    for key, field in ((b"Uid:", "uids"), (b"Gid:", "gids")):
        ids = _status_ints(status, key)
        if ids and len(ids) >= 2:
            found[field] = {"real": ids[0], "effective": ids[1]}
    return found


_LIMITS = {b"Max open files": "open_files", b"Max processes": "processes",
           b"Max address space": "address_space", b"Max core file size": "core"}


def _limit_value(text: bytes) -> int | None:
    return None if text == b"unlimited" else int(text)


def read_limits(files: DetailFiles, pid: int) -> dict[str, dict[str, int | None]]:
    """The soft and hard limits that bite; None means unlimited."""
    found: dict[str, dict[str, int | None]] = {}
    for line in files.read(pid, "limits").splitlines()[1:]:
        for label, name in _LIMITS.items():
            if line.startswith(label):
                soft, hard = line[len(label):].split()[:2]
                found[name] = {"soft": _limit_value(soft), "hard": _limit_value(hard)}
    return found


def limits(files: DetailFiles, pid: int) -> Details:
    return {"limits": read_limits(files, pid)}


def fds(files: DetailFiles, pid: int) -> Details:
    count = files.count_fds(pid)
    found: Details = {"num_fds": count}
    soft = read_limits(files, pid).get("open_files", {}).get("soft")
    if soft:
        found["fd_soft_limit"] = soft
        found["fd_ratio"] = round(count / soft, 4)
    return found


def io(files: DetailFiles, pid: int) -> Details:
    text = files.read(pid, "io")
    found: Details = {}
    for key in ("read_bytes", "write_bytes"):
        value = _status_ints(text, key.encode() + b":")
        if value:
            found[key] = value[0]
    return found


_DELETED = " (deleted)"


def exe(files: DetailFiles, pid: int, mask: Mask) -> Details:
    found: Details = {}
    try:
        path = files.readlink(pid, "exe")
    except FileNotFoundError:
        path = None  # a kernel thread has no executable (its cwd may still be read)
    if path is not None:
        deleted = path.endswith(_DELETED)
        found["exe"] = mask(path[: -len(_DELETED)] if deleted else path)
        found["exe_deleted"] = deleted
    found["cwd"] = mask(files.readlink(pid, "cwd"))
    return found


# -- cgroup -----------------------------------------------------------------------------------

_CONTAINER_ID = re.compile(r"(?:^|[-:])([0-9a-f]{64})(?:\.scope)?$")
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_]"
                      r"[0-9a-f]{12})(?:\.slice)?$")
_UNIT_SUFFIXES = (".service", ".scope")


def cgroup_path(text: str) -> str | None:
    """The process's cgroup from /proc/PID/cgroup: v2's unified line, else v1's systemd one."""
    fallback = None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path
        if controllers == "name=systemd" or (fallback is None and path):
            fallback = path
    return fallback


def parse_cgroup(path: str) -> Details:
    """What a cgroup path names: the systemd unit, the container and the Kubernetes pod.

    Table-driven tests (tests/exporter/test_details.py) hold the layouts this knows: Docker
    (cgroupfs and systemd drivers), containerd and CRI-O under Kubernetes, podman, systemd
    services and user scopes.
    """
    found: Details = {"cgroup": path}
    parts = [p for p in path.split("/") if p]
    for part in reversed(parts):
        if "systemd_unit" not in found and part.endswith(_UNIT_SUFFIXES):
            found["systemd_unit"] = part
        if "container_id" not in found:
            match = _CONTAINER_ID.search(part)
            if match:
                found["container_id"] = match.group(1)
        if "pod_uid" not in found:
            # cgroupfs names a pod `pod<uid>`; systemd `kubepods-<qos>-pod<uid_with_>.slice`,
            # and containerd may join it to the container: `...pod<uid>.slice:cri-containerd:`.
            for piece in part.split(":"):
                match = _POD_UID.search(piece)
                if match:
                    found["pod_uid"] = match.group(1).replace("_", "-")
                    break
    return found


def cgroup(files: DetailFiles, pid: int, mask: Mask) -> Details:
    path = cgroup_path(files.read(pid, "cgroup").decode("utf-8", "replace"))
    if path is None:
        return {}
    return {key: mask(value) for key, value in parse_cgroup(path).items()}


# -- sockets ----------------------------------------------------------------------------------

_TCP_STATES = {1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2",
               6: "time_wait", 7: "close", 8: "close_wait", 9: "last_ack", 10: "listen",
               11: "closing", 12: "new_syn_recv"}
_LISTEN, _UDP_UNCONNECTED = 10, 7


def _address(hex_address: str) -> tuple[str, int]:
    host, _, port = hex_address.partition(":")
    raw = bytes.fromhex(host)
    # The kernel prints each 32-bit word of the address in host (little-endian) order.
    packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(packed)), int(port, 16)


def _socket_fds(files: DetailFiles, pid: int) -> dict[int, int]:
    """The process's socket fds and their inodes."""
    found: dict[int, int] = {}
    for name in files.listdir(pid, "fd")[:SOCKET_FDS_MAX]:
        try:
            target = files.readlink(pid, f"fd/{name}")
        except OSError:  # closed since listed
            continue
        if target.startswith("socket:["):
            found[int(name)] = int(target[8:-1])
    return found


def _socket_inodes(files: DetailFiles, pid: int) -> set[int]:
    return set(_socket_fds(files, pid).values())


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


_SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux >= 5.6 runs
_TCP_INFO = 11


def _sockets_by_pidfd(pid: int, fds: Iterable[int]) -> list[tuple[str, str, int, int]]:
    """Ask each of the process's sockets itself, through a duplicate of its fd (pidfd_getfd):
    the cost follows the process's own sockets, not the host's. OSError where not allowed
    (another user's process without CAP_SYS_PTRACE) or not supported (Linux < 5.6)."""
    import ctypes
    import os
    import socket

    libc = _libc()
    pidfd = os.pidfd_open(pid)
    found: list[tuple[str, str, int, int]] = []
    try:
        for fd in fds:
            dup = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            if dup < 0:
                code = ctypes.get_errno()
                if code == 9:  # EBADF: closed since listed
                    continue
                raise OSError(code, os.strerror(code))
            # Closing the duplicate leaves the process's socket as it was; never shut down.
            with socket.socket(fileno=dup) as sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                six = "6" if sock.family == socket.AF_INET6 else ""
                address, port = sock.getsockname()[:2]
                if sock.type == socket.SOCK_STREAM:
                    state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0]
                    found.append(("tcp" + six, address, port, state))
                elif sock.type == socket.SOCK_DGRAM:
                    try:
                        sock.getpeername()
                        state = 1
                    except OSError:
                        state = _UDP_UNCONNECTED
                    found.append(("udp" + six, address, port, state))
    finally:
        os.close(pidfd)
    return found


def parse_net(table: bytes, inodes: set[int], proto: str
              ) -> Iterable[tuple[str, str, int, int]]:
    """(proto, address, port, state) of the sockets in /proc/net/{tcp,udp}[6] with `inodes`."""
    for line in table.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue  # a line cut at the read limit
        try:
            if int(f[9]) not in inodes:
                continue
            address, port = _address(f[1].decode())
            yield proto, address, port, int(f[3], 16)
        except ValueError:
            continue


# Netlink sock_diag (linux/inet_diag.h): the kernel filters by state, so TIME_WAIT and
# request sockets, which belong to no process (inode 0) and can be tens of thousands on a busy
# host, are never formatted as text the way /proc/net/tcp formats them.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_DONE, _NLMSG_ERROR = 3, 2
_OWNED_STATES = ~((1 << 6) | (1 << 12)) & 0xFFF  # all but TIME_WAIT and NEW_SYN_RECV
_DIAG_TIMEOUT = 1.0
_DIAG_BYTES_MAX = 64 << 20


def _diag_dump(family: int, protocol: int, states: int) -> Iterable[tuple[int, str, int, int]]:
    """(inode, address, port, state) of this network namespace's sockets, via sock_diag."""
    import socket
    import struct

    request = struct.pack("=BBBxI", family, protocol, 0, states) + bytes(48)
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY,
                         _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(_DIAG_TIMEOUT)
        nl.send(header + request)
        received = 0
        while received < _DIAG_BYTES_MAX:
            data = nl.recv(1 << 16)
            received += len(data)
            at = 0
            while at + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, at)
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR or length < 16:
                    raise OSError("sock_diag answered an error")
                body = at + 16
                fam, state = data[body], data[body + 1]
                sport = struct.unpack_from("!H", data, body + 4)[0]
                size = 4 if fam == socket.AF_INET else 16
                src = data[body + 8: body + 8 + size]
                inode = struct.unpack_from("=I", data, body + 68)[0]
                yield inode, str(ipaddress.ip_address(src)), sport, state
                at += (length + 3) & ~3
    raise OSError("sock_diag answer too large")


def _same_netns(files: DetailFiles, pid: int) -> bool:
    try:
        return files.readlink(pid, "ns/net") == _own_netns()
    except OSError:
        return False


def _own_netns() -> str:
    import os

    return os.readlink("/proc/self/ns/net")


def _sockets_by_diag(inodes: set[int]) -> Iterable[tuple[str, str, int, int]]:
    import socket

    for proto, family, protocol in (("tcp", socket.AF_INET, socket.IPPROTO_TCP),
                                    ("tcp6", socket.AF_INET6, socket.IPPROTO_TCP),
                                    ("udp", socket.AF_INET, socket.IPPROTO_UDP),
                                    ("udp6", socket.AF_INET6, socket.IPPROTO_UDP)):
        for inode, address, port, state in _diag_dump(family, protocol, _OWNED_STATES):
            if inode in inodes:
                yield proto, address, port, state


def _sockets_by_proc(files: DetailFiles, pid: int, inodes: set[int]
                     ) -> Iterable[tuple[str, str, int, int]]:
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            table = files.read_table(pid, f"net/{proto}")
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
        yield from parse_net(table, inodes, proto)


def sockets(files: DetailFiles, pid: int) -> Details:
    fds = _socket_fds(files, pid)
    inodes = set(fds.values())
    listening: list[dict[str, Any]] = []
    connections: dict[str, int] = {}
    if inodes:
        found: Iterable[tuple[str, str, int, int]]
        try:
            found = _sockets_by_pidfd(pid, fds)
        except (OSError, AttributeError):  # AttributeError: no os.pidfd_open here
            # sock_diag sees the exporter's network namespace; a process in another (a
            # container) is read from its own /proc/PID/net tables.
            found = (_sockets_by_diag(inodes) if _same_netns(files, pid)
                     else _sockets_by_proc(files, pid, inodes))
        for kind, address, port, state in found:
            base = kind.rstrip("6")
            if (base == "tcp" and state == _LISTEN) or (
                    base == "udp" and state == _UDP_UNCONNECTED):
                listening.append({"proto": kind, "address": address, "port": port})
            elif base == "tcp":
                word = _TCP_STATES.get(state, str(state))
                connections[word] = connections.get(word, 0) + 1
            else:
                connections["udp"] = connections.get("udp", 0) + 1
    listening.sort(key=lambda s: (s["port"], s["proto"], s["address"]))
    return {"listening": listening, "connections": connections}


# -- children ---------------------------------------------------------------------------------

def _direct_children(files: DetailFiles, pid: int) -> list[int]:
    found: list[int] = []
    # The kernel lists each thread's children apart (CONFIG_PROC_CHILDREN): no /proc scan.
    for tid in files.listdir(pid, "task"):
        try:
            found += [int(c) for c in files.read(pid, f"task/{tid}/children").split()]
        except OSError:
            continue  # the thread exited since listed
    return sorted(set(found))


def _comm(files: DetailFiles, pid: int) -> str | None:
    try:
        return files.read(pid, "comm").rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return None


def children(files: DetailFiles, pid: int, *, generations: int = 1) -> Details:
    found: list[dict[str, Any]] = []
    truncated = False
    level = [pid]
    for _ in range(generations):
        below: list[int] = []
        for parent in level:
            try:
                kids = _direct_children(files, parent)
            except OSError:
                if parent == pid:
                    raise  # the process's own children unreadable: the group is left out
                continue  # a descendant exited since listed
            for kid in kids:
                if len(found) >= CHILDREN_MAX:
                    truncated = True
                    break
                name = _comm(files, kid)
                if name is None:
                    continue
                found.append({"pid": kid, "name": name, "ppid": parent})
                below.append(kid)
        level = below
        if truncated or not level:
            break
    details: Details = {"children": found}
    if truncated:
        details["children_truncated"] = True
    return details


# -- environ ----------------------------------------------------------------------------------

def environ(files: DetailFiles, pid: int, mask: Mask) -> Details:
    found: dict[str, str] = {}
    for entry in files.read(pid, "environ").split(b"\0")[:ENVIRON_MAX]:
        if not entry:
            continue
        # Masked as a whole `NAME=value`: the name is what tells a secret (PGPASSWORD=...).
        text = mask(entry.decode("utf-8", "replace"))
        name, sep, value = text.partition("=")
        if sep:
            found[name] = value
    return {"environ": found}


# -- all together -----------------------------------------------------------------------------

def read_details(files: DetailFiles, pid: int, groups: Iterable[str], *, mask: Mask,
                 clock_ticks: int, generations: int = 1, environ_allowed: bool = False
                 ) -> Details:
    """The fields of `groups` for process `pid`, each group left out when it cannot be read.

    `environ` is read only where `environ_allowed` (the operator's consent in the config).
    """
    readers: dict[str, Callable[[], Details]] = {
        "basic": lambda: basic(files, pid, clock_ticks=clock_ticks),
        "fds": lambda: fds(files, pid),
        "io": lambda: io(files, pid),
        "exe": lambda: exe(files, pid, mask),
        "cgroup": lambda: cgroup(files, pid, mask),
        "sockets": lambda: sockets(files, pid),
        "children": lambda: children(files, pid, generations=generations),
        "limits": lambda: limits(files, pid),
        "environ": lambda: environ(files, pid, mask),
    }
    found: Details = {}
    for name in groups:
        if name == "environ" and not environ_allowed:
            continue
        try:
            found.update(readers[name]())
        except (OSError, ValueError, IndexError):
            # Denied, gone, or a format this kernel writes differently: this group is left
            # out, the others and the process object still answer.
            continue
    return found
