"""The jupyter-server-proxy entry `nrp`: the Neurorobotics Platform frontend, behind Jupyter's login.

With an NRP installed (the deployment sets SPINNAKER_NRP_COMMAND), /user/<name>/nrp/ starts it on demand. A command
that names `{unix_socket}` serves on a private unix socket (in a folder only this account may enter): no TCP port,
so no other account on the machine can stand in for it. Otherwise it listens on port 9000, which
/user/<name>/proxy/9000/ reaches as the user guide describes; the proxy guard then lets the route reach that port
only while this account's own process listens there. Without an NRP, the route answers with a page saying so, over
a private unix socket.
"""

from __future__ import annotations

import sys

from spinnaker_server_contract import ServerContract


def uses_tcp_port(command: tuple[str, ...]) -> bool:
    """Whether the NRP `command` serves on a TCP port (SPINNAKER_NRP_PORT) rather than a unix socket."""
    return bool(command) and not any("{unix_socket}" in arg for arg in command)


def setup_nrp():
    told = ServerContract.from_env()  # a value it cannot read is logged by the extension (spinnaker_jupyter_ext)
    port, timeout, command = told.nrp_port, told.nrp_start_timeout, list(told.nrp_command)
    launcher = {"title": "Neurorobotics Platform", "enabled": True}
    if command and uses_tcp_port(command):
        return {
            "command": command,
            "port": port,
            "timeout": timeout,
            "launcher_entry": launcher,
            "new_browser_tab": True,
        }
    if command:
        return {
            "command": command,
            "unix_socket": True,
            "timeout": timeout,
            "launcher_entry": launcher,
            "new_browser_tab": True,
        }
    return {
        "command": [sys.executable, "-m", "spinnaker_jupyter_ext.nrp_missing", "{unix_socket}"],
        "unix_socket": True,
        "timeout": 20,
        "launcher_entry": {**launcher, "enabled": False},
    }
