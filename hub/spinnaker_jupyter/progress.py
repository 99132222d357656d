"""Spawn progress in words, shared by the project's spawners.

`progress_say()` records a step; JupyterHub's spawn-pending page streams them from `progress()` while start() runs.
"""

from __future__ import annotations

import asyncio
import socket
import time


class ProgressMixin:
    """Mix into a Spawner before the upstream class."""

    def progress_reset(self) -> None:
        # A new list, and the same Event, set: a spawn page listening since before this reset (its stream opens as
        # soon as the spawn is asked for, before the pre-spawn hook and start()) turns to the new list at once.
        # JupyterHub stops reading once start() has finished, dropping what was not read by then: a forked start
        # takes well under the second a stale listener would otherwise sleep.
        self._progress_events: list[dict] = []
        if getattr(self, "_progress_changed", None) is None:
            self._progress_changed = asyncio.Event()
        self._progress_changed.set()

    def run_pre_spawn_hook(self):
        self.progress_reset()  # this spawn's steps only, from its start: never the last one's
        return super().run_pre_spawn_hook()

    def progress_say(self, percent: int | None, message: str) -> None:
        if not hasattr(self, "_progress_events"):
            self.progress_reset()
        event = {"message": message}
        if percent is not None:
            event["progress"] = percent
        self._progress_events.append(event)
        self.log.info("[%s] %s", self.user.name, message)
        self._progress_changed.set()

    async def progress(self):
        if not hasattr(self, "_progress_events"):
            self.progress_reset()
        events, sent = None, 0
        while True:
            if self._progress_events is not events:  # reset since: the steps of this spawn from its first
                events, sent = self._progress_events, 0
            while sent < len(events):
                yield events[sent]
                sent += 1
            self._progress_changed.clear()
            # The hub stops iterating once start() has finished; until then wait for the next step.
            try:
                await asyncio.wait_for(self._progress_changed.wait(), timeout=1)
            except asyncio.TimeoutError:
                pass


async def wait_until_listening(ip: str, port: int, timeout: float, ended) -> None:
    """Return once ip:port accepts connections (polled every 50 ms), so the hub's own readiness check, which backs
    off exponentially up to 5 s, succeeds at its first try. `ended()` (async) returns why the server is gone, or
    None while it runs; it is asked about once a second."""
    deadline = time.monotonic() + timeout
    next_check = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_check:
            why = await ended()
            if why:
                raise RuntimeError(why)
            next_check = time.monotonic() + 1
        try:
            with socket.create_connection((ip, port), timeout=0.2):
                return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"Your server did not answer within {timeout:.0f} s.")
