"""A session with the allocation service for one credential: login (cookie, CSRF), requests with retries and one
session renewal, jobs created, listed and looked up.

Longer than ~400 lines: one class whose methods share the session's cookie, CSRF token and renewal; the error
wording is already apart (`errors.py`), and ruff's layout puts each request's arguments on lines of their own."""

from __future__ import annotations

import asyncio
import http.cookies
import inspect
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.iostream import StreamClosedError

from ..spynnaker_cfg import CfgError, spalloc_server
from .errors import (
    SETTINGS,
    SpallocAuthError,
    SpallocError,
    SpallocProtocolError,
    SpallocUnreachableError,
    auth_error,
    describe,
    protocol_error,
    status_error,
)
from .iso8601 import format_iso_duration
from .job import SpallocJob
from .models import ServiceInfo

log = logging.getLogger(__package__)

#: A bearer token, or something that returns one (sync or async): called again whenever a session is renewed,
#: so an expiring access token can be refreshed.
TokenSource = str | Callable[[], str | None | Awaitable[str | None]] | None

SESSION_COOKIE = "JSESSIONID"
_RETRY_STATUSES = {500, 502, 503, 504}


def normalize_service_url(url: str) -> str:
    """The service URL as spinnman's ``spalloc_server`` takes it: ``https://host/spalloc/`` (one rule for both)."""
    try:
        return spalloc_server(url)
    except CfgError as e:
        raise SpallocError(str(e)) from None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


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

    def __init__(
        self,
        url: str,
        token: TokenSource = None,
        *,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        long_poll_timeout: float = 45.0,
        retries: int = 3,
        retry_delay: float = 1.0,
        ca_certs: str | None = None,
        validate_cert: bool = True,
        http_client: AsyncHTTPClient | None = None,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
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
        self._token: str | None = None
        self._cookie: str | None = None
        self._csrf: tuple[str, str] | None = None
        self._service: ServiceInfo | None = None
        self._login_lock = asyncio.Lock()
        self._login_count = 0

    # -- public ---------------------------------------------------------------------------------------------
    @property
    def service(self) -> ServiceInfo | None:
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

    async def create_job(
        self,
        *,
        owner: str | None = None,
        n_boards: int | None = 1,
        dimensions: tuple[int, int] | None = None,
        board: Mapping[str, Any] | None = None,
        group: str | None = None,
        collab: str | None = None,
        nmpi_job_id: int | None = None,
        machine_name: str | None = None,
        tags: Sequence[str] | None = None,
        keepalive_interval: float = 60.0,
        max_dead_boards: int | None = None,
    ) -> SpallocJob:
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
        what = f"create a job for {_plural(int(n_boards or 1), 'board')}" if "num-boards" in body else "create a job"
        resp = await self._request(
            "POST",
            service.jobs_url,
            body=json.dumps(body).encode(),
            content_type="application/json",
            idempotent=False,
            what=what,
        )
        location = resp.headers.get("Location")
        if not location:
            try:
                location = json.loads(resp.body or b"{}").get("job-ref")
            except ValueError:
                location = None
        if not location:
            raise SpallocProtocolError(
                f"The allocation service created a job but did not say where it is "
                f"(no Location header; HTTP {resp.code})."
            )
        job = SpallocJob(self, self._follow(location), keepalive_interval=keepalive_interval)
        self.log.info("spalloc: created %s for %s (%s)", job.url, owner or "(token user)", body)
        return job

    async def list_jobs(self, *, deleted: bool = False, limit: int | None = None, max_pages: int = 1000) -> list[str]:
        """Every job the service lists (``GET jobs``, following its ``next`` pages), as job URLs, newest first.

        The service lists every live job (with ``deleted``: ended ones too) to anyone logged in; reading a job's
        state is what needs its owner's (or an admin's) credentials.
        """
        service = await self.connect()
        params = {"deleted": "true" if deleted else "false"}
        if limit is not None:
            params["limit"] = str(int(limit))
        url: str | None = f"{service.jobs_url}?{urlencode(params)}"
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

    def job(self, job_url: str, *, keepalive_interval: float | None = None) -> SpallocJob:
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

    async def __aenter__(self) -> SpallocClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- session ----------------------------------------------------------------------------------------------
    async def _get_token(self) -> str | None:
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
                    f"`{SETTINGS}.token` (or log in with an account whose token the service accepts)."
                )
            # Step 1: bearer token -> session cookie (what spinnman's Session.renew does).
            resp = await self._fetch_retrying(
                "GET",
                self.service_url + "system/login.html",
                headers={"Authorization": f"Bearer {self._token}"},
                idempotent=True,
                what="log in",
            )
            if resp.code in (401, 403):
                raise auth_error(self.service_url, resp, "log in")
            if resp.code == 200:
                self._cookie = self._session_cookie(resp)
            # (No login page or no cookie: carry on with the bearer token on every request.)
            # Step 2: the service description and the session's CSRF token.
            headers = self._headers("GET")
            resp = await self._fetch_retrying(
                "GET", self.srv_url, headers=headers, idempotent=True, what="read the service description"
            )
            if resp.code in (401, 403):
                raise auth_error(self.service_url, resp, "read the service description")
            if resp.code != 200:
                raise protocol_error(resp, self.srv_url)
            try:
                obj = json.loads(resp.body)
                v = obj["version"]
                version = f"{v['major-version']}.{v['minor-version']}.{v['revision']}"
                jobs_url, machines_url = obj["jobs-ref"], obj["machines-ref"]
            except (ValueError, KeyError, TypeError) as e:
                raise protocol_error(resp, self.srv_url, detail=f"missing {e}") from e
            if obj.get("csrf-header") and obj.get("csrf-token"):
                self._csrf = (str(obj["csrf-header"]), str(obj["csrf-token"]))
            self._service = ServiceInfo(
                service_url=self.service_url,
                version=version,
                jobs_url=self._follow(jobs_url),
                machines_url=self._follow(machines_url),
            )
            self._login_count += 1
            self.log.debug(
                "spalloc: session open with %s (version %s, cookie %s)",
                self.service_url,
                version,
                "yes" if self._cookie else "no",
            )

    @staticmethod
    def _session_cookie(resp: HTTPResponse) -> str | None:
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
        if (
            theirs.scheme not in ("http", "https")
            or theirs.netloc != ours.netloc
            or not theirs.path.startswith(ours.path + "jobs/")
        ):
            raise SpallocError(
                f"Refusing to use the job URL {url!r}: it is not a job of the configured "
                f"allocation service {self.service_url} (setting `{SETTINGS}.url` changed?)."
            )

    # -- requests ---------------------------------------------------------------------------------------------
    async def _json(self, method: str, url: str, *, what: str, **kw: Any) -> Any:
        resp = await self._request(method, url, what=what, **kw)
        try:
            return json.loads(resp.body or b"null")
        except ValueError as e:
            raise protocol_error(resp, url, detail="the answer is not JSON") from e

    async def _request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        idempotent: bool = True,
        timeout: float | None = None,
        what: str,
        ok: Sequence[int] = (200, 201, 202, 204),
        retries: int | None = None,
    ) -> HTTPResponse:
        """One API request in the session: renews the session once on 401/403, raises ``SpallocError`` else."""
        await self.connect()
        if params:
            url = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
        for renewal in (False, True):
            count = self._login_count
            headers = self._headers(method)
            if content_type:
                headers["Content-Type"] = content_type
            resp = await self._fetch_retrying(
                method,
                url,
                headers=headers,
                body=body,
                idempotent=idempotent,
                timeout=timeout,
                what=what,
                retries=retries,
            )
            if resp.code in ok:
                return resp
            if resp.code in (401, 403) or (300 <= resp.code < 400 and "login" in resp.headers.get("Location", "")):
                if not renewal:
                    self.log.info("spalloc: HTTP %s from %s; renewing the session", resp.code, url)
                    await self._login(count)
                    continue
                raise auth_error(self.service_url, resp, what)
            raise status_error(resp, what)
        raise AssertionError("unreachable")

    async def _fetch_retrying(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        idempotent: bool,
        what: str,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> HTTPResponse:
        """Fetch with retries of transient failures; raises ``SpallocUnreachableError`` when they run out."""
        attempts = (self.retries if retries is None else retries) + 1
        delay = self.retry_delay
        last: str | None = None
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
                    f"the CA certificate file."
                ) from e
            except (ConnectionRefusedError, socket.gaierror) as e:
                last = describe(e)  # certainly not sent: safe to retry even a POST
            except (HTTPClientError, OSError, StreamClosedError) as e:
                if isinstance(e, HTTPClientError) and e.code != 599:
                    raise  # (raise_error=False makes this unexpected)
                last = describe(e)
                sent = True  # it may have reached the service
            if sent and not idempotent:
                raise SpallocUnreachableError(
                    f"Lost contact with the SpiNNaker allocation service at {self.service_url} while trying to "
                    f"{what} ({last}); the request may or may not have been carried out. Try again."
                )
            if attempt < attempts:
                self.log.warning(
                    "spalloc: cannot %s (%s); retrying in %.1f s (attempt %d of %d)",
                    what,
                    last,
                    delay,
                    attempt + 1,
                    attempts,
                )
                await asyncio.sleep(delay)
                delay *= 2
        raise SpallocUnreachableError(
            f"Cannot reach the SpiNNaker allocation service at {self.service_url} to {what}: {last} "
            f"({_plural(attempts, 'attempt')}). Check `{SETTINGS}.url` and that this host can reach the service "
            f"(DNS, firewall, proxy); if the service is down, try again later."
        )

    async def _fetch(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> HTTPResponse:
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True)
        if method in ("POST", "PUT") and body is None:
            body = b""
        req = HTTPRequest(
            url,
            method=method,
            headers=dict(headers),
            body=body,
            request_timeout=timeout or self.request_timeout,
            connect_timeout=self.connect_timeout,
            follow_redirects=False,
            ca_certs=self.ca_certs,
            validate_cert=self.validate_cert,
            allow_nonstandard_methods=False,
            decompress_response=True,
        )
        return await self._http.fetch(req, raise_error=False)
