"""Spawn time of a user server as a Slurm job against the local spawner, on this machine's one-node Slurm
(tests/slurm_fixtures.py). Not part of the suite (no test_ prefix); run it on purpose:

    .venv/bin/python -m pytest tests/integration/bench_slurm_spawn.py -s -q [SPINNAKER_BENCH_ROUNDS=7]

Each round: the API start request until the hub says the server is ready, then a stop. Prints medians and ranges
(a measurement, not a check: nothing here asserts a time).
"""

from __future__ import annotations

import json
import os
import statistics

from test_slurm import slurm_config

ROUNDS = int(os.environ.get("SPINNAKER_BENCH_ROUNDS", "7"))


def _rounds(user) -> list[float]:
    times = []
    for _ in range(ROUNDS):
        times.append(user.start_server(timeout=120))
        user.stop_server()
    return times


def test_spawn_time_slurm_against_local(hub_factory, slurm):
    local = hub_factory({"spawner": {"local": {"system_user_prefix": "benchlocal-"}}, "culler": {"enabled": False}})
    on_slurm = hub_factory(slurm_config(slurm))
    figures = {}
    for name, hub in (("local", local), ("slurm", on_slurm)):
        user = hub.client("bench", hub.add_user("bench"))
        times = _rounds(user)
        figures[name] = {
            "median_s": round(statistics.median(times), 2),
            "min_s": round(min(times), 2),
            "max_s": round(max(times), 2),
            "rounds": ROUNDS,
        }
    print("\nSPAWN-TIMES " + json.dumps(figures))
