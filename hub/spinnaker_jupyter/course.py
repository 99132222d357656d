"""Course mode: a teacher starts the servers of a class before it begins, so that students find theirs running.

`spinnaker-jupyter course start GROUP` (or `--users a,b,c`) asks the running hub to start the default server of
every member of the hub group (or of each named user), through the same start queue as a login (spawn_queue.py: a
few at a time, first come first served), then prints each one's progress until all are ready, failed, or the wait
ends. The hub's admin endpoints behind it, for scripts:

  POST /hub/api/spinnaker/course/start   {"group": "course-a"} or {"users": ["amy", "ben"]}   (202)
  GET  /hub/api/spinnaker/course?group=course-a  |  ?users=amy,ben                          (each server's state)

Both need the `admin:servers` scope (admins; and the `course-manager` service whose token the command reads from
data_dir/hub, mode 0600). Registered with ``JupyterHub.extra_handlers`` as boards/handlers.py's are (deprecated since
JupyterHub 3.1, still working in 6.1): starting servers needs the hub's own spawn path, which a service has not.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .config import ConfigError, Deployment, write_secret
from .upstream import add_hub_handlers, start_error

SERVICE = "course-manager"
SCOPES = ["admin:servers", "list:users", "read:users", "read:groups"]


def token_path(d: Deployment) -> Path:
    return d.hub_dir / f"{SERVICE}-token"


def configure(c, d: Deployment) -> tuple[dict, dict]:
    """The endpoints, and the service (with its role) whose token `course start` uses."""
    add_hub_handlers(c, _handlers())  # deprecated JupyterHub.extra_handlers, and why: upstream.py
    path = token_path(d)
    if not path.exists():
        write_secret(path, secrets.token_hex(32))
    return (
        {"name": SERVICE, "api_token": path.read_text().strip(), "display": False},
        {"name": SERVICE, "services": [SERVICE], "scopes": list(SCOPES)},
    )


# --------------------------------------------------------------------------------------------------- hub side
def server_state(user) -> dict:
    """One user's default server as the teacher sees it: ready, starting (with its last progress message, e.g. its
    place in the start queue), failed (why) or stopped."""
    spawner = user.spawners.get("") if "" in user.orm_user.orm_spawners else None
    if spawner is None:
        return {"user": user.name, "state": "stopped"}
    if spawner.ready:
        return {"user": user.name, "state": "ready"}
    if spawner.pending == "spawn":
        events = getattr(spawner, "_progress_events", None) or []
        return {"user": user.name, "state": "starting", "message": events[-1]["message"] if events else ""}
    if spawner.pending:
        return {"user": user.name, "state": spawner.pending}
    e = start_error(spawner)
    if e is not None:
        return {
            "user": user.name,
            "state": "failed",
            "message": getattr(e, "jupyterhub_message", None) or getattr(e, "log_message", None) or str(e),
        }
    return {"user": user.name, "state": "stopped"}


def _handlers() -> list:
    from jupyterhub import orm
    from jupyterhub.apihandlers.base import APIHandler
    from jupyterhub.scopes import needs_scope
    from tornado import web

    class CourseMixin:
        def course_users(self, group: str | None, names: list[str]) -> tuple[list, list[str]]:
            """The hub users named by a group or a list (in that order), and the names that are not hub users."""
            if group:
                orm_group = orm.Group.find(self.db, group)
                if orm_group is None:
                    raise web.HTTPError(
                        404,
                        f"No hub group {group!r}: create it and add the students first "
                        f"(admin page, or POST /hub/api/groups/{group}/users)",
                    )
                names = sorted(u.name for u in orm_group.users)
            users, unknown = [], []
            for name in dict.fromkeys(names):
                user = self.find_user(name)
                (users.append(user) if user is not None else unknown.append(name))
            return users, unknown

    class CourseStartHandler(CourseMixin, APIHandler):
        @needs_scope("admin:servers")
        async def post(self) -> None:
            body = self.get_json_body() or {}
            group, names = body.get("group"), body.get("users") or []
            if bool(group) == bool(names) or not isinstance(names, list):
                raise web.HTTPError(400, 'Give either {"group": NAME} or {"users": [NAME, ...]}')
            users, unknown = self.course_users(group, [str(n) for n in names])
            started, running, refused = [], [], {}
            requests = []
            for user in users:  # (in this order: the start queue is first come, first served)
                spawner = user.get_spawner("", replace_failed=True)
                if spawner.ready or spawner.pending:
                    running.append(user.name)
                    continue
                requests.append((user, asyncio.ensure_future(self.spawn_single_user(user, ""))))
            if requests:  # a refusal (a full start queue) comes at once; the accepted starts go on in the hub
                await asyncio.wait([r for _, r in requests], timeout=1)
            for user, request in requests:
                if request.done() and request.exception() is not None:
                    e = request.exception()
                    refused[user.name] = (
                        getattr(e, "jupyterhub_message", None) or getattr(e, "log_message", None) or str(e)
                    )
                else:
                    started.append(user.name)
                    request.add_done_callback(lambda f: f.cancelled() or f.exception())  # (seen by server_state)
            self.log.info(
                "Course start (%s): %d started, %d already running, %d refused, %d unknown",
                group or "list",
                len(started),
                len(running),
                len(refused),
                len(unknown),
            )
            self.set_status(202)
            self.write(
                json.dumps({"started": started, "already_running": running, "refused": refused, "unknown": unknown})
            )

    class CourseStatusHandler(CourseMixin, APIHandler):
        @needs_scope("admin:servers")
        async def get(self) -> None:
            group = self.get_argument("group", None)
            names = [n for n in self.get_argument("users", "").split(",") if n]
            if bool(group) == bool(names):
                raise web.HTTPError(400, "Give either ?group=NAME or ?users=a,b,c")
            users, unknown = self.course_users(group, names)
            self.write(json.dumps({"servers": [server_state(u) for u in users], "unknown": unknown}))

    return [(r"/api/spinnaker/course/start/?", CourseStartHandler), (r"/api/spinnaker/course/?", CourseStatusHandler)]


# --------------------------------------------------------------------------------------------------- operator CLI
class _Hub:
    def __init__(self, d: Deployment):
        self.base = f"http://127.0.0.1:{d['proxy']['hub_port']}{d['hub']['base_url']}hub/api"
        path = token_path(d)
        if not path.exists():
            raise ConfigError(
                f"{path} does not exist: start the hub (`spinnaker-jupyter up`) first, or restart a hub "
                "started by an older version"
            )
        self.token_file, self.token = path, path.read_text().strip()

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 600) -> dict:
        req = urllib.request.Request(
            self.base + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("message", "")
            except ValueError:
                message = ""
            if e.code == 403:
                message = (
                    f"the hub refused the token in {self.token_file} (the hub was started before it existed): "
                    "restart the hub"
                )
            raise ConfigError(f"course: {message or e.reason} (HTTP {e.code})") from None
        except urllib.error.URLError as e:
            raise ConfigError(
                f"course: the hub does not answer at {self.base} ({e.reason}): is it running (`spinnaker-jupyter up`)?"
            ) from None


def cli_course_start(d: Deployment, group: str | None, users: list[str], wait: float, out=sys.stdout) -> int:
    """Start the servers of a group or list, then print each one's progress until all are ready or failed (or
    `wait` seconds passed; 0: do not wait). Exit status 0 when every server is ready (or started, without wait)."""
    if bool(group) == bool(users):
        raise ConfigError("course start: give a hub GROUP or --users a,b,c (not both)")
    hub = _Hub(d)
    who = f"group {group}" if group else f"{len(users)} users"
    print(f"Starting the servers of {who} (a few at a time; the others wait in line)", file=out, flush=True)
    answer = hub.call("POST", "/spinnaker/course/start", {"group": group} if group else {"users": users})
    for name in answer["unknown"]:
        print(f"  {name}: no such hub user (they have never logged in, or the name is misspelt)", file=out)
    for name, why in answer["refused"].items():
        print(f"  {name}: refused: {why}", file=out)
    query = urllib.parse.urlencode({"group": group} if group else {"users": ",".join(users)})
    said: dict[str, str] = {}
    deadline = time.monotonic() + wait
    while True:
        servers = hub.call("GET", f"/spinnaker/course?{query}", timeout=60)["servers"]
        for s in servers:
            line = s["state"] + (f": {s['message']}" if s.get("message") else "")
            if said.get(s["user"]) != line:
                said[s["user"]] = line
                print(f"  {s['user']}: {line}", file=out, flush=True)
        counts = {state: sum(1 for s in servers if s["state"] == state) for state in ("ready", "starting", "failed")}
        done = counts["starting"] == 0
        if done or time.monotonic() >= deadline:
            break
        time.sleep(1)
    others = len(servers) - counts["ready"] - counts["starting"] - counts["failed"]
    print(
        f"{counts['ready']} of {len(servers)} ready, {counts['starting']} still starting, {counts['failed']} "
        f"failed"
        + (f", {others} not started" if others else "")
        + (f"; {len(answer['unknown'])} unknown" if answer["unknown"] else ""),
        file=out,
    )
    if not wait:
        return 0 if not answer["refused"] and not answer["unknown"] else 1
    return 0 if counts["ready"] == len(servers) and not answer["unknown"] else 1
