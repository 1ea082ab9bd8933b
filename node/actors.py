"""Actors (DESIGN.md): own state, a bounded mailbox, one message at a time.

A :class:`Supervisor` runs each actor. When ``handle`` raises, the crash is
logged and counted, the actor is restarted (``on_restart``) and the same
message is retried once; a message that crashes the actor twice is dropped as
poison. Mailboxes are bounded: :meth:`ActorCell.tell` returns False (and the
caller counts the drop) when full, so a flood cannot exhaust memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger("chimera.actors")


@dataclass(frozen=True, slots=True)
class ActorRef:
    """Address of an actor: ``(peer_id, name)``."""

    peer_id: str
    name: str


class Actor:
    """Base class: override ``handle`` (and ``on_restart`` to reset state)."""

    name = "actor"

    async def handle(self, item: object) -> None:
        raise NotImplementedError

    def on_restart(self) -> None:
        """Reset state after a crash; the default keeps it."""


class ActorCell:
    def __init__(self, actor: Actor, mailbox_size: int, counters: Counter) -> None:
        self.actor = actor
        self.mailbox: asyncio.Queue = asyncio.Queue(maxsize=mailbox_size)
        self.counters = counters
        self.task: asyncio.Task | None = None

    def tell(self, item: object) -> bool:
        try:
            self.mailbox.put_nowait(item)
            return True
        except asyncio.QueueFull:  # the caller counts the drop with its reason
            return False

    async def run(self) -> None:
        actor = self.actor
        while True:
            item = await self.mailbox.get()
            for attempt in (1, 2):
                try:
                    await actor.handle(item)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.counters[f"actor_crashes.{actor.name}"] += 1
                    log.exception("actor %s crashed (attempt %d); restarting", actor.name, attempt)
                    actor.on_restart()
                    if attempt == 2:
                        self.counters[f"poison_dropped.{actor.name}"] += 1
                        log.error("actor %s: message dropped as poison", actor.name)


class Supervisor:
    def __init__(self, counters: Counter, mailbox_size: int) -> None:
        self.cells: dict[str, ActorCell] = {}
        self.counters = counters
        self.mailbox_size = mailbox_size

    def spawn(self, actor: Actor) -> ActorCell:
        cell = ActorCell(actor, self.mailbox_size, self.counters)
        cell.task = asyncio.get_running_loop().create_task(cell.run(), name=f"actor:{actor.name}")
        self.cells[actor.name] = cell
        return cell

    def get(self, name: str) -> ActorCell | None:
        return self.cells.get(name)

    async def stop(self) -> None:
        for cell in self.cells.values():
            if cell.task is not None:
                cell.task.cancel()
        for cell in self.cells.values():
            if cell.task is not None:
                try:
                    await cell.task
                except (asyncio.CancelledError, Exception):
                    pass


def call_soon_once(pending: set, key: object, step) -> bool:
    """Run ``step()`` at the next loop iteration, once however often this is asked before
    it runs (``pending``: the caller's set of keys scheduled and not yet run). False, with
    nothing scheduled, without a running loop (tests driving a service directly)."""
    if key in pending:
        return True
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    pending.add(key)

    def run() -> None:
        pending.discard(key)
        step()

    loop.call_soon(run)
    return True


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` seconds pass; True if it was set.

    Built on :func:`asyncio.timeout`, never :func:`asyncio.wait_for`: on Python
    3.11 ``wait_for`` can swallow a cancellation that arrives just as the inner
    wait completes (CPython gh-86296), and a timer task that swallows its
    cancellation leaves ``Node.stop()`` waiting forever.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
        return True
    except TimeoutError:
        return False
