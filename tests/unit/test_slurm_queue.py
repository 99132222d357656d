"""What the Slurm commands say, read for users and operators (hub/spinnaker_jupyter/slurm_queue.py): pending
reasons in words, `scontrol -o show job` parsed, exit codes, and sbatch's refusals as one line naming the key."""

from __future__ import annotations

import pytest

from spinnaker_jupyter import slurm_queue

SHOW = (
    "JobId=12 JobName=spinnaker-job-3 UserId=jupyter-amy(1001) GroupId=jupyter-amy(1001) Priority=1 "
    "JobState=PENDING Reason=Licenses Dependency=(null) ExitCode=0:0 NodeList=(null) BatchHost=node1 "
    "Licenses=spinnaker_board:1 Command=(null) WorkDir=/srv/jobs/work/3"
)


def test_show_job_is_read_into_its_fields():
    info = slurm_queue.parse_show(SHOW)
    assert (info["JobState"], info["Reason"], info["BatchHost"], info["Licenses"]) == (
        "PENDING",
        "Licenses",
        "node1",
        "spinnaker_board:1",
    )


@pytest.mark.parametrize(
    ("reason", "said"),
    [
        ("Licenses", "reason Licenses (all SpiNNaker boards are in use; you start when one is given back)"),
        ("Resources", "reason Resources (the cluster's nodes are busy; you start when a server or job ends)"),
        ("None", "not yet looked at by the scheduler"),
        ("ReqNodeNotAvail", "reason ReqNodeNotAvail"),
    ],
)
def test_pending_reasons_in_words(reason, said):
    assert slurm_queue.pending_words(reason) == said


@pytest.mark.parametrize(("value", "code"), [("0:0", 0), ("3:0", 3), ("0:15", -15), ("0:9", -9), ("x", 1)])
def test_exit_code_as_a_return_code(value, code):
    assert slurm_queue.exit_code(value) == code


def test_a_job_that_is_completing_is_not_over_yet():
    """scontrol says COMPLETING in place of how a job ended (e.g. TIMEOUT) until its processes are gone."""
    assert "COMPLETING" not in slurm_queue.ENDED and {"TIMEOUT", "CANCELLED", "NODE_FAIL"} <= slurm_queue.ENDED


KEYS = {
    "partition": "jobs.slurm.partition",
    "license": "spawner.slurm.board_license",
    "memory": "jobs.limits.memory_mb",
}


@pytest.mark.parametrize(
    ("stderr", "line"),
    [
        (
            "sbatch: error: Batch job submission failed: Invalid partition name specified",
            "the partition 'nope' does not exist; set jobs.slurm.partition to one `sinfo` lists",
        ),
        (
            "sbatch: error: Batch job submission failed: Invalid license specification",
            "the cluster has no licence 'spinnaker_board' for SpiNNaker boards; add `Licenses=spinnaker_board:<boards>` "
            "to slurm.conf or set spawner.slurm.board_license",
        ),
        ("sbatch: error: Memory specification can not be satisfied", "lower jobs.limits.memory_mb"),
        (
            "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
            "the Slurm cluster is not answering",
        ),
    ],
)
def test_sbatch_refusals_name_the_key(stderr, line):
    said = slurm_queue.sbatch_error(stderr, KEYS, {"partition": "nope", "license": "spinnaker_board"})
    assert said is not None and line in said and stderr.split(": ", 1)[1] in said, said


def test_an_unknown_refusal_is_left_to_the_caller():
    assert slurm_queue.sbatch_error("sbatch: error: something new", KEYS, {}) is None
