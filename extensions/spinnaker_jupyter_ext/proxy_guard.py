"""Lock jupyter-server-proxy down to the ports the deployment names, with a clear page for what is refused.

Upstream, /proxy/<port>/ reaches ANY local port and /proxy/<host>:<port>/ other hosts. A handler placed ahead of
jupyter-server-proxy's refuses every /proxy/ target except the allowed local ports, and refuses a local port whose
listener belongs to another account (on a shared host, port 9000 of one user is not another user's NRP); the same
for the `nrp` entry's port, before the entry starts anything. The guard that no route can pass, whatever its name,
sits where jupyter-server-proxy connects (proxy_upstream.py); without it every proxy route stays closed.
"""

from __future__ import annotations

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.routing import PathMatches, Rule

from . import proxy_upstream
from .listeners import listener_uid, recent_owner  # noqa: F401 - listener_uid: tests/integration/test_hub.py

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


def verdict(target: str, allowed_ports: set[int], nrp_port: int, nrp_installed: bool) -> tuple[int, str] | None:
    """None if jupyter-server-proxy may serve /proxy/<target>/; else (status, message or page)."""
    if not target.isdigit() or int(target) not in allowed_ports:
        allowed = ", ".join(str(p) for p in sorted(allowed_ports)) or "none"
        return 403, f"/proxy/{target}/ is not reachable on this service. Local ports that are: {allowed}."
    port = int(target)
    owner = recent_owner(port)
    if owner is None:
        if port == nrp_port:
            return (503, NOT_RUNNING) if nrp_installed else (404, NOT_INSTALLED.format(port=port))
        return 502, f"Nothing is listening on port {port} in your server."
    if owner != "ours":
        return 403, (
            f"Port {port} is in use by another account on this machine, not by your server: nothing was sent to it."
        )
    return closed()


def nrp_verdict(nrp_port: int | None) -> tuple[int, str] | None:
    """None if the `nrp` entry may serve (and start what serves) /nrp/; else (status, message). <nrp_port> is None
    when the entry listens on a private unix socket rather than a TCP port."""
    if nrp_port is not None and recent_owner(nrp_port) == "other":
        return 403, (
            f"The Neurorobotics Platform's port {nrp_port} is in use by another account on this machine, "
            "not by your server: nothing was sent to it, and your NRP was not started. Ask the "
            "service's operators."
        )
    return closed()


def closed() -> tuple[int, str] | None:
    """Every proxy route stays closed when the guard where jupyter-server-proxy connects could not be installed."""
    problem = proxy_upstream.install()
    if problem:
        return 503, f"Proxy routes are switched off on this server: {problem}. Ask the service's operators."
    return None


class RefusedRoute(PathMatches):
    """Matches only the requests of a proxy route that must not reach jupyter-server-proxy; the rest fall through."""

    def __init__(self, pattern, decide):
        super().__init__(pattern)
        self.decide = decide  # (path_args as str) -> None, or (status, message or page)

    def match(self, request):
        m = super().match(request)
        if m is None:
            return None
        return None if self.decide(*(a.decode() for a in m.get("path_args", []))) is None else m


class RefusedProxyHandler(JupyterHandler):
    def initialize(self, decide):
        self.decide = decide

    async def prepare(self):
        await super().prepare()  # jupyter_server authenticates here (and may redirect to the login)
        if proxy_upstream.finished(self):  # jupyter_server redirected to the login
            return
        if not self.current_user:
            raise web.HTTPError(403, "Log in to reach this server's proxy.")
        refused = self.decide(*self.path_args)
        if refused is None:  # the listener changed since the route was chosen: ask again
            self.redirect(self.request.uri)
            return
        status, body = refused
        if body.startswith("<!doctype"):
            self.set_status(status)
            self.finish(body)
        else:
            raise web.HTTPError(status, body)


def install_proxy_guard(
    web_app, allowed_ports: set[int], nrp_port: int, nrp_installed: bool, nrp_tcp: bool = True
) -> str | None:
    """<nrp_tcp>: the `nrp` entry reaches its NRP on TCP port <nrp_port> (else on a private unix socket).
    Returns why every proxy route stays closed, or None."""
    base = web_app.settings["base_url"]
    routes = [
        (
            url_path_join(base, r"/proxy/(?:absolute/)?([^/]+)(?:/.*)?$"),
            lambda target: verdict(target, allowed_ports, nrp_port, nrp_installed),
        ),
        (url_path_join(base, r"/nrp(?:/.*)?$"), lambda: nrp_verdict(nrp_port if nrp_tcp else None)),
    ]
    rules = [Rule(RefusedRoute(pattern, decide), RefusedProxyHandler, {"decide": decide}) for pattern, decide in routes]
    proxy_upstream.insert_first_rules(web_app, rules)  # checked before jupyter-server-proxy's own routes
    return proxy_upstream.install()
