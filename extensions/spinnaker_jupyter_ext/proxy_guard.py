"""Lock jupyter-server-proxy down to the ports the deployment names.

Upstream, /proxy/<port>/ reaches ANY local port and /proxy/<host>:<port>/ other hosts. A handler placed ahead of
jupyter-server-proxy's refuses every /proxy/ target except the allowed local ports, and refuses a local port whose
listener belongs to another account (on a shared host, port 9000 of one user is not another user's NRP).
"""

from __future__ import annotations

import os
import time
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.routing import HostMatches, PathMatches, Rule
from tornado.web import _ApplicationRouter

NOT_INSTALLED = """<!doctype html><html><head><meta charset="utf-8"><title>NRP not installed</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>The Neurorobotics Platform is not installed here</h1>
<p>This SpiNNaker Jupyter service runs without the Neurorobotics Platform (NRP), so nothing answers on port {port}.</p>
<p>PyNN notebooks, terminals and the sPyNNaker kernels work as usual. If you need NRP robotics sessions, ask the
service's operators for the NRP-enabled server image.</p></body></html>"""

NOT_RUNNING = """<!doctype html><html><head><meta charset="utf-8"><title>NRP not running</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>The Neurorobotics Platform is not running yet</h1>
<p>Open a terminal (File &rarr; New &rarr; Terminal) and run <code>cle-nginx</code>, then <code>cle-start</code>.
When it has started, reload this page.</p></body></html>"""


def listener_uid(port: int) -> int | None:
    """The uid owning a socket listening on 127.0.0.1/0.0.0.0:<port> (from /proc/net/tcp), or None."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, state, uid = fields[1], fields[3], fields[7]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                        return int(uid)
        except OSError:
            continue
    return None


_RECENT: dict[int, tuple[float, int | None]] = {}
RECHECK_AFTER = 1.0  # seconds: a page of the NRP loads dozens of assets; /proc/net/tcp is read once for them


def _listener_uid_recent(port: int) -> int | None:
    now = time.monotonic()
    seen = _RECENT.get(port)
    if seen is None or now - seen[0] > RECHECK_AFTER:
        seen = _RECENT[port] = (now, listener_uid(port))
    return seen[1]


def verdict(target: str, allowed_ports: set[int], nrp_port: int, nrp_installed: bool) -> tuple[int, str] | None:
    """None if jupyter-server-proxy may serve /proxy/<target>/; else (status, message or page)."""
    if not target.isdigit() or int(target) not in allowed_ports:
        allowed = ", ".join(str(p) for p in sorted(allowed_ports)) or "none"
        return 403, f"/proxy/{target}/ is not reachable on this service. Local ports that are: {allowed}."
    port = int(target)
    uid = _listener_uid_recent(port)
    if uid is None:
        if port == nrp_port:
            return (503, NOT_RUNNING) if nrp_installed else (404, NOT_INSTALLED.format(port=port))
        return 502, f"Nothing is listening on port {port} in your server."
    if uid != os.getuid():
        return 403, f"Port {port} is in use by another account on this machine, not by your server."
    return None


class RefusedProxyTarget(PathMatches):
    """Matches only the /proxy/ requests that must not reach jupyter-server-proxy; the rest fall through."""

    def __init__(self, pattern, **settings):
        super().__init__(pattern)
        self.settings = settings

    def match(self, request):
        m = super().match(request)
        if m is None:
            return None
        target = m["path_args"][0]
        return None if verdict(target.decode(), **self.settings) is None else m


class RefusedProxyHandler(JupyterHandler):
    def initialize(self, **settings):
        self.settings_for_verdict = settings

    async def prepare(self):
        await super().prepare()  # jupyter_server authenticates here (and may redirect to the login)
        if self._finished:
            return
        if not self.current_user:
            raise web.HTTPError(403, "Log in to reach this server's proxy.")
        refused = verdict(self.path_args[0], **self.settings_for_verdict)
        if refused is None:  # started listening since the route was chosen: ask again
            self.redirect(self.request.uri)
            return
        status, body = refused
        if body.startswith("<!doctype"):
            self.set_status(status)
            self.finish(body)
        else:
            raise web.HTTPError(status, body)


def install_proxy_guard(web_app, allowed_ports: set[int], nrp_port: int, nrp_installed: bool) -> None:
    base = web_app.settings["base_url"]
    matcher = RefusedProxyTarget(url_path_join(base, r"/proxy/(?:absolute/)?([^/]+)(?:/.*)?$"),
                                 allowed_ports=allowed_ports, nrp_port=nrp_port, nrp_installed=nrp_installed)
    # First rule of the application: checked before jupyter-server-proxy's own routes.
    rule = Rule(HostMatches(".*"), _ApplicationRouter(web_app, [Rule(matcher, RefusedProxyHandler, matcher.settings)]))
    web_app.default_router.rules.insert(0, rule)
