"""`spinnaker-jupyter jobs list|show|cancel|purge`, the operator's view of the job store (no hub: the command reads
and writes the store directly, as it does while the hub is down)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from spinnaker_jupyter import cli
from spinnaker_jupyter.jobs.store import Store, now


@pytest.fixture
def deployment(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\njobs: {{enabled: true}}\n")
    jobs = tmp_path / "data" / "jobs"
    (jobs / "logs").mkdir(parents=True)
    store = Store(f"sqlite:///{jobs / 'jobs.sqlite'}")

    def add(user: str, status: str = "submitted", ended_days_ago: float | None = None, log: str = "") -> int:
        job = store.create(
            user,
            {
                "collab": f"private-{user}",
                "code": "print(1)",
                "command": "run.py {system}",
                "hardware_platform": "SpiNNaker",
                "tags": "[]",
            },
        )
        values = {"status": status}
        if ended_days_ago is not None:
            values["timestamp_completion"] = now() - timedelta(days=ended_days_ago)
        store._update(job.id, **values)
        if log:
            (jobs / "logs" / f"{job.id}.log").write_text(log)
        return job.id

    yield type("D", (), {"cfg": str(cfg), "store": store, "add": staticmethod(add), "jobs": jobs})
    store.engine.dispose()


def run(d, capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["jobs", *args, "-c", d.cfg])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_filters_by_user_and_state(deployment, capsys):
    a1 = deployment.add("alice", "running")
    a2 = deployment.add("alice", "finished", ended_days_ago=1)
    b1 = deployment.add("bob")
    code, out, _ = run(deployment, capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "USER", "STATE"]
    assert [line.split()[:3] for line in lines[1:]] == [
        [str(a1), "alice", "running"],
        [str(a2), "alice", "finished"],
        [str(b1), "bob", "submitted"],
    ]
    _, out, _ = run(deployment, capsys, "list", "--user", "alice", "--state", "running", "--json")
    assert [(j["id"], j["user"], j["status"]) for j in json.loads(out)] == [(a1, "alice", "running")]
    _, out, _ = run(deployment, capsys, "list", "--user", "carol")
    assert out.strip() == "No jobs matching the filters."
    code, _, err = run(deployment, capsys, "list", "--state", "done")
    assert code == 2 and "--state done: unknown state; one of submitted, running, finished, error, removed" in err


def test_show_gives_the_job_and_its_log_tail(deployment, capsys):
    job = deployment.add("alice", "error", ended_days_ago=0, log="".join(f"line {i}\n" for i in range(100)))
    code, out, _ = run(deployment, capsys, "show", str(job), "--lines", "3")
    assert code == 0
    assert (
        f"id:                {job}" in out and "user:              alice" in out and "status:            error" in out
    )
    assert out.rstrip().endswith("  line 97\n  line 98\n  line 99") and "line 96" not in out
    code, _, err = run(deployment, capsys, "show", "999")
    assert code == 2 and "no job 999 in the job store" in err
    code, _, err = run(deployment, capsys, "show")
    assert code == 2 and "`jobs show` needs one job ID" in err


def test_cancel_removes_a_queued_job_and_flags_a_running_one(deployment, capsys):
    queued, running = deployment.add("alice"), deployment.add("bob", "running")
    done = deployment.add("bob", "finished", ended_days_ago=0)
    code, out, _ = run(deployment, capsys, "cancel", str(queued), str(running), str(done), "4242")
    assert code == 2  # one id did not exist; the others were still acted on
    assert f"job {queued} (alice): was queued, removed" in out
    assert f"job {running} (bob): running; its runner stops it" in out
    assert f"job {done} (bob): already finished, nothing to cancel" in out and "job 4242: no such job" in out
    store = deployment.store
    assert store.get(queued).status == "removed"
    assert store.get(running).status == "running" and store.cancel_requested(running)
    assert store.cancel_words(running) == "by an operator (spinnaker-jupyter jobs cancel)"
    assert store.get(done).status == "finished"
    assert "cancelled by an operator" in (deployment.jobs / "logs" / f"{queued}.log").read_text()


def test_purge_deletes_old_ended_jobs_with_their_files(deployment, capsys):
    old = deployment.add("alice", "finished", ended_days_ago=40, log="old log\n")
    (deployment.jobs / "outputs" / str(old)).mkdir(parents=True)
    (deployment.jobs / "outputs" / str(old) / "result.dat").write_bytes(b"x" * 2**20)
    recent = deployment.add("alice", "error", ended_days_ago=5, log="recent\n")
    queued = deployment.add("bob")  # never purged, however old
    code, out, _ = run(deployment, capsys, "purge", "--days", "30", "--dry-run")
    assert code == 0 and "1 job(s) that ended before" in out and "would be deleted" in out and f": {old}" in out
    assert deployment.store.get(old) is not None
    code, out, _ = run(deployment, capsys, "purge", "--days", "30")
    assert code == 0 and "deleted with their files (1.0 MiB)" in out, out
    assert deployment.store.get(old) is None
    assert (
        not (deployment.jobs / "outputs" / str(old)).exists() and not (deployment.jobs / "logs" / f"{old}.log").exists()
    )
    assert deployment.store.get(recent) is not None and deployment.store.get(queued) is not None
    code, _, err = run(deployment, capsys, "purge")
    assert code == 2 and "`jobs purge` needs --days N" in err


def test_no_store_is_one_clear_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\n")
    assert cli.main(["jobs", "list", "-c", str(cfg)]) == 2
    assert "no job store at" in capsys.readouterr().err and not (tmp_path / "data" / "jobs").exists()


def test_an_old_store_gains_the_new_columns(tmp_path):
    """A store written by the previous release (no cancel_reason / detail) is used as it is, its jobs kept."""
    import sqlite3

    path = tmp_path / "jobs.sqlite"
    Store(f"sqlite:///{path}").create(
        "alice",
        {"collab": "private-alice", "code": "print(1)", "command": "x", "hardware_platform": "SpiNNaker", "tags": "[]"},
    )
    db = sqlite3.connect(path)
    for column in ("cancel_reason", "detail"):
        db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    db.commit()
    db.close()
    store = Store(f"sqlite:///{path}")
    assert store.get(1).user_id == "alice" and store.get(1).detail is None
    store.set_detail(1, "waiting for a board")
    assert store.get(1).detail == "waiting for a board"
