"""The operators' Ansible role: the playbook parses, and the config it writes passes `spinnaker-jupyter check`."""

from __future__ import annotations

import subprocess

import jinja2
import yaml

from conftest import BIN, ROOT

ROLE = ROOT / "ansible" / "roles" / "spinnaker_jupyter"


def render(template: str, variables: dict) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True)
    env.filters["to_nice_yaml"] = lambda v, indent=2: yaml.safe_dump(v, indent=indent, sort_keys=False)
    return env.from_string((ROLE / "templates" / template).read_text()).render(**variables)


def role_defaults() -> dict:
    return yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())


def test_playbook_syntax():
    r = subprocess.run(
        [BIN / "ansible-playbook", "--syntax-check", "-i", "localhost,", "site.yml"],
        cwd=ROOT / "ansible",
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_rendered_config_is_valid(tmp_path):
    variables = role_defaults()
    variables["spinnaker_jupyter_config"]["data_dir"] = str(tmp_path / "data")
    (tmp_path / "config.yaml").write_text(render("config.yaml.j2", variables))
    r = subprocess.run(
        [BIN / "spinnaker-jupyter", "check", "-c", tmp_path / "config.yaml"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def test_unit_keeps_sessions_only_when_asked():
    variables = role_defaults()
    assert "KillMode=process" in render("spinnaker-jupyter.service.j2", variables)  # defaults keep sessions
    variables["spinnaker_jupyter_config"]["hub"]["stop_servers_on_exit"] = True
    assert "KillMode=mixed" in render("spinnaker-jupyter.service.j2", variables)


def test_secrets_file_holds_what_the_vault_gives():
    text = render("secrets.env.j2", {"spinnaker_jupyter_secrets": {"EBRAINS_CLIENT_SECRET": "x1", "B": "y"}})
    assert "EBRAINS_CLIENT_SECRET=x1" in text.splitlines() and "B=y" in text.splitlines()


def test_example_config_is_valid():
    r = subprocess.run(
        [BIN / "spinnaker-jupyter", "check", "-c", ROOT / "config.example.yaml"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
