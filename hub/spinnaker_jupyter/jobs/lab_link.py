"""JupyterLab's way to the Jobs page: a launcher tile "Batch jobs" (a jupyter-server-proxy entry, declared in the
hub package's entry points, so it exists wherever the server runs from the hub's environment) that opens
/user/<name>/batch-jobs/ in a new tab; behind it a tiny process on a private unix socket answers every request
with a page that moves on to the hub's Jobs page (<hub base>services/jobs/, the same origin). The tile is shown
only where the deployment runs the job service (it sets SPINNAKER_JOBS_URL in every server's environment).
"""

from __future__ import annotations

import html
import os
import sys
from http.server import BaseHTTPRequestHandler

from .settings import SERVICE_NAME


def setup_jobs_link() -> dict:
    return {
        "command": [sys.executable, "-m", "spinnaker_jupyter.jobs.lab_link", "{unix_socket}"],
        "unix_socket": True,
        "timeout": 20,
        "new_browser_tab": True,
        "launcher_entry": {"title": "Batch jobs", "enabled": bool(os.environ.get("SPINNAKER_JOBS_URL"))},
    }


def page_url() -> str:
    return os.environ.get("JUPYTERHUB_BASE_URL", "/") + f"services/{SERVICE_NAME}/"


class Redirect(BaseHTTPRequestHandler):
    """A page that moves on (jupyter-server-proxy would rewrite a redirect's Location under its own prefix)."""

    def do_GET(self):
        url = html.escape(page_url(), quote=True)
        body = (
            f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; url={url}">'
            f'<title>Batch jobs</title><p>Opening <a href="{url}">the Jobs page</a>...</p>'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def address_string(self):
        return "local"

    def log_message(self, *args):
        pass


def main(path: str) -> None:
    from spinnaker_jupyter_ext.nrp_missing import serve_unix  # runs inside a user server, beside the extension

    serve_unix(path, Redirect)


if __name__ == "__main__":
    main(sys.argv[1])
