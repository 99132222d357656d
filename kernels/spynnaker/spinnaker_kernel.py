"""Launch the "sPyNNaker" IPython kernel with exactly one sPyNNaker cfg.

Installed into the kernel environment by `spinnaker-jupyter build`. sPyNNaker reads one user cfg from
$XDG_CONFIG_DIRS, ~/.config or ~ (two abort setup(); none makes it write a template into the home). The deployment's
cfg (machine section) lives in $SPINNAKER_CFG_DIR and is offered through XDG_CONFIG_DIRS, unless the user keeps
their own cfg in the home: then theirs is the one, and the kernel says so once.
"""

import configparser
import os
import sys

CFG_NAME = ".spynnaker.cfg"


def user_cfgs(home):
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return [p for p in (os.path.join(config_home, CFG_NAME), os.path.join(home, CFG_NAME)) if os.path.isfile(p)]


def choose_cfg(environ):
    """Set XDG_CONFIG_DIRS so that exactly one user cfg is found; return the cfg in force."""
    home = os.path.expanduser("~")
    own = user_cfgs(home)
    deployment_dir = environ.get("SPINNAKER_CFG_DIR", "")
    deployment_cfg = os.path.join(deployment_dir, CFG_NAME)
    if own:
        # An empty site dir keeps /etc/xdg out of the search.
        environ["XDG_CONFIG_DIRS"] = os.path.join(home, ".cache", "spinnaker-no-site-cfg")
        environ["SPINNAKER_CFG_IN_FORCE"] = own[0]
    else:
        environ["XDG_CONFIG_DIRS"] = deployment_dir
        environ["SPINNAKER_CFG_IN_FORCE"] = deployment_cfg
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
    deployment_cfg = os.path.join(environ.get("SPINNAKER_CFG_DIR", ""), CFG_NAME)
    said = []
    if cfg and cfg != deployment_cfg:
        said.append(f"sPyNNaker uses your own configuration {cfg} instead of this service's machine settings. "
                    "Rename it to use the SpiNNaker machine this service provides.")
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
