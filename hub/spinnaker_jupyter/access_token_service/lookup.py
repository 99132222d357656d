"""The service's answer to one request, independent of the web framework: who the caller is (asked of the hub with
the caller's own token) and that user's access token from auth_state (asked with the service's token)."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

from .tokens import (
    DEFAULT_HUB_TIMEOUT,
    JOB_OWNER_SCOPE,
    REFRESH_STATUS_KEY,
    SERVICE_NAME,
    SERVICE_SCOPES,
    access_scope,
    access_token_expires_at,
    log,
)


class HubError(Exception):
    pass


class ServiceError(Exception):
    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


class AccessTokenLookup:
    """The lookup itself, independent of the web framework (easy to test)."""

    def __init__(
        self,
        api_url: str,
        api_token: str,
        name: str = SERVICE_NAME,
        login_url: str | None = None,
        request_timeout: float = DEFAULT_HUB_TIMEOUT,
    ):
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

    async def lookup(self, caller_token: str | None, for_user: str | None = None) -> dict[str, Any]:
        """The answer for a caller token; raises :class:`ServiceError`. ``for_user``: a job service (a service
        holding :data:`JOB_OWNER_SCOPE` for that user) asks for the token of the user whose job it runs; a user's
        token gets its own user's token whatever it names."""
        from jupyterhub.services.auth import check_scopes

        if not caller_token:
            raise ServiceError(
                401, "missing_token", "Send your hub API token: 'Authorization: token <JUPYTERHUB_API_TOKEN>'."
            )
        try:
            # resolves the caller, and makes the hub refresh the user's auth when due
            status, whoami = await self._hub_get("/user", caller_token)
            if status in (401, 403):
                raise ServiceError(401, "invalid_token", "The hub does not accept this token.")
            if status != 200 or not isinstance(whoami, dict):
                raise ServiceError(502, "hub_error", f"The hub answered {status} to GET /hub/api/user.")
            if whoami.get("kind") != "service":
                for_user = None  # a user's token gets its own user's token, whatever it names
            if for_user is not None:
                needed = f"{JOB_OWNER_SCOPE}!user={for_user}"
                if not check_scopes(needed, set(whoami.get("scopes") or [])):
                    raise ServiceError(403, "insufficient_scope", f"Asking for another user's token needs {needed}.")
                username = for_user
            else:
                if whoami.get("kind") != "user":
                    raise ServiceError(
                        403, "not_a_user", "Only a user's token (or a user's server's token) can get an access token."
                    )
                if not check_scopes(access_scope(self.name), set(whoami.get("scopes") or [])):
                    raise ServiceError(
                        403, "insufficient_scope", f"This token lacks the scope {access_scope(self.name)}."
                    )
                username = whoami["name"]
            status, model = await self._hub_get(f"/users/{quote(username, safe='')}", self.api_token)
        except HubError as err:
            raise ServiceError(502, "hub_error", str(err)) from err
        if status == 404:
            if for_user is not None:
                raise ServiceError(404, "no_such_user", f"The hub has no user {for_user!r}.")
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
                log.warning("The access token of %s has expired and the identity provider is not answering", username)
                raise ServiceError(
                    503,
                    "provider_unavailable",
                    "The login service is not answering, so your access token could not be "
                    "renewed; try again in a minute. You stay logged in.",
                )
            log.warning("The access token of %s has expired and could not be refreshed", username)
            raise self._login_required("Your login has expired and could not be renewed.")
        log.info(
            "Access token of %s handed to %s (expires in %s s)",
            username,
            f"the service {whoami.get('name')}" if for_user is not None else "the user",
            "?" if expires_at is None else int(expires_at - time.time()),
        )
        return {"access_token": token, "token_type": "Bearer", "expires_at": expires_at}
