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
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import http.cookies
import inspect
import json
import logging
import math
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence, Union
from urllib.parse import urlencode, urlsplit, urlunsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.iostream import StreamClosedError
from traitlets import Any as AnyTrait
from traitlets import Bool, Float, Int, List, Unicode, validate
from traitlets.config import LoggingConfigurable

from .spynnaker_cfg import CfgError, spalloc_server
from .words import duration as duration_words

__all__ = [
    "Allocation", "ClaimProgress", "JobState", "JobStatus", "MachineInfo", "ServiceInfo", "SpallocAllocator",
    "SpallocAuthError", "SpallocClient", "SpallocError", "SpallocJob", "SpallocJobDestroyedError",
    "SpallocProtocolError", "SpallocRequestError", "SpallocTimeoutError", "SpallocUnreachableError",
    "TokenSource", "parse_instant",
]

log = logging.getLogger(__name__)

#: A bearer token, or something that returns one (sync or async): called again whenever a session is renewed,
#: so an expiring access token can be refreshed.
TokenSource = Union[str, Callable[[], Union[str, None, Awaitable[Optional[str]]]], None]
#: ``progress(ClaimProgress)``; may be a coroutine function.
ProgressCallback = Callable[["ClaimProgress"], Any]
#: ``on_lost(reason)``: the service ended a job the hub was keeping alive; may be a coroutine function.
LostCallback = Callable[[str], Any]

SESSION_COOKIE = "JSESSIONID"
#: Where operators set things; used in error messages so they say which setting to change.
SETTINGS = "spinnaker.spalloc"
#: The real service accepts keepalive intervals in this range (seconds).
KEEPALIVE_RANGE = (30.0, 300.0)
_RETRY_STATUSES = {500, 502, 503, 504}


# --------------------------------------------------------------------------------------------------- errors
class SpallocError(Exception):
    """Anything that went wrong talking to the allocation service; the message says what to do about it."""


class SpallocUnreachableError(SpallocError):
    """The service could not be reached (DNS, connection refused, timeouts, TLS trust)."""


class SpallocAuthError(SpallocError):
    """The service refused the credentials (no token, bad or expired token, forbidden)."""


class SpallocRequestError(SpallocError):
    """The service answered a request with an error status."""

    def __init__(self, message: str, status: int, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class SpallocProtocolError(SpallocError):
    """The server did not answer like a spalloc service (wrong URL?)."""


class SpallocJobDestroyedError(SpallocError):
    """The job was destroyed (by the service, an operator, a keepalive expiry, or a release)."""

    def __init__(self, message: str, job_url: str, reason: Optional[str]) -> None:
        super().__init__(message)
        self.job_url = job_url
        self.reason = reason


class SpallocTimeoutError(SpallocError):
    """A claim did not get its boards in time."""


# --------------------------------------------------------------------------------------------------- values
class JobState(str, enum.Enum):
    """A spalloc job's state, as the service names it."""

    UNKNOWN = "UNKNOWN"
    QUEUED = "QUEUED"
    POWER = "POWER"
    READY = "READY"
    DESTROYED = "DESTROYED"

    @classmethod
    def parse(cls, value: Any) -> "JobState":
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
    owner: Optional[str] = None
    reason: Optional[str] = None
    keepalive_host: Optional[str] = None
    keepalive_url: Optional[str] = None
    machine_url: Optional[str] = None
    keepalive_interval: Optional[float] = None
    #: When the service created the job / last had a keepalive (Unix time, the service's clock), if it says.
    start_time: Optional[float] = None
    keepalive_time: Optional[float] = None
    #: The create request as the service recorded it (``original-request``), if it says.
    original_request: Mapping[str, Any] = field(default_factory=dict, repr=False)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, url: str, obj: Mapping[str, Any]) -> "JobStatus":
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
        return cls(url=url, state=JobState.parse(obj.get("state")), owner=obj.get("owner"),
                   reason=obj.get("reason"), keepalive_host=obj.get("keepalive-host"),
                   keepalive_url=obj.get("keepalive-ref"), machine_url=obj.get("machine-ref"),
                   keepalive_interval=interval, start_time=parse_instant(obj.get("start-time")),
                   keepalive_time=parse_instant(obj.get("keep-alive-time")), original_request=dict(orig),
                   raw=dict(obj))


@dataclass(frozen=True)
class MachineInfo:
    """The boards of an allocation (``GET jobs/{id}/machine``). Chip coordinates are relative to the allocation."""

    width: int
    height: int
    connections: Mapping[tuple[int, int], str]
    boards: Sequence[Sequence[int]] = ()
    depth: int = 1
    machine_name: Optional[str] = None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "MachineInfo":
        try:
            conns = {(int(xy[0]), int(xy[1])): str(host) for xy, host in obj["connections"]}
            return cls(width=int(obj["width"]), height=int(obj["height"]), connections=conns,
                       boards=[list(b) if isinstance(b, (list, tuple)) else b for b in obj.get("boards", [])],
                       depth=int(obj.get("depth", 1)), machine_name=obj.get("machine-name"))
        except (KeyError, TypeError, ValueError) as e:
            raise SpallocProtocolError(f"The allocation service described a job's machine in an unexpected "
                                       f"form ({e!r}): {json.dumps(obj)[:300]}") from e

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
    job_id: Optional[int]
    elapsed: float
    machine: Optional[MachineInfo] = None


# --------------------------------------------------------------------------------------------------- helpers
def parse_iso_duration(text: str) -> float:
    """Seconds in a simple ISO-8601 duration (``PT120S``, ``PT2M``, ``PT1M30.5S``, ``P1DT2H``)."""
    m = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:[.,]\d+)?)S)?)?", text.strip().upper())
    if not m or not any(m.groups()):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    d, h, mi, s = m.groups()
    return (int(d or 0) * 86400 + int(h or 0) * 3600 + int(mi or 0) * 60
            + float((s or "0").replace(",", ".")))


def parse_instant(value: Any) -> Optional[float]:
    """Unix time of an instant as the service writes it (ISO-8601 ``2026-12-02T04:58:00.123Z``, or epoch seconds,
    Jackson's default); ``None`` when absent or unreadable."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    m = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(?:[.,](\d+))?(.*)", text)
    frac = 0.0
    if m:  # Python before 3.11 reads at most 6 fraction digits; Java writes up to 9
        text, frac = m.group(1) + m.group(3), float("0." + m.group(2)) if m.group(2) else 0.0
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp() + frac


def format_iso_duration(seconds: float) -> str:
    """``PT60S``; fractions are kept (``PT0.5S``), as ``java.time.Duration.parse`` accepts them."""
    if seconds <= 0:
        raise ValueError("a keepalive interval must be positive")
    return f"PT{int(seconds)}S" if float(seconds).is_integer() else f"PT{seconds:.3f}".rstrip("0") + "S"


def normalize_service_url(url: str) -> str:
    """The service URL as spinnman's ``spalloc_server`` takes it: ``https://host/spalloc/`` (one rule for both)."""
    try:
        return spalloc_server(url)
    except CfgError as e:
        raise SpallocError(str(e)) from None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _job_id(url: str) -> Optional[int]:
    last = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    return int(last) if last.isdigit() else None


async def _call_maybe_async(fn: Optional[Callable[..., Any]], *args: Any) -> None:
    """Call a user callback; log (never raise) what it throws."""
    if fn is None:
        return
    try:
        result = fn(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:  # noqa: BLE001 - a broken callback must not break a claim
        log.exception("spalloc: callback %r failed", fn)


# --------------------------------------------------------------------------------------------------- client
class SpallocClient:
    """A session with one allocation service for one credential (bearer token).

    :param url: the service URL (``https://host/spalloc/``), as sPyNNaker's ``spalloc_server``.
    :param token: bearer token, or a (sync or async) callable returning one; called at each session renewal.
    :param request_timeout: seconds for one ordinary request.
    :param connect_timeout: seconds to connect.
    :param long_poll_timeout: seconds to hold a ``?wait=true`` request (the service answers within ~30 s).
    :param retries: extra attempts for requests that fail transiently (connection errors, 5xx, timeouts);
        a job creation is retried only when it certainly did not reach the service.
    :param retry_delay: first pause between attempts; doubles each time.
    :param ca_certs: CA bundle to trust for an https service with a private CA.
    :param validate_cert: verify the service's TLS certificate (leave on outside tests).
    :param http_client: a tornado ``AsyncHTTPClient`` to share; by default the client makes (and closes) its own.
    """

    def __init__(self, url: str, token: TokenSource = None, *, request_timeout: float = 30.0,
                 connect_timeout: float = 10.0, long_poll_timeout: float = 45.0, retries: int = 3,
                 retry_delay: float = 1.0, ca_certs: Optional[str] = None, validate_cert: bool = True,
                 http_client: Optional[AsyncHTTPClient] = None,
                 logger: Optional[Union[logging.Logger, logging.LoggerAdapter[Any]]] = None) -> None:
        self.service_url = normalize_service_url(url)
        self.srv_url = self.service_url + "srv/spalloc/"
        self._token_source = token
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.long_poll_timeout = long_poll_timeout
        self.retries = max(0, retries)
        self.retry_delay = retry_delay
        self.ca_certs = ca_certs
        self.validate_cert = validate_cert
        self.log = logger or log
        self._http = http_client
        self._own_http = http_client is None
        self._token: Optional[str] = None
        self._cookie: Optional[str] = None
        self._csrf: Optional[tuple[str, str]] = None
        self._service: Optional[ServiceInfo] = None
        self._login_lock = asyncio.Lock()
        self._login_count = 0

    # -- public ---------------------------------------------------------------------------------------------
    @property
    def service(self) -> Optional[ServiceInfo]:
        """What the service said at the last login (``None`` before ``connect()``)."""
        return self._service

    async def connect(self) -> ServiceInfo:
        """Open a session (no-op when one is open) and return the service description."""
        if self._service is None:
            await self._login(self._login_count)
        assert self._service is not None
        return self._service

    async def list_machines(self) -> list[dict[str, Any]]:
        """The machines the service manages (``name``, ``tags``, ``width``, ``height`` in triads...)."""
        service = await self.connect()
        obj = await self._json("GET", service.machines_url, what="list the SpiNNaker machines")
        return list(obj.get("machines", []))

    async def create_job(self, *, owner: Optional[str] = None, n_boards: Optional[int] = 1,
                         dimensions: Optional[tuple[int, int]] = None, board: Optional[Mapping[str, Any]] = None,
                         group: Optional[str] = None, collab: Optional[str] = None,
                         nmpi_job_id: Optional[int] = None, machine_name: Optional[str] = None,
                         tags: Optional[Sequence[str]] = None, keepalive_interval: float = 60.0,
                         max_dead_boards: Optional[int] = None) -> "SpallocJob":
        """Ask for boards; returns the (usually queued) job. Start its keepalive at once.

        Give one of ``n_boards``, ``dimensions`` (width, height in triads) or ``board`` (``{"address": ip}``,
        ``{"x", "y", "z"}`` or ``{"cabinet", "frame", "board"}``). ``machine_name`` wins over ``tags``
        (default ``["default"]``). ``owner`` is honoured only for admin credentials: otherwise the job belongs to
        the token's user.
        """
        service = await self.connect()
        body: dict[str, Any] = {"keepalive-interval": format_iso_duration(keepalive_interval)}
        if owner:
            body["owner"] = owner
        if group:
            body["group"] = group
        if collab:
            body["nmpi-collab"] = collab
        if nmpi_job_id is not None:
            body["nmpi-job-id"] = int(nmpi_job_id)
        if dimensions is not None:
            body["dimensions"] = {"width": int(dimensions[0]), "height": int(dimensions[1])}
            if board is not None:
                body["board"] = dict(board)
        elif board is not None:
            body["board"] = dict(board)
        else:
            body["num-boards"] = int(n_boards or 1)
        if machine_name:
            body["machine-name"] = machine_name
        else:
            body["tags"] = list(tags) if tags else ["default"]
        if max_dead_boards is not None:
            body["max-dead-boards"] = int(max_dead_boards)
        what = f"create a job for {_plural(int(n_boards or 1), 'board')}" if "num-boards" in body else \
            "create a job"
        resp = await self._request("POST", service.jobs_url, body=json.dumps(body).encode(),
                                   content_type="application/json", idempotent=False, what=what)
        location = resp.headers.get("Location")
        if not location:
            try:
                location = json.loads(resp.body or b"{}").get("job-ref")
            except ValueError:
                location = None
        if not location:
            raise SpallocProtocolError(f"The allocation service created a job but did not say where it is "
                                       f"(no Location header; HTTP {resp.code}).")
        job = SpallocJob(self, self._follow(location), keepalive_interval=keepalive_interval)
        self.log.info("spalloc: created %s for %s (%s)", job.url, owner or "(token user)", body)
        return job

    async def list_jobs(self, *, deleted: bool = False, limit: Optional[int] = None,
                        max_pages: int = 1000) -> list[str]:
        """Every job the service lists (``GET jobs``, following its ``next`` pages), as job URLs, newest first.

        The service lists every live job (with ``deleted``: ended ones too) to anyone logged in; reading a job's
        state is what needs its owner's (or an admin's) credentials.
        """
        service = await self.connect()
        params = {"deleted": "true" if deleted else "false"}
        if limit is not None:
            params["limit"] = str(int(limit))
        url: Optional[str] = f"{service.jobs_url}?{urlencode(params)}"
        out: list[str] = []
        listed: set[str] = set()
        seen: set[str] = set()
        for _ in range(max_pages):
            if url is None or url in seen:
                break
            seen.add(url)
            obj = await self._json("GET", url, what="list the jobs")
            if not isinstance(obj, Mapping) or not isinstance(obj.get("jobs", []), list):
                raise SpallocProtocolError(f"Unexpected job list from {service.jobs_url}: {str(obj)[:200]}")
            page = [self._follow(str(u)).rstrip("/") for u in obj.get("jobs") or []]
            out += [u for u in page if u not in listed]  # (a job that moved pages while reading: once)
            listed.update(page)
            nxt = obj.get("next")
            url = self._follow(str(nxt)) if nxt and page else None
        return out

    def job(self, job_url: str, *, keepalive_interval: Optional[float] = None) -> "SpallocJob":
        """A handle on an existing job (e.g. a URL persisted before a hub restart).

        The URL must belong to this service: the session's credentials are never sent elsewhere.
        """
        self._check_ours(job_url)
        return SpallocJob(self, job_url.rstrip("/"), keepalive_interval=keepalive_interval)

    async def close(self) -> None:
        """Forget the session; close the HTTP client if this client made it."""
        self._cookie = self._csrf = self._service = None
        if self._own_http and self._http is not None:
            self._http.close()
            self._http = None

    async def __aenter__(self) -> "SpallocClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- session ----------------------------------------------------------------------------------------------
    async def _get_token(self) -> Optional[str]:
        src = self._token_source
        if src is None or isinstance(src, str):
            return src or None
        value = src()
        if inspect.isawaitable(value):
            value = await value
        return value or None

    async def _login(self, seen_count: int) -> None:
        """(Re)open the session unless another task already did since ``seen_count``."""
        async with self._login_lock:
            if self._login_count != seen_count and self._service is not None:
                return
            self._cookie = self._csrf = None
            self._token = await self._get_token()
            if not self._token:
                raise SpallocAuthError(
                    f"No access token for the SpiNNaker allocation service at {self.service_url}: set "
                    f"`{SETTINGS}.token` (or log in with an account whose token the service accepts).")
            # Step 1: bearer token -> session cookie (what spinnman's Session.renew does).
            resp = await self._fetch_retrying("GET", self.service_url + "system/login.html",
                                              headers={"Authorization": f"Bearer {self._token}"},
                                              idempotent=True, what="log in")
            if resp.code in (401, 403):
                raise self._auth_error(resp, "log in")
            if resp.code == 200:
                self._cookie = self._session_cookie(resp)
            # (No login page or no cookie: carry on with the bearer token on every request.)
            # Step 2: the service description and the session's CSRF token.
            headers = self._headers("GET")
            resp = await self._fetch_retrying("GET", self.srv_url, headers=headers, idempotent=True,
                                              what="read the service description")
            if resp.code in (401, 403):
                raise self._auth_error(resp, "read the service description")
            if resp.code != 200:
                raise self._protocol_error(resp, self.srv_url)
            try:
                obj = json.loads(resp.body)
                v = obj["version"]
                version = f"{v['major-version']}.{v['minor-version']}.{v['revision']}"
                jobs_url, machines_url = obj["jobs-ref"], obj["machines-ref"]
            except (ValueError, KeyError, TypeError) as e:
                raise self._protocol_error(resp, self.srv_url, detail=f"missing {e}") from e
            if obj.get("csrf-header") and obj.get("csrf-token"):
                self._csrf = (str(obj["csrf-header"]), str(obj["csrf-token"]))
            self._service = ServiceInfo(service_url=self.service_url, version=version,
                                        jobs_url=self._follow(jobs_url), machines_url=self._follow(machines_url))
            self._login_count += 1
            self.log.debug("spalloc: session open with %s (version %s, cookie %s)", self.service_url, version,
                           "yes" if self._cookie else "no")

    @staticmethod
    def _session_cookie(resp: HTTPResponse) -> Optional[str]:
        for header in resp.headers.get_list("Set-Cookie"):
            jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
            try:
                jar.load(header)
            except http.cookies.CookieError:
                continue
            if SESSION_COOKIE in jar:
                return jar[SESSION_COOKIE].value
        return None

    def _headers(self, method: str) -> dict[str, str]:
        headers = {"Accept": "application/json, text/plain, */*"}
        if self._cookie:
            headers["Cookie"] = f"{SESSION_COOKIE}={self._cookie}"
        if method != "GET" or not self._cookie:
            headers["Authorization"] = f"Bearer {self._token}"
        if method != "GET" and self._csrf:
            headers[self._csrf[0]] = self._csrf[1]
        return headers

    def _follow(self, url: str) -> str:
        """A reference from the service, upgraded to https when the service is https (as spinnman does)."""
        parts = urlsplit(url)
        if urlsplit(self.service_url).scheme == "https" and parts.scheme == "http":
            parts = parts._replace(scheme="https")
        return urlunsplit(parts)

    def _check_ours(self, url: str) -> None:
        ours, theirs = urlsplit(self.srv_url), urlsplit(url)
        if (theirs.scheme not in ("http", "https") or theirs.netloc != ours.netloc
                or not theirs.path.startswith(ours.path + "jobs/")):
            raise SpallocError(f"Refusing to use the job URL {url!r}: it is not a job of the configured "
                               f"allocation service {self.service_url} (setting `{SETTINGS}.url` changed?).")

    # -- requests ---------------------------------------------------------------------------------------------
    async def _json(self, method: str, url: str, *, what: str, **kw: Any) -> Any:
        resp = await self._request(method, url, what=what, **kw)
        try:
            return json.loads(resp.body or b"null")
        except ValueError as e:
            raise self._protocol_error(resp, url, detail="the answer is not JSON") from e

    async def _request(self, method: str, url: str, *, params: Optional[Mapping[str, str]] = None,
                       body: Optional[bytes] = None, content_type: Optional[str] = None, idempotent: bool = True,
                       timeout: Optional[float] = None, what: str, ok: Sequence[int] = (200, 201, 202, 204),
                       retries: Optional[int] = None) -> HTTPResponse:
        """One API request in the session: renews the session once on 401/403, raises ``SpallocError`` else."""
        await self.connect()
        if params:
            url = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
        for renewal in (False, True):
            count = self._login_count
            headers = self._headers(method)
            if content_type:
                headers["Content-Type"] = content_type
            resp = await self._fetch_retrying(method, url, headers=headers, body=body, idempotent=idempotent,
                                              timeout=timeout, what=what, retries=retries)
            if resp.code in ok:
                return resp
            if resp.code in (401, 403) or (300 <= resp.code < 400 and "login" in resp.headers.get("Location", "")):
                if not renewal:
                    self.log.info("spalloc: HTTP %s from %s; renewing the session", resp.code, url)
                    await self._login(count)
                    continue
                raise self._auth_error(resp, what)
            raise self._status_error(resp, what)
        raise AssertionError("unreachable")

    async def _fetch_retrying(self, method: str, url: str, *, headers: Mapping[str, str],
                              body: Optional[bytes] = None, idempotent: bool, what: str,
                              timeout: Optional[float] = None, retries: Optional[int] = None) -> HTTPResponse:
        """Fetch with retries of transient failures; raises ``SpallocUnreachableError`` when they run out."""
        attempts = (self.retries if retries is None else retries) + 1
        delay = self.retry_delay
        last: Optional[str] = None
        for attempt in range(1, attempts + 1):
            sent = False
            try:
                resp = await self._fetch(method, url, headers=headers, body=body, timeout=timeout)
                sent = True
                if resp.code in _RETRY_STATUSES and idempotent and attempt < attempts:
                    last = f"HTTP {resp.code}"
                else:
                    return resp
            except ssl.SSLCertVerificationError as e:
                raise SpallocUnreachableError(
                    f"The TLS certificate of the SpiNNaker allocation service at {self.service_url} is not "
                    f"trusted ({e.verify_message or e}). If it uses a private CA, set `{SETTINGS}.ca_certs` to "
                    f"the CA certificate file.") from e
            except (ConnectionRefusedError, socket.gaierror) as e:
                last = self._describe(e)  # certainly not sent: safe to retry even a POST
            except (HTTPClientError, OSError, StreamClosedError) as e:
                if isinstance(e, HTTPClientError) and e.code != 599:
                    raise  # (raise_error=False makes this unexpected)
                last = self._describe(e)
                sent = True  # it may have reached the service
            if sent and not idempotent:
                raise SpallocUnreachableError(
                    f"Lost contact with the SpiNNaker allocation service at {self.service_url} while trying to "
                    f"{what} ({last}); the request may or may not have been carried out. Try again.")
            if attempt < attempts:
                self.log.warning("spalloc: cannot %s (%s); retrying in %.1f s (attempt %d of %d)",
                                 what, last, delay, attempt + 1, attempts)
                await asyncio.sleep(delay)
                delay *= 2
        raise SpallocUnreachableError(
            f"Cannot reach the SpiNNaker allocation service at {self.service_url} to {what}: {last} "
            f"({_plural(attempts, 'attempt')}). Check `{SETTINGS}.url` and that this host can reach the service "
            f"(DNS, firewall, proxy); if the service is down, try again later.")

    async def _fetch(self, method: str, url: str, *, headers: Mapping[str, str], body: Optional[bytes] = None,
                     timeout: Optional[float] = None) -> HTTPResponse:
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True)
        if method in ("POST", "PUT") and body is None:
            body = b""
        req = HTTPRequest(url, method=method, headers=dict(headers), body=body,
                          request_timeout=timeout or self.request_timeout, connect_timeout=self.connect_timeout,
                          follow_redirects=False, ca_certs=self.ca_certs, validate_cert=self.validate_cert,
                          allow_nonstandard_methods=False, decompress_response=True)
        return await self._http.fetch(req, raise_error=False)

    @staticmethod
    def _describe(e: BaseException) -> str:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return f"host name not found ({e.strerror or e})"
        if isinstance(e, HTTPClientError):
            return (e.message or "timed out").lower()
        return str(e) or type(e).__name__

    @staticmethod
    def _text(resp: HTTPResponse) -> str:
        try:
            text = (resp.body or b"").decode("utf-8", "replace").strip()
        except Exception:  # noqa: BLE001
            text = ""
        return text[:300] or (resp.reason or "")

    def _auth_error(self, resp: HTTPResponse, what: str) -> SpallocAuthError:
        text = self._text(resp)
        if resp.code == 403:
            return SpallocAuthError(
                f"The SpiNNaker allocation service at {self.service_url} refused to let this account {what} "
                f"(HTTP 403: {text}). The account may lack the right role or group; ask the service's operators.")
        return SpallocAuthError(
            f"The SpiNNaker allocation service at {self.service_url} did not accept the access token when "
            f"trying to {what} (HTTP {resp.code}: {text}). Check `{SETTINGS}.token`: it may be wrong or expired.")

    def _status_error(self, resp: HTTPResponse, what: str) -> SpallocRequestError:
        text = self._text(resp)
        if resp.code == 400:
            msg = f"The SpiNNaker allocation service refused to {what}: {text} (HTTP 400)."
        elif resp.code == 404:
            msg = f"The SpiNNaker allocation service could not {what}: not found (HTTP 404: {text})."
        elif resp.code >= 500:
            msg = (f"The SpiNNaker allocation service failed to {what} (HTTP {resp.code}: {text}); it may be "
                   f"overloaded or broken. Try again later.")
        else:
            msg = f"The SpiNNaker allocation service answered HTTP {resp.code} when asked to {what}: {text}."
        return SpallocRequestError(msg, resp.code, text)

    def _protocol_error(self, resp: HTTPResponse, url: str, detail: str = "") -> SpallocProtocolError:
        detail = detail or f"HTTP {resp.code}: {self._text(resp)[:120]}"
        return SpallocProtocolError(
            f"{url} did not answer like a SpiNNaker allocation service ({detail}). `{SETTINGS}.url` should be "
            f"the service's root, e.g. https://spinnaker.cs.man.ac.uk/spalloc/.")


class SpallocJob:
    """A job of the allocation service: state, keepalive, machine, destruction."""

    def __init__(self, client: SpallocClient, url: str, *, keepalive_interval: Optional[float] = None) -> None:
        self.client = client
        self.url = url.rstrip("/")
        self.id = _job_id(self.url)
        self.keepalive_interval = keepalive_interval
        self.lost_reason: Optional[str] = None
        self._keepalive_url = self.url + "/keepalive"
        self._machine_url = self.url + "/machine"
        self._keepalive_task: Optional[asyncio.Task[None]] = None
        self._released = False

    def __repr__(self) -> str:
        return f"SpallocJob({self.url!r})"

    @property
    def label(self) -> str:
        return f"job {self.id}" if self.id is not None else self.url

    async def status(self, *, wait: bool = False) -> JobStatus:
        """The job's state; ``wait=True`` long-polls until it changes (or the service's wait ends).

        A long poll that outlives ``long_poll_timeout`` returns a fresh ordinary reading instead.
        """
        if wait:
            try:
                obj = await self.client._json("GET", self.url, params={"wait": "true"}, what=f"watch {self.label}",
                                              timeout=self.client.long_poll_timeout, retries=0)
                return self._status(obj)
            except SpallocUnreachableError:
                pass  # timed out (or blipped): fall back to a plain reading, which has its own retries
        obj = await self.client._json("GET", self.url, what=f"read the state of {self.label}")
        return self._status(obj)

    def _status(self, obj: Any) -> JobStatus:
        if not isinstance(obj, Mapping):
            raise SpallocProtocolError(f"Unexpected answer for {self.url}: {str(obj)[:200]}")
        st = JobStatus.from_json(self.url, obj)
        if st.keepalive_url:
            self._keepalive_url = self.client._follow(st.keepalive_url)
        if st.machine_url:
            self._machine_url = self.client._follow(st.machine_url)
        if self.keepalive_interval is None and st.keepalive_interval:
            self.keepalive_interval = st.keepalive_interval
        return st

    async def keepalive(self) -> None:
        """Tell the service the job is still wanted."""
        await self.client._request("PUT", self._keepalive_url, body=b"alive",
                                   content_type="text/plain; charset=UTF-8", what=f"keep {self.label} alive")

    async def machine(self) -> Optional[MachineInfo]:
        """The allocated boards, or ``None`` while nothing is allocated."""
        resp = await self.client._request("GET", self._machine_url, what=f"read the boards of {self.label}")
        if resp.code == 204 or not resp.body:
            return None
        try:
            return MachineInfo.from_json(json.loads(resp.body))
        except ValueError as e:
            raise self.client._protocol_error(resp, self._machine_url, detail="the answer is not JSON") from e

    async def destroy(self, reason: str = "finished") -> None:
        """Destroy the job (frees its boards); stops the keepalive loop. Destroying twice is harmless."""
        await self.stop_keepalive()
        self._released = True
        await self.client._request("DELETE", self.url, params={"reason": reason},
                                   what=f"release {self.label}", ok=(200, 202, 204, 404))
        self.client.log.info("spalloc: released %s (%s)", self.url, reason)

    async def wait_until_ready(self, *, timeout: Optional[float] = None,
                               progress: Optional[ProgressCallback] = None, n_boards: int = 1,
                               since: Optional[float] = None) -> MachineInfo:
        """Wait (long-polling) until the boards are powered and ready; report each step through ``progress``.

        While queued, a progress message comes at each change and at least every ``long_poll_timeout``.
        ``since`` (a ``time.monotonic()`` value, default now) is when the wait began, for the elapsed times.
        :raises SpallocJobDestroyedError: the job was destroyed while waiting.
        :raises SpallocTimeoutError: not ready within ``timeout`` seconds (the job is left as it is).
        """
        start = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout if timeout else math.inf
        one = n_boards == 1
        boards = "a SpiNNaker board" if one else f"{n_boards} SpiNNaker boards"
        status = await self.status()
        last: Optional[JobState] = None
        while True:
            elapsed = time.monotonic() - start
            state = status.state
            if state is JobState.DESTROYED:
                reason = status.reason or "no reason given"
                raise SpallocJobDestroyedError(
                    f"SpiNNaker {self.label} was ended by the allocation service before it was ready: "
                    f"{reason}.", self.url, status.reason)
            if state is JobState.READY:
                machine = await self.machine()
                if machine is None:
                    raise SpallocProtocolError(f"The allocation service says {self.label} is ready but lists no "
                                               f"boards for it ({self._machine_url}).")
                what = (f"SpiNNaker board ready at {machine.root_host}" if machine.n_boards == 1 else
                        f"{machine.n_boards} SpiNNaker boards ready, the first at {machine.root_host}")
                await self._say(progress, state, f"{what} ({self.label}).", elapsed, machine)
                return machine
            if state is JobState.QUEUED:
                busy = "all boards are in use" if one else "not enough boards are free"
                wait = f", waiting {duration_words(elapsed)}" if elapsed >= 1 else ""
                await self._say(progress, state, f"Waiting for {boards}: {busy} and you are in the queue "
                                f"({self.label}{wait}).", elapsed)
            elif state is JobState.POWER and last is not JobState.POWER:
                them = "it" if one else "them"
                await self._say(progress, state, f"Got {boards}; switching {them} on ({self.label}).", elapsed)
            last = state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = "No SpiNNaker board" if one else f"The {n_boards} SpiNNaker boards"
                raise SpallocTimeoutError(
                    f"{what} became ready within {duration_words(timeout or 0)} ({self.label} was still "
                    f"{state.value.lower()}). Try again later; the operator can raise `{SETTINGS}.claim_timeout`.")
            polled = time.monotonic()
            if remaining < self.client.long_poll_timeout:
                # Don't outlive the deadline by a whole long poll.
                try:
                    status = await asyncio.wait_for(self.status(wait=True), remaining)
                except asyncio.TimeoutError:
                    status = await self.status()
            else:
                status = await self.status(wait=True)
            if status.state is state and time.monotonic() - polled < 0.25:
                await asyncio.sleep(0.25)  # a server (or proxy) that does not hold long polls: don't spin

    async def _say(self, progress: Optional[ProgressCallback], state: JobState, message: str, elapsed: float,
                   machine: Optional[MachineInfo] = None) -> None:
        self.client.log.debug("spalloc: %s", message)
        await _call_maybe_async(progress, ClaimProgress(state=state, message=message, job_url=self.url,
                                                        job_id=self.id, elapsed=elapsed, machine=machine))

    # -- keepalive ----------------------------------------------------------------------------------------------
    @property
    def keepalive_running(self) -> bool:
        return self._keepalive_task is not None and not self._keepalive_task.done()

    def start_keepalive(self, interval: Optional[float] = None, *, on_lost: Optional[LostCallback] = None) -> None:
        """Keep the job alive from a background task: a keepalive (and a state check) every third of
        ``interval``, until ``stop_keepalive()``/``destroy()`` or the service ends the job (then ``on_lost``)."""
        if self.keepalive_running:
            return
        interval = interval or self.keepalive_interval or 60.0
        self._keepalive_task = asyncio.ensure_future(self._keepalive_loop(interval, on_lost))

    async def stop_keepalive(self) -> None:
        task, self._keepalive_task = self._keepalive_task, None
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    async def _keepalive_loop(self, interval: float, on_lost: Optional[LostCallback]) -> None:
        period = max(interval / 3.0, 0.05)
        failing_since: Optional[float] = None
        while True:
            try:
                await self.keepalive()
                status = await self.status()
                failing_since = None
                if status.state is JobState.DESTROYED:
                    await self._lost(status.reason or "destroyed by the allocation service", on_lost)
                    return
            except SpallocRequestError as e:
                if e.status in (404, 410):
                    await self._lost("the allocation service no longer knows this job", on_lost)
                    return
                failing_since = failing_since or time.monotonic()
                self.client.log.warning("spalloc: keepalive of %s failed: %s", self.url, e)
            except SpallocError as e:
                failing_since = failing_since or time.monotonic()
                self.client.log.warning("spalloc: keepalive of %s failed (for %.0f s; the service ends the job "
                                        "after %.0f s without one): %s", self.url,
                                        time.monotonic() - failing_since, interval, e)
            await asyncio.sleep(period)

    async def _lost(self, reason: str, on_lost: Optional[LostCallback]) -> None:
        if self._released:
            return
        self.lost_reason = reason
        self.client.log.warning("spalloc: %s was ended by the allocation service: %s", self.url, reason)
        await _call_maybe_async(on_lost, reason)


@dataclass
class Allocation:
    """Boards claimed for an owner and kept alive until ``release()``."""

    job: SpallocJob
    machine: MachineInfo
    owner: Optional[str] = None

    @property
    def job_url(self) -> str:
        """Persist this to ``resume()`` after a hub restart."""
        return self.job.url

    @property
    def job_id(self) -> Optional[int]:
        return self.job.id

    @property
    def root_host(self) -> str:
        return self.machine.root_host

    @property
    def version(self) -> int:
        return self.machine.version

    @property
    def alive(self) -> bool:
        """False once the service ended the job (see ``lost_reason``) or it was released."""
        return self.job.lost_reason is None and not self.job._released

    @property
    def lost_reason(self) -> Optional[str]:
        return self.job.lost_reason

    async def release(self, reason: str = "released by the hub") -> None:
        """Stop the keepalive and destroy the job."""
        await self.job.destroy(reason)


# --------------------------------------------------------------------------------------------------- allocator
class SpallocAllocator(LoggingConfigurable):
    """Claims SpiNNaker boards for hub users from an allocation service. Configure it like any JupyterHub
    object (``c.SpallocAllocator.url = ...``); the deployment config fills these from ``spinnaker.spalloc``."""

    url = Unicode(
        "", help="The allocation service URL, as sPyNNaker's `spalloc_server`, e.g. "
                 "https://spinnaker.cs.man.ac.uk/spalloc/").tag(config=True)
    token = Unicode(
        "", help="Bearer token the hub uses when a claim brings none of its own (a service account). "
                 "The service honours `owner` only for admin accounts.").tag(config=True)
    token_provider = AnyTrait(
        None, allow_none=True, help="Callable (sync or async) returning the hub's token; wins over `token`. "
                                    "Called at each session renewal, so it can refresh.").tag(config=True)
    keepalive_interval = Float(
        60.0, help="Seconds the service keeps a job without a keepalive; the hub sends one every third of "
                   "this. The real service accepts 30-300.").tag(config=True)
    claim_timeout = Float(900.0, help="Longest wait in the queue for boards (0: no limit).").tag(config=True)
    boards = Int(1, help="Boards claimed per session unless a claim says otherwise.").tag(config=True)
    machine_name = Unicode(
        None, allow_none=True, help="Allocate on this machine (else on a machine with `tags`).").tag(config=True)
    tags = List(Unicode(), default_value=["default"], help="Machine tags to allocate on.").tag(config=True)
    group = Unicode(
        None, allow_none=True, help="Group to account jobs to unless a claim gives one (the service's default: "
                                    "the owner's only group).").tag(config=True)
    request_timeout = Float(30.0, help="Seconds for one request.").tag(config=True)
    connect_timeout = Float(10.0, help="Seconds to connect.").tag(config=True)
    long_poll_timeout = Float(
        45.0, help="Seconds to hold a wait-for-change request (the service answers within ~30 s).").tag(config=True)
    retries = Int(3, help="Extra attempts for transient failures.").tag(config=True)
    retry_delay = Float(1.0, help="First pause between attempts (doubles each time).").tag(config=True)
    ca_certs = Unicode(None, allow_none=True, help="CA bundle for a service with a private CA.").tag(config=True)
    validate_cert = Bool(True, help="Verify the service's TLS certificate.").tag(config=True)
    max_clients = Int(
        100, help="Concurrent HTTP requests (each waiting claim holds one long poll).").tag(config=True)

    @validate("keepalive_interval")
    def _valid_keepalive(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if value <= 0:
            raise ValueError("keepalive_interval must be positive")
        return value

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._http: Optional[AsyncHTTPClient] = None
        self._http_loop: Optional[asyncio.AbstractEventLoop] = None
        self._clients: dict[str, SpallocClient] = {}

    # -- clients ----------------------------------------------------------------------------------------------
    def _http_client(self) -> AsyncHTTPClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            self._http = AsyncHTTPClient(force_instance=True, max_clients=self.max_clients)
            self._http_loop = loop
            self._clients.clear()
        return self._http

    def client(self, token: TokenSource = None) -> SpallocClient:
        """A session for ``token``; without one, the hub's own session (shared by all claims that use it)."""
        if not self.url:
            raise SpallocError(f"No SpiNNaker allocation service configured: set `{SETTINGS}.url`.")
        http = self._http_client()
        if token is None and "hub" in self._clients:
            return self._clients["hub"]
        source: TokenSource = token if token is not None else (self.token_provider or self.token or None)
        c = SpallocClient(self.url, source, request_timeout=self.request_timeout,
                          connect_timeout=self.connect_timeout, long_poll_timeout=self.long_poll_timeout,
                          retries=self.retries, retry_delay=self.retry_delay, ca_certs=self.ca_certs,
                          validate_cert=self.validate_cert, http_client=http, logger=self.log)
        if token is None:
            self._clients["hub"] = c
        return c

    # -- claims -----------------------------------------------------------------------------------------------
    async def claim(self, owner: str, *, n_boards: Optional[int] = None, group: Optional[str] = None,
                    collab: Optional[str] = None, token: TokenSource = None,
                    progress: Optional[ProgressCallback] = None, on_lost: Optional[LostCallback] = None,
                    timeout: Optional[float] = None,
                    on_created: Optional[Callable[["SpallocJob"], Any]] = None,
                    on_released: Optional[Callable[["SpallocJob"], Any]] = None) -> Allocation:
        """Claim boards for ``owner`` and wait until they are ready, keeping the job alive from the start.

        ``on_created(job)`` (may be a coroutine function) runs as soon as the service has created the job, before
        anything else is done with it: the place to record the job durably (``leases.LeaseStore``). If it raises,
        the job is destroyed and the error propagates: no job lives that nobody recorded.
        If waiting fails (timeout, destruction, cancellation of the calling task, lost contact), the job is
        released before the error propagates; ``on_released(job)`` runs once the service has confirmed that (not
        when the release could not be sent, e.g. the process is shutting down: the record must then stay). On success the keepalive runs until ``Allocation.release()``;
        ``on_lost(reason)`` is called if the service ends the job meanwhile.
        """
        n = n_boards or self.boards
        client = self.client(token)
        timeout = self.claim_timeout if timeout is None else timeout
        start = time.monotonic()
        job = await client.create_job(owner=owner, n_boards=n, group=group or self.group, collab=collab,
                                      machine_name=self.machine_name, tags=self.tags,
                                      keepalive_interval=self.keepalive_interval)
        if on_created is not None:
            try:
                result = on_created(job)
                if inspect.isawaitable(result):
                    await result
            except BaseException:
                if await asyncio.shield(self._release_quietly(job, "claim failed: the hub could not record the job")):
                    await _call_maybe_async(on_released, job)
                raise
        job.start_keepalive(self.keepalive_interval, on_lost=on_lost)
        await _call_maybe_async(progress, ClaimProgress(
            state=JobState.QUEUED, job_url=job.url, job_id=job.id, elapsed=time.monotonic() - start,
            message=f"Asked the SpiNNaker allocation service for {'a board' if n == 1 else f'{n} boards'} "
                    f"({job.label})."))
        try:
            machine = await job.wait_until_ready(timeout=timeout or None, progress=progress, n_boards=n,
                                                 since=start)
        except BaseException as e:
            reason = ("claim cancelled" if isinstance(e, asyncio.CancelledError)
                      else "claim timed out" if isinstance(e, SpallocTimeoutError)
                      else f"claim failed: {type(e).__name__}")
            if await asyncio.shield(self._release_quietly(job, reason)):
                await _call_maybe_async(on_released, job)
            raise
        self.log.info("spalloc: %s has %s (%s)", owner, machine.root_host, job.url)
        return Allocation(job=job, machine=machine, owner=owner)

    async def resume(self, job_url: str, *, token: TokenSource = None, progress: Optional[ProgressCallback] = None,
                     on_lost: Optional[LostCallback] = None, timeout: Optional[float] = None) -> Allocation:
        """Take over a job claimed earlier (its URL persisted, e.g. across a hub restart) and keep it alive.

        :raises SpallocJobDestroyedError: the job has ended meanwhile (claim again).
        """
        client = self.client(token)
        job = client.job(job_url)
        status = await job.status()
        if status.state is JobState.DESTROYED:
            raise SpallocJobDestroyedError(
                f"SpiNNaker {job.label} has ended ({status.reason or 'no reason given'}); it cannot be resumed.",
                job.url, status.reason)
        job.start_keepalive(status.keepalive_interval or self.keepalive_interval, on_lost=on_lost)
        try:
            machine = await job.wait_until_ready(timeout=(self.claim_timeout if timeout is None else timeout)
                                                 or None, progress=progress)
        except BaseException:
            await job.stop_keepalive()
            raise
        return Allocation(job=job, machine=machine, owner=status.owner)

    async def release(self, job_url: str, reason: str = "released by the hub", *, token: TokenSource = None) -> None:
        """Destroy a job known only by its URL (e.g. persisted state of a server that is gone)."""
        await self.client(token).job(job_url).destroy(reason)

    async def _release_quietly(self, job: SpallocJob, reason: str) -> bool:
        """Destroy `job`; True when the service confirmed it."""
        try:
            await job.destroy(reason)
            return True
        except Exception as e:  # noqa: BLE001 - the original error matters more; the job will expire anyway
            self.log.warning("spalloc: could not release %s (%s); it will expire after its keepalive interval",
                             job.url, e)
            return False

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
        if self._http is not None:
            self._http.close()
            self._http = None
