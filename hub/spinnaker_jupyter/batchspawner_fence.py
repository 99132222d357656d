"""Fenced: batchspawner 1.3.0's API handler. batchspawner registers it at import for /hub/api/batchspawner, and
it sets ANY spawner attribute a user's server names (the commands the hub runs as root included); the handler here
takes the port only. tests/integration/test_slurm.py fails when batchspawner's handler or version changes."""

from __future__ import annotations

import json

from jupyterhub.apihandlers import APIHandler
from tornado import web

BATCHSPAWNER_CHECKED = "1.3.0"


class PortReportHandler(APIHandler):
    """POST /hub/api/batchspawner as batchspawner-singleuser sends it ({"port": N}), and nothing else.

    batchspawner's own handler sets ANY attribute the JSON names on the spawner whose token sent it, and a user's
    server holds that token: `{"batch_query_cmd": "..."}` would be run by the hub, as root, at its next poll. Here
    only a port is taken, only from the server's own token, and only while its start waits for it."""

    @web.authenticated
    def post(self):
        token = self.get_auth_token()
        spawner = next((sp for sp in self.current_user.spawners.values() if sp.api_token == token), None)
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError:
            data = None
        port = data.get("port") if isinstance(data, dict) else None
        if (
            spawner is None
            or not isinstance(data, dict)
            or set(data) != {"port"}
            or type(port) is not int
            or not 1 <= port <= 65535
        ):
            raise web.HTTPError(400, 'Only {"port": 1-65535}, sent by a user server with its own token, is taken.')
        if not getattr(spawner, "_in_start", False):
            raise web.HTTPError(409, "The server's port is taken only while it starts.")
        spawner.port = port
        self.set_status(201)
        self.finish(json.dumps({"message": "BatchSpawner data configured"}))


def fence_port_report() -> None:
    """Put PortReportHandler where batchspawner registered its handler (jupyterhub.apihandlers.default_handlers, at
    import). Checked against batchspawner 1.3.0; tests/integration/test_slurm.py fails when that changes."""
    import batchspawner
    from jupyterhub import apihandlers

    if batchspawner.__version__ != BATCHSPAWNER_CHECKED:
        raise RuntimeError(
            f"batchspawner {batchspawner.__version__} is installed; the port-report fence "
            f"(batchspawner_fence.py) was checked against {BATCHSPAWNER_CHECKED} only: check its API "
            "handler, then update it."
        )
    routes = apihandlers.default_handlers
    for i, (pattern, *_handler) in enumerate(routes):
        if pattern == r"/api/batchspawner":
            routes[i] = (pattern, PortReportHandler)
