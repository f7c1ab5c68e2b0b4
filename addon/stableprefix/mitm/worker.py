"""One background thread that runs the analysis off the forwarding path, in submission order.

The addon's hooks submit jobs (the analysis of a request, the completion of its record) and return at once;
the thread runs them one after the other, so requests are analysed in the order they arrived and a record
is completed only after its request's analysis. Results go back to the event loop through `post`.

Memory stays bounded under a burst: every job carries a size (the request body it holds); while more than
`budget` bytes wait, `room` makes the request hook wait (an awaitable on the event loop, never a blocking
call) before the next request is handed on, so clients slow down to the analysis rate instead of queueing
without end. Nothing is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("stableprefix")

DEFAULT_BUDGET = 256 * 1024 * 1024  # bytes of request bodies waiting for analysis
DEFAULT_MAX_JOBS = 10_000
#: While a job runs, the interpreter's thread switch interval (default 5 ms): the event loop thread then
#: waits at most this long for the GIL when it has a flow to forward.
SWITCH_INTERVAL = 0.0005
#: How long the addon holds the analysis of a request at most (`submit(hold=...)`): until its response has
#: been passed on, or this long (a long prefill or stream, a flow held in mitmweb), whichever comes first.
HOLD_SECONDS = 0.5


class Worker:
    """A FIFO of jobs run by one daemon thread (started on the first job)."""

    def __init__(
        self,
        budget: int = DEFAULT_BUDGET,
        max_jobs: int = DEFAULT_MAX_JOBS,
        switch_interval: float | None = SWITCH_INTERVAL,
        hold_seconds: float = HOLD_SECONDS,
    ) -> None:
        self.budget = budget
        self.max_jobs = max_jobs
        self.switch_interval = switch_interval
        self.hold_seconds = hold_seconds
        self._jobs: collections.deque[tuple[Callable[[], object], int, object]] = collections.deque()
        self._held: set[object] = set()  # keys of held jobs not released yet
        self._cond = threading.Condition()
        self._queued = 0  # bytes held by waiting and running jobs
        self._running = False
        self._thread: threading.Thread | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.peak_bytes = 0
        self.peak_jobs = 0

    # --- submitting --------------------------------------------------------------------------------------

    def submit(self, job: Callable[[], object], size: int = 0, hold: object = None) -> None:
        """Queue `job` (never blocks); `size` counts against the budget until the job has run. With a `hold`
        key, the job (and every job after it: the order stays) waits until `release(hold)` or `join`; the
        caller must release it (the addon does, once the response is passed on, or after HOLD_SECONDS).
        A held job does not wake the thread: the request hook hands its flow on without a thread switch."""
        with self._cond:
            if hold is not None:
                self._held.add(hold)
            self._jobs.append((job, size, hold))
            self._queued += size
            self.peak_bytes = max(self.peak_bytes, self._queued)
            self.peak_jobs = max(self.peak_jobs, len(self._jobs))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="stableprefix-analysis", daemon=True)
                self._thread.start()
            if hold is None:
                self._cond.notify_all()

    def release(self, hold: object) -> None:
        """Let the job submitted with this `hold` key run (a no-op for an unknown or released key)."""
        with self._cond:
            if hold in self._held:
                self._held.discard(hold)
                self._cond.notify_all()

    def over_budget(self) -> bool:
        with self._cond:
            return self._over()

    def _over(self) -> bool:
        waiting = len(self._jobs) + self._running  # the running job counts: its bytes are still held
        return waiting > 1 and (self._queued > self.budget or len(self._jobs) > self.max_jobs)

    async def room(self) -> None:
        """Wait (on the event loop, without blocking it) until the queue is back within its budget."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if not self._over():
                    return
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            await fut

    def room_sync(self) -> None:
        """`room` for callers without an event loop (tests, shutdown): blocks the calling thread."""
        with self._cond:
            self._cond.wait_for(lambda: not self._over())

    # --- waiting for completion ----------------------------------------------------------------------

    def join(self, timeout: float | None = None) -> bool:
        """Block until every submitted job has run; False on timeout."""
        with self._cond:
            self._held.clear()  # whoever joins wants the results now
            self._cond.notify_all()
            return self._cond.wait_for(lambda: not self._jobs and not self._running, timeout)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._jobs) + self._running

    # --- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    if not self._cond.wait(timeout=30.0) and not self._jobs:
                        self._thread = None  # idle: end; the next submit starts a new thread
                        return
                job, size, hold = self._jobs[0]
                if hold is not None and hold in self._held:
                    self._cond.wait(self.hold_seconds)  # released or joined (notified); look again
                    continue
                self._jobs.popleft()
                self._running = True
            previous = sys.getswitchinterval()
            if self.switch_interval is not None:
                sys.setswitchinterval(self.switch_interval)
            try:
                job()
            except Exception as e:  # jobs guard themselves; this is the last line
                logger.warning(f"stableprefix: internal error in the analysis ({type(e).__name__}: {e})")
            finally:
                if self.switch_interval is not None:
                    sys.setswitchinterval(previous)
                with self._cond:
                    self._running = False
                    self._queued -= size
                    waiters = [] if self._over() else self._waiters
                    if waiters:
                        self._waiters = []
                    self._cond.notify_all()
                for loop, fut in waiters:
                    _wake(loop, fut)


def _wake(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any]) -> None:
    def done() -> None:
        if not fut.done():
            fut.set_result(None)

    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass
