"""Container servers run as each user's own host account (hub/spinnaker_jupyter/docker.py, container_account), not
as the image's uid 1000: on the host uid 1000 is the first login account, which could otherwise read every server's
environment (its JupyterHub API token) and signal it. Through the real hub on podman: two users, two uids, neither
0 nor 1000, each owning their home; uid 1000 on the host kept out; a home volume of an earlier release (uid 1000's)
or of the user's earlier account (a re-created hub container) handed over with its files; another container
deployment's account (same prefix) never taken over; `whoami`, the prompt, HOME and pip --user in a terminal and a
kernel."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import websocket

from hubclient import wait_for
from podman_fixtures import TEST_LABEL

pytestmark = pytest.mark.containers

PREFIX = "spinnaker-jupyter-test-uids-"
IMAGE_UID = 1000  # the image's jovyan; on these hosts the login account `cloudsdk`


def container_config(podman_engine, volume_prefix: str = PREFIX) -> dict:
    return {
        "spawner": {
            "type": "docker",
            "mem_limit": "1G",
            "docker": {
                "engine_url": podman_engine.url,
                "image": podman_engine.images["singleuser"],
                "pull_policy": "never",
                "network": "host",
                "volume_prefix": volume_prefix,
                "labels": {TEST_LABEL: "1"},
            },
        }
    }


@pytest.fixture(scope="module")
def hub(hub_factory, podman_engine):
    h = hub_factory(container_config(podman_engine))
    yield h
    for name in ("uada", "uben", "uold", "uprev", "utwin"):  # this module's users' accounts (their uids stay retired)
        subprocess.run(["userdel", h.system_account(name)], capture_output=True)


@pytest.fixture(scope="module")
def users(hub):
    out = {}
    for name in ("uada", "uben"):
        out[name] = hub.client(name, hub.add_user(name))
        out[name].start_server()
    yield out
    for u in out.values():
        u.stop_server()


def server_container(engine, name: str):
    return engine.client().containers.get(f"spinnaker-jupyter-{name}")


def volume_dir(engine, name: str) -> str:
    return engine.client().volumes.get(PREFIX + name).attrs["Mountpoint"]


def owners(home: str) -> set[tuple[int, int]]:
    """(uid, gid) of the volume's folder and of everything in it, links themselves."""
    found = {(os.lstat(home).st_uid, os.lstat(home).st_gid)}
    for top, dirs, files in os.walk(home):
        for n in dirs + files:
            st = os.lstat(os.path.join(top, n))
            found.add((st.st_uid, st.st_gid))
    return found


def account(hub, name: str) -> pwd.struct_passwd:
    return pwd.getpwnam(hub.system_account(name))


def test_two_users_run_as_two_uids_of_their_own_and_own_their_homes(hub, users, podman_engine):
    seen = {}
    for name, user in users.items():
        pw = account(hub, name)
        assert pw.pw_uid not in (0, IMAGE_UID) and pw.pw_gid not in (0, 100), pw
        c = server_container(podman_engine, name)
        assert c.attrs["Config"]["User"] == f"{pw.pw_uid}:{pw.pw_gid}"
        pid = c.attrs["State"]["Pid"]  # the server's processes, seen from the host
        status = open(f"/proc/{pid}/status").read()
        assert f"Uid:\t{pw.pw_uid}\t{pw.pw_uid}\t{pw.pw_uid}\t{pw.pw_uid}" in status, status
        assert "NoNewPrivs:\t1" in status and "CapEff:\t0000000000000000" in status, status
        r = user.server("PUT", "api/contents/mine.txt", json={"type": "file", "format": "text", "content": name})
        assert r.status_code in (200, 201), r.text
        home = volume_dir(podman_engine, name)
        assert owners(home) == {(pw.pw_uid, pw.pw_gid)}  # the image's home files too (a new volume)
        st = os.lstat(os.path.join(home, "mine.txt"))
        assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid)
        seen[name] = pw.pw_uid
    assert seen["uada"] != seen["uben"]


def _as_uid_1000(argv: list[str]) -> subprocess.CompletedProcess:
    """A process of the host's uid 1000 (the first login account; no account is needed for the uid itself)."""
    return subprocess.run(argv, user=IMAGE_UID, group=IMAGE_UID, extra_groups=[], capture_output=True, text=True)


def test_the_hosts_uid_1000_cannot_read_or_signal_a_server(users, podman_engine):
    assert users["uada"].server_model()["ready"]  # (its environment holds its JupyterHub API token)
    pid = server_container(podman_engine, "uada").attrs["State"]["Pid"]
    read = _as_uid_1000(["cat", f"/proc/{pid}/environ"])
    assert read.returncode != 0 and "Permission denied" in read.stderr and "JUPYTERHUB" not in read.stdout, read
    signal = _as_uid_1000(["kill", "-0", str(pid)])
    assert signal.returncode != 0 and "not permitted" in signal.stderr, signal


def test_whoami_home_and_pip_user_in_a_kernel(hub, users):
    ada, name = users["uada"], hub.system_account("uada")
    kernel = ada.start_kernel("spynnaker")
    out = ada.execute(
        kernel,
        "import os, subprocess, sys, textwrap\n"
        "print('WHOAMI', subprocess.run(['whoami'], capture_output=True, text=True).stdout.strip())\n"
        "print('HOME', os.environ['HOME'], os.path.expanduser('~'))\n"
        "pkg = os.path.expanduser('~/minipkg'); os.makedirs(pkg, exist_ok=True)\n"
        "open(os.path.join(pkg, 'setup.py'), 'w').write(\"from setuptools import setup\\n"
        "setup(name='minipkg', version='1', py_modules=['minipkg'])\\n\")\n"
        "open(os.path.join(pkg, 'minipkg.py'), 'w').write('WHERE = __file__\\n')\n"
        "r = subprocess.run([sys.executable, '-m', 'pip', 'install', '--user', '--no-index', '--no-build-isolation',"
        " pkg], capture_output=True, text=True)\n"
        "print('PIP', r.returncode, r.stderr[-300:])\n"
        "print('IMPORT', subprocess.run([sys.executable, '-c', 'import minipkg; print(minipkg.WHERE)'],"
        " capture_output=True, text=True).stdout.strip())\n"
        "print('GIT', subprocess.run(['git', 'var', 'GIT_COMMITTER_IDENT'], capture_output=True, text=True,"
        " env={**os.environ, 'GIT_COMMITTER_EMAIL': 'a@b'}).stdout)",
        timeout=240,
    )
    assert out["error"] is None, out
    stdout = out["stdout"]
    assert f"WHOAMI {name}" in stdout and "HOME /home/jovyan /home/jovyan" in stdout, stdout
    assert "PIP 0" in stdout and "IMPORT /home/jovyan/.local/lib/python" in stdout, stdout
    assert f"GIT {name} <a@b>" in stdout, stdout  # git's name for the user, from the passwd entry


def test_the_terminal_prompt_names_the_user(hub, users):
    ada, name = users["uada"], hub.system_account("uada")
    r = ada.server("POST", "api/terminals")
    assert r.status_code == 200, r.text
    url = ada.url.replace("http", "ws", 1) + f"/user/{ada.name}/terminals/websocket/{r.json()['name']}"
    ws = websocket.create_connection(url, header=[f"Authorization: token {ada.token}"], timeout=30)
    try:
        ws.send(json.dumps(["stdin", "echo ME=$(whoami) AT=$HOME\r"]))
        seen, deadline = "", time.monotonic() + 30
        while f"ME={name} AT=/home/jovyan" not in seen and time.monotonic() < deadline:
            kind, *data = json.loads(ws.recv())
            if kind == "stdout":
                seen += data[0]
    finally:
        ws.close()
    assert f"ME={name} AT=/home/jovyan" in seen, seen
    assert f"{name}@" in seen and "I have no name" not in seen, seen  # bash's prompt: \u@\h


def test_an_old_home_volume_of_uid_1000_is_handed_over_with_its_files(hub, podman_engine):
    """A home volume an earlier release made (its files uid 1000's, a private folder, a link) is the user's after
    their next start, with every file; the second start has nothing left to hand over."""
    old = hub.client("uold", hub.add_user("uold"))  # (before the volume: `user add` refuses a name with one)
    client = podman_engine.client()
    volume = PREFIX + "uold"
    client.containers.run(
        podman_engine.images["singleuser"],
        [
            "sh",
            "-c",
            "mkdir -p ~/private/deep && echo 'old results' > ~/private/deep/notes.txt && chmod 700 ~/private "
            "&& ln -s /etc/hostname ~/link && ls -ln ~ >&2",
        ],
        user="1000:100",
        volumes={volume: {"bind": "/home/jovyan", "mode": "rw"}},
        labels={TEST_LABEL: "1"},
        network_mode="none",
        remove=True,
    )
    home = volume_dir(podman_engine, "uold")
    assert os.stat(os.path.join(home, "private")).st_uid == IMAGE_UID
    old.start_server()
    try:
        pw = account(hub, "uold")
        got = old.server("GET", "api/contents/private/deep/notes.txt").json()
        assert got.get("content") == "old results\n", got
        r = old.server("PUT", "api/contents/private/new.txt", json={"type": "file", "format": "text", "content": "x"})
        assert r.status_code in (200, 201), r.text
        assert owners(home) == {(pw.pw_uid, pw.pw_gid)}  # the link too (itself, never what it points at)
        assert os.readlink(os.path.join(home, "link")) == "/etc/hostname"
        old.stop_server()
        old.start_server()
        log = hub.log()
        assert log.count(f"Home volume {volume} of uold handed over") == 1, log[-3000:]
    finally:
        old.stop_server()
    wait_for(lambda: old.server_model() is None, 30, "uold's server to stop")


def test_a_home_volume_of_the_users_earlier_account_is_handed_over_with_its_files(hub, podman_engine):
    """A hub container re-created without its /etc/passwd makes the accounts again, with new uids (the high-water
    mark in data_dir): the user's home volume, still the earlier uid's, becomes the new account's at the next start,
    every file kept, said once in the log."""
    prev = hub.client("uprev", hub.add_user("uprev"))
    volume, account_name = PREFIX + "uprev", hub.system_account("uprev")
    prev.start_server()
    r = prev.server("PUT", "api/contents/notes.txt", json={"type": "file", "format": "text", "content": "mine"})
    assert r.status_code in (200, 201), r.text
    assert prev.server("PUT", "api/contents/private", json={"type": "directory"}).status_code in (200, 201)
    home = volume_dir(podman_engine, "uprev")
    os.chmod(os.path.join(home, "private"), 0o700)
    os.symlink("/etc/hostname", os.path.join(home, "link"))  # (as the user would: a link the hand-over leaves be)
    old = account(hub, "uprev")
    os.lchown(os.path.join(home, "link"), old.pw_uid, old.pw_gid)
    prev.stop_server()
    # The hub's container re-created without its /etc/passwd: the account is gone, made again at the next start.
    for step in (["userdel", account_name], ["groupdel", account_name]):
        subprocess.run(step, capture_output=True)
    with pytest.raises(KeyError):
        pwd.getpwnam(account_name)
    try:
        prev.start_server()
        new = account(hub, "uprev")
        assert new.pw_uid > old.pw_uid and new.pw_uid not in (0, IMAGE_UID), (old, new)
        assert prev.server("GET", "api/contents/notes.txt").json().get("content") == "mine"
        r = prev.server("PUT", "api/contents/private/new.txt", json={"type": "file", "format": "text", "content": "x"})
        assert r.status_code in (200, 201), r.text
        assert owners(home) == {(new.pw_uid, new.pw_gid)}  # the link too (itself, never what it points at)
        assert os.readlink(os.path.join(home, "link")) == "/etc/hostname"
        prev.stop_server()
        prev.start_server()
        said = (
            f"Home volume {volume} of uprev handed over to {account_name} (uid {new.pw_uid}); it was uid {old.pw_uid}"
        )
        assert hub.log().count(said) == 1, hub.log()[-3000:]
    finally:
        prev.stop_server()


def test_an_account_of_another_container_deployment_is_not_taken_over(hub, hub_factory, podman_engine):
    """Two container deployments on one host with one system_user_prefix: neither home ever exists on the host (the
    homes are volumes), yet the second never takes over the first's account while the first is there; once the first
    is gone (its data deleted), it does."""
    other = hub_factory(container_config(podman_engine, PREFIX + "other-"))
    theirs = other.client("utwin", other.add_user("utwin"))
    theirs.start_server()
    theirs.stop_server()  # (nothing runs as the account now)
    before, their_home = account(hub, "utwin"), Path(other.config["data_dir"]) / "homes" / "utwin"
    assert before.pw_dir == str(their_home) and not their_home.exists()
    ours = hub.client("utwin", hub.add_user("utwin"))
    page = ours.session.get(f"{hub.url}/hub/spawn/utwin", timeout=120)  # as the browser starts it
    assert "another deployment" in page.text and "spawner.local.system_user_prefix" in page.text, page.text[-2000:]
    assert account(hub, "utwin") == before  # neither moved nor changed
    theirs.start_server()  # the first deployment's user still runs as their own account
    assert theirs.server("GET", "api/contents").status_code == 200
    theirs.stop_server()
    other.stop()
    shutil.rmtree(Path(other.config["data_dir"]) / "homes")
    wait_for(lambda: ours.server_model() is None, 60, "the refused start to end")
    ours.start_server()
    try:
        assert ours.server("GET", "api/contents").status_code == 200
        taken = account(hub, "utwin")  # the same account, now this deployment's
        assert taken.pw_uid == before.pw_uid and taken.pw_dir == str(Path(hub.config["data_dir"]) / "homes" / "utwin")
        assert f"Took over the system account {taken.pw_name} left by a removed deployment" in hub.log_path.read_text()
    finally:
        ours.stop_server()


def test_the_nrp_layer_serves_as_a_users_uid(podman_engine, podman_nrp_layer_image):
    """images/nrp on the single-user image (a stand-in NRP, test_images.py's) as the hub runs it: a uid the image does
    not know, its group, no capability, no-new-privileges."""
    from test_images import NRP_LAYER_SCRIPT, run

    port, backend = podman_engine.free_port(), podman_engine.free_port()
    out = run(
        podman_engine.client(),
        podman_nrp_layer_image,
        ["bash", "-c", NRP_LAYER_SCRIPT],
        user="70999:70999",
        group_add=["100"],
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        environment={
            "SPINNAKER_NRP_PORT": str(port),
            "NRP_BACKEND_URL": f"http://127.0.0.1:{backend}",
            "BACKEND_PORT": str(backend),
        },
    )
    assert "GOT / NRP-STAND-IN" in out and "GOT /api/index.html NRP-BACKEND" in out and "CLOSED" in out, out
