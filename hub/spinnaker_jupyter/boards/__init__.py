"""SpiNNaker boards for user servers: the `spinnaker.mode` of a deployment, carried out by the spawner.

`BoardsMixin` goes first in the bases of a Spawner class, ahead of every class whose start() does work, so that the
claim (and its wait in a queue) comes before anything else; it says its steps with `ProgressMixin.progress_say`::

    class SpiNNakerLocalSpawner(BoardsMixin, PrivateHomeSpawner): ...      # PrivateHomeSpawner(ProgressMixin, ...)
    class SpiNNakerDockerSpawner(BoardsMixin, ProgressMixin, DockerSpawner): ...

What it does, per mode:

* ``session``: before the server starts, claim ``spalloc.boards`` boards (per user / per hub group) for the user
  from the spalloc service (``SpallocAllocator``, with the hub's token and the user's name as owner), waiting in
  its queue up to ``claim_timeout`` seconds with the queue position said on the spawn page; keep the job alive while
  the server runs; destroy it when the server stops or is found gone by the hub's poll.
* ``machine``: the lab's own board, one user server at a time. A second start waits (up to ``claim_timeout``; the
  spawn page says whose server holds the board) and gets the board when that server stops.
* ``virtual`` / ``per-run``: nothing to claim (per-run: sPyNNaker claims at each setup() with the user's token).

When no board comes in time (or the service cannot be used), ``on_timeout`` decides: ``virtual`` starts the server
in virtual mode and says why (spawn page, first sPyNNaker cell, ``spinnaker-status``); ``fail`` fails the start
with the reason.

The one sPyNNaker cfg of the server goes into its environment as ``SPINNAKER_MACHINE_CFG`` (text), so it reaches a
container as well as a local process; the kernel launcher writes it into a private file and offers only that one.
``SPINNAKER_MODE``, ``SPINNAKER_BOARD``, ``SPINNAKER_BOARD_JOB`` and ``SPINNAKER_BOARD_NOTICE`` describe it for
people (``spinnaker-status``).

Leases: every spalloc job is recorded durably the moment the service makes it (`leases.LeaseStore`, a file in the
hub's private folder), before the claim waits in the queue, and the row goes when the job is given back. At hub
start `leases.reconcile` checks the rows of the dead hub process against the service's job list and destroys each
job no server of this hub holds any more (a claim that was waiting when the hub was killed, a job whose server is
gone), with a log line per job.

Persistence: the claim lives in the spawner's state (``get_state()["spinnaker"]``: job URL and id, board address,
claimed-at, or the lost/fallback reason), which the hub stores in its database and shows admins (admin API, scope
``admin:server_state``). After a hub restart the first poll of a live server resumes its keepalive (the same job:
no second claim); a job that ended meanwhile (the hub was down longer than the keepalive interval) is recorded as
lost, and the next start claims a fresh one. A server found gone gives its job back through the post-stop hook,
which the hub runs for every stop, whether or not the server process was still there.

Live status: ``GET /hub/api/spinnaker/boards/<user>[/<server>]`` (scope ``read:servers`` or ``access:servers`` on
that server: the user, admins, and the server's own token) reads the job's state from the service now, through the
hub's session; ``GET /hub/api/spinnaker/boards`` lists every server's boards (scope ``admin:server_state``).
These are registered with ``JupyterHub.extra_handlers`` (deprecated since JupyterHub 3.1 in favour of services, still
working in 6.1, and logged as deprecated at start-up): they run in the hub because only the hub holds the live
keepalives; a separate service would see only the database's copy.

Layout: `record` (the typed record, stored as the spawner state's dict), `session` (`BoardSession`: claim, resume,
keepalive, release, on-lost; no JupyterHub in it, shared with the batch-job runner), `lock` (the lab board),
`mixin` (the spawner adapter), `handlers` (REST API), `hubconfig` (the hub's config), `admin` (the operator command).
Names are imported lazily, so that `boards.session` and `boards.record` load without JupyterHub.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "cli_boards": "admin",
    "held_boards": "admin",
    "LEASE_FILE": "hubconfig",
    "configure_hub": "hubconfig",
    "reconcile_at_start": "hubconfig",
    "status_command_dir": "hubconfig",
    "SAY_EVERY": "lock",
    "BoardLock": "lock",
    "board_lock": "lock",
    "BoardsMixin": "mixin",
    "NoBoardError": "mixin",
    "STATE_KEY": "record",
    "BoardRecord": "record",
    "BoardSession": "session",
    "NoBoard": "session",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


__all__ = sorted(_WHERE)
