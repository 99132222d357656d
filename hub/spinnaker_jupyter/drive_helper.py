"""EBRAINS Drive for container servers (spawner.type docker + drive.enabled; docs/DRIVE.md, "Containers").

The notebook container stays unprivileged. Beside it runs a helper container from images/drive, as the same uid
and gid (the user's own host account, docker.container_account; never the image's 1000), with /dev/fuse and CAP_SYS_ADMIN only (every other capability dropped): the keeper of local servers
(spinnaker_jupyter_ext.drive, `python -m`) mounts the user's Drive with rclone there. The mount reaches the notebook
through a host folder, ``<drive_dir>/<user>``, bound into the helper with ``rshared`` and into the notebook container
at ``~/drive`` with ``rslave`` propagation; ``drive_dir`` must be on a shared mount (systemd hosts: all are) and is
root's, mode 0700, so that no host account and no other container reaches a user's folder; ``<drive_dir>/<user>``
is the user's account's, mode 0750.

The helper gets the server's API token (to ask the hub's access-token-service for the user's EBRAINS token, as the
server itself would) and the Drive settings; the Drive token exists only in rclone's environment inside the helper,
whose processes the notebook container cannot see (another PID namespace). The home volume is bound into both, so
rclone's write cache and the mount's state (state.json, read by `spinnaker-status` and the JupyterLab notice) are
the user's own, as on local servers.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
from pathlib import Path

from docker.errors import APIError, NotFound

from .docker import IMAGE_HOME, PASSWD_GROUP

HELPER_CAPABILITIES = ["SYS_ADMIN"]  # mount(2) by fusermount3; nothing else
STOP_SECONDS = 20  # the keeper waits up to drive.flush_timeout (8 s) for pending uploads, then unmounts
MNT_DETACH = 2


class DriveSetupError(Exception):
    """The host cannot give this user's helper its folder; the message says what the operator must do."""


def _mounts() -> list[tuple[str, list[str], str]]:
    """(mount point, optional fields, file system type) of every mount the hub sees."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].replace("\\040", " ")
            out.append((point, fields[6:sep], fields[sep + 1]))
    return out


def on_shared_mount(path: Path) -> bool:
    """Whether mounts made below ``path`` by one container propagate to the host (and so to the others)."""
    target = os.path.realpath(path)
    best, shared = "", False
    for point, optional, _ in _mounts():
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, shared = point, any(o.startswith("shared:") for o in optional)
    return shared


def prepare_host_dir(root: Path, user: str, uid: int, gid: int) -> Path:
    """``root/user``: made, owned by ``uid``:``gid`` (the user's account), a dead mount a killed helper left detached."""
    if os.geteuid() != 0:
        raise DriveSetupError(
            "EBRAINS Drive in containers needs the hub to run as root on the host (it prepares "
            f"{root}); run the hub as root or set drive.enabled: false"
        )
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = root.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise DriveSetupError(
            f"spawner.docker.drive_dir: {root} must be a folder owned by root (only the container "
            f"engine enters it): chown root:root {root}"
        )
    os.chmod(root, 0o700)
    if not on_shared_mount(root):
        raise DriveSetupError(
            f"spawner.docker.drive_dir: {root} is not on a shared mount, so a Drive mounted in the "
            f"helper container would not reach the notebook container; make it one at boot: "
            f"mount --bind {root} {root} && mount --make-shared {root} (systemd hosts share / "
            f"already)"
        )
    host = root / user
    try:
        st = host.lstat()
    except FileNotFoundError:
        host.mkdir(mode=0o750)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        # A helper that was killed left its FUSE mount behind: detach it, or no container could bind the folder.
        if ctypes.CDLL(None, use_errno=True).umount2(str(host).encode(), MNT_DETACH) != 0:
            raise DriveSetupError(
                f"{host}: a dead Drive mount could not be detached "
                f"({os.strerror(ctypes.get_errno())}); run: umount -l {host}"
            ) from None
    else:
        if not stat.S_ISDIR(st.st_mode):
            raise DriveSetupError(f"{host} is not a folder: remove it")
    os.chown(host, uid, gid)
    os.chmod(host, 0o750)  # group: fusermount3 (setuid, fsuid dropped, no DAC capability) must enter it to mount
    return host


def notebook_settings(text: str, helper: DriveHelper | None) -> str:
    """SPINNAKER_DRIVE of the notebook container: the helper keeps the mount (or why there is none)."""
    settings = json.loads(text)
    settings["keeper"] = "helper"
    if helper is not None and helper.error:
        settings["helper_error"] = helper.error
    return json.dumps(settings)


class DriveHelper:
    """One user server's Drive helper container: prepared before the server's container, started after it,
    stopped before it."""

    def __init__(self, spawner):
        self.spawner = spawner
        self.error: str | None = None
        self.host_dir: Path | None = None
        suffix = f"--{spawner.name}" if spawner.name else ""
        self.name = f"{spawner.prefix}-drive-{spawner.escaped_name}{suffix}"
        self.settings = json.loads(spawner.environment.get("SPINNAKER_DRIVE") or "{}")
        self.target = f"{IMAGE_HOME}/{self.settings.get('mount_point', 'drive')}"

    async def prepare(self) -> None:
        """Before the notebook container is made: what could fail is found here, and said in its ~/drive."""
        try:
            a = self.spawner.account  # (docker.container_account, decided before)
            self.host_dir = prepare_host_dir(Path(self.spawner.drive_dir), self.spawner.escaped_name, a.uid, a.gid)
            await self.spawner.docker("inspect_image", self.spawner.drive_image)
        except NotFound:
            self._failed(
                f"spawner.docker.drive_image {self.spawner.drive_image} is not on the container engine: "
                f"build it (docker build -f images/drive/Containerfile -t {self.spawner.drive_image} .)"
            )
            return
        except (DriveSetupError, OSError, APIError) as e:
            self._failed(str(e))
            return
        self.spawner.volumes = {
            **self.spawner.volumes,
            str(self.host_dir): {"bind": self.target, "mode": "rw", "propagation": "rslave"},
        }

    def _failed(self, why: str) -> None:
        self.error = f"the Drive cannot be mounted in containers on this host ({why})"
        self.spawner.log.error("EBRAINS Drive for %s: %s", self.spawner.user.name, why)

    async def start(self) -> None:
        if self.error:
            return
        sp = self.spawner
        env = sp.get_env()
        helper_env = {
            k: env[k]
            for k in ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_SERVICE_HOST", "JUPYTERHUB_SERVICE_PORT")
            if k in env
        }
        helper_env["SPINNAKER_DRIVE"] = json.dumps(self.settings)
        helper_env["NB_USER"] = sp.account.name
        home_volume = next(iter(sp.volume_binds))
        host_config = sp.client.create_host_config(
            binds={
                home_volume: {"bind": IMAGE_HOME, "mode": "rw"},
                str(self.host_dir): {"bind": self.target, "mode": "rw", "propagation": "rshared"},
            },
            devices=["/dev/fuse:/dev/fuse:rwm"],
            cap_drop=["ALL"],
            cap_add=HELPER_CAPABILITIES,
            group_add=[str(PASSWD_GROUP)],  # (its entrypoint writes the uid's passwd entry: fusermount3 asks its name)
            network_mode=sp.network_name,
        )
        await self._remove()  # one left by a hub that died
        labels = dict(
            (sp.extra_create_kwargs or {}).get("labels", {}) if isinstance(sp.extra_create_kwargs, dict) else {}
        )
        created = await sp.docker(
            "create_container",
            image=sp.drive_image,
            name=self.name,
            environment=helper_env,
            user=f"{sp.account.uid}:{sp.account.gid}",
            host_config=host_config,
            labels=labels,
        )
        await sp.docker("start", created["Id"])
        sp.log.info("EBRAINS Drive for %s: helper container %s started", sp.user.name, self.name)

    async def stop(self) -> None:
        try:
            await self.spawner.docker("stop", self.name, timeout=STOP_SECONDS)
        except NotFound:
            return
        except APIError as e:
            self.spawner.log.warning("EBRAINS Drive: stopping %s: %s", self.name, e)
        await self._remove()

    async def _remove(self) -> None:
        try:
            await self.spawner.docker("remove_container", self.name, force=True)
        except NotFound:
            pass
