"""The Slurm user spawner: batchspawner's SlurmSpawner (pinned, 1.3.0) configured with the project's accounts and
homes, the hub's secrets kept out of the Slurm commands' environment, sbatch's options, spawn progress in words
(the job's place in the Slurm queue and why it waits), the fast readiness wait, and Slurm's refusals as one line
naming the key to fix. slurm.py says how the pieces fit and applies `spawner.slurm`; the boards are slurm_boards.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import time
from pathlib import Path

from batchspawner import JobStatus, SlurmSpawner
from jupyterhub.spawner import SpawnException
from traitlets import Bool, Integer, List, Unicode, default

from .progress import ProgressMixin, wait_until_listening
from .slurm_queue import pending_words
from .spawner import PrivateHomeSpawner
from .uid_range import DEFAULT_UID_RANGE

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Seconds between queue-position checks while a job waits (one extra squeue call each).
QUEUE_CHECK_EVERY = 2.0
#: squeue during a start: first after FIRST_POLL s, then doubling up to POLL_MAX (squeue --iterate's finest step), so
#: that one start is seen running at once and 30 at a time do not fill the hub's cores with squeue processes.
FIRST_POLL, POLL_MAX = 0.25, 1.0


class SlurmStartError(SpawnException):
    """A start Slurm refused or lost; the message (shown on the spawn page) says why and what to change."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="slurm", status_code=503)
        self.jupyterhub_message = message


class SlurmUserSpawner(ProgressMixin, SlurmSpawner):
    """SlurmSpawner with the local spawner's accounts and homes, progress in words and the fast readiness wait."""

    homes_dir = Unicode(help="Folder holding each user's home; every Slurm node mounts it at this path.").tag(
        config=True
    )
    system_users = Bool(help="Run each server as the user's own system account (requires root).").tag(config=True)
    system_user_prefix = Unicode("jupyter-", help="Prefix of the system account names.").tag(config=True)
    uid_range = List(
        Integer(), list(DEFAULT_UID_RANGE), minlen=2, maxlen=2, help="First and last uid of new system accounts."
    ).tag(config=True)
    slurm_conf = Unicode("", help="slurm.conf the Slurm commands use (SLURM_CONF); empty: the system's.").tag(
        config=True
    )
    board_license = Unicode(
        "", help="Slurm licence taken per SpiNNaker board (empty: boards are not counted by Slurm)."
    ).tag(config=True)
    extra_sbatch_options = List(Unicode(), help="More sbatch options, each one argument.").tag(config=True)

    # The local spawner's account and home handling, reused as it is (one naming, one refusal of foreign accounts).
    system_username = PrivateHomeSpawner.system_username
    home = PrivateHomeSpawner.home
    _ensure_account = PrivateHomeSpawner._ensure_account
    _own_account = PrivateHomeSpawner._own_account

    @default("system_users")
    def _system_users_default(self):
        return os.geteuid() == 0

    @default("exec_prefix")
    def _exec_prefix_default(self):
        return f"{shutil.which('runuser') or '/usr/sbin/runuser'} -u {{username}} --" if self.system_users else ""

    @default("req_username")
    def _req_username_default(self):
        return self.system_username if self.system_users else ""

    @default("req_homedir")
    def _req_homedir_default(self):
        return str(self.home)

    @default("notebook_dir")
    def _notebook_dir_default(self):
        return str(self.home)

    def user_env(self, env):
        env["USER"] = self.system_username if self.system_users else os.environ.get("USER", "")
        env["HOME"] = str(self.home)
        env["SHELL"] = "/bin/bash"
        return env

    def get_env(self):
        env = super().get_env()
        env.setdefault("PATH", DEFAULT_PATH)  # (JupyterHub 6 passes none on; sbatch, runuser and the job need one)
        if self.slurm_conf:
            env["SLURM_CONF"] = self.slurm_conf
        return env

    async def run_command(self, cmd, input=None, env=None):
        # batchspawner runs squeue and scancel with the hub's own environment (env=None), through exec_prefix as the
        # user: the hub's secrets (proxy token, crypt key) would be readable in that process's environ by the user.
        # They get only what the Slurm commands need.
        if env is None:
            env = self.run_env()
        try:
            return await super().run_command(cmd, input=input, env=env)
        except RuntimeError:
            # batchspawner 1.3.0's bare `except:` turns a cancel (the hub's shutdown cancels every task) into "the
            # command failed": an squeue cut short then reads as "job not found", the server counts as stopped and
            # the stopping hub spends 30 s retrying its dead proxy, while the boards' keepalives lapse. A cancel
            # stays a cancel.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from None
            raise

    # -- what sbatch is asked for ----------------------------------------------------------------------------
    def boards_for_slurm(self) -> int:
        """Licences to ask for: the boards this server holds (BoardsMixin), none without board handling."""
        mode = getattr(self, "board_mode", "virtual")
        if mode == "session":
            return self.boards_wanted()
        return 1 if mode == "machine" else 0

    def sbatch_command(self) -> str:
        args = ["sbatch", "--parsable", f"--job-name=jupyter-{self.user.name}"[:64]]
        boards = self.boards_for_slurm()
        if self.board_license and boards:
            args.append(f"--licenses={self.board_license}:{boards}")
        if self.req_qos:
            args.append(f"--qos={self.req_qos}")
        if self.req_account:
            args.append(f"--account={self.req_account}")
        args += list(self.extra_sbatch_options)
        # (formatted once more by batchspawner: no braces may reach it; the schema refuses them in options)
        return " ".join(shlex.quote(a) for a in args)

    # -- start -----------------------------------------------------------------------------------------------
    async def start(self):
        t0 = time.monotonic()
        self.progress_reset()
        if self.system_users:
            self.progress_say(10, f"Preparing your private home folder and account {self.system_username}")
        else:
            self.progress_say(10, "Preparing your home folder")
        await asyncio.get_running_loop().run_in_executor(None, self._ensure_account)
        self.batch_submit_cmd = self.sbatch_command()
        self.req_keepvars = ",".join(self.get_env())  # this start's variables (board cfg, token), by name only
        where = f" (partition {self.req_partition})" if self.req_partition else ""
        self.progress_say(20, f"Submitting your server to the Slurm cluster{where}")
        self._queue_said, self._queue_checked = None, 0.0
        self._in_start = True
        self._started_job = ""
        self._node_addr = ""
        self.startup_poll_interval = FIRST_POLL
        try:
            ip, port = await super().start()
        except RuntimeError as e:
            raise self._start_error(str(e)) from None
        finally:
            self._in_start = False
        self.progress_say(60, f"Your Slurm job {self.job_id} runs on {ip}; waiting for Jupyter there to answer")

        async def ended():
            status = await self.query_job_status()
            if status in (JobStatus.RUNNING, JobStatus.UNKNOWN):
                return None
            return f"Your Slurm job {self.job_id} ended during start-up. {self._job_log_tail()}"

        await wait_until_listening(ip, port, self.start_timeout, ended)
        self.progress_say(90, f"Your server is up after {time.monotonic() - t0:.1f} s; opening it")
        return ip, port

    async def submit_batch_script(self):
        job_id = await super().submit_batch_script()
        if job_id:
            self._started_job = job_id  # (batchspawner clears job_id when the job is lost during start)
            self.progress_say(30, f"Slurm accepted your server as job {job_id}")
        return job_id

    async def query_job_status(self):
        status = await super().query_job_status()
        if getattr(self, "_in_start", False) and status == JobStatus.PENDING:
            await self._say_queue()
        if getattr(self, "_in_start", False):  # (batchspawner's start loop sleeps this long before the next query)
            running = status == JobStatus.RUNNING  # then it only waits for the port report: no command per wait
            self.startup_poll_interval = 0.1 if running else min(POLL_MAX, self.startup_poll_interval * 2)
        if getattr(self, "_in_start", False) and status == JobStatus.RUNNING and not self._node_addr:
            self._node_addr = await self._node_address(super().state_gethost())
            await self.on_job_running()
        return status

    async def on_job_running(self) -> None:
        """Slurm runs this start's job (once per start)."""

    _node_addr = ""

    def state_gethost(self):
        # The node's Slurm address (NodeAddr), which its server binds to (slurm_singleuser.py), not its name.
        return self._node_addr or super().state_gethost()

    async def _node_address(self, node: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "scontrol",
            "-o",
            "show",
            "node",
            node,
            env=self.run_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        found = re.search(r"\bNodeAddr=(\S+)", out.decode(errors="replace"))
        return found.group(1) if found else node

    def run_env(self) -> dict:
        return {
            "PATH": DEFAULT_PATH,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **({"SLURM_CONF": self.slurm_conf} if self.slurm_conf else {}),
        }

    async def _say_queue(self) -> None:
        if time.monotonic() - self._queue_checked < QUEUE_CHECK_EVERY and self._queue_said is not None:
            return
        self._queue_checked = time.monotonic()
        reason = self.job_status.split()[1] if len(self.job_status.split()) > 1 else "?"
        position = "?"
        try:
            # The queue in Slurm's own order of priority: this job's place among the pending jobs of its partition.
            part = ["-p", self.req_partition] if self.req_partition else []
            out = await self.run_command(
                " ".join(["squeue", "-h", "-t", "PD", "--sort=-p,i", "-o", "%i", *map(shlex.quote, part)]),
                env=self.get_env(),
            )
            ids = out.split()
            if self.job_id in ids:
                position = str(ids.index(self.job_id) + 1)
        except RuntimeError:
            pass
        said = (position, reason)
        if said != self._queue_said:
            self._queue_said = said
            self.progress_say(
                40, f"Your server is waiting in the Slurm queue: position {position}, {pending_words(reason)}"
            )

    def _start_error(self, stderr: str) -> SlurmStartError:
        text = " ".join(stderr.split())
        if re.search(r"invalid partition", text, re.I):
            return SlurmStartError(
                f"Slurm refused your server: the partition '{self.req_partition}' does not exist ({text}). The "
                "operator sets spawner.slurm.partition to one that `sinfo` lists."
            )
        if re.search(r"invalid account", text, re.I):
            return SlurmStartError(
                f"Slurm refused your server: the account '{self.req_account}' is not valid here ({text}). The "
                "operator sets spawner.slurm.account to one `sacctmgr show assoc` lists for this user."
            )
        if re.search(r"invalid qos", text, re.I):
            return SlurmStartError(
                f"Slurm refused your server: the QoS '{self.req_qos}' is not valid ({text}). The "
                "operator fixes spawner.slurm.qos."
            )
        if re.search(r"Unable to process configuration file|s_p_parse_file", text, re.I):
            return SlurmStartError(
                f"The Slurm commands cannot read their configuration ({text}). The operator sets "
                "spawner.slurm.conf to a slurm.conf every user's account can read (or leaves it null for the "
                "system's)."
            )
        if re.search(r"invalid license", text, re.I):
            return SlurmStartError(
                f"Slurm refused your server: the cluster has no licence '{self.board_license}' for SpiNNaker boards "
                f"({text}). The operator adds `Licenses={self.board_license}:<boards>` to slurm.conf or sets "
                "spawner.slurm.board_license."
            )
        if re.search(
            r"Unable to contact slurm controller|Connection refused|connect failure|Socket timed out", text, re.I
        ):
            return SlurmStartError(
                "The Slurm cluster is not answering (its controller cannot be reached), so your server cannot "
                f"start now; try again in a few minutes. The operator checks slurmctld. ({text})"
            )
        if "disappeared" in text:
            return SlurmStartError(
                f"Your Slurm job {self._started_job} ended before your server started. {self._job_log_tail()}"
            )
        return SlurmStartError(f"Slurm did not start your server: {text}")

    def _job_log_tail(self, lines: int = 10) -> str:
        job = self.job_id or getattr(self, "_started_job", "")
        if not job:
            return ""
        path = Path(self.req_homedir) / f"jupyterhub_slurmspawner_{job}.log"
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "Last lines of its log:\n" + "\n".join(tail)
