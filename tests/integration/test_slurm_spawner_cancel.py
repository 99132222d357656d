"""The hub's shutdown cancels every task; a Slurm command cut short by it must stay a cancel (batchspawner 1.3.0's
run_command turns it into a failed command, which poll reads as "the server has stopped")."""

from __future__ import annotations

import asyncio

import pytest

from spinnaker_jupyter.slurm_spawner import SlurmUserSpawner


def test_a_cancelled_slurm_command_is_a_cancel_not_a_stopped_server(tmp_path):
    spawner = SlurmUserSpawner()
    started = tmp_path / "started"

    async def main():
        task = asyncio.create_task(
            spawner.run_command(f"touch {started}; exec sleep 30", env={"PATH": "/usr/bin:/bin"})
        )
        for _ in range(500):  # up to 5 s for the shell to start
            if started.exists():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_a_failing_slurm_command_is_still_an_error():
    spawner = SlurmUserSpawner()
    with pytest.raises(RuntimeError, match="no such job"):
        asyncio.run(spawner.run_command("echo 'no such job' >&2; exit 1", env={"PATH": "/usr/bin:/bin"}))
