"""Samples to the API's process object: `to_info` turns what procs.py read into a ProcessInfo.

procs.py only reads /proc (or psutil) into `Sample`s; what a lookup shows of a sample (user
name, state word, percentages, the masked command line) is decided here, once, for
`GET /process/{pid}` and `GET /process` alike.
"""

from __future__ import annotations

import time
from dataclasses import replace

from exporter.procs import STATE_WORDS, Sample, SystemFacts, UserNames
from exporter.rates import Rates
from procfleet.process import ProcessInfo
from procfleet.timefmt import rfc3339


def to_info(sample: Sample, *, system: SystemFacts, user_name: UserNames,
            mask: object = None, now: float | None = None,
            rates: Rates | None = None) -> ProcessInfo:
    """Turn a Sample into the API's process object (docs/api.md, "Process fields")."""
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
        cpu_percent_recent=rates.cpu_percent if rates is not None else None,
        read_bytes_per_second=rates.read_bytes_per_second if rates is not None else None,
        write_bytes_per_second=rates.write_bytes_per_second if rates is not None else None,
        window_seconds=rates.window_seconds if rates is not None else None,
    )
