"""Creating (or completing) ``~/<directory>`` and registering its kernel: idempotent and resumable."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import clones, environment, slots, support
from .config import GitKernelConfig
from .runner import PipArgs, Runner
from .state import (
    LOCK_FILE,
    STATE_FILE,
    ProgressFn,
    SetupError,
    SetupResult,
    Status,
    atomic_write,
    lock,
    read_json,
    read_status,
)


def kernels_dir_of(home: Path, kernels_dir: str | os.PathLike[str] | None) -> Path:
    return Path(kernels_dir) if kernels_dir else home / ".local/share/jupyter/kernels"


def needs_setup(
    home: str | os.PathLike[str], config: GitKernelConfig, *, kernels_dir: str | os.PathLike[str] | None = None
) -> bool:
    """Cheap check (no subprocess): False when a finished set-up is in place and its kernelspec has the configured
    display name and environment."""
    home = Path(home)
    root = home / config.directory
    if read_status(home, config.directory).get("state") != "done":
        return True
    spec = read_json(kernels_dir_of(home, kernels_dir) / config.kernel_name / "kernel.json")
    if not (root / "bin" / "python").exists() or not spec:
        return True
    if spec.get("display_name") != config.display_name or spec.get("env", {}) != dict(config.kernel_env):
        return True
    return not all((root / r.name).is_dir() for r in config.repos)


def ensure_git_kernel(
    home: str | os.PathLike[str],
    config: GitKernelConfig,
    *,
    progress: ProgressFn | None = print,
    kernels_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    lock_timeout: float | None = None,
    command_timeout: float = 3600.0,
) -> SetupResult:
    """Create (or complete) ``<home>/<config.directory>`` and register its kernel; idempotent.

    The venv is made from ``config.base_env``'s python and sees its site-packages (no base_env: a plain venv of
    this interpreter, dependencies installed). ``env``: environment of the git / pip / make subprocesses (default:
    os.environ). ``lock_timeout``: seconds to wait for another set-up (None: wait; 0: raise :class:`SetupBusy` at
    once). Raises :class:`SetupError` with the failing step's message; what was completed is kept and the next call
    carries on from there.
    """
    t0 = time.monotonic()
    home = Path(home).expanduser().absolute()
    cfg = config
    root = home / cfg.directory
    specs = list(cfg.repos)
    kdir = kernels_dir_of(home, kernels_dir) / cfg.kernel_name
    root.mkdir(parents=True, exist_ok=True)

    with lock(root / LOCK_FILE, lock_timeout):
        if not needs_setup(home, cfg, kernels_dir=kdir.parent):
            old = read_status(home, cfg.directory)
            return SetupResult(
                "done",
                root,
                kdir,
                dict(old.get("commits", {})),
                list(old.get("warnings", [])),
                time.monotonic() - t0,
                False,
            )

        total = len(specs) + 5 + (1 if cfg.build_c != "never" else 0)
        status = Status(root, progress, total)
        sub_env = dict(os.environ if env is None else env)
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
            sub_env.pop(var, None)
        sub_env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C")
        runner = Runner(status, sub_env, command_timeout)
        state = read_json(root / STATE_FILE)

        def save_state() -> None:
            atomic_write(root / STATE_FILE, json.dumps(state, indent=1) + "\n")

        def wait(n: int) -> None:
            status.say(
                f"waiting for a turn: {n} first set-up{'s' if n > 1 else ''} of ~/{cfg.directory} run at a "
                f"time on this machine",
                "queue",
            )

        def give_up() -> None:
            status.warn("no set-up turn came free in 30 minutes: going ahead without one")

        try:
            with slots.turn(cfg.slots_dir, wait, on_give_up=give_up):
                status.say(f"setting up ~/{cfg.directory} (the {cfg.display_name} kernel) in {root}", "start")
                commits = _steps(cfg, root, kdir, runner, status, state, save_state, sub_env)
        except SetupError as exc:
            status.finish("failed", str(exc))
            raise
        except BaseException as exc:  # KeyboardInterrupt, a bug: say so, then re-raise
            status.finish("failed", f"{type(exc).__name__}: {exc}")
            raise
        status.say(
            f"{cfg.display_name} is ready: kernel {cfg.kernel_name!r}, {len(specs)} repositories in {root}", "done"
        )
        status.finish("done")
        return SetupResult("done", root, kdir, commits, list(status.data["warnings"]), time.monotonic() - t0, True)


def _steps(
    cfg: GitKernelConfig,
    root: Path,
    kdir: Path,
    runner: Runner,
    status: Status,
    state: dict[str, Any],
    save_state: Callable[[], None],
    sub_env: Mapping[str, str],
) -> dict[str, str]:
    """The set-up's steps in order; each skips what is already in place. Returns the clones' commits."""
    specs = list(cfg.repos)
    python = environment.ensure_venv(root, cfg.base_python, runner, status, state, save_state)
    for i, spec in enumerate(specs, 1):
        clones.ensure_clone(root, spec, cfg.base_url, cfg.branch, cfg.clone_args, runner, status, i, len(specs))
    commits = clones.commits(root, specs, runner)
    status.data["commits"] = commits
    pip = PipArgs(python, cfg.wheelhouse, cfg.pip_cache_dir, cfg.offline)
    environment.ensure_installed(root, [s for s in specs if s.python], pip, runner, status, state, save_state)
    environment.ensure_dependencies(root, python, cfg.extra_packages, pip, runner, status)
    support.install_support(root, specs, support.make_steps(cfg.make_order), status, state, save_state)
    support.register_kernel(kdir, root, cfg.display_name, cfg.kernel_env, cfg.launcher, runner, status)
    if cfg.build_c != "never":
        support.build_c(root, cfg.build_c, sub_env, runner, status)
    return commits
