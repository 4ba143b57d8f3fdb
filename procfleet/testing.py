"""Helpers for testing and benchmarking procfleet's services: ports, waiting, children, servers.

Shipped with the package (as falcon ships falcon.testing) so the test suites and the
benchmarks share one copy. No service imports it (tests/procfleet/test_layers.py checks).
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import psutil

T = TypeVar("T")

BIN = Path(sys.executable).parent
EXPORTER = str(BIN / "procfleet-exporter")
QUERY = str(BIN / "procfleet-query")
# A Python child that spends its life asleep (state S) until killed.
SLEEPER = "import sys, time\nwhile True: time.sleep(1)"
SPINNER = "import sys\nwhile True: pass"
# A Python child that counts the SIGHUPs it gets, a line each in the file argv[1], and makes
# argv[1] + ".ready" once its handler is installed: a HUP before that would end it.
HUP_COUNTER = """\
import signal, sys, time
out = sys.argv[1]
def counted(signum, frame):
    with open(out, "a") as f:
        f.write("hup\\n")
signal.signal(signal.SIGHUP, counted)
open(out + ".ready", "w").close()
while True:
    time.sleep(0.05)
"""


# Ports free_port() handed out already. The kernel readily gives the same free port to
# bind(0) again once it is closed, so callers that take several ports before starting the
# servers (reliability_testing.start_fakes) got duplicates. Bounded: a test run uses far fewer.
_HANDED_OUT: set[int] = set()
_HANDED_OUT_MAX = 8192


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, not handed out before by this
    process (until _HANDED_OUT_MAX ports have been)."""
    if len(_HANDED_OUT) >= _HANDED_OUT_MAX:
        _HANDED_OUT.clear()
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _HANDED_OUT:
            break
    _HANDED_OUT.add(port)
    return port


def wait_until(check: Callable[[], T], *, timeout: float = 10.0, what: str = "condition",
               interval: float = 0.02, retry_on: tuple[type[Exception], ...] = ()) -> T:
    """Call `check` until it returns something truthy, and return that; fail after `timeout` s.

    Exceptions of the `retry_on` types count as "not yet" (a service still starting refuses
    connections); the last one is named if time runs out.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except retry_on as exc:
            last_error = exc
        if time.monotonic() > deadline:
            why = f" (last error: {last_error})" if last_error else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{why}")
        time.sleep(interval)


def assert_prefixes(messages: Sequence[str], expected: Sequence[str]) -> None:
    """Exactly one message per `expected` prefix, in order: config problems named by key path,
    without repeating the rest of each message in the test."""
    if len(messages) != len(expected):
        raise AssertionError(f"{len(messages)} messages, expected {len(expected)}: {messages}")
    for message, prefix in zip(messages, expected, strict=True):
        if not message.startswith(prefix):
            raise AssertionError(f"{message!r} does not start with {prefix!r}")


def answers_200(url: str, timeout: float = 5.0, *, ca_file: Path | None = None,
                headers: Mapping[str, str] | None = None) -> bool:
    """True if a GET of `url` answers 200 within `timeout` seconds (https: verified
    against `ca_file`)."""
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            status: int = resp.status
            return status == 200
    except OSError:
        return False


def wait_ready(url: str, proc: subprocess.Popen[Any], timeout: float = 30.0,
               log: Path | None = None, *, ca_file: Path | None = None,
               headers: Mapping[str, str] | None = None) -> None:
    """Wait until `url` answers 200, failing early (with `log`'s tail) if the server exits."""

    def ready() -> bool:
        if proc.poll() is not None:
            tail = f"\n{log.read_text(errors='replace')[-3000:]}" if log is not None else ""
            raise AssertionError(f"{url}: server pid {proc.pid} exited with "
                                 f"{proc.returncode}{tail}")
        return answers_200(url, timeout=1, ca_file=ca_file, headers=headers)

    wait_until(ready, timeout=timeout, what=f"{url} to answer 200")


def reap(proc: subprocess.Popen[Any]) -> None:
    """Kill `proc` if it still runs and wait for it, so no zombie or warning is left."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def terminate(proc: subprocess.Popen[Any], *, grace: float = 15.0) -> int:
    """SIGTERM, wait up to `grace` seconds, kill if needed; return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=5)


def _argv_of(pid: int) -> list[bytes] | None:
    """The argv /proc shows for `pid`; empty between fork and exec and for a zombie."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw.split(b"\0")[:-1] if raw.endswith(b"\0") else [raw] if raw else []


def wait_for_argv(pid: int, argv: Sequence[str], *, timeout: float = 10.0) -> None:
    """Wait until /proc shows `pid` running with exactly `argv` (it has exec'd)."""
    expected = [os.fsencode(arg) for arg in argv]
    wait_until(lambda: _argv_of(pid) == expected, timeout=timeout, what=f"child {pid} to exec")


def state_of(pid: int) -> str | None:
    """The one-letter state of `pid` from /proc (S sleeping, R running, Z zombie...)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:][:1].decode()


def spawn(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start `argv` (stdio on /dev/null unless given) and return once it has exec'd.

    Tests look the child up by pid at once: before exec /proc shows the parent's image.
    """
    options: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
                               "stderr": subprocess.DEVNULL, **popen}
    proc = subprocess.Popen(list(argv), **options)
    try:
        wait_for_argv(proc.pid, argv)
    except BaseException:
        reap(proc)
        raise
    return proc


def spawn_python(*args: str, code: str = SLEEPER, **popen: Any) -> subprocess.Popen[bytes]:
    """`python -c code args...` once exec'd; a SLEEPER also once it sleeps (done loading)."""
    proc = spawn([sys.executable, "-c", code, *args], **popen)
    if code == SLEEPER:
        try:
            wait_until(lambda: state_of(proc.pid) == "S", what=f"child {proc.pid} to sleep")
        except BaseException:
            reap(proc)
            raise
    return proc


def reap_all(procs: Sequence[subprocess.Popen[Any]]) -> None:
    """Reap each of `procs` and close the stdin pipes the tests held."""
    for proc in procs:
        reap(proc)
        if proc.stdin:
            proc.stdin.close()


def hups(out: Path) -> int:
    """How many SIGHUPs the HUP_COUNTER child counting in `out` has had so far."""
    return len(out.read_text().splitlines()) if out.exists() else 0


class Children:
    """Real child processes, each visible in /proc when returned; `reap()` ends them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *args: str, code: str = SLEEPER, **popen: Any) -> subprocess.Popen[bytes]:
        """`python -c code args...` (see spawn_python)."""
        return self._keep(spawn_python(*args, code=code, **popen))

    def spawn_argv(self, argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        """Any program (not the test's Python), once it has exec'd."""
        return self._keep(spawn(argv, **popen))

    def spawn_hup_counter(self, tmp: Path, **popen: Any
                          ) -> tuple[subprocess.Popen[bytes], Path]:
        """A HUP_COUNTER child once its handler is installed, and the file it counts in
        (a new one in `tmp` for each child; read it with `hups`)."""
        out = tmp / f"hups-{len(self.procs)}"
        child = self.spawn(str(out), code=HUP_COUNTER, **popen)
        wait_until(lambda: Path(f"{out}.ready").exists(),
                   what=f"child {child.pid}'s HUP handler")
        return child, out

    def _keep(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.procs.append(proc)
        return proc

    def reap(self) -> None:
        reap_all(self.procs)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reap()


def _comm_and_state(pid: int) -> tuple[str, str] | None:
    """(comm, one-letter state) once `pid` has exec'd; None before that or when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if not f.read():
                return None  # between fork and exec, or a zombie
    except (FileNotFoundError, ProcessLookupError):
        return None
    rpar = stat.rfind(b")")
    comm = stat[stat.find(b"(") + 1: rpar].decode(errors="replace")
    return comm, stat[rpar + 2: rpar + 3].decode()


def wait_for_comm(pid: int, comm: str, *, timeout: float = 5.0, settled: bool = False) -> None:
    """Wait until `pid` has exec'd as `comm` (and, if `settled`, sleeps: done loading)."""

    def ready() -> bool:
        seen = _comm_and_state(pid)
        return seen is not None and seen[0] == comm and (not settled or seen[1] == "S")

    wait_until(ready, timeout=timeout, what=f"pid {pid} to show comm {comm!r}")


class NamedChildren:
    """Children under a distinctive comm (the name of a symlink to the program); reaped.

    Each instance has its own tag, so its comms ("pf1a2b3c-web") match no other process.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = "pf" + os.urandom(3).hex()
        self.children: list[subprocess.Popen[bytes]] = []

    def comm(self, suffix: str) -> str:
        """The comm of children spawned with `suffix` (the kernel keeps 15 bytes)."""
        return f"{self.tag}-{suffix}"[:15]

    def start(self, suffix: str, program: str, *args: str,
              settled: bool = False) -> subprocess.Popen[bytes]:
        """Run `program args...` as comm(suffix), stdin a pipe; wait until it has exec'd."""
        comm = self.comm(suffix)
        link = self.tmp / comm
        if not link.exists():
            link.symlink_to(program)
        child = subprocess.Popen([str(link), *args], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.children.append(child)
        wait_for_comm(child.pid, comm, settled=settled)
        return child

    def reap(self) -> None:
        reap_all(self.children)


def _start_logged(argv: Sequence[str], log: Path,
                  env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env) if env else None)


@contextmanager
def running(argv: Sequence[str], *, ready_url: str, log: Path, timeout: float = 20.0
            ) -> Iterator[subprocess.Popen[bytes]]:
    """Start any server (Prometheus too) with its output in `log`; ready when `ready_url`
    answers 200; terminated on the way out."""
    proc = _start_logged(argv, log)
    try:
        wait_ready(ready_url, proc, timeout=timeout, log=log)
        yield proc
    finally:
        terminate(proc, grace=10.0)


class Server:
    """A service started as users start it, its stdout and stderr kept in a log file."""

    def __init__(self, argv: list[str], port: int, log: Path,
                 env: Mapping[str, str] | None = None, *, ca_file: Path | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self.argv = argv
        self.port = port
        # With `ca_file` the service serves TLS, and is checked against that CA.
        self.ca_file = ca_file
        self.headers = dict(headers or {})  # sent with readiness checks (basic auth, say)
        self.url = f"{'https' if ca_file else 'http'}://127.0.0.1:{port}"
        self.log_path = log
        self.proc = _start_logged(argv, log, env)

    @classmethod
    def start(cls, argv: list[str], port: int, log: Path, *, path: str = "/healthz",
              timeout: float = 20.0, env: Mapping[str, str] | None = None,
              ca_file: Path | None = None, headers: Mapping[str, str] | None = None) -> Self:
        """Start it and wait until `path` answers 200; stopped again if it never does."""
        server = cls(argv, port, log, env, ca_file=ca_file, headers=headers)
        try:
            server.wait_ready(path, timeout)
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """What the service wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def healthy(self, path: str = "/healthz", timeout: float = 5.0) -> bool:
        return answers_200(self.url + path, timeout=timeout, ca_file=self.ca_file,
                           headers=self.headers)

    def wait_ready(self, path: str = "/healthz", timeout: float = 20.0) -> None:
        wait_ready(self.url + path, self.proc, timeout, log=self.log_path,
                   ca_file=self.ca_file, headers=self.headers)
        # Another process on this busy machine may have taken the port between free_port()
        # and our bind: then the 200 was its answer, and ours is exiting with EADDRINUSE.
        wait_until(lambda: self.listening() or self.proc.poll() is not None, timeout=timeout,
                   what=f"{self.argv[0]} to listen on port {self.port}")
        if not self.listening():
            raise AssertionError(f"port {self.port} was taken by another process; "
                                 f"{self.argv[0]} exited:\n{self.output()[-3000:]}")

    def listening(self) -> bool:
        """True if this server's own process listens on its port."""
        try:
            connections = psutil.Process(self.pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                   for c in connections)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def stop(self) -> int:
        """SIGTERM, wait (bounded), and return the exit code."""
        return terminate(self.proc)


def start_exporter(tmp: Path, *extra: str, config: str | None = None,
                   hostname: str | None = None, ca_file: Path | None = None,
                   headers: Mapping[str, str] | None = None) -> Server:
    """`procfleet-exporter --listen 127.0.0.1:PORT [--config FILE] [--hostname NAME]`, ready.

    `ca_file`: it serves TLS (`--web.config.file` in `extra`) with a certificate of that CA.
    """
    port = free_port()
    argv = [EXPORTER, "--listen", f"127.0.0.1:{port}", *extra]
    if hostname is not None:
        argv += ["--hostname", hostname]
    if config is not None:
        path = tmp / f"exporter-{port}.yml"
        path.write_text(config)
        argv += ["--config", str(path)]
    return Server.start(argv, port, tmp / f"exporter-{port}.log", ca_file=ca_file,
                        headers=headers)


def query_argv(config: Path, port: int, *extra: str, module: bool = False) -> list[str]:
    """The query service's command line: `procfleet-query` or `python -m query`."""
    program = [sys.executable, "-m", "query"] if module else [QUERY]
    return [*program, "--config", str(config), "--listen", f"127.0.0.1:{port}", *extra]


def start_query(tmp: Path, config: str, *extra: str, ca_file: Path | None = None,
                headers: Mapping[str, str] | None = None) -> Server:
    """`procfleet-query --config FILE --listen 127.0.0.1:PORT`, ready when /healthz answers."""
    port = free_port()
    path = tmp / f"query-{port}.yml"
    path.write_text(config)
    return Server.start(query_argv(path, port, *extra), port, tmp / f"query-{port}.log",
                        ca_file=ca_file, headers=headers)


# -- certificates made at test time ----------------------------------------------------------

OPENSSL = "openssl"  # the CLI (Debian package openssl); the tests make their own CA with it


@dataclass(frozen=True)
class CertFiles:
    """A PEM certificate and its unencrypted key, on disk."""

    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    done = subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args[:2])} failed: {done.stderr[-2000:]}")


def make_ca(directory: Path, name: str = "procfleet test CA") -> CertFiles:
    """A new self-signed CA (P-256 key, valid two days) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    slug = name.replace(" ", "-")
    files = CertFiles(directory / f"{slug}.crt", directory / f"{slug}.key")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(files.key), "-out", str(files.cert), "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return files


def make_cert(ca: CertFiles, directory: Path, name: str, *,
              dns: Sequence[str] = ("localhost",), ips: Sequence[str] = ("127.0.0.1",)
              ) -> CertFiles:
    """A certificate for `name` signed by `ca`, for servers and clients alike, naming `dns`
    and `ips` as subject alternative names (Go and Python check those, not the CN)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = CertFiles(directory / f"{name}.crt", directory / f"{name}.key")
    request = directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    sans = [f"DNS:{d}" for d in dns] + [f"IP:{ip}" for ip in ips]
    extensions.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
        + (f"subjectAltName={','.join(sans)}\n" if sans else ""))
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(files.key), "-out", str(request), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2",
             "-extfile", str(extensions), "-out", str(files.cert))
    return files


def basic_auth_header(user: str, password: str) -> dict[str, str]:
    """The Authorization header of HTTP basic auth."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}
