"""Batch jobs through the pinned, unmodified nmpi client (hbp-neuromorphic-platform 0.11.2) against the job service
of a real hub: inline scripts, a git repository and zip / tar.gz archives served over loopback HTTP, the statuses a
user follows, logs, outputs by signed URL, and the owner-only rule."""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import requests

from conftest import free_port, traversable_tmpdir
from hubclient import wait_for

HERE = Path(__file__).resolve().parents[1]  # tests/: the support modules
PAYLOAD = bytes(range(256)) * 40  # what the jobs write, compared byte for byte after download_data

RUN_PY = """
import pathlib, sys, time
print("system:", sys.argv[1], flush=True)
time.sleep(1.5)  # long enough for the test to see the job running
pathlib.Path("results").mkdir()
pathlib.Path("results/spikes.dat").write_bytes(bytes(range(256)) * 40)
print("wrote results/spikes.dat")
"""


@pytest.fixture(scope="module")
def nmpi_module(tmp_path_factory):
    """The nmpi client module, imported with HOME in a private folder (its constructor caches the token in
    ~/.hbptoken)."""
    home = tmp_path_factory.mktemp("nmpi-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(home))
    import nmpi.nmpi_user

    module = importlib.reload(nmpi.nmpi_user)
    assert module.TOKENFILE.startswith(str(home))
    yield module
    mp.undo()


@pytest.fixture(scope="module")
def code_server():
    """Code the jobs fetch: a bare git repository (smart HTTP), and zip / tar.gz archives, good and bad."""
    root = traversable_tmpdir("jobs-code-")
    src = root / "src"
    src.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-C", str(src)]
    subprocess.run(git + ["init", "-q", "-b", "main"], check=True)
    for text in (
        "print('old history')\n",
        RUN_PY.replace("results/spikes.dat", "results/from_git.dat")
        + "print('shallow clone:', pathlib.Path('.git/shallow').exists())\n",
    ):
        (src / "run.py").write_text(text)
        subprocess.run(git + ["add", "run.py"], check=True)
        subprocess.run(git + ["commit", "-q", "-m", "job"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(root / "repo.git")], check=True)

    with zipfile.ZipFile(root / "code.zip", "w") as z:  # one top folder, as GitHub's archives have
        z.writestr("project/run.py", RUN_PY)
        z.writestr("project/helper.py", "X = 1\n")
    with tarfile.open(root / "code.tar.gz", "w:gz") as t:
        data = RUN_PY.encode()
        info = tarfile.TarInfo("run.py")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(root / "evil.zip", "w") as z:
        z.writestr("run.py", RUN_PY)
        z.writestr("../../escaped.txt", "should never be written")
    with zipfile.ZipFile(root / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("run.py", RUN_PY)
        z.writestr("zeros.bin", b"\0" * (64 * 2**20))  # 64 MiB of zeros: ~64 KiB compressed
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "jobs_http_server.py"), str(root), str(port)])
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return requests.get(url + "/code.zip", timeout=2).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    wait_for(up, 20, "the code server")
    yield {"url": url, "root": root}
    proc.terminate()
    proc.wait(10)
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def start_jobs_hub(hub_factory, jobs: dict | None = None, extra: dict | None = None):
    port = free_port()
    settings = {
        "enabled": True,
        "port": port,
        "concurrency": 2,
        "pip_packages": ["six"],
        "limits": {"wall_time": 120, "output_mb": 2, "code_mb": 4, "input_mb": 1},
    }
    settings.update(jobs or {})
    hub = hub_factory({"jobs": settings, **(extra or {})})
    hub.jobs_url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return requests.get(hub.jobs_url + "/", timeout=2).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    wait_for(up, 60, "the job service to answer")
    return hub


@pytest.fixture(scope="module")
def jobs_hub(hub_factory):
    hub = start_jobs_hub(hub_factory)
    hub.users = {name: hub.client(name, hub.add_user(name)) for name in ("jalice", "jbob")}
    return hub


def client_for(nmpi_module, hub, name):
    return nmpi_module.Client(
        token=hub.users[name].token, job_service=hub.jobs_url, user_info_endpoint=hub.jobs_url + "/userinfo"
    )


def wait_done(client, job_id, timeout=120) -> dict:
    wait_for(lambda: client.job_status(job_id) in ("finished", "error"), timeout, f"job {job_id} to end")
    return client.get_job(job_id, with_log=True)


def test_inline_script_through_nmpi(jobs_hub, nmpi_module, tmp_path):
    client = client_for(nmpi_module, jobs_hub, "jalice")
    assert client.username == "jalice"
    assert client.my_collabs() == ["private-jalice"]
    uri = client.submit_job(source=RUN_PY, platform="SpiNNaker", collab_id="private-jalice", tags=["inline"])
    seen = [client.job_status(uri)]
    assert seen[0] in ("submitted", "running")
    assert uri in client.queued_jobs()

    def watch():
        status = client.job_status(uri)
        if status != seen[-1]:
            seen.append(status)
        return status in ("finished", "error")

    wait_for(watch, 120, "the inline job to end")
    assert "running" in seen and seen[-1] == "finished", seen
    job = client.get_job(uri, with_log=True)
    assert "system: spiNNaker" in job["log"], job["log"]
    assert "VIRTUAL SpiNNaker board" in job["log"]
    assert job["provenance"]["spinnaker_mode"] == "virtual"
    assert job["resource_usage"] == {"value": 0.0, "units": "core-hours"}
    assert job["user_id"] == "jalice" and job["tags"] == ["inline"] and job["timestamp_completion"]
    [item] = job["output_data"]["files"]
    assert item["path"] == "results/spikes.dat"
    assert item["size"] == len(PAYLOAD) and item["hash"] == hashlib.sha256(PAYLOAD).hexdigest()
    files = client.download_data(job, local_dir=str(tmp_path))
    assert Path(files[0]).read_bytes() == PAYLOAD
    assert uri in client.completed_jobs("private-jalice")
    assert uri not in client.queued_jobs()


def test_pynn_script_runs_virtual(jobs_hub, nmpi_module, tmp_path):
    script = (
        "import pyNN.spiNNaker as p\n"
        "p.setup(timestep=1.0)\n"
        "pop = p.Population(10, p.IF_curr_exp(), label='pop')\n"
        "pop.record('spikes')\n"
        "p.run(10)\n"
        "n = len(pop.get_data('spikes').segments[0].spiketrains)\n"
        "p.end()\n"
        "open('summary.txt', 'w').write(f'spiketrains={n}\\n')\n"
    )
    client = client_for(nmpi_module, jobs_hub, "jalice")
    job = wait_done(
        client,
        client.submit_job(
            source=script, platform="SpiNNaker", collab_id="private-jalice", config={"spynnaker_version": "7.4.1"}
        ),
        timeout=240,
    )
    assert job["status"] == "finished", job["log"][-3000:]
    paths = {f["path"] for f in job["output_data"]["files"]}
    assert "summary.txt" in paths and "reports.zip" in paths, paths
    client.download_data(job, local_dir=str(tmp_path))
    assert (tmp_path / "summary.txt").read_text() == "spiketrains=10\n"


@pytest.mark.parametrize("source", ["repo.git", "code.zip", "code.tar.gz"])
def test_code_from_url(jobs_hub, nmpi_module, code_server, tmp_path, source):
    client = client_for(nmpi_module, jobs_hub, "jalice")
    job = wait_done(
        client,
        client.submit_job(source=f"{code_server['url']}/{source}", platform="SpiNNaker", collab_id="private-jalice"),
    )
    assert job["status"] == "finished", job["log"][-3000:]
    out = "results/from_git.dat" if source == "repo.git" else "results/spikes.dat"
    assert [f["path"] for f in job["output_data"]["files"]] == [out]
    client.download_data(job, local_dir=str(tmp_path))
    assert (tmp_path / out).read_bytes() == PAYLOAD
    if source == "repo.git":
        assert len(job["provenance"]["code"]["commit"]) == 40
        assert "shallow clone: True" in job["log"]


def test_another_users_token_gets_404(jobs_hub, nmpi_module):
    jalice = client_for(nmpi_module, jobs_hub, "jalice")
    uri = jalice.submit_job(source="print('mine')", platform="SpiNNaker", collab_id="private-jalice")
    jbob = client_for(nmpi_module, jobs_hub, "jbob")
    with pytest.raises(Exception, match="No such job"):
        jbob.get_job(uri)
    r = requests.get(jobs_hub.jobs_url + uri, headers={"Authorization": f"Bearer {jobs_hub.users['jbob'].token}"})
    assert r.status_code == 404 and "no job with id" in r.json()["detail"]
    assert uri not in jbob.queued_jobs()
    with pytest.raises(Exception, match="Error 404: You do not have access to the collab 'private-jalice'"):
        jbob.submit_job(source="print(1)", platform="SpiNNaker", collab_id="private-jalice")
    r = requests.delete(jobs_hub.jobs_url + uri, headers={"Authorization": f"Bearer {jobs_hub.users['jbob'].token}"})
    assert r.status_code == 404
    wait_done(jalice, uri)
    assert jalice.get_job(uri)["status"] == "finished"
    r = requests.get(jobs_hub.jobs_url + "/jobs/", headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401 and "not valid" in r.json()["detail"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "The request body is not valid JSON"),
        (b"[1]", 400, "must be a JSON object"),
        (
            {"code": "print(1)", "collab": "private-jalice", "hardware_platform": "BrainScaleS"},
            422,
            "hardware_platform: 'BrainScaleS' is not run here; this service runs SpiNNaker jobs",
        ),
        (
            {"code": "print(1)", "collab": "private-jalice", "hardware_platform": "SpiNNaker", "priority": 1},
            422,
            "priority: unknown field",
        ),
        (
            {
                "code": "print(1)",
                "collab": "private-jalice",
                "hardware_platform": "SpiNNaker",
                "input_data": [{"url": "ftp://x/y"}],
            },
            422,
            "input_data[0].url: 'ftp://x/y' is not an http(s) URL",
        ),
        (
            {
                "code": "print(1)",
                "collab": "private-jalice",
                "hardware_platform": "SpiNNaker",
                "input_data": [{"url": "http://x/y", "path": "../y"}],
            },
            422,
            "input_data[0].path: '../y' must be a relative",
        ),
        ({"collab": "private-jalice", "hardware_platform": "SpiNNaker"}, 422, "code: required"),
        (
            {"code": "x" * (1024 * 1024 + 1), "collab": "private-jalice", "hardware_platform": "SpiNNaker"},
            422,
            "over the limit of 1024 KiB (jobs.limits.inline_code_kb)",
        ),
    ],
)
def test_bad_request_bodies(jobs_hub, body, status, message):
    headers = {"Authorization": f"Bearer {jobs_hub.users['jalice'].token}"}
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    r = requests.post(jobs_hub.jobs_url + "/jobs/", headers=headers, timeout=30, **kwargs)
    assert r.status_code == status and message in r.json()["detail"], (r.status_code, r.text[:300])


@pytest.mark.parametrize(
    "config, message",
    [
        ("{not json", "hardware_config is not valid JSON"),
        ({"spynaker_version": "7.4.1"}, "hardware_config.spynaker_version: unknown key"),
        ({"time_limit": "10"}, "hardware_config.time_limit: expected a whole number"),
        ({"spynnaker_version": "6.0.0"}, "'6.0.0' is not available here. Available: 7.4.1"),
        ({"extra_pip_installs": ["requests"]}, "'requests' is not in this deployment's allowed packages"),
        ({"extra_makes": ["all"]}, "hardware_config.extra_makes (C code built for this job) is not available"),
    ],
)
def test_bad_hardware_config_refused_at_submission(jobs_hub, nmpi_module, config, message):
    client = client_for(nmpi_module, jobs_hub, "jalice")
    before = client.queued_jobs()
    with pytest.raises(Exception) as err:
        client.submit_job(source=RUN_PY, platform="SpiNNaker", collab_id="private-jalice", config=config)
    assert str(err.value).startswith("Error 422: ") and message in str(err.value), str(err.value)
    assert client.queued_jobs() == before  # nothing was queued


def test_allowed_pip_package_is_installed_for_the_job(jobs_hub, nmpi_module):
    client = client_for(nmpi_module, jobs_hub, "jalice")
    script = "import os, six\nprint('six from', os.path.relpath(six.__file__))\n"
    job = wait_done(
        client,
        client.submit_job(
            source=script, platform="SpiNNaker", collab_id="private-jalice", config={"extra_pip_installs": ["six"]}
        ),
        timeout=180,
    )
    assert job["status"] == "finished", job["log"]
    assert "six from .job/packages/six.py" in job["log"]
    assert job["output_data"]["files"] == []  # the installed package is not an output


@pytest.mark.parametrize(
    "source, message",
    [
        ("evil.zip", "The zip archive has an entry outside its folder: '../../escaped.txt'"),
        ("bomb.zip", "The zip archive unpacks to more than 4 MiB"),
        ("missing.git", "Could not clone"),
    ],
)
def test_bad_code_is_a_clear_error(jobs_hub, nmpi_module, code_server, source, message):
    client = client_for(nmpi_module, jobs_hub, "jalice")
    job = wait_done(
        client,
        client.submit_job(source=f"{code_server['url']}/{source}", platform="SpiNNaker", collab_id="private-jalice"),
    )
    assert job["status"] == "error"
    assert message in job["log"], job["log"]
    assert job["output_data"]["files"] == []
    data = jobs_hub.base / "data" / "jobs"
    assert not list(data.rglob("escaped.txt")) and not (data.parent / "escaped.txt").exists()


def test_input_data_is_downloaded_before_the_job_runs(jobs_hub, code_server):
    """input_data URLs land in the job's folder (where the job reads them; they are not outputs); a missing file
    and data past jobs.limits.input_mb end the job with a line naming the input and the limit."""
    root, url = code_server["root"], code_server["url"]
    (root / "data.bin").write_bytes(PAYLOAD)
    (root / "big.bin").write_bytes(b"x" * (2**20 + 1))
    headers = {"Authorization": f"Bearer {jobs_hub.users['jalice'].token}"}
    script = (
        "import hashlib\nfor p in ('data.bin', 'inputs/copy.bin'):\n"
        "    print(p, hashlib.sha256(open(p, 'rb').read()).hexdigest())\n"
    )

    def submit(input_data) -> dict:
        r = requests.post(
            jobs_hub.jobs_url + "/jobs/",
            headers=headers,
            timeout=30,
            json={
                "code": script,
                "collab": "private-jalice",
                "hardware_platform": "SpiNNaker",
                "input_data": input_data,
            },
        )
        assert r.status_code == 201, r.text
        uri = r.json()["resource_uri"]
        wait_for(
            lambda: (
                requests.get(jobs_hub.jobs_url + uri, headers=headers, timeout=30).json()["status"]
                in ("finished", "error")
            ),
            120,
            "the job to end",
        )
        return requests.get(jobs_hub.jobs_url + uri + "?with_log=true", headers=headers, timeout=30).json()

    job = submit([f"{url}/data.bin", {"url": f"{url}/data.bin", "path": "inputs/copy.bin"}])
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    assert job["status"] == "finished", job["log"]
    assert f"data.bin {sha}" in job["log"] and f"inputs/copy.bin {sha}" in job["log"]
    assert job["input_data"] == [
        {"url": f"{url}/data.bin", "path": "data.bin"},
        {"url": f"{url}/data.bin", "path": "inputs/copy.bin"},
    ]
    assert [(i["path"], i["size"], i["sha256"]) for i in job["provenance"]["input_data"]] == [
        ("data.bin", len(PAYLOAD), sha),
        ("inputs/copy.bin", len(PAYLOAD), sha),
    ]
    assert job["output_data"]["files"] == []  # inputs are not outputs
    job = submit([f"{url}/data.bin", f"{url}/missing.bin"])
    assert job["status"] == "error"
    assert f"input_data[1]: could not download {url}/missing.bin: the server answered 404" in job["log"], job["log"]
    job = submit([f"{url}/big.bin"])
    assert job["status"] == "error"
    assert "the input files are larger than 1 MiB in all (jobs.limits.input_mb)" in job["log"], job["log"]
    job = submit([{"url": f"{url}/data.bin", "path": "run.py"}])  # never over the job's own code
    assert job["status"] == "error" and "input_data[0].path: run.py is already in the job's code" in job["log"]


def test_time_limit_stops_the_job(jobs_hub, nmpi_module):
    client = client_for(nmpi_module, jobs_hub, "jalice")
    script = "import time\nprint('starting', flush=True)\nwhile True:\n    time.sleep(0.2)\n"
    job = wait_done(
        client,
        client.submit_job(source=script, platform="SpiNNaker", collab_id="private-jalice", config={"time_limit": 2}),
    )
    assert job["status"] == "error"
    assert "The job ran for longer than its time limit of 2 s and was stopped" in job["log"], job["log"]
    assert "starting" in job["log"]


def test_delete_stops_a_running_job(jobs_hub, nmpi_module):
    client = client_for(nmpi_module, jobs_hub, "jalice")
    script = "import time\nopen('partial.txt', 'w').write('x')\nprint('working', flush=True)\ntime.sleep(600)\n"
    uri = client.submit_job(source=script, platform="SpiNNaker", collab_id="private-jalice")
    wait_for(lambda: "working" in client.get_job(uri, with_log=True)["log"], 60, "the job to start working")
    headers = {"Authorization": f"Bearer {jobs_hub.users['jalice'].token}"}
    r = requests.delete(jobs_hub.jobs_url + uri, headers=headers, timeout=30)
    assert r.status_code == 200 and r.json()["detail"] == "The job is being stopped."
    wait_for(lambda: client.job_status(uri) == "removed", 30, "the job to be stopped")
    job = client.get_job(uri, with_log=True)
    assert "cancelled by its owner" in job["log"] and job["output_data"]["files"] == []
    assert uri not in client.queued_jobs()


def test_service_files_are_private(jobs_hub):
    """The store holds every user's code and the key signs every download link: nobody else may read them."""
    data = jobs_hub.base / "data" / "jobs"
    for path in [data / "jobs.sqlite", data / "signing_key", data / "logs", data / "outputs"]:
        assert path.exists() and path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))


def test_output_limit_stops_the_job(jobs_hub, nmpi_module):
    client = client_for(nmpi_module, jobs_hub, "jalice")
    script = "with open('big.bin', 'wb') as f:\n    for _ in range(40):\n        f.write(b'x' * 2**17)\n"
    job = wait_done(client, client.submit_job(source=script, platform="SpiNNaker", collab_id="private-jalice"))
    assert job["status"] == "error"
    assert "(jobs.limits.output_mb) and was stopped" in job["log"], job["log"]


# Seconds a download link lives on tight_hub. A link expires at the whole second int(now) + ttl, so it lives
# between ttl - 1 and ttl seconds: with ttl 1 the fresh link read after the expiry could be dead before its
# download reached the service (as likely as the read-to-download gap is long: more so on a loaded machine);
# with 5 it outlives that gap by seconds.
URL_TTL = 5


@pytest.fixture(scope="module")
def tight_hub(hub_factory):
    """Short download links and small CPU / process limits; user servers run as root (no per-user accounts)."""
    hub = start_jobs_hub(
        hub_factory,
        {
            "download_url_ttl": URL_TTL,
            "limits": {"cpu_time": 2, "processes": 8, "memory_mb": 512, "upload_quota_mb": 1},
        },
        {"spawner": {"local": {"system_users": False}}},
    )
    hub.users = {"jcarol": hub.client("jcarol", hub.add_user("jcarol"))}
    return hub


def test_expired_download_url(tight_hub, nmpi_module, tmp_path):
    client = client_for(nmpi_module, tight_hub, "jcarol")
    job = wait_done(
        client,
        client.submit_job(source="open('a.txt', 'w').write('hello')", platform="SpiNNaker", collab_id="private-jcarol"),
    )
    url = job["output_data"]["files"][0]["url"]
    wait_for(lambda: requests.get(url, timeout=10).status_code == 403, URL_TTL + 10, "the download link to expire")
    r = requests.get(url, timeout=10)
    assert "This download link has expired" in r.json()["detail"]
    tampered = url.replace("expires=", "expires=9")
    assert "not valid" in requests.get(tampered, timeout=10).json()["detail"]
    fresh = client.get_job(job["id"])  # reading the job again gives a fresh link
    client.download_data(fresh, local_dir=str(tmp_path))
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_upload_quota_per_user(tight_hub):
    """A user's kept uploads (spinnaker-jupyter-job run) count against jobs.limits.upload_quota_mb: one that would go
    past it is refused with one line; another user's quota is their own."""
    name = "jquota"
    tight_hub.users[name] = tight_hub.client(name, tight_hub.add_user(name))
    body = b"\x1f\x8b" + os.urandom(600 * 1024)  # (only a .tar.gz is taken; its content is checked by the runner)

    def upload(user):
        return requests.post(
            tight_hub.jobs_url + "/uploads",
            data=body,
            timeout=30,
            headers={"Authorization": f"Bearer {tight_hub.users[user].token}"},
        )

    assert upload(name).status_code == 201
    r = upload(name)
    assert r.status_code == 413, r.text
    assert r.json()["detail"].startswith(
        "Your uploads here would take 1.2 MiB, over your quota of 1 MiB (jobs.limits.upload_quota_mb)"
    ), r.json()
    assert upload("jcarol").status_code == 201


def test_jobs_never_run_as_root(tight_hub, nmpi_module):
    """Even where the operator lets servers run as root, a job runs as the user's own account."""
    client = client_for(nmpi_module, tight_hub, "jcarol")
    job = wait_done(
        client,
        client.submit_job(
            source="import os, pwd\nprint('uid', pwd.getpwuid(os.getuid())[0])",
            platform="SpiNNaker",
            collab_id="private-jcarol",
        ),
    )
    account = tight_hub.system_account("jcarol")
    assert f"uid {account}" in job["log"], job["log"]
    assert job["provenance"]["account"] == account


@pytest.mark.parametrize(
    "script, message",
    [
        ("while True:\n    pass\n", "The job used more than 2 s of CPU time (jobs.limits.cpu_time) and was stopped"),
        ("x = bytearray(1024 * 2**20)\n", "each of its processes may use at most 512 MiB (jobs.limits.memory_mb)"),
        (
            "import subprocess\nps = [subprocess.Popen(['sleep', '5']) for _ in range(20)]\n",
            "The job started too many processes: at most 8 at once (jobs.limits.processes)",
        ),
    ],
)
def test_resource_limits_are_named(tight_hub, nmpi_module, script, message):
    client = client_for(nmpi_module, tight_hub, "jcarol")
    job = wait_done(client, client.submit_job(source=script, platform="SpiNNaker", collab_id="private-jcarol"))
    assert job["status"] == "error"
    assert message in job["log"], job["log"]


def _service_pid(hub) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == hub.proc.pid and b"spinnaker_jupyter.jobs.service" in cmdline:
            return int(entry.name)
    return None


def _ended(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever adopted it (init here reaps lazily)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_service_stop_puts_a_running_job_back_in_the_queue(jobs_hub, nmpi_module, sig):
    """The first attempt records its pid and waits for ever; the second finds the record and finishes. The log says
    the job was interrupted and run again, and the first attempt's process is gone."""
    import signal as signals

    marker = Path("/tmp") / f"jobs-test-{os.urandom(6).hex()}"
    script = (
        f"import os, pathlib, time\nm = pathlib.Path({str(marker)!r})\n"
        "if m.exists():\n    print('second attempt')\nelse:\n"
        "    m.write_text(str(os.getpid()))\n    print('first attempt', flush=True)\n"
        "    while True:\n        time.sleep(0.2)\n"
    )
    client = client_for(nmpi_module, jobs_hub, "jalice")
    uri = client.submit_job(source=script, platform="SpiNNaker", collab_id="private-jalice")
    try:
        wait_for(marker.exists, 60, "the first attempt to start")
        first = int(wait_for(lambda: marker.read_text(), 10, "the first attempt's pid"))
        old = _service_pid(jobs_hub)
        os.kill(old, getattr(signals, sig))
        # the hub starts its managed service again (the client cannot connect meanwhile): it looks every 5 s
        # (upstream.watch_services_every; JupyterHub's own 30 s made this wait fail most times)
        wait_for(lambda: _service_pid(jobs_hub) not in (None, old), 25, "the hub to start its job service again")
        # the new one puts the job back in the queue

        def ended():
            try:
                return client.job_status(uri) in ("finished", "error")
            except (requests.ConnectionError, requests.Timeout):
                return False

        wait_for(ended, 120, "the job to end after the service came back")
        job = client.get_job(uri, with_log=True)
        assert _service_pid(jobs_hub) not in (None, old)
        assert job["status"] == "finished", job["log"]
        assert "first attempt" in job["log"] and "second attempt" in job["log"]
        assert "while this job was running (attempt 1)" in job["log"], job["log"]
        assert "put back in the queue and will run again from the start" in job["log"]
        assert job["provenance"]["attempt"] == 2
        assert _ended(first), "the interrupted attempt's process is still running"
    finally:
        marker.unlink(missing_ok=True)


def test_a_notebook_submits_with_its_server_token(jobs_hub):
    """From the sPyNNaker kernel of the user's own server: the server's JUPYTERHUB_API_TOKEN and SPINNAKER_JOBS_URL
    are all it needs."""
    jalice = jobs_hub.users["jalice"]
    jalice.start_server()
    try:
        kernel = jalice.start_kernel("spynnaker")
        code = (
            "JOB = \"print(6 * 7)\\nopen('answer.txt', 'w').write(str(6 * 7))\\n\"\n"
            "import os, requests\n"
            "url, h = os.environ['SPINNAKER_JOBS_URL'], {'Authorization': 'Bearer ' + os.environ['JUPYTERHUB_API_TOKEN']}\n"
            "print('me', requests.get(url + '/userinfo', headers=h).json()['preferred_username'])\n"
            "r = requests.post(url + '/jobs/', headers=h, json={'code': JOB, 'collab': 'private-jalice',\n"
            "                                                   'hardware_platform': 'SpiNNaker'})\n"
            "print('job', r.status_code, r.json()['resource_uri'])\n"
        )
        out = jalice.execute(kernel, code)
        assert out["error"] is None, out
        assert "me jalice" in out["stdout"], out
        uri = out["stdout"].split("job 201 ")[1].split()[0]
        headers = {"Authorization": f"Bearer {jalice.token}"}
        wait_for(
            lambda: (
                requests.get(jobs_hub.jobs_url + uri, headers=headers, timeout=30).json()["status"]
                in ("finished", "error")
            ),
            60,
            "the notebook's job",
        )
        job = requests.get(jobs_hub.jobs_url + uri + "?with_log=true", headers=headers, timeout=30).json()
        assert job["status"] == "finished" and "42" in job["log"], job["log"]
        assert f"Output files copied to ~/jobs/{job['id']}/." in job["log"]
        # ... where the notebook finds them
        out = jalice.execute(kernel, f"print(open(os.path.expanduser('~/jobs/{job['id']}/answer.txt')).read())")
        assert out["stdout"].strip() == "42", out
    finally:
        jalice.stop_server()


def test_an_account_of_another_deployment_is_not_used(jobs_hub, nmpi_module, tmp_path):
    """jdave's system account (`jupyter-jdave`) made by another deployment on this machine (its home elsewhere,
    still there) is another person: jdave's jobs here do not run as it."""
    other_home = traversable_tmpdir("other-deployment-")
    account = jobs_hub.system_account("jdave")
    subprocess.run(["userdel", account], capture_output=True)  # left by an interrupted run
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            str(other_home),
            "--comment",
            "Jupyter user jdave",
            account,
        ],
        check=True,
    )
    try:
        jobs_hub.users["jdave"] = jobs_hub.client("jdave", jobs_hub.add_user("jdave"))
        client = client_for(nmpi_module, jobs_hub, "jdave")
        job = wait_done(
            client, client.submit_job(source="print('ran')", platform="SpiNNaker", collab_id="private-jdave")
        )
        assert job["status"] == "error" and "\nran\n" not in job["log"]
        assert f"The system account {account} belongs to another deployment on this machine" in job["log"]
    finally:
        subprocess.run(["userdel", account], check=False)
        import shutil

        shutil.rmtree(other_home, ignore_errors=True)
