"""Getting a job's code into a private staging folder: inline script, public git repository, or zip / tar.gz URL.

The API's `code` field is either the script itself (saved as run.py, the EBRAINS convention) or an http(s) URL:
an archive when it ends in .zip / .tar.gz / .tgz / .tar, otherwise a git repository. Everything has a size limit;
clones are shallow, single-branch, without submodules, over http(s) only, and never prompt.
Every network access (download, clone) and every git command runs as the job's own account (`as_user`, a
preexec function), never as the service: a URL reaches only what the user could reach themselves. Archives are
unpacked by the service into its own staging folder, from the bytes the user's download process hands over.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import archives

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")


class FetchError(ValueError):
    pass


@dataclass
class Limits:
    code_bytes: int
    code_files: int
    inline_bytes: int
    timeout: int  # seconds for a download or clone


def is_url(code: str) -> bool:
    text = code.strip()
    return text.startswith(("http://", "https://")) and "\n" not in text and " " not in text


def kind_of(code: str) -> str:
    if not is_url(code):
        return "inline"
    path = code.strip().split("?", 1)[0].split("#", 1)[0].lower()
    return "archive" if path.endswith(ARCHIVE_SUFFIXES) else "git"


def check_inline(code: str, limits: Limits) -> None:
    """Said at submission, so an oversized script is refused before it is stored."""
    if not is_url(code) and len(code.encode()) > limits.inline_bytes:
        raise FetchError(
            f"The inline script is {len(code.encode()) // 1024} KiB, over the limit of "
            f"{limits.inline_bytes // 1024} KiB (jobs.limits.inline_code_kb): put it in a git "
            "repository or an archive and give its URL"
        )


def fetch(code: str, dest: Path, limits: Limits, as_user=None) -> dict:
    """Put the job's code into `dest` (empty; for a clone it must belong to the job's account). Returns
    provenance: {source, url, sha256 | commit}."""
    kind = kind_of(code)
    if kind == "inline":
        check_inline(code, limits)
        (dest / "run.py").write_text(code)
        return {"source": "inline", "sha256": hashlib.sha256(code.encode()).hexdigest()}
    url = code.strip()
    if kind == "archive":
        return _fetch_archive(url, dest, limits, as_user)
    return _clone(url, dest, limits, as_user)


# Run as the job's account: stream the URL's body to stdout, at most N bytes (exit 3 past that), errors on stderr.
_DOWNLOAD = """
import sys, urllib.error, urllib.request
url, limit, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "spinnaker-jupyter-jobs"}),
                                timeout=timeout) as r:
        n = 0
        while chunk := r.read(65536):
            n += len(chunk)
            if n > limit:
                sys.exit(3)
            sys.stdout.buffer.write(chunk)
except urllib.error.HTTPError as e:
    sys.exit(f"the server answered {e.code} {e.reason}")
except (urllib.error.URLError, OSError, ValueError) as e:
    sys.exit(str(getattr(e, "reason", e)))
"""


def _fetch_archive(url: str, dest: Path, limits: Limits, as_user) -> dict:
    download = dest.parent / (dest.name + ".download")
    h = hashlib.sha256()
    size = 0
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", _DOWNLOAD, url, str(limits.code_bytes), str(limits.timeout)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        cwd="/",
        preexec_fn=as_user,
        start_new_session=True,
    )
    try:
        with open(download, "wb") as out:
            while chunk := proc.stdout.read(archives.CHUNK):
                size += len(chunk)
                if size > limits.code_bytes:
                    break
                h.update(chunk)
                out.write(chunk)
        try:
            proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise FetchError(f"Downloading {url} took longer than {limits.timeout} s") from None
        err = proc.stderr.read().decode(errors="replace").strip()
        if proc.returncode == 3 or size > limits.code_bytes:
            raise FetchError(
                f"The archive at {url} is larger than {limits.code_bytes // 2**20} MiB (jobs.limits.code_mb)"
            )
        if proc.returncode != 0:
            raise FetchError(f"Could not download the code archive {url}: {err.splitlines()[-1] if err else 'failed'}")
        path = url.split("?", 1)[0].lower()
        try:
            if path.endswith(".zip"):
                archives.extract_zip(download, dest, limits.code_bytes, limits.code_files)
            else:
                archives.extract_tar(download, dest, limits.code_bytes, limits.code_files)
        except archives.ArchiveError as e:
            raise FetchError(str(e)) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        download.unlink(missing_ok=True)
    archives.flatten_single_folder(dest)
    return {"source": "archive", "url": url, "sha256": h.hexdigest(), "size": size}


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _clone(url: str, dest: Path, limits: Limits, as_user) -> dict:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(dest),
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ASKPASS": "/bin/false",
        "LANG": "C.UTF-8",
    }
    cmd = [
        "git",
        "-c",
        "protocol.allow=never",
        "-c",
        "protocol.http.allow=always",
        "-c",
        "protocol.https.allow=always",
        "-c",
        "core.hooksPath=/dev/null",
        "clone",
        "--quiet",
        "--depth",
        "1",
        "--single-branch",
        "--no-recurse-submodules",
        "--",
        url,
        str(dest),
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=as_user,
    )
    deadline = time.monotonic() + limits.timeout
    why = None
    while proc.poll() is None:
        if time.monotonic() > deadline:
            why = f"Cloning {url} took longer than {limits.timeout} s"
        elif _tree_size(dest) > limits.code_bytes:
            why = f"The repository {url} is larger than {limits.code_bytes // 2**20} MiB (jobs.limits.code_mb)"
        if why:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise FetchError(why)
        time.sleep(0.1)
    err = proc.stderr.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        last = err.splitlines()[-1] if err else f"git exited with {proc.returncode}"
        raise FetchError(
            f"Could not clone {url}: {last.removeprefix('fatal: ')}. Check that the URL is a public git "
            "repository reachable from this service"
        )
    if _tree_size(dest) > limits.code_bytes:
        raise FetchError(f"The repository {url} is larger than {limits.code_bytes // 2**20} MiB (jobs.limits.code_mb)")
    commit = subprocess.run(
        ["git", "-C", str(dest), "rev-parse", "HEAD"],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        preexec_fn=as_user,
    ).stdout.strip()
    return {"source": "git", "url": url, "commit": commit}
