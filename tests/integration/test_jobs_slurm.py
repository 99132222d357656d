"""Batch jobs on Slurm (`jobs.executor: slurm`), through the real hub's job service and the unmodified nmpi client, on
the real one-node Slurm the tests start (tests/slurm_fixtures.py): a job runs as a Slurm job under the user's own
account and its log and outputs come back; it takes a SpiNNaker board licence and, while the boards are taken, its
log says it waits in the Slurm queue and why; Slurm's own time limit is lowered to the runner's and a margin once
the command runs; the runner's time limit, a cancel and an operator's scancel end the Slurm job and say so; a partition Slurm does not have, and a Slurm that is down, are one clear line naming the key.
In session mode (the spalloc double) a job waiting in the Slurm queue holds no board: it claims one when Slurm runs
it, and one scancelled or cancelled while queued never claims one."""

from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path

import pytest
import requests

import test_jobs
from conftest import free_port, secret_file, traversable_tmpdir
from doubles.spalloc_server import SpallocDouble
from hubclient import wait_for
from test_jobs import _ended, _service_pid, client_for, start_jobs_hub, wait_done
from test_jobs_boards import FIRST_IP, HUB_TOKEN, JOB

nmpi = test_jobs.nmpi_module  # (the fixture, under the name these tests ask for)

PREFIX = "sjtest-"  # system accounts of their own: other suites' hubs on this machine have their jupyter-<name>

PRINTS = """
import os, pathlib, pwd
print("slurm job", os.environ.get("SLURM_JOB_ID"), "as", pwd.getpwuid(os.getuid()).pw_name, flush=True)
pathlib.Path("out.txt").write_text("from slurm " + os.environ.get("SLURM_JOB_ID", "none"))
"""
FOREVER = "import time\nprint('working', flush=True)\nwhile True:\n    time.sleep(0.2)\n"


def jobs_slurm_config(slurm, **jobs_slurm) -> dict:
    return {
        "spawner": {
            "local": {"system_user_prefix": PREFIX},
            "slurm": {"conf": str(slurm.conf), "partition": slurm.partition},
        },
        # machine mode: each job takes one board licence (a lab's own board; jobs run virtual in this release)
        "spinnaker": {"mode": "machine", "machine_name": "192.0.2.1"},
    }, {"executor": "slurm", "slurm": jobs_slurm, "limits": {"wall_time": 120, "memory_mb": 512, "output_mb": 2}}


@pytest.fixture(scope="module")
def hub(hub_factory, slurm):
    extra, jobs = jobs_slurm_config(slurm)
    hub = start_jobs_hub(hub_factory, jobs, extra)
    hub.users = {name: hub.client(name, hub.add_user(name)) for name in ("sjsam", "sjkim")}
    return hub


def slurm_id_of(log: str) -> str:
    found = re.search(r"Submitted to Slurm as job (\d+)", log)
    assert found, log
    return found.group(1)


def slurm_state(slurm, slurm_id: str) -> str:
    out = slurm.run("scontrol", "-o", "show", "job", slurm_id)
    found = re.search(r"JobState=(\S+)", out.stdout)
    return found.group(1) if found else "GONE"


def test_job_runs_as_a_slurm_job_under_the_users_account(hub, slurm, nmpi, tmp_path):
    client = client_for(nmpi, hub, "sjsam")
    job = wait_done(client, client.submit_job(source=PRINTS, platform="SpiNNaker", collab_id="private-sjsam"))
    assert job["status"] == "finished", job["log"]
    slurm_id = slurm_id_of(job["log"])
    assert f"slurm job {slurm_id} as {PREFIX}sjsam" in job["log"]
    assert "licenses=spinnaker_board:1" in job["log"] and "partition=spinnaker" in job["log"], job["log"]
    assert f"Slurm job {slurm_id} runs on" in job["log"]
    client.download_data(job, local_dir=str(tmp_path))
    assert (tmp_path / "out.txt").read_text() == f"from slurm {slurm_id}"
    assert "slurm.out" not in str(job["output_data"]["files"])  # the runner's own file is no output


def test_a_job_waits_in_the_slurm_queue_for_a_board_and_says_why(hub, slurm, nmpi):
    client = client_for(nmpi, hub, "sjkim")
    blocker = slurm.run("sbatch", "--parsable", "--licenses=spinnaker_board:2", "--mem=64", "--wrap", "sleep 600")
    assert blocker.returncode == 0, blocker.stderr
    try:
        wait_for(lambda: slurm_state(slurm, blocker.stdout.strip()) == "RUNNING", 30, "the job holding both boards")
        uri = client.submit_job(source=PRINTS, platform="SpiNNaker", collab_id="private-sjkim")
        waiting = "waiting in the Slurm queue: position 1, reason Licenses (all SpiNNaker boards are in use"
        wait_for(lambda: waiting in client.get_job(uri, with_log=True)["log"], 60, "the job to say it waits")
        assert client.job_status(uri) == "submitted"  # (its command has not run yet)
    finally:
        slurm.run("scancel", blocker.stdout.strip())
    job = wait_done(client, uri)
    assert job["status"] == "finished", job["log"]
    assert job["log"].index(waiting) < job["log"].index(f"Slurm job {slurm_id_of(job['log'])} runs on"), job["log"]


def test_time_limit_ends_the_slurm_job_as_error(hub, slurm, nmpi):
    client = client_for(nmpi, hub, "sjsam")
    job = wait_done(
        client,
        client.submit_job(source=FOREVER, platform="SpiNNaker", collab_id="private-sjsam", config={"time_limit": 3}),
    )
    assert job["status"] == "error"
    assert "The job ran for longer than its time limit of 3 s and was stopped" in job["log"], job["log"]
    assert "working" in job["log"]
    wait_for(lambda: slurm_state(slurm, slurm_id_of(job["log"])) in ("CANCELLED", "GONE"), 30, "the Slurm job to end")


def slurm_time_limit(slurm, slurm_id: str) -> str:
    out = slurm.run("scontrol", "-o", "show", "job", slurm_id)
    found = re.search(r"TimeLimit=(\S+)", out.stdout)
    assert found, out.stdout + out.stderr
    return found.group(1)


def test_slurms_time_limit_is_the_runners_and_a_margin_once_the_command_runs(hub, slurm, nmpi):
    """Queued, the Slurm job's limit covers the longest wait for its go (spinnaker.claim_timeout 600 s + 120 s) and
    its run; once the command runs, Slurm's limit (as scontrol shows it) is lowered to the time run so far plus the
    runner's own limit (60 s here) and a minute, whole minutes: 3 minutes, not the 14 it was submitted with."""
    client = client_for(nmpi, hub, "sjkim")
    blocker = slurm.run("sbatch", "--parsable", "--licenses=spinnaker_board:2", "--mem=64", "--wrap", "sleep 600")
    assert blocker.returncode == 0, blocker.stderr
    try:
        wait_for(lambda: slurm_state(slurm, blocker.stdout.strip()) == "RUNNING", 30, "the job holding both boards")
        uri = client.submit_job(
            source=FOREVER, platform="SpiNNaker", collab_id="private-sjkim", config={"time_limit": 60}
        )
        wait_for(lambda: "waiting in the Slurm queue" in client.get_job(uri, with_log=True)["log"], 60, "the queue")
        slurm_id = slurm_id_of(client.get_job(uri, with_log=True)["log"])
        queued = slurm_time_limit(slurm, slurm_id)
    finally:
        slurm.run("scancel", blocker.stdout.strip())
    wait_for(lambda: "working" in client.get_job(uri, with_log=True)["log"], 60, "the job to work")
    running = slurm_time_limit(slurm, slurm_id)
    print(f"Slurm's TimeLimit of a job with a 60 s limit: {queued} queued, {running} once its command runs")
    assert (queued, running) == ("00:14:00", "00:03:00")
    r = requests.delete(hub.jobs_url + uri, headers={"Authorization": f"Bearer {hub.users['sjkim'].token}"}, timeout=30)
    assert r.status_code == 200, r.text
    wait_for(lambda: slurm_state(slurm, slurm_id) in ("CANCELLED", "GONE"), 30, "the Slurm job to end")


def test_cancel_scancels_the_slurm_job(hub, slurm, nmpi):
    client = client_for(nmpi, hub, "sjsam")
    uri = client.submit_job(source=FOREVER, platform="SpiNNaker", collab_id="private-sjsam")
    wait_for(lambda: "working" in client.get_job(uri, with_log=True)["log"], 60, "the job to work")
    slurm_id = slurm_id_of(client.get_job(uri, with_log=True)["log"])
    r = requests.delete(hub.jobs_url + uri, headers={"Authorization": f"Bearer {hub.users['sjsam'].token}"}, timeout=30)
    assert r.status_code == 200, r.text
    wait_for(lambda: client.job_status(uri) == "removed", 30, "the job to be removed")
    wait_for(lambda: slurm_state(slurm, slurm_id) in ("CANCELLED", "GONE"), 30, "the Slurm job to end")


def test_an_operators_scancel_is_an_error_in_words(hub, slurm, nmpi):
    client = client_for(nmpi, hub, "sjkim")
    uri = client.submit_job(source=FOREVER, platform="SpiNNaker", collab_id="private-sjkim")
    wait_for(lambda: "working" in client.get_job(uri, with_log=True)["log"], 60, "the job to work")
    slurm.run("scancel", slurm_id_of(client.get_job(uri, with_log=True)["log"]))
    job = wait_done(client, uri, timeout=60)
    assert job["status"] == "error"
    assert "the Slurm job was cancelled outside this service" in job["log"], job["log"]


def test_unknown_partition_is_one_line_naming_the_key(hub_factory, slurm, nmpi):
    extra, jobs = jobs_slurm_config(slurm, partition="nosuchpartition")
    bad = start_jobs_hub(hub_factory, jobs, extra)
    # A user of its own: the module's hub, a live deployment with the same prefix, keeps sjsam's account.
    bad.users = {"sjpat": bad.client("sjpat", bad.add_user("sjpat"))}
    client = client_for(nmpi, bad, "sjpat")
    job = wait_done(client, client.submit_job(source=PRINTS, platform="SpiNNaker", collab_id="private-sjpat"))
    assert job["status"] == "error"
    assert (
        "Slurm refused the job: the partition 'nosuchpartition' does not exist; set jobs.slurm.partition" in job["log"]
    ), job["log"]


def test_slurm_down_is_one_clear_line_not_a_hang(hub_factory, slurm, nmpi):
    down = traversable_tmpdir("jobs-slurm-down-") / "slurm.conf"  # the controller's port: nobody listens there
    down.write_text(
        "\n".join(
            f"SlurmctldPort={free_port()}" if line.startswith("SlurmctldPort=") else line
            for line in slurm.conf.read_text().splitlines()
        )
        + "\n"
    )
    down.chmod(0o644)
    extra, jobs = jobs_slurm_config(slurm)
    extra["spawner"]["slurm"]["conf"] = str(down)
    bad = start_jobs_hub(hub_factory, jobs, extra)
    bad.users = {"sjron": bad.client("sjron", bad.add_user("sjron"))}  # (as above: not the module hub's sjkim)
    client = client_for(nmpi, bad, "sjron")
    job = wait_done(
        client, client.submit_job(source=PRINTS, platform="SpiNNaker", collab_id="private-sjron"), timeout=90
    )
    assert job["status"] == "error"
    assert (
        "Slurm refused the job: the Slurm cluster is not answering (its controller cannot be reached)" in job["log"]
    ), job["log"]


# --- session mode: the board is claimed when Slurm runs the job, not while it waits in the Slurm queue -------------
QUEUED = "waiting in the Slurm queue: position 1, reason Licenses (all SpiNNaker boards are in use"


@pytest.fixture(scope="module")
def double():
    d = SpallocDouble(boards=1, tokens={HUB_TOKEN: "hub"}, admins=["hub"], power_delay=0.1, wait_timeout=3.0).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def session_hub(hub_factory, slurm, double, tmp_path_factory):
    token_file = secret_file(tmp_path_factory, HUB_TOKEN)
    extra, jobs = jobs_slurm_config(slurm)
    extra["spinnaker"] = {
        "mode": "session",
        "claim_timeout": 300,
        "on_timeout": "fail",
        "spalloc": {"url": double.url, "token_file": str(token_file), "keepalive_interval": 30},
    }
    hub = start_jobs_hub(hub_factory, {**jobs, "concurrency": 2}, extra)
    hub.users = {"sjlee": hub.client("sjlee", hub.add_user("sjlee"))}
    return hub


@pytest.fixture
def markers():
    made = [Path("/tmp") / f"jobs-slurm-{uuid.uuid4().hex[:10]}-{i}" for i in range(2)]
    yield made
    for path in made:
        path.unlink(missing_ok=True)


@pytest.fixture
def licences_taken(slurm):
    """Takes `n` of the cluster's 2 board licences with a Slurm job of the operator's own, until the test ends."""
    taken = []

    def take(n: int) -> str:
        blocker = slurm.run(
            "sbatch", "--parsable", f"--licenses=spinnaker_board:{n}", "--mem=64", "--wrap", "sleep 600"
        )
        assert blocker.returncode == 0, blocker.stderr
        taken.append(blocker.stdout.strip())
        wait_for(lambda: slurm_state(slurm, taken[-1]) == "RUNNING", 30, "the operator's job holding the licences")
        return taken[-1]

    yield take
    for slurm_id in taken:
        slurm.run("scancel", slurm_id)


def claims(double, since: set) -> list[dict]:
    """The spalloc jobs (claims, queued or not) made for the test user's batch jobs since `since`."""
    return [j for j in double.jobs() if j["owner"] == "sjlee" and j["id"] not in since]


def log_of(client, uri) -> str:
    return client.get_job(uri, with_log=True)["log"]


def test_a_job_queued_for_a_licence_claims_no_board_until_slurm_runs_it(
    session_hub, double, slurm, nmpi, markers, licences_taken
):
    client = client_for(nmpi, session_hub, "sjlee")
    before = {j["id"] for j in double.jobs()}
    licences_taken(1)  # the cluster's one licence left goes to the first job
    first = client.submit_job(
        source=JOB.format(marker=str(markers[0])), platform="SpiNNaker", collab_id="private-sjlee"
    )
    wait_for(lambda: "MACHINE" in log_of(client, first), 120, "the first job to run with its board")
    [held] = claims(double, before)
    second = client.submit_job(
        source=JOB.format(marker=str(markers[1])), platform="SpiNNaker", collab_id="private-sjlee"
    )
    wait_for(lambda: QUEUED in log_of(client, second), 60, "the second job to wait in the Slurm queue")
    assert claims(double, before) == [held] and held["state"] == "READY"  # no claim for the queued job
    assert "Claiming" not in log_of(client, second)

    markers[0].write_text("finish")
    assert wait_done(client, first)["status"] == "finished"
    wait_for(lambda: "MACHINE" in log_of(client, second), 120, "the second job to run with its board")
    [mine] = [j for j in claims(double, before) if j["id"] != held["id"]]
    assert double.job(held["id"])["state"] == "DESTROYED" and mine["state"] == "READY"
    markers[1].write_text("finish")
    done = wait_done(client, second)
    assert done["status"] == "finished", done["log"]
    log = done["log"]
    steps = [
        QUEUED,
        f"Slurm job {slurm_id_of(log)} runs on",
        "Claiming a SpiNNaker board",
        "Running: python",
        "MACHINE",
    ]
    assert [log.index(s) for s in steps] == sorted(log.index(s) for s in steps), log  # in the order they happened
    assert f"BOARD {FIRST_IP}" in log and f"SpiNNaker board {FIRST_IP} given back" in log, log
    double.wait_for(lambda d: d.job(mine["id"])["state"] == "DESTROYED", 20, what="the second board to be given back")


@pytest.mark.parametrize("ending", ["scancel", "cancel"])
def test_a_job_ended_while_queued_never_claims_a_board(
    session_hub, double, slurm, nmpi, markers, licences_taken, ending
):
    client = client_for(nmpi, session_hub, "sjlee")
    before = {j["id"] for j in double.jobs()}
    licences_taken(2)
    uri = client.submit_job(source=JOB.format(marker=str(markers[0])), platform="SpiNNaker", collab_id="private-sjlee")
    wait_for(lambda: QUEUED in log_of(client, uri), 60, "the job to wait in the Slurm queue")
    slurm_id = slurm_id_of(log_of(client, uri))
    if ending == "scancel":  # an operator's
        slurm.run("scancel", slurm_id)
        job = wait_done(client, uri, timeout=60)
        assert job["status"] == "error"
        assert "The Slurm job was cancelled outside this service" in job["log"], job["log"]
        assert "before its command ran" in job["log"], job["log"]
    else:  # the user's
        r = requests.delete(
            session_hub.jobs_url + uri,
            headers={"Authorization": f"Bearer {session_hub.users['sjlee'].token}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        wait_for(lambda: client.job_status(uri) == "removed", 60, "the job to be removed")
        assert "while it waited in the Slurm queue" in log_of(client, uri)
        wait_for(lambda: slurm_state(slurm, slurm_id) in ("CANCELLED", "GONE"), 30, "the Slurm job to end")
    assert claims(double, before) == [] and "Claiming" not in log_of(client, uri)


def test_an_operators_scancel_of_a_running_job_gives_its_board_back(session_hub, double, slurm, nmpi, markers):
    client = client_for(nmpi, session_hub, "sjlee")
    before = {j["id"] for j in double.jobs()}
    uri = client.submit_job(source=JOB.format(marker=str(markers[0])), platform="SpiNNaker", collab_id="private-sjlee")
    wait_for(lambda: "MACHINE" in log_of(client, uri), 120, "the job to run with its board")
    [held] = claims(double, before)
    slurm.run("scancel", slurm_id_of(log_of(client, uri)))
    job = wait_done(client, uri, timeout=60)
    assert job["status"] == "error" and "the Slurm job was cancelled outside this service" in job["log"], job["log"]
    assert f"SpiNNaker board {FIRST_IP} given back" in job["log"], job["log"]
    double.wait_for(lambda d: d.job(held["id"])["state"] == "DESTROYED", 20, what="the board to be given back")


@pytest.mark.parametrize("how", ["service killed", "hub restarted"])
def test_a_job_queued_when_the_service_stops_is_scancelled_and_runs_once_more(
    session_hub, double, slurm, nmpi, markers, licences_taken, how
):
    """kill -9 of the job service: its successor scancels the Slurm job the dead one left (the batch script would
    also give up waiting for its go); a clean stop scancels it at once. The job is queued again, still holds no
    board, and claims one only when Slurm runs its second attempt."""
    client = client_for(nmpi, session_hub, "sjlee")
    before = {j["id"] for j in double.jobs()}
    blocker = licences_taken(2)
    uri = client.submit_job(source=JOB.format(marker=str(markers[0])), platform="SpiNNaker", collab_id="private-sjlee")
    wait_for(lambda: QUEUED in log_of(client, uri), 60, "the job to wait in the Slurm queue")
    first = slurm_id_of(log_of(client, uri))
    if how == "service killed":
        pid = _service_pid(session_hub)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _ended(pid), 30, "the killed job service to end")
    else:
        session_hub.stop()
        session_hub.start()
    wait_for(lambda: slurm_state(slurm, first) in ("CANCELLED", "GONE"), 60, "the first Slurm job to be scancelled")

    def attempts() -> list[str]:
        try:
            return re.findall(r"Submitted to Slurm as job (\d+)", log_of(client, uri))
        except requests.ConnectionError:  # the successor scancels before it listens: not up yet
            return []

    wait_for(lambda: len(attempts()) == 2, 120, "the job to be queued in Slurm again")
    assert claims(double, before) == []
    slurm.run("scancel", blocker)
    wait_for(lambda: "MACHINE" in log_of(client, uri), 120, "the job to run with its board")
    [held] = claims(double, before)
    markers[0].write_text("finish")
    done = wait_done(client, uri)
    assert done["status"] == "finished" and done["provenance"]["attempt"] == 2, done["log"]
    double.wait_for(lambda d: d.job(held["id"])["state"] == "DESTROYED", 20, what="the board to be given back")
