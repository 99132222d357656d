"""The deployment's bound on first set-ups running at once (``git_kernel.concurrency``).

A room of students logs in together: each server answers within seconds, then starts its set-up (a dozen CPU-seconds
of git and pip). Each local server has a cgroup of its own, so a lower nice value does not yield to the servers still
starting beside it: thirty set-ups at once would take the CPU from those starts, and finish all together, late. So
set-ups take turns: the hub makes one file per allowed set-up in a folder only it can write (``slots_dir``), and a
set-up holds an exclusive flock on one of them while it works (flock needs only read access; a process that ends
releases it). A folder or file another account could have made is not trusted: then there is no bound. While
servers start or wait to start, the hub holds every slot itself (hub: spawn_queue.SlotHold): set-ups wait for the end
of a burst of logins.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

SLOT_GLOB = "slot-*"


def _trusted(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.getuid()) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def slot_files(slots_dir: str | os.PathLike[str] | None) -> list[Path]:
    """The slots the hub made, or [] (no bound) when there is no folder or it is not the hub's alone."""
    if not slots_dir:
        return []
    folder = Path(slots_dir)
    try:
        if not _trusted(folder.stat()):
            return []
        files = sorted(folder.glob(SLOT_GLOB))
        return [f for f in files if stat.S_ISREG(f.lstat().st_mode) and _trusted(f.lstat())]
    except OSError:
        return []


def _try_one(files: list[Path]) -> int | None:
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            os.close(fd)
    return None


@contextlib.contextmanager
def turn(
    slots_dir: str | os.PathLike[str] | None,
    on_wait: Callable[[int], None],
    max_wait: float = 1800.0,
    on_give_up: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Hold one of the deployment's set-up slots for the ``with`` block, waiting for one to be free. ``on_wait(n)``
    is called once if the set-up has to wait (n: how many run at a time); after ``max_wait`` seconds it goes ahead
    anyway (``on_give_up``), so that an account holding every slot cannot stop the others' set-ups for good."""
    files = slot_files(slots_dir)
    fd = _try_one(files) if files else None
    if files and fd is None:
        on_wait(len(files))
        deadline = time.monotonic() + max_wait
        while fd is None and time.monotonic() < deadline:
            time.sleep(1.0)  # polling the slots; bounded by max_wait
            fd = _try_one(files)
        if fd is None and on_give_up is not None:
            on_give_up()
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the slot
