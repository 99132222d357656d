"""The access-token service in the hub config: the service entry, its role and scopes
(:func:`service_definition`) and the authenticator settings that keep tokens fresh (:func:`authenticator_settings`)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .refresh import make_refresh_user_hook, reconcile_auth_state_hook
from .tokens import (
    DEFAULT_AUTH_REFRESH_AGE,
    DEFAULT_HUB_TIMEOUT,
    DEFAULT_PROVIDER_TIMEOUT,
    DEFAULT_REFRESH_MARGIN,
    HUB_TIMEOUT_ENV,
    JOB_OWNER_SCOPE,
    JOBS_URL_ENV,
    SERVICE_NAME,
    SERVICE_SCOPES,
    access_scope,
)


def authenticator_settings(
    *,
    refresh_margin: float = DEFAULT_REFRESH_MARGIN,
    auth_refresh_age: int = DEFAULT_AUTH_REFRESH_AGE,
    provider_timeout: float = DEFAULT_PROVIDER_TIMEOUT,
) -> dict[str, Any]:
    """Settings for ``c.GenericOAuthenticator`` that keep auth_state's access token fresh.

    ``auth_refresh_age`` < ``refresh_margin`` guarantees that a token handed out right after a hub
    request for the user has at least ``refresh_margin - auth_refresh_age`` seconds left; when the
    provider's tokens live less than twice ``auth_refresh_age``, the hub's interval is shortened to
    half their lifetime at run time (:func:`.refresh.check_often_enough`).
    ``provider_timeout`` bounds every request to the provider (``http_request_kwargs``) and every
    wait for a refresh (see :func:`make_refresh_user_hook`).
    """
    if not 0 < auth_refresh_age < refresh_margin:
        raise ValueError(f"auth_refresh_age ({auth_refresh_age}) must be > 0 and < refresh_margin ({refresh_margin})")
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
            "environment": {
                HUB_TIMEOUT_ENV: str(max(DEFAULT_HUB_TIMEOUT, provider_timeout + 20)),
                **(environment or {}),
            },
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


def job_owner_grant(service: str, jobs_url: str, *, name: str = SERVICE_NAME) -> dict[str, Any]:
    """What lets the hub-managed service ``service`` (the job service, at ``jobs_url``) ask this service for the
    access token of a user it names (the owner of a job it runs: ``GET .../access-token?user=<name>`` with its own
    token), only while a job of that user runs (this service asks the job service at ``jobs_url``), and nothing
    else: no auth_state, no refresh token, no other scope. The hub endpoint that renews a job owner's login
    (hub_handlers.py) comes with it.

    Returns ``{"custom_scopes": <c.JupyterHub.custom_scopes entries>, "role": <a load_roles entry>,
    "handlers": <for upstream.add_hub_handlers>, "environment": <for this service's entry>}``.
    """
    from .hub_handlers import handlers

    return {
        "custom_scopes": {
            JOB_OWNER_SCOPE: {
                "description": f"Get from {name} the access token of a user while a batch job of theirs runs (asked "
                f"of the job service; any other time, or for a user with no running job, {name} refuses)."
            }
        },
        "role": {
            "name": f"{service}-job-owner-tokens",
            "description": f"Ask {name} for the access token of a user while {service} runs a job of theirs",
            "scopes": [JOB_OWNER_SCOPE],
            "services": [service],
        },
        "handlers": handlers(),
        "environment": {JOBS_URL_ENV: jobs_url.rstrip("/")},
    }
