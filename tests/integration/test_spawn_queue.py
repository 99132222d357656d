"""A room of students logging in at once (spawner.start_queue): servers start a few at a time, first come first
served, each spawn page saying its place in the line; past the queue's limit a start is refused with a page saying
so. Through a real hub whose queue starts one server at a time and lets two wait."""

from __future__ import annotations

import json
import threading

import pytest

from hubclient import wait_for


@pytest.fixture(scope="module")
def hub(hub_factory):
    # Each server gets a tenth of a core (its cgroup) and starts as a new Python (~1.3 CPU-s; a forked start takes
    # ~0.07), so that a start lasts seconds on any machine: long enough for the next three to queue behind it.
    local = {"fork_server": False}
    return hub_factory({"spawner": {"start_queue": {"concurrency": 1, "limit": 2}, "cpu_limit": 0.1, "local": local}})


@pytest.fixture(scope="module")
def students(hub):
    # (names of this module's own: system accounts are machine-wide, and other suites' hubs run beside this one)
    return {name: hub.client(name, hub.add_user(name)) for name in ("qamy", "qben", "qcat", "qdan")}


class Spawn:
    """One user's start through the REST API, with the spawn progress read as the spawn page reads it."""

    def __init__(self, user):
        self.user, self.messages, self.ended = user, [], threading.Event()
        self.requested = threading.Thread(
            target=lambda: user.api("POST", f"/users/{user.name}/server", timeout=60), daemon=True
        )
        self.requested.start()
        wait_for(
            lambda: (user.server_model() or {}).get("pending") == "spawn" or self.is_ready(),
            30,
            f"{user.name}'s start to be pending",
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        try:
            with self.user.api("GET", f"/users/{self.user.name}/server/progress", stream=True, timeout=180) as r:
                for line in r.iter_lines(decode_unicode=True):
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        self.messages.append(event.get("message", ""))
                        if event.get("ready") or event.get("failed"):
                            break
        finally:
            self.ended.set()

    def said(self, words: str) -> bool:
        return any(words in m for m in self.messages)

    def is_ready(self) -> bool:
        return bool((self.user.server_model() or {}).get("ready"))


def test_first_come_first_served_with_the_place_in_line_said_and_a_full_line_refused(hub, students):
    amy, ben, cat, dan = (students[n] for n in ("qamy", "qben", "qcat", "qdan"))
    first = Spawn(amy)
    second = Spawn(ben)
    wait_for(lambda: second.said("1 server is starting before yours"), 30, "ben to be told his place")
    third = Spawn(cat)
    wait_for(lambda: third.said("2 servers are starting before yours"), 30, "cat to be told her place")

    # The line is full (one starting, two waiting): dan's start is refused at once, with a page saying why.
    page = dan.session.get(f"{hub.url}/hub/spawn/{dan.name}", timeout=60)
    assert page.status_code == 429, (page.status_code, page.text[-2000:])
    assert "Too many servers are starting right now (2 are already waiting for their turn)" in page.text
    assert "try again" in page.text

    order = []

    def all_ready():
        for spawn in (first, second, third):
            assert not (spawn.ended.is_set() and not spawn.is_ready()), spawn.messages  # a failed start
        for user in (amy, ben, cat):
            if user.name not in order and (user.server_model() or {}).get("ready"):
                order.append(user.name)
        return len(order) == 3

    wait_for(all_ready, 300, "the three servers to be ready")
    assert order == ["qamy", "qben", "qcat"]  # first come, first served
    for spawn in (first, second, third):
        assert spawn.ended.wait(60)
    assert not first.said("before yours")  # nobody was ahead of amy
    # cat moved up once amy's server was up, and was then told about how long (from amy's measured start)
    moved = [m for m in third.messages if m.startswith("1 server is starting before yours")]
    assert moved and "until yours is ready" in moved[0], third.messages

    # Refused is not broken: once the line is short, dan's server starts.
    assert dan.server_model() is None
    dan.start_server(timeout=180)
    for user in (amy, ben, cat, dan):
        user.stop_server()


def test_what_a_start_does_not_need_is_left_out_of_local_servers(hub, students):
    """The settings that cut a server start's cost (benchmarks/README.md) reach local servers."""
    import pwd
    from pathlib import Path

    user = students["qdan"]
    if not (user.server_model() or {}).get("ready"):
        user.start_server(timeout=180)
    # The launcher runs the server (ps shows it as the user's account).
    uid = pwd.getpwnam(hub.system_account("qdan")).pw_uid
    cmdlines = [
        Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        for pid in (p.name for p in Path("/proc").iterdir() if p.name.isdigit())
        if _owner(pid) == uid
    ]
    assert any("-m spinnaker_jupyter.singleuser" in c and "jupyterhub-singleuser" in c for c in cmdlines), cmdlines
    # No language-server scan (jupyter_lsp off): its status route is gone.
    assert user.server("GET", "lsp/status").status_code == 404
    # JupyterLab's news are not fetched from the internet when the browser asks for them.
    news = user.server("GET", "lab/api/news")
    assert news.status_code == 200 and news.json()["news"] == []
    update = user.server("GET", "lab/api/update")
    assert update.status_code == 200 and update.json()["notification"] is None
    log = (Path(hub.config["data_dir"]) / "logs" / "qdan.log").read_text(errors="replace")
    assert "Failed to get announcements" not in log and "Skipped non-installed server" not in log, log[-3000:]
    user.stop_server()


def test_the_launcher_leaves_out_the_grammar_import_and_the_node_call():
    """spinnaker_jupyter.singleuser: what it leaves out is still left out with the installed jupyterlab and
    jsonschema (fails when an upgrade moves either)."""
    import subprocess
    import sys

    probe = (
        "import subprocess, sys\n"
        "calls = []\n"
        "real = subprocess.check_output\n"
        "subprocess.check_output = lambda *a, **k: calls.append(a[0]) or real(*a, **k)\n"
        "from spinnaker_jupyter.singleuser import prepare\n"
        "prepare()\n"
        "import jupyterlab.labapp, jupyter_server.serverapp, jupyterhub.singleuser, jsonschema\n"
        "print(sys.modules.get('rfc3987_syntax') is None, [c for c in calls if 'yarn' in ' '.join(map(str, c))])\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "True []", out.stdout


def _owner(pid: str):
    import os

    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None
