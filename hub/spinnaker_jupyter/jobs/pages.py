"""The Jobs page (the Job Manager): server-rendered pages for browsers logged in to the hub, under the service's
hub prefix (/services/jobs/, routed by the hub's proxy to this service; JupyterHub's HubOAuth logs the browser in).
The nmpi API stays at the root of the service's own address (api.py); both share the store and the rules.

My jobs with their status; a new-job form (a script, or a git / archive URL; command; hardware config JSON checked
before anything is queued; tags; collab); a job page with the live log (polled), output files with size and sha256
and fresh signed links at each view, provenance, resource usage, cancel / delete.
"""

from __future__ import annotations

import json
from pathlib import Path

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from tornado import web

from ..upstream import status_reason
from . import api, identity
from .store import ACTIVE, Job, public_status

TEMPLATES = Path(__file__).parent / "templates"
LOG_CHUNK = 1 << 20  # the most of a log one poll returns


class Page(HubOAuthenticated, web.RequestHandler):
    @property
    def prefix(self) -> str:
        return self.settings["pages_prefix"]

    @property
    def who(self) -> identity.Identity:
        user = self.current_user
        return identity.Identity(name=user["name"], groups=list(user.get("groups") or []))

    def set_default_headers(self):
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Frame-Options", "SAMEORIGIN")

    def get_template_namespace(self):
        ns = super().get_template_namespace()
        token = self.xsrf_token
        ns.update(
            prefix=self.prefix,
            hub_home=self.settings["hub_prefix"] + "home",
            xsrf=token.decode() if isinstance(token, bytes) else token,
        )
        return ns

    def write_error(self, status_code, **kwargs):
        reason = kwargs.get("exc_info", (None, None))[1]
        detail = getattr(reason, "log_message", None) if isinstance(reason, web.HTTPError) else None
        self.render("error.html", status=status_code, detail=detail or status_reason(self))

    def own_job(self, job_id: str) -> Job:
        job = self.settings["store"].get(int(job_id))
        if job is None or job.user_id != self.current_user["name"] or job.status == "removed":
            raise web.HTTPError(404, api.NOT_FOUND.format(id=job_id).replace("%", "%%"))
        return job


class ListPage(Page):
    @web.authenticated
    def get(self):
        jobs = self.settings["store"].query(self.current_user["name"], size=500)
        self.render(
            "list.html",
            jobs=[api.job_model(self.application, j, with_log=False) for j in jobs],
            user=self.current_user["name"],
            api_url=self.settings["jobs"].base_url,
        )


class NewPage(Page):
    @web.authenticated
    def get(self):
        self.form({})

    def form(self, values: dict, error: str | None = None):
        self.set_status(422 if error else 200)
        collab = values.get("collab") or f"private-{self.current_user['name']}"
        self.render(
            "new.html",
            v=values,
            error=error,
            collabs=self.who.collabs(self.settings["jobs"].collabs),
            collab=collab,
            versions=self.settings["versions"],
        )

    @web.authenticated
    def post(self):
        v = {
            k: self.get_argument(k, "", strip=False).replace("\r\n", "\n")
            for k in ("code", "url", "command", "input_data", "hardware_config", "tags", "collab")
        }
        if v["code"].strip() and v["url"].strip():
            return self.form(v, "Give either a script or a URL, not both (the URL would replace the script).")
        config = None
        if v["hardware_config"].strip():
            try:
                config = json.loads(v["hardware_config"])
            except ValueError as e:
                return self.form(v, f'Hardware config: not valid JSON ({e}); e.g. {{"time_limit": 600}}')
        body = {
            "code": v["url"].strip() or v["code"],
            "command": v["command"].strip() or "run.py {system}",
            "collab": v["collab"],
            "hardware_platform": api.PLATFORM,
            "hardware_config": config,
            "tags": [t.strip() for t in v["tags"].split(",") if t.strip()],
            "input_data": [u.strip() for u in v["input_data"].splitlines() if u.strip()],
        }
        if not body["code"].strip():
            return self.form(
                v, "Code: paste a script, or give the URL of a git repository or a .zip / .tar.gz archive."
            )
        try:
            job = api.submit(self.application, self.who, body)
        except api.Refused as e:
            return self.form(v, e.detail)
        self.redirect(f"{self.prefix}jobs/{job.id}")


class JobPage(Page):
    @web.authenticated
    def get(self, job_id):
        job = self.own_job(job_id)
        model = api.job_model(self.application, job, with_log=False)
        path = self.settings["jobs"].logs / f"{job.id}.log"
        data = path.read_bytes() if path.exists() else b""
        model["log"] = data.decode(errors="replace")
        self.render(
            "job.html",
            job=model,
            active=job.status in ACTIVE,
            log_offset=len(data),
            detail=job.detail,
            provenance=json.dumps(model["provenance"], indent=2) if model["provenance"] else "",
            config=json.dumps(model["hardware_config"], indent=2) if model["hardware_config"] else "{}",
        )


class LogPoll(Page):
    """The job page's live log: the status and what the log gained since `offset` (bytes)."""

    @web.authenticated
    def get(self, job_id):
        job = self.own_job(job_id)
        try:
            offset = max(0, int(self.get_argument("offset", "0")))
        except ValueError:
            offset = 0
        path = self.settings["jobs"].logs / f"{job.id}.log"
        text = b""
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                text = f.read(LOG_CHUNK)
        self.set_header("Content-Type", "application/json")
        self.finish(
            json.dumps(
                {
                    "status": public_status(job),  # as the API and the page's first view say it
                    "text": text.decode(errors="replace"),
                    "offset": offset + len(text),
                    "detail": job.detail if job.status in ACTIVE else None,
                }
            )
        )


class DeletePage(Page):
    @web.authenticated
    def post(self, job_id):
        api.remove(self.application, self.own_job(job_id))
        self.redirect(self.prefix)


def routes(prefix: str) -> list:
    p = prefix.rstrip("/")
    return [
        (rf"{p}/?", ListPage),
        (rf"{p}/new", NewPage),
        (rf"{p}/jobs/(\d+)/?", JobPage),
        (rf"{p}/jobs/(\d+)/log", LogPoll),
        (rf"{p}/jobs/(\d+)/delete", DeletePage),
        (rf"{p}/oauth_callback", HubOAuthCallbackHandler),
    ]
