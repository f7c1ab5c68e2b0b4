"""The analysis worker: one thread, jobs in submission order, a byte budget that makes the request hook wait
(on the event loop) instead of letting the queue grow."""

from __future__ import annotations

import asyncio
import functools
import threading
import time

import pytest

from stableprefix.mitm.worker import Worker


def test_jobs_run_in_submission_order_on_one_thread() -> None:
    w = Worker()
    seen: list[tuple[int, str]] = []

    def job(i: int) -> None:
        seen.append((i, threading.current_thread().name))

    for i in range(200):
        w.submit(functools.partial(job, i))
    assert w.join(10)
    assert [i for i, _ in seen] == list(range(200))
    assert {name for _, name in seen} == {"stableprefix-analysis"}


def test_a_failing_job_does_not_stop_the_next() -> None:
    w = Worker()
    seen: list[int] = []
    w.submit(lambda: 1 / 0)
    w.submit(lambda: seen.append(1))
    assert w.join(10) and seen == [1]


async def test_over_budget_the_hook_waits_on_the_loop_until_the_queue_drains() -> None:
    w = Worker(budget=1000)
    gate = threading.Event()
    w.submit(gate.wait, 600)  # running, holds 600 bytes
    w.submit(lambda: None, 600)  # waiting: 1,200 bytes > budget
    assert w.over_budget()
    ticks = 0

    async def tick() -> None:  # the loop keeps running while the hook waits
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    ticker = asyncio.ensure_future(tick())
    waiter = asyncio.ensure_future(w.room())
    for _ in range(1000):  # the loop keeps running while the hook waits (generous: the machine may be loaded)
        if ticks >= 5:
            break
        await asyncio.sleep(0.01)
    assert not waiter.done() and ticks >= 5
    gate.set()
    await asyncio.wait_for(waiter, 5)
    assert not w.over_budget() and w.join(5)
    assert w.peak_bytes == 1200
    ticker.cancel()


def test_a_single_job_larger_than_the_budget_is_admitted() -> None:
    w = Worker(budget=10)
    done: list[int] = []
    w.submit(lambda: done.append(1), 10_000)
    assert not w.over_budget() or w.pending <= 1
    w.room_sync()
    assert w.join(5) and done == [1]


def test_switch_interval_is_restored_after_each_job() -> None:
    import sys

    before = sys.getswitchinterval()
    w = Worker(switch_interval=0.0002)
    during: list[float] = []
    w.submit(lambda: during.append(sys.getswitchinterval()))
    assert w.join(5)
    time.sleep(0.01)
    assert during == [pytest.approx(0.0002)] and sys.getswitchinterval() == before


def test_a_held_job_waits_for_its_release_and_keeps_the_order() -> None:
    w = Worker()
    seen: list[str] = []
    w.submit(lambda: seen.append("a"), hold="flow-1")
    w.submit(lambda: seen.append("b"))  # not held, but after a held job: waits with it
    time.sleep(0.2)
    assert seen == [] and w.pending == 2
    w.release("flow-1")
    w.release("unknown")  # a no-op
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == ["a", "b"]


def test_join_releases_every_held_job() -> None:
    w = Worker()
    seen: list[int] = []
    for i in range(3):
        w.submit(functools.partial(seen.append, i), hold=f"flow-{i}")
    assert w.join(5) and seen == [0, 1, 2]
