"""The git kernel's first set-ups wait while servers start (issue #15, build 4): the hub holds every set-up slot
(gitkernel/slots.py's files) while its start queue has starts running or waiting, and lets them go once it is empty.
In one process: flocks on separate open files of the same slot file exclude each other as between processes."""

from __future__ import annotations

import asyncio
import fcntl
import os

from traitlets.config import Config

from spinnaker_jupyter import config, hubconfig
from spinnaker_jupyter.spawn_queue import SpawnQueue
from spinnaker_jupyter_ext.gitkernel import slots


def slot_folder(tmp_path, n=2):
    folder = tmp_path / "git-kernel-slots"
    folder.mkdir(mode=0o755)
    for i in range(n):
        (folder / f"slot-{i}").touch(mode=0o644)
    return folder


def set_up_turn(folder) -> tuple[list, list]:
    """A set-up asking for its turn, not waiting: (how many run at a time if it had to wait, whether it gave up)."""
    waited, gave_up = [], []
    with slots.turn(folder, waited.append, max_wait=0.0, on_give_up=lambda: gave_up.append(True)):
        pass
    return waited, gave_up


def test_set_ups_wait_while_starts_run_or_wait_and_go_once_the_queue_is_empty(tmp_path):
    folder = slot_folder(tmp_path)
    queue = SpawnQueue(concurrency=1, hold_slots=str(folder))

    async def burst():
        assert set_up_turn(folder) == ([], [])  # nothing starting: a set-up runs at once
        began = {name: asyncio.Event() for name in ("amy", "ben")}
        done = {name: asyncio.Event() for name in ("amy", "ben")}
        told = []

        async def start(name):
            async with queue.place(name, told.append):
                began[name].set()
                await done[name].wait()

        amy = asyncio.ensure_future(start("amy"))
        await asyncio.wait_for(began["amy"].wait(), 10)
        assert set_up_turn(folder) == ([2], [True])  # a start running: every slot is the hub's
        ben = asyncio.ensure_future(start("ben"))
        while not told:  # ben waits in line
            await asyncio.sleep(0.01)
        done["amy"].set()
        await asyncio.wait_for(began["ben"].wait(), 10)
        assert set_up_turn(folder) == ([2], [True])  # amy is up, ben's start runs: still the hub's
        done["ben"].set()
        await asyncio.wait_for(asyncio.gather(amy, ben), 10)
        assert set_up_turn(folder) == ([], [])  # the queue is empty: set-ups take their turns

    asyncio.run(asyncio.wait_for(burst(), 30))


def test_a_set_up_running_when_the_burst_begins_finishes_and_its_slot_is_then_held(tmp_path):
    folder = slot_folder(tmp_path)
    queue = SpawnQueue(concurrency=2, hold_slots=str(folder))
    running = os.open(folder / "slot-1", os.O_RDONLY)  # a set-up's turn, under way
    fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)

    async def burst():
        async with queue.place("amy", print):
            assert not slot_is_free(folder / "slot-0")  # the free one is the hub's at once
            os.close(running)  # that set-up ends
            deadline = asyncio.get_running_loop().time() + 10
            while slot_is_free(folder / "slot-1"):
                assert asyncio.get_running_loop().time() < deadline, "the hub never took the freed slot"
                await asyncio.sleep(0.05)
            assert set_up_turn(folder) == ([2], [True])
        assert set_up_turn(folder) == ([], [])

    asyncio.run(asyncio.wait_for(burst(), 30))


def slot_is_free(path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_hub_holds_the_git_kernel_slots_of_local_servers_only(write_config):
    c = Config()
    d = config.load([write_config({})])
    hubconfig.update_user_servers(c, d)
    assert c.SpawnQueue.hold_slots == str(d.data_dir / "git-kernel-slots")
    off = Config()
    hubconfig.update_user_servers(off, config.load([write_config({"git_kernel": {"enabled": False}})]))
    assert "hold_slots" not in off.SpawnQueue
