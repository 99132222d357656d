"""Free TCP ports on 127.0.0.1 for the processes a test starts: one helper for every fixture and test."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

# The kernel may hand the same ephemeral port to two binds in a row once the first socket is closed (CI saw a hub
# given one port for hub.port and proxy.api_port), and parallel workers (pytest-xdist) bind at the same time. A
# port handed out once in this run is never handed out again: each is claimed by creating a file named for it in a
# folder the run's processes share (the xdist run id names it; a run without xdist has a folder of its own), in the
# checkout's own cache rather than /tmp, where another account could have made it first.
_LOCK = threading.Lock()
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
_CLAIMS = Path(__file__).resolve().parents[1] / ".cache" / "tests" / "ports" / _RUN


_MINE: list[int] = []


def _claim(port: int) -> bool:
    try:
        os.close(os.open(_CLAIMS / str(port), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        _MINE.append(port)
        return True
    except FileExistsError:
        return False


def free_port() -> int:
    with _LOCK:
        _CLAIMS.mkdir(mode=0o700, parents=True, exist_ok=True)
        for _ in range(200):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if _claim(port):
                return port
    raise RuntimeError("no free TCP port on 127.0.0.1 that this test run has not used already")


def forget_run() -> None:
    """Give back this process's claims (at its session's end, when what used the ports has ended)."""
    with _LOCK:
        for port in _MINE:
            (_CLAIMS / str(port)).unlink(missing_ok=True)
        _MINE.clear()
        with contextlib.suppress(OSError):  # another worker's claims are still there
            _CLAIMS.rmdir()
