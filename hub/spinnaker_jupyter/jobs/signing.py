"""Signed, expiring download URLs for job outputs.

The nmpi client downloads `output_data.files[].url` with plain urllib and no Authorization header, so the URL itself
must be the credential: HMAC-SHA256 over (job id, file path, expiry) with a key only the service holds. A new URL
is made each time the owner reads the job, so the owner can always renew an expired one.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import time
from pathlib import Path
from urllib.parse import quote


def load_key(path: Path) -> bytes:
    """The signing key, generated once into `path` (mode 0600, readable by the service only)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def _mac(key: bytes, job_id: int, path: str, expires: int) -> str:
    return hmac.new(key, f"{job_id}\0{path}\0{expires}".encode(), hashlib.sha256).hexdigest()


def _expiry(ttl: int) -> int:
    """The whole second a link expires at: at least `ttl` seconds from now (rounded down, a 1 s link died at once)."""
    return math.ceil(time.time()) + ttl


def sign(key: bytes, base_url: str, job_id: int, path: str, ttl: int) -> str:
    expires = _expiry(ttl)
    return (
        f"{base_url.rstrip('/')}/files/{job_id}/{quote(path)}?expires={expires}"
        f"&signature={_mac(key, job_id, path, expires)}"
    )


def check(key: bytes, job_id: int, path: str, expires: str, signature: str) -> str | None:
    """None when the URL is good, else why not (said to whoever holds the URL)."""
    try:
        when = int(expires)
    except (TypeError, ValueError):
        return "This download link is not valid. Read the job again to get a fresh link."
    if not hmac.compare_digest(_mac(key, job_id, path, when), signature or ""):
        return "This download link is not valid. Read the job again to get a fresh link."
    if when < time.time():
        return "This download link has expired. Read the job again (nmpi get_job, or the Jobs page) for a fresh link."
    return None


UPLOAD = 0  # job ids start at 1: an upload's MAC can never pass for a job file's


def sign_upload(key: bytes, base_url: str, name: str, ttl: int) -> str:
    """The link the runner fetches an uploaded code archive by (command-line client `run`; uploads.py)."""
    expires = _expiry(ttl)
    return (
        f"{base_url.rstrip('/')}/uploads/{quote(name)}?expires={expires}&signature={_mac(key, UPLOAD, name, expires)}"
    )
