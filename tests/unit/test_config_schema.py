"""Validation of the deployment config: a wrong key, type or value gives one clear line naming the key and the fix.

The file is loaded as `spinnaker-jupyter` loads it (config.load); no hub, no subprocess. Messages as the operator
sees them through `spinnaker-jupyter check` (one line on stderr, no traceback) are tested in tests/integration/test_config.py.
"""

from __future__ import annotations

import pytest
import yaml

from spinnaker_jupyter import config
from spinnaker_jupyter.config import ConfigError
from spinnaker_jupyter.schema import SCHEMA


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def strict_sections(schema: dict = SCHEMA, path: tuple = ()) -> list[tuple]:
    """Every section (at any depth) that refuses keys it does not know."""
    found = [path] if schema.get("additionalProperties") is False else []
    for key, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object":
            found += strict_sections(sub, (*path, key))
    return found


def nest(path: tuple, leaf: dict) -> dict:
    for key in reversed(path):
        leaf = {key: leaf}
    return leaf


@pytest.mark.parametrize("section", strict_sections(), ids=lambda p: ".".join(p) or "(top level)")
def test_an_unknown_key_in_any_section_is_one_line_naming_it(tmp_path, section):
    path = write(tmp_path, nest(section, {"no_such_key": 1}))
    with pytest.raises(ConfigError) as e:
        config.load([path])
    message = str(e.value)
    full = ".".join((*section, "no_such_key"))
    assert message.splitlines() == [message] and message.startswith(f"{full}: unknown key")
    assert "Allowed here:" in message and str(path) in message  # what to write instead, and in which file


def test_every_strict_section_is_found():
    """(So that the test above covers the schema: its sections, nested ones included.)"""
    names = {".".join(s) for s in strict_sections()}
    assert {
        "",
        "hub",
        "hub.tls",
        "proxy",
        "auth.ebrains",
        "spawner.docker",
        "spawner.slurm",
        "culler.kernels",
        "spinnaker.spalloc",
        "git_kernel",
        "drive",
        "jobs",
        "jobs.limits",
    } <= names


def test_unknown_key_names_its_path_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load([write(tmp_path, {"hub": {"prot": 8000}})])
    msg = str(e.value)
    assert "hub.prot: unknown key" in msg and "did you mean 'port'" in msg and "c.yaml" in msg


def test_two_mistakes_are_two_lines(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load([write(tmp_path, {"hub": {"prot": 8000}, "culler": {"timeout": "soon"}})])
    lines = str(e.value).splitlines()
    assert (
        len(lines) == 2
        and lines[0].startswith("culler.timeout: expected integer")
        and lines[1].startswith("hub.prot: unknown key")
    )


def test_wrong_type_says_what_was_expected(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load([write(tmp_path, {"culler": {"timeout": "an hour"}})])
    assert "culler.timeout: expected integer, got 'an hour'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config.load([write(tmp_path, {"spinnaker": {"mode": "hardware"}})])
    assert "spinnaker.mode: expected one of 'virtual', 'machine'" in str(e.value)


def test_a_wrong_value_in_a_list_names_its_place(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load([write(tmp_path, {"proxy_ports": [9000, "http"]})])
    assert str(e.value).startswith("proxy_ports.1: expected integer, got 'http'")


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


def test_drive_needs_ebrains_login_and_the_job_port_must_be_free_of_the_others(tmp_path):
    with pytest.raises(ConfigError, match=r"^drive.enabled: .*set auth.type: ebrains"):
        config.load([write(tmp_path, {"drive": {"enabled": True}})])
    with pytest.raises(ConfigError, match=r"jobs.port must all be different ports"):
        config.load([write(tmp_path, {"jobs": {"enabled": True, "port": 8000}, "hub": {"port": 8000}})])


def test_an_empty_or_short_secret_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("CONFIGPROXY_AUTH_TOKEN", raising=False)
    d = config.load([write(tmp_path, {})])
    d.private_hub_dir()
    token = d.hub_dir / "proxy_auth_token"
    token.write_text("")  # what a failed write after an exclusive create used to leave
    token.chmod(0o600)
    with pytest.raises(ConfigError) as e:
        d.secret("proxy_auth_token")
    assert str(token) in str(e.value) and "too few for a secret" in str(e.value) and f"remove {token}" in str(e.value)
    monkeypatch.setenv("CONFIGPROXY_AUTH_TOKEN", "short")
    with pytest.raises(ConfigError, match="CONFIGPROXY_AUTH_TOKEN: holds 5 characters"):
        d.secret("proxy_auth_token")


def test_a_crypt_key_that_is_not_32_hex_bytes_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_CRYPT_KEY", raising=False)
    d = config.load([write(tmp_path, {})])
    monkeypatch.setenv("JUPYTERHUB_CRYPT_KEY", "not-hex-but-long-enough-" * 3)
    with pytest.raises(
        ConfigError,
        match="JUPYTERHUB_CRYPT_KEY: the key that encrypts users' tokens must be 64 "
        "hexadecimal characters .* `openssl rand -hex 32`",
    ):
        d.secret("crypt_key")
    monkeypatch.delenv("JUPYTERHUB_CRYPT_KEY")
    assert bytes.fromhex(d.secret("crypt_key")) and len(d.secret("crypt_key")) == 64  # the generated one
