"""The notice users see in JupyterLab when their EBRAINS Drive is not mounted at ~/drive, and why; no JavaScript of
ours to build.

JupyterLab 4's announcements plugin (@jupyterlab/apputils-extension:announcements) asks its server once per page
load whether an update is available (`/lab/api/update`), and shows the answer as a notification: a toast, then in
the notification centre (the bell in the status bar). The server answers with `LabApp.check_for_updates_class`, a
documented setting ("a callable class ... must return asynchronously a string ... or None"); user servers here
never install anything, so that answer is the Drive's state instead of a version check.

The plugin asks only once the user has answered JupyterLab's question "Would you like to get notified about official
Jupyter news?". News are off here (`LabApp.news_url` null: the question leads nowhere), so at the server's start the
extension answers it for users who never did (`fetchNews: "false"` in their own JupyterLab settings, which they may
change; a settings override in the environment would do the same, but pip's editable installs leave data files
out). The plugin's own button under the notice, "Ignore all updates", turns the notice off for that user.
Checked against JupyterLab 4.6.6 (tests/integration/test_drive_notice.py shows the notice in Chromium).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from jupyterlab.handlers.announcements import CheckForUpdateABC  # (LabApp's own import: costs nothing more)

from .drive import ENV, read_state, state_dir

#: How long a page load waits for the first health check of this server's Drive keeper.
FIRST_CHECK_SECONDS = 10.0


def _process_started() -> float:
    """When this server's process started (seconds since the epoch): older Drive states are a previous server's."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


STARTED = _process_started()


def drive_notice(state: dict | None) -> str | None:
    """What the user is told about the Drive's state (None: nothing to say)."""
    if not state or state.get("state") == "mounted":
        return None
    # JupyterLab cuts a toast at 140 characters: the reason first, the rest in the notification centre's copy.
    return (
        f"EBRAINS Drive not mounted at ~/{Path(state.get('mount_point', 'drive')).name}: "
        f"{state.get('reason') or state.get('state')}. It comes back by itself; `spinnaker-status` says more."
    )


async def fresh_state(home: Path, wait: float = FIRST_CHECK_SECONDS) -> dict | None:
    """The Drive state this server's keeper wrote (not a previous server's), waiting up to ``wait`` s for it."""
    path = state_dir(home) / "state.json"
    deadline = time.monotonic() + wait
    while True:
        try:
            if path.stat().st_mtime >= STARTED - 1:
                return read_state(home)
        except OSError:
            pass
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.2)


NOTIFICATION_SETTINGS = (
    Path(".jupyter/lab/user-settings/@jupyterlab/apputils-extension") / "notification.jupyterlab-settings"
)


def answer_news_question(home: Path) -> bool:
    """Preset the user's answer to JupyterLab's news question ("no": news are off here) if they never gave one, so
    that JupyterLab goes on to ask for the notice. Returns whether it was preset now."""
    path = home / NOTIFICATION_SETTINGS
    if path.exists() or path.is_symlink():
        return False  # the user's own settings: never touched
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with open(path, "x") as f:
            f.write(
                "{\n    // preset by the SpiNNaker service: no Jupyter news (shows the EBRAINS Drive notice)\n"
                '    "fetchNews": "false"\n}\n'
            )
    except OSError:
        return False
    return True


class DriveNotice(CheckForUpdateABC):
    """JupyterLab's update check, answered with the EBRAINS Drive's state (see the module's docstring)."""

    async def __call__(self) -> str | None:
        if not os.environ.get(ENV):
            return None  # no Drive in this deployment
        return drive_notice(await fresh_state(Path.home()))
