"""Batch jobs on the deployment's boards (spinnaker.mode: session), end to end: a real hub with its job service, the
spalloc double (one board) as the only stand-in. A job holds a board while it runs (its sPyNNaker cfg names it) and
gives it back however it ends (finished, error, cancelled, time limit, the runner killed with -9); two jobs wait for
one board and the second says so; the hub's start-up reconciliation leaves a running job's board alone, and a hub
restart records the job's outcome once."""

from __future__ import annotations

import os
import signal
import textwrap
import uuid
from pathlib import Path

import pytest
import requests

from conftest import secret_file
from doubles.spalloc_server import SpallocDouble
from hubclient import wait_for
from test_jobs import _ended, _service_pid, start_jobs_hub

HUB_TOKEN = "hub-spalloc-token-for-jobs"
FIRST_IP = "10.11.192.1"

# Says what it was given, then waits for the test's marker (no sleep decides an outcome), then ends as told.
JOB = textwrap.dedent("""
    import os, pathlib, sys, time
    cfg = pathlib.Path(os.environ["XDG_CONFIG_DIRS"], ".spynnaker.cfg").read_text()
    print("MACHINE", [line for line in cfg.splitlines() if line.startswith(("machine_name", "virtual_board"))],
          "BOARD", os.environ.get("SPINNAKER_BOARD"), flush=True)
    marker = pathlib.Path({marker!r})
    while not marker.exists():
        time.sleep(0.1)
    ending = marker.read_text()
    if ending == "error":
        sys.exit(3)
    while ending == "hang":
        time.sleep(0.1)
    open("done.txt", "w").write("done")
""")


@pytest.fixture(scope="module")
def double():
    d = SpallocDouble(boards=1, tokens={HUB_TOKEN: "hub"}, admins=["hub"], power_delay=0.1, wait_timeout=3.0).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def hub(hub_factory, double, tmp_path_factory):
    token_file = secret_file(tmp_path_factory, HUB_TOKEN)
    h = start_jobs_hub(
        hub_factory,
        {"concurrency": 2},
        {
            "spinnaker": {
                "mode": "session",
                "claim_timeout": 300,
                "on_timeout": "fail",
                # 120 s: a killed job service is restarted at the hub's next look (every 5 s,
                # upstream.watch_services_every) and reconciles at its start; the restart test needs that before the
                # expiry, also on a loaded machine.
                "spalloc": {"url": double.url, "token_file": str(token_file), "keepalive_interval": 120},
            }
        },
    )
    h.users = {"jbea": h.client("jbea", h.add_user("jbea"))}
    return h


@pytest.fixture
def marker():
    path = Path("/tmp") / f"jobs-boards-{uuid.uuid4().hex[:10]}"
    yield path
    path.unlink(missing_ok=True)


def submit(hub, script: str, config: dict | None = None) -> int:
    r = requests.post(
        hub.jobs_url + "/jobs/",
        headers={"Authorization": f"Bearer {hub.users['jbea'].token}"},
        json={"code": script, "collab": "private-jbea", "hardware_platform": "SpiNNaker", "hardware_config": config},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def job(hub, job_id: int) -> dict:
    def get():
        try:
            return requests.get(
                f"{hub.jobs_url}/jobs/{job_id}?with_log=true",
                timeout=30,
                headers={"Authorization": f"Bearer {hub.users['jbea'].token}"},
            ).json()
        except (requests.ConnectionError, requests.Timeout):  # (the service restarting)
            return None

    return wait_for(get, 60, "the job service to answer")


def ended(hub, job_id: int, timeout: float = 120) -> dict:
    wait_for(lambda: job(hub, job_id)["status"] in ("finished", "error", "removed"), timeout, f"job {job_id} to end")
    return job(hub, job_id)


def spalloc_jobs(double, state: str | None = None) -> list[dict]:
    return [j for j in double.jobs() if j["owner"] == "jbea" and (state is None or j["state"] == state)]


def lease_rows(hub) -> list:
    from spinnaker_jupyter import leases

    store = leases.LeaseStore(hub.base / "data" / "hub" / "spinnaker-leases.sqlite")
    try:
        return store.leases()
    finally:
        store.close()


def holding(hub, double, job_id: int) -> dict:
    """Wait until the job runs with its board; returns the spalloc job."""
    wait_for(lambda: "MACHINE" in job(hub, job_id)["log"], 120, f"job {job_id} to run with its board")
    [held] = spalloc_jobs(double, "READY")
    return held


@pytest.mark.parametrize("ending", ["finished", "error", "cancel", "timeout"])
def test_a_job_holds_a_board_while_it_runs_and_gives_it_back(hub, double, marker, ending):
    before = {j["id"] for j in double.jobs()}
    job_id = submit(hub, JOB.format(marker=str(marker)), {"time_limit": 8} if ending == "timeout" else None)
    held = holding(hub, double, job_id)
    assert held["id"] not in before
    running = job(hub, job_id)
    machine = f"MACHINE ['virtual_board = False', 'machine_name = {FIRST_IP}'] BOARD {FIRST_IP}"
    assert machine in running["log"], running["log"]  # the job's one cfg names its board
    assert f"SpiNNaker board {FIRST_IP} is this job's until it ends (spalloc job {held['id']})" in running["log"]
    [row] = lease_rows(hub)
    assert (row.holder, row.job_url.rstrip("/").rsplit("/", 1)[1], row.phase) == (
        f"job:{job_id}",
        str(held["id"]),
        "held",
    )
    shown = hub.cli("jobs", "show", str(job_id))
    assert f"detail:            running on SpiNNaker board {FIRST_IP}" in shown.stdout, shown.stdout

    if ending == "cancel":
        r = requests.delete(
            f"{hub.jobs_url}/jobs/{job_id}", timeout=30, headers={"Authorization": f"Bearer {hub.users['jbea'].token}"}
        )
        assert r.status_code == 200
    elif ending != "timeout":
        marker.write_text("error" if ending == "error" else "finish")
    else:
        marker.write_text("hang")
    done = ended(hub, job_id)
    assert done["status"] == {"finished": "finished", "cancel": "removed"}.get(ending, "error"), done["log"]
    if ending == "timeout":
        assert "longer than its time limit of 8 s" in done["log"]
    gone = double.wait_for(lambda d: d.job(held["id"])["state"] == "DESTROYED", 20, what="the board to be released")
    assert gone and double.job(held["id"])["reason"] == "the job's command ended", double.job(held["id"])
    assert f"SpiNNaker board {FIRST_IP} given back" in done["log"]
    assert lease_rows(hub) == []
    if ending == "finished":
        assert done["provenance"]["virtual_board"] is False and done["provenance"]["spinnaker_mode"] == "session"
        assert done["provenance"]["board"]["board"] == FIRST_IP and done["provenance"]["board_hours"] > 0
        assert done["resource_usage"]["value"] > 0


def test_two_jobs_wait_for_one_board_and_the_second_says_so(hub, double, marker):
    first = submit(hub, JOB.format(marker=str(marker)))
    holding(hub, double, first)
    second_marker = marker.with_name(marker.name + "-2")
    try:
        second = submit(hub, JOB.format(marker=str(second_marker)))
        waiting = "Waiting for a SpiNNaker board: all boards are in use and you are in the queue"
        wait_for(lambda: waiting in job(hub, second)["log"], 60, "the second job to say it waits for the board")
        listed = hub.cli("jobs", "list", "--state", "running")
        assert waiting in listed.stdout, listed.stdout  # the operator sees it in the job's state
        assert "MACHINE" not in job(hub, second)["log"]  # it has not run
        marker.write_text("finish")
        assert ended(hub, first)["status"] == "finished"
        holding(hub, double, second)  # the board went to the second job
        second_marker.write_text("finish")
        assert ended(hub, second)["status"] == "finished"
        double.wait_for(
            lambda d: not spalloc_jobs(d, "READY") and not spalloc_jobs(d, "QUEUED"),
            20,
            what="every board to be given back",
        )
    finally:
        second_marker.unlink(missing_ok=True)


def test_a_job_cancelled_while_it_waits_for_a_board_leaves_the_queue(hub, double, marker):
    first = submit(hub, JOB.format(marker=str(marker)))
    holding(hub, double, first)
    second = submit(hub, JOB.format(marker=str(marker) + "-never"))
    wait_for(lambda: "you are in the queue" in job(hub, second)["log"], 60, "the second job to wait for the board")
    [queued] = spalloc_jobs(double, "QUEUED")
    r = requests.delete(
        f"{hub.jobs_url}/jobs/{second}", timeout=30, headers={"Authorization": f"Bearer {hub.users['jbea'].token}"}
    )
    assert r.status_code == 200
    done = ended(hub, second, timeout=30)
    assert done["status"] == "removed" and "MACHINE" not in done["log"], done["log"]
    assert "The job was cancelled by its owner while it waited for a SpiNNaker board" in done["log"], done["log"]
    double.wait_for(lambda d: d.job(queued["id"])["state"] == "DESTROYED", 20, what="the queued claim to be withdrawn")
    marker.write_text("finish")
    assert ended(hub, first)["status"] == "finished"


def test_a_hub_start_leaves_a_running_jobs_board_alone(hub, double, marker):
    """The reconciliation a hub runs at its start (rows of other processes, no server holding them) meets a job
    holding its board: the board stays the job's, and is given back when the job ends."""
    import asyncio

    from spinnaker_jupyter import leases
    from spinnaker_jupyter.spalloc import SpallocAllocator

    job_id = submit(hub, JOB.format(marker=str(marker)))
    held = holding(hub, double, job_id)

    async def hub_start():
        alloc = SpallocAllocator(url=double.url, token=HUB_TOKEN, retries=1)
        store = leases.LeaseStore(hub.base / "data" / "hub" / "spinnaker-leases.sqlite")  # a new hub process
        try:
            return await leases.reconcile(store, alloc.client(), is_held=lambda lease: False)
        finally:
            store.close()
            await alloc.close()

    report = asyncio.run(hub_start())
    assert report.error is None and report.destroyed == [], report
    assert double.job(held["id"])["state"] == "READY"
    marker.write_text("finish")
    assert ended(hub, job_id)["status"] == "finished"
    double.wait_for(lambda d: d.job(held["id"])["state"] == "DESTROYED", 20, what="the board to be released")


@pytest.mark.parametrize("how", ["runner killed", "hub restarted"])
def test_a_stopped_runner_gives_the_board_back_and_the_job_runs_once_more(hub, double, marker, how):
    """kill -9 of the job service: its successor gives the dead runner's board back at its start. A hub restart
    (SIGTERM) stops the service cleanly, which gives it back at once. Either way the job goes back in the queue,
    runs again with a fresh board, and its outcome is recorded once."""
    job_id = submit(hub, JOB.format(marker=str(marker)))
    first = holding(hub, double, job_id)
    pid = _service_pid(hub)
    if how == "runner killed":
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _ended(pid), 30, "the killed job service to end")
    else:
        hub.stop()
        hub.start()
    double.wait_for(lambda d: d.job(first["id"])["state"] == "DESTROYED", 90, what="the first board to be released")
    wait = "the job service restarted" if how == "runner killed" else "the job service stopped"
    assert wait in double.job(first["id"])["reason"], double.job(first["id"])
    second = wait_for(
        lambda: [j for j in spalloc_jobs(double, "READY") if j["id"] != first["id"]],
        120,
        "the job to run again with a fresh board",
    )
    marker.write_text("finish")
    done = ended(hub, job_id)
    assert done["status"] == "finished" and done["provenance"]["attempt"] == 2, done["log"]
    assert done["log"].count("finished;") == 1 and "(attempt 1)" in done["log"]
    double.wait_for(lambda d: d.job(second[0]["id"])["state"] == "DESTROYED", 20, what="the second board released")
    assert lease_rows(hub) == []
