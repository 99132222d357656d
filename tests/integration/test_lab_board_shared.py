"""The lab's own board (spinnaker.mode: machine) shared by user servers and batch jobs, end to end: a real hub with
its job service (a separate process). A job waits while alice's server has the board and its log says whose it is,
then runs once the server stops; a server started while a job has the board is told whose job has it, and gets the
board when the job ends."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import requests

from hubclient import wait_for
from test_boards import ProgressReader, board_status
from test_jobs import start_jobs_hub

BOARD = "192.0.2.10"
# Says the board its cfg names, then waits for the test's marker (no sleep decides an outcome).
JOB = textwrap.dedent("""
    import os, pathlib, time
    cfg = pathlib.Path(os.environ["XDG_CONFIG_DIRS"], ".spynnaker.cfg").read_text()
    print("MACHINE", [line for line in cfg.splitlines() if line.startswith(("machine_name", "virtual_board"))],
          flush=True)
    marker = pathlib.Path({marker!r})
    while not marker.exists():
        time.sleep(0.1)
""")


def submit(hub, user, script: str) -> int:
    r = requests.post(
        hub.jobs_url + "/jobs/",
        headers={"Authorization": f"Bearer {user.token}"},
        json={"code": script, "collab": f"private-{user.name}", "hardware_platform": "SpiNNaker"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def job(hub, user, job_id: int) -> dict:
    return requests.get(
        f"{hub.jobs_url}/jobs/{job_id}?with_log=true", timeout=30, headers={"Authorization": f"Bearer {user.token}"}
    ).json()


def test_jobs_and_servers_take_turns_at_the_lab_board_and_say_who_has_it(hub_factory):
    hub = start_jobs_hub(
        hub_factory,
        {"concurrency": 1},
        {
            "spinnaker": {"mode": "machine", "machine_name": BOARD, "claim_timeout": 300, "on_timeout": "fail"},
            "spawner": {"poll_interval": 1},
            "culler": {"enabled": False},
        },
    )
    alice = hub.client("lbalice", hub.add_user("lbalice"))
    bob = hub.client("lbbob", hub.add_user("lbbob"))
    # (names of their own: the system accounts jupyter-<name> are the machine's, shared with other test hubs)
    marker = Path("/tmp") / f"lab-board-{uuid.uuid4().hex[:10]}"
    try:
        # A job waits for alice's server, and its log says so.
        alice.start_server()
        first = submit(hub, bob, JOB.format(marker=str(marker)))
        said = f"The lab's SpiNNaker board {BOARD} is in use by lbalice's server since "
        wait_for(lambda: said in job(hub, bob, first)["log"], 60, "bob's job to say alice's server has the board")
        assert "MACHINE" not in job(hub, bob, first)["log"] and board_status(alice, live=False)["held"] is True
        alice.stop_server()
        wait_for(lambda: "MACHINE" in job(hub, bob, first)["log"], 120, "bob's job to run")
        ran = job(hub, bob, first)["log"]
        assert f"MACHINE ['machine_name = {BOARD}']" in ran, ran  # its cfg names the lab board

        # Now the job has it: alice's new server waits, told whose job it is, and gets the board when it ends.
        reader = ProgressReader(alice)
        reader.start()
        wait_for(
            lambda: reader.said(f"The lab's SpiNNaker board {BOARD} is in use by lbbob's job {first} since "),
            60,
            "alice's spawn page to say bob's job has the board",
        )
        assert not (alice.server_model() or {}).get("ready")
        marker.write_text("finish")
        wait_for(lambda: job(hub, bob, first)["status"] == "finished", 120, "bob's job to finish")
        assert reader.result(120).get("ready"), reader.messages
        assert board_status(alice, live=False)["holder"] == "lbalice/"
        alice.stop_server()
    finally:
        marker.write_text("finish")
        marker.unlink(missing_ok=True)
