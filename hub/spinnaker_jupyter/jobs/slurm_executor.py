"""`jobs.executor: slurm`: each job's command runs as a Slurm job, submitted with `sbatch` by the user's own system
account (the local executor's accounts: the same `jupyter-<name>` as their server), so Slurm's queue, priorities,
fair share, limits and accounting apply to it as to any of the user's jobs.

* What is asked of Slurm: the job's time limit (`--time`, whole minutes: the runner's own limit, which stays the
  one users meet, plus the longest wait for the go below and a minute: Slurm's is the backstop while the service is
  down; lowered with `scontrol update` when the go is written, to the time run so far plus the runner's limit and
  a minute, so that the backstop is at most two minutes past the runner's limit), its memory (`--mem`), one core,
  `--no-requeue` (a job never runs twice in silence), and one licence per SpiNNaker board
  (`spawner.slurm.board_license`, in session and machine mode) as for user servers, so that Slurm never runs more
  jobs and sessions than there are boards. The runner's rlimits are set on sbatch, and Slurm gives them to the job
  (PropagateResourceLimits, default ALL).
* The job's `slot()` submits it as soon as its code is ready, with a batch script that waits for a go: while it
  waits in the Slurm queue, the job's log (and its detail on the Jobs page) says its place and Slurm's reason in
  words, and a cancel or a service stop scancels it. Once Slurm runs it, the runner claims the job's board (so a
  queued job holds none), and `start()` writes the go: the command and its environment (naming the board), in the
  job's cfg folder (data_dir/jobs/cfg/<id>, root's, readable by the job's group only: the job cannot forge it).
  The script then replaces itself with the command; the runner's time limit counts from the go. With no go within
  `spinnaker.claim_timeout` + GO_MARGIN seconds (the service died meanwhile) the script ends by itself, and
  however the slot ends without a go (no board, a cancel, a service stop) its Slurm job is scancelled. The script
  looks for the go every 0.1 s: on NFS, mount data_dir so that a new file is seen at once (README "Past one
  machine").
* The job's output goes to `.job/slurm.out` in its scratch folder (which every node mounts at the same path:
  data_dir on shared storage); the service reads it as the job runs, refusing a file the job's account does not
  own or a link. The state comes from `scontrol show job` every POLL seconds (squeue's own finest refresh; sooner
  just after the submission and the start, so that a short job is not held back by the poll); the
  exit code and the end (done, failed, cancelled, time limit, node failure, out of memory) from Slurm, said in
  words in the log when Slurm, not the runner, ended it.
* Cancel and kill = `scancel`. Every Slurm job id is recorded (data_dir/jobs/slurm/, root only) from its
  submission until it is over; at start-up the service scancels the ones a previous run left (their jobs go back
  in the queue, as on the local executor).
* A pip install for `extra_pip_installs` runs on the service's machine (local executor), into the shared scratch
  folder: it needs no board and should not queue twice.

(Over ~400 lines: one executor, whose submission, go file, queue words, state polling and recovery of a previous
run's Slurm jobs share the job's Slurm id and files and are only safe read together.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

from .. import slurm_queue
from . import sessions
from .executor import LocalExecutor
from .runner import INTERNAL, JobFailed, JobLog, _stamp

log = logging.getLogger("spinnaker_jupyter.jobs")
POLL = 1.0  # seconds between scontrol calls (squeue --iterate's finest step)
FIRST_POLL = 0.25  # right after a change the first calls come sooner, doubling up to POLL (a short job ends early)
GO_MARGIN = 120  # seconds the batch script waits for its go beyond the board claim's own limit (claim_timeout)
GO_FILE = "go"


def _pauses():
    pause = FIRST_POLL
    while True:
        yield pause
        pause = min(POLL, pause * 2)


READ_EVERY = 0.25  # seconds between reads of the output file (a local or NFS read, not a Slurm call)
OUT_FILE = "slurm.out"

#: Endings Slurm decides, in words (the runner says its own: time limit, output limit, cancel).
ENDINGS = {
    "TIMEOUT": "Slurm stopped the job at its Slurm time limit",
    "CANCELLED": "the Slurm job was cancelled outside this service (scancel by an operator, or by the account)",
    "NODE_FAIL": "the Slurm node running the job failed",
    "OUT_OF_MEMORY": "the job ran out of memory (jobs.limits.memory_mb)",
    "PREEMPTED": "Slurm preempted the job for other work",
    "BOOT_FAIL": "the Slurm node could not be started for the job",
    "DEADLINE": "the job missed its Slurm deadline",
}


class SlurmExecutor(LocalExecutor):
    def __init__(
        self,
        homes_dir: Path,
        system_users: bool,
        prefix: str,
        *,
        store,
        settings,
        slurm: dict,
        board_mode: str,
        claim_timeout: int = 0,
        sessions_dir: Path | None = None,
        log=None,
    ):
        super().__init__(homes_dir, system_users, prefix, log=log, sessions_dir=sessions_dir)
        self.store, self.s, self.board_mode = store, settings, board_mode
        self.go_wait = int(claim_timeout) + GO_MARGIN
        self.conf = slurm.get("conf") or ""
        self.partition = slurm.get("partition") or ""
        self.slurm_account = slurm.get("account") or ""
        self.qos = slurm.get("qos") or ""
        self.license = slurm.get("board_license") or ""
        self.extra = list(slurm.get("extra_sbatch_options") or [])
        self.records = settings.data / "slurm"
        self.records.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.records, 0o700)
        self.jobs: dict[int, SlurmJob] = {}  # Slurm job id -> its job, this run of the service
        self.slots: dict[int, SlurmJob] = {}  # job id -> its Slurm job, from its submission until its go
        self.local: set[int] = set()  # pids of local commands (pip) this run started
        self.bin = {t: shutil.which(t) or f"/usr/bin/{t}" for t in ("sbatch", "scontrol", "scancel", "squeue")}
        self._sweep()

    @classmethod
    def for_deployment(cls, d, settings, store, local: LocalExecutor) -> SlurmExecutor:
        sl, js = dict(d["spawner"]["slurm"]), d["jobs"]["slurm"]
        if sl["conf"]:
            sl["conf"] = str(d.path(sl["conf"], Path()))
        for key in ("partition", "account", "qos"):  # the jobs' own, else the servers'
            sl[key] = js[key] or sl[key]
        sl["extra_sbatch_options"] = js["extra_sbatch_options"]
        return cls(
            local.homes_dir,
            local.system_users,
            local.prefix,
            store=store,
            settings=settings,
            slurm=sl,
            board_mode=d["spinnaker"]["mode"],
            claim_timeout=d["spinnaker"]["claim_timeout"],
            sessions_dir=local.sessions_dir,
            log=local.log,
        )

    # --- Slurm commands (as root: the service sees and cancels every job it submitted) --------------------------
    @property
    def slurm_env(self) -> dict:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            **({"SLURM_CONF": self.conf} if self.conf else {}),
        }

    async def _run(self, *argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=self.slurm_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/"
        )
        out, err = await proc.communicate()
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def show(self, slurm_id: int) -> dict[str, str] | None:
        """The job as `scontrol show job` says it; None once Slurm no longer knows it."""
        code, out, err = await self._run(self.bin["scontrol"], "-o", "show", "job", str(slurm_id))
        if code != 0:
            if "Invalid job id" in err:
                return None
            raise RuntimeError(err.strip() or f"scontrol exited with {code}")
        return slurm_queue.parse_show(out)

    async def position(self, slurm_id: int) -> str:
        part = ["-p", self.partition] if self.partition else []
        code, out, _ = await self._run(self.bin["squeue"], "-h", "-t", "PD", "--sort=-p,i", "-o", "%i", *part)
        ids = out.split() if code == 0 else []
        return str(ids.index(str(slurm_id)) + 1) if str(slurm_id) in ids else "?"

    def _scancel(self, slurm_id: int) -> None:
        subprocess.run(
            [self.bin["scancel"], str(slurm_id)],
            env=self.slurm_env,
            capture_output=True,
            timeout=30,
            cwd="/",
            check=False,
        )

    def _sweep(self) -> None:
        """Slurm jobs a previous run of the service submitted and did not see end: cancelled (their jobs go back in
        the queue through the runner's recovery)."""
        for entry in self.records.iterdir():
            if entry.name.isdigit():
                self._scancel(int(entry.name))
                log.warning("Cancelled Slurm job %s left by a previous run of the job service", entry.name)
            entry.unlink(missing_ok=True)

    # --- the executor interface ---------------------------------------------------------------------------------
    def sbatch_argv(self, job_id: int, cwd: Path, limits, wall: int, boards: int) -> list[str]:
        args = [
            self.bin["sbatch"],
            "--parsable",
            f"--job-name=spinnaker-job-{job_id}",
            f"--chdir={cwd}",
            f"--output={cwd / INTERNAL / OUT_FILE}",
            "--no-requeue",
            "--export=ALL",
            "--cpus-per-task=1",
            f"--time={math.ceil((wall + self.go_wait) / 60) + 1}",
            f"--mem={limits.memory_bytes // 2**20}M",
        ]
        if self.license and boards:
            args.append(f"--licenses={self.license}:{boards}")
        for flag, value in (("partition", self.partition), ("account", self.slurm_account), ("qos", self.qos)):
            if value:
                args.append(f"--{flag}={value}")
        return args + self.extra

    def _job_settings(self, job_id: int) -> tuple[int, int]:
        """(wall seconds, boards) of the job, as the runner reads its hardware config."""
        job = self.store.get(job_id)
        config = json.loads(job.hardware_config or "{}") if job else {}
        wall = config.get("time_limit") or self.s.wall_time
        boards = config.get("boards", 1) if self.board_mode in ("session", "machine") else 0
        return int(wall), int(boards)

    def go_path(self, job_id: int, slurm_id: int | str) -> Path:
        """Named by the Slurm job too: one left by an attempt the service did not see end is no go for the next."""
        return self.s.job_cfgs / str(job_id) / f"{GO_FILE}-{slurm_id}"

    def batch_script(self, job_id: int) -> str:
        """Python itself (no shell): waits (bounded) for the go, then replaces itself with the command it names,
        in the environment it names (and Slurm's own SLURM_* variables)."""
        go, bound = str(self.go_path(job_id, "")), self.go_wait
        return (
            f"#!{self.s.python}\nimport json, os, sys, time\n"
            f"go, end = {go!r} + os.environ['SLURM_JOB_ID'], time.monotonic() + {bound}\n"
            "while not os.path.exists(go):\n"
            "    if time.monotonic() > end:\n"
            f"        sys.exit('[spinnaker-jupyter] no go from the job service within {bound} s: it stopped meanwhile')\n"
            "    time.sleep(0.1)\n"
            "with open(go) as f:\n    run = json.load(f)\n"
            "env = {k: v for k, v in os.environ.items() if k.startswith('SLURM')}\n"
            "os.execve(run['argv'][0], run['argv'], {**env, **run['env']})\n"
        )

    @contextlib.asynccontextmanager
    async def slot(self, job_id, cwd, limits, account):
        wall, boards = self._job_settings(job_id)
        sbatch = self.sbatch_argv(job_id, cwd, limits, wall, boards)
        proc = await asyncio.create_subprocess_exec(
            *sbatch,
            env=self.slurm_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
            preexec_fn=self._preexec(limits, account),
        )
        out, err = await proc.communicate(self.batch_script(job_id).encode())
        if proc.returncode != 0:
            raise JobFailed(self._refusal(err.decode(errors="replace")))
        slurm_id = int(out.decode().strip().split(";")[0])
        (self.records / str(slurm_id)).write_text(str(job_id))
        job = SlurmJob(self, slurm_id, job_id, cwd, account.uid)
        self.jobs[slurm_id] = self.slots[job_id] = job
        where = ", ".join(a.removeprefix("--") for a in sbatch if a.startswith(("--partition", "--licenses")))
        self._note(
            job_id, f"Submitted to Slurm as job {slurm_id}" + (f" ({where})" if where else "") + f", as {account.name}."
        )
        try:
            await job.wait_running()
            yield
        finally:
            self.slots.pop(job_id, None)
            if not job.went:  # no board, a cancel, a service stop, Slurm lost: the waiting Slurm job goes too
                job.cancelled = True
                self._scancel(slurm_id)
                self.ended(slurm_id)
            self.go_path(job_id, slurm_id).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # (the board's cfg may still be there: release() removes it)
                self.go_path(job_id, slurm_id).parent.rmdir()

    async def start(self, argv, cwd, env, limits, account):
        if argv[1:3] == ["-m", "pip"]:
            proc = await super().start(argv, cwd, env, limits, account)
            self.local.add(proc.pid)
            return proc
        job = self.slots.get(int(env["SPINNAKER_JOB_ID"]))
        if job is None:
            raise RuntimeError("a job's command runs on Slurm only inside its slot()")
        await self._limit_to_the_run(job)
        self._write_go(
            self.go_path(job.job_id, job.pid), {"argv": argv, "env": env}, account.gid if account.switched else None
        )
        job.go()
        return job

    async def _limit_to_the_run(self, job: SlurmJob) -> None:
        """Lower the Slurm job's time limit, which covered the longest wait for the go, to the time it has run so far
        plus the runner's limit and a minute. Slurm's clock counts from the job's start, the wait for the board
        included, so the submitted limit cannot leave the wait out; and lowered, not raised from a short one: a limit
        may be lowered by anyone and is the bound Slurm schedules by, and a failed update then leaves the submitted
        limit, still a bound, where a failed raise would have Slurm end the run before the runner's limit."""
        wall, _ = self._job_settings(job.job_id)
        ran = job.run_seconds()
        if ran is None:  # (a RunTime not understood: too short a limit would end the run, the submitted one stays)
            log.warning("Slurm job %s keeps its submitted time limit: RunTime %r", job.pid, job.run_time)
            return
        minutes = math.ceil((ran + wall) / 60) + 1
        code, _, err = await self._run(self.bin["scontrol"], "update", f"JobId={job.pid}", f"TimeLimit={minutes}")
        if code != 0:
            log.warning("Slurm job %s keeps its submitted time limit: %s", job.pid, err.strip() or f"exit {code}")

    def _write_go(self, go: Path, run: dict, gid: int | None) -> None:
        """Written whole, then renamed (the script never reads half of it), in root's folder for the job."""
        folder = go.parent
        folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        if gid is not None and os.geteuid() == 0:
            os.chown(folder, 0, gid)
        os.chmod(folder, 0o750)
        part = folder / f".{go.name}.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "w") as f:
            json.dump(run, f)
        if gid is not None and os.geteuid() == 0:
            os.chown(part, 0, gid)
        os.chmod(part, 0o640)
        os.replace(part, go)

    def _refusal(self, stderr: str) -> str:
        keys = {
            "partition": "jobs.slurm.partition (or spawner.slurm.partition)",
            "account": "jobs.slurm.account (or spawner.slurm.account)",
            "qos": "jobs.slurm.qos (or spawner.slurm.qos)",
            "license": "spawner.slurm.board_license",
            "conf": "spawner.slurm.conf",
            "memory": "jobs.limits.memory_mb",
        }
        values = {"partition": self.partition, "account": self.slurm_account, "qos": self.qos, "license": self.license}
        said = slurm_queue.sbatch_error(stderr, keys, values)
        return f"Slurm refused the job: {said}" if said else f"Slurm refused the job: {' '.join(stderr.split())}"

    def _note(self, job_id: int, text: str) -> None:
        JobLog.append(self.s.logs / f"{job_id}.log", text)

    def _detail(self, job_id: int, text: str | None) -> None:
        set_detail = getattr(self.store, "set_detail", None)  # (a store with a detail column: the Jobs page shows it)
        if set_detail:
            set_detail(job_id, text)

    def kill(self, pgid: int, uid: int | None) -> None:
        job = self.jobs.get(pgid)
        if job is not None:
            job.cancelled = True
            self._scancel(pgid)
        elif pgid in self.local or (self.sessions_dir and pgid in sessions.recorded(self.sessions_dir)):
            super().kill(pgid, uid)
        # else: a Slurm job of a previous run of the service, cancelled at start-up (_sweep)

    def ended(self, pid: int) -> None:
        if self.jobs.pop(pid, None) is not None:
            (self.records / str(pid)).unlink(missing_ok=True)
        elif pid in self.local or (self.sessions_dir and pid in sessions.recorded(self.sessions_dir)):
            self.local.discard(pid)
            super().ended(pid)


class SlurmJob:
    """What the runner needs of a started command (pid, stdout.read, wait, returncode), for a Slurm job: `pid` is the
    Slurm job id; stdout is the job's output file, read as it grows; the end and exit code come from Slurm."""

    def __init__(self, executor: SlurmExecutor, slurm_id: int, job_id: int, cwd: Path, uid: int):
        self.x, self.pid, self.job_id, self.cwd, self.uid = executor, slurm_id, job_id, cwd, uid
        self.returncode: int | None = None
        self.stdout = self
        self.cancelled = False  # by this service (the runner says why)
        self.went = False  # the go was given: the command runs (or ran)
        self._info: dict | None = None
        self._running_at = 0.0  # time.monotonic() when self._info (RUNNING) was read
        self.state = "PENDING"
        self._fd: int | None = None
        self._over = asyncio.Event()
        self._follower: asyncio.Task | None = None
        self._ending: bytes = b""

    async def wait_running(self) -> None:
        """Until Slurm runs the job; meanwhile its place in the queue and the reason, in words. Raises JobFailed
        when it ended without running (a cancel, an operator's scancel)."""
        said, checked = None, 0.0
        pauses = _pauses()
        while True:
            try:
                info = await self.x.show(self.pid)
            except RuntimeError as e:  # the controller away for a moment: the job waits on in its queue
                log.warning("Slurm job %s: %s", self.pid, e)
                await asyncio.sleep(POLL)
                continue
            self.state = info.get("JobState", "?") if info else "GONE"
            if self.state not in ("PENDING", "CONFIGURING"):  # (configuring: its node still boots)
                break
            if self.x.store.cancel_requested(self.job_id):
                self.cancelled = True
                self.x._scancel(self.pid)
            reason = info.get("Reason", "")
            if self.state == "PENDING" and (said is None or reason != said[1] or time.monotonic() - checked > 5 * POLL):
                checked = time.monotonic()  # (the place is asked for less often: one more squeue of the queue)
                position = await self.x.position(self.pid)
                if said != (position, reason):
                    said = (position, reason)
                    words = f"waiting in the Slurm queue: position {position}, {slurm_queue.pending_words(reason)}"
                    self.x._note(self.job_id, f"{_stamp()}: {words}")
                    self.x._detail(self.job_id, words[0].upper() + words[1:])
            await asyncio.sleep(next(pauses))
        self.x._detail(self.job_id, None)
        self._info = info
        if self.state != "RUNNING":
            if self.cancelled and self.x.store.cancel_requested(self.job_id):
                words = self.x.store.cancel_words(self.job_id)
                raise JobFailed(f"The job was cancelled {words} while it waited in the Slurm queue")
            why = ENDINGS.get(self.state, f"the Slurm job ended ({self.state})")
            said = self._read(2000).decode(errors="replace").strip()  # (e.g. the batch script could not start)
            if self._fd is not None and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            raise JobFailed(f"{why[0].upper()}{why[1:]} before its command ran" + (f": {said}" if said else ""))
        self._running_at = time.monotonic()
        node = info.get("BatchHost") or info.get("NodeList") or "?"
        self.x._note(self.job_id, f"{_stamp()}: Slurm job {self.pid} runs on {node}.")

    @property
    def run_time(self) -> str:
        return (self._info or {}).get("RunTime", "")

    def run_seconds(self) -> float | None:
        """How long Slurm has run the job: its RunTime ([days-]hours:minutes:seconds) when it was seen running, and
        the time since. None: no RunTime understood."""
        days, _, clock = self.run_time.rpartition("-")
        try:
            h, m, sec = (int(x) for x in clock.split(":"))
            seen = int(days or 0) * 86400 + h * 3600 + m * 60 + sec
        except ValueError:
            return None
        return seen + time.monotonic() - self._running_at

    def go(self) -> None:
        """The go was written: the command runs now; Slurm's state is followed until it ends."""
        self.went = True
        self._follower = asyncio.create_task(self._follow(self._info))

    async def _follow(self, info: dict | None) -> None:
        """Slurm's state every POLL seconds until the job is over; then its exit code."""
        pauses = _pauses()
        try:
            while info is not None and info.get("JobState") not in slurm_queue.ENDED:
                await asyncio.sleep(next(pauses))
                try:
                    info = await self.x.show(self.pid)
                except RuntimeError as e:  # the controller away for a moment: the job may well run on
                    log.warning("Slurm job %s: %s", self.pid, e)
            self.state = info.get("JobState", "GONE") if info else "GONE"
            code = slurm_queue.exit_code(info.get("ExitCode", "0:0")) if info else -9
            if self.state not in ("COMPLETED", "FAILED") and not self.cancelled:
                why = ENDINGS.get(self.state, f"Slurm no longer knows the job (state {self.state})")
                self._ending = f"[spinnaker-jupyter] {_stamp()}: {why}.\n".encode()
            if code == 0 and (self.cancelled or self._ending):
                code = -15
            self.returncode = code
        finally:
            self._over.set()

    def _open(self) -> int | None:
        """The output file, opened without following links, only if the job's account owns it (a job may put a
        link or another file there; the service reads as root)."""
        fds = []
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
            fds.append(os.open(self.cwd, flags | os.O_DIRECTORY))
            fds.append(os.open(INTERNAL, flags | os.O_DIRECTORY, dir_fd=fds[-1]))
            fd = os.open(OUT_FILE, flags, dir_fd=fds[-1])
        except OSError:
            return None
        finally:
            for f in fds:
                os.close(f)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != self.uid or st.st_nlink != 1:
            os.close(fd)
            self._ending += b"[spinnaker-jupyter] The job's output file was replaced; its output is not read.\n"
            return -1
        return fd

    def _read(self, n: int) -> bytes:
        if self._fd is None:
            self._fd = self._open()
        if self._fd is None or self._fd < 0:
            return b""
        return os.read(self._fd, n)

    async def read(self, n: int = -1) -> bytes:
        n = n if n > 0 else 1 << 16
        while True:
            over = self._over.is_set()  # (read before the file: what the job wrote before its end is all there)
            data = self._read(n)
            if data:
                return data
            if over:
                data, self._ending = self._ending, b""
                if self._fd is not None and self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                return data
            await asyncio.sleep(READ_EVERY)

    async def wait(self) -> int:
        await self._over.wait()
        return self.returncode
