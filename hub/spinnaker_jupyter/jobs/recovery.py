"""Jobs a stopped job service left running: at the next start (a service that died: `recover`) or at a clean stop
(`requeue_stopped`), each one's processes are stopped, a note goes in its log, its scratch folder goes, and it is
put back in the queue (or ended as removed when it was cancelled meanwhile). So a job may run again, but never
silently. The boards such jobs held are given back by job_boards' reconciliation (service.py)."""

from __future__ import annotations

import json
import logging
import shutil

from . import sessions
from .executor import Executor
from .joblog import JobLog, stamp
from .settings import Settings
from .store import Store

log = logging.getLogger("spinnaker_jupyter.jobs")


def recover(store: Store, executor: Executor, s: Settings) -> list[int]:
    """At start-up: jobs left `running` by a service that died are stopped and put back in the queue. Returns
    their ids."""
    back = []
    for job in store.interrupted():
        if job.pgid:
            executor.kill(job.pgid, job.run_uid)
        if job.cancel_requested:  # cancelled while the service was down (e.g. its user removed): not re-run
            JobLog.append(
                s.logs / f"{job.id}.log",
                f"{stamp()}: the job was cancelled while the job service was stopped; it does not run again.",
            )
            shutil.rmtree(s.work / str(job.id), ignore_errors=True)
            store.finish(job.id, "removed", json.loads(job.provenance or "{}"), [], None)
            continue
        JobLog.append(
            s.logs / f"{job.id}.log",
            f"{stamp()}: the job service stopped while this job was running (attempt "
            f"{job.attempts}) and did not finish it. It was put back in the queue and will run again "
            "from the start; outputs of the interrupted attempt are discarded.",
        )
        shutil.rmtree(s.work / str(job.id), ignore_errors=True)
        store.requeue(job.id)
        back.append(job.id)
        log.warning("Job %s was interrupted by a service stop; put back in the queue", job.id)
    for sid, uid in sessions.recorded(s.sessions).items():  # e.g. a pip install of an interrupted job
        executor.kill(sid, uid)
        executor.ended(sid)
    return back


def requeue_stopped(store: Store, executor: Executor, s: Settings, runner_id: str) -> None:
    """At a clean stop, once this runner's tasks are cancelled: its jobs still `running` go back in the queue."""
    for job in store.interrupted(runner_id):
        if job.pgid:
            executor.kill(job.pgid, job.run_uid)
        JobLog.append(
            s.logs / f"{job.id}.log",
            f"{stamp()}: the job service was stopped while this job was running (attempt "
            f"{job.attempts}). It was put back in the queue and will run again from the start when "
            "the service is back; outputs of the interrupted attempt are discarded.",
        )
        shutil.rmtree(s.work / str(job.id), ignore_errors=True)
        store.requeue(job.id)
