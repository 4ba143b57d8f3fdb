"""Reading processes: the only module that touches /proc or psutil.

Two readers share one interface. `ProcfsReader` reads Linux's /proc files directly (about
2.5x cheaper than psutil per process, which matters at scrape time); `PsutilReader` is the
portable fallback and the reference the tests compare against. Both return a `Sample`: the
raw facts of one process, from which the JSON lookup (`exporter.info.to_info`) and the group
metrics are both derived, so the two cannot drift.
"""

from __future__ import annotations

import errno
import functools
import os
import pwd
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import psutil

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

_LINUX = sys.platform.startswith("linux")

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
# /proc/PID/stat's flags (field 9): the task is a kernel thread (include/linux/sched.h).
PF_KTHREAD = 0x00200000
# A kernel symbol, as /proc/PID/wchan shows it, is at most KSYM_NAME_LEN (512) bytes.
_WCHAN_MAX = 512


class ProcessError(Exception):
    """A process could not be read: the common base of ProcessGone and ProcessDenied."""

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.pid = pid


class ProcessGone(ProcessError):
    """The process does not exist (or exited while it was being read)."""


class ProcessDenied(ProcessError):
    """The process exists but may not be read (hidepid, another user's on BSD/macOS).

    A sibling of ProcessGone, not a kind of it: the collector counts the two apart, and
    whoever answers both alike (a lookup says "not found") says so where it catches them.
    """


_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH})
_DENIED_ERRNOS = frozenset({errno.EPERM, errno.EACCES})

_R = TypeVar("_R")
_S = TypeVar("_S")
_P = ParamSpec("_P")


def wrap_exceptions(
    read: Callable[Concatenate[_S, int, _P], _R],
) -> Callable[Concatenate[_S, int, _P], _R]:
    """The one place where errors of reading a process become ProcessGone or ProcessDenied.

    For reader methods whose first argument is the pid, as psutil's `wrap_exceptions` in
    psutil/_pslinux.py: ENOENT and ESRCH mean gone, EPERM and EACCES denied. Only OSError
    (and psutil's own two, for PsutilReader) is caught; any other errno passes unchanged,
    so a surprise is counted as such instead of hiding as a vanished process.
    """

    @functools.wraps(read)
    def wrapper(self: _S, pid: int, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return read(self, pid, *args, **kwargs)
        except (OSError, psutil.Error) as exc:
            error = translate(exc, pid)
            if error is exc:
                raise
            raise error from exc

    return wrapper


def translate(exc: Exception, pid: int) -> Exception:
    """What `exc`, met while reading process `pid`, means: gone, denied, or itself."""
    if isinstance(exc, OSError):
        if exc.errno in _GONE_ERRNOS:
            return ProcessGone(pid)
        if exc.errno in _DENIED_ERRNOS:
            return ProcessDenied(pid)
    elif isinstance(exc, psutil.NoSuchProcess):  # ZombieProcess included, as before
        return ProcessGone(pid)
    elif isinstance(exc, psutil.AccessDenied):
        return ProcessDenied(pid)
    return exc


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
    kernel_thread: bool = False  # PF_KTHREAD: no user space, no argv (kworker/0:1, ...)

    @property
    def name(self) -> str:
        """psutil's name(): comm, completed from argv[0] when the kernel truncated it."""
        if len(self.comm) >= _COMM_LEN and self.cmdline:
            extended = os.path.basename(self.cmdline[0])
            if extended.startswith(self.comm):
                return extended
        return self.comm


@dataclass(slots=True)
class Counters:
    """The cumulative counters a rate is made of: what the rate sampler reads, and no more."""

    start_ticks: int  # with the pid, which process these belong to
    cpu_seconds: float  # user + system
    read_bytes: int | None  # /proc/PID/io's storage-layer counters; None: not readable
    write_bytes: int | None


class SystemFacts:
    """Host facts a process read needs: boot time, clock ticks, page size, total memory.

    Total memory is refreshed every minute (memory hotplug, balloon drivers); the rest cannot
    change while the host is up.
    """

    def __init__(self, *, clock_ticks: int | None = None, page_size: int | None = None,
                 boot_time: float | None = None) -> None:
        # The keywords pin what a scripted /proc (tests' FakeProc) was written against.
        if clock_ticks is None:
            clock_ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        if page_size is None:
            page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.clock_ticks = clock_ticks
        self.page_size = page_size
        self.boot_time = psutil.boot_time() if boot_time is None else boot_time
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
    """uid → user name, cached: a passwd lookup costs more than reading a process.

    At most `max_entries` uids (a host running containers with mapped uid ranges can show
    tens of thousands); past it the cache starts again empty.
    """

    def __init__(self, ttl: float = 300.0, max_entries: int = 4096) -> None:
        self._ttl = ttl
        self.max_entries = max_entries
        self._cache: dict[int, tuple[str, float]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def __call__(self, uid: int) -> str:
        now = time.monotonic()
        hit = self._cache.get(uid)
        if hit is not None and now - hit[1] < self._ttl:
            return hit[0]
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        if len(self._cache) >= self.max_entries and uid not in self._cache:
            self._cache.clear()
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

    def wchans(self, pid: int, num_threads: int) -> list[str]:
        """The kernel function each thread of `pid` sleeps in ("" while running)."""
        ...

    def counters(self, pid: int) -> Counters:
        """CPU time and storage I/O so far: the cheapest read the live rates need."""
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


class ProcFiles(Protocol):
    """Where ProcfsReader gets /proc's files: the kernel's (ProcDir) or a test's script.

    Methods fail as /proc does, with OSError and its errno (ENOENT, ESRCH, EACCES, ...);
    ProcfsReader translates them.
    """

    def pids(self) -> list[int]: ...

    def read(self, pid: int, name: str) -> bytes:
        """The content of /proc/PID/NAME."""
        ...

    def count_fds(self, pid: int) -> int:
        """The number of entries in /proc/PID/fd."""
        ...

    def exists(self, pid: int) -> bool:
        """Whether /proc/PID is there."""
        ...

    def tasks(self, pid: int) -> list[int]:
        """The thread ids in /proc/PID/task; their files read as NAME `task/TID/...`."""
        ...


class ProcDir:
    """The kernel's /proc (or a procfs mounted elsewhere)."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root
        # Linux >= 6.2 reports the number of open fds as the size of /proc/PID/fd: one
        # stat() instead of listing the directory.
        self._fds_by_stat = _stat_counts_fds(root)

    def pids(self) -> list[int]:
        return [int(d) for d in os.listdir(self.root) if d.isdigit()]

    def read(self, pid: int, name: str) -> bytes:
        # os.read into a small buffer: a 1 MiB buffer per read can cost an mmap/munmap pair,
        # more than reading the file. A short read is the end of these files.
        fd = os.open(f"{self.root}/{pid}/{name}", os.O_RDONLY)
        try:
            data = os.read(fd, _READ_CHUNK)
            if len(data) < _READ_CHUNK:
                return data
            return _read_rest(fd, [data], _READ_LIMIT)
        finally:
            os.close(fd)

    def count_fds(self, pid: int) -> int:
        path = f"{self.root}/{pid}/fd"
        return os.stat(path).st_size if self._fds_by_stat else len(os.listdir(path))

    def exists(self, pid: int) -> bool:
        return os.path.exists(f"{self.root}/{pid}")

    def tasks(self, pid: int) -> list[int]:
        return [int(t) for t in os.listdir(f"{self.root}/{pid}/task")]

    def read_table(self, pid: int, name: str, limit: int = 8 << 20) -> bytes:
        """/proc/PID/NAME read to its end (at most `limit` bytes): seq_file tables such as
        net/tcp give a page or so per read, so a short read is not their end."""
        fd = os.open(f"{self.root}/{pid}/{name}", os.O_RDONLY)
        try:
            return _read_rest(fd, [], limit)
        finally:
            os.close(fd)

    def readlink(self, pid: int, name: str) -> str:
        """The target of the link /proc/PID/NAME (exe, cwd, fd/N)."""
        return os.readlink(f"{self.root}/{pid}/{name}")

    def listdir(self, pid: int, name: str) -> list[str]:
        """The entries of the directory /proc/PID/NAME (fd, task)."""
        return os.listdir(f"{self.root}/{pid}/{name}")


_HELD_FILES = ("stat", "status", "cmdline")


class ProcfsReader:
    """Reads Linux /proc directly: stat, status, cmdline and, for metrics, io, fd, limits.

    `files` replaces the kernel's /proc with another source of its files (tests script
    rare cases with it); OS errors of either are translated by `wrap_exceptions` alone.
    """

    def __init__(self, proc_root: str = "/proc", system: SystemFacts | None = None, *,
                 files: ProcFiles | None = None) -> None:
        self.root = proc_root
        self.system = system or SystemFacts()
        self.files: ProcFiles = files if files is not None else ProcDir(proc_root)
        self._read = self.files.read
        # max open files rarely changes; cache it per process incarnation.
        self._max_fds: dict[tuple[int, int], int | None] = {}

        # Lookups keep the /proc files of recently asked pids open and re-read them with
        # pread: a third of the system calls, and each call is a GIL hand-off between
        # request threads. Per thread, so no fd is ever closed under another reader. Only
        # on the kernel's /proc, where an open file is bound to one process incarnation.
        self._hold = files is None
        self._held = threading.local()

    def pids(self) -> list[int]:
        return self.files.pids()

    def _file(self, pid: int, name: str) -> bytes:
        """/proc/PID/NAME, errors translated. wrap_exceptions unrolled: the hot path, one
        call per file per process per scrape, where the decorator's frame cost 5%."""
        try:
            return self._read(pid, name)
        except OSError as exc:
            error = translate(exc, pid)
            if error is exc:
                raise
            raise error from exc

    @wrap_exceptions
    def _fd_count(self, pid: int) -> int:
        return self.files.count_fds(pid)

    @wrap_exceptions
    def _reread(self, pid: int, fds: tuple[int, ...]) -> Sample:
        return self._parse(pid, *(_pread(fd) for fd in fds))

    @wrap_exceptions
    def _open_and_read(self, pid: int, opened: list[int]) -> Sample:
        base = f"{self.root}/{pid}/"
        for name in _HELD_FILES:
            opened.append(os.open(base + name, os.O_RDONLY))
        return self._parse(pid, *(_pread(fd) for fd in opened))

    def lookup(self, pid: int) -> Sample:
        """sample(pid) for repeated lookups: the pid's files stay open between calls.

        An open /proc/PID file belongs to one process incarnation: once that process is
        gone, reads fail with ESRCH even if the pid has been reused, so a held file never
        shows another process. Then the files are dropped and the pid is read afresh.
        """
        if not self._hold:
            return self.sample(pid)
        held: OrderedDict[int, tuple[int, ...]] | None = getattr(self._held, "fds", None)
        if held is None:
            held = self._held.fds = OrderedDict()
        fds = held.pop(pid, None)
        if fds is not None:
            try:
                sample = self._reread(pid, fds)
            except ProcessGone:
                # That incarnation is gone, or pid is a thread's: the fresh read below says.
                _close_all(fds)
            except BaseException:
                _close_all(fds)  # popped from `held`: nobody else would close them
                raise
            else:
                held[pid] = fds
                return sample
        opened: list[int] = []
        try:
            sample = self._open_and_read(pid, opened)
        except ProcessDenied:
            _close_all(opened)
            return self.sample(pid)  # some files unreadable: the path that tolerates it
        except BaseException:
            _close_all(opened)
            raise
        held[pid] = tuple(opened)
        while len(held) > _HELD_PIDS:
            _close_all(held.popitem(last=False)[1])
        return sample

    def sample(self, pid: int, *, cmdline: bool = True, detail: bool = False) -> Sample:
        sample = self._from_stat(pid, self._file(pid, "stat"))
        try:
            status = self._file(pid, "status")
        except ProcessDenied:
            status = b""
        _check_is_process(pid, status)
        sample.uid = _status_int(status, b"\nUid:")
        if cmdline:
            try:
                sample.cmdline = _split_cmdline(self._file(pid, "cmdline"))
            except ProcessDenied:
                pass  # None: not allowed to know
        if detail:
            self._read_detail(sample, status)
        return sample

    def counters(self, pid: int) -> Counters:
        stat = self._file(pid, "stat")
        f = stat[stat.rfind(b")") + 2:].split()
        counters = Counters(start_ticks=int(f[19]),
                            cpu_seconds=(int(f[11]) + int(f[12])) / self.system.clock_ticks,
                            read_bytes=None, write_bytes=None)
        try:
            io = self._file(pid, "io")
        except ProcessError:
            return counters  # another user's process: CPU only
        counters.read_bytes = _status_int(io, b"\nread_bytes:")
        counters.write_bytes = _status_int(io, b"\nwrite_bytes:")
        return counters

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
            kernel_thread=bool(int(f[6]) & PF_KTHREAD),
        )

    def _read_detail(self, sample: Sample, status: bytes) -> None:
        # Optional fields: what cannot be read now (denied, or the process exited after its
        # stat) stays None, and the process still counts with what was read.
        pid = sample.pid
        sample.voluntary_ctxt = _status_int(status, b"\nvoluntary_ctxt_switches:")
        sample.nonvoluntary_ctxt = _status_int(status, b"\nnonvoluntary_ctxt_switches:")
        swap_kb = _status_int(status, b"\nVmSwap:")
        sample.swap = swap_kb * 1024 if swap_kb is not None else None
        try:
            io = self._file(pid, "io")
            sample.read_bytes = _status_int(io, b"\nread_bytes:")
            sample.write_bytes = _status_int(io, b"\nwrite_bytes:")
        except ProcessError:
            pass
        try:
            sample.num_fds = self._fd_count(pid)
        except ProcessError:
            pass
        key = (pid, sample.start_ticks)
        if key not in self._max_fds:
            self._max_fds[key] = self._read_max_fds(pid)
        sample.max_fds = self._max_fds[key]

    def _read_max_fds(self, pid: int) -> int | None:
        try:
            limits = self._file(pid, "limits")
        except ProcessError:
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

    def wchans(self, pid: int, num_threads: int) -> list[str]:
        """Each thread's /proc/PID/task/TID/wchan, "" for a running thread (the file says 0).

        A single-threaded process is read through /proc/PID/wchan alone, without listing
        its task directory. A thread that exits meanwhile is left out; denied (the kernel
        shows 0 to whoever may not ptrace the task) reads as "".
        """
        if num_threads <= 1:
            names = ["wchan"]
        else:
            try:
                names = [f"task/{tid}/wchan" for tid in self.files.tasks(pid)]
            except OSError as exc:
                raise translate(exc, pid) from exc
        found = []
        for name in names:
            try:
                text = self._read(pid, name)
            except OSError as exc:
                if exc.errno in _DENIED_ERRNOS:
                    found.append("")
                    continue
                if exc.errno in _GONE_ERRNOS and name != "wchan":
                    continue  # one thread exited: the others still count
                raise translate(exc, pid) from exc
            symbol = _decode(text[:_WCHAN_MAX]).strip()
            found.append("" if symbol == "0" else symbol)
        return found

    def proportional_memory(self, pid: int) -> tuple[int | None, int | None]:
        """(PSS, swap PSS) in bytes from smaps_rollup; costly for big processes, so opt-in.

        A process with no memory of its own (a kernel thread) answers ESRCH for its smaps
        while it runs: as psutil does, that is "no PSS", and only a /proc/PID that is gone
        too means the process is.
        """
        try:
            rollup = self._file(pid, "smaps_rollup")
        except ProcessDenied:
            return None, None
        except ProcessGone:
            if self.files.exists(pid):
                return None, None
            raise
        pss, swap_pss = _status_int(rollup, b"\nPss:"), _status_int(rollup, b"\nSwapPss:")
        return (pss * 1024 if pss is not None else None,
                swap_pss * 1024 if swap_pss is not None else None)


class PsutilReader:
    """The portable reader: psutil everywhere psutil runs. Slower, same Sample."""

    def __init__(self, system: SystemFacts | None = None) -> None:
        self.system = system or SystemFacts()

    def pids(self) -> list[int]:
        return psutil.pids()

    @wrap_exceptions
    def sample(self, pid: int, *, cmdline: bool = True, detail: bool = False) -> Sample:
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
                # psutil has no task flags; on Linux every kernel thread is kthreadd's child.
                kernel_thread=_LINUX and (pid == 2 or proc.ppid() == 2),
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

    def forget(self, alive: set[tuple[int, int]]) -> None:
        pass

    @wrap_exceptions
    def counters(self, pid: int) -> Counters:
        proc = psutil.Process(pid)
        with proc.oneshot():
            times = proc.cpu_times()
            start = int(round((proc.create_time() - self.system.boot_time) * 100))
            io = _maybe(proc.io_counters) if hasattr(proc, "io_counters") else None
        return Counters(start_ticks=start, cpu_seconds=times.user + times.system,
                        read_bytes=io.read_bytes if io is not None else None,
                        write_bytes=io.write_bytes if io is not None else None)

    def lookup(self, pid: int) -> Sample:
        # psutil.Process() accepts a thread id; pid_exists() tells threads apart on Linux.
        if not psutil.pid_exists(pid):
            raise ProcessGone(pid)
        return self.sample(pid)

    def wchans(self, pid: int, num_threads: int) -> list[str]:
        """psutil has no wchan: none known (the metric then has no series)."""
        return []

    @wrap_exceptions
    def proportional_memory(self, pid: int) -> tuple[int | None, int | None]:
        """(PSS, None) where psutil knows PSS (Linux); psutil has no swap PSS."""
        full = _maybe(psutil.Process(pid).memory_full_info)
        return (getattr(full, "pss", None) if full is not None else None), None


def _maybe(read: Callable[[], _R]) -> _R | None:
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


def _read_rest(fd: int, chunks: list[bytes], limit: int) -> bytes:
    """`chunks` and what `fd` still holds, to its end or `limit` bytes in all."""
    size = sum(len(c) for c in chunks)
    while size < limit:
        more = os.read(fd, min(limit - size, 1 << 16))
        if not more:
            break
        chunks.append(more)
        size += len(more)
    return b"".join(chunks)
