"""Measure what users wait for, on this machine, against a real hub.

  login -> JupyterLab ready   (median of N fresh users: login form, spawn, until /user/NAME/lab answers 200)
  kernel start -> `import pyNN.spiNNaker` done
  --fresh: the first set-up on a clean clone (hub environment, proxy, sPyNNaker kernel environment), without
           the machine's pip cache

Run: `make bench` or `.venv/bin/python benchmarks/bench_hub.py [--users 10] [--fresh]`. Prints a table and writes
benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import ENVS, RunningHub, traversable_tmpdir  # noqa: E402
from hubclient import wait_for  # noqa: E402


def bench_login_to_lab(hub: RunningHub, users: int) -> dict:
    times, spawn_logged = [], []
    for i in range(users):
        name = f"bench{i}x{int(time.time()) % 10000}"
        password = hub.add_user(name)
        t0 = time.monotonic()
        user = hub.client(name, password)  # login form + token
        r = user.session.get(f"{hub.url}/hub/spawn/{name}", allow_redirects=False, timeout=30)
        assert r.status_code == 302, r.status_code

        def lab_ready():
            page = user.browse("lab")
            return page.status_code == 200 and "JupyterLab" in page.text

        wait_for(lab_ready, 120, "JupyterLab", interval=0.05)
        times.append(time.monotonic() - t0)
        user.stop_server()
    for line in hub.log().splitlines():
        if "took" in line and "seconds to start" in line:
            spawn_logged.append(float(line.split("took")[1].split("seconds")[0]))
    return {
        "login_to_lab_s": {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)},
        "hub_reported_spawn_s": {"median": statistics.median(spawn_logged) if spawn_logged else None},
    }


def bench_kernel(hub: RunningHub) -> dict:
    name = f"benchk{int(time.time()) % 10000}"
    user = hub.client(name, hub.add_user(name))
    user.start_server()
    results = []
    for _ in range(3):
        t0 = time.monotonic()
        kernel = user.start_kernel("spynnaker")
        out = user.execute(kernel, "import pyNN.spiNNaker as p\nprint('ok')")
        assert "ok" in out["stdout"], out
        results.append(time.monotonic() - t0)
        user.server("DELETE", f"api/kernels/{kernel}")
    user.stop_server()
    return {"kernel_start_to_pynn_import_s": {"median": statistics.median(results), "runs": results}}


def bench_fresh_setup() -> dict:
    """Clone the repository and time its own set-up steps with an empty pip cache."""
    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {"PIP_NO_CACHE_DIR": "1", "PATH": "/usr/local/bin:/usr/bin:/bin"}
        for label, cmd in (
            ("hub environment + proxy (make setup)", ["make", "-s", "setup"]),
            ("sPyNNaker kernel environment (spinnaker-jupyter build)", [".venv/bin/spinnaker-jupyter", "build"]),
        ):
            t0 = time.monotonic()
            subprocess.run(cmd, cwd=clone, check=True, env=env, stdout=subprocess.DEVNULL)
            steps[label] = round(time.monotonic() - t0, 1)
    steps["total"] = round(sum(steps.values()), 1)
    return {"fresh_setup_s": steps}


def remove_accounts(hub: RunningHub) -> int:
    """Remove the system accounts of a stopped hub's users (their homes are under its folder): benchmarks make new
    users at every run, and accounts left behind pile up (thousands after a day of runs), slowing every later
    reading of the machine's accounts. Returns how many."""
    import pwd

    base = str(hub.base) + "/"
    mine = [pw.pw_name for pw in pwd.getpwall() if pw.pw_dir.startswith(base) and pw.pw_uid != 0]
    for account in mine:
        subprocess.run(["userdel", account], capture_output=True)  # (its group goes with it)
    return len(mine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--fresh", action="store_true", help="also time the first set-up on a clean clone")
    ap.add_argument("--no-stock", action="store_true", help="skip the comparison with stock readiness polling")
    args = ap.parse_args()
    results = {}
    if args.fresh:
        results.update(bench_fresh_setup())
    hub = RunningHub(traversable_tmpdir("bench-"), {"git_kernel": {"enabled": False}}, ENVS).start()
    try:
        results.update(bench_login_to_lab(hub, args.users))
        results.update(bench_kernel(hub))
    finally:
        hub.stop()
        remove_accounts(hub)
    if not args.no_stock:
        # The same hub with JupyterHub's own readiness polling only (exponential back-off, up to 5 s).
        base = traversable_tmpdir("bench-stock-")
        (base / "jupyterhub_config.d").mkdir()
        (base / "jupyterhub_config.d" / "stock.py").write_text("c.PrivateHomeSpawner.fast_ready_check = False\n")
        stock = RunningHub(base, {"git_kernel": {"enabled": False}}, ENVS).start()
        try:
            results["stock_readiness_polling"] = bench_login_to_lab(stock, args.users)
        finally:
            stock.stop()
            remove_accounts(stock)
    print(json.dumps(results, indent=1))
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
