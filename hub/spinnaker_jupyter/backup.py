"""`spinnaker-jupyter backup DIR` and `restore DIR`: everything of a deployment that is not a user's home folder.

What is saved is a list of parts (PARTS), each a folder under data_dir: the hub's own folder (database, accounts,
secrets), the generated config and kernelspecs, and the job store (data_dir/jobs: its database and keys). SQLite
databases are copied with SQLite's online backup API, so a backup taken while the hub runs is a consistent snapshot;
every other file is read once (the hub replaces its files atomically). Modes are kept (secrets stay 0600) and the
backup folder is 0700. A manifest lists every file with its checksum: a restore checks them all before it writes.

Not saved: homes (data_dir/homes, or the containers' home volumes), logs and job outputs, which operators back up
as user data, and the kernel environments, which `spinnaker-jupyter build` makes again. A database that is not
SQLite (hub.db_url, jobs.db_url) is backed up with its own tools; the manifest says so for the hub's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, Deployment

FORMAT = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Part:
    name: str
    folder: str  # under data_dir
    what: str
    state: bool  # True: a restore never replaces it without --force. False: generated again at each start anyway
    skip: tuple[str, ...] = ()  # sub-folders that are user data (backed up like homes), not the service's state


PARTS = [
    Part("hub", "hub", "hub database, local accounts, secrets", state=True),
    Part("generated-config", "etc", "generated Jupyter server and sPyNNaker config", state=False),
    Part("kernelspecs", "share", "generated kernelspecs", state=False),
    Part("jobs", "jobs", "batch job store and its keys", state=True, skip=("logs", "outputs", "work")),
]
# Runtime files of a running hub, not state: never saved, never restored.
RUNTIME_SUFFIXES = (".pid", ".lock", ".tmp", "-journal", "-wal", "-shm")
SQLITE_HEADER = b"SQLite format 3\x00"


class BackupError(ConfigError):
    """Caught by the CLI like a config error: one line saying what is wrong and what to do."""


def _is_runtime(path: Path) -> bool:
    return path.name.endswith(RUNTIME_SUFFIXES)


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(16) == SQLITE_HEADER


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy_sqlite(src: Path, dst: Path) -> None:
    """A consistent copy of a database another process may be writing (SQLite's online backup API)."""
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


def _files(root: Path, skip: tuple[str, ...] = ()):
    for path in sorted(root.rglob("*")):
        if (
            path.is_file()
            and not path.is_symlink()
            and not _is_runtime(path)
            and path.relative_to(root).parts[0] not in skip
        ):
            yield path


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def backup(d: Deployment, dest: Path) -> dict:
    """Write a backup of `d` into `dest` (a new or empty folder); returns the manifest."""
    dest = Path(dest).resolve()
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"backup: {dest} is not empty; give a new folder (backups are never merged)")
    if dest == d.data_dir or d.data_dir in dest.parents:
        raise BackupError(f"backup: {dest} is inside data_dir ({d.data_dir}); put backups elsewhere")
    _private_dir(dest)
    manifest = {
        "format": FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data_dir": str(d.data_dir),
        "config_files": [],
        "parts": {},
        "files": {},
        "not_included": [],
    }
    for part in PARTS:
        root = d.data_dir / part.folder
        if not root.is_dir():
            continue
        manifest["parts"][part.name] = {"folder": part.folder, "what": part.what}
        for src in _files(root, part.skip):
            rel = src.relative_to(d.data_dir)
            dst = dest / "data" / rel
            _private_dir(dst.parent)
            mode = src.stat().st_mode & 0o777
            if _is_sqlite(src):
                _copy_sqlite(src, dst)
                mode &= 0o600  # a database holds token hashes and server state: the hub's eyes only
            else:
                shutil.copyfile(src, dst)
            os.chmod(dst, mode)
            manifest["files"][str(rel)] = {"sha256": _sha256(dst), "mode": oct(mode)}
    if not d.db_url.startswith("sqlite:"):
        scheme = d.db_url.split(":", 1)[0]
        manifest["not_included"].append(f"the hub database ({scheme}, hub.db_url): back it up with its own tools")
    # The operator's config files, for reference: restore never writes them (they name the data_dir to restore to).
    for i, path in enumerate(d.files):
        dst = dest / "config" / f"{i}-{path.name}"
        _private_dir(dst.parent)
        shutil.copyfile(path, dst)
        os.chmod(dst, 0o600)
        manifest["config_files"].append({"path": str(path), "copy": str(dst.relative_to(dest))})
    fd = os.open(dest / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def running_hub(d: Deployment) -> int | None:
    """The pid of a hub running on this data folder (JupyterHub's pid file, removed at a clean exit)."""
    try:
        pid = int((d.hub_dir / "jupyterhub.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"jupyterhub" in cmdline else None


def read_manifest(src: Path) -> dict:
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"restore: {src} is not a backup (no {MANIFEST}); give the folder `backup` wrote") from None
    except ValueError as e:
        raise BackupError(f"restore: {src / MANIFEST} is damaged ({e}); use another backup") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(
            f"restore: {src} has backup format {manifest.get('format')!r}; this version reads format "
            f"{FORMAT}. Restore it with the release that wrote it, then upgrade"
        )
    for rel, meta in manifest["files"].items():
        path = src / "data" / rel
        if not path.is_file() or _sha256(path) != meta["sha256"]:
            raise BackupError(
                f"restore: {path} is missing or differs from the backup's manifest; nothing was "
                "restored. Use a complete backup"
            )
    return manifest


def restore(d: Deployment, src: Path, force: bool = False) -> dict:
    """Restore a backup into `d`'s data folder; returns {"restored": n, "moved_aside": folder or None}."""
    src = Path(src).resolve()
    manifest = read_manifest(src)
    pid = running_hub(d)
    if pid:
        raise BackupError(f"restore: a hub is running on {d.data_dir} (pid {pid}); stop it first, then restore")
    # A deployment's state already there (a hub folder with a database, accounts or secrets) is never replaced
    # silently; generated files are simply written again.
    state = [
        path
        for part in PARTS
        if part.state and (d.data_dir / part.folder).is_dir()
        for path in sorted((d.data_dir / part.folder).iterdir())
        if not _is_runtime(path) and path.name not in part.skip
    ]
    if state and not force:
        shown = ", ".join(str(p.relative_to(d.data_dir)) for p in state[:5]) + (", ..." if len(state) > 5 else "")
        raise BackupError(
            f"restore: {d.data_dir} already holds a deployment ({shown}); restore onto a fresh "
            "data_dir, or pass --force to replace it (what is replaced is moved aside, not deleted)"
        )
    aside = None
    if state:
        aside = d.data_dir / f"replaced-by-restore-{dt.datetime.now():%Y%m%d-%H%M%S}"
        for path in state:
            target = aside / path.relative_to(d.data_dir)
            _private_dir(target.parent)
            shutil.move(path, target)
        os.chmod(aside, 0o700)
    d.data_dir.mkdir(parents=True, exist_ok=True)
    _private_dir(d.hub_dir)
    for rel, meta in manifest["files"].items():
        dst = d.data_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".restoring")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f, open(src / "data" / rel, "rb") as s:
            shutil.copyfileobj(s, f)
        os.chmod(tmp, int(meta["mode"], 8))
        os.replace(tmp, dst)
    os.chmod(d.hub_dir, 0o700)
    db = d.hub_dir / "jupyterhub.sqlite"
    stopped = servers_recorded_as_stopped(db) if "hub/jupyterhub.sqlite" in manifest["files"] else []
    return {"restored": len(manifest["files"]), "moved_aside": aside, "manifest": manifest, "stopped": stopped}


def servers_recorded_as_stopped(db: Path) -> list[str]:
    """The servers that ran when the backup was taken are not running here: record them as stopped, or the restored
    hub would take a process id, port or SpiNNaker job from the backup for its own and poll, signal or release it.

    JupyterHub's own tables (checked against JupyterHub 6.1.1; test_backup.py fails if they change): a spawner's
    `server_id` names its running server, NULL when stopped; `state` is the spawner's (pid, container, boards)."""
    con = sqlite3.connect(db)
    try:
        with con:
            running = con.execute(
                "SELECT users.name, spawners.name, spawners.server_id FROM spawners JOIN users ON users.id = "
                "spawners.user_id WHERE spawners.server_id IS NOT NULL ORDER BY users.name"
            ).fetchall()
            for _, _, server_id in running:
                con.execute(
                    "UPDATE spawners SET server_id = NULL, state = '{}', started = NULL WHERE server_id = ?",
                    (server_id,),
                )
                con.execute("DELETE FROM servers WHERE id = ?", (server_id,))
            names = [f"{user}/{name or ''}" for user, name, _ in running]
    finally:
        con.close()
    return names


# --- the operator's command (registered in cli.py) --------------------------------------------------------------
def cmd_backup(args) -> int:
    from .cli import _load, say

    d = _load(args)
    manifest = backup(d, Path(args.dir))
    parts = ", ".join(f"{p['what']}" for p in manifest["parts"].values())
    say(f"backed up {len(manifest['files'])} files ({parts}) into {Path(args.dir).resolve()} (mode 0700)")
    say(
        "not included: home folders, logs and job outputs (back them up as user data), kernel environments "
        "(`build` remakes them)" + "".join(f"; {n}" for n in manifest["not_included"])
    )
    return 0


def cmd_restore(args) -> int:
    from .cli import _load, say

    d = _load(args)
    result = restore(d, Path(args.dir), force=args.force)
    say(f"restored {result['restored']} files into {d.data_dir} from the backup of {result['manifest']['created']}")
    if result["moved_aside"]:
        say(f"what was there before is in {result['moved_aside']}")
    if result["stopped"]:
        say(
            f"{len(result['stopped'])} server(s) running when the backup was taken are recorded as stopped "
            f"({', '.join(result['stopped'])}): their users start them again"
        )
    for note in result["manifest"]["not_included"]:
        say(f"not in this backup: {note}")
    return 0


def register(add) -> None:
    """Add `backup` and `restore` to the CLI; `add(name, fn, help)` is cli.parser's helper."""
    b = add("backup", cmd_backup, "save the hub database, accounts, secrets and generated config (not homes)")
    b.add_argument("dir", help="a new or empty folder")
    r = add("restore", cmd_restore, "restore a backup into the config's data_dir (the hub must be stopped)")
    r.add_argument("dir", help="a folder written by `backup`")
    r.add_argument(
        "--force",
        action="store_true",
        help="replace a deployment already in data_dir (its files are moved aside, not deleted)",
    )
