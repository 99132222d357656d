"""A room logs in with the git kernel on (issue #15, build 4): a first set-up of ~/sPyNNakerGit waits for its turn
while other servers are still starting or waiting to start (the hub holds every set-up slot while its start queue is
busy), and runs once the last of them is up. Through a real hub starting one server at a time."""

from __future__ import annotations

import json
import threading

import pytest

from hubclient import wait_for


@pytest.fixture(scope="module")
def hub(hub_factory, tmp_path_factory):
    # A tenth of a core per server, and servers started as new Pythons (~1.3 CPU-s; a forked one takes ~0.07 and
    # would be up in under a second), so that each start lasts seconds; the set-up's repositories are a missing
    # mirror: what is seen here is whether and when a set-up gets its turn, not what it then does.
    missing = tmp_path_factory.mktemp("mirror") / "missing"
    return hub_factory(
        {
            "spawner": {
                "start_queue": {"concurrency": 1, "limit": 5},
                "cpu_limit": 0.1,
                "local": {"fork_server": False},
            },
            "git_kernel": {
                "enabled": True,
                "concurrency": 1,
                "base_url": f"file://{missing}",
                "offline": True,
                "build_c": "never",
            },
        }
    )


def set_up_status(user) -> dict:
    r = user.server("GET", "api/contents/sPyNNakerGit/setup-status.json")
    return json.loads(r.json()["content"]) if r.status_code == 200 else {}


def test_a_first_set_up_waits_while_servers_start_and_runs_after_the_last(hub):
    amy, ben, cat = (hub.client(n, hub.add_user(n)) for n in ("gqamy", "gqben", "gqcat"))
    for user in (amy, ben, cat):  # in this order (a POST answers only once its start is under way or queued)
        threading.Thread(
            target=user.api, args=("POST", f"/users/{user.name}/server"), kwargs={"timeout": 60}, daemon=True
        ).start()
        wait_for(lambda u=user: (u.server_model() or {}).get("pending") == "spawn", 30, f"{user.name}'s start")
    wait_for(lambda: (amy.server_model() or {}).get("ready"), 180, "amy's server to be ready")
    assert not (cat.server_model() or {}).get("ready")  # (one at a time: cat's start is still to come)

    # amy's set-up began as her server answered, with ben's and cat's starts still in line: it waits its turn.
    wait_for(
        lambda: set_up_status(amy).get("step") == "queue" or set_up_status(amy).get("state") not in (None, "running"),
        60,
        "amy's set-up to report",
    )
    status = set_up_status(amy)
    assert status.get("step") == "queue" and "waiting for a turn" in status.get("message", ""), status
    assert not (cat.server_model() or {}).get("ready")

    # Once the last server is up, the queue is empty and the set-up runs (and fails on the missing mirror).
    wait_for(lambda: all((u.server_model() or {}).get("ready") for u in (ben, cat)), 240, "ben's and cat's servers")
    wait_for(lambda: set_up_status(amy).get("state") in ("failed", "done"), 120, "amy's set-up to have its turn")
    status = set_up_status(amy)
    assert not any("going ahead without one" in w for w in status.get("warnings", [])), status
    for user in (amy, ben, cat):
        user.stop_server()
