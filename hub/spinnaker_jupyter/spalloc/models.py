"""What the allocation service says, as values: a job's state and status, the service and the allocated machine,
and a claim's progress for the user."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import SpallocProtocolError
from .iso8601 import parse_instant, parse_iso_duration


class JobState(str, enum.Enum):
    """A spalloc job's state, as the service names it."""

    UNKNOWN = "UNKNOWN"
    QUEUED = "QUEUED"
    POWER = "POWER"
    READY = "READY"
    DESTROYED = "DESTROYED"

    @classmethod
    def parse(cls, value: Any) -> JobState:
        try:
            return cls(str(value).upper())
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True)
class ServiceInfo:
    """What the service root (``srv/spalloc/``) said."""

    service_url: str
    version: str
    jobs_url: str
    machines_url: str


@dataclass(frozen=True)
class JobStatus:
    """One reading of a job (``GET jobs/{id}``)."""

    url: str
    state: JobState
    owner: str | None = None
    reason: str | None = None
    keepalive_host: str | None = None
    keepalive_url: str | None = None
    machine_url: str | None = None
    keepalive_interval: float | None = None
    #: When the service created the job / last had a keepalive (Unix time, the service's clock), if it says.
    start_time: float | None = None
    keepalive_time: float | None = None
    #: The create request as the service recorded it (``original-request``), if it says.
    original_request: Mapping[str, Any] = field(default_factory=dict, repr=False)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, url: str, obj: Mapping[str, Any]) -> JobStatus:
        interval = None
        orig = obj.get("original-request")
        if not isinstance(orig, Mapping):
            orig = {}
        ka = orig.get("keepalive-interval")
        if isinstance(ka, str):
            try:
                interval = parse_iso_duration(ka)
            except ValueError:
                interval = None
        elif isinstance(ka, (int, float)) and not isinstance(ka, bool):
            interval = float(ka)  # (Jackson writes a Duration as seconds unless told otherwise)
        return cls(
            url=url,
            state=JobState.parse(obj.get("state")),
            owner=obj.get("owner"),
            reason=obj.get("reason"),
            keepalive_host=obj.get("keepalive-host"),
            keepalive_url=obj.get("keepalive-ref"),
            machine_url=obj.get("machine-ref"),
            keepalive_interval=interval,
            start_time=parse_instant(obj.get("start-time")),
            keepalive_time=parse_instant(obj.get("keep-alive-time")),
            original_request=dict(orig),
            raw=dict(obj),
        )


@dataclass(frozen=True)
class MachineInfo:
    """The boards of an allocation (``GET jobs/{id}/machine``). Chip coordinates are relative to the allocation."""

    width: int
    height: int
    connections: Mapping[tuple[int, int], str]
    boards: Sequence[Sequence[int]] = ()
    depth: int = 1
    machine_name: str | None = None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> MachineInfo:
        try:
            conns = {(int(xy[0]), int(xy[1])): str(host) for xy, host in obj["connections"]}
            return cls(
                width=int(obj["width"]),
                height=int(obj["height"]),
                connections=conns,
                boards=[list(b) if isinstance(b, (list, tuple)) else b for b in obj.get("boards", [])],
                depth=int(obj.get("depth", 1)),
                machine_name=obj.get("machine-name"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SpallocProtocolError(
                f"The allocation service described a job's machine in an unexpected "
                f"form ({e!r}): {json.dumps(obj)[:300]}"
            ) from e

    @property
    def root_host(self) -> str:
        """IP address (or host name) of the board holding chip (0, 0): sPyNNaker's ``machine_name``."""
        if (0, 0) in self.connections:
            return self.connections[(0, 0)]
        return self.connections[min(self.connections)]

    @property
    def n_boards(self) -> int:
        return len(self.connections)

    @property
    def version(self) -> int:
        """sPyNNaker's ``[Machine] version``: 3 for a 4-chip board, 5 for 48-chip boards (all spalloc machines)."""
        return 3 if (self.width, self.height) == (2, 2) else 5


@dataclass(frozen=True)
class ClaimProgress:
    """A step of a claim, for the user: ``message`` says it in words."""

    state: JobState
    message: str
    job_url: str
    job_id: int | None
    elapsed: float
    machine: MachineInfo | None = None
