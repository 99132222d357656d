"""The start-up cuts spinnaker_jupyter.singleuser.prepare() makes into jupyter_server's and JupyterLab's private
functions: through upstream.py's fence, whose functions tests/unit/test_upstream.py checks against the installed
packages."""

from __future__ import annotations

import jupyterlab.commands
from jupyter_server import _sysinfo

from spinnaker_jupyter import singleuser, upstream


def test_prepare_makes_the_fenced_cuts(monkeypatch):
    monkeypatch.setattr(_sysinfo, "pkg_commit_hash", _sysinfo.pkg_commit_hash)  # (both put back after the test)
    monkeypatch.setattr(jupyterlab.commands, "_yarn_config", jupyterlab.commands._yarn_config)
    monkeypatch.setattr(singleuser, "skip_imports", lambda: None)  # (the process-wide import cut: not in this one)
    singleuser.prepare()
    assert _sysinfo.pkg_commit_hash is upstream.no_commit_hash
    assert jupyterlab.commands._yarn_config is upstream.no_yarn_config
