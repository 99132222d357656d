"""Who a user's containers run as (docker.container_account): the user's own host account, never root or the image's
uid 1000; the config it comes from; and the passwd entry the image's launcher writes for that uid."""

from __future__ import annotations

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
