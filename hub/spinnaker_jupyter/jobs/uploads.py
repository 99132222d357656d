"""Code archives uploaded by the command-line client (`spinnaker-jupyter-job run script.py` sends the script's folder
as a .tar.gz), since nmpi's own CLI hard-wires EBRAINS Drive for folders.

`POST /uploads` (bearer token, body: the .tar.gz, at most jobs.limits.code_mb) answers a signed, expiring URL of the
archive at this service; the client submits the job with that URL as its code, so the runner fetches and unpacks it
like any archive (as the user's account, with the same size, file-count and path checks). Uploads are kept under
data_dir/jobs/uploads with unguessable names and removed after jobs.retention_days. Each user may keep at most
jobs.limits.upload_quota_mb of them at once: a name starts with a tag of its owner (a hash of the user name), so
their share is counted without a record of its own.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path

from tornado import web

from ..upstream import status_reason
from . import api, signing

SUFFIX = ".tar.gz"


def folder(data: Path) -> Path:
    return data / "uploads"


def owner_tag(user: str) -> str:
    """The prefix of a user's upload names (fixed length, so one user's tag is never the start of another's)."""
    return hashlib.sha256(user.encode()).hexdigest()[:16]


def used_by(data: Path, user: str) -> int:
    """Bytes of uploads `user` keeps here now."""
    where, tag = folder(data), owner_tag(user) + "-"
    if not where.is_dir():
        return 0
    total = 0
    for entry in where.iterdir():
        if entry.name.startswith(tag):
            try:
                total += entry.stat().st_size
            except FileNotFoundError:  # purged meanwhile
                pass
    return total


class UploadHandler(api.Base):
    def post(self):
        limit = self.js.fetch_limits.code_bytes
        body = self.request.body
        if len(body) > limit:
            self.fail(
                413,
                f"The archive is larger than {limit // 2**20} MiB (jobs.limits.code_mb): leave data "
                "out of the script's folder, or put the code in a git repository",
            )
        if body[:2] != b"\x1f\x8b":
            self.fail(422, "The upload must be a .tar.gz archive of the script's folder")
        quota, used = self.js.upload_quota_bytes, used_by(self.js.data, self.who.name)
        if used + len(body) > quota:
            self.fail(
                413,
                f"Your uploads here would take {_mib(used + len(body))} MiB, over your quota of "
                f"{quota // 2**20} MiB (jobs.limits.upload_quota_mb): uploads are deleted "
                f"{self.js.retention_days} days after they were made; until then leave data out of the "
                "script's folder, or put the code in a git repository",
            )
        where = folder(self.js.data)
        where.mkdir(mode=0o700, exist_ok=True)
        name = f"{owner_tag(self.who.name)}-{secrets.token_urlsafe(24)}{SUFFIX}"
        fd = os.open(where / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        url = signing.sign_upload(self.settings["signing_key"], self.js.base_url, name, self.js.url_ttl)
        self.json({"url": url, "size": len(body)}, status=201)


class UploadFileHandler(web.RequestHandler):
    """Fetched by the runner (no Authorization header: the signed URL is the credential)."""

    def write_error(self, status_code, **kwargs):
        self.set_header("Content-Type", "application/json")
        reason = kwargs.get("exc_info", (None, None))[1]
        detail = getattr(reason, "log_message", None) if isinstance(reason, web.HTTPError) else None
        self.finish({"detail": detail or status_reason(self)})

    def get(self, name):
        why = signing.check(
            self.settings["signing_key"],
            signing.UPLOAD,
            name,
            self.get_argument("expires", ""),
            self.get_argument("signature", ""),
        )
        if why:
            raise web.HTTPError(403, "This upload link is not valid or has expired; submit the job again")
        path = folder(self.settings["jobs"].data) / name
        if "/" in name or not path.is_file():
            raise web.HTTPError(404, "This upload is no longer kept (past jobs.retention_days)")
        self.set_header("Content-Type", "application/gzip")
        self.finish(path.read_bytes())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def purge(data: Path, days: int) -> None:
    where = folder(data)
    if not where.is_dir():
        return
    before = time.time() - days * 86400
    for entry in where.iterdir():
        if entry.stat().st_mtime < before:
            entry.unlink(missing_ok=True)


ROUTES = [(r"/uploads/?", UploadHandler), (r"/uploads/([A-Za-z0-9_-]+\.tar\.gz)", UploadFileHandler)]
