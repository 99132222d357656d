"""The deployment config schema: every key an operator may set, its type, default and meaning.

JSON Schema (draft 2020-12), kept as Python so defaults and help live beside the types. Every object is closed
(`additionalProperties: false`) so that a misspelt key stops start-up instead of being silently ignored.

Longer than the package's ~400-line modules on purpose: it is the one document of every key and its prose, read
(and diffed) as one text; split by section, a key's neighbours and the shared helpers above would be elsewhere.
"""

from __future__ import annotations

from .uid_range import DEFAULT_UID_RANGE, UID_MAX_ALLOWED
from .usernames import CONFIG_NAME_PATTERN


def _obj(properties: dict, **extra) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties, **extra}


def _str(default=None, desc="", **extra) -> dict:
    return {
        "type": ["string", "null"] if default is None else "string",
        "default": default,
        "description": desc,
        **extra,
    }


def _int(default, desc="", minimum=None, **extra) -> dict:
    d = {"type": "integer", "default": default, "description": desc, **extra}
    if minimum is not None:
        d["minimum"] = minimum
    return d


def _bool(default, desc="") -> dict:
    return {"type": "boolean", "default": default, "description": desc}


def _list(items: dict, default=None, desc="") -> dict:
    return {"type": "array", "items": items, "default": default if default is not None else [], "description": desc}


USERNAME = {"type": "string", "pattern": CONFIG_NAME_PATTERN}  # the user-name rules: usernames.py
#: One sPyNNaker release (kernels.spynnaker, or each item of its list form; kernels.py reads it).
SPYNNAKER_RELEASE: dict = {
    "version": _str(
        None,
        "The sPyNNaker release, e.g. 7.3.0 (pip's epoch `1!` may be left out). Default: the "
        "release the requirements file pins (sPyNNaker==...). Names the kernel; must differ "
        "between releases.",
        pattern=r"^([0-9]+!)?[0-9]+(\.[0-9]+)*([a-z0-9.+-]*)$",
        errorMessage="a release number such as 7.3.0",
    ),
    "requirements": _str(
        None,
        "Pinned requirements file of this release, which must pin sPyNNaker==<version>. "
        "Default: kernels/spynnaker/requirements.txt for the first release, "
        "kernels/spynnaker/requirements-<version>.txt for the others.",
    ),
    "display_name": _str(
        None,
        "Name users see in the launcher. Default: `sPyNNaker` for the first release, "
        "`sPyNNaker <version>` for the others.",
    ),
}

SCHEMA: dict = _obj(
    {
        "data_dir": _str(
            "data",
            "Where the hub keeps its database, secrets, user homes and kernel environments. "
            "Relative paths are relative to the config file's folder (or the working folder).",
        ),
        "hub": _obj(
            {
                "ip": _str("127.0.0.1", "Address the public proxy listens on."),
                "port": _int(8000, "Port the public proxy listens on.", minimum=1, maximum=65535),
                "base_url": _str("/", "URL prefix of the whole service.", pattern=r"^/(.*/)?$"),
                "public_url": _str(
                    None,
                    "The URL users type, e.g. https://spinnaker.example.org (needed for EBRAINS "
                    "login behind a reverse proxy; default http://ip:port).",
                ),
                "db_url": _str(
                    None,
                    "SQLAlchemy database URL (default: SQLite in data_dir/hub). A URL holding a "
                    "password belongs in the environment variable SPINNAKER_JUPYTER_DB_URL instead.",
                ),
                "admin_users": _list(USERNAME, desc="Hub user names with admin rights."),
                "allow_named_servers": _bool(True, "Let users run several named servers."),
                "named_server_limit": _int(3, "Named servers per user (0 = unlimited).", minimum=0),
                "start_timeout": _int(300, "Seconds a user's server may take to start.", minimum=10),
                "stop_servers_on_exit": {
                    "enum": ["auto", True, False],
                    "default": "auto",
                    "description": "Stop user servers when the hub stops. false: sessions (servers, "
                    "kernels, SpiNNaker boards) live on through hub restarts and upgrades and the "
                    "restarted hub takes them over. `auto`: false with spawner.type docker (as "
                    "zero-to-jupyterhub); true with local processes, where stopping the hub (Ctrl-C on "
                    "`make up`) should leave nothing running (a systemd unit that keeps them needs "
                    "KillMode=process, as the Ansible role sets).",
                },
                "frame_ancestors": _list(
                    {"type": "string"},
                    desc="Origins allowed to embed the hub in an iframe "
                    "(Content-Security-Policy frame-ancestors), e.g. https://wiki.ebrains.eu. Logging "
                    "in inside such a frame needs HTTPS (hub.tls, or an https public_url): the hub and "
                    "user servers then set their cookies SameSite=None; Secure.",
                ),
                "tls": _obj(
                    {
                        "cert_file": _str(
                            None,
                            "PEM certificate chain the proxy serves on hub.port (HTTPS), e.g. certbot's "
                            "/etc/letsencrypt/live/<name>/fullchain.pem. Empty: plain HTTP (TLS ends at your "
                            "reverse proxy, if any).",
                        ),
                        "key_file": _str(
                            None,
                            "PEM private key of cert_file, e.g. /etc/letsencrypt/live/<name>/privkey.pem. "
                            "Owned by the hub's account or root and readable by no other account (0600, or 0640 "
                            "with a group of the hub's): a key others can read is refused.",
                        ),
                        "http_redirect_port": {
                            "type": ["integer", "null"],
                            "default": None,
                            "minimum": 1,
                            "maximum": 65535,
                            "description": "Port (e.g. 80) where plain HTTP is answered with a redirect to "
                            "HTTPS on hub.port (the proxy's own listener, on every address). Empty: none.",
                        },
                        "hsts_max_age": _int(
                            31536000,
                            "Seconds browsers remember to reach the service over HTTPS only "
                            "(Strict-Transport-Security, sent when it is served over HTTPS); 0: no header.",
                            minimum=0,
                        ),
                    }
                ),
                "log_level": _str("INFO", "Hub log level.", enum=["DEBUG", "INFO", "WARNING", "ERROR"]),
            }
        ),
        "proxy": _obj(
            {
                "api_port": _int(8001, "Port of the proxy's REST API on 127.0.0.1.", minimum=1, maximum=65535),
                "hub_port": _int(8081, "Port the hub itself listens on, behind the proxy.", minimum=1, maximum=65535),
                "command": _list(
                    {"type": "string"},
                    desc="configurable-http-proxy command (default: the pinned one in the project's node_modules).",
                ),
            }
        ),
        "auth": _obj(
            {
                "type": _str(
                    "local",
                    "`local`: accounts managed with `spinnaker-jupyter user`; `ebrains`: EBRAINS IAM (OpenID Connect).",
                    enum=["local", "ebrains"],
                ),
                "local": _obj(
                    {
                        "admin": {
                            **USERNAME,
                            "default": "admin",
                            "description": "Admin account created at first start, with a generated password printed once.",
                        },
                        "min_password_length": _int(10, "Shortest password `user passwd` accepts.", minimum=8),
                    }
                ),
                "ebrains": _obj(
                    {
                        "issuer": _str(
                            "https://iam.ebrains.eu/auth/realms/hbp",
                            "OpenID Connect issuer (Keycloak realm URL); the Keycloak endpoints are derived from it.",
                        ),
                        "authorize_url": _str(None, "Override the authorization endpoint (non-Keycloak providers)."),
                        "token_url": _str(None, "Override the token endpoint."),
                        "userinfo_url": _str(None, "Override the userinfo endpoint."),
                        "client_id": _str(None, "OAuth client id registered with the issuer."),
                        "client_secret_file": _str(
                            None,
                            "File holding the client secret (else env EBRAINS_CLIENT_SECRET); owned "
                            "by the hub's account or root, writable by no one else, unreadable by "
                            "others (0600 or 0640).",
                        ),
                        "scopes": _list(
                            {"type": "string"},
                            ["openid", "profile", "email", "roles", "team", "group"],
                            "Scopes to request (add collab.drive for EBRAINS Drive access from notebooks).",
                        ),
                        "allowed_groups": _list(
                            {"type": "string"},
                            desc="Groups/teams admitted (empty: anyone listed in "
                            "allowed_users, or everyone when allow_all is true).",
                        ),
                        "allowed_users": _list({"type": "string"}, desc="Users admitted regardless of groups."),
                        "allow_all": _bool(False, "Admit every EBRAINS account."),
                        "admin_groups": _list({"type": "string"}, desc="Groups whose members are hub admins."),
                        "groups_claim": _str("roles.group", "Dotted path of the claim listing a user's groups."),
                        "allowed_collabs": {
                            "type": "object",
                            "default": {},
                            "additionalProperties": {"enum": ["viewer", "editor", "administrator"]},
                            "description": "EBRAINS collabs whose members are admitted, each with the least "
                            "role it takes, e.g. {spinnaker-course: viewer, spinnaker-dev: editor}. Read from "
                            "the `roles.team` claim (entries collab-<collab>-<role>) as the EBRAINS job queue "
                            "reads it; a higher role satisfies a lower one (administrator > editor > viewer). "
                            "Members also join the hub group collab-<collab>-<role> for each role they hold "
                            "(usable in spinnaker.spalloc.boards_per_group and jobs.collabs).",
                        },
                        "admin_collabs": {
                            "type": "object",
                            "default": {},
                            "additionalProperties": {"enum": ["viewer", "editor", "administrator"]},
                            "description": "EBRAINS collabs whose members are hub admins, each with the least "
                            "role it takes, e.g. {spinnaker-ops: administrator}. Checked at every login and at the "
                            "user's requests every auth_refresh_age seconds: someone who lost the role loses admin "
                            "rights then.",
                        },
                        "team_claim": _str(
                            "roles.team",
                            "Dotted path of the claim listing collab memberships (collab-<collab>-<role> entries).",
                        ),
                        "contact": _str("the service's operators", "Whom refused users should ask for access."),
                        "refresh_margin": _int(
                            60, "Refresh the user's access token when it expires within this many seconds.", minimum=2
                        ),
                        "auth_refresh_age": _int(
                            30, "Seconds between the hub's checks of a user's tokens (< refresh_margin).", minimum=1
                        ),
                        "membership_check_interval": _int(
                            300,
                            "Seconds between the hub's checks, with EBRAINS, that each user with a server running is still "
                            "in a collab or group admitted (allowed_collabs, allowed_groups): someone removed has their servers "
                            "stopped at the next check and every request refused with the contact line. Membership is also read "
                            "at every server start (a removed user is refused a new server at once) and at the user's own "
                            "requests every auth_refresh_age seconds, which is also when a lost admin collab drops admin "
                            "rights. 0: no periodic check.",
                            minimum=0,
                        ),
                        "provider_timeout": _int(
                            10,
                            "Seconds anyone waits for the identity provider (logins, token checks, "
                            "refreshes). When it hangs, a notebook asking for its access token gets the "
                            "stored one while it is still valid, and once it has expired is told within "
                            "this time that the login service is not answering (and to try again), "
                            "not that its login expired. A refresh-token request already sent stays "
                            "open up to 10 minutes, so that the provider's late answer, which holds the "
                            "only valid refresh token, is not lost.",
                            minimum=1,
                            maximum=120,
                        ),
                        "token_service_port": _int(
                            8091, "Port of the access-token-service on 127.0.0.1.", minimum=1, maximum=65535
                        ),
                    }
                ),
            }
        ),
        "spawner": _obj(
            {
                "type": _str(
                    "local",
                    "`local`: a process per user on this machine; `docker`: a container per user; "
                    "`slurm`: a Slurm job per user (as their own account; see spawner.slurm).",
                    enum=["local", "docker", "slurm"],
                ),
                "local": _obj(
                    {
                        "system_users": {
                            "enum": ["auto", True, False],
                            "default": "auto",
                            "description": "Run each user's server as their own system account (needs root; "
                            "`auto` = when the hub runs as root).",
                        },
                        "system_user_prefix": _str(
                            "jupyter-",
                            "Prefix of the system accounts created for hub users. Two "
                            "deployments on one machine need different prefixes: an account made by "
                            "another deployment (its home is elsewhere) is refused.",
                        ),
                        "uid_range": {
                            "type": "array",
                            "items": {"type": "integer", "minimum": 1, "maximum": UID_MAX_ALLOWED},
                            "minItems": 2,
                            "maxItems": 2,
                            "default": list(DEFAULT_UID_RANGE),
                            "description": "[first, last]: the uids (and their groups' gids) of the system accounts "
                            "this deployment makes for users' servers and batch jobs. A uid is never given twice, "
                            "not even one an account deleted by hand (userdel) freed: the deployment remembers the "
                            "highest uid it ever gave (data_dir/hub/uid-high-water; at first the highest of an "
                            "account in the range) and each new account takes the lowest uid above it that no "
                            "account or group has. So the range bounds how many accounts the deployment makes in its "
                            "lifetime: once the mark reaches its last uid it is full, lower free uids included "
                            "(`spinnaker-jupyter check` warns when few are left and fails when none is; the fix is a "
                            "higher last uid). "
                            "It must lie above the machine's system uids (SYS_UID_MAX in /etc/login.defs, the OS's "
                            "own services), below 2^31, outside the login accounts' uids (UID_MIN-UID_MAX), the "
                            "subordinate uids of /etc/subuid and SUB_UID_MIN-SUB_UID_MAX, and systemd's dynamic and "
                            "container uids. Accounts made by earlier releases (system uids) keep theirs.",
                        },
                        "uid_range_in_login_range": _bool(
                            False,
                            "Let spawner.local.uid_range overlap the machine's login accounts' uids (UID_MIN-UID_MAX "
                            "in /etc/login.defs), e.g. to share it with a directory that gives out those uids.",
                        ),
                        "limits": _str(
                            "auto",
                            "How mem_limit, cpu_limit and process_limit are enforced on local servers. "
                            "`auto`: a cgroup per server when the hub can make one (root, cgroup v2 or the v1 "
                            "pids/memory/cpu controllers), else rlimits; `cgroup`: refuse to start servers without "
                            "one; `rlimits`: per-process memory (RLIMIT_DATA), processes per account (RLIMIT_NPROC) "
                            "and a lower CPU priority instead of a CPU cap. `spinnaker-jupyter check` says which "
                            "applies.",
                            enum=["auto", "cgroup", "rlimits"],
                        ),
                        "fork_server": _bool(
                            True,
                            "Start each local server by forking a process of the hub's (the fork server) that has "
                            "already imported the single-user server's modules, instead of a new Python that "
                            "imports them again: a start then costs about a fifth of the CPU. It starts with the hub "
                            "(about a CPU-second, once), so the first start after a hub (re)start does not wait for "
                            "it. Each server still "
                            "runs as its own account with its own environment, cgroup or rlimits and log; whenever "
                            "the fork server cannot start one (not running, a server environment it cannot serve) "
                            "the server starts as without it, with one warning in the hub's log. "
                            "`spinnaker-jupyter check` says whether it is on. false: every server starts as a new "
                            "Python process (Popen), as in earlier releases.",
                        ),
                    }
                ),
                "docker": _obj(
                    {
                        "engine_url": _str(
                            None,
                            "Docker API endpoint: unix:///var/run/docker.sock (Docker Engine, default from "
                            "DOCKER_HOST) or a podman socket, unix:///run/podman/podman.sock.",
                        ),
                        "image": _str(
                            "spinnaker-jupyter/singleuser:latest", "The single-user image (images/singleuser)."
                        ),
                        "images": {
                            "type": "object",
                            "default": {},
                            "additionalProperties": {"type": "string"},
                            "description": "Offer a choice of images: display name -> image (e.g. an NRP-enabled one).",
                        },
                        "pull_policy": _str(
                            "ifnotpresent", "When to pull the image.", enum=["ifnotpresent", "always", "never", "skip"]
                        ),
                        "network": _str(
                            "spinnaker-jupyter",
                            "Docker network shared with the hub container; `host` for a "
                            "single host without a bridge (tests).",
                        ),
                        "hub_connect_host": _str(
                            None,
                            "How containers reach the hub, e.g. the hub container's name (default: "
                            "127.0.0.1 on the host network, else the hub's container name `hub`).",
                        ),
                        "volume_prefix": _str(
                            "spinnaker-jupyter-home-",
                            "Home volumes are named <prefix><user>; kept when the "
                            "server stops, removed only by `spinnaker-jupyter volumes remove`.",
                        ),
                        "labels": {
                            "type": "object",
                            "default": {},
                            "additionalProperties": {"type": "string"},
                            "description": "Labels put on every user container.",
                        },
                        "drive_image": _str(
                            "spinnaker-jupyter/drive:latest",
                            "With drive.enabled: the EBRAINS Drive helper "
                            "image (images/drive), run beside each user's container with /dev/fuse and "
                            "CAP_SYS_ADMIN only; it mounts the user's Drive where their container sees it.",
                        ),
                        "drive_dir": _str(
                            "/var/lib/spinnaker-jupyter/drive",
                            "With drive.enabled: host folder (root's, 0700, on "
                            "a shared mount) holding each user's Drive mount point, bound into their helper and "
                            "notebook containers. The hub must run as root on the host (docs/DRIVE.md).",
                        ),
                    }
                ),
                "slurm": _obj(
                    {
                        "conf": _str(
                            None,
                            "slurm.conf the hub's Slurm commands use (SLURM_CONF); null: the system's "
                            "(/etc/slurm/slurm.conf).",
                        ),
                        "partition": _str(
                            None,
                            "Partition user servers run in (sbatch --partition); null: the cluster's "
                            "default partition.",
                        ),
                        "account": _str(
                            None,
                            "Slurm account the servers are charged to (sbatch --account); null: each "
                            "user's default account.",
                        ),
                        "qos": _str(None, "Quality of service of the servers' jobs (sbatch --qos); null: the default."),
                        "time": _str(
                            None,
                            "Longest a user server may run (sbatch --time, e.g. 8:00:00 or 1-00:00:00); Slurm "
                            "ends it then. null: the partition's limit.",
                            pattern=r"^[0-9:-]+$",
                        ),
                        "cpus": {
                            "type": ["integer", "null"],
                            "default": None,
                            "minimum": 1,
                            "description": "CPU cores per user server (sbatch --cpus-per-task); null: spawner.cpu_limit "
                            "rounded up, else one.",
                        },
                        "memory": _str(
                            None,
                            "Memory per user server (sbatch --mem, e.g. 4G); null: spawner.mem_limit, else "
                            "the cluster's default.",
                            pattern=r"^[0-9]+[KMGT]?$",
                        ),
                        "extra_sbatch_options": _list(
                            {"type": "string", "pattern": r"^[^{}]*$"},
                            desc="More sbatch options, one argument each (e.g. --constraint=lab).",
                        ),
                        "board_license": _str(
                            "spinnaker_board",
                            "Slurm licence taken per SpiNNaker board in session and "
                            "machine mode (slurm.conf `Licenses=spinnaker_board:<boards>`), so that Slurm "
                            "never starts more servers than there are boards; null: boards not counted.",
                        ),
                        "hub_connect_ip": _str(
                            None,
                            "Address of the hub that the Slurm nodes reach (the hub then listens on "
                            "every interface); null: 127.0.0.1, the hub's own machine being the only node.",
                        ),
                    }
                ),
                "cpu_limit": {
                    "type": ["number", "null"],
                    "default": None,
                    "exclusiveMinimum": 0,
                    "description": "CPU cores per user server (containers; local servers in a cgroup).",
                },
                "mem_limit": _str(
                    None,
                    "Memory per user server, e.g. 4G: containers, and local servers (the whole server "
                    "in a cgroup, else each process).",
                    pattern=r"^[0-9]+[KMGT]?$",
                ),
                "process_limit": {
                    "type": ["integer", "null"],
                    "default": 1024,
                    "minimum": 16,
                    "description": "Processes and threads per user server: a local server's (per account with "
                    "rlimits), and a container's (its pids limit), so that a fork bomb cannot "
                    "take the PIDs the hub or other users' servers need; null: no limit.",
                },
                "default_url": _str("/lab", "Page a user lands on."),
                "poll_interval": _int(
                    30,
                    "Seconds between the hub's checks that each user server still runs (a "
                    "server found gone gives its SpiNNaker boards back).",
                    minimum=1,
                ),
                "start_queue": _obj(
                    {
                        "concurrency": {
                            "type": ["integer", "null"],
                            "default": None,
                            "minimum": 1,
                            "description": "User servers (local processes or containers) started at the same "
                            "time; further starts wait in line, first come first served, and their "
                            "spawn page says their place and about how long (from the measured "
                            "recent starts). A start is CPU-bound: about one per core gets the "
                            "first user in within seconds and the last no later than all at "
                            "once. null: with forked local servers (spawner.local.fork_server, the "
                            "default) half as many again as the cores the hub may use (its CPU affinity; 3 on "
                            "2 cores), since a forked start spends about a third of its time waiting; "
                            "otherwise the cores: a new Python's start time-sliced against more starts than "
                            "cores costs more CPU than the idle it fills (benchmarks/README.md); with "
                            "containers on another host, base it on that host's cores. A server "
                            "waiting for its SpiNNaker board holds no place; Slurm queues its own "
                            "jobs (spawner.type slurm ignores this).",
                        },
                        "limit": _int(
                            200,
                            "Starts that may wait in line. One more is refused at once with a page saying so "
                            "(HTTP 429: 'try again in about N minutes'). The time in line counts towards "
                            "hub.start_timeout, so keep limit × one start's seconds / concurrency below it.",
                            minimum=0,
                        ),
                    }
                ),
            }
        ),
        "culler": _obj(
            {
                "enabled": _bool(True, "Stop servers idle for longer than `timeout`."),
                "timeout": _int(
                    3600,
                    "Seconds of inactivity before a server is stopped. A server counts as active while "
                    "any of its kernels is running code, even a silent cell with the browser closed: a long run "
                    "is never stopped, and the server is stopped `timeout` seconds after its last run ended "
                    "and nobody used it.",
                    minimum=60,
                ),
                "every": _int(300, "Seconds between culler passes.", minimum=10),
                "max_age": _int(
                    0,
                    "Stop servers older than this many seconds regardless of activity, running kernels "
                    "included (0 = never): the bound for a run that never ends.",
                    minimum=0,
                ),
                "kernels": _obj(
                    {
                        "timeout": _int(
                            0,
                            "Seconds a kernel may sit idle (not running code) before it is shut down to free "
                            "its memory; 0 = never (the default). A kernel running code is never shut down, however "
                            "long the run. Off by default because shutting a kernel down loses what it holds in "
                            "memory (the data of a finished run not yet saved), while the server culler above "
                            "already frees everything of an unused server; turn it on (e.g. 600) where many idle "
                            "kernels crowd the memory. Applies to every user server, whether `enabled` is on or "
                            "not.",
                            minimum=0,
                        ),
                        "every": _int(60, "Seconds between kernel-culling passes inside each server.", minimum=1),
                        "connected": _bool(
                            False,
                            "Also shut down idle kernels a browser tab is still connected to. Off: an open "
                            "notebook keeps its kernel (and its variables) until the tab is closed or the server "
                            "is stopped.",
                        ),
                    }
                ),
            }
        ),
        "kernels": _obj(
            {
                "envs_dir": _str(None, "Where kernel environments are built (default: data_dir/envs)."),
                "python": _str(
                    None,
                    "Interpreter the environments are built from (default: the hub's base Python). "
                    "Must be executable by every user account.",
                ),
                # One release (an object: the form of earlier configs) or a list of them; `properties` apply to
                # the object form, `items` to the list form (JSON Schema applies each only to its own type).
                "spynnaker": {
                    "type": ["object", "array"],
                    "description": "The sPyNNaker release(s) users run: one release (an object), or a list of "
                    "releases, e.g. [{version: 7.4.1}, {version: 7.3.0}]. Each gets its own environment under "
                    "envs_dir and its own kernel; the first is the default: kernel `spynnaker` (sPyNNaker), "
                    "used by jobs that name no spynnaker_version; the others are kernels `spynnaker-<version>` "
                    "(sPyNNaker <version>). A job's hardware_config spynnaker_version picks among them. "
                    "The container image (spawner.type docker) has the first release only.",
                    "additionalProperties": False,
                    "properties": SPYNNAKER_RELEASE,
                    "items": _obj(SPYNNAKER_RELEASE),
                    "minItems": 1,
                },
            }
        ),
        "spinnaker": _obj(
            {
                "mode": _str(
                    "virtual",
                    "`virtual`: no board, sPyNNaker maps and loads but returns no data; `machine`: the "
                    "lab's own board at `machine_name`, one user server at a time (the next start waits for it); "
                    "`session`: the hub claims boards from the spalloc service for each user server, from start "
                    "to stop; `per-run`: sPyNNaker claims boards itself at each setup(), with the user's EBRAINS "
                    "token (see README, SpiNNaker boards).",
                    enum=["virtual", "machine", "session", "per-run"],
                ),
                "version": _int(5, "SpiNNaker board version (3 = 4-chip, 5 = 48-chip).", enum=[3, 5, 201, 248]),
                "machine_name": _str(None, "Host name or IP address of the board (mode `machine`)."),
                "claim_timeout": _int(
                    600,
                    "Seconds a server start waits for its board: in the spalloc queue (`session`), "
                    "or for the session holding the lab's board to stop (`machine`; 0: do not wait).",
                    minimum=0,
                ),
                "on_timeout": _str(
                    "virtual",
                    "When no board comes within claim_timeout, or the spalloc service cannot be "
                    "used: `virtual`: start in virtual mode and tell the user why; `fail`: fail the start "
                    "with the reason.",
                    enum=["virtual", "fail"],
                ),
                "spalloc": _obj(
                    {
                        "url": _str(
                            None,
                            "The SpiNNaker allocation service, as sPyNNaker's spalloc_server, e.g. "
                            "https://spinnaker.cs.man.ac.uk/spalloc/ (modes `session` and `per-run`). Without "
                            "credentials: every user's kernel sees it.",
                        ),
                        "token_file": _str(
                            None,
                            "File holding the hub's bearer token for the service (mode `session`; else "
                            "env SPALLOC_TOKEN). A service admin account, so that jobs carry users' names. "
                            "Owned by the hub's account or root, unreadable by others (0600 or 0640).",
                        ),
                        "boards": _int(1, "Boards claimed per user server (mode `session`).", minimum=1),
                        "boards_per_group": {
                            "type": "object",
                            "default": {},
                            "additionalProperties": {"type": "integer", "minimum": 1},
                            "description": "Boards per server for members of these hub "
                            "groups (the largest applies), e.g. {course-a: 3}.",
                        },
                        "boards_per_user": {
                            "type": "object",
                            "default": {},
                            "additionalProperties": {"type": "integer", "minimum": 1},
                            "description": "Boards per server for these users (wins over groups).",
                        },
                        "keepalive_interval": _int(
                            60,
                            "Seconds the service keeps a job without a keepalive (the hub sends "
                            "one every third of it); a hub down for longer loses its jobs.",
                            minimum=30,
                            maximum=300,
                        ),
                        "group": _str(
                            None,
                            "spalloc group jobs are accounted to (`session`: the hub's claims; `per-run`: "
                            "spinnman's spalloc_group).",
                        ),
                        "collab": _str(
                            None,
                            "EBRAINS collab the hub's claims are accounted to (`session`). In `per-run`, "
                            "spinnman takes it from the notebook's folder.",
                        ),
                        "machine_name": _str(None, "Allocate on this spalloc machine (else on a machine with `tags`)."),
                        "tags": _list({"type": "string"}, ["default"], "Machine tags to allocate on."),
                        "use_proxy": _bool(
                            True,
                            "`per-run`: reach the boards through the service's websocket proxy (needed "
                            "unless kernels are on the boards' network).",
                        ),
                        "ca_certs": _str(
                            None, "CA bundle to trust when the service's certificate comes from a private CA."
                        ),
                    }
                ),
                "extra_cfg": {
                    "type": "object",
                    "default": {},
                    "description": "Extra sPyNNaker cfg sections, e.g. "
                    "{Reports: {write_energy_report: 'False'}}. No secrets: every user's kernel reads the cfg.",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": {"type": ["string", "number", "boolean"]},
                    },
                },
            }
        ),
        "nrp": _obj(
            {
                "command": _list(
                    {"type": "string"},
                    desc="Command that serves the NRP frontend on `port` (`{port}` is "
                    "substituted), or on a private unix socket when it names `{unix_socket}` (preferred on a "
                    "shared host: no port another account could take). Empty: the NRP is not installed here "
                    "and its route says so.",
                ),
                "port": _int(
                    9000, "Port the NRP frontend listens on inside a user's server.", minimum=1024, maximum=65535
                ),
                "start_timeout": _int(120, "Seconds the NRP may take to answer after it is started.", minimum=5),
            }
        ),
        "proxy_ports": _list(
            {"type": "integer", "minimum": 1024, "maximum": 65535},
            [9000],
            "Local ports users may reach through /user/<name>/proxy/<port>/ (nothing else is reachable).",
        ),
        "git_kernel": _obj(
            {
                # The one definition of these settings: the hub sends the whole validated section to each user server
                # (SPINNAKER_GIT_KERNEL_CONFIG), where spinnaker_jupyter_ext.gitkernel.GitKernelConfig only reads it.
                "enabled": _bool(
                    True,
                    "Give every user ~/sPyNNakerGit (SpiNNakerManchester repositories at master, kernel "
                    '"sPyNNakerGit"), created in the background at their first start.',
                ),
                "base_url": _str(
                    "https://github.com/SpiNNakerManchester",
                    "Where the repositories are cloned from (a "
                    "local mirror path or URL works): each repository is <base_url>/<name>.",
                ),
                "branch": _str(
                    "master",
                    "Branch cloned at first login (a repository without it: its default branch, "
                    "with a warning in the set-up log).",
                ),
                "repos": {
                    "type": "array",
                    "minItems": 1,
                    "default": [
                        "spinnaker_tools:c",
                        "spinn_common:c",
                        "SpiNNUtils",
                        "SpiNNMachine",
                        "SpiNNMan",
                        "PACMAN",
                        "spalloc",
                        "SpiNNFrontEndCommon",
                        "sPyNNaker",
                    ],
                    "description": "The repositories, in dependency order (default: the SpiNNaker stack). Each is a "
                    "name (a Python repository, installed in editable mode), `name:c` for one that is only cloned "
                    "(C code), or {name, python, url, branch} to clone it from elsewhere or at another branch. The "
                    "name is the folder under ~/sPyNNakerGit; names must differ.",
                    "items": {
                        "type": ["string", "object"],
                        "pattern": r"^(?!(?:bin|lib|lib64|include|share|support|etc|man|Scripts)(?::|$))"
                        r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.-]*(?::(?:c|python))?$",
                        "errorMessage": "a repository NAME or NAME:c (letters, digits, _ . -; not bin, lib, "
                        "lib64, include, share, support, etc, man or Scripts: the venv's own "
                        "folders)",
                        "required": ["name"],
                        "properties": {
                            "name": {
                                "type": "string",
                                "pattern": r"^(?!(?:bin|lib|lib64|include|share|support|etc|man|Scripts)$)"
                                r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.-]*$",
                                "errorMessage": "a folder name (letters, digits, _ . -; not bin, lib, "
                                "lib64, include, share, support, etc, man or Scripts)",
                            },
                            "python": {"type": "boolean"},
                            "url": {"type": "string"},
                            "branch": {"type": "string"},
                        },
                        "additionalProperties": False,
                    },
                },
                "directory": _str(
                    "sPyNNakerGit",
                    "The folder in each home that holds the venv and the clones.",
                    pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
                    errorMessage="a plain folder name (letters, digits, _ . -)",
                ),
                "kernel_name": _str(
                    "spynnakergit",
                    "The kernelspec's name (its folder under ~/.local/share/jupyter/kernels).",
                    pattern=r"^[a-z0-9._-]+$",
                    errorMessage="lower-case letters, digits, . _ - only",
                ),
                "display_name": _str("sPyNNakerGit", "Kernel name users see."),
                "wheelhouse": _str(None, "Shared read-only folder of wheels, so users do not each download them."),
                "pip_cache_dir": _str(None, "Shared pip cache (writable by all users)."),
                "offline": _bool(False, "Install only from the pinned environment and the wheelhouse."),
                "clone_args": _list({"type": "string"}, desc="Extra `git clone` arguments, e.g. [--filter=blob:none]."),
                "extra_packages": _list(
                    {"type": "string", "minLength": 1},
                    ["ipykernel"],
                    "Requirements the kernel needs on top of the clones; installed into the user's "
                    "venv only when the pinned environment does not already meet them.",
                ),
                "make_order": {
                    "type": ["array", "null"],
                    "default": None,
                    "description": "The C build order of support/automatic_make.sh: folders relative to "
                    "~/sPyNNakerGit, each `DIR` or `DIR install` (or {dir, install}). Empty: the shipped order, "
                    "kernels/spynnaker-git/support/make_order.txt.",
                    "items": {
                        "type": ["string", "object"],
                        "pattern": r"^(?!/)(?!(?:.*/)?\.\.(?:/| |$))\S+(?: install)?$",
                        "errorMessage": "DIR or 'DIR install', DIR relative to ~/sPyNNakerGit (no leading /, no ..)",
                        "required": ["dir"],
                        "properties": {
                            "dir": {
                                "type": "string",
                                "pattern": r"^(?!/)(?!(?:.*/)?\.\.(?:/|$))\S+$",
                                "errorMessage": "a folder relative to ~/sPyNNakerGit (no leading /, no ..)",
                            },
                            "install": {"type": "boolean"},
                        },
                        "additionalProperties": False,
                    },
                },
                "build_c": _str(
                    "auto",
                    "Build the C code at creation: auto (when the ARM toolchain is installed), always, never.",
                    enum=["auto", "always", "never"],
                ),
                "kernel_env": {
                    "type": "object",
                    "default": {},
                    "description": "Environment variables of the sPyNNakerGit kernel (its kernel.json `env`), "
                    "e.g. {SPINNAKER_CFG_DIR: /etc/spinnaker}. No secrets: the file is in the user's home.",
                    "propertyNames": {
                        "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$",
                        "errorMessage": "environment variable names (letters, digits, _)",
                    },
                    "additionalProperties": {"type": ["string", "number", "boolean"]},
                },
                "launcher": _str(
                    "auto",
                    "The kernel's Python module: auto = spinnaker_kernel (the pinned kernel's "
                    "launcher: one sPyNNaker cfg, no debugger) when the pinned environment has it, else "
                    "ipykernel_launcher; or a module name.",
                    pattern=r"^(auto|[A-Za-z_][A-Za-z0-9_.]*)$",
                    errorMessage="auto or a Python module name",
                ),
                "concurrency": {
                    "type": ["integer", "null"],
                    "default": None,
                    "minimum": 0,
                    "description": "How many first set-ups of ~/sPyNNakerGit run at the same time on the hub's "
                    "machine (local servers); the others wait for a turn, so that the set-ups of a room of "
                    "students logging in together take little CPU from the servers still starting, and finish a "
                    "few at a time instead of all late together. Empty: half the cores, at least 1; 0: no bound.",
                },
            }
        ),
        "tutorials": _obj(
            {
                "source": _str(
                    None, "Folder of tutorial notebooks copied into new homes (default: the project's notebooks/)."
                ),
            }
        ),
        "drive": _obj(
            {
                "enabled": _bool(
                    False,
                    "Mount each user's EBRAINS Drive in their home (`~/drive/My Libraries/My Library/`, "
                    "`~/drive/Shared with groups/<library>/`), readable and writable from the file "
                    "browser, terminals and kernels. Needs auth.type ebrains, and rclone and fuse3 on the "
                    "host (/dev/fuse usable by users: mode 0666, Debian's default). Each user's server "
                    "mounts it as that user with the user's own token, refreshed by itself; while Drive "
                    "is down or refuses the token, ~/drive holds a file naming the reason.",
                ),
                "url": _str(
                    "https://drive.ebrains.eu",
                    "EBRAINS Drive (Seahub) URL; its api2/account/token/ exchanges the "
                    "user's EBRAINS access token for a Drive token.",
                ),
                "mount_point": _str(
                    "drive",
                    "Folder in each user's home where the Drive is mounted (relative to the home).",
                    pattern=r"^[A-Za-z0-9._-][A-Za-z0-9._ -]*$",
                ),
                "check_interval": _int(
                    60,
                    "Seconds between health checks (api2/auth/ping/): a refused token is exchanged "
                    "again and the Drive remounted; a dead mount is mounted again.",
                    minimum=1,
                ),
                "max_backoff": _int(
                    300,
                    "Longest wait, in seconds, between retries while Drive is down (the wait doubles "
                    "from check_interval).",
                    minimum=1,
                ),
                "timeout": _int(10, "Seconds each request to Drive or the hub's token service may take.", minimum=1),
                "rclone": _str("rclone", "The rclone command (1.60 or later, with the seafile backend)."),
                "cache_max_size": _str(
                    "1G",
                    "Most disk space rclone's write cache may use in each home "
                    "(~/.cache/spinnaker-drive), e.g. 500M, 2G.",
                ),
            }
        ),
        "jobs": _obj(
            {
                "enabled": _bool(
                    False,
                    "Run the batch job service: the EBRAINS Neuromorphic Platform job API (v3, as the "
                    "nmpi client speaks it) at jobs.ip:jobs.port, and a runner for its jobs.",
                ),
                "ip": _str(
                    "127.0.0.1",
                    "Address the job service listens on (the nmpi API sits at the root of its own "
                    "address; in production give it its own https name through a reverse proxy).",
                ),
                "port": _int(8092, "Port the job service listens on.", minimum=1, maximum=65535),
                "public_url": _str(
                    None,
                    "The URL users give nmpi as job_service, and download links start with (default http://ip:port).",
                ),
                "db_url": _str(
                    None,
                    "SQLAlchemy database URL of the job store, e.g. postgresql://host/jobs (default: "
                    "SQLite in data_dir/jobs). A URL holding a password belongs in the environment variable "
                    "SPINNAKER_JUPYTER_JOBS_DB_URL instead.",
                ),
                "executor": _str(
                    "local",
                    "Where jobs run. `local`: as the user's own system account on this machine (as "
                    "their server), in a scratch folder, with the limits below. `slurm`: as a Slurm job "
                    "submitted by that account (spawner.slurm's conf and board licence, jobs.slurm; data_dir "
                    "on storage every node mounts). `docker`: in a container of the single-user image per job "
                    "(spawner.docker's engine, jobs.docker), as that account, with only the job's folder and "
                    "its sPyNNaker cfg mounted and engine limits.",
                    enum=["local", "slurm", "docker"],
                ),
                "docker": _obj(
                    {
                        "image": _str(
                            None,
                            "Image jobs run in (executor docker); null: spawner.docker.image, the servers' "
                            "(the same sPyNNaker as the notebooks).",
                        ),
                        "network": _str(
                            None,
                            "Network of job containers (executor docker). null: none at all in spinnaker.mode "
                            "virtual and per-run (a job has no board to reach), else spawner.docker.network, "
                            "which the operator limits to the spalloc service and the boards. pip installs "
                            "(extra_pip_installs) need PyPI: this network, else spawner.docker.network.",
                        ),
                        "cpus": {
                            "type": "number",
                            "default": 1,
                            "exclusiveMinimum": 0,
                            "description": "CPU cores a job container may use (executor docker).",
                        },
                    }
                ),
                "slurm": _obj(
                    {
                        "partition": _str(
                            None, "Partition batch jobs run in (sbatch --partition); null: spawner.slurm.partition."
                        ),
                        "account": _str(None, "Slurm account batch jobs are charged to; null: spawner.slurm.account."),
                        "qos": _str(None, "Quality of service of batch jobs; null: spawner.slurm.qos."),
                        "extra_sbatch_options": _list(
                            {"type": "string"},
                            desc="More sbatch options for batch jobs, one argument each (e.g. --constraint=lab).",
                        ),
                    }
                ),
                "concurrency": _int(2, "Jobs run at the same time; the rest wait in the queue.", minimum=1),
                "token_cache_seconds": _int(
                    60, "Seconds a checked token (hub or EBRAINS) is trusted before it is checked again.", minimum=0
                ),
                "download_url_ttl": _int(
                    604800,
                    "Seconds a download link of an output file stays valid; reading the job again gives fresh links.",
                    minimum=1,
                ),
                "retention_days": _int(
                    30, "Days output files are kept after a job ends (the job and its log stay).", minimum=1
                ),
                "collabs": {
                    "type": "object",
                    "default": {},
                    "additionalProperties": {"type": "array", "items": {"type": "string"}},
                    "description": "Collabs jobs may be submitted to besides each "
                    "user's own private-<name>: collab -> the hub (or EBRAINS) groups whose members may use it, "
                    "e.g. {course-a: [course-a-students]}.",
                },
                "hardware_config_keys": _list(
                    {
                        "enum": [
                            "spynnaker_version",
                            "spinnaker_tools_version",
                            "extra_pip_installs",
                            "boards",
                            "time_limit",
                        ]
                    },
                    ["spynnaker_version", "spinnaker_tools_version", "extra_pip_installs", "boards", "time_limit"],
                    "hardware_config keys a job may set; any other key is refused at submission.",
                ),
                "pip_packages": _list(
                    {"type": "string"},
                    desc="Packages a job may install with hardware_config."
                    "extra_pip_installs (PyPI names); empty: none.",
                ),
                "limits": _obj(
                    {
                        "wall_time": _int(
                            3600,
                            "Seconds a job may run (a job's hardware_config.time_limit may ask for less).",
                            minimum=1,
                        ),
                        "cpu_time": _int(3600, "CPU seconds a job's processes may use.", minimum=1),
                        "memory_mb": _int(4096, "Address space per job process, in MiB.", minimum=256),
                        "processes": _int(256, "Processes of the job's account at once while it runs.", minimum=8),
                        "output_mb": _int(
                            1024, "MiB a job may write (its scratch folder, and any one file).", minimum=1
                        ),
                        "output_files": _int(10000, "Output files collected per job.", minimum=1),
                        "code_mb": _int(
                            100, "MiB of code a job may bring (download, clone, or unpacked archive).", minimum=1
                        ),
                        "code_files": _int(10000, "Files an archive or repository may hold.", minimum=1),
                        "inline_code_kb": _int(1024, "KiB of script a job may carry inline.", minimum=1),
                        "log_mb": _int(10, "MiB of a job's log kept; the rest is dropped with a note.", minimum=1),
                        "fetch_timeout": _int(
                            120,
                            "Seconds a code download or clone may take (and each input_data file's download).",
                            minimum=5,
                        ),
                        "input_mb": _int(
                            1024,
                            "MiB of input_data files a job may download in all, into its folder before it "
                            "runs; a job asking for more ends with an error naming this key.",
                            minimum=1,
                        ),
                        "upload_quota_mb": _int(
                            500,
                            "MiB of code archives (spinnaker-jupyter-job run uploads) each user may "
                            "keep here at once; uploads are deleted jobs.retention_days after they were "
                            "made, and an upload past the quota is refused with a line saying so.",
                            minimum=1,
                        ),
                    }
                ),
            }
        ),
    }
)


def _section(schema: dict) -> bool:
    """An object of named keys (kernels.spynnaker may also be a list of them)."""
    t = schema.get("type")
    return "properties" in schema and (t == "object" or (isinstance(t, list) and "object" in t))


def defaults(schema: dict = SCHEMA):
    """The built-in defaults: the bottom layer of the config."""
    if _section(schema):
        return {k: defaults(v) for k, v in schema["properties"].items()}
    d = schema.get("default")
    return type(d)(d) if isinstance(d, (list, dict)) else d


def describe(schema: dict = SCHEMA, prefix: str = ""):
    """(path, description) for every leaf key: the operator's reference."""
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        if _section(sub):
            if sub.get("type") != "object":  # also a list of such objects: the key's own prose says so
                yield path, sub.get("description", ""), defaults(sub)
            yield from describe(sub, path + ".")
        else:
            yield path, sub.get("description", ""), sub.get("default")
