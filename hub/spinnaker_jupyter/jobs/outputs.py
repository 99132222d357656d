"""A job's outputs: the files its command made or changed in its scratch folder (against a snapshot taken before
it ran), copied out with the job account's rights into the service's outputs folder, listed with size, sha256 and
content type (what sPyNNaker writes under reports/ as one reports.zip), and copied on into ~/jobs/<id>/ by the
user's own account when the user has a home here."""

from __future__ import annotations

import hashlib
import mimetypes
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

from . import archives
from .executor import Account, AccountError, Executor
from .joblog import JobLog
from .settings import Settings
from .steps import INTERNAL
from .store import Job


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of the regular files (no link followed; the runner's own files left out)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if (
            rel_dir == INTERNAL
            or rel_dir.startswith(INTERNAL + os.sep)
            or rel_dir == ".git"
            or rel_dir.startswith(".git" + os.sep)
        ):
            dirs[:] = []
            continue
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not os.path.islink(path) and (st.st_mode & 0o170000) == 0o100000:
                out[os.path.normpath(os.path.join(rel_dir, name))] = (st.st_size, st.st_mtime_ns)
    return out


def collect(
    s: Settings, executor: Executor, job: Job, scratch: Path, before: dict, account: Account
) -> tuple[list[dict], list[str]]:
    """New or changed files, copied out with the job account's rights, listed with size and sha256; what
    sPyNNaker writes under reports/ goes into one reports.zip. Returns (files, what was not collected and why)."""
    after = snapshot(scratch)
    new = sorted(p for p, sig in after.items() if before.get(p) != sig)
    out = s.outputs / str(job.id)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, mode=0o700)
    if not new:
        return [], []
    proc = executor.tar_files(scratch, new, account)
    try:
        files, skipped = archives.receive_outputs(proc.stdout, out, s.output_bytes, s.output_files)
    except archives.ArchiveError as e:
        proc.kill()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, mode=0o700)
        return [], [str(e)]
    finally:
        proc.wait()
    reports = [f for f in files if f["path"].startswith("reports/")]
    if reports:
        files = [f for f in files if not f["path"].startswith("reports/")]
        with zipfile.ZipFile(out / "reports.zip", "w", zipfile.ZIP_DEFLATED) as z:
            for f in reports:
                z.write(out / f["path"], f["path"])
        shutil.rmtree(out / "reports", ignore_errors=True)
        files.append(_describe(out, "reports.zip"))
    for f in files:
        f["content_type"] = mimetypes.guess_type(f["path"])[0] or "application/octet-stream"
    return files, skipped


def copy_home(s: Settings, executor: Executor, job: Job, files: list[dict], jlog: JobLog) -> None:
    """The outputs also land in ~/jobs/<id>/ when the user has a home here, so notebooks can analyse them.
    Written by the user's own account (a tar stream from the service's copy), so a home is never written as
    root. Where homes are container volumes, the executor copies them in (docker_executor.copy_home)."""
    into_volume = getattr(executor, "copy_home", None)
    if into_volume is not None and into_volume(s.outputs / str(job.id), job.id, job.user_id, jlog):
        return
    home = executor.home(job.user_id)
    if not home.is_dir():
        return
    try:
        account = executor.account(job.user_id)
    except AccountError:
        return
    target = home / "jobs" / str(job.id)
    proc = subprocess.Popen(
        ["sh", "-c", 'mkdir -p -- "$1" && exec tar --extract --file=- --directory "$1"', "sh", str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        cwd="/",
        preexec_fn=executor.as_account(account),
    )
    out = s.outputs / str(job.id)
    try:
        with tarfile.open(fileobj=proc.stdin, mode="w|") as tf:
            for f in files:
                tf.add(out / f["path"], arcname=f["path"], recursive=False)
    except (BrokenPipeError, OSError):
        pass
    finally:
        proc.stdin.close()
    err = proc.stderr.read().decode(errors="replace").strip()
    if proc.wait() == 0:
        jlog.note(f"Output files copied to ~/jobs/{job.id}/.")
    else:
        why = err.splitlines()[-1] if err else f"tar exited with {proc.returncode}"
        jlog.note(f"Output files could not be copied to ~/jobs/{job.id}/ ({why}); download them instead.")


def _describe(root: Path, rel: str) -> dict:
    h = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    return {"path": rel, "size": (root / rel).stat().st_size, "hash": h}
