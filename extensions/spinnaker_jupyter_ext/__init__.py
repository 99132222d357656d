"""Runs inside each user's Jupyter server: seeds the tutorials, locks the proxy down, serves the NRP route, keeps
kernels off TCP."""

from __future__ import annotations

from pathlib import Path

import spinnaker_framing as framing
from spinnaker_server_contract import ServerContract

from . import kernel_ipc, nrp
from .activity import watch_busy_kernels
from .proxy_guard import install_proxy_guard
from .tutorials import seed_tutorials

__version__ = "0.1.0"


def _jupyter_server_extension_points():
    return [{"module": "spinnaker_jupyter_ext"}]


def _load_jupyter_server_extension(server_app):
    log = server_app.log
    told = ServerContract.from_env()  # what the hub told this server
    for problem in told.problems:
        log.error("spinnaker: %s", problem)
    if framing.wanted():  # the hub is embedded in another site's page (hub.frame_ancestors, over HTTPS)
        framing.frame_cookies()
    watch_busy_kernels(server_app)  # a kernel running code keeps its server from being culled
    source = told.tutorials_dir
    if source and Path(source).is_dir():  # (before "ready": ~3 ms, and the tutorials are there when Lab opens)
        try:
            report = seed_tutorials(Path(source), Path.home())
            for line in report:
                log.info("tutorials: %s", line)
        except OSError as e:  # a full disk must not stop the server: the user keeps their files
            log.error("tutorials: could not copy the tutorials into %s: %s", Path.home(), e)
    closed = install_proxy_guard(
        server_app.web_app,
        allowed_ports=set(told.proxy_ports),
        nrp_port=told.nrp_port,
        nrp_installed=bool(told.nrp_command),
        nrp_tcp=nrp.uses_tcp_port(told.nrp_command),
    )
    if closed:
        log.error("proxy: every proxy route (/proxy/, /nrp/) is closed: %s", closed)
    ipc_dir = kernel_ipc.configure(server_app)
    if ipc_dir:
        log.info("kernels: unix sockets in %s (private to this account), no TCP ports", ipc_dir)
    __import__(f"{__name__}.drive", fromlist=["drive"]).start_drive(server_app)  # EBRAINS Drive at ~/drive


async def _start_jupyter_server_extension(server_app):
    """Once the server answers: the git kernel's first set-up (minutes of git and pip), off the path to "ready" and
    at a lower CPU priority than the servers still starting beside this one (a room of students logging in)."""
    if ServerContract.from_env().git_kernel:
        _start_git_kernel(server_app.log)


def _start_git_kernel(log) -> None:
    """First start: create ~/sPyNNakerGit in the background (never delays the server; resumes if interrupted)."""
    from . import gitkernel

    try:
        proc = gitkernel.start_background(Path.home(), nice=10)
    except Exception as e:  # a broken set-up must not stop the server: the log says what happened
        log.error("sPyNNakerGit: could not start its set-up: %s", e)
        return
    if proc is not None:
        log.info("sPyNNakerGit: setting up in the background (pid %s); progress in ~/sPyNNakerGit/setup.log", proc.pid)
