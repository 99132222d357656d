"""The git clones: each made into ``.partial-<name>`` and renamed into place only when complete; a clone in place
is never written to (the user's changes there are theirs)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from .config import RepoSpec
from .runner import Runner, tail
from .state import PARTIAL_PREFIX, SetupError, Status


def trust_local_mirror(url: str, runner: Runner) -> None:
    """A mirror on this machine belongs to another account (the operator's): git refuses it ("dubious ownership")
    unless the user's own git config trusts it. Trust exactly that repository, for clones and later fetches."""
    path = url[len("file://") :] if url.startswith("file://") else url
    if "://" in path or not os.path.isabs(path):
        return
    candidates = [path, path + ".git"] if not path.endswith(".git") else [path]
    known = runner.run(
        ["git", "config", "--global", "--get-all", "safe.directory"], check=False, what="reading git's trusted folders"
    ).stdout.split()
    for repo in candidates:
        if os.path.isdir(repo) and repo not in known:
            runner.run(
                ["git", "config", "--global", "--add", "safe.directory", repo], what=f"trusting the local mirror {repo}"
            )


def ensure_clone(
    root: Path,
    spec: RepoSpec,
    base_url: str,
    branch: str,
    clone_args: Sequence[str],
    runner: Runner,
    status: Status,
    i: int,
    n: int,
) -> None:
    dest = root / spec.name
    if dest.exists():
        if not (dest / ".git").exists():
            raise SetupError(
                f"{dest} exists but is not a git clone; it was left as it is "
                f"(move it away and restart the server to get a fresh clone)"
            )
        status.say(f"[{i}/{n}] {spec.name}: clone present, left as it is", "clone", advance=True)
        return
    url = spec.clone_url(base_url)
    want = spec.branch or branch
    partial = root / f"{PARTIAL_PREFIX}{spec.name}"
    if partial.exists():
        status.say(f"[{i}/{n}] {spec.name}: removing an interrupted clone", "clone")
        shutil.rmtree(partial)
    status.say(f"[{i}/{n}] {spec.name}: cloning {url} ({want})", "clone")
    trust_local_mirror(url, runner)
    git = ["git", "-c", "http.lowSpeedLimit=1000", "-c", "http.lowSpeedTime=60", "clone", "--quiet", *clone_args]
    proc = runner.run([*git, "--branch", want, url, partial], check=False, what=f"{spec.name}: git clone")
    if proc.returncode != 0:
        out = proc.stdout
        if re.search(r"Remote branch .* not found", out):
            shutil.rmtree(partial, ignore_errors=True)
            status.warn(f"{spec.name}: no branch {want!r} at {url}; cloned its default branch")
            proc = runner.run([*git, url, partial], check=False, what=f"{spec.name}: git clone")
            out = proc.stdout
        if proc.returncode != 0:
            raise SetupError(
                f"{spec.name}: git clone {url} failed (exit {proc.returncode}): {tail(out)}; the next start tries again"
            )
    runner.run(["git", "-C", partial, "rev-parse", "--verify", "HEAD"], what=f"{spec.name}: checking the clone")
    os.rename(partial, dest)  # atomic: a clone in place is a complete clone
    status.say(f"[{i}/{n}] {spec.name}: cloned", "clone", advance=True)


def commits(root: Path, specs: list[RepoSpec], runner: Runner) -> dict[str, str]:
    out = {}
    for spec in specs:
        head = runner.run(
            ["git", "-C", root / spec.name, "rev-parse", "HEAD"], check=False, what=f"{spec.name}: git rev-parse"
        )
        out[spec.name] = head.stdout.strip() if head.returncode == 0 else "?"
    return out
