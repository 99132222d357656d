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
   (``BaseHandler.get_current_user`` -> ``refresh_auth``), which calls oauthenticator's
   ``refresh_user`` and so :func:`make_refresh_user_hook`. The hook runs one refresh per user at a
   time (a *flight*, joined by every concurrent request of that user): it checks the token at the
   userinfo endpoint, or redeems the refresh token when the access token expires within ``margin``
   seconds or is refused. Nobody waits for it longer than ``provider_timeout`` seconds, or a moment
   while the stored access token is still valid (that token is then served); the flight stores its
   result in auth_state when it lands, where :func:`reconcile_auth_state_hook` stamps when the
   access token expires.
2. The user's auth_state is read with the service's own token: ``GET /hub/api/users/{name}``,
   which needs ``read:users:name`` (any of the read:users* scopes) and ``admin:auth_state``.
3. The access token is returned, unless it has expired: then either the provider is not answering
   (a refresh is pending or could not reach it: 503 ``provider_unavailable``) or it refused the
   refresh token (revoked or expired: 503 ``login_required``).

Requests of different users never wait for one another; a refresh token is never redeemed twice
by concurrent requests (providers that detect refresh-token reuse revoke the whole grant).

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
* 503 ``login_required``: no stored login, no access token, or an expired one the provider
  refused to refresh. The message tells the user to log in to the hub again.
* 503 ``provider_unavailable``: the access token has expired and the identity provider is not
  answering (within ``provider_timeout``); the login is kept, the user is told to try again in
  a minute.
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
  shorter than ``margin``, ``http_request_kwargs`` (provider timeouts), ``refresh_user_hook`` and
  ``reconcile_auth_state_hook`` from :func:`authenticator_settings`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import inspect
import json
import logging
import os
import re
import signal
import sys
import time
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import quote, urlencode, urlsplit

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
#: Default: seconds anyone waits for the identity provider before being answered without it.
DEFAULT_PROVIDER_TIMEOUT = 10
#: A refresh-token request, once sent, is kept open this long: its answer holds the only refresh
#: token still valid where the provider rotates them (see make_refresh_user_hook).
REFRESH_REQUEST_LIFETIME = 600.0
#: Seconds a request holding a still-valid access token waits for a refresh in flight, before it is
#: served the stored token (enough for a healthy provider to answer).
PENDING_REFRESH_WAIT = 1.0
#: auth_state key: outcome of the last refresh-token request, ``{"state": "pending" | "unreachable" |
#: "refused", "since": epoch seconds}``; absent after a successful refresh or a login.
REFRESH_STATUS_KEY = "access_token_refresh"
#: The service's timeout for its requests to the hub (seconds), and the variable that sets it: the
#: hub may wait up to provider_timeout for the provider before it answers.
DEFAULT_HUB_TIMEOUT = 30.0
HUB_TIMEOUT_ENV = "ACCESS_TOKEN_SERVICE_HUB_TIMEOUT"

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


def _auth_model(authenticator: Any, token_info: Mapping[str, Any]) -> Awaitable[dict]:
    """The auth model a login with ``token_info`` would give (userinfo with its access token): oauthenticator's
    private API, fenced in upstream.py (upstream.token_to_auth_model)."""
    from .upstream import token_to_auth_model

    return token_to_auth_model(authenticator, token_info)


class RefreshRefused(Exception):
    """The provider answered the refresh-token request with a refusal (e.g. ``invalid_grant``)."""


def provider_unreachable(err: BaseException) -> bool:
    """Whether ``err`` means the provider did not answer (timeout, no connection, 5xx, 408, 429), as
    opposed to a definite answer. Only a definite refusal may send a user back to the login page."""
    from tornado import web
    from tornado.httpclient import HTTPClientError

    if isinstance(err, HTTPClientError):
        return _no_answer(err.code)
    if isinstance(err, web.HTTPError):  # EBRAINSAuthenticator turns "no answer" into a 503 page
        return err.status_code in (502, 503, 504)
    return isinstance(err, (OSError, asyncio.TimeoutError))


def _no_answer(code: int) -> bool:
    return code in (408, 429) or code >= 500  # (tornado: 599 = timeout or no connection)


def make_refresh_user_hook(
    margin: float = DEFAULT_REFRESH_MARGIN,
    *,
    provider_timeout: float = DEFAULT_PROVIDER_TIMEOUT,
    refresh_request_lifetime: float = REFRESH_REQUEST_LIFETIME,
    pending_wait: float = PENDING_REFRESH_WAIT,
) -> Callable[[Any, Any, dict | None], Awaitable[Any]]:
    """An oauthenticator ``refresh_user_hook``: one refresh per user at a time, shared by every
    request of that user, and nobody kept waiting on a hanging provider.

    For a user with a refresh token the hook decides everything (it never returns None then):

    * A *flight* per user does the work; every hub request that wants to refresh the user while it
      runs joins it instead of starting another (so a refresh token is never redeemed twice, which
      providers that rotate refresh tokens punish by revoking the whole grant).
    * The flight refreshes the access token when it expires within ``margin`` seconds (or is
      refused at userinfo); otherwise it checks the token at userinfo like oauthenticator does.
    * Callers wait for the flight ``provider_timeout`` seconds at most from its start, and only
      ``pending_wait`` seconds while the stored access token is still valid; then they go on with
      the stored login (True), and the flight stores its result itself when it comes.
    * The refresh-token request is kept open up to ``refresh_request_lifetime`` seconds: when a
      provider that has stalled answers late, its answer holds the only refresh token still valid
      (oidc-provider rotates on every use and revokes the grant when a used one comes back; Keycloak
      rotates too and, with "Revoke Refresh Token" on, refuses the old one). The new tokens are
      stored before anything else happens. Only if the provider takes longer than that is the
      request abandoned, and the next refresh has to present the same refresh token again:
      Keycloak's default accepts it, a strict provider refuses it and the user logs in again.
    * Outcome in auth_state (``REFRESH_STATUS_KEY``, read by the service): ``pending`` while a
      refresh-token request is open, ``unreachable`` when the provider could not be reached,
      ``refused`` when it refused the refresh token (only then does the hub get False: log in
      again); no key after a successful refresh.
    """
    from tornado.httpclient import AsyncHTTPClient

    flights: dict[str, tuple[float, asyncio.Future]] = {}
    # Refresh-token requests may stay open for minutes: a client of their own, so that they never
    # take the slots of the hub's shared client (proxy API calls, logins; 10 at a time by default).
    client: list = []

    def token_client() -> Any:
        if not client:
            client.append(AsyncHTTPClient(force_instance=True, max_clients=10000))
        return client[0]

    async def store(authenticator: Any, user: Any, state: dict, *, reconcile: bool) -> None:
        if reconcile and authenticator.reconcile_auth_state_hook:
            existing = await user.get_auth_state()
            state = authenticator.reconcile_auth_state_hook(authenticator, {"auth_state": state}, existing)
            if inspect.isawaitable(state):
                state = await state
        await user.save_auth_state(state)

    async def redeem(authenticator: Any, refresh_token: str) -> dict:
        from tornado.httpclient import HTTPRequest

        params = authenticator.build_refresh_token_request_params(refresh_token)
        request = HTTPRequest(authenticator.token_url, **{
            **authenticator.http_request_kwargs,
            "method": "POST",
            "headers": authenticator.build_token_info_request_headers(),
            "body": urlencode(params).encode(),
            "validate_cert": authenticator.validate_server_cert,
            # not connected: nothing was sent, give up soon; sent: wait for the answer
            "connect_timeout": provider_timeout,
            "request_timeout": refresh_request_lifetime,
        })
        response = await token_client().fetch(request, raise_error=False)
        try:
            body = json.loads(response.body) if response.body else None
        except ValueError:
            body = None
        if _no_answer(response.code):
            raise response.error or OSError(f"the token endpoint answered {response.code}")
        if not isinstance(body, dict) or response.code != 200 or not body.get("access_token"):
            why = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
            raise RefreshRefused(f"{response.code} {why or 'no access token in the answer'}")
        return body

    async def refresh(authenticator: Any, user: Any, auth_state: dict) -> Any:
        refresh_token = auth_state["refresh_token"]
        await store(authenticator, user, {**auth_state, REFRESH_STATUS_KEY: _status("pending")}, reconcile=False)
        try:
            token_info = await redeem(authenticator, refresh_token)
        except RefreshRefused as err:
            authenticator.log.warning("The refresh token of %s was refused (%s): a new login is needed",
                                      user.name, err)
            await store(authenticator, user, {**auth_state, REFRESH_STATUS_KEY: _status("refused")},
                        reconcile=False)
            return False
        except Exception as err:
            if not provider_unreachable(err):
                raise
            authenticator.log.warning("Could not refresh the access token of %s: the identity provider did "
                                      "not answer (%s); the login is kept", user.name, err)
            await store(authenticator, user, {**auth_state, REFRESH_STATUS_KEY: _status("unreachable")},
                        reconcile=False)
            return True
        if not token_info.get("refresh_token"):
            token_info["refresh_token"] = refresh_token
        # The old refresh token may be spent now: store the new tokens before anything else can fail.
        state = authenticator.build_auth_state_dict(token_info, auth_state.get(authenticator.user_auth_state_key))
        if inspect.isawaitable(state):
            state = await state
        await store(authenticator, user, dict(state), reconcile=True)
        authenticator.log.info("Refreshed the access token of %s", user.name)
        try:
            model = await _auth_model(authenticator, token_info)
        except Exception as err:
            if provider_unreachable(err):
                return True  # the new token is stored; userinfo is checked next time
            authenticator.log.error("The refreshed access token of %s does not work: %s", user.name, err)
            return False
        await store(authenticator, user, dict(model["auth_state"]), reconcile=True)
        return model

    async def fly(authenticator: Any, user: Any, auth_state: dict) -> Any:
        from tornado.httpclient import HTTPClientError

        expires_at = access_token_expires_at(auth_state)
        try:
            if expires_at is None or expires_at - time.time() > margin:
                # not due: check the token at userinfo, as oauthenticator would (groups, revocation)
                try:
                    return await _auth_model(authenticator, auth_state.get("token_response")
                                             or {"access_token": auth_state["access_token"]})
                except HTTPClientError as err:
                    if not 400 <= err.code < 500:
                        raise
                    authenticator.log.info("The provider refused the access token of %s: refreshing it", user.name)
            else:
                authenticator.log.info("Refreshing the access token of %s before it expires", user.name)
            return await refresh(authenticator, user, auth_state)
        except Exception as err:
            if not provider_unreachable(err):
                raise
            authenticator.log.warning("Could not check the login of %s: the identity provider did not answer "
                                      "(%s); the login is kept", user.name, err)
            return True

    def landed(name: str, flight: asyncio.Future) -> None:
        if flights.get(name, (0, None))[1] is flight:
            del flights[name]
        if not flight.cancelled() and flight.exception() is not None:
            log.error("Refreshing the login of %s failed: %r", name, flight.exception())

    async def refresh_user_hook(authenticator: Any, user: Any, auth_state: dict | None) -> Any:
        if not auth_state or not auth_state.get("refresh_token") or not auth_state.get("access_token"):
            return None  # nothing to redeem: oauthenticator's own check
        started, flight = flights.get(user.name, (0.0, None))
        if flight is None:
            started, flight = time.monotonic(), asyncio.ensure_future(fly(authenticator, user, auth_state))
            flights[user.name] = (started, flight)
            flight.add_done_callback(lambda f, name=user.name: landed(name, f))
        wait = started + provider_timeout - time.monotonic()
        expires_at = access_token_expires_at(auth_state)
        if expires_at is None or expires_at > time.time():
            wait = min(wait, pending_wait)  # a valid token is served rather than waited for
        try:
            result = await asyncio.wait_for(asyncio.shield(flight), max(wait, 0))
        except asyncio.TimeoutError:
            return True  # keep the stored login; the flight stores its result when it lands
        return copy.deepcopy(result)  # each request's handler adds to its model

    refresh_user_hook.margin = margin  # type: ignore[attr-defined]
    refresh_user_hook.provider_timeout = provider_timeout  # type: ignore[attr-defined]
    return refresh_user_hook


def _status(state: str) -> dict[str, Any]:
    return {"state": state, "since": time.time()}


def authenticator_settings(
    *,
    refresh_margin: float = DEFAULT_REFRESH_MARGIN,
    auth_refresh_age: int = DEFAULT_AUTH_REFRESH_AGE,
    provider_timeout: float = DEFAULT_PROVIDER_TIMEOUT,
) -> dict[str, Any]:
    """Settings for ``c.GenericOAuthenticator`` that keep auth_state's access token fresh.

    ``auth_refresh_age`` < ``refresh_margin`` guarantees that a token handed out right after a hub
    request for the user has at least ``refresh_margin - auth_refresh_age`` seconds left.
    ``provider_timeout`` bounds every request to the provider (``http_request_kwargs``) and every
    wait for a refresh (see :func:`make_refresh_user_hook`).
    """
    if not 0 < auth_refresh_age < refresh_margin:
        raise ValueError(
            f"auth_refresh_age ({auth_refresh_age}) must be > 0 and < refresh_margin ({refresh_margin})"
        )
    if not provider_timeout > 0:
        raise ValueError(f"provider_timeout ({provider_timeout}) must be > 0")
    return {
        "enable_auth_state": True,
        "refresh_pre_spawn": True,
        "auth_refresh_age": auth_refresh_age,
        "http_request_kwargs": {"connect_timeout": provider_timeout, "request_timeout": provider_timeout},
        "refresh_user_hook": make_refresh_user_hook(refresh_margin, provider_timeout=provider_timeout),
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
    provider_timeout: float = DEFAULT_PROVIDER_TIMEOUT,
) -> dict[str, Any]:
    """Everything the hub config needs for this service.

    Returns ``{"service": <c.JupyterHub.services entry>, "roles": [<load_roles entries>],
    "extra_user_scopes": [...], "server_token_scopes": [...], "spawner_environment": {...}}``.
    ``url`` is where the service listens (hub-managed: the hub passes it as JUPYTERHUB_SERVICE_URL).
    ``user_host``/``user_port`` is how user servers reach it (default: the host/port of ``url``).
    ``provider_timeout`` (as given to :func:`authenticator_settings`) sets how long the service
    waits for the hub, which may wait that long for the provider.
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
            "environment": {HUB_TIMEOUT_ENV: str(max(DEFAULT_HUB_TIMEOUT, provider_timeout + 20)),
                            **(environment or {})},
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
                 login_url: str | None = None, request_timeout: float = DEFAULT_HUB_TIMEOUT):
        from tornado.httpclient import AsyncHTTPClient

        self.api_url = api_url.rstrip("/")
        self.api_token = api_token
        self.name = name
        self.login_url = login_url
        self.request_timeout = request_timeout
        # No lock here: the hub refreshes each user once at a time (make_refresh_user_hook), and
        # bounds the wait for the provider; users never wait for one another.
        self.client = AsyncHTTPClient()

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
            refresh = auth_state.get(REFRESH_STATUS_KEY)
            if isinstance(refresh, dict) and refresh.get("state") in ("pending", "unreachable"):
                log.warning("The access token of %s has expired and the identity provider is not answering",
                            username)
                raise ServiceError(503, "provider_unavailable",
                                   "The login service is not answering, so your access token could not be "
                                   "renewed; try again in a minute. You stay logged in.")
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
            request_timeout=float(os.environ.get(HUB_TIMEOUT_ENV) or DEFAULT_HUB_TIMEOUT),
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
