"""Serve the 'NRP is not installed here' page on a unix socket (run by jupyter-server-proxy)."""

from __future__ import annotations

import os
import socketserver
import sys
from http.server import BaseHTTPRequestHandler

from spinnaker_server_contract import ServerContract

from .proxy_guard import NOT_INSTALLED


class Page(BaseHTTPRequestHandler):
    def do_GET(self):
        body = NOT_INSTALLED.format(port=ServerContract.from_env().nrp_port).encode()
        self.send_response(404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def address_string(self):
        return "local"


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve_unix(path: str, handler) -> None:
    """Serve `handler` on the unix socket jupyter-server-proxy named (also used by the hub package's Jobs tile)."""
    if os.path.exists(path):
        os.unlink(path)
    with Server(path, handler) as server:
        server.serve_forever()


def main(path: str) -> None:
    serve_unix(path, Page)


if __name__ == "__main__":
    main(sys.argv[1])
