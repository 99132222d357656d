#!/usr/bin/env python3
"""A test double of the SpiNNaker allocation service ("new spalloc", the Java SpiNNaker-allocserv).

It speaks the service's real HTTP API, as spinnman 1!7.4.1's ``SpallocClient`` and the hub's allocator use it:

* ``GET  {base}/system/login.html``  with ``Authorization: Bearer T``: opens a session (``JSESSIONID`` cookie).
  Without a bearer token it serves the local login form (hidden ``_csrf`` field); ``POST system/perform_login``
  logs a local user in when the double was given passwords.
* ``GET  {base}/srv/spalloc/``: ``version`` (``major-version``, ``minor-version``, ``revision``), ``jobs-ref``,
  ``machines-ref``, ``csrf-header`` and ``csrf-token`` (the session's CSRF token).
* ``GET  .../machines`` and ``.../machines/{name}``.
* ``GET  .../jobs`` (list, ``deleted``/``start``/``limit``/``wait``; every job to anyone logged in, newest first,
  pages linked by ``next``/``prev`` in the body and a ``Link`` header), ``POST .../jobs`` (kebab-case JSON) -> ``201``
  with a ``Location`` header and ``{"job-id", "job-ref"}``.
* ``GET  .../jobs/{id}`` (``?wait=true`` long-polls for a change, up to ``wait_timeout`` seconds), ``DELETE
  .../jobs/{id}?reason=`` -> ``204``, ``PUT .../jobs/{id}/keepalive`` (``text/plain``) -> ``ok``,
  ``GET .../jobs/{id}/machine`` (``204`` until boards are allocated), ``GET .../jobs/{id}/machine/power``.

Authentication and CSRF follow Spring Security as the real service configures it: every ``srv`` request must be
authenticated, by a bearer token or by the session cookie; unknown tokens get ``401`` with a ``WWW-Authenticate``
challenge; state-changing requests (POST/PUT/DELETE) authenticated by the session cookie alone must carry the
session's CSRF token in ``X-CSRF-TOKEN`` (else ``403``); bearer-authenticated requests need none. A non-admin's
``owner`` is ignored (the job belongs to the authenticated user) and non-admins see only their own jobs (``404``).

Allocation: jobs start ``QUEUED``; when boards are free they are allocated in creation order, go to ``POWER`` and
after ``power_delay`` seconds to ``READY``. A job whose keepalive is older than its ``keepalive-interval`` is
destroyed with reason ``keepalive expired`` (queued jobs too); destroying a job frees its boards for the queue.
One board is allocated on its own; several boards are allocated as whole triads (3 boards), like the real service.

Deliberate limits: no websocket proxy (``proxy-ref`` is announced, nothing listens), no memory/router/fast-data
endpoints, no NMPI accounting, groups and collabs are recorded but not checked against membership.

Test-only knobs: keepalive intervals below the real minimum of 30 s need ``testing=True`` (``--testing``); the
clock can be advanced (``advance_clock``) so expiry can be tested without waiting.

Run it: ``python tests/doubles/spalloc_server.py --port 8080 --boards 1 --token TOKEN=user`` (``--tls`` for HTTPS,
which spinnman's client requires: it rewrites every reference it follows to ``https``). Import it:
``with SpallocDouble(boards=1, tokens={"t": "alice"}) as server: ...`` (serves from a thread).
Only the standard library and tornado are needed; ``--tls`` makes its certificate with ``cryptography`` when
importable (a JupyterHub dependency), else with the ``openssl`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import html
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import tornado.web

try:
    from .threaded_http import ApiHandler, ThreadedHTTPDouble
except ImportError:  # run as a script: python tests/doubles/spalloc_server.py
    from threaded_http import ApiHandler, ThreadedHTTPDouble

log = logging.getLogger("spalloc-double")

T = TypeVar("T")

SESSION_COOKIE = "JSESSIONID"
CSRF_HEADER = "X-CSRF-TOKEN"
#: The real service refuses keepalive intervals outside these bounds (CreateJobRequest validation).
REAL_KEEPALIVE_MIN = 30.0
REAL_KEEPALIVE_MAX = 300.0
#: How long the real service holds a ``?wait=true`` request when nothing changes.
REAL_WAIT_TIMEOUT = 30.0
SERVICE_VERSION = (7, 4, 1)

QUEUED, POWER, READY, DESTROYED = "QUEUED", "POWER", "READY", "DESTROYED"

_CREATE_FIELDS = {
    "owner",
    "group",
    "nmpi-collab",
    "nmpi-job-id",
    "keepalive-interval",
    "num-boards",
    "dimensions",
    "board",
    "machine-name",
    "tags",
    "max-dead-boards",
}

_DURATION = re.compile(
    r"^(?P<sign>[-+]?)P(?:(?P<d>[-+]?\d+)D)?"
    r"(?:T(?:(?P<h>[-+]?\d+)H)?(?:(?P<m>[-+]?\d+)M)?(?:(?P<s>[-+]?\d+)(?:[.,](?P<f>\d{0,9}))?S)?)?$",
    re.IGNORECASE,
)


def parse_iso_duration(text: str) -> float:
    """Seconds in an ISO-8601 duration as ``java.time.Duration.parse`` reads it (``PT120S``, ``PT2M``, ``PT0.5S``).

    :raises ValueError: if the text is not such a duration.
    """
    m = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if not m or text.strip().upper().endswith("T") or not any(m.group(k) for k in "dhms"):
        raise ValueError(f"Text cannot be parsed to a Duration: {text!r}")
    secs = float(int(m.group("d") or 0) * 86400 + int(m.group("h") or 0) * 3600 + int(m.group("m") or 0) * 60)
    s = int(m.group("s") or 0)
    frac = float(f"0.{m.group('f')}") if m.group("f") else 0.0
    secs += s + (-frac if (m.group("s") or "").startswith("-") else frac)
    return -secs if m.group("sign") == "-" else secs


def format_iso_duration(seconds: float) -> str:
    """``PT120S`` style, as Jackson writes a ``Duration``."""
    return f"PT{seconds:g}S"


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat().replace("+00:00", "Z")


class _Clock:
    """Monotonic time plus an offset the tests can advance; wall time moves with it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.monotonic() + self.offset

    def wall(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self.offset)


@dataclass
class Board:
    index: int
    x: int
    y: int
    z: int
    cabinet: int
    frame: int
    board: int
    address: str
    job: int | None = None

    def triad(self) -> tuple[int, int]:
        return (self.x, self.y)

    def as_json(self) -> dict:
        return {
            "x": self.x,
            "y": self.y,
            "z": self.z,
            "cabinet": self.cabinet,
            "frame": self.frame,
            "board": self.board,
            "address": self.address,
        }


@dataclass
class Job:
    id: int
    owner: str
    group: str | None
    collab: str | None
    nmpi_job_id: int | None
    request: dict
    keepalive_interval: float
    want: tuple
    created_by: str
    start_wall: dt.datetime
    last_keepalive: float
    keepalive_wall: dt.datetime
    keepalive_host: str | None = None
    state: str = QUEUED
    boards: list[int] = field(default_factory=list)
    ready_at: float | None = None
    finish_wall: dt.datetime | None = None
    reason: str | None = None
    keepalives: int = 0
    changes: int = 0
    waiters: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def snapshot(self, model: SpallocModel) -> dict:
        return {
            "id": self.id,
            "owner": self.owner,
            "group": self.group,
            "collab": self.collab,
            "nmpi_job_id": self.nmpi_job_id,
            "state": self.state,
            "reason": self.reason,
            "boards": [model.boards[i].address for i in self.boards],
            "keepalives": self.keepalives,
            "waiters": self.waiters,
            "keepalive_interval": self.keepalive_interval,
            "keepalive_host": self.keepalive_host,
            "request": dict(self.request),
            "created_by": self.created_by,
        }


class SpallocModel:
    """The allocation engine: jobs, boards, queue, keepalive expiry. Used only from the server's event loop."""

    def __init__(
        self,
        *,
        boards: int,
        machine_name: str,
        tags: Sequence[str],
        power_delay: float,
        clock: _Clock,
        first_ip: str = "10.11.192.1",
    ) -> None:
        self.machine_name = machine_name
        self.tags = list(tags)
        self.power_delay = power_delay
        self.clock = clock
        self.jobs: dict[int, Job] = {}
        self.next_id = 1
        self.list_event = asyncio.Event()  # set (and replaced) whenever any job is made or changes state
        self.list_waiters = 0
        ip0 = ipaddress.IPv4Address(first_ip)
        n_triads = max(1, math.ceil(boards / 3))
        self.width_triads = n_triads
        self.height_triads = 1
        self.boards = [
            Board(index=i, x=i // 3, y=0, z=i % 3, cabinet=0, frame=i // 24, board=i % 24, address=str(ip0 + 8 * i))
            for i in range(boards)
        ]
        # Boards missing from the last triad are reported as dead, as on a real machine with holes.
        self.dead = [
            Board(index=i, x=i // 3, y=0, z=i % 3, cabinet=0, frame=i // 24, board=i % 24, address=str(ip0 + 8 * i))
            for i in range(boards, n_triads * 3)
        ]

    # -- jobs -------------------------------------------------------------------------------------------------
    def create(
        self,
        *,
        owner: str,
        created_by: str,
        group: str | None,
        collab: str | None,
        nmpi_job_id: int | None,
        request: dict,
        keepalive_interval: float,
        want: tuple,
    ) -> Job:
        now = self.clock.now()
        job = Job(
            id=self.next_id,
            owner=owner,
            group=group,
            collab=collab,
            nmpi_job_id=nmpi_job_id,
            request=request,
            keepalive_interval=keepalive_interval,
            want=want,
            created_by=created_by,
            start_wall=self.clock.wall(),
            last_keepalive=now,
            keepalive_wall=self.clock.wall(),
        )
        self.next_id += 1
        self.jobs[job.id] = job
        self._list_changed()
        self.allocate()
        return job

    def keepalive(self, job: Job, host: str | None) -> None:
        if job.state == DESTROYED:
            return
        job.last_keepalive = self.clock.now()
        job.keepalive_wall = self.clock.wall()
        job.keepalive_host = host
        job.keepalives += 1

    def destroy(self, job: Job, reason: str) -> None:
        if job.state == DESTROYED:
            return
        for i in job.boards:
            self.boards[i].job = None
        job.boards = []
        job.state = DESTROYED
        job.reason = reason
        job.finish_wall = self.clock.wall()
        job.ready_at = None
        self._changed(job)
        self.allocate()

    def tick(self) -> None:
        now = self.clock.now()
        for job in list(self.jobs.values()):
            if job.state != DESTROYED and now - job.last_keepalive > job.keepalive_interval:
                self.destroy(job, "keepalive expired")
        for job in self.jobs.values():
            if job.state == POWER and job.ready_at is not None and now >= job.ready_at:
                job.state = READY
                job.ready_at = None
                self._changed(job)
        self.allocate()

    async def wait_change(self, job: Job, timeout: float) -> None:
        """Return when the job changes, or after ``timeout`` seconds."""
        event = job.event
        job.waiters += 1
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            job.waiters -= 1

    def _changed(self, job: Job) -> None:
        job.changes += 1
        old, job.event = job.event, asyncio.Event()
        old.set()
        self._list_changed()

    def _list_changed(self) -> None:
        old, self.list_event = self.list_event, asyncio.Event()
        old.set()

    async def wait_list_change(self, timeout: float) -> None:
        """Return when any job is made or changes, or after ``timeout`` seconds (the service's jobs epoch)."""
        self.list_waiters += 1
        try:
            await asyncio.wait_for(self.list_event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self.list_waiters -= 1

    # -- allocation -------------------------------------------------------------------------------------------
    def allocate(self) -> None:
        for job in sorted(self.jobs.values(), key=lambda j: j.id):
            if job.state != QUEUED:
                continue
            chosen = self._find(job.want)
            if chosen is None:
                continue
            for i in chosen:
                self.boards[i].job = job.id
            job.boards = chosen
            if self.power_delay <= 0:
                job.state = READY
            else:
                job.state = POWER
                job.ready_at = self.clock.now() + self.power_delay
            self._changed(job)

    def _free_triads(self) -> list[list[int]]:
        triads: dict[tuple[int, int], list[Board]] = {}
        for b in self.boards:
            triads.setdefault(b.triad(), []).append(b)
        return [[b.index for b in bs] for bs in triads.values() if len(bs) == 3 and all(b.job is None for b in bs)]

    def _find(self, want: tuple) -> list[int] | None:
        kind = want[0]
        if kind == "boards" and want[1] == 1:
            free = [b.index for b in self.boards if b.job is None]
            return free[:1] or None
        if kind in ("boards", "dims"):
            n_triads = math.ceil(want[1] / 3) if kind == "boards" else want[1] * want[2]
            triads = self._free_triads()
            if len(triads) < n_triads:
                return None
            return [i for t in triads[:n_triads] for i in t]
        if kind == "board":
            b = self.boards[want[1]]
            return [b.index] if b.job is None else None
        raise AssertionError(want)

    def find_board(self, spec: dict) -> Board | None:
        for b in self.boards:
            if spec.get("address") is not None and b.address == spec["address"]:
                return b
            if spec.get("x") is not None and (b.x, b.y, b.z) == (spec["x"], spec["y"], spec["z"]):
                return b
            if spec.get("cabinet") is not None and (b.cabinet, b.frame, b.board) == (
                spec["cabinet"],
                spec["frame"],
                spec["board"],
            ):
                return b
        return None

    def machine_of(self, job: Job) -> dict:
        """The sub-machine description (chip coordinates relative to the allocation)."""
        boards = [self.boards[i] for i in job.boards]
        if len(boards) == 1:
            width = height = 8
            depth = 1
            conns = [[[0, 0], boards[0].address]]
        else:
            depth = 3
            triads = sorted({b.triad() for b in boards})
            width, height = 12 * len(triads) + 4, 16
            offsets = {0: (0, 0), 1: (8, 4), 2: (4, 8)}
            conns = []
            for b in boards:
                tx = triads.index(b.triad())
                ox, oy = offsets[b.z]
                conns.append([[12 * tx + ox, oy], b.address])
        return {
            "width": width,
            "height": height,
            "depth": depth,
            "machine-name": self.machine_name,
            "connections": conns,
            "boards": [[b.x, b.y, b.z] for b in boards],
        }


@dataclass
class _Session:
    id: str
    csrf: str
    user: str | None = None


class _HTTPError(Exception):
    def __init__(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = dict(headers or {})


class _Handler(ApiHandler):
    """Shared request plumbing: authentication, sessions, CSRF (Spring-style, done here: no tornado XSRF cookie),
    plain-text errors, URL building."""

    double: SpallocDouble
    error_type = _HTTPError

    def initialize(self, double: SpallocDouble) -> None:
        self.double = double
        self.model = double.model
        self.user: str | None = None
        self.session: _Session | None = None
        self.bearer = False

    # tornado hooks
    def set_default_headers(self) -> None:
        self.clear_header("Server")

    def compute_etag(self) -> None:  # the real service sends no ETags; a 304 would confuse long-polls
        return None

    def on_finish(self) -> None:
        self.double._log_request(self)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, _HTTPError):
            for k, v in exc.headers.items():
                self.add_header(k, v)
            self.set_header("Content-Type", "text/plain;charset=UTF-8")
            self.finish(exc.text)
            return
        self.set_header("Content-Type", "text/plain;charset=UTF-8")
        self.finish(self._reason)

    # URLs
    def base(self) -> str:
        return f"{self.request.protocol}://{self.request.host}"

    def srv(self) -> str:
        return f"{self.base()}{self.double.prefix}/srv/spalloc/"

    def job_url(self, job: Job) -> str:
        return f"{self.srv()}jobs/{job.id}"

    # sessions and auth
    def _get_session(self, create: bool) -> _Session | None:
        sid = self.get_cookie(SESSION_COOKIE)
        sess = self.double.sessions.get(sid) if sid else None
        if sess is None and create:
            sess = _Session(id=secrets.token_hex(16).upper(), csrf=secrets.token_urlsafe(24))
            self.double.sessions[sess.id] = sess
            self.set_cookie(
                SESSION_COOKIE,
                sess.id,
                path=self.double.prefix or "/",
                httponly=True,
                secure=self.request.protocol == "https",
            )
        return sess

    def authenticate(self, *, create_session: bool = False) -> str:
        scheme, credentials = self.authorization()
        if scheme == "bearer":
            user = self.double.tokens.get(credentials)
            if user is None:
                raise _HTTPError(
                    401,
                    "invalid bearer token",
                    {
                        "WWW-Authenticate": 'Bearer error="invalid_token", '
                        'error_description="the access token is not valid"'
                    },
                )
            self.user, self.bearer = user, True
            self.session = self._get_session(create_session)
            if self.session is not None:
                self.session.user = user
            return user
        self.session = self._get_session(False)
        if self.session is not None and self.session.user is not None:
            self.user = self.session.user
            return self.user
        raise _HTTPError(
            401,
            "log in required, either with BASIC auth or HBP/EBRAINS bearer token (if they are enabled)\n",
            {"WWW-Authenticate": 'Bearer realm="SpallocService", scope="openid, profile"'},
        )

    def check_csrf(self) -> None:
        if self.bearer:
            return  # Spring's resource-server config exempts bearer-token requests from CSRF
        token = self.request.headers.get(CSRF_HEADER)
        if self.session is None or token != self.session.csrf:
            raise _HTTPError(
                403, f"Invalid CSRF Token was found on the request parameter '_csrf' or header '{CSRF_HEADER}'."
            )

    @property
    def is_admin(self) -> bool:
        return self.user in self.double.admins

    def get_job(self, job_id: str) -> Job:
        job = self.model.jobs.get(int(job_id))
        if job is None or not (self.is_admin or job.owner == self.user):
            raise _HTTPError(404, "no such job")
        return job

    def bool_arg(self, name: str) -> bool:
        # JAX-RS boolean query parameters: Boolean.parseBoolean, so "true" in any case is true
        return (self.get_query_argument(name, "false") or "").lower() == "true"


class LoginPageHandler(_Handler):
    def get(self) -> None:
        if self.authorization()[0] == "bearer":
            self.authenticate(create_session=True)
            sess = self.session
        else:
            sess = self._get_session(True)
        assert sess is not None
        self.set_header("Content-Type", "text/html;charset=UTF-8")
        self.finish(
            "<!DOCTYPE html><html><head><title>Spalloc Login</title></head><body>"
            f'<form method="POST" action="{self.double.prefix}/system/perform_login">'
            '<input type="text" name="username" /><input type="password" name="password" />'
            f'<input type="hidden" name="_csrf" value="{html.escape(sess.csrf)}" />'
            '<input type="submit" name="submit" value="submit" /></form></body></html>'
        )


class PerformLoginHandler(_Handler):
    def post(self) -> None:
        old = self._get_session(False)
        if old is None or self.get_body_argument("_csrf", None) != old.csrf:
            raise _HTTPError(403, "Invalid CSRF Token")
        user = self.get_body_argument("username", "")
        if user and self.double.passwords.get(user) == self.get_body_argument("password", None):
            # Spring changes the session id at login (session fixation protection)
            self.double.sessions.pop(old.id, None)
            sess = _Session(id=secrets.token_hex(16).upper(), csrf=secrets.token_urlsafe(24), user=user)
            self.double.sessions[sess.id] = sess
            self.set_cookie(
                SESSION_COOKIE,
                sess.id,
                path=self.double.prefix or "/",
                httponly=True,
                secure=self.request.protocol == "https",
            )
            self.redirect(f"{self.double.prefix}/system/")
        else:
            self.send_json({"message": "Bad credentials"}, status=401)


class RootHandler(_Handler):
    def get(self) -> None:
        self.authenticate(create_session=True)
        assert self.session is not None
        here = f"{self.base()}{self.request.path.rstrip('/')}"
        major, minor, rev = self.double.version
        self.send_json(
            {
                "version": {"major-version": major, "minor-version": minor, "revision": rev},
                "jobs-ref": f"{here}/jobs",
                "machines-ref": f"{here}/machines",
                "csrf-header": CSRF_HEADER,
                "csrf-token": self.session.csrf,
            }
        )


class MachinesHandler(_Handler):
    def get(self) -> None:
        self.authenticate()
        m = self.model
        here = f"{self.base()}{self.request.path.rstrip('/')}"
        self.send_json(
            {
                "machines": [
                    {
                        "name": m.machine_name,
                        "tags": m.tags,
                        "uri": f"{here}/{quote(m.machine_name)}",
                        "width": m.width_triads,
                        "height": m.height_triads,
                        "dead-boards": [b.as_json() for b in m.dead],
                        "dead-links": [],
                    }
                ]
            }
        )


class MachineHandler(_Handler):
    def get(self, name: str) -> None:
        self.authenticate()
        m = self.model
        if name != m.machine_name:
            raise _HTTPError(404, "no such machine")
        in_use = sum(1 for b in m.boards if b.job is not None)
        self.send_json(
            {
                "name": m.machine_name,
                "tags": m.tags,
                "width": m.width_triads,
                "height": m.height_triads,
                "num-in-use": in_use,
                "dead-boards": [b.as_json() for b in m.dead],
                "dead-links": [],
                "live-boards": [b.as_json() for b in m.boards],
            }
        )


class JobsHandler(_Handler):
    async def get(self) -> None:
        self.authenticate()
        deleted = self.bool_arg("deleted")
        try:
            limit = int(self.get_query_argument("limit", str(self.double.list_limit)))
            start = int(self.get_query_argument("start", "0"))
        except ValueError:
            raise _HTTPError(400, "limit and start must be integers") from None
        if limit > 200 or limit < 1:
            raise _HTTPError(400, "limit must not be bigger than 200")
        if start < 0:
            raise _HTTPError(400, "start must not be less than 0")
        if self.bool_arg("wait"):
            await self.model.wait_list_change(self.double.wait_timeout)
        jobs = [j for j in sorted(self.model.jobs.values(), key=lambda j: -j.id) if deleted or j.state != DESTROYED]
        page = jobs[start : start + limit]
        here = f"{self.base()}{self.request.path.rstrip('/')}"
        body: dict[str, Any] = {"jobs": [f"{here}/{j.id}" for j in page]}
        links = []
        # Like the service (SpallocServiceImpl.wrapPaging): prev/next in the body and in a Link header, the request
        # URI with `start` replaced and `wait` turned off.
        if start > 0:
            body["prev"] = f"{here}?deleted={str(deleted).lower()}&start={max(start - limit, 0)}&limit={limit}"
            links.append(f'<{body["prev"]}>; rel="prev"')
        if len(page) == limit:
            body["next"] = f"{here}?deleted={str(deleted).lower()}&start={start + limit}&limit={limit}"
            links.append(f'<{body["next"]}>; rel="next"')
        if links:
            self.set_header("Link", ", ".join(links))
        self.send_json(body)

    async def post(self) -> None:
        self.authenticate()
        self.check_csrf()
        ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _HTTPError(415, "HTTP 415 Unsupported Media Type")
        try:
            req = json.loads(self.request.body or b"null")
        except ValueError as e:
            raise _HTTPError(400, f"malformed JSON: {e}") from None
        if not isinstance(req, dict):
            raise _HTTPError(400, "request must be supplied")
        job = self._create(req)
        gate = self.double._create_gate
        if gate is not None:  # test knob: the job exists, its creator has no answer yet (a crash window)
            await gate.wait()
        url = self.job_url(job)
        self.set_header("Location", url)
        self.send_json({"job-id": job.id, "job-ref": url}, status=201)

    def _create(self, req: dict) -> Job:
        unknown = sorted(set(req) - _CREATE_FIELDS)
        if unknown:
            raise _HTTPError(400, f'Unrecognized field "{unknown[0]}"')
        d = self.double
        ka = req.get("keepalive-interval")
        if ka is None:
            raise _HTTPError(400, "keepalive-interval is required")
        try:
            interval = parse_iso_duration(ka)
        except ValueError as e:
            raise _HTTPError(400, str(e)) from None
        if not d.keepalive_min <= interval <= d.keepalive_max:
            raise _HTTPError(400, f"keepalive-interval must be {d.keepalive_min:g} to {d.keepalive_max:g} seconds")
        machine_name, tags = req.get("machine-name"), req.get("tags")
        if (machine_name is None) == (tags is None):
            raise _HTTPError(400, "either machine-name or tags must be supplied")
        if machine_name is not None and (not isinstance(machine_name, str) or not machine_name.strip()):
            raise _HTTPError(400, "machine-name, if given, must be non-blank")
        if tags is not None and (
            not isinstance(tags, list) or any(not isinstance(t, str) or not t.strip() for t in tags)
        ):
            raise _HTTPError(400, "tags must not be blank")
        num, dims, board = req.get("num-boards"), req.get("dimensions"), req.get("board")
        if num is not None and (dims is not None or board is not None):
            raise _HTTPError(400, "only at most one of num-boards, dimensions and board should be given")
        mdb = req.get("max-dead-boards")
        if mdb is not None and (not isinstance(mdb, int) or mdb < 0):
            raise _HTTPError(400, "max-dead-boards may not be negative")
        nmpi_job = req.get("nmpi-job-id")
        if nmpi_job is not None and not isinstance(nmpi_job, int):
            raise _HTTPError(400, "nmpi-job-id must be an integer")
        m = self.model
        if machine_name is not None and machine_name != m.machine_name:
            raise _HTTPError(400, "out of quota")  # the real service's answer when no job could be made
        if tags is not None and not set(tags) <= set(m.tags):
            raise _HTTPError(400, "out of quota")
        if num is not None:
            if not isinstance(num, int) or isinstance(num, bool) or num < 1:
                raise _HTTPError(400, "number of boards must be at least 1 if given")
            want: tuple = ("boards", num)
        elif dims is not None:
            if (
                not isinstance(dims, dict)
                or set(dims) - {"width", "height"}
                or not all(isinstance(dims.get(k), int) and dims[k] >= 1 for k in ("width", "height"))
            ):
                raise _HTTPError(400, "dimensions must give a positive width and height (in triads)")
            want = ("dims", dims["width"], dims["height"])
        elif board is not None:
            keys = {"x", "y", "z", "cabinet", "frame", "board", "address"}
            if not isinstance(board, dict) or set(board) - keys:
                raise _HTTPError(400, "at least one way of identifying a board must be given")
            complete = (
                all(board.get(k) is not None for k in "xyz")
                or all(board.get(k) is not None for k in ("cabinet", "frame", "board"))
                or board.get("address") is not None
            )
            if not complete:
                raise _HTTPError(400, "at least one way of identifying a board must be given")
            b = m.find_board(board)
            if b is None:
                raise _HTTPError(400, "out of quota")
            want = ("board", b.index)
        else:
            want = ("boards", 1)
        owner = self.user
        if self.is_admin and isinstance(req.get("owner"), str) and req["owner"].strip():
            owner = req["owner"].strip()
        assert owner is not None
        group = req.get("group")
        collab = req.get("nmpi-collab")
        job = m.create(
            owner=owner,
            created_by=self.user or owner,
            group=group.strip() if isinstance(group, str) else None,
            collab=collab.strip() if isinstance(collab, str) else None,
            nmpi_job_id=nmpi_job,
            request=dict(req),
            keepalive_interval=interval,
            want=want,
        )
        log.info("job %d created for %s (%s), %s", job.id, owner, self.user, job.state)
        return job


class JobHandler(_Handler):
    async def get(self, job_id: str) -> None:
        self.authenticate()
        job = self.get_job(job_id)
        if self.bool_arg("wait"):
            await self.model.wait_change(job, self.double.wait_timeout)
        self.send_json(self.state_json(job))

    def delete(self, job_id: str) -> None:
        self.authenticate()
        self.check_csrf()
        job = self.get_job(job_id)
        reason = self.get_query_argument("reason", "")
        self.model.destroy(job, reason)
        self.set_status(204)
        self.finish()

    def state_json(self, job: Job) -> dict:
        url = self.job_url(job)
        out: dict[str, Any] = {"state": job.state, "start-time": _iso(job.start_wall)}
        if self.is_admin or job.owner == self.user:
            out["owner"] = job.owner
        if job.reason is not None:
            out["reason"] = job.reason
        if job.finish_wall is not None:
            out["finish-time"] = _iso(job.finish_wall)
        if job.state != DESTROYED:
            if job.keepalive_host is not None:
                out["keepalive-host"] = job.keepalive_host
            out["keep-alive-time"] = _iso(job.keepalive_wall)
        out.update(
            {
                "keepalive-ref": f"{url}/keepalive",
                "machine-ref": f"{url}/machine",
                "chip-ref": f"{url}/chip",
                "power-ref": f"{url}/machine/power",
            }
        )
        if job.state in (POWER, READY):
            out["proxy-ref"] = f"wss://{self.request.host}{self.double.prefix}/proxy/{job.id}"
        out["original-request"] = job.request
        return out


class KeepaliveHandler(_Handler):
    def put(self, job_id: str) -> None:
        self.authenticate()
        self.check_csrf()
        job = self.get_job(job_id)
        ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "text/plain":
            raise _HTTPError(415, "HTTP 415 Unsupported Media Type")
        self.model.keepalive(job, self.request.remote_ip)
        self.set_header("Content-Type", "text/plain")
        self.finish("ok")


class JobMachineHandler(_Handler):
    def get(self, job_id: str) -> None:
        self.authenticate()
        job = self.get_job(job_id)
        self.model.keepalive(job, self.request.remote_ip)  # the real service counts this as an access
        if not job.boards:
            self.set_status(204)
            self.finish()
            return
        url = self.job_url(job)
        body = self.model.machine_of(job)
        body["power"] = f"{url}/machine/power"
        body["machine-ref"] = f"{self.srv()}machines/{quote(self.model.machine_name)}"
        self.send_json(body)


class JobPowerHandler(_Handler):
    def get(self, job_id: str) -> None:
        self.authenticate()
        job = self.get_job(job_id)
        if not job.boards:
            self.set_status(204)
            self.finish()
            return
        self.send_json({"power": "ON" if job.state == READY else "OFF"})


class NotFoundHandler(_Handler):
    def prepare(self) -> None:
        raise _HTTPError(404, "not found")


def _make_certificate(directory: str) -> tuple[str, str, str]:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost: (ca_file, cert_file, key_file)."""
    ca_file = os.path.join(directory, "ca.pem")
    cert_file = os.path.join(directory, "server.pem")
    key_file = os.path.join(directory, "server-key.pem")
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if not openssl:
            raise RuntimeError("--tls needs the Python package 'cryptography' or the 'openssl' command") from None
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                key_file,
                "-out",
                cert_file,
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ],
            check=True,
            capture_output=True,
        )
        shutil.copyfile(cert_file, ca_file)
        return ca_file, cert_file, key_file

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spalloc double test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    with open(ca_file, "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return ca_file, cert_file, key_file


class SpallocDouble(ThreadedHTTPDouble):
    """The spalloc service double. ``start()`` serves it from a background thread; use as a context manager.

    :param boards: number of 48-chip boards in the one machine (IP addresses from ``first_ip`` in steps of 8).
    :param tokens: accepted bearer tokens -> user names.
    :param admins: users whose ``owner`` field is honoured and who see every job.
    :param passwords: local users for the login form (user -> password).
    :param keepalive_min, keepalive_max: accepted ``keepalive-interval`` range in seconds (real: 30-300). A minimum
        below 30 s needs ``testing=True``.
    :param wait_timeout: longest hold of a ``?wait=true`` request (real: 30 s).
    :param power_delay: seconds a job spends in ``POWER`` before ``READY`` (0: straight to ``READY``).
    :param tls: serve HTTPS with a throw-away CA (``ca_file``) unless ``certfile``/``keyfile`` are given.
    :param prefix: the service's context path (real: ``/spalloc``).
    :param list_limit: page size of ``GET jobs`` when the request gives no ``limit`` (small values make clients
        follow ``next``).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        boards: int = 1,
        tokens: Mapping[str, str] | None = None,
        admins: Sequence[str] = (),
        passwords: Mapping[str, str] | None = None,
        machine_name: str = "spinnaker-double",
        tags: Sequence[str] = ("default",),
        keepalive_min: float = REAL_KEEPALIVE_MIN,
        keepalive_max: float = REAL_KEEPALIVE_MAX,
        wait_timeout: float = REAL_WAIT_TIMEOUT,
        power_delay: float = 0.5,
        tick: float = 0.05,
        tls: bool = False,
        certfile: str | None = None,
        keyfile: str | None = None,
        testing: bool = False,
        prefix: str = "/spalloc",
        version: tuple[int, int, int] = SERVICE_VERSION,
        first_ip: str = "10.11.192.1",
        list_limit: int = 100,
    ) -> None:
        if boards < 1:
            raise ValueError("boards must be at least 1")
        if keepalive_min < REAL_KEEPALIVE_MIN and not testing:
            raise ValueError(
                f"keepalive_min below {REAL_KEEPALIVE_MIN:g} s is a test-only setting: pass testing=True (--testing)"
            )
        if keepalive_min <= 0 or keepalive_max < keepalive_min:
            raise ValueError("need 0 < keepalive_min <= keepalive_max")
        self.host = host
        self.port = port
        self.tokens: dict[str, str] = dict(tokens or {})
        self.admins = set(admins)
        self.passwords = dict(passwords or {})
        self.keepalive_min = keepalive_min
        self.keepalive_max = keepalive_max
        self.wait_timeout = wait_timeout
        self.tick_interval = tick
        self.list_limit = list_limit
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.version = version
        self.clock = _Clock()
        self.model = SpallocModel(
            boards=boards,
            machine_name=machine_name,
            tags=tags,
            power_delay=power_delay,
            clock=self.clock,
            first_ip=first_ip,
        )
        self.sessions: dict[str, _Session] = {}
        self.requests: list[dict] = []
        self.tls = tls or bool(certfile)
        self.certfile, self.keyfile = certfile, keyfile
        self.ca_file: str | None = certfile
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._ticker: asyncio.Task | None = None
        self._create_gate: asyncio.Event | None = None

    # -- addresses ----------------------------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        """The service URL, as spinnman's ``[Machine] spalloc_server`` takes it (``.../spalloc/``)."""
        return f"{self.scheme}://{self.host}:{self.port}{self.prefix}/"

    @property
    def srv_url(self) -> str:
        """The REST API root (``.../spalloc/srv/spalloc/``)."""
        return f"{self.url}srv/spalloc/"

    # -- serving ------------------------------------------------------------------------------------------------
    def make_app(self) -> tornado.web.Application:
        p = re.escape(self.prefix)
        srv = p + r"/srv/spalloc"
        kw = {"double": self}
        return tornado.web.Application(
            [
                (p + r"/system/login\.html", LoginPageHandler, kw),
                (p + r"/system/perform_login", PerformLoginHandler, kw),
                (srv + r"/?", RootHandler, kw),
                (srv + r"/machines/?", MachinesHandler, kw),
                (srv + r"/machines/([^/]+)/?", MachineHandler, kw),
                (srv + r"/jobs/?", JobsHandler, kw),
                (srv + r"/jobs/([0-9]+)/?", JobHandler, kw),
                (srv + r"/jobs/([0-9]+)/keepalive/?", KeepaliveHandler, kw),
                (srv + r"/jobs/([0-9]+)/machine/?", JobMachineHandler, kw),
                (srv + r"/jobs/([0-9]+)/machine/power/?", JobPowerHandler, kw),
                (r".*", NotFoundHandler, kw),
            ],
            xsrf_cookies=False,
            compress_response=False,
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        if not self.certfile:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="spalloc-double-")
            self.ca_file, self.certfile, self.keyfile = _make_certificate(self._tmpdir.name)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.certfile, self.keyfile)
        return ctx

    async def serve(self) -> None:
        """Start listening on the running event loop (binds now; ``port`` is filled in when it was 0)."""
        self.listen(ssl_options=self._ssl_context(), xheaders=True, idle_connection_timeout=120)
        self._ticker = asyncio.ensure_future(self._tick_loop())
        log.info("spalloc double serving %s", self.url)

    async def shutdown(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.stop()
            for job in self.model.jobs.values():  # release long-polls
                job.event.set()
            if self._create_gate is not None:
                self._create_gate.set()
            self.model.list_event.set()
            await self._server.close_all_connections()

    async def _tick_loop(self) -> None:
        while True:
            try:
                self.model.tick()
            except Exception:  # noqa: BLE001 - keep ticking; a test will see the log
                log.exception("spalloc double: tick failed")
            await asyncio.sleep(self.tick_interval)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    # -- test controls (thread-safe: they run on the server's loop) -------------------------------------------
    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn()`` on the server's event loop and return its result."""
        assert self._loop is not None, "not started"

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def advance_clock(self, seconds: float) -> None:
        """Move the double's clock forward (keepalive expiry, power-up) and process what falls due."""

        def go() -> None:
            self.clock.offset += seconds
            self.model.tick()

        self.call(go)

    def jobs(self) -> list[dict]:
        """Snapshots of every job, oldest first."""
        return self.call(lambda: [j.snapshot(self.model) for j in sorted(self.model.jobs.values(), key=lambda j: j.id)])

    def job(self, job_id: int) -> dict:
        return self.call(lambda: self.model.jobs[job_id].snapshot(self.model))

    def destroy_job(self, job_id: int, reason: str = "destroyed by operator") -> None:
        self.call(lambda: self.model.destroy(self.model.jobs[job_id], reason))

    def hold_create_answers(self) -> None:
        """From now on create jobs but hold the answers to ``POST jobs`` until ``release_create_answers()``: the
        window in which a client has asked for a job, the service has made it, and the client does not know it."""

        def go() -> None:
            self._create_gate = asyncio.Event()

        self.call(go)

    def release_create_answers(self) -> None:
        def go() -> None:
            gate, self._create_gate = self._create_gate, None
            if gate is not None:
                gate.set()

        self.call(go)

    def drop_sessions(self) -> None:
        """Forget every session, as after a server restart or session timeout."""
        self.call(self.sessions.clear)

    def set_token(self, token: str, user: str | None) -> None:
        """Accept ``token`` for ``user`` (``None``: revoke it)."""

        def go() -> None:
            if user is None:
                self.tokens.pop(token, None)
            else:
                self.tokens[token] = user

        self.call(go)

    def request_log(self) -> list[dict]:
        return self.call(lambda: list(self.requests))

    def wait_for(
        self,
        predicate: Callable[[SpallocDouble], T],
        timeout: float = 10.0,
        interval: float = 0.02,
        what: str = "condition",
    ) -> T:
        """Poll ``predicate(self)`` until it returns something truthy; raise ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"spalloc double: {what} not reached within {timeout:g} s")
            time.sleep(interval)

    def _log_request(self, h: _Handler) -> None:
        self.requests.append(
            {
                "method": h.request.method,
                "path": h.request.path,
                "query": h.request.query,
                "status": h.get_status(),
                "user": h.user,
                "bearer": h.bearer,
                "content_type": h.request.headers.get("Content-Type"),
                "csrf": h.request.headers.get(CSRF_HEADER) is not None,
            }
        )
        del self.requests[:-2000]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Test double of the SpiNNaker allocation service (spalloc) HTTP API.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: pick a free port (printed on the first line)")
    ap.add_argument("--boards", type=int, default=1, help="boards in the machine")
    ap.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN=USER",
        help="accept this bearer token for this user (repeatable)",
    )
    ap.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="USER",
        help="user whose 'owner' field is honoured and who sees all jobs (repeatable)",
    )
    ap.add_argument(
        "--password",
        action="append",
        default=[],
        metavar="USER=PASSWORD",
        help="local user for the login form (repeatable)",
    )
    ap.add_argument("--machine-name", default="spinnaker-double")
    ap.add_argument("--tag", action="append", default=None, help="machine tag (default: 'default')")
    ap.add_argument("--keepalive-min", type=float, default=REAL_KEEPALIVE_MIN)
    ap.add_argument("--keepalive-max", type=float, default=REAL_KEEPALIVE_MAX)
    ap.add_argument("--wait-timeout", type=float, default=REAL_WAIT_TIMEOUT, help="longest ?wait=true hold")
    ap.add_argument("--power-delay", type=float, default=0.5, help="seconds in POWER before READY")
    ap.add_argument("--testing", action="store_true", help="allow test-only settings (keepalive-min < 30 s)")
    ap.add_argument("--tls", action="store_true", help="serve HTTPS with a throw-away CA (path printed)")
    ap.add_argument("--certfile")
    ap.add_argument("--keyfile")
    ap.add_argument("--prefix", default="/spalloc")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )

    def pairs(items: list[str], what: str) -> dict[str, str]:
        out = {}
        for item in items:
            k, sep, v = item.partition("=")
            if not sep or not k or not v:
                ap.error(f"{what} must look like KEY=VALUE, got {item!r}")
            out[k] = v
        return out

    try:
        double = SpallocDouble(
            host=args.host,
            port=args.port,
            boards=args.boards,
            tokens=pairs(args.token, "--token"),
            admins=args.admin,
            passwords=pairs(args.password, "--password"),
            machine_name=args.machine_name,
            tags=args.tag or ["default"],
            keepalive_min=args.keepalive_min,
            keepalive_max=args.keepalive_max,
            wait_timeout=args.wait_timeout,
            power_delay=args.power_delay,
            tls=args.tls,
            certfile=args.certfile,
            keyfile=args.keyfile,
            testing=args.testing,
            prefix=args.prefix,
        )
    except ValueError as e:
        ap.error(str(e))

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await double.serve()
        print(double.url, flush=True)  # first line: the service URL (a parent process can read it)
        if double.tls and double.ca_file:
            print(f"CA certificate: {double.ca_file}", flush=True)
        await stop.wait()
        await double.shutdown()

    try:
        asyncio.run(run())
    finally:
        if double._tmpdir is not None:
            double._tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
