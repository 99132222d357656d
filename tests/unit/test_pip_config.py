"""This machine's pip settings, read in one place (spinnaker_jupyter/pip_config.py) for the image build
(images/build.py: the CA bundle in the build context) and job containers (jobs/docker_executor.py)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from spinnaker_jupyter import pip_config
from spinnaker_jupyter.jobs import docker_executor

BUILD_PY = Path(__file__).resolve().parents[2] / "images" / "build.py"


def image_build():
    spec = importlib.util.spec_from_file_location("spinnaker_image_build", BUILD_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # (its dataclasses look their module up)
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_pip_lists_its_sources_in_reading_order_and_the_last_one_wins():
    said = (
        "global.cert='/etc/ssl/certs/from-etc.crt'\n"
        "global.extra-index-url='file:///opt/pypi/simple'\n"
        'install.cert="/home/ada/.config/pip/own.crt"\n'
        ":env:.cert='/etc/ssl/certs/ca-certificates.crt'\n"  # $PIP_CERT: pip lists variables last
        "not a setting\n"
    )
    values = pip_config.parse(said)
    assert values == {"cert": "/etc/ssl/certs/ca-certificates.crt", "extra-index-url": "file:///opt/pypi/simple"}
    assert pip_config.cert(values) == "/etc/ssl/certs/ca-certificates.crt"
    assert pip_config.cert(pip_config.parse("global.index-url='https://pypi.example/simple'\n")) is None
    assert pip_config.cert({"cert": ""}) is None


def test_the_image_build_and_job_containers_take_the_bundle_pip_names(tmp_path, monkeypatch):
    real = tmp_path / "ca-certificates.crt"
    real.write_text("certificates")
    (tmp_path / "ca.crt").symlink_to(real)
    monkeypatch.setattr(pip_config, "listed", lambda python=None: {"cert": str(tmp_path / "ca.crt")})
    build = image_build()
    assert build.pip_cert() == str(tmp_path / "ca.crt")  # as configured: build.py says if it is not there
    assert docker_executor.pip_settings() == ({}, os.path.realpath(real))  # the file itself, to mount

    monkeypatch.setattr(pip_config, "listed", lambda python=None: {"cert": "/nowhere/ca.crt"})
    assert build.pip_cert() == "/nowhere/ca.crt"
    assert docker_executor.pip_settings() == ({}, None)  # nothing to mount
    monkeypatch.setattr(pip_config, "listed", lambda python=None: {})  # no pip, or no bundle configured
    assert build.pip_cert() is None and docker_executor.pip_settings() == ({}, None)
