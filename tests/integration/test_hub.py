"""The embedded default, end to end: a real hub and proxy on 127.0.0.1, users logging in through the login form,
their servers, the sPyNNaker kernel, the proxy lock-down, isolation between users, and the tutorials."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from hubclient import hold_starts, wait_for

PYNN_NETWORK = textwrap.dedent("""
    import pyNN.spiNNaker as p
    p.setup(timestep=1.0)
    stim = p.Population(5, p.SpikeSourceArray(spike_times=[[1, 5, 10]] * 5), label="stim")
    cells = p.Population(20, p.IF_curr_exp(), label="cells")
    proj = p.Projection(stim, cells, p.FixedProbabilityConnector(0.5), p.StaticSynapse(weight=2.0, delay=1.0))
    cells.record(["spikes", "v"])
    p.run(50)
    block = cells.get_data()
    print("segments", len(block.segments), "spiketrains", len(block.segments[0].spiketrains))
    print("weights", len(proj.get("weight", format="list")) > 0)
    p.end()
    print("PYNN-DONE")
""")


@pytest.fixture(scope="module")
def tutorials(tmp_path_factory):
    from conftest import traversable_tmpdir

    src = traversable_tmpdir("tutorials-")
    (src / "01_intro.ipynb").write_text(
        json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5, "version": 1})
    )
    (src / "data").mkdir()
    (src / "data" / "stimulus.txt").write_text("1 2 3\n")
    for p in [src, *src.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return src


@pytest.fixture(scope="module")
def hub(hub_factory, tutorials):
    hub = hub_factory({"tutorials": {"source": str(tutorials)}, "culler": {"timeout": 600, "every": 30}}, start=False)
    hold_starts(hub)
    return hub.start()


@pytest.fixture(scope="module")
def alice(hub):
    user = hub.client("alice", hub.add_user("alice"))
    user.start_server()
    return user


@pytest.fixture(scope="module")
def bob(hub):
    user = hub.client("bob", hub.add_user("bob"))
    return user


def test_wrong_password_is_refused(hub):
    hub.add_user("carol")
    carol = hub.client("carol", "not-her-password")
    assert not carol.logged_in
    assert (
        "Invalid username or password" in carol.session.get(f"{hub.url}/hub/login").text
        or carol.login_response.status_code == 403
    )


def test_login_lands_in_jupyterlab_and_classic_notebook(alice):
    assert alice.logged_in
    lab = alice.browse("lab")
    assert lab.status_code == 200 and "JupyterLab" in lab.text
    tree = alice.browse("tree")
    assert tree.status_code == 200 and "Jupyter Notebook" in tree.text
    terminals = alice.server("POST", "api/terminals")
    assert terminals.status_code == 200, terminals.text


def test_spawn_progress_is_said_in_words(hub, bob):
    hold = hub.base / "holds" / "bob"
    hold.touch()
    r = bob.session.get(f"{hub.url}/hub/spawn/bob", allow_redirects=False, timeout=30)
    assert r.status_code == 302 and "spawn-pending" in r.headers["location"], (r.status_code, r.headers)
    messages = []
    with bob.api("GET", "/users/bob/server/progress", stream=True, timeout=120) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                event = json.loads(line[5:])
                messages.append(event.get("message", ""))
                hold.unlink(missing_ok=True)  # the page listens: the start goes on
                if event.get("ready") or event.get("failed"):
                    break
    text = "\n".join(messages)
    assert "Preparing your" in text and "Starting your Jupyter server" in text, messages
    assert any("Your server is up after" in m for m in messages), messages
    assert bob.server_model()["ready"]


def test_spynnaker_kernel_runs_a_pynn_network(alice):
    specs = alice.server("GET", "api/kernelspecs").json()["kernelspecs"]
    assert specs["spynnaker"]["spec"]["display_name"] == "sPyNNaker"
    kernel = alice.start_kernel("spynnaker")
    out = alice.execute(kernel, PYNN_NETWORK)
    assert out["error"] is None, out
    assert "PYNN-DONE" in out["stdout"] and "segments 1 spiketrains 20" in out["stdout"], out
    # Said once, plainly, in the cell that first used sPyNNaker: and not again.
    assert out["stdout"].count("virtual mode") == 1, out
    again = alice.execute(kernel, "import pyNN.spiNNaker; print('again')")
    assert "virtual mode" not in again["stdout"], again
    # No template cfg was written into the home: exactly one cfg reached the kernel.
    home_cfgs = alice.execute(
        kernel, "import os; print(sorted(f for f in os.listdir(os.path.expanduser('~')) if 'spynnaker' in f.lower()))"
    )
    assert home_cfgs["stdout"].strip() == "[]", home_cfgs


def test_nrp_route_says_not_installed(alice):
    r = alice.server("GET", "proxy/9000/")
    assert r.status_code == 404 and "Neurorobotics Platform is not installed" in r.text
    r = alice.server("GET", "nrp/")
    assert "Neurorobotics Platform is not installed" in r.text, (r.status_code, r.text[:300])


def test_proxy_reaches_only_the_named_port(alice, hub):
    kernel = alice.start_kernel("spynnaker")
    out = alice.execute(
        kernel,
        textwrap.dedent("""
        import os, subprocess, sys, tempfile
        d = tempfile.mkdtemp()
        open(os.path.join(d, "marker.txt"), "w").write("nrp-stand-in")
        srv = subprocess.Popen([sys.executable, "-m", "http.server", "9000", "--bind", "127.0.0.1", "-d", d])
        print("started", srv.pid)
    """),
    )
    assert "started" in out["stdout"], out

    def reached():
        r = alice.server("GET", "proxy/9000/marker.txt")
        return r if r.status_code == 200 else None

    assert wait_for(reached, 30, "the stand-in on port 9000 through the proxy").text == "nrp-stand-in"
    hub_api_port = hub.config["proxy"]["api_port"]
    for refused in (
        f"proxy/{hub_api_port}/",
        "proxy/absolute/22/",
        "proxy/localhost:9000/marker.txt",
        "proxy/127.0.0.1:9000/",
        "proxy/example.org:80/",
    ):
        r = alice.server("GET", refused)
        assert r.status_code == 403, (refused, r.status_code, r.text[:200])


def test_other_users_cannot_reach_alices_server_or_files(alice, bob, hub):
    if bob.server_model() is None:
        bob.start_server()
    # Bob's token on Alice's server.
    r = alice.server("GET", "api/contents", token=bob.token)
    assert r.status_code == 403, r.status_code
    # Bob's browser session on Alice's server.
    r = bob.session.get(f"{hub.url}/user/alice/api/contents", timeout=30)
    assert r.status_code in (403, 404) or "/hub/login" in r.url or r.url.endswith("/hub/home"), (r.status_code, r.url)
    # Bob's own kernel, on the same machine, cannot read Alice's home.
    alice_home = Path(hub.config["data_dir"]) / "homes" / "alice"
    kernel = bob.start_kernel("spynnaker")
    out = bob.execute(
        kernel,
        f"import os\ntry:\n    os.listdir({str(alice_home)!r}); print('READ')\n"
        f"except PermissionError:\n    print('DENIED')",
    )
    assert "DENIED" in out["stdout"], out
    # ... and Alice's port 9000 is not Bob's NRP.
    r = bob.server("GET", "proxy/9000/marker.txt")
    assert r.status_code == 403 and "another account" in r.text, (r.status_code, r.text[:200])


def test_tutorials_seeded_and_user_edits_survive_restart(alice, tutorials):
    r = alice.server("GET", "api/contents/01_intro.ipynb")
    assert r.status_code == 200
    assert alice.server("GET", "api/contents/data/stimulus.txt").status_code == 200
    edited = r.json()["content"]
    edited["cells"] = [{"cell_type": "markdown", "metadata": {}, "source": "my notes", "id": "mine"}]
    assert (
        alice.server("PUT", "api/contents/01_intro.ipynb", json={"type": "notebook", "content": edited}).status_code
        == 200
    )
    # A new version of the tutorial arrives, and the server restarts.
    (tutorials / "01_intro.ipynb").write_text(
        json.dumps(
            {
                "cells": [{"cell_type": "markdown", "metadata": {}, "source": "v2", "id": "v2"}],
                "metadata": {},
                "nbformat": 4,
                "nbformat_minor": 5,
            }
        )
    )
    alice.stop_server()
    # What her kernels started (the stand-in on port 9000) ended with her session.
    from spinnaker_jupyter_ext.proxy_guard import listener_uid

    assert listener_uid(9000) is None
    alice.start_server()
    mine = alice.server("GET", "api/contents/01_intro.ipynb").json()["content"]
    assert mine["cells"][0]["source"] == "my notes"
    listing = [f["name"] for f in alice.server("GET", "api/contents").json()["content"]]
    beside = [n for n in listing if n.startswith("01_intro (updated")]
    assert len(beside) == 1, listing
    assert "v2" in json.dumps(alice.server("GET", f"api/contents/{beside[0]}").json()["content"])


def test_pip_install_user_survives_restart(alice, tmp_path_factory):
    from conftest import traversable_tmpdir

    pkg = traversable_tmpdir("pkg-")
    (pkg / "hello_spinn").mkdir()
    (pkg / "hello_spinn" / "__init__.py").write_text("GREETING = 'hello from the user site'\n")
    (pkg / "pyproject.toml").write_text(
        '[project]\nname = "hello-spinn"\nversion = "1.0"\n'
        '[build-system]\nrequires = ["setuptools"]\n'
        'build-backend = "setuptools.build_meta"\n'
    )
    subprocess.run(["chmod", "-R", "a+rwX", str(pkg)], check=True)
    kernel = alice.start_kernel("spynnaker")
    out = alice.execute(kernel, f"%pip install --user --no-index --no-build-isolation {pkg}")
    assert "Successfully installed hello-spinn" in out["stdout"], out
    alice.stop_server()
    alice.start_server()
    kernel = alice.start_kernel("spynnaker")
    out = alice.execute(kernel, "import hello_spinn; print(hello_spinn.GREETING)")
    assert "hello from the user site" in out["stdout"], out


def test_named_servers_admin_panel_and_culler(hub, alice):
    alice.start_server("second")
    assert alice.server("GET", "api/status", server="second").status_code == 200
    alice.stop_server("second")
    password = hub.cli("user", "passwd", "admin").stdout.strip().split()[-1]
    admin = hub.client("admin", password)
    assert admin.logged_in
    page = admin.session.get(f"{hub.url}/hub/admin")
    assert page.status_code == 200 and "admin" in page.text.lower()
    users = {u["name"] for u in admin.api("GET", "/users").json()}
    assert {"alice", "bob", "admin"} <= users
    services = admin.api("GET", "/services").json()
    assert "idle-culler" in services
    # Alice is no admin.
    assert alice.api("GET", "/users").status_code == 403
