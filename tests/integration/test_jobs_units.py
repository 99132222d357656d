"""The job service's building blocks without a hub: archive safety, hardware config checks, signed URLs, the
store's claim, and the runner's output collection as a real system account."""

from __future__ import annotations

import io
import os
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from spinnaker_jupyter.jobs import archives, hardware_config, signing
from spinnaker_jupyter.jobs.store import Store

KEYS = list(hardware_config.SUPPORTED)


@pytest.mark.parametrize(
    "name, ok",
    [
        ("run.py", "run.py"),
        ("a/./b.py", "a/b.py"),
        ("../x", None),
        ("a/../../x", None),
        ("/etc/passwd", None),
        ("C:/x", None),
        ("", None),
        ("a\0b", None),
        ("..", None),
    ],
)
def test_safe_relpath(name, ok):
    assert archives.safe_relpath(name) == ok


def _tar(tmp_path: Path, *members) -> Path:
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_tar_link_and_traversal_refused(tmp_path):
    link = tarfile.TarInfo("data")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(archives.ArchiveError, match="link or special file: 'data'"):
        archives.extract_tar(_tar(tmp_path, (link, None)), dest, 2**20, 10)
    evil = tarfile.TarInfo("../evil.py")
    evil.size = 1
    with pytest.raises(archives.ArchiveError, match=r"outside its folder: '../evil.py'"):
        archives.extract_tar(_tar(tmp_path, (evil, b"x")), dest, 2**20, 10)
    assert not (tmp_path / "evil.py").exists()


def test_bomb_stops_at_the_limit_counting_real_bytes(tmp_path):
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("zeros")
        info.size = 8 * 2**20
        t.addfile(info, io.BytesIO(b"\0" * info.size))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(archives.ArchiveError, match="unpacks to more than 1 MiB"):
        archives.extract_tar(path, dest, 2**20, 10)
    assert (dest / "zeros").stat().st_size <= 2**20 + archives.CHUNK


def test_zip_symlink_and_file_count(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as z:
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16
        z.writestr(info, "/etc/shadow")
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(archives.ArchiveError, match="link or special file: 'link'"):
        archives.extract_zip(path, dest, 2**20, 10)
    with zipfile.ZipFile(path, "w") as z:
        for i in range(5):
            z.writestr(f"f{i}.py", "x")
    with pytest.raises(archives.ArchiveError, match="more than 3 files"):
        archives.extract_zip(path, tmp_path / "out2", 2**20, 3)


def test_hardware_config_checks():
    parse = lambda v, **kw: hardware_config.parse(v, kw.get("keys", KEYS), ["1!7.4.1"], ["neo"], 600)  # noqa: E731
    assert parse({"spynnaker_version": "7.4.1", "extra_pip_installs": ["neo==0.14.6"], "time_limit": 60}) == {
        "spynnaker_version": "7.4.1",
        "extra_pip_installs": ["neo==0.14.6"],
        "time_limit": 60,
    }
    assert parse('{"spynnaker_version": "1!7.4.1"}') == {"spynnaker_version": "1!7.4.1"}
    assert parse(None) == {}
    for bad, message in [
        ("[1]", "must be a JSON object"),
        ({"time_limit": 601}, "between 1 and 600 seconds"),
        ({"time_limit": True}, "expected a whole number"),
        ({"extra_pip_installs": ["neo; rm -rf /"]}, "is not a package requirement"),
        ({"extra_pip_installs": "neo"}, "expected a list of strings"),
        ({"boards": 1}, "hardware_config.boards (SpiNNaker boards for this job) is not available"),
    ]:
        with pytest.raises(hardware_config.HardwareConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse(bad, keys=[k for k in KEYS if k != "boards"])


def test_signed_urls(tmp_path):
    key = signing.load_key(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert signing.load_key(tmp_path / "k") == key
    url = signing.sign(key, "http://x", 3, "out/a b.txt", 60)
    query = dict(p.split("=") for p in url.split("?")[1].split("&"))
    assert signing.check(key, 3, "out/a b.txt", query["expires"], query["signature"]) is None
    assert "not valid" in signing.check(key, 4, "out/a b.txt", query["expires"], query["signature"])
    assert "not valid" in signing.check(key, 3, "other", query["expires"], query["signature"])
    assert "not valid" in signing.check(os.urandom(32), 3, "out/a b.txt", query["expires"], query["signature"])
    old = str(int(time.time()) - 1)
    sig = signing._mac(key, 3, "p", int(old))
    assert "expired" in signing.check(key, 3, "p", old, sig)


def test_claim_is_exclusive(tmp_path):
    """Two runners on one store: every job is claimed exactly once."""
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    a, b = Store(url), Store(url)
    for i in range(20):
        a.create(
            "alice",
            {"collab": "private-alice", "code": f"print({i})", "command": "run.py", "hardware_platform": "SpiNNaker"},
        )
    got = []
    while True:
        ja, jb = a.claim_next("a"), b.claim_next("b")
        got += [j.id for j in (ja, jb) if j]
        if not ja and not jb:
            break
    assert sorted(got) == list(range(1, 21))
    assert {j.status for j in a.interrupted()} == {"running"} and len(a.interrupted("a")) == 10


def test_outputs_go_after_the_retention_time(tmp_path, envs_dir):
    from datetime import datetime, timedelta, timezone

    from spinnaker_jupyter.config import load
    from spinnaker_jupyter.jobs.executor import LocalExecutor
    from spinnaker_jupyter.jobs.runner import Runner
    from spinnaker_jupyter.jobs.settings import Settings

    (tmp_path / "c.yaml").write_text(
        f"data_dir: {tmp_path / 'data'}\nkernels: {{envs_dir: {envs_dir}}}\n"
        "jobs: {enabled: true, retention_days: 3}\n"
    )
    s = Settings.from_deployment(load([tmp_path / "c.yaml"]))
    s.data.mkdir(parents=True)
    store = Store(f"sqlite:///{s.data / 'jobs.sqlite'}")
    runner = Runner(store, LocalExecutor(tmp_path / "homes", False, "jupyter-"), s)
    old, new = (
        store.create(
            "alice",
            {"collab": "private-alice", "code": "print(1)", "command": "run.py", "hardware_platform": "SpiNNaker"},
        )
        for _ in range(2)
    )
    for job, days in ((old, 4), (new, 2)):
        (s.outputs / str(job.id)).mkdir(parents=True)
        (s.outputs / str(job.id) / "out.txt").write_text("x")
        store.finish(job.id, "finished", {}, [{"path": "out.txt", "size": 1, "hash": "h"}], 0.0)
        store._update(job.id, timestamp_completion=datetime.now(timezone.utc) - timedelta(days=days))
    runner.purge()
    assert not (s.outputs / str(old.id)).exists() and store.get(old.id).output_files == "[]"
    assert (s.outputs / str(new.id) / "out.txt").exists() and store.get(new.id).output_files != "[]"
    assert "output files removed after 3 days" in (s.logs / f"{old.id}.log").read_text()


def test_hub_wiring(tmp_path):
    """Disabled: nothing added. Enabled: the service with the deployment's config files, and users' tokens may use
    it (the user role keeps what others gave it)."""
    from traitlets.config import Config

    from spinnaker_jupyter.config import load
    from spinnaker_jupyter.jobs.hubconfig import ACCESS_SCOPE, update_jobs

    (tmp_path / "off.yaml").write_text(f"data_dir: {tmp_path}\n")
    c = Config()
    c.JupyterHub.services, c.JupyterHub.load_roles = [], [{"name": "user", "scopes": ["self", "x"]}]
    c.Spawner.environment = {"A": "1"}
    update_jobs(c, load([tmp_path / "off.yaml"]))
    assert c.JupyterHub.services == [] and c.JupyterHub.load_roles == [{"name": "user", "scopes": ["self", "x"]}]
    (tmp_path / "on.yaml").write_text(f"data_dir: {tmp_path}\njobs: {{enabled: true}}\n")
    update_jobs(c, load([tmp_path / "on.yaml"]))
    [service] = c.JupyterHub.services
    assert service["name"] == "jobs" and service["command"][-1] == "spinnaker_jupyter.jobs.service"
    assert service["environment"]["SPINNAKER_JUPYTER_CONFIG"] == str(tmp_path / "on.yaml")
    # the API at the root of its own address; the url gives the Jobs page its route /services/jobs/ and OAuth client
    assert service["url"] == "http://127.0.0.1:8092" and service["oauth_no_confirm"]
    assert c.PrivateHomeSpawner.job_sessions_dir == str(tmp_path / "jobs" / "sessions")  # spared by a server's stop
    assert c.JupyterHub.load_roles == [{"name": "user", "scopes": ["self", "x", ACCESS_SCOPE]}]
    assert c.Spawner.server_token_scopes == ["users:activity!user", "access:servers!server", ACCESS_SCOPE]
    assert c.Spawner.environment == {"A": "1", "SPINNAKER_JOBS_URL": "http://127.0.0.1:8092"}
    c2 = Config()
    c2.JupyterHub.services, c2.JupyterHub.load_roles, c2.Spawner.environment = [], [], {}
    c2.Spawner.server_token_scopes = ["x!server"]
    update_jobs(c2, load([tmp_path / "on.yaml"]))
    assert c2.JupyterHub.load_roles == [{"name": "user", "scopes": ["self", ACCESS_SCOPE]}]
    assert c2.Spawner.server_token_scopes == ["x!server", ACCESS_SCOPE]


def test_removal_flags_a_running_job_and_removes_the_others(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    ids = [
        store.create(
            "alice",
            {"collab": "private-alice", "code": "print(1)", "command": "run.py", "hardware_platform": "SpiNNaker"},
        ).id
        for _ in range(3)
    ]
    store.claim_next("r")  # ids[0] runs
    store.finish(ids[1], "finished", {}, [], 0.0)
    assert [store.request_removal(i) for i in ids] == ["running", "finished", "submitted"]
    assert [store.get(i).status for i in ids] == ["running", "removed", "removed"]
    assert store.cancel_requested(ids[0]) and store.get(ids[2]).timestamp_completion is not None
    assert store.claim_next("r") is None  # a removed job is never claimed
    assert store.request_removal(ids[1]) == "removed"


def test_job_sessions_are_trusted_only_from_a_private_folder(tmp_path):
    """What a server's stop spares (jobs/sessions.py): sessions recorded in a folder only this account could write;
    a folder others may write spares nothing (anyone could claim a session there)."""
    import os
    import subprocess

    from spinnaker_jupyter.jobs import sessions

    where = sessions.folder(tmp_path)
    sessions.prepare(where)
    job = subprocess.Popen(
        ["sleep", "30"], start_new_session=True, preexec_fn=lambda: sessions.record_self(where, os.getuid())
    )
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        wait_for_file = where / str(job.pid)
        assert wait_for_file.read_text() == str(os.getuid())
        found = sessions.recorded(where)
        assert found == {job.pid: os.getuid()}
        assert sessions.spared_pid(job.pid, os.getuid(), found)
        assert not sessions.spared_pid(other.pid, os.getuid(), found)
        assert not sessions.spared_pid(job.pid, os.getuid() + 1, found)  # recorded for another account
        os.chmod(where, 0o777)
        assert sessions.recorded(where) == {}
        os.chmod(where, 0o700)
        sessions.forget(where, job.pid)
        assert sessions.recorded(where) == {}
        assert sessions.recorded("") == {}
    finally:
        for p in (job, other):
            p.kill()
            p.wait()


@pytest.mark.parametrize("on_timeout", ["fail", "virtual"])
def test_no_board_in_time_follows_on_timeout(tmp_path, envs_dir, on_timeout, monkeypatch):
    """The one board is taken: a job's claim ends after claim_timeout, and spinnaker.on_timeout decides, as for a
    server: `fail` ends the job with the reason, `virtual` runs it on a virtual board and says why. Its queued claim
    is withdrawn either way."""
    import asyncio
    import json

    from doubles.spalloc_server import SpallocDouble
    from spinnaker_jupyter.config import load
    from spinnaker_jupyter.jobs.executor import LocalExecutor
    from spinnaker_jupyter.jobs.job_boards import JobBoards
    from spinnaker_jupyter.jobs.runner import Runner
    from spinnaker_jupyter.jobs.settings import Settings
    from spinnaker_jupyter.spalloc import SpallocAllocator

    monkeypatch.setenv("SPALLOC_TOKEN", "t")
    double = SpallocDouble(boards=1, tokens={"t": "hub"}, admins=["hub"], power_delay=0.05).start()
    try:
        (tmp_path / "c.yaml").write_text(
            json.dumps(
                {
                    "data_dir": str(tmp_path / "data"),
                    "kernels": {"envs_dir": str(envs_dir)},
                    "jobs": {"enabled": True},
                    "spinnaker": {
                        "mode": "session",
                        "claim_timeout": 2,
                        "on_timeout": on_timeout,
                        "spalloc": {"url": double.url, "keepalive_interval": 30},
                    },
                }
            )
        )
        d = load([tmp_path / "c.yaml"])
        s = Settings.from_deployment(d)
        s.data.mkdir(parents=True)
        store = Store(f"sqlite:///{s.data / 'jobs.sqlite'}")
        boards = JobBoards(d["spinnaker"], tmp_path / "leases.sqlite", lambda: "t")
        runner = Runner(store, LocalExecutor(tmp_path / "homes", False, "jupyter-"), s, boards)
        store.create(
            "alice",
            {"collab": "private-alice", "code": "print('ran')", "command": "run.py", "hardware_platform": "SpiNNaker"},
        )

        async def scenario():
            other = SpallocAllocator(url=double.url, token="t", keepalive_interval=30)
            taken = await other.claim("someone", n_boards=1)  # the one board, kept alive meanwhile
            try:
                await runner.run(store.claim_next(runner.id))
            finally:
                await taken.release("test over")
                await other.close()
                await boards.close()

        asyncio.run(asyncio.wait_for(scenario(), 60))
        job = store.get(1)
        log = (s.logs / "1.log").read_text()
        assert "you are in the queue" in log, log
        if on_timeout == "fail":
            assert job.status == "error" and "No SpiNNaker board for your job: " in log and "\nran\n" not in log, log
            assert "no SpiNNaker board became free within 2 s" in log
        else:
            assert job.status == "finished" and "\nran\n" in log, log
            assert "This job runs on a VIRTUAL SpiNNaker board (no board came, see above)" in log
            assert json.loads(job.provenance)["virtual_board"] is True and job.resource_usage == 0.0
        assert [j["state"] for j in double.jobs() if j["owner"] == "alice"] == ["DESTROYED"]
        store.engine.dispose()
    finally:
        double.stop()
