"""How the `jobs:` config section becomes hub settings: the job service as a hub-managed service, and the scope
that lets users' tokens use it."""

from __future__ import annotations

import os

from ..config import BASE_DIR_ENV, CONFIG_ENV, Deployment
from . import sessions
from .settings import DB_URL_ENV, SERVICE_NAME, jobs_dir, local_url, public_url, service_command

ACCESS_SCOPE = f"access:services!service={SERVICE_NAME}"


def update_jobs(c, d: Deployment) -> None:
    if not d["jobs"]["enabled"]:
        return
    env = {
        CONFIG_ENV: os.pathsep.join(str(f) for f in d.files) or os.environ.get(CONFIG_ENV, ""),
        BASE_DIR_ENV: str(d.base_dir),
    }
    if os.environ.get(DB_URL_ENV):  # a secret: from the hub's environment, never from the config file
        env[DB_URL_ENV] = os.environ[DB_URL_ENV]
    if d["spinnaker"]["mode"] == "session" and os.environ.get("SPALLOC_TOKEN"):  # jobs claim boards as the hub does
        env["SPALLOC_TOKEN"] = os.environ["SPALLOC_TOKEN"]
    grant = _per_run_tokens(c, d, env)
    # The nmpi API sits at the root of the service's own address (jobs.ip:port: nmpi keeps only scheme://host:port).
    # The `url` also gives it the hub's proxy route /services/jobs/ and an OAuth client: there the Jobs page is
    # served to browsers logged in to the hub (JupyterHub's HubOAuth), and the hub's menu lists it.
    c.JupyterHub.services = [
        *c.JupyterHub.services,
        {
            "name": SERVICE_NAME,
            "command": service_command(),
            "environment": env,
            "display": True,
            "url": local_url(d),
            "oauth_no_confirm": True,
        },
    ]
    c.JupyterHub.template_vars.update({"jobs_page": f"{d['hub']['base_url']}services/{SERVICE_NAME}/"})
    roles = [dict(r) for r in c.JupyterHub.load_roles]
    user = next((r for r in roles if r["name"] == "user"), None)
    if user is None:
        roles.append({"name": "user", "scopes": ["self", ACCESS_SCOPE]})
    else:
        user["scopes"] = [*user.get("scopes", []), ACCESS_SCOPE]
    if grant is not None:
        roles.append(grant["role"])
    c.JupyterHub.load_roles = roles
    # Notebooks submit jobs with their server's JUPYTERHUB_API_TOKEN: JupyterHub's `server` role scopes plus this.
    base = (
        list(c.Spawner.server_token_scopes)
        if "server_token_scopes" in c.Spawner
        else ["users:activity!user", "access:servers!server"]
    )
    c.Spawner.server_token_scopes = [*base, ACCESS_SCOPE]
    # ... and find the service here (what they give nmpi as job_service and, with local accounts, userinfo)
    c.Spawner.environment = {**c.Spawner.environment, "SPINNAKER_JOBS_URL": public_url(d)}
    # A server's stop spares the user's running jobs (their process sessions, recorded by the runner)
    c.PrivateHomeSpawner.job_sessions_dir = str(sessions.folder(jobs_dir(d)))


def _per_run_tokens(c, d: Deployment, env: dict) -> dict | None:
    """spinnaker.mode per-run with EBRAINS logins: the job service may ask the access-token-service for the token
    of a user while a job of theirs runs (its custom scope, nothing else; the access-token-service asks the job
    service, at its address given here, which jobs run), at the address the hub gave that service (jobs/per_run.py);
    the hub endpoint that renews a job owner's login. Returns the grant whose role the caller adds, or None."""
    if d["spinnaker"]["mode"] != "per-run" or d["auth"]["type"] != "ebrains":
        return None
    from ..access_token_service import ENDPOINT, job_owner_grant
    from ..access_token_service import SERVICE_NAME as TOKEN_SERVICE
    from ..upstream import add_hub_handlers
    from .per_run import TOKEN_URL_ENV

    services = [dict(s) for s in c.JupyterHub.services]
    service = next((s for s in services if s.get("name") == TOKEN_SERVICE), None)
    if service is None:
        return None
    grant = job_owner_grant(SERVICE_NAME, local_url(d))
    service["environment"] = {**service.get("environment", {}), **grant["environment"]}
    c.JupyterHub.services = services
    add_hub_handlers(c, grant["handlers"])  # deprecated JupyterHub.extra_handlers, and why: upstream.py
    scopes = dict(c.JupyterHub.custom_scopes) if "custom_scopes" in c.JupyterHub else {}
    c.JupyterHub.custom_scopes = {**scopes, **grant["custom_scopes"]}
    env[TOKEN_URL_ENV] = f"{service['url'].rstrip('/')}/services/{TOKEN_SERVICE}/{ENDPOINT}"
    return grant
