"""jobs.executor docker without its engine or image: the job service stops with one line naming the key and the
fix, instead of a traceback at every restart."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest

from spinnaker_jupyter.jobs.docker_executor import DockerExecutor


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
