"""30 users start their servers at the same moment on the one-node Slurm (this machine as controller and only node,
tests/slurm_fixtures.py): first / median / p95 / last ready, from the moment all N start requests were sent, through
the hub's REST API (bench_course.burst), with spawner.type slurm (a Slurm job per server, as each user's account).

Run: `.venv/bin/python benchmarks/bench_slurm_course.py [--users 30]` (as root). Prints JSON and writes
benchmarks/results-slurm-course.json. The machine's load (`uptime`) is recorded before and after: other work on the
machine slows every figure. A measurement, not a check.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_course import burst, load  # noqa: E402
from conftest import ENVS, RunningHub, traversable_tmpdir  # noqa: E402
from slurm_fixtures import start_slurm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=30)
    ap.add_argument("--memory", default="400M", help="spawner.slurm.memory of each server")
    args = ap.parse_args()
    # Room for every server at once: 16 jobs per core (2 cores: 32), 16 GB of the machine's 24 for Slurm.
    slurm = start_slurm(memory_mb=16000, jobs_per_core=16)
    hub = None
    try:
        hub = RunningHub(
            traversable_tmpdir("bench-slurm-course-"),
            {
                "spawner": {
                    "type": "slurm",
                    "poll_interval": 10,
                    "local": {"system_user_prefix": "benchslurm-"},
                    "slurm": {"conf": str(slurm.conf), "partition": slurm.partition, "memory": args.memory},
                },
                "git_kernel": {"enabled": False},
                "culler": {"enabled": False},
            },
            ENVS,
        ).start()
        admin = hub.client("benchadmin", hub.add_user("benchadmin", admin=True))
        before = load()
        tag = secrets.token_hex(2)
        result = burst(hub.url, admin.token, [f"q{tag}{i:02d}" for i in range(args.users)], timeout=900)
        result = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
        out = {"slurm": result, "load_before": before, "load_after": load(), "memory_per_server": args.memory}
        print(json.dumps(out, indent=1))
        (ROOT / "benchmarks" / "results-slurm-course.json").write_text(json.dumps(out, indent=1) + "\n")
    finally:
        if hub is not None:
            hub.stop(final=True)
            shutil.rmtree(hub.base, ignore_errors=True)
        slurm.shutdown()


if __name__ == "__main__":
    main()
