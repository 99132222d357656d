"""images/build.py builds every image the repository has a Containerfile for, the EBRAINS Drive helper included
(spawner.docker.drive_image, default spinnaker-jupyter/drive:latest)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from .test_pip_config import image_build

IMAGES = Path(__file__).resolve().parents[2] / "images"


def test_every_containerfile_is_a_target_and_all_builds_each_once():
    build = image_build()
    # (nrp's Containerfile is the second stage of the nrp target, which starts from the single-user one)
    assert {f.parent.name for f in IMAGES.glob("*/Containerfile")} == set(build.TARGETS)
    assert all((IMAGES.parent / path).is_file() for path in build.CONTAINERFILES.values())
    assert build.expand_targets(["all"]) == ["singleuser", "hub", "drive", "nrp"]
    assert build.expand_targets(["drive", "hub", "drive"]) == ["drive", "hub"]
    with pytest.raises(ValueError, match="unknown image 'driv'; choose from singleuser, hub, drive, nrp or all"):
        build.expand_targets(["driv"])


def test_the_drive_target_builds_the_helper_image_on_the_base(monkeypatch):
    build = image_build()
    built = []

    def fake_build(api, image, containerfile, buildargs, **common):
        built.append((image, containerfile, buildargs))
        return build.Result(image=image, seconds=1.0)

    monkeypatch.setattr(build, "build", fake_build)
    monkeypatch.setattr(build, "print_layers", lambda api, image: 0)
    args = types.SimpleNamespace(prefix="spinnaker-jupyter", tag="latest", no_cache=False, verbose=False)
    assert build._build_all(args, None, ["drive"], "localhost/base:1", "host", None, 0.0) == 0
    assert built == [
        ("spinnaker-jupyter/drive:latest", "images/drive/Containerfile", {"BASE_IMAGE": "localhost/base:1"})
    ]
