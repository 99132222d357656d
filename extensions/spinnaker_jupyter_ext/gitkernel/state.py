"""What a set-up leaves on disk to be followed and resumed: setup-status.json, setup.log, the lock, the state file."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STATUS_FILE = "setup-status.json"
STATE_FILE = ".setup-state.json"
LOG_FILE = "setup.log"
LOCK_FILE = ".setup.lock"
PARTIAL_PREFIX = ".partial-"

ProgressFn = Callable[[str], Any]


class SetupError(RuntimeError):
    """The set-up could not be completed; the message says why and where."""


class SetupBusy(SetupError):
    """Another process holds the set-up lock."""


@dataclasses.dataclass
class SetupResult:
    state: str  # "done" (usable kernel) -- errors raise SetupError
    root: Path
    kernel_dir: Path
    commits: dict[str, str]
    warnings: list[str]
    seconds: float
    did_work: bool  # False when everything was already in place


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def atomic_write(path: Path, text: str, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child has finished
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_status(home: str | os.PathLike[str], dirname: str) -> dict[str, Any]:
    """The set-up status of ``<home>/<dirname>``: ``state`` is "absent" (never started), "running", "done",
    "failed", or "interrupted" (a set-up stopped without finishing: the next start completes it)."""
    root = Path(home) / dirname
    status = read_json(root / STATUS_FILE)
    if not status:
        return {"state": "absent", "root": str(root)}
    if status.get("state") == "running" and not _pid_alive(status.get("pid")):
        status["state"] = "interrupted"
    return status


class Status:
    """Writes setup-status.json and setup.log and calls the progress callback."""

    def __init__(self, root: Path, progress: ProgressFn | None, total: int) -> None:
        self.root = root
        self.progress = progress
        self.log_path = root / LOG_FILE
        self.log = open(self.log_path, "a", buffering=1)
        self.data: dict[str, Any] = {
            "state": "running",
            "pid": os.getpid(),
            "started": now(),
            "updated": now(),
            "step": "start",
            "done": 0,
            "total": total,
            "message": "",
            "warnings": [],
            "commits": {},
            "error": None,
            "log": str(self.log_path),
        }

    def write(self) -> None:
        self.data["updated"] = now()
        atomic_write(self.root / STATUS_FILE, json.dumps(self.data, indent=1) + "\n")

    def say(self, message: str, step: str | None = None, advance: bool = False) -> None:
        if step:
            self.data["step"] = step
        if advance:
            self.data["done"] = min(self.data["done"] + 1, self.data["total"])
        self.data["message"] = message
        self.log.write(f"[{now()}] {message}\n")
        self.write()
        if self.progress is not None:
            try:
                self.progress(message)
            except Exception:  # a broken progress display must not stop the set-up
                self.progress = None

    def warn(self, message: str) -> None:
        self.data["warnings"].append(message)
        self.say(f"WARNING: {message}")

    def finish(self, state: str, error: str | None = None) -> None:
        self.data.update(state=state, error=error, finished=now())
        if state == "done":
            self.data["done"] = self.data["total"]
        self.write()
        self.log.write(f"[{now()}] set-up {state}{': ' + error if error else ''}\n")
        self.log.close()


@contextlib.contextmanager
def lock(path: Path, timeout: float | None) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise SetupBusy(f"another sPyNNakerGit set-up is running ({path} is locked)") from None
                time.sleep(0.2)  # polling a lock; bounded by ``timeout``
        yield
    finally:
        os.close(fd)  # releases the lock
