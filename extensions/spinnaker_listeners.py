"""Which TCP sockets listen on a local port, read from the kernel's tables (/proc/net/tcp and /proc/net/tcp6).

One reader for the hub's start-up checks (spinnaker_jupyter.preflight: a port the hub sends secrets to is held by no
one else) and the user servers' proxy guard (spinnaker_jupyter_ext.listeners: a route reaches only a listener of
the server's own account). Standard library only, a module of its own beside the extension package, so the hub
imports it without the extension's jupyter_server imports.
"""

from __future__ import annotations

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
LISTEN = "0A"  # the state column (st) of a listening socket


def parse(table: str, port: int) -> dict[int, int]:
    """{socket inode: owner uid} of the sockets listening on `port` in the text of one table (header line first).

    A line is ``sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...``,
    the local address ``HEX_IP:HEX_PORT``; lines not of that form are skipped."""
    found = {}
    for line in table.splitlines()[1:]:
        fields = line.split()
        try:
            if fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found[int(fields[9])] = int(fields[7])
        except (IndexError, ValueError):
            continue
    return found


def listeners(port: int, tables: tuple[str, ...] = TABLES) -> dict[int, int]:
    """{socket inode: owner uid} of every TCP socket listening on `port`, on any local address, IPv4 and IPv6
    ("localhost" may resolve to ::1 as well as 127.0.0.1, and another account could hold either)."""
    found = {}
    for path in tables:
        try:
            with open(path) as f:
                found.update(parse(f.read(), port))
        except OSError:  # no IPv6 in this kernel (or no /proc): nothing listens there
            continue
    return found
