"""Hub side of the access-token service: the authenticator hooks that keep auth_state's access token
fresh (one refresh per user at a time, nobody kept waiting on a hanging identity provider)."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from .tokens import (
    DEFAULT_PROVIDER_TIMEOUT,
    DEFAULT_REFRESH_MARGIN,
    PENDING_REFRESH_WAIT,
    REFRESH_REQUEST_LIFETIME,
    REFRESH_STATUS_KEY,
    access_token_expires_at,
    access_token_lifetime,
    log,
    stamp_access_token_expiry,
)

# ------------------------------------------------------------------------------------------------
# hub side: authenticator hooks


def reconcile_auth_state_hook(
    authenticator: Any, authenticated: Mapping[str, Any], existing_auth_state: Mapping[str, Any] | None
) -> dict | None:
    """``Authenticator.reconcile_auth_state_hook`` (JupyterHub >= 6): record the token's expiry, and make the hub
    check the user's tokens often enough for the provider's token lifetime (:func:`check_often_enough`).

    Called by the hub whenever it stores auth_state after a login or a refresh.
    """
    state = stamp_access_token_expiry(authenticated.get("auth_state"), existing_auth_state)
    check_often_enough(authenticator, state)
    return state


def check_often_enough(authenticator: Any, auth_state: Mapping[str, Any] | None) -> None:
    """Shorten ``authenticator.auth_refresh_age`` to half the lifetime of the access token just issued, when it is
    longer.

    The hub consults the authenticator about a user (and so this package's refresh hook) only once
    ``auth_refresh_age`` seconds have passed since the last time (JupyterHub's ``BaseHandler.refresh_auth``; a login
    counts as one). A token living shorter than that expired unrenewed in between, and the service told the user's
    server the login had expired until the next check (with 8 s tokens and the default 30 s: ~20 s after each
    expiry, the first one right after login). Checking every half lifetime renews each token while it is valid.
    Real EBRAINS tokens live longer than twice the default interval, so nothing changes there.
    """
    if authenticator is None or not getattr(authenticator, "auth_refresh_age", 0):
        return
    lifetime = access_token_lifetime(auth_state)
    if lifetime is None:
        return
    needed = max(1, int(lifetime // 2))
    if needed < authenticator.auth_refresh_age:
        authenticator.log.warning(
            "The identity provider's access tokens live %d s, less than twice auth_refresh_age (%d s): the hub now "
            "checks users' tokens every %d s, so that each one is renewed before it expires",
            lifetime,
            authenticator.auth_refresh_age,
            needed,
        )
        authenticator.auth_refresh_age = needed


def _auth_model(authenticator: Any, token_info: Mapping[str, Any]) -> Awaitable[dict]:
    """The auth model a login with ``token_info`` would give (userinfo with its access token): oauthenticator's
    private API, fenced in upstream.py (upstream.token_to_auth_model)."""
    from ..upstream import token_to_auth_model

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
        request = HTTPRequest(
            authenticator.token_url,
            **{
                **authenticator.http_request_kwargs,
                "method": "POST",
                "headers": authenticator.build_token_info_request_headers(),
                "body": urlencode(params).encode(),
                "validate_cert": authenticator.validate_server_cert,
                # not connected: nothing was sent, give up soon; sent: wait for the answer
                "connect_timeout": provider_timeout,
                "request_timeout": refresh_request_lifetime,
            },
        )
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
            authenticator.log.warning("The refresh token of %s was refused (%s): a new login is needed", user.name, err)
            await store(authenticator, user, {**auth_state, REFRESH_STATUS_KEY: _status("refused")}, reconcile=False)
            return False
        except Exception as err:
            if not provider_unreachable(err):
                raise
            authenticator.log.warning(
                "Could not refresh the access token of %s: the identity provider did "
                "not answer (%s); the login is kept",
                user.name,
                err,
            )
            await store(
                authenticator, user, {**auth_state, REFRESH_STATUS_KEY: _status("unreachable")}, reconcile=False
            )
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
                    return await _auth_model(
                        authenticator, auth_state.get("token_response") or {"access_token": auth_state["access_token"]}
                    )
                except HTTPClientError as err:
                    if not 400 <= err.code < 500:
                        raise
                    authenticator.log.info("The provider refused the access token of %s: refreshing it", user.name)
            else:
                when = "it has expired" if expires_at <= time.time() else "before it expires"
                authenticator.log.info("Refreshing the access token of %s (%s)", user.name, when)
            return await refresh(authenticator, user, auth_state)
        except Exception as err:
            if not provider_unreachable(err):
                raise
            authenticator.log.warning(
                "Could not check the login of %s: the identity provider did not answer (%s); the login is kept",
                user.name,
                err,
            )
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
