"""Pytest fixtures for tests that run real containers through the Docker API, served here by podman.

`podman_engine` (session): the project's rootful podman environment (images/podman/podman_env.py) with its Docker
API service running, the debootstrap base image and the single-user image built (layer-cached: a rerun with
nothing changed takes seconds). Where podman cannot run (tools missing, not root) the tests using it are skipped and
the reason is printed. Everything else that goes wrong fails.

    def test_x(podman_engine):
        client = podman_engine.client()                   # docker.DockerClient on the podman socket
        podman_engine.url                                 # unix:///.../podman.sock (DockerSpawner client_kwargs)
        podman_engine.images["singleuser"]                # image name, e.g. spinnaker-jupyter/singleuser:test

`podman_hub_image` (session) builds the hub image on demand (about 2 min the first time).

Environment: SPINNAKER_PODMAN_DIR (default ~/.cache/spinnaker-jupyter/podman, kept between runs for its cache).
Containers and volumes the tests make carry the label `spinnaker-jupyter-test`; leftovers of an interrupted run
are removed at the start of the next session.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
TEST_LABEL = "spinnaker-jupyter-test"
TEST_VOLUME_PREFIX = "spinnaker-jupyter-test-"  # every volume_prefix the tests give their spawners
TEST_TAG = "test"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


podman_env = _load("podman_env", IMAGES / "podman" / "podman_env.py")
image_build = _load("spinnaker_image_build", IMAGES / "build.py")


@dataclass
class PodmanEngine:
    env: podman_env.PodmanEnv
    url: str
    images: dict = field(default_factory=dict)
    build_seconds: dict = field(default_factory=dict)

    def client(self):
        import docker

        return docker.DockerClient(base_url=self.url, timeout=120)

    def api(self):
        import docker

        return docker.APIClient(base_url=self.url, timeout=3600)

    @staticmethod
    def free_port() -> int:
        return free_port()

    def build(self, what: str, containerfile: str, buildargs: dict) -> str:
        """Build one of the project's images (cached by the engine) with the test tag; returns its name."""
        name = f"spinnaker-jupyter/{what}:{TEST_TAG}"
        ca = image_build.pip_cert()
        result = image_build.build(
            self.api(),
            name,
            containerfile,
            {"BASE_IMAGE": self.images["base"], **buildargs},
            ca_bundle=ca if ca and Path(ca).is_file() else None,
            network_mode="host",
        )
        self.images[what] = name
        self.build_seconds[what] = result.seconds
        return name

    def remove_test_objects(self) -> None:
        """Remove containers and volumes labelled as test objects, and the home volumes the tests' spawners made
        (named `spinnaker-jupyter-test-*`: DockerSpawner gives them no label), leftovers of an earlier run. A kept
        home volume would make `user add` refuse the name (an earlier person's files), as it should for real users."""
        client = self.client()
        for c in client.containers.list(all=True, filters={"label": TEST_LABEL}):
            c.remove(force=True)
        for v in client.volumes.list():
            if v.name.startswith(TEST_VOLUME_PREFIX) or TEST_LABEL in (v.attrs.get("Labels") or {}):
                v.remove(force=True)


def _unusable_reason(env) -> str | None:
    reason = env.unusable_reason()
    if reason:
        return reason
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the docker Python package is missing (pip install docker; dockerspawner depends on it)"
    return None


@pytest.fixture(scope="session")
def podman_engine(request):
    env = podman_env.PodmanEnv()
    reason = _unusable_reason(env)
    if reason:
        print(f"\n[podman] container tests skipped: {reason}", file=sys.stderr)
        pytest.skip(f"podman cannot run here: {reason}")
    started_here = not env.is_running()
    t0 = time.monotonic()
    url = env.start_service()
    engine = PodmanEngine(env=env, url=url)
    try:
        engine.remove_test_objects()
        engine.images["base"] = env.build_base_image()
        engine.build("singleuser", image_build.CONTAINERFILES["singleuser"], {"WITH_ARM_TOOLCHAIN": "0"})
        print(f"\n[podman] engine ready with {engine.images} after {time.monotonic() - t0:.0f}s", file=sys.stderr)
        yield engine
    finally:
        try:
            engine.remove_test_objects()
        finally:
            if started_here and not os.environ.get("SPINNAKER_PODMAN_KEEP"):
                env.stop_service()


@pytest.fixture(scope="session")
def podman_nrp_layer_image(podman_engine) -> str:
    """images/nrp/Containerfile on the single-user test image instead of the NRP's (not reachable here): tests the
    layer the project adds (nginx, cle-* commands), not the NRP."""
    if "nrp-layer" not in podman_engine.images:
        podman_engine.build(
            "nrp-layer", image_build.CONTAINERFILES["nrp"], {"SINGLEUSER_IMAGE": podman_engine.images["singleuser"]}
        )
    return podman_engine.images["nrp-layer"]


@pytest.fixture(scope="session")
def podman_hub_image(podman_engine) -> str:
    if "hub" not in podman_engine.images:
        podman_engine.build("hub", image_build.CONTAINERFILES["hub"], {})
    return podman_engine.images["hub"]
