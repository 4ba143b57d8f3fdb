"""Reading processes: the only module that touches /proc or psutil.

Two readers share one interface. `ProcfsReader` reads Linux's /proc files directly (about
2.5x cheaper than psutil per process, which matters at scrape time); `PsutilReader` is the
portable fallback and the reference the tests compare against. Both return a `Sample`: the
raw facts of one process, from which the JSON lookup (`ProcessInfo`) and the group metrics
are both derived, so the two cannot drift.
"""

from __future__ import annotations

import os
import pwd
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Protocol

import psutil

from procfleet.web import rfc3339

# The state vocabulary of the API this service replaces (gopsutil's words).
STATE_WORDS = {
    "R": "running",
    "S": "sleep",
    "D": "blocked",
    "T": "stop",
    "t": "stop",
    "I": "idle",
    "Z": "zombie",
    "X": "dead",
    "x": "dead",
    "W": "wait",
    "L": "lock",
}

_PSUTIL_STATUS_CHAR = {
    psutil.STATUS_RUNNING: "R",
    psutil.STATUS_SLEEPING: "S",
    psutil.STATUS_DISK_SLEEP: "D",
    psutil.STATUS_STOPPED: "T",
    psutil.STATUS_TRACING_STOP: "t",
    psutil.STATUS_ZOMBIE: "Z",
    psutil.STATUS_DEAD: "X",
    psutil.STATUS_WAKING: "W",
    psutil.STATUS_IDLE: "I",
    psutil.STATUS_LOCKED: "L",
    psutil.STATUS_WAITING: "W",
    getattr(psutil, "STATUS_PARKED", "parked"): "P",
}

# The kernel truncates comm to 15 bytes; psutil completes such names from argv[0].
_COMM_LEN = 15


class ProcessGone(Exception):
    """The process does not exist (or exited while it was being read)."""


class ProcessDenied(ProcessGone):
    """The process exists but may not be read (hidepid, another user's on BSD/macOS).

    A subclass of ProcessGone because a lookup answers both the same way (not found);
    the collector counts them apart.
    """


@dataclass(slots=True)
class Sample:
    """What one read of one process found. None means "not read" or "not allowed"."""

    pid: int
    comm: str
    state: str  # one character, as in /proc/PID/stat
    ppid: int
    start_ticks: int  # identifies the process together with pid: pids are reused
    create_time: float  # seconds since the epoch
    utime: float  # CPU seconds
    stime: float
    num_threads: int
    minflt: int
    majflt: int
    vsize: int  # bytes
    rss: int  # bytes
    uid: int | None = None  # real uid
    voluntary_ctxt: int | None = None
    nonvoluntary_ctxt: int | None = None
    swap: int | None = None  # bytes
    read_bytes: int | None = None
    write_bytes: int | None = None
    num_fds: int | None = None
    max_fds: int | None = None
    cmdline: list[str] | None = None

    @property
    def name(self) -> str:
        """psutil's name(): comm, completed from argv[0] when the kernel truncated it."""
        if len(self.comm) >= _COMM_LEN and self.cmdline:
            extended = os.path.basename(self.cmdline[0])
            if extended.startswith(self.comm):
                return extended
        return self.comm


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One process as the API shows it (SPEC "Process fields"). None fields are omitted."""

    pid: int
    name: str | None = None
    user: str | None = None
    state: str | None = None
    cpu_percent: float | None = None
    mem_percent: float | None = None
    mem_rss: int | None = None
    command: str | None = None
    start_time: str | None = None

    def to_json(self) -> dict[str, object]:
        # Hand-rolled: dataclasses.asdict deep-copies and costs a fifth of a lookup.
        return {k: v for k in self.__slots__ if (v := getattr(self, k)) is not None}


class SystemFacts:
    """Host facts a process read needs: boot time, clock ticks, page size, total memory.

    Total memory is refreshed every minute (memory hotplug, balloon drivers); the rest cannot
    change while the host is up.
    """

    def __init__(self) -> None:
        self.clock_ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.boot_time = psutil.boot_time()
        self._total_memory = psutil.virtual_memory().total
        self._memory_read_at = time.monotonic()
        self._lock = threading.Lock()

    @property
    def total_memory(self) -> int:
        now = time.monotonic()
        if now - self._memory_read_at > 60:
            with self._lock:
                self._total_memory = psutil.virtual_memory().total
                self._memory_read_at = now
        return self._total_memory


class UserNames:
    """uid → user name, cached: a passwd lookup costs more than reading a process."""

    def __init__(self, ttl: float = 300.0) -> None:
        self._ttl = ttl
        self._cache: dict[int, tuple[str, float]] = {}

    def __call__(self, uid: int) -> str:
        now = time.monotonic()
        hit = self._cache.get(uid)
        if hit is not None and now - hit[1] < self._ttl:
            return hit[0]
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        self._cache[uid] = (name, now)
        return name


class Reader(Protocol):
    """How the rest of the exporter reads processes, whatever the platform."""

    system: SystemFacts

    def pids(self) -> list[int]: ...

    def sample(self, pid: int, *, cmdline: bool = True, detail: bool = False) -> Sample:
        """Read one process. `detail` adds I/O, fds, context switches and swap."""
        ...

    def lookup(self, pid: int) -> Sample:
        """Read one process for a PID lookup (stat, uid and command line), fresh."""
        ...

    def proportional_memory(self, pid: int) -> tuple[int | None, int | None]:
        """(PSS, swap PSS) in bytes where the platform tells them; costly, so opt-in."""
        ...

    def forget(self, alive: set[tuple[int, int]]) -> None:
        """Drop what is cached about processes not in `alive` (pid, start ticks)."""
        ...


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _split_cmdline(data: bytes) -> list[str]:
    # Same rules as psutil: NUL-separated, but setproctitle() users may write spaces.
    if not data:
        return []
    sep = b"\x00" if data.endswith(b"\x00") else b" "
    if data.endswith(sep):
        data = data[:-1]
    parts = data.split(sep)
    if sep == b"\x00" and len(parts) == 1 and b" " in data:
        parts = data.split(b" ")
    return [_decode(p) for p in parts]


_READ_CHUNK = 8192
_READ_LIMIT = 1 << 20
_HELD_PIDS = 16  # per request thread: three open files each


def _pread(fd: int) -> bytes:
    """The whole of a /proc file from offset 0: the kernel regenerates it on each read."""
    data = os.pread(fd, _READ_CHUNK, 0)
    if len(data) < _READ_CHUNK:
        return data
    chunks, size = [data], len(data)
    while size < _READ_LIMIT:
        more = os.pread(fd, 1 << 16, size)
        if not more:
            break
        chunks.append(more)
        size += len(more)
    return b"".join(chunks)


def _check_is_process(pid: int, status: bytes) -> None:
    """/proc/TID exists for every thread too; a thread id is not a process to look up."""
    tgid = _status_int(status, b"\nTgid:")
    if tgid is not None and tgid != pid:
        raise ProcessGone(pid)


def _close_all(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _stat_counts_fds(proc_root: str) -> bool:
    """Whether stat() of /proc/PID/fd gives the open fd count (Linux >= 6.2)."""
    try:
        return os.stat(f"{proc_root}/self/fd").st_size > 0  # stdio at least are open
    except OSError:
        return False


def _status_int(status: bytes, key: bytes) -> int | None:
    at = status.find(key)
    if at < 0:
        return None
    end = status.find(b"\n", at + 1)
    fields = status[at + len(key): end if end >= 0 else None].split()
    return int(fields[0]) if fields else None


class ProcfsReader:
    """Reads Linux /proc directly: stat, status, cmdline and, for metrics, io, fd, limits."""

    def __init__(self, proc_root: str = "/proc", system: SystemFacts | None = None) -> None:
        self.root = proc_root
        self.system = system or SystemFacts()
        # max open files rarely changes; cache it per process incarnation.
        self._max_fds: dict[tuple[int, int], int | None] = {}
        # Linux >= 6.2 reports the number of open fds as the size of /proc/PID/fd: one
        # stat() instead of listing the directory.
        self._fds_by_stat = _stat_counts_fds(proc_root)

        # Lookups keep the /proc files of recently asked pids open and re-read them with
        # pread: a third of the system calls, and each call is a GIL hand-off between
        # request threads. Per thread, so no fd is ever closed under another reader.
        self._held = threading.local()

    def pids(self) -> list[int]:
        return [int(d) for d in os.listdir(self.root) if d.isdigit()]

    def lookup(self, pid: int) -> Sample:
        """sample(pid) for repeated lookups: the pid's files stay open between calls.

        An open /proc/PID file belongs to one process incarnation: once that process is
        gone, reads fail with ESRCH even if the pid has been reused, so a held file never
        shows another process. Then the files are dropped and the pid is read afresh.
        """
        held: OrderedDict[int, tuple[int, ...]] | None = getattr(self._held, "fds", None)
        if held is None:
            held = self._held.fds = OrderedDict()
        fds = held.pop(pid, None)
        if fds is not None:
            try:
                sample = self._parse(pid, *(_pread(fd) for fd in fds))
            except BaseException:
                _close_all(fds)
                # Gone, or a thread id: fall through to a fresh read, which says which.
            else:
                held[pid] = fds
                return sample
        base = f"{self.root}/{pid}/"
        opened: list[int] = []
        try:
            for name in ("stat", "status", "cmdline"):
                opened.append(os.open(base + name, os.O_RDONLY))
            sample = self._parse(pid, *(_pread(fd) for fd in opened))
        except PermissionError:
            _close_all(opened)
            return self.sample(pid)  # some files unreadable: the path that tolerates it
        except (FileNotFoundError, ProcessLookupError):
            _close_all(opened)
            raise ProcessGone(pid) from None
        except BaseException:
            _close_all(opened)
            raise
        held[pid] = tuple(opened)
        while len(held) > _HELD_PIDS:
            _close_all(held.popitem(last=False)[1])
        return sample

    def _read(self, path: str) -> bytes:
        # os.read into a small buffer: a 1 MiB buffer per read can cost an mmap/munmap pair,
        # more than reading the file. A short read is the end of these files.
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.read(fd, _READ_CHUNK)
            if len(data) < _READ_CHUNK:
                return data
            chunks, size = [data], len(data)
            while size < _READ_LIMIT:
                more = os.read(fd, min(_READ_LIMIT - size, 1 << 16))
                if not more:
                    break
                chunks.append(more)
                size += len(more)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def sample(self, pid: int, *, cmdline: bool = True, detail: bool = False) -> Sample:
        base = f"{self.root}/{pid}/"
        try:
            stat = self._read(base + "stat")
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessGone(pid) from None
        except PermissionError:
            raise ProcessDenied(pid) from None
        sample = self._from_stat(pid, stat)
        try:
            status = self._read(base + "status")
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessGone(pid) from None
        except PermissionError:
            status = b""
        _check_is_process(pid, status)
        sample.uid = _status_int(status, b"\nUid:")
        if cmdline:
            try:
                sample.cmdline = _split_cmdline(self._read(base + "cmdline"))
            except PermissionError:
                pass
            except (FileNotFoundError, ProcessLookupError):
                raise ProcessGone(pid) from None
        if detail:
            self._read_detail(sample, base, status)
        return sample

    def _parse(self, pid: int, stat: bytes, status: bytes, cmdline: bytes) -> Sample:
        _check_is_process(pid, status)
        sample = self._from_stat(pid, stat)
        sample.uid = _status_int(status, b"\nUid:")
        sample.cmdline = _split_cmdline(cmdline)
        return sample

    def _from_stat(self, pid: int, stat: bytes) -> Sample:
        rpar = stat.rfind(b")")
        comm = _decode(stat[stat.find(b"(") + 1: rpar])
        f = stat[rpar + 2:].split()
        ticks = self.system.clock_ticks
        start_ticks = int(f[19])
        return Sample(
            pid=pid,
            comm=comm,
            state=f[0].decode(),
            ppid=int(f[1]),
            start_ticks=start_ticks,
            create_time=self.system.boot_time + start_ticks / ticks,
            utime=int(f[11]) / ticks,
            stime=int(f[12]) / ticks,
            num_threads=int(f[17]),
            minflt=int(f[7]),
            majflt=int(f[9]),
            vsize=int(f[20]),
            rss=int(f[21]) * self.system.page_size,
        )

    def _read_detail(self, sample: Sample, base: str, status: bytes) -> None:
        sample.voluntary_ctxt = _status_int(status, b"\nvoluntary_ctxt_switches:")
        sample.nonvoluntary_ctxt = _status_int(status, b"\nnonvoluntary_ctxt_switches:")
        swap_kb = _status_int(status, b"\nVmSwap:")
        sample.swap = swap_kb * 1024 if swap_kb is not None else None
        try:
            io = self._read(base + "io")
            sample.read_bytes = _status_int(io, b"\nread_bytes:")
            sample.write_bytes = _status_int(io, b"\nwrite_bytes:")
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            pass
        try:
            if self._fds_by_stat:
                sample.num_fds = os.stat(base + "fd").st_size
            else:
                sample.num_fds = len(os.listdir(base + "fd"))
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            pass
        key = (sample.pid, sample.start_ticks)
        if key not in self._max_fds:
            self._max_fds[key] = self._read_max_fds(base)
        sample.max_fds = self._max_fds[key]

    def _read_max_fds(self, base: str) -> int | None:
        try:
            limits = self._read(base + "limits")
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            return None
        at = limits.find(b"Max open files")
        if at < 0:
            return None
        soft = limits[at + len(b"Max open files"):].split()[0]
        return int(soft) if soft.isdigit() else None

    def forget(self, alive: set[tuple[int, int]]) -> None:
        """Drop cached facts of processes that are no longer running."""
        for key in [k for k in self._max_fds if k not in alive]:
            del self._max_fds[key]

    def proportional_memory(self, pid: int) -> tuple[int | None, int | None]:
        """(PSS, swap PSS) in bytes from smaps_rollup; costly for big processes, so opt-in."""
        try:
            rollup = self._read(f"{self.root}/{pid}/smaps_rollup")
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessGone(pid) from None
        except OSError:
            return None, None
        pss, swap_pss = _status_int(rollup, b"\nPss:"), _status_int(rollup, b"\nSwapPss:")
        return (pss * 1024 if pss is not None else None,
                swap_pss * 1024 if swap_pss is not None else None)


class PsutilReader:
    """The portable reader: psutil everywhere psutil runs. Slower, same Sample."""

    def __init__(self, system: SystemFacts | None = None) -> None:
        self.system = system or SystemFacts()

    def pids(self) -> list[int]:
        return psutil.pids()

    def sample(self, pid: int, *, cmdline: bool = True, detail: bool = False) -> Sample:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                times = proc.cpu_times()
                mem = proc.memory_info()
                faults = getattr(proc, "page_faults", None)
                minflt, majflt = (faults()[:2] if faults else (0, 0))
                create = proc.create_time()
                sample = Sample(
                    pid=pid,
                    comm=proc.name(),
                    state=_PSUTIL_STATUS_CHAR.get(proc.status(), "?"),
                    ppid=proc.ppid(),
                    start_ticks=int(round((create - self.system.boot_time) * 100)),
                    create_time=create,
                    utime=times.user,
                    stime=times.system,
                    num_threads=proc.num_threads(),
                    minflt=minflt,
                    majflt=majflt,
                    vsize=mem.vms,
                    rss=mem.rss,
                )
                sample.uid = _maybe(lambda: proc.uids().real)
                if cmdline:
                    # A zombie has no argv left; /proc shows it empty, psutil raises.
                    sample.cmdline = [] if sample.state == "Z" else _maybe(proc.cmdline)
                if detail:
                    ctx = _maybe(proc.num_ctx_switches)
                    if ctx is not None:
                        sample.voluntary_ctxt, sample.nonvoluntary_ctxt = ctx
                    io = _maybe(proc.io_counters)
                    if io is not None:
                        sample.read_bytes, sample.write_bytes = io.read_bytes, io.write_bytes
                    sample.num_fds = _maybe(proc.num_fds)
                    sample.swap = _maybe(lambda: proc.memory_full_info().swap)
                    limit = getattr(proc, "rlimit", None)
                    if limit is not None:
                        sample.max_fds = _maybe(lambda: limit(psutil.RLIMIT_NOFILE)[0])
            return sample
        except psutil.NoSuchProcess:
            raise ProcessGone(pid) from None
        except psutil.AccessDenied:
            raise ProcessDenied(pid) from None

    def forget(self, alive: set[tuple[int, int]]) -> None:
        pass

    def lookup(self, pid: int) -> Sample:
        # psutil.Process() accepts a thread id; pid_exists() tells threads apart on Linux.
        if not psutil.pid_exists(pid):
            raise ProcessGone(pid)
        return self.sample(pid)

    def proportional_memory(self, pid: int) -> tuple[int | None, int | None]:
        """(PSS, None) where psutil knows PSS (Linux); psutil has no swap PSS."""
        try:
            full = _maybe(psutil.Process(pid).memory_full_info)
        except psutil.NoSuchProcess:
            raise ProcessGone(pid) from None
        return (getattr(full, "pss", None) if full is not None else None), None


def _maybe(read):  # type: ignore[no-untyped-def]
    """A field read that may be denied: None instead of an exception."""
    try:
        return read()
    except (psutil.AccessDenied, psutil.ZombieProcess, PermissionError, AttributeError):
        return None


def make_reader(kind: str = "auto") -> ProcfsReader | PsutilReader:
    """`procfs` on Linux when /proc is mounted, else psutil; `kind` forces one."""
    if kind == "psutil":
        return PsutilReader()
    if kind == "procfs" or (sys.platform.startswith("linux") and os.path.exists("/proc/self/stat")):
        return ProcfsReader()
    return PsutilReader()


def to_info(sample: Sample, *, system: SystemFacts, user_name: UserNames,
            mask: object = None, now: float | None = None) -> ProcessInfo:
    """Turn a Sample into the API's process object (SPEC "Process fields")."""
    now = time.time() if now is None else now
    age = max(now - sample.create_time, 1e-9)
    command = None
    if sample.cmdline is not None:
        args = mask(sample.cmdline) if callable(mask) else sample.cmdline
        command = " ".join(args)
    return ProcessInfo(
        pid=sample.pid,
        # A name completed from argv[0] is the process's own text: take it from masked argv.
        name=sample.name if sample.name == sample.comm or command is None else replace(
            sample, cmdline=list(args)).name,
        user=user_name(sample.uid) if sample.uid is not None else None,
        state=STATE_WORDS.get(sample.state, sample.state),
        cpu_percent=round(100.0 * (sample.utime + sample.stime) / age, 2),
        mem_percent=round(100.0 * sample.rss / system.total_memory, 2),
        mem_rss=sample.rss,
        command=command,
        start_time=rfc3339(sample.create_time),
    )
