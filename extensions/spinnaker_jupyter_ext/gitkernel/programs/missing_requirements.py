"""Which requirements of the editable clones under ROOT (and the kernel's extra packages) the venv running this, with
the pinned environment it is layered on, does not meet. Run as: VENV_PYTHON missing_requirements.py ROOT EXTRAS_JSON
Prints {"editable": {name: version}, "missing": [requirement], "warnings": [text]}."""

import importlib.metadata as md
import json
import os
import re
import sys
import urllib.parse

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

root = os.path.realpath(sys.argv[1])
extras = json.loads(sys.argv[2])


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


editable = {}
for d in md.distributions():
    try:
        info = json.loads(d.read_text("direct_url.json") or "{}")
    except ValueError:
        continue
    url = info.get("url", "")
    if info.get("dir_info", {}).get("editable") and url.startswith("file://"):
        path = os.path.realpath(urllib.parse.unquote(url[7:]))
        if path == root or path.startswith(root + os.sep):
            editable.setdefault(norm(d.metadata["Name"]), d)
missing, warnings = [], []


def check(text, by):
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return
    name = norm(req.name)
    if name in editable:
        have = editable[name].version
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            warnings.append(f"{by} wants {text} but the clone has {have}")
        return
    req.marker = None  # evaluated above
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(str(req))
        return
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        missing.append(str(req))


for _name, d in sorted(editable.items()):
    for text in d.requires or []:
        check(text, d.metadata["Name"])
for text in extras:
    check(text, "the kernel")
print(
    json.dumps(
        {"editable": {n: d.version for n, d in editable.items()}, "missing": sorted(set(missing)), "warnings": warnings}
    )
)
