"""Idle culling: a server nobody uses is stopped after the configured timeout, and its files stay; a kernel running
code, even silently with the browser closed, keeps its server; idle kernels may be culled, busy ones never."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import websocket
import yaml

from hubclient import wait_for


def test_idle_server_is_stopped_and_files_kept(hub_factory):
    hub = hub_factory({"culler": {"timeout": 60, "every": 10}})
    user = hub.client("sleepy", hub.add_user("sleepy"))
    user.start_server()
    assert user.server(
        "PUT", "api/contents/kept.txt", json={"type": "file", "format": "text", "content": "still here"}
    ).status_code in (200, 201)
    wait_for(lambda: user.server_model() is None, 150, "the idle culler to stop the unused server", interval=2)
    assert "idle-culler" in hub.log() and "Culling server" in hub.log()
    user.start_server()
    assert user.server("GET", "api/contents/kept.txt").json()["content"] == "still here"
    user.stop_server()


# --- a kernel running code is activity (extensions/spinnaker_jupyter_ext/activity.py) ------------------------------


def start_silent_run(user, kernel_id: str, release: Path) -> None:
    """Start a cell that prints nothing and runs until `release` exists, then close the connection, as a user does
    who starts a long run and closes the laptop."""
    release.unlink(missing_ok=True)
    code = f"import os, time\nwhile not os.path.exists({str(release)!r}):\n    time.sleep(0.2)\n"
    ws_url = user.url.replace("http", "ws", 1) + f"/user/{user.name}/api/kernels/{kernel_id}/channels"
    ws = websocket.create_connection(ws_url, header=[f"Authorization: token {user.token}"], timeout=60)
    msg_id = uuid.uuid4().hex
    try:
        ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": user.name,
                        "session": uuid.uuid4().hex,
                        "msg_type": "execute_request",
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "shell",
                    "buffers": [],
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": True,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                }
            )
        )
        while True:  # the kernel says it is busy with this cell
            msg = json.loads(ws.recv())
            if (
                msg.get("parent_header", {}).get("msg_id") == msg_id
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "busy"
            ):
                return
    finally:
        ws.close()


def release_file(hub, name: str) -> Path:
    return Path(hub.config["data_dir"]) / "homes" / name / "release-the-run"


def hub_last_activity(user) -> datetime | None:
    """The server's last activity as the hub (and so its idle culler) sees it; fails at once if the server is gone."""
    model = user.server_model()
    assert model is not None, "the server was culled while its kernel was running code"
    return datetime.fromisoformat(model["last_activity"].replace("Z", "+00:00")) if model["last_activity"] else None


def test_a_silent_long_run_keeps_its_server_and_the_timeout_counts_from_its_end(hub_factory):
    timeout, every = 60, 10
    hub = hub_factory({"culler": {"timeout": timeout, "every": every}})
    user = hub.client("longrun", hub.add_user("longrun"))
    user.start_server()
    kernel = user.start_kernel("spynnaker")
    assert user.execute(kernel, "import pyNN.spiNNaker")["error"] is None  # as a notebook starts
    release = release_file(hub, "longrun")
    start_silent_run(user, kernel, release)
    started = datetime.now(timezone.utc)
    # Under the old code the culler stopped the server about `timeout` s into the run. Now the hub keeps hearing
    # of activity: wait until it has heard of some from well after the culler would have struck.
    beyond = started + timedelta(seconds=timeout + every)
    wait_for(
        lambda: (hub_last_activity(user) or started) > beyond,
        timeout + 3 * every + 30,
        "the hub to hear that the server is active while its kernel runs",
        interval=2,
    )
    assert "Culling server longrun" not in hub.log()
    # The run ends; nobody touches the server. The culler stops it `timeout` s later, not before.
    release.touch()
    ended = time.monotonic()
    wait_for(
        lambda: user.server_model() is None,
        timeout + 3 * every + 30,
        "the idle culler to stop the server after the run ended",
        interval=1,
    )
    idle = time.monotonic() - ended
    assert idle >= timeout - 1, f"culled {idle:.0f} s after the run ended (timeout {timeout} s)"
    assert "Culling server longrun" in hub.log()


def kernel_pids(kernel_id: str) -> list[int]:
    """The kernel's process (its command line names its connection file, kernel-<id>.json)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f"kernel-{kernel_id}".encode() in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def test_idle_kernels_are_culled_busy_ones_never(hub_factory):
    hub = hub_factory({"culler": {"kernels": {"timeout": 10, "every": 2}}})
    user = hub.client("kernels", hub.add_user("kernels"))
    user.start_server()
    busy, dies, idle = (user.start_kernel("spynnaker") for _ in range(3))

    def running() -> dict[str, str]:
        return {k["id"]: k["execution_state"] for k in user.server("GET", "api/kernels").json()}

    for kernel in (busy, dies, idle):
        assert user.execute(kernel, "x = 1")["error"] is None
    # The server follows each kernel's state from its messages: wait until it has seen all three.
    wait_for(lambda: set(running().values()) == {"idle"}, 30, "the server to see the three kernels idle")
    release = release_file(hub, "kernels")
    start_silent_run(user, busy, release)
    start_silent_run(user, dies, release)
    # One run dies (out of memory, say) and jupyter_server restarts its kernel with nobody connected: that kernel is
    # not running code any more, and must not keep its server active for ever (jupyter_server 2.21 resets its state).
    [pid] = kernel_pids(dies)
    os.kill(pid, signal.SIGKILL)
    # The idle and the restarted kernels go; the busy one, idle for longer by the clock but running code, stays.
    wait_for(lambda: not {idle, dies} & set(running()), 90, "kernel culling to shut the idle kernels down", interval=1)
    assert running().get(busy) == "busy"
    release.touch()  # once its run has ended it is idle too, and goes after the timeout
    ended = time.monotonic()
    wait_for(lambda: busy not in running(), 60, "kernel culling to shut the finished kernel down", interval=1)
    assert time.monotonic() - ended >= 10 - 1
    user.stop_server()


def test_culling_settings_reach_every_user_server(tmp_path):
    from traitlets.config import Config

    from spinnaker_jupyter import config, hubconfig

    for spawner in ({"type": "local"}, {"type": "docker", "docker": {"network": "host"}}):
        (tmp_path / "c.yaml").write_text(
            yaml.safe_dump(
                {
                    "data_dir": str(tmp_path / "data"),
                    "spawner": spawner,
                    "culler": {"timeout": 120, "kernels": {"timeout": 600, "every": 30, "connected": True}},
                }
            )
        )
        c = Config()
        hubconfig.apply(c, config.load([tmp_path / "c.yaml"]))
        args = c.Spawner.args
        assert {
            "--MappingKernelManager.cull_idle_timeout=600",
            "--MappingKernelManager.cull_interval=30",
            "--MappingKernelManager.cull_busy=False",
            "--MappingKernelManager.cull_connected=True",
            "--JupyterHubSingleUser.hub_activity_interval=20",
        } <= set(args), (spawner, args)
        assert c.JupyterHub.activity_resolution == 20
