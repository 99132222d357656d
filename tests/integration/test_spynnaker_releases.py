"""Several sPyNNaker releases (kernels.spynnaker as a list) on a real hub: a user's server offers one kernel per
release, a batch job's hardware_config spynnaker_version runs it with that release, and any other version is refused
naming the available ones. The releases are those `make test-deps` builds (tests/build-config.yaml)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN
from spinnaker_jupyter import kernels
from test_jobs import client_for, nmpi_module, start_jobs_hub, wait_done  # noqa: F401 (nmpi_module: a fixture)

BUILD_CONFIG = Path(__file__).resolve().parents[1] / "build-config.yaml"
RELEASES = yaml.safe_load(BUILD_CONFIG.read_text())["kernels"]["spynnaker"]
DEFAULT, SECOND = (r["version"] for r in RELEASES)
PRINT_VERSION = "import importlib.metadata as m, spynnaker\nprint('sPyNNaker', m.version('sPyNNaker'), flush=True)\n"


@pytest.fixture(scope="module")
def releases_hub(hub_factory, envs_dir):
    if not (envs_dir / f"spynnaker-{SECOND}" / kernels.STAMP).exists():  # a data/envs from before the second one
        subprocess.run([BIN / "spinnaker-jupyter", "build", "-c", BUILD_CONFIG], check=True, timeout=900)
    hub = start_jobs_hub(hub_factory, extra={"kernels": {"spynnaker": RELEASES}})
    hub.users = {"rel": hub.client("rel", hub.add_user("rel"))}
    return hub


def submit(nmpi_module, hub, config: dict | None):  # noqa: F811
    """(the client, the job's URI) of a job printing the sPyNNaker release it runs with."""
    client = client_for(nmpi_module, hub, "rel")
    return client, client.submit_job(
        source=PRINT_VERSION, platform="SpiNNaker", collab_id="private-rel", config=config or {}
    )


@pytest.mark.parametrize("version", [SECOND, None], ids=["second", "default"])
def test_a_job_runs_with_the_release_its_hardware_config_names(releases_hub, nmpi_module, version):  # noqa: F811
    client, uri = submit(nmpi_module, releases_hub, {"spynnaker_version": version} if version else None)
    job = wait_done(client, uri, timeout=240)
    assert job["status"] == "finished", job["log"][-3000:]
    want = version or DEFAULT
    assert f"sPyNNaker 1!{want}" in job["log"], job["log"][-3000:]
    assert job["provenance"]["sPyNNaker"] == want
    assert job["provenance"]["command"][0] == "run.py"


def test_an_unknown_version_is_refused_naming_the_available_ones(releases_hub, nmpi_module):  # noqa: F811
    with pytest.raises(Exception) as e:
        submit(nmpi_module, releases_hub, {"spynnaker_version": "6.0.0"})
    assert f"hardware_config.spynnaker_version: '6.0.0' is not available here. Available: {DEFAULT}, {SECOND}" in str(
        e.value
    )


def test_the_users_server_lists_one_kernel_per_release(releases_hub):
    user = releases_hub.users["rel"]
    user.start_server()
    specs = user.server("GET", "api/kernelspecs").json()["kernelspecs"]
    assert specs["spynnaker"]["spec"]["display_name"] == "sPyNNaker"
    assert specs[f"spynnaker-{SECOND}"]["spec"]["display_name"] == f"sPyNNaker {SECOND}"
    kernel = user.start_kernel(f"spynnaker-{SECOND}")
    out = user.execute(kernel, PRINT_VERSION)
    assert out["error"] is None and f"sPyNNaker 1!{SECOND}" in out["stdout"], out


def test_a_slurm_job_runs_with_the_release_it_names(hub_factory, slurm, nmpi_module):  # noqa: F811
    from test_jobs_slurm import jobs_slurm_config

    extra, jobs = jobs_slurm_config(slurm)
    hub = start_jobs_hub(hub_factory, jobs, {**extra, "kernels": {"spynnaker": RELEASES}})
    hub.users = {"rel": hub.client("rel", hub.add_user("rel"))}
    client, uri = submit(nmpi_module, hub, {"spynnaker_version": SECOND})
    job = wait_done(client, uri, timeout=240)
    assert job["status"] == "finished", job["log"][-3000:]
    assert "Submitted to Slurm as job" in job["log"] and f"sPyNNaker 1!{SECOND}" in job["log"], job["log"][-3000:]
    assert job["provenance"]["sPyNNaker"] == SECOND
