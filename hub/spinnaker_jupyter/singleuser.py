"""The command each local user server runs: JupyterHub's `jupyterhub-singleuser`, without two start-up costs that
serve nobody here (measured with `python -X importtime` and CPU time per start: benchmarks/README.md).

1. rfc3987-syntax's lark grammar, compiled at import through jsonschema: about 1.5 CPU-seconds of a 3.4 CPU-second
   server start, for a format no event schema uses. The cut and the runner are spinnaker_singleuser's (extension
   distribution: the single-user image runs it too), whose docstring says more.
2. Importing jupyterlab.labapp reads JupyterLab's version through `AppOptions`, whose default npm registry comes from
   running `node yarn.js config --json` (jupyterlab.commands._yarn_config, private): about 0.5 CPU-seconds of a Node
   process at every server start when Node is on the PATH. The registry matters only to `jupyter lab build` and
   extension installs, which user servers never do (LabApp.extension_manager is `readonly`). The function answers
   here what it answers when Node is absent: no yarn or npm settings (upstream.skip_yarn_config, fenced there with
   the private upstream APIs; checked against JupyterLab 4.6.6). tests/integration/test_spawn_queue.py fails if either comes
   back.
3. jupyter_server's sysinfo runs `git rev-parse` at every start, finding the project's checkout the venv lives in
   (~0.005 CPU-s of a forked start): upstream.skip_git_probe gives the answer git gives every user account there.

Run as ``python -m spinnaker_jupyter.singleuser /path/to/jupyterhub-singleuser [its arguments]``: the upstream script
runs as it is, in this process, after the cuts (and `ps` / `pgrep jupyterhub-singleuser` still find it).
"""

from __future__ import annotations

import sys

# The import cut and the runner are the extension distribution's (extensions/spinnaker_singleuser.py), which the
# single-user image runs as well; this module adds the Node cut, which only the hub's host needs.
from spinnaker_singleuser import SKIPPED_IMPORTS, run, skip_imports

__all__ = ["SKIPPED_IMPORTS", "main", "prepare"]


def prepare() -> None:
    """Before anything imports jupyter_server or JupyterLab."""
    skip_imports()
    from .upstream import skip_git_probe, skip_yarn_config

    skip_yarn_config()
    skip_git_probe()


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m spinnaker_jupyter.singleuser /path/to/jupyterhub-singleuser [arguments]")
    prepare()
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
