"""`make run`: an exporter and the query service on this host, with built-in defaults.

Starts both as users would (`python -m exporter`, `python -m query`), waits until each
answers, prints a curl line that works, and stops both on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

EXPORTER = "127.0.0.1:9256"
QUERY = "127.0.0.1:8080"


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def main() -> int:
    services = [
        ("exporter", [sys.executable, "-m", "exporter", "--listen", EXPORTER]),
        ("query service", [sys.executable, "-m", "query", "--listen", QUERY]),
    ]
    procs: list[subprocess.Popen] = []

    def stop(signum: int = signal.SIGTERM, frame: object = None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    signal.signal(signal.SIGTERM, lambda s, f: (stop(), sys.exit(0)))
    try:
        for name, argv in services:
            proc = subprocess.Popen(argv)
            procs.append(proc)
            host_port = argv[-1]
            if not wait_ready(f"http://{host_port}/healthz", proc):
                print(f"make run: the {name} did not come up on {host_port}; see its log above",
                      file=sys.stderr)
                stop()
                return 1
        host = socket.gethostname()
        print(
            "\nprocfleet is running on this host (Ctrl-C stops it):\n"
            f"  exporter       http://{EXPORTER}/  (metrics at /metrics)\n"
            f"  query service  http://{QUERY}/openapi.json\n\n"
            "Try:\n"
            f"  curl -s http://{QUERY}/node/{host}/process/{os.getpid()}\n"
            f"  curl -s http://{QUERY}/node/_all/process/1\n",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("make run: a service exited; stopping the other", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
