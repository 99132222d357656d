"""The service process run by the hub (``python -m spinnaker_jupyter.access_token_service``): the tornado handlers
and :func:`main`, configured from the hub's JUPYTERHUB_* environment."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
from urllib.parse import urlsplit

from .lookup import AccessTokenLookup, ServiceError
from .tokens import DEFAULT_HUB_TIMEOUT, ENDPOINT, HUB_TIMEOUT_ENV, JOBS_URL_ENV, SERVICE_NAME, log

_AUTH_HEADER = re.compile(r"(?:token|bearer)\s+(\S+)\s*", re.IGNORECASE)


def token_from_header(value: str | None) -> str | None:
    """The token of an ``Authorization: token|bearer <token>`` header (scheme case-insensitive)."""
    if not value:
        return None
    m = _AUTH_HEADER.fullmatch(value.strip())
    return m.group(1) if m else None


def make_app(lookup: AccessTokenLookup, prefixes: list[str]):
    """A tornado Application answering GET <prefix>access-token for each prefix."""
    from tornado import web

    class AccessTokenHandler(web.RequestHandler):
        def set_default_headers(self) -> None:
            self.set_header("Content-Type", "application/json")
            self.set_header("Cache-Control", "no-store")

        async def get(self) -> None:
            token = token_from_header(self.request.headers.get("Authorization"))
            try:
                # ?user=: a job service asking for the token of the user whose job it runs (lookup checks its scope)
                answer = await lookup.lookup(token, self.get_query_argument("user", None) or None)
            except ServiceError as err:
                self.set_status(err.status)
                if err.status == 401:
                    self.set_header("WWW-Authenticate", 'token realm="jupyterhub"')
                self.finish(json.dumps({"error": err.error, "message": err.message}))
                return
            self.finish(json.dumps(answer))

    class InfoHandler(web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"service": lookup.name, "endpoint": ENDPOINT}))

    routes = []
    for prefix in dict.fromkeys(p if p.endswith("/") else p + "/" for p in prefixes):
        routes.append((re.escape(prefix + ENDPOINT) + "/?", AccessTokenHandler))
        routes.append((re.escape(prefix) + "?", InfoHandler))
    return web.Application(routes)


def _login_url() -> str:
    if os.environ.get("ACCESS_TOKEN_SERVICE_LOGIN_URL"):
        return os.environ["ACCESS_TOKEN_SERVICE_LOGIN_URL"]
    public_hub = os.environ.get("JUPYTERHUB_PUBLIC_HUB_URL")
    if public_hub:
        return public_hub.rstrip("/") + "/home"
    return os.environ.get("JUPYTERHUB_BASE_URL", "/").rstrip("/") + "/hub/home"


def main() -> None:
    """Run the service (hub-managed: configuration comes from the JUPYTERHUB_* environment)."""
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(asctime)s %(name)s] %(message)s")
    name = os.environ.get("JUPYTERHUB_SERVICE_NAME", SERVICE_NAME)
    service_url = urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{name}/")

    async def serve() -> None:
        lookup = AccessTokenLookup(
            api_url=os.environ["JUPYTERHUB_API_URL"],
            api_token=os.environ["JUPYTERHUB_API_TOKEN"],
            name=name,
            login_url=_login_url(),
            request_timeout=float(os.environ.get(HUB_TIMEOUT_ENV) or DEFAULT_HUB_TIMEOUT),
            jobs_url=os.environ.get(JOBS_URL_ENV) or None,  # per-run boards: whose jobs run (job owners' tokens)
        )
        # also answer at /services/<name>/ when the hub has a base_url: spinnman asks there
        app = make_app(lookup, [prefix, f"/services/{name}/"])
        server = app.listen(service_url.port, service_url.hostname or "127.0.0.1", xheaders=True)
        log.info("Listening on %s (prefix %s)", service_url.geturl(), prefix)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # the hub stops services with SIGINT, then SIGTERM: honour both, even if SIGINT was
        # ignored by whoever started the hub
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("Stopping")
        server.stop()

    asyncio.run(serve())
