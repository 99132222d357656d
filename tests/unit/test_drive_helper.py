"""EBRAINS Drive for container servers, the parts without a container: what the notebook container is told, and
what it shows when the hub could not give it a Drive helper (hub/spinnaker_jupyter/drive_helper.py, drive.py)."""

from __future__ import annotations

import json
import logging
import types

from spinnaker_jupyter.drive_helper import notebook_settings


def test_the_notebook_is_told_the_helper_keeps_the_mount_or_why_there_is_none():
    ok = json.loads(notebook_settings(json.dumps({"url": "https://d", "mount_point": "drive"}), None))
    assert ok == {"url": "https://d", "mount_point": "drive", "keeper": "helper"}
    failed = types.SimpleNamespace(error="the Drive cannot be mounted in containers on this host (no shared mount)")
    said = json.loads(notebook_settings(json.dumps({"url": "https://d"}), failed))
    assert said["keeper"] == "helper" and said["helper_error"] == failed.error


def test_a_server_without_its_helper_says_why_in_drive_and_mounts_nothing(tmp_path, monkeypatch):
    from spinnaker_jupyter_ext import drive

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(
        drive.ENV,
        json.dumps(
            {
                "url": "https://d",
                "keeper": "helper",
                "helper_error": "spawner.docker.drive_image x is not on the engine",
            }
        ),
    )
    app = types.SimpleNamespace(log=logging.getLogger("test"), io_loop=None)
    assert drive.start_drive(app) is None  # no keeper in the notebook container
    placeholder = (tmp_path / "drive" / drive.PLACEHOLDER).read_text()
    assert "spawner.docker.drive_image x is not on the engine" in placeholder
    assert drive.read_state(tmp_path)["state"] == "unavailable"
