"""`spinnaker-jupyter` commands start in well under a second: what cost seconds at every command stays out of the
import of the CLI (measured with `python -X importtime`: the rfc3987_syntax grammar jsonschema's "iri" checker
compiles, ~1.4-3.4 s; dockerspawner, ~1.5-3.3 s; JupyterHub's handlers through local_accounts, ~1.7 s)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import BIN

HEAVY = ["rfc3987_syntax", "dockerspawner", "docker", "jupyterhub.handlers", "jupyterhub.orm"]


def test_the_cli_imports_nothing_heavy():
    code = (
        "import sys; from spinnaker_jupyter import cli; "
        f"print(__import__('json').dumps([m for m in {HEAVY!r} if sys.modules.get(m) is not None]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [], out.stdout


def test_config_errors_still_come_from_jsonschema_with_their_paths(tmp_path):
    """The schema check still runs (rfc3987_syntax marked absent changes no message: the schema uses no format)."""
    (tmp_path / "c.yaml").write_text("hub: {port: eighty, prot: 1}\nspawner: {type: rocket}\n")
    out = subprocess.run(
        [str(BIN / "spinnaker-jupyter"), "check", "-c", str(tmp_path / "c.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out
    assert "hub.port: expected integer, got 'eighty'" in out.stderr, out.stderr
    assert "hub.prot: unknown key; did you mean 'port'?" in out.stderr, out.stderr
    assert "spawner.type: expected one of " in out.stderr and "got 'rocket'" in out.stderr, out.stderr
