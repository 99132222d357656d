"""What this interpreter sees beyond its standard library: its version, purelib, prefix, and the path entries a
venv layered on it must add ([path, is a site dir]). Run as: PYTHON env_paths.py"""

import json
import os
import site
import sys
import sysconfig

paths = sysconfig.get_paths()
std = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")}
sitedirs = {os.path.realpath(p) for p in site.getsitepackages()}
here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))  # sys.path[0]: this folder, not the env's
layer = []
for p in sys.path:
    real = os.path.realpath(p) if p else ""
    if (
        not p
        or real in std
        or real == here
        or p.endswith(".zip")
        or os.path.basename(p) == "lib-dynload"
        or not os.path.isdir(p)
    ):
        continue
    layer.append([p, real in sitedirs])
print(
    json.dumps(
        {
            "version": "{}.{}.{}".format(*sys.version_info[:3]),
            "purelib": paths["purelib"],
            "prefix": sys.prefix,
            "layer": layer,
        }
    )
)
