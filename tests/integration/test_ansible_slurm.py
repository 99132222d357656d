"""The operators' Slurm roles (ansible/roles/slurm_*): the playbook with controller and workers parses, and the
slurm.conf they write is one a real Slurm runs: rendered for this machine as the only worker (test paths and
plugins), a second controller and slurmd started with it beside the test cluster (its munged) show the partition,
the node and the board licences. The worker role's accounts (tasks/accounts.yml, run here as root on this machine as
the node) refuse a uid outside spawner.local.uid_range or one another name has on the node."""

from __future__ import annotations

import grp
import os
import pwd
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time

import jinja2
import pytest
import yaml

from conftest import BIN, ROOT, free_port, traversable_tmpdir

ROLES = ROOT / "ansible" / "roles"


def render(role: str, template: str, variables: dict) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True)
    return env.from_string((ROLES / role / "templates" / template).read_text()).render(**variables)


def common_defaults(**over) -> dict:
    values = yaml.safe_load((ROLES / "slurm_common" / "defaults" / "main.yml").read_text())
    return {**{k: v for k, v in values.items() if "{{" not in str(v)}, **over}


def test_playbook_with_controller_and_workers_parses():
    r = subprocess.run(
        [BIN / "ansible-playbook", "--syntax-check", "-i", "inventory.example.ini", "site.yml"],
        cwd=ROOT / "ansible",
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_slurm_conf_names_every_worker_and_the_boards():
    text = render(
        "slurm_common",
        "slurm.conf.j2",
        common_defaults(
            slurm_controller_name="hub",
            slurm_controller_addr="10.0.0.1",
            slurm_boards=3,
            slurm_workers=["node1.lab", "node2.lab"],
            hostvars={
                "node1.lab": {"ansible_host": "10.0.0.11", "slurm_cpus": 32, "slurm_memory_mb": 120000},
                "node2.lab": {"ansible_processor_vcpus": 8, "ansible_memtotal_mb": 16000},
            },
        ),
    )
    lines = text.splitlines()
    assert "SlurmctldHost=hub(10.0.0.1)" in lines and "Licenses=spinnaker_board:3" in lines
    assert "NodeName=node1 NodeAddr=10.0.0.11 CPUs=32 RealMemory=120000 State=UNKNOWN" in lines
    assert "NodeName=node2 NodeAddr=node2.lab CPUs=8 RealMemory=14976 State=UNKNOWN" in lines
    assert any(line.startswith("PartitionName=spinnaker Nodes=node1,node2 Default=YES") for line in lines), text
    assert "ProctrackType=proctrack/cgroup" in lines and "AuthType=auth/munge" in lines


def test_a_real_slurm_runs_the_rendered_conf(slurm):
    folder = traversable_tmpdir("ansible-slurm-")
    for sub in ("state", "spool", "log", "run"):
        (folder / sub).mkdir(mode=0o700)
    node = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(
        render(
            "slurm_common",
            "slurm.conf.j2",
            common_defaults(
                slurm_cluster_name="ansibletest",
                slurm_controller_name=node,
                slurm_controller_addr="127.0.0.1",
                slurm_ctld_port=free_port(),
                slurm_slurmd_port=free_port(),
                slurm_boards=5,
                slurm_munge_socket=str(slurm.folder / "munge" / "munge.socket"),
                # (this machine's test settings: no cgroup plugins in a container, daemons as root, private folders)
                slurm_user="root",
                slurm_proctrack="proctrack/linuxproc",
                slurm_task_plugin="task/none",
                slurm_state_dir=str(folder / "state"),
                slurm_spool_dir=str(folder / "spool"),
                slurm_log_dir=str(folder / "log"),
                slurm_run_dir=str(folder / "run"),
                slurm_workers=[node],
                hostvars={node: {"ansible_host": "127.0.0.1", "slurm_cpus": 1, "slurm_memory_mb": 1000}},
            ),
        )
    )
    conf.chmod(0o644)
    env = {"PATH": "/usr/sbin:/usr/bin:/bin", "SLURM_CONF": str(conf)}
    daemons = [
        subprocess.Popen(
            [d, "-D", "-f", str(conf)],
            env=env,
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for d in ("slurmctld", "slurmd")
    ]
    try:
        deadline, state = time.monotonic() + 60, ""
        while time.monotonic() < deadline and state != "idle":
            assert all(d.poll() is None for d in daemons), (folder / "log" / "slurmctld.log").read_text()[-2000:]
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
            time.sleep(0.2)
        assert state == "idle", state
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%P %D %c %m"], env=env, capture_output=True, text=True).stdout
        assert sinfo.split() == ["spinnaker*", "1", "1", "1000"], sinfo
        lic = subprocess.run(["scontrol", "-o", "show", "lic"], env=env, capture_output=True, text=True).stdout
        assert "LicenseName=spinnaker_board" in lic and "Total=5" in lic, lic
    finally:
        for d in daemons:
            d.terminate()
        for d in daemons:
            try:
                d.wait(15)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _free_uids(size: int) -> int:
    """The first of `size` uids no account or group here has (far above systemd's container uids)."""
    from spinnaker_jupyter.uid_range import taken_ids

    taken = taken_ids()
    while True:
        lo = random.randrange(1_900_000_000, 2_140_000_000)
        if not taken & set(range(lo, lo + size)):
            return lo


def _worker_accounts(tmp_path, hub_accounts: dict[str, int], uid_range: list[int]) -> subprocess.CompletedProcess:
    """The worker role's account tasks on this machine, for these hub accounts (name -> uid, its group's gid too)."""
    entries = [
        {"key": n, "value": ["x", str(u), str(u), f"Jupyter user {n}", "/nonexistent", "/bin/bash"]}
        for n, u in hub_accounts.items()
    ]
    play = [
        {
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars": {
                "ansible_python_interpreter": sys.executable,
                "slurm_hub_accounts": entries,
                "slurm_uid_range": uid_range,
            },
            "tasks": [{"ansible.builtin.include_tasks": str(ROLES / "slurm_worker" / "tasks" / "accounts.yml")}],
        }
    ]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    return subprocess.run(
        [BIN / "ansible-playbook", "-i", "localhost,", tmp_path / "play.yml"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOME": str(tmp_path / "ansible")},
    )


def _delete(*names: str) -> None:
    for name in names:
        subprocess.run(["userdel", name], capture_output=True)
        if name in {g.gr_name for g in grp.getgrall()}:
            subprocess.run(["groupdel", name], capture_output=True)


def test_the_role_range_default_is_the_deployments():
    from spinnaker_jupyter.uid_range import DEFAULT_UID_RANGE

    text = (ROLES / "slurm_worker" / "defaults" / "main.yml").read_text()
    assert f"default([{DEFAULT_UID_RANGE[0]}, {DEFAULT_UID_RANGE[1]}])" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="accounts need root")
def test_worker_role_makes_the_hubs_accounts_and_refuses_a_uid_outside_the_range_or_taken_here(tmp_path):
    lo = _free_uids(10)
    tag = secrets.token_hex(3)
    alice, bob, other = f"tw{tag}-alice", f"tw{tag}-bob", f"tw{tag}-other"
    try:
        made = _worker_accounts(tmp_path, {alice: lo + 1}, [lo, lo + 9])
        assert made.returncode == 0, made.stdout[-3000:]
        assert (pwd.getpwnam(alice).pw_uid, grp.getgrnam(alice).gr_gid) == (lo + 1, lo + 1)

        outside = _worker_accounts(tmp_path, {bob: lo + 20}, [lo, lo + 9])
        assert outside.returncode != 0
        want = f"the hub's {bob} has uid {lo + 20}, outside spawner.local.uid_range [{lo}, {lo + 9}]"
        assert want in outside.stdout, outside.stdout[-3000:]
        with pytest.raises(KeyError):
            pwd.getpwnam(bob)

        # another name has the uid here: it would own bob's files on this node
        added = subprocess.run(["useradd", "--system", "--uid", str(lo + 2), "--no-create-home", "--user-group", other])
        assert added.returncode == 0
        taken = _worker_accounts(tmp_path, {bob: lo + 2}, [lo, lo + 9])
        assert taken.returncode != 0
        assert f"uid {lo + 2} of the hub's {bob} belongs to {other} on localhost" in taken.stdout, taken.stdout[-3000:]
        assert "give " + other + " another uid on this node (usermod --uid)" in taken.stdout
        with pytest.raises(KeyError):
            pwd.getpwnam(bob)
    finally:
        _delete(alice, bob, other)
