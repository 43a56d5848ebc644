"""Lanes: an API's own threads, handed calls without run_in_executor's futures, results back in one loop callback
for every batch that finished between two turns."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from harness import wait_until

from predictord.model.lanes import Lanes


def test_results_and_failures_come_back_in_order() -> None:
    ran: list[int] = []

    def call(i: int) -> int:
        ran.append(i)
        if i == 2:
            raise ValueError("two")
        if i == 3:
            raise SystemExit(3)  # predictor code may call sys.exit: it fails its call, not the worker
        return i * 10

    async def main() -> list[Any]:
        lanes = Lanes(asyncio.get_running_loop(), 1, "predict-t")
        try:
            return await asyncio.gather(*(lanes.run(call, i) for i in range(6)), return_exceptions=True)
        finally:
            lanes.shutdown()

    results = asyncio.run(main())
    assert ran == [0, 1, 2, 3, 4, 5]  # one thread: in the order given
    assert results[:2] == [0, 10] and results[4:] == [40, 50]
    assert isinstance(results[2], ValueError) and isinstance(results[3], SystemExit)


def test_calls_that_finish_together_wake_the_loop_once() -> None:
    gate = threading.Event()

    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        lanes = Lanes(loop, 1, "predict-t")
        wakes = 0
        real = loop.call_soon_threadsafe

        def counted(*args: Any) -> Any:
            nonlocal wakes
            wakes += 1
            return real(*args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        futures = [lanes.run(lambda i=i: (gate.wait(5), i)[1]) for i in range(5)]
        gate.set()
        # The loop is held here, so all five finish before it turns.
        wait_until(lambda: len(lanes.done) == 5, 5, "five calls to finish", interval=0.001)
        results = await asyncio.gather(*futures)
        lanes.shutdown()
        return results, wakes

    results, wakes = asyncio.run(main())
    assert results == [0, 1, 2, 3, 4]
    assert wakes == 1


def test_threads_run_calls_side_by_side() -> None:
    both = threading.Barrier(2, timeout=5)  # broken (an error) unless two calls wait on it at once

    async def main() -> list[int]:
        lanes = Lanes(asyncio.get_running_loop(), 2, "predict-t")
        try:
            return await asyncio.gather(lanes.run(both.wait), lanes.run(both.wait))
        finally:
            lanes.shutdown()

    assert sorted(asyncio.run(main())) == [0, 1]


def test_shutdown_ends_the_threads_after_the_calls_queued_before_it() -> None:
    gate = threading.Event()
    ran: list[int] = []

    async def main() -> Lanes:
        lanes = Lanes(asyncio.get_running_loop(), 2, "predict-t")
        first = lanes.run(lambda: (gate.wait(5), ran.append(1)))
        second = lanes.run(lambda: (gate.wait(5), ran.append(2)))
        lanes.shutdown()
        with pytest.raises(RuntimeError, match="shut down"):
            lanes.run(ran.append, 3)
        gate.set()
        await asyncio.gather(first, second)
        return lanes

    asyncio.run(main())
    assert sorted(ran) == [1, 2]
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("predict-t-")], 5,
               "the threads to end")


def test_a_caller_that_gave_up_does_not_break_the_next_calls() -> None:
    gate = threading.Event()

    async def main() -> int:
        lanes = Lanes(asyncio.get_running_loop(), 1, "predict-t")
        slow = lanes.run(gate.wait, 5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow, 0.01)  # cancels the future while its call still runs
        gate.set()
        try:
            return await lanes.run(lambda: 7)
        finally:
            lanes.shutdown()

    assert asyncio.run(main()) == 7


def test_threads_are_named_daemons() -> None:
    async def main() -> threading.Thread:
        lanes = Lanes(asyncio.get_running_loop(), 1, "predict-echo")
        try:
            return await lanes.run(threading.current_thread)
        finally:
            lanes.shutdown()

    thread = asyncio.run(main())
    assert thread.daemon and thread.name == "predict-echo-1"
