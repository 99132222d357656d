"""Per-user containers through the real hub, on a real container engine (podman's Docker API here; Docker Engine
in production): own container and home volume per user, files survive stop/start, isolation, limits in force,
and PyNN in the sPyNNaker kernel inside the container."""

from __future__ import annotations

import pwd

import pytest

from podman_fixtures import TEST_LABEL

pytestmark = pytest.mark.containers


@pytest.fixture(scope="module")
def docker_hub(hub_factory, podman_engine):
    return hub_factory(
        {
            "spawner": {
                "type": "docker",
                "mem_limit": "1G",
                "cpu_limit": 1.5,
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


@pytest.fixture(scope="module")
def users(docker_hub):
    out = {}
    for name in ("ada", "ben"):
        out[name] = docker_hub.client(name, docker_hub.add_user(name))
    return out


def container_of(engine, name):
    found = engine.client().containers.list(filters={"name": f"spinnaker-jupyter-{name}"})
    return found[0] if found else None


def test_each_user_gets_their_own_container_volume_and_limits(docker_hub, users, podman_engine):
    messages = users["ada"].progress_messages()
    assert any("Starting your container" in m for m in messages), messages
    users["ben"].start_server()
    ada, ben = container_of(podman_engine, "ada"), container_of(podman_engine, "ben")
    assert ada and ben and ada.id != ben.id
    mounts = {m["Destination"]: m.get("Name") for m in ada.attrs["Mounts"]}
    assert mounts["/home/jovyan"] == "spinnaker-jupyter-test-home-ada"
    host = ada.attrs["HostConfig"]
    assert host["Memory"] == 1024**3 and host["NanoCpus"] == int(1.5e9)
    uid = pwd.getpwnam(docker_hub.system_account("ada")).pw_uid  # the user's own account (test_container_uids.py)
    assert ada.attrs["Config"]["User"].split(":")[0] == str(uid) and uid not in (0, 1000)


def test_files_survive_stop_start_and_stay_private(docker_hub, users, podman_engine):
    ada, ben = users["ada"], users["ben"]
    assert ada.server(
        "PUT", "api/contents/results.txt", json={"type": "file", "format": "text", "content": "spikes!"}
    ).status_code in (200, 201)
    assert ben.server("GET", "api/contents/results.txt").status_code == 404
    assert ada.server("GET", "api/contents/results.txt", token=ben.token).status_code == 403
    ada.stop_server()
    assert container_of(podman_engine, "ada") is None  # the container is gone ...
    volumes = {v.name for v in podman_engine.client().volumes.list()}
    assert "spinnaker-jupyter-test-home-ada" in volumes  # ... the home volume is not
    ada.start_server()
    assert ada.server("GET", "api/contents/results.txt").json()["content"] == "spikes!"
    tutorials = {f["name"] for f in ada.server("GET", "api/contents").json()["content"]}
    assert "SynfireExample.ipynb" in tutorials


def test_pynn_runs_in_the_container_kernel(users):
    ada = users["ada"]
    kernel = ada.start_kernel("spynnaker")
    out = ada.execute(
        kernel,
        "import os, pyNN.spiNNaker as p\np.setup(1.0)\n"
        "a = p.Population(10, p.IF_curr_exp()); a.record('spikes')\n"
        "p.run(20)\nprint('N', len(a.get_data().segments[0].spiketrains))\np.end()\n"
        "print('HOME', os.path.expanduser('~'))",
    )
    assert out["error"] is None and "N 10" in out["stdout"] and "HOME /home/jovyan" in out["stdout"], out
    assert "virtual mode" in out["stdout"]  # the deployment's machine cfg reached the container


def test_volume_removed_only_by_the_admin_command(docker_hub, users, podman_engine):
    users["ben"].stop_server()
    refused = docker_hub.cli("volumes", "remove", "nobody")
    assert refused.returncode == 2 and "no home volume for nobody" in refused.stderr
    listed = docker_hub.cli("volumes", "list")
    assert "spinnaker-jupyter-test-home-ben" in listed.stdout
    removed = docker_hub.cli("volumes", "remove", "ben")
    assert removed.returncode == 0, removed.stderr
    assert "spinnaker-jupyter-test-home-ben" not in {v.name for v in podman_engine.client().volumes.list()}
