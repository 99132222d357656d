"""One user never reaches another through their server (issue 10, findings 1 and 2), on a real hub run as root with
one system account per user.

1. A route of a user's server to a local port (the `nrp` entry, /proxy/<port>/) reaches only a listener of that
   user's own account, and never forwards the user's credentials (hub cookies, _xsrf, Authorization, ?token=).
2. Kernels listen on no TCP port: another account subscribing to a busy kernel's channels gets nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import zmq

from conftest import free_port, traversable_tmpdir
from hubclient import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: one system account per user")

# A stand-in for the NRP (and for a listener another user put on its port): answers every request with its own uid
# and records what reached it, one JSON line per request, to a file ("-": its stdout).
STAND_IN = textwrap.dedent("""
    import http.server, json, os, socketserver, sys

    record = sys.argv[2]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            line = json.dumps({"path": self.path, "headers": [list(h) for h in self.headers.items()]})
            if record == "-":
                print(line, flush=True)
            else:
                with open(os.path.expanduser(record), "a") as f:
                    f.write(line + "\\n")
            body = f"stand-in of uid {os.getuid()}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_HEAD = do_GET

        def log_message(self, *args):
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    if sys.argv[1].isdigit():
        Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    else:  # a unix socket (the `nrp` entry's {unix_socket})
        class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

            def get_request(self):
                conn, _ = super().get_request()
                return conn, ("local", 0)

        UnixServer(sys.argv[1], Handler).serve_forever()
""")

RECORD = "nrp-stand-in.jsonl"  # in the home of the user whose NRP stand-in it is


@pytest.fixture(scope="module")
def stand_in():
    folder = traversable_tmpdir("stand-in-")
    script = folder / "stand_in.py"
    script.write_text(STAND_IN)
    os.chmod(script, 0o644)
    yield script
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def nrp_port():
    return free_port()


@pytest.fixture(scope="module")
def hub(hub_factory, stand_in, nrp_port):
    return hub_factory(
        {
            "nrp": {
                "command": [sys.executable, str(stand_in), "{port}", f"~/{RECORD}"],
                "port": nrp_port,
                "start_timeout": 30,
            },
            "proxy_ports": [nrp_port],
        }
    )


def _user(hub, name):
    user = hub.client(name, hub.add_user(name))
    user.start_server()
    user.kernel = user.start_kernel("spynnaker")
    ids = user.execute(user.kernel, "import os; print(os.getuid(), os.getgid(), os.getpid())")
    user.uid, user.gid, user.kernel_pid = (int(x) for x in ids["stdout"].split())
    return user


@pytest.fixture(scope="module")
def alice(hub):
    return _user(hub, "isolalice")  # names of this module's own: system accounts are per machine


@pytest.fixture(scope="module")
def bob(hub):
    return _user(hub, "isolbob")


def as_account(user, argv, **kw) -> subprocess.Popen:
    """A process of <user>'s system account (started by the test, which runs as root)."""
    return subprocess.Popen(argv, user=user.uid, group=user.gid, extra_groups=[], cwd="/", **kw)


def listening(port: int) -> bool:
    return port in tcp_listeners()


def logged_in_browser(user):
    """User's browser: the hub's login cookie and the server's own (jupyterhub-user-<name>), and the _xsrf cookie."""
    assert user.browse("lab").status_code == 200
    names = {c.name for c in user.session.cookies}
    assert f"jupyterhub-user-{user.name}" in names and "_xsrf" in names, names
    return user.session


def credentials_of(user) -> list[str]:
    """What would let someone act as <user>: their token and the values of their login and xsrf cookies."""
    secrets = [user.token] + [
        c.value for c in user.session.cookies if c.name.startswith("jupyterhub-") or c.name == "_xsrf"
    ]
    return [s for s in secrets if s and len(s) >= 8]


# --- finding 1: the NRP route and /proxy/<port>/ -------------------------------------------------------------------
def test_route_to_another_accounts_listener_is_refused_and_sends_nothing(hub, alice, bob, stand_in, nrp_port):
    listener = as_account(
        bob,
        [sys.executable, str(stand_in), str(nrp_port), "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: listening(nrp_port) or listener.poll() is not None, 30, "bob's listener on the NRP port")
        assert listener.poll() is None, listener.stderr.read()
        browser = logged_in_browser(alice)
        for path in ("nrp/", "nrp/index.html", f"proxy/{nrp_port}/", f"proxy/absolute/{nrp_port}/x"):
            r = browser.get(
                f"{hub.url}/user/{alice.name}/{path}?token={alice.token}",
                timeout=60,
                headers={"Authorization": f"token {alice.token}"},
            )
            assert r.status_code == 403, (path, r.status_code, r.text[:300])
            assert "in use by another account" in r.text and "nothing was sent" in r.text, (path, r.text[:500])
        assert nrp_port not in tcp_listeners(uid=alice.uid)  # her NRP was not started (the port is Bob's)
    finally:
        listener.terminate()
        out, err = listener.communicate(timeout=30)
    assert out == "", f"bob's listener received requests from alice's server:\n{out[:2000]}"


def test_own_listener_gets_the_request_without_the_users_credentials(hub, alice, nrp_port):
    wait_for(lambda: not listening(nrp_port), 30, "the NRP port to be free")
    browser = logged_in_browser(alice)
    browser.cookies.set("nrp-session", "its-own-cookie", path=f"/user/{alice.name}/")
    secrets = credentials_of(alice)
    for path in ("nrp/scene?token={t}&keep=1", f"proxy/{nrp_port}/page?keep=1&token={{t}}"):
        r = browser.get(
            f"{hub.url}/user/{alice.name}/{path.format(t=alice.token)}",
            timeout=90,
            headers={"Authorization": f"token {alice.token}", "X-XSRFToken": "x" * 20},
        )
        assert r.status_code == 200 and r.text == f"stand-in of uid {alice.uid}", (path, r.status_code, r.text[:300])
    record = alice.server("GET", f"api/contents/{RECORD}")
    assert record.status_code == 200, record.text
    requests_seen = [json.loads(line) for line in record.json()["content"].splitlines()]
    proxied = [q for q in requests_seen if "keep=1" in q["path"]]
    assert [q["path"].split("?")[0] for q in proxied] == ["/scene", "/page"], requests_seen
    for q in proxied:
        headers = {k.lower(): v for k, v in q["headers"]}
        assert "authorization" not in headers and "x-xsrftoken" not in headers, q
        assert headers.get("cookie") == "nrp-session=its-own-cookie", q  # the application's own cookie passes
        assert "token" not in q["path"] and q["path"].endswith("?keep=1"), q
        leaked = [s for s in secrets if s in json.dumps(q)]
        assert not leaked, f"alice's credentials reached the listener: {q}"


def test_nrp_on_a_unix_socket_takes_no_port(hub_factory, stand_in):
    """An NRP command that names {unix_socket} is served on a socket in a folder only the user may enter."""
    hub = hub_factory(
        {"nrp": {"command": [sys.executable, str(stand_in), "{unix_socket}", f"~/{RECORD}"], "start_timeout": 30}}
    )
    carol = hub.client("isolcarol", hub.add_user("isolcarol"))
    carol.start_server()
    before = tcp_listeners()
    browser = logged_in_browser(carol)
    r = browser.get(
        f"{hub.url}/user/{carol.name}/nrp/scene?token={carol.token}&keep=1",
        timeout=90,
        headers={"Authorization": f"token {carol.token}"},
    )
    assert r.status_code == 200 and r.text.startswith("stand-in of uid"), (r.status_code, r.text[:300])
    uid = int(r.text.rsplit(" ", 1)[1])
    assert tcp_listeners(uid=uid) - before == set(), "the NRP took a TCP port"
    seen = [json.loads(line) for line in carol.server("GET", f"api/contents/{RECORD}").json()["content"].splitlines()]
    proxied = [q for q in seen if q["path"].startswith("/scene")]
    assert proxied and proxied[0]["path"] == "/scene?keep=1", seen
    assert not [s for s in credentials_of(carol) if s in json.dumps(proxied)], proxied
    carol.stop_server()


def test_proxy_hooks_are_the_checked_upstream_version():
    """The one private upstream API this service uses (extensions proxy_upstream.py): fails when it changes."""
    import inspect

    import jupyter_server_proxy
    from jupyter_server_proxy import config, handlers, rawsocket

    from spinnaker_jupyter_ext import proxy_upstream

    assert jupyter_server_proxy.__version__ == proxy_upstream.CHECKED_VERSION
    assert proxy_upstream.mismatch() is None
    assert proxy_upstream.install() is None and proxy_upstream.installed()
    src = inspect.getsource
    # Both ways to the upstream (HTTP and websocket) build their request through the two hooked methods ...
    for method in (handlers.ProxyHandler._build_proxy_request, handlers.ProxyHandler.proxy_open):
        assert "self.get_client_uri(" in src(method) and "self.proxy_request_headers()" in src(method), method
    assert "self._create_ws_connection(" in src(rawsocket.RawSocketHandler.proxy_open)
    # ... and no handler class overrides them below the classes hooked.
    classes = [
        c
        for m in (handlers, rawsocket, config)
        for c in vars(m).values()
        if isinstance(c, type) and issubclass(c, handlers.ProxyHandler)
    ]
    for cls in classes:
        for name in ("get_client_uri", "proxy_request_headers"):
            assert cls is handlers.ProxyHandler or name not in vars(cls), (cls, name)
        assert cls is rawsocket.RawSocketHandler or "_create_ws_connection" not in vars(cls), cls
    # Named entries are made as subclasses of these by ServerProcess.make_proxy_handler.
    handler, _ = config.ServerProcess(name="x", command=["x"], port=1).make_proxy_handler()
    assert handler.get_client_uri is handlers.ProxyHandler.get_client_uri


def test_choke_point_refuses_another_accounts_port_for_any_route():
    """Where jupyter-server-proxy connects, whatever the route's name: another account's port is refused."""
    from types import SimpleNamespace

    from jupyter_server_proxy.handlers import ProxyHandler
    from jupyter_server_proxy.rawsocket import RawSocketHandler
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
    from tornado.web import HTTPError

    from spinnaker_jupyter_ext import proxy_upstream

    assert proxy_upstream.install() is None
    port = free_port()
    code = f"import socket; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); input()"
    other = subprocess.Popen(
        [sys.executable, "-c", code], user="nobody", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "up"
        line = RequestStartLine("GET", "/user/a/nrp/x?token=abc&y=1", "HTTP/1.1")
        fake = SimpleNamespace(
            unix_socket=None,
            absolute_url=False,
            proxy_base="nrp",
            base_url="/user/a/",
            log=SimpleNamespace(warning=lambda *a: None),
            request=HTTPServerRequest(start_line=line, headers=HTTPHeaders({"Host": "h"})),
            identity_provider=SimpleNamespace(get_cookie_name=lambda handler: "login-cookie"),
        )
        with pytest.raises(HTTPError) as refused:
            ProxyHandler.get_client_uri(fake, "http", "localhost", port, "/x")
        assert refused.value.status_code == 403 and "another account" in refused.value.log_message
        # Raw-socket entries (websocket to a plain TCP stream) connect on their own: refused the same way.
        with pytest.raises(OSError, match="another account"):
            RawSocketHandler._create_ws_connection(SimpleNamespace(port=port, unix_socket=None), None)
    finally:
        other.kill()
        other.communicate()
    free = free_port()
    assert ProxyHandler.get_client_uri(fake, "http", "localhost", free, "/x") == f"http://localhost:{free}/x?y=1"
    # The headers of every upstream request, HTTP or websocket (both ask proxy_request_headers).
    fake.request.headers = HTTPHeaders(
        {
            "Host": "h",
            "Authorization": "token abc",
            "X-XSRFToken": "2|abc",
            "Cookie": "jupyterhub-user-a=s3cret; _xsrf=2|abc; app=1",
            "Accept": "*/*",
        }
    )
    fake.get_request_headers_override = dict
    forwarded = dict(ProxyHandler.proxy_request_headers(fake).get_all())
    assert forwarded == {"Host": "h", "Cookie": "app=1", "Accept": "*/*"}


# --- finding 2: kernels on TCP ---------------------------------------------------------------------------------------
SUBSCRIBER = textwrap.dedent("""
    import json, socket, sys, time, zmq

    targets, seconds = json.loads(sys.argv[1]), float(sys.argv[2])
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    report = {"messages": 0, "sample": "", "unix": {}}
    for t in targets:
        sub.connect(t)
        if t.startswith("ipc://"):  # what a plain connect says (zmq retries silently)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(t[6:])
                report["unix"][t] = "connected"
            except OSError as e:
                report["unix"][t] = type(e).__name__
            finally:
                s.close()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sub.poll(100):
            frames = sub.recv_multipart()
            report["messages"] += 1
            report["sample"] = report["sample"] or repr(frames)[:300]
    print(json.dumps(report))
""")


def kernel_connection(user, kernel: str | None = None) -> dict:
    """The connection file of <user>'s kernel (read as root): transport, address, the five ports or socket numbers."""
    out = user.execute(
        kernel or user.kernel, "from ipykernel.connect import get_connection_file; print(get_connection_file())"
    )
    path = out["stdout"].strip()
    with open(path) as f:
        info = json.load(f)
    info["file"] = path
    return info


def channel_addresses(info: dict) -> list[str]:
    ports = [info[k] for k in ("iopub_port", "shell_port", "control_port", "stdin_port", "hb_port")]
    if info["transport"] == "ipc":
        return [f"ipc://{info['ip']}-{p}" for p in ports]
    return [f"tcp://127.0.0.1:{p}" for p in ports]


def tcp_listeners(uid: int | None = None, pid: int | None = None) -> set[int]:
    """Ports listened on by <uid>'s sockets, or by the sockets process <pid> holds."""
    inodes = None
    if pid is not None:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] != "0A":
                    continue
                if (uid is None or int(fields[7]) == uid) and (inodes is None or int(fields[9]) in inodes):
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_another_account_cannot_subscribe_to_a_busy_kernel(hub, alice, bob, spynnaker_python):
    info = kernel_connection(alice)
    busy = threading.Thread(
        target=alice.execute,
        daemon=True,
        args=(alice.kernel, "import time\nwhile True:\n    print('ALICE-SECRET-OUTPUT')\n    time.sleep(0.05)"),
        kwargs={"timeout": 300},
    )
    busy.start()
    ctx = zmq.Context.instance()
    control = ctx.socket(zmq.SUB)
    try:
        # What a subscriber with access sees (root here): the kernel is busy printing.
        control.setsockopt(zmq.SUBSCRIBE, b"")
        control.connect(channel_addresses(info)[0])

        def printing():
            return control.poll(100) and b"ALICE-SECRET-OUTPUT" in b"".join(control.recv_multipart())

        wait_for(printing, 60, "alice's kernel output on its iopub channel")
        # Bob's account tries her kernel's channels and every TCP port her account listens on.
        targets = channel_addresses(info) + [f"tcp://127.0.0.1:{p}" for p in sorted(tcp_listeners(uid=alice.uid))]
        attack = as_account(
            bob,
            [str(spynnaker_python), "-c", SUBSCRIBER, json.dumps(targets), "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = attack.communicate(timeout=60)
        assert attack.returncode == 0, err
        report = json.loads(out)
        wait_for(printing, 30, "alice's kernel still printing after bob's attempt")
    finally:
        control.close(0)
        alice.server("POST", f"api/kernels/{alice.kernel}/interrupt")
        busy.join(60)
    assert not busy.is_alive()
    assert report["messages"] == 0, f"bob received alice's kernel messages: {report['sample']}"
    # No channel of the kernel is on TCP. ipykernel 7 still binds one PULL socket on 127.0.0.1 for the output of
    # forked subprocesses (hard-wired; it sends nothing and takes only messages signed with a random key): Bob's
    # subscriber above tried it too.
    pipe = alice.execute(alice.kernel, "import sys; print(getattr(sys.stdout.pub_thread, '_pipe_port', None))")
    assert tcp_listeners(pid=alice.kernel_pid) <= {int(pipe["stdout"])}, "alice's kernel listens on TCP ports"
    assert info["transport"] == "ipc", info
    assert set(report["unix"].values()) == {"PermissionError"}, report["unix"]
    folder = os.path.dirname(info["ip"])
    assert os.stat(folder).st_uid == alice.uid and not os.stat(folder).st_mode & 0o077, folder


def test_notebooks_still_run_and_restart_over_ipc(alice):
    """What JupyterLab does when a notebook is opened: a session for the notebook starts its kernel; cells run over
    the kernel websocket; a restart brings the kernel back on its sockets."""
    notebook = {
        "cells": [],
        "metadata": {"kernelspec": {"name": "spynnaker", "display_name": "sPyNNaker"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    assert alice.server("PUT", "api/contents/ipc.ipynb", json={"type": "notebook", "content": notebook}).ok
    session = alice.server(
        "POST",
        "api/sessions",
        json={"path": "ipc.ipynb", "type": "notebook", "name": "", "kernel": {"name": "spynnaker"}},
    )
    assert session.status_code == 201, session.text
    kernel = session.json()["kernel"]["id"]
    out = alice.execute(
        kernel,
        "import pyNN.spiNNaker as p\np.setup(1.0); p.Population(3, p.IF_curr_exp())\np.run(5); p.end(); print('RAN')",
    )
    assert out["error"] is None and "RAN" in out["stdout"], out
    r = alice.server("POST", f"api/kernels/{kernel}/restart")
    assert r.status_code == 200, r.text
    out = alice.execute(kernel, "print('after restart')", timeout=120)
    assert "after restart" in out["stdout"], out
    assert kernel_connection(alice, kernel)["transport"] == "ipc"
    assert alice.server("DELETE", f"api/sessions/{session.json()['id']}").status_code == 204
