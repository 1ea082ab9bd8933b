"""Versioned deployment of agents: ``name@version``, hot swap, automatic rollback.

A :class:`DeploymentManager` ties a :class:`~chimera.fabric.modules.ModuleStore`
(the ``.wasm`` bytes by hash), the :class:`~chimera.fabric.sandbox.SandboxEngine`
and an :class:`~chimera.fabric.host.AgentHost` (actor agents) together, and
records every change as a :class:`DeploymentEvent` in a
:class:`DeploymentStore` (a small port: :class:`MemoryDeploymentStore` here,
``chimera.node.agent_store.SqliteDeploymentStore`` on a node). The current
state is derived from the event history (:func:`current_deployments`), so a
restarted node redeploys exactly what it acknowledged (:meth:`DeploymentManager.restore`).

Actions (``DeploymentEvent.action``): ``deploy`` (first version), ``upgrade``
(hot swap to a new version; queued messages are kept), ``rollback`` (back to
the previous version, by hand), ``auto_rollback`` (the error-rate monitor did
it) and ``remove``.

Automatic rollback (:class:`RollbackPolicy`): after an upgrade, the outcomes
of the new version (a message handled with status 0, or a task that exited
0, is a success; a trap, a handler error, a poison drop or a failed task is
an error) go into a sliding window of the last ``window`` outcomes. Once it
holds at least ``min_samples`` outcomes and the error fraction is strictly
above ``max_error_rate``, the manager swaps back to the previous version and
records ``auto_rollback`` with the measured rate. Counting outcomes instead
of seconds keeps the rule deterministic; a version that is never called is
never judged.

Restore: :meth:`DeploymentManager.restore` starts each deployed agent on its
own. One that cannot start (its module is missing or damaged, or it traps
at start) does not stop the others: it stays deployed, is listed in
:attr:`DeploymentManager.restore_failures` with the reason (logged once,
counted as ``agents_restore_failed``) and :meth:`DeploymentManager.state`
reports it ``failed``. An ``upgrade`` or ``rollback`` of such an actor starts
the chosen version afresh; ``remove`` forgets it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Annotated, Callable, Iterable, Protocol

from chimera.protocol.messages import MaxLen, Range, record

from .host import AgentHost, Outcome, check_agent_name
from .modules import ModuleNotFound, ModuleStore, check_hash_name
from .sandbox import (
    DEFAULT_LIMITS,
    NO_GRANTS,
    CompiledModule,
    FabricError,
    Grants,
    Limits,
    SandboxEngine,
    TaskResult,
    check_task_module,
)

log = logging.getLogger("chimera.fabric.deploy")

ACTIONS = ("deploy", "upgrade", "rollback", "auto_rollback", "remove")
KINDS = ("actor", "task")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")


def check_version(version: str) -> str:
    """Versions: 1..32 of ``[A-Za-z0-9._+-]``, starting with a letter or digit (``ValueError`` otherwise)."""
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise ValueError(f"invalid version {str(version)[:40]!r}")
    return version


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"name@version"`` -> ``(name, version)``; ``"name"`` -> ``(name, None)``.

    Raises:
        ValueError: a bad name or version.
    """
    name, sep, version = ref.partition("@")
    check_agent_name(name)
    return name, (check_version(version) if sep else None)


@record
class DeploymentEvent:
    """One change to one agent's deployment (what the history keeps).

    Fields:
        seq: position in the store's history (assigned by the store, from 1;
            0 before it is stored).
        name, version: the agent and the version this event made current
            (for ``remove``: the version removed).
        action: one of :data:`ACTIONS`.
        kind: ``"actor"`` or ``"task"``.
        module_sha256: hex SHA-256 of the version's module.
        at_ms: wall-clock milliseconds.
        reason: free text (e.g. the measured error rate of an auto rollback).
    """

    seq: Annotated[int, Range(0, 2**63 - 1)] = 0
    name: Annotated[str, MaxLen(64)]
    version: Annotated[str, MaxLen(32)]
    action: Annotated[str, MaxLen(16)]
    kind: Annotated[str, MaxLen(8)]
    module_sha256: Annotated[str, MaxLen(64)]
    at_ms: Annotated[int, Range(0, 2**63 - 1)]
    reason: Annotated[str, MaxLen(256)] = ""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown deployment action {self.action!r}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown agent kind {self.kind!r}")
        check_agent_name(self.name)
        check_version(self.version)
        check_hash_name(self.module_sha256)

    def describe(self) -> str:
        extra = f" ({self.reason})" if self.reason else ""
        return f"#{self.seq} {self.action} {self.kind} {self.name}@{self.version} {self.module_sha256[:12]}{extra}"


class DeploymentStore(Protocol):
    """Port: an append-only history of deployment events.

    ``append`` commits durably before returning (a node acknowledges a
    deployment only after this) and returns the event with its ``seq``
    assigned; ``events`` returns them in ``seq`` order, optionally for one name.
    """

    def append(self, event: DeploymentEvent) -> DeploymentEvent: ...

    def events(self, name: str | None = None) -> list[DeploymentEvent]: ...


class MemoryDeploymentStore:
    """In-memory :class:`DeploymentStore` (tests, simulations)."""

    def __init__(self) -> None:
        self._events: list[DeploymentEvent] = []
        self._lock = threading.Lock()

    def append(self, event: DeploymentEvent) -> DeploymentEvent:
        with self._lock:
            stored = DeploymentEvent(seq=len(self._events) + 1, name=event.name, version=event.version,
                                     action=event.action, kind=event.kind, module_sha256=event.module_sha256,
                                     at_ms=event.at_ms, reason=event.reason)
            self._events.append(stored)
            return stored

    def events(self, name: str | None = None) -> list[DeploymentEvent]:
        with self._lock:
            return [e for e in self._events if name is None or e.name == name]


@dataclass(frozen=True, slots=True)
class Deployed:
    """The current state of one deployed agent (derived from its history).

    ``versions`` is the stack of versions it went through that a rollback
    can return to: ``(version, module_sha256)``, oldest first; the last is current.
    """

    name: str
    kind: str
    version: str
    module_sha256: str
    versions: tuple[tuple[str, str], ...]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def previous(self) -> tuple[str, str] | None:
        return self.versions[-2] if len(self.versions) >= 2 else None


def current_deployments(events: Iterable[DeploymentEvent]) -> dict[str, Deployed]:
    """Replay a history into the current deployments (name -> :class:`Deployed`)."""
    state: dict[str, Deployed] = {}
    for e in events:
        if e.action == "remove":
            state.pop(e.name, None)
            continue
        if e.action == "deploy":
            versions: tuple[tuple[str, str], ...] = ((e.version, e.module_sha256),)
        else:
            prior = state.get(e.name)
            versions = prior.versions if prior is not None else ()
            if e.action == "upgrade":
                versions = versions + ((e.version, e.module_sha256),)
            else:  # rollback / auto_rollback: pop back to the named version
                while versions and versions[-1][0] != e.version:
                    versions = versions[:-1]
                if not versions:
                    versions = ((e.version, e.module_sha256),)
        state[e.name] = Deployed(name=e.name, kind=e.kind, version=e.version, module_sha256=e.module_sha256,
                                 versions=versions)
    return state


@dataclass(frozen=True, slots=True, kw_only=True)
class RollbackPolicy:
    """Automatic rollback rule.

    Attributes:
        window: outcomes kept per version (sliding), >= 1.
        min_samples: outcomes needed before judging, 1..window.
        max_error_rate: roll back when errors / outcomes is strictly above this, in [0, 1).
    """

    window: int = 50
    min_samples: int = 10
    max_error_rate: float = 0.5

    def __post_init__(self) -> None:
        if self.window < 1 or not 1 <= self.min_samples <= self.window:
            raise ValueError("need window >= 1 and 1 <= min_samples <= window")
        if not 0.0 <= self.max_error_rate < 1.0:
            raise ValueError("max_error_rate must be in [0, 1)")


class ErrorWindow:
    """Sliding window of the last ``window`` outcomes (True = error)."""

    def __init__(self, policy: RollbackPolicy) -> None:
        self.policy = policy
        self._outcomes: deque[bool] = deque(maxlen=policy.window)

    def record(self, error: bool) -> None:
        self._outcomes.append(error)

    @property
    def samples(self) -> int:
        return len(self._outcomes)

    @property
    def error_rate(self) -> float:
        return sum(self._outcomes) / len(self._outcomes) if self._outcomes else 0.0

    def exceeded(self) -> bool:
        return self.samples >= self.policy.min_samples and self.error_rate > self.policy.max_error_rate


@dataclass(frozen=True, slots=True)
class _Spec:
    limits: Limits
    grants: Grants


class DeploymentManager:
    """Deploy, upgrade, roll back and remove agents; watch new versions' error rates.

    Args:
        sandbox: the engine; modules: where the ``.wasm`` bytes live;
        host: the actor host; store: the history port;
        policy: the automatic rollback rule;
        clock_ms: wall-clock milliseconds for event timestamps;
        on_event: called with each stored :class:`DeploymentEvent`
            (e.g. the node emits ``agent_swapped``);
        limits: the limits of an agent deployed or restored without its own
            (a node passes its ``fabric_max_wasm_memory_bytes`` here).
    Thread-safe: changes are serialised by one lock; the monitor may roll back
    from a worker thread.

    Attributes:
        restore_failures: name -> why that deployed agent is not running
            (it could not be restored; cleared when an upgrade, rollback or
            remove deals with it, or a later :meth:`restore` starts it).
        counters: ``agents_restored``, ``agents_restore_failed``.
    """

    def __init__(self, sandbox: SandboxEngine, modules: ModuleStore, host: AgentHost, store: DeploymentStore, *,
                 policy: RollbackPolicy | None = None, clock_ms: Callable[[], int] | None = None,
                 on_event: Callable[[DeploymentEvent], None] | None = None,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.sandbox, self.modules, self.host, self.store = sandbox, modules, host, store
        self.limits = limits
        self.policy = policy or RollbackPolicy()
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.on_event = on_event
        self._lock = threading.RLock()
        self._windows: dict[tuple[str, str], ErrorWindow] = {}
        self._specs: dict[str, _Spec] = {}
        self.restore_failures: dict[str, str] = {}
        self._tasks_checked: dict[str, str] = {}  # task agent -> module hash restore() verified
        self.counters: Counter = Counter()
        host.add_listener(self._on_outcome)

    # ------------------------------------------------------------- queries

    def current(self) -> dict[str, Deployed]:
        return current_deployments(self.store.events())

    def get(self, name: str) -> Deployed:
        deployed = self.current().get(name)
        if deployed is None:
            raise KeyError(f"agent {name!r} is not deployed")
        return deployed

    def state(self, name: str) -> tuple[str, str]:
        """``(state, reason)`` of a deployed agent: ``("running", "")`` for an actor the host runs,
        ``("ready", "")`` for a task agent, ``("failed", why)`` for one that could not be restored,
        ``("stopped", "")`` for an actor the host does not run for another reason.

        Raises:
            KeyError: not deployed.
        """
        deployed = self.get(name)
        reason = self.restore_failures.get(name)
        if reason is not None:
            return "failed", reason
        if deployed.kind == "task":
            return "ready", ""
        return ("running", "") if self._host_runs(name) else ("stopped", "")

    def _host_runs(self, name: str) -> bool:
        try:
            self.host.version(name)
        except KeyError:
            return False
        return True

    def history(self, name: str | None = None) -> list[DeploymentEvent]:
        return self.store.events(name)

    def error_rate(self, name: str, version: str) -> tuple[float, int]:
        """(error fraction, samples) of ``name@version`` in its monitoring window."""
        window = self._windows.get((name, version))
        return (window.error_rate, window.samples) if window else (0.0, 0)

    # ------------------------------------------------------------- changes

    def _record(self, action: str, kind: str, name: str, version: str, sha: str, reason: str = "") -> DeploymentEvent:
        event = self.store.append(DeploymentEvent(name=name, version=version, action=action, kind=kind,
                                                  module_sha256=sha, at_ms=int(self.clock_ms()), reason=reason[:256]))
        log.info("deployment %s", event.describe())
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001
                log.exception("deployment event listener failed")
        return event

    def _holding(self, module: bytes | str):
        """A module named by hash stays pinned in the store (out of the fetched-module quota's
        reach) until the deploy or upgrade that names it is recorded; bytes are stored as a
        local module, never under the quota. Raises ModuleNotFound."""
        return self.modules.held(module) if isinstance(module, str) else nullcontext()

    def _module(self, module: bytes | str) -> tuple[str, CompiledModule]:
        sha = module if isinstance(module, str) else self.modules.put(module)
        compiled = self.sandbox.compile(self.modules.get(sha))
        return sha, compiled

    def _spec(self, name: str) -> _Spec:
        return self._specs.get(name) or _Spec(self.limits, NO_GRANTS)

    def deploy(self, ref: str, module: bytes | str, *, kind: str = "actor", limits: Limits | None = None,
               grants: Grants = NO_GRANTS) -> DeploymentEvent:
        """Deploy ``name@version`` from module bytes or a stored module hash
        (``limits`` default: the manager's).

        Raises:
            ValueError: bad ref, unknown kind, or the name is deployed already.
            ModuleRejected / AgentTrap family: the module cannot run as that kind
                (a task: :func:`~chimera.fabric.sandbox.check_task_module`; an actor: it must start).
            ModuleNotFound: an unknown hash.
        """
        limits = self.limits if limits is None else limits
        name, version = parse_ref(ref)
        if version is None:
            raise ValueError("deploy needs name@version")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        with self._lock:
            if name in self.current():
                why = self.restore_failures.get(name)
                state = f" (not running: {why})" if why else ""
                raise ValueError(f"{name} is deployed already{state}; use upgrade")
            with self._holding(module):
                sha, compiled = self._module(module)
                if kind == "actor":
                    self.host.start_agent(name, compiled, version=version, limits=limits, grants=grants)
                else:
                    check_task_module(compiled)
                self._specs[name] = _Spec(limits, grants)
                return self._record("deploy", kind, name, version, sha)

    def upgrade(self, ref: str, module: bytes | str) -> DeploymentEvent:
        """Hot-swap ``name`` to ``version`` (queued messages are kept).

        Raises:
            KeyError: not deployed. ValueError: same version as current, bad ref.
            ModuleRejected / AgentTrap family: the new version fails the checks of a deploy of the
                agent's kind (an actor's cannot start; a task's cannot run, e.g. no ``_start`` or
                ``chimera`` imports); the current version keeps serving and nothing is recorded.
        """
        name, version = parse_ref(ref)
        if version is None:
            raise ValueError("upgrade needs name@version")
        with self._lock:
            deployed = self.get(name)
            if version == deployed.version:
                raise ValueError(f"{name}@{version} is already current")
            with self._holding(module):
                sha, compiled = self._module(module)
                spec = self._spec(name)
                if deployed.kind == "actor":
                    self._swap_or_start(name, compiled, version, spec)
                else:  # the same check as deploy: the current version keeps serving
                    check_task_module(compiled)
                self.restore_failures.pop(name, None)
                self._windows[(name, version)] = ErrorWindow(self.policy)
                return self._record("upgrade", deployed.kind, name, version, sha)

    def rollback(self, name: str, *, reason: str = "", automatic: bool = False) -> DeploymentEvent:
        """Return ``name`` to its previous version.

        Raises:
            KeyError: not deployed. ValueError: no previous version.
        """
        with self._lock:
            deployed = self.get(name)
            previous = deployed.previous
            if previous is None:
                raise ValueError(f"{name}@{deployed.version} has no previous version")
            version, sha = previous
            _, compiled = self._module(sha)
            spec = self._spec(name)
            if deployed.kind == "actor":
                self._swap_or_start(name, compiled, version, spec)
            self.restore_failures.pop(name, None)
            self._windows.pop((name, deployed.version), None)
            return self._record("auto_rollback" if automatic else "rollback", deployed.kind, name, version, sha,
                                reason or f"from {deployed.version}")

    def remove(self, name: str) -> DeploymentEvent:
        """Stop and forget ``name`` (its queued messages are dropped and counted)."""
        with self._lock:
            deployed = self.get(name)
            if deployed.kind == "actor":
                self.host.stop_agent(name)  # 0 (nothing to stop) for one that could not be restored
            self._specs.pop(name, None)
            self.restore_failures.pop(name, None)
            return self._record("remove", deployed.kind, name, deployed.version, deployed.module_sha256)

    def _swap_or_start(self, name: str, compiled, version: str, spec: _Spec) -> None:
        """Hot-swap a running actor; start one the host does not run (it could not be restored)."""
        if self._host_runs(name):
            self.host.swap(name, compiled, version=version, limits=spec.limits, grants=spec.grants)
        else:
            self.host.start_agent(name, compiled, version=version, limits=spec.limits, grants=spec.grants)

    def restore(self, *, limits: Limits | None = None, grants: Grants = NO_GRANTS) -> list[str]:
        """After a restart: start every deployed actor at its current version; returns the refs restored.

        Each agent is restored on its own: one whose module is missing or
        damaged, or that cannot start, is logged once (ERROR, with the reason),
        counted (``agents_restore_failed``) and kept in :attr:`restore_failures`
        (it stays deployed; :meth:`state` says ``failed``), and the others are
        still started. A task agent's module is checked the same way
        (:func:`~chimera.fabric.sandbox.check_task_module`). Calling it again
        retries the failed ones and leaves running actors alone. ``limits``
        default: the manager's.
        """
        limits = self.limits if limits is None else limits
        started = []
        with self._lock:
            current = self.current()
            for name in list(self.restore_failures):
                if name not in current:
                    del self.restore_failures[name]
            for name, deployed in current.items():
                self._specs.setdefault(name, _Spec(limits, grants))
                spec = self._specs[name]
                if name not in self.restore_failures and (
                        self._host_runs(name) if deployed.kind == "actor"
                        else self._tasks_checked.get(name) == deployed.module_sha256):
                    continue  # restored already (a second call)
                try:
                    _, compiled = self._module(deployed.module_sha256)
                    if deployed.kind == "actor":
                        self.host.start_agent(name, compiled, version=deployed.version, limits=spec.limits,
                                              grants=spec.grants)
                    else:
                        check_task_module(compiled)
                except Exception as exc:  # noqa: BLE001 - one bad agent must not keep the others down
                    reason = _restore_reason(exc, deployed.module_sha256)
                    if name not in self.restore_failures:  # logged and counted once, not on every retry
                        log.error("agent %s could not be restored (not running): %s", deployed.ref, reason)
                        self.counters["agents_restore_failed"] += 1
                    self.restore_failures[name] = reason
                    continue
                if self.restore_failures.pop(name, None) is not None:
                    log.info("agent %s restored after an earlier failure", deployed.ref)
                if deployed.kind == "task":
                    self._tasks_checked[name] = deployed.module_sha256
                self.counters["agents_restored"] += 1
                started.append(deployed.ref)
        return started

    # ------------------------------------------------------------- tasks

    def run_task(self, name: str, stdin: bytes) -> TaskResult:
        """Run the current version of task agent ``name`` once; the outcome feeds its error window.

        Raises:
            KeyError: not deployed as a task. FabricError family: as
            :meth:`SandboxEngine.run_task` (counted as an error first).
        """
        deployed = self.get(name)
        if deployed.kind != "task":
            raise KeyError(f"{name} is not a task agent")
        _, compiled = self._module(deployed.module_sha256)
        spec = self._spec(name)
        try:
            result = self.sandbox.run_task(compiled, stdin, limits=spec.limits, grants=spec.grants, name=name)
        except FabricError:
            self._observe(name, deployed.version, error=True)
            raise
        self._observe(name, deployed.version, error=not result.ok)
        return result

    # ------------------------------------------------------------- monitor

    def _on_outcome(self, outcome: Outcome) -> None:
        self._observe(outcome.agent, outcome.version, error=not outcome.ok)

    def _observe(self, name: str, version: str, *, error: bool) -> None:
        window = self._windows.get((name, version))
        if window is None:
            return
        window.record(error)
        if not window.exceeded():
            return
        with self._lock:
            if self._windows.get((name, version)) is not window:
                return  # rolled back meanwhile
            try:
                deployed = self.get(name)
            except KeyError:
                return
            if deployed.version != version or deployed.previous is None:
                return
            rate = window.error_rate
            self.rollback(name, automatic=True,
                          reason=f"error rate {rate:.2f} over {window.samples} outcomes of {version} "
                                 f"> {self.policy.max_error_rate}")


def _restore_reason(exc: Exception, sha: str) -> str:
    """One line saying why an agent could not be restored (<= 256 characters)."""
    if isinstance(exc, ModuleNotFound):
        return f"module {sha[:12]} is not stored on this node (ModuleNotFound)"
    return f"{type(exc).__name__}: {exc}"[:256]
