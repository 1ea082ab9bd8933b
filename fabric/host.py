"""Actor agents on one peer: mailboxes, one message at a time, routing, supervision.

An :class:`AgentHost` keeps the node's running actor agents. Each agent has
a bounded mailbox (``mailbox_size`` messages and ``mailbox_max_bytes`` of
payload; a full mailbox refuses and the refusal is counted) and at most one
message in progress: a per-agent lock serialises message handling, hot swaps
and restarts.

Addresses are ``"name"`` (an agent on this peer) or ``"peer_id/name"``.
A message to a local agent is queued in process; a message to another peer
goes to ``remote_send(peer_id, name, sender_address, payload) -> bool``,
the callback the node provides (it signs an envelope and sends it). Messages
arriving from other peers come in through :meth:`AgentHost.deliver` with the
sender's full address. Outside callers (the node, tests) can register Python
sinks for addresses (:meth:`AgentHost.add_sink`), so agents can answer them.

Processing: :meth:`pump` handles queued messages on the calling thread
(tests, benchmarks, a node driving agents from an executor); or
:meth:`start` runs ``workers`` threads that handle mailboxes as messages
arrive. Either way an agent handles one message at a time.

Supervision (DESIGN.md "Actors"): when a message makes the agent trap, the
instance is discarded, the crash is counted, a fresh instance of the same
version is started and the message is retried once; a message that crashes
the agent twice is dropped as poison. A handler that returns non-zero counts
as a handler error. Every outcome is reported to the ``on_outcome`` listeners
(used by :mod:`chimera.fabric.deploy` for automatic rollback).

Hot swap (:meth:`swap`): the new version is instantiated first (a failure
leaves the old one running), then, between two messages, the instance is
replaced. The mailbox is untouched, so no queued message is lost; the
message in progress finishes on the old version. State inside the old
instance is not carried over (an agent keeps durable state by messaging it
somewhere durable).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from .sandbox import (
    DEFAULT_LIMITS,
    NO_GRANTS,
    SEND_BAD_ADDRESS,
    SEND_OK,
    SEND_REFUSED,
    ActorInstance,
    AgentTrap,
    CompiledModule,
    FabricError,
    Grants,
    InputTooLarge,
    Limits,
    SandboxEngine,
)

log = logging.getLogger("chimera.fabric")
DEFAULT_MAILBOX_MAX_BYTES = 16 << 20  # payload bytes queued per agent (AgentHost mailbox_max_bytes)

RemoteSend = Callable[[str, str, str, bytes], bool]
Sink = Callable[[str, bytes], None]
OutcomeListener = Callable[["Outcome"], None]

MAX_NAME_CHARS = 64


def check_agent_name(name: str) -> str:
    """Agent names: 1..64 characters of ``[a-z0-9_.-]``, starting with a letter or digit.

    Raises:
        ValueError: anything else.
    """
    if (not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS
            or not all(c.isascii() and (c.islower() or c.isdigit() or c in "_.-") for c in name)
            or not name[0].isalnum()):
        raise ValueError(f"invalid agent name {str(name)[:80]!r}: 1..64 of [a-z0-9_.-]")
    return name


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one message went.

    Attributes:
        agent: agent name; version: the version that handled it.
        ok: handled with status 0.
        reason: ``"ok"``, ``"handler_error"``, ``"trap"`` (retried), ``"poison"``
            (dropped after the second crash), ``"oversize"``, ``"restart_failed"``.
    """

    agent: str
    version: str
    ok: bool
    reason: str


@dataclass
class _Agent:
    name: str
    version: str
    compiled: CompiledModule
    limits: Limits
    grants: Grants
    instance: ActorInstance | None
    mailbox: deque = field(default_factory=deque)
    mailbox_bytes: int = 0  # payload bytes queued in ``mailbox``
    lock: threading.Lock = field(default_factory=threading.Lock)
    scheduled: bool = False
    stopped: bool = False
    logs: deque = field(default_factory=lambda: deque(maxlen=256))
    counters: Counter = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """A snapshot of one agent (for listings and tests)."""

    name: str
    version: str
    module_sha256: str
    queued: int
    handled: int
    errors: int
    crashes: int
    memory_bytes: int


class AgentHost:
    """The actor agents of one peer.

    Args:
        sandbox: the node's :class:`SandboxEngine`.
        peer_id: this peer's id (agents' addresses are ``peer_id/name``).
        remote_send: route to another peer; returns False when it cannot
            (counted as ``SEND_REFUSED`` for the agent).
        mailbox_size: messages queued per agent at most (>= 1).
        mailbox_max_bytes: payload bytes queued per agent at most (>= 1; a message
            that would pass it is refused like one to a full mailbox: 1024 messages of
            256 KiB from peers would otherwise hold 256 MiB per agent).
        clock_ms: wall-clock milliseconds for ``chimera.now_ms``.
    """

    def __init__(self, sandbox: SandboxEngine, *, peer_id: str = "local", remote_send: RemoteSend | None = None,
                 mailbox_size: int = 1024, mailbox_max_bytes: int = DEFAULT_MAILBOX_MAX_BYTES,
                 clock_ms: Callable[[], int] | None = None) -> None:
        if mailbox_size < 1:
            raise ValueError("mailbox_size must be >= 1")
        if mailbox_max_bytes < 1:
            raise ValueError("mailbox_max_bytes must be >= 1")
        self.sandbox = sandbox
        self.peer_id = peer_id
        self.remote_send = remote_send
        self.mailbox_size = mailbox_size
        self.mailbox_max_bytes = mailbox_max_bytes
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.counters: Counter = Counter()
        self._agents: dict[str, _Agent] = {}
        self._sinks: dict[str, Sink] = {}
        self._listeners: list[OutcomeListener] = []
        self._lock = threading.Lock()
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._running = False
        self._idle = threading.Condition(self._lock)
        self._busy = 0

    # ---------------------------------------------------------------- agents

    def address(self, name: str) -> str:
        return f"{self.peer_id}/{name}"

    def start_agent(self, name: str, compiled: CompiledModule, *, version: str = "1",
                    limits: Limits = DEFAULT_LIMITS, grants: Grants = NO_GRANTS) -> None:
        """Instantiate an actor agent under ``name``.

        Raises:
            ValueError: bad name, or an agent of that name runs already.
            ModuleRejected, AgentTrap (and subclasses): the module cannot start.
        """
        check_agent_name(name)
        with self._lock:
            if name in self._agents:
                raise ValueError(f"agent {name!r} is already running")
        agent = _Agent(name=name, version=version, compiled=compiled, limits=limits, grants=grants, instance=None)
        agent.instance = self._instantiate(agent, compiled, limits, grants)
        with self._lock:
            if name in self._agents:
                agent.instance.close()
                raise ValueError(f"agent {name!r} is already running")
            self._agents[name] = agent

    def _instantiate(self, agent: _Agent, compiled: CompiledModule, limits: Limits, grants: Grants) -> ActorInstance:
        name = agent.name

        def on_send(target: str, payload: bytes) -> int:
            return self._route(self.address(name), target, payload)

        def on_log(line: str) -> None:
            agent.logs.append(line)
            log.info("agent %s: %s", name, line[:200])

        return ActorInstance(self.sandbox, compiled, name=name, address=self.address(name), limits=limits,
                             grants=grants, on_send=on_send, on_log=on_log, clock_ms=self.clock_ms)

    def stop_agent(self, name: str) -> int:
        """Stop and remove an agent; returns how many queued messages were dropped."""
        with self._lock:
            agent = self._agents.pop(name, None)
        if agent is None:
            return 0
        with agent.lock:
            agent.stopped = True
            with self._lock:
                dropped = len(agent.mailbox)
                agent.mailbox.clear()
                agent.mailbox_bytes = 0
            if agent.instance is not None:
                agent.instance.close()
                agent.instance = None
        self.counters["dropped_agent_stopped"] += dropped
        return dropped

    def swap(self, name: str, compiled: CompiledModule, *, version: str, limits: Limits | None = None,
             grants: Grants | None = None) -> str:
        """Hot-swap ``name`` to another module/version between two messages; returns the old version.

        Raises:
            KeyError: no such agent.
            ModuleRejected, AgentTrap (and subclasses): the new version cannot
                start (the old one keeps running).
        """
        agent = self._get(name)
        limits = limits or agent.limits
        grants = grants or agent.grants
        fresh = self._instantiate(agent, compiled, limits, grants)
        with agent.lock:
            old_instance, old_version = agent.instance, agent.version
            agent.instance, agent.version, agent.compiled = fresh, version, compiled
            agent.limits, agent.grants = limits, grants
            agent.counters["swaps"] += 1
        if old_instance is not None:
            old_instance.close()
        return old_version

    def _get(self, name: str) -> _Agent:
        with self._lock:
            agent = self._agents.get(name)
        if agent is None:
            raise KeyError(f"no agent {name!r} on {self.peer_id[:10]}")
        return agent

    def agents(self) -> list[AgentInfo]:
        with self._lock:
            agents = list(self._agents.values())
        return [self.info(a.name) for a in agents]

    def info(self, name: str) -> AgentInfo:
        agent = self._get(name)
        inst = agent.instance
        return AgentInfo(name=agent.name, version=agent.version, module_sha256=agent.compiled.sha256,
                         queued=len(agent.mailbox), handled=agent.counters["handled"],
                         errors=agent.counters["errors"], crashes=agent.counters["crashes"],
                         memory_bytes=inst.memory_bytes() if inst is not None and inst.alive else 0)

    def logs(self, name: str) -> list[str]:
        return list(self._get(name).logs)

    def version(self, name: str) -> str:
        return self._get(name).version

    # --------------------------------------------------------------- routing

    def add_sink(self, name: str, sink: Sink) -> str:
        """Register a Python receiver at ``name`` on this peer; returns its full address."""
        check_agent_name(name)
        with self._lock:
            self._sinks[name] = sink
        return self.address(name)

    def is_sink(self, name: str) -> bool:
        """True when ``name`` is a Python sink (:meth:`add_sink`), not an agent: sinks serve local
        callers only, so the node refuses a peer's message addressed to one."""
        with self._lock:
            return name in self._sinks and name not in self._agents

    def add_listener(self, listener: OutcomeListener) -> None:
        self._listeners.append(listener)

    def _split(self, target: str) -> tuple[str | None, str] | None:
        peer, sep, name = target.rpartition("/")
        if not sep:
            return None, target
        if not peer or "/" in peer:
            return None
        return (None if peer == self.peer_id else peer), name

    def _route(self, sender: str, target: str, payload: bytes) -> int:
        parts = self._split(target)
        if parts is None:
            self.counters["send_bad_address"] += 1
            return SEND_BAD_ADDRESS
        peer, name = parts
        if peer is not None:
            if self.remote_send is None:
                self.counters["send_no_route"] += 1
                return SEND_REFUSED
            try:
                ok = self.remote_send(peer, name, sender, payload)
            except Exception:  # noqa: BLE001 - the node's transport must not crash an agent
                log.exception("remote_send to %s failed", target[:80])
                self.counters["send_remote_failed"] += 1
                return SEND_REFUSED
            if not ok:
                self.counters["send_remote_refused"] += 1
            return SEND_OK if ok else SEND_REFUSED
        return SEND_OK if self.deliver(name, sender, payload) else SEND_REFUSED

    def send(self, sender: str, target: str, payload: bytes) -> bool:
        """Send from a Python caller (``sender`` is its full address) to ``target`` (local or remote)."""
        return self._route(sender, target, payload) == SEND_OK

    def deliver(self, name: str, sender: str, payload: bytes) -> bool:
        """Queue a message for the local agent or sink ``name``.

        Returns:
            False (and counts the drop) for an unknown name, a full mailbox or
            a stopped agent; True once queued (or handed to a sink).
        """
        with self._lock:
            agent = self._agents.get(name)
            sink = None if agent is not None else self._sinks.get(name)
        if agent is None:
            if sink is None:
                self.counters["drop_unknown_agent"] += 1
                return False
            try:
                sink(sender, payload)
            except Exception:  # noqa: BLE001
                log.exception("sink %s failed", name)
                self.counters["drop_sink_failed"] += 1
                return False
            return True
        with self._lock:
            if agent.stopped or len(agent.mailbox) >= self.mailbox_size:
                self.counters["drop_mailbox_full"] += 1
                return False
            if agent.mailbox_bytes + len(payload) > self.mailbox_max_bytes:
                self.counters["drop_mailbox_bytes"] += 1
                return False
            agent.mailbox.append((sender, payload))
            agent.mailbox_bytes += len(payload)
            schedule = self._running and not agent.scheduled
            if schedule:
                agent.scheduled = True
        if schedule:
            self._ready.put(name)
        return True

    # ------------------------------------------------------------ processing

    def process_one(self, name: str) -> Outcome | None:
        """Handle the next queued message of ``name`` on this thread; None if none queued."""
        agent = self._get(name)
        with agent.lock:
            with self._lock:
                if not agent.mailbox or agent.stopped:
                    return None
                sender, payload = agent.mailbox.popleft()
                agent.mailbox_bytes -= len(payload)
            outcome = self._handle_locked(agent, sender, payload)
        self._notify(outcome)
        return outcome

    def call(self, name: str, payload: bytes, sender: str | None = None) -> Outcome:
        """Handle one message right now, on this thread, bypassing the mailbox
        (the fabric's local agent call; still one message at a time per agent)."""
        agent = self._get(name)
        with agent.lock:
            outcome = self._handle_locked(agent, sender or self.address("caller"), payload)
        self._notify(outcome)
        return outcome

    def _notify(self, outcome: Outcome) -> None:
        for listener in list(self._listeners):
            try:
                listener(outcome)
            except Exception:  # noqa: BLE001 - a listener bug must not stop the agent
                log.exception("outcome listener failed")

    def _handle_locked(self, agent: _Agent, sender: str, payload: bytes) -> Outcome:
        version = agent.version
        for attempt in (1, 2):
            inst = agent.instance
            if inst is None or not inst.alive:
                try:
                    inst = agent.instance = self._instantiate(agent, agent.compiled, agent.limits, agent.grants)
                    agent.counters["restarts"] += 1
                except FabricError as exc:
                    log.warning("agent %s@%s cannot restart: %s", agent.name, version, exc)
                    agent.counters["errors"] += 1
                    return Outcome(agent.name, version, False, "restart_failed")
            try:
                status = inst.handle(sender, payload)
            except InputTooLarge:
                agent.counters["errors"] += 1
                self.counters["drop_oversize"] += 1
                return Outcome(agent.name, version, False, "oversize")
            except (AgentTrap, FabricError) as exc:
                agent.counters["crashes"] += 1
                log.warning("agent %s@%s crashed (attempt %d): %s", agent.name, version, attempt, exc)
                inst.close()
                agent.instance = None
                continue
            agent.counters["handled"] += 1
            if status != 0:
                agent.counters["errors"] += 1
                return Outcome(agent.name, version, False, "handler_error")
            return Outcome(agent.name, version, True, "ok")
        agent.counters["errors"] += 1
        agent.counters["poison"] += 1
        self.counters["drop_poison"] += 1
        return Outcome(agent.name, version, False, "poison")

    def pump(self, name: str | None = None, max_messages: int | None = None) -> int:
        """Handle queued messages on this thread (one agent, or all round-robin)
        until none are left or ``max_messages`` were handled; returns the count."""
        done = 0
        while max_messages is None or done < max_messages:
            with self._lock:
                names = [name] if name is not None else [n for n, a in self._agents.items() if a.mailbox]
            progressed = False
            for n in names:
                if max_messages is not None and done >= max_messages:
                    break
                if n in self._agents and self.process_one(n) is not None:
                    done += 1
                    progressed = True
            if not progressed:
                break
        return done

    # --------------------------------------------------------------- workers

    def start(self, workers: int = 2) -> None:
        """Start ``workers`` threads that handle mailboxes as messages arrive."""
        with self._lock:
            if self._running:
                return
            self._running = True
            pending = [n for n, a in self._agents.items() if a.mailbox and not a.scheduled]
            for n in pending:
                self._agents[n].scheduled = True
        for n in pending:
            self._ready.put(n)
        for i in range(workers):
            t = threading.Thread(target=self._work, name=f"agent-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def _work(self) -> None:
        while True:
            name = self._ready.get()
            if name is None:
                return
            with self._lock:
                self._busy += 1
            try:
                for _ in range(32):  # a batch, then yield to other agents
                    try:
                        if self.process_one(name) is None:
                            break
                    except KeyError:
                        break
            finally:
                with self._lock:
                    agent = self._agents.get(name)
                    again = agent is not None and bool(agent.mailbox) and self._running
                    if agent is not None:
                        agent.scheduled = again
                    self._busy -= 1
                    self._idle.notify_all()
                if again:
                    self._ready.put(name)

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """With workers running: wait until every mailbox is empty and no message is in progress."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._busy or any(a.mailbox for a in self._agents.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.1))
        return True

    def close(self) -> None:
        """Stop the workers and every agent."""
        with self._lock:
            self._running = False
        for _ in self._workers:
            self._ready.put(None)
        for t in self._workers:
            t.join(timeout=10)
        self._workers.clear()
        for name in list(self._agents):
            self.stop_agent(name)
