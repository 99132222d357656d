"""`BoardSession` (no JupyterHub) against the spalloc double served from a thread of this process: claim, keepalive,
resume after a restart, release on every path, a board lost, the virtual fallback; the lab board's lock."""

from __future__ import annotations

import asyncio
import configparser
import time
from collections.abc import Callable
from typing import Any

import pytest

from doubles.spalloc_server import SpallocDouble
from spinnaker_jupyter import leases
from spinnaker_jupyter.boards.lock import board_lock
from spinnaker_jupyter.boards.record import BoardRecord
from spinnaker_jupyter.boards.session import BoardSession, NoBoard
from spinnaker_jupyter.config import merge
from spinnaker_jupyter.schema import SCHEMA, defaults
from spinnaker_jupyter.spalloc import SpallocAllocator

HUB_TOKEN = "hub-token"
FIRST_IP = "10.11.192.1"
# Seconds (test-only intervals: the double runs with testing=True); a keepalive every third of it. Long enough that a
# loaded machine never misses one, except in the test of the keepalive itself.
KEEPALIVE = 9.0
SHORT_KEEPALIVE = 3.0


@pytest.fixture
def double():
    """The spalloc double in a thread (one board; `hub` an admin, so the hub's claims name their owner)."""
    d = SpallocDouble(
        boards=1, tokens={HUB_TOKEN: "hub"}, admins=["hub"], power_delay=0.05, testing=True, keepalive_min=1
    ).start()
    yield d
    d.stop()


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def settings(mode: str = "session", double: SpallocDouble | None = None, **kw: Any) -> dict:
    sp = {"mode": mode, "claim_timeout": 20, "machine_name": "lab-board" if mode == "machine" else None, **kw}
    if double is not None:
        sp["spalloc"] = {"url": double.url, "keepalive_interval": KEEPALIVE}
    return merge(defaults(SCHEMA["properties"]["spinnaker"]), sp)


def allocator(double: SpallocDouble, keepalive: float = KEEPALIVE) -> SpallocAllocator:
    return SpallocAllocator(
        url=double.url,
        token=HUB_TOKEN,
        keepalive_interval=keepalive,
        retries=1,
        retry_delay=0.05,
        request_timeout=5.0,
        long_poll_timeout=5.0,
    )


class Holder:
    """What a holder (spawner, job runner) sees: the messages said and the changes to store."""

    def __init__(self) -> None:
        self.said: list[str] = []
        self.changes = 0

    def session(
        self,
        sp: dict,
        alloc: SpallocAllocator | None,
        store,
        owner: str = "alice",
        name: str = "",
        record: BoardRecord | None = None,
    ) -> BoardSession:
        def changed() -> None:
            self.changes += 1

        return BoardSession(
            sp,
            owner=owner,
            name=name,
            allocator=alloc,
            lease_store=store,
            record=record,
            say=lambda percent, message: self.said.append(message),
            on_change=changed,
        )


def machine_section(cfg_text: str) -> dict:
    cfg = configparser.ConfigParser()
    cfg.read_string(cfg_text)
    return dict(cfg["Machine"])


def test_claim_gives_the_board_its_cfg_and_a_held_lease_and_release_gives_it_back(double, tmp_path):
    store = tmp_path / "leases.sqlite"
    holder = Holder()

    async def scenario():
        alloc = allocator(double)
        s = holder.session(settings("session", double), alloc, store)
        record = await s.claim(1)
        (job,) = double.jobs()
        assert (record.board, record.job_id, record.state) == (FIRST_IP, job["id"], "READY")
        assert job["owner"] == "alice" and job["state"] == "READY"
        assert machine_section(s.cfg)["machine_name"] == FIRST_IP and record.job_url in s.cfg
        env = s.env()
        assert env["SPINNAKER_BOARD"] == FIRST_IP and env["SPINNAKER_BOARD_JOB"] == str(job["id"])
        assert any("Claiming a SpiNNaker board" in m for m in holder.said), holder.said
        (lease,) = leases.open_store(store).leases()
        assert (lease.job_url, lease.phase, lease.holder) == (record.job_url, leases.CLAIMED, "alice/")
        s.started()
        assert leases.open_store(store).leases()[0].phase == leases.HELD

        await s.release("user server stopped")
        gone = double.job(job["id"])
        assert gone["state"] == "DESTROYED" and gone["reason"] == "user server stopped"
        assert record.released and not s.holds and leases.open_store(store).leases() == []
        await s.release("again")  # idempotent: nothing more is sent
        assert double.job(job["id"])["reason"] == "user server stopped"
        await alloc.close()

    run(scenario())


def test_the_session_keeps_its_job_alive(double, tmp_path):
    async def scenario():
        alloc = allocator(double, SHORT_KEEPALIVE)
        s = Holder().session(settings("session", double), alloc, tmp_path / "leases.sqlite")
        record = await s.claim(1)
        first = double.job(record.job_id)["keepalives"]
        # Six keepalives, one every third of the interval: twice the interval, after which a job nobody kept alive
        # would have been destroyed ("keepalive expired").
        await until(lambda: double.job(record.job_id)["keepalives"] >= first + 6, "six keepalives", timeout=20)
        assert double.job(record.job_id)["state"] == "READY" and not record.lost
        assert (await s.status(live=True))["keepalive"] == "running"
        await s.release("done")
        await alloc.close()

    run(scenario())


def test_a_restarted_hub_resumes_the_recorded_job_instead_of_claiming_again(double, tmp_path, monkeypatch):
    store = tmp_path / "leases.sqlite"

    async def scenario():
        first_alloc = allocator(double)
        before = Holder().session(settings("session", double), first_alloc, store)
        record = await before.claim(1)
        before.started()
        saved = record.to_dict()  # what the hub's database holds
        await before.allocation.job.stop_keepalive()  # the hub process dies: nobody keeps the job alive
        await first_alloc.close()
        monkeypatch.setattr(leases, "_STORES", {})  # a new process: a new lease-store incarnation

        holder = Holder()
        alloc = allocator(double)
        after = holder.session(settings("session", double), alloc, store, record=BoardRecord.from_dict(saved))
        assert after.needs_resume() and after.holds
        kept = double.job(record.job_id)["keepalives"]
        await after.resume_soon()
        assert not after.needs_resume() and after.allocation is not None and len(double.jobs()) == 1
        await until(lambda: double.job(record.job_id)["keepalives"] > kept, "a keepalive from the new process")
        (lease,) = leases.open_store(store).leases()
        assert lease.phase == leases.HELD and lease.incarnation == leases.open_store(store).incarnation
        await after.release("user server stopped")
        assert double.job(record.job_id)["state"] == "DESTROYED" and leases.open_store(store).leases() == []
        await alloc.close()

    run(scenario())


def test_a_job_that_ended_while_the_hub_was_down_is_recorded_as_lost(double, tmp_path):
    store = tmp_path / "leases.sqlite"

    async def scenario():
        first_alloc = allocator(double)
        before = Holder().session(settings("session", double), first_alloc, store)
        record = await before.claim(1)
        saved = record.to_dict()
        await before.allocation.job.stop_keepalive()
        await first_alloc.close()
        double.destroy_job(record.job_id, "keepalive expired")

        holder = Holder()
        alloc = allocator(double)
        after = holder.session(settings("session", double), alloc, store, record=BoardRecord.from_dict(saved))
        await after.resume()
        lost = after.record.lost
        assert "keepalive expired" in lost and "while the hub was not keeping it alive" in lost
        assert after.record.state == "DESTROYED" and not after.holds and not after.needs_resume()
        assert holder.changes == 1 and leases.open_store(store).leases() == []
        await after.release("user server stopped")
        assert double.job(record.job_id)["reason"] == "keepalive expired"  # nothing sent for a lost job
        await alloc.close()

    run(scenario())


def test_a_board_lost_while_the_holder_runs_is_recorded_and_said(double, tmp_path):
    store = tmp_path / "leases.sqlite"
    holder = Holder()

    async def scenario():
        alloc = allocator(double)
        s = holder.session(settings("session", double), alloc, store)
        record = await s.claim(1)
        s.started()
        double.destroy_job(record.job_id, "machine taken down for maintenance")
        await until(lambda: record.lost, "the session to notice the job's end", timeout=20)
        assert "machine taken down for maintenance" in record.lost and record.lost_at and holder.changes == 1
        assert s.allocation is None and not s.holds and leases.open_store(store).leases() == []
        assert BoardRecord.from_dict(record.to_dict()).lost == record.lost  # stored as such
        await s.release("user server stopped")
        assert double.job(record.job_id)["reason"] == "machine taken down for maintenance"
        await alloc.close()

    run(scenario())


async def occupy(double: SpallocDouble):
    """Another user's claim holding the double's only board."""
    alloc = allocator(double)
    return alloc, await alloc.claim("bob")


def test_a_release_while_the_claim_waits_in_the_queue_gives_the_queued_job_back(double, tmp_path):
    store = tmp_path / "leases.sqlite"

    async def scenario():
        other_alloc, other = await occupy(double)
        alloc = allocator(double)
        s = Holder().session(settings("session", double), alloc, store)
        claim = asyncio.ensure_future(s.claim(1))
        await until(lambda: s.record is not None and s.record.job_id, "the queued job")
        job_id = s.record.job_id
        assert s.holds and double.job(job_id)["state"] == "QUEUED"
        await s.release("user server stopped before its boards were ready")
        with pytest.raises(asyncio.CancelledError):
            await claim
        assert double.job(job_id)["state"] == "DESTROYED" and s.record.released and not s.holds
        await until(lambda: leases.open_store(store).leases() == [], "the lease row to go")
        await other.release()
        await alloc.close()
        await other_alloc.close()

    run(scenario())


def test_no_board_in_time_falls_back_to_virtual_mode_or_refuses(double, tmp_path):
    store = tmp_path / "leases.sqlite"

    async def scenario():
        other_alloc, other = await occupy(double)
        alloc = allocator(double)
        holder = Holder()
        s = holder.session(settings("session", double, claim_timeout=1), alloc, store)
        record = await s.claim(1)
        assert record.fallback == "virtual" and "No SpiNNaker board for this session" in record.notice
        assert "no SpiNNaker board became free within 1 s" in record.notice and holder.said[-1] == record.notice
        assert machine_section(s.cfg)["virtual_board"] == "True" and s.env()["SPINNAKER_BOARD_NOTICE"]
        assert not s.holds and "SPINNAKER_BOARD" not in s.env()
        queued = [j for j in double.jobs() if j["owner"] == "alice"]
        assert [j["state"] for j in queued] == ["DESTROYED"]  # the claim gave its queued job back

        refusing = Holder().session(settings("session", double, claim_timeout=1, on_timeout="fail"), alloc, store)
        with pytest.raises(NoBoard, match="No SpiNNaker board for your server: no SpiNNaker board became free"):
            await refusing.claim(1)
        assert [j["state"] for j in double.jobs() if j["owner"] == "alice"] == ["DESTROYED", "DESTROYED"]
        await until(lambda: leases.open_store(store).leases() == [], "the lease rows to go")
        await other.release()
        await alloc.close()
        await other_alloc.close()

    run(scenario())


def test_the_lab_board_goes_to_one_holder_at_a_time(monkeypatch):
    monkeypatch.setattr("spinnaker_jupyter.boards.lock._LOCKS", {})
    monkeypatch.setattr("spinnaker_jupyter.boards.lock._FOLDER", None)  # in-process locks, whatever ran before
    sp = settings("machine", claim_timeout=20)

    async def scenario():
        first, second_holder = Holder(), Holder()
        a = first.session(sp, None, None, owner="erin")
        b = second_holder.session(sp, None, None, owner="frank")
        assert (await a.claim()).held and board_lock("lab-board").holder == ("erin", "")
        waiting = asyncio.ensure_future(b.claim())
        await until(lambda: any("in use by erin's server" in m for m in second_holder.said), "frank to be told")
        assert not waiting.done() and (await b.status(live=False)) == {"mode": "machine"}
        await a.release("user server stopped")
        record = await waiting
        assert record.held and board_lock("lab-board").holder == ("frank", "")
        assert (await a.status(live=False))["held"] is False and a.record.to_dict()["held"] is False
        assert machine_section(b.cfg)["machine_name"] == "lab-board"

        # A restarted hub re-registers the holder from its record; a waiting claim released meanwhile stops waiting.
        monkeypatch.setattr("spinnaker_jupyter.boards.lock._LOCKS", {})
        monkeypatch.setattr("spinnaker_jupyter.boards.lock._FOLDER", None)  # in-process locks, whatever ran before
        restored = Holder().session(sp, None, None, owner="frank", record=BoardRecord.from_dict(record.to_dict()))
        assert restored.retake_lab_board() and board_lock("lab-board").holder == ("frank", "")
        c = Holder().session(sp, None, None, owner="gina")
        claim = asyncio.ensure_future(c.claim())
        await asyncio.sleep(0)
        await c.release("user server stopped")
        with pytest.raises(asyncio.CancelledError):
            await claim
        assert board_lock("lab-board").holder == ("frank", "")

    run(scenario())


def test_the_lab_board_not_free_in_time_falls_back_to_virtual(monkeypatch):
    monkeypatch.setattr("spinnaker_jupyter.boards.lock._LOCKS", {})
    monkeypatch.setattr("spinnaker_jupyter.boards.lock._FOLDER", None)  # in-process locks, whatever ran before
    sp = settings("machine", claim_timeout=0.3)

    async def scenario():
        await Holder().session(sp, None, None, owner="erin").claim()
        late = Holder().session(sp, None, None, owner="frank")
        record = await late.claim()
        assert record.fallback == "virtual" and "in use by erin's server" in record.notice and not late.holds

    run(scenario())


def test_virtual_mode_claims_nothing():
    s = Holder().session(settings("virtual"), None, None)
    record = run(s.claim())
    assert record == BoardRecord(mode="virtual") and not s.holds
    assert (
        s.env()["SPINNAKER_MODE"] == "virtual"
        and machine_section(s.env()["SPINNAKER_MACHINE_CFG"])["virtual_board"] == "True"
    )


def test_a_batch_job_is_told_about_its_job_not_a_server(monkeypatch):
    monkeypatch.setattr("spinnaker_jupyter.boards.lock._LOCKS", {})
    monkeypatch.setattr("spinnaker_jupyter.boards.lock._FOLDER", None)  # in-process locks, whatever ran before
    sp = settings("machine", claim_timeout=0.3, on_timeout="fail")

    async def scenario():
        await Holder().session(sp, None, None, owner="erin").claim()
        job = BoardSession(sp, owner="frank", name="job 17", holder="job:17", noun="job")
        with pytest.raises(NoBoard, match="No SpiNNaker board for your job: .* free again when that job ends"):
            await job.claim()

    run(scenario())
