"""A user's own sPyNNaker cfg: one rule (spinnaker_server_contract.own_cfgs) for the kernel launcher, which lets it
win, and spinnaker-status, which names it; they used to keep a copy each."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from spinnaker_jupyter_ext import status
from spinnaker_server_contract import own_cfgs

LAUNCHER = Path(__file__).resolve().parents[2] / "kernels" / "spynnaker" / "spinnaker_kernel.py"


def _launcher():
    spec = importlib.util.spec_from_file_location("spinnaker_kernel_unit", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_cfgs_in_sPyNNakers_order(tmp_path):
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    assert own_cfgs(str(home), {}) == []
    (home / ".spynnaker.cfg").write_text("[Machine]\n")
    (home / ".config" / ".spynnaker.cfg").write_text("[Machine]\n")
    assert own_cfgs(str(home), {}) == [str(home / ".config" / ".spynnaker.cfg"), str(home / ".spynnaker.cfg")]
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    (xdg / ".spynnaker.cfg").write_text("[Machine]\n")
    assert own_cfgs(str(home), {"XDG_CONFIG_HOME": str(xdg)}) == [
        str(xdg / ".spynnaker.cfg"),
        str(home / ".spynnaker.cfg"),
    ]


def test_status_names_the_cfg_the_kernel_uses(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".spynnaker.cfg").write_text("[Machine]\nmachine_name = 10.0.0.2\nversion = 5\n")
    (home / ".config" / ".spynnaker.cfg").write_text("[Machine]\nmachine_name = 10.0.0.1\nversion = 5\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    in_force = _launcher().choose_cfg({"SPINNAKER_CFG_DIR": str(tmp_path / "etc")})
    assert in_force == str(home / ".config" / ".spynnaker.cfg")
    assert status.local_info({})["own_cfg"] == in_force
