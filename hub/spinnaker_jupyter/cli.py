"""`spinnaker-jupyter`: the operator's command.

up       validate the config, build what is missing (with progress), start the hub in the foreground
check    validate config files without starting anything
build    build or refresh the kernel environments
user     add | passwd | remove | list local accounts
volumes  list | remove users' home volumes (spawner: docker)
config   print the effective config, or the reference of every key
boards   the SpiNNaker boards user servers hold (hub database; --live asks the allocation service)
backup   save everything but the home folders (hub database, accounts, secrets, generated config) into DIR
restore  put a backup into a fresh data_dir (the hub stopped)
jobs     batch jobs: list | show | cancel | purge (from the job store, hub up or down)
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
import time
from pathlib import Path

import yaml

from . import config as configmod
from . import kernels, preflight
from .config import PROJECT_ROOT, ConfigError, Deployment
from .hubconfig import chp_command, system_users_enabled
from .schema import describe

DEFAULT_CONFIG = PROJECT_ROOT / "spinnaker-jupyter.yaml"


def say(message: str) -> None:
    print(f"[spinnaker-jupyter] {message}", flush=True)


def _config_files(args) -> list[str]:
    if args.config:
        return args.config
    env = os.environ.get(configmod.CONFIG_ENV)
    if env:
        return [f for f in env.split(os.pathsep) if f]
    return [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.exists() else []


def _load(args) -> Deployment:
    return configmod.load(_config_files(args))


def cmd_check(args) -> int:
    d = _load(args)
    preflight.trusted_config(d)
    files = ", ".join(str(f) for f in d.files) or "built-in defaults only"
    say(f"config OK ({files})")
    say(
        f"auth: {d['auth']['type']}, spawner: {d['spawner']['type']}, SpiNNaker: {d['spinnaker']['mode']}, "
        f"data in {d.data_dir}"
    )
    if d["spawner"]["type"] == "local":
        from .limits import describe_deployment

        say(describe_deployment(d))
        fork = "on: servers are forked from the hub's fork server" if d["spawner"]["local"]["fork_server"] else "off"
        say(f"spawner.local.fork_server: {fork}")
    from .uid_range import uid_range_check  # few uids left for new users' accounts (a warning), or none (a failure)

    results = [found] if (found := uid_range_check(d["spawner"]["local"]["uid_range"], d.data_dir)) else []
    if d["spawner"]["type"] == "slurm" or (d["jobs"]["enabled"] and d["jobs"]["executor"] == "slurm"):
        from .slurm_queue import probe  # the controller, the partitions, the board licence: one line each

        results += probe(d)
    for _ok, line in results:
        say(line)
    return 0 if all(ok for ok, _line in results) else 1


def _check_reachable_by_all(paths: list[Path]) -> None:
    """As root with per-user accounts, every user must be able to run the shared environments."""
    for path in paths:
        for parent in [path, *path.parents]:
            if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
                raise ConfigError(
                    f"{parent} is not reachable by other accounts (mode "
                    f"{oct(parent.stat().st_mode & 0o777)}), so user servers could not run {path}. "
                    "Install the project and data_dir under a world-traversable folder such as /opt or "
                    "/srv, or set kernels.python to an interpreter outside it."
                )


def _make_dir(path: Path, mode: int) -> None:
    """Create a folder of the project's with `mode`; one that exists keeps its mode (it may not be ours to change)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"data_dir: {path} is a file, not a folder. Set data_dir to a folder (it is created when "
            "missing) or move the file away"
        )
    try:
        path.mkdir(parents=True, mode=mode)
        os.chmod(path, mode)  # whatever the umask
    except FileExistsError:
        pass
    except OSError as e:
        raise ConfigError(
            f"data_dir: cannot create {path}: {e.strerror}. Set data_dir to a folder this account can write"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"data_dir: {path} is not writable by this account ({os.environ.get('USER') or os.geteuid()}"
            "). Set data_dir to a folder it can write, or give it this one"
        )


def prepare(d: Deployment, build: bool = True) -> None:
    _make_dir(d.data_dir, 0o755)
    preflight.check_data_dir(d)  # before anything is written into what another account may have placed
    d.private_hub_dir()
    _make_dir(d.homes_dir, 0o711)
    _make_dir(d.logs_dir, 0o700)
    if d["spawner"]["type"] == "local":
        if system_users_enabled(d):
            if os.geteuid() != 0:
                raise ConfigError("spawner.local.system_users: true needs the hub to run as root")
            _check_reachable_by_all(
                [Path(sys.executable), Path(kernels.base_python(d)), d.envs_dir, d.tutorials_dir, d.homes_dir]
            )
            say("Each user's server runs as their own system account (jupyter-<name>), home folders private.")
        else:
            say(
                "NOTE: the hub is not running as root, so all users' servers run as this one account "
                f"({os.environ.get('USER', os.getuid())}) and can read each other's files. Fine for one person or a "
                "trusted group; run as root (or use spawner.type: docker) to separate users."
            )
    if not shutil.which(chp_command(d)[0]):
        raise ConfigError(
            f"configurable-http-proxy not found at {chp_command(d)[0]}: run `npm ci` in {PROJECT_ROOT} "
            "(make up does) or set proxy.command"
        )
    if d["spawner"]["type"] == "docker":
        from .docker import check_engine

        try:
            version = check_engine(d["spawner"]["docker"])
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
        say(f"Each user's server runs in a container of their own (engine {version}); kernels come from the image.")
    else:
        kernels.build_all(d, say, build=build)


def first_admin(d: Deployment) -> None:
    if d["auth"]["type"] != "local":
        return
    from .local_accounts import AccountStore  # here: it imports JupyterHub's handlers (seconds), few commands need it

    store = AccountStore(d.accounts_file)
    if store.names():
        return
    name = d["auth"]["local"]["admin"]
    password = store.add(name, admin=True)
    bar = "=" * 72
    print(
        f"\n{bar}\n  First start: created the admin account.\n    user:     {name}\n    password: {password}\n"
        f"  This password is shown once. Change it with `spinnaker-jupyter user passwd {name}`.\n"
        f"  Add accounts with `spinnaker-jupyter user add NAME`.\n{bar}\n",
        flush=True,
    )


def cmd_up(args) -> int:
    t0 = time.monotonic()
    d = _load(args)
    preflight.trusted_config(d)
    if d.hub_dir.is_dir():
        preflight.trusted(d.hub_dir, "data_dir/hub", private=True)  # before its pid file is believed
        preflight.end_previous_hub_leftovers(d, say)  # after a crash: its proxy and services hold the ports
    preflight.check_ports(preflight.deployment_ports(d))
    say(f"config OK ({', '.join(map(str, d.files)) or 'built-in defaults'})")
    prepare(d, build=not args.no_build)
    preflight.check_accounts(d)
    for name in ("proxy_auth_token", "crypt_key") if d["auth"]["type"] == "ebrains" else ("proxy_auth_token",):
        d.secret(name)  # generated now if missing; an empty or short one is refused here, not in the hub's log
    first_admin(d)
    preflight.check_ports(preflight.deployment_ports(d))  # again: the build may have taken a minute
    env = dict(os.environ)
    env[configmod.CONFIG_ENV] = os.pathsep.join(str(f) for f in d.files)
    env[configmod.BASE_DIR_ENV] = str(d.base_dir)  # the hub runs in data_dir/hub: relative paths must not move
    hub = d["hub"]
    say(
        f"ready to start after {time.monotonic() - t0:.1f} s; the hub will answer at "
        f"{'https' if hub['tls']['cert_file'] else 'http'}://{hub['ip']}:{hub['port']}{hub['base_url']}"
    )
    hub_cmd = [  # through the servers' launcher: without the import it cuts (~1 CPU-s of every hub start)
        sys.executable,
        "-m",
        "spinnaker_singleuser",
        str(Path(sys.executable).parent / "jupyterhub"),
        "-f",
        str(Path(__file__).parent / "jupyterhub_config.py"),
    ]
    os.chdir(d.hub_dir)  # jupyterhub writes its runtime files in the working folder
    os.execve(hub_cmd[0], hub_cmd, env)


def cmd_build(args) -> int:
    d = _load(args)
    kernels.build_all(d, say, force=args.force)
    return 0


def cmd_user(args) -> int:
    d = _load(args)
    if d["auth"]["type"] != "local":
        raise ConfigError("user accounts are managed here only with auth.type: local")
    from .local_accounts import AccountStore  # here: it imports JupyterHub's handlers (seconds), few commands need it

    store = AccountStore(d.accounts_file)
    if args.action == "list":
        for name, admin in store.names().items():
            print(f"{name}{'  (admin)' if admin else ''}")
        return 0
    if not args.name:
        raise ConfigError(f"`user {args.action}` needs a NAME")
    given = sys.stdin.readline().rstrip("\n") if args.stdin else None
    min_length = d["auth"]["local"]["min_password_length"]
    if args.action == "add":
        from .account_removal import earlier_account_leftovers  # a new person gets nothing of a removed one's

        if args.name not in store.names() and (problem := earlier_account_leftovers(d, args.name)):
            raise ConfigError(problem)
        password = store.add(args.name, admin=args.admin, password=given, min_length=min_length)
        print(
            f"Created account {args.name}{' (admin)' if args.admin else ''}. "
            + ("Password set from standard input." if args.stdin else f"Password (shown once): {password}")
        )
    elif args.action == "passwd":
        password = store.set_password(args.name, given, min_length)
        print(f"New password for {args.name}: {password}" if not args.stdin else f"Password of {args.name} changed.")
    elif args.action == "remove":
        from .account_removal import remove_account

        print(remove_account(d, store, args.name, purge=args.purge))
    return 0


def cmd_boards(args) -> int:
    from .boards import cli_boards

    return cli_boards(_load(args), live=args.live, as_json=args.json)


def cmd_volumes(args) -> int:
    """Home volumes of the docker spawner: kept when servers stop; removed only here, deliberately."""
    d = _load(args)
    if d["spawner"]["type"] != "docker":
        raise ConfigError("home volumes exist only with spawner.type: docker (local homes are in data_dir/homes)")
    from . import docker as dockermod

    dk = d["spawner"]["docker"]
    if args.action == "list":
        for name in dockermod.home_volumes(dk):
            print(name)
        return 0
    if not args.name:
        raise ConfigError("`volumes remove` needs the user's NAME")
    import docker

    volume = dockermod.home_volume_name(d, args.name)  # as the hub's spawner names it (its configured `escape`)
    try:
        print(f"Removed {dockermod.remove_home_volume(dk, volume)}: {args.name}'s files are gone.")
    except docker.errors.NotFound:
        raise ConfigError(f"no home volume for {args.name} ({volume})") from None
    except docker.errors.APIError as e:
        raise ConfigError(f"could not remove {args.name}'s volume: {e.explanation} (stop their server first)") from None
    return 0


def cmd_course(args) -> int:
    from .course import cli_course_start

    users = [u for u in (args.users or "").split(",") if u]
    return cli_course_start(_load(args), args.group, users, wait=args.wait)


def cmd_config(args) -> int:
    if args.reference:
        for path, desc, default in describe():
            print(f"{path} (default {default!r})\n    {desc}")
        return 0
    d = _load(args)
    print(yaml.safe_dump(configmod.redacted(d.values), sort_keys=False), end="")  # never a password
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spinnaker-jupyter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help):
        sp = sub.add_parser(name, help=help)
        sp.add_argument(
            "-c",
            "--config",
            action="append",
            help=f"deployment config file (repeat to layer; default {DEFAULT_CONFIG.name} if present)",
        )
        sp.set_defaults(fn=fn)
        return sp

    up = add("up", cmd_up, "validate, build what is missing, and run the hub")
    up.add_argument("--no-build", action="store_true", help="skip building kernel environments")
    add("check", cmd_check, "validate the config and exit")
    b = add("build", cmd_build, "build the kernel environments")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    u = add("user", cmd_user, "manage local accounts")
    u.add_argument("action", choices=["add", "passwd", "remove", "list"])
    u.add_argument("name", nargs="?")
    u.add_argument("--admin", action="store_true", help="(add) give admin rights")
    u.add_argument("--stdin", action="store_true", help="(add, passwd) read the password from standard input")
    u.add_argument("--purge", action="store_true", help="(remove) delete the home folder instead of archiving it")
    bd = add("boards", cmd_boards, "list the SpiNNaker boards held by user servers")
    bd.add_argument("--live", action="store_true", help="also ask the allocation service for each job's state")
    bd.add_argument("--json", action="store_true", help="print JSON")
    v = add("volumes", cmd_volumes, "list or remove users' home volumes (spawner: docker)")
    v.add_argument("action", choices=["list", "remove"])
    v.add_argument("name", nargs="?")
    co = add("course", cmd_course, "start the servers of a class (a hub group, or --users) before it begins")
    co.add_argument("action", choices=["start"])
    co.add_argument("group", nargs="?", help="hub group whose members' servers start")
    co.add_argument("--users", help="comma-separated hub user names instead of a group")
    co.add_argument(
        "--wait",
        type=float,
        default=600,
        help="seconds to report progress until all are ready (0: start them and return)",
    )
    cf = add("config", cmd_config, "print the effective config")
    cf.add_argument("--reference", action="store_true", help="list every key with its default and meaning")
    from .backup import register as add_backup_commands  # backup / restore: everything but the homes

    add_backup_commands(add)
    from .jobs.admin_cli import register as add_jobs_command  # jobs list | show | cancel | purge

    add_jobs_command(add, _load)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except Exception as e:
        accounts = sys.modules.get(f"{__package__}.local_accounts")  # an AccountError comes only once it is imported
        if not isinstance(e, ConfigError) and not (accounts and isinstance(e, accounts.AccountError)):
            raise
        print(f"spinnaker-jupyter: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
