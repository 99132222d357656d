"""Loading the deployment config: defaults, layered files, paths relative to the file, generated secrets."""

from __future__ import annotations

import yaml

from spinnaker_jupyter import config


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


def test_generated_secrets_are_private_and_stable(tmp_path, monkeypatch):
    monkeypatch.delenv("CONFIGPROXY_AUTH_TOKEN", raising=False)
    d = config.load([write(tmp_path, {})])
    token = d.secret("proxy_auth_token")
    assert len(token) == 64 and d.secret("proxy_auth_token") == token
    assert (d.hub_dir / "proxy_auth_token").stat().st_mode & 0o777 == 0o600


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
