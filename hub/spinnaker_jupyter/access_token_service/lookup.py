"""The service's answer to one request, independent of the web framework: who the caller is (asked of the hub with
the caller's own token) and that user's access token from auth_state (asked with the service's token).

A job service asking for a job owner's token (``for_user``) needs its custom scope and, as scopes cannot say "only
while their job runs", a job of that user running now: asked of the job service itself at its own address (from the
hub's config, never from the request), with the caller's token, which the job service accepts only if it is its
own; this service's own token (it reads every auth_state) is never sent there. A job owner's stored token that
expires within :data:`DEFAULT_REFRESH_MARGIN` is renewed first through the hub (hub_handlers.py): the owner need not
use the hub while a long job runs."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

from .tokens import (
    DEFAULT_HUB_TIMEOUT,
    DEFAULT_REFRESH_MARGIN,
    JOB_OWNER_SCOPE,
    REFRESH_API_PATH,
    REFRESH_STATUS_KEY,
    RUNNING_JOBS_PATH,
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
        jobs_url: str | None = None,
    ):
        from tornado.httpclient import AsyncHTTPClient

        self.api_url = api_url.rstrip("/")
        self.api_token = api_token
        self.name = name
        self.login_url = login_url
        self.request_timeout = request_timeout
        self.jobs_url = jobs_url.rstrip("/") if jobs_url else None  # the job service (job owners' tokens)
        # No lock here: the hub refreshes each user once at a time (make_refresh_user_hook), and
        # bounds the wait for the provider; users never wait for one another.
        self.client = AsyncHTTPClient()

    async def _hub_get(self, path: str, token: str, method: str = "GET", base: str | None = None) -> tuple[int, Any]:
        from tornado.httpclient import HTTPClientError

        where = "the job service" if base else "the hub API"
        try:
            response = await self.client.fetch(
                (base or self.api_url) + path,
                method=method,
                body=None if method == "GET" else b"",
                headers={"Authorization": f"token {token}", "Accept": "application/json"},
                request_timeout=self.request_timeout,
                raise_error=False,
            )
        except (OSError, HTTPClientError) as err:
            raise HubError(f"cannot reach {where}: {err}") from err
        if response.code == 599:
            raise HubError(f"cannot reach {where}: {response.error}")
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

    def _refuse_job_owner(self, service: str, user: str, status: int, error: str, why: str) -> ServiceError:
        """A job owner's token refused to a service: one line in the log, the same line in the answer."""
        log.warning("Refused %s's access token to the service %s: %s", user, service, why)
        return ServiceError(status, error, why)

    async def _running_jobs(self, service: str, user: str, caller_token: str) -> list:
        """The jobs of ``user`` the job service runs now (claimed or running); refuses (ServiceError) unless some."""

        def refuse(status: int, error: str, why: str) -> ServiceError:
            return self._refuse_job_owner(service, user, status, error, why)

        if not self.jobs_url:
            why = "this service was not told where the job service is, so it cannot check that a job of theirs runs"
            raise refuse(403, "no_running_job", why)
        try:
            path = f"{RUNNING_JOBS_PATH}?user={quote(user, safe='')}"
            status, answer = await self._hub_get(path, caller_token, base=self.jobs_url)
        except HubError as err:
            raise refuse(502, "job_service_error", str(err)) from err
        if status == 403:
            why = "the job service does not take the caller's token for its own (only it may ask for a job's owner)"
            raise refuse(403, "not_the_job_service", why)
        running = answer.get("running") if status == 200 and isinstance(answer, dict) else None
        if not isinstance(running, list) or answer.get("user") != user:
            raise refuse(502, "job_service_error", f"the job service answered {status} when asked which jobs run")
        if not running:
            why = f"{user} has no job running now (a job service gets a user's token only while a job of theirs runs)"
            raise refuse(403, "no_running_job", why)
        return running

    async def _renew(self, user: str) -> None:
        """Have the hub renew ``user``'s stored login now (its refresh hook, one refresh per user at a time); what
        it could not renew is said by the stored state that follows."""
        try:
            status, answer = await self._hub_get(f"{REFRESH_API_PATH}/{quote(user, safe='')}", self.api_token, "POST")
        except HubError as err:
            log.warning("Could not have the hub renew the login of %s: %s", user, err)
            return
        if status != 200:
            message = answer.get("message") if isinstance(answer, dict) else None
            log.warning("The hub did not renew the login of %s (%s): %s", user, status, message or "no message")

    async def lookup(self, caller_token: str | None, for_user: str | None = None) -> dict[str, Any]:
        """The answer for a caller token; raises :class:`ServiceError`. ``for_user``: a job service (a service
        holding :data:`JOB_OWNER_SCOPE` for that user) asks for the token of the user whose job it runs, which it
        gets only while one runs; a user's token gets its own user's token whatever it names."""
        from jupyterhub.services.auth import check_scopes

        running: list = []  # a job owner's jobs that run now
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
                running = await self._running_jobs(str(whoami.get("name")), for_user, caller_token)
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
            if for_user is not None and status == 200 and _renewal_due(model):
                # a job owner need not be using the hub: the hub renews their login only at their own requests
                await self._renew(username)
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
            f"the service {whoami.get('name')} for job(s) {running}" if for_user is not None else "the user",
            "?" if expires_at is None else int(expires_at - time.time()),
        )
        return {"access_token": token, "token_type": "Bearer", "expires_at": expires_at}


def _renewal_due(model: Any) -> bool:
    """Whether a user's stored access token expires within :data:`DEFAULT_REFRESH_MARGIN` (or has expired)."""
    auth_state = model.get("auth_state") if isinstance(model, dict) else None
    if not isinstance(auth_state, dict) or not auth_state.get("refresh_token"):
        return False  # nothing the hub could renew it with
    expires_at = access_token_expires_at(auth_state)
    return expires_at is not None and expires_at - time.time() < DEFAULT_REFRESH_MARGIN
