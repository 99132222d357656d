"""`BoardsMixin`, the spawner adapter, over a stand-in spawner base (JupyterHub's own needs a hub): the state the hub
stores, the environment, when it resumes, and that what it holds is given back on the hub's every stop path.
The full paths through a real hub are in tests/integration/test_boards.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from traitlets.config import LoggingConfigurable

from spinnaker_jupyter.boards.mixin import BoardsMixin, NoBoardError

from .test_board_record import OLD_STATES
from .test_board_session import allocator, double, run  # noqa: F401 - double: a fixture


class StandInSpawner(LoggingConfigurable):
    """The parts of jupyterhub.spawner.Spawner the mixin calls, as LocalProcessSpawner behaves."""

    def __init__(self, running: bool = True, fail_start: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.user = SimpleNamespace(name="alice", groups=[])
        self.name = ""
        self.orm_spawner = SimpleNamespace(server=object() if running else None)
        self._spawn_pending = self._stop_pending = False  # (JupyterHub's own flags, read through `pending`)
        self.active = running
        self.fail_start = fail_start
        self.started = 0

    @property
    def pending(self) -> str | None:
        return "spawn" if self._spawn_pending else "stop" if self._stop_pending else None

    @property
    def _log_name(self) -> str:
        return self.user.name

    async def start(self):
        self.started += 1
        if self.fail_start:
            raise RuntimeError("the server did not come up")
        return ("127.0.0.1", 8888)

    async def stop(self, now: bool = False):
        return None

    async def poll(self):
        return None

    def run_post_stop_hook(self):
        return None

    def get_state(self):
        return {"pid": 4321}

    def load_state(self, state):
        pass

    def clear_state(self):
        pass

    def get_env(self):
        return {"PATH": "/usr/bin"}


class Spawner(BoardsMixin, StandInSpawner):
    pass


@pytest.fixture(autouse=True)
def fresh_allocator(monkeypatch):
    monkeypatch.setattr(BoardsMixin, "_allocator", None)  # one per hub process: one per test here


@pytest.mark.parametrize("name", ["session, running", "session, lost", "fallback", "virtual"])
def test_a_running_servers_old_state_is_stored_back_unchanged(name):
    s = Spawner(board_mode="session")
    s.load_state({"pid": 4321, "spinnaker": OLD_STATES[name]})
    assert s.get_state() == {"pid": 4321, "spinnaker": OLD_STATES[name]}


def test_the_environment_says_what_the_server_holds():
    s = Spawner(board_mode="session")
    s.load_state({"spinnaker": OLD_STATES["session, running"]})
    env = s.get_env()
    assert env["SPINNAKER_MODE"] == "session" and env["SPINNAKER_BOARD"] == "10.11.192.1"
    assert env["SPINNAKER_BOARD_JOB"] == "7" and env["PATH"] == "/usr/bin"
    s.load_state({"spinnaker": OLD_STATES["fallback"]})
    env = s.get_env()
    assert "SPINNAKER_BOARD" not in env and env["SPINNAKER_BOARD_NOTICE"].startswith("No SpiNNaker board")


def test_it_resumes_only_a_kept_job_of_a_server_the_hub_is_not_starting_or_stopping():
    s = Spawner(board_mode="session")
    assert not s._needs_resume()  # nothing recorded
    s.load_state({"spinnaker": OLD_STATES["session, running"]})
    assert s._needs_resume()
    for flag in ("_spawn_pending", "_stop_pending"):
        setattr(s, flag, True)
        assert not s._needs_resume(), flag
        setattr(s, flag, False)
    for name in ("session, lost", "session, released", "fallback"):
        s.load_state({"spinnaker": OLD_STATES[name]})
        assert not s._needs_resume(), name


def test_a_failed_start_and_a_server_found_gone_give_the_board_back(double, tmp_path):  # noqa: F811
    config = {"board_mode": "session", "claim_timeout": 20, "spalloc_url": double.url}

    async def scenario():
        s = Spawner(fail_start=True, **config, lease_store=str(tmp_path / "leases.sqlite"))
        BoardsMixin._allocator = allocator(double)
        with pytest.raises(RuntimeError, match="did not come up"):
            await s.start()
        (job,) = double.jobs()
        assert job["state"] == "DESTROYED" and job["reason"] == "the server failed to start"

        # LocalProcessSpawner's poll clears the state before the hub runs the post-stop hook: it still gives back.
        s.fail_start = False
        await s.start()
        second = double.jobs()[-1]
        assert second["state"] == "READY" and s.get_state()["spinnaker"]["job_id"] == second["id"]
        s.clear_state()
        assert "spinnaker" not in s.get_state()
        await s.run_post_stop_hook()
        second = double.job(second["id"])
        assert second["state"] == "DESTROYED"
        assert second["reason"] == "user server ended unexpectedly (noticed by the hub)"
        await BoardsMixin._allocator.close()

    run(scenario())


def test_no_board_with_on_timeout_fail_refuses_the_start_with_the_reason(monkeypatch):
    monkeypatch.setattr("spinnaker_jupyter.boards.lock._LOCKS", {})
    monkeypatch.setattr("spinnaker_jupyter.boards.lock._FOLDER", None)  # in-process locks, whatever ran before
    s = Spawner(board_mode="machine", machine_name="lab-board", claim_timeout=0, on_timeout="fail")
    other = Spawner(board_mode="machine", machine_name="lab-board")
    other.user = SimpleNamespace(name="erin", groups=[])

    async def scenario():
        await other.start()
        with pytest.raises(NoBoardError, match="No SpiNNaker board for your server: the lab's board lab-board"):
            await s.start()
        assert s.started == 0  # the server itself never started
        await other.run_post_stop_hook()

    run(scenario())
