"""Simulated peers running the fabric's placement core (:mod:`chimera.fabric.placement`).

Every simulated peer runs the real :class:`~chimera.fabric.placement.Placement`
core as its submitting side and an executor as its replica side, the way
``node/fabric.py`` drives them; nothing of placement, breakers, retries,
ballots, tallies or certificates is re-implemented here. This module is the
driver (DESIGN.md "two drivers"): it carries the core's actions out with the
simulator's ports and the real fabric wire messages
(:mod:`chimera.fabric.wire`) sealed in real signed envelopes.

What each peer does (as ``node/fabric.py``)
-------------------------------------------
* **Capacity.** Every ``capacity_interval_s`` a peer sends a signed
  ``fabric_capacity`` (:class:`~chimera.fabric.wire.FabricCapacity`, a real
  :class:`~chimera.fabric.resources.Resources`) to every other peer. A
  received advertisement expires after three intervals; the placement core
  sees the peers with a fresh advertisement and the peer itself. This world
  runs no membership core: an advertisement's freshness stands in for the
  node's "alive member" test, so a crashed peer leaves the cores' view when
  its advertisement expires.
* **Weights.** As the node without a consensus log: every peer in view
  weighs 1 (``WeightTable(0, {peer: 1})``). Local reputation does not feed
  placement directly (in the node it does only through committed weight
  tables, i.e. reputation epochs of the BFT log, which this world does not run).
* **Submitting.** ``submit`` -> :meth:`Placement.submit`; :class:`Dispatch`
  becomes ``fabric_task_run`` (a local run when the core picks the submitter
  itself); ``fabric_task_result`` feeds ``on_result`` after the digest is
  recomputed from the reported exit code and stdout (a mismatch is a
  failure, ``inconsistent_digest``), a refusal feeds ``on_failure``;
  :class:`RequestVote` becomes ``fabric_vote_request`` and the signed
  ``fabric_vote`` (whose voter must be the sender) goes to ``on_vote``;
  :class:`TaskAccepted`'s certificate is checked with
  :func:`~chimera.fabric.placement.verify_task_certificate` before the task
  counts as accepted; :class:`Observe` goes into the submitter's
  :class:`~chimera.consensus.reputation.LocalReputation`. The core is ticked
  at its ``next_deadline()`` and at least every second (the node's timer).
* **Executing.** At most ``task_slots`` attempts at once and
  :data:`QUEUE_PER_SLOT` per slot waiting; beyond that an attempt is refused
  (``busy``), as in the node. Each advertisement carries ``task_slots`` and
  ``tasks_running`` into the cores (the peer's own live), so submitters queue
  tasks instead of over-dispatching (and the core's trusted slots discount a
  peer that refused or dropped attempts sent within its advertised room, e.g.
  a crashed peer's timeouts). A cancelled attempt reports nothing; one
  cancelled while it waits is dropped unrun (``cancelled_before_start``). A run
  whose modelled duration exceeds the task's wall time is stopped there and
  refused ``deadline_exceeded`` (the node's epoch deadline; counted
  ``refused_deadline_exceeded``). The replica remembers the digest it reported
  (:class:`~chimera.fabric.placement.ExecutedDigests`, bounded per submitter) and
  signs only that one, on a ballot naming that submitter and task.

The task (modelled)
-------------------
No WebAssembly runs: the task is :func:`word_count_task`, a deterministic
Python function of the task input (line, word and byte counts and the
SHA-256 of the input), named on the wire by the fixed module hash
:data:`TASK_MODULE_SHA256` (no module bytes travel; module fetching is not
simulated). Its *virtual* duration is modelled:
``(exec_base_s + exec_s_per_kib * input KiB) * speed`` with the peer's
``speed`` factor drawn uniformly in ``[0.5, 2.0]`` by the seed (a task whose
duration exceeds ``wall_time_s`` on every peer stands for a module that loops). Every result
a replica returns goes through its behaviour's
:meth:`~chimera.simulations.behaviours.Behaviour.task_result` (honest: the
result unchanged; ``wrong_result``: a wrong stdout, with its own consistent
digest), so a lying replica reports and signs a wrong digest.

Checked and recorded
--------------------
Per task: submitter, replica table, accepted digest vs the correct one,
failure reason, latency. Safety (:class:`SafetyViolation`): an accepted
certificate that does not verify, or a wrong accepted result although the
``wrong_result`` peers of its replica table could not meet the ballot's rule
on their own (:func:`~chimera.consensus.votes.rule_met`). Over time
(``sample_interval_s``): each live submitter's local reputation score of the
honest and of the byzantine peers. Breaker openings are counted from the
cores' :class:`~chimera.fabric.placement.CircuitBreaker` states after each
batch of actions.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterator, Sequence

from chimera.consensus.quorum import CertificateError, WeightTable
from chimera.consensus.reputation import LocalReputation
from chimera.consensus.votes import BallotVote, rule_met
from chimera.fabric.digests import error_digest, result_digest
from chimera.fabric.placement import (
    BreakerState,
    Cancel,
    Dispatch,
    ExecutedDigests,
    Observe,
    Placement,
    PlacementConfig,
    RequestVote,
    TaskAccepted,
    TaskFailed,
    TaskRequirements,
    verify_task_certificate,
    wire_wall_time_ms,
)
from chimera.fabric.resources import Resources
from chimera.fabric.wire import (
    FabricCapacity,
    FabricTaskCancel,
    FabricTaskResult,
    FabricTaskRun,
    FabricVote,
    FabricVoteRequest,
)
from chimera.protocol.envelope import Envelope
from chimera.protocol.errors import LocalProtocolError

from .behaviours import Behaviour, Outgoing
from .bft_world import SafetyViolation
from .engine import Simulator
from .network import SimNetwork
from .signatures import SharedVerifier, shared_vote_verification
from .world import PeerHost, SkewSpec, World

TASK_MODULE_SHA256 = hashlib.sha256(b"chimera-sim/task/word-count-sha256/v1").hexdigest()
"""The module hash the simulated task travels under (64 lowercase hex characters)."""
QUEUE_PER_SLOT = 4
"""Attempts waiting per task slot before more are refused as ``busy`` (the node's value)."""
MAX_TICK_S = 1.0
"""Longest gap between two placement ticks (the node's timer)."""
TASK_FAILURE_REASONS = ("unsatisfiable", "no_capacity", "retries_exhausted", "deadline_exceeded", "no_agreement",
                        "vote_timeout", "cancelled", "invalid_ballot", "submitter_crashed")
"""Why a task fails: the placement core's ``TaskFailed`` reasons, and ``submitter_crashed``
(this world's). Every run's metrics carry a ``failed_<reason>`` column for each, zeros
included (a reason not listed here gets a column in the runs where it occurs)."""
MIN_TICK_S = 0.005
"""Shortest gap between two placement ticks (the node's timer)."""
WORDS = ("mesh", "peer", "vote", "task", "ballot", "replica", "quorum", "digest", "epoch", "fuel",
         "agent", "weight", "certificate", "placement", "breaker", "retry", "lease", "result")
PEER_MEMORY_BYTES = 16 << 30
PEER_WASM_MEMORY_BYTES = 256 << 20
CPU_CHOICES = (2, 4, 8)


def word_count_task(data: bytes) -> bytes:
    """The simulated task: ``b"<lines> <words> <bytes> <sha256 hex>\\n"`` of ``data`` (deterministic)."""
    if type(data) is not bytes:
        raise TypeError("task input must be bytes")
    return b"%d %d %d %s\n" % (data.count(b"\n"), len(data.split()), len(data),
                               hashlib.sha256(data).hexdigest().encode())


@dataclass(frozen=True)
class FabricSetup:
    """How the simulated fabric is loaded (the ``[fabric]`` table of a scenario).

    Fields (units): ``tasks`` submitted in all (>= 1); ``tasks_per_s`` Poisson
    arrival rate over all submitters (> 0, virtual seconds); ``submitters``
    peers 0..submitters-1 submit (honest, >= 1); ``replicas`` per task (1..64);
    ``rule`` and ``threshold`` of the task's ballot (:data:`~chimera.consensus.votes.RULES`;
    ``None``: the rule's default); ``input_words_min``/``input_words_max`` words
    per task input (uniform); ``wall_time_s`` a run may take (> 0);
    ``memory_bytes`` per run; ``fuel`` per run (not consumed by the model);
    ``exec_base_s`` + ``exec_s_per_kib`` per KiB of input: modelled run time
    before the peer's speed factor (>= 0; a run longer than ``wall_time_s`` is
    refused ``deadline_exceeded`` at ``wall_time_s``); ``task_slots`` per peer (>= 1);
    ``capacity_interval_s`` between advertisements (>= 0.1); ``sample_interval_s``
    between reputation samples (> 0); ``placement`` the core's
    :class:`PlacementConfig`.
    Raises:
        ValueError: a field out of range.
    """

    tasks: int = 300
    tasks_per_s: float = 5.0
    submitters: int = 3
    replicas: int = 3
    rule: str = "majority"
    threshold: Fraction | None = None
    input_words_min: int = 50
    input_words_max: int = 400
    wall_time_s: float = 5.0
    memory_bytes: int = 64 << 20
    fuel: int = 1_000_000_000
    exec_base_s: float = 0.05
    exec_s_per_kib: float = 0.1
    task_slots: int = 2
    capacity_interval_s: float = 5.0
    sample_interval_s: float = 5.0
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def __post_init__(self) -> None:
        if self.tasks < 1 or self.submitters < 1 or self.task_slots < 1:
            raise ValueError("tasks, submitters and task_slots must be >= 1")
        if not (math.isfinite(self.tasks_per_s) and self.tasks_per_s > 0):
            raise ValueError("tasks_per_s must be finite and > 0")
        if not 1 <= self.input_words_min <= self.input_words_max:
            raise ValueError("need 1 <= input_words_min <= input_words_max")
        if self.exec_base_s < 0 or self.exec_s_per_kib < 0:
            raise ValueError("exec_base_s and exec_s_per_kib must be >= 0")
        if self.capacity_interval_s < 0.1 or not self.sample_interval_s > 0:
            raise ValueError("capacity_interval_s must be >= 0.1 and sample_interval_s > 0")
        try:  # the core's own checks (replicas, rule, wall time, memory, fuel)
            self.requirements()
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from None

    def requirements(self) -> TaskRequirements:
        """The :class:`TaskRequirements` of every simulated task."""
        return TaskRequirements(fuel=self.fuel, memory_bytes=self.memory_bytes, wall_time_s=self.wall_time_s,
                                replicas=self.replicas, rule=self.rule, threshold=self.threshold)


@contextlib.contextmanager
def shared_fabric_verification() -> Iterator[SharedVerifier]:
    """:func:`~chimera.simulations.signatures.shared_vote_verification`, extended to
    ``verify_vote`` as imported by :mod:`chimera.consensus.votes` (ballot votes checked
    by the tally): one Ed25519 verification per distinct signed statement."""
    with shared_vote_verification(also=("chimera.consensus.votes",)) as verifier:
        yield verifier


@dataclass
class TaskRecord:
    """One submitted task as the world sees it (virtual seconds)."""

    task_id: str
    submitter: str
    input: bytes
    correct: bytes                      # the digest an honest replica reports
    submitted_s: float
    state: str = "running"              # running | accepted | failed
    finished_s: float | None = None
    digest: bytes | None = None
    wrong: bool = False
    byzantine_majority: bool = False    # the table's byzantine peers meet the rule alone
    replicas: tuple[str, ...] = ()
    reason: str = ""


@dataclass
class _Run:
    """An attempt this peer executes for ``submitter``."""

    submitter: str
    msg: FabricTaskRun
    cancelled: bool = False
    started: bool = False


class FabricPeer(PeerHost):
    """A peer with the real placement core (submitting side) and a task executor (replica side).

    Args:
        world: the :class:`FabricWorld`.
        index: peer number.
        behaviour: honest or byzantine (``wrong_result`` lies about results).
        speed: run-time factor of the modelled task (> 0; 2.0 is twice as slow).
        cpu_count: CPUs advertised (>= 1).
    """

    epoch = 0  # behaviours' context: the weight table in force

    def __init__(self, world: "FabricWorld", index: int, behaviour: Behaviour | None = None, *,
                 speed: float = 1.0, cpu_count: int = 4) -> None:
        super().__init__(world, index, behaviour)
        if not (math.isfinite(speed) and speed > 0) or cpu_count < 1:
            raise ValueError("speed must be finite and > 0, cpu_count >= 1")
        self.fworld = world
        self.speed = speed
        self.cpu_count = cpu_count
        self.placement: Placement | None = None
        self.reputation = LocalReputation()
        self.capacity: dict[str, tuple[Resources, float]] = {}  # peer -> (resources, expires at, local s)
        self.running: dict[tuple[str, str, int], _Run] = {}
        self.waiting: deque[tuple[str, str, int]] = deque()
        self.active = 0
        self.executed = ExecutedDigests()
        self.incarnation = 0
        self._next_advert = math.inf
        self._breaker_seen: dict[str, float] = {}
        self._task_seq = 0

    # ---------------------------------------------------------- context for behaviours

    def honest_peer_ids(self) -> Sequence[str]:
        return self.fworld.honest_ids

    # ---------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Boot with empty memory (a restart loses tasks, capacity views and reputation, as the node does)."""
        self.boot()
        self.incarnation += 1
        setup = self.fworld.setup
        self.placement = Placement(setup.placement, network_id=self.network_id, submitter=self.peer_id,
                                   rng=random.Random(self.rng.getrandbits(64)))
        self.reputation = LocalReputation()
        self.capacity, self.running, self.waiting, self.active = {}, {}, deque(), 0
        self.executed = ExecutedDigests()
        self._breaker_seen = {}
        self._next_advert = self.clock.now()
        self.sim.log(f"start {self.name}")
        self.wake_at(self._next_advert)

    def crash(self) -> None:
        super().crash()
        self.placement = None

    def resources(self) -> Resources:
        """What this peer advertises now: ``load_1m`` is the attempts it holds (running or queued)."""
        setup = self.fworld.setup
        used = len(self.running) * setup.memory_bytes
        return Resources(cpu_count=self.cpu_count, load_1m=float(len(self.running)),
                         memory_total_bytes=PEER_MEMORY_BYTES,
                         memory_available_bytes=max(0, PEER_MEMORY_BYTES - used),
                         max_wasm_memory_bytes=PEER_WASM_MEMORY_BYTES)

    # ---------------------------------------------------------- sending

    def send(self, targets: tuple[str, ...], message: object) -> None:
        """Seal ``message`` for ``targets`` through the behaviour (byzantine peers may alter it)."""
        outs = self.behaviour.outgoing(self, message, targets) if self.behaviour.byzantine \
            else [Outgoing(targets, message)]
        self.emit(outs, self.fworld.address_of)

    # ---------------------------------------------------------- timer

    def on_wake(self, now: float) -> None:
        if self.placement is None:
            return
        if now >= self._next_advert:
            self._next_advert = now + self.fworld.setup.capacity_interval_s
            self._advertise()
        self._refresh_peers(now)
        self.run_actions(self.placement.tick(now))

    def rearm(self) -> None:
        """Wake at the core's next deadline, the next advertisement or in at most a second."""
        if not self.up or self.placement is None:
            return
        now = self.clock.now()
        deadlines = [self._next_advert]
        nd = self.placement.next_deadline()
        if nd is not None:
            deadlines.append(nd)
        self.wake_at(now + min(MAX_TICK_S, max(MIN_TICK_S, min(deadlines) - now)))

    def _advertise(self) -> None:
        setup = self.fworld.setup
        msg = FabricCapacity(resources=self.resources(), task_slots=min(setup.task_slots, 1024),
                             tasks_running=min(len(self.running), 1024),
                             interval_ms=max(100, int(setup.capacity_interval_s * 1000)))
        targets = tuple(p.peer_id for p in self.fworld.peers if p is not self)
        self.send(targets, msg)

    def _weights(self) -> WeightTable:
        """Equal weights of the peers in view (the node's rule without a consensus log)."""
        return WeightTable(0, {p: 1 for p in sorted({self.peer_id, *self.capacity})})

    def _refresh_peers(self, now: float) -> None:
        placement = self.placement
        for peer, (_, expires) in sorted(self.capacity.items()):
            if now >= expires:
                del self.capacity[peer]
                self.run_actions(placement.remove_peer(peer, now), rearm=False)
        for peer in sorted(p for p in placement.peers if p != self.peer_id and p not in self.capacity):
            self.run_actions(placement.remove_peer(peer, now), rearm=False)
        placement.set_weights(self._weights())
        placement.update_peer(self.peer_id, self.resources(), task_slots=min(self.fworld.setup.task_slots, 1024),
                              tasks_running=min(len(self.running), 1024))  # our own slots, as they are now
        for peer, (res, _) in sorted(self.capacity.items()):
            placement.update_peer(peer, res)

    # ---------------------------------------------------------- receiving

    def on_envelope(self, envelope: Envelope) -> None:
        if self.placement is None:
            return
        msg, sender = envelope.message, envelope.sender
        now = self.clock.now()
        if isinstance(msg, FabricCapacity):
            self.capacity[sender] = (msg.resources, now + 3 * msg.interval_ms / 1000)
            self.placement.update_peer(sender, msg.resources, task_slots=msg.task_slots,
                                       tasks_running=msg.tasks_running)
            self.rearm()
        elif isinstance(msg, FabricTaskRun):
            self._on_task_run(sender, msg)
        elif isinstance(msg, FabricTaskResult):
            self._on_task_result(sender, msg)
        elif isinstance(msg, FabricTaskCancel):
            run = self.running.get((sender, msg.task_id, msg.attempt))
            if run is not None:
                run.cancelled = True
        elif isinstance(msg, FabricVoteRequest):
            self.run_actions(self._on_vote_request(sender, msg))
        elif isinstance(msg, FabricVote):
            if msg.vote.voter != sender:
                self.counters["drop_vote_not_own"] += 1
                return
            self.run_actions(self.placement.on_vote(msg.task_id, msg.vote, now))
        else:
            self.counters["ignored_message"] += 1

    # ---------------------------------------------------------- executing (replica side)

    def _reply(self, submitter: str, result: FabricTaskResult) -> None:
        if submitter == self.peer_id:
            self._on_task_result(self.peer_id, result)
        else:
            self.send((submitter,), result)

    def _refuse(self, submitter: str, msg: FabricTaskRun, reason: str, detail: str = "") -> None:
        self.fworld.counters[f"refused_{reason}"] += 1
        self._reply(submitter, FabricTaskResult(task_id=msg.task_id, attempt=msg.attempt, status="refused",
                                                reason=reason, detail=detail[:256]))

    def _on_task_run(self, submitter: str, msg: FabricTaskRun) -> None:
        key = (submitter, msg.task_id, msg.attempt)
        setup = self.fworld.setup
        if key in self.running:
            self.fworld.counters["task_run_duplicate"] += 1
            return
        if len(self.running) >= setup.task_slots * (1 + QUEUE_PER_SLOT):
            self._refuse(submitter, msg, "busy", f"{setup.task_slots} task slots busy")
            return
        if sum(1 for k in self.running if k[0] == submitter) >= setup.task_slots * QUEUE_PER_SLOT:
            self._refuse(submitter, msg, "busy", "this submitter holds its share")  # as node/fabric.py
            return
        if msg.gpu_indices:
            self._refuse(submitter, msg, "gpu_unavailable", "this peer has no GPUs")
            return
        if msg.memory_bytes > PEER_WASM_MEMORY_BYTES:
            self._refuse(submitter, msg, "over_capacity", "memory_bytes above this peer's per-agent cap")
            return
        if msg.module_sha256 != TASK_MODULE_SHA256:
            self._refuse(submitter, msg, "module_unavailable", "only the simulated task module exists")
            return
        self.running[key] = _Run(submitter, msg)
        self.waiting.append(key)
        self._pump()

    def _local_run(self, incarnation: int, msg: FabricTaskRun) -> None:
        if incarnation == self.incarnation and self.up and self.placement is not None:
            self._on_task_run(self.peer_id, msg)

    def _pump(self) -> None:
        """Start waiting attempts while a slot is free (cancelled ones are dropped unrun)."""
        setup = self.fworld.setup
        while self.active < setup.task_slots and self.waiting:
            key = self.waiting.popleft()
            run = self.running.get(key)
            if run is None:
                continue
            if run.cancelled:
                del self.running[key]
                self.fworld.counters["cancelled_before_start"] += 1
                continue
            run.started = True
            self.active += 1
            kib = len(run.msg.input) / 1024.0
            duration = (setup.exec_base_s + setup.exec_s_per_kib * kib) * self.speed
            wall_time_s = run.msg.wall_time_ms / 1000
            exceeded = duration > wall_time_s  # the epoch deadline stops the run at its wall time
            self.sim.schedule(self.sim.now + min(duration, wall_time_s), self._done, self.incarnation, key,
                              min(duration, wall_time_s), exceeded)

    def _done(self, incarnation: int, key: tuple[str, str, int], duration: float, exceeded: bool) -> None:
        if incarnation != self.incarnation or not self.up:
            return
        self.active -= 1
        run = self.running.pop(key, None)
        if run is not None and run.cancelled:
            self.fworld.counters["result_after_cancel"] += 1
            run = None
        if run is not None and exceeded:  # as the node: wall time is not deterministic, no result
            msg = run.msg
            self.fworld.counters["refused_deadline_exceeded"] += 1
            self._reply(run.submitter, FabricTaskResult(
                task_id=msg.task_id, attempt=msg.attempt, status="refused", reason="deadline_exceeded",
                detail=f"ran past its {msg.wall_time_ms / 1000:g} s deadline", elapsed_ms=int(duration * 1000)))
        elif run is not None:
            msg = run.msg
            honest = word_count_task(msg.input)
            stdout = self.behaviour.task_result(self, msg, honest)  # every result goes through the behaviour
            if type(stdout) is not bytes:
                raise TypeError(f"{self.behaviour.name}.task_result must return bytes")
            if stdout != honest:
                self.fworld.counters["wrong_results_returned"] += 1
            digest = result_digest(0, stdout)
            self.executed.record(run.submitter, msg.task_id, digest, self._weights().epoch)
            self.fworld.counters["results_returned"] += 1
            self._reply(run.submitter, FabricTaskResult(
                task_id=msg.task_id, attempt=msg.attempt, status="ok", exit_code=0, stdout=stdout,
                digest=digest, fuel_consumed=len(msg.input), elapsed_ms=int(duration * 1000)))
        self._pump()

    def _on_vote_request(self, submitter: str, msg: FabricVoteRequest) -> list:
        # the node's rule (PROTOCOL.md 18.4 step 6): the digest it reported, on a ballot naming
        # exactly that submitter (the envelope sender) and task, in an epoch it accepts
        if self.executed.vote_refusal(submitter, msg.task_id, msg.ballot, msg.digest,
                                      self._weights().epoch) is not None:
            self.fworld.counters["vote_refused"] += 1
            return []
        vote = BallotVote.sign(self.identity, msg.ballot, msg.digest, self.network_id)
        self.fworld.counters["votes_signed"] += 1
        if submitter == self.peer_id:
            return self.placement.on_vote(msg.task_id, vote, self.clock.now())
        self.send((submitter,), FabricVote(task_id=msg.task_id, vote=vote))
        return []

    # ---------------------------------------------------------- submitting (placement side)

    def submit(self, data: bytes) -> str:
        """Submit a task with input ``data`` (bytes); returns its task id.

        Raises:
            LocalProtocolError: the peer is down, or the core refuses the task.
        """
        if self.placement is None or not self.up:
            raise LocalProtocolError(f"{self.name} is down")
        self._task_seq += 1
        task_id = f"{self.name}-{self.incarnation}-t{self._task_seq}"
        now = self.clock.now()
        self.fworld.on_submitted(self, task_id, data)
        self._refresh_peers(now)
        self.run_actions(self.placement.submit(task_id, self.fworld.setup.requirements(), now))
        return task_id

    def _on_task_result(self, sender: str, msg: FabricTaskResult) -> None:
        now = self.clock.now()
        if msg.status == "refused":
            self.run_actions(self.placement.on_failure(msg.task_id, msg.attempt, sender, msg.reason, now))
            return
        expected = result_digest(msg.exit_code, msg.stdout) if msg.status == "ok" else error_digest(msg.reason)
        if msg.digest != expected:
            self.fworld.counters["inconsistent_digest"] += 1
            self.run_actions(self.placement.on_failure(msg.task_id, msg.attempt, sender, "inconsistent_digest",
                                                       now))
            return
        self.run_actions(self.placement.on_result(msg.task_id, msg.attempt, sender, msg.digest, now))

    def run_actions(self, actions: list, *, rearm: bool = True) -> None:
        """Carry out a batch of the core's actions in order (those they cause go to the back)."""
        queue = deque(actions)
        while queue and self.placement is not None:
            queue.extend(self._run_action(queue.popleft()))
        if self.placement is not None:
            self._check_breakers()
            if rearm:
                self.rearm()

    def _run_action(self, a: object) -> list:
        world, now = self.fworld, self.clock.now()
        if isinstance(a, Dispatch):
            rec = world.records.get(a.task_id)
            if rec is None:
                return []
            setup = world.setup
            msg = FabricTaskRun(task_id=a.task_id, attempt=a.attempt, module_sha256=TASK_MODULE_SHA256,
                                input=rec.input, fuel=setup.fuel, memory_bytes=setup.memory_bytes,
                                wall_time_ms=wire_wall_time_ms(setup.wall_time_s), gpu_indices=a.gpu_indices)
            world.counters["dispatched"] += 1
            if a.attempt > setup.replicas:  # beyond the first placement: after a failure or timeout
                world.counters["redispatched"] += 1
            if a.peer_id == self.peer_id:
                self.sim.schedule(self.sim.now, self._local_run, self.incarnation, msg)
            else:
                self.send((a.peer_id,), msg)
            return []
        if isinstance(a, Cancel):
            world.counters[f"cancel_{a.reason}"] += 1
            if a.peer_id == self.peer_id:
                run = self.running.get((self.peer_id, a.task_id, a.attempt))
                if run is not None:
                    run.cancelled = True
            else:
                self.send((a.peer_id,), FabricTaskCancel(task_id=a.task_id, attempt=a.attempt,
                                                         reason=a.reason[:64]))
            return []
        if isinstance(a, RequestVote):
            msg = FabricVoteRequest(task_id=a.task_id, ballot=a.ballot, digest=a.digest)
            if a.peer_id == self.peer_id:
                return self._on_vote_request(self.peer_id, msg)
            self.send((a.peer_id,), msg)
            return []
        if isinstance(a, Observe):
            self.reputation.observe(a.peer_id, a.kind, now)
            world.counters[f"observed_{a.kind.value}"] += 1
            return []
        if isinstance(a, TaskAccepted):
            world.on_accepted(self, a)
            return []
        if isinstance(a, TaskFailed):
            world.on_failed(self, a.task_id, a.reason, a.detail)
            return []
        return []

    def _check_breakers(self) -> None:
        """Count each transition of a breaker to open (read from the core's breakers)."""
        for peer_id, breaker in self.placement.breakers.items():
            if breaker.state is BreakerState.OPEN and self._breaker_seen.get(peer_id) != breaker.opened_at:
                self._breaker_seen[peer_id] = breaker.opened_at
                self.fworld.on_breaker_open(self, peer_id)


class FabricWorld(World):
    """A fabric run: peers with placement cores and executors, a Poisson task load, checks.

    Args:
        sim, network: engine and network.
        setup: :class:`FabricSetup`.
        behaviours: one per peer (index order); peers ``0..setup.submitters-1``
            submit and must be honest.
    Raises:
        ValueError: fewer peers than replicas or submitters, or a byzantine submitter.
    """

    def __init__(self, sim: Simulator, network: SimNetwork, setup: FabricSetup, behaviours: list[Behaviour], *,
                 skew: SkewSpec | None = None) -> None:
        super().__init__(sim, network, skew=skew)
        n = len(behaviours)
        if n < max(setup.replicas, setup.submitters):
            raise ValueError(f"{n} peers: need at least replicas ({setup.replicas}) and "
                             f"submitters ({setup.submitters})")
        if any(b.byzantine for b in behaviours[:setup.submitters]):
            raise ValueError("submitting peers (0..submitters-1) must be honest")
        self.setup = setup
        self.peers = [FabricPeer(self, i, b, speed=sim.rng.uniform(0.5, 2.0), cpu_count=sim.rng.choice(CPU_CHOICES))
                      for i, b in enumerate(behaviours)]
        self.by_id = {p.peer_id: p for p in self.peers}
        self.submitters = self.peers[:setup.submitters]
        self.honest_ids = tuple(p.peer_id for p in self.peers if not p.behaviour.byzantine)
        self.byzantine_ids = frozenset(p.peer_id for p in self.peers if p.behaviour.byzantine)
        self.records: dict[str, TaskRecord] = {}
        self.arrived = 0
        self.series: list[dict] = []
        self.breaker_openings: list[dict] = []
        self.certificates_verified = 0
        self.violation: str | None = None
        self.example: TaskAccepted | None = None  # the first accepted task (for inspection and tests)

    # ---------------------------------------------------------- lifecycle and load

    def start_all(self) -> None:
        """Boot every peer, start the task arrivals (after one advertisement round) and sampling."""
        for peer in self.peers:
            peer.start()
        first = self.setup.capacity_interval_s / 2 + self.sim.rng.expovariate(self.setup.tasks_per_s)
        self.sim.schedule(first, self._arrival)
        self.sim.schedule(0.0, self._sample)

    def crash(self, peer: FabricPeer) -> None:
        """Crash ``peer``; the tasks it submitted and had not finished fail (``submitter_crashed``)."""
        if not peer.up:
            return
        peer.crash()
        for rec in self.records.values():
            if rec.submitter == peer.name and rec.state == "running":
                self._finish(rec, "failed", reason="submitter_crashed")

    def restart(self, peer: FabricPeer) -> None:
        if not peer.up:
            peer.start()

    def _arrival(self) -> None:
        sim, setup = self.sim, self.setup
        if self.arrived >= setup.tasks:
            return
        up = [p for p in self.submitters if p.up]
        if up:
            peer = sim.rng.choice(up)
            words = sim.rng.randint(setup.input_words_min, setup.input_words_max)
            lines = [" ".join(sim.rng.choice(WORDS) for _ in range(min(12, words - w)))
                     for w in range(0, words, 12)]
            self.arrived += 1
            peer.submit(("\n".join(lines) + "\n").encode())
        if self.arrived < setup.tasks:
            sim.schedule(sim.now + sim.rng.expovariate(setup.tasks_per_s), self._arrival)

    def _sample(self) -> None:
        """Record each live submitter's mean score of honest and byzantine peers (not itself)."""
        now_v = self.sim.now
        honest, byz = [], []
        for s in self.submitters:
            if not s.up:
                continue
            now = s.clock.now()
            for p in self.peers:
                if p is s:
                    continue
                (byz if p.behaviour.byzantine else honest).append(s.reputation.score(p.peer_id, now))
        self.series.append({"t_s": round(now_v, 6),
                            "honest_score_mean": statistics.fmean(honest) if honest else math.nan,
                            "honest_score_min": min(honest) if honest else math.nan,
                            "byzantine_score_mean": statistics.fmean(byz) if byz else math.nan,
                            "byzantine_score_max": max(byz) if byz else math.nan,
                            "tasks_accepted": sum(1 for r in self.records.values() if r.state == "accepted"),
                            "tasks_accepted_wrong": sum(1 for r in self.records.values() if r.wrong),
                            "tasks_failed": sum(1 for r in self.records.values() if r.state == "failed")})
        if not self.finished():
            self.sim.schedule(now_v + self.setup.sample_interval_s, self._sample)

    def finished(self) -> bool:
        """Every task arrived and ended (accepted or failed)."""
        return self.arrived >= self.setup.tasks and all(r.state != "running" for r in self.records.values())

    # ---------------------------------------------------------- records

    def on_submitted(self, peer: FabricPeer, task_id: str, data: bytes) -> None:
        self.records[task_id] = TaskRecord(task_id, peer.name, data, result_digest(0, word_count_task(data)),
                                           self.sim.now)
        self.sim.log(f"{peer.name} submits {task_id} ({len(data)} B, {self.setup.replicas} replicas)")

    def _finish(self, rec: TaskRecord, state: str, *, reason: str = "") -> None:
        rec.state, rec.reason, rec.finished_s = state, reason, self.sim.now
        rec.input = b""  # finished: the input is no longer needed
        if self.finished():
            self._sample()

    def _violate(self, text: str) -> None:
        self.violation = text
        self.sim.log(f"SAFETY VIOLATION: {text}")
        raise SafetyViolation(text)

    def on_accepted(self, peer: FabricPeer, a: TaskAccepted) -> None:
        rec = self.records.get(a.task_id)
        if rec is None or rec.state != "running":
            return
        try:  # the certificate must stand on its own before anyone is told (as the node does)
            verify_task_certificate(a.certificate, a.table, self.network_id, a.task_id, submitter=peer.peer_id)
        except CertificateError as exc:
            self._violate(f"task {a.task_id}: certificate from {peer.name}'s core does not verify: {exc}")
        self.certificates_verified += 1
        if self.example is None:
            self.example = a
        byz = [p for p in a.table.weights if p in self.byzantine_ids]
        rec.digest, rec.replicas = a.digest, tuple(sorted(a.table.weights))
        rec.wrong = a.digest != rec.correct
        rec.byzantine_majority = bool(byz) and rule_met(a.certificate.ballot, a.table, byz)
        names = ",".join(self.by_id[p].name for p in a.agreeing)
        self.sim.log(f"{peer.name} accepted {a.task_id} {a.digest.hex()[:8]} "
                     f"{'WRONG ' if rec.wrong else ''}agreeing {names} ({len(a.disagreeing)} disagreeing)")
        self._finish(rec, "accepted")
        if rec.wrong and not rec.byzantine_majority:
            self._violate(f"task {a.task_id}: a wrong result was accepted although the byzantine replicas "
                          f"({len(byz)} of {len(a.table.weights)}) cannot meet {a.certificate.ballot.rule} alone")

    def on_failed(self, peer: FabricPeer, task_id: str, reason: str, detail: str) -> None:
        rec = self.records.get(task_id)
        if rec is None or rec.state != "running":
            return
        self.sim.log(f"{peer.name} failed {task_id}: {reason} ({detail})")
        self._finish(rec, "failed", reason=reason)

    def on_breaker_open(self, peer: FabricPeer, target: str) -> None:
        other = self.by_id.get(target)
        self.breaker_openings.append({"t_s": round(self.sim.now, 6), "submitter": peer.name,
                                      "peer": other.name if other else target[:10]})
        self.sim.log(f"{peer.name} breaker open for {other.name if other else target[:10]}")

    # ---------------------------------------------------------- results

    def scores_at_end(self) -> tuple[list[float], list[float]]:
        """Live submitters' scores of honest and of byzantine peers (not themselves)."""
        honest, byz = [], []
        for s in self.submitters:
            if s.up:
                now = s.clock.now()
                for p in self.peers:
                    if p is not s:
                        (byz if p.behaviour.byzantine else honest).append(s.reputation.score(p.peer_id, now))
        return honest, byz

    def metrics(self) -> dict:
        """One row of run metrics (docs/SIMULATION.md, "Fabric: wrong task results")."""
        recs = list(self.records.values())
        accepted = [r for r in recs if r.state == "accepted"]
        failed = [r for r in recs if r.state == "failed"]
        latencies = sorted(r.finished_s - r.submitted_s for r in accepted)
        honest, byz = self.scores_at_end()
        reasons = Counter(r.reason for r in failed)

        def pct(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else math.nan

        row = {"tasks_submitted": len(recs), "tasks_accepted": len(accepted),
               "tasks_accepted_wrong": sum(1 for r in accepted if r.wrong),
               "tasks_byzantine_majority": sum(1 for r in accepted if r.byzantine_majority),
               "tasks_failed": len(failed), "tasks_unfinished": sum(1 for r in recs if r.state == "running"),
               "certificates_verified": self.certificates_verified,
               "task_latency_p50_s": pct(0.5), "task_latency_p95_s": pct(0.95),
               "dispatched": self.counters["dispatched"], "redispatched": self.counters["redispatched"],
               "results_returned": self.counters["results_returned"],
               "wrong_results_returned": self.counters["wrong_results_returned"],
               "refused_busy": self.counters["refused_busy"],
               "observed_task_agree": self.counters["observed_task_agree"],
               "observed_task_disagree": self.counters["observed_task_disagree"],
               "breaker_openings": len(self.breaker_openings),
               "honest_score_mean": statistics.fmean(honest) if honest else math.nan,
               "honest_score_min": min(honest) if honest else math.nan,
               "byzantine_score_mean": statistics.fmean(byz) if byz else math.nan,
               "byzantine_score_max": max(byz) if byz else math.nan,
               "byzantine_peers": len(self.byzantine_ids)}
        for reason in sorted(set(TASK_FAILURE_REASONS) | set(reasons)):  # zeros too: same columns every run
            row[f"failed_{reason}"] = reasons[reason]
        return row


__all__ = ["FabricPeer", "FabricSetup", "FabricWorld", "QUEUE_PER_SLOT", "TASK_FAILURE_REASONS",
           "TASK_MODULE_SHA256", "TaskRecord", "shared_fabric_verification", "word_count_task"]
