"""A fork server ("zygote") for local user servers (`spawner.local.fork_server`): one process per hub imports the
single-user server's modules once, and each server start forks it instead of starting a new interpreter that
imports them again (about 0.9 of a ~1 CPU-second start: benchmarks/README.md).

Hub side (`ForkServer`): started as the hub starts (spawner.launch_fork_server_with_the_hub; else at the first server
start), with the interpreter the servers run and only the
environment every server shares (the spawner's `env_keep`); it ends when the hub's process does (it watches a pipe
whose other end only the hub holds) and works in the hub's folder, so `up` ends one a crashed hub left
(preflight.end_previous_hub_leftovers). It listens on a unix socket in a folder of its own account, mode 0700; the
hub believes the socket only if folder and socket are its own account's and the peer is the process it started.

A start (`Request`): what LocalProcessSpawner gives Popen (argv, env, cwd) and what the spawner's preexec does (log
file, cgroup folders or rlimits through limits.preexec, uid/gid/groups). The zygote checks the caller is its own
account, forks, and never reads a request itself (no user's token ever sits in its memory, which every later server
would inherit). The child reads it, starts a session, joins its cgroup (or takes the rlimits) as root, opens the
log, drops to the user's account as jupyterhub.spawner.set_user_setuid does and checks it cannot regain root,
makes itself dumpable again as an exec would (so /proc/PID is the user's: kill_processes_of finds it), changes to
the home, answers its pid, then closes every other fd, resets signals, replaces the environment, shows the command
line Popen would have run in `ps`, and runs jupyterhub-singleuser in-process (spinnaker_singleuser.run). The zygote
reaps its children at once, so the spawner's pid-only poll() sees an ended server as ended.

What is pre-imported (`PRELOAD`, after spinnaker_jupyter.singleuser.prepare()'s cuts) reads no per-user variable at
import: jupyterhub.singleuser (its __init__ and jupyterhub.services.auth take JUPYTERHUB_SINGLEUSER_*, the service
prefix, API URL and SSL files into class defaults) and jupyterlab.labapp (HOME) are left to each server, only their
own modules (what they import is pre-imported): ~0.01 CPU-s. Every environment read during the pre-imports is
recorded, and a start whose environment differs in one of them (or in what the interpreter read at start-up:
PYTHON*, LANG, LC_ALL, LC_CTYPE) is refused: the spawner then starts it with Popen (a locale coercion the zygote's
interpreter made is made for the server too: as_started). Imports that take per-user state at import from HOME,
USER, the uid or the cwd are listed in PER_USER_AT_IMPORT with how each child makes it its user's (reloaded,
refreshed, or unused by a server).
Checked against jupyterhub 6.1.1, jupyter_server 2.21.1, jupyterlab 4.6.6, notebook 7.6.5, IPython 9.18.1,
send2trash 2.2.0, Python 3.11.

About 600 lines: both sides of one protocol (the request, its checks, the hub's and the zygote's ends) stay together.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import dataclasses
import importlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: The module a server's command runs (hubconfig.update_local_spawner): requests for any other command are refused.
LAUNCHER = "spinnaker_jupyter.singleuser"
#: Imported once in the zygote; each reads no per-user environment at import (module docstring).
PRELOAD = (
    "jupyterhub.orm",
    "jupyterhub.utils",
    "jupyterhub.log",
    "jupyterhub.metrics",
    "jupyterhub.traitlets",
    "jupyter_server.serverapp",
    "jupyterlab_server",
    "jupyter_server_proxy",
    "jupyter_server_terminals",
    "notebook_shim",
    "spinnaker_jupyter_ext",
    # What every server imported after the fork (~0.03 CPU-s each start), all of it reading no per-user state at
    # import: IPython (notebook_shim's nbextensions_path, which inspect.getmembers evaluates at every start),
    # everything jupyterlab.labapp imports but labapp itself, notebook (classic), jupyterhub.singleuser's imports but
    # its own and jupyterhub.services.auth's, the extension's Drive module and the server-proxy entry point's.
    "IPython",
    "jupyterlab.commands",
    "jupyterlab.coreconfig",
    "jupyterlab.debuglog",
    "jupyterlab.extensions",
    "jupyterlab.handlers.announcements",
    "jupyterlab.handlers.build_handler",
    "jupyterlab.handlers.error_handler",
    "jupyterlab.handlers.extension_manager_handler",
    "jupyterlab.handlers.plugin_manager_handler",
    "notebook.app",
    "notebook_shim.nbserver",
    "jinja2.ext",
    "jupyter_core.migrate",
    "tornado.platform.asyncio",
    "unittest.mock",
    "jupyterhub.httpclient",
    "spinnaker_jupyter_ext.drive",
    "spinnaker_jupyter.jobs.lab_link",
)
#: Modules that take per-user state at import (HOME, USER, uid, cwd), and how each child makes it its user's.
PER_USER_AT_IMPORT = {
    "send2trash.plat_other": "reloaded",  # HOME, XDG_DATA_HOME, the uid: the user's trash folder
    "jupyter_client.session": "refreshed",  # USER: Session.username's default (_refresh_defaults)
    "multiprocessing.process": "refreshed",  # the cwd: ORIGINAL_DIR
    "sysconfig": "unused",  # HOME: the user base, which a venv without user site-packages never uses
    "wsgiref.handlers": "unused",  # a copy of the whole environment, for wsgiref's own servers only
}
RELOADED = tuple(m for m, how in PER_USER_AT_IMPORT.items() if how == "reloaded")
#: What the interpreter itself reads from the environment at start-up (besides PYTHON*).
STARTUP_ENV = ("LANG", "LC_ALL", "LC_CTYPE")
SOCKET_NAME = "socket"
MAX_REQUEST = 1 << 20
PR_SET_DUMPABLE = 4


class ForkServerError(Exception):
    """The fork server cannot start this server (the spawner then starts it with Popen)."""


# ---------------------------------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class Request:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log: str
    cgroup_dirs: list[str] = field(default_factory=list)
    mem: int | None = None
    cpu: float | None = None
    tasks: int | None = None
    own_account: bool = True
    uid: int | None = None  # None: stay the zygote's account (a hub without system users)
    gid: int | None = None
    groups: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        body = json.dumps(asdict(self)).encode()
        return struct.pack(">I", len(body)) + body

    @classmethod
    def decode(cls, body: bytes) -> Request:
        """The request, checked; ValueError names what is wrong."""
        try:
            d = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ValueError("the request is not JSON") from None
        if not isinstance(d, dict) or set(d) != {f for f in cls.__dataclass_fields__}:
            raise ValueError(f"the request must have exactly the keys {sorted(cls.__dataclass_fields__)}")
        argv, env = d["argv"], d["env"]
        if not _strings(argv) or argv[:3] != launcher_argv() or len(argv) < 4 or not os.path.isabs(argv[3]):
            raise ValueError(f"argv must be {launcher_argv()} + the absolute path of jupyterhub-singleuser + args")
        if not isinstance(env, dict) or not _strings(env) or not _strings(list(env.values())):
            raise ValueError("env must map strings to strings")
        if any(not k or "=" in k for k in env):
            raise ValueError("env has an empty name or a name with '='")
        for key in ("cwd", "log"):
            if not isinstance(d[key], str) or not os.path.isabs(d[key]) or "\0" in d[key]:
                raise ValueError(f"{key} must be an absolute path")
        if not _strings(d["cgroup_dirs"]) or not all(os.path.isabs(p) for p in d["cgroup_dirs"]):
            raise ValueError("cgroup_dirs must be absolute paths")
        for key in ("mem", "tasks"):
            if d[key] is not None and (type(d[key]) is not int or d[key] <= 0):
                raise ValueError(f"{key} must be a positive integer or null")
        if d["cpu"] is not None and (type(d["cpu"]) not in (int, float) or d["cpu"] <= 0):
            raise ValueError("cpu must be a positive number or null")
        if type(d["own_account"]) is not bool:
            raise ValueError("own_account must be true or false")
        ids = (d["uid"], d["gid"])
        if ids != (None, None):
            if any(type(i) is not int or i < 0 for i in ids) or d["uid"] == 0:
                raise ValueError("uid and gid must be non-negative integers, uid not 0 (null: no switch)")
        if not isinstance(d["groups"], list) or any(type(g) is not int or g < 0 for g in d["groups"]):
            raise ValueError("groups must be a list of non-negative integers")
        return cls(**d)


def _strings(items) -> bool:
    return isinstance(items, list | dict) and all(isinstance(s, str) and "\0" not in s for s in items)


def launcher_argv() -> list[str]:
    return [sys.executable, "-m", LAUNCHER]


def as_started(env: dict[str, str], started_with: dict[str, str]) -> dict[str, str]:
    """`env` as a new interpreter would hold it after its start: with the LC_CTYPE its C locale coercion (PEP 538)
    sets, when the zygote's interpreter, started with the same locale variables, set one."""
    coerced = "LC_CTYPE" in os.environ and "LC_CTYPE" not in started_with
    same_locale = all(env.get(k) == started_with.get(k) for k in STARTUP_ENV)
    return {**env, "LC_CTYPE": os.environ["LC_CTYPE"]} if coerced and same_locale else env


def started_environ() -> dict[str, str]:
    """The environment this process was started with (before the interpreter's own changes)."""
    pairs = Path("/proc/self/environ").read_bytes().split(b"\0")
    return dict(p.decode(errors="surrogateescape").split("=", 1) for p in pairs if b"=" in p)


def differences(env: dict[str, str], read_at_import: dict[str, str | None]) -> list[str]:
    """Names whose value in a server's `env` differs from what the zygote's imports (or its interpreter) read."""
    names = set(read_at_import) | {k for k in {*env, *os.environ} if k.startswith("PYTHON") or k in STARTUP_ENV}
    return sorted(k for k in names if env.get(k) != read_at_import.get(k, os.environ.get(k)))


# ---------------------------------------------------------------------------------------------------- the zygote
def _record_environment_reads(imports) -> dict[str, str | None]:
    """Run `imports()` and return {name: value} of every environment variable read meanwhile, except by the modules
    of PER_USER_AT_IMPORT; a whole-environment read by another module reads them all."""
    readers: dict[str, set[str]] = {}
    environ_cls = type(os.environ)
    getitem, iterate = environ_cls.__getitem__, environ_cls.__iter__
    skip = ("os", "posixpath", "genericpath", "collections.abc", "_collections_abc")

    def reader() -> str:
        f = sys._getframe(2)
        while f is not None and f.f_globals.get("__name__") in skip:
            f = f.f_back
        return f.f_globals.get("__name__", "?") if f is not None else "?"

    def recording_getitem(self, key):
        if self is os.environ:  # (not os.environb, the same class)
            readers.setdefault(key, set()).add(reader())
        return getitem(self, key)

    def recording_iter(self):
        if self is os.environ:
            readers.setdefault("*", set()).add(reader())
        return iterate(self)

    environ_cls.__getitem__, environ_cls.__iter__ = recording_getitem, recording_iter
    try:
        imports()
    finally:
        environ_cls.__getitem__, environ_cls.__iter__ = getitem, iterate
    import site

    handled = set(PER_USER_AT_IMPORT) - ({"sysconfig"} if site.ENABLE_USER_SITE else set())
    snapshots = readers.pop("*", set()) - handled
    names = set(os.environ) | set(readers) if snapshots else set(readers)
    return {k: os.environ.get(k) for k in names if not readers.get(k, {""}) <= handled}


def preload() -> dict[str, str | None]:
    def imports():
        from .singleuser import prepare

        prepare()
        for name in (*PRELOAD, *RELOADED, "spinnaker_singleuser", "spinnaker_jupyter.limits"):
            importlib.import_module(name)
        # jupyter_server's own handler modules, which it imports at every start (ServerApp.init_webapp)
        handlers = sys.modules["jupyter_server.serverapp"].JUPYTER_SERVICE_HANDLERS
        for name in {m for modules in handlers.values() for m in modules or ()}:
            importlib.import_module(name)

    read_at_import = _record_environment_reads(imports)
    # Machine-wide answers each server's start would otherwise find again (upstream internals: fenced there).
    from .upstream import cache_platform, snapshot_server_proxy_entry_points

    cache_platform()
    snapshot_server_proxy_entry_points()
    return read_at_import


def open_listener(folder: Path) -> socket.socket:
    """The socket in `folder` (made 0700; an existing one must be this account's, 0700)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    own_folder(folder)
    path = folder / SOCKET_NAME
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # an earlier fork server's (the folder is ours alone)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener


def own_folder(folder: Path) -> None:
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ForkServerError(f"{folder} must be a folder of uid {os.geteuid()} with mode 0700 (remove it)")


def peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


def _reap(*_) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


class _Stop(Exception):
    pass


def serve(folder: Path, parent_fd: int, read_at_import: dict, started_with: dict) -> Request | None:
    """The zygote's loop: returns in a forked child (its connection and request, privileges dropped), or None when
    the hub has gone or asked it to stop."""
    import select

    listener = open_listener(folder)
    inode = os.stat(folder / SOCKET_NAME).st_ino
    signal.signal(signal.SIGCHLD, _reap)

    def stop(*_):
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"[fork-server] ready on {folder / SOCKET_NAME}: {len(sys.modules)} modules imported", file=sys.stderr)
    try:
        while True:
            ready, _, _ = select.select([listener, parent_fd], [], [])
            if parent_fd in ready:
                return None  # the hub's end of the pipe closed: the hub has ended
            conn, _ = listener.accept()
            with conn:
                if peer(conn)[1] != os.geteuid():
                    continue  # (the folder's mode keeps others out; this is the second lock)
                threads = len(os.listdir("/proc/self/task"))
                if threads != 1:
                    conn.sendall(json.dumps({"error": f"the fork server has {threads} threads"}).encode() + b"\n")
                    continue
                sys.stderr.flush()
                if os.fork() == 0:
                    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                        signal.signal(sig, signal.SIG_DFL)
                    listener.close()
                    os.close(parent_fd)
                    return _child(conn, read_at_import, started_with)
    except _Stop:
        return None
    finally:
        if listener.fileno() != -1:  # the zygote itself, not a child
            listener.close()
            with contextlib.suppress(OSError):
                if os.stat(folder / SOCKET_NAME).st_ino == inode:  # not a successor's
                    os.unlink(folder / SOCKET_NAME)


def _child(conn: socket.socket, read_at_import: dict, started_with: dict) -> Request:
    """In the forked child: read the request, do the privileged steps, answer the pid (or why not and exit)."""
    try:
        conn.settimeout(30)
        head = _read(conn, 4)
        (size,) = struct.unpack(">I", head)
        if size > MAX_REQUEST:
            raise ValueError("the request is too large")
        req = Request.decode(_read(conn, size))
        req = dataclasses.replace(req, env=as_started(req.env, started_with))
        differ = differences(req.env, read_at_import)
        if differ:
            raise ForkServerError(f"the server's environment differs in {', '.join(differ)}, read at import")
        os.setsid()
        from .limits import Limits, preexec

        preexec([Path(p) for p in req.cgroup_dirs], Limits(req.mem, req.cpu, req.tasks), req.own_account)()
        log = os.open(req.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOCTTY, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        if req.uid is not None:
            drop_privileges(req.uid, req.gid, req.groups)
        os.chdir(req.cwd)
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        return req
    except BaseException as e:  # noqa: BLE001 (a child never returns into the zygote's loop)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"error": str(e) or type(e).__name__}).encode() + b"\n")
        os._exit(1)


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ValueError("the request ended early")
        data += chunk
    return data


def drop_privileges(uid: int, gid: int, groups: list[int]) -> None:
    """As jupyterhub.spawner.set_user_setuid's preexec (6.1.1): gid, supplementary groups, uid; then make sure no
    id is left that could take root back."""
    os.setgid(gid)
    os.setgroups(groups)
    os.setuid(uid)
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3 or set(os.getgroups()) - set(groups) - {gid}:
        raise PermissionError("the server's ids were not all switched")
    with contextlib.suppress(PermissionError):
        os.setuid(0)
        raise RuntimeError("the server could take root back")
    caps = [line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Cap")]
    if uid and any(int(c, 16) for c in caps[:3]):  # (inheritable, permitted, effective)
        raise RuntimeError("the server kept capabilities")
    # A process whose ids changed is not dumpable (its /proc/PID is root's); an exec would have reset that.
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


def become_server(req: Request, zygote_cwd: str) -> None:
    """The child's unprivileged rest, then jupyterhub-singleuser in this process (it returns when the server ends)."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    # stdout and stderr as a new interpreter opens them on a log file (their buffering was chosen for the zygote's)
    enc = sys.stderr.encoding
    sys.stdout = sys.__stdout__ = open(1, "w", encoding=enc, errors=sys.stdout.errors, closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(  # noqa: SIM115
        2, "w", buffering=1, encoding=enc, errors="backslashreplace", closefd=False
    )
    for sig in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a new interpreter starts
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.environ.clear()
    os.environ.update(req.env)
    _show_command(req.argv)
    if sys.path and sys.path[0] == zygote_cwd:  # `python -m` puts its working folder first
        sys.path[0] = req.cwd
    _refresh_per_user_state(req.cwd)
    from spinnaker_singleuser import run

    run(req.argv[3:])


def _refresh_per_user_state(cwd: str) -> None:
    """PER_USER_AT_IMPORT's modules, made this server's (after its environment and account are in place). Checked
    against send2trash 2.2.0, jupyter_client 8.10.0, traitlets 5.16.1 (a static default is also cached in the class's
    _static_immutable_initial_values), Python 3.11."""
    for name in RELOADED:
        if name in sys.modules:
            importlib.reload(sys.modules[name])
    if "multiprocessing.process" in sys.modules:
        sys.modules["multiprocessing.process"].ORIGINAL_DIR = os.path.abspath(cwd)
    session = sys.modules.get("jupyter_client.session")
    if session is not None:
        user = os.environ.get("USER", "username")  # (as jupyter_client.session reads it at import)
        session.Session.username.default_value = user
        session.Session._static_immutable_initial_values["username"] = user


def _show_command(argv: list[str]) -> None:
    """What `ps` and /proc/PID/cmdline show: the command Popen would have run (as setproctitle does: written over
    the zygote's argument and, once the environment was replaced, environment area)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        arg_start, arg_end, env_start, env_end = (int(x) for x in fields[45:49])
        room = (env_end if env_start == arg_end else arg_end) - arg_start
        text = "\0".join(argv).encode()
        if len(text) >= arg_end - arg_start:  # longer than the argument area: one line, read on into the next
            text = " ".join(argv).encode()[: room - 1]
        ctypes.memmove(arg_start, text.ljust(room, b"\0"), room)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m spinnaker_jupyter.fork_server SOCKET_FOLDER PARENT_PIPE_FD", file=sys.stderr)
        return 2
    zygote_cwd = os.getcwd()
    t0 = time.process_time()
    read_at_import = preload()
    print(f"[fork-server] imports took {time.process_time() - t0:.2f} CPU-s", file=sys.stderr)
    import gc

    gc.collect()
    gc.freeze()  # the imported modules stay shared with the servers, not copied when a collection touches them
    try:
        child = serve(Path(args[0]), int(args[1]), read_at_import, started_environ())
    except ForkServerError as e:
        print(f"[fork-server] {e}", file=sys.stderr)
        return 1
    if child is None:
        return 0
    become_server(child, zygote_cwd)
    return 0


# -------------------------------------------------------------------------------------------------- the hub's side
def popen_arguments(spawner) -> tuple[list[str], dict[str, str]]:
    """The command and environment LocalProcessSpawner.start() gives Popen, after choosing a port as it does
    (checked against jupyterhub 6.1.1; tests/unit/test_fork_server.py compares them with what start() gives a Popen
    double). A `shell_cmd` (the command as one shell string) is not forked."""
    from jupyterhub.utils import random_port

    if spawner.shell_cmd:
        raise ForkServerError("Spawner.shell_cmd is set")
    if spawner.port == 0:
        spawner.port = random_port()
    cmd = [*spawner.cmd, *spawner.get_args()]
    if cmd[:3] != launcher_argv():
        raise ForkServerError(f"the server's command is not {' '.join(launcher_argv())} ...")
    return cmd, spawner.get_env()


class ForkServer:
    """The hub's fork server for one socket folder: started with the hub; one that ended is started again at once if
    it had started servers, else at most once a minute (one that cannot start would otherwise be started at every
    server start)."""

    _by_folder: dict[str, ForkServer] = {}
    RESTART_AFTER = 60.0

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.proc: subprocess.Popen | None = None
        self._hub_end: int | None = None
        self._ends_with_the_hub = False
        self.launched_at = 0.0
        self.served = 0  # servers the running one started

    @classmethod
    def of(cls, folder: str) -> ForkServer:
        return cls._by_folder.setdefault(folder, cls(folder))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self, env: dict[str, str]) -> None:
        """Start it unless it runs (in the background: its imports take about a second). One that has ended since
        the last start raises ForkServerError, after a new one was started for later starts."""
        if self.running():
            return
        ended = self.proc.returncode if self.proc is not None else None
        self.proc = None
        if not self.launched_at or self.served or time.monotonic() - self.launched_at >= self.RESTART_AFTER:
            self._launch(env)
        if ended is not None:
            raise ForkServerError(f"the fork server had ended (exit code {ended})")

    def _launch(self, env: dict[str, str]) -> None:
        if self._hub_end is not None:
            os.close(self._hub_end)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError, ForkServerError):  # a socket its killed predecessor left: not this one's
            own_folder(self.folder)
            os.unlink(self.folder / SOCKET_NAME)
        theirs, self._hub_end = os.pipe()  # (both ends close-on-exec: no other child of the hub holds one)
        self.launched_at, self.served = time.monotonic(), 0
        if not self._ends_with_the_hub:
            # The pipe ends it when the hub's process is gone, a moment later; a hub that exits normally ends it
            # first, so nothing the hub started outlives it.
            atexit.register(self.end)
            self._ends_with_the_hub = True
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(self.folder), str(theirs)],
                pass_fds=[theirs],
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C to the hub is not for it: it ends with the hub
            )
        finally:
            os.close(theirs)

    def end(self, grace: float = 5.0) -> None:
        """Stop it (SIGTERM: it stops listening and exits; the servers it started live on as the hub's config says)."""
        if not self.running():
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    async def start(self, req: Request, timeout: float) -> int:
        """The new server's pid; ForkServerError says why not."""
        if self.proc is None:
            raise ForkServerError("the fork server is not running (one ended less than a minute ago)")
        deadline = time.monotonic() + timeout
        path = self.folder / SOCKET_NAME
        while not path.exists():
            if self.proc.poll() is not None:
                raise ForkServerError(f"the fork server has ended (exit code {self.proc.returncode})")
            if time.monotonic() > deadline:
                raise ForkServerError(f"the fork server was not ready within {timeout:.0f} s")
            await asyncio.sleep(0.05)
        own_folder(self.folder)
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise ForkServerError(f"{path} is not a socket of uid {os.geteuid()}")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise ForkServerError(f"the fork server did not answer ({e or 'timeout'})") from None
        try:
            pid, uid = peer(writer.get_extra_info("socket"))
            if (pid, uid) != (self.proc.pid, os.geteuid()):
                raise ForkServerError(f"{path} is held by pid {pid} (uid {uid}), not the fork server")
            writer.write(req.encode())
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), max(1.0, deadline - time.monotonic()))
        except (OSError, asyncio.TimeoutError) as e:
            raise ForkServerError(f"the fork server did not answer ({e or 'timeout'})") from None
        finally:
            writer.close()
        try:
            reply = json.loads(line)
        except ValueError:
            raise ForkServerError("the fork server's child ended before it answered") from None
        if "pid" not in reply:
            raise ForkServerError(reply.get("error", "no pid in the answer"))
        self.served += 1
        return int(reply["pid"])


if __name__ == "__main__":
    sys.exit(main())
