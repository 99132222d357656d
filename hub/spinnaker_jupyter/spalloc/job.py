"""A job of the allocation service: its state, boards and destruction, the wait until it is ready (told to the user
step by step), and the keepalive that holds it."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..words import duration as duration_words
from .errors import (
    SETTINGS,
    SpallocError,
    SpallocJobDestroyedError,
    SpallocProtocolError,
    SpallocRequestError,
    SpallocTimeoutError,
    SpallocUnreachableError,
    protocol_error,
)
from .models import ClaimProgress, JobState, JobStatus, MachineInfo

if TYPE_CHECKING:
    from .client import SpallocClient

log = logging.getLogger(__package__)

#: ``progress(ClaimProgress)``; may be a coroutine function.
ProgressCallback = Callable[["ClaimProgress"], Any]
#: ``on_lost(reason)``: the service ended a job the hub was keeping alive; may be a coroutine function.
LostCallback = Callable[[str], Any]


def _job_id(url: str) -> int | None:
    last = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    return int(last) if last.isdigit() else None


async def _call_maybe_async(fn: Callable[..., Any] | None, *args: Any) -> None:
    """Call a user callback; log (never raise) what it throws."""
    if fn is None:
        return
    try:
        result = fn(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:  # noqa: BLE001 - a broken callback must not break a claim
        log.exception("spalloc: callback %r failed", fn)


class SpallocJob:
    """A job of the allocation service: state, keepalive, machine, destruction."""

    def __init__(self, client: SpallocClient, url: str, *, keepalive_interval: float | None = None) -> None:
        self.client = client
        self.url = url.rstrip("/")
        self.id = _job_id(self.url)
        self.keepalive_interval = keepalive_interval
        self.lost_reason: str | None = None
        self._keepalive_url = self.url + "/keepalive"
        self._machine_url = self.url + "/machine"
        self._keepalive_task: asyncio.Task[None] | None = None
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
                obj = await self.client._json(
                    "GET",
                    self.url,
                    params={"wait": "true"},
                    what=f"watch {self.label}",
                    timeout=self.client.long_poll_timeout,
                    retries=0,
                )
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
        await self.client._request(
            "PUT",
            self._keepalive_url,
            body=b"alive",
            content_type="text/plain; charset=UTF-8",
            what=f"keep {self.label} alive",
        )

    async def machine(self) -> MachineInfo | None:
        """The allocated boards, or ``None`` while nothing is allocated."""
        resp = await self.client._request("GET", self._machine_url, what=f"read the boards of {self.label}")
        if resp.code == 204 or not resp.body:
            return None
        try:
            return MachineInfo.from_json(json.loads(resp.body))
        except ValueError as e:
            raise protocol_error(resp, self._machine_url, detail="the answer is not JSON") from e

    async def destroy(self, reason: str = "finished") -> None:
        """Destroy the job (frees its boards); stops the keepalive loop. Destroying twice is harmless."""
        await self.stop_keepalive()
        self._released = True
        await self.client._request(
            "DELETE", self.url, params={"reason": reason}, what=f"release {self.label}", ok=(200, 202, 204, 404)
        )
        self.client.log.info("spalloc: released %s (%s)", self.url, reason)

    async def wait_until_ready(
        self,
        *,
        timeout: float | None = None,
        progress: ProgressCallback | None = None,
        n_boards: int = 1,
        since: float | None = None,
    ) -> MachineInfo:
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
        last: JobState | None = None
        while True:
            elapsed = time.monotonic() - start
            state = status.state
            if state is JobState.DESTROYED:
                reason = status.reason or "no reason given"
                raise SpallocJobDestroyedError(
                    f"SpiNNaker {self.label} was ended by the allocation service before it was ready: {reason}.",
                    self.url,
                    status.reason,
                )
            if state is JobState.READY:
                machine = await self.machine()
                if machine is None:
                    raise SpallocProtocolError(
                        f"The allocation service says {self.label} is ready but lists no "
                        f"boards for it ({self._machine_url})."
                    )
                what = (
                    f"SpiNNaker board ready at {machine.root_host}"
                    if machine.n_boards == 1
                    else f"{machine.n_boards} SpiNNaker boards ready, the first at {machine.root_host}"
                )
                await self._say(progress, state, f"{what} ({self.label}).", elapsed, machine)
                return machine
            if state is JobState.QUEUED:
                busy = "all boards are in use" if one else "not enough boards are free"
                wait = f", waiting {duration_words(elapsed)}" if elapsed >= 1 else ""
                await self._say(
                    progress,
                    state,
                    f"Waiting for {boards}: {busy} and you are in the queue ({self.label}{wait}).",
                    elapsed,
                )
            elif state is JobState.POWER and last is not JobState.POWER:
                them = "it" if one else "them"
                await self._say(progress, state, f"Got {boards}; switching {them} on ({self.label}).", elapsed)
            last = state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = "No SpiNNaker board" if one else f"The {n_boards} SpiNNaker boards"
                raise SpallocTimeoutError(
                    f"{what} became ready within {duration_words(timeout or 0)} ({self.label} was still "
                    f"{state.value.lower()}). Try again later; the operator can raise `{SETTINGS}.claim_timeout`."
                )
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

    async def _say(
        self,
        progress: ProgressCallback | None,
        state: JobState,
        message: str,
        elapsed: float,
        machine: MachineInfo | None = None,
    ) -> None:
        self.client.log.debug("spalloc: %s", message)
        await _call_maybe_async(
            progress,
            ClaimProgress(
                state=state, message=message, job_url=self.url, job_id=self.id, elapsed=elapsed, machine=machine
            ),
        )

    # -- keepalive ----------------------------------------------------------------------------------------------
    @property
    def keepalive_running(self) -> bool:
        return self._keepalive_task is not None and not self._keepalive_task.done()

    def start_keepalive(self, interval: float | None = None, *, on_lost: LostCallback | None = None) -> None:
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

    async def _keepalive_loop(self, interval: float, on_lost: LostCallback | None) -> None:
        period = max(interval / 3.0, 0.05)
        failing_since: float | None = None
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
                self.client.log.warning(
                    "spalloc: keepalive of %s failed (for %.0f s; the service ends the job "
                    "after %.0f s without one): %s",
                    self.url,
                    time.monotonic() - failing_since,
                    interval,
                    e,
                )
            await asyncio.sleep(period)

    async def _lost(self, reason: str, on_lost: LostCallback | None) -> None:
        if self._released:
            return
        self.lost_reason = reason
        self.client.log.warning("spalloc: %s was ended by the allocation service: %s", self.url, reason)
        await _call_maybe_async(on_lost, reason)
