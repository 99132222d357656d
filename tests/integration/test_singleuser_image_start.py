"""The single-user image starts its server through the same cheap launcher as local servers
(extensions/spinnaker_singleuser.py): measured on real podman, CPU-seconds of one container's server start with the
image's command against the stock `jupyterhub-singleuser`."""

from __future__ import annotations

import http.server
import importlib.util
import os
import secrets
import socket
import statistics
import sys
import threading
import time

import pytest

from conftest import ROOT, free_port
from podman_fixtures import TEST_LABEL

pytestmark = pytest.mark.containers

LAUNCHER = ["python3", "-m", "spinnaker_singleuser", "jupyterhub-singleuser"]


def _stub_hub_handler():
    """What jupyterhub-singleuser asks the hub at start-up, answered with 200 (benchmarks/bench_course.py's)."""
    spec = importlib.util.spec_from_file_location("bench_course", ROOT / "benchmarks" / "bench_course.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_course", module)
    spec.loader.exec_module(module)
    return module._StubHub


@pytest.fixture(scope="module")
def stub_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _stub_hub_handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hub/api"
    server.shutdown()


def start_cpu_seconds(engine, stub: str, command: list[str] | None) -> float:
    """CPU-seconds the container's processes spent from start until the server listens (command None: the
    image's CMD)."""
    port = free_port()
    env = {
        "JUPYTERHUB_API_TOKEN": secrets.token_hex(16),
        "JUPYTERHUB_API_URL": stub,
        "JUPYTERHUB_CLIENT_ID": "jupyterhub-user-b",
        "JUPYTERHUB_USER": "b",
        "JUPYTERHUB_SERVER_NAME": "",
        "JUPYTERHUB_SERVICE_PREFIX": "/user/b/",
        "JUPYTERHUB_OAUTH_CALLBACK_URL": "/user/b/oauth_callback",
        "JUPYTERHUB_BASE_URL": "/",
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}/user/b/",
        "JUPYTERHUB_ACTIVITY_URL": f"{stub}/users/b/activity",
    }
    container = engine.client().containers.run(
        engine.images["singleuser"],
        command=command,
        environment=env,
        network_mode="host",
        labels={TEST_LABEL: "1"},
        detach=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                container.reload()
                assert container.status == "running", container.logs().decode(errors="replace")[-2000:]
                assert time.monotonic() < deadline, "the server did not listen within 120 s"
                time.sleep(0.05)
        time.sleep(1.0)  # what the server does right after it listens belongs to its start too
        code, out = container.exec_run(["sh", "-c", "cat /proc/[0-9]*/stat"])
        ticks = 0
        for line in out.decode().splitlines():
            comm, fields = line.split("(", 1)[1].rsplit(")", 1)
            if comm not in ("sh", "cat"):
                ticks += sum(int(f) for f in fields.split()[11:13])  # utime stime
        return ticks / os.sysconf("SC_CLK_TCK")
    finally:
        container.remove(force=True)


def test_the_image_starts_its_server_through_the_launcher_at_less_cpu(podman_engine, stub_hub):
    image = podman_engine.client().images.get(podman_engine.images["singleuser"])
    assert image.attrs["Config"]["Cmd"] == LAUNCHER
    before = [start_cpu_seconds(podman_engine, stub_hub, ["jupyterhub-singleuser"]) for _ in range(2)]
    after = [start_cpu_seconds(podman_engine, stub_hub, None) for _ in range(2)]
    print(f"\nCPU-s per container server start: stock jupyterhub-singleuser {before}, the image's CMD {after}")
    assert statistics.median(after) < 0.8 * statistics.median(before), (before, after)


def test_the_spawner_runs_the_images_launcher(tmp_path):
    import json

    from traitlets.config import Config

    from spinnaker_jupyter import config, hubconfig

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "spawner": {"type": "docker"}}))
    c = Config()
    hubconfig.update_docker(c, config.load([path]))
    assert c.SpiNNakerDockerSpawner.cmd == LAUNCHER
