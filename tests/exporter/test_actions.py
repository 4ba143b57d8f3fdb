"""POST /process/{pid}/signal on the exporter: every guard rail against real processes.

Pid 1 (on this machine the process that runs the tests' machinery) and kernel threads are
only ever asked for with a dry run: a dry run goes through the same checks as a real request,
and a broken guard must not be able to take the host's init down with it.
"""

from __future__ import annotations

import hashlib
import os
import signal

import falcon.testing
import psutil
import pytest
import requests

from exporter.actions import SignalPolicy, SignalRequest, parse_signal_policy, refusal
from exporter.app import create_app
from exporter.config import Config, from_mapping
from exporter.groups import parse_groups
from exporter.procs import Sample
from procfleet.configcheck import ConfigError, Problems
from procfleet.testing import hups, wait_until
from procfleet.timefmt import rfc3339

TOKEN = "signal-test-token"
TOKEN_SHA = hashlib.sha256(TOKEN.encode()).hexdigest()
AUTH = {"Authorization": f"Bearer {TOKEN}"}

def config(*, enabled: bool = True, token: bool = True, **policy: object) -> Config:
    raw: dict = {"hostname": "web-01", "actions": {"signal": {"enabled": enabled, **policy}}}
    if token:
        raw["auth"] = {"token_sha256": TOKEN_SHA}
    return from_mapping(raw)


def client(cfg: Config) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(cfg))


def start_time_of(pid: int) -> str:
    return rfc3339(psutil.Process(pid).create_time())


# -- against a real exporter server ------------------------------------------------------------

@pytest.fixture
def enabled_exporter(start_exporter):
    return start_exporter(config=f"""
hostname: web-01
auth: {{token_sha256: {TOKEN_SHA}}}
actions: {{signal: {{enabled: true, allow_root: true}}}}
""")


def test_term_ends_a_child_and_is_audited(enabled_exporter, children):
    child = children.spawn()
    body = {"signal": "TERM", "start_time": start_time_of(child.pid), "job_id": "job-1",
            "key": "ops"}
    answer = requests.post(f"{enabled_exporter.url}/process/{child.pid}/signal", json=body,
                           headers=AUTH, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "signalled" and answer.json()["changed"] is True
    assert child.wait(timeout=10) == -signal.SIGTERM
    metrics = requests.get(enabled_exporter.url + "/metrics", headers=AUTH, timeout=10).text
    assert 'procfleet_signals_total{outcome="signalled",signal="TERM"} 1.0' in metrics
    line = next(ln for ln in enabled_exporter.output().splitlines()
                if "exporter.actions.audit" in ln)
    for field in ("job_id=job-1", "key=ops", f"pid={child.pid}", "signal=TERM",
                  "outcome=signalled", f"start_time={body['start_time']}", "target=self"):
        assert field in line


def test_hup_reaches_the_handler(enabled_exporter, children, tmp_path):
    child, out = children.spawn_hup_counter(tmp_path)
    answer = requests.post(f"{enabled_exporter.url}/process/{child.pid}/signal",
                           json={"signal": "HUP"}, headers=AUTH, timeout=10)
    assert answer.json()["outcome"] == "signalled"
    wait_until(lambda: hups(out) == 1, what="the child to count one HUP")
    assert child.poll() is None


def test_get_is_405_and_no_token_is_401_even_with_open_metrics(start_exporter, children):
    server = start_exporter(config=f"""
auth: {{token_sha256: {TOKEN_SHA}, protect_metrics: false}}
actions: {{signal: {{enabled: true, allow_root: true}}}}
""")
    child = children.spawn()
    url = f"{server.url}/process/{child.pid}/signal"
    assert requests.get(server.url + "/metrics", timeout=10).status_code == 200
    assert requests.get(url, headers=AUTH, timeout=5).status_code == 405
    assert requests.post(url, json={"signal": "KILL"}, timeout=5).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert requests.post(url, json={"signal": "KILL"}, headers=wrong, timeout=5).status_code \
        == 401
    assert child.poll() is None
    assert "outcome=unauthorized" in server.output()


def test_the_exporter_never_signals_itself(enabled_exporter):
    answer = requests.post(f"{enabled_exporter.url}/process/{enabled_exporter.pid}/signal",
                           json={"signal": "TERM"}, headers=AUTH, timeout=10)
    assert answer.json()["outcome"] == "refused"
    assert "this exporter" in answer.json()["error"]
    assert enabled_exporter.healthy()


# -- the app, with real child processes ------------------------------------------------------

def test_no_token_configured_refuses_even_though_reads_are_open(children):
    app = client(config(token=False, allow_root=True))
    child = children.spawn()
    assert app.simulate_get(f"/process/{child.pid}").status_code == 200
    answer = app.simulate_post(f"/process/{child.pid}/signal", json={"signal": "TERM"},
                               headers=AUTH)
    assert answer.status_code == 200
    assert answer.json["outcome"] == "refused" and answer.json["changed"] is False
    assert "auth.token_sha256" in answer.json["error"]
    assert child.poll() is None


def test_disabled_by_default(children):
    assert from_mapping({}).signal.enabled is False
    app = client(config(enabled=False, allow_root=True))
    child = children.spawn()
    answer = app.simulate_post(f"/process/{child.pid}/signal", json={"signal": "TERM"},
                               headers=AUTH)
    assert answer.status_code == 200
    assert answer.json["outcome"] == "refused" and answer.json["changed"] is False
    assert "disabled" in answer.json["error"]
    assert child.poll() is None


def test_a_reused_pid_is_refused(children):
    """The pid's start time is not the one the caller saw: another process has the pid."""
    app = client(config(allow_root=True))
    child = children.spawn()
    seen = rfc3339(psutil.Process(child.pid).create_time() - 3600)  # the earlier owner's
    answer = app.simulate_post(f"/process/{child.pid}/signal",
                               json={"signal": "KILL", "start_time": seen}, headers=AUTH)
    assert answer.json["outcome"] == "mismatch"
    assert "another process" in answer.json["error"]
    assert child.poll() is None


def test_match_name_is_checked_when_sending(children):
    app = client(config(allow_root=True))
    child = children.spawn()
    answer = app.simulate_post(f"/process/{child.pid}/signal",
                               json={"signal": "TERM", "match": {"name": "postgres"}},
                               headers=AUTH)
    assert answer.json["outcome"] == "mismatch"
    assert child.poll() is None
    name = psutil.Process(child.pid).name()
    answer = app.simulate_post(f"/process/{child.pid}/signal",
                               json={"signal": "TERM", "match": {"name": name}}, headers=AUTH)
    assert answer.json["outcome"] == "signalled"
    assert child.wait(timeout=10) == -signal.SIGTERM


def test_a_dry_run_changes_nothing(children, tmp_path):
    app = client(config(allow_root=True))
    child, out = children.spawn_hup_counter(tmp_path)
    answer = app.simulate_post(f"/process/{child.pid}/signal",
                               json={"signal": "HUP", "dry_run": True}, headers=AUTH)
    assert answer.json["outcome"] == "dry_run" and answer.json["changed"] is False
    assert answer.json["process"]["pid"] == child.pid
    # A real HUP afterwards is counted once: the dry run's would have made it two.
    app.simulate_post(f"/process/{child.pid}/signal", json={"signal": "HUP"}, headers=AUTH)
    wait_until(lambda: hups(out) == 1, what="one HUP")
    assert hups(out) == 1 and child.poll() is None


@pytest.mark.parametrize("pid", [1, 2])
def test_init_and_kernel_threads_are_refused(pid):
    app = client(config(allow_root=True))
    answer = app.simulate_post(f"/process/{pid}/signal",
                               json={"signal": "KILL", "dry_run": True}, headers=AUTH)
    assert answer.json["outcome"] == "refused"
    assert ("init" if pid == 1 else "kernel thread") in answer.json["error"]


def test_a_kernel_thread_below_kthreadd_is_refused():
    kthreads = [p.pid for p in psutil.process_iter(["ppid"]) if p.info["ppid"] == 2]
    assert kthreads, "this test needs a host whose kernel threads are visible"
    app = client(config(allow_root=True))
    answer = app.simulate_post(f"/process/{kthreads[0]}/signal",
                               json={"signal": "TERM", "dry_run": True}, headers=AUTH)
    assert answer.json["outcome"] == "refused"
    assert "kernel thread" in answer.json["error"]


def test_roots_processes_only_when_allowed_and_users_restrict(children):
    assert os.geteuid() == 0, "this test starts a child as nobody, so it runs as root"
    # /bin/sleep: nobody may not run the test's Python (it lives under /root).
    nobody = children.spawn_argv(["/bin/sleep", "600"], user="nobody")
    rooted = children.spawn()
    app = client(config())
    refused = app.simulate_post(f"/process/{rooted.pid}/signal",
                                json={"signal": "TERM", "dry_run": True}, headers=AUTH)
    assert refused.json["outcome"] == "refused" and "root" in refused.json["error"]
    allowed = app.simulate_post(f"/process/{nobody.pid}/signal",
                                json={"signal": "TERM", "dry_run": True}, headers=AUTH)
    assert allowed.json["outcome"] == "dry_run"
    only_daemon = client(config(users=["daemon"]))
    answer = only_daemon.simulate_post(f"/process/{nobody.pid}/signal",
                                       json={"signal": "TERM"}, headers=AUTH)
    assert answer.json["outcome"] == "refused" and "users" in answer.json["error"]
    assert nobody.poll() is None


def test_signals_and_groups_restrict(children):
    app = client(config(allow_root=True, signals=["HUP"], groups=[{"comm": ["nginx"]}]))
    child = children.spawn()
    kill = app.simulate_post(f"/process/{child.pid}/signal", json={"signal": "KILL"},
                             headers=AUTH)
    assert kill.json["outcome"] == "refused" and "not allowed" in kill.json["error"]
    hup = app.simulate_post(f"/process/{child.pid}/signal", json={"signal": "HUP"},
                            headers=AUTH)
    assert hup.json["outcome"] == "refused" and "groups" in hup.json["error"]
    assert child.poll() is None


def test_gone_process_is_404(children):
    app = client(config(allow_root=True))
    child = children.spawn()
    child.kill()
    child.wait(timeout=10)
    answer = app.simulate_post(f"/process/{child.pid}/signal", json={"signal": "TERM"},
                               headers=AUTH)
    assert answer.status_code == 404 and answer.json["error"] == "process not found"


@pytest.mark.parametrize(("body", "status", "says"), [
    (b"", 400, "JSON object"),
    (b"{", 400, "not valid JSON"),
    (b"[]", 400, "JSON object"),
    (b'{"signal": "STOP"}', 400, "signal must be one of"),
    (b'{"signal": 15}', 400, "signal must be one of"),
    (b'{}', 400, "signal is required"),
    (b'{"signal": "TERM", "force": true}', 400, "unknown key 'force'"),
    (b'{"signal": "TERM", "start_time": "yesterday"}', 400, "start_time"),
    (b'{"signal": "TERM", "match": {"name": ""}}', 400, "match.name"),
    (b'{"signal": "TERM", "match": {"user": "x"}}', 400, "match must be"),
    (b'{"signal": "TERM", "dry_run": "yes"}', 400, "dry_run"),
    (b'{"signal": "TERM", "job_id": "' + b"x" * 200 + b'"}', 400, "job_id"),
    (b'{"signal": "TERM", "pad": "' + b"x" * 5000 + b'"}', 413, "at most 4096"),
])
def test_bad_bodies_are_4xx(body, status, says):
    app = client(config(allow_root=True))
    answer = app.simulate_post(f"/process/{os.getpid()}/signal", body=body, headers=AUTH)
    assert answer.status_code == status
    assert says in answer.json["details"]


# -- configuration and the pure decision --------------------------------------------------------

def test_config_problems_are_named_by_key_path():
    with pytest.raises(ConfigError) as caught:
        from_mapping({"actions": {"signal": {"enabled": "yes", "signals": ["TERM", "STOP"],
                                             "users": ["root"], "groups": [{"bogus": 1}],
                                             "extra": 1}, "other": 2}})
    text = str(caught.value)
    for path in ("actions.other", "actions.signal.extra", "actions.signal.enabled",
                 "actions.signal.signals[1]", "actions.signal.users",
                 "actions.signal.groups[0]"):
        assert path in text, path


def sample(**fields: object) -> Sample:
    base: dict = dict(pid=4242, comm="app", state="S", ppid=100, start_ticks=1,
                      create_time=1_700_000_000.0, utime=0.0, stime=0.0, num_threads=1,
                      minflt=0, majflt=0, vsize=4096, rss=4096, uid=1000, cmdline=["app"])
    base.update(fields)
    return Sample(**base)


def decide(policy: SignalPolicy, request: SignalRequest, s: Sample, user: str = "app"
           ) -> str | None:
    found = refusal(policy, request, s, user=lambda: user, self_pid=999)
    return None if found is None else f"{found.kind}: {found.reason}"


def test_refusal_table():
    policy = parse_signal_policy({"enabled": True}, Problems())
    term = SignalRequest(pid=4242, signal="TERM")
    assert decide(policy, term, sample()) is None
    assert "init" in decide(policy, term, sample(pid=1))
    assert "this exporter" in decide(policy, term, sample(pid=999))
    assert "kernel thread" in decide(policy, term, sample(ppid=2, cmdline=[]))
    assert "kernel thread" in decide(policy, term, sample(vsize=0, cmdline=[], ppid=0))
    assert "zombie" in decide(policy, term, sample(state="Z", vsize=0, cmdline=[]))
    assert "root" in decide(policy, term, sample(uid=0), user="root")
    assert decide(SignalPolicy(enabled=True, allow_root=True), term, sample(uid=0)) is None
    started = SignalRequest(pid=4242, signal="TERM", start_time=rfc3339(1_700_000_000.0))
    assert decide(policy, started, sample()) is None
    assert decide(policy, started, sample(create_time=1_700_000_001.0)).startswith("mismatch")
    named = SignalRequest(pid=4242, signal="TERM", name="other")
    assert decide(policy, named, sample()).startswith("mismatch")
    grouped = SignalPolicy(enabled=True, groups=parse_groups([{"comm": ["app"]}], Problems()))
    assert decide(grouped, term, sample()) is None
    assert "groups" in decide(grouped, term, sample(comm="other"))
    assert decide(policy, term, sample(uid=None)) is not None


def test_signal_names_are_one_list():
    """The exporter's allowed signals are procfleet.signals' names, all real signals."""
    from procfleet.signals import SIGNAL_NAMES
    assert SignalPolicy().signals == frozenset(SIGNAL_NAMES)
    for name in SIGNAL_NAMES:
        assert isinstance(getattr(signal, f"SIG{name}"), int)
