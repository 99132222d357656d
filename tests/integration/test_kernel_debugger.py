"""The kernels' debugger gives no other account a way into a user's kernel (issue 10, follow-up).

Turning on JupyterLab's debugger makes ipykernel (7.4) start debugpy listening on a random 127.0.0.1 TCP port, and
debugpy 1.x asks its clients for no token: any local account could attach and run code as the user. Kernels of this
service offer no debugger (spinnaker_kernel.py says why): the kernelspecs do not advertise it (JupyterLab hides its
button), the kernel_info reply does not list it, and a debug_request sent anyway starts nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import threading
import uuid

import pytest
import websocket

from hubclient import wait_for
from test_isolation import as_account, tcp_listeners

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: one system account per user")

KERNELS = ["spynnaker", "python3"]  # every kernel a local user server offers (sPyNNakerGit: spinnaker_kernel too)
PROOF = "debugger-was-here"  # what Bob's code writes into Alice's home, through her debugger

# Bob's account, as a debug client would: DAP over TCP on each port given, attach, pause Alice's busy cell, evaluate
# code in its frame (writing a file into her home), disconnect (her cell resumes).
ATTACKER = textwrap.dedent("""
    import json, socket, sys, time

    ports, proof = json.loads(sys.argv[1]), sys.argv[2]
    code = f"open(__import__('os').path.expanduser('~/{proof}'), 'w').write(str(__import__('os').getuid()))"
    report = {}

    def dap(port):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        buf, seq = b"", 0

        def send(command, **arguments):
            nonlocal seq
            seq += 1
            body = json.dumps({"seq": seq, "type": "request", "command": command, "arguments": arguments}).encode()
            s.sendall(b"Content-Length: %d\\r\\n\\r\\n" % len(body) + body)

        def until(pred, seconds=20):
            nonlocal buf
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                while b"\\r\\n\\r\\n" in buf:
                    head, rest = buf.split(b"\\r\\n\\r\\n", 1)
                    n = int(head.split(b":")[1])
                    if len(rest) < n:
                        break
                    msg, buf = json.loads(rest[:n]), rest[n:]
                    if pred(msg):
                        return msg
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("closed")
                buf += data
            raise TimeoutError("no answer")

        try:
            send("initialize", adapterID="python", clientID="bob")
            until(lambda m: m.get("command") == "initialize")
            send("attach", justMyCode=False)
            until(lambda m: m.get("event") == "initialized" or m.get("command") == "attach")
            send("configurationDone")
            until(lambda m: m.get("command") == "attach")
            send("threads")
            main = until(lambda m: m.get("command") == "threads")["body"]["threads"][0]["id"]
            send("pause", threadId=main)
            stopped = until(lambda m: m.get("event") == "stopped")["body"]["threadId"]
            send("stackTrace", threadId=stopped)
            frame = until(lambda m: m.get("command") == "stackTrace")["body"]["stackFrames"][0]["id"]
            send("evaluate", expression=code, context="repl", frameId=frame)
            answer = until(lambda m: m.get("command") == "evaluate")
            send("disconnect", terminateDebuggee=False)
            return "evaluated: " + json.dumps(answer)[:200]
        except (OSError, ValueError, KeyError, IndexError) as e:
            return f"{type(e).__name__}: {e}"
        finally:
            s.close()

    for port in ports:
        report[port] = dap(port)
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def hub(hub_factory):
    return hub_factory({})


def _user(hub, name):
    user = hub.client(name, hub.add_user(name))
    user.start_server()
    ids = user.execute(user.start_kernel("spynnaker"), "import os; print(os.getuid(), os.getgid())")
    user.uid, user.gid = (int(x) for x in ids["stdout"].split())
    return user


@pytest.fixture(scope="module")
def alice(hub):
    return _user(hub, "dbgalice")  # names of this module's own: system accounts are per machine


@pytest.fixture(scope="module")
def bob(hub):
    return _user(hub, "dbgbob")


def control(user, kernel: str, msg_type: str, content: dict, timeout: float = 60) -> dict:
    """One request on the kernel's control channel through the server's websocket, as JupyterLab sends it; the reply."""
    ws_url = user.url.replace("http", "ws", 1) + f"/user/{user.name}/api/kernels/{kernel}/channels"
    ws = websocket.create_connection(ws_url, header=[f"Authorization: token {user.token}"], timeout=timeout)
    msg_id = uuid.uuid4().hex
    try:
        ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": user.name,
                        "session": uuid.uuid4().hex,
                        "msg_type": msg_type,
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "control",
                    "buffers": [],
                    "content": content,
                }
            )
        )
        while True:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") == msg_id and msg["channel"] == "control":
                return msg["content"]
    finally:
        ws.close()


def debug_request(user, kernel: str, command: str, arguments: dict) -> dict | None:
    return control(
        user, kernel, "debug_request", {"type": "request", "seq": 1, "command": command, "arguments": arguments}
    )


@pytest.mark.parametrize("name", KERNELS)
def test_another_account_cannot_run_code_through_the_kernel_debugger(hub, alice, bob, name, spynnaker_python):
    kernel = alice.start_kernel(name)
    out = alice.execute(kernel, "import os; print(os.getuid())")
    assert out["stdout"].strip() == str(alice.uid), out
    proof = f"{PROOF}-{name}"
    busy = threading.Thread(
        target=alice.execute,
        daemon=True,
        kwargs={"timeout": 300},
        args=(kernel, "import time\nwhile True:\n    time.sleep(0.05)"),
    )
    before = tcp_listeners(uid=alice.uid)
    try:
        # Alice turns the debugger on in JupyterLab (initialize, attach), then off again (disconnect).
        lab = {
            "clientID": "jupyterlab",
            "clientName": "JupyterLab",
            "adapterID": "python",
            "pathFormat": "path",
            "linesStartAt1": True,
            "columnsStartAt1": True,
            "supportsVariableType": True,
            "locale": "en",
        }
        replies = [
            debug_request(alice, kernel, "initialize", lab),
            debug_request(alice, kernel, "attach", {"justMyCode": True}),
            debug_request(alice, kernel, "disconnect", {"restart": False, "terminateDebuggee": False}),
        ]
        busy.start()  # her notebook runs a long cell
        wait_for(
            lambda: alice.server("GET", f"api/kernels/{kernel}").json()["execution_state"] == "busy",
            60,
            "alice's cell to run",
        )
        # Bob's account tries every TCP port her account listens on since.
        ports = sorted(tcp_listeners(uid=alice.uid) - before)
        attack = as_account(
            bob,
            [str(spynnaker_python), "-c", ATTACKER, json.dumps(ports), proof],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = attack.communicate(timeout=120)
        assert attack.returncode == 0, err
    finally:
        alice.server("POST", f"api/kernels/{kernel}/interrupt")
        busy.join(60)
    written = alice.server("GET", f"api/contents/{proof}")
    assert written.status_code == 404, (
        f"bob's account ran code as alice through her {name} kernel's debugger "
        f"(ports {ports}): {out.strip()} -> {written.text[:200]}"
    )
    assert not busy.is_alive()
    # The debugger is not offered: not by the kernelspec (JupyterLab's button), nor by the kernel, and a request
    # sent anyway is refused, saying why, and opens no port.
    spec = alice.server("GET", f"api/kernelspecs/{name}").json()["spec"]
    assert not spec.get("metadata", {}).get("debugger"), spec
    info = control(alice, kernel, "kernel_info_request", {})
    assert "debugger" not in info.get("supported_features", []) and not info.get("debugger"), info
    assert all(r and r["success"] is False and "debugger" in r["message"] for r in replies), replies
    assert ports == [], ports
    alice.server("DELETE", f"api/kernels/{kernel}")


def test_the_debugger_fence_is_the_checked_ipykernel(spynnaker_python):
    """The one private ipykernel detail the kernels rely on (spinnaker_kernel.NoDebuggerKernel): fails when the
    kernel environment's ipykernel is not the version it was checked against, or the hooks moved."""
    from conftest import ROOT

    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT / "kernels" / "spynnaker")!r})
        import spinnaker_kernel
        print(spinnaker_kernel.debugger_fence_problem() or "ok")
    """)
    out = subprocess.run([str(spynnaker_python), "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok", out.stdout


def test_the_git_kernel_as_registered_offers_no_debugger(spynnaker_python, tmp_path):
    """sPyNNakerGit, registered as gitkernel does it over a layered env (here the pinned env itself): no debugger
    in its kernelspec, in its kernel_info, nor behind a debug_request sent anyway."""
    import io
    from types import SimpleNamespace

    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    from spinnaker_jupyter_ext import gitkernel

    kdir = tmp_path / "kernels" / "spynnakergit"
    kdir.mkdir(parents=True)
    status = SimpleNamespace(log=io.StringIO(), say=lambda *a, **k: None)
    runner = gitkernel._Runner(status, dict(os.environ), timeout=120)
    env = spynnaker_python.parent.parent
    gitkernel._register_kernel(kdir, env, "sPyNNakerGit", {}, "auto", runner, status)
    spec = json.loads((kdir / "kernel.json").read_text())
    assert spec["argv"][1:3] == ["-m", "spinnaker_kernel"] and spec["metadata"]["debugger"] is False, spec
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    km = KernelManager(
        kernel_name="spynnakergit",
        kernel_spec_manager=ksm,
        transport="ipc",
        connection_file=str(tmp_path / "kernel.json"),
    )
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        info = kc.kernel_info(reply=True, timeout=60)["content"]
        assert "debugger" not in info["supported_features"], info
        kc.control_channel.send(
            kc.session.msg(
                "debug_request",
                {"type": "request", "seq": 1, "command": "initialize", "arguments": {"adapterID": "python"}},
            )
        )
        reply = kc.control_channel.get_msg(timeout=60)["content"]
        assert reply["success"] is False and "not available" in reply["message"], reply
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_the_images_kernelspecs_offer_no_debugger():
    """images/singleuser writes its kernelspecs itself: sPyNNaker and python3 run the launcher without debugger."""
    import re

    from conftest import ROOT

    text = (ROOT / "images" / "singleuser" / "Containerfile").read_text()
    specs = {}
    for body, target in re.findall(r"printf '(\{\\n \"argv\".*?)' > \"(\$\w+)/kernel.json\"", text):
        specs[target] = json.loads(body.replace("\\n", "\n"))
    assert set(specs) == {"$spec", "$py3"}, specs
    assert specs["$spec"]["argv"][1:3] == ["-m", "spinnaker_kernel"]
    assert specs["$py3"]["argv"][1:3] == ["/opt/spinnaker-jupyter/kernels/spynnaker/spinnaker_kernel.py", "--plain"]
    assert (
        "COPY kernels/spynnaker/spinnaker_kernel.py /opt/spinnaker-jupyter/kernels/spynnaker/spinnaker_kernel.py"
        in text
    )
    assert all(s["metadata"] == {"debugger": False} for s in specs.values()), specs


# In the single-user image, with the server environment's Python: every kernelspec's debugger flag, and what each
# kernel answers to kernel_info and to the debug_request JupyterLab sends first.
IN_IMAGE = r"""
import json
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import start_new_kernel
report = {}
for name, spec in KernelSpecManager().get_all_specs().items():
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=120)
    try:
        info = kc.kernel_info(reply=True, timeout=60)["content"]
        kc.control_channel.send(kc.session.msg("debug_request", {"type": "request", "seq": 1,
                                                                 "command": "initialize", "arguments": {}}))
        reply = kc.control_channel.get_msg(timeout=60)["content"]
        report[name] = {"spec_debugger": spec["spec"].get("metadata", {}).get("debugger"),
                        "features": info.get("supported_features"), "debug_reply": reply}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
print(json.dumps(report))
"""


@pytest.mark.containers
def test_the_images_kernels_offer_no_debugger(podman_engine):
    from test_images import run

    out = run(podman_engine.client(), podman_engine.images["singleuser"], ["python", "-c", IN_IMAGE])
    report = json.loads(out.strip().splitlines()[-1])
    assert set(report) == {"spynnaker", "python3"}, report
    for name, seen in report.items():
        assert seen["spec_debugger"] is False and "debugger" not in seen["features"], (name, seen)
        assert seen["debug_reply"]["success"] is False and "not available" in seen["debug_reply"]["message"], seen
