"""Running the set-up in the background at server start, and its command line::

    python -m spinnaker_jupyter_ext.gitkernel [--home DIR] [--config-json SECTION] [--wait S] [--quiet] [--status]

The section is the hub's (``SPINNAKER_GIT_KERNEL_CONFIG`` in the server's environment, so in its terminals too);
``--config-json`` gives one instead, in the same shape (every key of the schema's git_kernel section).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .config import CONFIG_ENV, GitKernelConfig
from .create import ensure_git_kernel, needs_setup
from .state import LOG_FILE, SetupBusy, SetupError, read_status

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3


def start_background(
    home: str | os.PathLike[str],
    config: GitKernelConfig | None = None,
    *,
    python: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    nice: int = 0,
) -> subprocess.Popen[bytes] | None:
    """Start the set-up in a detached process unless it is already complete (or not configured / disabled);
    returns at once. Output goes to ``~/<directory>/setup.log``; follow it with :func:`read_status`. For the server
    extension, at server start. ``nice``: how much lower its CPU priority (and its git and pip children's) is than
    the caller's. ``config`` None: the section the hub put in the environment (``env``, default os.environ)."""
    cfg = config if config is not None else GitKernelConfig.from_env(env)
    if cfg is None or not cfg.enabled or not needs_setup(home, cfg):
        return None
    root = Path(home) / cfg.directory
    root.mkdir(parents=True, exist_ok=True)
    run_env = dict(os.environ if env is None else env)
    here = str(Path(__file__).resolve().parent.parent.parent)
    run_env["PYTHONPATH"] = here + (os.pathsep + run_env["PYTHONPATH"] if run_env.get("PYTHONPATH") else "")
    with open(root / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [
                str(python or sys.executable),
                "-m",
                "spinnaker_jupyter_ext.gitkernel",
                "--home",
                str(home),
                "--config-json",
                json.dumps(cfg.to_section()),
                "--quiet",
                "--wait",
                "5",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=run_env,
            start_new_session=True,
            close_fds=True,
        )
    if nice:  # (set from here: a preexec_fn is unsafe in a server with threads; the child is still importing)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + nice)
    return proc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m spinnaker_jupyter_ext.gitkernel",
        description="Create or complete the git-master kernel's folder (~/sPyNNakerGit) and register its kernel.",
    )
    ap.add_argument("--home", default=os.path.expanduser("~"))
    ap.add_argument("--config-json", help=f"the git_kernel section as JSON (default: ${CONFIG_ENV})")
    ap.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long to wait for another running set-up (default: 0)",
    )
    ap.add_argument("--quiet", action="store_true", help="progress only to setup.log")
    ap.add_argument("--status", action="store_true", help="print the status and exit")
    args = ap.parse_args(argv)
    try:
        cfg = (
            GitKernelConfig.from_section(json.loads(args.config_json))
            if args.config_json
            else GitKernelConfig.from_env()
        )
    except (ValueError, TypeError, KeyError) as exc:
        print(f"gitkernel: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if cfg is None:
        print(
            f"gitkernel: no git_kernel configuration: ${CONFIG_ENV} is not set (the hub sets it in every user "
            f"server when git_kernel.enabled is true) and no --config-json was given",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.status:
        print(json.dumps(read_status(args.home, cfg.directory), indent=1))
        return EXIT_OK
    if not cfg.enabled:
        print("gitkernel: git_kernel.enabled is false; nothing to do")
        return EXIT_OK
    progress = None if args.quiet else (lambda m: print(m, flush=True))
    try:
        result = ensure_git_kernel(args.home, cfg, progress=progress, lock_timeout=args.wait)
    except SetupBusy as exc:
        print(f"gitkernel: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except SetupError as exc:
        print(f"gitkernel: set-up failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not result.did_work and progress:
        progress(f"{cfg.display_name} already set up in {result.root}")
    return EXIT_OK
