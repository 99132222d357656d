"""Measure the batch job service against a real hub (jobs.enabled, local executor, virtual board):

  submit -> claimed on an idle service      (a runner takes the job: provenance started_at; median and max of N
                                            single jobs; target < 1 s)
  submit -> running on an idle service      (the job's command runs: nmpi's status leaves "submitted", which it
                                            keeps while the claimed job prepares its code and environment)
  runner overhead                           (submit -> finished of `print(1)`, minus running it directly; < 2 s)
  100 trivial jobs, concurrency 2           (throughput in jobs/s, p95 wait from submission until claimed)
  memory of the idle service                (RSS of the service process)

The machine's load average is recorded before and after (the figures mean little on a busy machine).
Run: `.venv/bin/python benchmarks/bench_jobs.py [--jobs 100] [--single 10]` (as root, like the tests). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--jobs", type=int, default=100, help="jobs of the batch (default 100)")
    ap.add_argument("--single", type=int, default=10, help="single jobs, one after the other (default 10)")
    args = ap.parse_args()
    load_before = os.getloadavg()
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
        to_claimed, to_running, end_to_end = [], [], []
        for _ in range(args.single):
            i, t0 = submit()
            # "submitted" until the command runs (public_status); a command done between polls counts as well
            wait_for(lambda: get(i)["status"] != "submitted", 30, "running", interval=0.005)
            to_running.append(time.time() - t0)
            wait_for(lambda: get(i)["status"] in ("finished", "error"), 60, "finished", interval=0.01)
            end_to_end.append(time.time() - t0)
            to_claimed.append(get(i)["provenance"]["started_at"] - t0)
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
            "submit_to_claimed_s": {
                "median": round(statistics.median(to_claimed), 3),
                "max": round(max(to_claimed), 3),
            },
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
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
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
