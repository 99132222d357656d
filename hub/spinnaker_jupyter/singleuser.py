"""The command each local user server runs: JupyterHub's `jupyterhub-singleuser`, without two start-up costs that
serve nobody here (measured with `python -X importtime` and CPU time per start: benchmarks/README.md).

1. jsonschema (through jupyter_events, imported by jupyter_server) checks the "iri" string format with the optional
   package rfc3987-syntax when it is installed; importing that package compiles an Earley grammar with lark: about
   1.5 CPU-seconds of a 3.4 CPU-second server start. No event schema of jupyter_server or its extensions uses that
   format. Marking the module absent (the import then raises ImportError, which jsonschema expects of every
   optional format checker) leaves the format unchecked. Checked against jsonschema 4.26.0, rfc3987-syntax 1.1.0.
2. Importing jupyterlab.labapp reads JupyterLab's version through `AppOptions`, whose default npm registry comes from
   running `node yarn.js config --json` (jupyterlab.commands._yarn_config, private): about 0.5 CPU-seconds of a Node
   process at every server start when Node is on the PATH. The registry matters only to `jupyter lab build` and
   extension installs, which user servers never do (LabApp.extension_manager is `readonly`). The function answers
   here what it answers when Node is absent: no yarn or npm settings (upstream.skip_yarn_config, fenced there with
   the private upstream APIs; checked against JupyterLab 4.6.6). tests/test_spawn_queue.py fails if either comes
   back.

Run as ``python -m spinnaker_jupyter.singleuser /path/to/jupyterhub-singleuser [its arguments]``: the upstream script
runs as it is, in this process, after the two cuts (and `ps` / `pgrep jupyterhub-singleuser` still find it).
"""

from __future__ import annotations

import runpy
import sys

#: Imported by jsonschema only if present; absent here on purpose (see the module's docstring).
SKIPPED_IMPORTS = ("rfc3987_syntax",)


def prepare() -> None:
    """Before anything imports jupyter_server or JupyterLab."""
    for name in SKIPPED_IMPORTS:
        sys.modules.setdefault(name, None)  # (None: `import name` raises ImportError)
    from .upstream import skip_yarn_config

    skip_yarn_config()


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m spinnaker_jupyter.singleuser /path/to/jupyterhub-singleuser [arguments]")
    prepare()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
