"""The users' system accounts take their uids from the deployment's own spawner.local.uid_range (as root): the lowest
free one above the highest ever given, so a removed user's never again (retired, or deleted by hand, across hub
restarts), and a start beyond the range fails with one line the operator can act on (servers on the spawn page, batch
jobs in the job's log, `spinnaker-jupyter check`, which exits 1)."""

from __future__ import annotations

import grp
import os
import pwd
import random
import secrets
import subprocess

import pytest
import requests

from conftest import free_port
from hubclient import wait_for
from spinnaker_jupyter.uid_range import taken_ids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="system accounts need root")


def _free_block(size: int) -> int:
    """The first uid of `size` uids no account or group has, in the free space above systemd's container uids (so
    no other test's hub, which uses the default range, takes one meanwhile)."""
    taken = taken_ids()
    while True:
        lo = random.randrange(1_900_000_000, 2_140_000_000)
        if not taken & set(range(lo, lo + size)):
            return lo


def _uid_of(hub, name: str) -> pwd.struct_passwd:
    return pwd.getpwnam(hub.system_account(name))


def test_accounts_take_uids_from_the_range_never_twice_and_a_full_range_says_so(hub_factory):
    lo = _free_block(4)
    jobs_port = free_port()
    hub = hub_factory(
        {
            "culler": {"enabled": False},
            "spawner": {"local": {"uid_range": [lo, lo + 3]}},
            "jobs": {"enabled": True, "port": jobs_port},
        }
    )
    tag = secrets.token_hex(3)  # names of this run only: an account left by an earlier run is never taken over
    a, b, c, d, e = (f"u{tag}{x}" for x in "abcde")
    made = []  # the accounts this test makes, deleted at its end
    try:
        users = {name: hub.client(name, hub.add_user(name)) for name in (a, b)}
        for name in (a, b):
            users[name].start_server()
            made.append(hub.system_account(name))
        assert (_uid_of(hub, a).pw_uid, _uid_of(hub, a).pw_gid) == (lo, lo)  # its group has the same number
        assert (_uid_of(hub, b).pw_uid, _uid_of(hub, b).pw_gid) == (lo + 1, lo + 1)
        out = users[a].execute(users[a].start_kernel(), "import os; print(os.getuid(), os.getgid())", timeout=120)
        assert out["stdout"].split() == [str(lo), str(lo)], out  # the server really runs as it

        removed = hub.cli("user", "remove", a)
        assert removed.returncode == 0, removed.stderr
        made[0] = f"retired-{lo}"
        assert pwd.getpwuid(lo).pw_name == f"retired-{lo}"
        # b's account deleted by hand: lo + 1 is free on the machine, and b's home still belongs to it
        users[b].stop_server()
        deleted = subprocess.run(["userdel", hub.system_account(b)], capture_output=True, text=True)
        assert deleted.returncode == 0, deleted.stderr
        assert lo + 1 not in taken_ids()
        b_home = hub.base / "data" / "homes" / b
        assert b_home.stat().st_uid == lo + 1

        hub.stop()  # the mark outlives the hub
        hub.start()
        mark = hub.base / "data" / "hub" / "uid-high-water"
        assert mark.read_text().strip() == str(lo + 1) and mark.stat().st_uid == 0

        for name in (c, d):  # above the highest uid ever given: neither the retired one nor the deleted one
            users[name] = hub.client(name, hub.add_user(name))
            users[name].start_server()
            made.append(hub.system_account(name))
        assert _uid_of(hub, c).pw_uid == lo + 2 and _uid_of(hub, c).pw_gid == lo + 2
        assert _uid_of(hub, d).pw_uid == lo + 3
        assert b_home.stat().st_uid not in (_uid_of(hub, c).pw_uid, _uid_of(hub, d).pw_uid)  # nobody has b's files

        # The range is full (lo + 1 is free, but was given once): e's start fails with the line on the spawn page,
        # and makes no account.
        users[e] = hub.client(e, hub.add_user(e))
        page = users[e].session.get(f"{hub.url}/hub/spawn/{e}", timeout=120)
        want = f"all 4 uids of spawner.local.uid_range [{lo}, {lo + 3}] are taken or were given before"
        assert want in page.text and f"{e}&#39;s server cannot start" in page.text, page.text[-2000:]
        assert f"above {lo + 3} in the config" in page.text, page.text[-2000:]
        assert not (users[e].server_model() or {}).get("ready")
        with pytest.raises(KeyError):
            pwd.getpwnam(hub.system_account(e))

        # e's batch job fails the same way, in the job's log (the job service makes the same accounts).
        jobs = f"http://127.0.0.1:{jobs_port}"
        headers = {"Authorization": f"Bearer {users[e].token}"}
        body = {"code": "print(1)", "collab": f"private-{e}", "hardware_platform": "SpiNNaker", "command": "run.py"}
        r = requests.post(jobs + "/jobs/", headers=headers, json=body, timeout=30)
        assert r.status_code in (200, 201), r.text
        job_id = r.json()["id"]

        def ended():
            job = requests.get(f"{jobs}/jobs/{job_id}?with_log=true", headers=headers, timeout=30).json()
            return job if job["status"] in ("finished", "error") else None

        job = wait_for(ended, 120, "e's job to end")
        assert job["status"] == "error" and want in job["log"] and f"{e}'s jobs cannot start" in job["log"], job

        # `check` fails on a full range, with one line naming the key and the fix.
        check = hub.cli("check")
        assert check.returncode == 1, check.stdout + check.stderr
        line = next(x for x in check.stdout.splitlines() if "uid" in x)
        assert f"no uid is left in spawner.local.uid_range [{lo}, {lo + 3}]" in line, check.stdout
        assert f"raise the range's last uid above {lo + 3}" in line, line
        for name in (c, d):
            users[name].stop_server()
    finally:
        hub.stop(final=True)
        for account in made:
            subprocess.run(["userdel", account], capture_output=True)
            if account in {g.gr_name for g in grp.getgrall()}:
                subprocess.run(["groupdel", account], capture_output=True)
