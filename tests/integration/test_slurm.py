"""User servers as Slurm jobs (`spawner.type: slurm`), through the real hub and proxy, on a real one-node Slurm
(tests/slurm_fixtures.py): the server runs as a job under the user's own account and opens JupyterLab; sPyNNaker
runs there; the spawn page shows the Slurm queue; a cancelled job is noticed by the hub's poll; bad input and a
Slurm that is down give one clear line."""

from __future__ import annotations

import time
from urllib.parse import urlparse

import pytest

from hubclient import wait_for
from test_hub import PYNN_NETWORK


def slurm_config(slurm, **over) -> dict:
    # (an account prefix of its own: other suites' hubs on this machine have their jupyter-alice)
    return {
        "spawner": {
            "type": "slurm",
            "poll_interval": 2,
            "local": {"system_user_prefix": "slurmtest-"},
            "slurm": {"conf": str(slurm.conf), "partition": slurm.partition, "memory": "1G", **over},
        },
        "culler": {"enabled": False},
    }


@pytest.fixture(scope="module")
def hub(hub_factory, slurm):
    return hub_factory(slurm_config(slurm))


@pytest.fixture(scope="module")
def alice(hub):
    return hub.client("alice", hub.add_user("alice"))


def spawn_outcome(user, timeout: float = 90) -> str:
    """What the browser shows when the user starts their server: the error page when the start fails at once, else
    the spawn page's progress messages (the last one says how it ended)."""
    import html

    r = user.session.get(f"{user.url}/hub/spawn/{user.name}", allow_redirects=False, timeout=timeout)
    if r.status_code == 302 and "spawn-pending" in r.headers["location"]:
        with user.api("GET", f"/users/{user.name}/server/progress", stream=True, timeout=timeout) as events:
            return "\n".join(line for line in events.iter_lines(decode_unicode=True) if line.startswith("data:"))
    return html.unescape(r.text)


def job_of(slurm, account: str) -> list[str]:
    """The user's Slurm jobs: 'id state user reason' lines."""
    return [j for j in slurm.jobs() if j.split()[2] == account]


def test_server_runs_as_a_slurm_job_under_the_users_account(hub, slurm, alice):
    messages = alice.progress_messages(timeout=120)
    text = "\n".join(messages)
    assert "Submitting your server to the Slurm cluster (partition spinnaker)" in text, messages
    assert "Slurm accepted your server as job" in text and "Your server is up after" in text, messages
    jobs = job_of(slurm, "slurmtest-alice")
    assert len(jobs) == 1 and jobs[0].split()[1] == "RUNNING", slurm.jobs()
    lab = alice.browse("lab")
    assert lab.status_code == 200 and "JupyterLab" in lab.text
    kernel = alice.start_kernel("python3")
    out = alice.execute(kernel, "import os, pwd; print(pwd.getpwuid(os.getuid()).pw_name, os.environ['SLURM_JOB_ID'])")
    assert out["stdout"].split() == ["slurmtest-alice", jobs[0].split()[0]], out


def test_spynnaker_kernel_runs_a_pynn_network_in_the_job(alice):
    kernel = alice.start_kernel("spynnaker")
    out = alice.execute(kernel, PYNN_NETWORK)
    assert out["error"] is None, out
    assert "PYNN-DONE" in out["stdout"] and "segments 1 spiketrains 20" in out["stdout"], out


def test_server_listens_only_on_the_nodes_slurm_address(alice):
    """batchspawner's servers listen on every interface (0.0.0.0): anyone on the node's network would reach the
    server's port. Here it is the node's Slurm address (NodeAddr; 127.0.0.1 on this one-node cluster)."""
    import subprocess

    kernel = alice.start_kernel("python3")
    out = alice.execute(kernel, "import os; print(os.environ['JUPYTERHUB_SERVICE_URL'])")
    url = urlparse(out["stdout"].strip())
    assert url.hostname == "127.0.0.1", out
    bound = subprocess.run(["ss", "-Hltn", f"sport = :{url.port}"], capture_output=True, text=True).stdout.split()
    assert bound[3] == f"127.0.0.1:{url.port}", bound


def test_spinnaker_status_is_on_the_servers_path(alice):
    kernel = alice.start_kernel("python3")
    out = alice.execute(
        kernel,
        "import shutil, subprocess\nprint(shutil.which('spinnaker-status'))\n"
        "print(subprocess.run(['spinnaker-status'], capture_output=True, text=True).stdout)",
    )
    assert out["error"] is None and "None" not in out["stdout"].splitlines()[0], out
    assert "virtual" in out["stdout"], out


def test_a_users_server_cannot_set_the_commands_the_hub_runs(hub, alice, tmp_path):
    """batchspawner's API handler sets any spawner attribute the JSON names, for the token of the user's own
    server: a user could make the hub run their command as root at its next poll or stop. Only the port is taken,
    and only during the start."""
    import requests

    if not (alice.server_model() or {}).get("ready"):
        alice.start_server()
    kernel = alice.start_kernel("python3")
    out = alice.execute(
        kernel, "import os; print(os.environ['JUPYTERHUB_API_URL'], os.environ['JUPYTERHUB_API_TOKEN'])"
    )
    api_url, token = out["stdout"].split()
    marker = tmp_path / "ran-as-root"
    tries = [{"exec_prefix": f"touch {marker};"}, {"batch_cancel_cmd": f"touch {marker}"}, {"port": 1234}]
    answers = [
        requests.post(
            api_url + "/batchspawner", json=body, headers={"Authorization": f"token {token}"}, timeout=30
        ).status_code
        for body in tries
    ]
    assert answers == [400, 400, 409], answers
    assert alice.browse("lab").status_code == 200  # its route still goes to its own port
    alice.stop_server()
    assert not marker.exists()


def test_batchspawner_api_handler_still_takes_any_attribute():
    """Fails once batchspawner's handler changes (or its version does): then check slurm.PortReportHandler."""
    import inspect

    import batchspawner
    from batchspawner.api import BatchSpawnerAPIHandler

    assert batchspawner.__version__ == "1.3.0"
    assert "setattr(spawner, key, value)" in inspect.getsource(BatchSpawnerAPIHandler.post)


def test_check_probes_slurm(slurm, tmp_path):
    """`spinnaker-jupyter check` says whether the controller answers, the partition exists and the board licence
    is configured, one line each, and fails when one of them is wrong."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    def check(**slurm_keys) -> tuple[int, str]:
        cfg = tmp_path / "check.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "data_dir": str(tmp_path / "data"),
                    "spinnaker": {"mode": "machine", "machine_name": "192.0.2.1"},
                    "spawner": {
                        "type": "slurm",
                        "slurm": {"conf": str(slurm.conf), "partition": slurm.partition, **slurm_keys},
                    },
                }
            )
        )
        p = subprocess.run(
            [str(Path(sys.executable).parent / "spinnaker-jupyter"), "check", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return p.returncode, p.stdout + p.stderr

    code, out = check()
    assert code == 0, out
    assert (
        "Slurm: the controller answers" in out
        and "Slurm: partition spinnaker (spawner.slurm.partition) is up" in out
        and "Slurm: licence spinnaker_board: 2 board(s)" in out
    ), out
    code, out = check(partition="nope", board_license="no_such_licence")
    assert code == 1, out
    assert "Slurm: no partition nope (spawner.slurm.partition); set it to one of: spinnaker" in out, out
    assert "Slurm: no licence no_such_licence for SpiNNaker boards" in out, out


def test_spawn_page_shows_the_slurm_queue_when_the_cluster_is_full(hub, slurm):
    import concurrent.futures

    bob = hub.client("bob", hub.add_user("bob"))
    # All the memory of the one node that no job holds taken by another job: bob's server has to wait in the queue.
    blocker = slurm.run("sbatch", "--parsable", f"--mem={slurm.free_memory_mb()}", "--wrap", "sleep 600")
    assert blocker.returncode == 0, blocker.stderr
    wait_for(
        lambda: any(j.split()[:2] == [blocker.stdout.strip(), "RUNNING"] for j in slurm.jobs()),
        30,
        "the job taking the whole node to run",
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        progress = pool.submit(bob.progress_messages, timeout=120)
        wait_for(
            lambda: "waiting in the Slurm queue: position 1, reason Resources" in hub.log(),
            60,
            "the spawn page to name the Slurm queue and why bob waits",
        )
        assert not (bob.server_model() or {}).get("ready")
        slurm.run("scancel", blocker.stdout.strip())
        messages = progress.result(timeout=120)
    assert [
        "Your server is waiting in the Slurm queue: position 1, reason Resources (the cluster's nodes "
        "are busy; you start when a server or job ends)"
    ] == [m for m in messages if "reason Resources" in m], messages
    assert any("Your server is up after" in m for m in messages), messages
    bob.stop_server()
    wait_for(lambda: not job_of(slurm, "slurmtest-bob"), 30, "bob's job to end when his server stops")


def test_a_cancelled_job_is_noticed_by_the_hubs_poll(hub, slurm, alice):
    if not (alice.server_model() or {}).get("ready"):
        alice.start_server()
    job = job_of(slurm, "slurmtest-alice")[0].split()[0]
    assert alice.browse("lab").status_code == 200
    assert slurm.run("scancel", job).returncode == 0
    # spawner.poll_interval is 2 s: the hub finds the job gone and takes the server off its list and the proxy.
    wait_for(lambda: alice.server_model() is None, 30, "the hub to notice that alice's Slurm job was cancelled")
    page = alice.browse("lab")  # no route to the node any more: the hub answers that the server is not running
    assert "/hub/" in page.url and "JupyterLab" not in page.text, (page.status_code, page.url)
    assert not job_of(slurm, "slurmtest-alice")


@pytest.fixture(scope="module")
def bad_hubs(hub_factory, slurm):
    """A hub naming a partition Slurm does not have, and a hub whose Slurm controller is down."""
    from conftest import free_port, traversable_tmpdir

    down = traversable_tmpdir("slurm-down-") / "slurm.conf"  # (the users' own sbatch reads it)

    down.write_text(
        "\n".join(
            f"SlurmctldPort={free_port()}" if line.startswith("SlurmctldPort=") else line
            for line in slurm.conf.read_text().splitlines()
        )
        + "\n"
    )
    down.chmod(0o644)
    return {
        "partition": hub_factory(slurm_config(slurm, partition="nope")),
        "down": hub_factory(
            {
                **slurm_config(slurm),
                "spawner": {
                    **slurm_config(slurm)["spawner"],
                    "slurm": {**slurm_config(slurm)["spawner"]["slurm"], "conf": str(down)},
                },
            }
        ),
    }


def test_an_unknown_partition_is_one_clear_spawn_error_naming_the_key(bad_hubs):
    hub = bad_hubs["partition"]
    carol = hub.client("carol", hub.add_user("carol"))
    shown = spawn_outcome(carol)
    assert "spawner.slurm.partition" in shown and "the partition 'nope' does not exist" in shown, shown
    assert carol.server_model() is None


def test_slurm_down_is_a_clear_error_not_a_hang(bad_hubs):
    hub = bad_hubs["down"]
    dave = hub.client("dave", hub.add_user("dave"))
    t0 = time.monotonic()
    shown = spawn_outcome(dave)
    assert "The Slurm cluster is not answering" in shown and "try again in a few minutes" in shown, shown
    assert time.monotonic() - t0 < 60
    assert dave.server_model() is None


# ------------------------------------------------------------------------------------------------ boards as licences
@pytest.fixture(scope="module")
def boards_hub(hub_factory, slurm, tmp_path_factory):
    """Session mode: each server claims a board from the spalloc double (3 boards) and takes one of the cluster's 2
    `spinnaker_board` licences, so Slurm runs at most 2 such servers at once."""
    from doubles.spalloc_server import SpallocDouble

    double = SpallocDouble(
        boards=3, tokens={"hub-token": "hub"}, admins=["hub"], power_delay=0.2, wait_timeout=5.0
    ).start()
    token = tmp_path_factory.mktemp("secrets") / "spalloc-token"
    token.write_text("hub-token\n")
    token.chmod(0o600)
    hub = hub_factory(
        {
            **slurm_config(slurm),
            "hub": {"stop_servers_on_exit": False},
            "spinnaker": {
                "mode": "session",
                "claim_timeout": 120,
                "on_timeout": "fail",
                "spalloc": {"url": double.url, "token_file": str(token), "keepalive_interval": 30},
            },
        }
    )
    users = {name: hub.client(name, hub.add_user(name)) for name in ("erin", "frank", "gina")}
    yield hub, double, users
    for user in users.values():
        if user.server_model() is not None:
            user.stop_server()
    double.stop()


def licences_used(slurm) -> int:
    import re

    return int(re.search(r"Used=(\d+)", slurm.run("scontrol", "show", "lic", "-o").stdout).group(1))


def test_a_third_session_waits_for_a_board_licence_and_starts_when_one_is_given_back(boards_hub, slurm):
    import concurrent.futures

    hub, double, users = boards_hub
    users["erin"].start_server()
    users["frank"].start_server()
    assert licences_used(slurm) == 2
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        progress = pool.submit(users["gina"].progress_messages, timeout=180)
        wait_for(lambda: "reason Licenses" in hub.log(), 60, "gina's server to wait for a board licence")
        assert not (users["gina"].server_model() or {}).get("ready")
        # Waiting in the Slurm queue, her server holds no board (3 at the service, 2 licences): claimed once it runs.
        assert not [j for j in double.jobs() if j["owner"] == "gina"], double.jobs()
        users["erin"].stop_server()
        messages = progress.result(timeout=180)
    assert (
        "Your server is waiting in the Slurm queue: position 1, reason Licenses (all SpiNNaker boards are in use; "
        "you start when one is given back)" in messages
    ), messages
    assert users["gina"].server_model()["ready"] and licences_used(slurm) == 2
    assert [j["state"] for j in double.jobs() if j["owner"] == "erin"] == ["DESTROYED"]
    [board] = [j for j in double.jobs() if j["owner"] == "gina"]
    kernel = users["gina"].start_kernel("python3")
    out = users["gina"].execute(kernel, "import os; print(os.environ.get('SPINNAKER_BOARD_JOB'))")
    assert out["stdout"].strip() == str(board["id"]), out  # the board claimed after the start reached the server


def test_a_hub_restart_keeps_slurm_servers_and_resumes_their_keepalive(boards_hub, slurm):
    hub, double, users = boards_hub
    gina = users["gina"]
    if gina.server_model() is None:
        gina.start_server()
    [job] = job_of(slurm, "slurmtest-gina")
    [board] = [j for j in double.jobs() if j["owner"] == "gina" and j["state"] != "DESTROYED"]
    hub.proc.terminate()  # the hub process alone, as its systemd unit stops it (KillMode=process)
    hub.proc.wait(60)
    keepalives = double.job(board["id"])["keepalives"]
    assert job_of(slurm, "slurmtest-gina") == [job]
    hub.start()
    double.wait_for(
        lambda d: d.job(board["id"])["keepalives"] > keepalives,
        timeout=40,
        what="the restarted hub to keep gina's board alive",
    )
    assert gina.server("GET", "api/status").status_code == 200 and job_of(slurm, "slurmtest-gina") == [job]
    assert len([j for j in double.jobs() if j["owner"] == "gina" and j["state"] != "DESTROYED"]) == 1


def test_a_cancelled_jobs_board_is_given_back(boards_hub, slurm):
    hub, double, users = boards_hub
    frank = users["frank"]
    if frank.server_model() is None:
        frank.start_server()
    [board_job] = [j for j in double.jobs() if j["owner"] == "frank" and j["state"] != "DESTROYED"]
    [job] = job_of(slurm, "slurmtest-frank")
    assert slurm.run("scancel", job.split()[0]).returncode == 0
    wait_for(lambda: frank.server_model() is None, 30, "the hub to notice frank's cancelled job")
    double.wait_for(
        lambda d: d.job(board_job["id"])["state"] == "DESTROYED",
        timeout=20,
        what="frank's board to be given back at the spalloc service",
    )


# ------------------------------------------------------------------------------------------- batchspawner, fenced
def test_slurm_commands_run_as_the_user_never_get_the_hubs_secrets(monkeypatch):
    """batchspawner 1.3.0 runs squeue and scancel (as the user, through exec_prefix) with the hub's own environment;
    slurm.py gives them only what Slurm needs. The second assertion fails once upstream stops passing the hub's
    environment on: then the override in SlurmUserSpawner.run_command can go."""
    import asyncio

    from batchspawner import SlurmSpawner

    from spinnaker_jupyter.slurm import SlurmUserSpawner

    monkeypatch.setenv("CONFIGPROXY_AUTH_TOKEN", "the-hubs-proxy-secret")
    ours = asyncio.run(SlurmUserSpawner(slurm_conf="/etc/x/slurm.conf").run_command("env"))
    assert "the-hubs-proxy-secret" not in ours and "SLURM_CONF=/etc/x/slurm.conf" in ours.splitlines()
    assert "the-hubs-proxy-secret" in asyncio.run(SlurmSpawner().run_command("env"))


def test_batchspawner_still_uses_the_deprecated_spawner_db_that_jupyterhub_still_has():
    """batchspawner 1.3.0's start() commits through Spawner.db, which JupyterHub 6.1 deprecates ("will be removed";
    a warning at each start). Fails when either side changes: check the pin then."""
    import inspect

    import jupyterhub
    from batchspawner import BatchSpawnerBase
    from jupyterhub.spawner import Spawner

    assert "self.db.commit()" in inspect.getsource(BatchSpawnerBase.start)
    assert "db" in Spawner.class_traits() and jupyterhub.__version__ == "6.1.1"
