"""Batch jobs in containers (`jobs.executor: docker`) through the real hub's job service and the unmodified nmpi
client, on a real container engine (podman's Docker API here): a PyNN job runs in the single-user image as the
user's own job account, with no network (virtual mode) and engine limits, and its output comes back; an error and a
cancel end the container; another user's job does not see the first's folder; a container left by a killed job
service is removed when it starts again."""

from __future__ import annotations

import json
import os
import re
import signal
from urllib.parse import urlparse

import pytest
import requests

import test_jobs
from hubclient import wait_for
from podman_fixtures import TEST_LABEL
from test_jobs import _ended, _service_pid, client_for, start_jobs_hub, wait_done

pytestmark = pytest.mark.containers
nmpi = test_jobs.nmpi_module  # (the fixture, under the name these tests ask for)

PREFIX = "djtest-"  # system accounts of their own: other suites' hubs on this machine have their jupyter-<name>
JOB_LABEL = "spinnaker-jupyter.job"

PYNN = """
import os, socket, sys
import pyNN.spiNNaker as p
p.setup(timestep=1.0)
pop = p.Population(10, p.IF_curr_exp(), label="pop")
pop.record("spikes")
p.run(10)
n = len(pop.get_data("spikes").segments[0].spiketrains)
p.end()
open("summary.txt", "w").write(f"spiketrains={n}\\n")
print("python", sys.executable, "uid", os.getuid(), flush=True)
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=3).close()
    print("network: reached the job service")
except OSError:
    print("network: none")
cfg = os.path.join(os.environ["XDG_CONFIG_DIRS"], ".spynnaker.cfg")
try:
    open(cfg, "a").close()
    print("cfg: writable")
except OSError as e:
    mounted = [line.split()[3].split(",")[0] for line in open("/proc/self/mounts")
               if line.split()[1] == os.environ["XDG_CONFIG_DIRS"]]
    print("cfg:", "readable" if os.access(cfg, os.R_OK) else "unreadable", "mounted", mounted)
def first(*paths):  # cgroup v2, else v1
    return next((open(f).read().strip() for f in paths if os.path.exists(f)), "?")
print("limits", first("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
      first("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"), flush=True)
"""
FOREVER = (
    "import os, pathlib, time\npathlib.Path('secret.txt').write_text('mine')\n"
    "print('working in', os.getcwd(), flush=True)\nwhile True:\n    time.sleep(0.2)\n"
)


def docker_spawner(podman_engine) -> dict:
    """The `spawner:` section of the deployments here: containers on the tests' podman, labelled for clean-up."""
    return {
        "type": "docker",
        "local": {"system_user_prefix": PREFIX},
        "docker": {
            "engine_url": podman_engine.url,
            "image": podman_engine.images["singleuser"],
            "pull_policy": "never",
            "network": "host",
            "labels": {TEST_LABEL: "1"},
            "volume_prefix": "spinnaker-jupyter-test-jobhome-",
        },
    }


@pytest.fixture(scope="module")
def hub(hub_factory, podman_engine):
    spawner = docker_spawner(podman_engine)
    hub = start_jobs_hub(
        hub_factory,
        {"executor": "docker", "limits": {"wall_time": 300, "memory_mb": 1024, "processes": 64, "output_mb": 4}},
        {"spawner": spawner},
    )
    hub.users = {name: hub.client(name, hub.add_user(name)) for name in ("djada", "djben")}
    return hub


def job_containers(podman_engine, job_id=None):
    label = f"{JOB_LABEL}={job_id}" if job_id is not None else JOB_LABEL
    return podman_engine.client().containers.list(all=True, filters={"label": label})


def job_id_of(uri: str) -> int:
    return int(uri.rstrip("/").rsplit("/", 1)[1])


def test_pynn_job_runs_in_the_image_as_the_users_account(hub, nmpi, podman_engine, tmp_path):
    client = client_for(nmpi, hub, "djada")
    port = urlparse(hub.jobs_url).port
    uri = client.submit_job(
        source=PYNN, command=f"run.py {{system}} {port}", platform="SpiNNaker", collab_id="private-djada"
    )
    job = wait_done(client, uri, timeout=240)
    assert job["status"] == "finished", job["log"][-3000:]
    log = job["log"]
    assert f"as {PREFIX}djada (uid " in log and "no network" in log, log
    uid = re.search(rf"as {PREFIX}djada \(uid (\d+)\)", log).group(1)
    assert f"python /opt/envs/spynnaker/bin/python uid {uid}" in log and uid not in ("0", "1000"), log
    assert "cfg: readable mounted ['ro']" in log, log  # the job reads its sPyNNaker cfg and cannot change it
    assert "network: none" in log and f"limits 64 {1024 * 2**20}" in log, log
    # the image's sPyNNaker, not the host's kernel environment
    assert "sPyNNaker 7.4.1: /opt/envs/spynnaker/bin/python" in log and job["provenance"]["sPyNNaker"] == "7.4.1"
    client.download_data(job, local_dir=str(tmp_path))
    assert (tmp_path / "summary.txt").read_text() == "spiketrains=10\n"
    assert job_containers(podman_engine, job_id_of(uri)) == []  # removed once over


def test_outputs_land_in_the_users_home_volume_without_following_links(hub, nmpi, podman_engine):
    """The output file reaches ~/jobs/<id>/ in the user's home volume, as their running server sees it; a link
    the user planted there is replaced, never followed (the file it pointed to is untouched)."""
    user = hub.users["djada"]
    user.start_server()  # (the first start makes the home volume)
    try:
        client = client_for(nmpi, hub, "djada")
        script = "import time\ntime.sleep(8)\nopen('summary.txt', 'w').write('from the job\\n')\n"
        uri = client.submit_job(source=script, platform="SpiNNaker", collab_id="private-djada")
        job_id = job_id_of(uri)
        volume = "spinnaker-jupyter-test-jobhome-djada"
        plant = (
            f"mkdir -p /home/jovyan/jobs/{job_id} && echo keep > /home/jovyan/victim.txt && "
            f"ln -s ../../victim.txt /home/jovyan/jobs/{job_id}/summary.txt"
        )
        server = podman_engine.client().containers.get("spinnaker-jupyter-djada")
        podman_engine.client().containers.run(
            podman_engine.images["singleuser"],
            ["sh", "-c", plant],
            user=server.attrs["Config"]["User"],  # as the user (their server's uid) would plant it
            volumes={volume: {"bind": "/home/jovyan", "mode": "rw"}},
            network_mode="none",
            labels={TEST_LABEL: "1"},
            remove=True,
        )
        job = wait_done(client, uri, timeout=180)
        assert job["status"] == "finished", job["log"]
        assert f"Output files copied to ~/jobs/{job_id}/ (in your home volume {volume})." in job["log"], job["log"]

        def content(path):
            r = user.server("GET", f"api/contents/{path}")
            assert r.status_code == 200, r.text
            return r.json()

        copied = content(f"jobs/{job_id}/summary.txt")
        assert copied["type"] == "file" and copied["content"] == "from the job\n", copied
        assert content("victim.txt")["content"] == "keep\n"
        home = podman_engine.client().volumes.get(volume).attrs["Mountpoint"]  # the copy is the user's, as the server
        st = os.lstat(f"{home}/jobs/{job_id}/summary.txt")
        assert f"{st.st_uid}:{st.st_gid}" == server.attrs["Config"]["User"]
        assert job_containers(podman_engine, job_id) == []  # the copy's container too is gone
    finally:
        user.stop_server()


def test_extra_pip_installs_work_in_the_container(hub, nmpi):
    """pip in the job's container reaches the index with this machine's pip settings (CA bundle, index URL), and
    the job imports the package from its own folder (six is not in the image)."""
    client = client_for(nmpi, hub, "djben")
    script = "import six\nprint('six', six.__version__, 'from', six.__file__, flush=True)\n"
    uri = client.submit_job(
        source=script, platform="SpiNNaker", collab_id="private-djben", config={"extra_pip_installs": ["six"]}
    )
    job = wait_done(client, uri, timeout=240)
    assert job["status"] == "finished", job["log"][-3000:]
    assert re.search(r"six \S+ from \S+/\.job/packages/six\.py", job["log"]), job["log"][-3000:]


def test_a_version_the_image_lacks_is_refused_naming_the_images(hub):
    """spynnaker_version is checked against the sPyNNaker in the job image (asked once per image id and kept),
    not against the host's kernel environments."""
    headers = {"Authorization": f"Bearer {hub.users['djada'].token}"}
    body = {
        "code": "print(1)",
        "collab": "private-djada",
        "hardware_platform": "SpiNNaker",
        "hardware_config": {"spynnaker_version": "6.0.0"},
    }
    r = requests.post(hub.jobs_url + "/jobs/", headers=headers, timeout=30, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].endswith("'6.0.0' is not available here. Available: 7.4.1"), r.text
    cached = json.loads((hub.base / "data" / "jobs" / "image-versions.json").read_text())
    assert list(cached.values()) == [["1!7.4.1"]], cached


def test_an_error_is_the_commands_exit_code(hub, nmpi, podman_engine):
    client = client_for(nmpi, hub, "djada")
    job = wait_done(
        client,
        client.submit_job(
            source="print('about to fail', flush=True)\nraise SystemExit(3)\n",
            platform="SpiNNaker",
            collab_id="private-djada",
        ),
    )
    assert job["status"] == "error", job["log"]
    assert "about to fail" in job["log"] and "The command exited with code 3" in job["log"], job["log"]


def test_out_of_memory_is_said(hub, nmpi):
    client = client_for(nmpi, hub, "djada")
    script = "print('allocating', flush=True)\nx = bytearray(1500 * 2**20)\nprint('survived')\n"
    job = wait_done(client, client.submit_job(source=script, platform="SpiNNaker", collab_id="private-djada"))
    assert job["status"] == "error" and "allocating" in job["log"] and "survived" not in job["log"], job["log"]
    assert "it ran out of memory (it may use at most 1024 MiB: jobs.limits.memory_mb)" in job["log"], job["log"]


def test_the_time_limit_stops_and_removes_the_container(hub, nmpi, podman_engine):
    client = client_for(nmpi, hub, "djben")
    uri = client.submit_job(source=FOREVER, platform="SpiNNaker", collab_id="private-djben", config={"time_limit": 3})
    job = wait_done(client, uri)
    assert job["status"] == "error" and "working in" in job["log"], job["log"]
    assert "The job ran for longer than its time limit of 3 s and was stopped" in job["log"], job["log"]
    wait_for(lambda: job_containers(podman_engine, job_id_of(uri)) == [], 30, "the container to be removed")


def test_cancel_stops_and_removes_the_container_and_others_see_nothing(hub, nmpi, podman_engine):
    ada, ben = client_for(nmpi, hub, "djada"), client_for(nmpi, hub, "djben")
    uri = ada.submit_job(source=FOREVER, platform="SpiNNaker", collab_id="private-djada")
    wait_for(lambda: "working in" in ada.get_job(uri, with_log=True)["log"], 120, "the job to work")
    folder = re.search(r"working in (\S+)", ada.get_job(uri, with_log=True)["log"]).group(1)
    assert len(job_containers(podman_engine, job_id_of(uri))) == 1
    # Ben's job looks for Ada's running job's folder, by its path and anywhere it could be mounted.
    peek = (
        f"import os\np = {folder!r}\nprint('sees ada:', os.path.exists(p + '/secret.txt'), "
        "os.path.exists('/home/jovyan/secret.txt'), sorted(os.listdir(os.path.dirname(os.getcwd()))), "
        "flush=True)\n"
    )
    seen = wait_done(ben, ben.submit_job(source=peek, platform="SpiNNaker", collab_id="private-djben"))
    assert seen["status"] == "finished", seen["log"]
    assert "sees ada: False False" in seen["log"], seen["log"]
    assert f"'{os.path.basename(folder)}'" not in seen["log"], seen["log"]  # only Ben's own folder is there
    r = requests.delete(hub.jobs_url + uri, headers={"Authorization": f"Bearer {hub.users['djada'].token}"}, timeout=30)
    assert r.status_code == 200, r.text
    wait_for(lambda: ada.job_status(uri) == "removed", 30, "the job to be removed")
    wait_for(lambda: job_containers(podman_engine, job_id_of(uri)) == [], 30, "the container to be removed")
    assert "cancelled by its owner" in ada.get_job(uri, with_log=True)["log"]


def test_a_killed_services_container_is_removed_at_its_start(hub, nmpi, podman_engine):
    client = client_for(nmpi, hub, "djben")
    uri = client.submit_job(source=FOREVER, platform="SpiNNaker", collab_id="private-djben")
    wait_for(lambda: "working in" in client.get_job(uri, with_log=True)["log"], 120, "the job to work")
    first = {c.name for c in job_containers(podman_engine, job_id_of(uri))}
    assert len(first) == 1
    old = _service_pid(hub)
    os.kill(old, signal.SIGKILL)

    def rerun():  # the hub starts its service again: it removes the old container and runs the job again
        try:
            names = {c.name for c in job_containers(podman_engine, job_id_of(uri))}
            return not names & first and client.job_status(uri) == "running" and names
        except (requests.ConnectionError, requests.Timeout):
            return False

    wait_for(rerun, 120, "the old container to go and the job to run again")
    assert _service_pid(hub) not in (None, old)
    requests.delete(hub.jobs_url + uri, headers={"Authorization": f"Bearer {hub.users['djben'].token}"}, timeout=30)
    wait_for(lambda: client.job_status(uri) == "removed", 30, "the job to be removed")
    wait_for(lambda: job_containers(podman_engine, job_id_of(uri)) == [], 30, "the container to be removed")


def test_in_session_mode_the_job_reads_its_boards_cfg(hub_factory, podman_engine, tmp_path):
    """With a board (the spalloc double), the job's own sPyNNaker cfg, readable by the job's account only, names the
    claimed board in the container, which is on the servers' network (host here) to reach it."""
    from doubles.spalloc_server import SpallocDouble

    token = "hub-spalloc-token-for-docker-jobs"
    double = SpallocDouble(boards=1, tokens={token: "hub"}, admins=["hub"], power_delay=0.1).start()
    try:
        token_file = tmp_path / "spalloc-token"
        token_file.write_text(token + "\n")
        os.chmod(token_file, 0o600)
        spawner = docker_spawner(podman_engine)
        board_hub = start_jobs_hub(
            hub_factory,
            {"executor": "docker"},
            {
                "spawner": spawner,
                "spinnaker": {
                    "mode": "session",
                    "claim_timeout": 60,
                    "on_timeout": "fail",
                    "spalloc": {"url": double.url, "token_file": str(token_file), "keepalive_interval": 30},
                },
            },
        )
        user = board_hub.client("djcy", board_hub.add_user("djcy"))
        script = (
            "import os\ncfg = open(os.path.join(os.environ['XDG_CONFIG_DIRS'], '.spynnaker.cfg')).read()\n"
            "print('MACHINE', [l for l in cfg.splitlines() if l.startswith('machine_name')], flush=True)\n"
        )
        headers = {"Authorization": f"Bearer {user.token}"}
        r = requests.post(
            board_hub.jobs_url + "/jobs/",
            headers=headers,
            timeout=30,
            json={"code": script, "collab": "private-djcy", "hardware_platform": "SpiNNaker"},
        )
        assert r.status_code == 201, r.text
        url = f"{board_hub.jobs_url}/jobs/{r.json()['id']}?with_log=true"
        wait_for(
            lambda: requests.get(url, headers=headers, timeout=30).json()["status"] in ("finished", "error"),
            120,
            "the job to end",
        )
        job = requests.get(url, headers=headers, timeout=30).json()
        assert job["status"] == "finished", job["log"]
        assert "MACHINE ['machine_name = 10.11.192.1']" in job["log"] and "network host" in job["log"], job["log"]
        assert "given back" in job["log"], job["log"]
    finally:
        double.stop()


def test_a_clean_stop_of_the_service_removes_its_containers(hub, nmpi, podman_engine):
    client = client_for(nmpi, hub, "djada")
    uri = client.submit_job(source=FOREVER, platform="SpiNNaker", collab_id="private-djada")
    wait_for(lambda: "working in" in client.get_job(uri, with_log=True)["log"], 120, "the job to work")
    first = {c.name for c in job_containers(podman_engine, job_id_of(uri))}
    old = _service_pid(hub)
    os.kill(old, signal.SIGTERM)
    wait_for(lambda: _ended(old), 30, "the job service to stop")
    assert not first & {c.name for c in podman_engine.client().containers.list(all=True)}
    wait_for(lambda: _service_pid(hub) not in (None, old), 60, "the hub to start its job service again")
    headers = {"Authorization": f"Bearer {hub.users['djada'].token}"}

    def cancelled():
        try:
            requests.delete(hub.jobs_url + uri, headers=headers, timeout=30)
            return client.job_status(uri) == "removed"
        except (requests.ConnectionError, requests.Timeout):
            return False

    wait_for(cancelled, 60, "the job to be removed")
