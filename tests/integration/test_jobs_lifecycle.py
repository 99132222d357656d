"""Batch jobs and the user's other lives on the hub: a job running as the user survives the stop of their Jupyter
server (which still ends the server's own leftovers), with a cgroup per server and with rlimits; removing the user
cancels their queued and running jobs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import requests

from hubclient import wait_for
from spinnaker_jupyter.jobs.store import Store
from test_jobs import _ended, start_jobs_hub

# Waits for a marker the test makes, then writes an output: no sleep decides the outcome.
WAITING = """
import os, pathlib, time
m = pathlib.Path({marker!r})
pathlib.Path({pidfile!r}).write_text(str(os.getpid()))
print("waiting", flush=True)
while not m.exists():
    time.sleep(0.1)
pathlib.Path("done.txt").write_text("survived")
print("done", flush=True)
"""


def _markers():
    tag = uuid.uuid4().hex[:10]
    return Path(f"/tmp/jobs-lifecycle-{tag}"), Path(f"/tmp/jobs-lifecycle-{tag}.pid")


def _submit(hub, name: str, script: str) -> str:
    r = requests.post(
        hub.jobs_url + "/jobs/",
        headers={"Authorization": f"Bearer {hub.users[name].token}"},
        json={"code": script, "collab": f"private-{name}", "hardware_platform": "SpiNNaker"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return r.json()["resource_uri"]


def _job(hub, name: str, uri: str) -> dict:
    r = requests.get(
        hub.jobs_url + uri + "?with_log=true", headers={"Authorization": f"Bearer {hub.users[name].token}"}, timeout=30
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def cgroup_hub(hub_factory):
    hub = start_jobs_hub(hub_factory)
    hub.users = {"jlena": hub.client("jlena", hub.add_user("jlena"))}
    return hub


@pytest.fixture(scope="module")
def rlimits_hub(hub_factory):
    """No cgroup per server (the spawner falls back to rlimits), and one job at a time so that jobs queue."""
    hub = start_jobs_hub(hub_factory, {"concurrency": 1}, {"spawner": {"local": {"limits": "rlimits"}}})
    hub.users = {name: hub.client(name, hub.add_user(name)) for name in ("jmika", "jnora")}
    return hub


@pytest.mark.parametrize("which", ["cgroup_hub", "rlimits_hub"])
def test_a_running_job_survives_the_users_server_stop(request, which):
    hub = request.getfixturevalue(which)
    name = next(iter(hub.users))
    user = hub.users[name]
    marker, pidfile = _markers()
    user.start_server()
    try:
        kernel = user.start_kernel("spynnaker")
        out = user.execute(
            kernel, "import subprocess\np = subprocess.Popen(['sleep', '600'], start_new_session=True)\nprint(p.pid)"
        )
        assert out["error"] is None, out
        leftover = int(out["stdout"].strip())  # the server's own leftover, in a session of its own like a job
        uri = _submit(hub, name, WAITING.format(marker=str(marker), pidfile=str(pidfile)))
        wait_for(lambda: "waiting" in _job(hub, name, uri)["log"], 90, "the job to run")
        job_pid = int(pidfile.read_text())
    finally:
        user.stop_server()
    try:
        wait_for(lambda: _ended(leftover), 15, "the server's leftover process to be ended")
        assert not _ended(job_pid), "the server's stop ended the user's batch job"
        assert _job(hub, name, uri)["status"] == "running"
        marker.touch()
        wait_for(lambda: _job(hub, name, uri)["status"] in ("finished", "error"), 60, "the job to end")
        job = _job(hub, name, uri)
        assert job["status"] == "finished", job["log"]
        assert "done" in job["log"] and [f["path"] for f in job["output_data"]["files"]] == ["done.txt"]
    finally:
        marker.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)


def test_user_remove_cancels_their_queued_and_running_jobs(rlimits_hub):
    hub, name = rlimits_hub, "jnora"
    marker, pidfile = _markers()
    try:
        running = _submit(hub, name, WAITING.format(marker=str(marker), pidfile=str(pidfile)))
        wait_for(lambda: "waiting" in _job(hub, name, running)["log"], 90, "the first job to run")
        queued = _submit(hub, name, "print('should never run')")  # concurrency 1: it waits behind the first
        assert _job(hub, name, queued)["status"] == "submitted"
        job_pid = int(pidfile.read_text())

        r = hub.cli("user", "remove", name)
        assert r.returncode == 0, r.stderr
        assert "1 queued and 1 running batch job(s) cancelled" in r.stdout, r.stdout

        store = Store(f"sqlite:///{hub.base / 'data' / 'jobs' / 'jobs.sqlite'}")
        ids = [int(uri.rstrip("/").rsplit("/", 1)[1]) for uri in (running, queued)]
        wait_for(lambda: all(store.get(i).status == "removed" for i in ids), 30, "both jobs to be removed")
        assert _ended(job_pid), "the running job's process outlived its user's removal"
        logs = [(hub.base / "data" / "jobs" / "logs" / f"{i}.log").read_text() for i in ids]
        assert all(f"cancelled because the account {name} was removed" in text for text in logs), logs
        assert "should never run" not in logs[1]
        # The running job's runner says why it stopped it: the operator, not its owner, cancelled it.
        said = "the job was cancelled because the account was removed by an operator (user remove); its outputs"
        assert said in logs[0] and "by its owner" not in logs[0], logs[0]
        store.engine.dispose()
    finally:
        marker.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)
