"""The user's ``support/`` folder (gitupdate.sh, automatic_make.sh, repos.txt, make_order.txt), the kernelspec, and
the C build at creation."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from spinnaker_server_contract import ServerContract

from .config import MAKE_ORDER_FILE, MakeStep, RepoSpec, read_make_order
from .runner import Runner, tail
from .state import SetupError, Status, atomic_write, file_hash

SUPPORT_SCRIPTS = ("gitupdate.sh", "automatic_make.sh")


def support_source_dir() -> Path:
    """Where gitupdate.sh / automatic_make.sh / make_order.txt are shipped: $SPINNAKER_GIT_SUPPORT_DIR, package data
    (spinnaker_jupyter_ext/data/spynnaker-git-support), or the repository checkout (kernels/spynnaker-git/support)."""
    package = Path(__file__).resolve().parent.parent
    candidates = []
    told = ServerContract.from_env().git_support_dir
    if told:
        candidates.append(Path(told))
    candidates += [
        package / "data" / "spynnaker-git-support",
        package.parent.parent / "kernels" / "spynnaker-git" / "support",
    ]
    for cand in candidates:
        if all((cand / s).is_file() for s in (*SUPPORT_SCRIPTS, MAKE_ORDER_FILE)):
            return cand
    raise SetupError("the sPyNNakerGit support scripts were not found in " + ", ".join(str(c) for c in candidates))


def make_steps(configured: tuple[MakeStep, ...] | None) -> list[MakeStep]:
    """The C build order: the deployment's git_kernel.make_order, else the shipped make_order.txt (the one order
    automatic_make.sh follows)."""
    return list(configured if configured is not None else read_make_order(support_source_dir() / MAKE_ORDER_FILE))


def install_support(
    root: Path,
    specs: list[RepoSpec],
    steps: list[MakeStep],
    status: Status,
    state: dict[str, Any],
    save_state: Callable[[], None],
) -> None:
    """Copy the support scripts and write repos.txt / make_order.txt. A file is (re)written only when absent or
    unchanged since we last wrote it: the user's edits stay."""
    src = support_source_dir()
    support = root / "support"
    support.mkdir(exist_ok=True)
    written = state.setdefault("support", {})
    files: dict[str, tuple[str, int]] = {}
    for name in SUPPORT_SCRIPTS:
        files[name] = ((src / name).read_text(), 0o755)
    files["repos.txt"] = (
        "# repositories of this environment, in order (support/gitupdate.sh reads this)\n"
        + "".join(f"{s.name}{'' if s.python else ' c'}\n" for s in specs),
        0o644,
    )
    files[MAKE_ORDER_FILE] = (
        "# C build order of support/automatic_make.sh: DIRECTORY [install]\n" + "".join(f"{s.line()}\n" for s in steps),
        0o644,
    )
    for name, (text, mode) in files.items():
        path = support / name
        current = file_hash(path)
        new = hashlib.sha256(text.encode()).hexdigest()
        if current == new:
            written[name] = new
            continue
        if current is not None and current != written.get(name):
            status.warn(f"support/{name} was edited; kept as it is (the shipped version was not installed)")
            continue
        atomic_write(path, text, mode)
        written[name] = new
    save_state()
    status.say("support scripts in place: support/gitupdate.sh, support/automatic_make.sh", "support", advance=True)


def register_kernel(
    kdir: Path,
    root: Path,
    display_name: str,
    kernel_env: Mapping[str, str],
    launcher: str,
    runner: Runner,
    status: Status,
) -> None:
    probe = runner.program(root / "bin" / "python", "kernel_launcher", what="checking the kernel launcher")
    if launcher == "auto":
        # the pinned kernel's launcher (one sPyNNaker cfg, the machine notice) when the
        # layered env has it, else plain ipykernel
        launcher = "spinnaker_kernel" if probe["spinnaker_kernel"] else "ipykernel_launcher"
    spec: dict[str, Any] = {
        "argv": [str(root / "bin" / "python"), "-m", launcher, "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        # no debugger: its TCP port would let other accounts in (spinnaker_kernel.py, "No debugger")
        "metadata": {"debugger": False, "spinnaker_jupyter": {"kind": "git", "root": str(root)}},
    }
    if kernel_env:
        spec["env"] = dict(kernel_env)
    atomic_write(kdir / "kernel.json", json.dumps(spec, indent=1) + "\n")
    for logo in ("logo-32x32.png", "logo-64x64.png"):
        if probe["resources"] and os.path.isfile(os.path.join(probe["resources"], logo)):
            shutil.copyfile(os.path.join(probe["resources"], logo), kdir / logo)
    status.say(f"kernel {display_name!r} registered in {kdir}", "kernel", advance=True)


def build_c(root: Path, mode: str, env: Mapping[str, str], runner: Runner, status: Status) -> None:
    gp = env.get("GP", "arm-none-eabi")
    if shutil.which(f"{gp}-gcc", path=env.get("PATH")) is None:
        msg = (
            f"C code not built: {gp}-gcc is not installed; the kernel works in virtual "
            f"mode, run support/automatic_make.sh where the ARM toolchain is available"
        )
        if mode == "always":
            raise SetupError(msg)
        status.warn(msg)
        status.data["done"] += 1
        return
    status.say("building the C code (support/automatic_make.sh)", "build_c")
    proc = runner.run(["bash", root / "support" / "automatic_make.sh"], check=False, what="automatic_make.sh")
    if proc.returncode != 0:
        msg = f"C build failed: {tail(proc.stdout, 8)}"
        if mode == "always":
            raise SetupError(msg)
        status.warn(msg + " (the kernel works; rerun support/automatic_make.sh)")
    status.say("C code built" if proc.returncode == 0 else "C build skipped", "build_c", advance=True)
