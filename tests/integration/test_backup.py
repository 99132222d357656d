"""Backups (`spinnaker-jupyter backup DIR` / `restore DIR`): taken while the hub runs, restored onto a fresh data
folder, after which an existing account logs in and an existing API token works. A restore never lands on a
running hub, nor replaces a deployment without --force; secrets stay private throughout."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import requests

import processes


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_backup_of_a_running_hub_restores_onto_a_fresh_data_folder(hub_factory, tmp_path):
    hub = hub_factory({"culler": {"enabled": False}})
    password = hub.add_user("rosa")
    rosa = hub.client("rosa", password)
    assert rosa.logged_in and rosa.token
    rosa.start_server()  # a running server: its process id and port are this machine's, not the restored hub's
    assert rosa.server(
        "PUT",
        "api/contents/notes.txt",
        json={"type": "file", "format": "text", "content": "user data: not in a backup"},
    ).ok
    [server] = [p for p in hub.own_processes() if processes.SINGLEUSER in p.cmdline]
    db = sqlite3.connect(Path(hub.base) / "data" / "hub" / "jupyterhub.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # (hub_db.py: what is backed up is a WAL file)
    db.close()

    backup_dir = tmp_path / "backup"
    r = hub.cli("backup", str(backup_dir))  # the hub is running
    assert r.returncode == 0, r.stderr
    assert "backed up" in r.stdout and "not included: home folders" in r.stdout, r.stdout
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    files = set(manifest["files"])
    assert {
        "hub/jupyterhub.sqlite",
        "hub/accounts.json",
        "hub/jupyterhub_cookie_secret",
        "hub/proxy_auth_token",
    } <= files, files
    assert not any(f.startswith(("homes/", "logs/", "envs/")) or f.endswith(".pid") for f in files), files
    assert mode(backup_dir) == 0o700
    for secret in ("accounts.json", "jupyterhub_cookie_secret", "proxy_auth_token", "jupyterhub.sqlite"):
        assert mode(backup_dir / "data" / "hub" / secret) == 0o600, secret

    # A second machine: a fresh data folder, the same deployment config otherwise.
    fresh = hub_factory({"culler": {"enabled": False}}, start=False)
    r = fresh.cli("restore", str(backup_dir))
    assert r.returncode == 0, r.stderr
    assert f"restored {len(files)} files" in r.stdout, r.stdout
    assert "1 server(s) running when the backup was taken are recorded as stopped (rosa/)" in r.stdout, r.stdout
    for secret in ("accounts.json", "jupyterhub_cookie_secret", "proxy_auth_token"):
        assert mode(fresh.base / "data" / "hub" / secret) == 0o600, secret
    assert mode(fresh.base / "data" / "hub") == 0o700
    assert not (fresh.base / "data" / "homes" / "rosa" / "notes.txt").exists()
    fresh.start()
    again = fresh.client("rosa", password)
    assert again.logged_in, "an account of the backed-up hub logs in on the restored one"
    r = requests.get(f"{fresh.url}/hub/api/user", headers={"Authorization": f"token {rosa.token}"}, timeout=30)
    assert r.status_code == 200 and r.json()["name"] == "rosa", (r.status_code, r.text)
    # The restored hub does not take the first machine's server for its own; that one runs on, untouched.
    assert r.json()["servers"] == {}, r.json()["servers"]
    assert processes.alive([server.key]) and rosa.server("GET", "api/status").status_code == 200

    # Never over a running hub, even with --force; nothing there changes.
    db = fresh.base / "data" / "hub" / "jupyterhub.sqlite"
    before = db.read_bytes()
    r = fresh.cli("restore", str(backup_dir), "--force")
    assert r.returncode == 2 and "a hub is running on" in r.stderr and "stop it first" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1 and db.read_bytes() == before

    # Over a stopped deployment only with --force, and what was there is moved aside, not deleted.
    fresh.stop()
    r = fresh.cli("restore", str(backup_dir))
    assert r.returncode == 2 and "already holds a deployment" in r.stderr and "--force" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1
    r = fresh.cli("restore", str(backup_dir), "--force")
    assert r.returncode == 0, r.stderr
    [aside] = (fresh.base / "data").glob("replaced-by-restore-*")
    assert (aside / "hub" / "jupyterhub.sqlite").exists() and mode(aside) == 0o700
    assert f"what was there before is in {aside}" in r.stdout


def test_a_damaged_or_foreign_backup_restores_nothing(hub_factory, tmp_path):
    hub = hub_factory({"culler": {"enabled": False}}, start=False)
    r = hub.cli("restore", str(tmp_path))
    assert r.returncode == 2 and "is not a backup (no manifest.json)" in r.stderr, r
    hub.start()
    backup_dir = tmp_path / "b"
    assert hub.cli("backup", str(backup_dir)).returncode == 0
    r = hub.cli("backup", str(backup_dir))
    assert r.returncode == 2 and "is not empty" in r.stderr, r
    (backup_dir / "data" / "hub" / "accounts.json").write_text("{}")
    fresh = hub_factory({"culler": {"enabled": False}}, start=False)
    r = fresh.cli("restore", str(backup_dir))
    assert r.returncode == 2 and "accounts.json is missing or differs from the backup's manifest" in r.stderr, r
    assert not (fresh.base / "data" / "hub" / "jupyterhub.sqlite").exists()
