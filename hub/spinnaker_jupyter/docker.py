"""Production spawner: one container per user from the project's single-user image (upstream DockerSpawner,
configured), with a named home volume kept across stops, resource limits, and spawn progress in words.

Works against Docker Engine (production) and podman's Docker-compatible API (tests here). With host networking
(one host, no bridge: the tests) each server gets a free port on 127.0.0.1.

As whom: every container of a user (the server, its Drive helper, the job service's copy into ~/jobs) runs as
that user's own host account, jupyter-<name> (the account their batch jobs run as: container_account), never as
the image's uid 1000 (on the host the first login account, which could then read every server's environment, its
API token, and signal it) and never as root; the server with no capabilities and no-new-privileges. The image's
launcher (spinnaker_singleuser) writes the uid's passwd entry into the container's own /etc/passwd, writable by
the image's group PASSWD_GROUP only (added to the container; the image has no setuid program), so `whoami`, git and
the prompt know the name. The home volume belongs to that uid: hand_over_home chowns it whenever its top folder is
not that account's (a new volume; one an earlier release made for uid 1000; one of the user's account before a hub
container was re-created without its /etc/passwd, so the account has a new uid), in a short root container with only
that volume (no network, CAP_CHOWN and CAP_DAC_READ_SEARCH only, links never followed). A home volume is named for
its user and only ever mounted into that user's containers, so whoever owns its files, they are that user's.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import socket
from pathlib import Path

from dockerspawner import DockerSpawner
from jupyterhub.spawner import SpawnException
from jupyterhub.utils import maybe_future
from traitlets import Bool, List, Unicode

from .boards import BoardsMixin
from .progress import ProgressMixin, wait_until_listening
from .spawn_queue import refuse_if_full, start_slot

IMAGE_ENV_ROOT = "/opt/envs"  # where the single-user image keeps its environments
IMAGE_HOME = "/home/jovyan"  # where the single-user image mounts the user's home volume
IMAGE_UID = 1000  # the images' own user (jovyan): never a container's user
PASSWD_GROUP = 100  # the single-user image's group that may write its /etc/passwd and /etc/group (users)
# Inside the hand-over container ($1: uid:gid): the top of the volume last, so a hand-over cut short is done again
# at the next start; -execdir and chown -h: no link is followed, neither a name's last part nor a folder on the way.
# Says the top's earlier owner when it handed over, nothing when there was nothing to do.
HAND_OVER = f"""set -eu
h={IMAGE_HOME}
was=$(stat -c %u:%g "$h")
[ "$was" = "$1" ] && exit 0
find "$h" -xdev -mindepth 1 -execdir chown -h "$1" {{}} +
chown -h "$1" "$h"
echo "$was"
"""


class ContainerAccountError(RuntimeError):
    """The user's containers have no account to run as; the message says what the operator does."""


def container_account(prefix: str, homes_dir, hub_user: str, uid_range, what: str = "server", log=None):
    """The one decision of the uid and gid a user's containers run as (server, Drive helper, home copies): the
    user's own system account, the one their batch jobs run as, found or made as the job service makes it
    (jobs/executor.py LocalExecutor.account, usernames.make_system_account: a uid of spawner.local.uid_range).
    Needs root (the hub makes accounts). ``log`` hears a takeover of a removed deployment's account. Returns a
    jobs.executor.Account."""
    from .jobs.executor import AccountError, LocalExecutor

    if os.geteuid() != 0:
        raise ContainerAccountError(
            f"Container servers run as each user's own host account ({prefix}<name>), which the hub creates: "
            "run the hub (and the job service) as root."
        )
    try:
        account = LocalExecutor(Path(homes_dir), True, prefix, log=log, uid_range=uid_range).account(hub_user)
    except AccountError as e:  # (its cause says it for the user's `what`: "server" or "jobs")
        cause = e.__context__
        raise ContainerAccountError(cause.message(what) if hasattr(cause, "message") else str(e)) from None
    if account.uid in (0, IMAGE_UID) or account.gid == 0:
        raise ContainerAccountError(f"{account.name} has uid {account.uid}: containers never run as 0 or 1000")
    return account


def hand_over_home(api, image: str, volume: str, uid: int, gid: int, labels: dict) -> str | None:
    """Make the home volume ``volume`` belong to ``uid``:``gid`` whenever its top folder is not theirs (made when
    missing, with the image's home in it). Returns what it was, for the one log line ("a new volume", "uid U's (gid
    G)"); None: it already was theirs (seen from the host where the engine's volume folder is here: no container
    then). A short root container of ``image`` with only that volume does it: no network, no capability but
    CAP_CHOWN and CAP_DAC_READ_SEARCH (to enter the old owner's private folders), links never followed. ``api``: a
    docker APIClient (blocking)."""
    import docker

    try:
        where = api.inspect_volume(volume).get("Mountpoint") or ""
        new = False
    except docker.errors.NotFound:
        where, new = "", True
    if where and os.path.isdir(where):
        st = os.stat(where)
        if (st.st_uid, st.st_gid) == (uid, gid):
            return None
    host_config = api.create_host_config(
        binds={volume: {"bind": IMAGE_HOME, "mode": "rw"}},
        network_mode="none",
        cap_drop=["ALL"],
        cap_add=["CHOWN", "DAC_READ_SEARCH"],
        security_opt=["no-new-privileges"],
        read_only=True,
        pids_limit=32,
        mem_limit=128 * 2**20,
    )
    created = api.create_container(
        image,
        ["sh", "-c", HAND_OVER, "sh", f"{uid}:{gid}"],
        user="0:0",
        host_config=host_config,
        labels=labels,
        name=f"spinnaker-jupyter-home-{secrets.token_hex(4)}",
    )
    try:
        api.start(created["Id"])
        code = int(api.wait(created["Id"], timeout=600).get("StatusCode", -1))
        said = api.logs(created["Id"], stdout=False, stderr=True).decode(errors="replace").strip()
        was = api.logs(created["Id"], stdout=True, stderr=False).decode(errors="replace").strip()
    finally:
        api.remove_container(created["Id"], force=True)
    if code != 0:
        raise RuntimeError(f"The home volume {volume} could not be given to uid {uid} ({said or f'exit {code}'})")
    if not was:
        return None  # (theirs already: seen only inside, where the host does not see the engine's volume folders)
    if new:
        return "a new volume"
    owner, _, group = was.partition(":")
    return f"uid {owner}'s (gid {group})"


class ContainerSpawner(ProgressMixin, DockerSpawner):
    """DockerSpawner with spawn progress in words, the fast readiness wait, and optional host networking."""

    host_network = Bool(
        False,
        help="Containers share the host's network (single host, tests): each server gets a free port on 127.0.0.1.",
    ).tag(config=True)
    drive_image = Unicode(
        "",
        help="Image of the EBRAINS Drive helper (images/drive); empty: no helper. Used when "
        "the server's environment has SPINNAKER_DRIVE (drive_helper.py).",
    ).tag(config=True)
    drive_dir = Unicode(
        "/var/lib/spinnaker-jupyter/drive",
        help="Host folder of the users' Drive mounts (on a shared mount; drive_helper.py).",
    ).tag(config=True)
    system_user_prefix = Unicode("jupyter-", help="spawner.local.system_user_prefix: the users' accounts").tag(
        config=True
    )
    homes_dir = Unicode("", help="The deployment's homes_dir (the users' accounts' home on the host)").tag(config=True)
    uid_range = List([], help="spawner.local.uid_range: the uids of new accounts").tag(config=True)
    _drive = None  # this start's DriveHelper, when the Drive is on
    account = None  # this start's jobs.executor.Account: the uid and gid the containers run as

    def get_env(self):
        env = super().get_env()
        if self.account is not None:
            env["NB_USER"] = self.account.name  # the name the image's launcher gives the uid (spinnaker_singleuser)
        if self.drive_image and env.get("SPINNAKER_DRIVE"):
            from .drive_helper import notebook_settings

            env["SPINNAKER_DRIVE"] = notebook_settings(env["SPINNAKER_DRIVE"], self._drive)
        return env

    def run_pre_spawn_hook(self):
        refuse_if_full(self)  # a full start queue refuses at once, before a SpiNNaker board is claimed
        return super().run_pre_spawn_hook()

    async def start(self):
        self.progress_reset()
        async with start_slot(self):  # a few starts at a time, first come first served (spawn_queue.py)
            return await self._start()

    async def _start(self):
        if self.host_network:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        await self._as_account()
        self.progress_say(
            20,
            f"Starting your container from {self.image}, with your home volume "
            f"{self.volume_name_template.format(username=self.escaped_name, servername='')}",
        )
        if self.drive_image and json.loads(self.environment.get("SPINNAKER_DRIVE") or "null"):
            from .drive_helper import DriveHelper  # the user's Drive, mounted by a helper container beside this one

            self._drive = DriveHelper(self)
            await self._drive.prepare()
        ip, port = await super().start()
        if self._drive is not None:
            await self._drive.start()
        self.progress_say(60, "Your container is running; waiting for Jupyter inside it to answer")

        async def ended():
            status = await self.poll()
            return None if status is None else f"Your container stopped during start-up ({status})."

        await wait_until_listening(ip, port, self.start_timeout, ended)
        return ip, port

    async def _as_account(self) -> None:
        """The user's account (made when missing), their home volume theirs, and the container made as them."""
        loop = asyncio.get_running_loop()
        try:
            self.account = a = await loop.run_in_executor(
                None,
                functools.partial(
                    container_account,
                    self.system_user_prefix,
                    self.homes_dir,
                    self.user.name,
                    self.uid_range,
                    log=self.log,
                ),
            )
        except ContainerAccountError as e:
            refused = SpawnException(str(e), reason="no_account", status_code=503)
            refused.jupyterhub_message = str(e)  # what the spawn page says
            raise refused from None
        create = await maybe_future(self._eval_if_callable(self.extra_create_kwargs)) or {}
        host = await maybe_future(self._eval_if_callable(self.extra_host_config)) or {}
        volume, labels = next(iter(self.volume_binds)), create.get("labels", {})
        was = await loop.run_in_executor(None, hand_over_home, self.client, self.image, volume, a.uid, a.gid, labels)
        if was:  # once: the next start finds it theirs
            self.log.info(
                "Home volume %s of %s handed over to %s (uid %d); it was %s", volume, self.user.name, a.name, a.uid, was
            )
        self.extra_create_kwargs = {**create, "user": f"{a.uid}:{a.gid}"}
        self.extra_host_config = {
            **host,
            "group_add": [str(PASSWD_GROUP)],
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
        }

    async def stop(self, now=False):
        if self.drive_image:  # the helper first: it flushes pending uploads and unmounts (also after a hub restart)
            from .drive_helper import DriveHelper

            await (self._drive or DriveHelper(self)).stop()
        return await super().stop(now)

    async def get_ip_and_port(self):
        if self.host_network:
            return "127.0.0.1", self.port
        return await super().get_ip_and_port()

    @property
    def volume_name_template(self) -> str:
        return next(iter(self.volumes))  # the home volume, first in config


class SpiNNakerDockerSpawner(BoardsMixin, ContainerSpawner):
    """The board claim (boards/mixin.py) comes before the container starts; its cfg reaches the container as
    SPINNAKER_MACHINE_CFG."""


def engine(dk: dict):
    import docker

    return docker.DockerClient(base_url=dk["engine_url"]) if dk["engine_url"] else docker.from_env()


def check_engine(dk: dict) -> str:
    """Fail early, with what to do, when the container engine or the image is not there."""
    import docker

    where = dk["engine_url"] or "DOCKER_HOST / the default socket"
    try:
        client = engine(dk)
        version = client.version().get("Version", "?")
    except docker.errors.DockerException as e:
        raise RuntimeError(
            f"spawner.docker: cannot reach the container engine at {where} ({e}). Start Docker "
            "Engine (or `podman system service`) or set spawner.docker.engine_url."
        ) from None
    for image in {dk["image"], *dk["images"].values()}:
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            if dk["pull_policy"] in ("never", "skip"):
                raise RuntimeError(
                    f"spawner.docker.image: {image} is not on the engine and pull_policy is "
                    f"{dk['pull_policy']}: build it with `python images/build.py` first"
                ) from None
    return version


def home_volumes(dk: dict) -> list[str]:
    return sorted(v.name for v in engine(dk).volumes.list() if v.name.startswith(dk["volume_prefix"]))


def home_volume_name(d, user_name: str) -> str:
    """The name of a user's home volume as the hub's spawner makes it: `volume_prefix` + the user's name escaped by
    the spawner's `escape` as configured. `escape` is no deployment-config key: an operator sets it (a function, or
    'legacy' for volumes made before DockerSpawner 12) in jupyterhub_config.d, so those files are read as the hub
    reads them (after the same checks), with the spawner class they may set."""
    from traitlets import import_item
    from traitlets.config import Config

    from .preflight import trusted_config

    c = Config()
    c.JupyterHub.spawner_class = SpiNNakerDockerSpawner
    for extra in trusted_config(d):
        exec(compile(extra.read_text(), str(extra), "exec"), {"c": c, "get_config": lambda: c})
    cls = c.JupyterHub.spawner_class
    spawner = (import_item(cls) if isinstance(cls, str) else cls)(config=c)
    return d["spawner"]["docker"]["volume_prefix"] + spawner.escape(user_name)


def remove_home_volume(dk: dict, name: str) -> str:
    """Admin action: delete the home volume `name` (home_volume_name; refused while a container uses it)."""
    engine(dk).volumes.get(name).remove()
    return name
