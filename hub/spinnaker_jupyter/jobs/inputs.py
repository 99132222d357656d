"""A job's `input_data`: files downloaded into the job's folder before its command runs (as the EBRAINS platform's
runners do), with a size limit for all of them together and one clear line for what goes wrong.

At submission (`parse`) the list is checked: each entry a URL, or an object with `url` and optionally `path`
(EBRAINS' DataItem: its content_type, size and hash are accepted and not used); http(s) only; the file's place a
relative path inside the job's folder (default: the URL's last path segment), never the runner's own `.job`.

Before the run (`download`) each file is fetched by the job's own account (`as_user`, as for code: a URL reaches
only what the user could reach themselves), which also writes it, into its own scratch folder, never over a file
of the job's code, and never past the limit: the download stops at the first byte too many.
"""

from __future__ import annotations

import os
import posixpath
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .archives import safe_relpath

MAX_FILES = 100
KEYS = ("url", "path", "content_type", "size", "hash")  # EBRAINS' DataItem fields
INTERNAL = (".job", ".git")


class InputError(ValueError):
    pass


def parse(value) -> list[dict] | None:
    """The submitted input_data as [{url, path}], or None; InputError names the entry and the fix."""
    if value in (None, [], ""):
        return None
    if not isinstance(value, list):
        raise InputError("input_data: expected a list of URLs (strings, or objects with a url)")
    if len(value) > MAX_FILES:
        raise InputError(f"input_data: {len(value)} files; at most {MAX_FILES} per job (put them in one archive)")
    out, seen = [], set()
    for i, item in enumerate(value):
        where = f"input_data[{i}]"
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected a URL or an object with a url")
        unknown = sorted(set(item) - set(KEYS))
        if unknown:
            raise InputError(f"{where}.{unknown[0]}: unknown key; an input has a url and optionally a path")
        url = item.get("url")
        if (
            not isinstance(url, str)
            or not url.strip().startswith(("http://", "https://"))
            or any(c.isspace() for c in url.strip())
        ):
            raise InputError(f"{where}.url: {url!r} is not an http(s) URL")
        url = url.strip()
        path = item.get("path")
        if path is None:
            path = unquote(posixpath.basename(urlsplit(url).path))
            if not path:
                raise InputError(
                    f'{where}: {url} names no file; give a path for it, e.g. {{"url": "...", "path": "data.csv"}}'
                )
        if not isinstance(path, str):
            raise InputError(f"{where}.path: expected a string such as 'data/input.csv'")
        rel = safe_relpath(path)
        if rel is None or rel.split("/", 1)[0] in INTERNAL:
            raise InputError(
                f"{where}.path: {path!r} must be a relative path inside the job's folder (no '..', "
                "not absolute, not .job or .git)"
            )
        if rel in seen:
            raise InputError(f"{where}.path: {rel!r} is given twice; give each input a path of its own")
        seen.add(rel)
        out.append({"url": url, "path": rel})
    return out


# Run as the job's account in its folder: fetch URL into PATH (created, never replacing a file), at most LIMIT
# bytes (exit 3 past that, the partial file removed; exit 4: PATH exists); prints "<bytes> <sha256>".
_DOWNLOAD_TO = """
import hashlib, os, sys, urllib.error, urllib.request
url, path, limit, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
parent = os.path.dirname(path)
try:
    if parent:
        os.makedirs(parent, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
except FileExistsError:
    sys.exit(4)
except OSError as e:
    sys.exit(f"cannot write {path}: {e.strerror}")
n, h = 0, hashlib.sha256()
try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
            urllib.request.Request(url, headers={"User-Agent": "spinnaker-jupyter-jobs"}), timeout=timeout) as r:
        while chunk := r.read(65536):
            n += len(chunk)
            if n > limit:
                raise OverflowError
            h.update(chunk)
            out.write(chunk)
except OverflowError:
    os.unlink(path)
    sys.exit(3)
except urllib.error.HTTPError as e:
    os.unlink(path)
    sys.exit(f"the server answered {e.code} {e.reason}")
except (urllib.error.URLError, OSError, ValueError) as e:
    os.unlink(path)
    sys.exit(str(getattr(e, "reason", e)))
print(n, h.hexdigest())
"""


def download(items: list[dict], folder: Path, limit: int, timeout: int, as_user=None, say=print) -> list[dict]:
    """Fetch every input into `folder` (the job's scratch, the account's own); returns their provenance
    [{url, path, size, sha256}]. InputError says which one failed and why."""
    used, done = 0, []
    for i, item in enumerate(items):
        url, path = item["url"], item["path"]
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _DOWNLOAD_TO, url, path, str(limit - used), str(timeout)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            cwd=str(folder),
            preexec_fn=as_user,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            raise InputError(
                f"input_data[{i}]: downloading {url} took longer than {timeout} s (jobs.limits.fetch_timeout)"
            ) from None
        said = err.decode(errors="replace").strip().splitlines()
        if proc.returncode == 3:
            raise InputError(
                f"input_data: the input files are larger than {limit // 2**20} MiB in all "
                f"(jobs.limits.input_mb); {url} went past it. Download big data from your script, "
                "or ask the operator for a larger limit"
            )
        if proc.returncode == 4:
            raise InputError(f"input_data[{i}].path: {path} is already in the job's code; give the input another path")
        if proc.returncode != 0:
            raise InputError(f"input_data[{i}]: could not download {url}: {said[-1] if said else 'failed'}")
        size, sha = out.decode().split()
        used += int(size)
        done.append({"url": url, "path": path, "size": int(size), "sha256": sha})
        say(f"Input data: {url} -> {path} ({int(size)} bytes)")
    return done
