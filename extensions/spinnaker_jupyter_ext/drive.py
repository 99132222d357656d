"""The user's EBRAINS Drive at ~/drive, mounted by the user's own server, as the user's own account. (Over ~400
lines: one keeper's state machine, mount, health check and remount, kept together; the container helper reuses it.)

How it works (``SPINNAKER_DRIVE``, JSON from the hub's ``drive:`` section, turns it on):

1. The user's EBRAINS access token comes from the hub's access-token-service (``JUPYTERHUB_SERVICE_HOST/PORT`` +
   this server's ``JUPYTERHUB_API_TOKEN``), the same contract sPyNNaker and ebrains-drive use.
2. It is exchanged at ``{drive.url}/api2/account/token/`` (EBRAINS' Seahub) for a Drive (Seafile) token.
3. ``rclone mount`` serves the EBRAINS layout (``My Libraries/My Library/``, ``Shared with groups/<library>/``)
   from nested ``combine`` remotes over one ``seafile`` remote. The Drive token reaches rclone only through its
   environment (``RCLONE_CONFIG_<NAME>_AUTH_TOKEN``; /proc/<pid>/environ is readable by this account alone): never
   in argv, a URL, a file, or rclone's remote control (not started). The VFS cache lives in the private home;
   no ``allow_other``, so the kernel refuses every other account (root included) at the mount.
4. A health check asks ``api2/auth/ping/`` every ``check_interval`` seconds: 401 -> exchange a fresh token and
   remount; Drive down (5xx, no answer) -> back off (doubling up to ``max_backoff``) and say so; a dead rclone or a
   lost mount -> mount again.

What the user sees while the Drive is not mounted: a placeholder file in ~/drive naming the reason (also in the
JupyterLab file browser), the same line in ``spinnaker-status`` (read from ``~/.cache/spinnaker-drive/state.json``)
and in the server log. Everything recovers by itself when Drive answers again.

Libraries are mounted by name (rclone's Seafile backend looks them up by name): of two same-named libraries only
one is reachable; a group library named like one of the user's own is listed under its own name only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from spinnaker_server_contract import ServerContract

log = logging.getLogger("spinnaker_jupyter_ext.drive")

ENV = ServerContract.variable("drive")
PLACEHOLDER = "EBRAINS-DRIVE-NOT-AVAILABLE.txt"
SERVICE_PATH = "/services/access-token-service/access-token"
MY_LIBRARIES = "My Libraries"
SHARED_WITH_GROUPS = "Shared with groups"


def state_dir(home: Path) -> Path:
    return home / ".cache" / "spinnaker-drive"


def read_state(home: Path | None = None) -> dict | None:
    """The mount's last state (for spinnaker-status), or None when the Drive is not configured here."""
    try:
        return json.loads((state_dir(home or Path.home()) / "state.json").read_text())
    except (OSError, ValueError):
        return None


class DriveUnavailable(Exception):
    """Drive (or the token service) cannot be used now; ``reason`` is said to the user."""

    def __init__(self, reason: str, *, refused: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.refused = refused  # the token was refused (401), as opposed to Drive being down


def _http(url: str, headers: dict, timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)  # mountinfo escapes spaces as \040


def mounted_at(path: Path) -> str | None:
    """The file system type of the topmost mount at ``path``, or None. (os.path.ismount misses a bind mount from the
    same file system: in the container helper ~/drive is one, before and after rclone mounts over it.)"""
    target, top = os.path.realpath(path), None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if "-" in fields and _unescape(fields[4]) == target:
                    top = fields[fields.index("-") + 1]
    except OSError:
        return "unknown" if os.path.ismount(path) else None
    return top


def fuse_mounted(path: Path) -> bool:
    return (mounted_at(path) or "").startswith("fuse")


def _set_pdeathsig() -> None:
    """rclone ends (and unmounts) when the server that started it dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _quote(upstream: str) -> str:
    return '"' + upstream + '"'


def _usable_name(name: str) -> bool:
    return bool(name) and '"' not in name and "/" not in name and not name.startswith(".")


def rclone_environment(url: str, drive_token: str, libraries: list[dict], private: Path) -> dict[str, str]:
    """rclone's whole configuration, as environment variables (the token among them, nowhere else)."""
    mine = [lib["name"] for lib in libraries if lib.get("type") == "repo" and _usable_name(lib.get("name", ""))]
    groups = [lib["name"] for lib in libraries if lib.get("type") == "grepo" and _usable_name(lib.get("name", ""))]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(Path.home()),
        "RCLONE_CONFIG": str(private / "rclone.conf"),  # empty: everything is below
        "RCLONE_CONFIG_EBRAINSDRIVE_TYPE": "seafile",
        "RCLONE_CONFIG_EBRAINSDRIVE_URL": url,
        "RCLONE_CONFIG_EBRAINSDRIVE_AUTH_TOKEN": drive_token,
        "RCLONE_CONFIG_EMPTY_TYPE": "memory",
        "RCLONE_CONFIG_DRIVEROOT_TYPE": "combine",
        "RCLONE_CONFIG_DRIVEROOT_UPSTREAMS": " ".join(
            [_quote(f"{MY_LIBRARIES}=mylibraries:"), _quote(f"{SHARED_WITH_GROUPS}=sharedgroups:")]
        ),
    }
    for remote, names in (("MYLIBRARIES", mine), ("SHAREDGROUPS", groups)):
        unique = list(dict.fromkeys(names))
        env[f"RCLONE_CONFIG_{remote}_TYPE"] = "combine"
        env[f"RCLONE_CONFIG_{remote}_UPSTREAMS"] = " ".join(_quote(f"{n}=ebrainsdrive:{n}") for n in unique) or _quote(
            "=empty:"
        )
        if not unique:  # a combine remote needs an upstream: an empty, read-only one
            env[f"RCLONE_CONFIG_{remote}_TYPE"] = "alias"
            env[f"RCLONE_CONFIG_{remote}_REMOTE"] = "empty:"
            del env[f"RCLONE_CONFIG_{remote}_UPSTREAMS"]
    return env


class DriveMount:
    """Keeps ~/drive mounted; one per user server."""

    def __init__(self, settings: dict, env=os.environ, home: Path | None = None):
        self.url = settings["url"].rstrip("/")
        self.home = home or Path.home()
        self.mount_point = self.home / settings.get("mount_point", "drive")
        self.check_interval = float(settings.get("check_interval", 60))
        self.max_backoff = float(settings.get("max_backoff", 300))
        self.timeout = float(settings.get("timeout", 10))
        self.mount_timeout = float(settings.get("mount_timeout", 30))
        self.rclone = settings.get("rclone") or shutil.which("rclone") or "rclone"
        self.cache_max_size = settings.get("cache_max_size", "1G")
        self.dir_cache_time = str(settings.get("dir_cache_time", 10))
        self.flush_timeout = float(settings.get("flush_timeout", 8))  # within the spawner's stop grace time
        self.env = env
        self.private = state_dir(self.home)
        self.proc: subprocess.Popen | None = None
        self.token: str | None = None
        self.state: dict = {}
        self.remounts = 0
        self._task: asyncio.Task | None = None
        self._lock_fd: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.log = log

    # -- what the user sees ----------------------------------------------------------------------------------------
    def _set_state(self, state: str, reason: str = "") -> None:
        new = {
            "state": state,
            "reason": reason,
            "mount_point": str(self.mount_point),
            "url": self.url,
            "remounts": self.remounts,
        }
        if {k: v for k, v in new.items()} == {k: self.state.get(k) for k in new}:
            return
        new["since"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.state = new
        (self.log.info if state == "mounted" else self.log.warning)(
            "EBRAINS Drive: %s%s", state, f": {reason}" if reason else ""
        )
        tmp = self.private / "state.json.tmp"
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(new))
            tmp.replace(self.private / "state.json")
        if state != "mounted":
            self._placeholder(reason)

    def _placeholder(self, reason: str) -> None:
        if fuse_mounted(self.mount_point):
            return
        with contextlib.suppress(OSError):
            self.mount_point.mkdir(mode=0o700, exist_ok=True)
            (self.mount_point / PLACEHOLDER).write_text(
                "Your EBRAINS Drive is not available here right now.\n\n"
                f"Reason: {reason}\n\n"
                "This server retries by itself and mounts the Drive here as soon as it can; nothing to do.\n"
                "`spinnaker-status` in a terminal shows the current state.\n"
            )

    # -- tokens -----------------------------------------------------------------------------------------------------
    def access_token(self) -> str:
        host, port, api = (
            self.env.get("JUPYTERHUB_SERVICE_HOST"),
            self.env.get("JUPYTERHUB_SERVICE_PORT"),
            self.env.get("JUPYTERHUB_API_TOKEN"),
        )
        if not (host and port and api):
            raise DriveUnavailable("this server cannot ask the hub for your EBRAINS token (no access-token-service)")
        try:
            status, body = _http(f"http://{host}:{port}{SERVICE_PATH}", {"Authorization": f"Token {api}"}, self.timeout)
        except OSError as e:
            raise DriveUnavailable(f"the hub's access-token-service did not answer ({e})") from None
        if status != 200:
            try:
                message = json.loads(body).get("message") or body.decode(errors="replace")[:200]
            except ValueError:
                message = body.decode(errors="replace")[:200]
            raise DriveUnavailable(f"no EBRAINS token from the hub: {message}")
        return json.loads(body)["access_token"]

    def exchange(self) -> str:
        """A fresh Drive token for the user's current EBRAINS access token."""
        oidc = self.access_token()
        try:
            status, body = _http(f"{self.url}/api2/account/token/", {"Authorization": f"Bearer {oidc}"}, self.timeout)
        except OSError as e:
            raise DriveUnavailable(f"EBRAINS Drive ({self.url}) is not answering ({getattr(e, 'reason', e)})") from None
        if status == 401:
            raise DriveUnavailable("EBRAINS Drive refused your login (HTTP 401)", refused=True)
        if status != 200:
            raise DriveUnavailable(f"EBRAINS Drive ({self.url}) answered HTTP {status}")
        token = body.decode().strip().strip('"')
        if not token:
            raise DriveUnavailable("EBRAINS Drive gave an empty token")
        return token

    def ping(self) -> int:
        """HTTP status of ``api2/auth/ping/`` with the Drive token (0: no answer)."""
        try:
            status, _ = _http(f"{self.url}/api2/auth/ping/", {"Authorization": f"Token {self.token}"}, self.timeout)
            return status
        except OSError:
            return 0

    def libraries(self) -> list[dict]:
        try:
            status, body = _http(f"{self.url}/api2/repos/", {"Authorization": f"Token {self.token}"}, self.timeout)
        except OSError as e:
            raise DriveUnavailable(f"EBRAINS Drive ({self.url}) is not answering ({getattr(e, 'reason', e)})") from None
        if status != 200:
            raise DriveUnavailable(
                f"EBRAINS Drive ({self.url}) answered HTTP {status} to the library list", refused=status == 401
            )
        return json.loads(body)

    # -- the mount ----------------------------------------------------------------------------------------------------
    def _prepare_dirs(self) -> None:
        self.private.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.private, 0o700)
        (self.private / "rclone.conf").touch(mode=0o600)

    def keeper(self) -> bool:
        """Whether this server keeps the mount: one keeper per home (a user's named servers share ~/drive).
        The lock goes with the process, so another server of the user takes over when the keeper dies."""
        if self._lock_fd is None:
            fd = os.open(self.private / "keeper.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._lock_fd = fd
        return True

    def unmount(self) -> None:
        if self._lock_fd is None:
            return  # another server of this user keeps the mount
        if self.proc is not None and self.proc.poll() is None:
            self._flush()
            self.proc.terminate()  # rclone unmounts on SIGTERM (dropping uploads not yet started: see _flush)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if fuse_mounted(self.mount_point) or self._stale():
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount_point)], capture_output=True, timeout=30)

    def pending_uploads(self) -> int:
        """Files closed but not yet uploaded: rclone's cache metadata is empty or ``"Dirty": true`` until then."""
        pending = 0
        for meta in (self.private / "vfs" / "vfsMeta").rglob("*"):
            with contextlib.suppress(OSError):
                if meta.is_file():
                    text = meta.read_text(errors="replace")
                    pending += not text.strip() or '"Dirty": true' in text
        return pending

    def _flush(self) -> None:
        """Give rclone up to ``flush_timeout`` s to upload what was written (it does not on SIGTERM). Whatever is
        still pending stays in the private cache and is uploaded at the next mount."""
        deadline = time.monotonic() + self.flush_timeout
        while self.pending_uploads() and time.monotonic() < deadline and self.proc and self.proc.poll() is None:
            time.sleep(0.2)

    def _stale(self) -> bool:
        try:
            os.stat(self.mount_point)
            return False
        except OSError as e:
            return e.errno == 107  # ENOTCONN: a FUSE mount whose process died

    def mount(self) -> None:
        """Exchange, list the libraries, and mount; raises DriveUnavailable with the reason."""
        self.unmount()
        self.token = self.exchange()
        env = rclone_environment(self.url, self.token, self.libraries(), self.private)
        self.mount_point.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (self.mount_point / PLACEHOLDER).unlink()
        leftovers = [p.name for p in self.mount_point.iterdir()]
        if leftovers:
            raise DriveUnavailable(
                f"{self.mount_point} is not empty ({', '.join(leftovers[:3])}): move those files "
                f"elsewhere and the Drive is mounted there"
            )
        argv = [
            self.rclone,
            "mount",
            "driveroot:",
            str(self.mount_point),
            "--cache-dir",
            str(self.private / "vfs"),
            "--vfs-cache-mode",
            "writes",
            "--vfs-cache-max-size",
            str(self.cache_max_size),
            "--vfs-write-back",
            "2s",
            "--dir-cache-time",
            f"{self.dir_cache_time}s",
            "--attr-timeout",
            "1s",
            "--umask",
            "077",
            "--retries",
            "3",
            "--low-level-retries",
            "3",
            "--log-level",
            "NOTICE",
        ]
        if mounted_at(self.mount_point):  # the container helper's bind mount, checked empty above
            argv.append("--allow-non-empty")
        if self.loop is not None:
            # Started from the server's main thread: PR_SET_PDEATHSIG fires when the *thread* that forked ends,
            # and the worker thread ends before the atexit flush at shutdown.
            future = asyncio.run_coroutine_threadsafe(self._spawn(argv, env), self.loop)
            self.proc = future.result(self.timeout)
        else:
            self.proc = self._popen(argv, env)
        deadline = time.monotonic() + self.mount_timeout
        while not fuse_mounted(self.mount_point):
            if self.proc.poll() is not None:
                raise DriveUnavailable(f"the mount failed: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.unmount()
                raise DriveUnavailable(f"the mount did not come up within {self.mount_timeout:.0f} s")
            time.sleep(0.1)

    async def _spawn(self, argv: list[str], env: dict) -> subprocess.Popen:
        return self._popen(argv, env)

    def _popen(self, argv: list[str], env: dict) -> subprocess.Popen:
        with open(self.private / "rclone.log", "ab") as logf:
            try:
                return subprocess.Popen(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    preexec_fn=_set_pdeathsig,
                    start_new_session=True,
                )
            except OSError as e:
                raise DriveUnavailable(
                    f"rclone could not be started ({e}); ask the operator to install rclone and fuse3"
                ) from None

    def _log_tail(self) -> str:
        try:
            lines = (self.private / "rclone.log").read_text(errors="replace").strip().splitlines()
            return lines[-1][-300:] if lines else "no message"
        except OSError:
            return "no message"

    # -- the loop -----------------------------------------------------------------------------------------------------
    def step(self) -> float:
        """One health check (and the repair it calls for); returns seconds until the next one."""
        if not self.keeper():
            return self.check_interval
        mounted = self.proc is not None and self.proc.poll() is None and fuse_mounted(self.mount_point)
        try:
            if not mounted:
                if self.state.get("state") == "mounted":
                    self.remounts += 1
                self.mount()
                self._set_state("mounted")
                return self.check_interval
            status = self.ping()
            if status == 200:
                self._set_state("mounted")
                return self.check_interval
            if status in (401, 403):
                self.log.warning(
                    "EBRAINS Drive: the Drive token was refused (HTTP %s): exchanging and remounting", status
                )
                self.remounts += 1
                self.mount()
                self._set_state("mounted")
                return self.check_interval
            raise DriveUnavailable(
                f"EBRAINS Drive ({self.url}) is not answering"
                f"{f' (HTTP {status})' if status else ''}; files under ~/drive give I/O errors "
                f"until it is back"
            )
        except DriveUnavailable as e:
            self._set_state("refused" if e.refused else "unavailable", e.reason)
            return -1.0

    async def run(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        # One thread of its own for the blocking work: rclone's PR_SET_PDEATHSIG follows the thread that started it.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drive")
        self._prepare_dirs()
        backoff = self.check_interval
        while True:
            try:
                wait = await loop.run_in_executor(executor, self.step)
            except Exception as e:  # noqa: BLE001 - never let the loop die: say why and retry
                self.log.exception("EBRAINS Drive: check failed")
                self._set_state("unavailable", f"internal error: {e}")
                wait = -1.0
            if wait < 0:
                wait, backoff = backoff, min(backoff * 2, self.max_backoff)
            else:
                backoff = self.check_interval
            await asyncio.sleep(wait)

    def start(self, io_loop) -> None:
        def begin() -> None:
            self._task = asyncio.ensure_future(self.run())

        io_loop.add_callback(begin)  # on the server's loop, once it runs

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.unmount()


def start_drive(server_app) -> DriveMount | None:
    """Start the mount keeper when the hub configured the Drive for this server."""
    settings = ServerContract.from_env().drive
    if settings is None:  # not configured here (or unreadable: the extension's loader logs why)
        return None
    from .notice import answer_news_question  # so that JupyterLab shows the Drive notice (notice.py)

    answer_news_question(Path.home())
    if settings.get("keeper") == "helper":  # a container: the user's Drive helper container keeps the mount
        if settings.get("helper_error"):  # the hub could not give it one: say why, as the keeper would
            said = DriveMount(settings)
            said.log = server_app.log
            with contextlib.suppress(OSError):
                said._prepare_dirs()
            said._set_state("unavailable", settings["helper_error"])
        else:
            server_app.log.info(
                "EBRAINS Drive: kept mounted at ~/%s by this server's Drive helper container",
                settings.get("mount_point", "drive"),
            )
        return None
    mount = DriveMount(settings)
    mount.log = server_app.log  # in the server's log, beside everything else
    mount.start(server_app.io_loop)
    import atexit

    atexit.register(mount.unmount)
    server_app.log.info("EBRAINS Drive: keeping %s mounted from %s", mount.mount_point, mount.url)
    return mount


def main() -> None:
    """The Drive helper of a container deployment (``python -m spinnaker_jupyter_ext.drive``, docs/DRIVE.md): the
    same keeper as a local server's, as the only work of its container, until SIGTERM (then pending uploads are
    flushed and the Drive unmounted)."""
    logging.basicConfig(level=logging.INFO, format="[drive %(asctime)s %(levelname)s] %(message)s")
    try:
        settings = json.loads(os.environ[ENV])
    except (KeyError, ValueError):
        raise SystemExit(f"{ENV}: JSON settings of the Drive mount are needed (the hub passes them)") from None
    mount = DriveMount(settings)

    async def keep() -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        task = asyncio.ensure_future(mount.run())
        await stopping.wait()
        task.cancel()
        await loop.run_in_executor(None, mount.unmount)

    asyncio.run(keep())


if __name__ == "__main__":
    main()
