"""Acknowledging finishes in bulk: runs that end within a few milliseconds share one write.

A worker draining a backlog ends many runs at nearly the same moment. Each finish waits
up to ``window`` seconds for others of its class; several are then sent as one
``Task.finish_many`` (a ``bulk_write`` whose every update is guarded by its task's lease,
plus one ``find`` that reads back which landed). A finish that is alone when its window
ends is a plain ``Task.finish()``, so a lone task still costs one command to finish.

Every guarantee of ``finish()`` holds, because anything unusual goes through it: a
result that cannot be stored, a class with concurrency keys, and every task the bulk
write did not finish (cancelled, lease lost, deleted) is finished (or refused) one by
one, which raises exactly what ``finish()`` raises. A bulk write that fails is reported
to every waiter, whose settle retries it as a plain finish (safe: a finish already
applied is recognised by its lease token).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import bson

from beanie_tasks.modelling import encode_value
from beanie_tasks.store import MAX_BATCH
from beanie_tasks.task import Task

# How long a finish waits for others to share its write.
ACK_WINDOW = 0.01


@dataclass
class _Pending:
    """Finishes of one class waiting for their shared write."""

    items: list[tuple[Task, Any, asyncio.Future[None]]] = field(default_factory=list)
    flush: asyncio.TimerHandle | None = None


def bulk_ready(task: Task, result: Any) -> bool:
    """Whether this finish can share a bulk write: a plain class, and a result BSON can store."""
    if task.concurrency_key is not None and type(task).task_store().limits.key_concurrency is not None:
        return False  # its slot is given back by finish() itself
    try:
        bson.encode({"result": encode_value(result)})
    except Exception:  # finish() turns it into "result could not be stored"
        return False
    return True


class FinishBatcher:
    """Collects finishes from concurrently ending runs and writes them together."""

    def __init__(self, window: float = ACK_WINDOW) -> None:
        self.window = window
        self._pending: dict[type[Task], _Pending] = {}
        self._flushes: set[asyncio.Task[None]] = set()
        self.bulk_writes = 0

    async def finish(self, task: Task, result: Any) -> None:
        """Finish ``task`` with ``result``, perhaps together with others; raises what ``finish()`` raises."""
        if self.window <= 0 or not bulk_ready(task, result):
            await task.finish(result)
            return
        loop = asyncio.get_running_loop()
        pending = self._pending.setdefault(type(task), _Pending())
        done: asyncio.Future[None] = loop.create_future()
        pending.items.append((task, result, done))
        if len(pending.items) >= MAX_BATCH:
            self._start_flush(type(task))
        elif pending.flush is None:
            pending.flush = loop.call_later(self.window, self._start_flush, type(task))
        await asyncio.shield(done)  # a cancelled waiter must not cancel the others' write

    def _start_flush(self, task_class: type[Task]) -> None:
        pending = self._pending.pop(task_class, None)
        if pending is None:
            return
        if pending.flush is not None:
            pending.flush.cancel()
        job = asyncio.get_running_loop().create_task(self._flush(task_class, pending.items))
        self._flushes.add(job)
        job.add_done_callback(self._flushes.discard)

    async def _flush(self, task_class: type[Task], items: list[tuple[Task, Any, asyncio.Future[None]]]) -> None:
        if len(items) == 1:
            await self._one_by_one(items)
            return
        try:
            finished = {id(task) for task in await task_class.finish_many([(t, r) for t, r, _ in items])}
            self.bulk_writes += 1
        except Exception as exc:  # every waiter gets it; each retries on its own
            for _, _, done in items:
                if not done.done():
                    done.set_exception(exc)
            return
        for task, _, done in items:
            if id(task) in finished and not done.done():
                done.set_result(None)
        await self._one_by_one([item for item in items if id(item[0]) not in finished])

    @staticmethod
    async def _one_by_one(items: list[tuple[Task, Any, asyncio.Future[None]]]) -> None:
        """Plain finishes: the lone one, and those the bulk write did not finish (they say why)."""
        for task, result, done in items:
            try:
                await task.finish(result)
            except asyncio.CancelledError:
                done.cancel()
                raise
            except Exception as exc:  # handed to the waiter, who handles it
                if not done.done():
                    done.set_exception(exc)
            else:
                if not done.done():
                    done.set_result(None)

    async def close(self) -> None:
        """Send what is waiting now and wait for every write in flight."""
        for task_class in list(self._pending):
            self._start_flush(task_class)
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
