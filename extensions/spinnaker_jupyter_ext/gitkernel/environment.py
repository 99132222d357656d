"""The user's virtual environment: made from the pinned sPyNNaker env and layered on it, the clones installed in
editable mode, and whatever they need that the pinned env lacks."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import RepoSpec
from .runner import PipArgs, Runner
from .state import SetupError, Status, atomic_write

LAYER_PTH = "zz_spynnaker_base_env.pth"


def ensure_venv(
    root: Path,
    base_python: Path | None,
    runner: Runner,
    status: Status,
    state: dict[str, Any],
    save_state: Callable[[], None],
) -> Path:
    base = base_python or Path(sys.executable)
    if not base.exists():
        raise SetupError(f"the base python {base} does not exist (git_kernel.base_env)")
    python = root / "bin" / "python"
    want: dict[str, Any] = {"base_python": str(base), "layered": bool(base_python), "scheme": 2}
    have = state.get("venv") or {}
    if all(have.get(k) == v for k, v in want.items()) and python.exists() and (root / "pyvenv.cfg").is_file():
        status.say("virtual environment present", "venv", advance=True)
        return python
    status.say(f"creating the virtual environment from {base}", "venv")
    info = runner.program(base, "env_paths", what=f"checking {base}", cwd=Path("/"))
    want["version"] = info["version"]
    if base_python:
        # layered on the pinned env: no pip/setuptools copies of our own
        runner.run([base, "-m", "venv", "--without-pip", root], what="python -m venv")
        own = runner.program(python, "env_paths", what=f"checking {python}", cwd=Path("/"))
        # the pinned env's view (its site-packages, and the system's where it has
        # include-system-site-packages), after the venv's own site-packages
        lines = [
            f"import site; site.addsitedir({p!r})"
            if is_site
            else f"import sys; {p!r} in sys.path or sys.path.append({p!r})"
            for p, is_site in info["layer"]
            if p != own["purelib"]
        ]
        atomic_write(
            Path(own["purelib"]) / LAYER_PTH,
            "# sPyNNakerGit: the pinned sPyNNaker environment's packages\n" + "\n".join(lines) + "\n",
        )
        has_pip = runner.run([python, "-c", "import pip"], check=False).returncode == 0
        if not has_pip:
            runner.run([python, "-m", "ensurepip", "--default-pip"], what="ensurepip")
        elif not (root / "bin" / "pip").exists():
            for name in ("pip", "pip3"):
                atomic_write(
                    root / "bin" / name,
                    f"#!{python}\nimport sys\nfrom pip._internal.cli.main import main\nsys.exit(main())\n",
                    0o755,
                )
    else:
        runner.run([base, "-m", "venv", root], what="python -m venv")
    state["venv"] = want
    state["installed"] = {}  # a new interpreter: install the clones again
    save_state()
    status.say("virtual environment ready", "venv", advance=True)
    return python


def ensure_installed(
    root: Path,
    specs: list[RepoSpec],
    pip: PipArgs,
    runner: Runner,
    status: Status,
    state: dict[str, Any],
    save_state: Callable[[], None],
) -> None:
    installed = state.setdefault("installed", {})
    todo = [s for s in specs if installed.get(s.name) != str(root / s.name)]
    if not todo:
        status.say("editable installs present", "install", advance=True)
        return
    need = runner.program(pip.python, "build_tools", what="checking build tools")
    if need:
        status.say(f"installing the build tool {need} into the venv", "install")
        runner.run(pip.install(need), what=f"pip install {need}")
    names = ", ".join(s.name for s in todo)
    status.say(f"installing in editable mode: {names}", "install")
    # compat mode: a plain path entry per clone, found before the pinned env's copies
    editable = ["--no-deps", "--config-settings", "editable_mode=compat"]
    for s in todo:
        editable += ["-e", str(root / s.name)]
    proc = runner.run(pip.install("--no-build-isolation", *editable), check=False, what="pip install -e")
    if proc.returncode != 0:
        # a clone may need newer build tools than the venv has: build it in isolation
        status.say("retrying with build isolation (the clones' own build requirements)", "install")
        runner.run(pip.install(*editable), what="pip install -e")
    for s in todo:
        installed[s.name] = str(root / s.name)
    save_state()
    status.say(f"installed: {names}", "install", advance=True)


def ensure_dependencies(
    root: Path, python: Path, extra_packages: Sequence[str], pip: PipArgs, runner: Runner, status: Status
) -> None:
    report = runner.program(
        python, "missing_requirements", root, json.dumps(list(extra_packages)), what="checking dependencies"
    )
    for warning in report["warnings"]:
        status.warn(warning)
    if report["missing"]:
        status.say("installing what the pinned environment lacks: " + ", ".join(report["missing"]), "dependencies")
        runner.run(pip.install(*report["missing"]), what="pip install (dependencies)")
    status.say("dependencies satisfied", "dependencies", advance=True)
