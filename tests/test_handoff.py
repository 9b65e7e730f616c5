"""The poller's hand-off behaves as asyncio.Queue (the reference) does for the same script of
puts, gets, cancellations and task_done calls: the same items to the same getters, the same
puts blocked, and join ending at the same step."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.handoff import Handoff

ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 99)),
        st.tuples(st.just("put_then_cancel_get"), st.integers(0, 99)),
        st.tuples(st.just("get"), st.just(0)),
        st.tuples(st.just("cancel_get"), st.integers(0, 5)),
        st.tuples(st.just("cancel_put"), st.integers(0, 5)),
        st.tuples(st.just("done"), st.just(0)),
        st.tuples(st.just("join"), st.just(0)),
        st.tuples(st.just("cancel_join"), st.integers(0, 5)),
        st.tuples(st.just("done_then_put"), st.integers(0, 99)),
    ),
    max_size=40,
)


async def _settle() -> None:
    for _ in range(4):
        await asyncio.sleep(0)


def _outcome(task: asyncio.Task[Any]) -> object:
    if not task.done():
        return "pending"
    if task.cancelled():
        return "cancelled"
    return ("result", task.result())


async def _play(queue: Any, script: list[tuple[str, int]]) -> list[object]:
    trace: list[object] = []
    gets: list[asyncio.Task[Any]] = []
    puts: list[asyncio.Task[Any]] = []
    joins: list[asyncio.Task[Any]] = []
    done_calls = 0
    for op, arg in script:
        if op == "put":
            puts.append(asyncio.create_task(queue.put(arg)))
        elif op == "put_then_cancel_get":
            # the put wakes the oldest getter, which is cancelled before it runs: the item must
            # go to the next getter, not stay unclaimed
            puts.append(asyncio.create_task(queue.put(arg)))
            await asyncio.sleep(0)
            waiting = [t for t in gets if not t.done()]
            if waiting:
                waiting[0].cancel()
        elif op == "get":
            gets.append(asyncio.create_task(queue.get()))
        elif op in ("cancel_get", "cancel_put", "cancel_join"):
            tasks = [
                t for t in {"cancel_get": gets, "cancel_put": puts, "cancel_join": joins}[op] if not t.done()
            ]
            if tasks:
                tasks[arg % len(tasks)].cancel()
        elif op in ("done", "done_then_put"):
            finished = sum(1 for t in gets if t.done() and not t.cancelled())
            if done_calls < finished:  # only for an item a getter took, as the poller does
                queue.task_done()
                done_calls += 1
            if op == "done_then_put":  # before a waiting join runs: it still ends (count hit 0)
                puts.append(asyncio.create_task(queue.put(arg)))
        else:
            joins.append(asyncio.create_task(queue.join()))
        await _settle()
        trace.append(([_outcome(t) for t in gets], [_outcome(t) for t in puts], [_outcome(t) for t in joins]))
    for task in gets + puts + joins:
        task.cancel()
    await _settle()
    return trace


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(1, 3))
def test_handoff_behaves_as_asyncio_queue(script: list[tuple[str, int]], maxsize: int) -> None:
    async def both() -> tuple[list[object], list[object]]:
        ours = await _play(Handoff(maxsize), script)
        reference = await _play(asyncio.Queue(maxsize=maxsize), script)
        return ours, reference

    ours, reference = asyncio.run(both())
    assert ours == reference


def test_handoff_rejects_a_size_below_one() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        Handoff(0)


async def test_task_done_too_often_is_an_error() -> None:
    queue: Handoff[int] = Handoff(1)
    await queue.put(1)
    await queue.get()
    queue.task_done()
    with pytest.raises(ValueError, match="too many"):
        queue.task_done()


@pytest.mark.parametrize(
    "make", [lambda: Handoff(2), lambda: asyncio.Queue(maxsize=2)], ids=["ours", "asyncio"]
)
async def test_a_woken_getter_cancelled_before_it_runs_passes_the_item_on(make: Any) -> None:
    queue = make()
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await _settle()
    put = asyncio.create_task(queue.put("item"))
    await asyncio.sleep(0)  # the put runs and wakes the first getter, which has not run yet
    first.cancel()
    await _settle()
    assert put.done()
    assert first.cancelled()
    assert second.done()
    assert second.result() == "item"


@pytest.mark.parametrize(
    "make", [lambda: Handoff(1), lambda: asyncio.Queue(maxsize=1)], ids=["ours", "asyncio"]
)
async def test_a_woken_putter_cancelled_before_it_runs_passes_the_room_on(make: Any) -> None:
    queue = make()
    await queue.put("first")
    blocked = asyncio.create_task(queue.put("cancelled"))
    waiting = asyncio.create_task(queue.put("second"))
    await _settle()
    get = asyncio.create_task(queue.get())
    await asyncio.sleep(0)  # the get runs and wakes the first putter, which has not run yet
    blocked.cancel()
    await _settle()
    assert get.result() == "first"
    assert blocked.cancelled()
    assert waiting.done()
    assert await queue.get() == "second"
