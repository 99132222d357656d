"""The extension distribution's top-level modules (extensions/spinnaker_*.py): the hub image copies every one of
them without the distribution's dependencies (images/hub/Containerfile), so each must be listed in the
distribution's `py-modules` (else the user servers' image lacks it) and import only the standard library at its top
(else the hub image fails on it, as tls.py once failed on spinnaker_jupyter_ext.framing there)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

EXTENSIONS = Path(__file__).resolve().parents[2] / "extensions"
MODULES = sorted(EXTENSIONS.glob("spinnaker_*.py"))


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported outside functions (a function-local import costs only when that function runs)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_every_shared_module_is_packaged_and_uses_the_standard_library_only():
    assert {p.stem for p in MODULES} >= {"spinnaker_server_contract", "spinnaker_listeners", "spinnaker_framing"}
    listed = re.search(r"^py-modules = \[(.*)\]$", (EXTENSIONS / "pyproject.toml").read_text(), re.M)
    assert listed and set(re.findall(r'"([^"]+)"', listed.group(1))) == {p.stem for p in MODULES}
    for path in MODULES:
        others = _top_level_imports(path) - set(sys.stdlib_module_names)
        assert not others, f"{path.name} imports {sorted(others)}: the hub image does not have them"
