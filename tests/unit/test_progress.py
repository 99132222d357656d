"""Spawn progress as the spawn page's stream reads it (progress.ProgressMixin): it opens as soon as the spawn is
asked for, so it may listen from before the pre-spawn hook and start()."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

from spinnaker_jupyter.progress import ProgressMixin


class _Base:
    def run_pre_spawn_hook(self):
        return None


class Spawner(ProgressMixin, _Base):
    log = logging.getLogger("test")
    user = SimpleNamespace(name="bob")


async def _read(gen, n: int) -> list[str]:
    return [(await asyncio.wait_for(gen.__anext__(), 0.5))["message"] for _ in range(n)]


def test_a_listener_from_before_the_spawn_hears_this_spawns_steps_at_once_and_never_the_last_ones():
    async def main():
        sp = Spawner()
        sp.progress_say(None, "last time: up")  # a previous spawn's steps
        sp.run_pre_spawn_hook()  # this spawn begins
        gen = sp.progress()
        listening = asyncio.ensure_future(_read(gen, 2))
        await asyncio.sleep(0.05)  # the stream waits for a step
        sp.progress_reset()  # start() resets again
        sp.progress_say(10, "Preparing")
        sp.progress_say(50, "Starting")
        assert await listening == ["Preparing", "Starting"]  # well within the 0.5 s: no second-long nap
        await gen.aclose()

    asyncio.run(main())
