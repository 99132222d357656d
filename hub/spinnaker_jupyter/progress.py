"""Spawn progress in words, shared by the project's spawners.

`progress_say()` records a step; JupyterHub's spawn-pending page streams them from `progress()` while start() runs.
"""

from __future__ import annotations

import asyncio


class ProgressMixin:
    """Mix into a Spawner before the upstream class."""

    def progress_reset(self) -> None:
        self._progress_events: list[dict] = []
        self._progress_changed = asyncio.Event()

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
        sent = 0
        while True:
            while sent < len(self._progress_events):
                yield self._progress_events[sent]
                sent += 1
            self._progress_changed.clear()
            # The hub stops iterating once start() has finished; until then wait for the next step.
            try:
                await asyncio.wait_for(self._progress_changed.wait(), timeout=1)
            except asyncio.TimeoutError:
                pass
