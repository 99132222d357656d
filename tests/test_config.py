"""The deployment config: layering, strict validation with actionable messages, secrets, and `check`."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from spinnaker_jupyter import config
from spinnaker_jupyter.config import ConfigError

from conftest import BIN


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_good_file_layers_over_defaults(tmp_path):
    d = config.load([write(tmp_path, {"hub": {"port": 9999}, "culler": {"timeout": 7200}})])
    assert d["hub"]["port"] == 9999 and d["hub"]["ip"] == "127.0.0.1"  # the rest keeps its default
    assert d["culler"]["timeout"] == 7200 and d["culler"]["enabled"] is True
    assert d.data_dir == (tmp_path / "data").resolve()  # relative to the config file, not the working folder


def test_later_files_win(tmp_path):
    a = write(tmp_path, {"hub": {"port": 9001}, "spinnaker": {"version": 3}}, "a.yaml")
    b = write(tmp_path, {"hub": {"port": 9002}}, "b.yaml")
    d = config.load([a, b])
    assert d["hub"]["port"] == 9002 and d["spinnaker"]["version"] == 3


def test_unknown_key_names_its_path_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load([write(tmp_path, {"hub": {"prot": 8000}})])
    msg = str(e.value)
    assert "hub.prot: unknown key" in msg and "did you mean 'port'" in msg and "c.yaml" in msg


def test_wrong_type_says_what_was_expected(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load([write(tmp_path, {"culler": {"timeout": "an hour"}})])
    assert "culler.timeout: expected integer, got 'an hour'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config.load([write(tmp_path, {"spinnaker": {"mode": "hardware"}})])
    assert "spinnaker.mode: expected one of 'virtual', 'machine'" in str(e.value)


def test_missing_secret_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("EBRAINS_CLIENT_SECRET", raising=False)
    cfg = {"auth": {"type": "ebrains", "ebrains": {"client_id": "spinnaker-jupyter", "allow_all": True}}}
    with pytest.raises(ConfigError) as e:
        config.load([write(tmp_path, cfg)])
    assert "auth.ebrains.client_secret: missing" in str(e.value) and "EBRAINS_CLIENT_SECRET" in str(e.value)
    monkeypatch.setenv("EBRAINS_CLIENT_SECRET", "from-the-environment")
    assert config.load([write(tmp_path, cfg)]).ebrains_client_secret() == "from-the-environment"


def test_secret_in_the_file_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load([write(tmp_path, {"auth": {"ebrains": {"client_secret": "s3cr3t-value"}}})])
    assert "secrets do not belong in the config file" in str(e.value)


def test_rules_across_keys(tmp_path):
    with pytest.raises(ConfigError, match="machine_name: required"):
        config.load([write(tmp_path, {"spinnaker": {"mode": "machine"}})])
    with pytest.raises(ConfigError, match="must include nrp.port"):
        config.load([write(tmp_path, {"proxy_ports": [8888]})])


def test_not_yaml_and_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load([write(tmp_path, "hub: [unclosed")])
    with pytest.raises(ConfigError, match="expected a mapping"):
        config.load([write(tmp_path, "- just\n- a list\n")])


def test_generated_secrets_are_private_and_stable(tmp_path, monkeypatch):
    monkeypatch.delenv("CONFIGPROXY_AUTH_TOKEN", raising=False)
    d = config.load([write(tmp_path, {})])
    token = d.secret("proxy_auth_token")
    assert len(token) == 64 and d.secret("proxy_auth_token") == token
    assert (d.hub_dir / "proxy_auth_token").stat().st_mode & 0o777 == 0o600


def test_check_command(tmp_path):
    good = subprocess.run([BIN / "spinnaker-jupyter", "check", "-c", write(tmp_path, {"hub": {"port": 8100}})],
                          capture_output=True, text=True)
    assert good.returncode == 0 and "config OK" in good.stdout
    bad = subprocess.run([BIN / "spinnaker-jupyter", "check", "-c", write(tmp_path, {"hub": {"port": "x"}})],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "hub.port: expected integer" in bad.stderr
    assert not (tmp_path / "data").exists()  # check starts nothing and writes nothing


def test_reference_lists_every_key():
    out = subprocess.run([BIN / "spinnaker-jupyter", "config", "--reference"], capture_output=True, text=True).stdout
    for key in ("hub.port", "auth.type", "culler.timeout", "spinnaker.mode", "nrp.command", "proxy_ports"):
        assert f"\n{key} (default" in "\n" + out, key


def test_shared_account_mode_is_said_plainly(tmp_path, capsys, envs_dir):
    from spinnaker_jupyter import cli

    d = config.load([write(tmp_path, {"spawner": {"local": {"system_users": False}},
                                      "kernels": {"envs_dir": str(envs_dir)}})])
    cli.prepare(d, build=False)
    out = capsys.readouterr().out
    assert "all users' servers run as this one account" in out and "can read each other's files" in out


def test_docker_mode_names_an_unreachable_engine(tmp_path):
    cfg = write(tmp_path, {"spawner": {"type": "docker", "docker": {"engine_url": f"unix://{tmp_path}/none.sock"}}})
    r = subprocess.run([BIN / "spinnaker-jupyter", "up", "-c", cfg], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach the container engine" in r.stderr and "engine_url" in r.stderr


def test_without_a_config_file_the_hub_finds_the_same_data(tmp_path, monkeypatch):
    """`up` starts the hub in data_dir/hub: relative paths must still resolve where `up` resolved them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(config.BASE_DIR_ENV, raising=False)
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    outside = config.load([])
    monkeypatch.setenv(config.BASE_DIR_ENV, str(outside.base_dir))
    (tmp_path / "data" / "hub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "data" / "hub")  # where the hub runs
    assert config.load([]).data_dir == outside.data_dir == (tmp_path / "data").resolve()
