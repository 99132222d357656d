"""Launch the "sPyNNaker" IPython kernel with exactly one sPyNNaker cfg.

Installed into the kernel environment by `spinnaker-jupyter build`. sPyNNaker reads one user cfg from
$XDG_CONFIG_DIRS, ~/.config or ~ (two abort setup(); none makes it write a template into the home). The service's
cfg is offered through XDG_CONFIG_DIRS: the server's own when its environment carries one ($SPINNAKER_MACHINE_CFG,
e.g. the SpiNNaker board the hub claimed for this session; written into a private file first), else the deployment's
in $SPINNAKER_CFG_DIR. If the user keeps their own cfg in the home, theirs is the one, and the kernel says so once.
"""

import configparser
import hashlib
import os
import sys
import tempfile

CFG_NAME = ".spynnaker.cfg"


def user_cfgs(home):
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return [p for p in (os.path.join(config_home, CFG_NAME), os.path.join(home, CFG_NAME)) if os.path.isfile(p)]


def materialise_cfg(text, home):
    """Write the cfg text into a folder private to this account, alone under its name; return the file's path.

    The folder is named after the content, so kernels of one session share it and a new session's cfg never mixes
    with an old one; the write is atomic, so a kernel never reads half a file."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    cache = os.path.join(home, ".cache", "spinnaker-jupyter")
    for folder in (os.path.join(cache, "cfg-" + digest), None):
        try:
            if folder is None:  # the home is not writable: a private folder in the temp dir
                folder = tempfile.mkdtemp(prefix="spinnaker-cfg-")
            else:
                os.makedirs(folder, mode=0o700, exist_ok=True)
                for d in (cache, folder):
                    os.chmod(d, 0o700)
            path = os.path.join(folder, CFG_NAME)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    if f.read() == text:
                        return path
            tmp = f"{path}.{os.getpid()}.tmp"
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
            return path
        except OSError:
            continue
    raise OSError("cannot write the SpiNNaker cfg of this session into the home or the temp folder")


def service_cfg(environ, home):
    """The service's cfg for this kernel: the server's own ($SPINNAKER_MACHINE_CFG), else the deployment's."""
    text = environ.get("SPINNAKER_MACHINE_CFG")
    if text:
        return materialise_cfg(text, home)
    return os.path.join(environ.get("SPINNAKER_CFG_DIR", ""), CFG_NAME)


def choose_cfg(environ):
    """Set XDG_CONFIG_DIRS so that exactly one user cfg is found; return the cfg in force."""
    home = os.path.expanduser("~")
    own = user_cfgs(home)
    if own:
        # An empty site dir keeps /etc/xdg out of the search.
        environ["XDG_CONFIG_DIRS"] = os.path.join(home, ".cache", "spinnaker-no-site-cfg")
        environ["SPINNAKER_CFG_IN_FORCE"] = own[0]
        environ["SPINNAKER_CFG_SOURCE"] = "user"
    else:
        cfg = service_cfg(environ, home)
        environ["XDG_CONFIG_DIRS"] = os.path.dirname(cfg)
        environ["SPINNAKER_CFG_IN_FORCE"] = cfg
        environ["SPINNAKER_CFG_SOURCE"] = "service"
    return environ["SPINNAKER_CFG_IN_FORCE"]


def machine_notice(cfg_path):
    parser = configparser.ConfigParser()
    parser.read(cfg_path)
    if parser.getboolean("Machine", "virtual_board", fallback=False):
        return ("SpiNNaker: this service runs sPyNNaker in virtual mode (no SpiNNaker board is attached). "
                "run() maps and loads your network, but recorded spikes and voltages come back empty.")
    return None


_NOTICES = []


def notices(environ):
    """What the user is told once: whose cfg is in force, and whether data will come back."""
    cfg = environ.get("SPINNAKER_CFG_IN_FORCE", "")
    said = []
    if cfg and environ.get("SPINNAKER_CFG_SOURCE") == "user":
        said.append(f"sPyNNaker uses your own configuration {cfg} instead of this service's machine settings. "
                    "Rename it to use the SpiNNaker machine this service provides.")
    elif cfg and environ.get("SPINNAKER_BOARD_NOTICE"):
        said.append("SpiNNaker: " + environ["SPINNAKER_BOARD_NOTICE"])  # why this session has no board
        return said
    if cfg and machine_notice(cfg):
        said.append(machine_notice(cfg))
    return said


def _post_run_cell(result):
    # Say it once, in the cell that first imported sPyNNaker, where the user looks.
    if _NOTICES and "pyNN.spiNNaker" in sys.modules:
        for notice in _NOTICES:
            print(notice)
        _NOTICES.clear()


def register_hooks():
    _NOTICES[:] = notices(os.environ)
    get_ipython().events.register("post_run_cell", _post_run_cell)  # noqa: F821 - defined inside the kernel


def main():
    choose_cfg(os.environ)
    from ipykernel.kernelapp import launch_new_instance

    sys.argv += ["--IPKernelApp.exec_lines=import spinnaker_kernel; spinnaker_kernel.register_hooks()"]
    launch_new_instance()


if __name__ == "__main__":
    main()
