"""The deployment config: layering, strict validation with actionable messages, secrets, and `check`."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from conftest import BIN
from spinnaker_jupyter import config
from spinnaker_jupyter.config import ConfigError


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_check_command(tmp_path):
    good = subprocess.run(
        [BIN / "spinnaker-jupyter", "check", "-c", write(tmp_path, {"hub": {"port": 8100}})],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0 and "config OK" in good.stdout
    bad = subprocess.run(
        [BIN / "spinnaker-jupyter", "check", "-c", write(tmp_path, {"hub": {"port": "x"}})],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "hub.port: expected integer" in bad.stderr
    assert not (tmp_path / "data").exists()  # check starts nothing and writes nothing


def test_reference_lists_every_key():
    out = subprocess.run([BIN / "spinnaker-jupyter", "config", "--reference"], capture_output=True, text=True).stdout
    for key in ("hub.port", "auth.type", "culler.timeout", "spinnaker.mode", "nrp.command", "proxy_ports"):
        assert f"\n{key} (default" in "\n" + out, key


def test_shared_account_mode_is_said_plainly(tmp_path, capsys, envs_dir):
    from spinnaker_jupyter import cli

    d = config.load(
        [write(tmp_path, {"spawner": {"local": {"system_users": False}}, "kernels": {"envs_dir": str(envs_dir)}})]
    )
    cli.prepare(d, build=False)
    out = capsys.readouterr().out
    assert "all users' servers run as this one account" in out and "can read each other's files" in out


def test_docker_mode_names_an_unreachable_engine(tmp_path):
    cfg = write(tmp_path, {"spawner": {"type": "docker", "docker": {"engine_url": f"unix://{tmp_path}/none.sock"}}})
    r = subprocess.run([BIN / "spinnaker-jupyter", "up", "-c", cfg], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach the container engine" in r.stderr and "engine_url" in r.stderr


# --- issue 10: secrets in the wrong place, bad input at start (one line, no traceback) ---------------------------
def check(path, env=None):
    import os

    return subprocess.run(
        [BIN / "spinnaker-jupyter", "check", "-c", path],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def refused(r, *words):
    """`check` failed with one line that holds `words` and no traceback."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    return r.stderr


@pytest.mark.parametrize(
    "cfg, key, points_to",
    [
        (
            {"spinnaker": {"mode": "per-run", "spalloc": {"url": "https://alice:Hunter2-pw@spalloc.example.org/"}}},
            "spinnaker.spalloc.url",
            "SPALLOC_TOKEN",
        ),
        (
            {"spinnaker": {"mode": "per-run", "spalloc": {"url": "https://spalloc.example.org/?token=Hunter2-pw"}}},
            "spinnaker.spalloc.url",
            "spinnaker.spalloc.token_file",
        ),
        (
            {"spinnaker": {"extra_cfg": {"Machine": {"spalloc_password": "Hunter2-pw"}}}},
            "spinnaker.extra_cfg.Machine.spalloc_password",
            "SPALLOC_TOKEN",
        ),
        (
            {"spinnaker": {"extra_cfg": {"Machine": {"spalloc_server": "https://bob:Hunter2-pw@spalloc.example.org"}}}},
            "spinnaker.extra_cfg.Machine.spalloc_server",
            "readable by every user",
        ),
        (
            {"hub": {"db_url": "postgresql://hub:Hunter2-pw@db.example.org/hub"}},
            "hub.db_url",
            "SPINNAKER_JUPYTER_DB_URL",
        ),
    ],
)
def test_credentials_in_urls_and_cfg_values_are_refused(tmp_path, cfg, key, points_to):
    err = refused(check(write(tmp_path, cfg)), key + ":", points_to)
    assert "Hunter2-pw" not in err  # the message never repeats the secret


def test_config_never_prints_a_password(tmp_path):
    path = write(tmp_path, {"hub": {"db_url": "postgresql://hub:Hunter2-pw@db.example.org/hub"}})
    r = subprocess.run([BIN / "spinnaker-jupyter", "config", "-c", path], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "Hunter2-pw" not in r.stdout + r.stderr
    # a URL without a password is printed as given; redaction masks any that would be
    ok = subprocess.run(
        [
            BIN / "spinnaker-jupyter",
            "config",
            "-c",
            write(tmp_path, {"hub": {"db_url": "postgresql://hub@db.example.org/hub"}}),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and "postgresql://hub@db.example.org/hub" in ok.stdout
    assert "Hunter2-pw" not in str(config.redacted({"u": "https://a:Hunter2-pw@h/", "password": "Hunter2-pw"}))


def test_the_generated_spynnaker_cfg_holds_no_secret_and_is_replaced_whole(tmp_path):
    from spinnaker_jupyter import kernels

    d = config.load(
        [
            write(
                tmp_path,
                {"spinnaker": {"mode": "per-run", "spalloc": {"url": "https://spalloc.example.org/", "group": "g"}}},
            )
        ]
    )
    path = kernels.write_spynnaker_cfg(d)
    assert path.stat().st_mode & 0o777 == 0o644  # every user's kernel reads it ...
    assert "spalloc_server = https://spalloc.example.org/" in path.read_text()  # ... so only what may be public
    assert [p.name for p in path.parent.iterdir()] == [".spynnaker.cfg"]  # no temporary file left


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
    cfg = {
        "auth": {"type": "ebrains", "ebrains": {"client_id": "x", "allow_all": True, "client_secret_file": str(secret)}}
    }
    err = refused(check(write(tmp_path, cfg)), "auth.ebrains.client_secret_file", str(secret))
    assert {"missing": "no such file", "folder": "is a folder", "empty": "is empty", "world-readable": "chmod 600"}[
        kind
    ] in err


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

    t0 = time.thread_time()  # CPU time of this thread, which does the parsing: other load on the machine adds none
    with pytest.raises(ConfigError, match=r"line 2, column .*aliases \(\*name\) are not allowed"):
        config.load([bomb])
    assert time.thread_time() - t0 < 1  # it used to run for over a minute
    refused(check(bomb), "aliases (*name) are not allowed")
