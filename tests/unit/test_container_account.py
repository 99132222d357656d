"""Who a user's containers run as (docker.container_account): the user's own host account, never root or the image's
uid 1000; the config it comes from; the passwd entry the image's launcher writes for that uid; and how the home volume
becomes that account's (docker.hand_over_home)."""

from __future__ import annotations

import os
import pwd

import pytest
from traitlets.config import Config

import spinnaker_singleuser
from spinnaker_jupyter import config, docker, hubconfig
from spinnaker_jupyter.jobs import executor
from spinnaker_jupyter.jobs.executor import Account, AccountError
from spinnaker_jupyter.uid_range import UidRangeFull


def test_the_servers_accounts_come_from_spawner_local(write_config):
    d = config.load(
        [
            write_config(
                {
                    "spawner": {
                        "type": "docker",
                        "local": {"system_user_prefix": "jh-", "uid_range": [80000, 80999]},
                    }
                }
            )
        ]
    )
    c = Config()
    hubconfig.update_docker(c, d)
    s = c.SpiNNakerDockerSpawner
    assert (s.system_user_prefix, s.uid_range, s.homes_dir) == ("jh-", [80000, 80999], str(d.homes_dir))


def test_the_account_is_the_job_accounts(monkeypatch, tmp_path):
    asked = []

    def account(self, user):
        asked.append((self.prefix, self.homes_dir, self.uid_range, user))
        return Account("jh-ada", 80001, 80001, switched=True)

    monkeypatch.setattr(executor.LocalExecutor, "account", account)
    got = docker.container_account("jh-", tmp_path, "ada", [80000, 80999])
    assert (got.uid, got.gid) == (80001, 80001)
    assert asked == [("jh-", tmp_path, [80000, 80999], "ada")]


@pytest.mark.parametrize("uid, gid", [(1000, 1000), (0, 0), (80001, 0)])
def test_never_root_nor_the_images_uid(monkeypatch, tmp_path, uid, gid):
    monkeypatch.setattr(executor.LocalExecutor, "account", lambda self, user: Account("x", uid, gid, True))
    with pytest.raises(docker.ContainerAccountError, match="never run as 0 or 1000"):
        docker.container_account("jh-", tmp_path, "ada", None)


def test_a_hub_that_is_not_root_is_told_to_be(monkeypatch, tmp_path):
    monkeypatch.setattr(docker.os, "geteuid", lambda: 1000)
    with pytest.raises(docker.ContainerAccountError, match="run the hub .* as root"):
        docker.container_account("jh-", tmp_path, "ada", None)


def test_a_full_uid_range_is_said_for_the_server(monkeypatch, tmp_path):
    def full(self, user):
        try:
            raise UidRangeFull("jh-ada", "ada", (80000, 80001))
        except UidRangeFull as e:
            raise AccountError(e.message("jobs")) from None

    monkeypatch.setattr(executor.LocalExecutor, "account", full)
    with pytest.raises(docker.ContainerAccountError, match="ada's server cannot start"):
        docker.container_account("jh-", tmp_path, "ada", [80000, 80001])


@pytest.fixture
def unknown_uid(monkeypatch, tmp_path):
    """This process as uid 80001 / gid 80001, which no passwd entry names; the image's passwd and group files."""
    monkeypatch.setattr(spinnaker_singleuser.os, "getuid", lambda: 80001)
    monkeypatch.setattr(spinnaker_singleuser.os, "getgid", lambda: 80001)
    real = pwd.getpwuid
    monkeypatch.setattr(
        spinnaker_singleuser.pwd, "getpwuid", lambda u: (_ for _ in ()).throw(KeyError(u)) if u == 80001 else real(u)
    )
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\njovyan:x:1000:100::/home/jovyan:/bin/bash\n")
    group.write_text("root:x:0:\nusers:x:100:\n")
    monkeypatch.setenv("HOME", "/home/jovyan")
    return passwd, group


def test_the_launcher_names_an_unknown_uid(unknown_uid, monkeypatch):
    passwd, group = unknown_uid
    monkeypatch.setenv("NB_USER", "jupyter-ada")
    assert spinnaker_singleuser.add_account_entry(str(passwd), str(group)) == "jupyter-ada"
    assert passwd.read_text().endswith("jupyter-ada:x:80001:80001:jupyter-ada:/home/jovyan:/bin/bash\n")
    assert group.read_text().endswith("jupyter-ada:x:80001:\n")


@pytest.mark.parametrize("given", ["jovyan", "bad:name\nroot::0:0", ""])
def test_a_taken_or_odd_name_becomes_user_uid(unknown_uid, monkeypatch, given):
    passwd, group = unknown_uid
    monkeypatch.setenv("NB_USER", given)
    assert spinnaker_singleuser.add_account_entry(str(passwd), str(group)) == "user80001"
    assert passwd.read_text().count("\n") == 3 and "root::0:0" not in passwd.read_text()


def test_a_known_uid_writes_nothing(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    assert spinnaker_singleuser.add_account_entry(str(passwd), str(tmp_path / "group")) is None
    assert passwd.read_text() == ""


def test_a_placeholder_named_by_the_number_is_replaced(unknown_uid, monkeypatch):
    passwd, group = unknown_uid
    with passwd.open("a") as f:
        f.write("80001:*:80001:80001:container user:/home/jovyan:/bin/sh\n")  # what podman writes for --user
    placeholder = pwd.struct_passwd(("80001", "*", 80001, 80001, "", "/home/jovyan", "/bin/sh"))
    monkeypatch.setattr(spinnaker_singleuser.pwd, "getpwuid", lambda u: placeholder)
    monkeypatch.setenv("NB_USER", "jupyter-ada")
    assert spinnaker_singleuser.add_account_entry(str(passwd), str(group)) == "jupyter-ada"
    lines = passwd.read_text().splitlines()
    assert lines[-1].startswith("jupyter-ada:x:80001:80001:") and not any(x.startswith("80001:") for x in lines)


class FakeEngine:
    """The docker APIClient calls hand_over_home makes: a volume at `mountpoint` (None: no such volume), a hand-over
    container whose output is `prints`."""

    def __init__(self, mountpoint: str | None, prints: str = ""):
        self.mountpoint, self.prints, self.made, self.removed = mountpoint, prints, [], []

    def inspect_volume(self, name):
        if self.mountpoint is None:
            import docker as dockerpy

            raise dockerpy.errors.NotFound(name)
        return {"Name": name, "Mountpoint": self.mountpoint}

    def create_host_config(self, **kw):
        return kw

    def create_container(self, image, command, **kw):
        self.made.append({"image": image, "command": command, **kw})
        return {"Id": "c1"}

    def start(self, cid):
        pass

    def wait(self, cid, timeout):
        return {"StatusCode": 0}

    def logs(self, cid, stdout, stderr):
        return (self.prints if stdout else "").encode()

    def remove_container(self, cid, force):
        self.removed.append(cid)


def _home_of(tmp_path, uid: int, gid: int, monkeypatch) -> str:
    """A volume folder the host sees, owned by uid:gid (as os.stat says)."""
    real = docker.os.stat
    monkeypatch.setattr(
        docker.os,
        "stat",
        lambda p, *a, **k: (
            os.stat_result((0o40755, 0, 0, 2, uid, gid, 0, 0, 0, 0)) if str(p) == str(tmp_path) else real(p)
        ),
    )
    return str(tmp_path)


def test_a_home_already_the_accounts_is_left_alone(tmp_path, monkeypatch):
    engine = FakeEngine(_home_of(tmp_path, 80001, 80001, monkeypatch))
    assert docker.hand_over_home(engine, "img", "home-ada", 80001, 80001, {}) is None
    assert engine.made == []  # no container: the host sees its owner


@pytest.mark.parametrize("owner", [(1000, 100), (80007, 80007), (80001, 80007), (0, 0)])
def test_a_home_of_any_other_owner_is_handed_over_in_a_safe_container(tmp_path, monkeypatch, owner):
    """An earlier release's 1000, the user's earlier account (a re-created hub container), another group, root."""
    engine = FakeEngine(_home_of(tmp_path, *owner, monkeypatch), prints=f"{owner[0]}:{owner[1]}\n")
    was = docker.hand_over_home(engine, "img", "home-ada", 80001, 80001, {"l": "1"})
    assert was == f"uid {owner[0]}'s (gid {owner[1]})"
    (made,) = engine.made
    assert made["command"][-1] == "80001:80001" and made["user"] == "0:0" and made["labels"] == {"l": "1"}
    hc = made["host_config"]
    assert hc["binds"] == {"home-ada": {"bind": docker.IMAGE_HOME, "mode": "rw"}} and hc["network_mode"] == "none"
    assert hc["cap_drop"] == ["ALL"] and sorted(hc["cap_add"]) == ["CHOWN", "DAC_READ_SEARCH"]
    assert hc["security_opt"] == ["no-new-privileges"] and hc["read_only"]
    assert "chown -h" in made["command"][2] and "-execdir" in made["command"][2]  # no link followed
    assert engine.removed == ["c1"]


def test_a_new_volume_is_said_to_be_new(monkeypatch):
    engine = FakeEngine(None, prints="1000:100\n")
    assert docker.hand_over_home(engine, "img", "home-ada", 80001, 80001, {}) == "a new volume"


def test_a_home_found_the_accounts_inside_the_container_is_not_said(tmp_path):
    """A hub in a container does not see the engine's volume folders: the container runs and finds nothing to do."""
    engine = FakeEngine(str(tmp_path / "not-here"), prints="")
    assert docker.hand_over_home(engine, "img", "home-ada", 80001, 80001, {}) is None
    assert len(engine.made) == 1
