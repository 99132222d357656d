"""Running the set-up's commands: git, pip, make, and the small programs of ``programs/`` inside another Python."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .state import SetupError, Status

#: programs run by path with another interpreter (the pinned env's, the user's venv's), which may not have this
#: package: each is a plain script of the standard library (and pip's vendored packaging) printing one JSON line
PROGRAMS = Path(__file__).resolve().parent / "programs"


def tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) if kept else "(no output)"


class Runner:
    def __init__(self, status: Status, env: Mapping[str, str], timeout: float) -> None:
        self.status = status
        self.env = dict(env)
        self.timeout = timeout

    def run(
        self, cmd: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None, check: bool = True, what: str = ""
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(c) for c in cmd]
        log = self.status.log
        log.write(f"$ {shlex.join(argv)}\n")
        try:
            proc = subprocess.run(
                argv,
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=self.timeout,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout if isinstance(exc.stdout, str) else ""
            log.write(out)
            raise SetupError(f"{what or argv[0]}: no result after {self.timeout:.0f} s") from None
        except FileNotFoundError:
            raise SetupError(f"{what or argv[0]}: command {argv[0]!r} not found") from None
        log.write(proc.stdout)
        if check and proc.returncode != 0:
            raise SetupError(f"{what or argv[0]} failed (exit {proc.returncode}): {tail(proc.stdout)}")
        return proc

    def program(
        self,
        python: str | os.PathLike[str],
        name: str,
        *args: str | os.PathLike[str],
        what: str,
        cwd: Path | None = None,
    ) -> Any:
        """Run ``programs/<name>.py`` with ``python``; its last output line, as JSON."""
        proc = self.run([python, PROGRAMS / f"{name}.py", *args], what=what, cwd=cwd)
        return json.loads(proc.stdout.strip().splitlines()[-1])


class PipArgs:
    def __init__(self, python: Path, wheelhouse: Any, cache: Any, offline: bool) -> None:
        self.python = python
        self.common = ["--disable-pip-version-check", "--no-input"]
        if wheelhouse:
            self.common += ["--find-links", str(wheelhouse)]
        if offline:
            self.common += ["--no-index"]
        if cache:
            self.common += ["--cache-dir", str(cache)]

    def install(self, *args: str | os.PathLike[str]) -> list[str]:
        return [str(self.python), "-m", "pip", "install", *self.common, *map(str, args)]
