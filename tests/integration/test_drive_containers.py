"""The user's EBRAINS Drive at ~/drive in container servers (spawner.type docker), on real podman: a helper container
per user server mounts it (hub/spinnaker_jupyter/drive_helper.py, images/drive) where the unprivileged notebook
container sees it. Through the real hub with EBRAINS login (tests/oidc) and the Drive double."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import traversable_tmpdir
from doubles.drive_server import DriveDouble
from hubclient import wait_for
from oidc_fixtures import ebrains_auth, hub_with_ebrains
from podman_fixtures import TEST_LABEL
from test_drive import GROUP, LIB, listing, login

pytestmark = pytest.mark.containers

CAP_SYS_ADMIN = 1 << 21


@pytest.fixture(scope="module")
def drive_image(podman_engine) -> str:
    """images/drive on the tests' Debian base: the packages' layer is cached, drive.py is one file on top."""
    return podman_engine.build("drive", "images/drive/Containerfile", {})


@pytest.fixture(scope="module")
def fuse_for_users():
    """Debian's default /dev/fuse mode (0666) for these tests; restored after."""
    mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    yield
    os.chmod("/dev/fuse", mode)


@pytest.fixture(scope="module")
def shared_drive_dir():
    """The hosts here have a private /: the drive folder is made a shared mount, as an operator would at boot."""
    root = traversable_tmpdir("drive-mounts-") / "drive"
    root.mkdir(mode=0o700)
    subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
    subprocess.run(["mount", "--make-shared", str(root)], check=True)
    yield root
    for user in root.iterdir():  # a helper killed outright leaves its mount: the hub detaches it at the next start
        subprocess.run(["umount", "-l", str(user)], capture_output=True)
    subprocess.run(["umount", "-l", str(root)], check=True)


@pytest.fixture(scope="module")
def drive(oidc_provider):
    with DriveDouble(userinfo_url=oidc_provider.userinfo_url) as d:
        yield d


@pytest.fixture(scope="module")
def drive_hub(hub_factory, oidc_provider, drive, podman_engine, drive_image, fuse_for_users, shared_drive_dir):
    return hub_with_ebrains(
        hub_factory,
        oidc_provider,
        {
            "auth": ebrains_auth(oidc_provider, allowed_groups=[GROUP]),
            "drive": {"enabled": True, "url": drive.url, "check_interval": 1, "max_backoff": 2, "timeout": 5},
            "spawner": {
                "type": "docker",
                "docker": {
                    "engine_url": podman_engine.url,
                    "image": podman_engine.images["singleuser"],
                    "pull_policy": "never",
                    "network": "host",
                    "volume_prefix": "spinnaker-jupyter-test-home-",
                    "labels": {TEST_LABEL: "1"},
                    "drive_image": drive_image,
                    "drive_dir": str(shared_drive_dir),
                },
            },
        },
    )


def container(engine, name: str):
    found = [c for c in engine.client().containers.list(all=True) if c.name == name]
    return found[0] if found else None


def run_in(c, command: str) -> str:
    code, out = c.exec_run(["bash", "-c", command], user=c.attrs["Config"]["User"])  # as the server: its user
    return out.decode(errors="replace")


@pytest.fixture(scope="module")
def ada(drive_hub, oidc_provider, drive, podman_engine):
    drive.write(drive.my_library("cada"), "/input.txt", b"spikes 1 2 3\n")
    user = login(drive_hub, oidc_provider, "cada")
    user.start_server()
    yield user
    helper = container(podman_engine, "spinnaker-jupyter-drive-cada")
    if helper is not None:  # shown when a test failed
        print("drive helper log:\n" + helper.logs().decode(errors="replace")[-3000:])
    user.stop_server()


def test_the_drive_is_at_home_in_the_container_and_writes_reach_drive(ada, drive, podman_engine):
    assert wait_for(
        lambda: listing(ada, LIB) == ["input.txt"],
        60,
        "~/drive/My Libraries/My Library/ in the container",
        interval=0.5,
    )
    r = ada.server(
        "PUT", f"api/contents/{LIB}/result.txt", json={"type": "file", "format": "text", "content": "rate 42 Hz\n"}
    )
    assert r.status_code in (200, 201), r.text
    lib = drive.my_library("cada")
    assert wait_for(lambda: drive.read(lib, "/result.txt") == b"rate 42 Hz\n", 30, "the file at Drive")
    notebook = container(podman_engine, "spinnaker-jupyter-cada")
    assert run_in(notebook, "cat ~/drive/'My Libraries/My Library/input.txt'") == "spikes 1 2 3\n"


def test_privileges_stay_with_the_helper_and_the_token_with_rclone(ada, drive, podman_engine):
    wait_for(lambda: listing(ada, LIB), 60, "the mount", interval=0.5)
    notebook = container(podman_engine, "spinnaker-jupyter-cada")
    helper = container(podman_engine, "spinnaker-jupyter-drive-cada")
    assert helper is not None and helper.status == "running"
    # the notebook: no FUSE device, no added capability; the helper: the device and CAP_SYS_ADMIN, nothing more
    assert not notebook.attrs["HostConfig"].get("CapAdd") and not notebook.attrs["HostConfig"].get("Devices")
    assert run_in(notebook, "test -e /dev/fuse && echo FUSE || echo none").strip() == "none"
    caps = {
        line.split(":")[0]: int(line.split()[1], 16)
        for line in run_in(helper, "grep ^Cap /proc/self/status").splitlines()
    }
    assert caps["CapBnd"] == CAP_SYS_ADMIN and caps["CapEff"] == CAP_SYS_ADMIN, caps
    # the keeper in the helper runs nothing of the user's home (a .pth file in ~/.local would run with the capability)
    keeper = run_in(helper, "for p in /proc/[0-9]*; do [ $(cat $p/comm) = python3 ] && tr '\\0' ' ' < $p/cmdline; done")
    assert keeper.split()[1:3] == ["-s", "-E"], keeper
    with drive.lock:
        tokens = [t for t, u in drive.tokens.items() if u == "cada"]
    assert tokens
    # rclone holds it in its environment, not its command line; the notebook's processes and files never see it
    pid = run_in(helper, "for p in /proc/[0-9]*; do [ $(cat $p/comm) = rclone ] && echo ${p#/proc/}; done").split()[0]
    environ = run_in(helper, f"tr '\\0' '\\n' < /proc/{pid}/environ")
    assert any(t in environ for t in tokens), (pid, environ[:200])
    assert not any(t in run_in(helper, f"tr '\\0' ' ' < /proc/{pid}/cmdline") for t in tokens)
    seen = run_in(notebook, "cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n'")
    assert "JUPYTERHUB_API_TOKEN" in seen and not any(t in seen for t in tokens)
    found = run_in(notebook, "grep -rlF -e " + " -e ".join(tokens) + " ~ --exclude-dir=drive 2>/dev/null; true")
    assert found.strip() == "", found


def test_another_users_container_cannot_see_the_drive(ada, drive_hub, oidc_provider, drive, podman_engine):
    wait_for(lambda: listing(ada, LIB), 60, "the mount", interval=0.5)
    ben = login(drive_hub, oidc_provider, "cben")
    ben.start_server()
    try:
        assert wait_for(lambda: listing(ben, LIB) == [], 60, "ben's own, empty library", interval=0.5)
        theirs = container(podman_engine, "spinnaker-jupyter-cben")
        out = run_in(
            theirs,
            "grep -rl 'spikes 1 2 3' /home /tmp /mnt /media /srv /run /var 2>/dev/null; "
            "grep -c fuse /proc/self/mountinfo; grep -c cada /proc/self/mountinfo; ls /home",
        )
        assert out.split() == ["1", "0", "jovyan"], out  # one FUSE mount (his own Drive); nothing of ada's
    finally:
        ben.stop_server()
    assert container(podman_engine, "spinnaker-jupyter-drive-cben") is None  # the helper goes with the server


def test_a_file_written_just_before_the_server_stops_reaches_drive(drive_hub, oidc_provider, drive, podman_engine):
    eve = login(drive_hub, oidc_provider, "ceve")
    eve.start_server()
    try:
        wait_for(lambda: listing(eve, LIB) == [], 60, "the mount", interval=0.5)
        r = eve.server(
            "PUT", f"api/contents/{LIB}/last.txt", json={"type": "file", "format": "text", "content": "the last result"}
        )
        assert r.status_code in (200, 201), r.text
    finally:
        eve.stop_server()  # at once: the helper flushes before it unmounts
    assert drive.read(drive.my_library("ceve"), "/last.txt") == b"the last result"
    folder = str(Path(drive_hub.config["spawner"]["docker"]["drive_dir"]) / "ceve")
    assert folder not in _fuse_mounts()  # nothing left mounted on the host


def _fuse_mounts() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines() if " - fuse" in line]


def test_a_drive_dir_on_a_private_mount_is_refused_with_the_fix():
    """(The spawner then starts the server without the Drive, and ~/drive's placeholder names this reason.)"""
    from spinnaker_jupyter.drive_helper import DriveSetupError, prepare_host_dir

    private = traversable_tmpdir("drive-private-") / "drive"
    with pytest.raises(
        DriveSetupError,
        match=r"spawner\.docker\.drive_dir: .* is not on a shared mount.*"
        r"mount --make-shared",
    ):
        prepare_host_dir(private, "someone", 70999, 70999)
