"""A kernel that is running code is activity, even when it prints nothing and no browser is connected.

jupyter_server counts only messages as activity: a silent cell reports one `busy` status at its start and nothing
more until it ends, so a long sPyNNaker run with the laptop closed looked idle to the hub's culler, which stopped the
server (and released its boards) mid-run. While any kernel is busy this module keeps marking the server active in
`web_app.settings["last_activity_times"]`, which `ServerApp.web_app.last_activity()` includes and which JupyterHub's
single-user extension (checked against jupyterhub 6.1.1) reports to the hub every `hub_activity_interval`. Once the
last run ends nothing is marked, so the culler counts its timeout from the end of that run.
"""

from __future__ import annotations

from datetime import datetime, timezone

from tornado.ioloop import PeriodicCallback

KEY = "spinnaker_busy_kernels"  # our entry in last_activity_times
EVERY_MS = 5000  # how stale the mark may be; far below any culler timeout (at least 60 s)


def busy_kernels(kernel_manager) -> list[str]:
    """Kernels executing code now (the execution state jupyter_server tracks from each kernel's iopub)."""
    busy = []
    for kernel_id in list(kernel_manager.list_kernel_ids()):
        try:
            kernel = kernel_manager.get_kernel(kernel_id)
        except KeyError:  # shut down meanwhile
            continue
        if getattr(kernel, "execution_state", None) == "busy":
            busy.append(kernel_id)
    return busy


def watch_busy_kernels(server_app) -> PeriodicCallback:
    """Mark the server active every few seconds while any of its kernels is busy."""
    times = server_app.web_app.settings["last_activity_times"]
    kernel_manager = server_app.kernel_manager
    log = server_app.log
    was_busy = False

    def mark() -> None:
        nonlocal was_busy
        try:
            busy = busy_kernels(kernel_manager)
        except Exception:  # never let a bookkeeping error stop the server
            log.exception("activity: could not list the kernels")
            return
        if busy:
            times[KEY] = datetime.now(timezone.utc)
        if bool(busy) != was_busy:
            was_busy = bool(busy)
            log.info(
                "activity: %s",
                f"{len(busy)} kernel(s) running code: the server counts as active"
                if busy
                else "no kernel is running code",
            )

    callback = PeriodicCallback(mark, EVERY_MS)
    server_app.io_loop.add_callback(callback.start)  # on the server's loop, once it runs
    return callback
