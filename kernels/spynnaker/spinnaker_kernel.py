"""Launch the "sPyNNaker" IPython kernel with exactly one sPyNNaker cfg.

Installed into the kernel environment by `spinnaker-jupyter build`. sPyNNaker reads one user cfg from
$XDG_CONFIG_DIRS, ~/.config or ~ (two abort setup(); none makes it write a template into the home). The service's
cfg is offered through XDG_CONFIG_DIRS: the server's own when its environment carries one ($SPINNAKER_MACHINE_CFG,
e.g. the SpiNNaker board the hub claimed for this session; written into a private file first), else the deployment's
in $SPINNAKER_CFG_DIR. If the user keeps their own cfg in the home, theirs is the one, and the kernel says so once.

Every kernel this service offers runs NoDebuggerKernel: the sPyNNaker kernel, the sPyNNakerGit kernel (this module is
its launcher) and the python3 kernel (`python spinnaker_kernel.py --plain`, no sPyNNaker cfg). Why below.
"""

import configparser
import hashlib
import os
import sys
import tempfile

# What the hub told this server (extensions/spinnaker_server_contract.py: standard library only). The kernel env has
# no extension package: `spinnaker-jupyter build` (kernels.build_spynnaker_env) and the single-user image copy that
# one file beside this launcher, where the sPyNNakerGit venv sees it too; the python3 kernel (--plain) runs in the
# server env, which has it with the extension.
from spinnaker_server_contract import CFG_NAME, ServerContract, own_cfgs


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
    told = ServerContract.from_env(environ)
    if told.machine_cfg:
        return materialise_cfg(told.machine_cfg, home)
    return os.path.join(told.cfg_dir or "", CFG_NAME)


def choose_cfg(environ):
    """Set XDG_CONFIG_DIRS so that exactly one user cfg is found; return the cfg in force."""
    home = os.path.expanduser("~")
    own = own_cfgs(home)
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
        return (
            "SpiNNaker: this service runs sPyNNaker in virtual mode (no SpiNNaker board is attached). "
            "run() maps and loads your network, but recorded spikes and voltages come back empty."
        )
    return None


_NOTICES = []


def notices(environ):
    """What the user is told once: whose cfg is in force, and whether data will come back."""
    cfg = environ.get("SPINNAKER_CFG_IN_FORCE", "")
    said = []
    if cfg and environ.get("SPINNAKER_CFG_SOURCE") == "user":
        said.append(
            f"sPyNNaker uses your own configuration {cfg} instead of this service's machine settings. "
            "Rename it to use the SpiNNaker machine this service provides."
        )
    elif cfg and ServerContract.from_env(environ).board_notice:  # why this session has no board
        said.append("SpiNNaker: " + ServerContract.from_env(environ).board_notice)
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


# --- No debugger ------------------------------------------------------------------------------------------------
# JupyterLab's debugger makes ipykernel run debugpy.listen() on a random TCP port of 127.0.0.1, and debugpy 1.x asks
# its clients for no token: any local account (or any container on a shared host network) could attach and run code
# as this user. Neither offers a unix socket or a client check, so the debugger is off: JupyterLab hides its button
# (the kernelspecs say "debugger": false), kernel_info does not list it, and a debug_request starts nothing. Users
# lose the visual debugger, not their account; %debug and pdb, which need no port, still work.
#
# The fence: IPKernelApp.kernel_class is ipykernel's supported way to run a kernel subclass; what the subclass
# overrides (the kernel_info property and the do_debug_request hook) is ipykernel's own detail, checked against
# CHECKED_IPYKERNEL by debugger_fence_problem() (tests/integration/test_kernel_debugger.py fails when it moves).
CHECKED_IPYKERNEL = "7.4"
DEBUGGER_OFF = (
    "The debugger is not available on this service: it would listen on a network port that other "
    "accounts on this machine could use to run code as you. Use %debug or pdb instead."
)


def _no_debugger_kernel():
    from ipykernel.ipkernel import IPythonKernel

    class NoDebuggerKernel(IPythonKernel):
        """An IPython kernel that neither offers nor starts the debugger (debugpy's TCP listener)."""

        @property
        def kernel_info(self):
            info = dict(super().kernel_info)
            info["supported_features"] = [f for f in info.get("supported_features", []) if f != "debugger"]
            info.pop("debugger", None)  # the field of older protocol versions
            return info

        async def do_debug_request(self, msg):
            return {
                "type": "response",
                "request_seq": msg.get("seq"),
                "success": False,
                "command": msg.get("command"),
                "message": DEBUGGER_OFF,
            }

    NoDebuggerKernel.__module__, NoDebuggerKernel.__qualname__ = __name__, "NoDebuggerKernel"
    return NoDebuggerKernel


def __getattr__(name):  # NoDebuggerKernel is built on first use: importing this module needs no ipykernel
    if name == "NoDebuggerKernel":
        globals()[name] = cls = _no_debugger_kernel()
        return cls
    raise AttributeError(name)


def debugger_fence_problem():
    """None while the overridden ipykernel details are where they were checked; else what moved."""
    import inspect

    import ipykernel
    from ipykernel import ipkernel, kernelbase

    if ".".join(ipykernel.__version__.split(".")[:2]) != CHECKED_IPYKERNEL:
        return f"ipykernel {ipykernel.__version__}, checked against {CHECKED_IPYKERNEL}: check NoDebuggerKernel"
    if not isinstance(inspect.getattr_static(kernelbase.Kernel, "kernel_info"), property):
        return "Kernel.kernel_info is no longer a property"
    if "self.kernel_info" not in inspect.getsource(kernelbase.Kernel.kernel_info_request):
        return "kernel_info_request no longer answers from Kernel.kernel_info"
    if "self.do_debug_request(" not in inspect.getsource(kernelbase.Kernel.debug_request):
        return "debug_request no longer goes through do_debug_request"
    src = inspect.getsource(ipkernel)
    if src.count("self.debugger.process_request(") != 1 or "process_request" in inspect.getsource(kernelbase):
        return "the debugger is started from somewhere else than IPythonKernel.do_debug_request"
    return None


def main():
    plain = "--plain" in sys.argv  # the python3 kernel: no sPyNNaker cfg, no notices
    if plain:
        sys.argv.remove("--plain")
    else:
        choose_cfg(os.environ)
        sys.argv += ["--IPKernelApp.exec_lines=import spinnaker_kernel; spinnaker_kernel.register_hooks()"]
    from ipykernel.kernelapp import launch_new_instance

    problem = debugger_fence_problem()
    if problem:  # the kernel still refuses the debugger as far as it can; the operator's log says what to check
        print(f"spinnaker_kernel: {problem}", file=sys.stderr)
    sys.argv += ["--IPKernelApp.kernel_class=spinnaker_kernel.NoDebuggerKernel"]
    launch_new_instance()


if __name__ == "__main__":
    main()
