"""`up` and the hub refuse to start into a trap (issue 10, findings 3, 4 and 10): ports another account holds, files
and folders another account could have written, and broken inputs. Each refusal is one line naming the key or path
and the fix; no secret reaches a listener the hub did not start; a failed start leaves no proxy behind.

The other account is `nobody`, so these tests run as root (as the hub does here)."""

from __future__ import annotations

import grp
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, free_port
from hubclient import wait_for
from spinnaker_jupyter import config, preflight
from spinnaker_jupyter.config import ConfigError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="another account (nobody) plays the attacker: needs root")

NOBODY = "nobody"
HUB_CONFIG = ROOT / "hub" / "spinnaker_jupyter" / "jupyterhub_config.py"

# Listens on HOST:PORT as whoever runs it, and prints every connection's first bytes (what a squatter would steal).
SQUATTER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(5)
    try:
        data = c.recv(65536)
    except OSError:
        data = b""
    print(repr(data), flush=True)
    try:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    except OSError:
        pass
    c.close()
"""


def as_nobody(*cmd) -> list:
    return ["runuser", "-u", NOBODY, "--", *map(str, cmd)]


class Squatter:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.port = port
        self.proc = subprocess.Popen(
            as_nobody("/usr/bin/python3", "-c", SQUATTER, host, port),
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout.readline().strip() == "listening"

    def stop(self) -> str:
        """End it; what it received, one repr per connection ('' when nothing connected)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        out = self.proc.stdout.read()
        self.proc.wait()
        return out


@pytest.fixture
def squat():
    started = []

    def make(port, host="127.0.0.1"):
        started.append(Squatter(port, host))
        return started[-1]

    yield make
    for s in started:
        s.stop()


def one_line_refusal(r: subprocess.CompletedProcess, *words) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out and len(r.stderr.strip().splitlines()) == 1, out
    assert "JupyterHub is now running" not in out
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    return r.stderr


def up(hub, timeout=120) -> subprocess.CompletedProcess:
    """`spinnaker-jupyter up` that is expected to fail (output in files: what it leaves behind may hold a pipe)."""
    out, err = hub.base / "up.out", hub.base / "up.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [BIN / "spinnaker-jupyter", "up", "--no-build", "-c", hub.config_file],
            stdout=o,
            stderr=e,
            env=hub.env,
            start_new_session=True,
        )
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())


def processes_of(hub) -> list[str]:
    """Command lines of the processes a hub of this config started (the proxy, services) that still run."""
    marks = (f"--port {hub.port} ".encode(), f"127.0.0.1:{hub.config['proxy']['hub_port']}/hub/api".encode())
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            seen = (
                Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                + Path(f"/proc/{pid}/environ").read_bytes()
            )
        except OSError:
            continue
        if any(m in seen for m in marks):
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return found


def run_hub_directly(hub, timeout=90) -> subprocess.CompletedProcess:
    """JupyterHub started with the project's jupyterhub_config.py, without `up` (as a custom service unit might)."""
    data = Path(hub.config["data_dir"])
    data.mkdir(exist_ok=True)
    env = {**hub.env, config.CONFIG_ENV: str(hub.config_file)}
    proc = subprocess.Popen(
        [BIN / "jupyterhub", "-f", HUB_CONFIG],
        cwd=data,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def nothing_listens(port: int) -> bool:
    return not preflight.listeners(port)


# --- finding 3 and 10: ports -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["hub.port", "proxy.api_port", "proxy.hub_port"])
def test_up_refuses_a_port_another_account_holds_and_sends_it_nothing(hub_factory, squat, key):
    hub = hub_factory(start=False)
    section, name = key.split(".")
    port = hub.port if key == "hub.port" else hub.config[section][name]
    squatter = squat(port)
    t0 = time.monotonic()
    r = up(hub)
    took = time.monotonic() - t0
    one_line_refusal(r, f"{key}: port {port} is already in use", "nobody (uid 65534)", f"set {key} to a free port")
    assert squatter.stop() == ""  # nothing connected to it: no token, no password
    assert took < 60  # it used to hang for 90 s on proxy.hub_port
    assert nothing_listens(hub.port)  # no proxy left on the public port


def test_the_hub_itself_refuses_a_taken_api_port_and_leaves_no_proxy(hub_factory, squat):
    """Without `up`'s check (the hub started directly, or a squatter quicker than `up`): the hub checks again
    before it starts the proxy, and its auth token never leaves."""
    hub = hub_factory(start=False)
    squatter = squat(hub.config["proxy"]["api_port"])
    r = run_hub_directly(hub)
    assert r.returncode != 0 and "JupyterHub is now running" not in r.stdout
    assert f"proxy.api_port: port {hub.config['proxy']['api_port']} is already in use" in r.stdout
    received = squatter.stop()
    assert received == ""
    token = (Path(hub.config["data_dir"]) / "hub" / "proxy_auth_token").read_text().strip()
    assert token not in received
    assert nothing_listens(hub.port)


def test_a_listener_is_trusted_only_when_it_is_the_process_the_hub_started(squat):
    """What the hub checks before it sends the proxy its token: the listener on the port is the proxy's process."""
    port = free_port()
    own = subprocess.Popen(
        ["/usr/bin/python3", "-c", SQUATTER, "127.0.0.1", str(port)], stdout=subprocess.PIPE, text=True
    )
    started = subprocess.Popen(["sleep", "60"])  # the process "the hub started", which is not the one listening
    try:
        assert own.stdout.readline().strip() == "listening"
        preflight.check_listener_is(own.pid, port, "proxy.api_port")  # the listener is the started process: accepted
        preflight.check_listener_is(os.getpid(), port, "proxy.api_port")  # ... or a child of it
        with pytest.raises(
            ConfigError,
            match=f"proxy.api_port: port {port} is answered by root \\(uid 0\\), pid "
            f"{own.pid} python3, not by the process the hub started \\(pid "
            f"{started.pid}\\); no secret is sent there",
        ):
            preflight.check_listener_is(started.pid, port, "proxy.api_port")
        other = free_port()
        squat(other)
        with pytest.raises(ConfigError, match=f"port {other} is answered by nobody \\(uid 65534\\), pid"):
            preflight.check_listener_is(started.pid, other, "proxy.api_port")
    finally:
        for p in (own, started):
            p.kill()
            p.wait()


def test_a_start_that_fails_after_the_proxy_started_leaves_no_proxy(hub_factory):
    """A managed service that cannot start ends the hub after the proxy is up: the proxy must go with it."""
    hub = hub_factory(start=False)
    extra = hub.base / "jupyterhub_config.d"
    extra.mkdir()
    (extra / "broken.py").write_text(
        f"c.JupyterHub.services.append({{'name': 'broken', 'url': 'http://127.0.0.1:{free_port()}', "
        "'command': ['/bin/false']})\n"
    )
    r = up(hub)
    assert r.returncode != 0 and "JupyterHub is now running" not in r.stdout + r.stderr
    assert "Starting proxy" in r.stderr and "Service broken exited" in r.stderr  # it got that far
    wait_for(lambda: not processes_of(hub), 15, "the proxy and the idle culler to be gone")
    assert nothing_listens(hub.port) and nothing_listens(hub.config["proxy"]["api_port"])


SLOW_SERVICE = "import time; time.sleep(600)"  # a managed service that never answers: the hub waits for it


@pytest.mark.parametrize("when", ["at the API's first answer", "with its services started"])
def test_a_sigterm_during_start_up_ends_the_proxy_and_the_services(hub_factory, when):
    """An operator's stop (SIGTERM) while the hub starts: its API answers (on proxy.hub_port; through the proxy
    once every service answers) and its proxy and services run before JupyterHub installs its own handler
    ("JupyterHub is now running"). A service that never answers holds the hub in that window; the stop ends the
    hub with its proxy and every service it started."""
    import requests

    hub = hub_factory({"culler": {"timeout": 60, "every": 10}}, start=False)
    extra = hub.base / "jupyterhub_config.d"
    extra.mkdir()
    (extra / "slow.py").write_text(
        f"c.JupyterHub.services.append({{'name': 'slow', 'url': 'http://127.0.0.1:{free_port()}', 'timeout': 120, "
        f"'command': ['/usr/bin/python3', '-c', {SLOW_SERVICE!r}]}})\n"
    )
    hub.start(wait=False)
    api = f"http://127.0.0.1:{hub.config['proxy']['hub_port']}/hub/api/"

    def answers() -> bool:
        assert hub.proc.poll() is None, hub.log()[-3000:]
        try:
            return requests.get(api, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    if when == "at the API's first answer":
        wait_for(answers, 90, "the hub's API to answer", interval=0.02)
    else:
        wait_for(lambda: answers() and any(SLOW_SERVICE in cmd for cmd in processes_of(hub)), 90, "the services")
    started = processes_of(hub)
    hub.proc.terminate()
    hub.proc.wait(30)
    assert "JupyterHub is now running" not in hub.log()  # it was stopped during its start
    if when == "with its services started":
        for name in ("configurable-http-proxy", "jupyterhub_idle_culler", SLOW_SERVICE):
            assert any(name in cmd for cmd in started), (name, started)
    wait_for(lambda: not processes_of(hub), 15, "the proxy and the services to be gone")
    assert nothing_listens(hub.port) and nothing_listens(hub.config["proxy"]["api_port"])
    assert hub.proc.returncode == 128 + signal.SIGTERM, hub.log()[-3000:]  # an exit of its own, not SIGTERM's
    assert "SIGTERM during start-up: ending the proxy and the services" in hub.log()


# --- finding 4: files and folders another account could have written ---------------------------------------------
def plant_config_d(folder: Path, marker: Path) -> Path:
    """Another account puts a jupyterhub_config.d beside the config file; what it holds would run in the hub."""
    subprocess.run(as_nobody("mkdir", "-m", "755", folder / "jupyterhub_config.d"), check=True)
    evil = folder / "jupyterhub_config.d" / "10-evil.py"
    subprocess.run(
        as_nobody("/bin/sh", "-c", f'echo \'open({str(marker)!r}, "w").write("pwned")\' > {evil}'), check=True
    )
    return evil


def test_config_d_planted_by_another_account_is_refused(hub_factory):
    hub = hub_factory(start=False)
    hub.base.chmod(0o1777)  # like /tmp: anyone may create entries, nobody may replace others'
    marker = hub.base / "marker"
    plant_config_d(hub.base, marker)
    folder = hub.base / "jupyterhub_config.d"
    fix = "belongs to nobody (uid 65534), another account, which could have written it"
    one_line_refusal(up(hub), f"jupyterhub_config.d {folder} {fix}", f"chown root {folder}")
    one_line_refusal(hub.cli("check"), f"jupyterhub_config.d {folder}")
    r = run_hub_directly(hub)  # jupyterhub_config.py checks too
    assert r.returncode != 0 and f"jupyterhub_config.d {folder} {fix}" in r.stdout
    assert not marker.exists()


@pytest.mark.parametrize("what", ["writable config.d file", "world-writable folder", "writable config file"])
def test_files_others_can_write_are_refused(hub_factory, what):
    hub = hub_factory(start=False)
    marker = hub.base / "marker"
    if what == "writable config.d file":
        (hub.base / "jupyterhub_config.d").mkdir()
        target = hub.base / "jupyterhub_config.d" / "10-mine.py"
        target.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        target.chmod(0o666)
        words = [f"jupyterhub_config.d file {target} is writable by other accounts (mode 0666)", f"chmod go-w {target}"]
    elif what == "world-writable folder":
        hub.base.chmod(0o777)  # not sticky: anyone may replace the config file
        words = [f"the folder of config file {hub.base} is writable by other accounts (mode 0777)"]
    else:
        hub.config_file.chmod(0o646)
        words = [f"config file {hub.config_file} is writable by other accounts (mode 0646)"]
    one_line_refusal(up(hub), *words)
    assert not marker.exists()


def test_group_write_counts_only_when_others_are_in_the_group(tmp_path):
    """Debian gives users their own group and umask 002: a file writable by that group is still only theirs."""
    f = tmp_path / "c.yaml"
    f.write_text("{}")
    f.chmod(0o664)
    preflight.trusted(f, "config file")  # root:root, nobody else in group root
    os.chown(f, 0, grp.getgrnam("nogroup").gr_gid)  # nobody's group
    with pytest.raises(ConfigError, match=f"config file {f} is writable by other accounts \\(mode 0664\\)"):
        preflight.trusted(f, "config file")


def test_a_hub_folder_made_by_another_account_is_refused(hub_factory):
    """data_dir/hub created beforehand by another account, with its own proxy token and an extra admin."""
    hub = hub_factory(start=False)
    data = Path(hub.config["data_dir"])
    data.mkdir(mode=0o1777)
    data.chmod(0o1777)
    planted = data / "hub"
    subprocess.run(as_nobody("mkdir", "-m", "700", planted), check=True)
    subprocess.run(
        as_nobody(
            "/bin/sh",
            "-c",
            f"echo {'x' * 64} > {planted}/proxy_auth_token; "
            f'echo \'{{"mallory": {{"hash": "x", "admin": true}}}}\' > {planted}/accounts.json',
        ),
        check=True,
    )
    one_line_refusal(up(hub), f"data_dir/hub {planted} belongs to nobody (uid 65534)", "or remove it")


def test_a_sticky_shared_data_dir_keeps_its_mode(tmp_path, envs_dir, capsys):
    from spinnaker_jupyter import cli

    data = tmp_path / "shared"
    data.mkdir()
    data.chmod(0o1777)
    (tmp_path / "c.yaml").write_text(
        json.dumps(
            {
                "data_dir": str(data),
                "kernels": {"envs_dir": str(envs_dir)},
                "spawner": {"local": {"system_users": False}},
            }
        )
    )
    cli.prepare(config.load([tmp_path / "c.yaml"]), build=False)
    assert stat.S_IMODE(data.stat().st_mode) == 0o1777  # not ours to change (it was made 0755)
    assert stat.S_IMODE((data / "hub").stat().st_mode) == 0o700  # what the project made is private


@pytest.mark.parametrize(
    "name, mode, content, words",
    [
        ("proxy_auth_token", 0o644, "x" * 64, ["secret file", "is open to other accounts (mode 0644)", "chmod 600"]),
        ("proxy_auth_token", 0o600, "", ["proxy_auth_token: holds 0 characters, too few for a secret", "remove "]),
        ("accounts.json", 0o606, "{}", ["secret file", "is writable by other accounts (mode 0606)"]),
        ("accounts.json", 0o640, "{}", ["secret file", "is open to other accounts (mode 0640)", "chmod 600"]),
        ("accounts.json", 0o600, '{"admin": {"hash": ', ["is not readable JSON", "move it aside"]),
        ("accounts.json", 0o600, '{"admin": "pw"}', ["the entry of 'admin' is not an account", "Restore it"]),
    ],
)
def test_bad_files_in_the_hub_folder_are_one_line(hub_factory, name, mode, content, words):
    hub = hub_factory(start=False)
    folder = Path(hub.config["data_dir"]) / "hub"
    folder.mkdir(parents=True, mode=0o700)
    (folder / name).write_text(content)
    (folder / name).chmod(mode)
    one_line_refusal(up(hub), str(folder / name), *words)


# --- finding 10: data_dir -----------------------------------------------------------------------------------------
def test_data_dir_that_is_a_file_is_one_line(hub_factory):
    hub = hub_factory(start=False)
    Path(hub.config["data_dir"]).write_text("not a folder")
    one_line_refusal(up(hub), f"data_dir: {hub.config['data_dir']} is a file, not a folder", "Set data_dir")


def test_data_dir_this_account_cannot_write_is_one_line(hub_factory):
    hub = hub_factory(start=False)  # data_dir inside a folder of root's (0755): nobody cannot create it
    r = subprocess.run(
        as_nobody(BIN / "spinnaker-jupyter", "up", "--no-build", "-c", hub.config_file),
        capture_output=True,
        text=True,
        timeout=120,
        env={**hub.env, "HOME": "/tmp"},
    )
    one_line_refusal(
        r,
        f"data_dir: cannot create {hub.config['data_dir']}: Permission denied",
        "Set data_dir to a folder this account can write",
    )


def test_a_proxy_that_dies_is_restarted_by_the_running_hub(hub_factory):
    """The hub restarts a proxy that died (JupyterHub's check_running): the checks then expect the hub and its
    services on their ports, and the new proxy's listeners to be its own."""
    import requests

    hub = hub_factory()
    pid_file = Path(hub.config["data_dir"]) / "hub" / "proxy.pid"
    old = int(pid_file.read_text())
    os.kill(old, signal.SIGKILL)

    def answers_again():
        try:
            new = int(pid_file.read_text())
            return new != old and requests.get(hub.url + "/hub/api/", timeout=2).status_code == 200
        except (OSError, ValueError, requests.RequestException):
            return False

    wait_for(answers_again, 60, "the hub to restart its proxy")
    assert "Proxy stopped with exit code" in hub.log() and "is already in use" not in hub.log()


def test_up_after_a_hub_crash_ends_what_the_dead_hub_left_and_starts(hub_factory):
    """kill -9 of the hub leaves its proxy and services running in their own sessions, holding the hub's ports: the
    next `up` ends them (saying so) instead of refusing the ports, and users log in as before. While the hub runs, a
    second `up` on the same data folder is refused."""
    hub = hub_factory()
    password = hub.add_user("crashann")
    proxy_pid = int((Path(hub.config["data_dir"]) / "hub" / "proxy.pid").read_text())
    second = hub.cli("up", "--no-build")
    assert second.returncode != 0 and "already running" in second.stderr + second.stdout
    os.kill(hub.proc.pid, signal.SIGKILL)
    hub.proc.wait(10)
    assert preflight._running(proxy_pid)  # what blocked the restart before
    hub.start()
    assert f"ending pid {proxy_pid} left by this deployment's previous hub" in hub.log()
    assert not preflight._running(proxy_pid)
    hub.client("crashann", password).start_server()
