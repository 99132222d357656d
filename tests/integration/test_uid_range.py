"""The users' system accounts take their uids from the deployment's own spawner.local.uid_range (as root): the lowest
free one, a removed user's never again, and a start beyond the range fails with one line the operator can act on
(servers on the spawn page, batch jobs in the job's log, `spinnaker-jupyter check`)."""

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
    lo = _free_block(3)
    jobs_port = free_port()
    hub = hub_factory(
        {
            "culler": {"enabled": False},
            "spawner": {"local": {"uid_range": [lo, lo + 2]}},
            "jobs": {"enabled": True, "port": jobs_port},
        }
    )
    tag = secrets.token_hex(3)  # names of this run only: an account left by an earlier run is never taken over
    a, b, c, d = (f"u{tag}{x}" for x in "abcd")
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

        users[c] = hub.client(c, hub.add_user(c))
        users[c].start_server()  # the lowest free uid, not the removed user's
        made.append(hub.system_account(c))
        assert _uid_of(hub, c).pw_uid == lo + 2 and _uid_of(hub, c).pw_gid == lo + 2

        # The range is full: d's start fails with the line on the spawn page, and makes no account.
        users[d] = hub.client(d, hub.add_user(d))
        page = users[d].session.get(f"{hub.url}/hub/spawn/{d}", timeout=120)
        want = f"all 3 uids of spawner.local.uid_range [{lo}, {lo + 2}] are taken"
        assert want in page.text and f"{d}&#39;s server cannot start" in page.text, page.text[-2000:]
        assert not (users[d].server_model() or {}).get("ready")
        with pytest.raises(KeyError):
            pwd.getpwnam(hub.system_account(d))

        # d's batch job fails the same way, in the job's log (the job service makes the same accounts).
        jobs = f"http://127.0.0.1:{jobs_port}"
        headers = {"Authorization": f"Bearer {users[d].token}"}
        body = {"code": "print(1)", "collab": f"private-{d}", "hardware_platform": "SpiNNaker", "command": "run.py"}
        r = requests.post(jobs + "/jobs/", headers=headers, json=body, timeout=30)
        assert r.status_code in (200, 201), r.text
        job_id = r.json()["id"]

        def ended():
            job = requests.get(f"{jobs}/jobs/{job_id}?with_log=true", headers=headers, timeout=30).json()
            return job if job["status"] in ("finished", "error") else None

        job = wait_for(ended, 120, "d's job to end")
        assert job["status"] == "error" and want in job["log"] and f"{d}'s jobs cannot start" in job["log"], job

        check = hub.cli("check")
        assert check.returncode == 0, check.stderr
        assert f"no uid is left in spawner.local.uid_range [{lo}, {lo + 2}]" in check.stdout, check.stdout
        for name in (b, c):
            users[name].stop_server()
    finally:
        hub.stop(final=True)
        for account in made:
            subprocess.run(["userdel", account], capture_output=True)
            if account in {g.gr_name for g in grp.getgrall()}:
                subprocess.run(["groupdel", account], capture_output=True)
