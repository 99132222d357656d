"""The lab board's lock through its file (`boards.lock`, machine mode): two `BoardLock`s on one folder stand for the
hub and the job service (flock is per open file: two opens in one process exclude each other as two processes do).
"""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from spinnaker_jupyter.boards import lock as lock_module
from spinnaker_jupyter.boards.lock import BoardLock, BoardLockError
from spinnaker_jupyter.boards.session import BoardSession
from spinnaker_jupyter.config import merge
from spinnaker_jupyter.schema import SCHEMA, defaults


def test_a_job_waits_for_a_server_of_another_process_and_says_whose(tmp_path):
    folder = tmp_path / "board-locks"
    hub, service = BoardLock("192.0.2.10", folder), BoardLock("192.0.2.10", folder)
    assert hub.try_take(("alice", ""))
    assert not service.try_take(("bob", "job 12"), "job")
    assert service.holder == ("alice", "")
    assert re.fullmatch(r"alice's server since \d\d:\d\d UTC", service.holder_words("bob"))
    assert service.holder_words("alice").startswith("your other server since ")

    said: list[str] = []

    async def wait_then_free():
        waiting = asyncio.ensure_future(service.take(("bob", "job 12"), 20, said.append, "job"))
        while not said:
            await asyncio.sleep(0.02)
        assert not waiting.done()
        hub.release(("alice", ""))
        return await waiting

    assert asyncio.run(asyncio.wait_for(wait_then_free(), 30))
    assert said[0].startswith("The lab's SpiNNaker board 192.0.2.10 is in use by alice's server since ")
    # Now the hub's side is told about the job, in its words.
    assert hub.holder == ("bob", "job 12") and not hub.try_take(("carol", ""))
    assert re.fullmatch(r"bob's job 12 since \d\d:\d\d UTC", hub.holder_words("carol"))
    assert hub.holder_words("bob").startswith("your job 12 since ")
    service.release(("bob", "job 12"))
    assert hub.holder is None and hub.holder_words("carol") == "nobody"


def test_a_dead_holder_gives_the_board_back_and_its_words_are_not_read(tmp_path):
    folder = tmp_path / "board-locks"
    holder, other = BoardLock("lab", folder), BoardLock("lab", folder)
    assert holder.try_take(("alice", ""))
    os.close(holder._fd)  # what the kernel does when the holding process dies (its words stay in the file)
    assert other.holder is None and other.try_take(("bob", ""))


def test_a_lock_folder_or_file_another_account_could_write_is_refused(tmp_path):
    folder = tmp_path / "board-locks"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o777)
    with pytest.raises(BoardLockError, match=r"lock folder .*board-locks is open to other accounts \(mode 0777\)"):
        BoardLock("lab", folder).try_take(("alice", ""))
    os.chmod(folder, 0o700)
    (folder / "lab").write_text('{"user": "mallory"}')
    os.chmod(folder / "lab", 0o666)
    with pytest.raises(BoardLockError, match=r"lock file .*lab is open to other accounts .* `chmod 600"):
        BoardLock("lab", folder).holder_words("alice")
    os.chmod(folder / "lab", 0o600)
    if os.geteuid() == 0:  # (the tests run as root here; as another account chown is not allowed)
        os.chown(folder / "lab", 4242, -1)
        with pytest.raises(BoardLockError, match=r"lock file .*lab belongs to uid 4242, not to this account"):
            BoardLock("lab", folder).try_take(("alice", ""))
    (folder / "link").symlink_to(folder / "lab")
    with pytest.raises(OSError):  # never followed
        BoardLock("link", folder).try_take(("alice", ""))


def test_sessions_in_two_processes_share_the_lab_board(tmp_path, monkeypatch):
    """BoardSession (the servers' and the jobs' code) over the shared lock: a job is told whose server has it."""
    sp = merge(
        defaults(SCHEMA["properties"]["spinnaker"]),
        {"mode": "machine", "machine_name": "lab", "claim_timeout": 0.3, "on_timeout": "virtual"},
    )
    hub_locks, service_locks = {}, {}
    monkeypatch.setattr(lock_module, "_FOLDER", tmp_path / "board-locks")

    async def scenario():
        monkeypatch.setattr(lock_module, "_LOCKS", hub_locks)
        server = BoardSession(sp, owner="alice")
        assert (await server.claim()).held
        monkeypatch.setattr(lock_module, "_LOCKS", service_locks)
        told: list[str] = []
        job = BoardSession(sp, owner="bob", name="job 12", noun="job", say=lambda p, m: told.append(m))
        record = await job.claim()
        assert record.fallback == "virtual" and "it is in use by alice's server since " in record.notice
        assert (await job.status(live=False))["holder"] == "alice/"  # (read from the file)
        monkeypatch.setattr(lock_module, "_LOCKS", hub_locks)
        assert (await server.status(live=False))["holder"] == "alice/"
        await server.release("user server stopped")
        monkeypatch.setattr(lock_module, "_LOCKS", service_locks)
        assert (await BoardSession(sp, owner="bob", name="job 13", noun="job").claim()).held

    asyncio.run(asyncio.wait_for(scenario(), 30))
