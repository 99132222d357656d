"""User servers as Slurm jobs (`spawner.type: slurm`): batchspawner's SlurmSpawner (pinned, 1.3.0), configured, with
the project's accounts, spawn progress in words, the fast readiness wait and SpiNNaker boards on top.

* Each server runs as the user's own system account (the local spawner's naming, `spinnaker_jupyter.spawner`); as
  root the hub submits with `sbatch` as that account (`runuser`), so Slurm's accounting, limits and fair share see
  the user. Homes live on `homes_dir`, which every node must mount at the same path.
* Boards are a cluster resource: in `session`/`machine` mode each job asks for one Slurm licence
  (`spawner.slurm.board_license`) per board, so Slurm never starts more servers than there are boards, and a queued
  server shows why it waits. The boards themselves are claimed once Slurm runs the job (a server waiting in the
  queue holds none); the job waits for them before it starts Jupyter (SpiNNakerSlurmSpawner).
* While the job waits, the spawn page says "waiting in the Slurm queue: position N, reason R". The server reports
  its port to the hub (batchspawner-singleuser and batchspawner's API handler); the hub routes to the node Slurm
  ran it on. The hub's poll (`squeue`) notices a job that ended (scancel, node failure, time limit); the boards
  are then given back by the post-stop hook (boards.py). Jobs outlive a hub restart (`hub.stop_servers_on_exit`
  is false for Slurm by default): the job id is in the server's state, and the restarted hub's first poll finds it
  running and resumes its boards' keepalive.

batchspawner 1.3.0 was checked against JupyterHub 6.1.1: its module, its API handler (`/hub/api/batchspawner`,
registered through `jupyterhub.apihandlers.default_handlers` at import) and `batchspawner-singleuser` work unchanged.
What differs from its defaults here is configuration: JupyterHub 6 keeps no PATH in a server's environment
(`Spawner.env_keep`), and batchspawner assumes that the hub user's name is a system account (`user_env`,
`req_username`, `req_homedir`) and that `sudo` exists (`exec_prefix`); this module sets all of them.
Three upstream behaviours are fenced, each with a test in tests/test_slurm.py that fails when upstream changes:
its squeue/scancel inherit the hub's environment, secrets included (`run_command` below gives them only what
Slurm needs); its start() commits through `Spawner.db`, deprecated in JupyterHub 6.1 (a warning per start); its API
handler sets any spawner attribute a user's server names, the commands the hub runs as root included
(`PortReportHandler` takes the port only). Its servers listen on 0.0.0.0: here on the node's Slurm address
(slurm_singleuser.py), which is also where the hub connects (`state_gethost`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from batchspawner import JobStatus, SlurmSpawner
from jupyterhub.apihandlers import APIHandler
from jupyterhub.spawner import SpawnException
from tornado import web
from traitlets import Bool, List, Unicode, default

from .boards import BoardsMixin
from .boards.mixin import NoBoardError
from .boards.session import NoBoard
from .progress import ProgressMixin, wait_until_listening
from .slurm_queue import pending_words
from .spawner import PrivateHomeSpawner

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
        config=True)
    system_users = Bool(help="Run each server as the user's own system account (requires root).").tag(config=True)
    system_user_prefix = Unicode("jupyter-", help="Prefix of the system account names.").tag(config=True)
    slurm_conf = Unicode("", help="slurm.conf the Slurm commands use (SLURM_CONF); empty: the system's.").tag(
        config=True)
    board_license = Unicode("", help="Slurm licence taken per SpiNNaker board (empty: boards are not counted by "
                                     "Slurm).").tag(config=True)
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
        return await super().run_command(cmd, input=input, env=env)

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
        proc = await asyncio.create_subprocess_exec("scontrol", "-o", "show", "node", node, env=self.run_env(),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        found = re.search(r"\bNodeAddr=(\S+)", out.decode(errors="replace"))
        return found.group(1) if found else node

    def run_env(self) -> dict:
        return {"PATH": DEFAULT_PATH, "LANG": os.environ.get("LANG", "C.UTF-8"),
                **({"SLURM_CONF": self.slurm_conf} if self.slurm_conf else {})}

    async def _say_queue(self) -> None:
        if time.monotonic() - self._queue_checked < QUEUE_CHECK_EVERY and self._queue_said is not None:
            return
        self._queue_checked = time.monotonic()
        reason = self.job_status.split()[1] if len(self.job_status.split()) > 1 else "?"
        position = "?"
        try:
            # The queue in Slurm's own order of priority: this job's place among the pending jobs of its partition.
            part = ["-p", self.req_partition] if self.req_partition else []
            out = await self.run_command(" ".join(["squeue", "-h", "-t", "PD", "--sort=-p,i", "-o", "%i",
                                                   *map(shlex.quote, part)]), env=self.get_env())
            ids = out.split()
            if self.job_id in ids:
                position = str(ids.index(self.job_id) + 1)
        except RuntimeError:
            pass
        said = (position, reason)
        if said != self._queue_said:
            self._queue_said = said
            self.progress_say(40, f"Your server is waiting in the Slurm queue: position {position}, "
                                  f"{pending_words(reason)}")

    def _start_error(self, stderr: str) -> SlurmStartError:
        text = " ".join(stderr.split())
        if re.search(r"invalid partition", text, re.I):
            return SlurmStartError(
                f"Slurm refused your server: the partition '{self.req_partition}' does not exist ({text}). The "
                "operator sets spawner.slurm.partition to one that `sinfo` lists.")
        if re.search(r"invalid account", text, re.I):
            return SlurmStartError(
                f"Slurm refused your server: the account '{self.req_account}' is not valid here ({text}). The "
                "operator sets spawner.slurm.account to one `sacctmgr show assoc` lists for this user.")
        if re.search(r"invalid qos", text, re.I):
            return SlurmStartError(f"Slurm refused your server: the QoS '{self.req_qos}' is not valid ({text}). The "
                                   "operator fixes spawner.slurm.qos.")
        if re.search(r"Unable to process configuration file|s_p_parse_file", text, re.I):
            return SlurmStartError(
                f"The Slurm commands cannot read their configuration ({text}). The operator sets "
                "spawner.slurm.conf to a slurm.conf every user's account can read (or leaves it null for the "
                "system's).")
        if re.search(r"invalid license", text, re.I):
            return SlurmStartError(
                f"Slurm refused your server: the cluster has no licence '{self.board_license}' for SpiNNaker boards "
                f"({text}). The operator adds `Licenses={self.board_license}:<boards>` to slurm.conf or sets "
                "spawner.slurm.board_license.")
        if re.search(r"Unable to contact slurm controller|Connection refused|connect failure|Socket timed out",
                     text, re.I):
            return SlurmStartError(
                "The Slurm cluster is not answering (its controller cannot be reached), so your server cannot "
                f"start now; try again in a few minutes. The operator checks slurmctld. ({text})")
        if "disappeared" in text:
            return SlurmStartError(f"Your Slurm job {self._started_job} ended before your server started. "
                                   f"{self._job_log_tail()}")
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


class SpiNNakerSlurmSpawner(BoardsMixin, SlurmUserSpawner):
    """Boards as licences, claimed when Slurm runs the job: a server waiting in the Slurm queue (for cores, memory or
    a licence) holds no board. The job asks Slurm for its licences; once it runs, the hub claims the boards
    (boards/session.py) and hands their environment (the sPyNNaker cfg) to the job through a file in the user's
    home, which the job's script waits for before it starts Jupyter (`BOARD_WAIT`)."""

    def _board_file(self) -> Path:
        return Path(self.home) / ".spinnaker-jupyter" / f"slurm-board-{self.job_id}.env"

    async def start(self):
        if self.board_mode not in ("session", "machine"):
            return await super().start()
        # BoardsMixin.start, with the claim moved from before the submission to when the job runs (on_job_running).
        if self._unreleased is not None:
            old, self._unreleased = self._unreleased, None
            await old.release("user server no longer running")
        self.progress_reset()
        session = self._session = self._new_session()
        self._stop_called = False
        self._claim_due = True
        limit = int(self.spinnaker["claim_timeout"]) + 120
        # (sbatch --export names what the job's srun passes on: the boards' variables, set only once it runs)
        self.req_keepvars_extra = ",".join(BOARD_VARS)
        self.req_prologue = BOARD_WAIT.format(dir=shlex.quote(str(Path(self.home) / ".spinnaker-jupyter")),
                                              tries=limit * 5)
        self._boards_in_start = True
        try:
            started = await SlurmUserSpawner.start(self)
            session.started()
            return started
        except BaseException:
            await asyncio.shield(self._release_boards("the server failed to start"))
            raise
        finally:
            self._boards_in_start = False

    async def on_job_running(self) -> None:
        if not getattr(self, "_claim_due", False):
            return
        self._claim_due = False
        try:
            await self._session.claim(self.boards_wanted() if self._session.mode == "session" else 1)
        except NoBoard as e:
            await self.cancel_batch_job()
            raise NoBoardError(str(e)) from None
        text = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self._session.env().items())
        await asyncio.get_running_loop().run_in_executor(None, self._hand_over, text)
        self.progress_say(55, "Your board is ready; Jupyter starts on it")

    def _hand_over(self, text: str) -> None:
        """The boards' environment into the file the job waits for, written by the user's own account (their home)."""
        path = self._board_file()
        argv = ["sh", "-c", 'umask 077 && mkdir -p "$1" && cat > "$2.tmp" && mv "$2.tmp" "$2"', "sh",
                str(path.parent), str(path)]
        if self.system_users:
            argv = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", self.system_username, "--", *argv]
        done = subprocess.run(argv, input=text, text=True, capture_output=True, env={"PATH": DEFAULT_PATH}, cwd="/",
                              check=False)
        if done.returncode != 0:
            raise SlurmStartError(f"Could not hand the SpiNNaker board to your Slurm job: {done.stderr.strip()}")


#: The variables of a server's boards (spinnaker_server_contract.ServerContract: mode .. board_notice).
BOARD_VARS = ("SPINNAKER_MODE", "SPINNAKER_MACHINE_CFG", "SPINNAKER_BOARD", "SPINNAKER_BOARD_JOB",
              "SPINNAKER_BOARD_JOB_URL", "SPINNAKER_BOARD_NOTICE")
#: The job script's wait for its boards (sh; batchspawner's prologue): the hub writes the file once it has claimed
#: them for the running job; sourced, then removed. A hub that never writes it: the job ends after `tries` / 5 s.
BOARD_WAIT = """f={dir}/slurm-board-$SLURM_JOB_ID.env
n=0
while [ ! -f "$f" ]; do
  n=$((n + 1))
  if [ "$n" -gt {tries} ]; then echo "spinnaker-jupyter: no SpiNNaker board came for this job" >&2; exit 1; fi
  sleep 0.2
done
. "$f" && rm -f "$f"
"""


def configure(c, d, args: list[str]) -> None:
    """Apply `spawner.slurm` (and the accounts of `spawner.local`) to JupyterHub's config `c`."""
    from .hubconfig import system_users_enabled

    sp, sl = d["spawner"], d["spawner"]["slurm"]
    c.JupyterHub.spawner_class = "spinnaker_jupyter.slurm.SpiNNakerSlurmSpawner"
    s = c.SpiNNakerSlurmSpawner
    s.homes_dir = str(d.homes_dir)
    s.system_users = system_users_enabled(d)
    s.system_user_prefix = sp["local"]["system_user_prefix"]
    if sl["conf"]:
        s.slurm_conf = str(d.path(sl["conf"], Path()))
    s.req_partition = sl["partition"] or ""
    s.req_account = sl["account"] or ""
    s.req_qos = sl["qos"] or ""
    s.req_runtime = sl["time"] or ""
    cpus = sl["cpus"] or (int(-(-sp["cpu_limit"] // 1)) if sp["cpu_limit"] else None)
    s.req_nprocs = str(cpus) if cpus else ""
    s.req_memory = sl["memory"] or sp["mem_limit"] or ""
    s.board_license = sl["board_license"] or ""
    s.extra_sbatch_options = list(sl["extra_sbatch_options"])
    s.batch_query_cmd = "squeue -h -j {job_id} -o '%T %r %B'"  # state, pending reason, node (last: the host)
    bin_dir = Path(sys.executable).parent
    # batchspawner-singleuser, bound to the node's Slurm address instead of every interface (slurm_singleuser.py)
    s.batchspawner_singleuser_cmd = f"{shlex.quote(sys.executable)} -m spinnaker_jupyter.slurm_singleuser"
    fence_port_report()
    from .boards.hubconfig import status_command_dir

    folder = status_command_dir(d)  # `spinnaker-status` in the servers' terminals, as for local servers
    if folder:
        c.BoardsMixin.path_append = [str(folder)]
    c.Spawner.cmd = [str(bin_dir / "jupyterhub-singleuser")]
    # The hub listens where the nodes reach it; on one machine that is 127.0.0.1.
    if sl["hub_connect_ip"]:
        c.JupyterHub.hub_ip = "0.0.0.0"
        c.JupyterHub.hub_connect_ip = sl["hub_connect_ip"]
    if not system_users_enabled(d) and os.geteuid() == 0:
        args.append("--allow-root")


# -- fenced: batchspawner 1.3.0's API handler ----------------------------------------------------------------------
BATCHSPAWNER_CHECKED = "1.3.0"


class PortReportHandler(APIHandler):
    """POST /hub/api/batchspawner as batchspawner-singleuser sends it ({"port": N}), and nothing else.

    batchspawner's own handler sets ANY attribute the JSON names on the spawner whose token sent it, and a user's
    server holds that token: `{"batch_query_cmd": "..."}` would be run by the hub, as root, at its next poll. Here
    only a port is taken, only from the server's own token, and only while its start waits for it."""

    @web.authenticated
    def post(self):
        token = self.get_auth_token()
        spawner = next((sp for sp in self.current_user.spawners.values() if sp.api_token == token), None)
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError:
            data = None
        port = data.get("port") if isinstance(data, dict) else None
        if spawner is None or not isinstance(data, dict) or set(data) != {"port"} or type(port) is not int \
                or not 1 <= port <= 65535:
            raise web.HTTPError(400, "Only {\"port\": 1-65535}, sent by a user server with its own token, is taken.")
        if not getattr(spawner, "_in_start", False):
            raise web.HTTPError(409, "The server's port is taken only while it starts.")
        spawner.port = port
        self.set_status(201)
        self.finish(json.dumps({"message": "BatchSpawner data configured"}))


def fence_port_report() -> None:
    """Put PortReportHandler where batchspawner registered its handler (jupyterhub.apihandlers.default_handlers, at
    import). Checked against batchspawner 1.3.0; tests/test_slurm.py fails when that changes."""
    import batchspawner
    from jupyterhub import apihandlers

    if batchspawner.__version__ != BATCHSPAWNER_CHECKED:
        raise RuntimeError(f"batchspawner {batchspawner.__version__} is installed; slurm.py's port-report fence was "
                           f"checked against {BATCHSPAWNER_CHECKED} only: check its API handler, then update it.")
    routes = apihandlers.default_handlers
    for i, (pattern, *_handler) in enumerate(routes):
        if pattern == r"/api/batchspawner":
            routes[i] = (pattern, PortReportHandler)
