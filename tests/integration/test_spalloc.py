"""The spalloc allocator client (hub side) and the spalloc test double.

Part (a) checks the double against spinnman's own client from sPyNNaker 1!7.4.1, unmodified, run in the kernel
environment (fixture ``spynnaker_python``): session and CSRF handling, job creation, waiting, machine info,
keepalive, destruction, queueing, keepalive expiry, and the ``per-run`` cfg path (spinnman's
``spalloc_allocate_job`` reading the cfg the hub renders). Part (b) checks the hub's allocator client against the
double. The double runs in a thread of the test process; tests wait on conditions, with timeouts.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from doubles.spalloc_server import SpallocDouble, parse_iso_duration
from spinnaker_jupyter.spalloc import (
    JobState,
    SpallocAllocator,
    SpallocAuthError,
    SpallocError,
    SpallocJobDestroyedError,
    SpallocProtocolError,
    SpallocRequestError,
    SpallocTimeoutError,
    SpallocUnreachableError,
)
from spinnaker_jupyter.spynnaker_cfg import ClaimedBoards
from spinnaker_jupyter.spynnaker_cfg import text as spynnaker_cfg_text

HUB_TOKEN, ALICE_TOKEN, BOB_TOKEN = "hub-service-token", "alice-token", "bob-token"
TOKENS = {HUB_TOKEN: "hub", ALICE_TOKEN: "alice", BOB_TOKEN: "bob"}
FIRST_IP = "10.11.192.1"


@pytest.fixture
def spalloc_double():
    """Factory: start a double with the test tokens (``hub`` is an admin); all are stopped afterwards."""
    started: list[SpallocDouble] = []

    def make(**kw: Any) -> SpallocDouble:
        kw.setdefault("tokens", TOKENS)
        kw.setdefault("admins", ["hub"])
        double = SpallocDouble(**kw).start()
        started.append(double)
        return double

    yield make
    for double in started:
        double.stop()


def run(coro, timeout: float = 30.0):
    """Run a test coroutine on a fresh event loop, with an overall timeout."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``predicate`` without blocking the loop; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


# =========================================================================================================
# (a) spinnman's own client against the double
# =========================================================================================================

SPINNMAN_DRIVER = r'''
"""Drives spinnman's SpallocClient (unmodified) through a scenario; JSON events out, commands in."""
import json, os, sys, threading, time

def emit(event, **kw):
    print(json.dumps({"event": event, **kw}), flush=True)

def expect(command):
    line = sys.stdin.readline().strip()
    if line != command:
        sys.exit(f"expected command {command!r}, got {line!r}")

def spinnman_setup(n_boards=1):
    from spinnman.config_setup import unittest_setup
    from spinnman.data.spinnman_data_writer import SpiNNManDataWriter
    from spinn_utilities.config_holder import set_config
    unittest_setup()
    set_config("Machine", "version", "5")
    SpiNNManDataWriter.mock().set_n_required(n_boards, None)

def conns(job):
    return sorted([[list(xy), host] for xy, host in job.get_connections().items()])

scenario, url, token = sys.argv[1:4]

if scenario == "basic":
    spinnman_setup()
    from spinnman.spalloc import SpallocClient
    client = SpallocClient(url, bearer_token=token, group="spinnman-group", collab="spinnman-collab")
    machines = {n: [m.width, m.height, sorted(m.tags), len(m.dead_boards)]
                for n, m in client.list_machines().items()}
    emit("connected", version=str(client.version), machines=machines)
    job = client.create_job()
    job.wait_until_ready()
    emit("ready", url=job._url, state=job.get_state().name, root=job.get_root_host(), connections=conns(job),
         listed=[j._url for j in client.list_jobs()])
    expect("destroy")
    job.destroy("spinnman test done")
    emit("destroyed", state=job.get_state().name, listed=[j._url for j in client.list_jobs()],
         machine=conns(job))
    client.close()

elif scenario == "list":
    spinnman_setup()
    from spinnman.spalloc import SpallocClient
    client = SpallocClient(url, bearer_token=token)
    jobs = [client.create_job() for _ in range(3)]
    emit("listed", created=[j._url for j in jobs], listed=[j._url for j in client.list_jobs()])
    expect("destroy")
    for j in jobs:
        j.destroy("spinnman list test done")
    emit("destroyed", listed=[j._url for j in client.list_jobs()],
         deleted=[j._url for j in client.list_jobs(deleted=True)])
    client.close()

elif scenario == "queue":
    spinnman_setup()
    from spinnman.spalloc import SpallocClient, SpallocState
    client = SpallocClient(url, bearer_token=token)
    job1 = client.create_job()
    job1.wait_until_ready()
    job2 = client.create_job()
    emit("queued", job1=job1._url, job2=job2._url, state1=job1.get_state().name,
         state2=job2.get_state().name, root1=job1.get_root_host(), machine2=conns(job2))
    result = {}
    def watch():
        t0 = time.monotonic()
        result["state"] = job2.wait_for_state_change(SpallocState.QUEUED)
        result["elapsed"] = time.monotonic() - t0
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    expect("destroy1")
    job1.destroy("make room")
    watcher.join(60)
    emit("moved", state=result["state"].name, elapsed=result["elapsed"], root2=job2.get_root_host(),
         state1=job1.get_state().name)
    job2.destroy("done")
    client.close()

elif scenario == "expire":
    spinnman_setup()
    from spinnman.spalloc import SpallocClient, SpallocState
    client = SpallocClient(url, bearer_token=token)
    job = client.create_job()
    job.wait_until_ready()
    emit("ready", url=job._url)
    state = job.wait_for_state_change(SpallocState.READY)
    emit("ended", state=state.name)
    client.close()

elif scenario == "per_run":
    # The cfg is the user cfg found through XDG_CONFIG_DIRS, as the kernel launcher arranges; the token comes
    # from OIDC_BEARER_TOKEN, as spinnman reads it when there is no hub access-token-service.
    from spynnaker.pyNN.config_setup import setup_configs
    from spynnaker.pyNN.data.spynnaker_data_writer import SpynnakerDataWriter
    from spinn_utilities.config_holder import (
        load_config, get_config_bool, get_config_int, get_config_str_or_none, get_default_cfgs)
    from spinn_utilities.conf_loader import load_defaults
    from spinn_utilities.configs.camel_case_config_parser import CamelCaseConfigParser
    setup_configs()
    load_config()
    defaults = load_defaults(list(get_default_cfgs()))
    unknown = []
    for path in sys.argv[4:]:
        ours = CamelCaseConfigParser()
        ours.read(path)
        unknown += [f"{path}: [{s}] {o}" for s in ours.sections() for o in ours.options(s)
                    if not defaults.has_option(s, o)]
    writer = SpynnakerDataWriter.setup()
    writer.set_n_required(1, None)
    emit("cfg", unknown=unknown, virtual=get_config_bool("Machine", "virtual_board"),
         spalloc_server=get_config_str_or_none("Machine", "spalloc_server"),
         group=get_config_str_or_none("Machine", "spalloc_group"),
         use_proxy=get_config_bool("Machine", "spalloc_use_proxy"),
         machine_name=get_config_str_or_none("Machine", "machine_name"),
         version=get_config_int("Machine", "version"))
    from spinnman.spalloc.spalloc_allocator import spalloc_allocate_job
    host, connections, controller = spalloc_allocate_job()
    emit("allocated", host=host, connections=sorted([[list(k), v] for k, v in connections.items()]),
         proxying=controller.proxying)
    controller.close()
    emit("closed")
else:
    sys.exit(f"unknown scenario {scenario}")
'''


class SpinnmanDriver:
    """Runs the driver script in the kernel environment; reads its JSON events with timeouts."""

    def __init__(
        self,
        python: str,
        tmp_path: Path,
        scenario: str,
        double: SpallocDouble,
        token: str,
        *extra: str,
        env: dict | None = None,
        cwd: Path | None = None,
    ) -> None:
        script = tmp_path / "spinnman_driver.py"
        script.write_text(SPINNMAN_DRIVER)
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "NMPI_", "SPALLOC_", "OIDC_"))
        }
        full_env.update(
            {"REQUESTS_CA_BUNDLE": double.ca_file or "", "PYTHONUNBUFFERED": "1", "HOME": str(tmp_path / "home")}
        )
        (tmp_path / "home").mkdir(exist_ok=True)
        full_env.update(env or {})
        self.stderr_path = tmp_path / f"spinnman-{scenario}.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [python, str(script), scenario, double.url, token, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=full_env,
            cwd=str(cwd or tmp_path),
        )
        self.events: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put(None)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()[-4000:]

    def expect(self, event: str, timeout: float = 30.0) -> dict:
        try:
            got = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"spinnman driver: no {event!r} within {timeout} s\n{self.stderr()}") from None
        if got is None:
            self.proc.wait(5)
            raise AssertionError(f"spinnman driver exited ({self.proc.returncode}) before {event!r}:\n{self.stderr()}")
        assert got["event"] == event, (got, self.stderr())
        return got

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 30.0) -> None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"spinnman driver did not exit within {timeout} s\n{self.stderr()}") from None
        assert rc == 0, f"spinnman driver failed ({rc}):\n{self.stderr()}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._stderr.close()


@pytest.fixture
def spinnman(spynnaker_python, tmp_path):
    """Factory for spinnman driver runs in the kernel environment."""
    drivers: list[SpinnmanDriver] = []

    def start(scenario: str, double: SpallocDouble, token: str = ALICE_TOKEN, *extra: str, **kw: Any):
        d = SpinnmanDriver(str(spynnaker_python), tmp_path, scenario, double, token, *extra, **kw)
        drivers.append(d)
        return d

    yield start
    for d in drivers:
        d.close()


def test_spinnman_client_creates_waits_reads_keeps_alive_destroys(spalloc_double, spinnman):
    double = spalloc_double(boards=1, tls=True, power_delay=0)  # spinnman sleeps 5 s per POWER poll
    drv = spinnman("basic", double)
    hello = drv.expect("connected")
    assert hello["version"] == "7.4.1"
    assert hello["machines"] == {"spinnaker-double": [1, 1, ["default"], 2]}  # 1 board: 2 holes in the triad

    ready = drv.expect("ready")
    assert ready["state"] == "READY"
    assert ready["root"] == FIRST_IP
    assert ready["connections"] == [[[0, 0], FIRST_IP]]
    assert ready["url"].startswith(double.srv_url + "jobs/")
    assert len(ready["listed"]) == 1

    (job,) = double.jobs()
    # What spinnman asked for, in the service's kebab-case JSON.
    assert job["request"] == {
        "num-boards": 1,
        "tags": ["default"],
        "group": "spinnman-group",
        "nmpi-collab": "spinnman-collab",
        "keepalive-interval": "PT120S",
    }
    assert (job["owner"], job["group"], job["collab"]) == ("alice", "spinnman-group", "spinnman-collab")
    # spinnman's keepalive thread PUTs at once, with the session's cookie, CSRF header and bearer token.
    double.wait_for(lambda d: d.job(job["id"])["keepalives"] >= 1, timeout=10, what="spinnman's keepalive")
    puts = [r for r in double.request_log() if r["method"] == "PUT"]
    assert puts and all(
        r["status"] == 200 and r["csrf"] and r["bearer"] and r["content_type"].startswith("text/plain") for r in puts
    )
    # Reads go with the session cookie only (no bearer), as spinnman's Session does.
    gets = [r for r in double.request_log() if r["method"] == "GET" and "/jobs/" in r["path"]]
    assert gets and not any(r["bearer"] for r in gets) and all(r["user"] == "alice" for r in gets)

    drv.send("destroy")
    done = drv.expect("destroyed")
    assert done["state"] == "DESTROYED"
    assert done["listed"] == [] and done["machine"] == []
    assert double.job(job["id"])["reason"] == "spinnman test done"
    drv.finish()


def test_spinnman_client_queue_then_gets_freed_board(spalloc_double, spinnman):
    double = spalloc_double(boards=1, tls=True, power_delay=0)
    drv = spinnman("queue", double)
    q = drv.expect("queued")
    assert (q["state1"], q["state2"]) == ("READY", "QUEUED")
    assert q["machine2"] == []  # nothing allocated yet: 204 from .../machine
    job1, job2 = double.jobs()
    assert job2["state"] == "QUEUED" and job2["boards"] == []
    # spinnman's wait_for_state_change long-polls (?wait=true); wait until that request is being held.
    double.wait_for(lambda d: d.job(job2["id"])["waiters"] >= 1, timeout=10, what="spinnman's long poll")
    drv.send("destroy1")
    moved = drv.expect("moved")
    assert moved["state"] == "READY"
    assert moved["elapsed"] < 10  # woken by the change, not by the 30 s wait limit
    assert moved["root2"] == q["root1"] == FIRST_IP
    assert moved["state1"] == "DESTROYED"
    assert double.job(job1["id"])["reason"] == "make room"
    drv.finish()


def test_spinnman_job_expires_without_keepalive(spalloc_double, spinnman):
    double = spalloc_double(boards=1, tls=True, power_delay=0)
    drv = spinnman("expire", double)
    ready = drv.expect("ready")
    job_id = int(ready["url"].rstrip("/").rsplit("/", 1)[-1])
    double.wait_for(
        lambda d: d.job(job_id)["keepalives"] >= 1 and d.job(job_id)["waiters"] >= 1,
        timeout=10,
        what="spinnman's keepalive and long poll",
    )
    assert parse_iso_duration(double.job(job_id)["request"]["keepalive-interval"]) == 120
    # spinnman keeps alive every 60 s of real time; move the double's clock instead of waiting.
    double.advance_clock(119)
    assert double.job(job_id)["state"] == "READY"
    double.advance_clock(2)
    assert double.job(job_id)["state"] == "DESTROYED"
    assert double.job(job_id)["reason"] == "keepalive expired"
    assert drv.expect("ended")["state"] == "DESTROYED"  # spinnman's long poll saw it
    drv.finish()


def test_per_run_cfg_drives_spinnmans_own_allocation(spalloc_double, spinnman, tmp_path):
    """The per-run cfg the hub renders is what spinnman's spalloc_allocate_job() (sPyNNaker's setup path) reads."""
    double = spalloc_double(boards=1, tls=True, power_delay=0)
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    spinnaker = {
        "mode": "per-run",
        "version": 5,
        "machine_name": None,
        "extra_cfg": {},
        "spalloc": {"url": double.url, "group": "collab-group", "machine_name": None, "use_proxy": True},
    }
    (xdg / ".spynnaker.cfg").write_text(spynnaker_cfg_text(spinnaker))
    machine_cfg = tmp_path / "machine.cfg"
    machine_cfg.write_text(spynnaker_cfg_text(spinnaker, claimed=ClaimedBoards(FIRST_IP, 5, "job", "alice")))
    drv = spinnman(
        "per_run",
        double,
        ALICE_TOKEN,
        str(xdg / ".spynnaker.cfg"),
        str(machine_cfg),
        env={"XDG_CONFIG_DIRS": str(xdg), "OIDC_BEARER_TOKEN": ALICE_TOKEN},
    )
    cfg = drv.expect("cfg", timeout=60)
    assert cfg["unknown"] == []  # every key we write is one sPyNNaker 1!7.4.1 knows
    assert cfg == {
        **cfg,
        "virtual": False,
        "spalloc_server": double.url,
        "group": "collab-group",
        "use_proxy": True,
        "machine_name": None,
        "version": 5,
    }
    got = drv.expect("allocated", timeout=60)
    assert got["host"] == FIRST_IP and got["connections"] == [[[0, 0], FIRST_IP]] and got["proxying"] is True
    (job,) = double.jobs()
    assert (job["owner"], job["group"]) == ("alice", "collab-group")
    drv.expect("closed")
    drv.finish()
    assert double.job(job["id"])["state"] == "DESTROYED"


# =========================================================================================================
# (b) the hub's allocator client against the double
# =========================================================================================================


def allocator(double: SpallocDouble, **kw: Any) -> SpallocAllocator:
    settings: dict[str, Any] = dict(
        url=double.url,
        token=HUB_TOKEN,
        keepalive_interval=30.0,
        retries=1,
        retry_delay=0.05,
        request_timeout=5.0,
        long_poll_timeout=10.0,
        ca_certs=double.ca_file,
    )
    settings.update(kw)
    return SpallocAllocator(**settings)


def test_claim_reports_progress_and_renders_cfg(spalloc_double):
    double = spalloc_double(boards=1, power_delay=0.3)
    said: list = []

    async def scenario():
        a = allocator(double)
        alloc = await a.claim("alice", group="g-neuro", collab="collab-42", progress=said.append)
        assert alloc.root_host == FIRST_IP and alloc.version == 5 and alloc.alive
        (job,) = double.jobs()
        assert job["state"] == "READY" and job["owner"] == "alice"  # the hub's admin token claims for alice
        assert (job["group"], job["collab"]) == ("g-neuro", "collab-42")
        assert job["request"]["keepalive-interval"] == "PT30S" and job["request"]["num-boards"] == 1
        assert alloc.job.keepalive_running
        cfg = configparser.RawConfigParser()
        claimed = ClaimedBoards(alloc.root_host, alloc.version, alloc.job_url, "alice")
        cfg.read_string(spynnaker_cfg_text({"mode": "session", "version": 5}, claimed=claimed))
        assert dict(cfg["Machine"]) == {
            "virtual_board": "False",
            "machine_name": FIRST_IP,
            "version": "5",
            "spalloc_server": "None",
            "remote_spinnaker_url": "None",
            "auto_detect_bmp": "False",
            "reset_machine_on_startup": "False",
            "turn_off_machine": "False",
        }
        assert alloc.job_url in spynnaker_cfg_text({"mode": "session", "version": 5}, claimed=claimed)
        await alloc.release("session ended")
        assert double.job(job["id"])["state"] == "DESTROYED"
        assert double.job(job["id"])["reason"] == "session ended"
        assert not alloc.job.keepalive_running and not alloc.alive
        await a.close()

    run(scenario())
    messages = [p.message for p in said]
    states = [p.state for p in said]
    assert messages[0] == "Asked the SpiNNaker allocation service for a board (job 1)."
    assert JobState.POWER in states and states[-1] is JobState.READY
    assert "Got a SpiNNaker board; switching it on (job 1)." in messages
    assert messages[-1] == f"SpiNNaker board ready at {FIRST_IP} (job 1)."
    assert said[-1].machine is not None and said[-1].job_url.endswith("/jobs/1")


def test_two_owners_one_board_second_waits_in_queue(spalloc_double):
    double = spalloc_double(boards=1, power_delay=0, wait_timeout=0.5)  # short holds: queue heartbeats
    bob_said: list = []

    async def scenario():
        a = allocator(double)
        alice = await a.claim("alice")
        bob_task = asyncio.ensure_future(a.claim("bob", progress=bob_said.append))
        await until(lambda: len([p for p in bob_said if p.state is JobState.QUEUED]) >= 3, "bob's queue messages")
        assert not bob_task.done()
        jobs = {j["owner"]: j for j in double.jobs()}
        assert jobs["alice"]["state"] == "READY" and jobs["bob"]["state"] == "QUEUED"
        assert jobs["bob"]["boards"] == []
        await alice.release("alice is done")
        bob = await asyncio.wait_for(bob_task, 10)
        assert bob.root_host == alice.root_host == FIRST_IP
        assert double.job(jobs["bob"]["id"])["state"] == "READY"
        await bob.release("bob is done")
        await a.close()

    run(scenario())
    queued = [p.message for p in bob_said if p.state is JobState.QUEUED]
    assert queued[0] == "Asked the SpiNNaker allocation service for a board (job 2)."
    assert queued[1].startswith("Waiting for a SpiNNaker board: all boards are in use and you are in the queue (job 2")
    assert bob_said[-1].message == f"SpiNNaker board ready at {FIRST_IP} (job 2)."
    assert [p.elapsed for p in bob_said] == sorted(p.elapsed for p in bob_said)


def test_keepalive_keeps_job_alive_and_job_expires_when_it_stops(spalloc_double):
    double = spalloc_double(boards=2, power_delay=0, testing=True, keepalive_min=0.5)
    lost: list[str] = []

    async def scenario():
        a = allocator(double, keepalive_interval=1.0)  # the hub keeps alive every 1/3 s
        alloc = await a.claim("alice")
        t0 = time.monotonic()
        await until(lambda: double.job(alloc.job_id)["keepalives"] >= 8, "eight keepalives")
        assert time.monotonic() - t0 > 2.0  # more than twice the interval has passed...
        assert double.job(alloc.job_id)["state"] == "READY"  # ...and the job lives
        await alloc.job.stop_keepalive()
        await until(lambda: double.job(alloc.job_id)["state"] == "DESTROYED", "expiry", timeout=5)
        assert double.job(alloc.job_id)["reason"] == "keepalive expired"

        # The service ending a job the hub keeps alive is reported through on_lost.
        other = await a.claim("bob", on_lost=lost.append)
        double.destroy_job(other.job_id, "operator maintenance")
        await until(lambda: lost, "on_lost", timeout=5)
        assert lost == ["operator maintenance"] and not other.alive and other.lost_reason == lost[0]
        await until(lambda: not other.job.keepalive_running, "keepalive loop end", timeout=5)
        await a.close()

    run(scenario())


def test_resume_from_persisted_job_url(spalloc_double):
    double = spalloc_double(boards=1, power_delay=0)

    async def scenario():
        first_hub = allocator(double)
        alloc = await first_hub.claim("alice")
        url = alloc.job_url
        await alloc.job.stop_keepalive()  # the hub stops (restart)
        await first_hub.close()

        second_hub = allocator(double, keepalive_interval=120.0)  # a new process: new session
        before = double.job(alloc.job_id)["keepalives"]
        said: list = []
        again = await second_hub.resume(url, progress=said.append)
        assert (again.job_url, again.root_host, again.owner) == (url, FIRST_IP, "alice")
        assert again.job.keepalive_interval == 30.0  # from the job's original request, not the new default
        assert said[-1].message == f"SpiNNaker board ready at {FIRST_IP} (job 1)."
        await until(lambda: double.job(alloc.job_id)["keepalives"] > before, "keepalive after resume")
        logins = [r for r in double.request_log() if r["path"].endswith("/system/login.html")]
        assert len(logins) == 2

        await again.release("resumed, then released")
        with pytest.raises(SpallocJobDestroyedError) as err:
            await second_hub.resume(url)
        assert "resumed, then released" in str(err.value) and err.value.reason == "resumed, then released"
        with pytest.raises(SpallocError, match="Refusing to use the job URL"):
            await second_hub.resume("http://elsewhere.example/spalloc/srv/spalloc/jobs/1")
        await second_hub.release(url, "again")  # releasing twice is harmless
        await second_hub.close()

    run(scenario())


def test_session_renewal_and_token_refresh(spalloc_double):
    double = spalloc_double(boards=1, power_delay=0, testing=True, keepalive_min=0.5)
    current = {"token": HUB_TOKEN}

    async def provider() -> str:
        return current["token"]

    async def scenario():
        a = allocator(double, token="", token_provider=provider, keepalive_interval=1.5)
        alloc = await a.claim("alice")
        # The service forgets sessions and the old token is revoked; the provider now has a fresh one.
        double.set_token("fresh-token", "hub")
        double.set_token(HUB_TOKEN, None)
        current["token"] = "fresh-token"
        double.drop_sessions()
        before = double.job(alloc.job_id)["keepalives"]
        await until(lambda: double.job(alloc.job_id)["keepalives"] >= before + 3, "keepalives after renewal")
        assert double.job(alloc.job_id)["state"] == "READY"
        log = double.request_log()
        assert any(r["status"] == 401 for r in log)
        assert len([r for r in log if r["path"].endswith("/system/login.html") and r["status"] == 200]) == 2
        await alloc.release("done")
        await a.close()

    run(scenario())


def test_owner_is_the_token_user_for_non_admins(spalloc_double):
    double = spalloc_double(boards=2, power_delay=0)

    async def scenario():
        a = allocator(double)
        alloc = await a.claim("mallory", token=ALICE_TOKEN)
        assert double.job(alloc.job_id)["owner"] == "alice"  # the service ignores `owner` for non-admins
        with pytest.raises(SpallocRequestError) as err:  # bob cannot see alice's job
            await a.resume(alloc.job_url, token=BOB_TOKEN)
        assert err.value.status == 404 and "not found" in str(err.value)
        await alloc.release("done")
        await a.close()

    run(scenario())


def test_claim_timeout_and_cancellation_release_the_queued_job(spalloc_double):
    double = spalloc_double(boards=1, power_delay=0)

    async def scenario():
        a = allocator(double)
        alice = await a.claim("alice")
        t0 = time.monotonic()
        with pytest.raises(SpallocTimeoutError) as err:
            await a.claim("bob", timeout=1.0)
        assert 0.9 < time.monotonic() - t0 < 5
        assert str(err.value) == (
            "No SpiNNaker board became ready within 1 s (job 2 was still queued). Try "
            "again later; the operator can raise `spinnaker.spalloc.claim_timeout`."
        )
        bob = [j for j in double.jobs() if j["owner"] == "bob"][0]
        assert (bob["state"], bob["reason"]) == ("DESTROYED", "claim timed out")

        carol = asyncio.ensure_future(a.claim("carol"))
        await until(
            lambda: any(j["owner"] == "carol" and j["waiters"] for j in double.jobs()), "carol waiting in the queue"
        )
        carol.cancel()
        with pytest.raises(asyncio.CancelledError):
            await carol
        carol_job = [j for j in double.jobs() if j["owner"] == "carol"][0]
        assert (carol_job["state"], carol_job["reason"]) == ("DESTROYED", "claim cancelled")
        assert double.job(alice.job_id)["state"] == "READY"
        await alice.release("done")
        await a.close()

    run(scenario())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_clear_errors_unreachable_bad_token_wrong_url_bad_request(spalloc_double):
    double = spalloc_double(boards=1)

    async def scenario():
        t0 = time.monotonic()
        with pytest.raises(SpallocUnreachableError) as err:
            await allocator(double, url=f"http://127.0.0.1:{_closed_port()}/spalloc/").claim("alice")
        msg = str(err.value)
        assert time.monotonic() - t0 < 3
        assert "Cannot reach the SpiNNaker allocation service" in msg and "connection refused" in msg
        assert "2 attempts" in msg and "spinnaker.spalloc.url" in msg

        with pytest.raises(SpallocAuthError) as err:
            await allocator(double, token="not-a-valid-token").claim("alice")
        assert "did not accept the access token" in str(err.value) and "HTTP 401" in str(err.value)
        assert "spinnaker.spalloc.token" in str(err.value)
        with pytest.raises(SpallocAuthError, match="No access token"):
            await allocator(double, token="").claim("alice")

        with pytest.raises(SpallocProtocolError) as err:
            await allocator(double, url=f"http://127.0.0.1:{double.port}/not-spalloc/").claim("alice")
        assert "did not answer like a SpiNNaker allocation service" in str(err.value)

        # The double refuses what the real service refuses, and the client passes the reason on.
        with pytest.raises(SpallocRequestError) as err:
            await allocator(double, keepalive_interval=10.0).claim("alice")
        assert err.value.status == 400
        assert str(err.value) == (
            "The SpiNNaker allocation service refused to create a job for 1 board: "
            "keepalive-interval must be 30 to 300 seconds (HTTP 400)."
        )
        with pytest.raises(SpallocError, match="must be an http"):
            allocator(double, url="spalloc.example.org:22244").client()
        assert double.jobs() == []

    run(scenario())


def test_tls_needs_the_private_ca(spalloc_double):
    double = spalloc_double(boards=1, power_delay=0, tls=True)

    async def scenario():
        with pytest.raises(SpallocUnreachableError) as err:
            await allocator(double, ca_certs=None).claim("alice")
        assert "not trusted" in str(err.value) and "spinnaker.spalloc.ca_certs" in str(err.value)
        alloc = await allocator(double).claim("alice")
        assert alloc.job_url.startswith("https://")
        await alloc.release("done")

    run(scenario())


def test_double_speaks_the_services_http_rules(spalloc_double):
    """Auth, CSRF, validation and answers of the double, as the Java service gives them."""
    double = spalloc_double(boards=3, power_delay=0)
    srv = double.srv_url
    r = requests.get(srv, timeout=5)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert requests.get(srv, headers={"Authorization": "Bearer nope"}, timeout=5).status_code == 401

    s = requests.Session()
    login = s.get(double.url + "system/login.html", headers={"Authorization": f"Bearer {ALICE_TOKEN}"}, timeout=5)
    assert login.status_code == 200 and "JSESSIONID" in login.cookies
    root = s.get(srv, timeout=5).json()  # the cookie alone authenticates reads
    assert root["version"] == {"major-version": 7, "minor-version": 4, "revision": 1}
    assert root["jobs-ref"] == srv + "jobs" and root["machines-ref"] == srv + "machines"
    csrf = {root["csrf-header"]: root["csrf-token"]}
    body = {"num-boards": 2, "machine-name": "spinnaker-double", "keepalive-interval": "PT1M"}
    assert s.post(srv + "jobs", json=body, timeout=5).status_code == 403  # cookie without CSRF token
    r = s.post(srv + "jobs", json=body, headers=csrf, timeout=5)
    assert r.status_code == 201 and r.headers["Location"] == srv + "jobs/1" == r.json()["job-ref"]
    state = s.get(r.headers["Location"], timeout=5).json()
    assert state["state"] == "READY" and state["owner"] == "alice"
    assert state["keepalive-ref"] == srv + "jobs/1/keepalive" and state["proxy-ref"].startswith("wss://")
    machine = s.get(state["machine-ref"], timeout=5).json()  # two boards: a whole triad
    assert (machine["width"], machine["height"], machine["depth"]) == (16, 16, 3)
    assert sorted(h for _, h in machine["connections"]) == ["10.11.192.1", "10.11.192.17", "10.11.192.9"]
    assert s.put(state["keepalive-ref"], data="alive", headers=csrf, timeout=5).status_code == 415
    ok = s.put(
        state["keepalive-ref"], data="alive", timeout=5, headers={**csrf, "Content-Type": "text/plain; charset=UTF-8"}
    )
    assert (ok.status_code, ok.text) == (200, "ok")
    for bad, why in [
        ({**body, "colour": "red"}, 'Unrecognized field "colour"'),
        ({**body, "tags": ["default"]}, "either machine-name or tags must be supplied"),
        ({"num-boards": 1, "tags": ["default"]}, "keepalive-interval is required"),
        ({**body, "keepalive-interval": "PT301S"}, "keepalive-interval must be 30 to 300 seconds"),
        ({**body, "keepalive-interval": "2 minutes"}, "cannot be parsed"),
    ]:
        r = s.post(srv + "jobs", json=bad, headers=csrf, timeout=5)
        assert r.status_code == 400 and why in r.text, (bad, r.text)
    bob = {"Authorization": f"Bearer {BOB_TOKEN}"}
    assert requests.get(srv + "jobs/1", headers=bob, timeout=5).status_code == 404  # not bob's job
    assert s.delete(srv + "jobs/1", params={"reason": "bye"}, headers=csrf, timeout=5).status_code == 204
    gone = s.get(srv + "jobs/1", timeout=5).json()
    assert (gone["state"], gone["reason"]) == ("DESTROYED", "bye") and "proxy-ref" not in gone
    assert s.get(srv + "jobs/1/machine", timeout=5).status_code == 204
    assert s.get(srv + "jobs", timeout=5).json() == {"jobs": []}
    assert s.get(srv + "jobs", params={"deleted": "true"}, timeout=5).json() == {"jobs": [srv + "jobs/1"]}
    with pytest.raises(ValueError, match="test-only"):
        SpallocDouble(keepalive_min=1)


# =========================================================================================================
# job listing, leases and start-up reconciliation (issue 11: orphaned jobs after a hub crash)
# =========================================================================================================
def test_job_listing_pages_for_spinnman_and_the_hub_alike(spalloc_double, spinnman):
    double = spalloc_double(boards=1, tls=True, power_delay=0, list_limit=2)  # 3 jobs: two pages
    drv = spinnman("list", double)
    listed = drv.expect("listed")
    created = sorted(u.rstrip("/") for u in listed["created"])  # (spinnman's job URLs end with a slash)
    assert sorted(u.rstrip("/") for u in listed["listed"]) == created and len(created) == 3
    pages = [r for r in double.request_log() if r["method"] == "GET" and r["path"].endswith("/jobs")]
    assert any("start=2" in r["query"] for r in pages), pages  # spinnman followed `next`

    async def hub_view() -> list:
        a = allocator(double)
        try:
            return await a.client().list_jobs()
        finally:
            await a.close()

    assert sorted(run(hub_view())) == created  # the hub's client reads the same pages
    drv.send("destroy")
    done = drv.expect("destroyed")
    assert done["listed"] == [] and sorted(u.rstrip("/") for u in done["deleted"]) == created
    assert run(hub_view()) == []
    drv.finish()


def test_a_claim_records_its_job_before_using_it_and_gives_it_back_if_it_cannot(spalloc_double):
    double = spalloc_double(boards=1, power_delay=0)
    seen: list = []

    async def scenario():
        a = allocator(double)

        def record(job):  # runs before the claim does anything with the job: no keepalive, no state read yet
            seen.append((job.url, [r["method"] for r in double.request_log() if "/jobs/" in r["path"]]))

        alloc = await a.claim("alice", on_created=record)
        assert seen == [(alloc.job_url, [])]
        await alloc.release("done")

        def broken(job):
            raise OSError("disk full")

        released: list = []
        with pytest.raises(OSError, match="disk full"):
            await a.claim("bob", on_created=broken, on_released=released.append)
        [bob] = [j for j in double.jobs() if j["owner"] == "bob"]
        assert (bob["state"], bob["reason"]) == ("DESTROYED", "claim failed: the hub could not record the job")
        assert [j.url for j in released] == [f"{double.srv_url}jobs/{bob['id']}"]  # confirmed: the row may go
        # A claim that times out: released (and said so) only once the service confirmed the end.
        with pytest.raises(SpallocTimeoutError):
            blocker = await a.claim("carol")
            await a.claim("dave", timeout=0.5, on_released=released.append)
        assert len(released) == 2
        await blocker.release("done")
        await a.close()

    run(scenario())


def _lease_store(tmp_path, name="leases.sqlite"):
    from spinnaker_jupyter.leases import LeaseStore

    return LeaseStore(tmp_path / name)


def test_reconcile_destroys_only_the_jobs_no_live_holder_has(spalloc_double, tmp_path):
    """Rows of a dead hub process: a queued claim, a server gone, a server still running; plus a job the dead
    process asked for but never recorded (the crash window), and jobs that are not the hub's at all."""
    from spinnaker_jupyter import leases

    double = spalloc_double(boards=1, power_delay=0)
    logs: list[str] = []

    class Log:
        def __getattr__(self, level):
            return lambda msg, *args: logs.append(f"{level}: {msg % args}")

    async def scenario():
        a = allocator(double)
        client = a.client()
        dead = _lease_store(tmp_path)  # the hub process that will be "killed"
        service = client.service_url
        # alice's server runs on after the restart; bob's server is gone; carol's claim was queued.
        running = await a.claim("alice")
        dead.begin("alice/", "alice", service)  # (a row per claim; marked held when the server started)
        dead.created(dead.leases()[-1].id, running.job_url)
        dead.held(running.job_url)
        await running.job.stop_keepalive()  # the process dies: nobody keeps anything alive
        bob_job = await client.create_job(owner="bob", keepalive_interval=30)
        lid = dead.begin("bob/", "bob", service)
        dead.created(lid, bob_job.url)
        dead.held(bob_job.url)
        carol_job = await client.create_job(owner="carol", keepalive_interval=30)
        dead.created(dead.begin("carol/", "carol", service), carol_job.url)
        # dave: the service made his job, the hub died before it could write the URL.
        dead.begin("dave/", "dave", service, boards=1, keepalive=30.0)
        dave_job = await client.create_job(owner="dave", keepalive_interval=30)
        # Not the hub's: dave's own job from his laptop (kept alive since), and erin's job under her own token.
        double.advance_clock(3)
        own = await client.create_job(owner="dave", keepalive_interval=30)
        double.advance_clock(3)
        await own.keepalive()
        erin = await a.client(token=ALICE_TOKEN).create_job(keepalive_interval=30)
        dead.close()

        restarted = leases.LeaseStore(tmp_path / "leases.sqlite")  # a new incarnation
        report = await leases.reconcile(
            restarted, client, is_held=lambda lease: lease.job_url == running.job_url, log=Log()
        )
        states = {j["id"]: (j["state"], j["reason"]) for j in double.jobs()}
        assert states[running.job_id][0] == "READY" and report.kept == [running.job_url]
        for job in (bob_job, carol_job, dave_job):
            assert states[job.id][0] == "DESTROYED", (job, states)
            assert "the hub restarted and no server of it holds this job" in states[job.id][1]
        assert "stopped before it could record the job" in states[dave_job.id][1]
        assert "its claim was still waiting" in states[carol_job.id][1]
        assert states[own.id][0] != "DESTROYED" and states[erin.id][0] != "DESTROYED"
        assert sorted(report.destroyed) == sorted([bob_job.url, carol_job.url, dave_job.url])
        destroyed_lines = [line for line in logs if "SpiNNaker jobs: destroyed" in line]
        assert len(destroyed_lines) == 3 and any("of carol" in line for line in destroyed_lines), logs
        assert [lease.job_url for lease in restarted.leases()] == [running.job_url]  # only what is still held
        # A second start finds nothing more to do.
        again = await leases.reconcile(
            leases.LeaseStore(tmp_path / "leases.sqlite"), client, is_held=lambda lease: True, log=Log()
        )
        assert again.destroyed == [] and again.kept == [running.job_url]
        await a.close()

    run(scenario())


def test_the_lease_store_refuses_a_file_it_cannot_trust(tmp_path):
    from spinnaker_jupyter.leases import LeaseStoreError

    target = tmp_path / "elsewhere.sqlite"
    target.write_bytes(b"")
    (tmp_path / "leases.sqlite").symlink_to(target)
    with pytest.raises(LeaseStoreError, match="not a regular file; remove it"):
        _lease_store(tmp_path)
    loose = tmp_path / "loose.sqlite"
    loose.write_bytes(b"")
    os.chmod(loose, 0o666)
    with pytest.raises(LeaseStoreError, match="writable by others; remove it"):
        _lease_store(tmp_path, "loose.sqlite")
    store = _lease_store(tmp_path, "fresh.sqlite")
    assert (os.stat(tmp_path / "fresh.sqlite").st_mode & 0o777) == 0o600
    store.close()


def test_double_job_list_long_polls_until_a_job_changes(spalloc_double):
    """`GET jobs?wait=true` is held until a job is made or changes (the service's jobs epoch), then lists anew."""
    double = spalloc_double(boards=1, power_delay=0, wait_timeout=5.0)
    auth = {"Authorization": f"Bearer {HUB_TOKEN}"}
    got: dict = {}

    def long_poll():
        t0 = time.monotonic()
        r = requests.get(double.srv_url + "jobs?wait=true", headers=auth, timeout=10)
        got.update(seconds=time.monotonic() - t0, status=r.status_code, jobs=r.json()["jobs"])

    t = threading.Thread(target=long_poll)
    t.start()
    double.wait_for(lambda d: d.call(lambda: d.model.list_waiters), timeout=5, what="the list poll to be held")
    assert not got
    r = requests.post(
        double.srv_url + "jobs",
        headers=auth,
        timeout=10,
        json={"num-boards": 1, "keepalive-interval": "PT60S", "tags": ["default"]},
    )
    t.join(10)
    assert got["status"] == 200 and got["jobs"] == [r.headers["Location"]] and got["seconds"] < 4, got
    t0 = time.monotonic()
    quiet = requests.get(double.srv_url + "jobs?wait=true", headers=auth, timeout=10)
    assert quiet.json()["jobs"] == [r.headers["Location"]] and 4.5 < time.monotonic() - t0 < 8


def test_reconcile_leaves_the_jobs_of_a_store_restored_from_another_machine(spalloc_double, tmp_path):
    """A backup restored elsewhere holds the rows of a hub that may still run: their jobs are not this hub's."""
    from spinnaker_jupyter import leases

    double = spalloc_double(boards=1, power_delay=0)
    logs: list[str] = []

    class Log:
        def __getattr__(self, level):
            return lambda msg, *args: logs.append(f"{level}: {msg % args}")

    async def scenario():
        a = allocator(double)
        client = a.client()
        there = leases.LeaseStore(tmp_path / "leases.sqlite", host="production")
        job = await client.create_job(owner="alice", keepalive_interval=30)
        there.created(there.begin("alice/", "alice", client.service_url), job.url)
        there.close()
        here = leases.LeaseStore(tmp_path / "leases.sqlite", host="restore-test")
        report = await leases.reconcile(here, client, is_held=lambda lease: False, log=Log())
        assert report.destroyed == [] and double.job(job.id)["state"] != "DESTROYED"
        assert here.leases() == [] and any("recorded on another machine (production" in line for line in logs), logs
        await a.close()

    run(scenario())


def test_a_recorded_claim_keeps_its_row_exactly_as_long_as_its_job_may_live(spalloc_double, tmp_path):
    """leases.claim_recorded, the claim every holder (user server, batch job) goes through."""
    from spinnaker_jupyter import leases

    double = spalloc_double(boards=1, power_delay=0)

    async def scenario():
        a = allocator(double)
        store = leases.LeaseStore(tmp_path / "leases.sqlite")
        got = await leases.claim_recorded(a, store, "alice", holder="alice/")
        [row] = store.leases()
        assert (row.phase, row.job_url, row.owner, row.holder, row.boards) == (
            leases.CLAIMED,
            got.job_url,
            "alice",
            "alice/",
            1,
        )
        store.held(got.job_url)
        assert store.leases()[0].phase == leases.HELD
        with pytest.raises(SpallocTimeoutError):  # the board is taken: bob's claim times out
            await leases.claim_recorded(a, store, "bob", holder="batch:7", timeout=0.5)
        assert [r.owner for r in store.leases()] == ["alice"]  # bob's job was destroyed, so its row went
        await got.release("done")
        store.forget(job_url=got.job_url)
        assert store.leases() == []
        await a.close()

    run(scenario())
