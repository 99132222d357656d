"""The jupyter-server-proxy entry `nrp`: the Neurorobotics Platform frontend on its port, behind Jupyter's login.

With an NRP installed (the deployment sets SPINNAKER_NRP_COMMAND), /user/<name>/nrp/ starts it on port 9000 and
/user/<name>/proxy/9000/ reaches it, as the user guide describes. Without one, the route answers with a page saying
so, served over a private unix socket so that no TCP port is taken.
"""

from __future__ import annotations

import json
import os
import sys


def setup_nrp():
    port = int(os.environ.get("SPINNAKER_NRP_PORT", "9000"))
    timeout = int(os.environ.get("SPINNAKER_NRP_START_TIMEOUT", "120"))
    launcher = {"title": "Neurorobotics Platform", "enabled": True}
    command = json.loads(os.environ.get("SPINNAKER_NRP_COMMAND") or "[]")
    if command:
        return {"command": command, "port": port, "timeout": timeout, "launcher_entry": launcher,
                "new_browser_tab": True}
    return {"command": [sys.executable, "-m", "spinnaker_jupyter_ext.nrp_missing", "{unix_socket}"],
            "unix_socket": True, "timeout": 20, "launcher_entry": {**launcher, "enabled": False}}
