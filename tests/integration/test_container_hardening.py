"""A fork bomb in one user's container must not take the processes another user's server needs.

Each user's containers run as the user's own uid (test_container_uids.py), so the engine's nproc ulimit (per uid)
no longer joins them; still, without a pids limit of their own a fork bomb takes the host's processes, leaving other
users' kernels unable to start one. `spawner.process_limit` gives each container a pids cgroup limit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from podman_fixtures import TEST_LABEL

pytestmark = pytest.mark.containers

LIMIT = 64  # spawner.process_limit for this hub: small, so the bomb is over in a moment
# Bounded: a fixed number of forks (past the engine's nproc ulimit of 4096), each child gone within a minute; the
# cell returns once all were tried.
BOMB = (
    "import subprocess\n"
    "subprocess.run(['sh', '-c', 'i=0; while [ $i -lt 4500 ]; do sleep 60 & i=$((i+1)); done'],"
    " stderr=subprocess.DEVNULL, timeout=120)\n"
)


def processes_in(container_id: str) -> int:
    """The container's processes, counted from the host's /proc (their cgroup names the container). Not the engine's
    `top`: podman runs `ps` inside the container for it, which cannot fork while the bomb holds every pid."""
    n = 0
    for cg in Path("/proc").glob("[0-9]*/cgroup"):
        try:
            n += container_id in cg.read_text()
        except OSError:  # the process ended meanwhile
            pass
    return n


@pytest.fixture(scope="module")
def docker_hub(hub_factory, podman_engine):
    return hub_factory(
        {
            "spawner": {
                "type": "docker",
                "mem_limit": "1G",
                "cpu_limit": 0.5,
                "process_limit": LIMIT,
                "docker": {
                    "engine_url": podman_engine.url,
                    "image": podman_engine.images["singleuser"],
                    "pull_policy": "never",
                    "network": "host",
                    "volume_prefix": "spinnaker-jupyter-test-home-",
                    "labels": {TEST_LABEL: "1"},
                },
            }
        }
    )


def test_a_fork_bomb_in_one_container_leaves_another_users_kernel_working(docker_hub, podman_engine):
    # Without the limit, the bomb here held 2031 processes: podman caps a container at 2048 by default (its
    # containers.conf), Docker Engine not at all (before, every container's uid 1000 shared the engine's nproc 4096).
    mallory, victim = (docker_hub.client(n, docker_hub.add_user(n)) for n in ("mallory", "victim"))
    mallory.start_server()
    victim.start_server()
    try:
        container = podman_engine.client().containers.get("spinnaker-jupyter-mallory")
        assert container.attrs["HostConfig"]["PidsLimit"] == LIMIT
        bomber, kernel = mallory.start_kernel(), victim.start_kernel()
        assert mallory.execute(bomber, BOMB, timeout=150)["error"] is None  # every fork tried: the bomb is at its worst
        held = processes_in(container.id)
        print(f"the fork bomb holds {held} processes in its container (limit {LIMIT}, threads included)")
        assert held <= LIMIT
        out = victim.execute(
            kernel,
            "import subprocess\n"
            "print(subprocess.run(['echo', 'still here'], capture_output=True, text=True,"
            " timeout=10).stdout)",
            timeout=30,
        )
        assert out["error"] is None and "still here" in out["stdout"], out
    finally:
        mallory.stop_server()  # the container goes, and every process of the bomb with it
        victim.stop_server()
