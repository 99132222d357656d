"""Checks made before the hub starts, and again by the hub itself: the ports it will use are free, the process
behind a port is the one the hub started, and no file or folder the hub executes or trusts could have been written
by another account. Each refusal is one line: the key or path, what is wrong, and the fix.

The hub sends secrets to its ports (the proxy's auth token to proxy.api_port, users' passwords and tokens to
hub.port, proxy.hub_port and the access-token-service), so a port another program holds is never shared."""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import socket
import stat
import time
from pathlib import Path

from spinnaker_listeners import listeners  # {socket inode: owner uid} on a port (shared with the user servers)

from .config import ConfigError, Deployment

SECRET_FILES = {"proxy_auth_token", "crypt_key", "jupyterhub_cookie_secret", "accounts.json"}


def _account(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


# --------------------------------------------------------------------------------------------------------- ports
def socket_pids(inodes) -> dict[int, int]:
    """{socket inode: pid} for the processes holding these sockets (those this account may look into)."""
    wanted = {f"socket:[{i}]": i for i in inodes}
    owners: dict[int, int] = {}
    if not wanted:
        return owners
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                inode = wanted.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
                if inode is not None:
                    owners.setdefault(inode, int(pid))
        except OSError:
            continue
    return owners


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace") or "?"
    except OSError:
        return "?"


def describe_listeners(port: int) -> str:
    """Who listens on `port`, in words, e.g. 'mallory (uid 1001), pid 4242 python3'."""
    found = listeners(port)
    pids = socket_pids(found)
    parts = []
    for inode, uid in found.items():
        pid = pids.get(inode)
        parts.append(_account(uid) + (f", pid {pid} {Path(_command(pid)).name}" if pid else ""))
    return "; ".join(dict.fromkeys(parts))


def _bind_error(host: str, port: int) -> OSError | None:
    """Binding as the hub will (SO_REUSEADDR, as tornado and node do): fails when anything listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        except OSError as e:
            return e
    return None


def check_ports(ports: list[tuple[str, str, int]]) -> None:
    """Refuse when any (key, host, port) is taken: by a listener on any address, or so that binding fails."""
    for key, host, port in ports:
        who = describe_listeners(port) if listeners(port) else ""
        error = None if who else _bind_error(host, port)
        if who or error:
            because = f"listening: {who}" if who else error.strerror
            raise ConfigError(
                f"{key}: port {port} is already in use ({because}). Stop that program or set "
                f"{key} to a free port; the hub sends secrets to this port, so it never shares it."
            )


def deployment_ports(d: Deployment) -> list[tuple[str, str, int]]:
    """Every port the hub and the processes it starts listen on, with the key that sets it."""
    v = d.values
    hub_ip = (
        "0.0.0.0" if v["spawner"]["type"] == "docker" and v["spawner"]["docker"]["network"] != "host" else "127.0.0.1"
    )  # as hubconfig sets JupyterHub.hub_ip
    ports = [
        ("hub.port", v["hub"]["ip"], v["hub"]["port"]),
        ("proxy.api_port", "127.0.0.1", v["proxy"]["api_port"]),
        ("proxy.hub_port", hub_ip, v["proxy"]["hub_port"]),
    ]
    if v["auth"]["type"] == "ebrains":
        ports.append(("auth.ebrains.token_service_port", "127.0.0.1", v["auth"]["ebrains"]["token_service_port"]))
    if v["hub"]["tls"]["cert_file"] and v["hub"]["tls"]["http_redirect_port"]:  # the proxy's, on every address
        ports.append(("hub.tls.http_redirect_port", "0.0.0.0", v["hub"]["tls"]["http_redirect_port"]))
    return ports


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def check_listener_is(pid: int, port: int, what: str) -> None:
    """Refuse unless every socket listening on `port` belongs to process `pid` (or a child of it): before a secret
    goes to a port, the listener must be the process the hub started, not one that got there first."""
    found = listeners(port)
    owners = socket_pids(found)
    ours = _descendants(pid)
    strangers = [inode for inode in found if owners.get(inode) not in ours]
    if not found or strangers:
        who = describe_listeners(port) or "nothing"
        raise ConfigError(
            f"{what}: port {port} is answered by {who}, not by the process the hub started (pid "
            f"{pid}); no secret is sent there. Stop that program or choose another port."
        )


# ---------------------------------------------------------------------------------------------- files and folders
def trusted(path: Path, what: str, *, private: bool = False, sticky_ok: bool = False) -> None:
    """Refuse `path` if another account could have written it: it must belong to this account (or root, unless
    `private`) and not be writable by group or others. `private` also refuses any access by others (secrets);
    `sticky_ok` accepts a sticky world-writable folder such as /tmp (others cannot replace what is in it)."""
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot check who may write it: {e.strerror}") from None
    me = os.geteuid()
    kind = "folder" if stat.S_ISDIR(st.st_mode) else "file"
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != me and (private or st.st_uid != 0):
        raise ConfigError(
            f"{what} {path} belongs to {_account(st.st_uid)}, another account, which could have "
            f"written it. Check what it holds, then `chown {_account(me).split()[0]} {path}`, or "
            f"remove it{' (a new one is made at start)' if private else ''}."
        )
    writable_by_others = mode & 0o002 or (mode & 0o020 and not _private_group(st))
    if writable_by_others and not (sticky_ok and kind == "folder" and mode & stat.S_ISVTX):
        raise ConfigError(
            f"{what} {path} is writable by other accounts (mode {mode:04o}), which could change what "
            f"the hub runs or trusts. Check what it holds, then `chmod go-w {path}`."
        )
    if private and mode & 0o077:
        raise ConfigError(
            f"{what} {path} is open to other accounts (mode {mode:04o}). `chmod "
            f"{'700' if kind == 'folder' else '600'} {path}`."
        )


def _private_group(st: os.stat_result) -> bool:
    """The file's group is its owner's own (Debian's user private groups, with umask 002): nobody else is in it."""
    try:
        owner = pwd.getpwuid(st.st_uid)
        members = grp.getgrgid(st.st_gid).gr_mem
    except KeyError:
        return False
    return (
        owner.pw_gid == st.st_gid
        and all(m == owner.pw_name for m in members)
        and not any(u.pw_gid == st.st_gid and u.pw_uid != st.st_uid for u in pwd.getpwall())
    )


def config_d(d: Deployment) -> Path:
    return d.base_dir / "jupyterhub_config.d"


def trusted_config(d: Deployment) -> list[Path]:
    """Check the config files, jupyterhub_config.d and its files (they run inside the hub, as root when the hub is
    root); returns the jupyterhub_config.d/*.py files to load, in order."""
    for f in d.files:
        trusted(f.parent, "the folder of config file", sticky_ok=True)
        trusted(f, "config file")
    folder = config_d(d)
    if not folder.exists():
        return []
    trusted(folder.parent, "the folder holding jupyterhub_config.d", sticky_ok=True)
    trusted(folder, "jupyterhub_config.d")
    extras = sorted(folder.glob("*.py"))
    for extra in extras:
        trusted(extra, "jupyterhub_config.d file")
    return extras


def data_dirs(d: Deployment) -> list[tuple[Path, str]]:
    """The folders under data_dir the project keeps, with the key that places them."""
    return [
        (d.homes_dir, "data_dir/homes"),
        (d.logs_dir, "data_dir/logs"),
        (d.data_dir / "etc", "data_dir/etc"),
        (d.data_dir / "share", "data_dir/share"),
        (d.envs_dir, "kernels.envs_dir"),
    ]


def check_data_dir(d: Deployment) -> None:
    """data_dir and what the hub keeps in it: nothing another account could have put there or can change."""
    trusted(d.data_dir, "data_dir", sticky_ok=True)
    if d.hub_dir.exists():
        trusted(d.hub_dir, "data_dir/hub", private=True)
        for entry in sorted(d.hub_dir.iterdir()):
            secret = entry.name in SECRET_FILES or entry.name.endswith(("-token", "_token", "_secret", "_key"))
            trusted(entry, "secret file" if secret else "data_dir/hub file", private=secret)
    for path, what in data_dirs(d):
        if path.exists():
            trusted(path, what)


def check_accounts(d: Deployment) -> None:
    """The local accounts file must be what `spinnaker-jupyter user` writes, or every login fails (HTTP 500)."""
    path = d.accounts_file
    if d["auth"]["type"] != "local" or not path.exists():
        return
    fix = (
        "Restore it from a backup, or move it aside and run `up` again (a new admin account is created and "
        "`spinnaker-jupyter user add` adds the others)"
    )
    try:
        accounts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(
            f"accounts file {path} is not readable JSON ({getattr(e, 'strerror', None) or e}). {fix}"
        ) from None
    if not isinstance(accounts, dict):
        raise ConfigError(f"accounts file {path}: expected an object of accounts, got {type(accounts).__name__}. {fix}")
    for name, entry in accounts.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("hash"), str)
            and isinstance(entry.get("admin", False), bool)
        ):
            raise ConfigError(
                f"accounts file {path}: the entry of {name!r} is not an account (expected "
                f'{{"hash": ..., "admin": true|false}}). {fix}'
            )


# ------------------------------------------------------------------------------------------ after a hub crash
def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)")
    except OSError:
        return ""


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def previous_hub_processes(d: Deployment) -> tuple[int | None, list[int]]:
    """(pid of this deployment's hub if it still runs, pids of what a previous hub of it left behind).

    The hub runs in data_dir/hub (private to the hub's account), and its proxy and services inherit that working
    folder; user servers and kernels run in the users' homes. So a process of this account working in that folder is
    this deployment's: after `kill -9` of the hub, its proxy and services keep running in their own sessions and hold
    the hub's ports."""
    hub_dir = str(d.hub_dir.resolve())
    me = {os.getpid(), os.getppid()}
    hub_pid = None
    try:
        pid = int((d.hub_dir / "jupyterhub.pid").read_text().strip() or 0)
        if pid and _owner(pid) == os.getuid() and _cwd(pid) == hub_dir and "jupyterhub" in _cmdline(pid):
            hub_pid = pid
    except (OSError, ValueError):
        pass
    left = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        pid = int(name)
        if pid in me or pid == hub_pid or _owner(pid) != os.getuid():
            continue
        cwd = _cwd(pid)
        if cwd == hub_dir or cwd.startswith(hub_dir + "/"):
            left.append(pid)
    if hub_pid is not None:  # its own proxy and services are not leftovers while it runs
        ours = _descendants(hub_pid)
        left = [p for p in left if p not in ours]
    return hub_pid, left


def _running(pid: int) -> bool:
    try:  # a zombie has ended; only its parent's wait is missing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def end_previous_hub_leftovers(d: Deployment, say, grace: float = 10.0) -> None:
    """Refuse while this deployment's hub runs; end what a crashed one left (its proxy, services), saying so."""
    hub_pid, left = previous_hub_processes(d)
    if hub_pid is not None:
        raise ConfigError(
            f"the hub of this deployment is already running (pid {hub_pid}, {d.hub_dir}). Stop it "
            "first, or use another data_dir for a second deployment."
        )
    if not left:
        return
    for pid in left:
        say(f"ending pid {pid} left by this deployment's previous hub: {_cmdline(pid)[:120]}")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_running(p) for p in left):
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
