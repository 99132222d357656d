"""A job's hardware_config, checked before anything runs: unknown keys, wrong types, versions this deployment does
not have and pip packages outside the operator's allow-list are refused with one line naming the key and the fix.

Nothing from hardware_config ever reaches a shell: values are checked here and then used as argument lists.
"""

from __future__ import annotations

import json
import re

from ..kernels import bare_version as _bare_version

# key -> (type, what it means); the keys the SpiNNaker job runners of the EBRAINS platform know
KEYS = {
    "spynnaker_version": (str, "the sPyNNaker release to run with"),
    "spinnaker_tools_version": (str, "the SpiNNaker C tools release (comes with sPyNNaker here)"),
    "extra_pip_installs": (list, "pip packages installed for this job"),
    "extra_git_repositories": (list, "git repositories cloned and installed for this job"),
    "extra_makes": (list, "C code built for this job"),
    "extra_python_setups": (list, "python setup.py installs for this job"),
    "boards": (int, "SpiNNaker boards for this job"),
    "time_limit": (int, "seconds the job may run"),
}
#: keys this deployment can act on; the others are refused even when an operator lists them
SUPPORTED = ("spynnaker_version", "spinnaker_tools_version", "extra_pip_installs", "boards", "time_limit")

_REQUIREMENT = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9._,-]+\])?((==|>=|<=|~=|!=|<|>)[A-Za-z0-9.*+!_-]+)?$"
)


class HardwareConfigError(ValueError):
    pass


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(
    value, allowed_keys: list[str], versions: list[str], pip_allowed: list[str], max_time: int, max_boards: int = 1
) -> dict:
    """The checked hardware_config (a dict), or HardwareConfigError with one actionable line. `versions`: the
    sPyNNaker releases a job may pick here (Settings.versions, from kernels.spynnaker), the default first."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise HardwareConfigError(
                f"hardware_config is not valid JSON ({e.msg} at character {e.pos}): give a "
                'JSON object such as {"spynnaker_version": "7.4.1"}'
            ) from None
    if not isinstance(value, dict):
        raise HardwareConfigError(
            f"hardware_config must be a JSON object (key: value pairs), got {type(value).__name__}"
        )
    usable = [k for k in allowed_keys if k in SUPPORTED]
    for key, item in value.items():
        if key not in KEYS:
            raise HardwareConfigError(f"hardware_config.{key}: unknown key. Allowed keys here: {', '.join(usable)}")
        if key not in usable:
            raise HardwareConfigError(
                f"hardware_config.{key} ({KEYS[key][1]}) is not available on this deployment. "
                f"Remove it; allowed keys here: {', '.join(usable)}"
            )
        kind = KEYS[key][0]
        if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
            raise HardwareConfigError(f"hardware_config.{key}: expected {_kind_name(kind)}, got {item!r}")
        if kind is list and not all(isinstance(x, str) for x in item):
            raise HardwareConfigError(f"hardware_config.{key}: expected a list of strings, got {item!r}")
    for key in ("spynnaker_version", "spinnaker_tools_version"):
        if key in value and _bare_version(value[key]) not in {_bare_version(v) for v in versions}:
            raise HardwareConfigError(
                f"hardware_config.{key}: {value[key]!r} is not available here. Available: "
                f"{', '.join(_bare_version(v) for v in versions) or 'none'}"
            )
    allowed_pip = {_canonical(p) for p in pip_allowed}
    for req in value.get("extra_pip_installs", []):
        m = _REQUIREMENT.match(req.strip())
        if not m:
            raise HardwareConfigError(
                f"hardware_config.extra_pip_installs: {req!r} is not a package requirement (name, optionally ==version)"
            )
        if _canonical(m.group(1)) not in allowed_pip:
            raise HardwareConfigError(
                f"hardware_config.extra_pip_installs: {m.group(1)!r} is not in this "
                f"deployment's allowed packages ({', '.join(sorted(pip_allowed)) or 'none'}); "
                "ask the operator to add it to jobs.pip_packages"
            )
    if "time_limit" in value and not 1 <= value["time_limit"] <= max_time:
        raise HardwareConfigError(
            f"hardware_config.time_limit: must be between 1 and {max_time} seconds, got {value['time_limit']}"
        )
    if "boards" in value and not 1 <= value["boards"] <= max_boards:
        raise HardwareConfigError(f"hardware_config.boards: must be between 1 and {max_boards}, got {value['boards']}")
    return value


def _kind_name(kind) -> str:
    return {str: "a string", list: "a list of strings", int: "a whole number"}[kind]
