"""jobs.executor docker without its engine or image: the job service stops with one line naming the key and the
fix, instead of a traceback at every restart."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest

from spinnaker_jupyter.jobs.docker_executor import DockerExecutor, parse_pip_config


def make(tmp_path, url):
    settings = SimpleNamespace(data=tmp_path, wall_time=60, spynnaker_env=tmp_path / "env")
    return DockerExecutor(
        tmp_path / "homes",
        False,
        "jupyter-",
        store=None,
        settings=settings,
        docker={"engine_url": url},
        image="spinnaker-jupyter/singleuser:latest",
        network="none",
        pip_network="none",
        cpus=1,
        labels={},
    )


def test_no_engine_is_one_line_naming_the_key(tmp_path):
    path = tmp_path / "engine.sock"  # something listens there, but it is no container engine: it hangs up
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()

        def hang_up():
            while True:
                try:
                    server.accept()[0].close()
                except OSError:
                    return

        threading.Thread(target=hang_up, daemon=True).start()
        with pytest.raises(SystemExit) as e:
            make(tmp_path, f"unix://{path}")
    said = str(e.value)
    assert said.startswith("jobs.executor docker: cannot reach the container engine at unix://"), said
    assert "spawner.docker.engine_url" in said and "\n" not in said


def test_pip_settings_for_job_containers_leave_host_paths_on_the_host(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("certificates")
    said = (
        "global.cert='/nowhere/ca.crt'\n"
        "global.extra-index-url='file:///opt/pypi/simple https://mirror.example/simple'\n"
        "global.find-links='/opt/wheels'\n"
        "global.index-url='https://pypi.example/simple'\n"
        f":env:.cert='{ca}'\n"  # (pip lists the PIP_* variables last: they win)
        ":env:.default-timeout='180'\n"
    )
    assert parse_pip_config(said) == (
        {
            "PIP_INDEX_URL": "https://pypi.example/simple",
            "PIP_EXTRA_INDEX_URL": "https://mirror.example/simple",
            "PIP_DEFAULT_TIMEOUT": "180",
        },
        str(ca),
    )
    assert parse_pip_config("global.cert='/nowhere/ca.crt'\n") == ({}, None)
