"""`spinnaker-jupyter-job` (the `nmpi run` experience) against the job service of a real hub: `run` uploads the
script's folder, follows the job in words and downloads its outputs; `run -b` returns at once and `check` fetches
them later; the token comes from the environment or a private config file; bad input is one clear line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest

from conftest import BIN
from hubclient import wait_for
from test_jobs import start_jobs_hub

RUN_PY = """import sys, time
from helper import GREETING  # from the script's folder: the whole folder was uploaded
print(GREETING, sys.argv[1:], flush=True)
time.sleep(1)
open("result.dat", "wb").write(bytes(range(256)) * 8)
"""


@pytest.fixture(scope="module")
def cli_hub(hub_factory):
    hub = start_jobs_hub(hub_factory)
    hub.users = {"jolga": hub.client("jolga", hub.add_user("jolga"))}
    return hub


@pytest.fixture
def project(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "run.py").write_text(RUN_PY)
    (folder / "helper.py").write_text("GREETING = 'hello from helper'\n")
    return folder


def job_cli(hub, *args, cwd, token=None, extra_env=None):
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(cwd),
        "SPINNAKER_JOBS_URL": hub.jobs_url,
        "JUPYTERHUB_API_TOKEN": token if token is not None else hub.users["jolga"].token,
        **(extra_env or {}),
    }
    return subprocess.run(
        [BIN / "spinnaker-jupyter-job", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_run_follows_the_job_and_downloads_its_outputs(cli_hub, project, tmp_path):
    r = job_cli(cli_hub, "run", "-o", str(tmp_path / "out"), str(project / "run.py"), "extra", cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    job_id = lines[0].split()[1]
    assert lines[0].startswith(f"Job {job_id} submitted")
    said = [line for line in lines if line.startswith(f"Job {job_id} ")]
    assert said[-1] == f"Job {job_id} finished" and f"Job {job_id} is running" in said, r.stdout
    out = tmp_path / "out"
    assert (out / "result.dat").read_bytes() == bytes(range(256)) * 8
    log = (out / f"job_{job_id}.log").read_text()
    assert "hello from helper ['spiNNaker', 'extra']" in log, log


def test_run_in_the_background_then_check(cli_hub, project, tmp_path):
    config = tmp_path / ".config" / "spinnaker-jupyter" / "job.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"url": cli_hub.jobs_url, "token": cli_hub.users["jolga"].token}))
    config.chmod(0o644)
    r = job_cli(cli_hub, "run", "-b", str(project / "run.py"), cwd=tmp_path, token="")
    assert r.returncode == 2 and "others may read it: run `chmod 600" in r.stderr, r.stderr
    config.chmod(0o600)  # the token from the config file alone
    r = job_cli(
        cli_hub, "run", "-b", str(project / "run.py"), cwd=tmp_path, token="", extra_env={"SPINNAKER_JOBS_URL": ""}
    )
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.split()[1]
    assert f"spinnaker-jupyter-job check {job_id}" in r.stdout

    def checked():
        c = job_cli(cli_hub, "check", job_id, cwd=tmp_path)
        return c if "finished" in c.stdout or "error" in c.stdout else None

    c = wait_for(checked, 90, "the job to end")
    assert c.stdout.startswith(f"Job {job_id} finished"), c.stdout
    data = (tmp_path / f"job_{job_id}" / "result.dat").read_bytes()
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(bytes(range(256)) * 8).hexdigest()


@pytest.mark.parametrize(
    "args, token, message",
    [
        (["run", "--config", "{bad", "run.py"], None, "--config: not valid JSON"),
        (["run", "--config", '{"colour": 1}', "run.py"], None, "colour"),
        (["run", "run.py"], "not-a-token", "refused the token"),
        (["run", "missing.py"], None, "missing.py: not a Python script"),
    ],
)
def test_bad_input_is_one_clear_line(cli_hub, project, args, token, message):
    r = job_cli(cli_hub, *args, cwd=project, token=token)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_operator_lists_shows_and_cancels_a_running_job(cli_hub, tmp_path):
    """`spinnaker-jupyter jobs`: the operator sees the running job, its log, and cancels it; the user's log says who
    stopped it."""
    import requests

    headers = {"Authorization": f"Bearer {cli_hub.users['jolga'].token}"}
    script = "import time\nprint('working', flush=True)\nwhile True:\n    time.sleep(0.2)\n"
    r = requests.post(
        cli_hub.jobs_url + "/jobs/",
        headers=headers,
        timeout=30,
        json={"code": script, "collab": "private-jolga", "hardware_platform": "SpiNNaker"},
    )
    assert r.status_code == 201, r.text
    job_id = str(r.json()["id"])

    def job():
        return requests.get(f"{cli_hub.jobs_url}/jobs/{job_id}?with_log=true", headers=headers, timeout=30).json()

    wait_for(lambda: "working" in job()["log"], 90, "the job to run")
    listed = cli_hub.cli("jobs", "list", "--user", "jolga", "--state", "running")
    assert listed.returncode == 0 and [line.split()[:3] for line in listed.stdout.splitlines()[1:]] == [
        [job_id, "jolga", "running"]
    ], listed.stdout
    shown = cli_hub.cli("jobs", "show", job_id)
    assert shown.returncode == 0 and "  working" in shown.stdout, shown.stdout
    cancelled = cli_hub.cli("jobs", "cancel", job_id)
    assert cancelled.returncode == 0 and f"job {job_id} (jolga): running; its runner stops it" in cancelled.stdout
    wait_for(lambda: job()["status"] == "removed", 30, "the runner to stop the cancelled job")
    assert "The job was cancelled by an operator (spinnaker-jupyter jobs cancel)" in job()["log"], job()["log"]
