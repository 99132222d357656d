"""Build the shared kernel environments, their kernelspecs, and the deployment's sPyNNaker cfg.

Environments are rebuilt only when their pinned requirements, launcher or server contract change (a stamp file
records a hash), so `spinnaker-jupyter up` is quick after the first time. pip's output is streamed as progress.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import spinnaker_server_contract

from . import spynnaker_cfg
from .config import PROJECT_ROOT, ConfigError, Deployment

KERNELS_SRC = PROJECT_ROOT / "kernels"
#: The launcher reads what the hub told the server through this module; the kernel env has no extension package, so
#: the file is copied beside the launcher (standard library only).
CONTRACT = Path(spinnaker_server_contract.__file__)
STAMP = ".spinnaker-jupyter-stamp"


def base_python(deployment: Deployment) -> str:
    """An interpreter every user account can run (the hub venv's base, not a venv inside /root)."""
    return deployment["kernels"]["python"] or getattr(sys, "_base_executable", sys.executable)


def _digest(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _run(cmd: list[str], say, label: str) -> None:
    """Run a build step, echoing pip's milestones so a long first set-up shows it is moving."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-30:]
        if line.startswith(("Collecting ", "Installing collected", "Successfully installed", "Building wheel")):
            say(f"  [{time.monotonic() - t0:5.0f}s] {line[:110]}")
    if proc.wait() != 0:
        raise ConfigError(f"{label} failed (exit code {proc.returncode}). Last output:\n" + "\n".join(tail))


@dataclass(frozen=True)
class Release:
    """One sPyNNaker release the deployment builds: its env, its kernel, its pinned requirements."""

    version: str | None  # bare (no epoch), e.g. "7.3.0"; None: the default release's file pins no sPyNNaker
    requirements: Path
    env: Path
    kernel_name: str  # `spynnaker` for the first (default) release, `spynnaker-<version>` for the others
    display_name: str
    key: str  # where it is configured, for messages: kernels.spynnaker or kernels.spynnaker[1]

    @property
    def python(self) -> Path:
        return self.env / "bin" / "python"

    @property
    def label(self) -> str:
        return f"sPyNNaker {self.version}" if self.version else "sPyNNaker"


_PIN = re.compile(r"^\s*spynnaker\s*==\s*([^\s;#]+)", re.IGNORECASE)


def bare_version(v: str) -> str:
    """7.4.1 for 1!7.4.1: users and the EBRAINS clients write releases without pip's epoch."""
    return v.split("!", 1)[-1]


def pinned_version(requirements: Path) -> str | None:
    """The sPyNNaker release a requirements file pins (sPyNNaker==...), bare; None when it pins none."""
    for line in requirements.read_text().splitlines():
        if m := _PIN.match(line):
            return bare_version(m.group(1))
    return None


def installed_version(env: Path) -> str | None:
    """The sPyNNaker release installed in an environment (its metadata), bare; None when there is none."""
    found = sorted(env.glob("lib/python*/site-packages/[sS][pP]y[nN][nN][aA]ker-*.dist-info"))
    return bare_version(found[0].name.split("-", 1)[1].removesuffix(".dist-info")) if found else None


def releases(deployment: Deployment) -> list[Release]:
    """The configured sPyNNaker releases, the default first (kernels.spynnaker: one object, or a list of them).
    Checked here, each problem one line naming its key: the one place that maps the config to releases."""
    value = deployment["kernels"]["spynnaker"]
    items = [value] if isinstance(value, dict) else list(value)
    src = KERNELS_SRC / "spynnaker"
    out: list[Release] = []
    for n, item in enumerate(items):
        key = "kernels.spynnaker" if isinstance(value, dict) else f"kernels.spynnaker[{n}]"
        version = bare_version(item["version"]) if item.get("version") else None
        if version and version in [r.version for r in out]:
            raise ConfigError(f"{key}.version: {version} is listed twice; each release must be a different version")
        if item.get("requirements"):
            req = deployment.path(item["requirements"], src)
        elif n == 0:
            req = src / "requirements.txt"
        elif version:
            req = src / f"requirements-{version}.txt"
        else:
            raise ConfigError(
                f"{key}: give its version (e.g. version: 7.3.0) or its pinned requirements file; only the first "
                "release may leave both out"
            )
        if not req.is_file():
            raise ConfigError(
                f"{key}.requirements: no such file {req}; give a pinned requirements file (sPyNNaker==<version>, "
                f"as {src / 'requirements.txt'})"
            )
        pinned = pinned_version(req)
        if version and pinned and pinned != version:
            raise ConfigError(f"{key}.version: {version}, but {req} pins sPyNNaker {pinned}; make them agree")
        version = version or pinned
        if n > 0 and not version:
            raise ConfigError(f"{key}.version: missing, and {req} pins no sPyNNaker release; set version: <release>")
        if version and version in [r.version for r in out]:
            raise ConfigError(f"{key}.version: {version} is listed twice; each release must be a different version")
        default = n == 0
        out.append(
            Release(
                version=version,
                requirements=req,
                env=deployment.envs_dir / ("spynnaker" if default else f"spynnaker-{version}"),
                kernel_name="spynnaker" if default else f"spynnaker-{version}".lower(),
                display_name=item.get("display_name") or ("sPyNNaker" if default else f"sPyNNaker {version}"),
                key=key,
            )
        )
    return out


def build_spynnaker_env(
    deployment: Deployment, say=print, force: bool = False, release: Release | None = None, of: str = ""
) -> Path:
    """Build one release's environment (the default release when none is given); `of` says e.g. "2 of 3"."""
    release = release or releases(deployment)[0]
    src = KERNELS_SRC / "spynnaker"
    req = release.requirements
    launcher = src / "spinnaker_kernel.py"
    env = release.env
    stamp = _digest(req, launcher, CONTRACT)
    which = f"{release.label}{f' (release {of})' if of else ''}"
    if not force and (env / STAMP).exists() and (env / STAMP).read_text() == stamp:
        say(f"Kernel environment {which} is up to date ({env})")
        return env
    t0 = time.monotonic()
    say(f"Building the {which} kernel environment in {env} (first time: about a minute)")
    python = base_python(deployment)
    if env.exists() and not (env / "bin" / "python").exists():
        shutil.rmtree(env)
    # System site packages on, so that `pip install --user` works in the kernel and survives restarts.
    _run([python, "-m", "venv", "--system-site-packages", str(env)], say, "creating the kernel environment")
    _run(
        [str(env / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "off", "-r", str(req)],
        say,
        f"installing {req}",
    )
    got = installed_version(env)
    if release.version and got != release.version:
        raise ConfigError(
            f"{release.key}.version: {release.version}, but {req} installed sPyNNaker {got or 'nothing'}; pin "
            f"sPyNNaker=={release.version} there"
        )
    site = subprocess.run(
        [str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    shutil.copy2(launcher, Path(site) / "spinnaker_kernel.py")
    shutil.copy2(CONTRACT, Path(site) / CONTRACT.name)
    make_world_readable(env)
    (env / STAMP).write_text(stamp)
    say(f"{which} kernel environment ready in {time.monotonic() - t0:.0f} s")
    return env


def make_world_readable(root: Path) -> None:
    """Every user account runs these environments: no file may be private to the builder."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        want = mode | 0o444 | (0o111 if path.is_dir() or mode & 0o100 else 0)
        if want != mode:
            os.chmod(path, want)


def write_kernelspec(deployment: Deployment, env: Path, release: Release | None = None) -> Path:
    """The kernelspec of one release (the default release's, `spynnaker`, when none is given)."""
    release = release or releases(deployment)[0]
    spec_dir = deployment.share_dir / "kernels" / release.kernel_name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [str(env / "bin" / "python"), "-m", "spinnaker_kernel", "-f", "{connection_file}"],
        "display_name": release.display_name,
        "language": "python",
        "metadata": {"debugger": False},  # its port would let other accounts in (spinnaker_kernel.py: No debugger)
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    for logo in ("logo-32x32.png", "logo-64x64.png"):
        found = list(env.glob(f"share/jupyter/kernels/python3/{logo}"))
        if found:
            shutil.copy2(found[0], spec_dir / logo)
    write_python3_kernelspec(deployment)
    make_world_readable(deployment.share_dir)
    return spec_dir


def write_python3_kernelspec(deployment: Deployment) -> Path:
    """The python3 kernel of the user servers (their own interpreter, as jupyter_client's native kernel), without
    the debugger: found first on JUPYTER_PATH, it replaces ipykernel's own spec, which would offer it."""
    spec_dir = deployment.share_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [
            sys.executable,
            str(KERNELS_SRC / "spynnaker" / "spinnaker_kernel.py"),
            "--plain",
            "-f",
            "{connection_file}",
        ],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "metadata": {"debugger": False},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    ipykernel = importlib.util.find_spec("ipykernel")  # the server environment's (jupyterlab needs it): its logos
    for logo in Path(ipykernel.origin).parent.glob("resources/logo-*"):
        shutil.copy2(logo, spec_dir / logo.name)
    return spec_dir


def write_spynnaker_cfg(deployment: Deployment) -> Path:
    try:
        text = spynnaker_cfg.text(deployment["spinnaker"])
    except spynnaker_cfg.CfgError as e:
        raise ConfigError(str(e)) from None
    cfg_dir = deployment.spynnaker_cfg_dir
    cfg_dir.mkdir(parents=True, exist_ok=True)
    path = cfg_dir / ".spynnaker.cfg"
    # Every user's kernel reads it (0644), so it holds no secret: config.load refuses credentials in
    # spinnaker.spalloc.url and spinnaker.extra_cfg. Replaced whole, so a kernel never reads half a file.
    tmp = cfg_dir / f".spynnaker.cfg.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    make_world_readable(cfg_dir.parent)
    return path


def build_all(deployment: Deployment, say=print, force: bool = False, build: bool = True) -> None:
    """Build (unless `build` is false) every configured release, then publish one kernelspec per release and the
    sPyNNaker cfg of this deployment."""
    rels = releases(deployment)
    for n, release in enumerate(rels, 1):
        if build:
            env = build_spynnaker_env(deployment, say, force, release, f"{n} of {len(rels)}" if len(rels) > 1 else "")
        else:
            env = release.env
            if not (env / STAMP).exists():
                raise ConfigError(
                    f"the {release.label} kernel environment {env} is not built: run `spinnaker-jupyter build`"
                )
        write_kernelspec(deployment, env, release)
    # A release taken out of the config: its kernel goes from the launcher (its env stays until removed by hand).
    names = {r.kernel_name for r in rels}
    for old in (deployment.share_dir / "kernels").glob("spynnaker-*"):
        if old.name not in names and (old / "kernel.json").exists():
            shutil.rmtree(old)
    write_spynnaker_cfg(deployment)
