"""The suite's own guard (conftest.py, tests/processes.py): a test module that leaves a process running fails the run,
naming the process, its command line and the module, and the process is ended; a hub fixture leaves nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import processes

TESTS = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import subprocess

    def test_starts_a_process_and_forgets_it(tmp_path):
        # start_new_session, as JupyterHub starts its proxy, services and servers: out of the test's process group
        subprocess.Popen(["sleep", "{marker}"], start_new_session=True, cwd=tmp_path)
""")


SESSION_PROBE = textwrap.dedent("""
    import subprocess
    import pytest

    @pytest.fixture(scope="session")
    def service():
        proc = subprocess.Popen(["sleep", "{marker}"], start_new_session=True)
        yield proc
        {teardown}

    def test_uses_a_session_service(service):
        assert service.poll() is None
""")


def run_probe(tmp_path: Path, marker: str, probe: str = PROBE, args: tuple = (), **fmt) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(probe.format(marker=marker, **fmt))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "conftest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            *args,
            str(tmp_path / "test_probe.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        # a run of its own, not a worker of this one's (pytest-xdist's variables stay out)
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}, "PYTHONPATH": str(TESTS)},
    )


def test_a_module_that_leaves_a_process_fails_the_run_and_names_it(tmp_path):
    marker = "3217"  # an unusual sleep, so that the process is recognised below
    r = run_probe(tmp_path, marker)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "test_probe.py left 1 process(es) running" in out and f"sleep {marker}" in out, out
    left = [p for p in processes.table().values() if p.alive and p.cmdline == f"sleep {marker}"]
    assert left == [], "the guard ends what it reports"


def test_a_session_fixture_may_keep_a_process_until_the_session_ends_but_not_beyond(tmp_path):
    kept = run_probe(tmp_path, "3218", SESSION_PROBE, teardown="proc.terminate(); proc.wait()")
    assert kept.returncode == 0, kept.stdout + kept.stderr
    forgotten = run_probe(tmp_path, "3219", SESSION_PROBE, teardown="pass")
    out = forgotten.stdout + forgotten.stderr
    assert forgotten.returncode != 0, out
    assert "the test run left 1 process(es) running" in out and "sleep 3219" in out, out
    assert "session fixture service" in out, out
    assert [p for p in processes.table().values() if p.alive and p.cmdline == "sleep 3219"] == []


def test_a_parallel_run_reports_what_a_worker_left(tmp_path):
    """`make test` runs on pytest-xdist workers: what a worker's session left is reported by the run and fails it."""
    forgotten = run_probe(tmp_path, "3220", SESSION_PROBE, ("-n", "1", "--dist", "loadgroup"), teardown="pass")
    out = forgotten.stdout + forgotten.stderr
    assert forgotten.returncode != 0, out
    assert "the test run (worker gw0) left 1 process(es) running" in out and "sleep 3220" in out, out
    assert [p for p in processes.table().values() if p.alive and p.cmdline == "sleep 3220"] == []


def test_a_hub_fixture_leaves_nothing_behind(hub_factory):
    """A hub with a user server, kept through restarts (stop_servers_on_exit: false), stopped twice: the servers
    survive the restart, and the final stop ends every process of the hub."""
    hub = hub_factory({"hub": {"stop_servers_on_exit": False}, "culler": {"enabled": True}})
    user = hub.client("lena", hub.add_user("lena"))
    user.start_server()
    server = [p for p in hub.own_processes() if processes.SINGLEUSER in p.cmdline]
    assert len(server) == 1, hub.own_processes()
    hub.stop()
    assert processes.alive([server[0].key]), "the user's server lives on through a restart"
    hub.start()
    assert user.server("GET", "api/status").status_code == 200
    before = hub.own_processes()
    assert any("configurable-http-proxy" in p.cmdline for p in before)
    assert any("jupyterhub_idle_culler" in p.cmdline for p in before)
    hub.stop(final=True)
    assert hub.own_processes() == [] and processes.alive(p.key for p in before) == []


def test_a_killed_hub_leaves_no_proxy_or_service_behind(hub_factory):
    """The leak CI saw: a hub killed (or stopped with SIGKILL after a slow shutdown) cannot stop its proxy and
    services, which JupyterHub starts in sessions of their own; they were re-parented to init and ran on."""
    hub = hub_factory({"culler": {"enabled": True}})
    os.kill(hub.proc.pid, 9)
    hub.proc.wait()
    orphans = hub.own_processes()
    assert any("configurable-http-proxy" in p.cmdline for p in orphans), orphans
    assert any("jupyterhub_idle_culler" in p.cmdline for p in orphans), orphans
    assert all(p.ppid != hub.proc.pid for p in orphans)
    hub.stop(final=True)
    assert processes.alive(p.key for p in orphans) == []
