"""Unit tests beside the integration tests: accounts, tutorial seeding, the kernel launcher's cfg choice,
the proxy guard's decisions, and the generated sPyNNaker cfg."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest

from spinnaker_jupyter.local_accounts import AccountError, AccountStore
from spinnaker_jupyter.spynnaker_cfg import ClaimedBoards
from spinnaker_jupyter.spynnaker_cfg import text as spynnaker_cfg_text
from spinnaker_jupyter_ext.proxy_guard import verdict
from spinnaker_jupyter_ext.tutorials import seed_tutorials

ROOT = Path(__file__).resolve().parents[2]


def load_launcher():
    spec = importlib.util.spec_from_file_location("spinnaker_kernel", ROOT / "kernels/spynnaker/spinnaker_kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- accounts ---------------------------------------------------------------------------------------------------
def test_accounts_hash_and_verify(tmp_path):
    store = AccountStore(tmp_path / "accounts.json")
    pw = store.add("alice")
    assert len(pw) >= 16 and store.check("alice", pw) and not store.check("alice", pw + "x")
    assert pw not in (tmp_path / "accounts.json").read_text()  # only the hash is kept
    assert (tmp_path / "accounts.json").stat().st_mode & 0o777 == 0o600
    new = store.set_password("alice")
    assert store.check("alice", new) and not store.check("alice", pw)


@pytest.mark.parametrize("bad", ["", "Alice", "../x", "a b", "-rf", "x" * 30, "ünï"])
def test_account_names_are_safe(tmp_path, bad):
    with pytest.raises(AccountError, match="not a valid account name"):
        AccountStore(tmp_path / "a.json").add(bad)


def test_account_errors_are_actionable(tmp_path):
    store = AccountStore(tmp_path / "a.json")
    store.add("bob")
    with pytest.raises(AccountError, match="already exists .*user passwd bob"):
        store.add("bob")
    with pytest.raises(AccountError, match="too short"):
        store.set_password("bob", "short", min_length=10)
    with pytest.raises(AccountError, match="no account 'eve'"):
        store.remove("eve")


def test_system_account_names_are_valid_and_distinct():
    from spinnaker_jupyter.spawner import system_account_name

    assert system_account_name("jupyter-", "alice") == "jupyter-alice"
    odd = [
        system_account_name("jupyter-", n)
        for n in ("neuro.scientist--q4xug6lpy5", "neuro_scientist--q4xug6lpy5", "a" * 40, "a" * 41)
    ]
    assert len(set(odd)) == 4
    assert all(len(n) <= 32 and all(c.isalnum() or c in "_-" for c in n) for n in odd), odd


# --- tutorials --------------------------------------------------------------------------------------------------
def test_tutorials_copy_update_and_keep_user_changes(tmp_path):
    src, home = tmp_path / "src", tmp_path / "home"
    src.mkdir(), home.mkdir()
    (src / "a.ipynb").write_text("v1")
    (src / "b.ipynb").write_text("v1")
    (src / "c.ipynb").write_text("v1")
    (src / ".ipynb_checkpoints").mkdir()
    (src / ".ipynb_checkpoints" / "a-checkpoint.ipynb").write_text("junk")
    seed_tutorials(src, home)
    assert (home / "a.ipynb").read_text() == "v1" and not (home / ".ipynb_checkpoints").exists()
    (home / "a.ipynb").write_text("mine")  # the user edits a
    (home / "c.ipynb").unlink()  # ... and deletes c
    for name in ("a", "b", "c"):
        (src / f"{name}.ipynb").write_text("v2")
    report = seed_tutorials(src, home)
    assert (home / "a.ipynb").read_text() == "mine"
    beside = [p for p in home.iterdir() if p.name.startswith("a (updated")]
    assert len(beside) == 1 and beside[0].read_text() == "v2"
    assert (home / "b.ipynb").read_text() == "v2"  # untouched by the user: updated in place
    assert not (home / "c.ipynb").exists()  # deleted by the user: stays deleted
    assert any("you changed it" in line for line in report)
    assert seed_tutorials(src, home) == []  # nothing new: nothing done


def test_tutorials_never_overwrite_a_users_file_of_the_same_name(tmp_path):
    src, home = tmp_path / "src", tmp_path / "home"
    src.mkdir(), home.mkdir()
    (src / "notes.ipynb").write_text("tutorial")
    (home / "notes.ipynb").write_text("the user's own")
    seed_tutorials(src, home)
    assert (home / "notes.ipynb").read_text() == "the user's own"
    assert any(p.read_text() == "tutorial" for p in home.glob("notes (updated*"))


# --- kernel launcher: exactly one sPyNNaker cfg ----------------------------------------------------------------
def test_launcher_offers_the_deployment_cfg(tmp_path, monkeypatch):
    launcher = load_launcher()
    cfg_dir = tmp_path / "etc"
    cfg_dir.mkdir()
    (cfg_dir / ".spynnaker.cfg").write_text("[Machine]\nvirtual_board = True\nversion = 5\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    env = {"SPINNAKER_CFG_DIR": str(cfg_dir)}
    assert launcher.choose_cfg(env) == str(cfg_dir / ".spynnaker.cfg")
    assert env["XDG_CONFIG_DIRS"] == str(cfg_dir)
    said = launcher.notices(env)
    assert len(said) == 1 and "virtual mode" in said[0]


def test_launcher_respects_a_users_own_cfg(tmp_path, monkeypatch):
    launcher = load_launcher()
    home = tmp_path / "home"
    home.mkdir()
    (home / ".spynnaker.cfg").write_text("[Machine]\nmachine_name = 10.0.0.1\nversion = 5\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    env = {"SPINNAKER_CFG_DIR": str(tmp_path / "etc")}
    assert launcher.choose_cfg(env) == str(home / ".spynnaker.cfg")
    assert env["XDG_CONFIG_DIRS"] != str(tmp_path / "etc")  # the deployment's is not offered too
    said = launcher.notices(env)
    assert len(said) == 1 and "your own configuration" in said[0]


def test_generated_cfg_names_the_machine():
    virtual = spynnaker_cfg_text({"mode": "virtual", "version": 5, "machine_name": None, "extra_cfg": {}})
    assert "virtual_board = True" in virtual and "machine_name" not in virtual
    board = spynnaker_cfg_text(
        {
            "mode": "machine",
            "version": 3,
            "machine_name": "192.168.240.253",
            "extra_cfg": {"Reports": {"write_energy_report": False}},
        }
    )
    assert "machine_name = 192.168.240.253" in board and "version = 3" in board
    assert "virtual_board" not in board and "write_energy_report = False" in board


def _cfgs_spynnaker_finds(env, home):
    """sPyNNaker's own search (spinn_utilities.config_holder._user_cfg): the first XDG_CONFIG_DIRS entry, ~/.config, ~."""
    places = [
        os.path.join(env["XDG_CONFIG_DIRS"].split(os.pathsep)[0], ".spynnaker.cfg"),
        os.path.join(home, ".config", ".spynnaker.cfg"),
        os.path.join(home, ".spynnaker.cfg"),
    ]
    return [p for p in places if os.path.isfile(p)]


def test_launcher_materialises_the_servers_own_cfg(tmp_path, monkeypatch):
    """A server's cfg comes in its environment (a claimed board; containers too): written into a private file, the
    only one offered, the deployment's folder not at all."""
    launcher = load_launcher()
    home = tmp_path / "home"
    home.mkdir()
    deployment = tmp_path / "etc"
    deployment.mkdir()
    (deployment / ".spynnaker.cfg").write_text("[Machine]\nvirtual_board = True\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    text = "[Machine]\nmachine_name = 10.11.192.1\nversion = 5\n"
    env = {"SPINNAKER_CFG_DIR": str(deployment), "SPINNAKER_MACHINE_CFG": text}
    cfg = Path(launcher.choose_cfg(env))
    assert cfg.read_text() == text and cfg.name == ".spynnaker.cfg"
    assert str(cfg).startswith(str(home / ".cache" / "spinnaker-jupyter"))
    assert env["XDG_CONFIG_DIRS"] == str(cfg.parent) and os.listdir(cfg.parent) == [".spynnaker.cfg"]
    assert cfg.stat().st_mode & 0o777 == 0o600 and cfg.parent.stat().st_mode & 0o777 == 0o700
    assert _cfgs_spynnaker_finds(env, str(home)) == [str(cfg)]
    assert launcher.notices(env) == []  # a board: nothing to warn about
    # Kernels of the same session share the file; another session's cfg never mixes with it.
    assert launcher.choose_cfg(dict(env)) == str(cfg)
    other = launcher.choose_cfg({**env, "SPINNAKER_MACHINE_CFG": text.replace("192.1", "192.9")})
    assert other != str(cfg) and cfg.read_text() == text


def test_launcher_keeps_a_users_own_cfg_over_the_servers(tmp_path, monkeypatch):
    launcher = load_launcher()
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".config" / ".spynnaker.cfg").write_text("[Machine]\nmachine_name = 10.0.0.1\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    env = {"SPINNAKER_MACHINE_CFG": "[Machine]\nmachine_name = 10.11.192.1\n"}
    assert launcher.choose_cfg(env) == str(home / ".config" / ".spynnaker.cfg")
    assert _cfgs_spynnaker_finds(env, str(home)) == [str(home / ".config" / ".spynnaker.cfg")]
    said = launcher.notices(env)
    assert len(said) == 1 and "your own configuration" in said[0]


def test_launcher_says_why_a_session_has_no_board(tmp_path, monkeypatch):
    launcher = load_launcher()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    env = {
        "SPINNAKER_MACHINE_CFG": "[Machine]\nvirtual_board = True\nversion = 5\n",
        "SPINNAKER_BOARD_NOTICE": "No SpiNNaker board for this session (all boards busy), so it runs in virtual mode.",
    }
    launcher.choose_cfg(env)
    said = launcher.notices(env)
    assert said == ["SpiNNaker: No SpiNNaker board for this session (all boards busy), so it runs in virtual mode."]


def test_generated_cfg_per_mode():
    base = {
        "version": 5,
        "machine_name": None,
        "extra_cfg": {"Reports": {"write_energy_report": False}},
        "spalloc": {
            "url": "https://spalloc.example.org/spalloc/",
            "group": "course-a",
            "machine_name": None,
            "use_proxy": True,
        },
    }
    # session: without a claim (no board came) a kernel sees a virtual board; with one, that board.
    assert "virtual_board = True" in spynnaker_cfg_text({**base, "mode": "session"})
    claimed = spynnaker_cfg_text(
        {**base, "mode": "session"},
        claimed=ClaimedBoards("10.11.192.1", 5, "https://spalloc.example.org/jobs/1", "ann"),
    )
    assert "machine_name = 10.11.192.1" in claimed and "write_energy_report = False" in claimed
    per_run = spynnaker_cfg_text({**base, "mode": "per-run"})
    assert "spalloc_server = https://spalloc.example.org/spalloc/" in per_run
    assert "spalloc_group = course-a" in per_run and "spalloc_use_proxy = True" in per_run
    assert "virtual_board = False" in per_run


# --- proxy guard ---------------------------------------------------------------------------------------------------
def test_proxy_guard_decisions():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        unused = s.getsockname()[1]  # bound, never listening
        settings = {"allowed_ports": {unused}, "nrp_port": unused, "nrp_installed": False}
        assert verdict("8888", **settings)[0] == 403
        assert verdict(f"localhost:{unused}", **settings)[0] == 403
        assert verdict(str(unused), **settings)[0] == 404  # nothing listens: the NRP is not installed page
        assert verdict(str(unused), **{**settings, "nrp_installed": True})[0] == 503  # installed, not started
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert verdict(str(port), **{**settings, "allowed_ports": {port}}) is None  # ours and listening: allowed
