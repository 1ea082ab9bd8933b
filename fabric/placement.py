"""Placement core (pure): which peers run a task, and when its result is accepted.

Sans-IO, like the other cores (DESIGN.md): no clock (``now`` is monotonic
seconds passed in), no randomness but the injected ``random.Random``, no
I/O. Inputs are method calls; outputs are ordered lists of actions
(:class:`Dispatch`, :class:`Cancel`, :class:`RequestVote`, :class:`Observe`,
:class:`TaskAccepted`, :class:`TaskFailed`) for the driver to carry out in
order. :meth:`Placement.next_deadline` says when to call :meth:`Placement.tick`.

**Requirements vs capacity.** A task (:class:`TaskRequirements`) needs fuel,
linear memory, wall time, GPUs (each with ``gpu_memory_bytes`` free) and
``replicas`` distinct peers. A peer is a candidate when its advertised
:class:`~chimera.fabric.resources.Resources` fit (agent memory cap, available
memory minus what this core already committed there, enough GPUs that are
neither leased by this core nor short of memory, load per CPU under
``PlacementConfig.max_load_per_cpu``), it has a free task slot (the
``task_slots`` it advertised minus the attempts it held that were not this
core's, minus this core's attempts in flight there: :meth:`Placement.update_peer`),
its circuit breaker lets a call through, it has weight in the committed reputation
:class:`~chimera.consensus.quorum.WeightTable` and it has not been tried for
this task. A task that finds no room waits here (oldest first; it is placed
when a result, a failure or a new advertisement frees a slot, or on a tick) for
at most ``queue_timeout_s`` after submission. Among candidates the core samples without replacement with
probability proportional to ``reputation weight / (1 + load_1m / cpu_count)``
(Efraimidis-Spirakis keys ``u ** (1 / w)`` from the injected RNG).

**Slots a peer does not honour.** A peer that refuses an attempt ``busy``
(or lets it time out) although its advertisement left room for it did not
honour the slots it advertised. Its *trusted* slots drop to what it held then
(its ``others`` plus this core's attempts still in flight there), and grow back
by one per ``PlacementConfig.slot_trust_recovery_s`` (time passed in); an
advertisement that admits it is full (``tasks_running >= task_slots``) makes
the refusal an honest one and restores them. So a peer advertising more room
than it takes gets one attempt per recovery period instead of its advertised
slots after every advertisement (counters ``slots_unhonoured`` and, per peer,
:meth:`Placement.trusted_slots`). No reputation observation, and the breaker
counts only what it counted before: a busy peer is no wrong result.

**GPU leases.** Dispatching leases specific GPU indices on the peer until the
attempt ends (result, failure, timeout, peer removed); a leased GPU is never
offered again, so this core never oversubscribes a GPU. (The executing peer
enforces its own lease table too; several submitters do not see each other's
leases, and a peer that refuses for lack of capacity reports a failure.)

**Breakers, retries, timeouts.** Per peer a circuit breaker (closed -> open
after ``breaker_failures`` consecutive failures -> half-open after
``breaker_open_s`` with one trial call -> closed on success, open again with
the open time doubled, up to ``breaker_max_open_s``; a trial that ends in an
outcome the breaker does not count lets the next call be the trial); a removed
peer's breaker is forgotten. A replica's refusal that is no wrong result
(:data:`REFUSALS_NOT_BLAMED`: ``busy``, ``gpu_unavailable``, ``over_capacity``,
``module_unavailable``, ``internal_error``, ``deadline_exceeded``) is no reputation
observation; that table says which count for the breaker: the peer's own unreliability
(``over_capacity``, ``module_unavailable``, ``internal_error``) does, room taken by
other submitters (``busy``, ``gpu_unavailable``) and the task's own epoch deadline
(``deadline_exceeded``: a module that loops is the user's bug, not the peer's) do not. A
``deadline_exceeded`` that arrives sooner than the task's wall time after dispatch cannot
be true (:func:`deadline_claim_plausible`) and counts for the breaker. An attempt that
times out here (no answer at all) counts for the breaker too. A failed or timed-out
attempt is retried on another peer after exponential backoff
``min(backoff_max_s, backoff_base_s * 2 ** (n - 1)) * (1 + jitter * u)``,
at most ``max_retries`` times per task; a task that runs out of retries or peers
fails ``deadline_exceeded`` when most of its failed attempts ran past its wall
time, else ``retries_exhausted``. An attempt times out
``wall_time_s + timeout_slack_s`` after dispatch.

**Redundant results and votes.** With ``replicas = k`` the task runs on k
distinct peers. Each reports a 32-byte result digest
(:func:`~chimera.fabric.sandbox.result_digest`; a deterministic failure such
as running out of fuel is a result too, :func:`~chimera.fabric.sandbox.error_digest`).
When k digests are in, the core opens a ballot
(:class:`~chimera.consensus.votes.Ballot`, free-form, the task's rule and
threshold) over the *replica table*: the k replicas with their committed
weights. The ballot's purpose names the task and the replica table's digest,
so the certificate says who was eligible. Each replica signs its digest
(:class:`~chimera.consensus.votes.BallotVote`) when asked
(:class:`RequestVote`), a :class:`~chimera.consensus.votes.Tally` decides,
and :class:`TaskAccepted` carries the :class:`~chimera.consensus.votes.VoteCertificate`;
anyone with the replica table checks it with :func:`verify_task_certificate`.

**Reputation observations** (:class:`Observe`, kinds from
:class:`~chimera.consensus.reputation.ObservationKind`): ``task_agree`` for
replicas whose digest matches the accepted one, ``task_disagree`` for the
others and for a peer whose report is its own doing: a digest that does not
match the result it sent (``inconsistent_digest``), or a refusal reason outside
:data:`REFUSALS_NOT_BLAMED` (no such reason comes from an honest peer);
``equivocation`` for a replica that signed two digests, or signed a vote for a digest
other than the one it reported (never counted). Refusals that are no
wrong result cost no reputation, and neither do timeouts by default: per
:mod:`chimera.consensus.reputation` a silent peer may be our own link's fault
(``observe_timeouts=True`` changes that); they feed the circuit breaker instead.
"""

from __future__ import annotations

import enum
import math
import random
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction

from chimera.consensus.quorum import CertificateError, WeightTable
from chimera.consensus.reputation import ObservationKind
from chimera.consensus.votes import (
    RULES,
    Ballot,
    BallotVote,
    Tally,
    VoteCertificate,
    VoteStatus,
    verify_vote_certificate,
)
from chimera.protocol.errors import LocalProtocolError

from .resources import Resources

DIGEST_BYTES = 32
MAX_TASK_ID_CHARS = 64
MAX_ATTEMPT = 2**31 - 1  # the largest attempt number on the wire (PROTOCOL.md 18.2 Attempt)
MAX_TASK_SLOTS = 1024  # the wire bound of fabric_capacity.task_slots and tasks_running

REFUSALS_NOT_BLAMED: dict[str, bool] = {
    # a replica's refusal (``fabric_task_result`` status ``refused``) that is no wrong result ->
    # whether it counts toward the peer's circuit breaker. No reputation observation (an honest
    # report of a failure must not cost more than silence: a timeout costs none); the attempt is
    # retried on another peer. Reasons outside this table are blamed (``task_disagree``).
    "busy": False,               # no free slot (other submitters' attempts, a stale advertisement)
    "gpu_unavailable": False,    # its GPUs leased by another submitter (this core sees only its own leases)
    "over_capacity": True,       # memory_bytes above the per-agent cap it advertised room for (a stale
                                 # advertisement): calls to it fail, like a timeout, until it advertises again
    "module_unavailable": True,  # it could not fetch the module from us: calls to it fail, like a timeout
    "internal_error": True,      # its host failed outside the task (a bug or a fault of that machine): its
                                 # unreliability, but no result at all, so no disagreement
    "deadline_exceeded": False,  # the task's own epoch deadline (wall_time_s) ran out there: a module that
                                 # loops is the task's fault; a slow peer is retried elsewhere. Counted when
                                 # the claim cannot be true (deadline_claim_plausible)
}

ROOM_REFUSALS = frozenset({"busy", "gpu_unavailable"})
"""Refusals for lack of room (another submitter's attempts hold the peer's slots or GPUs): they use
no retry of the task, and the peer may be tried again for it (see ``Placement._refused_for_room``)."""

def wire_wall_time_ms(wall_time_s: float) -> int:
    """``FabricTaskRun.wall_time_ms`` for a task of ``wall_time_s`` seconds: whole milliseconds,
    rounded down, at least 1."""
    return max(1, int(wall_time_s * 1000))


DEADLINE_CLAIM_WIRE_S = 0.001
"""The replica's wall time may be this much shorter than the task's: the wire carries whole
milliseconds, rounded down (``wall_time_ms``)."""
DEADLINE_CLAIM_RATE = 0.99
"""Fraction of the wall time a ``deadline_exceeded`` must take at least, seen from the submitter
(the two monotonic clocks may run at rates up to 1 % apart)."""


def deadline_claim_plausible(wall_time_s: float, elapsed_s: float) -> bool:
    """Whether a ``deadline_exceeded`` refusal that reached the submitter ``elapsed_s`` seconds after
    the attempt's dispatch can be true for a task of ``wall_time_s``.

    The replica's run starts after the dispatch and its epoch deadline is never shorter than the
    wall time it was sent (``ceil(wall_time / tick) + 1`` ticks), so an honest claim takes at least
    that long; the tolerances are :data:`DEADLINE_CLAIM_WIRE_S` and :data:`DEADLINE_CLAIM_RATE`.
    """
    return elapsed_s >= wall_time_s * DEADLINE_CLAIM_RATE - DEADLINE_CLAIM_WIRE_S


# ------------------------------------------------------------------- inputs


def check_threshold(rule: str, threshold: Fraction | int | None) -> Fraction:
    """The ballot threshold a task with agreement rule ``rule`` gets (the rule's default when
    ``threshold`` is None), checked by the ballot's own rules (:meth:`Ballot.create`: exactly 1
    for ``unanimous``, in [1/2, 1) for the others, terms at most 2**32): one check for
    :class:`TaskRequirements`, the admin API and :meth:`Placement._open_ballot`.

    Raises:
        LocalProtocolError: unknown rule, a threshold that is not an exact fraction, or one the
            rule does not allow (the message names the rule).
    """
    if rule not in RULES:
        raise LocalProtocolError(f"rule must be one of {RULES}")
    try:
        return Ballot.create(epoch=0, purpose="", rule=rule, threshold=threshold).threshold
    except LocalProtocolError as exc:
        raise LocalProtocolError(f"rule {rule}: {str(exc).removeprefix('invalid ballot: ')}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRequirements:
    """What a task needs.

    Attributes:
        fuel: fuel units per run (>= 1).
        memory_bytes: linear memory the agent may use (>= 64 KiB).
        wall_time_s: seconds one run may take (> 0).
        gpus: GPUs per replica (>= 0); gpu_memory_bytes: free memory each must have.
        replicas: distinct peers that run it (1..64).
        rule: agreement rule, one of ``majority``, ``weighted``, ``unanimous``, ``quorum``.
        threshold: the rule's threshold (None: the rule's default, see consensus.votes);
            exactly 1 for ``unanimous``, in [1/2, 1) for the others (:func:`check_threshold`).
    Raises:
        LocalProtocolError: a value out of range, or a threshold the rule does not allow.
    """

    fuel: int
    memory_bytes: int
    wall_time_s: float
    gpus: int = 0
    gpu_memory_bytes: int = 0
    replicas: int = 1
    rule: str = "majority"
    threshold: Fraction | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.fuel, int) and self.fuel >= 1):
            raise LocalProtocolError("fuel must be an int >= 1")
        if not (isinstance(self.memory_bytes, int) and self.memory_bytes >= 65536):
            raise LocalProtocolError("memory_bytes must be >= 65536")
        if not (isinstance(self.wall_time_s, (int, float)) and 0 < self.wall_time_s < 1e6):
            raise LocalProtocolError("wall_time_s must be in (0, 1e6)")
        if not (isinstance(self.gpus, int) and 0 <= self.gpus <= 64):
            raise LocalProtocolError("gpus must be in 0..64")
        if not (isinstance(self.gpu_memory_bytes, int) and self.gpu_memory_bytes >= 0):
            raise LocalProtocolError("gpu_memory_bytes must be >= 0")
        if not (isinstance(self.replicas, int) and 1 <= self.replicas <= 64):
            raise LocalProtocolError("replicas must be in 1..64")
        check_threshold(self.rule, self.threshold)  # now, not only once the ballot opens


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementConfig:
    """Tuning of the placement core (seconds are monotonic durations)."""

    max_retries: int = 3
    backoff_base_s: float = 0.2
    backoff_max_s: float = 10.0
    backoff_jitter: float = 0.5
    timeout_slack_s: float = 2.0
    vote_timeout_s: float = 10.0
    vote_retry_s: float = 2.0  # vote requests are sent again to replicas that have not voted
    queue_timeout_s: float = 30.0
    finished_kept: int = 1024  # finished tasks whose view() stays available (the core forgets older ones)
    breaker_failures: int = 3
    breaker_open_s: float = 5.0
    breaker_max_open_s: float = 300.0
    max_load_per_cpu: float = 4.0
    observe_timeouts: bool = False
    slot_trust_recovery_s: float = 10.0  # a distrusted peer's trusted slots grow back by one per this

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.breaker_failures < 1:
            raise LocalProtocolError("max_retries >= 0 and breaker_failures >= 1")
        for name in ("backoff_base_s", "backoff_max_s", "timeout_slack_s", "vote_timeout_s", "vote_retry_s",
                     "queue_timeout_s", "breaker_open_s", "breaker_max_open_s", "max_load_per_cpu",
                     "slot_trust_recovery_s"):
            if not getattr(self, name) > 0:
                raise LocalProtocolError(f"{name} must be > 0")
        if not 0 <= self.backoff_jitter <= 1:
            raise LocalProtocolError("backoff_jitter must be in [0, 1]")
        if self.finished_kept < 0:
            raise LocalProtocolError("finished_kept must be >= 0")


# ------------------------------------------------------------------ actions


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run attempt ``attempt`` of ``task_id`` on ``peer_id`` with GPUs ``gpu_indices``;
    give up at monotonic ``deadline`` (``timeout_s`` after dispatch)."""

    task_id: str
    attempt: int
    peer_id: str
    gpu_indices: tuple[int, ...]
    timeout_s: float
    deadline: float


@dataclass(frozen=True, slots=True)
class Cancel:
    """Tell ``peer_id`` to stop attempt ``attempt`` (it timed out or is no longer wanted)."""

    task_id: str
    attempt: int
    peer_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RequestVote:
    """Ask replica ``peer_id`` to sign ``digest`` (the digest it reported) on ``ballot``."""

    task_id: str
    peer_id: str
    ballot: Ballot
    digest: bytes


@dataclass(frozen=True, slots=True)
class Observe:
    """A reputation observation about ``peer_id`` for the driver's LocalReputation."""

    peer_id: str
    kind: ObservationKind
    task_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class TaskAccepted:
    """The task's result: ``digest`` agreed under the rule, proven by ``certificate``
    over the replica weight table ``table``."""

    task_id: str
    digest: bytes
    certificate: VoteCertificate
    table: WeightTable
    agreeing: tuple[str, ...]
    disagreeing: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """The task ended without an accepted result. ``reason``: ``unsatisfiable``,
    ``no_capacity``, ``retries_exhausted``, ``deadline_exceeded`` (out of retries or peers, and
    most of its failed attempts ran past its wall time: the module does not finish in time),
    ``no_agreement``, ``vote_timeout``, ``cancelled``, ``invalid_ballot`` (its rule and threshold
    make no ballot; TaskRequirements rejects them first)."""

    task_id: str
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class BreakerOpened:
    """``peer_id``'s circuit breaker opened after ``failures`` failures in a row: no new
    attempt goes there for ``open_for_s`` seconds (then one trial, half-open)."""

    peer_id: str
    open_for_s: float
    failures: int


Action = Dispatch | Cancel | RequestVote | Observe | TaskAccepted | TaskFailed | BreakerOpened


# ----------------------------------------------------------------- breakers


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Per-peer circuit breaker (see the module docstring for the rule).

    ``trial``: the call (any hashable the caller passes to :meth:`on_dispatch`) that is the
    half-open breaker's one trial, None while no trial is in flight.
    """

    def __init__(self, failures_to_open: int, open_s: float, max_open_s: float) -> None:
        self.failures_to_open, self.base_open_s, self.max_open_s = failures_to_open, open_s, max_open_s
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.open_for_s = open_s
        self.opened_at = 0.0
        self.trial: object | None = None

    @property
    def trial_in_flight(self) -> bool:
        return self.trial is not None

    def current(self, now: float) -> BreakerState:
        """The state at ``now`` (an open breaker whose time is up is half-open)."""
        if self.state is BreakerState.OPEN and now >= self.opened_at + self.open_for_s:
            self.state = BreakerState.HALF_OPEN
            self.trial = None
        return self.state

    def allows(self, now: float) -> bool:
        state = self.current(now)
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self.trial_in_flight)

    def reopens_at(self, now: float | None = None) -> float | None:
        """When an open breaker turns half-open (None unless open; with ``now``, the state at ``now``)."""
        state = self.state if now is None else self.current(now)
        return self.opened_at + self.open_for_s if state is BreakerState.OPEN else None

    def on_dispatch(self, now: float, call: object) -> None:
        """A call goes out; on a half-open breaker it is the trial (``call`` names it)."""
        if self.current(now) is BreakerState.HALF_OPEN:
            self.trial = call

    def on_call_ended(self, call: object) -> None:
        """Call ``call`` ended. If it was the trial and neither :meth:`on_success` nor
        :meth:`on_failure` follows (an outcome the breaker does not count: a refusal for room,
        the task's own deadline, a cancel), the next call may be the trial: a half-open breaker
        never waits for a trial that is over."""
        if self.trial is not None and self.trial == call:
            self.trial = None

    def on_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.open_for_s = self.base_open_s
        self.trial = None

    def on_failure(self, now: float) -> None:
        self.failures += 1
        state = self.current(now)
        if state is BreakerState.HALF_OPEN:
            self.open_for_s = min(self.max_open_s, self.open_for_s * 2)
            self._open(now)
        elif state is BreakerState.CLOSED and self.failures >= self.failures_to_open:
            self._open(now)

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.trial = None


# -------------------------------------------------------------------- tasks


_PURPOSE_RE = re.compile(r"task (\S{1,64}) (\S{1,64}) replicas ([0-9a-f]{64})")


def task_ballot_purpose(submitter: str, task_id: str, table: WeightTable) -> str:
    """Ballot purpose binding the submitter, the task and its replica table:
    ``"task <submitter peer id> <task id> replicas <sha256 hex of the table>"``.

    Task ids are the submitter's own id space, so the submitter is part of the name: a replica
    that ran the same task id for two submitters signs ballots of two different purposes (and
    so two different ballot ids), never one ballot for both.
    """
    return f"task {submitter} {task_id} replicas {table.digest().hex()}"


def ballot_names_task(purpose: str, submitter: str, task_id: str) -> bool:
    """True when ``purpose`` is exactly a :func:`task_ballot_purpose` of ``submitter``'s task
    ``task_id`` (any replica table: the replica does not know the table)."""
    m = _PURPOSE_RE.fullmatch(purpose)
    return m is not None and m.group(1) == submitter and m.group(2) == task_id


def verify_task_certificate(cert: VoteCertificate, table: WeightTable, network_id: bytes, task_id: str, *,
                            submitter: str) -> None:
    """Check that ``cert`` accepts a result of ``submitter``'s task ``task_id`` under the replica
    table ``table``.

    Raises:
        CertificateError: the ballot is not for this submitter, task and table, or
            :func:`~chimera.consensus.votes.verify_vote_certificate` fails.
    """
    if cert.ballot.purpose != task_ballot_purpose(submitter, task_id, table):
        raise CertificateError("certificate's ballot is not for this submitter, task and replica table")
    verify_vote_certificate(cert, table, network_id)


EXECUTED_PER_SUBMITTER = 512
"""Reported digests a replica keeps per submitter (that submitter's oldest forgotten first)."""
EXECUTED_TOTAL = 8192
"""Reported digests a replica keeps in all (beyond: the largest submitter's oldest forgotten)."""


class ExecutedDigests:
    """Replica side: the digest this peer reported for each ``(submitter, task id)``, and the
    weight-table epoch it was in when it accepted the run, for the vote requests that follow.

    Bounded per submitter (``per_submitter``: a submitter's new entry forgets its own oldest)
    and in total (``total``: the submitter holding the most entries loses its oldest), so one
    submitter's runs can never make this peer forget another submitter's digests while that
    one stays within its share (``total // per_submitter`` submitters fit at full share).
    """

    def __init__(self, *, per_submitter: int = EXECUTED_PER_SUBMITTER, total: int = EXECUTED_TOTAL) -> None:
        if not 1 <= per_submitter <= total:
            raise LocalProtocolError("need 1 <= per_submitter <= total")
        self.per_submitter, self.total = per_submitter, total
        self._by: dict[str, OrderedDict[str, tuple[bytes, int]]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: tuple[str, str]) -> bool:
        return self.get(*key) is not None

    def get(self, submitter: str, task_id: str) -> tuple[bytes, int] | None:
        """``(digest, epoch when the run was accepted)`` or None."""
        table = self._by.get(submitter)
        return None if table is None else table.get(task_id)

    def digest(self, submitter: str, task_id: str) -> bytes | None:
        entry = self.get(submitter, task_id)
        return None if entry is None else entry[0]

    def record(self, submitter: str, task_id: str, digest: bytes, epoch: int) -> None:
        table = self._by.setdefault(submitter, OrderedDict())
        if task_id in table:
            table.move_to_end(task_id)
        else:
            self._count += 1
        table[task_id] = (digest, epoch)
        while len(table) > self.per_submitter:
            self._evict(submitter)
        while self._count > self.total:
            self._evict(max(self._by, key=lambda s: len(self._by[s])))

    def _evict(self, submitter: str) -> None:
        table = self._by[submitter]
        table.popitem(last=False)
        self._count -= 1
        if not table:
            del self._by[submitter]

    def vote_refusal(self, submitter: str, task_id: str, ballot: Ballot, digest: bytes,
                     current_epoch: int) -> str | None:
        """Why this replica must not sign ``digest`` on ``ballot`` for ``submitter`` (the envelope
        sender of the vote request), or None when it may (PROTOCOL.md 18.4 step 6): it signs only
        the digest it reported for that submitter's task, on a ballot whose purpose names exactly
        that submitter and task id, in an epoch between the one before the epoch it was in when it
        accepted the run and its current epoch."""
        entry = self.get(submitter, task_id)
        if entry is None:
            return "no result of that task from that submitter"
        if entry[0] != digest:
            return "not the digest this peer reported"
        if not ballot_names_task(ballot.purpose, submitter, task_id):
            return "ballot purpose does not name that submitter and task"
        if not entry[1] - 1 <= ballot.epoch <= current_epoch:
            return f"ballot epoch {ballot.epoch} outside {entry[1] - 1}..{current_epoch}"
        return None


@dataclass
class _Attempt:
    number: int
    peer_id: str
    gpu_indices: tuple[int, ...]
    deadline: float
    dispatched_at: float


@dataclass
class _Task:
    task_id: str
    req: TaskRequirements
    submitted_at: float
    state: str = "running"                          # running | voting | done | failed
    attempts: dict[int, _Attempt] = field(default_factory=dict)  # in flight, by attempt number
    results: dict[str, bytes] = field(default_factory=dict)      # peer -> digest
    tried: set[str] = field(default_factory=set)
    failures: int = 0
    deadline_failures: int = 0                      # of failures: plausible deadline_exceeded refusals
    room_refused: set[str] = field(default_factory=set)  # peers that refused it for room (busy, GPUs taken)
    room_refusals: int = 0
    next_attempt: int = 1
    retry_at: float | None = None
    tally: Tally | None = None
    table: WeightTable | None = None
    vote_deadline: float | None = None
    vote_retry_at: float | None = None
    vote_faults: set[str] = field(default_factory=set)  # voters that voted for a digest they did not report

    @property
    def missing(self) -> int:
        return self.req.replicas - len(self.results) - len(self.attempts)


@dataclass
class _Slots:
    """A peer's task slots as its latest ``fabric_capacity`` said: ``others`` are the attempts it
    held then that were not this core's (its ``tasks_running`` minus this core's attempts in
    flight there when the advertisement came in)."""

    task_slots: int
    others: int
    full: bool = False  # it refused an attempt ``busy`` since: no room until it advertises again


@dataclass
class _SlotTrust:
    """Slots of a peer that refused room it advertised: ``slots`` trusted at ``since`` (monotonic s),
    one more per ``slot_trust_recovery_s`` after that."""

    slots: int
    since: float


@dataclass(frozen=True, slots=True)
class TaskView:
    """Read-only summary of a task (for status queries and tests)."""

    task_id: str
    state: str
    running_on: tuple[str, ...]
    results: int
    failures: int


class Placement:
    """The placement state machine of one submitting peer.

    Args:
        config: tuning; network_id: the network the votes are signed for; submitter: the peer
        id of the node this core submits for (named in every task ballot's purpose);
        rng: the injected random source (placement sampling, backoff jitter).
    Call :meth:`set_weights` (committed reputation weights) and
    :meth:`update_peer` (advertised resources) before submitting.
    """

    def __init__(self, config: PlacementConfig, *, network_id: bytes, submitter: str, rng: random.Random) -> None:
        self.config = config
        self.network_id = network_id
        self.submitter = submitter
        self.rng = rng
        self.weights: WeightTable | None = None
        self.peers: dict[str, Resources] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.gpu_leases: dict[str, dict[int, tuple[str, int]]] = {}  # peer -> gpu index -> (task, attempt)
        self.committed_memory: dict[str, int] = {}
        self.slots: dict[str, _Slots] = {}      # peers that advertised task slots
        self.in_flight: dict[str, int] = {}     # peer -> this core's attempts in flight there
        self.slot_trust: dict[str, _SlotTrust] = {}  # peers that did not honour advertised slots
        self.tasks: dict[str, _Task] = {}  # in progress (running or voting)
        self.finished: OrderedDict[str, TaskView] = OrderedDict()  # the last config.finished_kept done/failed
        self.counters: dict[str, int] = {}

    # ------------------------------------------------------------ peers

    def set_weights(self, table: WeightTable) -> None:
        """Committed reputation weights of the current epoch (peers outside it get no work)."""
        self.weights = table

    def update_peer(self, peer_id: str, resources: Resources, *, task_slots: int | None = None,
                    tasks_running: int = 0) -> None:
        """The peer's advertised resources; with ``task_slots``, a new ``fabric_capacity`` (its
        ``task_slots`` and ``tasks_running``, queued attempts included).

        A peer that advertised slots gets an attempt of this core only while
        ``others + this core's attempts in flight there < task_slots``, ``others`` being its
        ``tasks_running`` minus this core's attempts in flight there when the advertisement came
        in: tasks wait here instead of queueing (or being refused ``busy``) there. Feed each
        advertisement once with its slots (feeding the same one again would count this core's
        attempts started since then as the others'); calls without ``task_slots`` keep the
        latest slot view. A peer that never advertised slots is not limited.

        Raises:
            LocalProtocolError: ``task_slots`` outside 1..1024 or ``tasks_running`` outside 0..1024.
        """
        if task_slots is not None:
            if not (type(task_slots) is int and 1 <= task_slots <= MAX_TASK_SLOTS
                    and type(tasks_running) is int and 0 <= tasks_running <= MAX_TASK_SLOTS):
                raise LocalProtocolError(f"task_slots must be in 1..{MAX_TASK_SLOTS} and tasks_running in "
                                         f"0..{MAX_TASK_SLOTS}")
            self.slots[peer_id] = _Slots(task_slots, max(0, tasks_running - self.in_flight.get(peer_id, 0)))
            if tasks_running >= task_slots:  # it says it is full: its refusals were honest
                self.slot_trust.pop(peer_id, None)
        self.peers[peer_id] = resources
        self.breakers.setdefault(peer_id, CircuitBreaker(self.config.breaker_failures, self.config.breaker_open_s,
                                                         self.config.breaker_max_open_s))

    def remove_peer(self, peer_id: str, now: float) -> list[Action]:
        """Forget a peer (its breaker and slot view too); its attempts in flight fail (and are
        retried elsewhere)."""
        actions: list[Action] = []
        for task in list(self.tasks.values()):
            for attempt in [a for a in task.attempts.values() if a.peer_id == peer_id]:
                actions += self._fail_attempt(task, attempt, "peer_removed", now, observe=False, breaker=False)
        self.peers.pop(peer_id, None)
        self.breakers.pop(peer_id, None)
        self.slots.pop(peer_id, None)
        self.slot_trust.pop(peer_id, None)
        self.in_flight.pop(peer_id, None)
        self.committed_memory.pop(peer_id, None)
        self.gpu_leases.pop(peer_id, None)
        return actions

    def breaker(self, peer_id: str) -> CircuitBreaker:
        return self.breakers[peer_id]

    def leased_gpus(self, peer_id: str) -> dict[int, tuple[str, int]]:
        return dict(self.gpu_leases.get(peer_id, {}))

    def view(self, task_id: str) -> TaskView:
        """The task's state; a finished task only while among the last ``finished_kept``.

        Raises:
            KeyError: unknown task (never submitted, or finished and forgotten).
        """
        t = self.tasks.get(task_id)
        if t is None:
            return self.finished[task_id]
        return self._view(t)

    @staticmethod
    def _view(t: "_Task") -> TaskView:
        return TaskView(t.task_id, t.state, tuple(a.peer_id for a in t.attempts.values()), len(t.results),
                        t.failures)

    def _forget(self, task: "_Task") -> None:
        """A finished task leaves ``tasks`` (ticks and deadlines scan only live ones); its view
        is kept among the last ``finished_kept``. Late results and votes for it are ignored."""
        self.tasks.pop(task.task_id, None)
        if self.config.finished_kept:
            self.finished[task.task_id] = self._view(task)
            while len(self.finished) > self.config.finished_kept:
                self.finished.popitem(last=False)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    # ------------------------------------------------------------ capacity

    def _weight(self, peer_id: str) -> int:
        return self.weights.weights.get(peer_id, 0) if self.weights is not None else 0

    def _free_gpus(self, peer_id: str, req: TaskRequirements) -> list[int]:
        leased = self.gpu_leases.get(peer_id, {})
        res = self.peers.get(peer_id)
        if res is None:
            return []
        return sorted(g.index for g in res.gpus
                      if g.index not in leased and g.memory_free_bytes >= req.gpu_memory_bytes)

    def capable_peers(self, req: TaskRequirements) -> int:
        """How many known peers could ever run ``req`` (weight, memory cap, wall time, GPUs),
        whatever they hold now: :meth:`submit` fails a task ``unsatisfiable`` below
        ``req.replicas``."""
        return sum(1 for p in self.peers if self._could_ever_fit(p, req))

    def _could_ever_fit(self, peer_id: str, req: TaskRequirements) -> bool:
        res = self.peers[peer_id]
        gpus_big_enough = sum(1 for g in res.gpus if g.memory_total_bytes >= req.gpu_memory_bytes)
        return (self._weight(peer_id) > 0 and res.max_wasm_memory_bytes >= req.memory_bytes
                and res.max_task_wall_time_ms >= wire_wall_time_ms(req.wall_time_s)
                and res.memory_total_bytes >= req.memory_bytes and gpus_big_enough >= req.gpus)

    def trusted_slots(self, peer_id: str, now: float | None = None) -> int | None:
        """The task slots of ``peer_id`` this core counts on: those it advertised, fewer while it
        is distrusted for refusing room it advertised (see the module docstring); ``now``
        (monotonic s) adds the slots grown back since (None: none). None: it advertised none."""
        s = self.slots.get(peer_id)
        if s is None:
            return None
        trust = self.slot_trust.get(peer_id)
        if trust is None:
            return s.task_slots
        grown = 0 if now is None else int(max(0.0, now - trust.since) // self.config.slot_trust_recovery_s)
        return min(s.task_slots, trust.slots + grown)

    def free_slots(self, peer_id: str, now: float | None = None) -> int | None:
        """Task slots of ``peer_id`` this core may still use at ``now`` (None: it advertised none,
        no limit): its :meth:`trusted_slots` minus the attempts it held for others when it
        advertised, minus this core's attempts in flight there."""
        trusted = self.trusted_slots(peer_id, now)
        if trusted is None:
            return None
        s = self.slots[peer_id]
        if s.full:
            return 0
        return max(0, trusted - s.others - self.in_flight.get(peer_id, 0))

    def _slot_free(self, peer_id: str, now: float) -> bool:
        free = self.free_slots(peer_id, now)
        return free is None or free > 0

    def _distrust(self, peer_id: str, now: float) -> None:
        """``peer_id`` did not honour a slot it advertised (a ``busy`` refusal or a timeout of an
        attempt sent within its advertised room; the attempt has ended): trust it with what it
        held, its ``others`` and this core's attempts still in flight there."""
        s = self.slots.get(peer_id)
        if s is None or peer_id == self.submitter:  # no advertised slots to discount; our own are live
            return
        held = s.others + self.in_flight.get(peer_id, 0)
        self.slot_trust[peer_id] = _SlotTrust(min(self.trusted_slots(peer_id, now), held), now)  # (s exists)
        self._count("slots_unhonoured")

    def _fits_now(self, peer_id: str, req: TaskRequirements, now: float) -> bool:
        res = self.peers[peer_id]
        if not self._could_ever_fit(peer_id, req):
            return False
        if not self._slot_free(peer_id, now):
            return False
        if res.memory_available_bytes - self.committed_memory.get(peer_id, 0) < req.memory_bytes:
            return False
        if res.load_1m / res.cpu_count > self.config.max_load_per_cpu:
            return False
        if req.gpus and len(self._free_gpus(peer_id, req)) < req.gpus:
            return False
        return self.breakers[peer_id].allows(now)

    def candidates(self, req: TaskRequirements, now: float, exclude: set[str] = frozenset()) -> list[str]:
        """Peers that could take an attempt of ``req`` right now, sorted by id."""
        return [p for p in sorted(self.peers) if p not in exclude and self._fits_now(p, req, now)]

    def _choose(self, candidates: list[str], count: int) -> list[str]:
        keyed = []
        for peer_id in candidates:  # sorted: the RNG draws are reproducible
            res = self.peers[peer_id]
            w = self._weight(peer_id) / (1.0 + res.load_1m / res.cpu_count)
            u = self.rng.random()
            keyed.append((math.log(max(u, 1e-300)) / w, peer_id))  # log of u ** (1 / w)
        keyed.sort(reverse=True)
        return [p for _, p in keyed[:count]]

    # ------------------------------------------------------------- inputs

    def submit(self, task_id: str, req: TaskRequirements, now: float, *, first_attempt: int = 1) -> list[Action]:
        """Place a new task; its attempts are numbered from ``first_attempt`` (1 .. 2³¹−1; a
        driver that places a task again after a restart starts above every number it may have
        used before, so that a late result of an earlier attempt is never taken for a new one).

        Raises:
            LocalProtocolError: duplicate or invalid task id, ``first_attempt`` out of range, or
                no weights set.
        """
        if not isinstance(task_id, str) or not 1 <= len(task_id) <= MAX_TASK_ID_CHARS or " " in task_id:
            raise LocalProtocolError(f"task id must be 1..{MAX_TASK_ID_CHARS} characters without spaces")
        if task_id in self.tasks or task_id in self.finished:
            raise LocalProtocolError(f"task {task_id} submitted twice")
        if type(first_attempt) is not int or not 1 <= first_attempt <= MAX_ATTEMPT:
            raise LocalProtocolError(f"first_attempt must be an int in 1..{MAX_ATTEMPT}")
        if self.weights is None:
            raise LocalProtocolError("set_weights() before submitting tasks")
        task = _Task(task_id=task_id, req=req, submitted_at=now, next_attempt=first_attempt)
        self.tasks[task_id] = task
        capable = [p for p in self.peers if self._could_ever_fit(p, req)]
        if len(capable) < req.replicas:
            return self._finish_failed(task, "unsatisfiable",
                                       f"{len(capable)} peers could ever run it (memory, wall time, GPUs, weight), "
                                       f"{req.replicas} replicas needed")
        return self._place_waiting(now)  # tasks waiting for room go first, this one last

    def on_result(self, task_id: str, attempt: int, peer_id: str, digest: bytes, now: float) -> list[Action]:
        """Attempt ``attempt`` on ``peer_id`` reported ``digest`` (32 bytes).

        A report for an unknown task or attempt, from the wrong peer, or with a
        malformed digest is ignored and counted (``ignored_result``).
        """
        task = self.tasks.get(task_id)
        att = task.attempts.get(attempt) if task is not None else None
        if (task is None or att is None or att.peer_id != peer_id or type(digest) is not bytes
                or len(digest) != DIGEST_BYTES):
            self._count("ignored_result")
            return []
        self._end_attempt(task, att)
        self.breakers[peer_id].on_success()
        task.results[peer_id] = digest
        if len(task.results) == task.req.replicas:
            actions = self._open_ballot(task, now)
        else:
            actions = self._place(task, now)
        return actions + self._place_waiting(now)  # the slot it held may take a waiting task

    def on_failure(self, task_id: str, attempt: int, peer_id: str, reason: str, now: float) -> list[Action]:
        """Attempt ``attempt`` on ``peer_id`` failed by the peer's own (signed) report.

        A refusal in :data:`REFUSALS_NOT_BLAMED` (``busy``, ``gpu_unavailable``, ``over_capacity``,
        ``module_unavailable``, ``internal_error``, ``deadline_exceeded``) is no wrong result: no
        reputation observation, the breaker counts it only where that table says so, and ``busy``
        marks the peer's slots full until its next advertisement. A ``deadline_exceeded`` is the
        task's own (not counted, and it counts toward the task failing ``deadline_exceeded``) unless
        it came sooner after dispatch than the task's wall time allows
        (:func:`deadline_claim_plausible`): then it counts for the breaker
        (``attempt_deadline_exceeded_early``). Any other reason (an inconsistent digest, a refusal
        reason no honest peer sends) is the peer's doing: ``task_disagree``, and it counts for the
        breaker. Either way the attempt is retried on another peer (within
        ``max_retries``).
        """
        task = self.tasks.get(task_id)
        att = task.attempts.get(attempt) if task is not None else None
        if task is None or att is None or att.peer_id != peer_id:
            self._count("ignored_failure")
            return []
        if reason in ROOM_REFUSALS:
            actions = self._refused_for_room(task, att, reason, now)
            if reason == "busy" and peer_id in self.slots:
                self._distrust(peer_id, now)  # it was sent within the room it advertised
                self.slots[peer_id].full = True  # until it advertises again
            return actions + self._place_waiting(now)
        if reason in REFUSALS_NOT_BLAMED:
            breaker = REFUSALS_NOT_BLAMED[reason]
            if reason == "deadline_exceeded":
                if deadline_claim_plausible(task.req.wall_time_s, now - att.dispatched_at):
                    task.deadline_failures += 1
                else:  # it cannot have run for the wall time: a refusal in disguise
                    breaker = True
                    reason = "deadline_exceeded_early"
            actions = self._fail_attempt(task, att, reason, now, observe=False, breaker=breaker)
        else:
            actions = self._fail_attempt(task, att, reason, now, observe=True, breaker=True)
        return actions + self._place_waiting(now)

    def on_vote(self, task_id: str, vote: BallotVote, now: float) -> list[Action]:
        """A replica's signed vote on the task's ballot.

        A validly signed vote whose choice is not the digest its voter reported is never counted
        (``vote_not_reported_digest``): its signed result and its signed vote conflict, so it is an
        ``equivocation`` observation (once per task and voter).
        """
        task = self.tasks.get(task_id)
        if task is None or task.tally is None or task.state != "voting":
            self._count("ignored_vote")
            return []
        reported = task.results.get(vote.voter)
        if (reported is not None and vote.choice != reported and vote.ballot_id == task.tally.ballot.ballot_id
                and vote.verify(task.tally.ballot.epoch, self.network_id)):
            # it signed a digest other than the one it reported (both signed by it): never counted
            self._count("vote_not_reported_digest")
            if vote.voter in task.vote_faults:
                return []
            task.vote_faults.add(vote.voter)
            return [Observe(vote.voter, ObservationKind.EQUIVOCATION, task_id,
                            "voted for a digest other than the one it reported")]
        result = task.tally.add(vote)
        actions: list[Action] = []
        if result.status is VoteStatus.EQUIVOCATION:
            actions.append(Observe(vote.voter, ObservationKind.EQUIVOCATION, task_id, "signed two result digests"))
        elif not result.accepted and result.status is not VoteStatus.DUPLICATE:
            self._count(f"vote_{result.status.value}")
        outcome = task.tally.outcome()
        if outcome.decided:
            return actions + self._accept(task, outcome.choice, outcome.certificate)
        if not task.tally.can_still_decide():
            return actions + self._no_agreement(task, "no_agreement", outcome.detail)
        return actions

    def cancel(self, task_id: str, now: float) -> list[Action]:
        """Give up on a task: cancel its attempts, release its leases."""
        task = self.tasks.get(task_id)
        if task is None or task.state in ("done", "failed"):
            return []
        actions: list[Action] = []
        for att in list(task.attempts.values()):
            self._end_attempt(task, att)
            actions.append(Cancel(task.task_id, att.number, att.peer_id, "cancelled"))
        actions += self._finish_failed(task, "cancelled", "cancelled by the submitter")
        return actions + self._place_waiting(now)

    def tick(self, now: float) -> list[Action]:
        """Handle everything due at ``now``: timeouts, retries, queued placements, vote timeouts,
        breakers whose open time is up (they turn half-open), distrusted peers' slots grown back."""
        for b in self.breakers.values():
            b.current(now)
        rec = self.config.slot_trust_recovery_s
        for peer_id, trust in list(self.slot_trust.items()):
            grown = int(max(0.0, now - trust.since) // rec)
            if grown:
                trust.slots, trust.since = trust.slots + grown, trust.since + grown * rec
            s = self.slots.get(peer_id)
            if s is None or trust.slots >= s.task_slots:
                del self.slot_trust[peer_id]
        actions: list[Action] = []
        for task in list(self.tasks.values()):
            if task.state == "running":
                for att in [a for a in task.attempts.values() if now >= a.deadline]:
                    if task.state != "running" or att.number not in task.attempts:
                        break  # an earlier timeout failed the task (and ended its other attempts)
                    actions.append(Cancel(task.task_id, att.number, att.peer_id, "timeout"))
                    actions += self._fail_attempt(task, att, "timeout", now,
                                                  observe=self.config.observe_timeouts, breaker=True)
                    self._distrust(att.peer_id, now)  # it took the attempt and never answered
                if task.state == "running" and task.missing > 0 and (task.retry_at is None or now >= task.retry_at):
                    actions += self._place(task, now)
            elif task.state == "voting" and task.vote_deadline is not None and now >= task.vote_deadline:
                actions += self._no_agreement(task, "vote_timeout", "replicas did not vote in time")
            elif task.state == "voting" and task.vote_retry_at is not None and now >= task.vote_retry_at:
                task.vote_retry_at = now + self.config.vote_retry_s
                voted = task.tally.voters() if task.tally is not None else frozenset()
                again = [RequestVote(task.task_id, p, task.tally.ballot, d)
                         for p, d in sorted(task.results.items()) if p not in voted]
                self.counters["vote_requests_repeated"] = self.counters.get("vote_requests_repeated", 0) + len(again)
                actions += again
        return actions

    def next_deadline(self) -> float | None:
        """The earliest monotonic time :meth:`tick` has something to do (None: nothing pending).

        Only times ``tick`` acts on: after ``tick(now)`` the answer is None or later than
        ``now`` (a driver's timer never spins on a past deadline). An attempt's timeout; a
        task's backoff end; for a task that waits for room (no backoff pending) its queue
        timeout, but only while none of its attempts is in flight (the timeout is checked when
        they end), the reopen time of each open breaker (of peers still known) and when a
        distrusted peer's next slot grows back. Room that a
        result, a failure or a new advertisement frees is an event, not a time: the driver calls
        the core then (and ticks at least every second).
        """
        times: list[float] = []
        waiting = False
        for task in self.tasks.values():
            if task.state == "running":
                times += [a.deadline for a in task.attempts.values()]
                if task.missing > 0:
                    if task.retry_at is not None:
                        times.append(task.retry_at)  # placement resumes then, not before
                    else:
                        waiting = True
                        if not task.attempts:
                            times.append(task.submitted_at + self.config.queue_timeout_s)
            elif task.state == "voting" and task.vote_deadline is not None:
                times.append(task.vote_deadline)
                if task.vote_retry_at is not None:
                    times.append(task.vote_retry_at)
        if waiting:
            times += [t for b in self.breakers.values() if (t := b.reopens_at()) is not None]
            times += [t.since + self.config.slot_trust_recovery_s for t in self.slot_trust.values()]
        return min(times) if times else None

    # ------------------------------------------------------------ internals

    def _place_waiting(self, now: float) -> list[Action]:
        """Place tasks that wait for room (no backoff pending), oldest first, while some peer
        has a free slot."""
        actions: list[Action] = []
        for task in list(self.tasks.values()):
            if task.state == "running" and task.missing > 0 and (task.retry_at is None or now >= task.retry_at):
                if not any(self._slot_free(p, now) for p in self.peers):
                    if now >= task.submitted_at + self.config.queue_timeout_s:
                        actions += self._place(task, now)  # fails it if nothing of it is in flight
                    continue
                actions += self._place(task, now)
        return actions

    def _place(self, task: _Task, now: float) -> list[Action]:
        if task.state != "running" or task.missing <= 0:
            return []
        if task.retry_at is not None and now < task.retry_at:
            return []
        task.retry_at = None
        in_use = set(task.results) | {a.peer_id for a in task.attempts.values()}
        busy = task.tried | in_use
        chosen = self._choose(self.candidates(task.req, now, busy), task.missing)
        # peers that only refused it for room may take it again once no untried peer is left,
        # within queue_timeout_s of its submission (a peer may keep refusing: the wait is bounded)
        waited_out = now >= task.submitted_at + self.config.queue_timeout_s
        again = busy if waited_out else (task.tried - task.room_refused) | in_use
        if len(chosen) < task.missing and task.room_refused and not waited_out:
            more = self._choose(self.candidates(task.req, now, again | set(chosen)), task.missing - len(chosen))
            chosen = list(chosen) + list(more)
        actions: list[Action] = []
        for peer_id in chosen:
            actions.append(self._dispatch(task, peer_id, now))
        if task.missing > 0 and not task.attempts and not chosen:
            untried = [p for p in self.peers if p not in again and self._could_ever_fit(p, task.req)]
            if len(untried) < task.missing:
                detail = f"{len(untried)} untried capable peers left, {task.missing} replicas missing"
                if task.room_refusals and waited_out:
                    detail += (f"; {task.room_refusals} refusals for lack of room within "
                               f"{self.config.queue_timeout_s} s")
                if task.failures:
                    return actions + self._finish_exhausted(task, detail)
                return actions + self._finish_failed(task, "no_capacity", detail)
            if now >= task.submitted_at + self.config.queue_timeout_s:
                return actions + self._finish_failed(task, "no_capacity",
                                                     f"no peer had room within {self.config.queue_timeout_s} s")
        return actions

    def _dispatch(self, task: _Task, peer_id: str, now: float) -> Dispatch:
        req = task.req
        gpus = tuple(self._free_gpus(peer_id, req)[:req.gpus]) if req.gpus else ()
        number = task.next_attempt
        task.next_attempt += 1
        leases = self.gpu_leases.setdefault(peer_id, {})
        for index in gpus:
            assert index not in leases, "GPU leased twice"  # _free_gpus excludes leased ones
            leases[index] = (task.task_id, number)
        self.committed_memory[peer_id] = self.committed_memory.get(peer_id, 0) + req.memory_bytes
        self.in_flight[peer_id] = self.in_flight.get(peer_id, 0) + 1
        self.breakers[peer_id].on_dispatch(now, (task.task_id, number))
        timeout_s = req.wall_time_s + self.config.timeout_slack_s
        att = _Attempt(number, peer_id, gpus, now + timeout_s, now)
        task.attempts[number] = att
        task.tried.add(peer_id)
        task.room_refused.discard(peer_id)  # another refusal for room adds it again, a failure does not
        self._count("dispatched")
        return Dispatch(task.task_id, number, peer_id, gpus, timeout_s, att.deadline)

    def _end_attempt(self, task: _Task, att: _Attempt) -> None:
        if task.attempts.pop(att.number, None) is None:
            return  # ended already
        if att.peer_id in self.breakers:
            self.breakers[att.peer_id].on_call_ended((task.task_id, att.number))
        if att.peer_id in self.in_flight:
            self.in_flight[att.peer_id] = max(0, self.in_flight[att.peer_id] - 1)
        leases = self.gpu_leases.get(att.peer_id, {})
        for index in att.gpu_indices:
            if leases.get(index) == (task.task_id, att.number):
                del leases[index]
        self.committed_memory[att.peer_id] = max(0, self.committed_memory.get(att.peer_id, 0) - task.req.memory_bytes)

    def _refused_for_room(self, task: _Task, att: _Attempt, reason: str, now: float) -> list[Action]:
        """A replica had no room for the attempt (other submitters took it): no failure of the task
        (it used up ``max_retries`` and, the peer counting as tried, ran out of peers: a burst from
        two submitters failed tasks no peer had done anything wrong with) and no blame. The task is
        placed again after a backoff, on another peer first; the refusing peer is tried again once
        no other is left and it has room. Waiting is bounded by ``queue_timeout_s`` from submission
        (``no_capacity``)."""
        self._end_attempt(task, att)
        self._count(f"attempt_{reason}")
        task.room_refused.add(att.peer_id)
        task.room_refusals += 1
        cfg = self.config
        delay = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** min(task.room_refusals - 1, 32))
        task.retry_at = now + delay * (1 + cfg.backoff_jitter * self.rng.random())
        return []

    def _fail_attempt(self, task: _Task, att: _Attempt, reason: str, now: float, *, observe: bool,
                      breaker: bool) -> list[Action]:
        self._end_attempt(task, att)
        actions: list[Action] = []
        if breaker and att.peer_id in self.breakers:
            b = self.breakers[att.peer_id]
            was_open = b.current(now) is BreakerState.OPEN
            b.on_failure(now)
            if b.state is BreakerState.OPEN and not was_open:
                self._count("breaker_opened")
                actions.append(BreakerOpened(att.peer_id, b.open_for_s, b.failures))
        if observe:
            actions.append(Observe(att.peer_id, ObservationKind.TASK_DISAGREE, task.task_id, f"failed: {reason}"))
        task.failures += 1
        self._count(f"attempt_{reason}"
                    if reason in ("timeout", "peer_removed", "deadline_exceeded_early", *REFUSALS_NOT_BLAMED)
                    else "attempt_failed")
        if task.failures > self.config.max_retries:
            for other in list(task.attempts.values()):
                self._end_attempt(task, other)
                actions.append(Cancel(task.task_id, other.number, other.peer_id, "task_failed"))
            return actions + self._finish_exhausted(task, f"{task.failures} failed attempts, last: {reason}")
        cfg = self.config
        delay = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (task.failures - 1))
        task.retry_at = now + delay * (1 + cfg.backoff_jitter * self.rng.random())
        return actions

    def _open_ballot(self, task: _Task, now: float) -> list[Action]:
        assert self.weights is not None
        table = WeightTable(self.weights.epoch, {p: max(1, self._weight(p)) for p in task.results})
        try:  # TaskRequirements checked the rule and threshold; a ballot that still cannot open fails the task
            ballot = Ballot.create(epoch=table.epoch, purpose=task_ballot_purpose(self.submitter, task.task_id, table),
                                   rule=task.req.rule, threshold=task.req.threshold)
        except LocalProtocolError as exc:
            return self._finish_failed(task, "invalid_ballot", str(exc))
        task.state = "voting"
        task.table = table
        task.tally = Tally(ballot, table, self.network_id)
        task.vote_deadline = now + self.config.vote_timeout_s
        task.vote_retry_at = now + self.config.vote_retry_s
        return [RequestVote(task.task_id, p, ballot, d) for p, d in sorted(task.results.items())]

    def _accept(self, task: _Task, choice: bytes, certificate: VoteCertificate) -> list[Action]:
        task.state = "done"
        agree = tuple(sorted(p for p, d in task.results.items() if d == choice))
        disagree = tuple(sorted(p for p, d in task.results.items() if d != choice))
        actions: list[Action] = [Observe(p, ObservationKind.TASK_AGREE, task.task_id) for p in agree]
        actions += [Observe(p, ObservationKind.TASK_DISAGREE, task.task_id, "result differs from the accepted one")
                    for p in disagree]
        assert task.table is not None
        actions.append(TaskAccepted(task.task_id, choice, certificate, task.table, agree, disagree))
        self._count("accepted")
        self._forget(task)
        return actions

    def _finish_exhausted(self, task: _Task, detail: str) -> list[Action]:
        """The task is out of retries or untried peers: ``deadline_exceeded`` when most of its
        failed attempts ran past its wall time (the module does not finish in time; retrying it
        elsewhere will not help), else ``retries_exhausted``."""
        if 2 * task.deadline_failures > task.failures:
            return self._finish_failed(
                task, "deadline_exceeded",
                f"{task.deadline_failures} of {task.failures} failed attempts ran past the task's wall time "
                f"({task.req.wall_time_s:g} s), each on another peer; {detail}")
        return self._finish_failed(task, "retries_exhausted", detail)

    def _no_agreement(self, task: _Task, reason: str, detail: str) -> list[Action]:
        return self._finish_failed(task, reason, detail)

    def _finish_failed(self, task: _Task, reason: str, detail: str) -> list[Action]:
        task.state = "failed"
        self._count(f"failed_{reason}")
        self._forget(task)
        return [TaskFailed(task.task_id, reason, detail)]
