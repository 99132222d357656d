"""The runner: claims submitted jobs (at most `jobs.concurrency` at a time) and takes each through
fetch code -> check hardware config -> run the command as the user -> collect new files -> finished / error.

This module is the queue and the order of one job's steps; the steps themselves are in steps.py (code, inputs,
pip, command), held_board.py (a job's SpiNNaker board), outputs.py (collecting and copying outputs), joblog.py
(the job's log) and recovery.py (jobs a stopped service left running).

Every step writes to the job's log, which the API serves while the job runs. A job that was running when the
service stopped is put back in the queue with a note in its log saying so, at the stop when the stop is clean and
at the next start otherwise; its old processes are stopped first. So a job may run again, but never silently.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import time
import uuid
from datetime import datetime, timedelta, timezone

from .. import spynnaker_cfg
from . import held_board, outputs, recovery, sessions, steps, uploads
from .executor import AccountError, Executor
from .held_board import HeldBoard
from .job_boards import CORES_PER_BOARD, JobBoards
from .joblog import JobFailed, JobLog, stamp
from .per_run import PerRun
from .settings import Settings
from .steps import INTERNAL, SYSTEM
from .store import Job, Store

# Imported from here by the executors, admin_cli and account_removal (and tests): kept importable as before.
__all__ = ["Runner", "JobFailed", "JobLog", "HeldBoard", "INTERNAL", "SYSTEM", "_stamp"]
_stamp = stamp

log = logging.getLogger("spinnaker_jupyter.jobs")


class Runner:
    def __init__(
        self,
        store: Store,
        executor: Executor,
        settings: Settings,
        boards: JobBoards | None = None,
        per_run: PerRun | None = None,
    ):
        self.store, self.executor, self.s = store, executor, settings
        self.boards = boards  # None: every job runs virtual
        self.per_run = per_run  # spinnaker.mode per-run: the owner's token and the per-run cfg (per_run.py)
        self.id = uuid.uuid4().hex[:12]
        self.versions = settings.versions  # the configured sPyNNaker releases (kernels.spynnaker)
        if hasattr(executor, "versions"):  # an executor with its own sPyNNaker (docker: the job image's)
            self.versions = executor.versions()
        self.running: dict[int, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        for path in (settings.data, settings.logs, settings.outputs):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(path, 0o700)
        # The job accounts must reach their own scratch folder (0700 each) and the sPyNNaker cfg, nothing else.
        for path in (settings.work, settings.cfg_dir, settings.job_cfgs):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(settings.data, 0o711)
        os.chmod(settings.work, 0o711)
        os.chmod(settings.job_cfgs, 0o711)  # one folder per job, readable by that job's account only
        (settings.cfg_dir / ".spynnaker.cfg").write_text(self.cfg_text())
        os.chmod(settings.cfg_dir, 0o755)
        os.chmod(settings.cfg_dir / ".spynnaker.cfg", 0o644)
        sessions.prepare(settings.sessions)

    def cfg_text(self) -> str:
        # This release runs every job on a virtual board, whatever spinnaker.mode the sessions use.
        return spynnaker_cfg.text(self.s.spinnaker, mode="virtual")

    def wake(self) -> None:
        self._wake.set()

    # --- recovery and stop -------------------------------------------------------------------------------------
    def recover(self) -> list[int]:
        """At start-up: jobs left `running` by a service that died are stopped and put back in the queue."""
        return recovery.recover(self.store, self.executor, self.s)

    async def stop(self) -> None:
        """A clean stop: running jobs are stopped, noted and put back in the queue."""
        self._stopping = True
        self._wake.set()
        for task in list(self.running.values()):
            task.cancel()
        for task in list(self.running.values()):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        recovery.requeue_stopped(self.store, self.executor, self.s, self.id)

    # --- the queue -----------------------------------------------------------------------------------------------
    async def loop(self) -> None:
        last_purge = 0.0
        while not self._stopping:
            try:
                if time.monotonic() - last_purge > 3600:
                    last_purge = time.monotonic()
                    await asyncio.get_running_loop().run_in_executor(None, self.purge)
                while len(self.running) < self.s.concurrency and not self._stopping:
                    job = self.store.claim_next(self.id)
                    if job is None:
                        break
                    task = asyncio.create_task(self.run(job))
                    self.running[job.id] = task
                    task.add_done_callback(lambda _t, i=job.id: (self.running.pop(i, None), self._wake.set()))
            except Exception:  # e.g. the database away for a moment: keep the queue going, try again shortly
                log.exception("The runner could not take the next job; trying again")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=2)
            except asyncio.TimeoutError:
                pass

    def purge(self) -> None:
        """Outputs older than jobs.retention_days go; the job record and its log stay."""
        before = datetime.now(timezone.utc) - timedelta(days=self.s.retention_days)
        uploads.purge(self.s.data, self.s.retention_days)
        for job in self.store.expired(before):
            out = self.s.outputs / str(job.id)
            if out.exists():
                shutil.rmtree(out, ignore_errors=True)
                self.store.clear_outputs(job.id)
                JobLog.append(
                    self.s.logs / f"{job.id}.log",
                    f"{stamp()}: output files removed after {self.s.retention_days} days (jobs.retention_days).",
                )

    # --- one job -------------------------------------------------------------------------------------------------
    async def run(self, job: Job) -> None:
        s, executor, store = self.s, self.executor, self.store
        jlog = JobLog(s.logs / f"{job.id}.log", s.log_bytes)
        t0 = time.monotonic()
        mode = self.boards.mode if self.boards is not None else "virtual"
        provenance = {
            "platform": "SpiNNaker",
            "spinnaker_mode": mode,
            "virtual_board": True,
            "attempt": job.attempts,
            "runner": self.id,
            "started": stamp(),
            "started_at": time.time(),
        }
        status, files = "error", []
        scratch = s.work / str(job.id)
        held = HeldBoard(
            self.boards.session(job.id, job.user_id, held_board.say_to(store, job, jlog), held_board.lost_to(jlog))
            if self.boards is not None and self.boards.real
            else None
        )
        try:
            jlog.note(f"{stamp()}: job {job.id} started (attempt {job.attempts}).")
            if held.session is None and self.per_run is None:  # (per-run: said once the owner's token is asked)
                jlog.note(
                    f"This job runs on a VIRTUAL SpiNNaker board (spinnaker.mode: {mode}): run() maps and loads the "
                    "network, but recorded data come back empty."
                )
            config = steps.read_hardware_config(s, self.versions, job)
            provenance["hardware_config"] = config
            # its spynnaker_version, else the default release (docker: the image's own, whatever the host has)
            release = executor.release(config) if hasattr(executor, "release") else s.release(config)
            loop = asyncio.get_running_loop()
            try:
                account = await loop.run_in_executor(None, executor.account, job.user_id)
            except AccountError as e:
                raise JobFailed(str(e)) from None
            provenance["account"] = account.name
            if not account.switched:
                jlog.note(f"The service has no per-user accounts (not root): the job runs as {account.name}.")
            provenance["code"] = await loop.run_in_executor(
                None, steps.prepare, s, executor, job, scratch, account, jlog
            )
            if job.input_data:
                provenance["input_data"] = await loop.run_in_executor(
                    None, steps.download_inputs, s, executor, job, scratch, account, jlog
                )
            env = steps.env_for(s, job, scratch, account, release)
            if config.get("extra_pip_installs"):
                reqs = config["extra_pip_installs"]
                await steps.pip_install(s, executor, reqs, scratch, env, account, jlog, release)
            argv = steps.argv_for(s, job, scratch, release)
            provenance["command"] = argv[1:]
            provenance["sPyNNaker"] = release.version
            jlog.note(f"sPyNNaker {release.version or '(version unknown)'}: {release.python}")
            # The board is claimed once the command can run at once (e.g. its Slurm job runs): none held in a queue.
            async with executor.slot(job.id, scratch, s.run_limits, account):
                if held.session is not None:
                    claimed = await held_board.claim(
                        s, store, self.boards, job, held, config, account, jlog, provenance
                    )
                    env.update(claimed)
                elif self.per_run is not None:  # the owner's token now, and how the job asks at each setup()
                    gid = account.gid if account.switched else None
                    folder = s.job_cfgs / str(job.id)
                    env.update(await self.per_run.prepare(job.id, folder, job.user_id, gid, jlog, provenance))
                before = await loop.run_in_executor(None, outputs.snapshot, scratch)
                wall = config.get("time_limit") or s.wall_time
                jlog.note(f"Running: {shlex.join(['python', *argv[1:]])} (time limit {wall} s)")
                code, why = await steps.execute(s, executor, store, job, argv, scratch, env, account, wall, jlog)
            provenance["exit_code"] = code
            await held_board.release(s, job, held, "the job's command ended", jlog, provenance)
            files, skipped = await loop.run_in_executor(
                None, outputs.collect, s, executor, job, scratch, before, account
            )
            for entry in skipped:
                jlog.note(f"Not collected: {entry}")
            if why:
                raise JobFailed(why)
            if code != 0:
                raise JobFailed(
                    f"The command exited with code {code}"
                    if code > 0
                    else f"The command was stopped by signal {-code} ({steps.signal_name(-code)})"
                )
            status = "finished"
            jlog.note(f"{stamp()}: finished; {len(files)} output file(s).")
        except JobFailed as e:
            jlog.note(f"{stamp()}: error: {e}")
            provenance["error"] = str(e)
        except asyncio.CancelledError:  # a service stop: stop() notes it and puts the job back in the queue
            await held_board.release(s, job, held, "the job service stopped", jlog, provenance)
            if self.per_run is not None:
                self.per_run.end(job.id, s.job_cfgs / str(job.id))
            raise
        except Exception as e:  # the service's own fault: say so, keep the service running
            log.exception("Job %s failed in the runner", job.id)
            jlog.note(f"{stamp()}: error in the job service (not in your job): {e}")
            provenance["error"] = f"job service error: {e}"
        await held_board.release(s, job, held, "the job ended", jlog, provenance)
        if store.cancel_requested(job.id):
            status, files = "removed", []
            shutil.rmtree(s.outputs / str(job.id), ignore_errors=True)
            jlog.note(f"{stamp()}: the job was cancelled {store.cancel_words(job.id)}; its outputs were discarded.")
        if files and status != "removed":
            await asyncio.get_running_loop().run_in_executor(None, outputs.copy_home, s, executor, job, files, jlog)
        provenance["wall_seconds"] = round(time.monotonic() - t0, 3)
        provenance["finished"], provenance["finished_at"] = stamp(), time.time()
        shutil.rmtree(scratch, ignore_errors=True)
        if self.per_run is not None:  # its token secret, the per-run cfg folder (held_board.release: a claimed board's)
            self.per_run.end(job.id, s.job_cfgs / str(job.id))
        # Whole boards held while the command ran (a virtual board uses no SpiNNaker cores: 0 core-hours).
        usage = round(provenance.get("board_hours", 0.0) * CORES_PER_BOARD, 6)
        store.finish(job.id, status, provenance, files, usage)
