"""What one holder (a user server, a batch job) has of SpiNNaker: a typed record, stored as a plain dict.

The dict is what the spawner keeps in its state (``get_state()["spinnaker"]``), which the hub writes to its database
and shows admins; its keys are those the hub wrote before this record existed, so the databases of running hubs load
unchanged (`BoardRecord.from_dict`), and keys this version does not know are kept as they were (`extra`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

#: The spawner state's key holding the record.
STATE_KEY = "spinnaker"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class BoardRecord:
    """The board a holder has, is claiming, has lost, or the virtual fallback it got instead."""

    mode: str  # spinnaker.mode when it was made: session, machine, virtual, per-run
    boards: int | None = None  # boards asked for (claiming) or granted (session)
    board: str | None = None  # the root board's address (session) or the lab board's name (machine)
    version: int | None = None  # the board version (5: SpiNN-5)
    job_id: int | None = None  # the spalloc job (session)
    job_url: str | None = None
    state: str | None = None  # the job's state as last seen: REQUESTED, QUEUED, POWER, READY, DESTROYED
    claimed_at: str | None = None  # when the board came (ISO 8601, UTC)
    held: bool = False  # machine: this holder has the lab board's lock
    released: bool = False  # the job was given back (or a failed claim destroyed its own)
    lost: str | None = None  # why the service ended the job while the holder ran
    lost_at: str | None = None
    fallback: str | None = None  # "virtual": no board came; the holder runs in virtual mode
    notice: str | None = None  # said to the user (spawn page, spinnaker-status, first cell)
    since: str | None = None  # when the fallback began
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other versions, kept as they were

    # -- the stored dict ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None) -> BoardRecord | None:
        """The record of a stored dict (None for no record: an empty or missing dict)."""
        if not data or not data.get("mode"):
            return None
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: v for k, v in data.items() if k in known}
        kw["held"], kw["released"] = bool(kw.get("held")), bool(kw.get("released"))
        return cls(**kw, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The stored form: the keys with a value (as the hub has always written them), then `extra`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None or value is False and not self._says_held(f.name):
                continue
            out[f.name] = value
        return {**self.extra, **out}

    def _says_held(self, name: str) -> bool:
        # A lab board's record always says whether it is held (admins read `held: false` after the release).
        return name == "held" and self.mode == "machine" and self.fallback is None

    # -- what it says ---------------------------------------------------------------------------------------------
    @property
    def has_live_job(self) -> bool:
        """A spalloc job that was neither given back nor ended by the service."""
        return bool(self.job_url) and not self.released and not self.lost

    @property
    def holds(self) -> bool:
        """Something to give back: a live spalloc job or the lab board's lock."""
        return self.has_live_job or (self.mode == "machine" and self.held)


__all__ = ["BoardRecord", "STATE_KEY", "now_iso"]
