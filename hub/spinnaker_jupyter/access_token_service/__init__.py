"""access-token-service: hand a user's own EBRAINS (OIDC) access token to that user's code.

sPyNNaker finds the bearer token for the SpiNNaker allocation server (spalloc) like this
(spinnman/spalloc/spalloc_allocator.py)::

    GET http://$JUPYTERHUB_SERVICE_HOST:$JUPYTERHUB_SERVICE_PORT/services/access-token-service/access-token
    Authorization: Token $JUPYTERHUB_API_TOKEN
    -> {"access_token": "..."}

This package is that service (run by the hub: ``python -m spinnaker_jupyter.access_token_service``)
plus the hub-side pieces that keep the token fresh: tokens.py (names, token expiry), refresh.py (the
authenticator hooks), hub_handlers.py (the hub endpoint that renews a job owner's login), wiring.py (hub config),
lookup.py (one request's answer), server.py (the process).
There is one token store only: the user's ``auth_state`` in the hub, written by the authenticator
(oauthenticator's GenericOAuthenticator).

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
   access token expires. A provider whose tokens live less than twice ``auth_refresh_age`` makes
   that hook shorten ``auth_refresh_age`` to half their lifetime (:func:`check_often_enough`):
   otherwise a token would expire between two checks, unrenewed.
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

A job service asks for the user whose job it runs: ``?user=<name>`` with its own service token, which needs the
custom scope ``custom:access-token-service:job-owners`` (:func:`job_owner_grant`; nothing else: no auth_state), and
is answered only while that user has a job the job service runs now (claimed or running): the service asks the job
service itself (``ACCESS_TOKEN_SERVICE_JOBS_URL`` + ``/access-token-service/running-jobs?user=<name>``, with the
caller's token, which the job service takes only as its own). Refusals are one log line each: 403
``no_running_job``, 403 ``not_the_job_service``, 502 ``job_service_error``; 404 ``no_such_user`` for a name the hub
does not know, 403 ``insufficient_scope`` for a service without that scope; a user's token still gets its own
user's token, whatever it names. A job owner's stored token that expires within ``DEFAULT_REFRESH_MARGIN`` is
renewed first: the service asks the hub (``POST /hub/api/spinnaker/access-token-service/refresh/<name>``,
hub_handlers.py, with its ``admin:auth_state``), which runs the refresh hook as a request of the user would.

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

from .lookup import AccessTokenLookup, HubError, ServiceError
from .refresh import (
    RefreshRefused,
    check_often_enough,
    make_refresh_user_hook,
    provider_unreachable,
    reconcile_auth_state_hook,
)
from .server import main, make_app, token_from_header
from .tokens import (
    DEFAULT_AUTH_REFRESH_AGE,
    DEFAULT_HUB_TIMEOUT,
    DEFAULT_PROVIDER_TIMEOUT,
    DEFAULT_REFRESH_MARGIN,
    ENDPOINT,
    EXPIRES_AT_KEY,
    HUB_TIMEOUT_ENV,
    JOB_OWNER_SCOPE,
    JOBS_URL_ENV,
    PENDING_REFRESH_WAIT,
    REFRESH_API_PATH,
    REFRESH_REQUEST_LIFETIME,
    REFRESH_STATUS_KEY,
    RUNNING_JOBS_PATH,
    SERVICE_NAME,
    SERVICE_SCOPES,
    access_scope,
    access_token_expires_at,
    access_token_lifetime,
    jwt_expiry,
    stamp_access_token_expiry,
)
from .wiring import authenticator_settings, job_owner_grant, service_definition

__all__ = [
    "AccessTokenLookup",
    "HubError",
    "ServiceError",
    "RefreshRefused",
    "check_often_enough",
    "make_refresh_user_hook",
    "provider_unreachable",
    "reconcile_auth_state_hook",
    "main",
    "make_app",
    "token_from_header",
    "DEFAULT_AUTH_REFRESH_AGE",
    "DEFAULT_HUB_TIMEOUT",
    "DEFAULT_PROVIDER_TIMEOUT",
    "DEFAULT_REFRESH_MARGIN",
    "ENDPOINT",
    "EXPIRES_AT_KEY",
    "HUB_TIMEOUT_ENV",
    "JOB_OWNER_SCOPE",
    "JOBS_URL_ENV",
    "PENDING_REFRESH_WAIT",
    "REFRESH_API_PATH",
    "REFRESH_REQUEST_LIFETIME",
    "REFRESH_STATUS_KEY",
    "RUNNING_JOBS_PATH",
    "SERVICE_NAME",
    "SERVICE_SCOPES",
    "access_scope",
    "access_token_expires_at",
    "access_token_lifetime",
    "jwt_expiry",
    "stamp_access_token_expiry",
    "authenticator_settings",
    "service_definition",
    "job_owner_grant",
]
