"""Measure the batch job service against a real hub (jobs.enabled, local executor, virtual board):

  submit -> running on an idle service      (median and max of N single jobs; target < 1 s)
  runner overhead                           (submit -> finished of `print(1)`, minus running it directly; < 2 s)
  100 trivial jobs, concurrency 2           (throughput in jobs/s, p95 wait from submission to start)
  memory of the idle service                (RSS of the service process)

Run: `.venv/bin/python benchmarks/bench_jobs.py [--jobs 100]` (as root, like the tests). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import ENVS, RunningHub, free_port, traversable_tmpdir  # noqa: E402
from hubclient import wait_for  # noqa: E402


def service_rss_kib(hub) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"spinnaker_jupyter.jobs.service" in (entry / "cmdline").read_bytes():
                    status = (entry / "status").read_text()
                    ppid = int(status.split("PPid:")[1].split()[0])
                    if ppid == hub.proc.pid:
                        return int(status.split("VmRSS:")[1].split()[0])
            except (OSError, IndexError):
                continue
    return -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--single", type=int, default=10)
    args = ap.parse_args()
    port = free_port()
    hub = RunningHub(
        traversable_tmpdir("bench-jobs-"), {"jobs": {"enabled": True, "port": port, "concurrency": 2}}, ENVS
    )
    hub.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ok(url), 60, "the job service")
        user = hub.client("bench", hub.add_user("bench"))
        h = {"Authorization": f"Bearer {user.token}"}
        job = {"code": "print(1)", "collab": "private-bench", "hardware_platform": "SpiNNaker"}

        def submit() -> tuple[int, float]:
            t = time.time()
            r = requests.post(url + "/jobs/", json=job, headers=h, timeout=30)
            r.raise_for_status()
            return r.json()["id"], t

        def get(i):
            return requests.get(f"{url}/jobs/{i}", headers=h, timeout=30).json()

        time.sleep(3)  # idle: the runner waits for work
        rss = service_rss_kib(hub)
        to_running, end_to_end = [], []
        for _ in range(args.single):
            i, t0 = submit()
            wait_for(lambda: get(i)["status"] != "submitted", 30, "running", interval=0.005)
            to_running.append(time.time() - t0)
            wait_for(lambda: get(i)["status"] in ("finished", "error"), 60, "finished", interval=0.01)
            end_to_end.append(time.time() - t0)
        py = ENVS / "spynnaker" / "bin" / "python"
        t = time.time()
        subprocess.run([str(py), "-c", "print(1)"], check=True, capture_output=True)
        direct = time.time() - t
        ids = [submit() for _ in range(args.jobs)]
        t_first = ids[0][1]
        wait_for(lambda: all(get(i)["status"] in ("finished", "error") for i, _ in ids[-3:]), 900, "the batch")
        jobs = [get(i) for i, _ in ids]
        waits = sorted(
            j["provenance"]["started_at"] - datetime.fromisoformat(j["timestamp_submission"]).timestamp() for j in jobs
        )
        last = max(j["provenance"]["finished_at"] for j in jobs)
        result = {
            "submit_to_running_s": {
                "median": round(statistics.median(to_running), 3),
                "max": round(max(to_running), 3),
            },
            "trivial_job_end_to_end_s": round(statistics.median(end_to_end), 3),
            "direct_run_s": round(direct, 3),
            "runner_overhead_s": round(statistics.median(end_to_end) - direct, 3),
            "batch": {
                "jobs": args.jobs,
                "concurrency": 2,
                "errors": sum(j["status"] != "finished" for j in jobs),
                "throughput_jobs_per_s": round(args.jobs / (last - t_first), 2),
                "p95_wait_s": round(waits[int(0.95 * (len(waits) - 1))], 2),
                "median_wait_s": round(statistics.median(waits), 2),
            },
            "idle_service_rss_mib": round(rss / 1024, 1),
        }
        print(json.dumps(result, indent=1))
    finally:
        hub.stop()
        import shutil

        shutil.rmtree(hub.base, ignore_errors=True)


def _ok(url):
    try:
        return requests.get(url + "/", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


if __name__ == "__main__":
    main()
