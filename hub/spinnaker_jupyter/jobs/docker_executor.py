"""`jobs.executor: docker`: each job's command runs in a container of the single-user image the user's servers run
(spawner.docker.image, or jobs.docker.image): the same sPyNNaker and Python as their notebooks.

* What the container gets: the job's scratch folder (code, inputs, .job/, outputs; bound read-write at its own
  path) and the folder of the job's sPyNNaker cfg (XDG_CONFIG_DIRS, read-only), nothing else. Not the user's home
  volume: a job runs code from anywhere (a git URL, an archive), and the home holds the user's notebooks and their
  job token (~/.config/spinnaker-jupyter/job.json); everything a job needs is in its folder, and its outputs reach
  the user through the service.
* As whom: the user's own job account (jupyter-<name>, the local executor's: the one that fetched the code and
  owns the folder), never root, never uid 1000. The user's server containers run as the image's uid 1000, shared by
  every user's container and, on the host, the first login account (here `cloudsdk`): the job folder is on the
  host, so running jobs as that uid would hand one user's job folder to every other user's job and to that host
  account. No capabilities, no-new-privileges, a read-only image with a private /tmp.
* Network: none where the job has no board to reach (spinnaker.mode virtual or per-run): `network_mode: none`.
  With boards (session, machine) it needs spalloc and the boards: jobs.docker.network, else the servers'
  network (spawner.docker.network), which the operator limits to those (docs/JOBS.md). pip installs
  (hardware_config.extra_pip_installs) run in their own container of the same image on that network.
* Limits: memory (jobs.limits.memory_mb, for the whole container, no swap), processes (jobs.limits.processes, the
  pids limit), cores (jobs.docker.cpus), CPU time and file size (rlimits: jobs.limits.cpu_time, output_mb), and
  the job's time limit twice: the runner stops the container at it, and `timeout` inside kills the command
  shortly after if the service is gone.
* The log is the container's output, streamed as it comes; the exit code and an out-of-memory kill come from the
  engine. Cancel and kill = stop, then remove. Every container is labelled with this deployment's job folder; at
  start-up the service removes those a previous run left (their jobs go back in the queue, as on the local
  executor).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import signal
import threading
from pathlib import Path

from ..docker import IMAGE_ENV_ROOT, engine
from . import sessions
from .executor import LocalExecutor
from .runner import _stamp

log = logging.getLogger("spinnaker_jupyter.jobs")
LABEL = "spinnaker-jupyter.jobs"  # value: this deployment's data_dir/jobs (two deployments may share an engine)
JOB_LABEL = "spinnaker-jupyter.job"
IMAGE_PYTHON = f"{IMAGE_ENV_ROOT}/spynnaker/bin/python"
BACKSTOP = 30  # seconds past the time limit after which `timeout` in the container kills a job nobody stopped


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
    ):
        super().__init__(homes_dir, system_users, prefix, log=log, sessions_dir=sessions_dir)
        self.store, self.s, self.docker = store, settings, docker
        self.image, self.network, self.pip_network, self.cpus = image, network, pip_network, cpus
        self.labels = {**labels, LABEL: str(settings.data)}
        self.jobs: dict[int, ContainerJob] = {}  # our pid -> its container, this run of the service
        self._ids = itertools.count(1)
        self.client = self._check()
        self._sweep()

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
        )

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

        here = str(self.s.spynnaker_env / "bin")
        env = {**env, "PATH": env.get("PATH", "").replace(here, f"{IMAGE_ENV_ROOT}/spynnaker/bin")}
        mounts = [docker.types.Mount(str(cwd), str(cwd), type="bind")]
        for folder in filter(None, env.get("XDG_CONFIG_DIRS", "").split(":")):  # the job's cfg, read-only
            mounts.append(docker.types.Mount(folder, folder, type="bind", read_only=True))
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
