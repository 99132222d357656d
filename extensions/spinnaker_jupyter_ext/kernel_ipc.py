"""Kernels talk to their server over unix sockets in a folder only this account may enter, never over TCP.

A kernel on a TCP port of 127.0.0.1 lets any local account connect a ZMQ SUB socket to its iopub channel and read
its cell code and output live (message signing does not stop a subscriber), and other containers on the host network
alike. The server config sets KernelManager.transport = "ipc"; jupyter_client then puts each kernel's sockets beside
its connection file, as <folder>/kernel-<id>-ipc-<n>. The folder is the Jupyter runtime folder in the private home,
made private here; a unix socket's path holds at most 107 bytes, so where the home's path is too long for that, a
folder of this account's own in the temp dir (checked: ours, mode 0700, not a link) holds them instead.
"""

from __future__ import annotations

import os
import stat
import tempfile

SOCKET_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
NAME_ROOM = len("/kernel-") + 36 + len("-ipc-") + 5  # what jupyter_client appends: kernel id (uuid4), socket number


def is_private(path: str) -> bool:
    """A real folder (not a link) of this account that no other account may enter."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def make_private(path: str) -> bool:
    """Create <path> (mode 0700) or tighten it if it is already this account's own folder; True if private now."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
    except OSError:
        return False
    return is_private(path)


def connection_dir(runtime_dir: str) -> str:
    """A private folder short enough for kernels' unix sockets: the runtime folder if it fits, else one in the
    temp dir named after this account (or a fresh random one, if another account holds that name)."""
    if len(runtime_dir) + NAME_ROOM <= SOCKET_PATH_MAX and make_private(runtime_dir):
        return runtime_dir
    for tmp in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        short = os.path.join(tmp, f"jupyter-kernels-{os.getuid()}")
        if len(short) + NAME_ROOM <= SOCKET_PATH_MAX:
            try:
                os.mkdir(short, 0o700)
            except OSError:
                pass
            if is_private(short):
                return short
    return tempfile.mkdtemp(prefix="jupyter-kernels-", dir="/tmp")  # created by us alone, mode 0700


def configure(server_app) -> str | None:
    """With the ipc transport configured, put this server's kernel connection files and sockets in a private
    folder short enough for them; return that folder (None with TCP kernels)."""
    transport = str(server_app.config.get("KernelManager", {}).get("transport", "tcp")).lower()
    if transport != "ipc":
        return None
    folder = connection_dir(server_app.runtime_dir)
    server_app.kernel_manager.connection_dir = folder
    return folder
