"""A scripted /proc: the files ProcfsReader reads, written from a table the test controls.

`FakeProc` stands in for the kernel behind `exporter.procs.ProcFiles`, so the real reader
(parsing, error translation) and the real collector run on a process table that makes rare
cases happen on demand: a pid reused between two scrapes, smaps_rollup answering ESRCH for a
live kernel thread, a denied process, a process that exits between reading two of its files.
Files fail as /proc's do, with an OSError carrying the errno.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from exporter.procs import PF_KTHREAD, ProcfsReader, SystemFacts

CLOCK_TICKS = 100
PAGE_SIZE = 4096
BOOT_TIME = 1_700_000_000.0


@dataclass
class FakeProcess:
    """One process as /proc would show it. Times are in clock ticks, as in /proc/PID/stat."""

    pid: int
    comm: str
    ppid: int = 1
    state: str = "S"
    start_ticks: int = 1000
    utime: int = 0
    stime: int = 0
    minflt: int = 0
    majflt: int = 0
    num_threads: int = 1
    vsize: int = 0
    rss_pages: int = 0
    uid: int = 1000
    cmdline: list[str] = field(default_factory=list)
    voluntary_ctxt: int = 0
    nonvoluntary_ctxt: int = 0
    swap_kb: int | None = 0  # None: no VmSwap line, as for a kernel thread
    read_bytes: int = 0
    write_bytes: int = 0
    fds: int = 3
    max_fds: int = 1024
    pss_kb: int = 0
    swap_pss_kb: int = 0
    kernel_thread: bool = False  # PF_KTHREAD in stat; no memory: smaps_rollup answers ESRCH
    # /proc/PID/task/TID/wchan of each thread, main thread first; "0" for one running.
    # Shorter than num_threads: the rest are running.
    wchans: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # file name -> errno of its read
    vanish_after: str | None = None  # the process exits right after this file is read

    def render(self, name: str) -> bytes:
        if name == "stat":
            fields = [0] * 52
            flags = PF_KTHREAD if self.kernel_thread else 0
            fields[:22] = [self.ppid, 0, 0, 0, -1, flags, self.minflt, 0, self.majflt, 0,
                           self.utime, self.stime, 0, 0, 20, 0, self.num_threads, 0,
                           self.start_ticks, self.vsize, self.rss_pages]
            rest = " ".join(str(f) for f in fields[:50])
            return f"{self.pid} ({self.comm}) {self.state} {rest}\n".encode()
        if name == "status":
            lines = [f"Name:\t{self.comm}", "Umask:\t0022", f"State:\t{self.state}",
                     f"Tgid:\t{self.pid}", f"Pid:\t{self.pid}", f"PPid:\t{self.ppid}",
                     f"Uid:\t{self.uid}\t{self.uid}\t{self.uid}\t{self.uid}",
                     f"Threads:\t{self.num_threads}"]
            if self.swap_kb is not None:
                lines.append(f"VmSwap:\t{self.swap_kb:8d} kB")
            lines += [f"voluntary_ctxt_switches:\t{self.voluntary_ctxt}",
                      f"nonvoluntary_ctxt_switches:\t{self.nonvoluntary_ctxt}"]
            return ("\n".join(lines) + "\n").encode()
        if name == "cmdline":
            return b"".join(arg.encode() + b"\0" for arg in self.cmdline)
        if name == "io":
            return (f"rchar: {self.read_bytes}\nwchar: {self.write_bytes}\nsyscr: 0\n"
                    f"syscw: 0\nread_bytes: {self.read_bytes}\n"
                    f"write_bytes: {self.write_bytes}\ncancelled_write_bytes: 0\n").encode()
        if name == "limits":
            return ("Limit                     Soft Limit           Hard Limit           Units\n"
                    f"Max open files            {self.max_fds:<20d} 1048576              files\n"
                    ).encode()
        if name == "smaps_rollup":
            if self.kernel_thread:
                raise ProcessLookupError(errno.ESRCH, os.strerror(errno.ESRCH))
            return (f"00400000-7fff0000 ---p 00000000 00:00 0  [rollup]\n"
                    f"Rss:            {self.rss_pages * 4} kB\nPss:            {self.pss_kb} kB\n"
                    f"SwapPss:        {self.swap_pss_kb} kB\n").encode()
        if name == "wchan" or name.startswith("task/") and name.endswith("/wchan"):
            tid = self.pid if name == "wchan" else int(name.split("/")[1])
            index = self.tids().index(tid)
            return (self.wchans[index] if index < len(self.wchans) else "0").encode()
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)

    def tids(self) -> list[int]:
        """Thread ids: the pid, then made-up ids no process of a small table uses."""
        return [self.pid] + [self.pid * 1000 + i for i in range(1, self.num_threads)]


class FakeProc:
    """A scripted process table served as /proc files (implements exporter.procs.ProcFiles)."""

    def __init__(self, *processes: FakeProcess) -> None:
        self.table: dict[int, FakeProcess] = {}
        self.reads: list[tuple[int, str]] = []  # every file read, in order
        self.add(*processes)

    def add(self, *processes: FakeProcess) -> None:
        for proc in processes:
            self.table[proc.pid] = proc

    def remove(self, *pids: int) -> None:
        for pid in pids:
            del self.table[pid]

    def reader(self) -> ProcfsReader:
        """The real reader over this table, with host facts fixed as the table assumes."""
        system = SystemFacts(clock_ticks=CLOCK_TICKS, page_size=PAGE_SIZE, boot_time=BOOT_TIME)
        return ProcfsReader(system=system, files=self)

    # -- exporter.procs.ProcFiles ------------------------------------------------------------

    def pids(self) -> list[int]:
        return sorted(self.table)

    def read(self, pid: int, name: str) -> bytes:
        proc = self._opened(pid, name)
        data = proc.render(name)
        self._maybe_vanish(proc, name)
        return data

    def count_fds(self, pid: int) -> int:
        proc = self._opened(pid, "fd")
        self._maybe_vanish(proc, "fd")
        return proc.fds

    def exists(self, pid: int) -> bool:
        return pid in self.table

    def tasks(self, pid: int) -> list[int]:
        return self._opened(pid, "task").tids()

    def _opened(self, pid: int, name: str) -> FakeProcess:
        self.reads.append((pid, name))
        proc = self.table.get(pid)
        if proc is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), f"{pid}/{name}")
        code = proc.errors.get(name)
        if code is not None:
            raise OSError(code, os.strerror(code), f"{pid}/{name}")
        return proc

    def _maybe_vanish(self, proc: FakeProcess, name: str) -> None:
        if proc.vanish_after == name:
            del self.table[proc.pid]
