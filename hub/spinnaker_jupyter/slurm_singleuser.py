"""What a Slurm job of a user server runs (`python -m spinnaker_jupyter.slurm_singleuser jupyterhub-singleuser ...`):
batchspawner's own `batchspawner-singleuser` (it picks a port and reports it to the hub), with the server bound to
the node's Slurm address (`NodeAddr` in slurm.conf, the address the hub connects to: slurm.py looks up the same
one), not to every interface as batchspawner's default `0.0.0.0` would: on a one-machine cluster that is 127.0.0.1,
and nobody on the network reaches a user's server except through the hub's proxy. With the local servers' start-up
cuts (singleuser.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from urllib.parse import urlparse, urlunparse


def node_address(node: str) -> str:
    out = subprocess.run(
        ["scontrol", "-o", "show", "node", node], capture_output=True, text=True, timeout=60, check=False
    )
    found = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    if not found:
        sys.exit(
            f"spinnaker-jupyter: cannot find the Slurm address of node {node!r} (scontrol show node: "
            f"{' '.join((out.stderr or out.stdout).split())}); the server is not started on every interface "
            "instead."
        )
    return found.group(1)


def main() -> None:
    node = os.environ.get("SLURMD_NODENAME")
    if not node:
        sys.exit("spinnaker-jupyter: SLURMD_NODENAME is not set: this command runs only inside a Slurm job.")
    url = urlparse(os.environ["JUPYTERHUB_SERVICE_URL"])
    os.environ["JUPYTERHUB_SERVICE_URL"] = urlunparse(url._replace(netloc=f"{node_address(node)}:{url.port or 0}"))
    from batchspawner.singleuser import main as upstream  # (keeps the host of the URL, replaces the port)

    from .singleuser import prepare

    prepare()  # the start-up cuts of local servers (singleuser.py): about 2 CPU-seconds less per start
    upstream()


if __name__ == "__main__":
    main()
