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


# --- issue 10: secrets in the wrong place, bad input at start (one line, no traceback) ---------------------------
def check(path, env=None):
    import os

    return subprocess.run([BIN / "spinnaker-jupyter", "check", "-c", path], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})})


def refused(r, *words):
    """`check` failed with one line that holds `words` and no traceback."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    return r.stderr


@pytest.mark.parametrize("cfg, key, points_to", [
    ({"spinnaker": {"mode": "per-run", "spalloc": {"url": "https://alice:Hunter2-pw@spalloc.example.org/"}}},
     "spinnaker.spalloc.url", "SPALLOC_TOKEN"),
    ({"spinnaker": {"mode": "per-run", "spalloc": {"url": "https://spalloc.example.org/?token=Hunter2-pw"}}},
     "spinnaker.spalloc.url", "spinnaker.spalloc.token_file"),
    ({"spinnaker": {"extra_cfg": {"Machine": {"spalloc_password": "Hunter2-pw"}}}},
     "spinnaker.extra_cfg.Machine.spalloc_password", "SPALLOC_TOKEN"),
    ({"spinnaker": {"extra_cfg": {"Machine": {"spalloc_server": "https://bob:Hunter2-pw@spalloc.example.org"}}}},
     "spinnaker.extra_cfg.Machine.spalloc_server", "readable by every user"),
    ({"hub": {"db_url": "postgresql://hub:Hunter2-pw@db.example.org/hub"}}, "hub.db_url", "SPINNAKER_JUPYTER_DB_URL"),
])
def test_credentials_in_urls_and_cfg_values_are_refused(tmp_path, cfg, key, points_to):
    err = refused(check(write(tmp_path, cfg)), key + ":", points_to)
    assert "Hunter2-pw" not in err  # the message never repeats the secret


def test_config_never_prints_a_password(tmp_path):
    path = write(tmp_path, {"hub": {"db_url": "postgresql://hub:Hunter2-pw@db.example.org/hub"}})
    r = subprocess.run([BIN / "spinnaker-jupyter", "config", "-c", path], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "Hunter2-pw" not in r.stdout + r.stderr
    # a URL without a password is printed as given; redaction masks any that would be
    ok = subprocess.run([BIN / "spinnaker-jupyter", "config", "-c", write(tmp_path, {"hub": {
        "db_url": "postgresql://hub@db.example.org/hub"}})], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "postgresql://hub@db.example.org/hub" in ok.stdout
    assert "Hunter2-pw" not in str(config.redacted({"u": "https://a:Hunter2-pw@h/", "password": "Hunter2-pw"}))


def test_the_generated_spynnaker_cfg_holds_no_secret_and_is_replaced_whole(tmp_path):
    from spinnaker_jupyter import kernels

    d = config.load([write(tmp_path, {"spinnaker": {"mode": "per-run", "spalloc": {
        "url": "https://spalloc.example.org/", "group": "g"}}})])
    path = kernels.write_spynnaker_cfg(d)
    assert path.stat().st_mode & 0o777 == 0o644  # every user's kernel reads it ...
    assert "spalloc_server = https://spalloc.example.org/" in path.read_text()  # ... so only what may be public
    assert [p.name for p in path.parent.iterdir()] == [".spynnaker.cfg"]  # no temporary file left


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


def test_a_failed_secret_write_leaves_no_file(tmp_path, monkeypatch):
    """A full disk while the token is written: an error naming the file, and no empty token left behind."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    monkeypatch.delenv("CONFIGPROXY_AUTH_TOKEN", raising=False)
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", mnt], check=True)
    try:
        d = config.load([write(tmp_path, {"data_dir": str(mnt / "data")})])
        d.private_hub_dir()
        with open(mnt / "filler", "wb", buffering=0) as f:  # fill the disk
            with pytest.raises(OSError):
                while True:
                    f.write(b"x" * 1024)
        with pytest.raises(ConfigError, match="cannot write the secret .*proxy_auth_token: No space left"):
            d.secret("proxy_auth_token")
        assert list(d.hub_dir.iterdir()) == []
        (mnt / "filler").unlink()
        assert len(d.secret("proxy_auth_token")) == 64  # next start: a whole one
    finally:
        subprocess.run(["umount", mnt], check=True)


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "world-readable"])
def test_client_secret_file_problems_are_one_line(tmp_path, monkeypatch, kind):
    monkeypatch.delenv("EBRAINS_CLIENT_SECRET", raising=False)
    secret = tmp_path / "client-secret"
    if kind == "folder":
        secret.mkdir()
    elif kind != "missing":
        secret.write_text("" if kind == "empty" else "a-real-client-secret\n")
        secret.chmod(0o600 if kind == "empty" else 0o644)
    cfg = {"auth": {"type": "ebrains", "ebrains": {"client_id": "x", "allow_all": True,
                                                   "client_secret_file": str(secret)}}}
    err = refused(check(write(tmp_path, cfg)), "auth.ebrains.client_secret_file", str(secret))
    assert {"missing": "no such file", "folder": "is a folder", "empty": "is empty",
            "world-readable": "chmod 600"}[kind] in err


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("hub:\n  log_level: INFO  # caf\xe9\n".encode("latin-1"))
    refused(check(path), str(path), "not UTF-8", "save it as UTF-8")


def test_yaml_aliases_are_refused_quickly(tmp_path):
    """The 'billion laughs': under 1 KB of nested aliases that expand to 10^9 nodes."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = write(tmp_path, "\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1024
    import time

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"line 2, column .*aliases \(\*name\) are not allowed"):
        config.load([bomb])
    assert time.monotonic() - t0 < 1  # it used to run for over a minute
    refused(check(bomb), "aliases (*name) are not allowed")


def test_a_crypt_key_that_is_not_32_hex_bytes_is_one_line(tmp_path, monkeypatch):
    d = config.load([write(tmp_path, {})])
    monkeypatch.setenv("JUPYTERHUB_CRYPT_KEY", "not-hex-but-long-enough-" * 3)
    with pytest.raises(ConfigError, match="JUPYTERHUB_CRYPT_KEY: the key that encrypts users' tokens must be 64 "
                                          "hexadecimal characters .* `openssl rand -hex 32`"):
        d.secret("crypt_key")
    monkeypatch.delenv("JUPYTERHUB_CRYPT_KEY")
    assert bytes.fromhex(d.secret("crypt_key")) and len(d.secret("crypt_key")) == 64  # the generated one


def test_drive_needs_ebrains_login_and_the_job_port_must_be_free_of_the_others(tmp_path):
    with pytest.raises(ConfigError, match=r"^drive.enabled: .*set auth.type: ebrains"):
        config.load([write(tmp_path, {"drive": {"enabled": True}})])
    with pytest.raises(ConfigError, match=r"jobs.port must all be different ports"):
        config.load([write(tmp_path, {"jobs": {"enabled": True, "port": 8000}, "hub": {"port": 8000}})])
