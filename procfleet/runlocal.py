"""`make run`: an exporter and the query service on this host, with built-in defaults.

Starts both as users would (`python -m exporter`, `python -m query`), waits until each
answers *and* holds its port (not some other process already there), prints a curl line that
works, and stops both on SIGINT or SIGTERM, even when started in the background of a script
(where the shell leaves SIGINT ignored). Every line the services log passes through with a
prefix; when something goes wrong, the last line names the service and the reason.

    python -m procfleet.runlocal [--exporter-port 9256] [--query-port 8080]
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util
import errno
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from query.config import default_config

HOST = "127.0.0.1"
READY_TIMEOUT = 30.0  # seconds for a service to answer /healthz
STOP_GRACE = 10.0  # seconds a service gets to finish before it is killed
_TAIL_LINES = 20  # log lines kept per service, to say why it exited
_MAX_LINE = 16384  # bytes; a longer unterminated line is passed on in pieces
_PR_SET_PDEATHSIG = 1


class RunError(Exception):
    """A service could not start or stopped on its own; the message says which and why."""


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1 to 65535, got {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m procfleet.runlocal",
        description="Run an exporter and the query service on 127.0.0.1 with built-in "
                    "defaults (what `make run` does); Ctrl-C or SIGTERM stops both.")
    parser.add_argument("--exporter-port", type=_port, default=9256, metavar="PORT",
                        help="the exporter's port (default 9256; make run EXPORTER_PORT=...)")
    parser.add_argument("--query-port", type=_port, default=8080, metavar="PORT",
                        help="the query service's port (default 8080; make run QUERY_PORT=...)")
    return parser


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has Linux send SIGTERM to the child when the runner dies, so a
    `kill -9` of the runner does not leave services holding the ports."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def address_in_use(port: int) -> bool:
    """True when something already listens on HOST:port (bind fails with EADDRINUSE).

    SO_REUSEADDR as waitress sets it: sockets in TIME_WAIT do not count, a listener does.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((HOST, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return True
        raise
    finally:
        probe.close()
    return False


def listener_pids(port: int) -> set[int]:
    """Pids we may see listening on `port` (others' sockets need privileges to attribute)."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return set()
    return {c.pid for c in connections if c.pid and c.status == psutil.CONN_LISTEN
            and c.laddr and c.laddr.port == port}


def owns_listener(pid: int, port: int) -> bool:
    """True when process `pid` itself holds a listening socket on `port`."""
    try:
        proc = psutil.Process(pid)
        connections = (proc.net_connections(kind="tcp") if hasattr(proc, "net_connections")
                       else proc.connections(kind="tcp"))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
               for c in connections)


class Service:
    """One child service: its process, its port, and the last lines it logged."""

    def __init__(self, name: str, flag: str, argv: Sequence[str], port: int) -> None:
        self.name = name
        self.flag = flag  # the runner option that moves it, for the error message
        self.argv = list(argv)
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._partial = b""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def check_port(self) -> None:
        """Fail before starting anything when the port is taken (by an exporter installed
        from docs/deploy.md, say), rather than mistake that process's answers for ours."""
        if address_in_use(self.port):
            holders = listener_pids(self.port)
            who = f" (held by pid {', '.join(map(str, sorted(holders)))})" if holders else ""
            raise RunError(f"the {self.name} cannot listen on {HOST}:{self.port}: address "
                           f"already in use{who}; pick another port with {self.flag}")

    def start(self) -> None:
        self.check_port()
        # Its own process group: a Ctrl-C reaches only the runner, which stops the services
        # in order, instead of each dying on its own with a traceback.
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     process_group=0, preexec_fn=_die_with_parent())
        os.set_blocking(self.proc.stdout.fileno(), False)  # type: ignore[union-attr]  # stdout=PIPE

    def pump(self) -> bool:
        """Pass on what the service logged; False once its output is closed."""
        assert self.proc is not None and self.proc.stdout is not None
        try:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return True
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _MAX_LINE or (not chunk and self._partial):
            lines.append(self._partial)
            self._partial = b""
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            self.tail.append(line)
            print(f"[{self.name}] {line}", file=sys.stderr, flush=True)
        return bool(chunk)

    def exit_reason(self) -> str:
        assert self.proc is not None
        code = self.proc.returncode
        status = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                  else f"exited with status {code}")
        last = next((line for line in reversed(self.tail) if line.strip()), "")
        if "address already in use" in "\n".join(self.tail).lower():
            last = f"address already in use on {HOST}:{self.port}; pick another port with " \
                   f"{self.flag}"
        return f"the {self.name} {status}" + (f": {last}" if last else "")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_GRACE)


class Runner:
    """Starts the services one after the other and watches them until a signal."""

    def __init__(self, services: Sequence[Service]) -> None:
        self.services = list(services)
        self.signal_name: str | None = None
        self._selector = selectors.DefaultSelector()

    def on_signal(self, signum: int, frame: object) -> None:
        # Only a flag: the loop below notices within one poll and stops the services.
        self.signal_name = signal.Signals(signum).name

    def _watch(self, seconds: float) -> None:
        """Pass on the services' output for up to `seconds`; return early on a signal."""
        deadline = time.monotonic() + seconds
        while self.signal_name is None:
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.get_map():
                if self._selector.get_map():
                    return
                time.sleep(min(max(left, 0), 0.1))
                return
            for key, _ in self._selector.select(timeout=min(left, 0.2)):
                service: Service = key.data
                if not service.pump():
                    self._selector.unregister(key.fileobj)

    def _exited(self) -> Service | None:
        return next((s for s in self.services if s.proc and s.proc.poll() is not None), None)

    def _drain_output(self, service: Service) -> None:
        """Read what an exited service still had to say, for its exit reason."""
        assert service.proc is not None and service.proc.stdout is not None
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and service.pump():
            time.sleep(0.01)

    def _wait_ready(self, service: Service) -> None:
        assert service.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while self.signal_name is None:
            if service.proc.poll() is not None:
                self._drain_output(service)
                raise RunError(service.exit_reason())
            try:
                with urllib.request.urlopen(f"{service.url}/healthz", timeout=1) as resp:
                    answered = resp.status == 200
            except OSError:
                answered = False
            # Someone answered; make sure it is our child and not a process already there.
            if answered and owns_listener(service.proc.pid, service.port):
                return
            if time.monotonic() > deadline:
                other = " (another process answers there)" if answered else ""
                raise RunError(f"the {service.name} did not come up on {HOST}:{service.port} "
                               f"within {READY_TIMEOUT:.0f} s{other}")
            self._watch(0.1)

    def run(self) -> int:
        try:
            for service in self.services:
                service.check_port()
            for service in self.services:
                service.start()
                assert service.proc is not None and service.proc.stdout is not None
                self._selector.register(service.proc.stdout, selectors.EVENT_READ, service)
                self._wait_ready(service)
            if self.signal_name is None:
                print(banner(self.services[0], self.services[1]), flush=True)
            while self.signal_name is None:
                self._watch(0.5)
                exited = self._exited()
                if exited is not None:
                    self._drain_output(exited)
                    raise RunError(exited.exit_reason())
        except RunError as exc:
            self.stop()
            print(f"make run: {exc}", file=sys.stderr, flush=True)
            return 1
        self.stop()
        print(f"make run: received {self.signal_name}; both services stopped",
              file=sys.stderr, flush=True)
        return 0

    def stop(self) -> None:
        # Query service first, so it does not log failures of the exporter going away.
        for service in reversed(self.services):
            service.stop()
        for service in self.services:
            if service.proc is not None and service.proc.stdout is not None:
                while service.pump():
                    pass
                service.proc.stdout.close()
        self._selector.close()


def banner(exporter: Service, query: Service) -> str:
    host = socket.gethostname()
    return (
        "\nprocfleet is running on this host (Ctrl-C stops it):\n"
        f"  exporter       {exporter.url}/  (metrics at /metrics)\n"
        f"  query service  {query.url}/openapi.json\n\n"
        "Try:\n"
        f"  curl -s {query.url}/node/{host}/process/{os.getpid()}\n"
        f"  curl -s {query.url}/node/_all/process/1\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.exporter_port == args.query_port:
        print("make run: the exporter and the query service need two different ports",
              file=sys.stderr)
        return 2
    exporter = Service("exporter", "EXPORTER_PORT=... (--exporter-port)",
                       [sys.executable, "-m", "exporter", "--listen",
                        f"{HOST}:{args.exporter_port}"], args.exporter_port)
    with tempfile.TemporaryDirectory(prefix="procfleet-run-") as tmp:
        # The built-in query config, but pointing at the exporter's port as chosen.
        config = Path(tmp) / "query.yml"
        config.write_text(json.dumps({
            "auth": {"enabled": False},
            "exporters": [{"hostname": default_config().exporters[0].hostname,
                           "url": exporter.url}],
        }))
        query = Service("query service", "QUERY_PORT=... (--query-port)",
                        [sys.executable, "-m", "query", "--listen",
                         f"{HOST}:{args.query_port}", "--config", str(config)],
                        args.query_port)
        runner = Runner([exporter, query])
        # Installed explicitly: a shell running `make run &` starts us with SIGINT ignored.
        signal.signal(signal.SIGINT, runner.on_signal)
        signal.signal(signal.SIGTERM, runner.on_signal)
        return runner.run()


if __name__ == "__main__":
    sys.exit(main())
