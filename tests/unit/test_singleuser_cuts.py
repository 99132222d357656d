"""The start-up cuts of spinnaker_jupyter.singleuser that reach into jupyter_server's private modules: each still
meets the function it replaces (name and signature), and gives the answer it describes without the work."""

from __future__ import annotations

import inspect
import platform
import subprocess

from jupyter_server import _sysinfo

from spinnaker_jupyter import singleuser


def test_the_git_probe_is_skipped_with_the_answer_of_an_installed_jupyter_server(monkeypatch):
    assert list(inspect.signature(_sysinfo.pkg_commit_hash).parameters) == ["pkg_path"]
    monkeypatch.setattr(_sysinfo, "pkg_commit_hash", _sysinfo.pkg_commit_hash)  # (put back after the test)

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(platform, "platform", lambda: "Linux")  # (runs `uname -p`; the fork server caches it)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    singleuser.skip_git_probe()
    info = _sysinfo.get_sys_info()
    assert (info["commit_source"], info["commit_hash"]) == ("", "")  # what a folder outside any repository gives
