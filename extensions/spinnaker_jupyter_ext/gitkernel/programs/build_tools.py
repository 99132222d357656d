"""What this venv lacks for PEP 660 editable installs (setuptools>=64 with wheel, or setuptools>=70.1): the
requirement to install, as JSON ("" when nothing). Run as: VENV_PYTHON build_tools.py"""

import importlib.util
import json

try:
    import setuptools
except ImportError:
    need = "setuptools>=70.1"
else:
    v = tuple(int(x) for x in (setuptools.__version__.split(".") + ["0"])[:2] if x.isdigit())
    if v >= (70, 1):
        need = ""
    elif v >= (64, 0):
        need = "" if importlib.util.find_spec("wheel") else "wheel"
    else:
        need = "setuptools>=70.1"
print(json.dumps(need))
