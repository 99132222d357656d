"""access-token-service: hand a user's own EBRAINS (OIDC) access token to that user's code.

sPyNNaker finds the bearer token for the SpiNNaker allocation server (spalloc) like this
(spinnman/spalloc/spalloc_allocator.py)::

    GET http://$JUPYTERHUB_SERVICE_HOST:$JUPYTERHUB_SERVICE_PORT/services/access-token-service/access-token
    Authorization: Token $JUPYTERHUB_API_TOKEN
    -> {"access_token": "..."}

This module is that service (run by the hub: ``python -m spinnaker_jupyter.access_token_service``)
plus the hub-side pieces that keep the token fresh. There is one token store only: the user's
``auth_state`` in the hub, written by the authenticator (oauthenticator's GenericOAuthenticator).

How a request is answered
-------------------------
1. The caller's token (``Authorization: token|bearer <hub API token>``, scheme case-insensitive)
   is resolved with ``GET /hub/api/user`` *using that token*. This is also what keeps the token
   fresh: a hub request authenticated as the user makes the hub call ``Authenticator.refresh_user``
   once ``Authenticator.auth_refresh_age`` seconds have passed since the last refresh
   (``BaseHandler.get_current_user`` -> ``refresh_auth``). oauthenticator's ``refresh_user`` checks
   the stored access token at the userinfo endpoint and, when it is refused, uses the refresh token;
   :func:`make_refresh_user_hook` adds a refresh *before* expiry (within ``margin`` seconds of it).
   The hub stores the result in auth_state (``auth_to_user``), where
   :func:`reconcile_auth_state_hook` stamps when the access token expires.
2. The user's auth_state is read with the service's own token: ``GET /hub/api/users/{name}``,
   which needs ``read:users:name`` (any of the read:users* scopes) and ``admin:auth_state``.
3. The access token is returned, unless it has expired: then the hub could not refresh it
   (refresh token revoked or expired) and the answer is 503 ``login_required``.

Requests are handled one at a time (steps 1-2 under one lock): two concurrent refreshes of one
user would redeem the same refresh token twice, and providers that detect refresh-token reuse
then revoke the whole grant.

Answers (JSON; every error is ``{"error": <code>, "message": <text>}``)
---------------------------------------------------------------------
* 200 ``{"access_token": str, "token_type": "Bearer", "expires_at": epoch seconds | null}``:
  the access token of the user who owns the calling token (the user's own API token or the
  ``JUPYTERHUB_API_TOKEN`` of one of the user's servers). There is no parameter to name a user:
  nobody, admins included, can get another user's token from this service.
* 401 ``missing_token`` (no or malformed Authorization header), ``invalid_token`` (the hub does
  not know the token).
* 403 ``not_a_user`` (a service's token: services have no EBRAINS identity),
  ``insufficient_scope`` (the token lacks ``access:services!service=access-token-service``,
  e.g. a user token created with restricted scopes).
* 503 ``login_required``: no stored login, no access token, or an expired one the hub could not
  refresh. The message tells the user to log in to the hub again.
* 502 ``hub_error``: the hub could not be asked; 500 ``misconfigured``: the service's role lacks
  ``admin:auth_state``.

Wiring (see :func:`service_definition` and :func:`authenticator_settings`)
------------------------------------------------------------------------
* ``c.JupyterHub.services.append(d["service"])``; ``c.JupyterHub.load_roles += d["roles"]``
  (service scopes ``admin:auth_state`` + ``read:users:name``, nothing else).
* ``c.JupyterHub.extra_user_scopes |= d["extra_user_scopes"]`` and
  ``c.Spawner.server_token_scopes = d["server_token_scopes"]``: users and their servers' tokens may
  use this service (``access:services!service=access-token-service``).
* ``c.Spawner.environment.update(d["spawner_environment"])``: JUPYTERHUB_SERVICE_HOST/PORT for
  spinnman (the service answers at ``/services/<name>/access-token`` on its own port, whatever the
  hub's base_url, so this may point at the service directly, or at the proxy when base_url is /).
* On the authenticator: ``enable_auth_state`` (+ ``JUPYTERHUB_CRYPT_KEY``), ``auth_refresh_age``
  shorter than ``margin``, ``refresh_user_hook`` and ``reconcile_auth_state_hook`` from
  :func:`authenticator_settings`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import signal
import sys
import time
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import quote, urlsplit

SERVICE_NAME = "access-token-service"
#: The endpoint's last path component (after the service prefix).
ENDPOINT = "access-token"
#: Scopes of the service's own role: read any user's name and auth_state, nothing else.
SERVICE_SCOPES = ("admin:auth_state", "read:users:name")
#: auth_state key holding when the access token expires (epoch seconds), see reconcile hook.
EXPIRES_AT_KEY = "access_token_expires_at"
#: Default: refresh the access token when it expires within this many seconds.
DEFAULT_REFRESH_MARGIN = 60.0
#: Default Authenticator.auth_refresh_age to pair with DEFAULT_REFRESH_MARGIN (must be smaller).
DEFAULT_AUTH_REFRESH_AGE = 30

log = logging.getLogger("access-token-service")


def access_scope(name: str = SERVICE_NAME) -> str:
    """The scope a token needs to use the service."""
    return f"access:services!service={name}"


# ------------------------------------------------------------------------------------------------
# token expiry (used on both sides)


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT access token (as Keycloak / EBRAINS IAM issue), else None.

    The signature is not checked: the value is only a hint for when to refresh.
    """
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = payload.get("exp")
    except (ValueError, AttributeError):
        return None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def access_token_expires_at(auth_state: Mapping[str, Any] | None) -> float | None:
    """When the stored access token expires (epoch seconds), or None if unknown.

    The earlier of the stamp written by :func:`reconcile_auth_state_hook` and the token's own
    ``exp`` claim when it is a JWT.
    """
    if not auth_state or not auth_state.get("access_token"):
        return None
    candidates = [jwt_expiry(auth_state["access_token"])]
    stamp = auth_state.get(EXPIRES_AT_KEY)
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
        candidates.append(float(stamp))
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def stamp_access_token_expiry(
    new_state: Mapping[str, Any] | None,
    existing_state: Mapping[str, Any] | None,
    now: float | None = None,
) -> dict | None:
    """Return ``new_state`` with ``EXPIRES_AT_KEY`` set.

    Same access token as before: keep the earlier stamp. New token: now + ``expires_in`` of the
    token response (else the JWT ``exp``, else None).
    """
    if not new_state:
        return new_state  # type: ignore[return-value]
    state = dict(new_state)
    token = state.get("access_token")
    if not token:
        state.pop(EXPIRES_AT_KEY, None)
        return state
    if (
        existing_state
        and existing_state.get("access_token") == token
        and existing_state.get(EXPIRES_AT_KEY) is not None
    ):
        state[EXPIRES_AT_KEY] = existing_state[EXPIRES_AT_KEY]
        return state
    now = time.time() if now is None else now
    expires_in = (state.get("token_response") or {}).get("expires_in")
    try:
        state[EXPIRES_AT_KEY] = now + float(expires_in)
    except (TypeError, ValueError):
        state[EXPIRES_AT_KEY] = jwt_expiry(token)
    return state


# ------------------------------------------------------------------------------------------------
# hub side: authenticator hooks


def reconcile_auth_state_hook(authenticator: Any, authenticated: Mapping[str, Any],
                              existing_auth_state: Mapping[str, Any] | None) -> dict | None:
    """``Authenticator.reconcile_auth_state_hook`` (JupyterHub >= 6): record the token's expiry.

    Called by the hub whenever it stores auth_state after a login or a refresh.
    """
    return stamp_access_token_expiry(authenticated.get("auth_state"), existing_auth_state)


def make_refresh_user_hook(
    margin: float = DEFAULT_REFRESH_MARGIN,
) -> Callable[[Any, Any, dict | None], Awaitable[Any]]:
    """An oauthenticator ``refresh_user_hook`` that refreshes the access token before it expires.

    oauthenticator's own ``refresh_user`` only refreshes once the provider refuses the token. This
    hook steps in when the stored token expires within ``margin`` seconds: it redeems the refresh
    token with the authenticator's own methods and returns the new auth model (the hub stores it).
    In every other case it returns None, i.e. oauthenticator's default behaviour.
    Returns False (the user must log in again) when the refresh token is refused.
    """

    async def refresh_user_hook(authenticator: Any, user: Any, auth_state: dict | None) -> Any:
        if not auth_state:
            return None
        expires_at = access_token_expires_at(auth_state)
        if expires_at is None or expires_at - time.time() > margin:
            return None
        refresh_token = auth_state.get("refresh_token")
        token_to_auth_model = getattr(authenticator, "_token_to_auth_model", None)
        if not refresh_token or token_to_auth_model is None:
            return None
        authenticator.log.info("Refreshing the access token of %s before it expires", user.name)
        params = authenticator.build_refresh_token_request_params(refresh_token)
        try:
            token_info = await authenticator.get_token_info(None, params)
        except Exception as err:  # same policy as oauthenticator's refresh_user
            authenticator.log.warning(
                "Could not refresh the access token of %s (%s): a new login is needed", user.name, err
            )
            return False
        if not token_info.get("refresh_token"):
            token_info["refresh_token"] = refresh_token
        try:
            return await token_to_auth_model(token_info)
        except Exception as err:
            authenticator.log.error("The refreshed access token of %s does not work: %s", user.name, err)
            return False

    refresh_user_hook.margin = margin  # type: ignore[attr-defined]
    return refresh_user_hook


def authenticator_settings(
    *,
    refresh_margin: float = DEFAULT_REFRESH_MARGIN,
    auth_refresh_age: int = DEFAULT_AUTH_REFRESH_AGE,
) -> dict[str, Any]:
    """Settings for ``c.GenericOAuthenticator`` that keep auth_state's access token fresh.

    ``auth_refresh_age`` < ``refresh_margin`` guarantees that a token handed out right after a hub
    request for the user has at least ``refresh_margin - auth_refresh_age`` seconds left.
    """
    if not 0 < auth_refresh_age < refresh_margin:
        raise ValueError(
            f"auth_refresh_age ({auth_refresh_age}) must be > 0 and < refresh_margin ({refresh_margin})"
        )
    return {
        "enable_auth_state": True,
        "refresh_pre_spawn": True,
        "auth_refresh_age": auth_refresh_age,
        "refresh_user_hook": make_refresh_user_hook(refresh_margin),
        "reconcile_auth_state_hook": reconcile_auth_state_hook,
    }


def service_definition(
    url: str = "http://127.0.0.1:8091",
    *,
    name: str = SERVICE_NAME,
    python: str = sys.executable,
    environment: Mapping[str, str] | None = None,
    user_host: str | None = None,
    user_port: int | None = None,
) -> dict[str, Any]:
    """Everything the hub config needs for this service.

    Returns ``{"service": <c.JupyterHub.services entry>, "roles": [<load_roles entries>],
    "extra_user_scopes": [...], "server_token_scopes": [...], "spawner_environment": {...}}``.
    ``url`` is where the service listens (hub-managed: the hub passes it as JUPYTERHUB_SERVICE_URL).
    ``user_host``/``user_port`` is how user servers reach it (default: the host/port of ``url``).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
        raise ValueError(f"service url must be http(s)://host:port, got {url!r}")
    scope = access_scope(name)
    return {
        "service": {
            "name": name,
            "url": url,
            "command": [python, "-m", "spinnaker_jupyter.access_token_service"],
            "display": False,
            "environment": dict(environment or {}),
        },
        "roles": [
            {
                "name": name,
                "description": "Read users' names and auth_state, to hand users their own access token",
                "scopes": list(SERVICE_SCOPES),
                "services": [name],
            }
        ],
        "extra_user_scopes": [scope],
        "server_token_scopes": ["users:activity!user", "access:servers!server", scope],
        "spawner_environment": {
            "JUPYTERHUB_SERVICE_HOST": user_host or parts.hostname,
            "JUPYTERHUB_SERVICE_PORT": str(user_port or parts.port),
        },
    }


# ------------------------------------------------------------------------------------------------
# the service

_AUTH_HEADER = re.compile(r"(?:token|bearer)\s+(\S+)\s*", re.IGNORECASE)


def token_from_header(value: str | None) -> str | None:
    """The token of an ``Authorization: token|bearer <token>`` header (scheme case-insensitive)."""
    if not value:
        return None
    m = _AUTH_HEADER.fullmatch(value.strip())
    return m.group(1) if m else None


class HubError(Exception):
    pass


class ServiceError(Exception):
    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


class AccessTokenLookup:
    """The lookup itself, independent of the web framework (easy to test)."""

    def __init__(self, api_url: str, api_token: str, name: str = SERVICE_NAME,
                 login_url: str | None = None, request_timeout: float = 30):
        from tornado.httpclient import AsyncHTTPClient

        self.api_url = api_url.rstrip("/")
        self.api_token = api_token
        self.name = name
        self.login_url = login_url
        self.request_timeout = request_timeout
        self.client = AsyncHTTPClient()
        # One hub round trip at a time: two concurrent refreshes of one user would redeem the same
        # refresh token twice (providers with reuse detection then revoke the whole grant).
        self._lock = asyncio.Lock()

    async def _hub_get(self, path: str, token: str) -> tuple[int, Any]:
        from tornado.httpclient import HTTPClientError

        try:
            response = await self.client.fetch(
                self.api_url + path,
                headers={"Authorization": f"token {token}", "Accept": "application/json"},
                request_timeout=self.request_timeout,
                raise_error=False,
            )
        except (OSError, HTTPClientError) as err:
            raise HubError(f"cannot reach the hub API: {err}") from err
        if response.code == 599:
            raise HubError(f"cannot reach the hub API: {response.error}")
        try:
            body = json.loads(response.body) if response.body else None
        except ValueError:
            body = None
        return response.code, body

    def _login_required(self, why: str) -> ServiceError:
        where = f" at {self.login_url}" if self.login_url else ""
        return ServiceError(
            503,
            "login_required",
            f"{why} Open the hub{where} in your browser to log in again, then retry.",
        )

    async def lookup(self, caller_token: str | None) -> dict[str, Any]:
        """The answer for a caller token; raises :class:`ServiceError`."""
        from jupyterhub.services.auth import check_scopes

        if not caller_token:
            raise ServiceError(401, "missing_token",
                               "Send your hub API token: 'Authorization: token <JUPYTERHUB_API_TOKEN>'.")
        async with self._lock:
            try:
                # resolves the caller, and makes the hub refresh the user's auth when due
                status, whoami = await self._hub_get("/user", caller_token)
                if status in (401, 403):
                    raise ServiceError(401, "invalid_token", "The hub does not accept this token.")
                if status != 200 or not isinstance(whoami, dict):
                    raise ServiceError(502, "hub_error", f"The hub answered {status} to GET /hub/api/user.")
                if whoami.get("kind") != "user":
                    raise ServiceError(403, "not_a_user",
                                       "Only a user's token (or a user's server's token) can get an access token.")
                if not check_scopes(access_scope(self.name), set(whoami.get("scopes") or [])):
                    raise ServiceError(403, "insufficient_scope",
                                       f"This token lacks the scope {access_scope(self.name)}.")
                username = whoami["name"]
                status, model = await self._hub_get(f"/users/{quote(username, safe='')}", self.api_token)
            except HubError as err:
                raise ServiceError(502, "hub_error", str(err)) from err
        if status == 404:
            raise ServiceError(401, "invalid_token", "The token's user no longer exists.")
        if status != 200 or not isinstance(model, dict) or model.get("name") != username:
            raise ServiceError(502, "hub_error", f"The hub answered {status} to GET /hub/api/users/<name>.")
        if "auth_state" not in model:
            log.error("The service cannot read auth_state: its role needs %s", " + ".join(SERVICE_SCOPES))
            raise ServiceError(500, "misconfigured", "The access-token-service cannot read auth_state.")
        auth_state = model["auth_state"] or {}
        token = auth_state.get("access_token")
        if not token:
            raise self._login_required("No access token is stored for you.")
        expires_at = access_token_expires_at(auth_state)
        if expires_at is not None and expires_at <= time.time():
            log.warning("The access token of %s has expired and could not be refreshed", username)
            raise self._login_required("Your login has expired and could not be renewed.")
        log.info("Access token handed to %s (expires in %s s)", username,
                 "?" if expires_at is None else int(expires_at - time.time()))
        return {"access_token": token, "token_type": "Bearer", "expires_at": expires_at}


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
                answer = await lookup.lookup(token)
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


if __name__ == "__main__":
    main()
