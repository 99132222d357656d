"""The deployment config -> JupyterHub settings mapping, section by section, without a hub.

Each test writes the YAML an operator would write into a tmp file, loads it as `spinnaker-jupyter` does
(config.load: defaults, validation, cross-key rules) and applies it with hubconfig.apply onto a bare traitlets
Config, then asserts the settings that key must produce (the model: the-littlest-jupyterhub's
tests/test_configurer.py). Booting a hub with the same settings is the integration lane's job.
"""

from __future__ import annotations

import ast
import json
import os
import sqlite3
import sys

import pytest
from traitlets.config import Config

from spinnaker_jupyter import config, hubconfig
from spinnaker_jupyter.spawn_queue import forked_concurrency

SECRET = "s" * 40
CRYPT_KEY = "ab" * 32
EBRAINS = {"type": "ebrains", "ebrains": {"client_id": "spinnaker-jupyter", "allowed_groups": ["neuro"]}}


@pytest.fixture(autouse=True)
def _secrets_from_the_environment(monkeypatch):
    """The hub's secrets as an operator passes them (never in the config file)."""
    monkeypatch.setenv("EBRAINS_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("JUPYTERHUB_CRYPT_KEY", CRYPT_KEY)
    monkeypatch.setenv("SPALLOC_TOKEN", "t" * 40)
    monkeypatch.delenv("CONFIGPROXY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("SPINNAKER_JUPYTER_DB_URL", raising=False)


@pytest.fixture
def apply(write_config):
    """apply(yaml_dict) -> (c, deployment): the operator's file applied onto a bare Config."""

    def run(values: dict) -> tuple[Config, config.Deployment]:
        d = config.load([write_config(values)])
        c = Config()
        hubconfig.apply(c, d)
        return c, d

    return run


def service(c, name: str) -> dict | None:
    return next((s for s in c.JupyterHub.services if s["name"] == name), None)


def role(c, name: str) -> dict | None:
    return next((r for r in c.JupyterHub.load_roles if r["name"] == name), None)


def server_settings(c) -> dict:
    """The `--ServerApp.tornado_settings=...` every user server is started with, as traitlets reads it."""
    given = [a.split("=", 1)[1] for a in c.Spawner.args if a.startswith("--ServerApp.tornado_settings=")]
    assert len(given) <= 1, c.Spawner.args
    return ast.literal_eval(given[0]) if given else {}


# --- hub: ---------------------------------------------------------------------------------------------------------
def test_defaults_give_a_local_hub_on_port_8000(apply):
    c, d = apply({})
    assert c.JupyterHub.bind_url == "http://127.0.0.1:8000/"
    assert (c.JupyterHub.hub_ip, c.JupyterHub.hub_port) == ("127.0.0.1", 8081)
    assert c.JupyterHub.db_url == f"sqlite:///{d.hub_dir / 'jupyterhub.sqlite'}"
    assert c.JupyterHub.cookie_secret_file == str(d.hub_dir / "jupyterhub_cookie_secret")
    assert c.JupyterHub.allow_named_servers is True and c.JupyterHub.named_server_limit_per_user == 3
    assert c.JupyterHub.cleanup_servers is True  # local servers are the hub's children
    assert c.JupyterHub.log_level == "INFO"
    assert c.JupyterHub.authenticator_class == "spinnaker_jupyter.local_accounts.LocalAccountsAuthenticator"
    assert c.Authenticator.admin_users == {"admin"}
    assert c.JupyterHub.spawner_class == "spinnaker_jupyter.spawner.SpiNNakerLocalSpawner"
    assert c.Spawner.default_url == "/lab" and c.Spawner.start_timeout == 300
    assert "mem_limit" not in c.Spawner and "cpu_limit" not in c.Spawner
    assert "ssl_cert" not in c.JupyterHub
    assert d.hub_dir.stat().st_mode & 0o777 == 0o700  # the hub's folder, private


def test_hub_section(apply):
    c, d = apply(
        {
            "hub": {
                "ip": "0.0.0.0",
                "port": 9443,
                "base_url": "/spinnaker/",
                "admin_users": ["alice"],
                "allow_named_servers": False,
                "named_server_limit": 5,
                "log_level": "DEBUG",
                "start_timeout": 120,
                "stop_servers_on_exit": False,
            }
        }
    )
    assert c.JupyterHub.bind_url == "http://0.0.0.0:9443/spinnaker/"
    assert c.Authenticator.admin_users == {"alice", "admin"}  # and the local admin account
    assert c.JupyterHub.allow_named_servers is False and c.JupyterHub.named_server_limit_per_user == 5
    assert c.JupyterHub.log_level == "DEBUG"
    assert c.Spawner.start_timeout == 120
    assert c.JupyterHub.cleanup_servers is False


def test_servers_outlive_the_hub_by_default_only_in_containers(apply):
    assert apply({"spawner": {"type": "docker"}})[0].JupyterHub.cleanup_servers is False
    assert (
        apply({"spawner": {"type": "docker"}, "hub": {"stop_servers_on_exit": True}})[0].JupyterHub.cleanup_servers
        is True
    )


def test_the_hub_database_commits_without_waiting_for_the_disk(apply, monkeypatch, tmp_path):
    kwargs = apply({})[0].JupyterHub.db_kwargs
    assert kwargs["connect_args"]["check_same_thread"] is False  # (JupyterHub's own setting for SQLite, kept)
    con = sqlite3.connect(tmp_path / "hub.sqlite", **kwargs["connect_args"])
    try:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert con.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    finally:
        con.close()
    monkeypatch.setenv("SPINNAKER_JUPYTER_DB_URL", "postgresql://hub@db/hub")
    assert apply({})[0].JupyterHub.db_kwargs == {}


def test_database_url_from_the_file_or_the_environment(apply, monkeypatch):
    assert apply({"hub": {"db_url": "sqlite:////srv/hub.sqlite"}})[0].JupyterHub.db_url == "sqlite:////srv/hub.sqlite"
    monkeypatch.setenv("SPINNAKER_JUPYTER_DB_URL", "postgresql://hub@db/hub")  # (a password goes only here)
    assert apply({})[0].JupyterHub.db_url == "postgresql://hub@db/hub"


# --- proxy: and hub.tls / hub.frame_ancestors -------------------------------------------------------------------
def test_proxy_section(apply):
    c, d = apply({"proxy": {"command": ["/opt/chp/bin/configurable-http-proxy"], "api_port": 7001, "hub_port": 7002}})
    assert c.ConfigurableHTTPProxy.command == ["/opt/chp/bin/configurable-http-proxy"]
    assert c.ConfigurableHTTPProxy.api_url == "http://127.0.0.1:7001"
    assert c.JupyterHub.hub_port == 7002
    assert c.JupyterHub.proxy_class == "spinnaker_jupyter.proxy.CheckedProxy"
    token = c.ConfigurableHTTPProxy.auth_token
    assert len(token) == 64 and (d.hub_dir / "proxy_auth_token").read_text().strip() == token  # generated, kept
    assert c.ConfigurableHTTPProxy.pid_file == str(d.hub_dir / "proxy.pid")


def test_default_proxy_is_the_projects_pinned_one(apply):
    c, _ = apply({})
    assert c.ConfigurableHTTPProxy.command == [
        str(config.PROJECT_ROOT / "node_modules" / ".bin" / "configurable-http-proxy")
    ]


@pytest.fixture
def certificate(tmp_path):
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)
    return cert, key


def test_tls_serves_https_with_hsts_and_redirects_plain_http(apply, certificate):
    cert, key = certificate
    c, _ = apply(
        {
            "hub": {
                "port": 443,
                "tls": {"cert_file": str(cert), "key_file": str(key), "http_redirect_port": 80, "hsts_max_age": 600},
            }
        }
    )
    assert c.JupyterHub.bind_url == "https://127.0.0.1:443/"
    assert (c.JupyterHub.ssl_cert, c.JupyterHub.ssl_key) == (str(cert), str(key))
    assert c.ConfigurableHTTPProxy.command[-2:] == ["--redirect-port", "80"]
    hsts = {"Strict-Transport-Security": "max-age=600"}
    assert c.JupyterHub.tornado_settings["headers"] == hsts
    assert server_settings(c) == {"headers": hsts}  # user servers say it too


def test_plain_http_sends_no_hsts(apply):
    c, _ = apply({})
    assert "headers" not in c.JupyterHub.tornado_settings and server_settings(c) == {}


def test_frame_ancestors_over_https_allow_framing_with_cross_site_cookies(apply, monkeypatch):
    from spinnaker_jupyter_ext import framing

    framed = []  # the hub's own process frames its cookies (tornado, patched: not in this test process)
    monkeypatch.setattr(framing, "frame_cookies", lambda: framed.append(True))
    c, _ = apply(
        {
            "hub": {
                "public_url": "https://hub.example.org/",
                "frame_ancestors": ["https://wiki.ebrains.eu"],
                "tls": {"hsts_max_age": 0},
            }
        }
    )
    csp = {"Content-Security-Policy": "frame-ancestors 'self' https://wiki.ebrains.eu"}
    assert c.JupyterHub.tornado_settings["headers"] == csp
    cookies = c.JupyterHub.tornado_settings["cookie_options"]
    assert cookies == {"samesite": "None", "secure": True, "partitioned": True} and framed
    servers = server_settings(c)
    assert servers["headers"] == csp and servers["xsrf_cookie_kwargs"] == cookies


def test_frame_ancestors_over_plain_http_set_the_header_but_no_cookie_options(apply, capsys):
    c, _ = apply({"hub": {"frame_ancestors": ["https://wiki.ebrains.eu"]}})
    assert c.JupyterHub.tornado_settings["headers"]["Content-Security-Policy"].endswith("https://wiki.ebrains.eu")
    assert "cookie_options" not in c.JupyterHub.tornado_settings
    assert "logging in inside its frame fails over plain HTTP" in capsys.readouterr().out  # the operator is told


# --- culler: ------------------------------------------------------------------------------------------------------
def test_culler_section(apply):
    c, _ = apply(
        {
            "culler": {
                "timeout": 600,
                "every": 60,
                "max_age": 7200,
                "kernels": {"timeout": 900, "every": 30, "connected": True},
            }
        }
    )
    assert service(c, "idle-culler")["command"] == [
        sys.executable,
        "-m",
        "jupyterhub_idle_culler",
        "--timeout=600",
        "--cull-every=60",
        "--max-age=7200",
    ]
    assert set(role(c, "idle-culler")["scopes"]) == {
        "list:users",
        "read:users:activity",
        "read:servers",
        "delete:servers",
    }
    assert c.JupyterHub.activity_resolution == 30  # (600 // 6 capped at JupyterHub's default)
    assert "--JupyterHubSingleUser.hub_activity_interval=100" in c.Spawner.args
    assert {
        "--MappingKernelManager.cull_idle_timeout=900",
        "--MappingKernelManager.cull_interval=30",
        "--MappingKernelManager.cull_busy=False",
        "--MappingKernelManager.cull_connected=True",
    } <= set(c.Spawner.args)


def test_culler_defaults_cull_servers_after_an_hour_and_leave_kernels_alone(apply):
    c, _ = apply({})
    assert "--timeout=3600" in service(c, "idle-culler")["command"]
    assert not any(a.startswith("--max-age") for a in service(c, "idle-culler")["command"])
    assert not any(a.startswith("--MappingKernelManager.") for a in c.Spawner.args)


def test_culler_disabled(apply):
    c, _ = apply({"culler": {"enabled": False, "kernels": {"timeout": 600}}})
    assert service(c, "idle-culler") is None and role(c, "idle-culler") is None
    assert not any("hub_activity_interval" in a for a in c.Spawner.args)
    assert "--MappingKernelManager.cull_idle_timeout=600" in c.Spawner.args  # kernels are culled on their own


# --- auth: --------------------------------------------------------------------------------------------------------
def test_local_accounts(apply):
    c, d = apply({"auth": {"local": {"admin": "teacher"}}})
    assert c.LocalAccountsAuthenticator.accounts_file == str(d.accounts_file)
    assert c.Authenticator.admin_users == {"teacher"}
    assert service(c, "account-manager")["api_token"]  # `user remove` goes through the hub with it
    assert "delete:users" in role(c, "account-manager")["scopes"]
    assert service(c, "access-token-service") is None


def test_ebrains_login(apply):
    c, _ = apply(
        {"auth": EBRAINS, "hub": {"public_url": "https://hub.example.org", "base_url": "/sp/", "admin_users": ["boss"]}}
    )
    a = c.EBRAINSAuthenticator
    assert c.JupyterHub.authenticator_class == "spinnaker_jupyter.ebrains.EBRAINSAuthenticator"
    assert (a.client_id, a.client_secret) == ("spinnaker-jupyter", SECRET)  # the secret from the environment
    keycloak = "https://iam.ebrains.eu/auth/realms/hbp/protocol/openid-connect"
    assert (a.authorize_url, a.token_url, a.userdata_url) == (
        f"{keycloak}/auth",
        f"{keycloak}/token",
        f"{keycloak}/userinfo",
    )
    assert a.oauth_callback_url == "https://hub.example.org/sp/hub/oauth_callback"
    assert a.allowed_groups == {"neuro"} and a.manage_groups is True
    assert a.auth_state_groups_key == "oauth_user.roles.group"
    assert a.enable_auth_state is True and a.refresh_pre_spawn is True
    assert c.Authenticator.admin_users == {"boss"}  # no local admin account with EBRAINS
    assert c.CryptKeeper["keys"] == [bytes.fromhex(CRYPT_KEY)]  # (`.keys` is the dict method)
    assert service(c, "account-manager") is None


def test_ebrains_hands_notebooks_the_users_token_through_the_token_service(apply):
    c, _ = apply({"auth": {"type": "ebrains", "ebrains": {**EBRAINS["ebrains"], "token_service_port": 8191}}})
    token_service = service(c, "access-token-service")
    assert token_service["url"] == "http://127.0.0.1:8191"
    assert set(role(c, "access-token-service")["scopes"]) == {"admin:auth_state", "read:users:name"}
    access = "access:services!service=access-token-service"
    assert role(c, "user")["scopes"] == ["self", access]
    assert access in c.Spawner.server_token_scopes
    env = c.Spawner.environment
    assert (env["JUPYTERHUB_SERVICE_HOST"], env["JUPYTERHUB_SERVICE_PORT"]) == ("127.0.0.1", "8191")
    assert "SPINNAKER_PROXY_PORTS" in env  # added to the user servers' environment, not instead of it


def test_ebrains_provider_urls_collabs_and_contact(apply):
    c, _ = apply(
        {
            "auth": {
                "type": "ebrains",
                "ebrains": {
                    "client_id": "x",
                    "issuer": "https://keycloak.example.org/realms/r",
                    "token_url": "https://tok.example.org/",
                    "allowed_collabs": {"my-collab": "viewer"},
                    "admin_collabs": {"ops": "administrator"},
                    "contact": "support@example.org",
                    "provider_timeout": 7,
                },
            }
        }
    )
    a = c.EBRAINSAuthenticator
    assert a.authorize_url == "https://keycloak.example.org/realms/r/protocol/openid-connect/auth"
    assert a.token_url == "https://tok.example.org/"
    assert a.allowed_collabs == {"my-collab": "viewer"} and a.admin_collabs == {"ops": "administrator"}
    assert a.allowed_groups == {"collab-my-collab-viewer"} and a.admin_groups == {"collab-ops-administrator"}
    assert "support@example.org" in a.custom_403_message and "collab" in a.custom_403_message
    assert a.http_request_kwargs == {"connect_timeout": 7, "request_timeout": 7}


def test_ebrains_allow_all_manages_no_groups(apply):
    c, _ = apply({"auth": {"type": "ebrains", "ebrains": {"client_id": "x", "allow_all": True}}})
    assert c.EBRAINSAuthenticator.allow_all is True and "manage_groups" not in c.EBRAINSAuthenticator


# --- spawner: -----------------------------------------------------------------------------------------------------
def test_local_spawner_section(apply):
    c, d = apply(
        {
            "spawner": {
                "mem_limit": "2G",
                "cpu_limit": 1.5,
                "process_limit": 99,
                "default_url": "/tree",
                "local": {"system_user_prefix": "sp-", "limits": "rlimits"},
                "start_queue": {"concurrency": 4, "limit": 10},
                "poll_interval": 11,
            }
        }
    )
    s = c.SpiNNakerLocalSpawner
    assert (s.homes_dir, s.logs_dir) == (str(d.homes_dir), str(d.logs_dir))
    assert (s.system_user_prefix, s.process_limit, s.limits_mode) == ("sp-", 99, "rlimits")
    assert s.system_users is (os.geteuid() == 0)  # "auto": one account per user when the hub runs as root
    assert (c.Spawner.mem_limit, c.Spawner.cpu_limit, c.Spawner.default_url) == ("2G", 1.5, "/tree")
    assert (c.SpawnQueue.concurrency, c.SpawnQueue.limit) == (4, 10)
    assert c.JupyterHub.concurrent_spawn_limit == 0  # the queue decides, not the stock throttle
    cores = len(os.sched_getaffinity(0))
    forked = apply({})[0].SpawnQueue  # forked starts (the default) wait a third of their time: more at once
    assert forked.concurrency == cores + max(1, cores // 2) and forked_concurrency(2) == 3
    assert "concurrency" not in apply({"spawner": {"local": {"fork_server": False}}})[0].SpawnQueue  # the cores
    assert c.Spawner.poll_interval == 11
    assert c.Spawner.cmd[:3] == [sys.executable, "-m", "spinnaker_jupyter.singleuser"]


def test_local_spawner_fork_server(apply):
    c, d = apply({"spawner": {"local": {"fork_server": True}}})
    assert c.SpiNNakerLocalSpawner.fork_server is True
    assert c.SpiNNakerLocalSpawner.fork_server_dir == str(d.hub_dir / "fork-server")  # in the hub's private folder
    c, _ = apply({})
    assert c.SpiNNakerLocalSpawner.fork_server is True  # on by default


def test_local_spawner_in_one_shared_account_as_root_allows_root(apply):
    c, _ = apply({"spawner": {"local": {"system_users": False}}})
    assert c.SpiNNakerLocalSpawner.system_users is False
    assert ("--allow-root" in c.Spawner.args) is (os.geteuid() == 0)


def test_docker_spawner_on_the_host_network(apply):
    c, _ = apply(
        {
            "spawner": {
                "type": "docker",
                "docker": {
                    "network": "host",
                    "engine_url": "unix:///run/podman/podman.sock",
                    "image": "img:1",
                    "images": {"sPyNNaker 7": "img:7"},
                    "labels": {"team": "neuro"},
                    "pull_policy": "never",
                },
            }
        }
    )
    s = c.SpiNNakerDockerSpawner
    assert c.JupyterHub.spawner_class == "spinnaker_jupyter.docker.SpiNNakerDockerSpawner"
    assert (s.image, s.allowed_images, s.pull_policy) == ("img:1", {"sPyNNaker 7": "img:7"}, "never")
    assert s.client_kwargs == {"base_url": "unix:///run/podman/podman.sock"}
    assert s.extra_create_kwargs == {"labels": {"team": "neuro"}}
    assert s.host_network is True and c.JupyterHub.hub_connect_ip == "127.0.0.1"
    assert s.volumes == {"spinnaker-jupyter-home-{username}": "/home/jovyan"} and s.remove is True
    assert c.SpawnQueue.limit == 200  # containers start through the queue too


def test_docker_spawner_on_its_own_network(apply):
    c, _ = apply(
        {
            "spawner": {
                "type": "docker",
                "mem_limit": "1G",
                "docker": {"hub_connect_host": "hubhost", "volume_prefix": "home-"},
            }
        }
    )
    s = c.SpiNNakerDockerSpawner
    assert s.network_name == "spinnaker-jupyter" and s.host_network is False
    assert (c.JupyterHub.hub_ip, c.JupyterHub.hub_connect_ip) == ("0.0.0.0", "hubhost")
    assert s.volumes == {"home-{username}": "/home/jovyan"}
    assert "client_kwargs" not in s and "allowed_images" not in s
    assert c.Spawner.mem_limit == "1G"
    assert "--allow-root" not in c.Spawner.args


def test_slurm_spawner_section(apply):
    c, d = apply(
        {
            "spawner": {
                "type": "slurm",
                "cpu_limit": 2.5,
                "mem_limit": "3G",
                "slurm": {
                    "partition": "gpu",
                    "account": "neuro",
                    "qos": "short",
                    "time": "8:00:00",
                    "extra_sbatch_options": ["--exclusive"],
                    "hub_connect_ip": "10.0.0.1",
                },
            }
        }
    )
    s = c.SpiNNakerSlurmSpawner
    assert c.JupyterHub.spawner_class == "spinnaker_jupyter.slurm.SpiNNakerSlurmSpawner"
    assert (s.req_partition, s.req_account, s.req_qos, s.req_runtime) == ("gpu", "neuro", "short", "8:00:00")
    assert (s.req_nprocs, s.req_memory) == ("3", "3G")  # whole CPUs for Slurm; the memory limit as the job's
    assert s.extra_sbatch_options == ["--exclusive"] and s.board_license == "spinnaker_board"
    assert (c.JupyterHub.hub_ip, c.JupyterHub.hub_connect_ip) == ("0.0.0.0", "10.0.0.1")
    assert s.homes_dir == str(d.homes_dir)
    assert "SpawnQueue" not in c  # Slurm queues its own jobs


# --- spinnaker: ---------------------------------------------------------------------------------------------------
def test_virtual_boards_by_default(apply):
    c, _ = apply({})
    assert c.BoardsMixin.board_mode == "virtual"
    assert "SpallocAllocator" not in c and c.Spawner.start_timeout == 300


def test_one_machine_waits_for_the_board_on_top_of_the_start(apply):
    c, _ = apply({"spinnaker": {"mode": "machine", "machine_name": "spin5", "claim_timeout": 100}})
    assert (c.BoardsMixin.board_mode, c.BoardsMixin.machine_name) == ("machine", "spin5")
    assert c.Spawner.start_timeout == 300 + 100


def test_session_boards_from_spalloc(apply):
    c, d = apply(
        {
            "spinnaker": {
                "mode": "session",
                "claim_timeout": 60,
                "spalloc": {
                    "url": "https://spalloc.example.org/",
                    "machine_name": "m1",
                    "group": "g",
                    "boards": 3,
                    "keepalive_interval": 45,
                    "tags": ["a"],
                },
            }
        }
    )
    a = c.SpallocAllocator
    assert (a.url, a.machine_name, a.group, a.boards, a.tags) == ("https://spalloc.example.org/", "m1", "g", 3, ["a"])
    assert (a.keepalive_interval, a.claim_timeout) == (45.0, 60.0)
    assert a.token_provider() == "t" * 40  # read from the environment at each renewal
    assert c.BoardsMixin.lease_store.startswith(str(d.hub_dir))
    assert c.Spawner.start_timeout == 300 + 60


def test_each_board_setting_is_a_typed_trait_and_the_session_gets_the_section_back(apply):
    from spinnaker_jupyter.boards.mixin import BoardsMixin

    section = {
        "mode": "session",
        "version": 3,
        "claim_timeout": 60,
        "on_timeout": "fail",
        "extra_cfg": {"Reports": {"write_energy_report": "False"}},
        "spalloc": {
            "url": "https://spalloc.example.org/",
            "boards": 2,
            "boards_per_group": {"course": 3},
            "boards_per_user": {"ada": 4},
            "group": "g",
            "collab": "c",
            "machine_name": "m1",
            "use_proxy": False,
        },
    }
    c, d = apply({"spinnaker": section})
    b = c.BoardsMixin
    assert (b.board_mode, b.board_version, b.claim_timeout, b.on_timeout) == ("session", 3, 60, "fail")
    assert (b.spalloc_boards, b.spalloc_boards_per_group, b.spalloc_boards_per_user) == (2, {"course": 3}, {"ada": 4})
    assert (b.spalloc_group, b.spalloc_collab, b.spalloc_machine_name, b.spalloc_use_proxy) == ("g", "c", "m1", False)
    settings = BoardsMixin(config=c).spinnaker  # what a server's BoardSession is given
    assert settings["extra_cfg"] == section["extra_cfg"]
    for key in ("mode", "version", "machine_name", "claim_timeout", "on_timeout"):
        assert settings[key] == d["spinnaker"][key], key
    for key in ("url", "boards", "boards_per_group", "boards_per_user", "group", "collab", "machine_name", "use_proxy"):
        assert settings["spalloc"][key] == d["spinnaker"]["spalloc"][key], key
    settings["spalloc"]["boards_per_user"]["ada"] = 9
    assert d["spinnaker"]["spalloc"]["boards_per_user"] == {"ada": 4}  # copies, never the deployment's dicts


def test_board_traits_left_unset_take_the_schemas_defaults():
    from spinnaker_jupyter.boards.mixin import BoardsMixin
    from spinnaker_jupyter.schema import SCHEMA, defaults

    default = defaults(SCHEMA["properties"]["spinnaker"])
    settings = BoardsMixin().spinnaker
    assert {k: settings[k] for k in ("mode", "version", "machine_name", "claim_timeout", "on_timeout")} == {
        k: default[k] for k in ("mode", "version", "machine_name", "claim_timeout", "on_timeout")
    }
    assert {k: default["spalloc"][k] for k in settings["spalloc"]} == settings["spalloc"]


@pytest.mark.parametrize(
    "trait, value",
    [
        ("board_mode", "sessions"),
        ("board_version", "5"),
        ("claim_timeout", -1),
        ("on_timeout", "wait"),
        ("spalloc_boards_per_user", {"ada": 0}),
        ("spalloc_use_proxy", "no"),
    ],
)
def test_an_operators_own_board_setting_is_validated_by_traitlets(trait, value):
    """c.BoardsMixin.<trait> in jupyterhub_config.d: a wrong value stops the spawner with the trait's name."""
    from traitlets import TraitError

    from spinnaker_jupyter.boards.mixin import BoardsMixin

    c = Config()
    setattr(c.BoardsMixin, trait, value)
    with pytest.raises(TraitError, match=trait):
        BoardsMixin(config=c)


def test_per_run_boards_tell_servers_where_the_hub_is(apply):
    c, _ = apply(
        {
            "spinnaker": {"mode": "per-run", "spalloc": {"url": "https://spalloc.example.org/"}},
            "hub": {"ip": "0.0.0.0", "port": 8100},
        }
    )
    assert c.BoardsMixin.service_env == {"JUPYTERHUB_SERVICE_HOST": "127.0.0.1", "JUPYTERHUB_SERVICE_PORT": "8100"}
    assert "lease_store" not in c.BoardsMixin


# --- what user servers are told: nrp, proxy_ports, git_kernel, drive, tutorials, kernels --------------------------
def test_user_server_environment(apply, tmp_path):
    tutorials = tmp_path / "my-tutorials"
    tutorials.mkdir()
    c, d = apply(
        {
            "nrp": {"command": ["nrp-backend", "--port", "{port}"], "port": 9100, "start_timeout": 30},
            "proxy_ports": [9100, 9200],
            "tutorials": {"source": str(tutorials)},
            "kernels": {"envs_dir": str(tmp_path / "envs")},
            "git_kernel": {"branch": "dev"},
        }
    )
    env = c.Spawner.environment
    assert env["SPINNAKER_PROXY_PORTS"] == "9100,9200"
    assert (env["SPINNAKER_NRP_PORT"], env["SPINNAKER_NRP_START_TIMEOUT"]) == ("9100", "30")
    assert json.loads(env["SPINNAKER_NRP_COMMAND"]) == ["nrp-backend", "--port", "{port}"]
    assert env["SPINNAKER_TUTORIALS_DIR"] == str(tutorials)
    assert env["JUPYTER_PATH"] == str(d.share_dir) and env["SPINNAKER_CFG_DIR"] == str(d.spynnaker_cfg_dir)
    git = json.loads(env["SPINNAKER_GIT_KERNEL_CONFIG"])
    assert git["branch"] == "dev" and git["base_env"] == str(tmp_path / "envs" / "spynnaker")
    server_config = json.loads((d.data_dir / "etc" / "jupyter" / "jupyter_server_config.json").read_text())
    assert env["JUPYTER_CONFIG_PATH"] == str(d.data_dir / "etc" / "jupyter")
    assert server_config["KernelManager"] == {"transport": "ipc"}  # kernels on private unix sockets


def test_git_kernel_disabled_and_no_nrp_command(apply):
    env = apply({"git_kernel": {"enabled": False}})[0].Spawner.environment
    assert "SPINNAKER_GIT_KERNEL_CONFIG" not in env and "SPINNAKER_NRP_COMMAND" not in env
    assert "SPINNAKER_DRIVE" not in env


def test_containers_get_only_portable_settings(apply):
    env = apply({"spawner": {"type": "docker"}})[0].Spawner.environment
    assert "JUPYTER_PATH" not in env and "SPINNAKER_CFG_DIR" not in env  # the image has its own paths
    assert json.loads(env["SPINNAKER_GIT_KERNEL_CONFIG"])["base_env"] == "/opt/envs/spynnaker"


def test_drive(apply):
    env = apply({"auth": EBRAINS, "drive": {"enabled": True, "mount_point": "ebrains", "cache_max_size": "2G"}})[
        0
    ].Spawner.environment
    drive = json.loads(env["SPINNAKER_DRIVE"])
    assert (drive["url"], drive["mount_point"], drive["cache_max_size"]) == (
        "https://drive.ebrains.eu",
        "ebrains",
        "2G",
    )


# --- jobs: --------------------------------------------------------------------------------------------------------
def test_jobs_service(apply):
    c, _ = apply({"jobs": {"enabled": True, "port": 8111}, "hub": {"base_url": "/sp/"}})
    jobs = service(c, "jobs")
    assert jobs["url"] == "http://127.0.0.1:8111" and jobs["display"] is True
    access = "access:services!service=jobs"
    assert access in role(c, "user")["scopes"] and access in c.Spawner.server_token_scopes
    assert c.Spawner.environment["SPINNAKER_JOBS_URL"] == "http://127.0.0.1:8111"
    assert c.JupyterHub.template_vars.get_value({})["jobs_page"] == "/sp/services/jobs/"  # the Jobs page link


def test_jobs_with_ebrains_keep_both_services_scopes(apply):
    c, _ = apply({"jobs": {"enabled": True}, "auth": EBRAINS})
    assert {"access:services!service=jobs", "access:services!service=access-token-service"} <= set(
        role(c, "user")["scopes"]
    ) & set(c.Spawner.server_token_scopes)
    assert "JUPYTERHUB_SERVICE_HOST" in c.Spawner.environment and "SPINNAKER_JOBS_URL" in c.Spawner.environment


def test_jobs_disabled_by_default(apply):
    c, _ = apply({})
    assert service(c, "jobs") is None and "SPINNAKER_JOBS_URL" not in c.Spawner.environment


# --- every service a deployment loads, with its role ------------------------------------------------------------
def test_services_and_roles_of_a_full_deployment(apply):
    c, _ = apply({"auth": EBRAINS, "jobs": {"enabled": True}})
    names = [s["name"] for s in c.JupyterHub.services]
    assert names == ["idle-culler", "course-manager", "access-token-service", "jobs"]
    assert {r["name"] for r in c.JupyterHub.load_roles} == {
        "idle-culler",
        "course-manager",
        "access-token-service",
        "user",
    }


# --- each area on its own -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "area",
    [
        "update_hub",
        "update_proxy",
        "update_tls",
        "update_culler",
        "update_services",
        "update_user_servers",
        "update_auth",
        "update_spawner",
    ],
)
def test_each_area_applies_onto_a_bare_config_on_its_own(write_config, area):
    d = config.load([write_config({"culler": {"kernels": {"timeout": 60}}})])
    d.private_hub_dir()
    c = Config()
    getattr(hubconfig, area)(c, d)
    assert c  # something was set, and nothing needed another area first
