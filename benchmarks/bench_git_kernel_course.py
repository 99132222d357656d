"""A course's first login with the git kernel on: N new users (default 30) start their servers at the same moment
through the hub's REST API, every one's ~/sPyNNakerGit is set up from local mirrors and a shared wheelhouse (the
`git_kernel` options a course deployment uses), and the same N start with `git_kernel` off in the same run.

  ready: first / median / last (seconds from the moment all N start requests were sent), git kernel off and on:
         the set-ups must not delay "ready";
  set-ups: how many finished "done" (and how many failed, with their errors), first / median / last completion
         (same clock), the CPU floor N x (CPU-s of one set-up) / cores and the last one over it;
  CPU-s of one set-up: the same set-up alone (`python -m spinnaker_jupyter_ext.gitkernel`, children included), median
         of --cpu-runs.

The mirrors are bare repositories made from the PyPI sdists of the SpiNNaker packages plus a small C repository, as
in tests/integration/test_git_kernel.py (sdists cached under .cache/gitkernel/). Run as root (one system account per user, as in
production): `.venv/bin/python benchmarks/bench_git_kernel_course.py [--users 30] [--setup-concurrency 0 default]
[--concurrency N] [--cpu-runs 2]` (one git-kernel run per --setup-concurrency value, after the run without it).
Prints a table and writes benchmarks/results-git-kernel-course.json; the machine's load (`uptime`) is recorded before
and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))  # test_git_kernel: its mirrors and wheelhouse
sys.path.insert(0, str(ROOT / "benchmarks"))

import test_git_kernel as tgk  # noqa: E402  (the mirrors, repositories and wheelhouse of the git kernel tests)
from bench_hub import remove_accounts  # noqa: E402
from conftest import ENVS, RunningHub, traversable_tmpdir  # noqa: E402

CORES = len(os.sched_getaffinity(0))
DIRNAME = "sPyNNakerGit"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


# -- the local mirrors and the wheelhouse -------------------------------------------------------------------------
def sdists() -> dict[str, Path]:
    d = tgk.CACHE / "sdists"
    d.mkdir(parents=True, exist_ok=True)
    found = {
        p.name[: -len(".tar.gz")].rsplit("-", 1)[0].replace("-", "_").replace(".", "_").lower(): p
        for p in d.glob("*.tar.gz")
    }
    paths = {repo: found.get(dist.replace("-", "_").lower()) for repo, dist in tgk.SDISTS.items()}
    if not all(paths.values()):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--dest",
                str(d),
                *[f"{dist}=={tgk.VERSION}" for dist in tgk.SDISTS.values()],
            ],
            check=True,
        )
        return sdists()
    return paths


def wheelhouse(dest: Path) -> Path:
    src = tgk.CACHE / "wheelhouse"
    src.mkdir(parents=True, exist_ok=True)
    if not list(src.glob("wheel-*.whl")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--only-binary",
                ":all:",
                "--no-deps",
                "--dest",
                str(src),
                *tgk.WHEELHOUSE_REQS,
            ],
            check=True,
        )
    shutil.copytree(src, dest)
    return dest


def mirrors(dest: Path) -> Path:
    """Bare repositories <Name>.git, as the operator's local mirror of SpiNNakerManchester."""
    work = dest.parent / "mirror-src"
    env = {**tgk._git_env(), "GIT_AUTHOR_DATE": "2025-01-01T12:00:00Z", "GIT_COMMITTER_DATE": "2025-01-01T12:00:00Z"}
    for name, sdist in [*sdists().items(), (tgk.C_REPO, None)]:
        src = work / name
        if sdist is None:
            tgk._make_c_repo(src)
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
        tgk.git("init", "--quiet", "-b", "main" if sdist is None else "master", src)
        tgk.git("add", "-A", cwd=src)
        subprocess.run(
            [
                tgk.GIT,
                "-c",
                "user.name=Upstream Dev",
                "-c",
                "user.email=dev@example.org",
                "commit",
                "--quiet",
                "-m",
                name,
            ],
            cwd=src,
            check=True,
            env=env,
            capture_output=True,
        )
        tgk.git("clone", "--quiet", "--bare", src, dest / f"{name}.git")
    shutil.rmtree(work)
    return dest


def git_kernel_section(mirror: Path, house: Path, concurrency: int | None) -> dict:
    return {
        "enabled": True,
        "base_url": f"file://{mirror}",
        "repos": tgk.ALL_REPOS,
        "offline": True,
        "wheelhouse": str(house),
        "build_c": "never",
        "concurrency": concurrency,
    }


# -- one set-up alone: its CPU-seconds ------------------------------------------------------------------------------
def cpu_per_setup(section: dict, base: Path, runs: int) -> dict:
    from spinnaker_jupyter import config
    from spinnaker_jupyter.schema import defaults

    values = config.merge(defaults(), {"git_kernel": section})
    config.validate(values)
    full = dict(values["git_kernel"], base_env=str(ENVS / "spynnaker"))
    cpu, wall = [], []
    for i in range(runs):
        home = base / f"alone{i}"
        home.mkdir()
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "LC_ALL": "C",
            "PYTHONPATH": str(ROOT / "extensions"),
            "GIT_CONFIG_NOSYSTEM": "1",
        }
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "spinnaker_jupyter_ext.gitkernel",
                "--home",
                str(home),
                "--config-json",
                json.dumps(full),
                "--quiet",
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        wall.append(time.monotonic() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"the set-up alone failed: {proc.stderr[-2000:]}")
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return {"cpu_s": statistics.median(cpu), "cpu_runs": cpu, "wall_s": statistics.median(wall)}


# -- N first logins at once ------------------------------------------------------------------------------------------
def course(hub: RunningHub, token: str, names: list[str], with_setups: bool, timeout: float) -> dict:
    headers = {"Authorization": f"token {token}"}
    api = f"{hub.url}/hub/api"
    r = requests.post(f"{api}/users", json={"usernames": names}, headers=headers, timeout=60)
    assert r.status_code in (201, 409), r.text
    codes: dict[str, int] = {}

    def request(name):
        try:
            codes[name] = requests.post(f"{api}/users/{name}/server", headers=headers, timeout=120).status_code
        except requests.RequestException:
            codes[name] = -1

    homes = {n: Path(hub.config["data_dir"]) / "homes" / n for n in names}
    t0 = time.monotonic()
    threads = [threading.Thread(target=request, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    ready: dict[str, float] = {}
    failed: set[str] = set()
    setups: dict[str, tuple[float, dict]] = {}
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        servers_done = len(ready) + len(failed) == len(names)
        if servers_done and (not with_setups or len(setups) + len(failed) == len(names)):
            break
        if not servers_done:
            try:
                users = requests.get(f"{api}/users", headers=headers, timeout=30, params={"limit": 1000}).json()
            except requests.RequestException:
                users = []
            now = time.monotonic() - t0
            for u in users:
                if u["name"] not in names or u["name"] in ready:
                    continue
                server = u.get("servers", {}).get("")
                if server and server.get("ready"):
                    ready[u["name"]] = now
                elif not server and u["name"] in codes and u["name"] not in failed:
                    failed.add(u["name"])
        if with_setups:
            now = time.monotonic() - t0
            for name, home in homes.items():
                if name in setups:
                    continue
                try:
                    status = json.loads((home / DIRNAME / "setup-status.json").read_text())
                except (OSError, ValueError):
                    continue
                if status.get("state") in ("done", "failed"):
                    setups[name] = (now, status)
        time.sleep(0.25)
    for t in threads:
        t.join(5)
    for name in names:
        requests.delete(f"{api}/users/{name}/server", headers=headers, timeout=60)
    times = sorted(ready.values())
    out = {
        "n": len(names),
        "ready": len(times),
        "failed": len(names) - len(times),
        "refused_429": sum(1 for c in codes.values() if c == 429),
    }
    if times:
        out.update(first=times[0], median=statistics.median(times), p95=pct(times, 0.95), last=times[-1])
    if with_setups:
        done = sorted(t for t, s in setups.values() if s["state"] == "done")
        out["setups"] = {
            "done": len(done),
            "failed": sum(1 for _, s in setups.values() if s["state"] == "failed"),
            "unfinished": len(names) - len(setups),
            "errors": sorted({str(s.get("error")) for _, s in setups.values() if s["state"] == "failed"}),
        }
        if done:
            out["setups"].update(first=done[0], median=statistics.median(done), last=done[-1])
    return out


def bound(text: str) -> int | None:
    return None if text == "default" else int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=30)
    ap.add_argument("--concurrency", type=int, help="spawner.start_queue.concurrency (default: the hub's default)")
    ap.add_argument(
        "--setup-concurrency",
        type=bound,
        nargs="+",
        default=[None],
        metavar="N|default",
        help="git_kernel.concurrency of each git-kernel run, in order (default: the hub's default; "
        "0: no bound); e.g. `0 default` compares no bound with the default in one run",
    )
    ap.add_argument("--cpu-runs", type=int, default=2, help="set-ups alone for the CPU-s figure (default 2)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the set-ups (default 1800)")
    args = ap.parse_args()
    base = traversable_tmpdir("bench-gitkernel-")
    mirror, house = mirrors(base / "mirror"), wheelhouse(base / "wheelhouse")
    subprocess.run(["chmod", "-R", "a+rX", str(mirror), str(house)], check=True)
    results = {
        "cores": CORES,
        "users": args.users,
        "load_before": load(),
        "concurrency": args.concurrency,
        "runs": [{"git_kernel": "off"}],
    }
    results["cpu_alone"] = cpu_per_setup(git_kernel_section(mirror, house, None), base, args.cpu_runs)
    results["floor_s"] = args.users * results["cpu_alone"]["cpu_s"] / CORES
    results["runs"] += [{"git_kernel": git_kernel_section(mirror, house, b)} for b in args.setup_concurrency]
    for i, run in enumerate(results["runs"]):
        with_setups = run["git_kernel"] != "off"
        overrides = {"git_kernel": run["git_kernel"] if with_setups else {"enabled": False}}
        if args.concurrency:
            overrides["spawner"] = {"start_queue": {"concurrency": args.concurrency}}
        run["load_before"] = load()
        hub = RunningHub(traversable_tmpdir(f"bench-gk-{i}-"), overrides, ENVS).start()
        try:
            admin = hub.client("benchadmin", hub.add_user("benchadmin", admin=True))
            tag = secrets.token_hex(2)
            run.update(
                course(hub, admin.token, [f"g{i}{tag}{j:02d}" for j in range(args.users)], with_setups, args.timeout)
            )
        finally:
            hub.stop(final=True)
            remove_accounts(hub)
        run["load_after"] = load()
        if "last" in run.get("setups", {}):
            run["setups"]["last_over_floor"] = run["setups"]["last"] / results["floor_s"]
    results["load_after"] = load()
    shutil.rmtree(base, ignore_errors=True)
    print(table(results))
    (ROOT / "benchmarks" / "results-git-kernel-course.json").write_text(json.dumps(results, indent=1) + "\n")


def table(r: dict) -> str:
    rows = [
        f"{r['users']} first logins at once, {r['cores']} cores; load {r['load_before']} -> {r['load_after']}",
        "| git kernel | load before | ready | failed | first | median | p95 | last | set-ups done / failed | "
        "set-up completed first / median / last | last over floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for run in r["runs"]:
        git = run["git_kernel"]
        limit = None if git == "off" else git["concurrency"]
        name = "off" if git == "off" else f"on, concurrency {'default' if limit is None else limit}"
        cells = [f"{run[k]:.1f} s" for k in ("first", "median", "p95", "last")] if "median" in run else [""] * 4
        s = run.get("setups", {})
        done = (
            f"{s['done']} / {s['failed']}" + (f" ({s['unfinished']} unfinished)" if s.get("unfinished") else "")
            if s
            else ""
        )
        times = f"{s['first']:.0f} / {s['median']:.0f} / {s['last']:.0f} s" if "last" in s else ""
        over = f"{s['last_over_floor']:.2f}" if "last_over_floor" in s else ""
        rows.append(
            f"| {name} | {run['load_before']} | {run['ready']} | {run['failed']} | "
            + " | ".join(cells)
            + f" | {done} | {times} | {over} |"
        )
        if s.get("errors"):
            rows.append(f"errors: {s['errors']}")
    rows.append(
        f"CPU-s per set-up (alone): {r['cpu_alone']['cpu_s']:.1f} (wall {r['cpu_alone']['wall_s']:.1f} s); "
        f"floor (users x CPU-s / cores) {r['floor_s']:.1f} s"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
