"""Apply a validated deployment config to JupyterHub's `c`: the one place where config keys become traitlets.

One `update_<area>(c, d)` per config section, as the-littlest-jupyterhub's configurer; about 400 lines because every
section's mapping is here (boards and jobs have theirs in their packages)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from spinnaker_server_contract import ServerContract, jupyter_server_config

from . import hub_db
from .config import PROJECT_ROOT, ConfigError, Deployment
from .kernels import make_world_readable


def system_users_enabled(d: Deployment) -> bool:
    setting = d["spawner"]["local"]["system_users"]
    return os.geteuid() == 0 if setting == "auto" else bool(setting)


def stop_servers_on_exit(d: Deployment) -> bool:
    """Containers outlive the hub on their own: keep them through restarts. Local processes are the hub's children:
    stopping the hub stops them, unless the operator says otherwise."""
    setting = d["hub"]["stop_servers_on_exit"]
    return d["spawner"]["type"] == "local" if setting == "auto" else bool(setting)


def chp_command(d: Deployment) -> list[str]:
    return d["proxy"]["command"] or [str(PROJECT_ROOT / "node_modules" / ".bin" / "configurable-http-proxy")]


def write_server_config(d: Deployment) -> Path:
    """The Jupyter server settings every local user server loads (JUPYTER_CONFIG_PATH); the single-user image
    writes its own with the same function (spinnaker_server_contract.jupyter_server_config)."""
    conf_dir = d.data_dir / "etc" / "jupyter"
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / "jupyter_server_config.json"
    path.write_text(json.dumps(jupyter_server_config(), indent=1))
    make_world_readable(d.data_dir / "etc")  # every user account's server reads it
    return conf_dir


def git_kernel_slots(d: Deployment) -> str | None:
    """The folder of git_kernel.concurrency's set-up slots (extension: gitkernel/slots.py), one file per first
    set-up that may run at once, writable by the hub's account alone; None: no bound."""
    n = d["git_kernel"]["concurrency"]
    n = max(1, len(os.sched_getaffinity(0)) // 2) if n is None else n
    folder = d.data_dir / "git-kernel-slots"
    if n == 0:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    for i in range(n):
        (folder / f"slot-{i}").touch()
        os.chmod(folder / f"slot-{i}", 0o644)
    for extra in folder.glob("slot-*"):
        if not extra.name[5:].isdigit() or int(extra.name[5:]) >= n:
            extra.unlink()
    return str(folder)


def user_server_env(d: Deployment, in_container: bool = False) -> dict[str, str]:
    """What every user server (and so every kernel and terminal) is told about the deployment: Jupyter's paths and
    the server contract (spinnaker_server_contract.py). A container gets only what is portable: the image has its
    own paths, and the machine cfg travels as text (boards: BoardSession.env)."""
    nrp, git, drive = d["nrp"], d["git_kernel"], d["drive"]
    if drive["enabled"] and d["auth"]["type"] != "ebrains":  # the server mounts the Drive itself (extension drive.py)
        raise ConfigError(
            "drive.enabled: the Drive is reached with each user's EBRAINS login; set auth.type: "
            "ebrains, or drive.enabled: false"
        )
    env, paths = {}, {}
    if in_container:
        from .docker import IMAGE_ENV_ROOT  # here, not at the top: dockerspawner's import costs seconds per command

        base_env, git_slots = str(Path(IMAGE_ENV_ROOT) / "spynnaker"), None
    else:
        env = {"JUPYTER_PATH": str(d.share_dir), "JUPYTER_CONFIG_PATH": str(write_server_config(d))}
        paths = {
            "cfg_dir": str(d.spynnaker_cfg_dir),
            "tutorials_dir": str(d.tutorials_dir),
            "git_support_dir": str(PROJECT_ROOT / "kernels" / "spynnaker-git" / "support"),
        }
        base_env, git_slots = str(d.envs_dir / "spynnaker"), git_kernel_slots(d) if git["enabled"] else None
    # git_kernel: the whole validated section (the server has no defaults of its own), the pinned env, the slots
    contract = ServerContract(
        proxy_ports=d["proxy_ports"],
        nrp_port=nrp["port"],
        nrp_start_timeout=nrp["start_timeout"],
        nrp_command=nrp["command"],
        git_kernel=dict(git, base_env=base_env, slots_dir=git_slots) if git["enabled"] else None,
        drive={k: v for k, v in drive.items() if k != "enabled"} if drive["enabled"] else None,
        **paths,
    )
    return {**env, **contract.to_env()}


def apply(c, d: Deployment) -> None:
    """Every section of the deployment config onto JupyterHub's `c`: one `update_<area>(c, d)` per section (as in
    the-littlest-jupyterhub's configurer), each also usable on its own on a bare traitlets Config. Several areas add
    to the same settings (the user servers' arguments and environment, the hub's services and roles): they start
    empty here, and the order below is the order in which they are added to."""
    from .preflight import check_data_dir

    d.private_hub_dir()
    check_data_dir(d)  # secrets, accounts and the database: nothing another account could have written
    c.JupyterHub.services, c.JupyterHub.load_roles, c.Spawner.args = [], [], []
    update_hub(c, d)
    update_proxy(c, d)
    update_tls(c, d)  # after update_proxy: its HTTP redirect goes on the proxy's command
    update_culler(c, d)
    update_services(c, d)
    update_user_servers(c, d)
    update_auth(c, d)  # after update_user_servers: EBRAINS adds its token service's variables
    update_spawner(c, d)
    from .boards import configure_hub as update_boards  # spinnaker.mode: boards per server, their status API

    update_boards(c, d)
    from .jobs.hubconfig import update_jobs  # jobs: the batch job service (nmpi API) and its runner

    update_jobs(c, d)


def _extend(section, trait: str, items: list) -> None:
    """Add to a list setting that another area may have begun (Spawner.args, JupyterHub.services / load_roles)."""
    section[trait] = [*(section[trait] if trait in section else []), *items]


def _add_service(c, service: dict, roles: list[dict]) -> None:
    _extend(c.JupyterHub, "services", [service])
    _extend(c.JupyterHub, "load_roles", roles)


def update_hub(c, d: Deployment) -> None:
    """`hub:` where the hub listens, its database, files and logging, named servers, and `proxy.hub_port`."""
    hub = d["hub"]
    scheme = "https" if hub["tls"]["cert_file"] else "http"  # the proxy serves TLS itself (tls.py)
    c.JupyterHub.bind_url = f"{scheme}://{hub['ip']}:{hub['port']}{hub['base_url']}"
    c.JupyterHub.hub_ip = "127.0.0.1"
    c.JupyterHub.hub_port = d["proxy"]["hub_port"]
    c.JupyterHub.db_url = d.db_url
    c.JupyterHub.db_kwargs = hub_db.db_kwargs(d.db_url)  # SQLite: write-ahead log, commits not waiting for the disk
    c.JupyterHub.cookie_secret_file = str(d.hub_dir / "jupyterhub_cookie_secret")
    c.JupyterHub.pid_file = str(d.hub_dir / "jupyterhub.pid")
    c.JupyterHub.log_level = hub["log_level"]
    c.JupyterHub.allow_named_servers = hub["allow_named_servers"]
    c.JupyterHub.named_server_limit_per_user = hub["named_server_limit"]
    c.JupyterHub.cleanup_servers = stop_servers_on_exit(d)
    c.JupyterHub.template_paths = [str(Path(__file__).parent / "templates")]


def update_proxy(c, d: Deployment) -> None:
    """`proxy:` configurable-http-proxy, started by the hub."""
    c.JupyterHub.proxy_class = "spinnaker_jupyter.proxy.CheckedProxy"  # its token reaches only the proxy started
    c.ConfigurableHTTPProxy.command = chp_command(d)
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{d['proxy']['api_port']}"
    c.ConfigurableHTTPProxy.auth_token = d.secret("proxy_auth_token")
    c.ConfigurableHTTPProxy.pid_file = str(d.hub_dir / "proxy.pid")


def update_tls(c, d: Deployment) -> None:
    """`hub.tls` and `hub.frame_ancestors`: HTTPS, HSTS, and the headers and cookies a framed hub needs, on the hub
    and on every user server (given as a command-line setting)."""
    from . import tls

    headers, server_settings = {}, {}
    if d["hub"]["frame_ancestors"]:
        # So that an EBRAINS collab page may embed the hub and the user servers in an iframe.
        headers["Content-Security-Policy"] = "frame-ancestors 'self' " + " ".join(d["hub"]["frame_ancestors"])
    c.JupyterHub.tornado_settings = {}
    tls.apply(c, d, headers, server_settings)  # HTTPS, HSTS, and the cookies a framed hub needs
    if headers:
        c.JupyterHub.tornado_settings["headers"] = headers
        server_settings["headers"] = headers
    if server_settings:
        # A Python literal: traitlets reads a dict given on the command line with ast.literal_eval (JSON's true fails).
        _extend(c.Spawner, "args", ["--ServerApp.tornado_settings=" + repr(server_settings)])


def update_services(c, d: Deployment) -> None:
    """The hub services the command line talks through: `user remove` (local accounts), `course start`."""
    if d["auth"]["type"] == "local":  # `user remove` stops servers and revokes tokens through the hub's API
        from .account_removal import hub_service

        service, role = hub_service(d)
        _add_service(c, service, [role])
    from .course import configure as apply_course  # `spinnaker-jupyter course start`: a class's servers, in line

    service, role = apply_course(c, d)
    _add_service(c, service, [role])


def update_user_servers(c, d: Deployment) -> None:
    """`nrp`, `proxy_ports`, `git_kernel`, `drive`, `tutorials`, `kernels`: what every user server is told
    (user_server_env)."""
    c.Spawner.environment = user_server_env(d, in_container=d["spawner"]["type"] == "docker")
    if d["git_kernel"]["enabled"] and d["spawner"]["type"] == "local":  # set-ups wait while servers start (spawn_queue)
        c.SpawnQueue.hold_slots = str(d.data_dir / "git-kernel-slots")


def update_auth(c, d: Deployment) -> None:
    """`auth:` and `hub.admin_users`: local accounts, or EBRAINS (update_ebrains)."""
    auth = d["auth"]
    c.Authenticator.admin_users = set(d["hub"]["admin_users"])
    if auth["type"] == "local":
        c.JupyterHub.authenticator_class = "spinnaker_jupyter.local_accounts.LocalAccountsAuthenticator"
        c.LocalAccountsAuthenticator.accounts_file = str(d.accounts_file)
        c.Authenticator.admin_users |= {auth["local"]["admin"]}
    else:
        update_ebrains(c, d)


def update_ebrains(c, d: Deployment) -> None:
    """`auth.ebrains`: the authenticator, and the service through which the user's fresh access token reaches
    notebooks (spinnman, ebrains-drive, nmpi)."""
    token_service = _apply_ebrains(c, d)
    _add_service(
        c,
        token_service["service"],
        [*token_service["roles"], {"name": "user", "scopes": ["self", *token_service["extra_user_scopes"]]}],
    )
    c.Spawner.server_token_scopes = token_service["server_token_scopes"]
    c.Spawner.environment = {
        **(c.Spawner.environment if "environment" in c.Spawner else {}),
        **token_service["spawner_environment"],
    }


def public_url(d: Deployment) -> str:
    hub = d["hub"]
    scheme = "https" if hub["tls"]["cert_file"] else "http"
    return (hub["public_url"] or f"{scheme}://{hub['ip']}:{hub['port']}").rstrip("/") + hub["base_url"]


def _apply_ebrains(c, d: Deployment) -> dict:
    """The EBRAINS authenticator (oauthenticator's, configured); returns the access-token service's definition."""
    from . import access_token_service, usernames

    eb = d["auth"]["ebrains"]
    keycloak = eb["issuer"].rstrip("/") + "/protocol/openid-connect"
    a = c.EBRAINSAuthenticator
    c.JupyterHub.authenticator_class = "spinnaker_jupyter.ebrains.EBRAINSAuthenticator"
    a.client_id = eb["client_id"]
    a.client_secret = d.ebrains_client_secret()
    a.authorize_url = eb["authorize_url"] or f"{keycloak}/auth"
    a.token_url = eb["token_url"] or f"{keycloak}/token"
    a.userdata_url = eb["userinfo_url"] or f"{keycloak}/userinfo"
    a.oauth_callback_url = public_url(d) + "hub/oauth_callback"
    a.scope = eb["scopes"]
    a.login_service = "EBRAINS"
    a.username_claim = usernames.username_from_claims
    a.allow_all = eb["allow_all"]
    a.allowed_users = set(eb["allowed_users"])
    if eb["allowed_groups"] or eb["admin_groups"] or eb["allowed_collabs"] or eb["admin_collabs"]:
        from .collabs import required_groups  # collab members become hub groups (EBRAINSAuthenticator)

        a.manage_groups = True
        a.auth_state_groups_key = "oauth_user." + eb["groups_claim"]
        a.allowed_collabs, a.admin_collabs = eb["allowed_collabs"], eb["admin_collabs"]
        a.team_claim = eb["team_claim"]
        a.membership_check_interval = eb["membership_check_interval"]  # servers of those no longer admitted stop
        a.allowed_groups = set(eb["allowed_groups"]) | required_groups(eb["allowed_collabs"])
        a.admin_groups = set(eb["admin_groups"]) | required_groups(eb["admin_collabs"])
    collab_note = " (nor in a collab admitted, with the role it needs)" if eb["allowed_collabs"] else ""
    a.custom_403_message = (
        f"Your EBRAINS account is not in the groups allowed to use this SpiNNaker "
        f"service{collab_note}. To get access, ask {eb['contact']}."
    )
    for key, value in access_token_service.authenticator_settings(
        refresh_margin=eb["refresh_margin"],
        auth_refresh_age=eb["auth_refresh_age"],
        provider_timeout=eb["provider_timeout"],
    ).items():
        setattr(a, key, value)
    c.CryptKeeper.keys = [bytes.fromhex(d.secret("crypt_key"))]
    return access_token_service.service_definition(
        f"http://127.0.0.1:{eb['token_service_port']}", provider_timeout=eb["provider_timeout"]
    )


def update_spawner(c, d: Deployment) -> None:
    """`spawner:` the user servers' spawner (local processes, Slurm jobs or containers), its start queue and limits."""
    sp = d["spawner"]
    c.Spawner.default_url = sp["default_url"]
    c.Spawner.start_timeout = d["hub"]["start_timeout"]
    c.Spawner.http_timeout = 60
    if sp["type"] == "local":
        update_local_spawner(c, d)
    elif sp["type"] == "slurm":
        from .slurm import configure as apply_slurm  # a Slurm job per user server (batchspawner, configured)

        args = []
        apply_slurm(c, d, args)
        _extend(c.Spawner, "args", args)
    else:
        update_docker(c, d)
    if sp["type"] in ("local", "docker"):  # (Slurm queues its own jobs)
        from .spawn_queue import configure as apply_start_queue  # a few starts at a time, the rest in line

        apply_start_queue(c, sp["start_queue"], forked=sp["type"] == "local" and sp["local"]["fork_server"])
    if sp["mem_limit"]:
        c.Spawner.mem_limit = sp["mem_limit"]
    if sp["cpu_limit"]:
        c.Spawner.cpu_limit = sp["cpu_limit"]


def update_local_spawner(c, d: Deployment) -> None:
    """`spawner.local` (with `spawner.process_limit`): a process per user server, as the user's own account."""
    sp = d["spawner"]
    c.JupyterHub.spawner_class = "spinnaker_jupyter.spawner.SpiNNakerLocalSpawner"
    c.SpiNNakerLocalSpawner.homes_dir = str(d.homes_dir)
    c.SpiNNakerLocalSpawner.logs_dir = str(d.logs_dir)
    c.SpiNNakerLocalSpawner.system_users = system_users_enabled(d)
    c.SpiNNakerLocalSpawner.system_user_prefix = sp["local"]["system_user_prefix"]
    c.SpiNNakerLocalSpawner.uid_range = list(sp["local"]["uid_range"])
    c.SpiNNakerLocalSpawner.process_limit = sp["process_limit"]
    c.SpiNNakerLocalSpawner.limits_mode = sp["local"]["limits"]
    c.SpiNNakerLocalSpawner.fork_server = sp["local"]["fork_server"]  # servers forked from one that imported once
    c.SpiNNakerLocalSpawner.fork_server_dir = str(d.hub_dir / "fork-server")  # in the hub's private folder
    from .limits import describe_deployment

    print(f"[spinnaker-jupyter] {describe_deployment(d, prune=True)}", flush=True)  # which limits, and how
    # The user servers run from the hub's own environment; as root they need --allow-root only if not switched.
    # jupyterhub-singleuser without two start-up costs nobody here needs (spinnaker_jupyter/singleuser.py)
    c.Spawner.cmd = [
        sys.executable,
        "-m",
        "spinnaker_jupyter.singleuser",
        str(Path(sys.executable).parent / "jupyterhub-singleuser"),
    ]
    if not system_users_enabled(d) and os.geteuid() == 0:
        _extend(c.Spawner, "args", ["--allow-root"])


def update_docker(c, d: Deployment) -> None:
    """`spawner.docker`: a container per user server (DockerSpawner, configured)."""
    dk = d["spawner"]["docker"]
    host = dk["network"] == "host"
    c.JupyterHub.spawner_class = "spinnaker_jupyter.docker.SpiNNakerDockerSpawner"
    s = c.SpiNNakerDockerSpawner
    s.image = dk["image"]
    if dk["images"]:
        s.allowed_images = dict(dk["images"])
    s.pull_policy = dk["pull_policy"]
    if dk["engine_url"]:
        s.client_kwargs = {"base_url": dk["engine_url"]}
    s.prefix = "spinnaker-jupyter"
    s.remove = True  # the container goes at stop; the home volume stays
    s.volumes = {dk["volume_prefix"] + "{username}": "/home/jovyan"}
    s.notebook_dir = "/home/jovyan"
    s.cmd = ["python3", "-m", "spinnaker_singleuser", "jupyterhub-singleuser"]  # as the image's CMD, cheaper
    s.extra_create_kwargs = {"labels": dict(dk["labels"])}
    # As the user's own host account, the one their jobs run as (docker.container_account), never the image's 1000
    s.system_user_prefix = d["spawner"]["local"]["system_user_prefix"]
    s.uid_range = list(d["spawner"]["local"]["uid_range"])
    s.homes_dir = str(d.homes_dir)
    if d["spawner"]["process_limit"]:  # the container's cgroup: a fork bomb in it cannot take other users' PIDs
        s.extra_host_config = {"pids_limit": d["spawner"]["process_limit"]}
    if d["drive"]["enabled"]:  # a Drive helper container beside each user's (drive_helper.py)
        s.drive_image, s.drive_dir = dk["drive_image"], dk["drive_dir"]
    s.network_name = dk["network"]
    s.use_internal_ip = True
    s.host_network = host
    if host:
        c.JupyterHub.hub_connect_ip = "127.0.0.1"
    else:
        # The hub listens where containers on its network can reach it.
        c.JupyterHub.hub_ip = "0.0.0.0"
        c.JupyterHub.hub_connect_ip = dk["hub_connect_host"] or "hub"


def update_culler(c, d: Deployment) -> None:
    """`culler:` the hub's idle culler (a service), and what every user server (local or container) needs for it:
    idle-kernel culling, and activity reported often enough for the timeout (a busy kernel is activity: the
    extension's activity.py)."""
    cull, kernels = d["culler"], d["culler"]["kernels"]
    if kernels["timeout"]:  # jupyter_server's own culler; cull_busy False: a kernel running code is never touched
        _extend(
            c.Spawner,
            "args",
            [
                f"--MappingKernelManager.{k}={v}"
                for k, v in {
                    "cull_idle_timeout": kernels["timeout"],
                    "cull_interval": kernels["every"],
                    "cull_busy": False,
                    "cull_connected": kernels["connected"],
                }.items()
            ],
        )
    if not cull["enabled"]:
        return
    # The hub's record of a server's activity lags by up to its resolution plus the server's report interval
    # (JupyterHub's defaults: 30 s and 300 s, longer than a short timeout): keep the lag within a sixth of it.
    c.JupyterHub.activity_resolution = min(30, cull["timeout"] // 6)
    _extend(c.Spawner, "args", [f"--JupyterHubSingleUser.hub_activity_interval={min(300, cull['timeout'] // 6)}"])
    cmd = [
        sys.executable,
        "-m",
        "jupyterhub_idle_culler",
        f"--timeout={cull['timeout']}",
        f"--cull-every={cull['every']}",
    ]
    if cull["max_age"]:
        cmd.append(f"--max-age={cull['max_age']}")
    _add_service(
        c,
        {"name": "idle-culler", "command": cmd},
        [
            {
                "name": "idle-culler",
                "services": ["idle-culler"],
                "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
            }
        ],
    )
