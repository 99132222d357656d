"""The process sessions that running batch jobs live in, recorded so that stopping a user's server (spawner.py)
ends only what belongs to the server and never the user's running jobs.

Every command the runner starts (the job's own, pip for it) begins a session of its own (executor.start), and its
child process records that session id here before it drops to the user's account: one file per session in a folder
only root can write (data_dir/jobs/sessions), named by the session id and holding the uid it runs as. Whatever the
job starts stays in that session (a process cannot join another session, only leave for a new one of its own), so a
recorded session is exactly one job's processes. The runner removes the file when the command has ended, and
clears the folder at start-up after stopping what a previous service left.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

FOLDER = "sessions"


def folder(jobs_data: Path) -> Path:
    return Path(jobs_data) / FOLDER


def prepare(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def record_self(path: Path, uid: int) -> None:
    """In the job's child process, after setsid and before it drops to the user's account (still root)."""
    fd = os.open(path / str(os.getsid(0)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, str(uid).encode())
    finally:
        os.close(fd)


def forget(path: Path, sid: int) -> None:
    try:
        os.unlink(path / str(sid))
    except FileNotFoundError:
        pass


def recorded(path: str | Path) -> dict[int, int]:
    """{session id: uid} of running jobs; empty when the folder is missing or could have been written by anyone but
    this process's account (then nothing is spared: a server's stop ends every process of the account, as before)."""
    if not path:
        return {}
    try:
        st = os.lstat(path)
    except OSError:
        return {}
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return {}
    found = {}
    for entry in os.scandir(path):
        try:
            if entry.name.isdigit() and entry.is_file(follow_symlinks=False):
                with open(entry.path) as f:
                    found[int(entry.name)] = int(f.read().strip() or -1)
        except (OSError, ValueError):
            continue
    return found


def spared_pid(pid: int, uid: int, sessions: dict[int, int]) -> bool:
    """True if `pid` (a process of `uid`) runs in a recorded job session of that same uid."""
    try:
        return sessions.get(os.getsid(pid)) == uid
    except (ProcessLookupError, PermissionError):
        return False
