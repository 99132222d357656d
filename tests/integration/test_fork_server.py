"""spawner.local.fork_server: local servers forked from the hub's fork server (fork_server.py). Two users' servers
start through it, each as its own account with its own environment and token, the sPyNNaker kernel runs, the
server's limits hold, a stop ends every process of the server, a killed fork server means Popen with one warning,
and nothing is left once the hub stops."""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

import processes
from hubclient import wait_for
from test_limits import FORK_LOOP, LIMITS, MEMORY_HOG

ZYGOTE = "spinnaker_jupyter.fork_server"

WHO = """
import json, os
print(json.dumps({"uid": os.getuid(), "server": os.getppid(), "user": os.environ.get("JUPYTERHUB_USER"),
                  "token": os.environ.get("JUPYTERHUB_API_TOKEN"), "home": os.environ.get("HOME")}))
"""


@pytest.fixture(scope="module", params=["cgroup", "rlimits"])
def forked(request, hub_factory):
    """A hub with the fork server on, limits by cgroup or rlimits, and two users' servers started ({"fka": user A,
    "fkb": user B}; each deployment's own account names: both hubs live until the module ends)."""
    local = {"fork_server": True, "limits": request.param}
    hub = hub_factory({"spawner": {**LIMITS, "local": local}, "culler": {"enabled": False}})
    users = {}
    for role in ("fka", "fkb"):
        name = role + request.param[0]
        users[role] = hub.client(name, hub.add_user(name))
        users[role].start_server()
    yield hub, users
    if hub.proc.poll() is None:  # (the last test stops the hub)
        for user in users.values():
            if user.server_model():
                user.stop_server()


def _who(user) -> dict:
    import json

    out = user.execute(user.start_kernel("spynnaker"), WHO)
    return json.loads(out["stdout"])


def _zygotes(hub) -> list[processes.Proc]:
    return [p for p in hub.own_processes() if ZYGOTE in p.cmdline]


def _of_uid(uid: int) -> list[int]:
    return [p.pid for p in processes.table().values() if p.uid == uid and p.alive]


def test_servers_start_through_the_fork_server(forked):
    hub, users = forked
    assert "spawner.local.fork_server: on" in hub.cli("check").stdout
    for name in (user.name for user in users.values()):
        started = re.findall(rf"\[{name}\] Started through the fork server: pid (\d+)", hub.log())
        assert started, hub.log()[-3000:]
        server = processes.read(int(started[-1]))
        assert server is not None and server.alive
        assert processes.SINGLEUSER in server.cmdline, server  # `ps` shows the command Popen would have run
        assert server.uid == pwd.getpwnam(hub.system_account(name)).pw_uid
        assert _zygotes(hub) and server.ppid == _zygotes(hub)[0].pid
    assert "Fork server not used" not in hub.log()


def test_each_server_is_its_own_account_with_its_own_token(forked):
    hub, users = forked
    seen = {role: _who(user) for role, user in users.items()}
    for role, who in seen.items():
        name = users[role].name
        assert who["uid"] == pwd.getpwnam(hub.system_account(name)).pw_uid and who["user"] == name, who
        assert who["home"].endswith(f"/homes/{name}"), who
        me = requests.get(f"{hub.url}/hub/api/user", headers={"Authorization": f"token {who['token']}"}, timeout=10)
        assert me.status_code == 200 and me.json()["name"] == name  # the server's own token, from its own env
    assert seen["fka"]["token"] != seen["fkb"]["token"]
    # One user cannot read the other's server's (or kernel's) environment or memory.
    probe = (
        "import os\nfor pid in ({pids}):\n    for f in ('environ', 'mem'):\n        try:\n"
        "            open(f'/proc/{{pid}}/{{f}}', 'rb').read(1)\n            print('READ', pid, f)\n"
        "        except OSError as e:\n            print('DENIED', pid, f, e.errno)\n"
    )
    a_server = seen["fka"]["server"]
    out = users["fkb"].execute(users["fkb"].start_kernel("spynnaker"), probe.format(pids=f"{a_server},"))
    assert "READ" not in out["stdout"] and out["stdout"].count("DENIED") == 2, out


def test_the_spynnaker_kernel_runs(forked):
    _, users = forked
    user = users["fka"]
    out = user.execute(user.start_kernel("spynnaker"), "import pyNN.spiNNaker as sim\nprint('SIM', sim.__name__)")
    assert out["error"] is None and "SIM pyNN.spiNNaker" in out["stdout"], out


def test_limits_hold(forked):
    hub, users = forked
    user = users["fkb"]
    kernel = user.start_kernel("spynnaker")
    words = user.execute(kernel, FORK_LOOP.replace("{url}", hub.url))["stdout"].split()
    assert words[:1] == ["FORKED"] and int(words[1]) < LIMITS["process_limit"] and words[3] == "11", words
    out = user.execute(kernel, MEMORY_HOG)
    assert "HOG" in out["stdout"] and "False" in out["stdout"] and "HOG 0 " not in out["stdout"], out


def test_stop_ends_every_process_of_the_server(forked):
    hub, users = forked
    user = users["fkb"]
    uid = pwd.getpwnam(hub.system_account(user.name)).pw_uid
    spawn = "import subprocess\np = subprocess.Popen(['sleep', '300'], start_new_session=True)\nprint(p.pid)"
    sleeper = int(user.execute(user.start_kernel("spynnaker"), spawn)["stdout"])
    assert sleeper in _of_uid(uid)
    user.stop_server()
    wait_for(lambda: not _of_uid(uid), 30, "every process of the stopped server to end")
    user.start_server()  # (and it starts again)
    assert re.findall(rf"\[{user.name}\] Started through the fork server", hub.log())[1:]


def test_a_killed_fork_server_means_popen_with_a_warning(forked):
    hub, users = forked
    user = users["fka"]
    user.stop_server()
    for zygote in _zygotes(hub):
        os.kill(zygote.pid, signal.SIGKILL)
    wait_for(lambda: not _zygotes(hub), 30, "the fork server to end")
    user.start_server()
    warnings = [line for line in hub.log().splitlines() if "Fork server not used" in line]
    assert len(warnings) == 1 and f"[{user.name}]" in warnings[0] and "ended" in warnings[0], warnings
    assert user.server("GET", "api/contents").status_code == 200
    assert _who(user)["user"] == user.name
    # A new fork server was started for the next starts (the killed one had started servers).
    wait_for(lambda: _zygotes(hub), 30, "a new fork server")
    user.stop_server()
    user.start_server()
    assert len(re.findall(rf"\[{user.name}\] Started through the fork server", hub.log())) == 2
    assert len([line for line in hub.log().splitlines() if "Fork server not used" in line]) == 1


def test_nothing_is_left_once_the_hub_stops(forked):
    hub, users = forked
    socket = Path(hub.base) / "data" / "hub" / "fork-server" / "socket"
    running = bool(_zygotes(hub))  # (one is started again for later starts at most once a minute)
    hub.proc.terminate()
    hub.proc.wait(60)
    base = str(hub.base)

    def left():
        procs = processes.table().values()
        return [
            p
            for p in procs
            if p.alive and (processes.under(p.cwd, [base]) or ZYGOTE in p.cmdline and base in p.cmdline)
        ]

    wait_for(lambda: not left(), 40, "the hub's servers and fork server to end")
    for user in users.values():
        assert not _of_uid(pwd.getpwnam(hub.system_account(user.name)).pw_uid)
    assert not (running and socket.exists())  # (a killed one's stays until the next one replaces it)


def test_a_restarted_hub_finds_its_forked_server(hub_factory):
    hub = hub_factory({"hub": {"stop_servers_on_exit": False}, "spawner": {"local": {"fork_server": True}}})
    hub_dir = Path(hub.base) / "data" / "hub"
    # It starts with the hub, so the first server start after a (re)start does not wait for its imports.
    wait_for(lambda: (hub_dir / "fork-server" / "socket").exists(), 60, "the fork server to listen before any start")
    assert len(_zygotes(hub)) == 1 and "Started through the fork server" not in hub.log()
    user = hub.client("fkr", hub.add_user("fkr"))
    user.start_server()
    pid = int(re.findall(r"\[fkr\] Started through the fork server: pid (\d+)", hub.log())[-1])
    hub.stop()  # the fork server ends with the hub; the server lives on
    assert processes.read(pid) is not None and processes.read(pid).alive
    # A fork server a crashed hub left (here: one whose pipe this test holds) is ended by `up`'s preflight.
    theirs, ours = os.pipe()
    left = subprocess.Popen(
        [sys.executable, "-m", ZYGOTE, str(hub_dir / "fork-server"), str(theirs)], cwd=hub_dir, pass_fds=[theirs]
    )
    os.close(theirs)
    try:
        wait_for(lambda: (hub_dir / "fork-server" / "socket").exists(), 60, "the leftover fork server to listen")
        hub.start()
        assert (
            left.wait(30) is not None and f"ending pid {left.pid} left by this deployment's previous hub" in hub.log()
        )
    finally:
        os.close(ours)
        left.wait(30)
    wait_for(lambda: [z.pid for z in _zygotes(hub)] not in ([], [left.pid]), 30, "the restarted hub's fork server")
    assert (user.server_model() or {}).get("ready"), user.server_model()
    assert user.server("GET", "api/contents").status_code == 200
    uid = pwd.getpwnam(hub.system_account("fkr")).pw_uid
    user.stop_server()
    wait_for(lambda: not _of_uid(uid), 30, "every process of the stopped server to end")
