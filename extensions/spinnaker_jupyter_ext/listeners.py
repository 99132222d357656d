"""Who listens on a local TCP port: this server's own account, another one, or nobody.

A route of the server's proxy may reach only a listener of its own. The uid of a listening socket (from
/proc/net/tcp[6]) tells accounts apart on a shared host; containers that share the host's network all run as one uid
(jovyan), so a listener counts as ours only when its socket is also held open by a process we can see and that runs
as us (another container's processes are not in our pid namespace). Every listener on the port counts: "localhost"
may resolve to ::1 as well as 127.0.0.1, and another account could hold either.
"""

from __future__ import annotations

import os
import time

from spinnaker_listeners import listeners  # (the reader the hub's start-up checks use too)

RECHECK_AFTER = 1.0  # seconds: a page of the NRP loads dozens of assets; /proc is read once for them


def listening_sockets(port: int) -> list[tuple[int, int]]:
    """(uid, inode) of every socket listening on <port>, on any local address, IPv4 or IPv6."""
    return [(uid, inode) for inode, uid in listeners(port).items()]


def listener_uid(port: int) -> int | None:
    """The uid owning a socket listening on <port> (another account's first, if any), or None."""
    uids = sorted({uid for uid, _ in listening_sockets(port)}, key=lambda uid: uid == os.getuid())
    return uids[0] if uids else None


def _my_socket_inodes() -> set[int]:
    """Inodes of the sockets held open by the processes of this account that this process can see."""
    me, inodes = os.getuid(), set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != me:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
        except OSError:  # the process ended meanwhile, or is not ours to read
            continue
    return inodes


def owner(port: int) -> str | None:
    """'ours' when every listener on <port> belongs to this server's account, 'other' when any does not, None when
    nothing listens."""
    sockets = listening_sockets(port)
    if not sockets:
        return None
    if any(uid != os.getuid() for uid, _ in sockets):
        return "other"
    mine = _my_socket_inodes()
    return "ours" if all(inode in mine for _, inode in sockets) else "other"


_RECENT: dict[int, tuple[float, str | None]] = {}


def recent_owner(port: int) -> str | None:
    """owner(port); an 'ours' is trusted for up to a second (reading /proc/net/tcp[6] takes ~20 ms here, and a page
    loads dozens of assets; what a listener that replaced ours within that second could get carries no credentials:
    forwarding.py). Any other answer is read afresh, so a port that became ours is reachable at once."""
    now = time.monotonic()
    seen = _RECENT.get(port)
    if seen is None or seen[1] != "ours" or now - seen[0] > RECHECK_AFTER:
        seen = _RECENT[port] = (now, owner(port))
    return seen[1]


def unix_socket_owner(path: str) -> str | None:
    """'ours' or 'other' for the unix socket file at <path> (the NRP's, or the 'not installed' page's); None when
    there is none yet."""
    try:
        return "ours" if os.stat(path).st_uid == os.getuid() else "other"
    except FileNotFoundError:
        return None
    except OSError:  # a folder we may not enter: not ours
        return "other"
