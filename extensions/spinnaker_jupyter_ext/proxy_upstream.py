"""The one place the extension reaches into upstream internals: jupyter-server-proxy's (checked against 4.6.0 only)
and tornado's (at the end: checked against tornado 6.6.1, as installed with jupyter_server 2.21.1).

jupyter-server-proxy has no setting that limits which local listener a route may reach, nor one that keeps the
user's credentials from being forwarded (it copies the browser's request as it came). Every route to a local port -
/proxy/<port>/, /proxy/absolute/<port>/, named entries such as `nrp`, started on demand or not, HTTP and websocket
alike - builds its upstream request through two methods of the base class ProxyHandler: get_client_uri() (the
target) and proxy_request_headers() (the headers); raw-socket entries connect through
RawSocketHandler._create_ws_connection(). Those three are wrapped here, once, for every handler:

- the target must be a listener of this server's own account (listeners.py), else 403 and nothing is sent;
- the headers and the query lose the user's credentials (forwarding.py).

Any other version of jupyter-server-proxy is not hooked: then the proxy guard refuses the routes this service
defines, /proxy/ and /nrp/ (fail closed), says why, and the server's log names the cause. tests/integration/test_isolation.py fails when the installed version or these methods change.
"""

from __future__ import annotations

import inspect
from functools import wraps

from tornado import web

from . import forwarding, listeners

CHECKED_VERSION = "4.6.0"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
# (module, class, method, parameters after self) as in the checked version.
HOOKS = (
    ("handlers", "ProxyHandler", "get_client_uri", ("protocol", "host", "port", "proxied_path")),
    ("handlers", "ProxyHandler", "proxy_request_headers", ()),
    ("rawsocket", "RawSocketHandler", "_create_ws_connection", ("proto",)),
)

_installed: str | None = None  # None: not yet tried; "" when installed; else why not


def _upstream(module: str):
    import importlib

    return importlib.import_module(f"jupyter_server_proxy.{module}")


def mismatch() -> str | None:
    """Why the installed jupyter-server-proxy cannot be hooked safely, or None."""
    try:
        import jupyter_server_proxy
    except ImportError:
        return "jupyter-server-proxy is not installed"
    version = getattr(jupyter_server_proxy, "__version__", "?")
    if version != CHECKED_VERSION:
        return f"jupyter-server-proxy {version} is not the version this service was checked against ({CHECKED_VERSION})"
    for module, cls_name, method, params in HOOKS:
        func = getattr(getattr(_upstream(module), cls_name, None), method, None)
        if func is None or tuple(inspect.signature(func).parameters)[1:] != params:
            return f"jupyter-server-proxy's {cls_name}.{method} is not what this service was checked against"
    return None


def refusal(port: int, host: str = "localhost", unix_socket: str | None = None) -> str | None:
    """Why a route must not reach <host>:<port> (or <unix_socket>), or None when it may."""
    if unix_socket:
        if listeners.unix_socket_owner(unix_socket) == "other":
            return "The socket behind this route belongs to another account on this machine: nothing was sent to it."
        return None
    if host not in LOCAL_HOSTS:
        return None  # other hosts: the server's host_allowlist decides (this service allows none)
    if listeners.recent_owner(int(port)) == "other":
        return f"Port {port} is in use by another account on this machine, not by your server: nothing was sent to it."
    return None


def _login_cookie(handler) -> str | None:
    try:
        return handler.identity_provider.get_cookie_name(handler)
    except Exception:  # no identity provider (tests, standalone): the jupyterhub-* and _xsrf cookies still go
        return None


def _guard_get_client_uri(original):
    @wraps(original)
    def get_client_uri(self, protocol, host, port, proxied_path):
        refused = refusal(port, host, getattr(self, "unix_socket", None))
        if refused:
            self.log.warning("proxy: refused %s:%s for %s: another account's listener", host, port, self.request.path)
            raise web.HTTPError(403, refused)
        return forwarding.scrub_uri(original(self, protocol, host, port, proxied_path))

    return get_client_uri


def _scrub_proxy_request_headers(original):
    @wraps(original)
    def proxy_request_headers(self):
        return forwarding.scrub_headers(original(self), _login_cookie(self))

    return proxy_request_headers


def _guard_create_ws_connection(original):
    @wraps(original)
    def _create_ws_connection(self, proto):
        refused = refusal(self.port, "localhost", self.unix_socket)
        if refused:
            raise OSError(refused)  # what a failed connection raises: the handler closes the websocket
        return original(self, proto)

    return _create_ws_connection


WRAPPERS = {
    "get_client_uri": _guard_get_client_uri,
    "proxy_request_headers": _scrub_proxy_request_headers,
    "_create_ws_connection": _guard_create_ws_connection,
}


def install() -> str | None:
    """Hook jupyter-server-proxy (once per process). Returns None when hooked, else why not (then nothing was
    changed and the proxy routes must stay closed)."""
    global _installed
    if _installed is None:
        problem = mismatch()
        if problem is None:
            for module, cls_name, method, _ in HOOKS:
                cls = getattr(_upstream(module), cls_name)
                setattr(cls, method, WRAPPERS[method](getattr(cls, method)))
        _installed = problem or ""
    return _installed or None


def installed() -> bool:
    return _installed == ""


# --- tornado 6.6.1 (not pinned itself: the version jupyter_server 2.21.1 brings; tests/unit/test_upstream.py) -------
TORNADO_CHECKED = "6.6.1"


def insert_first_rules(web_app, rules: list) -> None:
    """Put `rules` ahead of every route the application has (jupyter-server-proxy's included).

    tornado's public `Application.add_handlers` puts new rules after every rule added before them (just ahead of the
    final wildcard rule), so behind jupyter_server's and jupyter-server-proxy's; this inserts at the front of the
    default router instead, wrapping the rules as add_handlers does, in tornado's private
    `tornado.web._ApplicationRouter`."""
    from tornado.routing import HostMatches, Rule
    from tornado.web import _ApplicationRouter

    web_app.default_router.rules.insert(0, Rule(HostMatches(".*"), _ApplicationRouter(web_app, rules)))


def finished(handler) -> bool:
    """Whether the handler's response is already finished (e.g. jupyter_server's `prepare` redirected to the login):
    tornado's private `RequestHandler._finished`, which has no public reader."""
    return handler._finished
