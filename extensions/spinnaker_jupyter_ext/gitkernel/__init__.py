"""The git-master kernel "sPyNNakerGit": first-login creation of ``~/sPyNNakerGit``.

``~/sPyNNakerGit`` is a virtual environment holding clones of the SpiNNakerManchester repositories (by default at
``master``), the Python ones installed in editable mode, and registered as the Jupyter kernel "sPyNNakerGit". It
stays at the commits of its creation until the user runs ``support/gitupdate.sh`` and ``support/automatic_make.sh``.

Runs inside the user's server, as the user. :func:`ensure_git_kernel` is idempotent and resumable:

* every clone is made into ``.partial-<name>`` and renamed into place only when complete, so an interrupted clone
  (network cut, server stopped) is redone at the next start;
* a clone already in place is never written to (no fetch, reset or checkout): the user's changes there are theirs;
* an exclusive lock (``.setup.lock``) keeps two starts from racing;
* progress goes to the ``progress`` callback, ``setup.log`` and ``setup-status.json``.

Shared caches: the venv is created from the pinned sPyNNaker kernel environment (``base_env``) and sees its
site-packages through a ``.pth`` file, so the third-party dependencies (numpy, scipy, PyNN, neo, ipykernel, ...) are
not installed again per user; each clone is installed with ``pip install --no-deps -e``. Whatever a clone needs that
the pinned environment lacks is installed into the user's venv from the wheelhouse / pip cache given by the
deployment config.

Modules: ``config`` (the view of the hub's validated ``git_kernel`` section), ``create`` (the steps in order),
``clones``, ``environment``, ``support`` (support scripts, kernelspec, C build), ``state`` (status, log, lock),
``runner`` (commands, and the ``programs/`` run by path in other interpreters), ``cli`` (background start, command
line). Only the standard library is used.
"""

from __future__ import annotations

from .cli import EXIT_BUSY, EXIT_FAILED, EXIT_OK, EXIT_USAGE, main, start_background
from .config import CONFIG_ENV, MAKE_ORDER_FILE, GitKernelConfig, MakeStep, RepoSpec, read_make_order
from .create import ensure_git_kernel, needs_setup
from .environment import LAYER_PTH
from .runner import Runner
from .state import PARTIAL_PREFIX, SetupBusy, SetupError, SetupResult, Status, read_status
from .support import SUPPORT_SCRIPTS, register_kernel

# the names tests/integration/test_kernel_debugger.py registers a kernel with
_Runner, _register_kernel = Runner, register_kernel

__all__ = [
    "CONFIG_ENV",
    "MAKE_ORDER_FILE",
    "LAYER_PTH",
    "PARTIAL_PREFIX",
    "SUPPORT_SCRIPTS",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_BUSY",
    "RepoSpec",
    "MakeStep",
    "GitKernelConfig",
    "SetupError",
    "SetupBusy",
    "SetupResult",
    "Status",
    "Runner",
    "ensure_git_kernel",
    "needs_setup",
    "read_status",
    "read_make_order",
    "register_kernel",
    "start_background",
    "main",
]
