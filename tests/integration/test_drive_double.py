"""The EBRAINS Drive double (tests/doubles/drive_server.py) against the two real clients the service relies on:
the unmodified ebrains-drive 0.7.0 (its ``server`` pointed at the double) and Debian's rclone (Seafile backend,
``rclone mount`` through fuse3), with tokens of the tests' OpenID Connect provider (tests/oidc)."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from doubles.drive_server import DriveDouble
from oidc_fixtures import OIDCProvider, wait_for

RCLONE = shutil.which("rclone")
needs_rclone = pytest.mark.skipif(RCLONE is None, reason="rclone is not installed (scripts/system-deps.sh --test)")


def oidc_access_token(p: OIDCProvider, redirect_uri: str, username: str, password: str) -> str:
    """An access token of ``username`` from the provider (authorization code flow with PKCE, as a browser)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    params = {
        "client_id": p.client_id,
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "scope": "openid profile email team group",
        "state": secrets.token_urlsafe(8),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    with requests.Session() as session:
        result = p.login_with_requests(session, f"{p.authorize_url}?{urlencode(params)}", username, password)
    response = requests.post(
        p.token_url,
        timeout=10,
        data={
            "grant_type": "authorization_code",
            "code": result.json()["code"],
            "redirect_uri": redirect_uri,
            "client_id": p.client_id,
            "client_secret": p.client_secret,
            "code_verifier": verifier,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


@pytest.fixture(scope="module")
def users(oidc_provider):
    redirect_uri = f"{oidc_provider.issuer}/_test/callback"
    oidc_provider.add_redirect_uri(redirect_uri)
    oidc_provider.add_user("dana", "dana-pw", roles={"group": [], "team": ["collab-brainsim-editor"]})
    oidc_provider.add_user("vic", "vic-pw", roles={"group": [], "team": ["collab-brainsim-viewer"]})
    return lambda name: oidc_access_token(oidc_provider, redirect_uri, name, f"{name}-pw")


@pytest.fixture
def drive(oidc_provider):
    with DriveDouble(userinfo_url=oidc_provider.userinfo_url) as d:
        yield d


def exchange(drive: DriveDouble, access_token: str) -> requests.Response:
    return requests.get(
        f"{drive.url}/api2/account/token/", headers={"Authorization": f"Bearer {access_token}"}, timeout=10
    )


def test_token_exchange_accepts_only_the_providers_valid_tokens(drive, users, oidc_provider):
    assert exchange(drive, "not-a-token").status_code == 401
    assert requests.get(f"{drive.url}/api2/account/token/", timeout=10).status_code == 401
    token = users("dana")
    answer = exchange(drive, token)
    assert answer.status_code == 200, answer.text
    seafile = answer.text.strip()
    ping = requests.get(f"{drive.url}/api2/auth/ping/", headers={"Authorization": f"Token {seafile}"}, timeout=10)
    assert ping.status_code == 200 and ping.json() == "pong"
    assert (
        requests.get(
            f"{drive.url}/api2/auth/ping/", headers={"Authorization": f"Token {token}"}, timeout=10
        ).status_code
        == 401
    )  # the OIDC token is not a Drive token
    # a revoked access token (the provider says so at userinfo) is refused
    oidc_provider.revoke("dana", refresh_tokens=False, access_tokens=True)
    assert exchange(drive, token).status_code == 401
    assert requests.get(f"{drive.url}/api2/server-info/", timeout=10).json()["version"].count(".") == 2


def test_ebrains_drive_client_works_against_the_double(drive, users):
    from ebrains_drive.client import DriveApiClient
    from ebrains_drive.exceptions import ClientHttpError

    mine = drive.my_library("dana")
    drive.write(mine, "/notes/hello.txt", b"hello from drive")
    drive.add_library("Brain Sim", collab="brainsim", files={"/data.csv": b"1,2,3\n"})
    client = DriveApiClient(token=users("dana"))
    client.server = drive.url  # ebrains-drive builds its URL from `env`; point it here
    repos = {r.name: r for r in client.repos.list_repos()}
    assert set(repos) == {"My Library", "Brain Sim"}
    assert repos["Brain Sim"].type == "grepo" and repos["My Library"].type == "repo"
    default = client.repos.get_default_repo()
    assert default.id == mine.id
    root = default.get_dir("/")
    assert [e.name for e in root.entries] == ["notes"]
    notes = default.get_dir("/notes")
    assert notes.id != "0" * 40
    f = default.get_file("/notes/hello.txt")
    assert f.size == 16 and f.get_content() == b"hello from drive"
    notes.upload(b"result 42", "result.txt")
    assert drive.read(mine, "/notes/result.txt") == b"result 42"
    out = root.mkdir("out")
    assert drive.listdir(mine, "/") == ["notes", "out"]
    f.moveTo("/out")
    assert drive.listdir(mine, "/out") == ["hello.txt"]
    moved = default.get_file("/out/hello.txt")
    assert moved.rename("renamed.txt")
    assert drive.listdir(mine, "/out") == ["renamed.txt"]
    moved.delete()
    out.delete()
    assert drive.listdir(mine, "/") == ["notes"]
    assert repos["Brain Sim"].get_file("/data.csv").get_content() == b"1,2,3\n"
    # download links are single use
    link = default.get_file("/notes/result.txt").get_download_link()
    assert requests.get(link, timeout=10).content == b"result 42"
    assert requests.get(link, timeout=10).status_code == 404
    # 401 switch: the client exchanges its OIDC token again by itself (its retry), and goes on
    before = drive.exchanges
    assert drive.revoke_tokens("dana") == 1
    assert [e.name for e in default.get_dir("/").entries] == ["notes"]
    assert drive.exchanges == before + 1
    # 502 switch
    drive.down = True
    with pytest.raises(ClientHttpError) as err:
        default.get_dir("/")
    assert err.value.code == 502
    drive.down = False
    assert [e.name for e in default.get_dir("/").entries] == ["notes"]


def test_viewers_read_collab_libraries_but_cannot_write(drive, users):
    from ebrains_drive.client import DriveApiClient
    from ebrains_drive.exceptions import ClientHttpError

    drive.add_library("Brain Sim", collab="brainsim", files={"/data.csv": b"x"})
    client = DriveApiClient(token=users("vic"))
    client.server = drive.url
    (lib,) = client.repos.get_repos_by_name("Brain Sim")
    assert lib.permission == "r" and lib.get_file("/data.csv").get_content() == b"x"
    with pytest.raises(ClientHttpError) as err:
        lib.get_dir("/").upload(b"y", "y.txt")
    assert err.value.code == 403


def rclone_env(drive: DriveDouble, seafile_token: str, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        RCLONE_CONFIG=str(home / "rclone.conf"),
        RCLONE_CONFIG_D_TYPE="seafile",
        RCLONE_CONFIG_D_URL=drive.url,
        RCLONE_CONFIG_D_AUTH_TOKEN=seafile_token,
    )
    return env


def rclone(env: dict, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [RCLONE, "--retries", "1", "--low-level-retries", "1", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, f"rclone {' '.join(args)}: {result.stderr}"
    return result


@needs_rclone
def test_rclone_lists_reads_writes_moves_and_deletes(drive, users, tmp_path):
    mine = drive.my_library("dana")
    drive.write(mine, "/notes/hello.txt", b"hello from drive")
    drive.add_library("Brain Sim", collab="brainsim", files={"/data.csv": b"1,2,3\n"})
    env = rclone_env(drive, exchange(drive, users("dana")).text.strip(), tmp_path)
    assert set(rclone(env, "lsf", "d:").stdout.split("\n")) >= {"My Library/", "Brain Sim/"}
    assert rclone(env, "cat", "d:My Library/notes/hello.txt").stdout == "hello from drive"
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    rclone(env, "copyto", str(big), "d:My Library/up/big.bin")  # upload link + chunked multipart
    assert drive.read(mine, "/up/big.bin") == big.read_bytes()
    assert drive.count("POST", "/seafhttp/upload-api/") == 1
    rclone(env, "mkdir", "d:My Library/empty")
    rclone(env, "moveto", "d:My Library/up/big.bin", "d:My Library/empty/moved.bin")
    assert drive.listdir(mine, "/empty") == ["moved.bin"] and drive.listdir(mine, "/up") == []
    rclone(env, "moveto", "d:My Library/empty/moved.bin", "d:My Library/empty/renamed.bin")
    assert drive.listdir(mine, "/empty") == ["renamed.bin"]
    rclone(env, "purge", "d:My Library/empty")
    rclone(env, "rmdir", "d:My Library/up")
    assert drive.listdir(mine, "/") == ["notes"]
    # the switches: a refused token and a Drive that is down are errors, not empty listings
    drive.down = True
    down = rclone(env, "lsf", "d:My Library", check=False)
    assert down.returncode != 0 and "502" in down.stderr
    drive.down = False
    drive.revoke_tokens()
    refused = rclone(env, "lsf", "d:My Library", check=False)
    assert refused.returncode != 0


@pytest.fixture
def fuse_for_users():
    """Debian's default /dev/fuse mode (0666) for the test, restored after."""
    mode = os.stat("/dev/fuse").st_mode & 0o777
    if os.geteuid() == 0 and mode != 0o666:
        os.chmod("/dev/fuse", 0o666)
    yield
    if os.geteuid() == 0 and mode != 0o666:
        os.chmod("/dev/fuse", mode)


@needs_rclone
@pytest.mark.skipif(shutil.which("fusermount3") is None, reason="fuse3 is not installed")
def test_rclone_mount_reads_and_writes_through_fuse(drive, users, tmp_path, fuse_for_users):
    mine = drive.my_library("dana")
    drive.write(mine, "/hello.txt", b"hello")
    env = rclone_env(drive, exchange(drive, users("dana")).text.strip(), tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [
            RCLONE,
            "mount",
            "d:My Library",
            str(mnt),
            "--vfs-cache-mode",
            "writes",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--dir-cache-time",
            "1s",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "mount.log", "wb"),
    )
    try:
        wait_for(
            lambda: os.path.ismount(mnt),
            20,
            what="the rclone mount",
            on_timeout=lambda: (tmp_path / "mount.log").read_text(),
        )
        assert (mnt / "hello.txt").read_bytes() == b"hello"
        (mnt / "written.txt").write_text("from the mount")
        wait_for(lambda: drive.read(mine, "/written.txt") == b"from the mount", 20, what="the upload")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        proc.terminate()
        proc.wait(10)
