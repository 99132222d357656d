"""The user's EBRAINS Drive at ~/drive, through the real hub with EBRAINS login (tests/oidc) and the Drive double
(tests/doubles/drive_server.py): what a user sees in the file browser and in a kernel, what another user cannot
reach, and recovery from a refused token and from a Drive that is down."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import requests

from doubles.drive_server import DriveDouble
from hubclient import HubClient, wait_for
from oidc_fixtures import ebrains_auth, hub_with_ebrains

pytestmark = pytest.mark.skipif(
    not (shutil.which("rclone") and shutil.which("fusermount3")),
    reason="rclone and fuse3 are needed (scripts/system-deps.sh --test)",
)

GROUP = "spinnaker-users"
LIB = "drive/My Libraries/My Library"


@pytest.fixture(scope="module")
def fuse_for_users():
    """Debian's default /dev/fuse mode (0666: FUSE for unprivileged users) for these tests; restored after."""
    mode = os.stat("/dev/fuse").st_mode & 0o777
    if mode != 0o666:
        if os.geteuid() != 0:
            pytest.skip("/dev/fuse is not usable by users here and these tests are not root")
        os.chmod("/dev/fuse", 0o666)
    yield
    if mode != 0o666:
        os.chmod("/dev/fuse", mode)


@pytest.fixture(scope="module")
def drive(oidc_provider):
    with DriveDouble(userinfo_url=oidc_provider.userinfo_url) as d:
        yield d


def drive_deployment(oidc_provider, drive_url: str, **ebrains) -> dict:
    """A deployment with EBRAINS login at the tests' provider and the Drive at `drive_url` (quick checks and
    back-off); `ebrains` overrides the auth section's keys."""
    return {
        "auth": ebrains_auth(
            oidc_provider, **{"allowed_groups": [GROUP], "refresh_margin": 3, "auth_refresh_age": 1, **ebrains}
        ),
        "drive": {"enabled": True, "url": drive_url, "check_interval": 1, "max_backoff": 2, "timeout": 5},
    }


@pytest.fixture(scope="module")
def drive_hub(hub_factory, oidc_provider, drive, fuse_for_users):
    return hub_with_ebrains(
        hub_factory,
        oidc_provider,
        drive_deployment(oidc_provider, drive.url),
    )


def login(hub, provider, username: str, teams=()) -> HubClient:
    provider.add_user(username, f"pw-{username}-1", roles={"group": [GROUP], "team": list(teams)})
    session = requests.Session()
    final = provider.login_with_requests(
        session, f"{hub.url}/hub/oauth_login?next=/hub/home", username, f"pw-{username}-1"
    )
    assert final.status_code == 200, (final.status_code, final.url)
    return HubClient(hub.url, None, session=session)


def home(hub, user: HubClient) -> Path:
    return Path(hub.config["data_dir"]) / "homes" / user.name


def listing(user: HubClient, path: str) -> list[str] | None:
    """What the file browser shows at ``path`` (the Jupyter contents API), or None."""
    r = user.server("GET", f"api/contents/{path}")
    return sorted(e["name"] for e in r.json()["content"]) if r.status_code == 200 else None


def state(hub, user: HubClient) -> dict:
    try:
        return json.loads((home(hub, user) / ".cache" / "spinnaker-drive" / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def run(user: HubClient, kernel: str, code: str) -> str:
    out = user.execute(kernel, textwrap.dedent(code))
    assert not out.get("error"), out
    return out["stdout"]


@pytest.fixture(scope="module")
def alice(drive_hub, oidc_provider, drive):
    lib = drive.my_library("drivealice")
    drive.write(lib, "/input.txt", b"spikes 1 2 3\n")
    drive.add_library("Brain Sim", collab="brainsim", files={"/shared.txt": b"from the collab"})
    user = login(drive_hub, oidc_provider, "drivealice", teams=["collab-brainsim-editor"])
    user.start_server()
    yield user
    user.stop_server()


def test_my_library_is_listed_in_the_file_browser(drive_hub, alice, drive):
    assert wait_for(lambda: listing(alice, LIB) == ["input.txt"], 60, "~/drive/My Libraries/My Library/", interval=0.5)
    assert listing(alice, "drive") == ["My Libraries", "Shared with groups"]
    assert listing(alice, "drive/Shared with groups/Brain Sim") == ["shared.txt"]
    assert state(drive_hub, alice)["state"] == "mounted"


def test_a_notebook_reads_and_writes_drive_files_with_open(drive_hub, alice, drive):
    wait_for(lambda: listing(alice, LIB), 60, "the mount", interval=0.5)
    kernel = alice.start_kernel("spynnaker")
    out = run(
        alice,
        kernel,
        """
        import os
        base = os.path.expanduser("~/drive/My Libraries/My Library")
        print(open(os.path.join(base, "input.txt")).read().strip())
        with open(os.path.join(base, "result.txt"), "w") as f:
            f.write("rate 42 Hz\\n")
    """,
    )
    assert out.strip() == "spikes 1 2 3"
    lib = drive.my_library("drivealice")
    assert wait_for(lambda: drive.read(lib, "/result.txt") == b"rate 42 Hz\n", 30, "the result at Drive")


def test_another_user_cannot_enter_the_mount(drive_hub, alice, oidc_provider, drive):
    wait_for(lambda: listing(alice, LIB), 60, "the mount", interval=0.5)
    bob = login(drive_hub, oidc_provider, "drivebob")
    bob.start_server()
    try:
        kernel = bob.start_kernel("spynnaker")
        target = home(drive_hub, alice) / "drive" / "My Libraries"
        out = run(
            bob,
            kernel,
            f"""
            try:
                print("LISTED", __import__("os").listdir({str(target)!r}))
            except OSError as e:
                print("REFUSED", type(e).__name__)
        """,
        )
        assert out.strip() == "REFUSED PermissionError", out
    finally:
        bob.stop_server()


def test_a_second_server_of_the_user_leaves_the_mount_alone(drive_hub, alice, drive):
    wait_for(lambda: listing(alice, LIB), 60, "the mount", interval=0.5)
    before = dict(state(drive_hub, alice))
    alice.start_server("second")
    try:
        r = alice.server("GET", f"api/contents/{LIB}", server="second")
        assert r.status_code == 200 and "input.txt" in [e["name"] for e in r.json()["content"]]
    finally:
        alice.stop_server("second")
    assert "input.txt" in (listing(alice, LIB) or [])  # the second server's stop did not unmount it
    assert state(drive_hub, alice).get("remounts") == before.get("remounts")
    assert state(drive_hub, alice).get("since") == before.get("since")


def test_a_refused_token_is_exchanged_again_and_remounted(drive_hub, alice, drive, oidc_provider):
    wait_for(lambda: listing(alice, LIB), 60, "the mount", interval=0.5)
    first = [t for u, t in drive.exchanged if u == "drivealice"][-1]
    # past the lifetime of the EBRAINS token the mount was made with: the mount goes on working
    wait_for(
        lambda: not oidc_provider.token_is_valid(first),
        3 * oidc_provider.access_token_ttl,
        "the first access token to expire",
        interval=0.5,
    )
    assert "input.txt" in (listing(alice, LIB) or [])
    before = state(drive_hub, alice).get("remounts", 0)
    assert drive.revoke_tokens("drivealice") >= 1  # Drive now answers 401 to the mount's token
    wait_for(
        lambda: (
            state(drive_hub, alice).get("remounts", 0) > before and state(drive_hub, alice).get("state") == "mounted"
        ),
        30,
        "the remount",
    )
    again = [t for u, t in drive.exchanged if u == "drivealice"][-1]
    assert again != first  # exchanged with the user's refreshed token, from the access-token-service
    assert wait_for(lambda: "input.txt" in (listing(alice, LIB) or []), 30, "the listing after the remount")


def test_drive_down_while_mounted_is_said_then_recovers(drive_hub, alice, drive):
    wait_for(lambda: listing(alice, LIB), 60, "the mount", interval=0.5)
    drive.down = True
    try:
        wait_for(lambda: state(drive_hub, alice).get("state") == "unavailable", 30, "the state to say Drive is down")
        assert "HTTP 502" in state(drive_hub, alice)["reason"]
    finally:
        drive.down = False
    wait_for(lambda: state(drive_hub, alice).get("state") == "mounted", 30, "the state to say mounted again")
    assert wait_for(lambda: "input.txt" in (listing(alice, LIB) or []), 30, "the listing once Drive is back")


def test_a_file_written_just_before_the_server_stops_reaches_drive(drive_hub, oidc_provider, drive):
    erin = login(drive_hub, oidc_provider, "driveerin")
    erin.start_server()
    try:
        wait_for(lambda: listing(erin, "drive/My Libraries/My Library") == [], 60, "the mount", interval=0.5)
        kernel = erin.start_kernel("spynnaker")
        run(
            erin,
            kernel,
            """
            import os
            with open(os.path.expanduser("~/drive/My Libraries/My Library/last.txt"), "w") as f:
                f.write("the last result")
        """,
        )
    finally:
        erin.stop_server()  # at once: rclone itself would upload only a few seconds later
    assert drive.read(drive.my_library("driveerin"), "/last.txt") == b"the last result"


def test_drive_down_at_start_shows_why_then_recovers(drive_hub, oidc_provider, drive):
    drive.down = True
    try:
        carol = login(drive_hub, oidc_provider, "drivecarol")
        carol.start_server()
        placeholder = home(drive_hub, carol) / "drive" / "EBRAINS-DRIVE-NOT-AVAILABLE.txt"
        wait_for(placeholder.exists, 30, "the placeholder in ~/drive")
        assert "HTTP 502" in placeholder.read_text() or "not answering" in placeholder.read_text()
        assert listing(carol, "drive") == ["EBRAINS-DRIVE-NOT-AVAILABLE.txt"]  # the file browser shows it
        kernel = carol.start_kernel("spynnaker")
        status = run(
            carol,
            kernel,
            """
            import subprocess
            print(subprocess.run(["spinnaker-status", "--no-live"], capture_output=True, text=True).stdout)
        """,
        )
        assert "EBRAINS Drive NOT AVAILABLE" in status, status
    finally:
        drive.down = False
    try:
        assert wait_for(
            lambda: listing(carol, "drive") == ["My Libraries", "Shared with groups"],
            30,
            "the mount once Drive is back",
            interval=0.5,
        )
        assert listing(carol, "drive/My Libraries") == ["My Library"]
        status = run(
            carol,
            kernel,
            """
            import subprocess
            print(subprocess.run(["spinnaker-status", "--no-live"], capture_output=True, text=True).stdout)
        """,
        )
        assert "EBRAINS Drive mounted at" in status, status
    finally:
        carol.stop_server()


def _rclone_processes(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid and b"rclone\0mount" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_the_drive_token_is_only_in_rclones_environment(drive_hub, alice, drive):
    wait_for(lambda: listing(alice, LIB), 60, "the mount", interval=0.5)
    uid = home(drive_hub, alice).stat().st_uid
    (pid,) = wait_for(lambda: _rclone_processes(uid), 10, "alice's rclone")
    with drive.lock:
        tokens = [t for t, u in drive.tokens.items() if u == "drivealice"]
    assert tokens
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert any(t.encode() in environ for t in tokens)  # handed over here, and only here
    assert not any(t.encode() in cmdline for t in tokens)
    assert b"--rc" not in cmdline and b"allow-other" not in cmdline and b"allow_other" not in cmdline
    assert os.stat(f"/proc/{pid}/environ").st_uid == uid  # the kernel lets only that account (and root) read it
    private = home(drive_hub, alice) / ".cache" / "spinnaker-drive"
    assert private.stat().st_mode & 0o777 == 0o700
    for path in private.rglob("*"):
        if path.is_file():
            assert not any(t.encode() in path.read_bytes() for t in tokens), path


def test_layout_and_rclone_environment_units(tmp_path):
    from spinnaker_jupyter_ext.drive import rclone_environment

    env = rclone_environment(
        "http://d",
        "TOKEN",
        [
            {"name": "My Library", "type": "repo"},
            {"name": "Brain Sim", "type": "grepo"},
            {"name": 'bad"name', "type": "grepo"},
            {"name": "Brain Sim", "type": "grepo"},
        ],
        tmp_path,
    )
    assert env["RCLONE_CONFIG_EBRAINSDRIVE_AUTH_TOKEN"] == "TOKEN"
    assert env["RCLONE_CONFIG_DRIVEROOT_UPSTREAMS"] == '"My Libraries=mylibraries:" "Shared with groups=sharedgroups:"'
    assert env["RCLONE_CONFIG_MYLIBRARIES_UPSTREAMS"] == '"My Library=ebrainsdrive:My Library"'
    assert env["RCLONE_CONFIG_SHAREDGROUPS_UPSTREAMS"] == '"Brain Sim=ebrainsdrive:Brain Sim"'
    alone = rclone_environment("http://d", "T", [{"name": "My Library", "type": "repo"}], tmp_path)
    assert alone["RCLONE_CONFIG_SHAREDGROUPS_TYPE"] == "alias"  # an empty folder, not an error
    assert "TOKEN" not in json.dumps({k: v for k, v in env.items() if "AUTH_TOKEN" not in k})


def test_drive_needs_ebrains_login(tmp_path):
    from spinnaker_jupyter import config, hubconfig

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "drive": {"enabled": True}}))
    with pytest.raises(config.ConfigError, match=r"drive\.enabled: .*auth\.type: ebrains"):
        hubconfig.user_server_env(config.load([path]))
    path.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "drive": {"enabled": True, "bogus": 1}}))
    with pytest.raises(config.ConfigError, match="drive"):
        config.load([path])
