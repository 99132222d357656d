"""Client for the SpiNNaker allocation service ("new spalloc", the Java SpiNNaker-allocserv), for the hub.

The hub uses it to claim boards for a user's session, keep them alive while the session lasts, tell the user in
words where the claim stands, and release them. The sPyNNaker cfg of claimed boards is spynnaker_cfg.py's.

Everything here is asyncio and non-blocking (tornado's ``AsyncHTTPClient``); nothing waits on the hub's loop.

The protocol, as spinnman 1!7.4.1 (``spinnman/spalloc``) and the Java service implement it:

* ``GET {service}/system/login.html`` with ``Authorization: Bearer T`` opens a session (``JSESSIONID`` cookie);
  ``GET {service}/srv/spalloc/`` then gives ``version``, ``jobs-ref``, ``machines-ref``, ``csrf-header`` and
  ``csrf-token``. Reads go with the cookie; POST/PUT/DELETE with cookie, CSRF header and the bearer token.
  A ``401`` renews the session once.
* ``POST jobs`` (kebab-case JSON, ``keepalive-interval`` an ISO-8601 duration of 30-300 s) -> ``201`` + ``Location``;
  ``GET jobs/{id}[?wait=true]`` (state ``QUEUED``/``POWER``/``READY``/``DESTROYED``); ``PUT jobs/{id}/keepalive``
  (``text/plain``); ``GET jobs/{id}/machine`` (``connections`` [[x, y], ip]); ``DELETE jobs/{id}?reason=``.
* A job whose keepalive is older than its interval is destroyed by the service, queued jobs included: the
  keepalive loop starts as soon as the job exists.

Typical use::

    allocator = SpallocAllocator(config=c)            # traitlets config: url, token, timeouts...
    alloc = await allocator.claim("alice", progress=say)   # waits in the queue, keeps the job alive
    spawner.state["spalloc_job"] = alloc.job_url          # persist; after a hub restart: allocator.resume(url)
    alloc.root_host, alloc.version                        # the board for the kernel's cfg (spynnaker_cfg.py)
    ...
    await alloc.release("session ended")

The package, one module a concern: ``errors`` (and their wording), ``iso8601``, ``models`` (what the service says, as
values), ``client`` (the session and its requests), ``job`` (one job: state, wait, keepalive) and ``allocator``
(claims for hub users). Everything public is importable from here.
"""

from .allocator import Allocation, SpallocAllocator
from .client import SESSION_COOKIE, SpallocClient, TokenSource, normalize_service_url
from .errors import (
    SETTINGS,
    SpallocAuthError,
    SpallocError,
    SpallocJobDestroyedError,
    SpallocProtocolError,
    SpallocRequestError,
    SpallocTimeoutError,
    SpallocUnreachableError,
)
from .iso8601 import format_iso_duration, parse_instant, parse_iso_duration
from .job import LostCallback, ProgressCallback, SpallocJob
from .models import ClaimProgress, JobState, JobStatus, MachineInfo, ServiceInfo

__all__ = [
    "Allocation",
    "ClaimProgress",
    "JobState",
    "JobStatus",
    "MachineInfo",
    "ServiceInfo",
    "SpallocAllocator",
    "SpallocAuthError",
    "SpallocClient",
    "SpallocError",
    "SpallocJob",
    "SpallocJobDestroyedError",
    "SpallocProtocolError",
    "SpallocRequestError",
    "SpallocTimeoutError",
    "SpallocUnreachableError",
    "TokenSource",
    "parse_instant",
    # (and, for callers that name them)
    "SESSION_COOKIE",
    "SETTINGS",
    "LostCallback",
    "ProgressCallback",
    "format_iso_duration",
    "normalize_service_url",
    "parse_iso_duration",
]
