"""Board leases of batch jobs (holder `job:<id>`) and the two reconciliations: the hub's at its start leaves a
running job's board alone (the job service lives on its own), and the job service's at its start gives back what a
killed runner held. Against the spalloc double served from a thread of this process."""

from __future__ import annotations

import asyncio

import pytest

from doubles.spalloc_server import SpallocDouble
from spinnaker_jupyter import leases
from spinnaker_jupyter.spalloc import SpallocAllocator

TOKEN = "hub-token"


@pytest.fixture
def double():
    d = SpallocDouble(
        boards=2, tokens={TOKEN: "hub"}, admins=["hub"], power_delay=0.05, testing=True, keepalive_min=1
    ).start()
    yield d
    d.stop()


def allocator(double: SpallocDouble) -> SpallocAllocator:
    return SpallocAllocator(
        url=double.url,
        token=TOKEN,
        keepalive_interval=1.5,
        retries=1,
        retry_delay=0.05,
        request_timeout=5.0,
        long_poll_timeout=5.0,
    )


def test_the_hub_leaves_job_boards_to_the_runner(double, tmp_path):
    path = tmp_path / "leases.sqlite"

    async def scenario():
        alloc = allocator(double)
        runner = leases.LeaseStore(path)  # the job service's process, alive throughout
        job = await leases.claim_recorded(alloc, runner, "alice", holder="job:7", n_boards=1)
        runner.held(job.job_url)
        dead_hub = leases.LeaseStore(path)  # a hub process that died with a server's board recorded
        server = await leases.claim_recorded(alloc, dead_hub, "bob", holder="bob/", n_boards=1)
        dead_hub.held(server.job_url)
        await server.job.stop_keepalive()

        hub = leases.LeaseStore(path)  # the hub starts again; no server of it runs
        report = await leases.reconcile(hub, alloc.client(), is_held=lambda lease: False)
        assert report.destroyed == [server.job_url]
        states = {j["owner"]: j["state"] for j in double.jobs()}
        assert states == {"alice": "READY", "bob": "DESTROYED"}, states
        assert [(lease.holder, lease.job_url) for lease in hub.leases()] == [("job:7", job.job_url)]

        await job.job.stop_keepalive()  # the runner is killed (-9): nobody keeps the job's board alive
        runner2 = leases.LeaseStore(path)  # the job service starts again: its jobs are back in the queue
        report = await leases.reconcile(
            runner2, alloc.client(), is_held=lambda lease: False, scope=leases.held_by_a_job
        )
        assert report.destroyed == [job.job_url]
        assert {j["owner"]: j["state"] for j in double.jobs()}["alice"] == "DESTROYED"
        assert runner2.leases() == []
        await alloc.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_server_is_never_taken_for_a_job():
    def lease(holder: str) -> leases.Lease:
        return leases.Lease("id", holder, "alice", "http://s", leases.HELD, None, 1, 30.0, "inc", 0.0, 0.0)

    assert leases.held_by_a_job(lease("job:12")) and not leases.held_by_a_server(lease("job:12"))
    for server in ("alice/", "job:1/", "alice/job:1"):  # a user (or server) named like a job is still a server
        assert leases.held_by_a_server(lease(server)) and not leases.held_by_a_job(lease(server))
