"""This machine's pip settings as pip itself reads them (`pip config list`: its config files and PIP_* variables),
for the image build (images/build.py: the CA bundle put into the build context) and job containers
(jobs/docker_executor.py: the CA bundle mounted, index URLs, trusted hosts). Standard library only: images/build.py
imports it from the source tree, whatever Python runs the build.
"""

from __future__ import annotations

import subprocess
import sys


def listed(python: str | None = None) -> dict[str, str]:
    """{key: value} of pip's settings (no section: `global.cert` and `:env:.cert` are both `cert`); {} without pip."""
    try:
        out = subprocess.run(
            [python or sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse(out)


def parse(out: str) -> dict[str, str]:
    """`pip config list`'s lines, e.g. global.cert='/etc/ssl/certs/ca-certificates.crt'. pip lists its sources in
    the order it reads them (global, user, site files, $PIP_CONFIG_FILE, then PIP_* variables): later lines win."""
    values: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    return values


def cert(values: dict[str, str] | None = None) -> str | None:
    """The CA bundle pip is configured with, as configured (the caller checks that the file is there)."""
    values = listed() if values is None else values
    return values.get("cert") or None
