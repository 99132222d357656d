"""The runner: claims submitted jobs (at most `jobs.concurrency` at a time) and takes each through
fetch code -> check hardware config -> run the command as the user -> collect new files -> finished / error.

Every step writes to the job's log, which the API serves while the job runs. A job that was running when the
service stopped is put back in the queue with a note in its log saying so, at the stop when the stop is clean and
at the next start otherwise; its old processes are stopped first. So a job may run again, but never silently.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import mimetypes
import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .. import spynnaker_cfg
from . import archives, fetch, hardware_config, inputs, sessions, uploads
from ..boards.session import BoardSession
from .executor import Account, AccountError, Executor
from .job_boards import CORES_PER_BOARD, JobBoards, NoBoard, boards_for, max_boards, write_cfg
from .settings import Settings, spynnaker_versions
from .store import Job, Store

log = logging.getLogger("spinnaker_jupyter.jobs")
SYSTEM = "spiNNaker"  # what {system} in a job's command becomes (the PyNN backend name, as on EBRAINS)
INTERNAL = ".job"  # the runner's own files in a scratch folder (never collected as outputs)


class JobFailed(Exception):
    """Ends a job with status error and this one-line reason."""


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class JobLog:
    """The job's log file, capped: past the cap one line says so and the rest is dropped."""

    def __init__(self, path: Path, cap: int):
        self.path, self.cap = path, cap
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.size = path.stat().st_size if path.exists() else 0
        self.capped = False

    def write(self, text: str) -> None:
        data = text.encode(errors="replace")
        if self.size + len(data) > self.cap:
            if self.capped:
                return
            self.capped = True
            data = data[: max(0, self.cap - self.size)] + (
                f"\n[spinnaker-jupyter] The log reached {self.cap // 2**20} MiB (jobs.limits.log_mb); the rest "
                "of the job's output is not kept here.\n").encode()
        with open(self.path, "ab") as f:
            f.write(data)
        self.size += len(data)

    def note(self, text: str) -> None:
        self.write(f"[spinnaker-jupyter] {text}\n")

    @staticmethod
    def append(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path, "a") as f:
            f.write(f"[spinnaker-jupyter] {text}\n")


class Runner:
    def __init__(self, store: Store, executor: Executor, settings: Settings, boards: JobBoards | None = None):
        self.store, self.executor, self.s = store, executor, settings
        self.boards = boards  # None: every job runs virtual
        self.id = uuid.uuid4().hex[:12]
        self.versions = spynnaker_versions(settings.spynnaker_env)
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
        back = []
        for job in self.store.interrupted():
            if job.pgid:
                self.executor.kill(job.pgid, job.run_uid)
            if job.cancel_requested:  # cancelled while the service was down (e.g. its user removed): not re-run
                JobLog.append(self.s.logs / f"{job.id}.log", f"{_stamp()}: the job was cancelled while the job "
                              "service was stopped; it does not run again.")
                shutil.rmtree(self.s.work / str(job.id), ignore_errors=True)
                self.store.finish(job.id, "removed", json.loads(job.provenance or "{}"), [], None)
                continue
            JobLog.append(self.s.logs / f"{job.id}.log",
                          f"{_stamp()}: the job service stopped while this job was running (attempt "
                          f"{job.attempts}) and did not finish it. It was put back in the queue and will run again "
                          "from the start; outputs of the interrupted attempt are discarded.")
            shutil.rmtree(self.s.work / str(job.id), ignore_errors=True)
            self.store.requeue(job.id)
            back.append(job.id)
            log.warning("Job %s was interrupted by a service stop; put back in the queue", job.id)
        for sid, uid in sessions.recorded(self.s.sessions).items():  # e.g. a pip install of an interrupted job
            self.executor.kill(sid, uid)
            self.executor.ended(sid)
        return back

    async def stop(self) -> None:
        """A clean stop: running jobs are stopped, noted and put back in the queue."""
        self._stopping = True
        self._wake.set()
        for job_id, task in list(self.running.items()):
            task.cancel()
        for job_id, task in list(self.running.items()):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        for job in self.store.interrupted(self.id):
            if job.pgid:
                self.executor.kill(job.pgid, job.run_uid)
            JobLog.append(self.s.logs / f"{job.id}.log",
                          f"{_stamp()}: the job service was stopped while this job was running (attempt "
                          f"{job.attempts}). It was put back in the queue and will run again from the start when "
                          "the service is back; outputs of the interrupted attempt are discarded.")
            shutil.rmtree(self.s.work / str(job.id), ignore_errors=True)
            self.store.requeue(job.id)

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
                JobLog.append(self.s.logs / f"{job.id}.log", f"{_stamp()}: output files removed after "
                              f"{self.s.retention_days} days (jobs.retention_days).")

    # --- one job -------------------------------------------------------------------------------------------------
    async def run(self, job: Job) -> None:
        jlog = JobLog(self.s.logs / f"{job.id}.log", self.s.log_bytes)
        t0 = time.monotonic()
        mode = self.boards.mode if self.boards is not None else "virtual"
        provenance = {"platform": "SpiNNaker", "spinnaker_mode": mode, "virtual_board": True,
                      "attempt": job.attempts, "runner": self.id, "started": _stamp(), "started_at": time.time()}
        status, files = "error", []
        scratch = self.s.work / str(job.id)
        held = HeldBoard(
            self.boards.session(job.id, job.user_id, self._say_to(job, jlog), self._lost_to(jlog))
            if self.boards is not None and self.boards.real
            else None
        )
        try:
            jlog.note(f"{_stamp()}: job {job.id} started (attempt {job.attempts}).")
            if held.session is None:
                why = {
                    "per-run": "spinnaker.mode per-run claims with the user's own token, which a batch job does "
                    "not carry"
                }.get(mode, f"spinnaker.mode: {mode}")
                jlog.note(
                    f"This job runs on a VIRTUAL SpiNNaker board ({why}): run() maps and loads the network, "
                    "but recorded data come back empty."
                )
            config = self._hardware_config(job)
            provenance["hardware_config"] = config
            loop = asyncio.get_running_loop()
            try:
                account = await loop.run_in_executor(None, self.executor.account, job.user_id)
            except AccountError as e:
                raise JobFailed(str(e)) from None
            provenance["account"] = account.name
            if not account.switched:
                jlog.note(f"The service has no per-user accounts (not root): the job runs as {account.name}.")
            provenance["code"] = await loop.run_in_executor(None, self._prepare, job, scratch, account, jlog)
            if job.input_data:
                provenance["input_data"] = await loop.run_in_executor(None, self._inputs, job, scratch, account, jlog)
            env = self._env(job, scratch, account)
            if config.get("extra_pip_installs"):
                await self._pip(config["extra_pip_installs"], scratch, env, account, jlog)
            argv = self._argv(job, scratch)
            provenance["command"] = argv[1:]
            provenance["sPyNNaker"] = self.versions[0] if self.versions else None
            if held.session is not None:
                env.update(await self._claim(job, held, config, account, jlog, provenance))
            before = await loop.run_in_executor(None, _snapshot, scratch)
            wall = config.get("time_limit") or self.s.wall_time
            jlog.note(f"Running: {shlex.join(['python', *argv[1:]])} (time limit {wall} s)")
            code, why = await self._execute(job, argv, scratch, env, account, wall, jlog)
            provenance["exit_code"] = code
            await self._release(job, held, "the job's command ended", jlog, provenance)
            files, skipped = await loop.run_in_executor(None, self._collect, job, scratch, before, account)
            for entry in skipped:
                jlog.note(f"Not collected: {entry}")
            if why:
                raise JobFailed(why)
            if code != 0:
                raise JobFailed(f"The command exited with code {code}" if code > 0 else
                                f"The command was stopped by signal {-code} ({_signal_name(-code)})")
            status = "finished"
            jlog.note(f"{_stamp()}: finished; {len(files)} output file(s).")
        except JobFailed as e:
            jlog.note(f"{_stamp()}: error: {e}")
            provenance["error"] = str(e)
        except asyncio.CancelledError:  # a service stop: stop() notes it and puts the job back in the queue
            await self._release(job, held, "the job service stopped", jlog, provenance)
            raise
        except Exception as e:  # the service's own fault: say so, keep the service running
            log.exception("Job %s failed in the runner", job.id)
            jlog.note(f"{_stamp()}: error in the job service (not in your job): {e}")
            provenance["error"] = f"job service error: {e}"
        await self._release(job, held, "the job ended", jlog, provenance)
        if self.store.cancel_requested(job.id):
            status, files = "removed", []
            shutil.rmtree(self.s.outputs / str(job.id), ignore_errors=True)
            jlog.note(f"{_stamp()}: the job was cancelled {self.store.cancel_words(job.id)}; its outputs were "
                      "discarded.")
        if files and status != "removed":
            await asyncio.get_running_loop().run_in_executor(None, self._copy_home, job, files, jlog)
        provenance["wall_seconds"] = round(time.monotonic() - t0, 3)
        provenance["finished"], provenance["finished_at"] = _stamp(), time.time()
        shutil.rmtree(scratch, ignore_errors=True)
        # Whole boards held while the command ran (a virtual board uses no SpiNNaker cores: 0 core-hours).
        usage = round(provenance.get("board_hours", 0.0) * CORES_PER_BOARD, 6)
        self.store.finish(job.id, status, provenance, files, usage)

    # --- boards --------------------------------------------------------------------------------------------------
    def _say_to(self, job: Job, jlog: JobLog):
        last: list[str] = [""]

        def say(_percent, message: str) -> None:  # the claim's steps: in the log, and as the job's state in words
            if message != last[0]:
                last[0] = message
                jlog.note(message)
            self.store.set_detail(job.id, message)

        return say

    def _lost_to(self, jlog: JobLog):
        def lost() -> None:
            jlog.note(
                "The SpiNNaker allocation service ended this job's board while it ran; what the job does "
                "with it from now on fails."
            )

        return lost

    async def _claim(
        self, job: Job, held: "HeldBoard", config: dict, account: Account, jlog: JobLog, provenance: dict
    ) -> dict:
        """Claim the job's boards (waiting in the service's queue, or for the lab board, as long as the deployment
        lets sessions wait); a cancel while waiting ends the wait. Returns the job's SPINNAKER_* environment."""
        n = config.get("boards") or boards_for(self.boards.spinnaker, job.user_id)
        claim = asyncio.ensure_future(held.session.claim(n))
        try:
            while not claim.done():
                await asyncio.wait({claim}, timeout=0.5)
                if not claim.done() and self.store.cancel_requested(job.id):
                    await held.session.release("the job was cancelled while it waited for a board")
                    await asyncio.gather(claim, return_exceptions=True)
                    raise JobFailed(
                        f"The job was cancelled {self.store.cancel_words(job.id)} while it waited for a SpiNNaker board"
                    )
            record = claim.result()
        except NoBoard as e:  # (spinnaker.on_timeout: fail)
            raise JobFailed(str(e)) from None
        except asyncio.CancelledError:
            claim.cancel()
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
                f"SpiNNaker board {record.board} is this job's until it ends ({where}); the job's sPyNNaker "
                "cfg names it."
            )
            self.store.set_detail(job.id, f"running on SpiNNaker board {record.board}")
        cfg = write_cfg(
            self.s.job_cfgs / str(job.id),
            held.session.cfg or held.session.deployment_cfg(),
            account.gid if account.switched else None,
        )
        env = {k: v for k, v in held.session.env().items() if k != "SPINNAKER_MACHINE_CFG"}
        return {**env, "XDG_CONFIG_DIRS": str(cfg)}

    async def _release(self, job: Job, held: "HeldBoard", reason: str, jlog: JobLog, provenance: dict) -> None:
        """Give back what the job holds (every way a job ends comes here; a second call does nothing)."""
        if held.session is None or held.released:
            return
        held.released = True
        had = held.session.record is not None and held.session.record.holds
        try:
            await held.session.release(reason)
        finally:
            shutil.rmtree(self.s.job_cfgs / str(job.id), ignore_errors=True)
        if held.since is not None and had:
            hours = (time.monotonic() - held.since) / 3600 * (held.session.record.boards or 1)
            provenance["board_hours"] = round(hours, 6)
            jlog.note(f"SpiNNaker board {held.session.record.board} given back ({reason}).")

    def _copy_home(self, job: Job, files: list[dict], jlog: JobLog) -> None:
        """The outputs also land in ~/jobs/<id>/ when the user has a home here, so notebooks can analyse them.
        Written by the user's own account (a tar stream from the service's copy), so a home is never written as
        root."""
        home = self.executor.home(job.user_id)
        if not home.is_dir():
            return
        try:
            account = self.executor.account(job.user_id)
        except AccountError:
            return
        target = home / "jobs" / str(job.id)
        proc = subprocess.Popen(["sh", "-c", 'mkdir -p -- "$1" && exec tar --extract --file=- --directory "$1"', "sh",
                                 str(target)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/",
                                preexec_fn=self.executor.as_account(account))
        out = self.s.outputs / str(job.id)
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|") as tf:
                for f in files:
                    tf.add(out / f["path"], arcname=f["path"], recursive=False)
        except (BrokenPipeError, OSError):
            pass
        finally:
            proc.stdin.close()
        err = proc.stderr.read().decode(errors="replace").strip()
        if proc.wait() == 0:
            jlog.note(f"Output files copied to ~/jobs/{job.id}/.")
        else:
            why = err.splitlines()[-1] if err else f"tar exited with {proc.returncode}"
            jlog.note(f"Output files could not be copied to ~/jobs/{job.id}/ ({why}); download them instead.")

    def _hardware_config(self, job: Job) -> dict:
        try:
            # (the user's share of boards was checked at submission, with their groups, which are not known here)
            return hardware_config.parse(job.hardware_config, self.s.allowed_keys, self.versions,
                                         self.s.pip_packages, self.s.wall_time, max_boards(self.s.spinnaker))
        except hardware_config.HardwareConfigError as e:
            raise JobFailed(str(e)) from None

    def _prepare(self, job: Job, scratch: Path, account: Account, jlog: JobLog) -> dict:
        """Fetch the code into a staging folder, then hand it to the job's account as its scratch folder. A clone
        is made by the account itself; an archive or inline script is written by the service into a folder of its
        own (so that nothing the user's other processes do can redirect its writes) and then given away."""
        staging = self.s.data / f"staging-{job.id}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        staging.mkdir(mode=0o711)
        os.chmod(staging, 0o711)  # the account reaches its own folder inside, nothing else
        code = staging / "code"
        code.mkdir(mode=0o700)
        kind = fetch.kind_of(job.code)
        by_user = kind == "git"
        if by_user:
            os.chown(code, account.uid, account.gid)
        try:
            jlog.note({"inline": "Code: the script given with the job (saved as run.py).",
                       "git": f"Code: cloning {job.code.strip()} (shallow, no submodules).",
                       "archive": f"Code: downloading and unpacking {job.code.strip()}."}[kind])
            try:
                info = fetch.fetch(job.code, code, self.s.fetch_limits, self.executor.as_account(account))
            except fetch.FetchError as e:
                raise JobFailed(str(e)) from None
            if not by_user:
                for dirpath, dirs, names in os.walk(code):
                    for name in [*dirs, *names]:
                        os.lchown(os.path.join(dirpath, name), account.uid, account.gid)
                os.chown(code, account.uid, account.gid)
            os.chmod(code, 0o700)
            code.rename(scratch)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        internal = scratch / INTERNAL  # made by the account, as the job's first process would
        made = subprocess.run(["mkdir", "-p", "--", str(internal)], preexec_fn=self.executor.as_account(account),
                              capture_output=True, text=True, cwd="/")
        if made.returncode != 0:
            raise JobFailed(f"Could not prepare the job's folder: {made.stderr.strip()}")
        return info

    def _inputs(self, job: Job, scratch: Path, account: Account, jlog: JobLog) -> list[dict]:
        items = json.loads(job.input_data)
        jlog.note(f"Input data: downloading {len(items)} file(s) into the job's folder (at most "
                  f"{self.s.input_bytes // 2**20} MiB in all).")
        try:
            return inputs.download(items, scratch, self.s.input_bytes, self.s.fetch_limits.timeout,
                                   self.executor.as_account(account), say=jlog.note)
        except inputs.InputError as e:
            raise JobFailed(str(e)) from None

    def _env(self, job: Job, scratch: Path, account: Account) -> dict:
        # HOME is the scratch folder: a user's own ~/.spynnaker.cfg would make a second cfg (sPyNNaker refuses two).
        return {"PATH": f"{self.s.spynnaker_env / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(scratch),
                "USER": account.name, "LOGNAME": account.name, "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
                "MPLBACKEND": "Agg", "XDG_CONFIG_DIRS": str(self.s.cfg_dir), "TMPDIR": str(scratch / INTERNAL),
                "PYTHONPATH": str(scratch / INTERNAL / "packages"), "SPINNAKER_JOB_ID": str(job.id),
                # caches (matplotlib's font list, pip's) are not the job's outputs
                "XDG_CACHE_HOME": str(scratch / INTERNAL / "cache"), "MPLCONFIGDIR": str(scratch / INTERNAL / "mpl")}

    def _argv(self, job: Job, scratch: Path) -> list[str]:
        command = (job.command or "run.py {system}").replace("{system}", SYSTEM)
        try:
            words = shlex.split(command)
        except ValueError as e:
            raise JobFailed(f"command: cannot be read ({e}); give e.g. 'run.py {{system}}'") from None
        script = words[0] if words else ""
        rel = archives.safe_relpath(script)
        if not script.endswith(".py") or rel is None:
            raise JobFailed(f"command: {command!r} must start with a Python script inside the job's code (a "
                            "relative path ending in .py), e.g. 'run.py {system}'")
        if not (scratch / rel).is_file():
            found = sorted(p.name for p in scratch.glob("*.py"))[:10]
            raise JobFailed(f"command: the script {rel} is not in the job's code (Python files at its top: "
                            f"{', '.join(found) or 'none'})")
        return [str(self.s.python), rel, *words[1:]]

    async def _pip(self, reqs: list[str], scratch: Path, env: dict, account: Account, jlog: JobLog) -> None:
        jlog.note(f"Installing {', '.join(reqs)} for this job (hardware_config.extra_pip_installs).")
        argv = [str(self.s.python), "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
                "--progress-bar", "off", "--target", str(scratch / INTERNAL / "packages"), *reqs]
        proc = await self.executor.start(argv, scratch, env, self.s.run_limits, account)
        try:
            while chunk := await proc.stdout.read(1 << 16):
                jlog.write(chunk.decode(errors="replace"))
            code = await proc.wait()
        finally:
            self.executor.kill(proc.pid, None)
            self.executor.ended(proc.pid)
        if code != 0:
            raise JobFailed(f"hardware_config.extra_pip_installs: pip could not install {', '.join(reqs)} (see the "
                            "log above)")

    async def _execute(self, job: Job, argv, scratch: Path, env: dict, account: Account, wall: int,
                       jlog: JobLog) -> tuple[int, str | None]:
        proc = await self.executor.start(argv, scratch, env, self.s.run_limits, account)
        self.store.set_process(job.id, proc.pid, account.uid)
        why: list[str] = []

        tail = bytearray()

        async def pump():  # chunks, not lines: a job may print a megabyte without a newline
            while chunk := await proc.stdout.read(1 << 16):
                jlog.write(chunk.decode(errors="replace"))
                tail.extend(chunk)
                del tail[:-4096]

        async def watch():
            t_end = time.monotonic() + wall
            while proc.returncode is None:
                reason = None
                if time.monotonic() > t_end:
                    reason = f"The job ran for longer than its time limit of {wall} s and was stopped"
                elif _tree_size(scratch, skip=INTERNAL) > self.s.output_bytes:
                    reason = (f"The job wrote more than {self.s.output_bytes // 2**20} MiB "
                              "(jobs.limits.output_mb) and was stopped")
                elif self.store.cancel_requested(job.id):
                    reason = f"The job was cancelled {self.store.cancel_words(job.id)}"
                if reason:
                    why.append(reason)
                    self.executor.kill(proc.pid, None)
                    return
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch())
        try:
            await pump()
            code = await proc.wait()
        except asyncio.CancelledError:
            self.executor.kill(proc.pid, None)
            raise
        finally:
            watcher.cancel()
            self.executor.kill(proc.pid, None)  # whatever it left running in the background
            self.executor.ended(proc.pid)
            self.store.set_process(job.id, None, None)
        if not why and code != 0 and (code == -signal.SIGXFSZ or _largest_file(scratch) >= self.s.output_bytes
                                      or _tree_size(scratch, skip=INTERNAL) > self.s.output_bytes):
            # Python ignores SIGXFSZ: past the file-size limit its write fails (EFBIG) and the script ends with 1.
            why.append(f"The job wrote more than {self.s.output_bytes // 2**20} MiB (jobs.limits.output_mb) and was "
                       "stopped")
        if not why and code == -signal.SIGXCPU:
            why.append(f"The job used more than {self.s.run_limits.cpu_seconds} s of CPU time (jobs.limits.cpu_time) "
                       "and was stopped")
        if not why and code != 0:  # the limits a program meets as errors of its own: say which limit it was
            said = tail.decode(errors="replace")
            if "MemoryError" in said or "Cannot allocate memory" in said:
                why.append(f"The job ran out of memory: each of its processes may use at most "
                           f"{self.s.run_limits.memory_bytes // 2**20} MiB (jobs.limits.memory_mb)")
            elif "Resource temporarily unavailable" in said and ("fork" in said or "BlockingIOError" in said):
                why.append(f"The job started too many processes: at most {self.s.run_limits.processes} at once "
                           "(jobs.limits.processes)")
        return code, (why[0] if why else None)

    def _collect(self, job: Job, scratch: Path, before: dict, account: Account) -> tuple[list[dict], list[str]]:
        """New or changed files, copied out with the job account's rights, listed with size and sha256; what
        sPyNNaker writes under reports/ goes into one reports.zip."""
        after = _snapshot(scratch)
        new = sorted(p for p, sig in after.items() if before.get(p) != sig)
        out = self.s.outputs / str(job.id)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, mode=0o700)
        if not new:
            return [], []
        proc = self.executor.tar_files(scratch, new, account)
        try:
            files, skipped = archives.receive_outputs(proc.stdout, out, self.s.output_bytes, self.s.output_files)
        except archives.ArchiveError as e:
            proc.kill()
            proc.wait()
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True, mode=0o700)
            return [], [str(e)]
        finally:
            proc.wait()
        reports = [f for f in files if f["path"].startswith("reports/")]
        if reports:
            files = [f for f in files if not f["path"].startswith("reports/")]
            with zipfile.ZipFile(out / "reports.zip", "w", zipfile.ZIP_DEFLATED) as z:
                for f in reports:
                    z.write(out / f["path"], f["path"])
            shutil.rmtree(out / "reports", ignore_errors=True)
            files.append(_describe(out, "reports.zip"))
        for f in files:
            f["content_type"] = mimetypes.guess_type(f["path"])[0] or "application/octet-stream"
        return files, skipped


@dataclass
class HeldBoard:
    """A running job's BoardSession (None: the job runs virtual) and when its board came."""

    session: BoardSession | None
    since: float | None = None
    released: bool = False


def _describe(root: Path, rel: str) -> dict:
    h = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    return {"path": rel, "size": (root / rel).stat().st_size, "hash": h}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of the regular files (no link followed; the runner's own files left out)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == INTERNAL or rel_dir.startswith(INTERNAL + os.sep) or rel_dir == ".git" or \
                rel_dir.startswith(".git" + os.sep):
            dirs[:] = []
            continue
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not os.path.islink(path) and (st.st_mode & 0o170000) == 0o100000:
                out[os.path.normpath(os.path.join(rel_dir, name))] = (st.st_size, st.st_mtime_ns)
    return out


def _tree_size(root: Path, skip: str = "") -> int:
    total = 0
    for dirpath, dirs, files in os.walk(root):
        if skip and os.path.relpath(dirpath, root) == skip:
            dirs[:] = []
            continue
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _largest_file(root: Path) -> int:
    largest = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                largest = max(largest, os.lstat(os.path.join(dirpath, name)).st_size)
            except OSError:
                pass
    return largest


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "unknown"
