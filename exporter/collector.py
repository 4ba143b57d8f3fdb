"""The /metrics collector: process-exporter's group metrics, plus procfleet's own extras.

`ProcessCollector` is a drop-in for ncabatoff/process-exporter's `namedprocess_namegroup_*`
series (same names, labels, types and counter semantics), so dashboards and alerts keep
working. One scrape reads every process once and produces, for example:

    # HELP namedprocess_namegroup_num_procs number of processes in this group
    # TYPE namedprocess_namegroup_num_procs gauge
    namedprocess_namegroup_num_procs{groupname="nginx"} 5.0
    # HELP namedprocess_namegroup_cpu_seconds_total Cpu user usage in seconds
    # TYPE namedprocess_namegroup_cpu_seconds_total counter
    namedprocess_namegroup_cpu_seconds_total{groupname="nginx",mode="user"} 12.34
    namedprocess_namegroup_cpu_seconds_total{groupname="nginx",mode="system"} 5.67
    namedprocess_namegroup_memory_bytes{groupname="nginx",memtype="resident"} 5.2e+07
    namedprocess_namegroup_states{groupname="nginx",state="Sleeping"} 5.0
    procfleet_read_errors_total{kind="vanished"} 3.0
    procfleet_process_cpu_seconds_total{groupname="nginx",pid="1234",mode="user"} 3.2
    namedprocess_namegroup_threads_wchan{groupname="nginx",wchan="ep_poll"} 5.0

`namedprocess_namegroup_threads_wchan` (opt-in, `threads_wchan`) counts the threads of each
group by the kernel function they sleep in, from /proc/PID/task/TID/wchan: every thread once,
running threads (wchan 0) not at all. process-exporter counts the same threads, except that
with its default -threads a multi-threaded process's main thread counts twice, and with
-threads=false only main threads count.

Expected groups (`MetricsOptions.expected_groups`) are exported from the first scrape with
num_procs 0, like an empty group: gauges 0, counters 0 until a process of theirs runs; they
are never dropped, neither by `drop_empty_groups` nor by the `EMPTY_GROUPS_KEPT` bound.
Each is also marked by `procfleet_group_expected{groupname} 1`, so an alert can ask for
"expected and no process" without listing the groups again:

    procfleet_group_expected{groupname="cron"} 1.0

Counters work as in process-exporter: each process incarnation (pid, start time) adds what it
used since the previous scrape to its group's counters, so a group's counters never go down
when members exit, and they start near zero when the exporter starts (processes already
running then count from that moment; processes started later count in full). Groups that
lose their last process keep being exported with gauges at 0, unless `drop_empty_groups`;
at most `EMPTY_GROUPS_KEPT` of them, the longest empty going first (its counters start
again from 0 if it comes back, which rate() reads as a counter reset).

What the collector keeps between scrapes is bounded: one entry per live process (its group
name, at most `groups.GROUP_NAME_MAX` characters, and eight counters), and the counters of
the live groups plus at most `EMPTY_GROUPS_KEPT` empty ones. Masked command lines are not
kept here (the JSON's cache is `masking.MaskCache`).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.config import MetricsOptions
from exporter.groups import GroupMatcher, name_process
from exporter.masking import DEFAULT_MASKER, Masker
from exporter.procs import ProcessDenied, ProcessError, ProcessGone, Reader, Sample

ERROR_KINDS = ("vanished", "denied", "partial", "other")
# Groups with no live process whose counters are kept. Names may carry argv text
# (`{{.Matches.NAME}}`, `{{.ExeFull}}`): a local user could otherwise make the exporter keep
# a new group per short-lived process, forever.
EMPTY_GROUPS_KEPT = 4096

# process-exporter's five state buckets, from the one-letter state in /proc/PID/stat.
_STATE_INDEX = {"R": 0, "S": 1, "D": 2, "Z": 3}
_STATE_NAMES = ("Running", "Sleeping", "Waiting", "Zombie", "Other")

# Counter slots per incarnation and per group.
_UTIME, _STIME, _READ, _WRITE, _MAJFLT, _MINFLT, _VCTX, _NVCTX = range(8)
# Gauge slots per group (the five states follow _G_STATES).
(_G_PROCS, _G_RSS, _G_VIRT, _G_SWAP, _G_FDS, _G_FD_RATIO, _G_OLDEST, _G_THREADS,
 _G_PSS, _G_SWAP_PSS, _G_STATES) = range(11)
_GAUGE_SLOTS = _G_STATES + len(_STATE_NAMES)


_Pss = tuple[int | None, int | None] | None  # (PSS, swap PSS) bytes, when smaps is on


class _Incarnation:
    """What the collector remembers about one (pid, start) between scrapes."""

    __slots__ = ("start", "group", "last", "cpu_delta")

    def __init__(self, start: int, group: str | None, last: list[float]) -> None:
        self.start = start
        self.group = group  # None: no matcher wants it; never read in detail again
        self.last = last  # counter totals at the previous scrape
        self.cpu_delta = 0.0  # CPU seconds used since the previous scrape


class ProcessCollector(Collector):
    """Group metrics for every process on the host, read fresh on each scrape.

    Register it on a private `CollectorRegistry`. `collect()` is thread-safe: concurrent
    scrapes take turns, and each sees one consistent snapshot.
    """

    def __init__(self, reader: Reader, groups: tuple[GroupMatcher, ...],
                 options: MetricsOptions, *, version: str,
                 user_name: Callable[[int], str],
                 masker: Masker = DEFAULT_MASKER,
                 clock: Callable[[], float] = time.perf_counter,
                 empty_groups_kept: int = EMPTY_GROUPS_KEPT) -> None:
        """`reader` is where processes come from (a ProcfsReader over scripted /proc files
        in tests); `masker` masks the argv text group names carry (`{{.ExeFull}}`,
        `{{.Matches.NAME}}`): the app passes the configured one, so labels follow
        `masking:` as the JSON does; `clock` times the scrape for
        procfleet_scrape_duration_seconds; `empty_groups_kept` bounds the empty groups."""
        self._reader = reader
        self._clock = clock
        self._groups = groups
        self._options = options
        self._version = version
        self._user_name = user_name
        self._masker = masker
        self._lock = threading.Lock()
        self._known: dict[int, _Incarnation] = {}  # pid -> its current incarnation
        self._accum: dict[str, list[float]] = {}  # group -> counters, never decreasing
        self._empty: OrderedDict[str, None] = OrderedDict()  # groups of _accum now empty
        self._empty_groups_kept = empty_groups_kept
        self._errors = dict.fromkeys(ERROR_KINDS, 0)
        self._scrapes = 0
        self._per_process_groups = frozenset(options.per_process_groups)
        self._expected = frozenset(options.expected_groups)
        for name in options.expected_groups:
            self._accum[name] = [0.0] * 8
        # group -> wchan -> threads, for the scrape under way (threads_wchan only)
        self._wchans: dict[str, dict[str, int]] | None = None

    def describe(self) -> Iterator[Metric]:
        """The families this collector yields (for the registry's duplicate-name check)."""
        yield from _Families(self._options).all()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            families = self._scrape()
        yield from families

    # -- one scrape ------------------------------------------------------------------------

    def _scrape(self) -> list[Metric]:
        started = self._clock()
        reader, options, errors = self._reader, self._options, self._errors
        known = self._known
        first = self._scrapes == 0
        fresh: dict[int, _Incarnation] = {}
        gauges: dict[str, list[float]] = {}
        new_unmatched: list[tuple[_Incarnation, Sample, _Pss]] = []
        per_process: list[tuple[_Incarnation, Sample]] | None = (
            [] if options.per_process_top_n or options.per_process_groups else None)
        smaps = options.smaps and hasattr(reader, "proportional_memory")
        self._wchans = {} if options.threads_wchan else None

        for pid in reader.pids():
            inc = known.get(pid)
            # A process no group wants is only read enough to see whether it is still
            # the same incarnation; a new one is read in full, command line included.
            detail = inc is None or inc.group is not None
            try:
                sample = reader.sample(pid, cmdline=inc is None, detail=detail)
                if inc is not None and inc.start != sample.start_ticks:
                    inc, detail = None, True  # the pid was reused: a new process
                    sample = reader.sample(pid, cmdline=True, detail=True)
                pss = (reader.proportional_memory(pid)
                       if smaps and detail else None)
            except ProcessDenied:
                errors["denied"] += 1
                continue
            except ProcessGone:
                errors["vanished"] += 1
                continue
            except (OSError, ValueError, IndexError):
                # An errno /proc should not give, or a file that does not parse.
                errors["other"] += 1
                continue
            if inc is None:
                group = name_process(self._groups, sample, self._user_name, self._masker)
                # The first scrape is the baseline; later newcomers count in full.
                inc = _Incarnation(sample.start_ticks, group,
                                   _totals(sample, None) if first else [0.0] * 8)
                if group is None:
                    if options.children:
                        new_unmatched.append((inc, sample, pss))
                    fresh[pid] = inc
                    continue
            fresh[pid] = inc
            if inc.group is None:
                continue
            self._add(gauges, inc, sample, pss)
            if per_process is not None:
                per_process.append((inc, sample))

        for inc, sample, pss in self._adopt_children(new_unmatched, fresh):
            self._add(gauges, inc, sample, pss)
            if per_process is not None:
                per_process.append((inc, sample))

        self._known = fresh
        reader.forget({(pid, inc.start) for pid, inc in fresh.items()})
        self._scrapes += 1
        if not options.drop_empty_groups:  # else _families drops every empty group
            self._bound_empty(gauges)
        families = self._families(gauges, per_process or [])
        families.scrape_duration.add_metric([], self._clock() - started)
        return families.all()

    def _bound_empty(self, gauges: dict[str, list[float]]) -> None:
        """Forget the counters of the longest-empty groups past `empty_groups_kept`."""
        empty = self._empty
        for group in gauges:
            empty.pop(group, None)
        for group in self._accum:
            if group not in gauges and group not in empty and group not in self._expected:
                empty[group] = None
        while len(empty) > self._empty_groups_kept:
            group, _ = empty.popitem(last=False)
            del self._accum[group]

    def _add(self, gauges: dict[str, list[float]], inc: _Incarnation, sample: Sample,
             pss: _Pss) -> None:
        """Add one process's gauges and counter increments to its group."""
        group = inc.group
        assert group is not None
        last = inc.last
        now = _totals(sample, last)
        counters = self._accum.get(group)
        if counters is None:
            counters = self._accum[group] = [0.0] * 8
        for i in range(8):
            delta = now[i] - last[i]
            if delta > 0:  # a counter read as lower than before (never expected) adds nothing
                counters[i] += delta
        inc.cpu_delta = max(now[_UTIME] - last[_UTIME], 0.0) + max(now[_STIME] - last[_STIME], 0.0)
        inc.last = now

        g = gauges.get(group)
        if g is None:
            g = gauges[group] = [0.0] * _GAUGE_SLOTS
            g[_G_OLDEST] = sample.create_time
        g[_G_PROCS] += 1
        g[_G_RSS] += sample.rss
        g[_G_VIRT] += sample.vsize
        g[_G_SWAP] += sample.swap or 0
        g[_G_THREADS] += sample.num_threads
        if sample.create_time < g[_G_OLDEST]:
            g[_G_OLDEST] = sample.create_time
        fds = sample.num_fds
        if fds is not None:
            g[_G_FDS] += fds
            limit = sample.max_fds
            if limit and fds / limit > g[_G_FD_RATIO]:
                g[_G_FD_RATIO] = fds / limit
        if fds is None or sample.read_bytes is None:
            self._errors["partial"] += 1
        g[_G_STATES + _STATE_INDEX.get(sample.state, 4)] += 1
        if pss is not None:
            g[_G_PSS] += pss[0] or 0
            g[_G_SWAP_PSS] += pss[1] or 0
        if self._wchans is not None:
            try:
                wchans = self._reader.wchans(sample.pid, sample.num_threads)
            except ProcessError:
                self._errors["partial"] += 1  # exited since its stat: counted without
                return
            counts = self._wchans.setdefault(group, {})
            for wchan in wchans:
                if wchan:
                    counts[wchan] = counts.get(wchan, 0) + 1

    def _adopt_children(self, new_unmatched: list[tuple[_Incarnation, Sample, _Pss]],
                        fresh: dict[int, _Incarnation]
                        ) -> list[tuple[_Incarnation, Sample, _Pss]]:
        """New processes no matcher wants join their nearest tracked ancestor's group.

        As process-exporter's -children: only ancestors alive now count, and an ancestor
        that was itself left out on an earlier scrape leaves its descendants out.
        """
        new = {sample.pid: sample for _, sample, _ in new_unmatched}
        resolved: dict[int, str | None] = {}
        adopted = []
        for inc, sample, pss in new_unmatched:
            chain: list[int] = []
            pid, group = sample.pid, None
            while True:
                if pid in resolved:
                    group = resolved[pid]
                    break
                chain.append(pid)
                ppid = new[pid].ppid
                parent = fresh.get(ppid)
                if parent is None or ppid in chain:
                    break  # the root, or a parent that has exited
                if parent.group is not None:
                    group = parent.group
                    break
                if ppid not in new:
                    break  # a parent seen earlier and left out
                pid = ppid
            for pid in chain:
                resolved[pid] = group
            if group is not None:
                inc.group = group
                adopted.append((inc, sample, pss))
        return adopted

    # -- exposition ------------------------------------------------------------------------

    def _families(self, gauges: dict[str, list[float]],
                  per_process: list[tuple[_Incarnation, Sample]]) -> _Families:
        options = self._options
        fam = _Families(options)
        fam.build_info.add_metric([self._version], 1)
        for name in options.expected_groups:
            fam.group_expected.add_metric([name], 1)
        for kind in ERROR_KINDS:
            fam.read_errors.add_metric([kind], self._errors[kind])
        empty = [0.0] * _GAUGE_SLOTS
        for group in sorted(self._accum):
            g = gauges.get(group)
            if g is None:
                if options.drop_empty_groups and group not in self._expected:
                    del self._accum[group]
                    continue
                g = empty
            fam.add_group(group, g, self._accum[group])
            if self._wchans:
                for wchan, count in sorted(self._wchans.get(group, {}).items()):
                    fam.threads_wchan.add_metric([group, wchan], count)
        if per_process:
            for inc, sample in self._chosen(per_process):
                fam.add_process(inc.group or "", sample)
        return fam

    def _chosen(self, processes: list[tuple[_Incarnation, Sample]]
                ) -> list[tuple[_Incarnation, Sample]]:
        options = self._options
        chosen = {id(p[0]): p for p in processes if p[0].group in self._per_process_groups}
        if options.per_process_top_n:
            if options.per_process_by == "memory":
                def key(p: tuple[_Incarnation, Sample]) -> tuple[float, ...]:
                    return (p[1].rss,)
            else:
                def key(p: tuple[_Incarnation, Sample]) -> tuple[float, ...]:
                    return (p[0].cpu_delta, p[1].utime + p[1].stime)
            for p in heapq.nlargest(options.per_process_top_n, processes, key=key):
                chosen[id(p[0])] = p
        return sorted(chosen.values(), key=lambda p: (p[0].group or "", p[1].pid))


def _totals(sample: Sample, last: list[float] | None) -> list[float]:
    """The counter totals of one read; a field not readable now keeps its last value."""
    read, write = sample.read_bytes, sample.write_bytes
    vctx, nvctx = sample.voluntary_ctxt, sample.nonvoluntary_ctxt
    if last is None:
        last = [0.0] * 8
    return [
        sample.utime,
        sample.stime,
        last[_READ] if read is None else read,
        last[_WRITE] if write is None else write,
        sample.majflt,
        sample.minflt,
        last[_VCTX] if vctx is None else vctx,
        last[_NVCTX] if nvctx is None else nvctx,
    ]


class _Families:
    """The metric families of one scrape, with process-exporter's names, help and labels."""

    def __init__(self, options: MetricsOptions) -> None:
        self.smaps = options.smaps
        self.wchan = options.threads_wchan
        self.per_process = bool(options.per_process_top_n or options.per_process_groups)
        g = ["groupname"]
        self.num_procs = GaugeMetricFamily(
            "namedprocess_namegroup_num_procs", "number of processes in this group", labels=g)
        self.cpu = CounterMetricFamily(
            "namedprocess_namegroup_cpu_seconds_total", "Cpu user usage in seconds",
            labels=["groupname", "mode"])
        self.read_bytes = CounterMetricFamily(
            "namedprocess_namegroup_read_bytes_total", "number of bytes read by this group",
            labels=g)
        self.write_bytes = CounterMetricFamily(
            "namedprocess_namegroup_write_bytes_total", "number of bytes written by this group",
            labels=g)
        self.major_faults = CounterMetricFamily(
            "namedprocess_namegroup_major_page_faults_total", "Major page faults", labels=g)
        self.minor_faults = CounterMetricFamily(
            "namedprocess_namegroup_minor_page_faults_total", "Minor page faults", labels=g)
        self.ctx_switches = CounterMetricFamily(
            "namedprocess_namegroup_context_switches_total", "Context switches",
            labels=["groupname", "ctxswitchtype"])
        self.memory = GaugeMetricFamily(
            "namedprocess_namegroup_memory_bytes", "number of bytes of memory in use",
            labels=["groupname", "memtype"])
        self.open_fds = GaugeMetricFamily(
            "namedprocess_namegroup_open_filedesc",
            "number of open file descriptors for this group", labels=g)
        self.worst_fd_ratio = GaugeMetricFamily(
            "namedprocess_namegroup_worst_fd_ratio",
            "the worst (closest to 1) ratio between open fds and max fds among all procs in "
            "this group", labels=g)
        self.oldest_start = GaugeMetricFamily(
            "namedprocess_namegroup_oldest_start_time_seconds",
            "start time in seconds since 1970/01/01 of oldest process in group", labels=g)
        self.num_threads = GaugeMetricFamily(
            "namedprocess_namegroup_num_threads", "Number of threads", labels=g)
        self.states = GaugeMetricFamily(
            "namedprocess_namegroup_states",
            "Number of processes in states Running, Sleeping, Waiting, Zombie, or Other",
            labels=["groupname", "state"])
        self.threads_wchan = GaugeMetricFamily(
            "namedprocess_namegroup_threads_wchan",
            "Number of threads in this group waiting on each wchan",
            labels=["groupname", "wchan"])
        self.group_expected = GaugeMetricFamily(
            "procfleet_group_expected",
            "1 for each group the config declares expected (exported even with no process)",
            labels=["groupname"])
        self.build_info = GaugeMetricFamily(
            "procfleet_build_info", "procfleet exporter version; always 1", labels=["version"])
        self.scrape_duration = GaugeMetricFamily(
            "procfleet_scrape_duration_seconds",
            "seconds this scrape spent reading processes and building the metrics")
        self.read_errors = CounterMetricFamily(
            "procfleet_read_errors_total",
            "process reads that failed: vanished (exited mid-read) and denied processes are "
            "skipped; partial means some fields (I/O, fds) were not readable",
            labels=["kind"])
        self.process_cpu = CounterMetricFamily(
            "procfleet_process_cpu_seconds_total",
            "CPU seconds of one process (opt-in: top-N or selected groups)",
            labels=["groupname", "pid", "mode"])
        self.process_rss = GaugeMetricFamily(
            "procfleet_process_resident_memory_bytes",
            "resident memory of one process (opt-in: top-N or selected groups)",
            labels=["groupname", "pid"])

    def add_group(self, name: str, g: list[float], c: list[float]) -> None:
        one = [name]
        self.num_procs.add_metric(one, g[_G_PROCS])
        self.cpu.add_metric([name, "user"], c[_UTIME])
        self.cpu.add_metric([name, "system"], c[_STIME])
        self.read_bytes.add_metric(one, c[_READ])
        self.write_bytes.add_metric(one, c[_WRITE])
        self.major_faults.add_metric(one, c[_MAJFLT])
        self.minor_faults.add_metric(one, c[_MINFLT])
        self.ctx_switches.add_metric([name, "voluntary"], c[_VCTX])
        self.ctx_switches.add_metric([name, "nonvoluntary"], c[_NVCTX])
        self.memory.add_metric([name, "resident"], g[_G_RSS])
        self.memory.add_metric([name, "virtual"], g[_G_VIRT])
        self.memory.add_metric([name, "swapped"], g[_G_SWAP])
        if self.smaps:
            self.memory.add_metric([name, "proportionalResident"], g[_G_PSS])
            self.memory.add_metric([name, "proportionalSwapped"], g[_G_SWAP_PSS])
        self.open_fds.add_metric(one, g[_G_FDS])
        self.worst_fd_ratio.add_metric(one, g[_G_FD_RATIO])
        # Whole seconds as the original; an empty group says 0 (the original: year 1).
        self.oldest_start.add_metric(one, int(g[_G_OLDEST]))
        self.num_threads.add_metric(one, g[_G_THREADS])
        for i, state in enumerate(_STATE_NAMES):
            self.states.add_metric([name, state], g[_G_STATES + i])

    def add_process(self, group: str, sample: Sample) -> None:
        pid = str(sample.pid)
        self.process_cpu.add_metric([group, pid, "user"], sample.utime)
        self.process_cpu.add_metric([group, pid, "system"], sample.stime)
        self.process_rss.add_metric([group, pid], sample.rss)

    def all(self) -> list[Metric]:
        families: list[Metric] = [
            self.num_procs, self.cpu, self.read_bytes, self.write_bytes, self.major_faults,
            self.minor_faults, self.ctx_switches, self.memory, self.open_fds,
            self.worst_fd_ratio, self.oldest_start, self.num_threads, self.states,
        ]
        if self.wchan:
            families.append(self.threads_wchan)
        families += [self.group_expected, self.build_info, self.scrape_duration, self.read_errors]
        if self.per_process:
            families += [self.process_cpu, self.process_rss]
        return families


__all__ = ["EMPTY_GROUPS_KEPT", "ERROR_KINDS", "ProcessCollector"]
