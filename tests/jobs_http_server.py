"""A loopback HTTP server for the job tests: serves a folder's files (code archives), and the git repositories in it
over git's smart HTTP protocol (`git http-backend` as CGI), so shallow clones work as against a public forge.

    python jobs_http_server.py ROOT PORT
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
from urllib.parse import urlsplit


class Handler(http.server.SimpleHTTPRequestHandler):
    def _is_git(self, path: str) -> bool:
        return "/info/refs" in path or path.endswith(("/git-upload-pack", "/git-receive-pack"))

    def do_GET(self):
        if self._is_git(self.path):
            return self._git()
        return super().do_GET()

    def do_POST(self):
        if self._is_git(self.path):
            return self._git()
        self.send_error(405)

    def _git(self):
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        env = {
            "PATH": "/usr/bin:/bin",
            "GIT_PROJECT_ROOT": self.directory,
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": parts.path,
            "QUERY_STRING": parts.query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
        }
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.split(b"\r\n"):
            key, _, value = line.decode().partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def main():
    root, port = sys.argv[1], int(sys.argv[2])
    os.chdir(root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), lambda *a: Handler(*a, directory=root))
    server.serve_forever()


if __name__ == "__main__":
    main()
