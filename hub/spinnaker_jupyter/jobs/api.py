"""The nmpi job queue API v3 (the part a user's client speaks), as tornado handlers at the root of the service's
own address. Errors are JSON {"detail": "..."}, as the EBRAINS service answers and the nmpi client reads them.

Only a job's owner sees it: another user's job, whatever its collab, is a 404 like a job that does not exist.
"""

from __future__ import annotations

import json
import mimetypes
import shutil
from datetime import datetime, timezone
from pathlib import Path

from tornado import web

from ..upstream import status_reason
from . import fetch, hardware_config, identity, inputs, job_boards, signing
from .store import STATUSES, Job, public_status

PLATFORM = "SpiNNaker"
REPOSITORY = "SpiNNaker Jupyter job service"
NOT_FOUND = "Either there is no job with id {id}, or you do not have access to it"


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite gives naive datetimes back; they were stored as UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def job_model(app, job: Job, with_log: bool) -> dict:
    s = app.settings["jobs"]
    files = []
    for f in json.loads(job.output_files or "[]"):
        files.append(
            {
                "url": signing.sign(app.settings["signing_key"], s.base_url, job.id, f["path"], s.url_ttl),
                "path": f["path"],
                "content_type": f.get("content_type"),
                "size": f["size"],
                "hash": f["hash"],
            }
        )
    log = ""
    if with_log:
        path = s.logs / f"{job.id}.log"
        log = path.read_text(errors="replace") if path.exists() else ""
    return {
        "id": job.id,
        "resource_uri": f"/jobs/{job.id}",
        "user_id": job.user_id,
        "status": public_status(job),  # "submitted" while a claimed job waits for its board, slot or packages
        "collab": job.collab,
        "code": job.code,
        "command": job.command,
        "hardware_platform": job.hardware_platform,
        "hardware_config": json.loads(job.hardware_config) if job.hardware_config else None,
        "input_data": json.loads(job.input_data) if job.input_data else None,
        "tags": json.loads(job.tags or "[]"),
        "timestamp_submission": _iso(job.timestamp_submission),
        "timestamp_completion": _iso(job.timestamp_completion),
        "output_data": {"repository": REPOSITORY, "files": files},
        "provenance": json.loads(job.provenance) if job.provenance else None,
        "resource_usage": (
            {"value": job.resource_usage, "units": "core-hours"} if job.resource_usage is not None else None
        ),
        "log": log,  # always a string: `nmpi check` writes it to a file
        "comments": [],
    }


class Base(web.RequestHandler):
    who: identity.Identity

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def write_error(self, status_code, **kwargs):
        reason = kwargs.get("exc_info", (None, None))[1]
        detail = getattr(reason, "log_message", None) if isinstance(reason, web.HTTPError) else None
        self.finish(json.dumps({"detail": detail or status_reason(self)}))

    def fail(self, status: int, detail: str):
        raise web.HTTPError(status, detail.replace("%", "%%"))

    @property
    def store(self):
        return self.settings["store"]

    @property
    def js(self):
        return self.settings["jobs"]

    def check_xsrf_cookie(self):
        """The API is authenticated by the Authorization header only (never a cookie): no cross-site forgery to
        guard against here. The Jobs page's forms (pages.py, cookie-authenticated) are checked."""

    async def prepare(self):
        token = identity.token_from_header(self.request.headers.get("Authorization"))
        try:
            self.who = await self.settings["checker"].identify(token)
        except identity.AuthError as e:
            if e.status == 401:
                self.set_header("WWW-Authenticate", 'Bearer realm="spinnaker-jupyter-jobs"')
            self.fail(e.status, e.detail)

    def own_job(self, job_id: str) -> Job:
        job = self.store.get(int(job_id))
        if job is None or job.user_id != self.who.name:
            self.fail(404, NOT_FOUND.format(id=job_id))
        return job

    def bool_arg(self, name: str) -> bool:
        return (self.get_argument(name, "false") or "").lower() in ("1", "true", "yes")

    def json(self, value, status: int = 200):
        self.set_status(status)
        self.finish(json.dumps(value))


class AboutHandler(web.RequestHandler):
    def get(self):
        self.set_header("Content-Type", "application/json")
        self.finish(
            json.dumps(
                {
                    "about": "This is the SpiNNaker Jupyter job service (EBRAINS Neuromorphic Computing "
                    "Job Queue API v3, as the nmpi client uses it).",
                    "version": "3",
                    "links": {"jobs": "/jobs/", "userinfo": "/userinfo"},
                }
            )
        )


class UserInfoHandler(Base):
    """For nmpi.Client(user_info_endpoint=<service>/userinfo) on a deployment with local accounts."""

    def get(self):
        self.json(identity.userinfo(self.who, self.js.collabs))


class JobsHandler(Base):
    def get(self):
        statuses = self.get_arguments("status")
        bad = [s for s in statuses if s not in STATUSES]
        if bad:
            self.fail(422, f"status: unknown value {bad[0]!r}; one of {', '.join(STATUSES)}")
        users = self.get_arguments("user_id")
        if users and set(users) != {self.who.name}:
            self.fail(403, f"User id provided ({users[0]}) does not match authentication token ({self.who.name})")
        try:
            size = min(int(self.get_argument("size", "10")), 100000)
            start = int(self.get_argument("from_index", "0"))
        except ValueError:
            self.fail(422, "size and from_index must be whole numbers")
        platforms = self.get_arguments("hardware_platform")
        if platforms and PLATFORM.lower() not in {p.lower() for p in platforms}:
            return self.json([])
        jobs = self.store.query(
            self.who.name, statuses, self.get_arguments("collab"), self.get_arguments("tags"), size, start
        )
        self.json([job_model(self.application, j, with_log=False) for j in jobs])

    def post(self):
        try:
            body = json.loads(self.request.body or b"")
        except ValueError as e:
            self.fail(
                400,
                f"The request body is not valid JSON ({e}); send a JSON object with code, collab and hardware_platform",
            )
        try:
            job = submit(self.application, self.who, body)
        except Refused as e:
            self.fail(e.status, e.detail)
        self.json(job_model(self.application, job, with_log=False), status=201)


class Refused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def submit(app, who: identity.Identity, body) -> Job:
    """Check a new job (the API's and the Jobs page's) and queue it; Refused says what is wrong, in one line."""
    js = app.settings["jobs"]
    if not isinstance(body, dict):
        raise Refused(400, "The request body must be a JSON object with code, collab and hardware_platform")
    known = {"code", "command", "collab", "input_data", "hardware_platform", "hardware_config", "tags"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise Refused(422, f"{unknown[0]}: unknown field; a job has {', '.join(sorted(known))}")
    for key in ("code", "collab", "hardware_platform"):
        if not isinstance(body.get(key), str) or not body[key].strip():
            raise Refused(422, f"{key}: required (a non-empty string)")
    if body["hardware_platform"].lower() != PLATFORM.lower():
        raise Refused(
            422, f"hardware_platform: {body['hardware_platform']!r} is not run here; this service runs {PLATFORM} jobs"
        )
    collabs = who.collabs(js.collabs)
    if body["collab"] not in collabs:
        raise Refused(
            404,
            f"You do not have access to the collab {body['collab']!r} or there is no collab with this "
            f"id. Yours here: {', '.join(collabs)}",
        )
    command = body.get("command") or "run.py {system}"
    if not isinstance(command, str):
        raise Refused(422, "command: expected a string such as 'run.py {system}'")
    tags = body.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) and 2 <= len(t.strip()) <= 100 for t in tags):
        raise Refused(422, "tags: expected a list of strings of 2 to 100 characters")
    try:
        config = hardware_config.parse(
            body.get("hardware_config"),
            js.allowed_keys,
            app.settings["versions"],
            js.pip_packages,
            js.wall_time,
            job_boards.max_boards(js.spinnaker, who.name, list(who.groups)),
        )
        fetch.check_inline(body["code"], js.fetch_limits)
        input_data = inputs.parse(body.get("input_data"))
    except (hardware_config.HardwareConfigError, fetch.FetchError, inputs.InputError) as e:
        raise Refused(422, str(e)) from None
    job = app.settings["store"].create(
        who.name,
        {
            "collab": body["collab"],
            "code": body["code"],
            "command": command,
            "hardware_platform": PLATFORM,
            "hardware_config": json.dumps(config) if config else None,
            "input_data": json.dumps(input_data) if input_data else None,
            "tags": json.dumps([t.strip() for t in tags]),
        },
    )
    app.settings["runner"].wake()
    return job


def remove(app, job: Job) -> str:
    """Delete a job (a running one is stopped by its runner first). Returns the status it had."""
    before = app.settings["store"].request_removal(job.id)
    if before == "running":
        app.settings["runner"].wake()  # its runner stops it and discards what it wrote
    else:
        shutil.rmtree(app.settings["jobs"].outputs / str(job.id), ignore_errors=True)
    return before


class JobHandler(Base):
    def get(self, job_id):
        self.json(job_model(self.application, self.own_job(job_id), with_log=self.bool_arg("with_log")))

    def delete(self, job_id):
        job = self.own_job(job_id)
        before = remove(self.application, job)
        self.json(
            {
                "id": job.id,
                "status": "removed" if before != "running" else "running",
                "detail": "The job is being stopped." if before == "running" else "The job was removed.",
            }
        )


class LogHandler(Base):
    def get(self, job_id):
        job = self.own_job(job_id)
        self.json(job_model(self.application, job, with_log=True)["log"])


class OutputDataHandler(Base):
    def get(self, job_id):
        self.json(job_model(self.application, self.own_job(job_id), with_log=False)["output_data"])


class FileHandler(web.RequestHandler):
    """Output files by signed URL: no Authorization header (the nmpi client sends none)."""

    def write_error(self, status_code, **kwargs):
        self.set_header("Content-Type", "application/json")
        reason = kwargs.get("exc_info", (None, None))[1]
        detail = getattr(reason, "log_message", None) if isinstance(reason, web.HTTPError) else None
        self.finish(json.dumps({"detail": detail or status_reason(self)}))

    async def get(self, job_id, path):
        why = signing.check(
            self.settings["signing_key"],
            int(job_id),
            path,
            self.get_argument("expires", ""),
            self.get_argument("signature", ""),
        )
        if why:
            raise web.HTTPError(403, why.replace("%", "%%"))
        job = self.settings["store"].get(int(job_id))
        entries = (
            {f["path"]: f for f in json.loads(job.output_files or "[]")} if job and job.status != "removed" else {}
        )
        if path not in entries:
            raise web.HTTPError(404, "This file is no longer kept (removed, or past jobs.retention_days)")
        target = Path(self.settings["jobs"].outputs) / str(job.id) / path
        self.set_header(
            "Content-Type",
            entries[path].get("content_type") or mimetypes.guess_type(path)[0] or "application/octet-stream",
        )
        self.set_header("Content-Length", str(target.stat().st_size))
        self.set_header("Cache-Control", "no-store")
        with open(target, "rb") as f:
            while chunk := f.read(1 << 16):
                self.write(chunk)
                await self.flush()
        self.finish()


def make_app(pages: list | None = None, **settings) -> web.Application:
    return web.Application(
        [
            *(pages or []),
            (r"/", AboutHandler),
            (r"/userinfo/?", UserInfoHandler),
            (r"/jobs/?", JobsHandler),
            (r"/jobs/(\d+)/?", JobHandler),
            (r"/jobs/(\d+)/log/?", LogHandler),
            (r"/jobs/(\d+)/output_data/?", OutputDataHandler),
            (r"/files/(\d+)/(.+)", FileHandler),
            *uploads.ROUTES,
        ],
        **settings,
    )


from . import uploads  # noqa: E402 (its handlers build on Base above)
