"""User servers as Slurm jobs (`spawner.type: slurm`), through the real hub and proxy, on a real one-node Slurm
(tests/slurm_fixtures.py): the server runs as a job under the user's own account and opens JupyterLab; sPyNNaker
runs there; the spawn page shows the Slurm queue; a cancelled job is noticed by the hub's poll; bad input and a
Slurm that is down give one clear line."""

from __future__ import annotations

import pwd
import statistics
import time

import pytest

from hubclient import wait_for
from test_hub import PYNN_NETWORK


def slurm_config(slurm, **over) -> dict:
    # (an account prefix of its own: other suites' hubs on this machine have their jupyter-alice)
    return {"spawner": {"type": "slurm", "poll_interval": 2, "local": {"system_user_prefix": "slurmtest-"},
                        "slurm": {"conf": str(slurm.conf), "partition": slurm.partition, "memory": "1G", **over}},
            "culler": {"enabled": False}}


@pytest.fixture(scope="module")
def hub(hub_factory, slurm):
    return hub_factory(slurm_config(slurm))


@pytest.fixture(scope="module")
def alice(hub):
    return hub.client("alice", hub.add_user("alice"))


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
