"""What `spinnaker-jupyter user remove NAME` does beyond the accounts file: the person loses every way in.

Their servers stop, their API tokens and login cookies stop working (the hub user is deleted: tokens go with it, and
a cookie names a user that no longer exists), and their home is either archived where a later account of the same
name cannot see it, or removed (`--purge`). While the hub runs this goes through its REST API with the token of the
`account-manager` service (scopes: only what removal needs; kept 0600 in data_dir/hub); while it is down, straight
in its database, and leftover processes of the account are ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from .config import ConfigError, Deployment, write_secret

SERVICE = "account-manager"
SCOPES = ["read:users:name", "read:servers", "delete:servers", "delete:users"]
ARCHIVE = ".removed"  # inside homes_dir; no account name starts with a dot


def token_path(d: Deployment) -> Path:
    return d.hub_dir / f"{SERVICE}-token"


def hub_service(d: Deployment) -> tuple[dict, dict]:
    """The service and role the hub loads at start-up (its token is generated here, once, 0600)."""
    path = token_path(d)
    if not path.exists():
        write_secret(path, secrets.token_hex(32))  # whole or not at all: a full disk leaves no empty token
    token = path.read_text().strip()
    if len(token) < 32:
        raise ConfigError(f"{path} holds no usable token (empty or short): delete it and start the hub again")
    return (
        {"name": SERVICE, "api_token": token, "display": False},
        {"name": SERVICE, "services": [SERVICE], "scopes": list(SCOPES)},
    )


def _hub_pid(d: Deployment) -> int | None:
    """The pid of this deployment's running hub, from its pid file, if that process is a jupyterhub of ours running
    in this deployment's hub folder (a stale pid file may name someone else's process by now)."""
    try:
        pid = int((d.hub_dir / "jupyterhub.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        owner = Path(f"/proc/{pid}").stat().st_uid
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError):
        return None
    if b"jupyterhub" not in cmdline:
        return None  # a stale pid file
    if owner != os.geteuid() or cwd != os.path.realpath(d.hub_dir):
        raise ConfigError(
            f"{d.hub_dir / 'jupyterhub.pid'} names a running jupyterhub (pid {pid}) that `spinnaker-"
            "jupyter up` did not start for this deployment: stop it, or delete the pid file if it is "
            "another deployment's hub, then run `user remove` again"
        )
    return pid


class HubAPI:
    def __init__(self, d: Deployment, timeout: float = 60):
        self.base = f"http://127.0.0.1:{d['proxy']['hub_port']}{d['hub']['base_url']}hub/api"
        path = token_path(d)
        if not path.exists():
            raise ConfigError(
                f"the hub is running but {path} does not exist (the hub was started by an older "
                "version): restart the hub, then run `user remove` again"
            )
        self.token_file, self.token = path, path.read_text().strip()
        self.timeout = timeout

    def call(self, method: str, path: str) -> tuple[int, dict | None]:
        req = urllib.request.Request(self.base + path, method=method, headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                body = r.read()
                return r.status, json.loads(body) if body else None
        except urllib.error.URLError as e:
            if not isinstance(e, urllib.error.HTTPError):
                raise ConfigError(
                    f"the hub is running but does not answer at {self.base} ({e.reason}): see its log, "
                    "then run `user remove` again"
                ) from None
            if e.code == 403:
                raise ConfigError(
                    f"the running hub refused the token in {self.token_file} (the hub was "
                    "started before it existed): restart the hub, then run `user remove` again"
                ) from None
            return e.code, None

    def wait(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not (result := condition()):
            if time.monotonic() > deadline:
                raise ConfigError(f"timed out after {timeout:.0f} s waiting for {what}; run `user remove` again")
            time.sleep(0.25)
        return result


def _remove_in_hub(d: Deployment, name: str, timeout: float) -> str:
    api = HubAPI(d)
    status, model = api.call("GET", f"/users/{name}")
    if status == 404:
        return "they had no hub user (never logged in)"
    if status != 200:
        raise ConfigError(f"the hub answered {status} when asked about {name}: see its log")
    servers = list((model or {}).get("servers") or {})
    for server in servers:
        path = f"/users/{name}/servers/{server}" if server else f"/users/{name}/server"
        api.call("DELETE", path)

    def stopped():
        code, m = api.call("GET", f"/users/{name}")
        return code == 404 or not (m or {}).get("servers")

    api.wait(stopped, timeout, f"{name}'s servers to stop")
    status, _ = api.call("DELETE", f"/users/{name}")
    if status not in (204, 404):
        raise ConfigError(f"the hub answered {status} when deleting {name}: see its log")
    stopped_what = f"{len(servers)} server(s) stopped, " if servers else ""
    return f"{stopped_what}their tokens and login cookies revoked (hub user deleted)"


def _remove_in_db(d: Deployment, name: str) -> str:
    from .upstream import delete_hub_user  # JupyterHub's database, with the hub down: fenced there

    if d.db_url.startswith("sqlite:///") and not Path(d.db_url[len("sqlite:///") :]).exists():
        return "they had no hub user (the hub has never run)"
    pids = delete_hub_user(d.db_url, name)  # tokens, OAuth codes and spawners go with the user
    if pids is None:
        return "they had no hub user (never logged in)"
    for pid in pids:  # servers left running by a hub stopped with stop_servers_on_exit: false
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    return "their tokens and login cookies revoked (hub user deleted; the hub is not running)"


def _end_processes(d: Deployment, name: str) -> int:
    from .hubconfig import system_users_enabled
    from .spawner import kill_processes_of
    from .usernames import system_account_name

    if d["spawner"]["type"] != "local" or not system_users_enabled(d):
        return 0
    try:
        uid = pwd.getpwnam(system_account_name(d["spawner"]["local"]["system_user_prefix"], name)).pw_uid
    except KeyError:
        return 0
    return kill_processes_of(uid) if uid != 0 else 0


def _retire_system_account(d: Deployment, name: str) -> str | None:
    """The person's system account (and its group) is renamed `retired-<uid>`, locked and given no home, never deleted:
    its uid stays taken, so a later account of the same name is made afresh with another uid, and nothing the old
    one left outside the archived home (files in /tmp, job outputs, anything it owns) becomes the new person's.
    Only this deployment's account for this user is touched (usernames.own_system_account's rule)."""
    import subprocess

    from .usernames import ACCOUNT_COMMENT, system_account_name

    if os.geteuid() != 0:
        return None  # no system accounts of their own (hubconfig.system_users_enabled)
    account = system_account_name(d["spawner"]["local"]["system_user_prefix"], name)
    try:
        pw = pwd.getpwnam(account)
    except KeyError:
        return None
    ours = pw.pw_gecos == ACCOUNT_COMMENT.format(name) and os.path.realpath(pw.pw_dir) == os.path.realpath(
        d.homes_dir / name
    )
    if pw.pw_uid == 0 or not ours:
        return None
    retired = f"retired-{pw.pw_uid}"
    steps = [
        [
            "usermod",
            "--login",
            retired,
            "--home",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--lock",
            "--expiredate",
            "1",
            "--comment",
            f"retired {ACCOUNT_COMMENT.format(name)} ({account}), removed {time.strftime('%Y-%m-%d')}",
            account,
        ]
    ]
    with contextlib.suppress(KeyError):
        import grp

        if grp.getgrnam(account).gr_gid == pw.pw_gid:  # its own group (useradd --user-group)
            steps.append(["groupmod", "--new-name", retired, account])
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(
                f"could not retire the system account {account} ({' '.join(step[:1])}: "
                f"{done.stderr.strip()}); run `user remove {name}` again once that is fixed"
            )
    return (
        f"their system account {account} (uid {pw.pw_uid}) is retired as {retired}: a new account of this name "
        "gets a new uid"
    )


# what a running job's log says when its runner stops it: "The job was cancelled because the account ..."
JOBS_CANCEL_REASON = "because the account was removed by an operator (user remove)"


def _cancel_jobs(d: Deployment, name: str) -> str | None:
    """Their queued batch jobs are removed and running ones stopped (through the job store, hub up or down; the
    job service stops a flagged job within a second, or at its next start if it is down)."""
    from .jobs.runner import JobLog, _stamp
    from .jobs.settings import db_url, jobs_dir
    from .jobs.store import Store

    url = db_url(d)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
        return None  # the job service has never run
    done = Store(url).cancel_all_of(name, JOBS_CANCEL_REASON)
    for job_id in [i for ids in done.values() for i in ids]:
        JobLog.append(
            jobs_dir(d) / "logs" / f"{job_id}.log", f"{_stamp()}: cancelled because the account {name} was removed."
        )
    queued, running = len(done.get("submitted", [])), len(done.get("running", []))
    if not queued and not running:
        return None
    return f"{queued} queued and {running} running batch job(s) cancelled"


def _dispose_home(d: Deployment, name: str, purge: bool) -> str:
    if d["spawner"]["type"] == "docker":
        return f"their home volume is kept: `spinnaker-jupyter volumes remove {name}` deletes it"
    home = d.homes_dir / name
    if not home.exists():
        return "they had no home folder"
    if purge:
        shutil.rmtree(home)
        return f"their home folder {home} is deleted"
    archive = d.homes_dir / ARCHIVE
    archive.mkdir(mode=0o700, exist_ok=True)
    os.chmod(archive, 0o700)  # only the operator: a later account of the same name must not see the old files
    target = archive / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(home, target)
    return f"their home folder is archived as {target} (readable by the operator only; `--purge` deletes instead)"


def earlier_account_leftovers(d: Deployment, name: str) -> str | None:
    """Before `name` is given to a new person: what an earlier account of that name left that the new person would
    get. Its ended batch jobs (outputs, logs) are handed to a name nobody can log in as (`_hand_over_jobs`); returns
    one line why the name cannot be given yet, or None. Local homes need no check: removal archives the home and
    retires the system account; one left by a removal before that did (same name, not an account now) is retired
    here."""
    _retire_system_account(d, name)
    return _hand_over_jobs(d, name) or _earlier_home_volume(d, name)


def _hand_over_jobs(d: Deployment, name: str) -> str | None:
    """The jobs of `name` go to `.removed/<name>/<time>` (no user name starts with a dot; `jobs list` still shows
    them to operators), or, while one is still queued or running (a removal's cancel under way), a line to wait."""
    from sqlalchemy import update

    from .jobs.settings import db_url
    from .jobs.store import ACTIVE, Job, Store

    url = db_url(d)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
        return None  # the job service has never run
    store = Store(url)
    if store.query(name, statuses=ACTIVE):
        return (
            f"batch jobs of an earlier account {name} are still stopping (`spinnaker-jupyter jobs list`): try "
            "again in a minute"
        )
    with store.session() as s, s.begin():
        s.execute(update(Job).where(Job.user_id == name).values(user_id=f".removed/{name}/{time.time():.0f}"))
    return None


def _earlier_home_volume(d: Deployment, name: str) -> str | None:
    """Containers: the home volume of an earlier account of that name (kept at removal) would become the new
    person's home."""
    if d["spawner"]["type"] != "docker":
        return None
    from . import docker as dockermod

    volume = dockermod.home_volume_name(d, name)
    try:
        exists = volume in dockermod.home_volumes(d["spawner"]["docker"])
    except Exception as e:  # noqa: BLE001 - the engine not answering: the name cannot be checked
        return f"cannot check for an earlier home volume of {name} (container engine: {e}); try again when it answers"
    if exists:
        return (
            f"the home volume {volume} of an earlier account {name} exists, and a new {name} would get its files: "
            f"`spinnaker-jupyter volumes remove {name}` deletes it (or choose another name)"
        )
    return None


def remove_account(d: Deployment, store, name: str, purge: bool = False, timeout: float = 120) -> str:
    """Remove `name` everywhere; returns what happened, in words. The account goes first (no new login), then the
    hub user (servers, tokens, cookies), their batch jobs, leftover processes, their system account (retired: its uid
    is never given to anyone again), and the home."""
    from .local_accounts import AccountError

    try:
        store.remove(name)
    except AccountError:
        if not (d.homes_dir / name).exists():
            raise
        # A previous `user remove` got only part way: finish it.
    said = [f"Removed account {name}"]
    said.append(_remove_in_hub(d, name, timeout) if _hub_pid(d) else _remove_in_db(d, name))
    jobs = _cancel_jobs(d, name)
    if jobs:
        said.append(jobs)
    left = _end_processes(d, name)
    if left:
        said.append(f"{left} leftover process(es) ended")
    retired = _retire_system_account(d, name)
    if retired:
        said.append(retired)
    said.append(_dispose_home(d, name, purge))
    return "; ".join(said) + "."
