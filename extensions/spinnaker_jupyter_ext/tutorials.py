"""Copy the tutorial notebooks into a user's home at first start, and never overwrite what the user changed.

A manifest in ~/.local/share/spinnaker-jupyter/tutorials.json remembers the hash of every file copied. On later starts
a tutorial that changed upstream replaces the user's copy only if the user never edited it; otherwise the new version
is put beside theirs. A tutorial the user deleted stays deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

MANIFEST = Path(".local/share/spinnaker-jupyter/tutorials.json")
SKIP = {".ipynb_checkpoints", "__pycache__", "reports"}


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(source: Path):
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_file() and not any(part in SKIP or part.startswith(".") for part in rel.parts):
            yield rel


def beside_name(target: Path) -> Path:
    stamp = time.strftime("%Y-%m-%d")
    candidate = target.with_name(f"{target.stem} (updated {stamp}){target.suffix}")
    n = 2
    while candidate.exists():
        candidate = target.with_name(f"{target.stem} (updated {stamp}, {n}){target.suffix}")
        n += 1
    return candidate


def seed_tutorials(source: Path, home: Path) -> list[str]:
    manifest_path = home / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (FileNotFoundError, ValueError):
        manifest = {}
    report = []
    for rel in _files(source):
        src, dst, key = source / rel, home / rel, str(rel)
        new = _hash(src)
        known = manifest.get(key)
        if known is None:
            if dst.exists():  # the user already has a file of that name: keep it, offer ours beside it
                if _hash(dst) != new:
                    alt = beside_name(dst)
                    _copy(src, alt)
                    report.append(f"{key}: you have your own file of that name; the tutorial is in {alt.name}")
            else:
                _copy(src, dst)
                report.append(f"{key}: copied")
            manifest[key] = new
        elif known != new:
            if not dst.exists():
                pass  # deleted by the user: respect that
            elif _hash(dst) == known:
                _copy(src, dst)
                report.append(f"{key}: updated to the new version")
            else:
                alt = beside_name(dst)
                _copy(src, alt)
                report.append(f"{key}: you changed it; the new version is in {alt.name}")
            manifest[key] = new
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, manifest_path)
    return report


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
