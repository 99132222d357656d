"""Which kernel launcher this venv has: the pinned kernel's spinnaker_kernel, and ipykernel's resources folder (its
logos). Run as: VENV_PYTHON kernel_launcher.py"""

import importlib.util
import json
import os

ipk = importlib.util.find_spec("ipykernel")
print(
    json.dumps(
        {
            "spinnaker_kernel": importlib.util.find_spec("spinnaker_kernel") is not None,
            "resources": os.path.join(os.path.dirname(ipk.origin), "resources") if ipk else None,
        }
    )
)
