"""Batch jobs in `spinnaker.mode: per-run`: an EBRAINS user's job's sPyNNaker claims its board itself at the spalloc
service with that user's own token (served to the job by the job service, with a secret of the job's run, from the
hub's access-token-service), which reaches only the job's own account and never its log, provenance or outputs; the
board is freed when the job ends. The access-token-service gives the job service a user's token only while a job of
theirs runs, and renews it for a long job whose first token expired. On a local-accounts deployment the job runs
virtual and says why. The spalloc double stands in for the allocation service, tests/oidc for EBRAINS IAM."""

from __future__ import annotations

import io
import json
import os
import subprocess
import uuid
import zipfile
from pathlib import Path

import pytest
import requests

from conftest import free_port
from doubles.spalloc_server import SpallocDouble
from hubclient import wait_for
from oidc_fixtures import ebrains_auth, start_oidc_provider
from test_jobs import start_jobs_hub
from test_jobs_ebrains import ebrains_token

GROUP = "spinnaker-users"
FIRST_IP = "10.11.192.1"

# What sPyNNaker's setup() does to get its machine in per-run mode (spinnman's spalloc_allocate_job, reading the
# job's cfg and token), without a board to boot behind it: the double has none.
ALLOCATE = r"""
import os, pathlib, sys, tempfile, time
ca = pathlib.Path(tempfile.mkdtemp()) / "ca.pem"
ca.write_text(CA)
os.environ["REQUESTS_CA_BUNDLE"] = str(ca)  # the double's own CA (a real service has a public certificate)
from spinn_utilities.config_holder import load_config
from spynnaker.pyNN.config_setup import setup_configs
from spynnaker.pyNN.data.spynnaker_data_writer import SpynnakerDataWriter
setup_configs()
load_config()
SpynnakerDataWriter.setup().set_n_required(1, None)
from spinnman.spalloc.spalloc_allocator import spalloc_allocate_job
host, connections, controller = spalloc_allocate_job()
print("ALLOCATED", host, flush=True)
open("result.txt", "w").write("ran on " + host)
if MARKER:
    pathlib.Path(MARKER + ".pid").write_text(str(os.getpid()))
    end = time.monotonic() + 120
    while not os.path.exists(MARKER + ".go") and time.monotonic() < end:
        time.sleep(0.1)
controller.close()
print("CLOSED", flush=True)
"""


def allocate_script(double: SpallocDouble, marker: str = "") -> str:
    return f"CA = {Path(double.ca_file).read_text()!r}\nMARKER = {marker!r}\n" + ALLOCATE


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    with start_oidc_provider(tmp_path_factory.mktemp("oidc-per-run"), access_token_ttl=600) as p:
        yield p


@pytest.fixture(scope="module")
def double():
    d = SpallocDouble(boards=1, tls=True, power_delay=0, tokens={}, admins=[]).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def hub(hub_factory, provider, double):
    port = free_port()
    hub = hub_factory(
        {
            "auth": ebrains_auth(provider, allowed_groups=[GROUP], contact="spinnaker-support@example.org"),
            "spinnaker": {"mode": "per-run", "spalloc": {"url": double.url}},
            "jobs": {"enabled": True, "port": port, "token_cache_seconds": 0},
        },
        start=False,
        env={"EBRAINS_CLIENT_SECRET": provider.client_secret},
    )
    provider.add_redirect_uri(f"{hub.url}/hub/oauth_callback")
    hub.start()
    hub.jobs_url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(hub.jobs_url), 60, "the job service to answer")
    return hub


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/", timeout=2).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


def submit(hub, token: str, user: str, code: str) -> int:
    r = requests.post(
        hub.jobs_url + "/jobs/",
        headers={"Authorization": f"Bearer {token}"},
        json={"code": code, "collab": f"private-{user}", "hardware_platform": "SpiNNaker"},
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text
    return int(r.json()["resource_uri"].rsplit("/", 1)[1])


def get_job(hub, token: str, job_id: int) -> dict:
    r = requests.get(
        f"{hub.jobs_url}/jobs/{job_id}?with_log=true", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert r.status_code == 200, r.text
    return r.json()


def wait_done(hub, token: str, job_id: int, timeout: float = 180) -> dict:
    wait_for(lambda: get_job(hub, token, job_id)["status"] in ("finished", "error"), timeout, f"job {job_id} to end")
    return get_job(hub, token, job_id)


def as_account(account: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", account, "--", *argv], capture_output=True, text=True, timeout=30)


def environ_of(pid: int) -> dict:
    return dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)


def job_service_token(hub) -> str:
    """The job service's own hub token, as whoever could read its environment would have it."""
    (proc,) = [p for p in hub.own_processes() if "spinnaker_jupyter.jobs.service" in p.cmdline]
    return environ_of(proc.pid)["JUPYTERHUB_API_TOKEN"]


def owner_token_as_job_service(hub, user: str) -> requests.Response:
    """What the job service asks the access-token-service: a job owner's token."""
    port = hub.config["auth"]["ebrains"]["token_service_port"]
    return requests.get(
        f"http://127.0.0.1:{port}/services/access-token-service/access-token",
        params={"user": user},
        headers={"Authorization": f"token {job_service_token(hub)}"},
        timeout=60,
    )


def as_the_job(hub, secret: str) -> requests.Response:
    """What the job's spinnman asks at each setup() (spinnman/spalloc/spalloc_allocator.py)."""
    return requests.get(
        f"{hub.jobs_url}/services/access-token-service/access-token",
        headers={"Authorization": f"Token {secret}"},
        timeout=60,
    )


def test_an_ebrains_users_job_claims_with_the_users_own_token_which_only_the_job_can_read(hub, provider, double):
    token = ebrains_token(hub, provider, "neuro", "pw-neuro-12", roles={"group": [GROUP], "team": []})
    other = ebrains_token(hub, provider, "stranger", "pw-stranger-1", roles={"group": [GROUP], "team": []})
    double.set_token(token, "neuro")  # the allocation service knows each user by their EBRAINS token
    double.set_token(other, "stranger")
    # the stranger's own job first: their account exists, and a job of theirs gets their token, not neuro's
    first = wait_done(hub, other, submit(hub, other, "stranger", allocate_script(double)))
    assert first["status"] == "finished", first["log"]
    (theirs,) = double.jobs()
    assert theirs["owner"] == "stranger" and theirs["state"] == "DESTROYED"

    marker = f"/tmp/per-run-{uuid.uuid4().hex}"
    start = len(double.request_log())
    job_id = submit(hub, token, "neuro", allocate_script(double, marker))
    try:
        pid = int(
            wait_for(
                lambda: os.path.exists(marker + ".pid") and Path(marker + ".pid").read_text(),
                120,
                "the job to hold its board",
                interval=0.2,
            )
        )
        held = [j for j in double.jobs() if j["owner"] == "neuro"]
        assert [j["state"] for j in held] == ["READY"]
        environ = environ_of(pid)
        # no token in the job's environment: a secret of this run, with which spinnman asks the job service
        secret = environ["JUPYTERHUB_API_TOKEN"]
        assert token not in Path(f"/proc/{pid}/environ").read_text() and "OIDC_BEARER_TOKEN" not in environ
        assert f"http://{environ['JUPYTERHUB_SERVICE_HOST']}:{environ['JUPYTERHUB_SERVICE_PORT']}" == hub.jobs_url
        assert as_the_job(hub, secret).json()["access_token"] == token  # neuro's own, from the access-token-service
        assert as_the_job(hub, "a-guess").status_code == 401
        # the job service gets neuro's token now; not the stranger's, whose job has ended
        assert owner_token_as_job_service(hub, "neuro").json()["access_token"] == token
        refused = owner_token_as_job_service(hub, "stranger")
        why = "stranger has no job running now (a job service gets a user's token only while a job of theirs runs)"
        assert (refused.status_code, refused.json()) == (403, {"error": "no_running_job", "message": why})
        assert f"Refused stranger's access token to the service jobs: {why}" in hub.log()
        # which jobs run is the job service's to say, to its own token only
        r = requests.get(
            f"{hub.jobs_url}/access-token-service/running-jobs?user=neuro",
            headers={"Authorization": f"token {other}"},
            timeout=30,
        )
        assert r.status_code == 403 and "running" not in r.text
        cfg = Path(environ["XDG_CONFIG_DIRS"]) / ".spynnaker.cfg"
        assert "spalloc_server = " + double.url in cfg.read_text() and token not in cfg.read_text()
        stranger = hub.system_account("stranger")
        for argv in (["cat", f"/proc/{pid}/environ"], ["cat", str(cfg)], ["ls", str(cfg.parent)]):
            r = as_account(stranger, *argv)
            assert r.returncode != 0 and "Permission denied" in r.stderr, (argv, r.stdout)
    finally:
        Path(marker + ".go").touch()
    job = wait_done(hub, token, job_id)
    for path in (marker + ".pid", marker + ".go"):
        Path(path).unlink(missing_ok=True)
    assert job["status"] == "finished", job["log"]
    # its job ended: neither the job's secret nor the job service gets neuro's token any more
    assert as_the_job(hub, secret).status_code == 401
    refused = owner_token_as_job_service(hub, "neuro")
    assert (refused.status_code, refused.json()["error"]) == (403, "no_running_job")
    assert f"ALLOCATED {FIRST_IP}" in job["log"] and "CLOSED" in job["log"]
    assert "claims this job's boards itself at each setup() from " + double.url in job["log"]
    assert job["provenance"]["virtual_board"] is False and "VIRTUAL" not in job["log"]
    (mine,) = [j for j in double.jobs() if j["owner"] == "neuro"]
    assert mine["state"] == "DESTROYED"  # freed when the job ended
    # every request of neuro's job came as neuro: with neuro's bearer token, then the session it opened
    requests_of_the_job = double.request_log()[start:]
    assert {r["user"] for r in requests_of_the_job} == {"neuro"}, requests_of_the_job
    assert [r["bearer"] for r in requests_of_the_job if r["method"] == "POST"] == [True]
    assert not Path(environ["XDG_CONFIG_DIRS"]).exists()  # its private cfg folder went with it
    # the token is in nothing the job left: log, provenance, output files
    assert token not in job["log"] and token not in json.dumps(job["provenance"])
    got = {f["path"]: requests.get(f["url"], timeout=30).content for f in job["output_data"]["files"]}
    assert got["result.txt"] == f"ran on {FIRST_IP}".encode() and set(got) == {"result.txt", "reports.zip"}
    with zipfile.ZipFile(io.BytesIO(got.pop("reports.zip"))) as reports:  # sPyNNaker's reports, unpacked
        got.update({name: reports.read(name) for name in reports.namelist()})
    assert not [name for name, data in got.items() if token.encode() in data]


def test_a_local_accounts_per_run_job_runs_virtual_and_says_why(hub_factory, double):
    hub = start_jobs_hub(hub_factory, extra={"spinnaker": {"mode": "per-run", "spalloc": {"url": double.url}}})
    token = hub.client("plocal", hub.add_user("plocal")).token
    before = len(double.jobs())
    job = wait_done(hub, token, submit(hub, token, "plocal", "print('hello')"))
    assert job["status"] == "finished", job["log"]
    why = "a per-run claim needs the user's own EBRAINS token, and this deployment's accounts are local"
    (line,) = [ln for ln in job["log"].splitlines() if "VIRTUAL" in ln]
    assert f"VIRTUAL SpiNNaker board (spinnaker.mode per-run: {why})" in line
    assert job["provenance"]["virtual_board"] is True and job["provenance"]["virtual_reason"] == why
    assert len(double.jobs()) == before  # nothing claimed


# A long job: setup() / end() twice, the second once the token its first setup() got has expired.
TWICE = r"""
import os, pathlib, sys, tempfile, time
ca = pathlib.Path(tempfile.mkdtemp()) / "ca.pem"
ca.write_text(CA)
os.environ["REQUESTS_CA_BUNDLE"] = str(ca)
from spinn_utilities.config_holder import load_config
from spynnaker.pyNN.config_setup import setup_configs
from spynnaker.pyNN.data.spynnaker_data_writer import SpynnakerDataWriter
setup_configs()
load_config()
SpynnakerDataWriter.setup().set_n_required(1, None)
from spinnman.spalloc.spalloc_allocator import spalloc_allocate_job
for attempt in (1, 2):
    host, connections, controller = spalloc_allocate_job()
    print("ALLOCATED", attempt, host, flush=True)
    controller.close()
    if attempt == 1:
        pathlib.Path(MARKER + ".pid").write_text(str(os.getpid()))
        end = time.monotonic() + 180
        while not os.path.exists(MARKER + ".go") and time.monotonic() < end:
            time.sleep(0.1)
"""


class TokensAtTheProvider(dict):
    """The spalloc double's bearer tokens, checked at the identity provider as the real service checks EBRAINS
    tokens: an expired one is refused. Remembers each token presented, in order."""

    def __init__(self, provider):
        super().__init__()
        self.provider, self.seen = provider, []

    def get(self, token, default=None):
        self.seen.append(token)
        r = self.provider.userinfo(token)
        return r.json()["preferred_username"] if r.status_code == 200 else default


def test_a_long_jobs_later_setup_gets_a_fresh_token_once_its_first_one_expired(hub_factory, tmp_path_factory):
    ttl = 20  # seconds an access token lives
    with start_oidc_provider(tmp_path_factory.mktemp("oidc-short"), access_token_ttl=ttl) as provider:
        double = SpallocDouble(boards=1, tls=True, power_delay=0, tokens={}, admins=[]).start()
        try:
            double.tokens = TokensAtTheProvider(provider)
            port = free_port()
            hub = hub_factory(
                {
                    "auth": ebrains_auth(provider, allowed_groups=[GROUP]),
                    "spinnaker": {"mode": "per-run", "spalloc": {"url": double.url}},
                    "jobs": {"enabled": True, "port": port, "token_cache_seconds": 0},
                },
                start=False,
                env={"EBRAINS_CLIENT_SECRET": provider.client_secret},
            )
            provider.add_redirect_uri(f"{hub.url}/hub/oauth_callback")
            hub.start()
            hub.jobs_url = f"http://127.0.0.1:{port}"
            wait_for(lambda: _answers(hub.jobs_url), 60, "the job service to answer")
            token = ebrains_token(hub, provider, "longrun", "pw-longrun-1", roles={"group": [GROUP], "team": []})
            marker = f"/tmp/per-run-{uuid.uuid4().hex}"
            code = f"CA = {Path(double.ca_file).read_text()!r}\nMARKER = {marker!r}\n" + TWICE
            job_id = submit(hub, token, "longrun", code)
            try:
                wait_for(lambda: os.path.exists(marker + ".pid"), 120, "the job's first setup()", interval=0.2)
                first = double.tokens.seen[-1]  # the token its first setup() claimed with
                # nobody uses the hub meanwhile (the job is followed with the operator's command, not as longrun)
                wait_for(lambda: not provider.token_is_valid(first), ttl + 30, "the first token to expire", 0.5)
            finally:
                Path(marker + ".go").touch()

            def show() -> dict:
                r = hub.cli("jobs", "show", str(job_id), "--json", "--lines", "200")
                assert r.returncode == 0, r.stderr
                return json.loads(r.stdout)

            job = wait_for(lambda: (j := show())["status"] in ("finished", "error") and j, 120, "the job to end", 1)
            for path in (marker + ".pid", marker + ".go"):
                Path(path).unlink(missing_ok=True)
            assert job["status"] == "finished", job["log_tail"]
            assert "ALLOCATED 1" in job["log_tail"] and "ALLOCATED 2" in job["log_tail"], job["log_tail"]
            assert "a renewed EBRAINS token for a setup() of this job" in job["log_tail"]
            later = double.tokens.seen[-1]  # its second setup(): a fresh token, of longrun's
            assert later != first and provider.userinfo(later).json()["preferred_username"] == "longrun"
            assert [j["owner"] for j in double.jobs()] == ["longrun", "longrun"]
            assert first not in job["log_tail"] and later not in job["log_tail"]
        finally:
            double.stop()
