"""Upgrading in place from the previous release to this working tree loses nothing (as the-littlest-jupyterhub and
zero-to-jupyterhub test their upgrades).

The previous release (tests/upgrade/PREVIOUS_RELEASE: its tag and commit) is taken with `git archive` and run with
this tree's pinned environment (.venv, node_modules, the built kernel environment): its packages come first on
PYTHONPATH. It gets accounts, API tokens, home files, a running server with a live kernel, and a SpiNNaker board
lease (session mode, against the spalloc double). Then the operator's upgrade: stop the hub (SIGTERM), start this
tree's hub on the same data folder and config. Everything must still be there and work.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import requests
import yaml
from traitlets.config import Config

import processes
from conftest import BIN, ROOT, traversable_tmpdir
from doubles.spalloc_server import SpallocDouble
from hubclient import HubClient, wait_for

HUB_TOKEN = "hub-spalloc-token"
KEEPALIVE = 120  # the hub's downtime must stay below it; a restart here can take 20-30 s on a loaded machine


def previous_release() -> tuple[str, str]:
    lines = [
        ln.split()
        for ln in (ROOT / "tests" / "upgrade" / "PREVIOUS_RELEASE").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    [(tag, commit)] = lines
    return tag, commit


@pytest.fixture(scope="module")
def release():
    """The previous release's tree, runnable with this tree's pinned dependencies."""
    tag, commit = previous_release()
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    if found.returncode != 0:
        pytest.fail(
            f"the previous release {tag} (commit {commit}, tests/upgrade/PREVIOUS_RELEASE) is not in this "
            "clone: fetch the full history (git fetch --unshallow) to run the upgrade test",
            pytrace=False,
        )
    tree = traversable_tmpdir(f"release-{tag}-")  # user servers, as their own accounts, import its extension
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    (tree / "node_modules").symlink_to(ROOT / "node_modules")  # the pinned configurable-http-proxy
    yield {
        "tag": tag,
        "tree": tree,
        "command": [BIN / "python", "-m", "spinnaker_jupyter.cli"],
        "env": {"PYTHONPATH": f"{tree / 'hub'}{os.pathsep}{tree / 'extensions'}"},
    }
    shutil.rmtree(tree, ignore_errors=True)


@pytest.fixture(scope="module")
def double():
    d = SpallocDouble(
        boards=2, tokens={HUB_TOKEN: "hub"}, admins=["hub"], power_delay=0.2, wait_timeout=5.0, first_ip="10.11.192.1"
    ).start()
    yield d
    d.stop()


def test_stop_servers_on_exit_defaults_keep_container_sessions(tmp_path):
    """Production (containers) keeps sessions through a hub restart by default; the embedded default (local
    processes, the hub's children) stops them with the hub, so that Ctrl-C on `make up` leaves nothing running."""
    from spinnaker_jupyter import config, hubconfig

    for spawner, cleanup in (("docker", False), ("local", True)):
        (tmp_path / "c.yaml").write_text(f"data_dir: {tmp_path / spawner}\nspawner: {{type: {spawner}}}\n")
        c = Config()
        hubconfig.apply(c, config.load([tmp_path / "c.yaml"]))
        assert c.JupyterHub.cleanup_servers is cleanup, spawner
    (tmp_path / "c.yaml").write_text(f"data_dir: {tmp_path / 'kept'}\nhub: {{stop_servers_on_exit: false}}\n")
    c = Config()
    hubconfig.apply(c, config.load([tmp_path / "c.yaml"]))
    assert c.JupyterHub.cleanup_servers is False


def test_upgrade_from_the_previous_release_keeps_everything(release, double, hub_factory, tmp_path):
    token_file = tmp_path / "spalloc-token"
    token_file.write_text(HUB_TOKEN + "\n")
    os.chmod(token_file, 0o600)
    hub = hub_factory(
        {
            "hub": {"stop_servers_on_exit": False},
            "spawner": {"poll_interval": 1},
            "spinnaker": {
                "mode": "session",
                "claim_timeout": 60,
                "on_timeout": "fail",
                "spalloc": {"url": double.url, "token_file": str(token_file), "keepalive_interval": KEEPALIVE},
            },
        },
        start=False,
    )

    # --- the previous release, in use -------------------------------------------------------------------------
    # Its schema predates spawner.local.system_user_prefix (a parallel run's worker prefix): default accounts.
    hub.config.get("spawner", {}).get("local", {}).pop("system_user_prefix", None)
    hub.config_file.write_text(yaml.safe_dump(hub.config))
    hub.command, hub.env = release["command"], {**hub.env, **release["env"]}
    hub.start()
    assert str(release["tree"]) in processes.read(hub.proc.pid).cmdline  # the hub runs the previous release
    passwords = {name: hub.add_user(name) for name in ("upgada", "upgben")}  # names no other test uses
    passwords["admin"] = hub.cli("user", "passwd", "admin").stdout.strip().split()[-1]
    users = {name: hub.client(name, pw) for name, pw in passwords.items()}
    ada, ben, admin = users["upgada"], users["upgben"], users["admin"]
    assert all(u.logged_in and u.token for u in users.values())

    ada.start_server()
    [job] = [j for j in double.jobs() if j["owner"] == ada.name]
    assert job["state"] == "READY"
    put = ada.server("PUT", "api/contents/thesis.txt", json={"type": "file", "format": "text", "content": "ch. 1"})
    assert put.status_code in (200, 201), put.text
    kernel = ada.start_kernel("spynnaker")
    assert ada.execute(kernel, "survivor = 'still here'")["error"] is None
    pid = admin.api("GET", f"/users/{ada.name}").json()["servers"][""]["state"]["pid"]
    ben.start_server()  # ben's home, then his server is stopped: he comes back after the upgrade
    assert ben.server(
        "PUT", "api/contents/notes.txt", json={"type": "file", "format": "text", "content": "ben's"}
    ).status_code in (200, 201)
    ben.stop_server()
    wait_for(
        lambda: [j["state"] for j in double.jobs() if j["owner"] == ben.name] == ["DESTROYED"],
        20,
        "ben's board to be given back",
    )

    # --- the operator's upgrade: check the config with the new release, stop the hub, start the new one on the
    # same data folder and config ------------------------------------------------------------------------------
    old_command, old_env = hub.command, hub.env
    hub.command, hub.env = [BIN / "spinnaker-jupyter"], {k: v for k, v in hub.env.items() if k != "PYTHONPATH"}
    check = hub.cli("check")
    assert check.returncode == 0, f"this release refuses the previous release's config:\n{check.stderr}"
    hub.command, hub.env = old_command, old_env
    hub.stop()  # SIGTERM, as systemctl stop (KillMode=process) or Ctrl-C; servers are kept (stop_servers_on_exit)
    keepalives = double.job(job["id"])["keepalives"]
    hub.command, hub.env = [BIN / "spinnaker-jupyter"], {k: v for k, v in hub.env.items() if k != "PYTHONPATH"}
    hub.start()
    assert f"{ROOT / 'hub' / 'spinnaker_jupyter'}" in processes.read(hub.proc.pid).cmdline

    # Accounts log in, and tokens made by the previous release work.
    for name, pw in passwords.items():
        assert HubClient(hub.url, name, pw).logged_in, f"{name} cannot log in after the upgrade"
    for name, user in users.items():
        r = requests.get(f"{hub.url}/hub/api/user", headers={"Authorization": f"token {user.token}"}, timeout=30)
        assert r.status_code == 200 and r.json()["name"] == name, (name, r.status_code, r.text)
    # Ada's server runs on, the same process, reachable through the new hub, her kernel's state intact.
    assert (ada.server_model() or {}).get("ready"), ada.server_model()
    assert admin.api("GET", f"/users/{ada.name}").json()["servers"][""]["state"]["pid"] == pid
    assert ada.server("GET", "api/status").status_code == 200
    assert ada.execute(kernel, "print(survivor)")["stdout"].strip() == "still here"
    assert ada.server("GET", "api/contents/thesis.txt").json()["content"] == "ch. 1"
    # Her board lease is kept: the same job, kept alive by the new hub, no second one.
    double.wait_for(
        lambda d: d.job(job["id"])["keepalives"] > keepalives,
        timeout=KEEPALIVE / 3 + 20,
        what="the upgraded hub to keep ada's job alive",
    )
    assert [j["id"] for j in double.jobs() if j["owner"] == ada.name] == [job["id"]]
    assert double.job(job["id"])["state"] == "READY"
    state = admin.api("GET", f"/users/{ada.name}").json()["servers"][""]["state"]["spinnaker"]
    assert state["job_id"] == job["id"], state
    # Ben's home is there for his next server, started by the new release.
    ben.start_server()
    assert ben.server("GET", "api/contents/notes.txt").json()["content"] == "ben's"
    # And the new hub gives back a board the previous release claimed.
    ada.stop_server()
    double.wait_for(
        lambda d: d.job(job["id"])["state"] == "DESTROYED",
        timeout=20,
        what="ada's job to be released by the upgraded hub",
    )
    ben.stop_server()
