"""What the job service takes from the deployment config (the `jobs:` section and the parts of others it needs)."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import CONFIG_ENV, Deployment, merge, read_file, validate
from ..kernels import Release, bare_version, installed_version, releases
from ..schema import defaults
from . import fetch
from .executor import RunLimits

SERVICE_NAME = "jobs"
DB_URL_ENV = "SPINNAKER_JUPYTER_JOBS_DB_URL"


def load_deployment() -> Deployment:
    """The hub's deployment config, as config.load() reads it but without its cross-key checks: those ask for the
    hub's own secrets (EBRAINS client secret, spalloc token), which the job service neither needs nor gets. The hub
    has checked them already."""
    files = [Path(f).expanduser().resolve() for f in os.environ.get(CONFIG_ENV, "").split(os.pathsep) if f]
    values = defaults()
    for path in files:
        values = merge(values, read_file(path))
    validate(values)
    return Deployment(values, files)


def public_url(d: Deployment) -> str:
    j = d["jobs"]
    return (j["public_url"] or f"http://{j['ip']}:{j['port']}").rstrip("/")


def local_url(d: Deployment) -> str:
    """Where the hub, its services and the jobs on this machine reach the job service (jobs.ip, or loopback when it
    listens on every address)."""
    ip = d["jobs"]["ip"] if d["jobs"]["ip"] not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return f"http://{ip}:{d['jobs']['port']}"


def db_url(d: Deployment) -> str:
    return os.environ.get(DB_URL_ENV) or d["jobs"]["db_url"] or f"sqlite:///{jobs_dir(d) / 'jobs.sqlite'}"


def jobs_dir(d: Deployment) -> Path:
    return d.data_dir / "jobs"


def job_releases(d: Deployment) -> tuple[Release, ...]:
    """The sPyNNaker releases a job may pick (kernels.spynnaker), the default first. The docker executor runs the
    single-user image, which has the default release only: the others are not offered there."""
    found = releases(d)
    if not found[0].version:  # a default requirements file that pins no sPyNNaker: what its env has
        found[0] = dataclasses.replace(found[0], version=installed_version(found[0].env))
    return tuple(found[:1] if d["jobs"]["executor"] == "docker" else found)


@dataclass
class Settings:
    base_url: str
    data: Path  # data_dir/jobs: the store (SQLite), logs, outputs, scratch folders, the signing key
    spynnaker_env: Path
    spinnaker: dict  # the `spinnaker:` section (jobs run virtual in this release)
    concurrency: int
    wall_time: int
    run_limits: RunLimits
    output_bytes: int
    output_files: int
    log_bytes: int
    fetch_limits: fetch.Limits
    url_ttl: int
    retention_days: int
    allowed_keys: list[str]
    pip_packages: list[str]
    collabs: dict[str, list[str]]
    input_bytes: int = 1024 * 2**20  # all of a job's input_data files together
    upload_quota_bytes: int = 500 * 2**20  # a user's kept uploads together
    releases: tuple[Release, ...] = ()  # the sPyNNaker releases a job may pick, the default (spynnaker_env) first

    @property
    def versions(self) -> list[str]:
        """What hardware_config.spynnaker_version may say here (bare versions, the default first)."""
        return [r.version for r in self.releases if r.version]

    def release(self, config: dict) -> Release:
        """The release a checked hardware_config picks: its spynnaker_version, else the default."""
        want = config.get("spynnaker_version")
        for r in self.releases:
            if want is None or r.version == bare_version(want):
                return r
        raise LookupError(f"sPyNNaker {want} is not one of {', '.join(self.versions)}")  # parse() refused it

    @property
    def logs(self) -> Path:
        return self.data / "logs"

    @property
    def outputs(self) -> Path:
        return self.data / "outputs"

    @property
    def work(self) -> Path:
        return self.data / "work"

    @property
    def sessions(self) -> Path:  # the process sessions of running jobs, spared by a server's stop (sessions.py)
        return self.data / "sessions"

    @property
    def cfg_dir(self) -> Path:
        return self.data / "etc"

    @property
    def job_cfgs(self) -> Path:  # the sPyNNaker cfg naming a running job's boards, one folder per job
        return self.data / "cfg"

    @property
    def python(self) -> Path:
        return self.spynnaker_env / "bin" / "python"

    @classmethod
    def from_deployment(cls, d: Deployment) -> Settings:
        j, lim = d["jobs"], d["jobs"]["limits"]
        mib = 2**20
        rels = job_releases(d)
        return cls(
            base_url=public_url(d),
            data=jobs_dir(d),
            spynnaker_env=rels[0].env,
            spinnaker=d["spinnaker"],
            concurrency=j["concurrency"],
            wall_time=lim["wall_time"],
            run_limits=RunLimits(
                cpu_seconds=lim["cpu_time"],
                memory_bytes=lim["memory_mb"] * mib,
                processes=lim["processes"],
                file_bytes=lim["output_mb"] * mib,
            ),
            output_bytes=lim["output_mb"] * mib,
            output_files=lim["output_files"],
            log_bytes=lim["log_mb"] * mib,
            fetch_limits=fetch.Limits(
                code_bytes=lim["code_mb"] * mib,
                code_files=lim["code_files"],
                inline_bytes=lim["inline_code_kb"] * 1024,
                timeout=lim["fetch_timeout"],
            ),
            url_ttl=j["download_url_ttl"],
            retention_days=j["retention_days"],
            allowed_keys=list(j["hardware_config_keys"]),
            pip_packages=list(j["pip_packages"]),
            collabs={k: list(v) for k, v in j["collabs"].items()},
            input_bytes=lim["input_mb"] * mib,
            upload_quota_bytes=lim["upload_quota_mb"] * mib,
            releases=rels,
        )


def service_command() -> list[str]:
    return [sys.executable, "-m", "spinnaker_singleuser", "-m", "spinnaker_jupyter.jobs.service"]  # (the import cut)
