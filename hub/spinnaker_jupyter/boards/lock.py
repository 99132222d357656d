"""The lab's own board (`spinnaker.mode: machine`): one holder (a user server) at a time, in the hub process."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from ..words import duration as words

#: Seconds between "still waiting" messages on the spawn page (machine mode; spalloc says its own).
SAY_EVERY = 30.0


class BoardLock:
    """One lab board, one holder (a user server) at a time, in the hub process. Holders are re-registered from
    spawner state after a hub restart (`load_state`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.holder: Optional[tuple[str, str]] = None  # (user, server name)
        self.since: Optional[float] = None

    def try_take(self, who: tuple[str, str]) -> bool:
        if self.holder is None or self.holder == who:
            if self.holder is None:
                self.since = time.time()
            self.holder = who
            return True
        return False

    def release(self, who: tuple[str, str]) -> None:
        if self.holder == who:
            self.holder = self.since = None

    def holder_words(self, me: str) -> str:
        if self.holder is None:
            return "nobody"
        user, server = self.holder
        named = f" '{server}'" if server else ""
        return f"your other server{named}" if user == me else f"{user}'s server{named}"

    async def take(self, who: tuple[str, str], timeout: float, say) -> bool:
        """Wait up to `timeout` seconds for the board; `say(message)` while waiting. True when taken."""
        start = time.monotonic()
        said_at, said_holder = -SAY_EVERY, None
        while not self.try_take(who):
            waited = time.monotonic() - start
            if waited >= timeout:
                return False
            if self.holder != said_holder or waited - said_at >= SAY_EVERY:
                holder = self.holder_words(who[0])
                owner = "they stop it" if not holder.startswith("your") else "you stop it"
                say(f"The lab's SpiNNaker board {self.name} is in use by {holder}; you get it when {owner} "
                    f"(waiting up to {words(timeout)}{f', {words(waited)} so far' if waited >= 1 else ''}).")
                said_at, said_holder = waited, self.holder
            await asyncio.sleep(min(0.25, max(timeout - waited, 0.01)))
        return True


_LOCKS: dict[str, BoardLock] = {}


def board_lock(name: str) -> BoardLock:
    return _LOCKS.setdefault(name, BoardLock(name))

