"""The hub -> user-server contract (extensions/spinnaker_server_contract.py): what the hub writes is what the server,
spinnaker-status and the kernel launcher read back; defaults; a value that cannot be read costs only itself and is
said in one line; the image's server settings come from the same function as the hub's."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

import spinnaker_server_contract
from spinnaker_jupyter import config, hubconfig
from spinnaker_server_contract import ServerContract, jupyter_server_config

ROOT = Path(__file__).resolve().parents[2]
EVERYTHING = ServerContract(
    proxy_ports=(9000, 9100),
    nrp_port=9100,
    nrp_start_timeout=30,
    nrp_command=("nrp", "--socket", "{unix_socket}"),
    cfg_dir="/srv/data/etc/spynnaker",
    tutorials_dir="/srv/notebooks",
    git_support_dir="/srv/kernels/support",
    git_kernel={"branch": "dev", "base_env": "/srv/envs/spynnaker"},
    drive={"url": "https://drive.ebrains.eu"},
    mode="session",
    machine_cfg="# claimed\n[Machine]\nmachine_name = 10.11.192.1\n",
    board="10.11.192.1",
    board_job="7",
    board_job_url="https://spalloc.example.org/spalloc/srv/spalloc/jobs/7",
    board_notice="No SpiNNaker board for this session: all boards busy.",
)


def test_round_trip():
    env = EVERYTHING.to_env()
    assert all(k.startswith("SPINNAKER_") and isinstance(v, str) for k, v in env.items())
    back = ServerContract.from_env(env)
    assert back == EVERYTHING and back.problems == ()
    assert len(env) == len([f for f in dataclasses.fields(ServerContract) if "env" in f.metadata])  # every one


def test_defaults_are_not_written_and_absent_variables_read_as_defaults():
    assert ServerContract().to_env() == {}
    told = ServerContract.from_env({"PATH": "/usr/bin", "SPINNAKER_NRP_PORT": ""})
    assert told == ServerContract() and told.problems == ()
    assert (told.nrp_port, told.nrp_start_timeout, told.proxy_ports, told.nrp_command) == (9000, 120, (), ())
    assert told.mode is None and told.machine_cfg is None and told.git_kernel is None
    # Lists as the config gives them are the same contract as tuples.
    assert ServerContract(proxy_ports=[9000], nrp_command=[]).to_env() == {"SPINNAKER_PROXY_PORTS": "9000"}


def test_board_part_alone_leaves_the_deployments_variables_alone():
    """The boards write this server's machine on top of the deployment's variables: nothing of the rest."""
    env = {"SPINNAKER_NRP_PORT": "9100", **ServerContract(mode="virtual", machine_cfg="[Machine]\n").to_env()}
    assert env == {"SPINNAKER_NRP_PORT": "9100", "SPINNAKER_MODE": "virtual", "SPINNAKER_MACHINE_CFG": "[Machine]\n"}


@pytest.mark.parametrize(
    "variable, value, field, kept, words",
    [
        ("SPINNAKER_NRP_PORT", "90o0", "nrp_port", 9000, "not a port number"),
        ("SPINNAKER_NRP_PORT", "70000", "nrp_port", 9000, "not a port number"),
        ("SPINNAKER_NRP_START_TIMEOUT", "2m", "nrp_start_timeout", 120, "not a whole number of seconds"),
        ("SPINNAKER_PROXY_PORTS", "9000,ssh,9100", "proxy_ports", (9000, 9100), "not port numbers"),
        ("SPINNAKER_NRP_COMMAND", "cle-nginx --foreground", "nrp_command", (), "not a command"),
        ("SPINNAKER_GIT_KERNEL_CONFIG", "{'branch': 'dev'}", "git_kernel", None, "not a JSON object"),
        ("SPINNAKER_DRIVE", "[1, 2]", "drive", None, "not a JSON object"),
        ("SPINNAKER_MODE", "lab", "mode", None, "not one of virtual, machine, session, per-run"),
    ],
)
def test_a_bad_value_costs_only_itself_and_is_said_in_one_line(variable, value, field, kept, words):
    env = {**EVERYTHING.to_env(), variable: value}
    told = ServerContract.from_env(env)
    assert getattr(told, field) == kept
    assert told == dataclasses.replace(EVERYTHING, **{field: kept})  # everything else as the hub said
    (line,) = told.problems
    assert "\n" not in line and line.startswith(f"{variable}={value!r}: {words}")
    assert f"The hub sets it from {ServerContract.__dataclass_fields__[field].metadata['source']}" in line
    assert told.problem(field) == line and told.problem("board") is None


def test_variable_names():
    assert ServerContract.variable("git_kernel") == "SPINNAKER_GIT_KERNEL_CONFIG"
    assert ServerContract.variable("drive") == "SPINNAKER_DRIVE"


def _deployment(tmp_path, **values):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"data_dir": str(tmp_path / "data"), **values}))
    return config.load([path])


def test_the_hub_writes_the_contract_the_server_reads(tmp_path):
    d = _deployment(tmp_path, proxy_ports=[9000, 9100], nrp={"command": ["nrp", "{unix_socket}"], "port": 9100})
    env = hubconfig.user_server_env(d)
    told = ServerContract.from_env(env)
    assert told.problems == ()
    assert told.proxy_ports == (9000, 9100) and told.nrp_port == 9100 and told.nrp_command == ("nrp", "{unix_socket}")
    assert told.cfg_dir == str(d.spynnaker_cfg_dir) and told.git_kernel["base_env"] == str(d.envs_dir / "spynnaker")
    assert {k for k in env if not k.startswith("SPINNAKER_")} == {"JUPYTER_PATH", "JUPYTER_CONFIG_PATH"}
    # a container: no host paths, the image's environments
    told = ServerContract.from_env(hubconfig.user_server_env(d, in_container=True))
    assert told.cfg_dir is None and told.tutorials_dir is None
    assert told.git_kernel["base_env"] == "/opt/envs/spynnaker"


def test_server_settings():
    settings = jupyter_server_config()
    assert settings["KernelManager"] == {"transport": "ipc"}  # kernels never on TCP ports
    assert settings["ServerProxy"] == {"host_allowlist": ["localhost", "127.0.0.1"]}
    assert settings["ServerApp"]["jpserver_extensions"] == {
        "spinnaker_jupyter_ext": True,
        "jupyter_server_proxy": True,
        "jupyter_lsp": False,
    }
    assert settings["LabApp"]["news_url"] is None and settings["LabApp"]["extension_manager"] == "readonly"


def test_the_hub_and_the_image_write_the_server_settings_with_the_same_function(tmp_path):
    written = hubconfig.write_server_config(_deployment(tmp_path)) / "jupyter_server_config.json"
    assert json.loads(written.read_text()) == jupyter_server_config()
    containerfile = (ROOT / "images" / "singleuser" / "Containerfile").read_text()
    assert re.search(
        r"python -m spinnaker_server_contract jupyter-server-config > "
        r"\"\$conf/spinnaker-jupyter.json\"",
        containerfile,
    )
    assert "conf=/opt/envs/server/etc/jupyter/jupyter_server_config.d" in containerfile
    assert not (ROOT / "images" / "singleuser" / "jupyter_server_config.json").exists()  # no copy to drift


def test_the_module_works_where_only_it_is_copied():
    """The kernel env and the hub image get this one file: it imports the standard library only."""
    tree = ast.parse(Path(spinnaker_server_contract.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "dataclasses", "json", "os", "sys", "collections", "typing"}, imported
    containerfile = (ROOT / "images" / "singleuser" / "Containerfile").read_text()
    assert 'spinnaker_server_contract.py "$site/"' in containerfile  # beside the launcher in the kernel env
    # (the hub image copies every top-level module of the extension distribution: tests/unit/test_shared_modules.py)
    assert "COPY extensions/spinnaker_*.py" in (ROOT / "images" / "hub" / "Containerfile").read_text()


def test_kernel_launcher_reads_the_contract(tmp_path, monkeypatch):
    """The launcher's cfg choice and notice come from the contract: a board's cfg from the environment wins."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("spinnaker_kernel", ROOT / "kernels/spynnaker/spinnaker_kernel.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    env = dict(
        ServerContract(
            cfg_dir=str(tmp_path / "etc"),
            machine_cfg="[Machine]\nvirtual_board = True\n",
            board_notice="all boards busy",
        ).to_env()
    )
    chosen = launcher.choose_cfg(env)
    assert Path(chosen).read_text() == "[Machine]\nvirtual_board = True\n"
    assert not chosen.startswith(str(tmp_path / "etc"))
    assert launcher.notices(env) == ["SpiNNaker: all boards busy"]
