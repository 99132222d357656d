"""A user of the hub, as the tests drive it: logs in through the login form, then talks to the hub and their
server over HTTP and the kernel websocket, like JupyterLab does."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import requests
import websocket

#: An operator's addition (jupyterhub_config.d, written by hold_starts): a user's start waits while a hold file of
#: theirs exists, so a test opens the spawn page's event stream before the start runs. A forked start takes ~0.1 s:
#: unheld, the stream opens after it and hears only "ready" (JupyterHub's SpawnProgressAPIHandler).
HOLD_HOOK = """
import asyncio, pathlib

async def _hold(spawner):
    hold = pathlib.Path({folder!r}) / spawner.user.name
    for _ in range(1200):
        if not hold.exists():
            return
        await asyncio.sleep(0.05)

c.Spawner.pre_spawn_hook = _hold
"""


def hold_starts(hub) -> None:
    """Before `hub` starts: its users' starts can be held (HOLD_HOOK) until their progress stream listens
    (HubClient.progress_messages does so for clients of such a hub)."""
    (hub.base / "holds").mkdir(exist_ok=True)
    (hub.base / "jupyterhub_config.d").mkdir(exist_ok=True)
    (hub.base / "jupyterhub_config.d" / "hold.py").write_text(HOLD_HOOK.format(folder=str(hub.base / "holds")))


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class HubClient:
    def __init__(
        self,
        url: str,
        name: str | None,
        password: str | None = None,
        session: requests.Session | None = None,
        hold_dir: Path | None = None,
    ):
        """Log in through the hub's login form with `password`, or take a `session` already logged in (OAuth).
        `hold_dir`: the hub's hold folder (hold_starts), where progress_messages holds this user's start."""
        self.url, self.name, self.hold_dir = url, name, hold_dir
        self.session = session or requests.Session()
        if session is None:
            self.login_response = self._login(password)
        else:
            self.login_response = None
            if name is None:  # whatever name the hub gave this login
                self.name = self.session.get(
                    f"{url}/hub/api/user", timeout=30, headers={"X-XSRFToken": self._xsrf()}
                ).json()["name"]
        self.token = self._create_token()

    def _login(self, password: str) -> requests.Response:
        self.session.get(f"{self.url}/hub/login")
        return self.session.post(
            f"{self.url}/hub/login",
            allow_redirects=False,
            data={
                "username": self.name,
                "password": password,
                "_xsrf": self.session.cookies.get("_xsrf", path="/hub/"),
            },
        )

    @property
    def logged_in(self) -> bool:
        if self.login_response is None:
            return (
                self.session.get(
                    f"{self.url}/hub/api/user", timeout=30, headers={"X-XSRFToken": self._xsrf()}
                ).status_code
                == 200
            )
        return self.login_response.status_code == 302 and "/hub/login" not in self.login_response.headers["location"]

    def _xsrf(self) -> str:
        return self.session.cookies.get("_xsrf", path="/hub/") or ""

    def _create_token(self) -> str | None:
        if not self.logged_in:
            return None
        r = self.session.post(
            f"{self.url}/hub/api/users/{self.name}/tokens",
            json={"note": "tests"},
            headers={"X-XSRFToken": self._xsrf()},
        )
        r.raise_for_status()
        return r.json()["token"]

    # --- the hub's REST API, as this user -------------------------------------------------------------------
    def api(self, method: str, path: str, **kw) -> requests.Response:
        headers = {"Authorization": f"token {self.token}", **kw.pop("headers", {})}
        kw.setdefault("timeout", 30)
        return requests.request(method, f"{self.url}/hub/api{path}", headers=headers, **kw)

    def server_model(self, server: str = "") -> dict | None:
        model = self.api("GET", f"/users/{self.name}").json()
        return model["servers"].get(server)

    def start_server(self, server: str = "", timeout: float = 120) -> float:
        t0 = time.monotonic()
        path = f"/users/{self.name}/servers/{server}" if server else f"/users/{self.name}/server"
        r = self.api("POST", path)
        assert r.status_code in (201, 202), r.text
        wait_for(lambda: (self.server_model(server) or {}).get("ready"), timeout, f"{self.name}'s server to be ready")
        return time.monotonic() - t0

    def progress_messages(self, server: str = "", timeout: float = 120) -> list[str]:
        """Start the server from the browser's spawn page and read the progress stream, as the spawn-pending page
        does."""
        path = f"/users/{self.name}/servers/{server}" if server else f"/users/{self.name}/server"
        spawn = f"/hub/spawn/{self.name}/{server}" if server else f"/hub/spawn/{self.name}"
        hold = self.hold_dir / self.name if self.hold_dir and not server else None
        for _ in range(3):
            if hold:
                hold.touch()  # the start waits in the hub's pre-spawn hook until the stream below listens
            try:
                r = self.session.get(self.url + spawn, allow_redirects=False, timeout=30)
                assert r.status_code == 302 and "spawn-pending" in r.headers["location"], (r.status_code, r.headers)
                messages = []
                with self.api("GET", f"{path}/progress", stream=True, timeout=timeout) as r:
                    for line in r.iter_lines(decode_unicode=True):
                        if line.startswith("data:"):
                            event = json.loads(line[5:])
                            messages.append(event.get("message", ""))
                            if hold:
                                hold.unlink(missing_ok=True)  # the page listens: the start goes on
                            if event.get("ready") or event.get("failed"):
                                break
            finally:
                if hold:
                    hold.unlink(missing_ok=True)
            # A stream opened after the server got ready hears the ready event alone (JupyterHub's
            # SpawnProgressAPIHandler): the client was late, on a loaded machine, not the hub silent. Start again.
            if not (len(messages) == 1 and (self.server_model(server) or {}).get("ready")):
                return messages
            self.stop_server(server)
        return messages

    def stop_server(self, server: str = "", timeout: float = 60) -> None:
        path = f"/users/{self.name}/servers/{server}" if server else f"/users/{self.name}/server"
        r = self.api("DELETE", path)
        assert r.status_code in (202, 204), r.text
        wait_for(lambda: self.server_model(server) is None, timeout, f"{self.name}'s server to stop")

    # --- the user's own server --------------------------------------------------------------------------------
    def server(self, method: str, path: str, server: str = "", token: str | None = None, **kw) -> requests.Response:
        prefix = f"/user/{self.name}/{server + '/' if server else ''}"
        headers = {"Authorization": f"token {token or self.token}", **kw.pop("headers", {})}
        return requests.request(
            method, f"{self.url}{prefix}{path.lstrip('/')}", headers=headers, timeout=60, allow_redirects=False, **kw
        )

    def browse(self, path: str) -> requests.Response:
        """GET a page of the user's server with the login cookie, following the OAuth dance like a browser."""
        return self.session.get(f"{self.url}/user/{self.name}/{path.lstrip('/')}", timeout=60)

    def start_kernel(self, name: str = "spynnaker") -> str:
        r = self.server("POST", "api/kernels", json={"name": name})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def execute(self, kernel_id: str, code: str, timeout: float = 180) -> dict:
        """Run code in a kernel through the server's websocket; return its stdout, stderr and error."""
        ws_url = self.url.replace("http", "ws", 1) + f"/user/{self.name}/api/kernels/{kernel_id}/channels"
        ws = websocket.create_connection(ws_url, header=[f"Authorization: token {self.token}"], timeout=timeout)
        msg_id = uuid.uuid4().hex
        ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": self.name,
                        "session": uuid.uuid4().hex,
                        "msg_type": "execute_request",
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "shell",
                    "buffers": [],
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": True,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                }
            )
        )
        out = {"stdout": "", "stderr": "", "error": None, "result": None}
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msg = json.loads(ws.recv())
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    out[content["name"]] += content["text"]
                elif kind == "error":
                    out["error"] = f"{content['ename']}: {content['evalue']}"
                elif kind == "execute_result":
                    out["result"] = content["data"].get("text/plain")
                elif kind == "status" and content["execution_state"] == "idle":
                    return out
        finally:
            ws.close()
        raise AssertionError(f"kernel did not finish within {timeout} s; so far: {out}")
