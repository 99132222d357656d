"""The access-token service's names and the token-expiry rules, shared by the hub side (refresh.py,
wiring.py) and the service process (lookup.py, server.py)."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

SERVICE_NAME = "access-token-service"
#: The endpoint's last path component (after the service prefix).
ENDPOINT = "access-token"
#: Scopes of the service's own role: read any user's name and auth_state, nothing else.
SERVICE_SCOPES = ("admin:auth_state", "read:users:name")
#: Custom scope of a service that runs users' batch jobs (the job service, per-run boards): with it, the service may
#: ask for the access token of a user it names (``?user=<name>``), and nothing else of theirs; and only while that
#: user has a job running (asked of the job service itself, at ``JOBS_URL_ENV`` + ``RUNNING_JOBS_PATH``).
JOB_OWNER_SCOPE = "custom:access-token-service:job-owners"
#: The service's environment: the job service's own address (set by jobs/hubconfig.py with per-run boards).
JOBS_URL_ENV = "ACCESS_TOKEN_SERVICE_JOBS_URL"
#: Where the job service says which jobs of a user run now (``?user=<name>``; jobs/per_run.py).
RUNNING_JOBS_PATH = "/access-token-service/running-jobs"
#: The hub's endpoint that renews a user's stored login now, under the hub's API URL (``POST .../<name>``,
#: ``admin:auth_state``; hub_handlers.py).
REFRESH_API_PATH = "/spinnaker/access-token-service/refresh"
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


def access_token_lifetime(auth_state: Mapping[str, Any] | None) -> float | None:
    """How long the stored access token lives from its issue: ``expires_in`` of the token response that brought it
    (oauthenticator keeps that response in auth_state), else None."""
    if not auth_state or not auth_state.get("access_token"):
        return None
    try:
        lifetime = float((auth_state.get("token_response") or {}).get("expires_in"))
    except (TypeError, ValueError):
        return None
    return lifetime if lifetime > 0 else None


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
