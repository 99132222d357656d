"""Production spawner: one container per user from the project's single-user image (upstream DockerSpawner,
configured), with a named home volume kept across stops, resource limits, and spawn progress in words.

Works against Docker Engine (production) and podman's Docker-compatible API (tests here). With host networking
(one host, no bridge: the tests) each server gets a free port on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket

from dockerspawner import DockerSpawner
from traitlets import Bool, Unicode

from .boards import BoardsMixin
from .progress import ProgressMixin, wait_until_listening
from .spawn_queue import refuse_if_full, start_slot

IMAGE_ENV_ROOT = "/opt/envs"  # where the single-user image keeps its environments


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
    _drive = None  # this start's DriveHelper, when the Drive is on

    def get_env(self):
        env = super().get_env()
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
