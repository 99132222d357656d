"""Server starts, first come first served, a few at a time (`spawner.start_queue`).

A server start is CPU-bound (Python imports, the server's set-up). Thirty started at once on two cores share the CPU
and all finish together, after the whole batch's CPU time; started a few at a time (about one per core), the first
is ready after one start's time and the rest follow at the machine's pace, the last no later than before. Stock
JupyterHub's `concurrent_spawn_limit` refuses the surplus (HTTP 429, "try again"); here it waits in line, and its
spawn page says its place and a rough estimate from the measured durations of recent starts. Past
`start_queue.limit` waiting starts the hub refuses with a page saying so.

One queue per hub process, shared by every server it starts (local processes and containers). A spawner takes a
place with ``async with start_slot(spawner): ...`` around what costs CPU (not around a wait for a SpiNNaker board:
boards.BoardsMixin claims the board before the spawner's own start(), so a server waiting for a board holds no
place). Slurm queues its own jobs: the Slurm spawner does not use this queue.

While starts run or wait here the hub also holds every slot of the git kernel's first set-ups (`hold_slots`: the
files of gitkernel/slots.py, flocked as a set-up does): each local server has a cgroup of its own, so a set-up at nice
+10 still takes its share of the CPU from the servers starting beside it (benchmarks/README.md, "git kernel": the
last of 30 users ready 2 x later). Set-ups wait for their turn until the burst is over; a set-up already running
finishes, and its slot is taken when it ends. The hub's flocks end with its process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import heapq
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from jupyterhub.spawner import SpawnException
from traitlets import Integer, Unicode, default
from traitlets.config import LoggingConfigurable

#: How many recent start durations the estimate is taken from.
RECENT = 20


def usable_cpus() -> int:
    """Cores this process may run on (its CPU affinity: a container's or a taskset's share, not the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class QueueFull(SpawnException):
    """The queue already holds `limit` waiting starts: refused at once, with a page saying so."""

    def __init__(self, waiting: int, estimate: float | None):
        later = f" in about {_minutes(estimate)}" if estimate else " in a few minutes"
        message = (
            f"Too many servers are starting right now ({waiting} are already waiting for their turn), so "
            f"yours was not started. Please try again{later}."
        )
        super().__init__(message, reason="start_queue_full", status_code=429)
        self.jupyterhub_message = message


class SpawnQueue(LoggingConfigurable):
    concurrency = Integer(
        help="Servers started at the same time; the others wait in line, first come first served. "
        "Default: the cores this hub may use."
    ).tag(config=True)
    limit = Integer(
        200,
        help="Starts that may wait in line; one more is refused (HTTP 429, with a page saying "
        "so). 0: none wait (starts beyond `concurrency` are refused).",
    ).tag(config=True)

    hold_slots = Unicode(
        "",
        help="A folder of set-up slot files (the git kernel's, gitkernel/slots.py) that the hub "
        "holds while starts run or wait, so that those set-ups do not slow the starts. "
        "Empty: none.",
    ).tag(config=True)

    @default("concurrency")
    def _concurrency_default(self):
        # One per core for starts of a new Python or a container (hubconfig sets forked_concurrency() when local servers
        # are forked: configure()). Measured with 30 starts on 2 cores, followed as browsers follow them
        # (benchmarks/README.md, 5 runs each): 2 at a time, first 1.8 s, median 10.5 s, last 21.3 s, the machine 6%
        # idle; 3 at a time, first 2.8 s, median 12.9 s, last 25.6 s: a third start on two cores leaves no core idle but
        # makes every start cost ~25% more CPU (time-sliced against the others), more than the idle it fills. (An
        # earlier benchmark that asked the hub for every user 4 times a second favoured 3: its load left cores idle
        # between starts.)
        return usable_cpus()

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._running: dict[int, float] = {}  # place -> when it started (monotonic)
        self._waiting: collections.deque = collections.deque()  # futures, first come first
        self._durations: collections.deque = collections.deque(maxlen=RECENT)
        self._changed: asyncio.Future | None = None  # set at each change of the line (made in the hub's loop)
        self._next_id = 0
        self._slots = SlotHold(self.hold_slots, self.log) if self.hold_slots else None

    # -- what a waiting start is told --------------------------------------------------------------------------
    def typical_start(self) -> float | None:
        """Median duration of recent starts (None before the first one finished)."""
        return statistics.median(self._durations) if self._durations else None

    def estimate(self, ahead_waiting: int) -> float | None:
        """Seconds until a start with `ahead_waiting` starts queued before it is ready: the running starts finish
        at the typical duration, then the queued ones take the first free place each."""
        t = self.typical_start()
        if t is None:
            return None
        now = time.monotonic()
        free_at = [max(t - (now - began), 0.0) for began in self._running.values()]
        free_at += [0.0] * max(0, self.concurrency - len(free_at))
        heapq.heapify(free_at)
        for _ in range(ahead_waiting):
            heapq.heappush(free_at, heapq.heappop(free_at) + t)
        return heapq.heappop(free_at) + t

    def describe(self, ahead_waiting: int) -> str:
        ahead = len(self._running) + ahead_waiting
        words = f"{ahead} servers are starting before yours" if ahead != 1 else "1 server is starting before yours"
        eta = self.estimate(ahead_waiting)
        return words + (f", about {_seconds(eta)} until yours is ready" if eta is not None else "")

    # -- taking and giving back a place -----------------------------------------------------------------------
    def refuse_if_full(self, who: str) -> None:
        """Refuse now when a start would find the line full (checked again when it asks for its place)."""
        if len(self._waiting) >= self.limit and (self._waiting or len(self._running) >= self.concurrency):
            self.log.warning(
                "Start queue full (%d waiting, %d starting): refused %s", len(self._waiting), len(self._running), who
            )
            raise QueueFull(len(self._waiting), self.estimate(len(self._waiting)))

    @contextlib.asynccontextmanager
    async def place(self, who: str, say: Callable[[str], None]):
        """Wait for a place (telling `say` the position whenever it changes), hold it for the block."""
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        if self._waiting or len(self._running) >= self.concurrency:
            self.refuse_if_full(who)
            place = await self._wait_turn(who, say)
        else:
            place = self._take()
        began = self._running[place]
        ok = False
        try:
            yield
            ok = True
        finally:
            del self._running[place]
            if ok:
                self._durations.append(time.monotonic() - began)
            self._hand_on()

    async def _wait_turn(self, who: str, say: Callable[[str], None]) -> int:
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self.log.info("%s waits to start: %d starting, %d waiting", who, len(self._running), len(self._waiting))
        said = None
        try:
            while not turn.done():
                position = self._waiting.index(turn)
                if (position, len(self._running)) != said:  # on each move in the line, not at every new estimate
                    said = (position, len(self._running))
                    say(self.describe(position))
                await asyncio.wait([turn, self._changed], return_when=asyncio.FIRST_COMPLETED)
            return turn.result()
        except BaseException:  # cancelled (the user cancelled, or the start timed out): leave the line
            if turn.done() and not turn.cancelled():
                self._running.pop(turn.result(), None)  # (the place was handed over just now: give it on)
                self._hand_on()
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(turn)
                self._notify()
            raise

    def _take(self) -> int:
        place = self._next_id
        self._next_id += 1
        self._running[place] = time.monotonic()
        if self._slots:
            self._slots.update(busy=True)
        return place

    def _hand_on(self) -> None:
        while self._waiting and len(self._running) < self.concurrency:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(self._take())
        self._notify()

    def _notify(self) -> None:
        if self._slots:
            self._slots.update(busy=bool(self._running or self._waiting))
        changed, self._changed = self._changed, asyncio.get_running_loop().create_future()
        if changed is not None and not changed.done():
            changed.set_result(None)


class SlotHold:
    """Every slot file in `folder` flocked while the queue is busy, all let go when it is empty. A slot a set-up holds
    when the queue gets busy is taken when that set-up ends (tried every RETRY s: a waiting set-up tries each second).
    """

    RETRY = 0.25

    def __init__(self, folder: str, log):
        self.folder, self.log = Path(folder), log
        self._held: dict[str, int] = {}  # slot file name -> our open, flocked descriptor
        self._busy = False
        self._retrying: asyncio.Task | None = None

    def update(self, busy: bool) -> None:
        self._busy = busy
        if not busy:
            for fd in self._held.values():
                os.close(fd)  # (lets the slot go)
            if self._held:
                self.log.info("Start queue empty: git kernel set-ups may run (%d slots let go)", len(self._held))
            self._held.clear()
        elif not self._take_free() and self._retrying is None:
            self._retrying = asyncio.get_running_loop().create_task(self._retry())

    def _take_free(self) -> bool:
        """Take the free slots; True when all are held."""
        try:
            names = {p.name for p in self.folder.glob("slot-*")}
        except OSError:
            return True
        for name in names - self._held.keys():
            try:
                fd = os.open(self.folder / name, os.O_RDONLY | os.O_NOFOLLOW)  # (not inherited by the servers)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._held[name] = fd
            except OSError:  # a set-up's turn, still running
                os.close(fd)
        return self._held.keys() >= names

    async def _retry(self) -> None:
        try:
            while self._busy and not self._take_free():
                await asyncio.sleep(self.RETRY)
        finally:
            self._retrying = None


_queue: SpawnQueue | None = None


def queue_for(spawner) -> SpawnQueue:
    """The hub's one queue, configured from the spawners' config (`c.SpawnQueue.*`)."""
    global _queue
    if _queue is None:
        _queue = SpawnQueue(config=spawner.config, log=spawner.log)
        spawner.log.info("Server starts: %d at a time, up to %d waiting", _queue.concurrency, _queue.limit)
    return _queue


def start_slot(spawner):
    """``async with start_slot(self):`` in a spawner's start(): waits for the spawner's turn, saying its place on
    the spawn page (through ``progress_say`` where the spawner has it)."""
    say = getattr(spawner, "progress_say", None)
    name = spawner.user.name + (f"/{spawner.name}" if spawner.name else "")
    return queue_for(spawner).place(name, (lambda words: say(None, words)) if say else spawner.log.info)


def refuse_if_full(spawner) -> None:
    """For a spawner's pre-spawn hook: a full line refuses the start before anything else is done for it (before a
    SpiNNaker board is claimed: boards.BoardsMixin claims in start())."""
    queue_for(spawner).refuse_if_full(spawner.user.name + (f"/{spawner.name}" if spawner.name else ""))


def configure(c, queue_config: dict, forked: bool = False) -> None:
    """The deployment's `spawner.start_queue` section -> the queue, and no stock throttle before it. `forked`: local
    servers forked from the fork server, whose default is half as many again as the cores (forked_concurrency)."""
    if queue_config.get("concurrency"):
        c.SpawnQueue.concurrency = queue_config["concurrency"]
    elif forked:
        c.SpawnQueue.concurrency = forked_concurrency(usable_cpus())
    c.SpawnQueue.limit = queue_config["limit"]
    # Stock JupyterHub refuses starts past concurrent_spawn_limit (default 100, counting starts that wait for a
    # board or in this queue): the queue decides instead.
    c.JupyterHub.concurrent_spawn_limit = 0


def forked_concurrency(cores: int) -> int:
    """Starts at a time when servers are forked: a forked start costs ~0.1 CPU-s and spends about a third of its place
    waiting (its account, the fork's answer, the hub's own steps), so one per core left a core idle ~20% of the time.
    30 starts on 2 cores, alternated in one run (benchmarks/README.md): 3 at a time, median 2.1-2.6 s and last
    3.9-4.6 s; 2 at a time 2.6-3.4 s and 5.0-6.1 s; 4 at a time no better than 3. (Measured on 2 cores only.)"""
    return cores + max(1, cores // 2)


def _seconds(s: float) -> str:
    return f"{max(1, round(s))} s" if s < 90 else _minutes(s)


def _minutes(s: float) -> str:
    m = max(1, round(s / 60))
    return f"{m} minute{'s' if m != 1 else ''}"
