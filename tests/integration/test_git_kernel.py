"""Tests of the git-master kernel "sPyNNakerGit" (issue 6), offline.

Local bare git repositories stand in for GitHub. They are made in the test set-up from the
PyPI source distributions of the SpiNNaker packages (cached under .cache/gitkernel/, so a
rerun needs no network), plus a small C repository (default branch "main") whose Makefiles
use ``$(GP)-gcc`` like spinnaker_tools does; the tests point GP at a shim of the host gcc.

The pinned kernel env comes from the ``spynnaker_python`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from hubclient import wait_for

REPO = Path(__file__).resolve().parents[2]
try:
    from spinnaker_jupyter_ext import gitkernel
except ImportError:  # not installed: the namespace package from the checkout
    sys.path.insert(0, str(REPO / "extensions"))
    from spinnaker_jupyter_ext import gitkernel

from spinnaker_jupyter import config as hub_config  # noqa: E402
from spinnaker_jupyter.schema import defaults  # noqa: E402

CACHE = REPO / ".cache" / "gitkernel"
VERSION = "1!7.4.1"
#: GitHub repository name -> PyPI distribution, in dependency order
SDISTS = {
    "SpiNNUtils": "SpiNNUtilities",
    "SpiNNMachine": "SpiNNMachine",
    "SpiNNMan": "SpiNNMan",
    "PACMAN": "spinnaker-pacman",
    "spalloc": "spalloc",
    "SpiNNFrontEndCommon": "SpiNNFrontEndCommon",
    "sPyNNaker": "sPyNNaker",
}
#: editable builds with the pinned env's setuptools 65 need "wheel"; it comes from here
WHEELHOUSE_REQS = ["wheel==0.45.1"]
C_REPO = "spinn_demo_c"
ALL_REPOS = [{"name": C_REPO, "python": False}] + [{"name": n} for n in SDISTS]
MAKE_ORDER = [f"{C_REPO}/lib install", f"{C_REPO}/app"]
DIRNAME = "sPyNNakerGit"  # git_kernel.directory's default
SPYNNAKER_CFG = "[Machine]\nvirtual_board = True\nversion = 5\n"
GIT = shutil.which("git")

pytestmark = pytest.mark.skipif(GIT is None, reason="git is not installed")


# --------------------------------------------------------------------------- helpers


def git(*args, cwd=None, check=True) -> str:
    proc = subprocess.run(
        [
            GIT,
            "-c",
            "user.name=Upstream Dev",
            "-c",
            "user.email=dev@example.org",
            "-c",
            "init.defaultBranch=master",
            *map(str, args),
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_git_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"git {args}: {proc.stdout}{proc.stderr}")
    return proc.stdout.strip()


def _git_env() -> dict[str, str]:
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    env.pop("GIT_DIR", None)
    return env


def tree_size(path: Path) -> int:
    """Bytes on disk (allocated blocks) under ``path``, symlinks not followed."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_blocks * 512
    return total


def push_commit(
    bare: Path, work: Path, relpath: str, text: str, branch: str = "master", new_branch: bool = False
) -> str:
    """Commit ``text`` to ``relpath`` on ``branch`` of the bare repository; its sha."""
    if not work.exists():
        git("clone", "--quiet", bare, work)
    git("fetch", "--quiet", "origin", cwd=work)
    if new_branch:
        git("switch", "--quiet", "-c", branch, cwd=work)
    else:
        git("switch", "--quiet", branch, cwd=work)
        git("reset", "--quiet", "--hard", f"origin/{branch}", cwd=work)
    target = work / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    git("add", relpath, cwd=work)
    git("commit", "--quiet", "-m", f"upstream change to {relpath}", cwd=work)
    git("push", "--quiet", "origin", branch, cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


def base_env(tmp: Path, home: Path, extra_path: list[Path] = ()) -> dict[str, str]:
    """An environment that is offline and independent of this machine's pip/git config."""
    env = _git_env()
    for var in list(env):
        if var.startswith("PIP_") or var in ("XDG_CONFIG_DIRS", "VIRTUAL_ENV", "PYTHONPATH"):
            del env[var]
    env.update(
        HOME=str(home),
        PIP_CONFIG_FILE=os.devnull,
        PIP_NO_INPUT="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    if extra_path:
        env["PATH"] = os.pathsep.join([*map(str, extra_path), env["PATH"]])
    return env


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def sdists() -> dict[str, Path]:
    """The PyPI sdists, downloaded once into .cache/gitkernel/sdists."""
    d = CACHE / "sdists"
    d.mkdir(parents=True, exist_ok=True)

    def find():
        found = {}
        for path in d.glob("*.tar.gz"):
            stem = path.name[: -len(".tar.gz")].rsplit("-", 1)[0]
            found[stem.replace("-", "_").replace(".", "_").lower()] = path
        return {repo: found.get(dist.replace("-", "_").lower()) for repo, dist in SDISTS.items()}

    if not all(find().values()):
        reqs = [f"{dist}=={VERSION}" for dist in SDISTS.values()]
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--dest", str(d), *reqs],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"pip download of the sdists failed:\n{proc.stderr[-3000:]}"
    paths = find()
    assert all(paths.values()), f"sdists missing from {d}: {paths}"
    return paths


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    d = CACHE / "wheelhouse"
    d.mkdir(parents=True, exist_ok=True)
    if not list(d.glob("wheel-*.whl")):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--only-binary",
                ":all:",
                "--no-deps",
                "--dest",
                str(d),
                *WHEELHOUSE_REQS,
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"pip download failed:\n{proc.stderr[-3000:]}"
    return d


def _make_c_repo(src: Path) -> None:
    (src / "lib").mkdir(parents=True)
    (src / "app").mkdir()
    (src / ".gitignore").write_text("installed/\n*.o\n*.a\napp/app\n")
    (src / "README.md").write_text("A small C repository for the automatic_make tests.\n")
    (src / "lib" / "demo.h").write_text("int demo_add(int a, int b);\n")
    (src / "lib" / "demo.c").write_text('#include "demo.h"\nint demo_add(int a, int b) { return a + b; }\n')
    (src / "lib" / "Makefile").write_text(
        "# like spinnaker_tools: the compiler is $(GP)-gcc\n"
        "INSTALL_DIR ?= ../installed\n"
        "all: libdemo.a\n"
        "demo.o: demo.c demo.h\n\t$(GP)-gcc -Wall -c -o $@ demo.c\n"
        "libdemo.a: demo.o\n\t$(GP)-ar rcs $@ demo.o\n"
        "install: libdemo.a\n\tmkdir -p $(INSTALL_DIR)/lib $(INSTALL_DIR)/include\n"
        "\tcp libdemo.a $(INSTALL_DIR)/lib/\n\tcp demo.h $(INSTALL_DIR)/include/\n"
        "install-clean:\n\trm -rf $(INSTALL_DIR)\n"
        "clean:\n\trm -f *.o *.a\n"
        ".PHONY: all install install-clean clean\n"
    )
    (src / "app" / "main.c").write_text(
        '#include <stdio.h>\n#include "demo.h"\nint main(void) { printf("demo %d\\n", demo_add(2, 3)); return 0; }\n'
    )
    (src / "app" / "Makefile").write_text(
        "# needs the library installed by ../lib first\n"
        "all: app\n"
        "app: main.c\n\t$(GP)-gcc -Wall -I../installed/include -o $@ main.c "
        "-L../installed/lib -ldemo\n"
        "clean:\n\trm -f app\n"
        ".PHONY: all clean\n"
    )


@pytest.fixture(scope="session")
def pristine_upstream(tmp_path_factory, sdists) -> Path:
    """Bare repositories <Name>.git made from the sdists, plus the C repository."""
    top = tmp_path_factory.mktemp("upstream-pristine")
    bare, src_top = top / "bare", top / "src"
    bare.mkdir()
    env = dict(GIT_AUTHOR_DATE="2025-01-01T12:00:00Z", GIT_COMMITTER_DATE="2025-01-01T12:00:00Z")
    for name, sdist in [*sdists.items(), (C_REPO, None)]:
        src = src_top / name
        if sdist is None:
            _make_c_repo(src)
            first_branch = "main"
        else:
            src.mkdir(parents=True)
            with tarfile.open(sdist) as tar:
                members = []
                for m in tar.getmembers():
                    parts = m.name.split("/", 1)
                    if len(parts) == 2 and parts[1] and (m.isfile() or m.isdir()):
                        m.name = parts[1]
                        members.append(m)
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(src, members=members, **kw)
            for egg in src.glob("*.egg-info"):
                shutil.rmtree(egg)
            (src / ".gitignore").write_text("*.egg-info/\n__pycache__/\n*.pyc\nreports/\n")
            first_branch = "master"
        git("init", "--quiet", "-b", first_branch, src)
        git("add", "-A", cwd=src)
        subprocess.run(
            [
                GIT,
                "-c",
                "user.name=Upstream Dev",
                "-c",
                "user.email=dev@example.org",
                "commit",
                "--quiet",
                "-m",
                f"{name} {VERSION}",
            ],
            cwd=src,
            check=True,
            env={**_git_env(), **env},
        )
        git("clone", "--quiet", "--bare", src, bare / f"{name}.git")
    return bare


@pytest.fixture
def upstream(tmp_path, pristine_upstream) -> Path:
    """A private copy of the bare repositories, for tests that push to them."""
    dest = tmp_path / "upstream"
    shutil.copytree(pristine_upstream, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def gcc_shim(tmp_path_factory) -> Path:
    """A directory with testarm-gcc / testarm-ar: the host tools under a cross prefix."""
    gcc, ar = shutil.which("gcc") or shutil.which("cc"), shutil.which("ar")
    if not gcc or not ar or not shutil.which("make"):
        pytest.skip("a host C compiler, ar and make are needed")
    d = tmp_path_factory.mktemp("shim")
    (d / "testarm-gcc").symlink_to(gcc)
    (d / "testarm-ar").symlink_to(ar)
    return d


@pytest.fixture(scope="session")
def cfg_dir(tmp_path_factory) -> Path:
    """The one sPyNNaker config of the kernel: virtual mode (XDG_CONFIG_DIRS)."""
    d = tmp_path_factory.mktemp("xdg")
    (d / ".spynnaker.cfg").write_text(SPYNNAKER_CFG)
    return d


def config_section(spynnaker_python, wheelhouse, upstream: Path, **over) -> dict:
    """A deployment config's ``git_kernel:`` section as the hub validates it (defaults from the schema) and sends it
    to user servers, with the pinned env."""
    section = {
        "base_url": f"file://{upstream}",
        "branch": "master",
        "repos": ALL_REPOS,
        "wheelhouse": str(wheelhouse),
        "offline": True,
        "make_order": MAKE_ORDER,
        "build_c": "never",
    }
    section.update(over)
    values = hub_config.merge(defaults(), {"git_kernel": section})
    hub_config.validate(values)
    return dict(values["git_kernel"], base_env=str(Path(spynnaker_python).parent.parent))


def git_config(spynnaker_python, wheelhouse, upstream: Path, **over) -> gitkernel.GitKernelConfig:
    return gitkernel.GitKernelConfig.from_section(config_section(spynnaker_python, wheelhouse, upstream, **over))


@pytest.fixture(scope="module")
def created(tmp_path_factory, spynnaker_python, wheelhouse, pristine_upstream, gcc_shim, cfg_dir):
    """First login of a user: the whole set-up, measured."""
    tmp = tmp_path_factory.mktemp("first-login")
    home = tmp / "home"
    home.mkdir()
    messages: list[str] = []
    env = base_env(tmp, home, [gcc_shim])
    env["GP"] = "testarm"
    t0 = time.monotonic()
    cfg = git_config(
        spynnaker_python,
        wheelhouse,
        pristine_upstream,
        build_c="always",
        kernel_env={"SPINNAKER_CFG_DIR": str(cfg_dir)},
    )
    result = gitkernel.ensure_git_kernel(home, cfg, progress=messages.append, env=env)
    seconds = time.monotonic() - t0
    root = home / DIRNAME
    clones = sum(tree_size(root / r["name"]) for r in ALL_REPOS)
    total = tree_size(root)
    measure = {
        "setup_seconds": round(seconds, 1),
        "disk_total_MB": round(total / 1e6, 1),
        "disk_clones_MB": round(clones / 1e6, 1),
        "disk_venv_and_support_MB": round((total - clones) / 1e6, 2),
        "pinned_env_MB": round(tree_size(Path(spynnaker_python).parent.parent) / 1e6),
    }
    print(f"\nsPyNNakerGit first-login measurements: {json.dumps(measure)}")
    (CACHE / "last-measurements.json").write_text(json.dumps(measure, indent=1) + "\n")
    return dict(
        home=home,
        root=root,
        result=result,
        messages=messages,
        env=env,
        measure=measure,
        upstream=pristine_upstream,
        pinned_python=spynnaker_python,
    )


# --------------------------------------------------------------------------- first login


def test_first_login_creates_venv_clones_and_kernel(created, record_property):
    home, root, result = created["home"], created["root"], created["result"]
    record_property("measurements", json.dumps(created["measure"]))
    assert result.state == "done" and result.did_work
    # a real venv that a terminal can activate
    assert (root / "pyvenv.cfg").is_file() and (root / "bin" / "activate").is_file()
    # each repository cloned at the upstream commit, on master (the C one: its default, main)
    for repo in ALL_REPOS:
        name = repo["name"]
        clone = root / name
        upstream_head = git("--git-dir", created["upstream"] / f"{name}.git", "rev-parse", "HEAD")
        assert git("rev-parse", "HEAD", cwd=clone) == upstream_head == result.commits[name]
        expected_branch = "main" if name == C_REPO else "master"
        assert git("symbolic-ref", "--short", "HEAD", cwd=clone) == expected_branch
        assert git("status", "--porcelain", "--untracked-files=no", cwd=clone) == ""
    assert not list(root.glob(gitkernel.PARTIAL_PREFIX + "*"))
    # progress was reported, per repository, and the fallback to "main" was explained
    msgs = "\n".join(created["messages"])
    for repo in ALL_REPOS:
        assert f"{repo['name']}: cloning" in msgs
    assert "sPyNNakerGit is ready" in created["messages"][-1]
    assert any("no branch 'master'" in w and C_REPO in w for w in result.warnings)
    # kernel registered for the user
    spec = json.loads((home / ".local/share/jupyter/kernels/spynnakergit/kernel.json").read_text())
    assert spec["display_name"] == "sPyNNakerGit"
    # the pinned kernel's launcher (one sPyNNaker cfg) when the pinned env has it
    has_launcher = (
        subprocess.run([str(created["pinned_python"]), "-c", "import spinnaker_kernel"], capture_output=True).returncode
        == 0
    )
    launcher = "spinnaker_kernel" if has_launcher else "ipykernel_launcher"
    assert spec["argv"] == [str(root / "bin" / "python"), "-m", launcher, "-f", "{connection_file}"]
    assert "SPINNAKER_CFG_DIR" in spec["env"]
    # support scripts copied; the C code was built at creation with the configured compiler
    for script in gitkernel.SUPPORT_SCRIPTS:
        assert os.access(root / "support" / script, os.X_OK)
    assert (root / "support" / "repos.txt").read_text().splitlines()[1:] == [f"{C_REPO} c"] + list(SDISTS)
    assert (root / C_REPO / "app" / "app").is_file()
    # status and log
    status = gitkernel.read_status(home, DIRNAME)
    assert status["state"] == "done" and status["done"] == status["total"]
    assert status["commits"] == result.commits
    log = (root / "setup.log").read_text()
    assert " clone --quiet --branch master file://" in log and "-m pip install" in log
    # layered on the pinned env: no third-party packages copied into the user's venv
    site = next((root / "lib").glob("python3*/site-packages"))
    assert not (site / "numpy").exists() and not (site / "scipy").exists()
    assert (site / gitkernel.LAYER_PTH).is_file()
    assert created["measure"]["disk_venv_and_support_MB"] < 10


def test_terminal_activate_uses_the_clones(created):
    root = created["root"]
    script = (
        "cd ~/sPyNNakerGit && source bin/activate && "
        "python -c 'import spynnaker, spinn_utilities, spalloc_client, pacman; "
        "print(spynnaker.__file__); print(spinn_utilities.__file__); "
        "print(spalloc_client.__file__); print(pacman.__file__)' && "
        "command -v python && pip --version"
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=created["env"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for line, repo in zip(lines[:4], ["sPyNNaker", "SpiNNUtils", "spalloc", "PACMAN"], strict=True):
        assert line.startswith(str(root / repo) + "/"), (line, repo)
    assert lines[4] == str(root / "bin" / "python")
    assert lines[5].startswith("pip ")


def spec_path_of(created) -> Path:
    return created["home"] / ".local/share/jupyter/kernels/spynnakergit/kernel.json"


def test_second_start_is_a_fast_no_op_and_keeps_user_changes(created, spynnaker_python, wheelhouse):
    root = created["root"]
    readme = root / "SpiNNUtils" / "README.md"
    readme.write_text(readme.read_text() + "\nmy own note\n")
    t0 = time.monotonic()
    kernel_env = json.loads(spec_path_of(created).read_text())["env"]
    cfg = git_config(spynnaker_python, wheelhouse, created["upstream"], kernel_env=kernel_env)
    result = gitkernel.ensure_git_kernel(created["home"], cfg, progress=None, env=created["env"])
    assert time.monotonic() - t0 < 2
    assert result.state == "done" and not result.did_work
    assert readme.read_text().endswith("my own note\n")
    assert not gitkernel.needs_setup(created["home"], cfg)
    # a changed kernel environment in the config re-registers the kernel, nothing else
    spec_path = created["home"] / ".local/share/jupyter/kernels/spynnakergit/kernel.json"
    original = json.loads(spec_path.read_text())["env"]
    own_script = root / "support" / "gitupdate.sh"
    own_script.write_text(own_script.read_text() + "# my own tweak\n")
    for kernel_env in ({"SPINNAKER_CFG_DIR": "/elsewhere"}, original):
        again = gitkernel.ensure_git_kernel(
            created["home"], cfg.replace(kernel_env=kernel_env), progress=None, env=created["env"]
        )
        assert again.did_work and json.loads(spec_path.read_text())["env"] == kernel_env
        assert "clone present, left as it is" in (root / "setup.log").read_text()
        assert readme.read_text().endswith("my own note\n")
        assert own_script.read_text().endswith("# my own tweak\n")  # the user's edit stays
        assert any("support/gitupdate.sh was edited" in w for w in again.warnings)
    # the background entry point does not even start a process
    section = config_section(spynnaker_python, wheelhouse, created["upstream"], kernel_env=kernel_env)
    assert gitkernel.start_background(created["home"], cfg, env=created["env"]) is None
    with_env = dict(created["env"], **{gitkernel.CONFIG_ENV: json.dumps(section)})
    assert gitkernel.start_background(created["home"], env=with_env) is None
    # not configured for this server: nothing is started
    assert gitkernel.start_background(created["home"], env={}) is None


def test_kernel_runs_pynn_network_in_virtual_mode(created, tmp_path, cfg_dir):
    jc_manager = pytest.importorskip("jupyter_client.manager")
    from jupyter_client.kernelspec import KernelSpecManager

    ksm = KernelSpecManager(kernel_dirs=[str(created["home"] / ".local/share/jupyter/kernels")])
    ksm.ensure_native_kernel = False
    km = jc_manager.KernelManager(kernel_name="spynnakergit", kernel_spec_manager=ksm)
    env = dict(created["env"])
    env.pop("XDG_CONFIG_DIRS", None)  # from the kernel's launcher / kernel.json only
    work = tmp_path / "notebooks"
    work.mkdir()
    km.start_kernel(cwd=str(work), env=env)
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=90)
        out: list[str] = []

        def hook(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append("\n".join(msg["content"]["traceback"]))

        code = (
            "import os, spynnaker, pyNN.spiNNaker as p\n"
            "print('SPYNNAKER', spynnaker.__file__)\n"
            "print('XDG', os.environ.get('XDG_CONFIG_DIRS'))\n"
            "p.setup(timestep=1.0)\n"
            "src = p.Population(10, p.SpikeSourceArray(spike_times=[1, 5]), label='in')\n"
            "pop = p.Population(10, p.IF_curr_exp(), label='out')\n"
            "p.Projection(src, pop, p.OneToOneConnector(), p.StaticSynapse(weight=5, delay=1))\n"
            "pop.record(['spikes', 'v'])\n"
            "p.run(50)\n"
            "segments = pop.get_data('spikes').segments\n"
            "p.end()\n"
            "print('RUN_OK', len(segments))\n"
        )
        reply = kc.execute_interactive(code, timeout=180, output_hook=hook)
        text = "".join(out)
        assert reply["content"]["status"] == "ok", text
        assert f"SPYNNAKER {created['root'] / 'sPyNNaker' / 'spynnaker'}" in text
        assert f"XDG {cfg_dir}" in text
        assert "RUN_OK 1" in text
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)


def _tiny_wheel(dest: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (module ``name``), made here so the test stays offline."""
    import base64
    import hashlib
    import zipfile

    mod = name.replace("-", "_")
    files = {
        f"{mod}.py": f"VERSION = {version!r}\n",
        f"{mod}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{mod}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{mod}-{version}.dist-info/RECORD,,")
    files[f"{mod}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    whl = dest / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return whl


def test_a_dependency_new_on_master_comes_from_the_wheelhouse(tmp_path, upstream, spynnaker_python, wheelhouse):
    """master needs something the pinned env lacks: it is installed into the user's venv
    only, from the deployment's wheelhouse (offline); the pinned env is untouched."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    for whl in wheelhouse.glob("*.whl"):
        shutil.copy(whl, house)
    _tiny_wheel(house, "spinnaker-test-extra", "1.2")
    setup_cfg = git("--git-dir", upstream / "SpiNNUtils.git", "show", "HEAD:setup.cfg")
    push_commit(
        upstream / "SpiNNUtils.git",
        tmp_path / "dev",
        "setup.cfg",
        setup_cfg.replace("\ttyping-extensions", "\ttyping-extensions\n\tspinnaker-test-extra>=1.1") + "\n",
    )
    home = tmp_path / "home"
    home.mkdir()
    messages: list[str] = []
    gitkernel.ensure_git_kernel(
        home,
        git_config(spynnaker_python, house, upstream, repos=[{"name": "SpiNNUtils"}]),
        progress=messages.append,
        env=base_env(tmp_path, home),
    )
    assert any("lacks: spinnaker-test-extra>=1.1" in m for m in messages), messages
    root = home / DIRNAME
    out = subprocess.run(
        [
            str(root / "bin" / "python"),
            "-c",
            "import spinnaker_test_extra as m, spinn_utilities as u; print(m.__file__); print(u.__file__)",
        ],
        capture_output=True,
        text=True,
        env=base_env(tmp_path, home),
    )
    site = next((root / "lib").glob("python3*/site-packages"))
    assert out.stdout.splitlines() == [
        str(site / "spinnaker_test_extra.py"),
        str(root / "SpiNNUtils" / "spinn_utilities" / "__init__.py"),
    ]
    pinned = subprocess.run([str(spynnaker_python), "-c", "import spinnaker_test_extra"], capture_output=True)
    assert pinned.returncode != 0


# --------------------------------------------------------------------------- resumption


def _git_wrapper(tmp: Path) -> Path:
    """A ``git`` that breaks the clone of $GK_BREAK_REPO: "cut" leaves a damaged partial
    clone and fails like a dropped connection; "hang" then blocks until killed."""
    d = tmp / "gitwrap"
    d.mkdir()
    (d / "git").write_text(f"""#!/bin/bash
real={GIT}
if [[ " $* " == *" clone "* && -n "${{GK_BREAK_REPO:-}}" && " $* " == *"/$GK_BREAK_REPO "* ]]; then
    "$real" "$@" || exit $?
    target="${{@: -1}}"
    rm -rf "$target/.git/objects/pack" "$target/.git/refs/heads" "$target/.git/packed-refs"
    if [ "$GK_BREAK_MODE" = hang ]; then
        touch "$GK_READY"
        exec sleep 600
    fi
    echo "fatal: the remote end hung up unexpectedly" >&2
    echo "fatal: early EOF" >&2
    exit 128
fi
exec "$real" "$@"
""")
    (d / "git").chmod(0o755)
    return d


def test_interrupted_clone_is_completed_at_next_start(tmp_path, spynnaker_python, wheelhouse, pristine_upstream):
    home = tmp_path / "home"
    home.mkdir()
    root = home / DIRNAME
    wrapper = _git_wrapper(tmp_path)
    section = config_section(spynnaker_python, wheelhouse, pristine_upstream)
    env = base_env(tmp_path, home)
    env["PYTHONPATH"] = str(REPO / "extensions")
    ready = tmp_path / "clone-started"
    broken_env = dict(
        env,
        PATH=f"{wrapper}{os.pathsep}{env['PATH']}",
        GK_BREAK_REPO="SpiNNMan",
        GK_BREAK_MODE="hang",
        GK_READY=str(ready),
    )

    # 1. the server starts the set-up in the background; the server stops mid-clone
    t0 = time.monotonic()
    proc = gitkernel.start_background(home, gitkernel.GitKernelConfig.from_section(section), env=broken_env)
    assert proc is not None and time.monotonic() - t0 < 2  # never blocks the server start
    try:
        wait_for(ready.exists, 120, "the clone of SpiNNMan to start")
        assert gitkernel.read_status(home, DIRNAME)["state"] == "running"
        # 2. a second start meanwhile does not race: it reports the running set-up
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "spinnaker_jupyter_ext.gitkernel",
                "--home",
                str(home),
                "--config-json",
                json.dumps(section),
                "--wait",
                "0",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert second.returncode == gitkernel.EXIT_BUSY, second.stderr
        assert "another sPyNNakerGit set-up is running" in second.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started
        proc.wait(timeout=30)
    status = gitkernel.read_status(home, DIRNAME)
    assert status["state"] == "interrupted" and status["step"] == "clone"
    assert (root / f"{gitkernel.PARTIAL_PREFIX}SpiNNMan").is_dir()
    assert not (root / "SpiNNMan").exists()
    assert (root / "SpiNNMachine" / ".git").is_dir()
    assert not (home / ".local/share/jupyter/kernels/spynnakergit").exists()
    assert gitkernel.needs_setup(home, gitkernel.GitKernelConfig.from_section(section))
    machine_head = git("rev-parse", "HEAD", cwd=root / "SpiNNMachine")

    # 3. next start, the network drops during the same clone: a clear error, nothing broken
    messages: list[str] = []
    cut_env = dict(broken_env, GK_BREAK_MODE="cut")
    with pytest.raises(gitkernel.SetupError, match=r"SpiNNMan: git clone .*early EOF"):
        gitkernel.ensure_git_kernel(
            home, git_config(spynnaker_python, wheelhouse, pristine_upstream), progress=messages.append, env=cut_env
        )
    assert any("removing an interrupted clone" in m for m in messages)
    assert gitkernel.read_status(home, DIRNAME)["state"] == "failed"
    assert "early EOF" in gitkernel.read_status(home, DIRNAME)["error"]
    assert not (root / "SpiNNMan").exists()

    # 4. the start after that completes the set-up (CLI, as run in the background)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "spinnaker_jupyter_ext.gitkernel",
            "--home",
            str(home),
            "--config-json",
            json.dumps(section),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SpiNNMachine: clone present, left as it is" in done.stdout
    status = gitkernel.read_status(home, DIRNAME)
    assert status["state"] == "done", status
    for repo in ALL_REPOS:
        clone = root / repo["name"]
        git("fsck", "--no-progress", cwd=clone)
        assert git("rev-parse", "HEAD", cwd=clone) == git(
            "--git-dir", pristine_upstream / f"{repo['name']}.git", "rev-parse", "HEAD"
        )
    assert git("rev-parse", "HEAD", cwd=root / "SpiNNMachine") == machine_head
    assert not list(root.glob(gitkernel.PARTIAL_PREFIX + "*"))
    assert (home / ".local/share/jupyter/kernels/spynnakergit/kernel.json").is_file()
    imported = subprocess.run(
        [str(root / "bin" / "python"), "-c", "import spinnman; print(spinnman.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert imported.stdout.startswith(str(root / "SpiNNMan")), imported.stderr


def test_set_ups_of_one_deployment_take_turns(tmp_path, spynnaker_python, wheelhouse, pristine_upstream):
    """A room logs in at once: with one set-up slot (git_kernel.concurrency: 1, the hub's slot files), set-ups wait
    for their turn, say so in their status, and each starts its work only once the one before it has finished."""
    import fcntl

    folder = tmp_path / "slots"
    folder.mkdir(mode=0o755)
    (folder / "slot-0").touch(mode=0o644)
    section = dict(
        config_section(spynnaker_python, wheelhouse, pristine_upstream, repos=[{"name": C_REPO, "python": False}]),
        slots_dir=str(folder),
    )
    held = os.open(folder / "slot-0", os.O_RDONLY)  # a set-up of another user is running
    fcntl.flock(held, fcntl.LOCK_EX)
    homes, procs = [tmp_path / "home-a", tmp_path / "home-b"], []
    try:
        for home in homes:
            home.mkdir()
            env = dict(base_env(tmp_path, home), PYTHONPATH=str(REPO / "extensions"))
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "spinnaker_jupyter_ext.gitkernel",
                        "--home",
                        str(home),
                        "--config-json",
                        json.dumps(section),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                )
            )
        wait_for(
            lambda: all(gitkernel.read_status(h, DIRNAME).get("step") == "queue" for h in homes),
            120,
            "both set-ups to wait for a turn",
        )
        assert (
            "waiting for a turn: 1 first set-up of ~/sPyNNakerGit run at a time"
            in gitkernel.read_status(homes[0], DIRNAME)["message"]
        )
        os.close(held)  # that one has finished: these two go one after the other
        outs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0], outs
    begun, finished = [], []
    for home in homes:
        log = (home / DIRNAME / "setup.log").read_text().splitlines()
        begun.append(next(line[1:26] for line in log if "] setting up ~/" in line))
        finished.append(gitkernel.read_status(home, DIRNAME)["finished"])
    first, second = sorted(range(2), key=lambda i: begun[i])
    assert finished[first] <= begun[second], (begun, finished)


# --------------------------------------------------------------------------- gitupdate


@pytest.fixture
def small(tmp_path, upstream, spynnaker_python, wheelhouse):
    """A user environment of three clones (only the clones matter to the scripts, so the
    Python ones are not installed here)."""
    home = tmp_path / "home"
    home.mkdir()
    env = base_env(tmp_path, home)
    repos = [
        {"name": "SpiNNUtils", "python": False},
        {"name": "SpiNNMachine", "python": False},
        {"name": C_REPO, "python": False},
    ]
    gitkernel.ensure_git_kernel(
        home, git_config(spynnaker_python, wheelhouse, upstream, repos=repos), progress=None, env=env
    )
    root = home / DIRNAME
    return dict(home=home, root=root, env=env, upstream=upstream, work=tmp_path / "dev")


def gitupdate(small, *args):
    proc = subprocess.run(
        ["bash", str(small["root"] / "support" / "gitupdate.sh"), *args],
        capture_output=True,
        text=True,
        env=small["env"],
        timeout=120,
        cwd=small["home"],
    )
    lines = {}
    for line in proc.stdout.splitlines():
        name, _, rest = line.partition(" ")
        lines[name] = rest.strip()
    return proc, lines


def test_gitupdate_fast_forwards_and_never_loses_local_work(small):
    root, up, work = small["root"], small["upstream"], small["work"]
    old = {n: git("rev-parse", "--short", "HEAD", cwd=root / n) for n in ("SpiNNUtils", "SpiNNMachine", C_REPO)}
    new_utils = push_commit(up / "SpiNNUtils.git", work / "u", "NEWS.md", "utils news\n")
    new_machine = push_commit(up / "SpiNNMachine.git", work / "m", "README.md", "upstream text\n")
    new_c = push_commit(up / f"{C_REPO}.git", work / "c", "lib/NOTES", "c news\n", branch="main")
    # the user's own uncommitted change to a file that upstream changed too
    readme = root / "SpiNNMachine" / "README.md"
    readme.write_text("MY OWN EDIT\n")

    proc, lines = gitupdate(small)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # one line per repository, then the summary
    assert proc.stdout.splitlines()[-2].startswith("gitupdate: 2 updated, 0 up to date, 1 NOT")
    assert lines["SpiNNUtils"] == (f"master {old['SpiNNUtils']} -> {new_utils[:7]} (1 new commit(s))")
    assert lines[C_REPO].startswith(f"main {old[C_REPO]} -> {new_c[:7]}")
    assert lines["SpiNNMachine"].startswith("NOT UPDATED: uncommitted changes on master")
    assert readme.read_text() == "MY OWN EDIT\n"  # reported, not lost
    assert git("rev-parse", "--short", "HEAD", cwd=root / "SpiNNMachine") == old["SpiNNMachine"]
    assert git("rev-parse", "origin/master", cwd=root / "SpiNNMachine") == new_machine  # fetched
    assert (root / "SpiNNUtils" / "NEWS.md").read_text() == "utils news\n"

    # a local commit, and upstream moves on: diverged, reported, the user's commit stays
    (root / "SpiNNUtils" / "mine.txt").write_text("mine\n")
    git("add", "mine.txt", cwd=root / "SpiNNUtils")
    git("commit", "--quiet", "-m", "my work", cwd=root / "SpiNNUtils")
    mine = git("rev-parse", "HEAD", cwd=root / "SpiNNUtils")
    push_commit(up / "SpiNNUtils.git", work / "u", "NEWS.md", "more news\n")
    proc, lines = gitupdate(small)
    assert proc.returncode == 1
    assert lines["SpiNNUtils"].startswith("NOT UPDATED: master") and "(diverged)" in lines["SpiNNUtils"]
    assert git("rev-parse", "HEAD", cwd=root / "SpiNNUtils") == mine
    assert lines[C_REPO].startswith("main ") and lines[C_REPO].endswith("up to date")

    # the user drops their edit: once clean, SpiNNMachine updates; a packaging change is flagged
    git("checkout", "--quiet", "--", "README.md", cwd=root / "SpiNNMachine")
    pyproject = (root / "SpiNNMachine" / "pyproject.toml").read_text()
    newer = push_commit(up / "SpiNNMachine.git", work / "m", "pyproject.toml", pyproject + "\n")
    proc, lines = gitupdate(small)
    assert lines["SpiNNMachine"].startswith(
        f"master {old['SpiNNMachine']} -> {newer[:7]} (2 new commit(s)); its packaging changed: "
        f"reinstall with 'pip install -e {root / 'SpiNNMachine'}'"
    )


def test_gitupdate_switches_branch_and_back(small):
    root, up, work = small["root"], small["upstream"], small["work"]
    feature = push_commit(
        up / "SpiNNUtils.git", work / "u", "feature.txt", "feature\n", branch="new_feature", new_branch=True
    )
    proc, lines = gitupdate(small, "new_feature")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines["SpiNNUtils"].startswith("switched master -> new_feature, at ")
    assert git("rev-parse", "HEAD", cwd=root / "SpiNNUtils") == feature
    assert git("symbolic-ref", "--short", "HEAD", cwd=root / "SpiNNUtils") == "new_feature"
    assert lines["SpiNNMachine"].endswith("up to date (no branch new_feature on origin)")
    assert lines[C_REPO].startswith("main ")

    # upstream moves the branch on: a plain fast-forward on the branch
    feature2 = push_commit(up / "SpiNNUtils.git", work / "u", "feature.txt", "feature 2\n", branch="new_feature")
    proc, lines = gitupdate(small, "new_feature")
    assert lines["SpiNNUtils"].startswith(f"new_feature {feature[:7]} -> {feature2[:7]}")

    proc, lines = gitupdate(small)  # back to master
    assert proc.returncode == 0
    assert lines["SpiNNUtils"].startswith("switched new_feature -> master")
    assert git("symbolic-ref", "--short", "HEAD", cwd=root / "SpiNNUtils") == "master"
    assert not (root / "SpiNNUtils" / "feature.txt").exists()

    bad, _ = gitupdate(small, "no..good")
    assert bad.returncode == 2 and "not a valid branch name" in bad.stderr


# --------------------------------------------------------------------------- automatic_make


def test_automatic_make_builds_in_order_and_names_the_failure(small, gcc_shim):
    root = small["root"]
    env = dict(small["env"], GP="testarm", PATH=f"{gcc_shim}{os.pathsep}{small['env']['PATH']}")
    script = str(root / "support" / "automatic_make.sh")

    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.index(f"building {C_REPO}/lib") < out.index(f"building {C_REPO}/app")
    assert "skip spinnaker_tools" not in out  # only what make_order.txt lists
    assert "built 2 directories with testarm-gcc" in out
    run = subprocess.run([str(root / C_REPO / "app" / "app")], capture_output=True, text=True)
    assert run.stdout == "demo 5\n"

    # a compile error: stops there, naming the directory and the compiler's message
    main_c = root / C_REPO / "app" / "main.c"
    main_c.write_text(main_c.read_text().replace("return 0;", "return 0"))
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert f"automatic_make: FAILED in {C_REPO}/app ('make all' exited" in proc.stderr
    assert "main.c" in proc.stderr and "error:" in proc.stderr
    assert f"full log: {root}/support/logs/make-{C_REPO}_app.log" in proc.stderr

    # no cross compiler: a clear message before anything is built
    no_cc = dict(env, GP="nosuch-arm")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=no_cc, timeout=60)
    assert proc.returncode == 2
    assert "the compiler 'nosuch-arm-gcc' was not found" in proc.stderr
    assert "gcc-arm-none-eabi" in proc.stderr

    # no order of its own: without make_order.txt it says where the shipped one is, and builds nothing
    (root / "support" / gitkernel.MAKE_ORDER_FILE).unlink()
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "building" not in proc.stdout
    assert "support/make_order.txt is missing" in proc.stderr and "The shipped order" in proc.stderr


def test_first_login_through_the_hub_brings_the_git_kernel(hub_factory, pristine_upstream, wheelhouse):
    """The deployment's `git_kernel` section reaches a user's first server start: ~/sPyNNakerGit is set up in the
    background (the server is ready long before), the kernel appears, and it runs PyNN from the clones."""
    from conftest import traversable_tmpdir

    mirror = traversable_tmpdir("mirror-")
    shutil.copytree(pristine_upstream, mirror, symlinks=True, dirs_exist_ok=True)
    subprocess.run(["chmod", "-R", "a+rX", str(mirror), str(wheelhouse)], check=True)
    hub = hub_factory(
        {
            "git_kernel": {
                "enabled": True,
                "base_url": f"file://{mirror}",
                "repos": ALL_REPOS,
                "offline": True,
                "wheelhouse": str(wheelhouse),
                "build_c": "never",
            }
        }
    )
    user = hub.client("gitfan", hub.add_user("gitfan"))
    user.start_server()

    def kernel_listed():
        status = user.server("GET", "api/contents/sPyNNakerGit/setup-status.json")
        if status.status_code == 200 and '"failed"' in status.json()["content"]:
            raise AssertionError(f"set-up failed: {status.json()['content']}")
        specs = user.server("GET", "api/kernelspecs").json()["kernelspecs"]
        return specs.get("spynnakergit")

    try:
        spec = wait_for(kernel_listed, 240, "the sPyNNakerGit kernel to be set up", interval=1)
    except BaseException:
        log = user.server("GET", "api/contents/sPyNNakerGit/setup.log")
        print("setup.log:", log.json().get("content", log.text)[-3000:] if log.status_code == 200 else log.text)
        raise
    assert spec["spec"]["display_name"] == "sPyNNakerGit"
    log = user.server("GET", "api/contents/sPyNNakerGit/setup.log").json()["content"]
    assert "sPyNNaker" in log
    kernel = user.start_kernel("spynnakergit")
    out = user.execute(
        kernel,
        "import spynnaker, pyNN.spiNNaker as p\nprint('FROM', spynnaker.__file__)\n"
        "p.setup(1.0); p.Population(5, p.IF_curr_exp()); p.run(10); p.end(); print('RAN')",
    )
    assert out["error"] is None and "RAN" in out["stdout"], out
    assert "/sPyNNakerGit/sPyNNaker/spynnaker/" in out["stdout"], out
    listing = user.server("GET", "api/contents/sPyNNakerGit/support").json()["content"]
    assert {"gitupdate.sh", "automatic_make.sh"} <= {f["name"] for f in listing}
    # the deployment set no make_order: the user's is the one shipped order
    order = user.server("GET", "api/contents/sPyNNakerGit/support/make_order.txt").json()["content"]
    shipped = gitkernel.read_make_order(REPO / "kernels" / "spynnaker-git" / "support" / gitkernel.MAKE_ORDER_FILE)
    assert [line for line in order.splitlines() if not line.startswith("#")] == [s.line() for s in shipped]
