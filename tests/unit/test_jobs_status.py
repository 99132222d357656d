"""The status users see: a claimed job that waits (for its board, its Slurm slot, its pip packages) is still
"submitted", as upstream's status values mean it (submitted, validated, running, mapped, finished, error, removed:
HumanBrainProject/ebrains-neuromorphic-job-queue-api, api/simqueue/data_models.py); "running" once its command runs.
The nmpi client's queued_jobs() filters on the same words. And the reason a cancel gives reaches the runner."""

from __future__ import annotations

from sqlalchemy import text

from spinnaker_jupyter.account_removal import JOBS_CANCEL_REASON
from spinnaker_jupyter.jobs.store import Store, public_status


def new_job(store: Store, user: str = "ada") -> int:
    fields = {"collab": f"private-{user}", "code": "print(1)", "command": "run.py", "hardware_platform": "SpiNNaker"}
    return store.create(user, fields).id


def shown(store: Store, job_id: int) -> str:
    return public_status(store.get(job_id))


def listed(store: Store, *statuses: str) -> list[int]:
    return [j.id for j in store.query("ada", statuses)]


def test_a_claimed_job_is_submitted_until_its_command_runs(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    job_id = new_job(store)
    assert shown(store, job_id) == "submitted"
    assert store.claim_next("runner").id == job_id
    assert store.get(job_id).status == "running"  # the runner's own state: claimed, waiting for its board
    assert shown(store, job_id) == "submitted"
    assert listed(store, "submitted") == [job_id] and listed(store, "running") == []
    assert listed(store, "submitted", "running") == [job_id]  # what nmpi's queued_jobs() asks for

    store.set_process(job_id, 4242, 1001)
    assert shown(store, job_id) == "running"
    assert listed(store, "running") == [job_id] and listed(store, "submitted") == []
    store.set_process(job_id, None, None)  # the command ended; outputs are being collected
    assert shown(store, job_id) == "running"

    store.requeue(job_id)  # a service stop: back in the queue, and a new claim waits again
    store.claim_next("runner")
    assert shown(store, job_id) == "submitted"
    store.finish(job_id, "finished", {}, [], 0.0)
    assert shown(store, job_id) == "finished" and listed(store, "finished") == [job_id]
    store.engine.dispose()


def test_a_store_of_an_earlier_release_gets_the_column(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    store = Store(url)
    job_id = new_job(store)
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs DROP COLUMN timestamp_command"))
    store.engine.dispose()
    again = Store(url)
    again.claim_next("runner")
    again.set_process(job_id, 4242, 1001)
    assert shown(again, job_id) == "running"
    again.engine.dispose()


def test_the_cancel_of_a_removed_account_says_why(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    running, queued = new_job(store), new_job(store)
    store.claim_next("runner")
    why = JOBS_CANCEL_REASON
    assert "the account was removed by an operator" in why
    assert store.cancel_all_of("ada", why) == {"running": [running], "submitted": [queued]}
    assert store.cancel_requested(running) and store.cancel_words(running) == why
    assert store.get(queued).status == "removed"
    store.engine.dispose()
