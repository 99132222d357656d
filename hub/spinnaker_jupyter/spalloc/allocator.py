"""Boards for hub users: ``SpallocAllocator`` (configured like any JupyterHub object) claims, resumes and releases
jobs, and an ``Allocation`` is boards claimed and kept alive."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tornado.httpclient import AsyncHTTPClient
from traitlets import Any as AnyTrait
from traitlets import Bool, Float, Int, List, Unicode, validate
from traitlets.config import LoggingConfigurable

from .client import SpallocClient, TokenSource
from .errors import SETTINGS, SpallocError, SpallocJobDestroyedError, SpallocTimeoutError
from .job import LostCallback, ProgressCallback, SpallocJob, _call_maybe_async
from .models import ClaimProgress, JobState, MachineInfo


@dataclass
class Allocation:
    """Boards claimed for an owner and kept alive until ``release()``."""

    job: SpallocJob
    machine: MachineInfo
    owner: str | None = None

    @property
    def job_url(self) -> str:
        """Persist this to ``resume()`` after a hub restart."""
        return self.job.url

    @property
    def job_id(self) -> int | None:
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
    def lost_reason(self) -> str | None:
        return self.job.lost_reason

    async def release(self, reason: str = "released by the hub") -> None:
        """Stop the keepalive and destroy the job."""
        await self.job.destroy(reason)


# --------------------------------------------------------------------------------------------------- allocator
class SpallocAllocator(LoggingConfigurable):
    """Claims SpiNNaker boards for hub users from an allocation service. Configure it like any JupyterHub
    object (``c.SpallocAllocator.url = ...``); the deployment config fills these from ``spinnaker.spalloc``."""

    url = Unicode(
        "",
        help="The allocation service URL, as sPyNNaker's `spalloc_server`, e.g. "
        "https://spinnaker.cs.man.ac.uk/spalloc/",
    ).tag(config=True)
    token = Unicode(
        "",
        help="Bearer token the hub uses when a claim brings none of its own (a service account). "
        "The service honours `owner` only for admin accounts.",
    ).tag(config=True)
    token_provider = AnyTrait(
        None,
        allow_none=True,
        help="Callable (sync or async) returning the hub's token; wins over `token`. "
        "Called at each session renewal, so it can refresh.",
    ).tag(config=True)
    keepalive_interval = Float(
        60.0,
        help="Seconds the service keeps a job without a keepalive; the hub sends one every third of "
        "this. The real service accepts 30-300.",
    ).tag(config=True)
    claim_timeout = Float(900.0, help="Longest wait in the queue for boards (0: no limit).").tag(config=True)
    boards = Int(1, help="Boards claimed per session unless a claim says otherwise.").tag(config=True)
    machine_name = Unicode(None, allow_none=True, help="Allocate on this machine (else on a machine with `tags`).").tag(
        config=True
    )
    tags = List(Unicode(), default_value=["default"], help="Machine tags to allocate on.").tag(config=True)
    group = Unicode(
        None,
        allow_none=True,
        help="Group to account jobs to unless a claim gives one (the service's default: the owner's only group).",
    ).tag(config=True)
    request_timeout = Float(30.0, help="Seconds for one request.").tag(config=True)
    connect_timeout = Float(10.0, help="Seconds to connect.").tag(config=True)
    long_poll_timeout = Float(
        45.0, help="Seconds to hold a wait-for-change request (the service answers within ~30 s)."
    ).tag(config=True)
    retries = Int(3, help="Extra attempts for transient failures.").tag(config=True)
    retry_delay = Float(1.0, help="First pause between attempts (doubles each time).").tag(config=True)
    ca_certs = Unicode(None, allow_none=True, help="CA bundle for a service with a private CA.").tag(config=True)
    validate_cert = Bool(True, help="Verify the service's TLS certificate.").tag(config=True)
    max_clients = Int(100, help="Concurrent HTTP requests (each waiting claim holds one long poll).").tag(config=True)

    @validate("keepalive_interval")
    def _valid_keepalive(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if value <= 0:
            raise ValueError("keepalive_interval must be positive")
        return value

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._http: AsyncHTTPClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
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
        c = SpallocClient(
            self.url,
            source,
            request_timeout=self.request_timeout,
            connect_timeout=self.connect_timeout,
            long_poll_timeout=self.long_poll_timeout,
            retries=self.retries,
            retry_delay=self.retry_delay,
            ca_certs=self.ca_certs,
            validate_cert=self.validate_cert,
            http_client=http,
            logger=self.log,
        )
        if token is None:
            self._clients["hub"] = c
        return c

    # -- claims -----------------------------------------------------------------------------------------------
    async def claim(
        self,
        owner: str,
        *,
        n_boards: int | None = None,
        group: str | None = None,
        collab: str | None = None,
        token: TokenSource = None,
        progress: ProgressCallback | None = None,
        on_lost: LostCallback | None = None,
        timeout: float | None = None,
        on_created: Callable[[SpallocJob], Any] | None = None,
        on_released: Callable[[SpallocJob], Any] | None = None,
    ) -> Allocation:
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
        job = await client.create_job(
            owner=owner,
            n_boards=n,
            group=group or self.group,
            collab=collab,
            machine_name=self.machine_name,
            tags=self.tags,
            keepalive_interval=self.keepalive_interval,
        )
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
        await _call_maybe_async(
            progress,
            ClaimProgress(
                state=JobState.QUEUED,
                job_url=job.url,
                job_id=job.id,
                elapsed=time.monotonic() - start,
                message=f"Asked the SpiNNaker allocation service for {'a board' if n == 1 else f'{n} boards'} "
                f"({job.label}).",
            ),
        )
        try:
            machine = await job.wait_until_ready(timeout=timeout or None, progress=progress, n_boards=n, since=start)
        except BaseException as e:
            reason = (
                "claim cancelled"
                if isinstance(e, asyncio.CancelledError)
                else "claim timed out"
                if isinstance(e, SpallocTimeoutError)
                else f"claim failed: {type(e).__name__}"
            )
            if await asyncio.shield(self._release_quietly(job, reason)):
                await _call_maybe_async(on_released, job)
            raise
        self.log.info("spalloc: %s has %s (%s)", owner, machine.root_host, job.url)
        return Allocation(job=job, machine=machine, owner=owner)

    async def resume(
        self,
        job_url: str,
        *,
        token: TokenSource = None,
        progress: ProgressCallback | None = None,
        on_lost: LostCallback | None = None,
        timeout: float | None = None,
    ) -> Allocation:
        """Take over a job claimed earlier (its URL persisted, e.g. across a hub restart) and keep it alive.

        :raises SpallocJobDestroyedError: the job has ended meanwhile (claim again).
        """
        client = self.client(token)
        job = client.job(job_url)
        status = await job.status()
        if status.state is JobState.DESTROYED:
            raise SpallocJobDestroyedError(
                f"SpiNNaker {job.label} has ended ({status.reason or 'no reason given'}); it cannot be resumed.",
                job.url,
                status.reason,
            )
        job.start_keepalive(status.keepalive_interval or self.keepalive_interval, on_lost=on_lost)
        try:
            machine = await job.wait_until_ready(
                timeout=(self.claim_timeout if timeout is None else timeout) or None, progress=progress
            )
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
            self.log.warning(
                "spalloc: could not release %s (%s); it will expire after its keepalive interval", job.url, e
            )
            return False

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
        if self._http is not None:
            self._http.close()
            self._http = None
