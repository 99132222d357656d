"""configurable-http-proxy, started so that its auth token only ever reaches the proxy the hub started.

Upstream (JupyterHub 6.1.1 `ConfigurableHTTPProxy.start`) launches the proxy, waits until *something* answers on
the public and API ports, and the hub then sends the auth token to the API port: a program already listening
there gets the token, and one on the public port gets users' passwords ("JupyterHub is now running" meanwhile).
Here the ports must be free before the proxy starts, and the listeners must be the proxy's own process before the
hub talks to it. A start that fails for any reason leaves no proxy (nor hub-managed service) behind: they run in
sessions of their own and would otherwise outlive the hub, the proxy on the public port. So does a SIGTERM (an
operator's stop) before JupyterHub installs its own handler, at the end of its start."""

from __future__ import annotations

import atexit
from urllib.parse import urlparse

from jupyterhub.proxy import ConfigurableHTTPProxy

from . import preflight
from .config import ConfigError
from .upstream import handle_sigterm_until_running, managed_service_processes, remove_proxy_files


def _host_port(url: str) -> tuple[str, int] | None:
    u = urlparse(url)
    return (u.hostname or "", u.port) if u.scheme in ("http", "https") and u.port else None


class CheckedProxy(ConfigurableHTTPProxy):
    _running_hub = False  # set once the hub is up: until then an exit of the hub takes the proxy with it

    def _ports(self) -> list[tuple[str, str, int]]:
        named = [("hub.port", self.public_url), ("proxy.api_port", self.api_url)]
        if not self._running_hub:  # at the first start; a restarted proxy finds the hub and services listening
            named.append(("proxy.hub_port", self.app.hub.bind_url))
            named += [
                (f"the port of service {s['name']}", s["url"])
                for s in self.app.services
                if s.get("command") and s.get("url")
            ]  # the hub-managed ones (e.g. access-token-service)
        return [(key, *hp) for key, url in named if (hp := _host_port(url))]

    async def start(self):
        try:
            preflight.check_ports(self._ports())
        except ConfigError as e:
            raise RuntimeError(str(e)) from None
        if not self._running_hub:
            atexit.register(self._stop_unless_kept)
            handle_sigterm_until_running(self._stop_during_start)
        try:
            await super().start()
            pid = self.proxy_process.pid
            for key, url in (("hub.port", self.public_url), ("proxy.api_port", self.api_url)):
                preflight.check_listener_is(pid, _host_port(url)[1], key)
        except BaseException as e:
            self._stop_process()
            if isinstance(e, ConfigError):
                raise RuntimeError(str(e)) from None
            raise

    async def check_routes(self, *args, **kwargs):
        # The last step of JupyterHub.start before "JupyterHub is now running".
        self._running_hub = True
        return await super().check_routes(*args, **kwargs)

    def _stop_process(self):
        process = getattr(self, "proxy_process", None)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except Exception:
                process.kill()
        remove_proxy_files(self)  # its pid file (upstream.py)

    def _stop_during_start(self, signum, frame):
        """SIGTERM while the hub starts: an exit through atexit (_stop_unless_kept), as a failed start does, instead
        of SIGTERM's default end, which would leave the proxy and services running."""
        self._running_hub = False  # (also after check_routes: the hub's own clean-up is not installed yet)
        self.log.warning("SIGTERM during start-up: ending the proxy and the services started so far")
        raise SystemExit(128 + signum)

    def _stop_unless_kept(self):
        """At the hub's exit: a hub that never came up takes its proxy and managed services along (they run in
        sessions of their own); a running one does as configured (JupyterHub.cleanup_proxy)."""
        if not self._running_hub:
            # (tests/integration/test_startup_safety.py fails on a service left running)
            for proc in managed_service_processes(self.app):
                if proc.poll() is None:
                    proc.terminate()
        if not self._running_hub or self.app.cleanup_proxy:
            self._stop_process()
