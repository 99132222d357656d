"""SpiNNaker boards for user servers (spinnaker.mode session / machine), end to end: a real hub and proxy, users
logging in, their servers and sPyNNaker kernels; the spalloc test double (tests/doubles/spalloc_server.py) is the
only stand-in, serving plain http from a thread of this process on 127.0.0.1.

Session mode: a claim per server, queueing when the board is taken, release at stop and when the hub's poll finds a
server gone, keepalive resumed across a hub restart, a fresh claim after a job expired while the hub was down, the
one cfg a kernel sees naming the claimed board, and the status command and admin views. Then what happens when no
board comes in time (virtual with a notice, or a failed start), and machine mode's one server at a time.
Every wait is on a condition, with a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import threading

import pytest
import requests
import yaml

from conftest import secret_file
from doubles.spalloc_server import SpallocDouble
from hubclient import hold_starts, wait_for

HUB_TOKEN = "hub-spalloc-token"
FIRST_IP = "10.11.192.1"
KEEPALIVE = 30  # the real service's minimum; expiry is tested by advancing the double's clock

READ_CFG = textwrap.dedent("""
    import json, os
    from spynnaker.pyNN.config_setup import setup_configs
    from spinn_utilities import config_holder as ch
    setup_configs()
    ch.load_config()
    home = os.path.expanduser("~")
    print("CFG" + json.dumps({
        "machine_name": ch.get_config_str_or_none("Machine", "machine_name"),
        "version": ch.get_config_int("Machine", "version"),
        "virtual_board": ch.get_config_bool("Machine", "virtual_board"),
        "spalloc_server": ch.get_config_str_or_none("Machine", "spalloc_server"),
        "user_cfg": ch._user_cfg(),  # raises TwoUserConfigsException if a second cfg were in reach
        "text": open(ch._user_cfg()).read(),
        "home_cfgs": [p for p in (os.path.join(home, ".spynnaker.cfg"), os.path.join(home, ".config", ".spynnaker.cfg"))
                      if os.path.exists(p)]}))
""")

STATUS = textwrap.dedent("""
    import subprocess
    r = subprocess.run(["spinnaker-status", "--json"], capture_output=True, text=True)
    t = subprocess.run(["spinnaker-status"], capture_output=True, text=True)
    print("STATUS" + r.stdout.replace(chr(10), " ") + chr(10) + "TEXT" + t.stdout.replace(chr(10), " | ") +
          chr(10) + "RC" + str(r.returncode) + chr(10) + "ERR" + r.stderr + t.stderr)
""")


def tagged(stdout: str, tag: str) -> str:
    for line in stdout.splitlines():
        if line.startswith(tag):
            return line[len(tag) :]
    raise AssertionError(f"no {tag} line in {stdout!r}")


class ProgressReader(threading.Thread):
    """Start a server from the spawn page and read its progress stream as it comes, like the browser does."""

    def __init__(self, user, timeout: float = 180):
        super().__init__(daemon=True)
        self.user, self.timeout = user, timeout
        self.messages: list[str] = []
        self.final: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            u = self.user
            r = u.session.get(f"{u.url}/hub/spawn/{u.name}", allow_redirects=False, timeout=30)
            assert r.status_code == 302 and "spawn-pending" in r.headers["location"], (r.status_code, r.headers)
            with u.api("GET", f"/users/{u.name}/server/progress", stream=True, timeout=self.timeout) as r:
                for line in r.iter_lines(decode_unicode=True):
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        self.messages.append(event.get("message", ""))
                        if event.get("ready") or event.get("failed"):
                            self.final = event
                            return
        except BaseException as e:  # noqa: BLE001 - reported by result()
            self.error = e

    def said(self, text: str) -> bool:
        return any(text in m for m in self.messages)

    def result(self, timeout: float) -> dict:
        self.join(timeout)
        if self.error:
            raise self.error
        assert self.final is not None, f"the spawn did not finish within {timeout} s; said so far: {self.messages}"
        return self.final


def jobs_of(double: SpallocDouble, owner: str) -> list[dict]:
    return [j for j in double.jobs() if j["owner"] == owner]


def live_jobs(double: SpallocDouble) -> list[dict]:
    return [j for j in double.jobs() if j["state"] != "DESTROYED"]


def wait_released(double: SpallocDouble, job_id: int, timeout: float = 20) -> dict:
    """The hub releases a stopped server's job right after it records the server as stopped."""
    double.wait_for(
        lambda d: d.job(job_id)["state"] == "DESTROYED", timeout=timeout, what=f"job {job_id} to be released"
    )
    return double.job(job_id)


def board_status(user, name: str | None = None, live: bool = True) -> dict:
    r = user.api("GET", f"/spinnaker/boards/{name or user.name}/" + ("" if live else "?live=0"))
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()


def server_pid(admin, name: str) -> int:
    model = admin.api("GET", f"/users/{name}").json()
    return model["servers"][""]["state"]["pid"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def double():
    d = SpallocDouble(
        boards=1,
        tokens={HUB_TOKEN: "hub", "lab-token": "lab"},
        admins=["hub"],
        power_delay=0.2,
        wait_timeout=5.0,
        first_ip=FIRST_IP,
    ).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    return secret_file(tmp_path_factory, HUB_TOKEN)


def stop_all_servers(hub) -> None:
    """Servers outlive a hub with stop_servers_on_exit: false; the tests' own end them."""
    if hub.proc is None or hub.proc.poll() is not None:
        return
    admin = hub.client("admin", hub.cli("user", "passwd", "admin").stdout.strip().split()[-1])
    for user in admin.api("GET", "/users").json():
        for name in user.get("servers", {}):
            path = f"/users/{user['name']}/servers/{name}" if name else f"/users/{user['name']}/server"
            admin.api("DELETE", path)
    wait_for(lambda: not any(u.get("servers") for u in admin.api("GET", "/users").json()), 60, "every server to stop")


@pytest.fixture(scope="module")
def session_hub(hub_factory, double, token_file):
    hub = hub_factory(
        {
            "hub": {"stop_servers_on_exit": False},
            "spawner": {"poll_interval": 1},
            "culler": {"enabled": False},
            "spinnaker": {
                "mode": "session",
                "claim_timeout": 120,
                "on_timeout": "fail",
                "spalloc": {"url": double.url, "token_file": str(token_file), "keepalive_interval": KEEPALIVE},
            },
        },
        start=False,
    )
    hold_starts(hub)  # (alice's progress stream listens before her start runs: progress_messages)
    hub.start()
    yield hub
    stop_all_servers(hub)


@pytest.fixture(scope="module")
def users(session_hub):
    out = {name: session_hub.client(name, session_hub.add_user(name)) for name in ("alice", "bob")}
    out["admin"] = session_hub.client("admin", session_hub.cli("user", "passwd", "admin").stdout.strip().split()[-1])
    return out


# =========================================================================================================
# session mode
# =========================================================================================================
def test_session_claims_a_board_and_its_kernels_see_only_that_cfg(session_hub, users, double):
    alice, admin = users["alice"], users["admin"]
    messages = alice.progress_messages()
    assert any(f"SpiNNaker board ready at {FIRST_IP}" in m for m in messages), messages
    [job] = jobs_of(double, "alice")
    assert job["state"] == "READY" and job["boards"] == [FIRST_IP] and job["created_by"] == "hub"
    assert job["keepalive_interval"] == KEEPALIVE

    # The one sPyNNaker cfg its kernel sees names the claimed board (read back through spinn_utilities).
    kernel = alice.start_kernel("spynnaker")
    out = alice.execute(kernel, READ_CFG)
    assert out["error"] is None, out
    cfg = json.loads(tagged(out["stdout"], "CFG"))
    assert cfg["machine_name"] == FIRST_IP and cfg["version"] == 5 and cfg["virtual_board"] is False, cfg
    assert cfg["spalloc_server"] is None  # the kernel must not allocate again
    assert "/.cache/spinnaker-jupyter/cfg-" in cfg["user_cfg"] and cfg["home_cfgs"] == [], cfg
    assert f"jobs/{job['id']}" in cfg["text"], cfg["text"]

    # The user sees it with spinnaker-status (a terminal command; run here from the kernel, same environment).
    out = alice.execute(kernel, STATUS)
    status = json.loads(tagged(out["stdout"], "STATUS"))
    assert tagged(out["stdout"], "RC") == "0", out
    hub_view = status["hub"]
    assert hub_view["mode"] == "session" and hub_view["board"] == FIRST_IP and hub_view["job_id"] == job["id"]
    assert hub_view["live"]["state"] == "READY" and hub_view["keepalive"] == "running", hub_view
    text = tagged(out["stdout"], "TEXT")
    assert f"board:    {FIRST_IP}" in text and "READY at the allocation service" in text, text

    # Admins see it in the admin API (spawner state) and with the operator's command.
    state = admin.api("GET", "/users/alice").json()["servers"][""]["state"]["spinnaker"]
    assert state["job_id"] == job["id"] and state["board"] == FIRST_IP
    listing = admin.api("GET", "/spinnaker/boards").json()
    assert [(b["user"], b["board"]) for b in listing] == [("alice", FIRST_IP)]
    r = session_hub.cli("boards", "--live")
    assert r.returncode == 0 and "alice" in r.stdout and FIRST_IP in r.stdout and "READY" in r.stdout, r
    # (read through the running hub, which alone knows that it keeps the job alive)
    assert "read from the running hub (its REST API)" in r.stdout and "keepalive running" in r.stdout, r.stdout
    # ... and nobody else reads her server's boards.
    assert users["bob"].api("GET", "/spinnaker/boards/alice/").status_code in (403, 404)


def test_second_user_waits_in_the_queue_and_gets_the_board_when_the_first_stops(users, double):
    alice, bob = users["alice"], users["bob"]
    reader = ProgressReader(bob)
    reader.start()
    wait_for(lambda: reader.said("you are in the queue"), 30, "bob's spawn page to say he is queued")
    [bob_job] = jobs_of(double, "bob")
    assert bob_job["state"] == "QUEUED"
    assert not (bob.server_model() or {}).get("ready")
    [alice_job] = jobs_of(double, "alice")
    alice.stop_server()
    alice_job = wait_released(double, alice_job["id"])
    assert alice_job["reason"] == "user server stopped", alice_job
    final = reader.result(90)
    assert final.get("ready"), (final, reader.messages)
    assert double.job(bob_job["id"])["state"] == "READY"
    assert any(f"SpiNNaker board ready at {FIRST_IP} (job {bob_job['id']})" in m for m in reader.messages)
    assert board_status(bob)["board"] == FIRST_IP


def test_a_killed_server_gives_its_board_back(users, double):
    bob, admin = users["bob"], users["admin"]
    [job] = [j for j in jobs_of(double, "bob") if j["state"] == "READY"]
    os.kill(server_pid(admin, "bob"), signal.SIGKILL)
    released = wait_released(double, job["id"])
    assert "ended unexpectedly" in released["reason"], released
    wait_for(lambda: bob.server_model() is None, 20, "the hub to record bob's server as stopped")
    assert live_jobs(double) == []


def test_hub_restart_resumes_the_keepalive_of_a_live_server(session_hub, users, double):
    alice, admin = users["alice"], users["admin"]
    alice.start_server()
    [job] = [j for j in jobs_of(double, "alice") if j["state"] == "READY"]
    pid = server_pid(admin, "alice")
    n_jobs = len(double.jobs())
    session_hub.stop()
    assert alive(pid)  # stop_servers_on_exit: false
    keepalives = double.job(job["id"])["keepalives"]
    session_hub.start()
    double.wait_for(
        lambda d: d.job(job["id"])["keepalives"] > keepalives,
        timeout=20,
        what="the restarted hub to keep the job alive",
    )
    assert len(double.jobs()) == n_jobs and double.job(job["id"])["state"] == "READY"  # no second job
    assert alive(pid) and alice.server("GET", "api/status").status_code == 200
    status = board_status(alice)
    assert status["job_id"] == job["id"] and status["keepalive"] == "running" and status["live"]["state"] == "READY"


def test_a_server_that_died_while_the_hub_was_down_gives_its_job_back(session_hub, users, double):
    alice, admin = users["alice"], users["admin"]
    [job] = [j for j in jobs_of(double, "alice") if j["state"] == "READY"]
    pid = server_pid(admin, "alice")
    session_hub.stop()
    os.kill(pid, signal.SIGKILL)
    session_hub.start()
    released = wait_released(double, job["id"])
    assert "ended unexpectedly" in released["reason"], released
    wait_for(lambda: alice.server_model() is None, 20, "the hub to record alice's server as stopped")


def test_hub_down_longer_than_the_keepalive_loses_the_job_and_the_next_start_claims_afresh(session_hub, users, double):
    alice = users["alice"]
    alice.start_server()
    [job] = [j for j in jobs_of(double, "alice") if j["state"] == "READY"]
    session_hub.stop()
    # With the hub down the operator's command reads the hub's database, and says so.
    r = session_hub.cli("boards")
    assert r.returncode == 0 and "read from the hub's database (the hub is not running)" in r.stdout, r
    assert f"board {FIRST_IP}" in r.stdout and f"job {job['id']}" in r.stdout, r.stdout
    double.advance_clock(KEEPALIVE + 1)  # the hub stays away for longer than the keepalive interval
    assert double.job(job["id"])["state"] == "DESTROYED" and double.job(job["id"])["reason"] == "keepalive expired"
    session_hub.start()
    status = wait_for(
        lambda: (lambda s: s if s.get("lost") else None)(board_status(alice)),
        20,
        "the hub to notice that alice's job has ended",
    )
    assert "keepalive expired" in status["lost"] and status["live"]["state"] == "DESTROYED", status
    assert (alice.server_model() or {}).get("ready")  # the server itself runs on
    alice.stop_server()
    alice.start_server()
    [new] = live_jobs(double)
    assert new["owner"] == "alice" and new["id"] != job["id"] and new["state"] == "READY"
    status = board_status(alice)
    assert status["job_id"] == new["id"] and not status.get("lost") and status["live"]["state"] == "READY"
    alice.stop_server()
    wait_released(double, new["id"])


# =========================================================================================================
# no board in time
# =========================================================================================================
def occupy_the_board(double: SpallocDouble) -> int:
    """Someone else's job holds the only board (a lab user of the same service)."""
    r = requests.post(
        double.srv_url + "jobs",
        headers={"Authorization": "Bearer lab-token"},
        timeout=10,
        json={"num-boards": 1, "keepalive-interval": "PT300S", "tags": ["default"]},
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["job-id"]
    double.wait_for(lambda d: d.job(job_id)["state"] == "READY", timeout=10, what="the lab's job to get the board")
    return job_id


def test_no_board_in_time_starts_in_virtual_mode_with_a_notice_or_fails_as_configured(hub_factory, double, token_file):
    blocker = occupy_the_board(double)
    hub = hub_factory(
        {
            "spinnaker": {
                "mode": "session",
                "claim_timeout": 2,
                "on_timeout": "virtual",
                "spalloc": {"url": double.url, "token_file": str(token_file)},
            },
            "culler": {"enabled": False},
        }
    )
    carol = hub.client("carol", hub.add_user("carol"))
    messages = carol.progress_messages()
    assert any("you are in the queue" in m for m in messages), messages
    assert any(
        "No SpiNNaker board for this session: no SpiNNaker board became free within 2 s" in m and "virtual mode" in m
        for m in messages
    ), messages
    assert carol.server_model()["ready"]
    [job] = jobs_of(double, "carol")
    assert job["state"] == "DESTROYED" and job["reason"] == "claim timed out"
    kernel = carol.start_kernel("spynnaker")
    out = carol.execute(kernel, "import pyNN.spiNNaker")
    assert out["stdout"].count("SpiNNaker: No SpiNNaker board for this session") == 1, out
    status = board_status(carol)
    assert status["fallback"] == "virtual" and "virtual mode" in status["notice"]

    # The operator's other choice: fail the start, with the reason.
    hub.stop()
    hub.config["spinnaker"]["on_timeout"] = "fail"
    hub.config_file.write_text(yaml.safe_dump(hub.config))
    hub.start()
    dave = hub.client("dave", hub.add_user("dave"))
    messages = dave.progress_messages()
    assert messages[-1].startswith(
        "Spawn failed: No SpiNNaker board for your server: no SpiNNaker board became free within 2 s"
    ), messages
    assert "try again later" in messages[-1]
    wait_for(lambda: dave.server_model() is None, 20, "dave's failed server to be cleared")
    assert [(j["state"], j["reason"]) for j in jobs_of(double, "dave")] == [("DESTROYED", "claim timed out")]
    double.destroy_job(blocker)


# =========================================================================================================
# machine mode: the lab's own board, one server at a time
# =========================================================================================================
def test_machine_mode_second_server_waits_for_the_first_to_stop(hub_factory):
    hub = hub_factory(
        {
            "spinnaker": {"mode": "machine", "machine_name": "192.0.2.10", "claim_timeout": 60},
            "hub": {"stop_servers_on_exit": False},
            "spawner": {"poll_interval": 1},
            "culler": {"enabled": False},
        }
    )
    erin = hub.client("erin", hub.add_user("erin"))
    frank = hub.client("frank", hub.add_user("frank"))
    erin.start_server()
    assert board_status(erin, live=False)["held"] is True
    hub.stop()  # the holder is known again after a hub restart (from erin's server's state)
    hub.start()
    reader = ProgressReader(frank)
    reader.start()
    wait_for(
        lambda: reader.said("The lab's SpiNNaker board 192.0.2.10 is in use by erin's server since "),
        30,
        "frank's spawn page to say whose server has the board",
    )
    assert reader.said("; you get it when they stop it"), reader.messages
    assert not (frank.server_model() or {}).get("ready") and board_status(erin, live=False)["held"] is True
    erin.stop_server()
    assert reader.result(60).get("ready"), reader.messages
    status = board_status(frank, live=False)
    assert status["held"] is True and status["holder"] == "frank/" and status["board"] == "192.0.2.10"
    stop_all_servers(hub)


# =========================================================================================================
# per-run mode, and the config rules
# =========================================================================================================
def test_per_run_kernels_get_the_service_url_and_the_way_to_the_token_service(hub_factory, double):
    hub = hub_factory(
        {
            "spinnaker": {"mode": "per-run", "spalloc": {"url": double.url, "group": "course-a"}},
            "culler": {"enabled": False},
        }
    )
    gina = hub.client("gina", hub.add_user("gina"))
    gina.start_server()
    kernel = gina.start_kernel("spynnaker")
    out = gina.execute(
        kernel,
        READ_CFG + "\nprint('SVC' + os.environ.get('JUPYTERHUB_SERVICE_HOST', '') + ':' + "
        "os.environ.get('JUPYTERHUB_SERVICE_PORT', ''))",
    )
    cfg = json.loads(tagged(out["stdout"], "CFG"))
    assert cfg["spalloc_server"] == double.url and cfg["virtual_board"] is False and cfg["machine_name"] is None
    assert "spalloc_group = course-a" in cfg["text"] and cfg["home_cfgs"] == []
    assert tagged(out["stdout"], "SVC") == f"127.0.0.1:{hub.port}"
    assert jobs_of(double, "gina") == []  # the hub claims nothing: sPyNNaker does, at setup()
    gina.stop_server()


def write_config(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_rules_for_boards(tmp_path, monkeypatch):
    from spinnaker_jupyter import config
    from spinnaker_jupyter.config import ConfigError

    monkeypatch.delenv("SPALLOC_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"spinnaker.spalloc.url: required when spinnaker.mode is 'session'"):
        config.load([write_config(tmp_path, {"spinnaker": {"mode": "session"}})])
    session = {"spinnaker": {"mode": "session", "spalloc": {"url": "https://spalloc.example.org/spalloc/"}}}
    with pytest.raises(
        ConfigError,
        match="spinnaker.spalloc.token: missing. Set the environment variable "
        "SPALLOC_TOKEN or spinnaker.spalloc.token_file",
    ):
        config.load([write_config(tmp_path, session)])
    with pytest.raises(ConfigError, match="spinnaker.spalloc.token: secrets do not belong in the config file"):
        config.load([write_config(tmp_path, {"spinnaker": {"spalloc": {"token": "s3cr3t"}}})])
    monkeypatch.setenv("SPALLOC_TOKEN", "from-the-environment")
    d = config.load([write_config(tmp_path, session)])
    assert d.spalloc_token() == "from-the-environment"
    with pytest.raises(ConfigError, match="keepalive_interval"):
        config.load([write_config(tmp_path, {"spinnaker": {"spalloc": {"keepalive_interval": 10}}})])
    with pytest.raises(ConfigError, match="spinnaker.on_timeout: expected one of 'virtual', 'fail'"):
        config.load([write_config(tmp_path, {"spinnaker": {"on_timeout": "wait"}})])
    with pytest.raises(ConfigError, match="spinnaker.claim_timeout: must be at least 1 s in mode 'session'"):
        config.load([write_config(tmp_path, {"spinnaker": {**session["spinnaker"], "claim_timeout": 0}})])
    # machine mode may refuse at once (claim_timeout 0); per-run needs no hub token.
    monkeypatch.delenv("SPALLOC_TOKEN")
    config.load(
        [write_config(tmp_path, {"spinnaker": {"mode": "machine", "machine_name": "10.0.0.2", "claim_timeout": 0}})]
    )
    config.load(
        [write_config(tmp_path, {"spinnaker": {"mode": "per-run", "spalloc": session["spinnaker"]["spalloc"]}})]
    )


def test_the_example_config_is_valid(monkeypatch):
    from conftest import ROOT
    from spinnaker_jupyter import config

    monkeypatch.setenv("SPALLOC_TOKEN", "from-the-environment")
    monkeypatch.setenv("EBRAINS_CLIENT_SECRET", "from-the-environment")
    d = config.load([ROOT / "config.example.yaml"])
    assert d["spinnaker"]["mode"] in ("virtual", "machine", "session", "per-run")
