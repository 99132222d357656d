"""A job's log file (capped; the API serves it while the job runs), the time stamp its notes carry, and the
exception that ends a job with a one-line reason. Imported by the runner, the executors and the commands that
note a cancel in a job's log."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path


class JobFailed(Exception):
    """Ends a job with status error and this one-line reason."""


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class JobLog:
    """The job's log file, capped: past the cap one line says so and the rest is dropped."""

    def __init__(self, path: Path, cap: int):
        self.path, self.cap = path, cap
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.size = path.stat().st_size if path.exists() else 0
        self.capped = False

    def write(self, text: str) -> None:
        data = text.encode(errors="replace")
        if self.size + len(data) > self.cap:
            if self.capped:
                return
            self.capped = True
            data = (
                data[: max(0, self.cap - self.size)]
                + (
                    f"\n[spinnaker-jupyter] The log reached {self.cap // 2**20} MiB (jobs.limits.log_mb); the rest "
                    "of the job's output is not kept here.\n"
                ).encode()
            )
        with open(self.path, "ab") as f:
            f.write(data)
        self.size += len(data)

    def note(self, text: str) -> None:
        self.write(f"[spinnaker-jupyter] {text}\n")

    @staticmethod
    def append(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path, "a") as f:
            f.write(f"[spinnaker-jupyter] {text}\n")
