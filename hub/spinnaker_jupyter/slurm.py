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
  are then given back by the post-stop hook (boards/). Jobs outlive a hub restart (`hub.stop_servers_on_exit`
  is false for Slurm by default): the job id is in the server's state, and the restarted hub's first poll finds it
  running and resumes its boards' keepalive.

batchspawner 1.3.0 was checked against JupyterHub 6.1.1: its module, its API handler (`/hub/api/batchspawner`,
registered through `jupyterhub.apihandlers.default_handlers` at import) and `batchspawner-singleuser` work unchanged.
What differs from its defaults here is configuration: JupyterHub 6 keeps no PATH in a server's environment
(`Spawner.env_keep`), and batchspawner assumes that the hub user's name is a system account (`user_env`,
`req_username`, `req_homedir`) and that `sudo` exists (`exec_prefix`); SlurmUserSpawner sets all of them.
Three upstream behaviours are fenced, each with a test in tests/integration/test_slurm.py that fails when upstream changes:
its squeue/scancel inherit the hub's environment, secrets included (`SlurmUserSpawner.run_command` gives them
only what Slurm needs); its start() commits through `Spawner.db`, deprecated in JupyterHub 6.1 (a warning per
start); its API handler sets any spawner attribute a user's server names, the commands the hub runs as root
included (`PortReportHandler` takes the port only). Its servers listen on 0.0.0.0: here on the node's Slurm
address (slurm_singleuser.py), which is also where the hub connects (`state_gethost`).

Modules: this one applies `spawner.slurm` (configure); slurm_spawner.py is SlurmUserSpawner (batchspawner
configured: accounts, environment, sbatch, queue words, refusals), slurm_boards.py the boards as licences
(SpiNNakerSlurmSpawner), batchspawner_fence.py the port-report handler; slurm_queue.py reads Slurm's words.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .batchspawner_fence import PortReportHandler, fence_port_report
from .slurm_boards import BOARD_VARS, BOARD_WAIT, SpiNNakerSlurmSpawner
from .slurm_spawner import DEFAULT_PATH, SlurmStartError, SlurmUserSpawner

# The spawners live in slurm_spawner.py (SlurmUserSpawner: batchspawner configured) and slurm_boards.py (boards as
# licences), the port-report fence in batchspawner_fence.py; importable from here as before (the hub's
# spawner_class names spinnaker_jupyter.slurm.SpiNNakerSlurmSpawner).
__all__ = [
    "configure",
    "SlurmUserSpawner",
    "SpiNNakerSlurmSpawner",
    "SlurmStartError",
    "PortReportHandler",
    "fence_port_report",
    "BOARD_VARS",
    "BOARD_WAIT",
    "DEFAULT_PATH",
]


def configure(c, d, args: list[str]) -> None:
    """Apply `spawner.slurm` (and the accounts of `spawner.local`) to JupyterHub's config `c`."""
    from .hubconfig import system_users_enabled

    sp, sl = d["spawner"], d["spawner"]["slurm"]
    c.JupyterHub.spawner_class = "spinnaker_jupyter.slurm.SpiNNakerSlurmSpawner"
    s = c.SpiNNakerSlurmSpawner
    s.homes_dir = str(d.homes_dir)
    s.system_users = system_users_enabled(d)
    s.system_user_prefix = sp["local"]["system_user_prefix"]
    s.uid_range = list(sp["local"]["uid_range"])
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
