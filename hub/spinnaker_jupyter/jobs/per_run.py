"""Per-run boards for batch jobs (`spinnaker.mode: per-run`): the job's sPyNNaker claims its boards itself at each
setup() from the spalloc service, with the job owner's own EBRAINS access token, as a notebook kernel does.

* The token: the job service asks the hub's access-token-service for the token of the user whose job it runs
  (``?user=<name>`` with its own service token; its role holds only the custom scope that allows this,
  access_token_service.job_owner_grant, wired by jobs/hubconfig.py). The access-token-service answers only while
  that user has a job running here: it asks this service which (:meth:`PerRun.routes`,
  ``/access-token-service/running-jobs``, with the token it was given, which must be this service's own), and the
  store says (:func:`running_jobs`).
* Where it goes: no token in the job's environment, but what spinnman asks with at each setup(), as a notebook
  kernel asks the hub's access-token-service: ``JUPYTERHUB_SERVICE_HOST`` / ``_PORT`` (this service, at
  settings.local_url) and ``JUPYTERHUB_API_TOKEN``, a secret of this run of the job, taken only while it runs (a
  process's environment is readable by its own account and root only; the Slurm executor's go file is in the job's
  root-owned cfg folder, readable by the job's group only). With it this service serves the owner's current token
  at spinnman's path (``/services/access-token-service/access-token``), asked of the access-token-service at each
  request, which has the hub renew the owner's login when due: a setup() after the first token expired gets a fresh
  one. Never in the log, provenance or outputs. The job's cfg is the sessions' per-run cfg
  (`spynnaker_cfg.text(mode="per-run")`, the one builder), written to the job's private cfg folder.
* The token is also asked once right before the command runs: without one (local accounts, the user's login
  expired, the service unreachable) the job runs virtual and its log and provenance say why in one line; with
  `spinnaker.on_timeout: fail` it ends with that line as its error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from .. import spynnaker_cfg
from ..access_token_service import ENDPOINT, RUNNING_JOBS_PATH
from ..access_token_service import SERVICE_NAME as TOKEN_SERVICE
from .identity import token_from_header
from .job_boards import write_cfg
from .joblog import JobFailed, JobLog, stamp

log = logging.getLogger("spinnaker_jupyter.jobs")

#: The job service's environment: where the access-token-service answers (set by jobs/hubconfig.py).
TOKEN_URL_ENV = "SPINNAKER_ACCESS_TOKEN_URL"
#: What spinnman asks for its bearer token with at each setup(): a token service at HOST:PORT, and what it sends.
SERVICE_HOST_ENV, SERVICE_PORT_ENV = "JUPYTERHUB_SERVICE_HOST", "JUPYTERHUB_SERVICE_PORT"
SECRET_ENV = "JUPYTERHUB_API_TOKEN"
#: Where spinnman asks (fixed in spinnman/spalloc/spalloc_allocator.py): served by this service to its jobs.
JOB_TOKEN_PATH = f"/services/{TOKEN_SERVICE}/{ENDPOINT}"


def running_jobs(store, user: str) -> list[int]:
    """The jobs of ``user`` that run now: claimed by a runner (waiting for a slot or packages) or running their
    command. The one rule for when the access-token-service gives this service that user's token."""
    return [job.id for job in store.all_jobs(users=[user], statuses=["running"])]


@dataclass(frozen=True)
class OwnerToken:
    """The owner's access token, or why there is none (one line)."""

    token: str | None
    why: str | None = None
    expires_at: float | None = None


@dataclass(frozen=True)
class _Run:
    """One run of a job, as its token requests find it."""

    job_id: int
    user: str
    jlog: JobLog
    last: str | None = None  # sha256 of the token it got last (a renewed one is noted in its log)


def unavailable(auth_type: str, executor: str, token_url: str | None, service_token: str | None) -> str | None:
    """Why no job of this deployment can have its owner's token (None: ask for it at each job)."""
    if auth_type != "ebrains":
        return "a per-run claim needs the user's own EBRAINS token, and this deployment's accounts are local"
    if executor == "docker":
        return "jobs.executor docker gives per-run jobs no network to reach the spalloc service"
    if not token_url or not service_token:
        return f"the job service was not told where the access-token-service is ({TOKEN_URL_ENV})"
    return None


def answer_to_token(status: int, body: bytes | str | None) -> OwnerToken:
    """The access-token-service's answer (JSON) as an OwnerToken; its own message says why when there is none."""
    try:
        data: Any = json.loads(body) if body else None
    except ValueError:
        data = None
    data = data if isinstance(data, dict) else {}
    if status == 200 and isinstance(data.get("access_token"), str) and data["access_token"]:
        expires = data.get("expires_at")
        return OwnerToken(data["access_token"], None, float(expires) if isinstance(expires, (int, float)) else None)
    message = " ".join(str(data.get("message") or "").split())
    if data.get("error") in ("login_required", "provider_unavailable") and message:
        return OwnerToken(None, f"no EBRAINS token for the job's owner: {message}")
    if data.get("error") in ("no_running_job", "not_the_job_service", "job_service_error") and message:
        return OwnerToken(None, f"the access-token-service refused the job owner's token: {message}")
    return OwnerToken(None, f"the access-token-service answered {status} ({data.get('error') or 'no error code'})")


def until(expires_at: float | None, now: float | None = None) -> str:
    """When the token expires, for the log: 'valid until 14:05 UTC', or that it is not known."""
    if expires_at is None:
        return "its expiry not known"
    left = expires_at - (time.time() if now is None else now)
    return f"valid until {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(expires_at))}, {max(0, int(left // 60))} min"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class PerRun:
    """The per-run part of the runner: the owner's token for each running job, and the job's per-run cfg."""

    def __init__(
        self,
        spinnaker: dict,
        token_url: str | None,
        service_token: str | None,
        *,
        why_not: str | None = None,
        timeout: float = 40.0,
        local_url: str = "http://127.0.0.1:8092",
    ) -> None:
        self.spinnaker, self.token_url, self.service_token = spinnaker, token_url, service_token
        self.why_not, self.timeout = why_not, timeout
        self.address = urlsplit(local_url)  # where the jobs reach this service
        self.runs: dict[str, _Run] = {}  # sha256 of a run's secret -> the run

    @classmethod
    def from_deployment(cls, d, environ: dict) -> PerRun | None:
        """None unless spinnaker.mode is per-run."""
        if d["spinnaker"]["mode"] != "per-run":
            return None
        from .settings import local_url

        url, token = environ.get(TOKEN_URL_ENV), environ.get("JUPYTERHUB_API_TOKEN")
        why_not = unavailable(d["auth"]["type"], d["jobs"]["executor"], url, token)
        return cls(d["spinnaker"], url, token, why_not=why_not, local_url=local_url(d))

    @property
    def spalloc_server(self) -> str | None:
        return spynnaker_cfg.spalloc_server(self.spinnaker["spalloc"]["url"])

    def cfg_text(self) -> str:
        """The cfg a per-run notebook kernel gets: the same builder, the same mode."""
        return spynnaker_cfg.text(self.spinnaker, mode="per-run")

    async def owner_token(self, user: str) -> OwnerToken:
        if self.why_not:
            return OwnerToken(None, self.why_not)
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError

        try:
            r = await AsyncHTTPClient().fetch(
                f"{self.token_url}?user={quote(user, safe='')}",
                headers={"Authorization": f"token {self.service_token}", "Accept": "application/json"},
                request_timeout=self.timeout,
                raise_error=False,
            )
        except (OSError, HTTPClientError) as e:
            return OwnerToken(None, f"the access-token-service could not be reached ({e})")
        if r.code == 599:
            return OwnerToken(None, f"the access-token-service could not be reached ({r.error})")
        return answer_to_token(r.code, r.body)

    async def prepare(
        self, job_id: int, cfg_folder: Path, user: str, gid: int | None, jlog: JobLog, provenance: dict
    ) -> dict:
        """Right before the command runs: the job's environment for per-run boards, or {} (virtual, said why);
        JobFailed with `spinnaker.on_timeout: fail`. :meth:`end` when the job ends, however."""
        got = await self.owner_token(user)
        if got.token is None:
            provenance["virtual_reason"] = got.why
            if self.spinnaker.get("on_timeout") == "fail":
                raise JobFailed(f"No SpiNNaker board for this job (spinnaker.mode per-run): {got.why}")
            jlog.note(
                f"This job runs on a VIRTUAL SpiNNaker board (spinnaker.mode per-run: {got.why}): run() maps and "
                "loads the network, but recorded data come back empty."
            )
            return {}
        folder = write_cfg(cfg_folder, self.cfg_text(), gid)
        provenance["virtual_board"] = False
        provenance["board"] = {"per_run": self.spalloc_server, "token_expires_at": got.expires_at}
        secret = secrets.token_urlsafe(32)
        self.runs[_digest(secret)] = _Run(job_id, user, jlog, _digest(got.token))
        jlog.note(
            f"sPyNNaker claims this job's boards itself at each setup() from {self.spalloc_server} with "
            f"{user}'s EBRAINS token, asked of the job service at each setup() (now {until(got.expires_at)}; renewed "
            "while the job runs); end() frees them, else the service does once the job's process has ended (no "
            "more keepalives)."
        )
        return {
            "XDG_CONFIG_DIRS": str(folder),
            SERVICE_HOST_ENV: self.address.hostname or "127.0.0.1",
            SERVICE_PORT_ENV: str(self.address.port),
            SECRET_ENV: secret,
        }

    def end(self, job_id: int, cfg_folder: Path) -> None:
        """The job ended (however): its secret is no longer taken, its cfg folder goes."""
        self.runs = {key: run for key, run in self.runs.items() if run.job_id != job_id}
        shutil.rmtree(cfg_folder, ignore_errors=True)

    async def token_for_job(self, secret: str | None) -> tuple[int, dict]:
        """A running job's request (spinnman at setup(), with its run's secret): its owner's current token, asked
        of the access-token-service now. Returns (status, the JSON answer spinnman reads)."""
        key = _digest(secret) if secret else ""
        run = self.runs.get(key)
        if run is None:
            return 401, {"error": "invalid_token", "message": "This is not the secret of a job that runs now."}
        got = await self.owner_token(run.user)
        if got.token is None:
            run.jlog.note(f"{stamp()}: no EBRAINS token for a setup() of this job: {got.why}")
            return 503, {"error": "no_token", "message": got.why}
        if _digest(got.token) != run.last and key in self.runs:
            self.runs[key] = _Run(run.job_id, run.user, run.jlog, _digest(got.token))
            run.jlog.note(f"{stamp()}: a renewed EBRAINS token for a setup() of this job ({until(got.expires_at)}).")
        log.info("Job %s: its owner %s's access token handed to it", run.job_id, run.user)
        return 200, {"access_token": got.token, "token_type": "Bearer", "expires_at": got.expires_at}

    def routes(self, store) -> list:
        """This service's per-run answers: to its jobs (spinnman's path, with a run's secret), and to the
        access-token-service: which jobs of a user run now (only with this service's own token, which the
        access-token-service forwards from this service's request; never anyone else's)."""
        from tornado import web

        per_run = self

        class JobTokenHandler(web.RequestHandler):
            async def get(self) -> None:
                secret = token_from_header(self.request.headers.get("Authorization"))
                status, answer = await per_run.token_for_job(secret)
                self.set_status(status)
                self.set_header("Cache-Control", "no-store")
                self.finish(answer)

        class RunningJobsHandler(web.RequestHandler):
            def get(self) -> None:
                token = (token_from_header(self.request.headers.get("Authorization")) or "").encode()
                own = (per_run.service_token or "").encode()
                self.set_header("Cache-Control", "no-store")
                if not own or not hmac.compare_digest(token, own):
                    self.set_status(403)
                    self.finish({"error": "not_the_job_service", "message": "Only this service's own token."})
                    return
                user = self.get_query_argument("user")
                self.finish({"user": user, "running": running_jobs(store, user)})

        return [(JOB_TOKEN_PATH + "/?", JobTokenHandler), (RUNNING_JOBS_PATH + "/?", RunningJobsHandler)]


__all__ = [
    "JOB_TOKEN_PATH",
    "OwnerToken",
    "PerRun",
    "SECRET_ENV",
    "TOKEN_URL_ENV",
    "answer_to_token",
    "running_jobs",
    "unavailable",
    "until",
]
