"""Several sPyNNaker releases (kernels.spynnaker): the config mapped to releases, kernels and job environments, and a
job's hardware_config spynnaker_version choosing among them. A bare config, no process (the built envs and real jobs:
tests/integration/test_spynnaker_releases.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from spinnaker_jupyter import config, kernels
from spinnaker_jupyter.config import ConfigError
from spinnaker_jupyter.jobs import hardware_config, steps
from spinnaker_jupyter.jobs.settings import Settings
from spinnaker_jupyter.schema import defaults, describe

SRC = kernels.KERNELS_SRC / "spynnaker"
TWO = {"kernels": {"spynnaker": [{"version": "7.4.1"}, {"version": "1!7.3.0"}]}}


def load(write_config, data: dict):
    return config.load([write_config(data)])


def one_line_error(write_config, data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        load(write_config, data)
    message = str(e.value)
    assert message.splitlines() == [message]
    return message


def test_the_single_object_form_of_earlier_configs_is_the_default_release(write_config, tmp_path):
    for data in ({}, {"kernels": {"spynnaker": {"display_name": "SpiNNaker (lab)"}}}):
        d = load(write_config, data)
        (release,) = kernels.releases(d)
        assert (release.version, release.kernel_name, release.requirements) == (
            "7.4.1",
            "spynnaker",
            SRC / "requirements.txt",
        )
        assert release.env == d.envs_dir / "spynnaker"
        assert release.display_name == (data and "SpiNNaker (lab)" or "sPyNNaker")
    (tmp_path / "mine.txt").write_text("sPyNNaker==1!7.4.0\n")
    d = load(write_config, {"kernels": {"spynnaker": {"requirements": "mine.txt"}}})
    assert [(r.version, r.requirements) for r in kernels.releases(d)] == [("7.4.0", tmp_path / "mine.txt")]


def test_a_list_gives_one_kernel_and_env_per_release_the_first_the_default(write_config):
    d = load(write_config, TWO)
    first, second = kernels.releases(d)
    assert (first.kernel_name, first.display_name, first.env) == ("spynnaker", "sPyNNaker", d.envs_dir / "spynnaker")
    assert (second.version, second.kernel_name, second.display_name) == ("7.3.0", "spynnaker-7.3.0", "sPyNNaker 7.3.0")
    assert second.env == d.envs_dir / "spynnaker-7.3.0"
    assert second.requirements == SRC / "requirements-7.3.0.txt"
    assert second.python == d.envs_dir / "spynnaker-7.3.0" / "bin" / "python"


def test_every_pinned_requirements_file_pins_the_release_it_is_named_for():
    assert kernels.pinned_version(SRC / "requirements.txt") == "7.4.1"
    for path in SRC.glob("requirements-*.txt"):
        assert kernels.pinned_version(path) == path.stem.removeprefix("requirements-")


@pytest.mark.parametrize(
    "releases, message",
    [
        ([{"version": "7.4.1"}, {"version": "7.4.1"}], "kernels.spynnaker[1].version: 7.4.1 is listed twice"),
        ([{}, {"version": "7.4.1"}], "kernels.spynnaker[1].version: 7.4.1 is listed twice"),
        ([{}, {"version": "6.0.0"}], "kernels.spynnaker[1].requirements: no such file "),
        ([{}, {"version": "7.3.0", "requirements": "nope.txt"}], "kernels.spynnaker[1].requirements: no such file "),
        ([{}, {"display_name": "x"}], "kernels.spynnaker[1]: give its version"),
        ([{"version": "7.3.0"}], "kernels.spynnaker[0].version: 7.3.0, but "),
        ([{}, {"version": "7.3.0", "colour": "red"}], "kernels.spynnaker.1: colour: unknown key"),
        ([{}, {"version": "seven"}], "kernels.spynnaker.1.version: expected a release number such as 7.3.0"),
        ([], "kernels.spynnaker: [] should be non-empty"),
    ],
)
def test_a_wrong_release_is_one_line_naming_its_key(write_config, releases, message):
    got = one_line_error(write_config, {"kernels": {"spynnaker": releases}})
    assert message in got or got.startswith(message.replace(": colour", ".colour")), got


def test_every_new_key_has_its_prose_in_the_reference():
    documented = {path: desc for path, desc, _default in describe()}
    for key in ("kernels.spynnaker", *(f"kernels.spynnaker.{k}" for k in ("version", "requirements", "display_name"))):
        assert len(documented[key]) > 40, key
    assert defaults()["kernels"]["spynnaker"] == {"version": None, "requirements": None, "display_name": None}


def test_a_job_picks_its_release_and_any_other_version_is_refused_with_the_list(write_config, tmp_path):
    s = Settings.from_deployment(load(write_config, TWO))
    assert s.versions == ["7.4.1", "7.3.0"] and s.spynnaker_env == s.releases[0].env
    assert s.release({}) is s.releases[0]
    assert s.release({"spynnaker_version": "7.3.0"}) is s.release({"spynnaker_version": "1!7.3.0"}) is s.releases[1]

    def check(value):
        return hardware_config.parse(value, ["spynnaker_version"], s.versions, [], 60)

    assert check('{"spynnaker_version": "7.3.0"}') == {"spynnaker_version": "7.3.0"}
    with pytest.raises(hardware_config.HardwareConfigError) as e:
        check({"spynnaker_version": "7.0.0"})
    assert str(e.value) == "hardware_config.spynnaker_version: '7.0.0' is not available here. Available: 7.4.1, 7.3.0"

    # the job's command, its PATH and its pip run with the release it picked
    (tmp_path / "run.py").write_text("print(1)\n")
    job = SimpleNamespace(id=7, command="run.py {system}")
    release = s.release(check({"spynnaker_version": "7.3.0"}))
    assert steps.argv_for(s, job, tmp_path, release) == [str(release.python), "run.py", "spiNNaker"]
    account = SimpleNamespace(name="u")
    assert steps.env_for(s, job, tmp_path, account, release)["PATH"].startswith(f"{release.env / 'bin'}:")
    assert steps.argv_for(s, job, tmp_path)[0] == str(s.releases[0].python)


def test_the_docker_executor_offers_the_images_release_only(write_config):
    s = Settings.from_deployment(load(write_config, {**TWO, "jobs": {"executor": "docker"}}))
    assert s.versions == ["7.4.1"]


def test_kernelspecs_one_per_release_and_a_release_taken_out_loses_its_kernel(write_config):
    d = load(write_config, TWO)
    for release in kernels.releases(d):  # built, as far as build_all(build=False) can tell
        (release.env / "bin").mkdir(parents=True)
        (release.env / kernels.STAMP).write_text("x")
    kernels.build_all(d, build=False)
    specs = {p.parent.name: json.loads(p.read_text()) for p in (d.share_dir / "kernels").glob("*/kernel.json")}
    assert specs["spynnaker"]["display_name"] == "sPyNNaker"
    assert specs["spynnaker-7.3.0"]["display_name"] == "sPyNNaker 7.3.0"
    assert specs["spynnaker-7.3.0"]["argv"][0] == str(d.envs_dir / "spynnaker-7.3.0" / "bin" / "python")
    kernels.build_all(load(write_config, {}), build=False)
    assert sorted(p.name for p in (d.share_dir / "kernels").iterdir()) == ["python3", "spynnaker"]


def test_a_release_not_built_is_named_when_the_hub_starts(write_config):
    d = load(write_config, TWO)
    (d.envs_dir / "spynnaker").mkdir(parents=True)
    (d.envs_dir / "spynnaker" / kernels.STAMP).write_text("x")
    with pytest.raises(ConfigError, match=r"the sPyNNaker 7.3.0 kernel environment .* is not built: run"):
        kernels.build_all(d, build=False)
