"""Per-run boards for batch jobs (jobs/per_run.py): the owner's token from the access-token-service, the job's cfg
and environment, its token requests while it runs, and why a job runs virtual; the access-token-service's answer to a
job service (only while a job of the user runs; renewed when due); the hub wiring."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time

import pytest

from spinnaker_jupyter import spynnaker_cfg
from spinnaker_jupyter.access_token_service import (
    JOB_OWNER_SCOPE,
    JOBS_URL_ENV,
    REFRESH_API_PATH,
    RUNNING_JOBS_PATH,
    AccessTokenLookup,
    ServiceError,
)
from spinnaker_jupyter.jobs import per_run
from spinnaker_jupyter.jobs.joblog import JobFailed, JobLog
from spinnaker_jupyter.jobs.store import Store

from .test_hubconfig import EBRAINS, _secrets_from_the_environment, apply, role, service  # noqa: F401

TOKEN = "eyJ.owner-secret-token.sig"
SPINNAKER = {
    "mode": "per-run",
    "version": 5,
    "machine_name": None,
    "on_timeout": "virtual",
    "extra_cfg": {},
    "spalloc": {"url": "https://spalloc.example.org/spalloc/", "group": "g", "machine_name": None, "use_proxy": True},
}


def test_why_a_deployment_cannot_give_jobs_their_owners_token():
    assert per_run.unavailable("ebrains", "local", "http://127.0.0.1:1/x", "t") is None
    assert "this deployment's accounts are local" in per_run.unavailable("local", "local", "http://x", "t")
    assert "no network" in per_run.unavailable("ebrains", "docker", "http://x", "t")
    assert per_run.TOKEN_URL_ENV in per_run.unavailable("ebrains", "slurm", None, "t")


def test_the_access_token_services_answer():
    ok = per_run.answer_to_token(200, json.dumps({"access_token": TOKEN, "expires_at": 1.5e9}))
    assert ok == per_run.OwnerToken(TOKEN, None, 1.5e9)
    login = json.dumps({"error": "login_required", "message": "Your login has expired.  Open the hub to log in."})
    got = per_run.answer_to_token(503, login)
    assert (
        got.token is None
        and got.why == "no EBRAINS token for the job's owner: Your login has expired. Open the hub to log in."
    )
    assert per_run.answer_to_token(500, '{"error": "misconfigured", "message": "x"}').why == (
        "the access-token-service answered 500 (misconfigured)"
    )
    assert per_run.answer_to_token(502, b"<html>").why == "the access-token-service answered 502 (no error code)"
    refused = json.dumps({"error": "no_running_job", "message": "neuro has no job running now (...)"})
    assert per_run.answer_to_token(403, refused).why == (
        "the access-token-service refused the job owner's token: neuro has no job running now (...)"
    )
    assert per_run.until(None) == "its expiry not known"
    assert per_run.until(1_800_000_000, now=1_800_000_000 - 3600) == "valid until 2027-01-15 08:00 UTC, 60 min"


class _Fixed(per_run.PerRun):
    def __init__(self, got: per_run.OwnerToken, **spinnaker):
        super().__init__({**SPINNAKER, **spinnaker}, "http://127.0.0.1:1/t", "svc", local_url="http://10.0.0.5:8092")
        self.got, self.asked = got, []

    async def owner_token(self, user):
        self.asked.append(user)
        return self.got


def test_a_jobs_cfg_and_token_are_the_per_run_sessions_and_reach_the_job_only(tmp_path):
    jlog, provenance = JobLog(tmp_path / "1.log", 10**6), {}
    pr = _Fixed(per_run.OwnerToken(TOKEN, None, 1_800_000_000))
    env = asyncio.run(pr.prepare(1, tmp_path / "cfg" / "1", "neuro", None, jlog, provenance))
    assert pr.asked == ["neuro"]
    secret = env.pop("JUPYTERHUB_API_TOKEN")  # what spinnman asks this service with, at each setup()
    assert env == {
        "XDG_CONFIG_DIRS": str(tmp_path / "cfg" / "1"),
        "JUPYTERHUB_SERVICE_HOST": "10.0.0.5",
        "JUPYTERHUB_SERVICE_PORT": "8092",
    }
    assert len(secret) >= 40 and TOKEN not in secret
    cfg = tmp_path / "cfg" / "1" / ".spynnaker.cfg"
    assert cfg.read_text() == spynnaker_cfg.text(SPINNAKER, mode="per-run")  # the kernels' per-run cfg
    assert "spalloc_server = https://spalloc.example.org/spalloc/" in cfg.read_text()
    assert stat.S_IMODE(os.stat(cfg).st_mode) == 0o640 and stat.S_IMODE(os.stat(cfg.parent).st_mode) == 0o750
    assert provenance == {
        "virtual_board": False,
        "board": {"per_run": "https://spalloc.example.org/spalloc/", "token_expires_at": 1_800_000_000},
    }
    text = (tmp_path / "1.log").read_text()
    assert "claims this job's boards itself at each setup() from https://spalloc.example.org/spalloc/" in text
    assert "neuro's EBRAINS token, asked of the job service at each setup() (now valid until 2027-01-15 08:00" in text
    assert TOKEN not in text and TOKEN not in json.dumps(provenance) and TOKEN not in cfg.read_text()
    pr.end(1, tmp_path / "cfg" / "1")
    assert not (tmp_path / "cfg" / "1").exists() and not pr.runs


def test_a_running_job_gets_its_owners_current_token_with_its_secret_and_only_while_it_runs(tmp_path):
    jlog = JobLog(tmp_path / "1.log", 10**6)
    pr = _Fixed(per_run.OwnerToken(TOKEN, None, 1_800_000_000))
    secret = asyncio.run(pr.prepare(1, tmp_path / "c", "neuro", None, jlog, {}))["JUPYTERHUB_API_TOKEN"]
    assert asyncio.run(pr.token_for_job(secret)) == (
        200,
        {"access_token": TOKEN, "token_type": "Bearer", "expires_at": 1_800_000_000},
    )
    assert "a renewed EBRAINS token" not in (tmp_path / "1.log").read_text()  # the same token as at the start
    pr.got = per_run.OwnerToken("eyJ.fresh.sig", None, 1_800_003_600)  # the first one expired: the hub renewed it
    assert asyncio.run(pr.token_for_job(secret))[1]["access_token"] == "eyJ.fresh.sig"
    assert (
        "a renewed EBRAINS token for a setup() of this job (valid until 2027-01-15 09:00 UTC"
        in (tmp_path / "1.log").read_text()
    )
    pr.got = per_run.OwnerToken(None, "no EBRAINS token for the job's owner: Your login has expired.")
    assert asyncio.run(pr.token_for_job(secret)) == (
        503,
        {"error": "no_token", "message": "no EBRAINS token for the job's owner: Your login has expired."},
    )
    assert "no EBRAINS token for a setup() of this job: no EBRAINS token" in (tmp_path / "1.log").read_text()
    assert pr.asked == ["neuro"] * 4
    for wrong in (None, "", "guess", TOKEN):
        assert asyncio.run(pr.token_for_job(wrong))[0] == 401
    pr.end(1, tmp_path / "c")  # the job ended: its secret is refused
    assert asyncio.run(pr.token_for_job(secret))[0] == 401 and pr.asked == ["neuro"] * 4
    assert "eyJ" not in (tmp_path / "1.log").read_text()


def test_a_users_running_jobs_are_those_claimed_or_running_their_command(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    fields = {"collab": "private-neuro", "code": "print(1)", "command": "", "hardware_platform": "SpiNNaker"}
    first, second = store.create("neuro", fields), store.create("neuro", fields)
    store.create("other", fields)
    assert per_run.running_jobs(store, "neuro") == []  # queued only
    assert store.claim_next("r").id == first.id  # claimed: waiting for its slot, packages, ...
    assert per_run.running_jobs(store, "neuro") == [first.id]
    store.set_process(first.id, 123, 1000)  # its command runs
    assert per_run.running_jobs(store, "neuro") == [first.id] and per_run.running_jobs(store, "other") == []
    store.finish(first.id, "finished", {}, [], 0)
    assert per_run.running_jobs(store, "neuro") == [] and second.id != first.id


def test_no_token_runs_virtual_saying_why_or_fails_with_on_timeout_fail(tmp_path):
    why = "no EBRAINS token for the job's owner: Your login has expired."
    jlog, provenance = JobLog(tmp_path / "1.log", 10**6), {}
    env = asyncio.run(_Fixed(per_run.OwnerToken(None, why)).prepare(1, tmp_path / "c", "neuro", None, jlog, provenance))
    assert env == {} and not (tmp_path / "c").exists()
    assert provenance == {"virtual_reason": why}
    (line,) = [ln for ln in (tmp_path / "1.log").read_text().splitlines() if "VIRTUAL" in ln]
    assert f"VIRTUAL SpiNNaker board (spinnaker.mode per-run: {why})" in line
    failing = _Fixed(per_run.OwnerToken(None, why), on_timeout="fail")
    with pytest.raises(JobFailed, match=r"^No SpiNNaker board for this job \(spinnaker.mode per-run\): no EBRAINS"):
        asyncio.run(failing.prepare(1, tmp_path / "c", "neuro", None, jlog, {}))


def test_local_accounts_never_ask_for_a_token(tmp_path):
    pr = per_run.PerRun(SPINNAKER, None, None, why_not=per_run.unavailable("local", "local", None, None))
    got = asyncio.run(pr.owner_token("neuro"))
    assert got.token is None and "accounts are local" in got.why


# --- the access-token-service, asked by a job service ------------------------------------------------------------
AUTH_STATE = {"access_token": TOKEN, "refresh_token": "r", "access_token_expires_at": 4e9}


class _Hub(AccessTokenLookup):
    """The lookup with the hub's and the job service's answers given: who the caller is, the users' models, whose
    jobs run (the job service takes only its own token), and the hub's renewal of a login."""

    def __init__(self, caller: dict, running: dict | None = None, auth_state: dict | None = None):
        self.api_url, self.api_token, self.name, self.login_url, self.request_timeout = "h", "svc", "ats", None, 1
        self.jobs_url = "http://jobs"
        self.caller, self.running, self.auth_state = caller, {"neuro": [7]} if running is None else running, AUTH_STATE
        self.auth_state = auth_state or AUTH_STATE
        self.asked: list[tuple[str, str, str | None]] = []

    async def _hub_get(self, path, token, method="GET", base=None):
        self.asked.append((method, path, base))
        if path == "/user":
            return 200, self.caller
        if base is not None:
            assert base == "http://jobs" and path.startswith(RUNNING_JOBS_PATH + "?user=")
            if token != "caller-token":
                return 403, {"error": "not_the_job_service"}
            user = path.rsplit("=", 1)[1]
            return 200, {"user": user, "running": self.running.get(user, [])}
        if method == "POST":
            assert path == f"{REFRESH_API_PATH}/neuro" and token == "svc"
            self.auth_state = {**self.auth_state, "access_token": "eyJ.renewed.sig", "access_token_expires_at": 4e9}
            return 200, {"renewed": True}
        name = path.rsplit("/", 1)[1]
        return (200, {"name": name, "auth_state": self.auth_state}) if name in ("neuro", "alice") else (404, None)


def _lookup(caller: dict, for_user: str | None, **hub):
    return asyncio.run(_Hub(caller, **hub).lookup("caller-token", for_user))


JOBS = {"kind": "service", "name": "jobs", "scopes": [JOB_OWNER_SCOPE]}


def test_a_job_service_with_its_scope_gets_the_named_users_token_and_nobody_else_does():
    jobs = JOBS
    assert _lookup(jobs, "neuro") == {"access_token": TOKEN, "token_type": "Bearer", "expires_at": 4e9}
    with pytest.raises(ServiceError) as e:
        _lookup(jobs, "ghost", running={"ghost": [1]})
    assert (e.value.status, e.value.error) == (404, "no_such_user")
    others = [
        {"kind": "service", "name": "other", "scopes": ["admin:users"]},
        {"kind": "service", "name": "jobs", "scopes": [f"{JOB_OWNER_SCOPE}!user=bob"]},
    ]
    for caller in others:
        with pytest.raises(ServiceError) as e:
            _lookup(caller, "neuro")
        assert (e.value.status, e.value.error) == (403, "insufficient_scope"), caller
    user = {"kind": "user", "name": "neuro", "scopes": ["access:services!service=ats", JOB_OWNER_SCOPE]}
    assert _lookup(user, "alice")["access_token"] == TOKEN  # a user's token gets its own user's, whatever it names
    with pytest.raises(ServiceError) as e:  # without ?user= a service is still no user
        _lookup(jobs, None)
    assert e.value.error == "not_a_user"


def _handlers(c) -> list:
    """The hub's extra handlers as JupyterHub reads them (on a bare Config, extend() is a lazy value)."""
    value = c.JupyterHub.extra_handlers
    return value.get_value([]) if hasattr(value, "get_value") else list(value)


# --- the hub's wiring ----------------------------------------------------------------------------------------------
def test_per_run_with_ebrains_lets_the_job_service_ask_for_owners_tokens_only(apply):  # noqa: F811
    eb = {"type": "ebrains", "ebrains": {**EBRAINS["ebrains"], "token_service_port": 8191}}
    per = {"mode": "per-run", "spalloc": {"url": "https://spalloc.example.org/"}}
    c, _ = apply({"auth": eb, "spinnaker": per, "jobs": {"enabled": True}})
    assert role(c, "jobs-job-owner-tokens") == {
        "name": "jobs-job-owner-tokens",
        "description": "Ask access-token-service for the access token of a user while jobs runs a job of theirs",
        "scopes": [JOB_OWNER_SCOPE],
        "services": ["jobs"],
    }
    assert JOB_OWNER_SCOPE in c.JupyterHub.custom_scopes
    assert not [r for r in c.JupyterHub.load_roles if "jobs" in r.get("services", []) and r is not None][1:]
    env = service(c, "jobs")["environment"]
    assert env[per_run.TOKEN_URL_ENV] == "http://127.0.0.1:8191/services/access-token-service/access-token"
    # the access-token-service asks the job service whose jobs run; the hub renews job owners' logins for it
    assert service(c, "access-token-service")["environment"][JOBS_URL_ENV] == service(c, "jobs")["url"]
    assert [h[0] for h in _handlers(c) if "access-token-service" in h[0]] == ["/api" + REFRESH_API_PATH + "/([^/]+)"]
    for other in ({"auth": eb, "jobs": {"enabled": True}}, {"spinnaker": per, "jobs": {"enabled": True}}):
        c, _ = apply(other)
        assert (
            role(c, "jobs-job-owner-tokens") is None and per_run.TOKEN_URL_ENV not in service(c, "jobs")["environment"]
        )
        assert not [h for h in _handlers(c) if "access-token-service" in h[0]]


def test_a_job_service_gets_a_users_token_only_while_a_job_of_theirs_runs(caplog):
    caplog.set_level(logging.INFO, "access-token-service")
    with pytest.raises(ServiceError) as e:
        _lookup(JOBS, "alice")  # a user the hub knows, with no job running
    assert (e.value.status, e.value.error) == (403, "no_running_job")
    why = "alice has no job running now (a job service gets a user's token only while a job of theirs runs)"
    assert e.value.message == why
    assert [r.getMessage() for r in caplog.records] == [f"Refused alice's access token to the service jobs: {why}"]
    caplog.clear()
    assert _lookup(JOBS, "neuro")["access_token"] == TOKEN
    assert caplog.records[-1].getMessage().startswith("Access token of neuro handed to the service jobs for job(s) [7]")
    hub = _Hub(JOBS)
    hub.jobs_url = None  # not wired: nobody's token
    with pytest.raises(ServiceError) as e:
        asyncio.run(hub.lookup("caller-token", "neuro"))
    assert e.value.error == "no_running_job" and "not told where the job service is" in e.value.message
    hub = _Hub(JOBS)
    with pytest.raises(ServiceError) as e:  # a token the job service does not take as its own
        asyncio.run(hub.lookup("another-services-token", "neuro"))
    assert (e.value.status, e.value.error) == (403, "not_the_job_service")
    assert [a for a in hub.asked if a[0] == "GET" and a[1].startswith("/users/")] == []  # no auth_state read


def test_a_job_owners_token_that_expires_soon_is_renewed_through_the_hub_first():
    soon = {**AUTH_STATE, "access_token_expires_at": time.time() + 10}
    hub = _Hub(JOBS, auth_state=soon)
    got = asyncio.run(hub.lookup("caller-token", "neuro"))
    assert got["access_token"] == "eyJ.renewed.sig"
    assert ("POST", f"{REFRESH_API_PATH}/neuro", None) in hub.asked
    hub = _Hub(JOBS)  # valid for long: nothing renewed
    asyncio.run(hub.lookup("caller-token", "neuro"))
    assert [a for a in hub.asked if a[0] == "POST"] == []
    user = {"kind": "user", "name": "neuro", "scopes": ["access:services!service=ats"]}
    hub = _Hub(user, auth_state=soon)  # a user's own request: the hub renewed it at GET /user already, as before
    assert asyncio.run(hub.lookup("caller-token"))["access_token"] == TOKEN
    assert [a for a in hub.asked if a[0] == "POST" or a[2]] == []
