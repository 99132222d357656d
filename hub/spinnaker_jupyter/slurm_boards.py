"""SpiNNaker boards for Slurm user servers (`spinnaker.mode` session or machine): each board is a Slurm licence the
job asks for, and the boards are claimed only once Slurm runs the job (a server waiting in the queue holds none),
then handed to the job through a file in the user's home that its script waits for before Jupyter starts."""

from __future__ import annotations

import asyncio
import shlex
import shutil
import subprocess
from pathlib import Path

from .boards import BoardsMixin
from .boards.mixin import NoBoardError
from .boards.session import NoBoard
from .slurm_spawner import DEFAULT_PATH, SlurmStartError, SlurmUserSpawner


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
        self.req_prologue = BOARD_WAIT.format(
            dir=shlex.quote(str(Path(self.home) / ".spinnaker-jupyter")), tries=limit * 5
        )
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
        argv = [
            "sh",
            "-c",
            'umask 077 && mkdir -p "$1" && cat > "$2.tmp" && mv "$2.tmp" "$2"',
            "sh",
            str(path.parent),
            str(path),
        ]
        if self.system_users:
            argv = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", self.system_username, "--", *argv]
        done = subprocess.run(
            argv, input=text, text=True, capture_output=True, env={"PATH": DEFAULT_PATH}, cwd="/", check=False
        )
        if done.returncode != 0:
            raise SlurmStartError(f"Could not hand the SpiNNaker board to your Slurm job: {done.stderr.strip()}")


#: The variables of a server's boards (spinnaker_server_contract.ServerContract: mode .. board_notice).
BOARD_VARS = (
    "SPINNAKER_MODE",
    "SPINNAKER_MACHINE_CFG",
    "SPINNAKER_BOARD",
    "SPINNAKER_BOARD_JOB",
    "SPINNAKER_BOARD_JOB_URL",
    "SPINNAKER_BOARD_NOTICE",
)
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
