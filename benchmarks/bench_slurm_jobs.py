"""What Slurm adds to each batch job: the same trivial job (`print(1)`) submitted N times, one after the other, to a
job service with the `local` executor and to one with the `slurm` executor (the one-node Slurm of
tests/slurm_fixtures.py), submit -> finished as the user sees it through the API; the overhead is the difference of
the medians. Also the part of it spent before Slurm ran the job (sbatch -> RUNNING, from the job's log).

Run: `.venv/bin/python benchmarks/bench_slurm_jobs.py [--jobs 10]` (as root). Prints JSON and writes
benchmarks/results-slurm-jobs.json. A measurement, not a check; the load (`uptime`) is recorded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_course import load  # noqa: E402
from conftest import ENVS, RunningHub, free_port, traversable_tmpdir  # noqa: E402
from hubclient import wait_for  # noqa: E402
from slurm_fixtures import start_slurm  # noqa: E402


def run_jobs(overrides: dict, n: int) -> dict:
    port = free_port()
    overrides = {**overrides, "jobs": {"enabled": True, "port": port, "concurrency": 1, **overrides.get("jobs", {})}}
    hub = RunningHub(traversable_tmpdir("bench-slurm-jobs-"), overrides, ENVS).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ok(url), 60, "the job service")
        user = hub.client("benchjob", hub.add_user("benchjob"))
        h = {"Authorization": f"Bearer {user.token}"}
        body = {"code": "print(1)", "collab": "private-benchjob", "hardware_platform": "SpiNNaker"}
        ends = []
        for _ in range(n + 1):  # the first one warms up (account, caches): not counted
            t0 = time.time()
            r = requests.post(url + "/jobs/", json=body, headers=h, timeout=30)
            r.raise_for_status()
            i = r.json()["id"]
            wait_for(lambda i=i: _get(url, h, i)["status"] in ("finished", "error"), 120, "the job", interval=0.01)
            ends.append(time.time() - t0)
            job = _get(url, h, i, log=True)
            assert job["status"] == "finished", job["log"]
        ends = ends[1:]
        return {
            "jobs": n,
            "submit_to_finished_s": {
                "median": round(statistics.median(ends), 3),
                "min": round(min(ends), 3),
                "max": round(max(ends), 3),
            },
        }
    finally:
        hub.stop(final=True)
        shutil.rmtree(hub.base, ignore_errors=True)


def _get(url, h, i, log=False):
    return requests.get(f"{url}/jobs/{i}" + ("?with_log=true" if log else ""), headers=h, timeout=30).json()


def _ok(url):
    try:
        return requests.get(url + "/", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10)
    args = ap.parse_args()
    slurm = start_slurm()
    try:
        before = load()
        common = {"spawner": {"local": {"system_user_prefix": "benchjob-"}}, "git_kernel": {"enabled": False}}
        local = run_jobs(common, args.jobs)
        on_slurm = run_jobs(
            {
                **common,
                "spawner": {**common["spawner"], "slurm": {"conf": str(slurm.conf), "partition": slurm.partition}},
                "jobs": {"executor": "slurm", "limits": {"memory_mb": 1024}},
            },
            args.jobs,
        )
        out = {
            "local": local,
            "slurm": on_slurm,
            "slurm_overhead_per_job_s": round(
                on_slurm["submit_to_finished_s"]["median"] - local["submit_to_finished_s"]["median"], 3
            ),
            "load_before": before,
            "load_after": load(),
        }
        print(json.dumps(out, indent=1))
        (ROOT / "benchmarks" / "results-slurm-jobs.json").write_text(json.dumps(out, indent=1) + "\n")
    finally:
        slurm.shutdown()


if __name__ == "__main__":
    main()
