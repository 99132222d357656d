"""The hub's SQLite database (`hub.db_url`'s default): write-ahead log, commits that do not wait for the disk.

JupyterHub commits several times per server start, each in its single event loop; in SQLite's default rollback
journal with synchronous=FULL a commit waits for two or three fsyncs (~0.75 ms on an idle disk, more on a busy one),
during which the hub does nothing else: 17% of the hub's busy time in a 30-user burst (benchmarks/README.md). In
WAL mode with synchronous=NORMAL a commit is a write to the log (~0.01 ms); the log is synced at checkpoints. A hub
or machine crash loses nothing committed; a power loss may undo the last commits before it, never corrupts the file
(https://www.sqlite.org/wal.html), and after a power loss no server of the hub's runs anyway. Other readers on this
machine (the operator's commands, backups through SQLite's backup API) read a WAL database as before.
"""

from __future__ import annotations

import sqlite3


class Connection(sqlite3.Connection):
    """sqlite3's connection, in WAL mode with synchronous=NORMAL (JupyterHub's db_kwargs: connect_args.factory)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA journal_mode=WAL")  # (kept in the file: a no-op after the first connection)
        self.execute("PRAGMA synchronous=NORMAL")  # (per connection)


def db_kwargs(db_url: str) -> dict:
    """JupyterHub.db_kwargs for `db_url`: SQLite files get the connection above (JupyterHub's own connect_args for
    SQLite, check_same_thread off, kept); in-memory SQLite and other databases nothing."""
    if not db_url.startswith("sqlite:///") or db_url.endswith(":memory:"):
        return {}
    return {"connect_args": {"check_same_thread": False, "factory": Connection}}
