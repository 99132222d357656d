"""The lab's own board (`spinnaker.mode: machine`): one holder (a user server or a batch job) at a time, across the
hub and the job service.

Each process keeps one `BoardLock` per board (`board_lock`). Once `use_folder` names the deployment's lock folder
(`data_dir/hub/board-locks`, the hub's and the job service's), the lock is an exclusive `flock` on a file there:
the kernel gives it back when the holding process dies, and the holder writes who it is into the file, so that the
waiting side (in another process) can say in words who has the board. The folder and the file must be this account's
and closed to others (nobody else could have put a holder there). Without a folder (a process that is neither, the
unit tests) the lock is in this process only, as before.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import stat
import time
from pathlib import Path

from ..words import duration as words

#: Seconds between "still waiting" messages on the spawn page (machine mode; spalloc says its own).
SAY_EVERY = 30.0
#: The lock folder under the deployment's hub folder (data_dir/hub).
FOLDER = "board-locks"


class BoardLockError(Exception):
    """The lock folder or file is not one this account can trust; the message says which and what to do."""


class BoardLock:
    """One lab board, one holder at a time. `holder` is (user, name) of whoever has it, in this process or another
    (read from the lock file); holders are re-registered from spawner state after a hub restart (`load_state`)."""

    def __init__(self, name: str, folder: str | Path | None = None) -> None:
        self.name = name
        self.folder = Path(folder) if folder is not None else None
        self._mine: tuple[str, str] | None = None  # the holder in this process
        self._noun = "server"
        self._since: float | None = None
        self._fd: int | None = None  # the open lock file while this process holds it

    # -- the lock file -------------------------------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / (re.sub(r"[^A-Za-z0-9._-]", "_", self.name).lstrip(".") or "board")

    def _open(self) -> int:
        """The lock file, opened after checking that only this account could have made or changed it."""
        folder, me = self.folder, os.geteuid()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            _trusted(os.fstat(dfd), folder, "folder", me)
            fd = os.open(self.path.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BoardLockError(f"the lab board lock {self.path} is not a regular file; remove it")
            _trusted(st, self.path, "file", me)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _read(self) -> dict | None:
        """Who holds the board in another process (None: nobody). A shared probe: it never takes the board."""
        try:
            fd = self._open()
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: its holder wrote who it is
                try:
                    return json.loads(os.pread(fd, 4096, 0) or b"{}") or {"user": "", "name": ""}
                except ValueError:
                    return {"user": "", "name": ""}  # (being written this instant)
            return None  # (closing the file ends the probe)
        finally:
            os.close(fd)

    # -- taking and giving back -------------------------------------------------------------------------------
    @property
    def holder(self) -> tuple[str, str] | None:
        """(user, name) of the holder, here or in another process; None when the board is free."""
        if self._mine is not None or self.folder is None:
            return self._mine
        held = self._read()
        return (held.get("user", ""), held.get("name", "")) if held is not None else None

    @property
    def since(self) -> float | None:
        if self._mine is not None or self.folder is None:
            return self._since
        held = self._read()
        return held.get("since") if held else None

    def try_take(self, who: tuple[str, str], noun: str = "server", since: float | None = None) -> bool:
        """Take the board for `who` if free (or already theirs); `noun` says what `who` is ("server", "job"),
        `since` when it took the board (default now; a holder re-registered after a restart gives its own)."""
        if self._mine is not None:
            return self._mine == who
        since = since or time.time()
        if self.folder is not None:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            text = json.dumps({"user": who[0], "name": who[1], "noun": noun, "since": since, "pid": os.getpid()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
            self._fd = fd
        self._mine, self._noun, self._since = who, noun, since
        return True

    def release(self, who: tuple[str, str]) -> None:
        if self._mine != who:
            return
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # (a dead holder's words are never read: no lock, no holder)
            os.close(self._fd)  # releases the flock
            self._fd = None
        self._mine = self._since = None

    # -- in words -----------------------------------------------------------------------------------------------
    def holder_words(self, me: str) -> str:
        """Who has the board, for `me`: "erin's server", "your other server 'gpu'", "erin's job 12 since 10:02"."""
        if self._mine is not None or self.folder is None:
            if self._mine is None:
                return "nobody"
            held = {"user": self._mine[0], "name": self._mine[1], "noun": self._noun, "since": self._since}
        else:
            held = self._read()
            if held is None:
                return "nobody"
        user, name, noun = held.get("user", ""), held.get("name", ""), held.get("noun", "server")
        if noun == "server":
            what = "server" + (f" '{name}'" if name else "")
        else:
            what = name or noun  # (a job's name says its number: "job 12")
        since = f" since {time.strftime('%H:%M', time.gmtime(held['since']))} UTC" if held.get("since") else ""
        if not user:
            return "another holder" + since
        if user == me:
            return (f"your other {what}" if noun == "server" else f"your {what}") + since
        return f"{user}'s {what}{since}"

    async def take(self, who: tuple[str, str], timeout: float, say, noun: str = "server") -> bool:
        """Wait up to `timeout` seconds for the board; `say(message)` while waiting. True when taken."""
        start = time.monotonic()
        said_at, said_holder = -SAY_EVERY, None
        while not self.try_take(who, noun):
            waited = time.monotonic() - start
            if waited >= timeout:
                return False
            holder = self.holder_words(who[0])
            if holder != "nobody" and (holder != said_holder or waited - said_at >= SAY_EVERY):
                owner = "they stop it" if not holder.startswith("your") else "you stop it"
                say(
                    f"The lab's SpiNNaker board {self.name} is in use by {holder}; you get it when {owner} "
                    f"(waiting up to {words(timeout)}{f', {words(waited)} so far' if waited >= 1 else ''})."
                )
                said_at, said_holder = waited, holder
            await asyncio.sleep(min(0.25, max(timeout - waited, 0.01)))
        return True


def _trusted(st: os.stat_result, path: Path, kind: str, me: int) -> None:
    """Refuse a lock folder or file another account made or could change (it would say who holds the board)."""
    if st.st_uid != me:
        raise BoardLockError(
            f"the lab board lock {kind} {path} belongs to uid {st.st_uid}, not to this account "
            f"(uid {me}); check it, then remove it (the hub makes it again)"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise BoardLockError(
            f"the lab board lock {kind} {path} is open to other accounts (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); `chmod {'700' if kind == 'folder' else '600'} {path}`"
        )


_LOCKS: dict[str, BoardLock] = {}
_FOLDER: Path | None = None


def use_folder(folder: str | Path | None) -> None:
    """Lock the lab board through files in `folder` from now on (shared with the other processes of the deployment)."""
    global _FOLDER
    _FOLDER = Path(folder) if folder is not None else None
    for name, lock in list(_LOCKS.items()):
        if lock._mine is None:
            del _LOCKS[name]


def use_deployment(d) -> None:
    """The deployment's lock folder: data_dir/hub/board-locks (the hub's and the job service's account only)."""
    use_folder(d.hub_dir / FOLDER)


def board_lock(name: str) -> BoardLock:
    return _LOCKS.setdefault(name, BoardLock(name, _FOLDER))
