"""Per-run boards for batch jobs (jobs/per_run.py): the owner's token from the access-token-service, the job's cfg
and environment, and why a job runs virtual; the access-token-service's answer to a job service; the hub wiring."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest

from spinnaker_jupyter import spynnaker_cfg
from spinnaker_jupyter.access_token_service import JOB_OWNER_SCOPE, AccessTokenLookup, ServiceError
from spinnaker_jupyter.jobs import per_run
from spinnaker_jupyter.jobs.joblog import JobFailed, JobLog

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
    assert per_run.until(None) == "its expiry not known"
    assert per_run.until(1_800_000_000, now=1_800_000_000 - 3600) == "valid until 2027-01-15 08:00 UTC, 60 min"


class _Fixed(per_run.PerRun):
    def __init__(self, got: per_run.OwnerToken, **spinnaker):
        super().__init__({**SPINNAKER, **spinnaker}, "http://127.0.0.1:1/t", "svc")
        self.got, self.asked = got, []

    async def owner_token(self, user):
        self.asked.append(user)
        return self.got


def test_a_jobs_cfg_and_token_are_the_per_run_sessions_and_reach_the_job_only(tmp_path):
    jlog, provenance = JobLog(tmp_path / "1.log", 10**6), {}
    pr = _Fixed(per_run.OwnerToken(TOKEN, None, 1_800_000_000))
    env = asyncio.run(pr.prepare(tmp_path / "cfg" / "1", "neuro", None, jlog, provenance))
    assert pr.asked == ["neuro"]
    assert env == {"XDG_CONFIG_DIRS": str(tmp_path / "cfg" / "1"), "OIDC_BEARER_TOKEN": TOKEN}
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
    assert "neuro's EBRAINS token (valid until 2027-01-15 08:00 UTC" in text
    assert TOKEN not in text and TOKEN not in json.dumps(provenance) and TOKEN not in cfg.read_text()


def test_no_token_runs_virtual_saying_why_or_fails_with_on_timeout_fail(tmp_path):
    why = "no EBRAINS token for the job's owner: Your login has expired."
    jlog, provenance = JobLog(tmp_path / "1.log", 10**6), {}
    env = asyncio.run(_Fixed(per_run.OwnerToken(None, why)).prepare(tmp_path / "c", "neuro", None, jlog, provenance))
    assert env == {} and not (tmp_path / "c").exists()
    assert provenance == {"virtual_reason": why}
    (line,) = [ln for ln in (tmp_path / "1.log").read_text().splitlines() if "VIRTUAL" in ln]
    assert f"VIRTUAL SpiNNaker board (spinnaker.mode per-run: {why})" in line
    failing = _Fixed(per_run.OwnerToken(None, why), on_timeout="fail")
    with pytest.raises(JobFailed, match=r"^No SpiNNaker board for this job \(spinnaker.mode per-run\): no EBRAINS"):
        asyncio.run(failing.prepare(tmp_path / "c", "neuro", None, jlog, {}))


def test_local_accounts_never_ask_for_a_token(tmp_path):
    pr = per_run.PerRun(SPINNAKER, None, None, why_not=per_run.unavailable("local", "local", None, None))
    got = asyncio.run(pr.owner_token("neuro"))
    assert got.token is None and "accounts are local" in got.why


# --- the access-token-service, asked by a job service ------------------------------------------------------------
AUTH_STATE = {"access_token": TOKEN, "refresh_token": "r", "access_token_expires_at": 4e9}


class _Hub(AccessTokenLookup):
    """The lookup with the hub's two answers given: who the caller is, and the users' models."""

    def __init__(self, caller: dict):
        self.api_url, self.api_token, self.name, self.login_url, self.request_timeout = "h", "svc", "ats", None, 1
        self.caller = caller

    async def _hub_get(self, path, token):
        if path == "/user":
            return 200, self.caller
        name = path.rsplit("/", 1)[1]
        return (200, {"name": name, "auth_state": AUTH_STATE}) if name == "neuro" else (404, None)


def _lookup(caller: dict, for_user: str | None):
    return asyncio.run(_Hub(caller).lookup("caller-token", for_user))


def test_a_job_service_with_its_scope_gets_the_named_users_token_and_nobody_else_does():
    jobs = {"kind": "service", "name": "jobs", "scopes": [JOB_OWNER_SCOPE]}
    assert _lookup(jobs, "neuro") == {"access_token": TOKEN, "token_type": "Bearer", "expires_at": 4e9}
    with pytest.raises(ServiceError) as e:
        _lookup(jobs, "ghost")
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


# --- the hub's wiring ----------------------------------------------------------------------------------------------
def test_per_run_with_ebrains_lets_the_job_service_ask_for_owners_tokens_only(apply):  # noqa: F811
    eb = {"type": "ebrains", "ebrains": {**EBRAINS["ebrains"], "token_service_port": 8191}}
    per = {"mode": "per-run", "spalloc": {"url": "https://spalloc.example.org/"}}
    c, _ = apply({"auth": eb, "spinnaker": per, "jobs": {"enabled": True}})
    assert role(c, "jobs-job-owner-tokens") == {
        "name": "jobs-job-owner-tokens",
        "description": "Ask access-token-service for the access token of the user whose job jobs runs",
        "scopes": [JOB_OWNER_SCOPE],
        "services": ["jobs"],
    }
    assert JOB_OWNER_SCOPE in c.JupyterHub.custom_scopes
    assert not [r for r in c.JupyterHub.load_roles if "jobs" in r.get("services", []) and r is not None][1:]
    env = service(c, "jobs")["environment"]
    assert env[per_run.TOKEN_URL_ENV] == "http://127.0.0.1:8191/services/access-token-service/access-token"
    for other in ({"auth": eb, "jobs": {"enabled": True}}, {"spinnaker": per, "jobs": {"enabled": True}}):
        c, _ = apply(other)
        assert (
            role(c, "jobs-job-owner-tokens") is None and per_run.TOKEN_URL_ENV not in service(c, "jobs")["environment"]
        )
