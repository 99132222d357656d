"""Unpacking archives we do not trust: a job's zip / tar.gz code, and the tar stream of its outputs.

Only regular files and folders come out. An entry with an absolute path, a `..` component, a link or a device
stops the unpacking with a message naming it (code archives) or is skipped (outputs). Sizes are counted on the
bytes actually written, never on what the archive's headers claim, so a decompression bomb stops at the limit.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
import zipfile
from pathlib import Path

CHUNK = 1 << 16


class ArchiveError(ValueError):
    pass


def safe_relpath(name: str) -> str | None:
    """The entry's path relative to the destination, or None when it would escape it."""
    if not name or "\0" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return posixpath.join(*parts)


class _Budget:
    def __init__(self, max_bytes: int, max_files: int, what: str, limits: str = "jobs.limits.code_mb / code_files"):
        self.max_bytes, self.max_files, self.what, self.limits = max_bytes, max_files, what, limits
        self.bytes = self.files = 0

    def file(self, name: str) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise ArchiveError(f"{self.what} holds more than {self.max_files} files (at {name!r}); see {self.limits}")

    def add(self, n: int, name: str) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise ArchiveError(
                f"{self.what} unpacks to more than {self.max_bytes // 2**20} MiB (at {name!r}): "
                f"too large, or a decompression bomb; see {self.limits}"
            )


def _write(src, dest: Path, rel: str, budget: _Budget, digest: bool = False) -> tuple[int, str | None]:
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256() if digest else None
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            budget.add(len(chunk), rel)
            size += len(chunk)
            if h:
                h.update(chunk)
            out.write(chunk)
    return size, (h.hexdigest() if h else None)


def extract_zip(path: Path, dest: Path, max_bytes: int, max_files: int) -> None:
    budget = _Budget(max_bytes, max_files, "The zip archive")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ArchiveError("The code URL did not give a valid zip archive") from None
    with zf:
        for info in zf.infolist():
            rel = safe_relpath(info.filename)
            if rel is None:
                raise ArchiveError(
                    f"The zip archive has an entry outside its folder: {info.filename!r}; nothing "
                    "was run. Rebuild the archive with relative paths only"
                )
            mode = info.external_attr >> 16
            if mode and (mode & 0o170000) not in (0, 0o100000, 0o040000):
                raise ArchiveError(
                    f"The zip archive has a link or special file: {info.filename!r}; only regular files are accepted"
                )
            if info.is_dir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            budget.file(rel)
            with zf.open(info) as src:
                _write(src, dest, rel, budget)


def extract_tar(path: Path, dest: Path, max_bytes: int, max_files: int) -> None:
    budget = _Budget(max_bytes, max_files, "The tar archive")
    try:
        tf = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError):
        raise ArchiveError("The code URL did not give a valid tar.gz archive") from None
    with tf:
        try:
            for member in tf:
                rel = safe_relpath(member.name)
                if rel is None:
                    raise ArchiveError(
                        f"The tar archive has an entry outside its folder: {member.name!r}; nothing "
                        "was run. Rebuild the archive with relative paths only"
                    )
                if member.isdir():
                    (dest / rel).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise ArchiveError(
                        f"The tar archive has a link or special file: {member.name!r}; only regular files are accepted"
                    )
                budget.file(rel)
                _write(tf.extractfile(member), dest, rel, budget)
        except (tarfile.TarError, EOFError, OSError) as e:
            if isinstance(e, ArchiveError):
                raise
            raise ArchiveError(f"The tar archive is damaged: {e}") from None


def flatten_single_folder(dest: Path) -> None:
    """Archives made from a folder (GitHub's among them) hold one top folder: its contents become the job's root."""
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        top = entries[0]
        tmp = dest / (".unpack-" + os.urandom(4).hex())
        top.rename(tmp)
        for child in tmp.iterdir():
            child.rename(dest / child.name)
        tmp.rmdir()


def receive_outputs(stream, dest: Path, max_bytes: int, max_files: int) -> tuple[list[dict], list[str]]:
    """Unpack the tar stream of a job's new files (made by the job's own account), hashing as it goes. Returns
    ([{path, size, hash}], [skipped entries with why])."""
    budget = _Budget(max_bytes, max_files, "The job's output", "jobs.limits.output_mb / output_files")
    files, skipped = [], []
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        for member in tf:
            rel = safe_relpath(member.name)
            if rel is None or not (member.isfile() or member.isdir()):
                skipped.append(f"{member.name} (not a regular file)")
                continue
            if member.isdir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            budget.file(rel)
            size, digest = _write(tf.extractfile(member), dest, rel, budget, digest=True)
            files.append({"path": rel, "size": size, "hash": digest})
    return files, skipped
