"""`jobs.executor: docker`: each job's command runs in a container of the single-user image the user's servers run
(spawner.docker.image, or jobs.docker.image): the same sPyNNaker and Python as their notebooks.

* What the container gets: the job's scratch folder (code, inputs, .job/, outputs; bound read-write at its own
  path) and the folder of the job's sPyNNaker cfg (XDG_CONFIG_DIRS, read-only), nothing else. Not the user's home
  volume: a job runs code from anywhere (a git URL, an archive), and the home holds the user's notebooks and their
  job token (~/.config/spinnaker-jupyter/job.json); everything a job needs is in its folder, and its outputs reach
  the user through the service.
* As whom: the user's own job account (jupyter-<name>, the local executor's: the one that fetched the code and
  owns the folder), never root, never uid 1000 (the image's user; on the host the first login account). The user's
  server containers run as this same account (docker.container_account), so a job, its outputs in ~/jobs and the
  user's server are one uid. No capabilities, no-new-privileges, a read-only image with a private /tmp.
* Network: none where the job has no board to reach (spinnaker.mode virtual or per-run): `network_mode: none`.
  With boards (session, machine) it needs spalloc and the boards: jobs.docker.network, else the servers'
  network (spawner.docker.network), which the operator limits to those (docs/JOBS.md). pip installs
  (hardware_config.extra_pip_installs) run in their own container of the same image on that network.
* Limits: memory (jobs.limits.memory_mb, for the whole container, no swap), processes (jobs.limits.processes, the
  pids limit), cores (jobs.docker.cpus), CPU time and file size (rlimits: jobs.limits.cpu_time, output_mb), and
  the job's time limit twice: the runner stops the container at it, and `timeout` inside kills the command
  shortly after if the service is gone.
* pip (extra_pip_installs) gets this machine's pip settings, as the image build does (pip_config.py, shared):
  the CA bundle (mounted read-only), the index URLs and trusted hosts of `pip config list`; host paths
  (find-links, file:// indexes, constraints) stay on the host.
* sPyNNaker versions: a job's spynnaker_version is checked against the release in the image (its label
  spinnaker-jupyter.spynnaker, else asked once of the image's Python; cached per image id in data_dir/jobs), not
  against the host's kernel environments: `versions()`, and `release()` is what the runner runs a job with.
* Outputs also land in the user's home, their named volume (the spawner's: docker.home_volume_name), as
  ~/jobs/<id>/, written by a short container of the servers' image as the user's account (never root; a volume
  an earlier release left to uid 1000 is first handed over, docker.hand_over_home), with only
  that volume and the service's copy of the outputs (read-only) mounted and no network: what the job or the user
  planted in the home (links, files of others) can only touch that home; a link where ~/jobs or ~/jobs/<id> should
  be stops the copy, and links inside are replaced, never followed.
* The log is the container's output, streamed as it comes; the exit code and an out-of-memory kill come from the
  engine. Cancel and kill = stop, then remove. Every container is labelled with this deployment's job folder; at
  start-up the service removes those a previous run left (their jobs go back in the queue, as on the local
  executor).

(Over ~400 lines: one executor; what a job's container, its pip container and its home-copy container may do are
decided together, beside the engine calls that make them.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from .. import pip_config
from ..docker import IMAGE_ENV_ROOT, IMAGE_HOME, ContainerAccountError, container_account, engine, hand_over_home
from ..kernels import Release, bare_version
from . import sessions
from .executor import LocalExecutor
from .joblog import JobLog
from .runner import _stamp

log = logging.getLogger("spinnaker_jupyter.jobs")
LABEL = "spinnaker-jupyter.jobs"  # value: this deployment's data_dir/jobs (two deployments may share an engine)
JOB_LABEL = "spinnaker-jupyter.job"
IMAGE_PYTHON = f"{IMAGE_ENV_ROOT}/spynnaker/bin/python"
BACKSTOP = 30  # seconds past the time limit after which `timeout` in the container kills a job nobody stopped
VERSION_LABEL = "spinnaker-jupyter.spynnaker"  # an image's sPyNNaker release(s), comma-separated, when it says
PIP_CA = "/etc/spinnaker-jupyter/pip-ca-bundle.crt"  # the host's pip CA bundle, inside a pip container
PIP_KEYS = ("index-url", "extra-index-url", "trusted-host", "proxy", "default-timeout")  # (+ cert) pip settings
# The copy into ~/jobs/<id>/ inside the helper container ($1: the job id): links are never followed.
COPY_HOME = f"""set -eu
cd {IMAGE_HOME}
for d in jobs "jobs/$1"; do
    if [ -L "$d" ] || {{ [ -e "$d" ] && [ ! -d "$d" ]; }}; then echo "~/$d is not a folder (a link?)" >&2; exit 3; fi
    [ -d "$d" ] || mkdir -- "$d"
done
tar -C /job-outputs -cf - . | tar -C "jobs/$1" -xf - --no-same-owner --no-same-permissions
"""


class DockerExecutor(LocalExecutor):
    def __init__(
        self,
        homes_dir: Path,
        system_users: bool,
        prefix: str,
        *,
        store,
        settings,
        docker: dict,
        image: str,
        network: str,
        pip_network: str,
        cpus: float,
        labels: dict,
        sessions_dir: Path | None = None,
        log=None,
        home_volume: Callable[[str], str] | None = None,
        home_image: str | None = None,
        uid_range: list[int] | None = None,
    ):
        super().__init__(homes_dir, system_users, prefix, log=log, sessions_dir=sessions_dir, uid_range=uid_range)
        self.store, self.s, self.docker = store, settings, docker
        self.image, self.network, self.pip_network, self.cpus = image, network, pip_network, cpus
        self.labels = {**labels, LABEL: str(settings.data)}
        self.home_volume, self.home_image = home_volume, home_image or image  # user -> their home volume's name
        self.jobs: dict[int, ContainerJob] = {}  # our pid -> its container, this run of the service
        self._ids = itertools.count(1)
        self._versions: dict[str, list[str]] = {}  # image id -> its sPyNNaker release(s)
        self.client = self._check()
        self._sweep()
        self.pip_env, self.pip_ca = pip_settings()

    def _check(self):
        """The engine and the image, or one line saying what to do (the service cannot run jobs without them)."""
        import docker as docker_py

        where = self.docker.get("engine_url") or "DOCKER_HOST / the default socket"
        try:
            client = engine(self.docker)
            client.version()
        except (docker_py.errors.DockerException, OSError) as e:  # (requests' ConnectionError is an OSError)
            raise SystemExit(
                f"jobs.executor docker: cannot reach the container engine at {where} ({e}); start "
                "Docker Engine (or `podman system service`) or set spawner.docker.engine_url."
            ) from None
        try:
            client.images.get(self.image)
        except docker_py.errors.ImageNotFound:
            raise SystemExit(
                f"jobs.executor docker: the image {self.image} (jobs.docker.image, else "
                "spawner.docker.image) is not on the engine: build it with `python images/build.py "
                "singleuser` first."
            ) from None
        return client

    @classmethod
    def for_deployment(cls, d, settings, store, local: LocalExecutor) -> DockerExecutor:
        from ..docker import home_volume_name

        dk, jd = d["spawner"]["docker"], d["jobs"]["docker"]
        with_boards = d["spinnaker"]["mode"] in ("session", "machine")
        network = jd["network"] or (dk["network"] if with_boards else "none")
        return cls(
            local.homes_dir,
            local.system_users,
            local.prefix,
            store=store,
            settings=settings,
            docker=dk,
            image=jd["image"] or dk["image"],
            network=network,
            pip_network=jd["network"] or dk["network"],
            cpus=jd["cpus"],
            labels=dict(dk["labels"]),
            sessions_dir=local.sessions_dir,
            log=local.log,
            # (homes are volumes only where the servers are containers too)
            home_volume=(lambda user: home_volume_name(d, user)) if d["spawner"]["type"] == "docker" else None,
            home_image=dk["image"],
            uid_range=local.uid_range,
        )

    # --- the image's sPyNNaker -----------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """The sPyNNaker release(s) of the job image: what a job's spynnaker_version is checked against."""
        image = self.client.images.get(self.image)
        if image.id not in self._versions:
            self._versions[image.id] = self._image_versions(image)
        return self._versions[image.id]

    def release(self, config: dict) -> Release:
        """What runs a job here (its spynnaker_version was checked against versions()): the image's environment."""
        version = self.versions()[0] if self.versions() else None
        return Release(
            version=bare_version(version) if version else None,
            requirements=Path(),
            env=Path(IMAGE_PYTHON).parent.parent,
            kernel_name="spynnaker",
            display_name=f"sPyNNaker {bare_version(version)}" if version else "sPyNNaker",
            key="jobs.docker.image",
        )

    def _image_versions(self, image) -> list[str]:
        said = (image.labels or {}).get(VERSION_LABEL)
        if said:
            return [v.strip() for v in said.split(",") if v.strip()]
        cache = self.s.data / "image-versions.json"  # one query per image id, also across restarts
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
        if image.id in known:
            return known[image.id]
        query = (
            "import importlib.metadata as m\n"
            "print(','.join(d.version for d in m.distributions() if (d.metadata['Name'] or '').lower() == 'spynnaker'))"
        )
        out = self.client.containers.run(
            image.id,
            [IMAGE_PYTHON, "-c", query],
            user="65534:65534",
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=True,
            labels=self.labels,
            remove=True,
            stdout=True,
            stderr=False,
        )
        found = [v for v in out.decode().strip().split(",") if v]
        known[image.id] = found
        cache.write_text(json.dumps(known))
        log.info("The job image %s has sPyNNaker %s", self.image, ", ".join(found) or "(none)")
        return found

    def _sweep(self) -> None:
        """Containers a previous run of the service left (it crashed or was killed): removed."""
        for c in self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.s.data}"}):
            log.warning(
                "Removing container %s of job %s left by a previous run of the job service",
                c.name,
                c.labels.get(JOB_LABEL),
            )
            c.remove(force=True)

    def _wall(self, job_id: int) -> int:
        job = self.store.get(job_id)
        config = json.loads(job.hardware_config or "{}") if job else {}
        return int(config.get("time_limit") or self.s.wall_time)

    def _container_kwargs(self, argv, cwd: Path, env: dict, limits, account, job_id: int, pip: bool) -> dict:
        import docker

        here = str(Path(argv[0]).parent)  # the host's interpreter: the image's takes its place
        env = {**env, "PATH": env.get("PATH", "").replace(here, f"{IMAGE_ENV_ROOT}/spynnaker/bin")}
        mounts = [docker.types.Mount(str(cwd), str(cwd), type="bind")]
        for folder in filter(None, env.get("XDG_CONFIG_DIRS", "").split(":")):  # the job's cfg, read-only
            mounts.append(docker.types.Mount(folder, folder, type="bind", read_only=True))
        if pip:  # this machine's pip settings (index, CA bundle), for pip only: the job's command does not get them
            env.update(self.pip_env)
            if self.pip_ca:
                mounts.append(docker.types.Mount(PIP_CA, self.pip_ca, type="bind", read_only=True))
                env["PIP_CERT"] = PIP_CA
        ulimits = [
            docker.types.Ulimit(name="cpu", soft=limits.cpu_seconds, hard=limits.cpu_seconds + 5),
            docker.types.Ulimit(name="fsize", soft=limits.file_bytes, hard=limits.file_bytes),
            docker.types.Ulimit(name="core", soft=0, hard=0),
            docker.types.Ulimit(name="nofile", soft=1024, hard=1024),
            # (set, and never above the engine's own: raising one needs CAP_SYS_RESOURCE, which jobs lack;
            # per uid, as on the local executor: the job account's processes)
            docker.types.Ulimit(name="nproc", soft=limits.processes, hard=limits.processes),
        ]
        command = [IMAGE_PYTHON, *argv[1:]]
        if not pip:
            command = ["timeout", "-s", "KILL", f"{self._wall(job_id) + BACKSTOP}s", *command]
        return dict(
            image=self.image,
            command=command,
            user=f"{account.uid}:{account.gid}",
            environment=env,
            working_dir=str(cwd),
            mounts=mounts,
            network_mode=self.pip_network if pip else self.network,
            mem_limit=limits.memory_bytes,
            memswap_limit=limits.memory_bytes,
            pids_limit=limits.processes,
            nano_cpus=int(self.cpus * 1e9),
            ulimits=ulimits,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=True,
            tmpfs={"/tmp": "size=64m,mode=1777"},
            stdin_open=False,
            tty=False,
            labels={**self.labels, JOB_LABEL: str(job_id)},
            name=f"spinnaker-jupyter-job-{job_id}-{secrets.token_hex(3)}",
        )

    async def start(self, argv, cwd, env, limits, account):
        job_id = int(env["SPINNAKER_JOB_ID"])
        pip = argv[1:3] == ["-m", "pip"]
        kwargs = self._container_kwargs(argv, cwd, env, limits, account, job_id, pip)
        loop = asyncio.get_running_loop()
        container = await loop.run_in_executor(None, lambda: self.client.containers.create(**kwargs))
        pid = next(self._ids)
        job = ContainerJob(self, pid, job_id, container, loop)
        self.jobs[pid] = job
        try:
            await loop.run_in_executor(None, container.start)
        except BaseException:
            self.jobs.pop(pid, None)
            await loop.run_in_executor(None, lambda: container.remove(force=True))
            raise
        if not pip:
            where = "no network" if kwargs["network_mode"] == "none" else f"network {kwargs['network_mode']}"
            self._note(
                job_id,
                f"{_stamp()}: running in container {container.name} of {self.image}, as "
                f"{account.name} (uid {account.uid}), {where}.",
            )
        job.follow()
        return job

    def _note(self, job_id: int, text: str) -> None:
        from .runner import JobLog

        JobLog.append(self.s.logs / f"{job_id}.log", text)

    # --- outputs into the user's home volume ---------------------------------------------------------------------
    def copy_home(self, out: Path, job_id: int, user: str, jlog: JobLog) -> bool:
        """Copy the service's copy of a job's outputs (`out`) into ~/jobs/<id>/ of the user's home volume. False:
        homes are no volumes here (the caller copies into the host folder). A user who has never started a server
        has no home yet: nothing is copied, as for local homes."""
        import docker

        if self.home_volume is None:
            return False
        volume = self.home_volume(user)
        try:
            self.client.volumes.get(volume)
        except docker.errors.NotFound:
            return True
        try:  # as the user's server: their account (never root, never 1000), the volume theirs first
            account = container_account(self.prefix, self.homes_dir, user, self.uid_range, what="jobs", log=log)
            was = hand_over_home(self.client.api, self.home_image, volume, account.uid, account.gid, self.labels)
            if was:  # once, as the spawner says it
                log.info(
                    "Home volume %s of %s handed over to %s (uid %d); it was %s",
                    volume,
                    user,
                    account.name,
                    account.uid,
                    was,
                )
        except (ContainerAccountError, RuntimeError, docker.errors.DockerException) as e:
            jlog.note(f"Output files not copied to ~/jobs/{job_id}/ ({e}); download them instead.")
            return True
        for dirpath, _dirs, files in os.walk(out):  # readable by the helper's user; `out`'s parent stays 0700
            os.chmod(dirpath, 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
        container = self.client.containers.create(
            self.home_image,
            ["sh", "-c", COPY_HOME, "sh", str(job_id)],
            user=f"{account.uid}:{account.gid}",
            mounts=[
                docker.types.Mount(IMAGE_HOME, volume, type="volume"),
                docker.types.Mount("/job-outputs", str(out), type="bind", read_only=True),
            ],
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=True,
            tmpfs={"/tmp": "size=16m"},
            pids_limit=64,
            mem_limit=256 * 2**20,
            labels={**self.labels, JOB_LABEL: str(job_id)},
            name=f"spinnaker-jupyter-job-{job_id}-home-{secrets.token_hex(3)}",
        )
        try:
            container.start()
            code = int(container.wait(timeout=300).get("StatusCode", -1))
            said = container.logs(stdout=False, stderr=True).decode(errors="replace").strip()
        except Exception as e:  # noqa: BLE001 - the engine away or too slow: the outputs are still downloadable
            code, said = -1, str(e)
        finally:
            ContainerJob._quietly(lambda: container.remove(force=True))
        if code == 0:
            jlog.note(f"Output files copied to ~/jobs/{job_id}/ (in your home volume {volume}).")
        else:
            why = said.splitlines()[-1] if said else f"exit code {code}"
            jlog.note(f"Output files could not be copied to ~/jobs/{job_id}/ ({why}); download them instead.")
        return True

    def kill(self, pgid: int, uid: int | None) -> None:
        job = self.jobs.get(pgid)
        if job is not None:
            job.stop()
        elif self.sessions_dir and pgid in sessions.recorded(self.sessions_dir):
            super().kill(pgid, uid)
        # else: a container of a previous run of the service, removed at start-up (_sweep)

    def ended(self, pid: int) -> None:
        job = self.jobs.pop(pid, None)
        if job is not None:
            job.remove()
        elif self.sessions_dir and pid in sessions.recorded(self.sessions_dir):
            super().ended(pid)


class ContainerJob:
    """What the runner needs of a started command (pid, stdout.read, wait, returncode), for a container: `pid` is
    this service's number for it; stdout is the container's output as it comes; the exit code from the engine."""

    def __init__(self, executor: DockerExecutor, pid: int, job_id: int, container, loop):
        self.x, self.pid, self.job_id, self.container, self.loop = executor, pid, job_id, container, loop
        self.returncode: int | None = None
        self.stdout = self
        self.stopped = False  # by this service (the runner says why)
        self._chunks: asyncio.Queue = asyncio.Queue()
        self._over = asyncio.Event()
        self._lock = threading.Lock()
        self._removed = False

    def follow(self) -> None:
        threading.Thread(target=self._follow, daemon=True, name=f"job-{self.job_id}-log").start()

    def _follow(self) -> None:  # (a thread: docker-py streams block)
        put = self.loop.call_soon_threadsafe
        try:
            for chunk in self.container.logs(stream=True, follow=True, stdout=True, stderr=True):
                put(self._chunks.put_nowait, chunk)
            code = int(self.container.wait().get("StatusCode", -1))
            self.container.reload()
            state = self.container.attrs.get("State", {})
        except Exception as e:  # noqa: BLE001 - the engine went away, or a cancel removed the container
            put(self._chunks.put_nowait, f"[spinnaker-jupyter] The container engine lost the job ({e}).\n".encode())
            code, state = -signal.SIGKILL, {}
        # The engine's OOMKilled covers the container's first process only (tini here), and podman on cgroup v1
        # never sets it: a SIGKILL nobody here sent is, in a job container, the kernel's out-of-memory killer.
        if state.get("OOMKilled") or (code == 128 + signal.SIGKILL and not self.stopped):
            put(
                self._chunks.put_nowait,
                f"[spinnaker-jupyter] {_stamp()}: the job was killed by the kernel: it "
                f"ran out of memory (it may use at most {self.x.s.run_limits.memory_bytes // 2**20} MiB: "
                "jobs.limits.memory_mb).\n".encode(),
            )
        if code > 128 and code - 128 in set(signal.Signals):  # killed: the engine says 128 + signal
            code = -(code - 128)
        put(self._finish, code)

    def _finish(self, code: int) -> None:
        self.returncode = code
        self._chunks.put_nowait(b"")
        self._over.set()

    async def read(self, n: int = -1) -> bytes:
        return await self._chunks.get()

    async def wait(self) -> int:
        await self._over.wait()
        return self.returncode

    def stop(self) -> None:
        """Cancel, time limit, output limit, service stop: the container is stopped (SIGTERM, then SIGKILL after
        2 s) in a thread; the follower then sees it end."""
        if self.stopped or self.returncode is not None:
            return
        self.stopped = True
        threading.Thread(target=self._quietly, args=(lambda: self.container.stop(timeout=2),)).start()

    def remove(self) -> None:
        with self._lock:
            if self._removed:
                return
            self._removed = True
        # (not a daemon: at a clean stop of the service the process waits for it, so no container outlives it)
        threading.Thread(target=self._quietly, args=(lambda: self.container.remove(force=True),)).start()

    @staticmethod
    def _quietly(call) -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001 - already gone
            log.debug("container call: %s", e)


def pip_settings() -> tuple[dict, str | None]:
    """This machine's pip settings a job container can use ({PIP_*: value}, CA bundle path), read by pip itself
    (pip_config: the config files and PIP_* variables, where images/build.py also finds the bundle)."""
    return _for_containers(pip_config.listed())


def parse_pip_config(out: str) -> tuple[dict, str | None]:
    return _for_containers(pip_config.parse(out))


def _for_containers(values: dict[str, str]) -> tuple[dict, str | None]:
    env = {}
    for key in PIP_KEYS:
        words = [w for w in values.get(key, "").split() if not w.startswith("file:")]  # host paths stay here
        if words:
            env["PIP_" + key.upper().replace("-", "_")] = " ".join(words)
    ca = pip_config.cert(values)
    return env, (os.path.realpath(ca) if ca and os.path.isfile(ca) else None)  # (mounted: the file itself)
