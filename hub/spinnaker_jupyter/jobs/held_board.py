"""A running job's SpiNNaker board: claimed through the deployment's BoardSession before the command runs (a cancel
while it waits ends the wait), named in the job's own sPyNNaker cfg and environment, and given back however the
job ends, with the board-hours it held in the job's provenance."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass

from ..boards.session import BoardSession
from .executor import Account
from .job_boards import JobBoards, NoBoard, boards_for, write_cfg
from .joblog import JobFailed, JobLog
from .settings import Settings
from .store import Job, Store


@dataclass
class HeldBoard:
    """A running job's BoardSession (None: the job runs virtual) and when its board came."""

    session: BoardSession | None
    since: float | None = None
    released: bool = False


def say_to(store: Store, job: Job, jlog: JobLog):
    last: list[str] = [""]

    def say(_percent, message: str) -> None:  # the claim's steps: in the log, and as the job's state in words
        if message != last[0]:
            last[0] = message
            jlog.note(message)
        store.set_detail(job.id, message)

    return say


def lost_to(jlog: JobLog):
    def lost() -> None:
        jlog.note(
            "The SpiNNaker allocation service ended this job's board while it ran; what the job does "
            "with it from now on fails."
        )

    return lost


async def claim(
    s: Settings,
    store: Store,
    boards: JobBoards,
    job: Job,
    held: HeldBoard,
    config: dict,
    account: Account,
    jlog: JobLog,
    provenance: dict,
) -> dict:
    """Claim the job's boards (waiting in the service's queue, or for the lab board, as long as the deployment
    lets sessions wait); a cancel while waiting ends the wait. Returns the job's SPINNAKER_* environment."""
    n = config.get("boards") or boards_for(boards.spinnaker, job.user_id)
    claiming = asyncio.ensure_future(held.session.claim(n))
    try:
        while not claiming.done():
            await asyncio.wait({claiming}, timeout=0.5)
            if not claiming.done() and store.cancel_requested(job.id):
                await held.session.release("the job was cancelled while it waited for a board")
                await asyncio.gather(claiming, return_exceptions=True)
                raise JobFailed(
                    f"The job was cancelled {store.cancel_words(job.id)} while it waited for a SpiNNaker board"
                )
        record = claiming.result()
    except NoBoard as e:  # (spinnaker.on_timeout: fail)
        raise JobFailed(str(e)) from None
    except asyncio.CancelledError:
        claiming.cancel()
        raise
    held.since = time.monotonic()
    held.session.started()  # its lease row says `held`
    if record.fallback:
        jlog.note(
            "This job runs on a VIRTUAL SpiNNaker board (no board came, see above): run() maps and loads "
            "the network, but recorded data come back empty."
        )
        provenance["board"] = {"fallback": record.fallback, "notice": record.notice}
    else:
        provenance["virtual_board"] = False
        provenance["board"] = {
            k: v
            for k, v in {
                "board": record.board,
                "boards": record.boards,
                "spalloc_job": record.job_id,
                "claimed_at": record.claimed_at,
            }.items()
            if v is not None
        }
        where = f"spalloc job {record.job_id}" if record.job_id is not None else "the lab's board"
        jlog.note(
            f"SpiNNaker board {record.board} is this job's until it ends ({where}); the job's sPyNNaker cfg names it."
        )
        store.set_detail(job.id, f"running on SpiNNaker board {record.board}")
    cfg = write_cfg(
        s.job_cfgs / str(job.id),
        held.session.cfg or held.session.deployment_cfg(),
        account.gid if account.switched else None,
    )
    env = {k: v for k, v in held.session.env().items() if k != "SPINNAKER_MACHINE_CFG"}
    return {**env, "XDG_CONFIG_DIRS": str(cfg)}


async def release(s: Settings, job: Job, held: HeldBoard, reason: str, jlog: JobLog, provenance: dict) -> None:
    """Give back what the job holds (every way a job ends comes here; a second call does nothing)."""
    if held.session is None or held.released:
        return
    held.released = True
    had = held.session.record is not None and held.session.record.holds
    try:
        await held.session.release(reason)
    finally:
        shutil.rmtree(s.job_cfgs / str(job.id), ignore_errors=True)
    if held.since is not None and had:
        hours = (time.monotonic() - held.since) / 3600 * (held.session.record.boards or 1)
        provenance["board_hours"] = round(hours, 6)
        jlog.note(f"SpiNNaker board {held.session.record.board} given back ({reason}).")
