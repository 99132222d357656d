"""The hub -> user-server contract: what the hub tells every user server (and so its kernels and terminals) in
`SPINNAKER_*` environment variables, and the Jupyter server settings every user server loads.

The hub writes it (`hubconfig.user_server_env`, and the boards' `BoardSession.env` for one server's machine) with
`ServerContract(...).to_env()`; the server's extension, `spinnaker-status` and the kernel launcher read it with
`ServerContract.from_env()`. Each variable, its type and its default are written once, in `ServerContract` below.
Only what differs from a default is written: an absent variable means its default, so an image's own ENV may say
what the hub leaves unsaid (the NRP image names its NRP command). A value that cannot be read costs only itself: it
keeps its default and `problems` says so in one line naming the variable and the setting it comes from.

Where it is imported (standard library only, and a module of its own: `spinnaker_jupyter_ext/__init__` imports
jupyter_server, which neither the kernel env nor the hub's CLI start-up should pay for):
- user servers and the hub venv: installed with the extension distribution (extensions/pyproject.toml, py-modules);
- the sPyNNaker kernel env has no extension package: the kernel-env builder copies this one file beside the launcher
  (`kernels.build_spynnaker_env`; the single-user image's Containerfile does the same), and the sPyNNakerGit venv
  sees it through its layer on that env;
- the hub image: copied into the hub venv (images/hub/Containerfile).

`python -m spinnaker_server_contract jupyter-server-config` prints the server settings (the single-user image
writes its config file with it; the hub writes the local servers' with `jupyter_server_config()`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MODES = ("virtual", "machine", "session", "per-run")

#: The file name of a sPyNNaker user cfg.
CFG_NAME = ".spynnaker.cfg"


def own_cfgs(home: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The user's own sPyNNaker cfg files in their home, in the order sPyNNaker looks ($XDG_CONFIG_HOME, else
    ~/.config; then ~). The kernel launcher lets the first one win over the service's; spinnaker-status names it."""
    environ = os.environ if environ is None else environ
    config_home = environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return [p for p in (os.path.join(config_home, CFG_NAME), os.path.join(home, CFG_NAME)) if os.path.isfile(p)]


def _var(env: str, kind: str, source: str, default: Any = None) -> Any:
    """A field of the contract: its environment variable, how its value is spelt there, and where the hub takes it
    from (said when a value cannot be read)."""
    return field(default=default, metadata={"env": env, "kind": kind, "source": source})


@dataclass(frozen=True)
class ServerContract:
    """Everything the hub tells a user server. None: not said (see each reader)."""

    # The deployment's, the same for every server (hubconfig.user_server_env).
    proxy_ports: tuple[int, ...] = _var("SPINNAKER_PROXY_PORTS", "ports", "proxy_ports", ())
    nrp_port: int = _var("SPINNAKER_NRP_PORT", "port", "nrp.port", 9000)
    nrp_start_timeout: int = _var("SPINNAKER_NRP_START_TIMEOUT", "seconds", "nrp.start_timeout", 120)
    nrp_command: tuple[str, ...] = _var("SPINNAKER_NRP_COMMAND", "argv", "nrp.command", ())  # (): no NRP here
    cfg_dir: str | None = _var("SPINNAKER_CFG_DIR", "text", "data_dir (the deployment's sPyNNaker cfg folder)")
    tutorials_dir: str | None = _var("SPINNAKER_TUTORIALS_DIR", "text", "the project's notebooks/ folder")
    git_support_dir: str | None = _var("SPINNAKER_GIT_SUPPORT_DIR", "text", "kernels/spynnaker-git/support")
    git_kernel: Mapping[str, Any] | None = _var("SPINNAKER_GIT_KERNEL_CONFIG", "object", "git_kernel")
    drive: Mapping[str, Any] | None = _var("SPINNAKER_DRIVE", "object", "drive")
    # This server's SpiNNaker machine (boards: BoardSession.env).
    mode: str | None = _var("SPINNAKER_MODE", "mode", "spinnaker.mode")
    machine_cfg: str | None = _var("SPINNAKER_MACHINE_CFG", "text", "spinnaker (the server's one sPyNNaker cfg)")
    board: str | None = _var("SPINNAKER_BOARD", "text", "the board claimed for this server")
    board_job: str | None = _var("SPINNAKER_BOARD_JOB", "text", "the spalloc job claimed for this server")
    board_job_url: str | None = _var("SPINNAKER_BOARD_JOB_URL", "text", "the spalloc job claimed for this server")
    board_notice: str | None = _var("SPINNAKER_BOARD_NOTICE", "text", "why this server has no board")
    #: One line per variable that could not be read (it kept its default). Not part of the contract itself.
    problems: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name in ("proxy_ports", "nrp_command"):  # lists as the config gives them; tuples here
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))

    def to_env(self) -> dict[str, str]:
        """The variables that differ from their defaults, as the hub puts them into a server's environment."""
        env = {}
        for f in _fields():
            value = getattr(self, f.name)
            if value != f.default and value != "":
                env[f.metadata["env"]] = _write(f.metadata["kind"], value)
        return env

    @staticmethod
    def variable(name: str) -> str:
        """The environment variable of the field `name` (e.g. "git_kernel" -> SPINNAKER_GIT_KERNEL_CONFIG)."""
        return next(f.metadata["env"] for f in _fields() if f.name == name)

    def problem(self, name: str) -> str | None:
        """Why the field `name` kept its default, if its variable could not be read."""
        prefix = self.variable(name) + "="
        return next((p for p in self.problems if p.startswith(prefix)), None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerContract:
        """What the hub said in `environ` (default: this process's environment); absent and empty variables keep
        their defaults, and so do values that cannot be read (each said in `problems`)."""
        environ = os.environ if environ is None else environ
        values, problems = {}, []
        for f in _fields():
            name, kind = f.metadata["env"], f.metadata["kind"]
            text = environ.get(name, "")
            if not text:
                continue
            try:
                values[f.name] = _read(kind, text)
                continue
            except _Partly as e:
                values[f.name], why, using = e.value, e, f"using the others ({_write(kind, e.value)})"
            except ValueError as e:
                why, using = e, f"using {_default_words(f)}"
            shown = text if len(text) <= 60 else text[:57] + "..."
            problems.append(
                f"{name}={shown!r}: {why}; {using}. The hub sets it from {f.metadata['source']}: fix that setting "
                "(or the image's ENV)."
            )
        return cls(**values, problems=tuple(problems))


class _Partly(ValueError):
    """Some of a list could be read: `value` holds those."""

    def __init__(self, message: str, value: Any) -> None:
        super().__init__(message)
        self.value = value


def _fields() -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(ServerContract) if "env" in f.metadata)


def _default_words(f: dataclasses.Field) -> str:
    if f.default is None:
        return "nothing"
    if f.default == ():
        return "none"
    return repr(f.default)


def _write(kind: str, value: Any) -> str:
    if kind == "ports":
        return ",".join(str(int(p)) for p in value)
    if kind == "argv":
        return json.dumps(list(value))
    if kind == "object":
        return json.dumps(dict(value))
    return str(value)


def _read(kind: str, text: str) -> Any:
    if kind == "ports":
        words = text.replace(",", " ").split()
        good = tuple(int(w) for w in words if w.isdigit() and 1 <= int(w) <= 65535)
        bad = [w for w in words if not (w.isdigit() and 1 <= int(w) <= 65535)]
        if bad:
            raise _Partly(f"not port numbers (1-65535, comma-separated): {', '.join(bad)}", good)
        return good
    if kind == "port":
        if not (text.strip().isdigit() and 1 <= int(text) <= 65535):
            raise ValueError("not a port number (1-65535)")
        return int(text)
    if kind == "seconds":
        if not (text.strip().isdigit() and int(text) >= 1):
            raise ValueError("not a whole number of seconds (1 or more)")
        return int(text)
    if kind == "mode":
        if text not in MODES:
            raise ValueError(f"not one of {', '.join(MODES)}")
        return text
    if kind == "text":
        return text
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if kind == "argv":
        if not (isinstance(value, list) and all(isinstance(a, str) for a in value)):
            raise ValueError("not a command (a JSON list of strings)")
        return tuple(value)
    if kind == "object":
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    raise AssertionError(kind)


def jupyter_server_config() -> dict[str, Any]:
    """Jupyter server settings every user server loads, local (data_dir/etc/jupyter, JUPYTER_CONFIG_PATH) or in a
    container (the single-user image's jupyter_server_config.d): the project's extension, and no proxying to other
    hosts (the extension also limits local ports)."""
    return {
        # jupyter_lsp off: no language server is installed for users, and it scans for 19 of them at every start.
        "ServerApp": {
            "jpserver_extensions": {"spinnaker_jupyter_ext": True, "jupyter_server_proxy": True, "jupyter_lsp": False}
        },
        "ServerProxy": {"host_allowlist": ["localhost", "127.0.0.1"]},
        # JupyterLab fetches no news and no update check from the internet (each browser asks its server, which
        # asks jupyterlab.github.io / PyPI), and its extension manager does not query PyPI: nobody here installs.
        # Its update notice says what users need to know instead: why their EBRAINS Drive is not mounted.
        "LabApp": {
            "news_url": None,
            "check_for_updates_class": "spinnaker_jupyter_ext.notice.DriveNotice",
            "extension_manager": "readonly",
        },
        # Kernels on unix sockets in a private folder (the extension picks it), never on TCP ports that any local
        # account (or another container on a shared host network) could subscribe to.
        "KernelManager": {"transport": "ipc"},
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["jupyter-server-config"]:
        print("usage: python -m spinnaker_server_contract jupyter-server-config", file=sys.stderr)
        return 2
    print(json.dumps(jupyter_server_config(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
