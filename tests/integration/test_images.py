"""The single-user and hub images, built from scratch on podman (Docker API) and run as DockerSpawner runs them.

The session fixture `podman_engine` (tests/podman_fixtures.py) builds the debootstrap base and the single-user image
with WITH_ARM_TOOLCHAIN=0 (layer-cached between runs). Each container here uses host networking and a free port,
as DockerSpawner is configured for podman in the hub tests.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from podman_fixtures import TEST_LABEL

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[2]
HOME = "/home/jovyan"

# Runs in the container with the server environment's Python: starts the `spynnaker` kernel through its kernelspec
# (as JupyterLab does) and executes CODE in it.
RUN_IN_KERNEL = r"""
import json, sys
from jupyter_client.manager import start_new_kernel
km, kc = start_new_kernel(kernel_name="spynnaker", startup_timeout=120)
out = []
def hook(msg):
    c = msg["content"]
    if msg["msg_type"] == "stream":
        out.append(c["text"])
    elif msg["msg_type"] == "error":
        out.append("ERROR %s: %s" % (c["ename"], c["evalue"]))
try:
    reply = kc.execute_interactive(sys.argv[1], timeout=300, output_hook=hook)
    print(json.dumps({"status": reply["content"]["status"], "out": "".join(out)}))
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
"""

SPYNNAKER_CODE = """
import os
import pyNN.spiNNaker as p
p.setup(timestep=1.0)
pop = p.Population(10, p.IF_curr_exp(), label="pop")
pop.record("spikes")
p.run(10)
trains = pop.get_data("spikes").segments[0].spiketrains
p.end()
print("CFG", os.environ.get("SPINNAKER_CFG_IN_FORCE"))
print("RAN", len(trains))
"""


def run(client, image, command, **kw):
    """Run a command to completion in a fresh container (host network, like the spawner); returns its output."""
    container = client.containers.run(image, command, detach=True, network_mode="host", labels={TEST_LABEL: "1"}, **kw)
    try:
        result = container.wait(timeout=600)
        logs = container.logs().decode(errors="replace")
        assert result["StatusCode"] == 0, f"{command} exited {result['StatusCode']}:\n{logs}"
        return logs
    finally:
        container.remove(force=True)


class _HubAPIStub(BaseHTTPRequestHandler):
    """Just enough of the hub's REST API for a single-user server to start: the version check at start-up and the
    activity reports. (The servers started by the real hub are tested with the hub.)"""

    def _answer(self):
        body = json.dumps({"version": "6.1.1"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-JupyterHub-Version", "6.1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_api_stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubAPIStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hub/api"
    server.shutdown()
    server.server_close()


def spawner_env(user: str, port: int, api_url: str) -> dict:
    """What DockerSpawner passes to a user's container (the hub's part)."""
    prefix = f"/user/{user}/"
    return {
        "JUPYTERHUB_API_TOKEN": uuid.uuid4().hex,
        "JUPYTERHUB_CLIENT_ID": f"jupyterhub-user-{user}",
        "JUPYTERHUB_USER": user,
        "JUPYTERHUB_SERVER_NAME": "",
        "JUPYTERHUB_API_URL": api_url,
        "JUPYTERHUB_ACTIVITY_URL": f"{api_url}/users/{user}/activity",
        "JUPYTERHUB_BASE_URL": "/",
        "JUPYTERHUB_SERVICE_PREFIX": prefix,
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}{prefix}",
        "JUPYTERHUB_OAUTH_CALLBACK_URL": f"{prefix}oauth_callback",
        "JUPYTERHUB_OAUTH_SCOPES": json.dumps([f"access:servers!server={user}/"]),
        "JUPYTERHUB_OAUTH_ACCESS_SCOPES": json.dumps([f"access:servers!server={user}/"]),
        "JUPYTERHUB_HOST": "",
    }


def wait_until_answers(container, url: str, timeout: float = 120) -> tuple[requests.Response, float]:
    """Poll until the server answers or its container exits (then fail with its log)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            return requests.get(url, timeout=2, allow_redirects=False), time.monotonic() - t0
        except (requests.ConnectionError, requests.Timeout):
            pass
        container.reload()
        if container.status not in ("created", "running"):
            pytest.fail(f"the server's container {container.status}:\n{container.logs().decode(errors='replace')}")
        time.sleep(0.1)
    pytest.fail(f"no answer at {url} after {timeout}s:\n{container.logs().decode(errors='replace')[-3000:]}")


@pytest.fixture
def home_volume(podman_engine):
    client = podman_engine.client()
    volume = client.volumes.create(f"sj-test-home-{uuid.uuid4().hex[:8]}", labels={TEST_LABEL: "1"})
    yield volume.name
    volume.remove(force=True)


def test_runs_as_the_non_root_jovyan_user(podman_engine):
    client = podman_engine.client()
    image = client.images.get(podman_engine.images["singleuser"])
    assert image.attrs["Config"]["User"] in ("1000", "jovyan")
    out = run(client, image.id, ["bash", "-c", "id -u; id -un; id -g; echo $HOME; pwd; touch ~/ok && echo writable"])
    assert out.split() == ["1000", "jovyan", "100", HOME, HOME, "writable"]


def test_spynnaker_kernel_is_listed_and_runs_pynn_spinnaker(podman_engine):
    client = podman_engine.client()
    image = podman_engine.images["singleuser"]
    specs = json.loads(run(client, image, ["jupyter", "kernelspec", "list", "--json"]))["kernelspecs"]
    assert "spynnaker" in specs, specs
    spec = specs["spynnaker"]["spec"]
    assert spec["display_name"] == "sPyNNaker"
    assert spec["argv"][:3] == ["/opt/envs/spynnaker/bin/python", "-m", "spinnaker_kernel"]

    # Through the kernelspec, as JupyterLab starts it: the launcher picks the image's virtual-board cfg.
    out = run(client, image, ["python", "-c", RUN_IN_KERNEL, SPYNNAKER_CODE])
    reply = json.loads(out.strip().splitlines()[-1])
    assert reply["status"] == "ok", reply["out"]
    assert "CFG /etc/spinnaker-jupyter/spynnaker/.spynnaker.cfg" in reply["out"]
    assert "RAN 10" in reply["out"]


def test_tutorials_are_in_the_image(podman_engine):
    expected = sorted(p.name for p in (ROOT / "notebooks").iterdir() if p.is_file() and not p.name.startswith("."))
    assert expected, "no tutorials in notebooks/"
    out = run(
        podman_engine.client(),
        podman_engine.images["singleuser"],
        ["bash", "-c", "ls -1 /opt/spinnaker-jupyter/notebooks; echo TUTORIALS=$SPINNAKER_TUTORIALS_DIR"],
    )
    lines = out.split()
    assert "TUTORIALS=/opt/spinnaker-jupyter/notebooks" in lines
    assert sorted(x for x in lines if not x.startswith("TUTORIALS=")) == expected


def test_single_user_server_starts_seeds_the_home_volume_and_keeps_it(podman_engine, home_volume, hub_api_stub):
    """jupyterhub-singleuser (the image's CMD) as DockerSpawner starts it: host network, free port, home volume,
    memory and CPU limits. It answers, seeds the tutorials into the volume, stays behind Jupyter's login (the NRP
    route too), and what the user writes survives a new container."""
    client = podman_engine.client()
    port = podman_engine.free_port()
    url = f"http://127.0.0.1:{port}/user/alice/"
    container = client.containers.run(
        podman_engine.images["singleuser"],
        detach=True,
        network_mode="host",
        labels={TEST_LABEL: "1"},
        environment=spawner_env("alice", port, hub_api_stub),
        volumes={home_volume: {"bind": HOME, "mode": "rw"}},
        mem_limit="2g",
        nano_cpus=1_000_000_000,
        name=f"sj-test-alice-{port}",
    )
    try:
        response, seconds = wait_until_answers(container, url + "api")
        assert response.status_code == 200, response.text
        assert "version" in response.json()
        print(f"single-user server answered after {seconds:.1f}s")

        # Behind Jupyter's login: the UI, the NRP route and the raw port proxy all redirect to the hub's login.
        for path in ("lab", "nrp/", "proxy/9000/"):
            r = requests.get(url + path, timeout=10, allow_redirects=False)
            assert r.status_code in (302, 303, 401, 403), (path, r.status_code, r.text[:300])

        tutorials = sorted(p.name for p in (ROOT / "notebooks").iterdir() if p.suffix == ".ipynb")
        check = container.exec_run(
            [
                "bash",
                "-c",
                "ls -1 ~; stat -c %u:%g ~; cat /proc/1/status | grep ^Uid; "
                "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null "
                "|| cat /sys/fs/cgroup/memory.max; echo mine > ~/my-work.txt",
            ]
        )
        assert check.exit_code == 0, check.output
        listing = check.output.decode().split()
        for name in tutorials:
            assert name in listing, f"{name} not seeded into the home volume: {listing}"
        assert "1000:100" in listing
        assert str(2 * 1024**3) in listing, "memory limit not applied in the container"
    finally:
        container.remove(force=True)

    out = run(
        client,
        podman_engine.images["singleuser"],
        ["bash", "-c", "cat ~/my-work.txt; ls -1 ~"],
        volumes={home_volume: {"bind": HOME, "mode": "rw"}},
    )
    assert out.split()[0] == "mine"
    assert set(tutorials) <= set(out.split())


def test_single_user_image_stays_lean(podman_engine):
    """A guard against accidental bloat (measured: about 1.1 GB without the ARM toolchain, see images/README.md)."""
    image = podman_engine.client().images.get(podman_engine.images["singleuser"])
    size = image.attrs["Size"]
    print(f"single-user image (WITH_ARM_TOOLCHAIN=0): {size / 1e6:.0f} MB")
    assert size < 1.3e9, f"{size / 1e6:.0f} MB"


def test_hub_image_has_jupyterhub_the_proxy_and_the_hub_package(podman_engine, podman_hub_image):
    out = run(
        podman_engine.client(),
        podman_hub_image,
        [
            "bash",
            "-c",
            "jupyterhub --version; configurable-http-proxy --version; spinnaker-jupyter --help "
            ">/dev/null && echo cli-ok; python -c 'import dockerspawner, oauthenticator; print(\"ok\")'",
        ],
    )
    assert out.split() == ["6.1.1", "5.3.0", "cli-ok", "ok"], out


FRAMED_HUB_SCRIPT = r"""
set -eu
printf '%s\n' 'data_dir: /tmp/data' 'spawner: {type: docker}' \
    'hub: {public_url: "https://hub.example.org/", frame_ancestors: ["https://wiki.ebrains.eu"]}' > /tmp/hub.yaml
python - <<'PY'
from traitlets.config import Config
from spinnaker_jupyter import config, hubconfig
c = Config()
hubconfig.apply(c, config.load(["/tmp/hub.yaml"]))
print("FRAMED", c.JupyterHub.tornado_settings["cookie_options"])
PY
"""


def test_hub_image_serves_a_hub_embedded_in_another_sites_page(podman_engine, podman_hub_image):
    """hub.frame_ancestors over HTTPS (the hub in an EBRAINS collab page), as the hub image applies it: the framed
    cookies come from the extension distribution's spinnaker_framing, which the image must hold."""
    out = run(podman_engine.client(), podman_hub_image, ["bash", "-c", FRAMED_HUB_SCRIPT])
    assert "FRAMED {'samesite': 'None', 'secure': True, 'partitioned': True}" in out, out


NRP_LAYER_SCRIPT = r"""
set -eu
mkdir -p /tmp/front /tmp/back/api
echo NRP-STAND-IN > /tmp/front/index.html
echo NRP-BACKEND > /tmp/back/api/index.html
export NRP_FRONTEND_DIR=/tmp/front
export NRP_BACKEND_COMMAND="exec python3 -m http.server --bind 127.0.0.1 $BACKEND_PORT --directory /tmp/back"
echo "COMMAND=$SPINNAKER_NRP_COMMAND"
cle-nginx
cle-start
python3 - <<'PY'
import os, time, urllib.request
port, deadline = os.environ["SPINNAKER_NRP_PORT"], time.monotonic() + 60
for path in ("/", "/esv-private-route", "/api/index.html"):  # static, SPA fallback, proxied to the backend
    while True:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2).read().decode().strip()
            print("GOT", path, body)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"no answer on {path}: {e}")
            time.sleep(0.2)
PY
grep -h 'listen ' "/tmp/spinnaker-nrp-$(id -u)/nginx.conf"
cle-kill
python3 -c "
import socket, os
s = socket.socket(); r = s.connect_ex(('127.0.0.1', int(os.environ['SPINNAKER_NRP_PORT']))); print('CLOSED' if r else 'STILL-OPEN')"
"""


def test_nrp_layer_commands_serve_the_frontend_on_loopback_and_stop(podman_engine, podman_nrp_layer_image):
    """cle-nginx / cle-start / cle-kill of the NRP image, on a stand-in (the NRP's images are not reachable here):
    nginx as the user on 127.0.0.1 only, the frontend's routes, the backend proxied, and a clean stop."""
    port, backend = podman_engine.free_port(), podman_engine.free_port()
    out = run(
        podman_engine.client(),
        podman_nrp_layer_image,
        ["bash", "-c", NRP_LAYER_SCRIPT],
        environment={
            "SPINNAKER_NRP_PORT": str(port),
            "NRP_BACKEND_URL": f"http://127.0.0.1:{backend}",
            "BACKEND_PORT": str(backend),
        },
    )
    assert 'COMMAND=["cle-nginx", "--foreground"]' in out
    assert "GOT / NRP-STAND-IN" in out
    assert "GOT /esv-private-route NRP-STAND-IN" in out
    assert "GOT /api/index.html NRP-BACKEND" in out, out
    assert f"listen 127.0.0.1:{port};" in out
    assert "CLOSED" in out, out
