"""The git-master kernel "sPyNNakerGit": first-login creation of ``~/sPyNNakerGit``.

``~/sPyNNakerGit`` is a virtual environment holding clones of the SpiNNakerManchester
repositories (by default at ``master``), the Python ones installed in editable mode, and
registered as the Jupyter kernel "sPyNNakerGit". It stays at the commits of its creation
until the user runs ``support/gitupdate.sh`` and ``support/automatic_make.sh``.

Runs inside the user's server, as the user. :func:`ensure_git_kernel` is idempotent and
resumable:

* every clone is made into ``.partial-<name>`` and renamed into place only when complete,
  so an interrupted clone (network cut, server stopped) is redone at the next start;
* a clone already in place is never written to (no fetch, reset or checkout): the user's
  changes there are theirs;
* an exclusive lock (``.setup.lock``) keeps two starts from racing;
* progress goes to the ``progress`` callback, ``setup.log`` and ``setup-status.json``.

Shared caches: the venv is created from the pinned sPyNNaker kernel environment
(``base_python``) and sees its site-packages through a ``.pth`` file, so the third-party
dependencies (numpy, scipy, PyNN, neo, ipykernel, ...) are not installed again per user;
each clone is installed with ``pip install --no-deps -e``. Whatever a clone needs that the
pinned environment lacks is installed into the user's venv from the wheelhouse / pip cache
given by the deployment config.

Command line (for running in the background at server start)::

    python -m spinnaker_jupyter_ext.gitkernel --config-json '{...git_kernel section...}'
    python -m spinnaker_jupyter_ext.gitkernel --status

Only the standard library is used here (PyYAML optionally, for ``--config`` YAML files).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

__all__ = [
    "DEFAULT_BASE_URL", "DEFAULT_BRANCH", "DEFAULT_REPOS", "DEFAULT_MAKE_ORDER",
    "DIRNAME", "KERNEL_NAME", "DISPLAY_NAME",
    "RepoSpec", "MakeStep", "GitKernelConfig", "SetupError", "SetupBusy", "SetupResult",
    "ensure_git_kernel", "needs_setup", "read_status", "start_background", "main",
]

DEFAULT_BASE_URL = "https://github.com/SpiNNakerManchester"
DEFAULT_BRANCH = "master"
DIRNAME = "sPyNNakerGit"
KERNEL_NAME = "spynnakergit"
DISPLAY_NAME = "sPyNNakerGit"

#: In dependency order. C repositories are cloned only (``python: false``).
DEFAULT_REPOS: tuple[dict[str, Any], ...] = (
    {"name": "spinnaker_tools", "python": False},
    {"name": "spinn_common", "python": False},
    {"name": "SpiNNUtils"},
    {"name": "SpiNNMachine"},
    {"name": "SpiNNMan"},
    {"name": "PACMAN"},
    {"name": "spalloc"},
    {"name": "SpiNNFrontEndCommon"},
    {"name": "sPyNNaker"},
)

#: The C build order of support/automatic_make.sh: (directory, run "make install").
DEFAULT_MAKE_ORDER: tuple[tuple[str, bool], ...] = (
    ("spinnaker_tools", True),
    ("spinn_common", True),
    ("SpiNNFrontEndCommon/c_common/front_end_common_lib", True),
    ("SpiNNFrontEndCommon/c_common", True),
    ("sPyNNaker/neural_modelling", True),
)

STATUS_FILE = "setup-status.json"
STATE_FILE = ".setup-state.json"
LOG_FILE = "setup.log"
LOCK_FILE = ".setup.lock"
PARTIAL_PREFIX = ".partial-"
LAYER_PTH = "zz_spynnaker_base_env.pth"
SUPPORT_SCRIPTS = ("gitupdate.sh", "automatic_make.sh")
#: the git_kernel section as JSON, in the user's server environment (set by the spawner)
CONFIG_ENV = "SPINNAKER_GIT_KERNEL_CONFIG"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3

# names a clone may not take: they are the venv's own directories
_RESERVED = {"bin", "lib", "lib64", "include", "share", "support", "etc", "man", "Scripts"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

ProgressFn = Callable[[str], Any]


class SetupError(RuntimeError):
    """The set-up could not be completed; the message says why and where."""


class SetupBusy(SetupError):
    """Another process holds the set-up lock."""


# --------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class RepoSpec:
    """One repository: ``name`` is the directory under ~/sPyNNakerGit and, unless
    ``url`` is given, the last part of its URL (``<base_url>/<name>``)."""

    name: str
    python: bool = True
    url: str | None = None
    branch: str | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name) or self.name in _RESERVED or ".." in self.name:
            raise ValueError(f"git_kernel: invalid repository name {self.name!r}")

    def clone_url(self, base_url: str) -> str:
        return self.url or f"{base_url.rstrip('/')}/{self.name}"

    @classmethod
    def coerce(cls, item: "RepoSpec | str | Mapping[str, Any]") -> "RepoSpec":
        if isinstance(item, RepoSpec):
            return item
        if isinstance(item, str):
            # "Name" or "Name:c" (a C repository, cloned only)
            name, _, kind = item.partition(":")
            if kind not in ("", "c", "python"):
                raise ValueError(f"git_kernel: repository {item!r}: kind must be 'c' or 'python'")
            return cls(name=name, python=kind != "c")
        if isinstance(item, Mapping):
            unknown = set(item) - {"name", "python", "url", "branch"}
            if unknown or "name" not in item:
                raise ValueError(f"git_kernel: repository entry {dict(item)!r}: needs 'name'; "
                                 f"allowed keys name, python, url, branch")
            return cls(name=str(item["name"]), python=bool(item.get("python", True)),
                       url=item.get("url"), branch=item.get("branch"))
        raise TypeError(f"git_kernel: cannot read a repository from {item!r}")


@dataclasses.dataclass(frozen=True)
class MakeStep:
    directory: str
    install: bool = False

    @classmethod
    def coerce(cls, item: "MakeStep | str | Sequence[Any] | Mapping[str, Any]") -> "MakeStep":
        if isinstance(item, MakeStep):
            step = item
        elif isinstance(item, str):  # "DIR" or "DIR install"
            parts = item.split()
            if not parts or len(parts) > 2 or (len(parts) == 2 and parts[1] != "install"):
                raise ValueError(f"git_kernel.make_order: {item!r}: use 'DIR' or 'DIR install'")
            step = cls(parts[0], len(parts) == 2)
        elif isinstance(item, Mapping):
            step = cls(str(item["dir"]), bool(item.get("install", False)))
        else:
            directory, install = item
            step = cls(str(directory), bool(install))
        if step.directory.startswith("/") or ".." in Path(step.directory).parts or not step.directory:
            raise ValueError(f"git_kernel.make_order: {step.directory!r} must be relative, inside "
                             f"~/{DIRNAME}")
        return step

    def line(self) -> str:
        return f"{self.directory} install" if self.install else self.directory


@dataclasses.dataclass
class GitKernelConfig:
    """The ``git_kernel:`` section of the deployment config."""

    enabled: bool = True
    base_url: str = DEFAULT_BASE_URL
    branch: str = DEFAULT_BRANCH
    repos: tuple[RepoSpec, ...] = tuple(RepoSpec.coerce(r) for r in DEFAULT_REPOS)
    directory: str = DIRNAME
    kernel_name: str = KERNEL_NAME
    display_name: str = DISPLAY_NAME
    #: prefix of the pinned sPyNNaker kernel env to layer on (its bin/python makes the venv)
    base_env: str | None = None
    #: a read-only directory of wheels (pip --find-links), shared by all users
    wheelhouse: str | None = None
    #: a shared pip cache directory (must be writable by the users)
    pip_cache_dir: str | None = None
    #: never contact an index: everything must come from the base env / wheelhouse
    offline: bool = False
    #: extra arguments to "git clone", e.g. ["--filter=blob:none"]
    clone_args: tuple[str, ...] = ()
    #: packages the kernel itself needs on top of the clones
    extra_packages: tuple[str, ...] = ("ipykernel",)
    make_order: tuple[MakeStep, ...] = tuple(MakeStep(d, i) for d, i in DEFAULT_MAKE_ORDER)
    #: build the C code at creation: "auto" (when $GP-gcc is on PATH), "always", "never"
    build_c: str = "auto"
    #: environment of the kernel (kernel.json "env"), e.g. SPINNAKER_CFG_DIR
    kernel_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: the kernel's module: "auto" = spinnaker_kernel (the pinned kernel's launcher) when the
    #: base env has it, else ipykernel_launcher
    launcher: str = "auto"

    KEYS = ("enabled", "base_url", "branch", "repos", "directory", "kernel_name",
            "display_name", "base_env", "wheelhouse", "pip_cache_dir", "offline",
            "clone_args", "extra_packages", "make_order", "build_c", "kernel_env", "launcher")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> "GitKernelConfig":
        data = dict(data or {})
        if "git_kernel" in data and isinstance(data["git_kernel"], Mapping):
            data = dict(data["git_kernel"])  # a whole deployment config
        unknown = set(data) - set(cls.KEYS)
        if unknown:
            raise ValueError(f"git_kernel: unknown keys {sorted(unknown)}; allowed: {list(cls.KEYS)}")
        kw: dict[str, Any] = {}
        for key in cls.KEYS:
            if key in data and data[key] is not None:
                kw[key] = data[key]
        if "repos" in kw:
            kw["repos"] = tuple(RepoSpec.coerce(r) for r in kw["repos"])
        if "make_order" in kw:
            kw["make_order"] = tuple(MakeStep.coerce(s) for s in kw["make_order"])
        for key in ("clone_args", "extra_packages"):
            if key in kw:
                if isinstance(kw[key], str):
                    raise ValueError(f"git_kernel.{key} must be a list")
                kw[key] = tuple(str(x) for x in kw[key])
        if "kernel_env" in kw:
            kw["kernel_env"] = {str(k): str(v) for k, v in dict(kw["kernel_env"]).items()}
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.build_c not in ("auto", "always", "never"):
            raise ValueError("git_kernel.build_c must be auto, always or never")
        names = [r.name for r in self.repos]
        if len(set(names)) != len(names):
            raise ValueError(f"git_kernel.repos: duplicate names in {names}")
        if not self.repos:
            raise ValueError("git_kernel.repos is empty")
        if not _NAME_RE.match(self.directory) or "/" in self.directory:
            raise ValueError("git_kernel.directory must be a plain directory name")
        if not re.match(r"^(auto|[A-Za-z_][A-Za-z0-9_.]*)$", self.launcher):
            raise ValueError("git_kernel.launcher: 'auto' or a module name")
        if not re.match(r"^[a-z0-9._-]+$", self.kernel_name):
            raise ValueError("git_kernel.kernel_name: lower-case letters, digits, . _ - only")

    def to_json(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled, "base_url": self.base_url, "branch": self.branch,
            "repos": [dataclasses.asdict(r) for r in self.repos],
            "directory": self.directory, "kernel_name": self.kernel_name,
            "display_name": self.display_name, "base_env": self.base_env,
            "wheelhouse": self.wheelhouse, "pip_cache_dir": self.pip_cache_dir,
            "offline": self.offline, "clone_args": list(self.clone_args),
            "extra_packages": list(self.extra_packages),
            "make_order": [{"dir": s.directory, "install": s.install} for s in self.make_order],
            "build_c": self.build_c, "kernel_env": dict(self.kernel_env),
            "launcher": self.launcher,
        }

    def ensure_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`ensure_git_kernel` for this config."""
        base_python = None
        if self.base_env:
            base_python = str(Path(self.base_env) / "bin" / "python")
        return dict(repos=self.repos, base_url=self.base_url, branch=self.branch,
                    dirname=self.directory, kernel_name=self.kernel_name,
                    display_name=self.display_name, base_python=base_python,
                    wheelhouse=self.wheelhouse, pip_cache_dir=self.pip_cache_dir,
                    offline=self.offline, clone_args=self.clone_args,
                    extra_packages=self.extra_packages, make_order=self.make_order,
                    build_c=self.build_c, kernel_env=self.kernel_env,
                    launcher=self.launcher)


# --------------------------------------------------------------------------- results

@dataclasses.dataclass
class SetupResult:
    state: str                      # "done" (usable kernel) -- errors raise SetupError
    root: Path
    kernel_dir: Path
    commits: dict[str, str]
    warnings: list[str]
    seconds: float
    did_work: bool                  # False when everything was already in place


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _atomic_write(path: Path, text: str, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child has finished
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_status(home: str | os.PathLike[str], dirname: str = DIRNAME) -> dict[str, Any]:
    """The set-up status of ``home``: ``state`` is "absent" (never started), "running",
    "done", "failed", or "interrupted" (a set-up stopped without finishing: the next
    start completes it)."""
    root = Path(home) / dirname
    status = _read_json(root / STATUS_FILE)
    if not status:
        return {"state": "absent", "root": str(root)}
    if status.get("state") == "running" and not _pid_alive(status.get("pid")):
        status["state"] = "interrupted"
    return status


class _Status:
    """Writes setup-status.json and setup.log and calls the progress callback."""

    def __init__(self, root: Path, progress: ProgressFn | None, total: int) -> None:
        self.root = root
        self.progress = progress
        self.log_path = root / LOG_FILE
        self.log = open(self.log_path, "a", buffering=1)
        self.data: dict[str, Any] = {
            "state": "running", "pid": os.getpid(), "started": _now(), "updated": _now(),
            "step": "start", "done": 0, "total": total, "message": "", "warnings": [],
            "commits": {}, "error": None, "log": str(self.log_path),
        }

    def write(self) -> None:
        self.data["updated"] = _now()
        _atomic_write(self.root / STATUS_FILE, json.dumps(self.data, indent=1) + "\n")

    def say(self, message: str, step: str | None = None, advance: bool = False) -> None:
        if step:
            self.data["step"] = step
        if advance:
            self.data["done"] = min(self.data["done"] + 1, self.data["total"])
        self.data["message"] = message
        self.log.write(f"[{_now()}] {message}\n")
        self.write()
        if self.progress is not None:
            try:
                self.progress(message)
            except Exception:  # a broken progress display must not stop the set-up
                self.progress = None

    def warn(self, message: str) -> None:
        self.data["warnings"].append(message)
        self.say(f"WARNING: {message}")

    def finish(self, state: str, error: str | None = None) -> None:
        self.data.update(state=state, error=error, finished=_now())
        if state == "done":
            self.data["done"] = self.data["total"]
        self.write()
        self.log.write(f"[{_now()}] set-up {state}{': ' + error if error else ''}\n")
        self.log.close()


@contextlib.contextmanager
def _lock(path: Path, timeout: float | None) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise SetupBusy(f"another sPyNNakerGit set-up is running ({path} is locked)")
                time.sleep(0.2)  # polling a lock; bounded by ``timeout``
        yield
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------- helpers

class _Runner:
    def __init__(self, status: _Status, env: Mapping[str, str], timeout: float) -> None:
        self.status = status
        self.env = dict(env)
        self.timeout = timeout

    def run(self, cmd: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None,
            check: bool = True, what: str = "") -> subprocess.CompletedProcess[str]:
        argv = [str(c) for c in cmd]
        log = self.status.log
        log.write(f"$ {shlex.join(argv)}\n")
        try:
            proc = subprocess.run(argv, cwd=cwd, env=self.env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout if isinstance(exc.stdout, str) else ""
            log.write(out)
            raise SetupError(f"{what or argv[0]}: no result after {self.timeout:.0f} s") from None
        except FileNotFoundError:
            raise SetupError(f"{what or argv[0]}: command {argv[0]!r} not found") from None
        log.write(proc.stdout)
        if check and proc.returncode != 0:
            raise SetupError(f"{what or argv[0]} failed (exit {proc.returncode}): "
                             f"{_tail(proc.stdout)}")
        return proc


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) if kept else "(no output)"


_PROBE = textwrap.dedent(r"""
    import json, os, site, sys, sysconfig
    paths = sysconfig.get_paths()
    std = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")}
    sitedirs = {os.path.realpath(p) for p in site.getsitepackages()}
    layer = []  # what this interpreter sees beyond its stdlib: [path, is a site dir]
    for p in sys.path:
        real = os.path.realpath(p) if p else ""
        if (not p or real in std or p.endswith(".zip") or os.path.basename(p) == "lib-dynload"
                or not os.path.isdir(p)):
            continue
        layer.append([p, real in sitedirs])
    print(json.dumps({"version": "%d.%d.%d" % sys.version_info[:3], "purelib": paths["purelib"],
                      "prefix": sys.prefix, "layer": layer}))
""")


def _probe(python: str | os.PathLike[str], runner: _Runner) -> dict[str, Any]:
    proc = runner.run([python, "-c", _PROBE], what=f"checking {python}", cwd=Path("/"))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _file_hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _support_source_dir() -> Path:
    """Where gitupdate.sh / automatic_make.sh are shipped: $SPINNAKER_GIT_SUPPORT_DIR,
    package data (spinnaker_jupyter_ext/data/spynnaker-git-support), or the repository
    checkout (kernels/spynnaker-git/support)."""
    here = Path(__file__).resolve().parent
    candidates = []
    if os.environ.get("SPINNAKER_GIT_SUPPORT_DIR"):
        candidates.append(Path(os.environ["SPINNAKER_GIT_SUPPORT_DIR"]))
    candidates += [here / "data" / "spynnaker-git-support",
                   here.parent.parent / "kernels" / "spynnaker-git" / "support"]
    for cand in candidates:
        if all((cand / s).is_file() for s in SUPPORT_SCRIPTS):
            return cand
    raise SetupError("the sPyNNakerGit support scripts were not found in "
                     + ", ".join(str(c) for c in candidates))


# python run inside the user's venv: which requirements of the editable clones (and the
# kernel's extra packages) are not met by the venv + the pinned env it is layered on
_DEPS_CHECK = textwrap.dedent(r"""
    import importlib.metadata as md, json, os, re, sys, urllib.parse
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    root = os.path.realpath(sys.argv[1]); extras = json.loads(sys.argv[2])
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
    editable = {}
    for d in md.distributions():
        try:
            info = json.loads(d.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        url = info.get("url", "")
        if info.get("dir_info", {}).get("editable") and url.startswith("file://"):
            path = os.path.realpath(urllib.parse.unquote(url[7:]))
            if path == root or path.startswith(root + os.sep):
                editable.setdefault(norm(d.metadata["Name"]), d)
    missing, warnings = [], []
    def check(text, by):
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            return
        name = norm(req.name)
        if name in editable:
            have = editable[name].version
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                warnings.append("%s wants %s but the clone has %s" % (by, text, have))
            return
        req.marker = None  # evaluated above
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            missing.append(str(req)); return
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            missing.append(str(req))
    for name, d in sorted(editable.items()):
        for text in d.requires or []:
            check(text, d.metadata["Name"])
    for text in extras:
        check(text, "the kernel")
    print(json.dumps({"editable": {n: d.version for n, d in editable.items()},
                      "missing": sorted(set(missing)), "warnings": warnings}))
""")

_BUILD_CHECK = textwrap.dedent(r"""
    import importlib.util, sys
    try:
        import setuptools
    except ImportError:
        print("setuptools>=70.1"); sys.exit()
    v = tuple(int(x) for x in (setuptools.__version__.split(".") + ["0"])[:2] if x.isdigit())
    if v >= (70, 1):
        print("")
    elif v >= (64, 0):
        print("" if importlib.util.find_spec("wheel") else "wheel")
    else:
        print("setuptools>=70.1")
""")


# --------------------------------------------------------------------------- the set-up

def needs_setup(home: str | os.PathLike[str], repos: Iterable[Any] | None = None, *,
                dirname: str = DIRNAME, kernel_name: str = KERNEL_NAME,
                kernels_dir: str | os.PathLike[str] | None = None,
                display_name: str | None = None,
                kernel_env: Mapping[str, str] | None = None) -> bool:
    """Cheap check (no subprocess): False when a finished set-up is in place (and, when
    given, the kernelspec has this display name and environment)."""
    home = Path(home)
    root = home / dirname
    specs = [RepoSpec.coerce(r) for r in (repos if repos is not None else DEFAULT_REPOS)]
    kdir = Path(kernels_dir) if kernels_dir else home / ".local/share/jupyter/kernels"
    if read_status(home, dirname).get("state") != "done":
        return True
    spec = _read_json(kdir / kernel_name / "kernel.json")
    if not (root / "bin" / "python").exists() or not spec:
        return True
    if display_name is not None and spec.get("display_name") != display_name:
        return True
    if kernel_env is not None and spec.get("env", {}) != dict(kernel_env):
        return True
    return not all((root / r.name).is_dir() for r in specs)


def ensure_git_kernel(
    home: str | os.PathLike[str],
    repos: Iterable[RepoSpec | str | Mapping[str, Any]] | None = None,
    base_url: str = DEFAULT_BASE_URL,
    branch: str = DEFAULT_BRANCH,
    progress: ProgressFn | None = print,
    *,
    base_python: str | os.PathLike[str] | None = None,
    wheelhouse: str | os.PathLike[str] | None = None,
    pip_cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
    clone_args: Sequence[str] = (),
    extra_packages: Sequence[str] = ("ipykernel",),
    make_order: Iterable[Any] | None = None,
    build_c: str = "auto",
    kernel_env: Mapping[str, str] | None = None,
    launcher: str = "auto",
    dirname: str = DIRNAME,
    kernel_name: str = KERNEL_NAME,
    display_name: str = DISPLAY_NAME,
    kernels_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    lock_timeout: float | None = None,
    command_timeout: float = 3600.0,
) -> SetupResult:
    """Create (or complete) ``<home>/<dirname>`` and register its kernel; idempotent.

    ``base_python``: the pinned sPyNNaker env's python; the venv is made from it and sees
    its site-packages (None: a plain venv of this interpreter, dependencies installed).
    ``env``: environment of the git / pip / make subprocesses (default: os.environ).
    ``lock_timeout``: seconds to wait for another set-up (None: wait; 0: raise
    :class:`SetupBusy` at once). Raises :class:`SetupError` with the failing step's
    message; what was completed is kept and the next call carries on from there.
    """
    t0 = time.monotonic()
    home = Path(home).expanduser().absolute()
    root = home / dirname
    specs = [RepoSpec.coerce(r) for r in (repos if repos is not None else DEFAULT_REPOS)]
    steps = [MakeStep.coerce(s) for s in (make_order if make_order is not None
                                          else DEFAULT_MAKE_ORDER)]
    if build_c not in ("auto", "always", "never"):
        raise ValueError("build_c must be auto, always or never")
    kdir = (Path(kernels_dir) if kernels_dir else home / ".local/share/jupyter/kernels") / kernel_name
    root.mkdir(parents=True, exist_ok=True)

    with _lock(root / LOCK_FILE, lock_timeout):
        if not needs_setup(home, specs, dirname=dirname, kernel_name=kernel_name,
                           kernels_dir=kdir.parent, display_name=display_name,
                           kernel_env=kernel_env or {}):
            old = read_status(home, dirname)
            return SetupResult("done", root, kdir, dict(old.get("commits", {})),
                               list(old.get("warnings", [])), time.monotonic() - t0, False)

        total = len(specs) + 5 + (1 if build_c != "never" else 0)
        status = _Status(root, progress, total)
        sub_env = dict(os.environ if env is None else env)
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
            sub_env.pop(var, None)
        sub_env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C")
        runner = _Runner(status, sub_env, command_timeout)
        state = _read_json(root / STATE_FILE)

        def save_state() -> None:
            _atomic_write(root / STATE_FILE, json.dumps(state, indent=1) + "\n")

        try:
            status.say(f"setting up ~/{dirname} (the {display_name} kernel) in {root}", "start")
            python = _ensure_venv(root, base_python, runner, status, state, save_state)
            for i, spec in enumerate(specs, 1):
                _ensure_clone(root, spec, base_url, branch, clone_args, runner, status,
                              i, len(specs))
            commits = {}
            for spec in specs:
                head = runner.run(["git", "-C", root / spec.name, "rev-parse", "HEAD"],
                                  check=False, what=f"{spec.name}: git rev-parse")
                commits[spec.name] = head.stdout.strip() if head.returncode == 0 else "?"
            status.data["commits"] = commits
            pip = _PipArgs(python, wheelhouse, pip_cache_dir, offline)
            _ensure_installed(root, [s for s in specs if s.python], pip, runner, status, state,
                              save_state)
            _ensure_dependencies(root, python, extra_packages, pip, runner, status)
            _install_support(root, specs, steps, status, state, save_state)
            _register_kernel(kdir, root, display_name, kernel_env or {}, launcher, runner,
                             status)
            if build_c != "never":
                _build_c(root, build_c, sub_env, runner, status)
        except SetupError as exc:
            status.finish("failed", str(exc))
            raise
        except BaseException as exc:  # KeyboardInterrupt, a bug: say so, then re-raise
            status.finish("failed", f"{type(exc).__name__}: {exc}")
            raise
        status.say(f"{display_name} is ready: kernel {kernel_name!r}, "
                   f"{len(specs)} repositories in {root}", "done")
        status.finish("done")
        return SetupResult("done", root, kdir, commits, list(status.data["warnings"]),
                           time.monotonic() - t0, True)


def _ensure_venv(root: Path, base_python: str | os.PathLike[str] | None, runner: _Runner,
                 status: _Status, state: dict[str, Any], save_state: Callable[[], None]) -> Path:
    base = Path(base_python) if base_python else Path(sys.executable)
    if not base.exists():
        raise SetupError(f"the base python {base} does not exist (git_kernel.base_env)")
    python = root / "bin" / "python"
    want: dict[str, Any] = {"base_python": str(base), "layered": bool(base_python), "scheme": 2}
    have = state.get("venv") or {}
    if (all(have.get(k) == v for k, v in want.items()) and python.exists()
            and (root / "pyvenv.cfg").is_file()):
        status.say("virtual environment present", "venv", advance=True)
        return python
    status.say(f"creating the virtual environment from {base}", "venv")
    info = _probe(base, runner)
    want["version"] = info["version"]
    if base_python:
        # layered on the pinned env: no pip/setuptools copies of our own
        runner.run([base, "-m", "venv", "--without-pip", root], what="python -m venv")
        own = _probe(python, runner)
        # the pinned env's view (its site-packages, and the system's where it has
        # include-system-site-packages), after the venv's own site-packages
        lines = [f"import site; site.addsitedir({p!r})" if is_site
                 else f"import sys; {p!r} in sys.path or sys.path.append({p!r})"
                 for p, is_site in info["layer"] if p != own["purelib"]]
        _atomic_write(Path(own["purelib"]) / LAYER_PTH,
                      "# sPyNNakerGit: the pinned sPyNNaker environment's packages\n"
                      + "\n".join(lines) + "\n")
        has_pip = runner.run([python, "-c", "import pip"], check=False).returncode == 0
        if not has_pip:
            runner.run([python, "-m", "ensurepip", "--default-pip"], what="ensurepip")
        elif not (root / "bin" / "pip").exists():
            for name in ("pip", "pip3"):
                _atomic_write(root / "bin" / name,
                              f"#!{python}\nimport sys\nfrom pip._internal.cli.main import main\n"
                              "sys.exit(main())\n", 0o755)
    else:
        runner.run([base, "-m", "venv", root], what="python -m venv")
    state["venv"] = want
    state["installed"] = {}  # a new interpreter: install the clones again
    save_state()
    status.say("virtual environment ready", "venv", advance=True)
    return python


def _trust_local_mirror(url: str, runner: _Runner) -> None:
    """A mirror on this machine belongs to another account (the operator's): git refuses it ("dubious ownership")
    unless the user's own git config trusts it. Trust exactly that repository, for clones and later fetches."""
    path = url[len("file://"):] if url.startswith("file://") else url
    if "://" in path or not os.path.isabs(path):
        return
    candidates = [path, path + ".git"] if not path.endswith(".git") else [path]
    known = runner.run(["git", "config", "--global", "--get-all", "safe.directory"], check=False,
                       what="reading git's trusted folders").stdout.split()
    for repo in candidates:
        if os.path.isdir(repo) and repo not in known:
            runner.run(["git", "config", "--global", "--add", "safe.directory", repo],
                       what=f"trusting the local mirror {repo}")


def _ensure_clone(root: Path, spec: RepoSpec, base_url: str, branch: str,
                  clone_args: Sequence[str], runner: _Runner, status: _Status,
                  i: int, n: int) -> None:
    dest = root / spec.name
    if dest.exists():
        if not (dest / ".git").exists():
            raise SetupError(f"{dest} exists but is not a git clone; it was left as it is "
                             f"(move it away and restart the server to get a fresh clone)")
        status.say(f"[{i}/{n}] {spec.name}: clone present, left as it is", "clone", advance=True)
        return
    url = spec.clone_url(base_url)
    want = spec.branch or branch
    partial = root / f"{PARTIAL_PREFIX}{spec.name}"
    if partial.exists():
        status.say(f"[{i}/{n}] {spec.name}: removing an interrupted clone", "clone")
        shutil.rmtree(partial)
    status.say(f"[{i}/{n}] {spec.name}: cloning {url} ({want})", "clone")
    _trust_local_mirror(url, runner)
    git = ["git", "-c", "http.lowSpeedLimit=1000", "-c", "http.lowSpeedTime=60", "clone",
           "--quiet", *clone_args]
    proc = runner.run([*git, "--branch", want, url, partial], check=False,
                      what=f"{spec.name}: git clone")
    if proc.returncode != 0:
        out = proc.stdout
        if re.search(r"Remote branch .* not found", out):
            shutil.rmtree(partial, ignore_errors=True)
            status.warn(f"{spec.name}: no branch {want!r} at {url}; cloned its default branch")
            proc = runner.run([*git, url, partial], check=False, what=f"{spec.name}: git clone")
            out = proc.stdout
        if proc.returncode != 0:
            raise SetupError(f"{spec.name}: git clone {url} failed (exit {proc.returncode}): "
                             f"{_tail(out)}; the next start tries again")
    runner.run(["git", "-C", partial, "rev-parse", "--verify", "HEAD"],
               what=f"{spec.name}: checking the clone")
    os.rename(partial, dest)  # atomic: a clone in place is a complete clone
    status.say(f"[{i}/{n}] {spec.name}: cloned", "clone", advance=True)


class _PipArgs:
    def __init__(self, python: Path, wheelhouse: Any, cache: Any, offline: bool) -> None:
        self.python = python
        self.common = ["--disable-pip-version-check", "--no-input"]
        if wheelhouse:
            self.common += ["--find-links", str(wheelhouse)]
        if offline:
            self.common += ["--no-index"]
        if cache:
            self.common += ["--cache-dir", str(cache)]

    def install(self, *args: str | os.PathLike[str]) -> list[str]:
        return [str(self.python), "-m", "pip", "install", *self.common, *map(str, args)]


def _ensure_installed(root: Path, specs: list[RepoSpec], pip: _PipArgs, runner: _Runner,
                      status: _Status, state: dict[str, Any],
                      save_state: Callable[[], None]) -> None:
    installed = state.setdefault("installed", {})
    todo = [s for s in specs if installed.get(s.name) != str(root / s.name)]
    if not todo:
        status.say("editable installs present", "install", advance=True)
        return
    # PEP 660 editable builds need setuptools>=64 with wheel, or setuptools>=70.1
    need = runner.run([pip.python, "-c", _BUILD_CHECK], what="checking build tools").stdout.strip()
    if need:
        status.say(f"installing the build tool {need} into the venv", "install")
        runner.run(pip.install(need), what=f"pip install {need}")
    names = ", ".join(s.name for s in todo)
    status.say(f"installing in editable mode: {names}", "install")
    # compat mode: a plain path entry per clone, found before the pinned env's copies
    editable = ["--no-deps", "--config-settings", "editable_mode=compat"]
    for s in todo:
        editable += ["-e", str(root / s.name)]
    proc = runner.run(pip.install("--no-build-isolation", *editable), check=False,
                      what="pip install -e")
    if proc.returncode != 0:
        # a clone may need newer build tools than the venv has: build it in isolation
        status.say("retrying with build isolation (the clones' own build requirements)",
                   "install")
        runner.run(pip.install(*editable), what="pip install -e")
    for s in todo:
        installed[s.name] = str(root / s.name)
    save_state()
    status.say(f"installed: {names}", "install", advance=True)


def _ensure_dependencies(root: Path, python: Path, extra_packages: Sequence[str],
                         pip: _PipArgs, runner: _Runner, status: _Status) -> None:
    proc = runner.run([python, "-c", _DEPS_CHECK, root, json.dumps(list(extra_packages))],
                      what="checking dependencies")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for warning in report["warnings"]:
        status.warn(warning)
    if report["missing"]:
        status.say("installing what the pinned environment lacks: "
                   + ", ".join(report["missing"]), "dependencies")
        runner.run(pip.install(*report["missing"]), what="pip install (dependencies)")
    status.say("dependencies satisfied", "dependencies", advance=True)


def _install_support(root: Path, specs: list[RepoSpec], steps: list[MakeStep],
                     status: _Status, state: dict[str, Any],
                     save_state: Callable[[], None]) -> None:
    """Copy the support scripts and write repos.txt / make_order.txt. A file is
    (re)written only when absent or unchanged since we last wrote it: the user's edits
    stay."""
    src = _support_source_dir()
    support = root / "support"
    support.mkdir(exist_ok=True)
    written = state.setdefault("support", {})
    files: dict[str, tuple[str, int]] = {}
    for name in SUPPORT_SCRIPTS:
        files[name] = ((src / name).read_text(), 0o755)
    files["repos.txt"] = (
        "# repositories of this environment, in order (support/gitupdate.sh reads this)\n"
        + "".join(f"{s.name}{'' if s.python else ' c'}\n" for s in specs), 0o644)
    files["make_order.txt"] = (
        "# C build order of support/automatic_make.sh: DIRECTORY [install]\n"
        + "".join(f"{s.line()}\n" for s in steps), 0o644)
    for name, (text, mode) in files.items():
        path = support / name
        current = _file_hash(path)
        new = hashlib.sha256(text.encode()).hexdigest()
        if current == new:
            written[name] = new
            continue
        if current is not None and current != written.get(name):
            status.warn(f"support/{name} was edited; kept as it is (the shipped version "
                        f"was not installed)")
            continue
        _atomic_write(path, text, mode)
        written[name] = new
    save_state()
    status.say("support scripts in place: support/gitupdate.sh, support/automatic_make.sh",
               "support", advance=True)


_KERNEL_PROBE = textwrap.dedent(r"""
    import importlib.util, json, os
    ipk = importlib.util.find_spec("ipykernel")
    print(json.dumps({
        "spinnaker_kernel": importlib.util.find_spec("spinnaker_kernel") is not None,
        "resources": os.path.join(os.path.dirname(ipk.origin), "resources") if ipk else None}))
""")


def _register_kernel(kdir: Path, root: Path, display_name: str, kernel_env: Mapping[str, str],
                     launcher: str, runner: _Runner, status: _Status) -> None:
    probe = json.loads(runner.run([root / "bin" / "python", "-c", _KERNEL_PROBE],
                                  what="checking the kernel launcher").stdout.strip().splitlines()[-1])
    if launcher == "auto":
        # the pinned kernel's launcher (one sPyNNaker cfg, the machine notice) when the
        # layered env has it, else plain ipykernel
        launcher = "spinnaker_kernel" if probe["spinnaker_kernel"] else "ipykernel_launcher"
    spec: dict[str, Any] = {
        "argv": [str(root / "bin" / "python"), "-m", launcher, "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        # no debugger: its TCP port would let other accounts in (spinnaker_kernel.py, "No debugger")
        "metadata": {"debugger": False, "spinnaker_jupyter": {"kind": "git", "root": str(root)}},
    }
    if kernel_env:
        spec["env"] = dict(kernel_env)
    _atomic_write(kdir / "kernel.json", json.dumps(spec, indent=1) + "\n")
    for logo in ("logo-32x32.png", "logo-64x64.png"):
        if probe["resources"] and os.path.isfile(os.path.join(probe["resources"], logo)):
            shutil.copyfile(os.path.join(probe["resources"], logo), kdir / logo)
    status.say(f"kernel {display_name!r} registered in {kdir}", "kernel", advance=True)


def _build_c(root: Path, mode: str, env: Mapping[str, str], runner: _Runner,
             status: _Status) -> None:
    gp = env.get("GP", "arm-none-eabi")
    if shutil.which(f"{gp}-gcc", path=env.get("PATH")) is None:
        msg = (f"C code not built: {gp}-gcc is not installed; the kernel works in virtual "
               f"mode, run support/automatic_make.sh where the ARM toolchain is available")
        if mode == "always":
            raise SetupError(msg)
        status.warn(msg)
        status.data["done"] += 1
        return
    status.say("building the C code (support/automatic_make.sh)", "build_c")
    proc = runner.run(["bash", root / "support" / "automatic_make.sh"], check=False,
                      what="automatic_make.sh")
    if proc.returncode != 0:
        msg = f"C build failed: {_tail(proc.stdout, 8)}"
        if mode == "always":
            raise SetupError(msg)
        status.warn(msg + " (the kernel works; rerun support/automatic_make.sh)")
    status.say("C code built" if proc.returncode == 0 else "C build skipped", "build_c",
               advance=True)


# --------------------------------------------------------------------------- background

def start_background(home: str | os.PathLike[str],
                     config: GitKernelConfig | Mapping[str, Any] | None = None, *,
                     python: str | os.PathLike[str] | None = None,
                     env: Mapping[str, str] | None = None,
                     nice: int = 0) -> subprocess.Popen[bytes] | None:
    """Start the set-up in a detached process unless it is already complete (or not
    configured / disabled); returns at once. Output goes to ``~/sPyNNakerGit/setup.log``;
    follow it with :func:`read_status`. For the server extension, at server start.
    ``nice``: how much lower its CPU priority (and its git and pip children's) is than the caller's.

    ``config``: the ``git_kernel`` section; None reads it (JSON) from the environment
    variable ``SPINNAKER_GIT_KERNEL_CONFIG`` (set by the spawner); absent there: None."""
    if config is None:
        text = (os.environ if env is None else env).get(CONFIG_ENV)
        if not text:
            return None
        config = json.loads(text)
    cfg = config if isinstance(config, GitKernelConfig) else GitKernelConfig.from_mapping(config)
    if not cfg.enabled:
        return None
    if not needs_setup(home, cfg.repos, dirname=cfg.directory, kernel_name=cfg.kernel_name,
                       display_name=cfg.display_name, kernel_env=cfg.kernel_env):
        return None
    root = Path(home) / cfg.directory
    root.mkdir(parents=True, exist_ok=True)
    run_env = dict(os.environ if env is None else env)
    here = str(Path(__file__).resolve().parent.parent)
    run_env["PYTHONPATH"] = here + (os.pathsep + run_env["PYTHONPATH"]
                                    if run_env.get("PYTHONPATH") else "")
    with open(root / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [str(python or sys.executable), "-m", "spinnaker_jupyter_ext.gitkernel",
             "--home", str(home), "--config-json", json.dumps(cfg.to_json()), "--quiet",
             "--wait", "5"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=run_env,
            start_new_session=True, close_fds=True)
    if nice:  # (set from here: a preexec_fn is unsafe in a server with threads; the child is still importing)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + nice)
    return proc


def _load_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml  # only needed for YAML files
        return yaml.safe_load(text) or {}
    return json.loads(text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m spinnaker_jupyter_ext.gitkernel",
        description=f"Create or complete ~/{DIRNAME} and its kernel {DISPLAY_NAME!r}.")
    ap.add_argument("--home", default=os.path.expanduser("~"))
    ap.add_argument("--config", help="JSON or YAML file: the git_kernel section, or a "
                    "deployment config holding one")
    ap.add_argument("--config-json", help="the git_kernel section as JSON")
    ap.add_argument("--base-url")
    ap.add_argument("--branch")
    ap.add_argument("--repo", action="append", help="NAME or NAME:c (repeatable; "
                    "replaces the configured list)")
    ap.add_argument("--base-env", help="prefix of the pinned sPyNNaker kernel env")
    ap.add_argument("--wheelhouse")
    ap.add_argument("--pip-cache-dir")
    ap.add_argument("--offline", action="store_true", default=None)
    ap.add_argument("--build-c", choices=["auto", "always", "never"])
    ap.add_argument("--kernel-env", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="how long to wait for another running set-up (default: 0)")
    ap.add_argument("--quiet", action="store_true", help="progress only to setup.log")
    ap.add_argument("--status", action="store_true", help="print the status and exit")
    args = ap.parse_args(argv)

    data: dict[str, Any] = {}
    try:
        if os.environ.get(CONFIG_ENV):
            data.update(GitKernelConfig.from_mapping(json.loads(os.environ[CONFIG_ENV])).to_json())
        if args.config:
            data.update(GitKernelConfig.from_mapping(_load_config_file(args.config)).to_json())
        if args.config_json:
            data.update(GitKernelConfig.from_mapping(json.loads(args.config_json)).to_json())
        for key, value in (("base_url", args.base_url), ("branch", args.branch),
                           ("repos", args.repo), ("base_env", args.base_env),
                           ("wheelhouse", args.wheelhouse), ("pip_cache_dir", args.pip_cache_dir),
                           ("offline", args.offline), ("build_c", args.build_c)):
            if value is not None:
                data[key] = value
        if args.kernel_env:
            kenv = dict(data.get("kernel_env") or {})
            for item in args.kernel_env:
                k, sep, v = item.partition("=")
                if not sep:
                    raise ValueError(f"--kernel-env {item!r}: use NAME=VALUE")
                kenv[k] = v
            data["kernel_env"] = kenv
        cfg = GitKernelConfig.from_mapping(data)
    except (ValueError, TypeError, OSError) as exc:
        print(f"gitkernel: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.status:
        print(json.dumps(read_status(args.home, cfg.directory), indent=1))
        return EXIT_OK
    if not cfg.enabled:
        print("gitkernel: git_kernel.enabled is false; nothing to do")
        return EXIT_OK
    progress = None if args.quiet else (lambda m: print(m, flush=True))
    try:
        result = ensure_git_kernel(args.home, progress=progress, lock_timeout=args.wait,
                                   **cfg.ensure_kwargs())
    except SetupBusy as exc:
        print(f"gitkernel: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except SetupError as exc:
        print(f"gitkernel: set-up failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not result.did_work and progress:
        progress(f"{cfg.display_name} already set up in {result.root}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
