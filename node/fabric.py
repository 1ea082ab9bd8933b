"""The execution fabric inside a node: WASM agents, remote tasks, placement, votes.

One actor (``fabric``) receives the ``fabric_*`` envelopes (:mod:`chimera.fabric.wire`)
and one timer task drives the pure :class:`~chimera.fabric.placement.Placement`
core. The protocol is in docs/PROTOCOL.md §18; in short:

* **Capacity.** Every ``fabric_capacity_interval_s`` the node probes itself
  (:class:`~chimera.fabric.probes.SystemProbe`: psutil + NVML; with the
  simulation option ``fabric_probe_gpus = N`` a
  :class:`~chimera.fabric.probes.SimulatedGpuProbe` with N simulated GPUs) and sends
  a signed ``fabric_capacity`` to every alive member. A peer's advertisement
  expires after three intervals; the placement core only sees alive members
  with a fresh advertisement (and this node itself).
* **Weights.** With a consensus log, the committed weight table of the
  current epoch (``node.consensus.core.table``); peers outside it get no work.
  Without consensus (a network without genesis validators) every alive member
  with capacity, and this node, weighs 1.
* **Submitting** (``tasks_submit``): the module is stored here by SHA-256;
  the core's :class:`Dispatch` becomes a ``fabric_task_run`` envelope (or a
  local run when the core picks this node); ``fabric_task_result`` feeds
  ``on_result``/``on_failure`` (the digest is recomputed from the reported
  exit code and stdout, a mismatch is a failure); :class:`RequestVote` becomes
  ``fabric_vote_request`` and the signed ``fabric_vote`` goes to ``on_vote``;
  :class:`TaskAccepted` carries the vote certificate, checked again with
  :func:`~chimera.fabric.placement.verify_task_certificate` before it is
  reported; an agreed ``error`` digest (out of fuel, module rejected...)
  makes the task ``failed`` with that reason (and the certificate).
  :class:`Observe` goes into the node's reputation (``node.reputation``).
* **Executing**: at most ``fabric_task_slots`` tasks at once, each in a worker
  thread, and ``QUEUE_PER_SLOT`` per slot waiting (more are refused with
  reason ``busy``, which the submitter retries elsewhere without blame); one
  submitter holds at most ``QUEUE_PER_SLOT`` places per slot, so the others
  always find a slot's worth. The
  submitters' cores use no more slots than ``fabric_capacity`` advertised free,
  so the queue holds only what several submitters sent at once; an attempt
  cancelled while it waits there is dropped unrun (``fabric_cancelled_before_start``),
  one cancelled while it runs is stopped within about 0.1 s (the sandbox's
  ``cancel`` event, ``fabric_cancelled_running``); neither is answered.
  A module this node lacks
  is fetched from the submitting peer in chunks and verified by SHA-256
  (only ``.wasm`` bytes ever travel; this node compiles them itself); GPU
  indices leased by the submitter are checked against this node's own lease
  table. The replica remembers the digest it reported and signs only that.
* **Agents**: :class:`~chimera.fabric.host.AgentHost` +
  :class:`~chimera.fabric.deploy.DeploymentManager` with the SQLite history
  (``DATA_DIR/fabric/agents.sqlite3``); an agent's ``chimera.send`` to another
  peer becomes a signed ``fabric_actor_message``.

wasmtime is imported lazily, when the first agent or task runs (or at start
when agents were deployed before a restart), so an idle peer stays small.
Events: ``task_dispatched``, ``task_completed``, ``task_resumed``, ``agent_swapped``.

**Task records.** Each task submitted here is written to the store's
``fabric_tasks`` table (:class:`~chimera.node.store.TaskRecords`) when it is
submitted (with its first dispatches), again when its dispatches change (retries:
the tasks re-placed in one event-loop turn in one transaction) and when it ends,
by one writer thread with its own connection (never on the event loop; the same
``MAX_TASKS_KEPT`` bound as in memory). A running task's record holds its input
(written once; cleared when it ends). At start the records are read back: a
finished task shows as it did; one that was still ``running`` is **resumed** when
it was submitted at most ``fabric_resume_max_age_s`` before and its input and
module are here: its record is written again with the resumption (attempt numbers
from ``1 + n * ATTEMPT_BLOCK`` for its n-th resumption, above every number an
earlier placement of it can have used, so a late result of a pre-crash attempt is
ignored), and once that is durable and enough capable peers advertise (or
``RESUME_PEERS_WAIT_S`` passed) it is placed again from scratch (counter
``fabric_tasks_resumed``, event ``task_resumed``; the replicas re-run it and sign
the same deterministic digest). Any other one is ``failed`` with reason
``interrupted`` (where it was dispatched is kept). Task ids go on from the
highest stored ``seq`` (unreadable records included). A write the store refuses (disk full) is counted
(``fabric_task_record_errors``) and logged; the task goes on in memory. When the
table cannot be read at all, nothing is written to it in this run (counted and
logged): the trim could otherwise delete records this run cannot see.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import math
import os
import random
import re
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import msgpack

from chimera.consensus.quorum import CertificateError, WeightTable
from chimera.consensus.reputation import ObservationKind
from chimera.consensus.votes import RULES, BallotVote, VoteCertificate
from chimera.fabric.digests import error_digest, result_digest
from chimera.fabric.modules import (
    BadOffset,
    ModuleIntegrityError,
    ModuleNotFound,
    ModuleStore,
    ModuleTooLarge,
    check_hash_name,
)
from chimera.fabric.placement import (
    MAX_ATTEMPT,
    BreakerOpened,
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
    check_threshold,
    verify_task_certificate,
    wire_wall_time_ms,
)
from chimera.fabric.probes import probe_for
from chimera.fabric.resources import MAX_TASK_WALL_TIME_MS, Resources
from chimera.fabric.wire import (
    CHUNK_BYTES,
    FABRIC_ACTOR,
    MAX_ACTOR_PAYLOAD_BYTES,
    MAX_MODULE_BYTES,
    MAX_TASK_INPUT_BYTES,
    MAX_TASK_OUTPUT_BYTES,
    MIN_CHUNK_BYTES,
    FabricActorMessage,
    FabricCapacity,
    FabricModuleChunk,
    FabricModuleRequest,
    FabricTaskCancel,
    FabricTaskResult,
    FabricTaskRun,
    FabricVote,
    FabricVoteRequest,
    ModuleAssembler,
    NotWebAssembly,
)
from chimera.protocol.envelope import Envelope
from chimera.protocol.errors import LocalProtocolError, MalformedError, RemoteProtocolError
from chimera.protocol.membership import MemberState
from chimera.protocol.messages import decode_fields, encode_fields
from chimera.protocol.ratelimit import TokenBucket

from . import admin as admin_api
from .actors import Actor, wait_event
from .metrics import LatencyHistogram
from .store import TaskRecords

log = logging.getLogger("chimera.fabric.node")

FETCH_CHUNK_TIMEOUT_S = 10.0
QUEUE_PER_SLOT = 4  # attempts waiting for a slot, per slot; beyond that: refused as "busy"
MAX_TASKS_KEPT = 256  # finished tasks kept for tasks_status (input and replicas' stdout freed when done)
MAX_FETCHES_PER_SOURCE = 2  # module fetches in flight from one submitter; more runs naming new modules: busy
INLINE_CHUNK_BYTES = 64 << 10  # verified chunks up to this size are read on the event loop
DEFAULT_FUEL = 1_000_000_000
LOCAL_CALL_INPUT_BYTES = 4 << 20  # agents_call runs here: the sandbox's own stdin limit (no envelope)
DEFAULT_TASK_MEMORY_BYTES = 64 << 20
DEFAULT_WALL_TIME_S = 10.0
RECORD_WAIT_S = 5.0  # tasks_submit waits at most this long for the task's record; close() for the writer
MAX_STATUS_WAITERS = 4  # tasks_status calls waiting (wait_s) at once; more are answered at once
MAX_RECORD_HISTORY_BYTES = 4 << 20  # a stored record's placement/results/observations (larger: unreadable)
INTERRUPTED_DETAIL = "the submitting node restarted before the result was agreed"
# attempt numbers one placement of a task may use: its n-th resumption after a restart numbers its
# attempts from 1 + n * ATTEMPT_BLOCK (a placement uses a few dozen at most: retries, room refusals)
ATTEMPT_BLOCK = 1 << 20
MAX_RESUMPTIONS = MAX_ATTEMPT // ATTEMPT_BLOCK - 1  # 2046: the last block still fits the wire's Attempt
RESUME_PEERS_WAIT_S = 60.0  # a resumed task waits this long at most for enough capable peers
RESUME_RECORD_HANG_S = 60.0  # a resumption whose record write is not durable by then: interrupted
MAX_RESUME_CANCELS = 64  # a resumed task's earlier attempts told to stop (its latest dispatches)
# a stored threshold is str(Fraction): "n/d" or "n"; bounded digits, so that parsing a damaged
# record costs nothing (Fraction("1e10000000") computes a ten-million-digit integer)
_STORED_FRACTION_TEXT = re.compile(r"\d{1,19}(/\d{1,19})?")


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Runtime:
    """The wasmtime side, created on first use."""

    sandbox: Any
    host: Any
    store: Any
    deploy: Any


@dataclass
class _Run:
    """An attempt this node executes for ``submitter``."""

    submitter: str
    msg: FabricTaskRun
    started_mono: float
    epoch: int = 0  # this node's weight-table epoch when it accepted the run (vote requests: 18.4 step 6)
    # set by a cancel (the submitter's, or its own core's): stops the sandbox run at its next check
    cancel: threading.Event = field(default_factory=threading.Event)
    ran: bool = False  # its worker started the sandbox run (set in the worker thread)

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()


@dataclass
class _Fetch:
    """A module fetched from ``source`` (keyed by ``(module sha256, source)``): only the attempts
    that ``source`` itself sent wait on it."""

    assembler: ModuleAssembler
    source: str
    deadline: float
    waiting: list[tuple[str, str, int]] = field(default_factory=list)


@dataclass
class _Submitted:
    """A task submitted on this node (the placement core owns the decision state)."""

    task_id: str
    module_sha256: str
    input: bytes
    req: TaskRequirements
    submitted_ms: int
    submitted_mono: float
    state: str = "running"  # running | accepted | failed (an agreed error result is "failed" too)
    dispatches: list[dict] = field(default_factory=list)
    results: dict[str, dict] = field(default_factory=dict)
    observations: list[dict] = field(default_factory=list)
    accepted: TaskAccepted | None = None
    stdout: bytes = b""
    exit_code: int | None = None
    outcome: str | None = None  # the agreed result's status: "ok" or "error" (a deterministic failure)
    failure: tuple[str, str] | None = None
    finished_ms: int | None = None
    latency_s: float | None = None
    input_bytes: int | None = None
    module_pinned: bool = True  # in the module store until the task ends (FabricService._release)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    seq: int = 0  # submission order on this node (kept across restarts: the record's seq)
    saved: asyncio.Future | None = None  # the last record write queued (None: none, or no records)
    input_stored: bool = False  # a durable write of the record holds the input (later ones leave it)
    resumes: list[dict] = field(default_factory=list)  # {at_ms, first_attempt} per restart that resumed it


class FabricActor(Actor):
    name = FABRIC_ACTOR

    def __init__(self, service: "FabricService") -> None:
        self.service = service

    async def handle(self, item: object) -> None:
        if isinstance(item, Envelope):
            await self.service.on_envelope(item)


class FabricService:
    """The fabric of one node (created by :func:`start_fabric`)."""

    def __init__(self, node) -> None:
        cfg = node.config
        if cfg.fabric_task_slots < 1:
            raise LocalProtocolError("fabric_task_slots must be >= 1")
        if not 1 << 16 <= cfg.fabric_max_wasm_memory_bytes <= 4 << 30:
            raise LocalProtocolError("fabric_max_wasm_memory_bytes must be in 64 KiB..4 GiB")
        self.node = node
        self.config = cfg
        self.peer_id = node.peer_id
        self.task_latency = LatencyHistogram()  # tasks submitted here: submission -> outcome
        self.task_outcomes: dict[tuple[str, str], int] = {}  # (module sha prefix, outcome) -> count
        self.network_id = node.network.network_id
        self.loop = asyncio.get_running_loop()
        self.root = node.data_dir / "fabric"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # the quota never removes a module a run, a task or a deploy here has pinned, nor one the
        # deployment history of an agent not removed names (read at each enforcement)
        self.modules = ModuleStore(self.root / "modules", fetched_max_bytes=cfg.fabric_fetched_modules_max_bytes,
                                   protected=self._deployed_modules)
        self.counters = node.counters
        self.slots = cfg.fabric_task_slots
        # the longest run accepted from anyone (advertised): bounds a slot's occupation and close()
        self.max_task_wall_time_ms = min(MAX_TASK_WALL_TIME_MS, wire_wall_time_ms(cfg.fabric_max_task_wall_s))
        self.interval_s = max(0.1, cfg.fabric_capacity_interval_s)
        self.probe = self._make_probe()
        self.own: Resources | None = None
        self.capacity: dict[str, tuple[Resources, float]] = {}  # peer -> (resources, expires at, monotonic)
        self.placement = Placement(PlacementConfig(), network_id=self.network_id, submitter=self.peer_id,
                                   rng=random.Random(int.from_bytes(os.urandom(8), "big")))
        self.tasks: OrderedDict[str, _Submitted] = OrderedDict()
        self.running: dict[tuple[str, str, int], _Run] = {}
        self.gpu_leases: dict[int, tuple[str, str, int]] = {}
        self.executed = ExecutedDigests()  # the digests this node reported, per submitter (bounded)
        self.fetches: dict[tuple[str, str], _Fetch] = {}  # (module sha256, source) -> fetch
        self._module_request_buckets: OrderedDict[str, TokenBucket] = OrderedDict()  # per peer (LRU, bounded)
        self.reputation = node.reputation
        self.observations: deque[dict] = deque(maxlen=500)
        self.task_pool = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="fabric-task")
        self.admin_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fabric-admin")
        self._runtime: _Runtime | None = None
        self._runtime_lock = threading.Lock()
        self._replies: deque[tuple[float, str, bytes]] = deque(maxlen=256)  # to the admin sink
        self._wake = asyncio.Event()
        self._next_advert = 0.0
        self._advertised_to: set[str] = set()
        self._task_seq = 0
        self._closed = False
        self._placed: dict[str, _Submitted] = {}  # running tasks whose dispatches changed since their last write
        self._placed_flush: asyncio.Handle | None = None
        # task records: one writer thread (writes stay in order), its own connection to the store
        self._records_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fabric-records")
        self._records_closed: asyncio.Future | None = None
        # records waiting for the writer (task id -> (task, its saved future)); one transaction
        # in flight at a time (group commit, _save_records)
        self._record_queue: dict[str, tuple[_Submitted, asyncio.Future]] = {}
        self._records_writing = False
        self.status_waiters = 0  # tasks_status calls waiting for a task's end (MAX_STATUS_WAITERS)
        # tasks running when this node stopped, to be placed again (_resume_due): task id -> task
        self._resuming: dict[str, _Submitted] = {}
        self._resume_since = time.monotonic()
        self._records = self._open_records()

    # ------------------------------------------------------------ set-up

    def _open_records(self) -> TaskRecords | None:
        """Open the task records and load them into ``self.tasks``; task numbering goes on from the
        highest stored ``seq``. None: the store could not be opened or read (counted, logged);
        the fabric then keeps its tasks in memory only and writes no record in this run, so
        that the trim of a table it cannot see never deletes the newest records."""
        try:
            records = TaskRecords(self.node.store.path)
        except sqlite3.Error as exc:
            self.counters["fabric_task_record_errors"] += 1
            log.error("cannot open the task records in %s (tasks are kept in memory only): %s",
                      self.node.store.path, exc)
            return None
        try:  # numbering goes on after every stored task (also when the records cannot be loaded)
            self._task_seq = records.max_seq()
        except sqlite3.Error:
            pass
        try:
            rows = records.load(MAX_TASKS_KEPT)
        except sqlite3.Error as exc:
            self.counters["fabric_task_record_errors"] += 1
            log.error("cannot read the task records in %s (no record is written in this run; tasks are kept "
                      "in memory only): %s", self.node.store.path, exc)
            records.close()
            return None
        interrupted, resumed = [], []
        now_ms = _wall_ms()
        for row in rows:
            try:
                rec = self._task_of_record(row)
            except Exception as exc:  # noqa: BLE001 - a damaged row is skipped, never a failed start
                self.counters["fabric_task_records_unreadable"] += 1
                log.error("skipping an unreadable task record %.64r: %s", row.get("task_id"), exc)
                continue
            if rec.state == "running":
                why = self._resume(rec, now_ms)
                if why is None:
                    resumed.append(rec)
                else:
                    rec.state, rec.failure, rec.finished_ms = "failed", ("interrupted", why), now_ms
                    rec.input = b""
                    interrupted.append(rec)
            self.tasks[rec.task_id] = rec
            self._task_seq = max(self._task_seq, rec.seq)
        self._records = records
        for rec in interrupted:
            self.counters["fabric_tasks_interrupted"] += 1
            log.warning("task %s was running when this node stopped: failed (interrupted: %s)", rec.task_id,
                        rec.failure[1])
        for rec in resumed:
            log.warning("task %s was running when this node stopped: it is placed again (attempts from %d)",
                        rec.task_id, rec.resumes[-1]["first_attempt"])
        # written before any resumed attempt is sent (_resume_due waits for it): its attempt
        # numbers are then never used again, whatever happens next
        self._save_records(interrupted + resumed)
        if rows:
            log.info("loaded %d task records (%d interrupted, %d to resume)", len(self.tasks), len(interrupted),
                     len(resumed))
        return records

    def _resume(self, rec: _Submitted, now_ms: int) -> str | None:
        """Prepare ``rec``, running when this node stopped, to be placed again (:meth:`_resume_due`);
        or the detail of its ``interrupted`` failure when it cannot be: resumption is off
        (``fabric_resume_max_age_s`` 0), its input was not stored (a record of an older release, or
        the write that held it failed), it was submitted more than ``fabric_resume_max_age_s``
        before (wall clock), it was resumed ``MAX_RESUMPTIONS`` times, or its module is gone."""
        max_age_s = self.config.fabric_resume_max_age_s
        if max_age_s <= 0 or not rec.input_stored:
            return INTERRUPTED_DETAIL
        age_s = (now_ms - rec.submitted_ms) / 1000
        if age_s > max_age_s:
            return (f"{INTERRUPTED_DETAIL}; submitted {age_s:.0f} s before the restart, more than "
                    f"fabric_resume_max_age_s ({max_age_s:g} s)")
        if len(rec.resumes) >= MAX_RESUMPTIONS:
            return f"{INTERRUPTED_DETAIL}; it was resumed {len(rec.resumes)} times already"
        if not self.modules.pin(rec.module_sha256):  # pinned until it ends, as at submission
            self.modules.unpin(rec.module_sha256)
            return f"{INTERRUPTED_DETAIL}; its module {rec.module_sha256[:12]} is no longer in this node's store"
        rec.module_pinned = True
        rec.resumes.append({"at_ms": now_ms, "first_attempt": 1 + (len(rec.resumes) + 1) * ATTEMPT_BLOCK})
        rec.results = {}  # the earlier attempts' results are not counted (their votes are gone)
        rec.done = asyncio.Event()
        rec.submitted_mono = time.monotonic() - max(0.0, age_s)  # latency_s still runs from the submission
        self._resuming[rec.task_id] = rec
        return None

    def _resume_due(self, now: float) -> None:
        """Place the tasks waiting to be resumed whose record (with the resumption) is durable, once
        enough peers that could run each advertise, or :data:`RESUME_PEERS_WAIT_S` after the start
        (then placed with those known: unsatisfiable if still too few). A restarted node usually
        hears its members' adverts within an interval or two, but on a loaded machine they can take
        seconds, and placing too early fails a task that would have run."""
        waited = now - self._resume_since >= RESUME_PEERS_WAIT_S
        for task_id, rec in list(self._resuming.items()):
            saved = rec.saved
            if saved is not None and not saved.done():
                if now - self._resume_since < RESUME_RECORD_HANG_S:
                    continue
                # a disk that hangs: no attempt was sent, so ending it is safe (its failed record
                # is queued after the hung write and lands last)
                del self._resuming[task_id]
                self._end_unresumed(rec, "its record could not be written")
                continue
            if saved is None or saved.cancelled() or saved.exception() is not None:
                # its attempt numbers are not durable: a second crash could use them again
                del self._resuming[task_id]
                self._end_unresumed(rec, "its record could not be written")
                continue
            if not waited and self.placement.capable_peers(rec.req) < rec.req.replicas:
                continue
            del self._resuming[task_id]
            first = rec.resumes[-1]["first_attempt"]
            try:
                actions = self.placement.submit(task_id, rec.req, now, first_attempt=first)
            except LocalProtocolError as exc:  # (cannot happen: a fresh core, a checked number)
                log.error("task %s could not be placed again: %s", task_id, exc)
                self._end_unresumed(rec, str(exc))
                continue
            self.counters["fabric_tasks_resumed"] += 1
            age_s = round(max(0, rec.resumes[-1]["at_ms"] - rec.submitted_ms) / 1000, 3)
            self.node.emit_event("task_resumed", self.peer_id, task_id=task_id, first_attempt=first, age_s=age_s)
            self._cancel_earlier_attempts(rec, first)
            self._run_actions(actions)  # (its dispatches are written as a submission's retries are)

    def _end_unresumed(self, rec: _Submitted, why: str, reason: str = "interrupted") -> None:
        """A task prepared for resumption that is not placed after all: failed with ``reason``,
        ``interrupted`` (``why`` it could not be placed) or ``cancelled`` (by the submitter); its
        resumption entry goes (it was never placed again)."""
        if rec.resumes:
            rec.resumes.pop()
        rec.state, rec.finished_ms = "failed", _wall_ms()
        rec.failure = (reason, f"{INTERRUPTED_DETAIL}; {why}" if reason == "interrupted" else why)
        if reason == "interrupted":
            self.counters["fabric_tasks_interrupted"] += 1
        log.warning("task %s: failed (%s: %s)", rec.task_id, reason, why)
        self._release(rec)
        self._save_record(rec)
        self.node.emit_event("task_completed", self.peer_id, priority="warning", task_id=rec.task_id,
                             state="failed", reason=reason)
        rec.done.set()

    def _cancel_earlier_attempts(self, rec: _Submitted, first: int) -> None:
        """Tell the peers that held the latest earlier attempts of a resumed task to drop them
        (those still queued there are dropped unrun; a result of one would be ignored anyway)."""
        told: set[tuple[str, int]] = set()
        for d in rec.dispatches[-MAX_RESUME_CANCELS:]:
            peer, attempt = d.get("peer_id"), d.get("attempt")
            if type(peer) is not str or type(attempt) is not int or not 1 <= attempt < first \
                    or peer == self.peer_id or (peer, attempt) in told:
                continue
            told.add((peer, attempt))
            try:
                self.node.send(peer, FabricTaskCancel(task_id=rec.task_id, attempt=attempt,
                                                      reason="submitter restarted"))
            except LocalProtocolError as exc:  # a stored peer id that is not one: nothing to tell
                log.debug("no cancel for task %s attempt %d: %s", rec.task_id, attempt, exc)

    def _record_of(self, rec: _Submitted) -> dict:
        """The stored form of ``rec`` (store.TASK_RECORD_COLUMNS), built on the event loop."""
        req, a = rec.req, rec.accepted
        pack = functools.partial(msgpack.packb, use_bin_type=True)
        record = {
            "task_id": rec.task_id, "seq": rec.seq, "module_sha256": rec.module_sha256,
            "requirements": pack({"fuel": req.fuel, "memory_bytes": req.memory_bytes,
                                  "wall_time_s": float(req.wall_time_s), "gpus": req.gpus,
                                  "gpu_memory_bytes": req.gpu_memory_bytes, "replicas": req.replicas,
                                  "rule": req.rule,
                                  "threshold": None if req.threshold is None else str(req.threshold)}),
            "input_bytes": len(rec.input) if rec.input_bytes is None else rec.input_bytes,
            "submitted_ms": rec.submitted_ms, "finished_ms": rec.finished_ms, "state": rec.state,
            "outcome": rec.outcome, "exit_code": rec.exit_code, "stdout": rec.stdout,
            "digest": None if a is None else a.digest,
            "certificate": None if a is None else pack(encode_fields(a.certificate)),
            "acceptance": None if a is None else pack({"epoch": a.table.epoch, "weights": dict(a.table.weights),
                                                       "agreeing": list(a.agreeing),
                                                       "disagreeing": list(a.disagreeing)}),
            "failure_reason": None if rec.failure is None else rec.failure[0],
            "failure_detail": None if rec.failure is None else rec.failure[1],
            "history": pack({"placement": rec.dispatches, "observations": rec.observations,
                             "results": [{k: v for k, v in r.items() if not k.startswith("_")}
                                         for r in rec.results.values()],
                             "latency_s": rec.latency_s, "resumes": rec.resumes}),
        }
        # a running task's input is written until a write holding it is durable, then left as
        # stored (TaskRecords.save without the key); an ended task's is cleared
        if rec.state != "running":
            record["input"] = None
        elif not rec.input_stored:
            record["input"] = rec.input
        return record

    def _task_of_record(self, row: dict) -> _Submitted:
        """A task as it was stored (the inverse of :meth:`_record_of`); an accepted result's
        certificate is verified again.

        Raises:
            ValueError, TypeError, KeyError, LocalProtocolError, RemoteProtocolError (a
            certificate that does not decode or verify), msgpack errors: a damaged record.
        """
        def typed(name: str, kind: type, optional: bool = False):
            value = row[name]
            if value is None and optional:
                return None
            if type(value) is not kind:
                raise ValueError(f"{name} is {type(value).__name__}, not {kind.__name__}")
            return value

        def unpack(name: str, optional: bool = False):
            blob = typed(name, bytes, optional)
            if blob is None:
                return None
            if len(blob) > MAX_RECORD_HISTORY_BYTES:
                raise ValueError(f"{name} is {len(blob)} bytes")
            value = msgpack.unpackb(blob, raw=False, strict_map_key=True)
            if name != "certificate" and type(value) is not dict:
                raise ValueError(f"{name} is not a map")
            return value

        task_id = typed("task_id", str)
        if not 0 < len(task_id) <= 128:
            raise ValueError("task id length")
        sha = check_hash_name(typed("module_sha256", str))
        r = unpack("requirements")
        threshold = r.get("threshold")
        if threshold is not None:  # matched before Fraction sees it (see _STORED_FRACTION_TEXT)
            if type(threshold) is not str or not _STORED_FRACTION_TEXT.fullmatch(threshold):
                raise ValueError(f"threshold {str(threshold)[:40]!r} is not a stored fraction")
            threshold = Fraction(threshold)  # (a zero denominator: ZeroDivisionError, unreadable)
        req = TaskRequirements(fuel=r["fuel"], memory_bytes=r["memory_bytes"], wall_time_s=r["wall_time_s"],
                               gpus=r["gpus"], gpu_memory_bytes=r["gpu_memory_bytes"], replicas=r["replicas"],
                               rule=r["rule"], threshold=threshold)
        state = typed("state", str)
        outcome = typed("outcome", str, optional=True)
        if state not in ("running", "accepted", "failed") or outcome not in (None, "ok", "error"):
            raise ValueError(f"state {state[:16]!r} / outcome {str(outcome)[:16]!r}")
        stdout = typed("stdout", bytes)
        if len(stdout) > MAX_TASK_OUTPUT_BYTES:
            raise ValueError(f"stdout of {len(stdout)} bytes")
        reason, detail = typed("failure_reason", str, optional=True), typed("failure_detail", str, optional=True)
        history = unpack("history")
        placement, observations, results = history["placement"], history["observations"], history["results"]
        if not all(type(v) is list for v in (placement, observations, results)) or \
                not all(type(x) is dict for x in (*placement, *observations, *results)):
            raise ValueError("history is not lists of maps")
        latency = history.get("latency_s")
        if latency is not None and type(latency) is not float:
            raise ValueError("latency_s")
        resumes = history.get("resumes", [])  # (absent in records of older releases)
        if type(resumes) is not list or not all(
                type(x) is dict and type(x.get("at_ms")) is int and type(x.get("first_attempt")) is int
                and 1 <= x["first_attempt"] <= MAX_ATTEMPT for x in resumes):
            raise ValueError("resumes is not a list of {at_ms, first_attempt}")
        # None: not kept (an ended task, or a record of an older release). Only a running task needs
        # it; one that is not bytes of its recorded size cannot be resumed (it ends interrupted and
        # its record is written again) but the record still reads
        stored_input = row.get("input") if state == "running" else None
        if stored_input is not None and (type(stored_input) is not bytes
                                         or len(stored_input) > MAX_TASK_INPUT_BYTES
                                         or len(stored_input) != typed("input_bytes", int)):
            log.warning("task %s: its stored input is unreadable; it cannot be resumed", task_id)
            stored_input = None
        rec = _Submitted(task_id, sha, b"", req, typed("submitted_ms", int), 0.0, state=state,
                         dispatches=placement, observations=observations, stdout=stdout,
                         exit_code=typed("exit_code", int, optional=True), outcome=outcome,
                         failure=None if reason is None else (reason, detail or ""),
                         finished_ms=typed("finished_ms", int, optional=True), latency_s=latency,
                         input_bytes=typed("input_bytes", int), module_pinned=False, seq=typed("seq", int),
                         resumes=resumes)
        rec.results = {str(x.get("peer_id")): x for x in results}
        if state == "running" and stored_input is not None:
            rec.input, rec.input_stored = stored_input, True
        if outcome is not None:  # an agreed result: its certificate must stand on its own again
            digest = typed("digest", bytes)
            cert = decode_fields(VoteCertificate, unpack("certificate"), "certificate")
            acc = unpack("acceptance")
            table = WeightTable(acc["epoch"], acc["weights"])
            verify_task_certificate(cert, table, self.network_id, task_id, submitter=self.peer_id)
            if cert.choice != digest:
                raise ValueError("the certificate is for another digest")
            rec.accepted = TaskAccepted(task_id, digest, cert, table, tuple(acc["agreeing"]),
                                        tuple(acc["disagreeing"]))
            if (state == "accepted") != (outcome == "ok") or (outcome == "error" and rec.failure is None):
                raise ValueError(f"state {state} does not go with outcome {outcome}")
        elif state != "running" and rec.failure is None:
            raise ValueError(f"a {state} task without a result or a failure")
        rec.done.set()
        return rec

    def _save_record(self, rec: _Submitted) -> None:
        """Queue a write of ``rec``'s record (the writer thread; in order). A failure is counted
        (``fabric_task_record_errors``) and logged; the task itself goes on in memory."""
        self._save_records([rec])

    def _save_records(self, recs: list[_Submitted]) -> None:
        """Queue writes of the records of ``recs`` as they are now; as :meth:`_save_record`.

        Group commit: while the writer thread commits one transaction, the records queued
        meanwhile wait and go together in the next (a task's latest state once); each task's
        ``saved`` future is done when a transaction holding its state as of this call is
        durable (a burst of 100 submissions is a few transactions, not 100 fsyncs)."""
        if self._records is None or self._closed or not recs:
            return
        for rec in recs:  # written as they are now: a pending placement write of them is done by this one
            self._placed.pop(rec.task_id, None)
            queued = self._record_queue.get(rec.task_id)
            if queued is None:  # (a queued one is snapshot when its transaction starts: it has this state)
                rec.saved = self.loop.create_future()
                self._record_queue[rec.task_id] = (rec, rec.saved)
        self._write_records()

    def _write_records(self) -> None:
        """Start the next transaction of queued records unless one is in flight."""
        if self._records_writing or not self._record_queue or self._records is None:
            return
        batch, self._record_queue = list(self._record_queue.values()), {}
        records = [self._record_of(rec) for rec, _ in batch]  # (on the event loop: consistent snapshots)
        with_input = [rec for (rec, _), r in zip(batch, records) if r.get("input") is not None]
        self._records_writing = True
        job = self.loop.run_in_executor(self._records_pool,
                                        functools.partial(self._records.save, *records, keep=MAX_TASKS_KEPT))
        described = ", ".join(f"{rec.task_id} ({rec.state})" for rec, _ in batch[:3]) + \
            (f" and {len(batch) - 3} more" if len(batch) > 3 else "")

        def written(f: asyncio.Future) -> None:
            self._records_writing = False
            exc = None if f.cancelled() else f.exception()
            if exc is not None:
                self.counters["fabric_task_record_errors"] += 1
                log.error("could not write the record of task %s; kept in memory only: %s", described, exc)
            else:
                for rec in with_input:
                    rec.input_stored = True
            for _, saved in batch:
                if not saved.done():
                    if exc is None:
                        saved.set_result(None)
                    else:
                        saved.set_exception(exc)
                        saved.exception()  # (retrieved: counted and logged here)
            if not self._closed:
                self._write_records()

        job.add_done_callback(written)

    def _placement_changed(self, rec: _Submitted) -> None:
        """``rec`` was dispatched again: its record is written at the end of this event-loop turn,
        with every other task re-placed in the same turn (one transaction: a round of retries
        after a peer left is one write, not one per task)."""
        if self._records is None or self._closed:
            return
        self._placed[rec.task_id] = rec
        if self._placed_flush is None:
            self._placed_flush = self.loop.call_soon(self._flush_placed)

    def _flush_placed(self) -> None:
        self._placed_flush = None
        recs = [r for r in self._placed.values() if r.state == "running" and self.tasks.get(r.task_id) is r]
        self._placed.clear()  # (an ended task's record was written when it ended)
        self._save_records(recs)

    def _make_probe(self):
        n = self.config.fabric_probe_gpus
        if n >= 0:
            log.warning("fabric_probe_gpus = %d: advertising %d SIMULATED GPUs (test/simulation option)",
                        n, min(n, 64))
        return probe_for(self.node.data_dir, probe_gpus=n, max_wasm_memory_bytes=self.config.fabric_max_wasm_memory_bytes,
                         max_task_wall_time_ms=self.max_task_wall_time_ms)

    def runtime(self) -> _Runtime:
        """The wasmtime engine, actor host and deployment manager (created on first call; blocks)."""
        with self._runtime_lock:
            if self._runtime is None:
                from chimera.fabric.deploy import DeploymentManager
                from chimera.fabric.host import AgentHost
                from chimera.fabric.sandbox import Limits, SandboxEngine

                from .agent_store import SqliteDeploymentStore

                cap = self.config.fabric_max_wasm_memory_bytes
                sandbox = SandboxEngine(self.root / "compiled", memory_reservation_bytes=cap,
                                        cache_max_bytes=self.config.fabric_compiled_cache_max_bytes)
                # queued payload per agent: 16 of the largest envelopes this node accepts (16 MiB, edge 4 MiB)
                host = AgentHost(sandbox, peer_id=self.peer_id, remote_send=self._remote_send,
                                 mailbox_max_bytes=16 * self.config.max_message_bytes)
                host.add_sink("admin", self._admin_sink)
                store = SqliteDeploymentStore(self.root / "agents.sqlite3")
                # agents deployed here get the node's memory cap, as tasks from other peers do
                deploy = DeploymentManager(sandbox, self.modules, host, store, on_event=self._on_deployment_event,
                                           limits=Limits(memory_bytes=cap))
                try:
                    restored = deploy.restore()
                    if restored:
                        log.info("restored agents: %s", ", ".join(restored))
                    # each agent that could not be restored is logged by restore() and listed as failed
                    self.counters["fabric_agents_restore_failed"] += len(deploy.restore_failures)
                except Exception:  # noqa: BLE001 - a bad stored module must not stop the fabric
                    log.exception("could not restore every deployed agent")
                host.start(workers=2)
                self._runtime = _Runtime(sandbox, host, store, deploy)
                self.counters["fabric_runtime_started"] += 1
            return self._runtime

    def _has_deployments(self) -> bool:
        """True when the deployment history names an agent that was not removed (read without wasmtime)."""
        path = self.root / "agents.sqlite3"
        if not path.exists():
            return False
        db = sqlite3.connect(path)
        try:
            rows = db.execute("SELECT name, action FROM agent_deployments ORDER BY seq").fetchall()
        except sqlite3.Error:
            return True  # let the deployment store report what is wrong
        finally:
            db.close()
        last = {name: action for name, action in rows}
        return any(action != "remove" for action in last.values())

    async def run(self) -> None:
        """Timer: capacity advertisements, placement ticks, fetch timeouts. Closes the service when cancelled."""
        try:
            if await self.loop.run_in_executor(self.admin_pool, self._has_deployments):
                await self.loop.run_in_executor(self.admin_pool, self.runtime)  # restart: restore the agents
            while True:
                now = time.monotonic()
                if now >= self._next_advert:
                    self._next_advert = now + self.interval_s
                    try:
                        await self._advertise()
                    except Exception:  # noqa: BLE001 - a probe failure must not stop the timer
                        self.counters["fabric_probe_errors"] += 1
                        log.exception("capacity probe failed")
                try:
                    self._advertise_to_newcomers()
                    now = time.monotonic()
                    self._expire_fetches(now)
                    self._refresh_peers(now)
                    if self._resuming:
                        self._resume_due(now)
                    self._run_actions(self.placement.tick(now))
                except Exception:  # noqa: BLE001 - a bug must not stop timeouts and retries for good
                    self.counters["fabric_timer_errors"] += 1
                    log.exception("fabric tick failed")
                deadlines = [self._next_advert, *(f.deadline for f in self.fetches.values())]  # inf: storing
                nd = self.placement.next_deadline()
                if nd is not None:
                    deadlines.append(nd)
                delay = min(1.0, max(0.005, min(deadlines) - time.monotonic()))
                self._wake.clear()
                await wait_event(self._wake, delay)
        finally:
            self.close()
            if self._records_closed is not None:  # the last records written before the store is reused
                try:
                    await asyncio.wait_for(asyncio.shield(self._records_closed), RECORD_WAIT_S)
                except Exception as exc:  # noqa: BLE001 - closing goes on: the writes already failed or wait
                    log.warning("the task records were not closed cleanly within %g s: %r", RECORD_WAIT_S, exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.task_pool.shutdown(wait=False, cancel_futures=True)
        self.admin_pool.shutdown(wait=False, cancel_futures=True)
        if self._records is not None:  # after the writes queued before it (run() waits for it)
            if self._record_queue:  # not started yet: after the one in flight (the pool runs jobs in order)
                self._records_writing = False
                self._write_records()
            self._records_closed = self.loop.run_in_executor(self._records_pool, self._records.close)
        self._records_pool.shutdown(wait=False)
        rt = self._runtime
        if rt is not None:
            rt.host.close()
            rt.sandbox.close()
            rt.store.close()
        close = getattr(self.probe, "close", None)
        if close is not None:
            close()

    # ------------------------------------------------------------ peers and capacity

    def alive_members(self) -> list[str]:
        return [p for p, m in self.node.membership.members.items()
                if m.state is MemberState.ALIVE and p in self.node.routes]

    def _capacity_msg(self) -> FabricCapacity | None:
        if self.own is None:
            return None
        slots = self.config.fabric_test_advertise_slots or self.slots  # TEST HOOK: a peer lying about its slots
        return FabricCapacity(resources=self.own, task_slots=min(slots, 1024),
                              tasks_running=min(len(self.running), 1024),
                              interval_ms=max(100, int(self.interval_s * 1000)))

    async def _advertise(self) -> None:
        self.own = await self.loop.run_in_executor(self.admin_pool, self.probe.resources)
        msg = self._capacity_msg()
        self._advertised_to = set(self.alive_members())
        for peer in self._advertised_to:
            self.node.send(peer, msg)
        self.counters["fabric_capacity_sent"] += 1

    def _advertise_to_newcomers(self) -> None:
        """A member that turned alive since the last round hears our capacity now, not an interval later."""
        msg = self._capacity_msg()
        if msg is None:
            return
        alive = set(self.alive_members())
        for peer in alive - self._advertised_to:
            self.node.send(peer, msg)
        self._advertised_to = alive

    def weights(self) -> WeightTable:
        """Committed weights of the current epoch, or equal weights of alive members without consensus."""
        if self.node.consensus is not None:
            return self.node.consensus.core.table
        return WeightTable(0, {p: 1 for p in {self.peer_id, *self.capacity}})

    def _refresh_peers(self, now: float) -> None:
        alive = set(self.alive_members())
        for peer, (_, expires) in list(self.capacity.items()):
            if now >= expires or peer not in alive:
                del self.capacity[peer]
                self._run_actions(self.placement.remove_peer(peer, now))
        for peer in [p for p in self.placement.peers if p != self.peer_id and p not in self.capacity]:
            self._run_actions(self.placement.remove_peer(peer, now))
        self.placement.set_weights(self.weights())
        if self.own is not None:  # our own slots, as they are now
            self.placement.update_peer(self.peer_id, self.own, task_slots=min(self.slots, 1024),
                                       tasks_running=min(len(self.running), 1024))
        for peer, (res, _) in self.capacity.items():
            self.placement.update_peer(peer, res)

    # ------------------------------------------------------------ receiving

    async def on_envelope(self, env: Envelope) -> None:
        msg, sender = env.message, env.sender
        if self._closed:
            return
        try:
            if isinstance(msg, FabricCapacity):
                self.capacity[sender] = (msg.resources, time.monotonic() + 3 * msg.interval_ms / 1000)
                self.placement.update_peer(sender, msg.resources, task_slots=msg.task_slots,
                                           tasks_running=msg.tasks_running)
                self._wake.set()
            elif isinstance(msg, FabricTaskRun):
                self._on_task_run(sender, msg)
            elif isinstance(msg, FabricTaskResult):
                self._on_task_result(sender, msg)
            elif isinstance(msg, FabricTaskCancel):
                run = self.running.get((sender, msg.task_id, msg.attempt))
                if run is not None:
                    run.cancel.set()
            elif isinstance(msg, FabricVoteRequest):
                self._on_vote_request(sender, msg)
            elif isinstance(msg, FabricVote):
                if msg.vote.voter != sender:
                    self._drop("fabric_vote_not_own", sender, "a vote relayed for another peer")
                    return
                self._run_actions(self.placement.on_vote(msg.task_id, msg.vote, time.monotonic()))
            elif isinstance(msg, FabricModuleRequest):
                await self._serve_module(sender, msg)
            elif isinstance(msg, FabricModuleChunk):
                await self._on_chunk(sender, msg)
            elif isinstance(msg, FabricActorMessage):
                self._on_actor_message(sender, msg)
        except RemoteProtocolError as exc:
            self._drop(f"fabric_{exc.reason}", sender, str(exc))
            self.reputation.observe(sender, ObservationKind.INVALID_ENVELOPE, time.monotonic())

    def _drop(self, reason: str, peer: str, detail: str) -> None:
        self.node.drops.record(reason, peer, detail, time.monotonic())

    # ------------------------------------------------------------ executing (replica side)

    def _reply(self, submitter: str, result: FabricTaskResult) -> None:
        if submitter == self.peer_id:
            self._on_task_result(self.peer_id, result)
        else:
            self.node.send(submitter, result)

    def _refuse(self, submitter: str, msg: FabricTaskRun, reason: str, detail: str = "") -> None:
        self.counters[f"fabric_refused_{reason}"] += 1
        self._reply(submitter, FabricTaskResult(task_id=msg.task_id, attempt=msg.attempt, status="refused",
                                                reason=reason, detail=detail[:256]))

    def _on_task_run(self, submitter: str, msg: FabricTaskRun) -> None:
        key = (submitter, msg.task_id, msg.attempt)
        if key in self.running:
            self.counters["fabric_task_run_duplicate"] += 1
            return
        if len(self.running) >= self.slots * (1 + QUEUE_PER_SLOT):
            self._refuse(submitter, msg, "busy", f"{self.slots} task slots busy and "
                                                 f"{self.slots * QUEUE_PER_SLOT} queued")
            return
        held = sum(1 for k in self.running if k[0] == submitter)
        if held >= self.slots * QUEUE_PER_SLOT:  # one submitter leaves a slot's worth to the others
            self._refuse(submitter, msg, "busy", f"this submitter already holds {held} of the "
                                                 f"{self.slots * (1 + QUEUE_PER_SLOT)} places")
            return
        own_gpus = {g.index for g in self.own.gpus} if self.own is not None else set()
        if any(i not in own_gpus or i in self.gpu_leases for i in msg.gpu_indices) \
                or len(set(msg.gpu_indices)) != len(msg.gpu_indices):
            self._refuse(submitter, msg, "gpu_unavailable", f"GPUs {list(msg.gpu_indices)} not free here")
            return
        if self.own is not None and msg.memory_bytes > self.own.max_wasm_memory_bytes:
            self._refuse(submitter, msg, "over_capacity", "memory_bytes above this peer's per-agent cap")
            return
        if msg.wall_time_ms > self.max_task_wall_time_ms:
            self._refuse(submitter, msg, "over_capacity", f"wall_time_ms {msg.wall_time_ms} above this peer's "
                                                          f"fabric_max_task_wall_s ({self.max_task_wall_time_ms} ms)")
            return
        for i in msg.gpu_indices:
            self.gpu_leases[i] = key
        self.running[key] = _Run(submitter, msg, time.monotonic(), epoch=self.weights().epoch)
        self.counters["fabric_tasks_received"] += 1
        # pinned until _finish: the quota keeps it (or the module fetched for it) until the run ends
        if self.modules.pin(msg.module_sha256):
            self._start_run(key)
        elif submitter == self.peer_id:
            self._finish(key, FabricTaskResult(task_id=msg.task_id, attempt=msg.attempt, status="refused",
                                               reason="module_unavailable", detail="not in the local store"))
        elif (msg.module_sha256, submitter) not in self.fetches and \
                sum(1 for _, src in self.fetches if src == submitter) >= MAX_FETCHES_PER_SOURCE:
            self.counters["fabric_fetches_per_source_full"] += 1
            self._finish(key, FabricTaskResult(task_id=msg.task_id, attempt=msg.attempt, status="refused",
                                               reason="busy", detail=f"{MAX_FETCHES_PER_SOURCE} module fetches "
                                                                     f"from this submitter in flight"))
        else:
            self._fetch(msg.module_sha256, submitter, key)

    def _start_run(self, key: tuple[str, str, int]) -> None:
        run = self.running.get(key)
        if run is None:
            return
        if run.cancelled:
            self.counters["fabric_cancelled_before_start"] += 1
            self._finish(key, None)
            return

        def work() -> FabricTaskResult | None:
            if run.cancelled:  # cancelled while it waited for a slot: dropped unrun (PROTOCOL.md 18.2)
                return None
            run.ran = True
            return self._execute(run.msg, run.cancel)

        fut = self.loop.run_in_executor(self.task_pool, work)

        def done(f: asyncio.Future) -> None:
            if f.cancelled():
                result = None
            elif f.exception() is not None:
                log.error("task %s failed internally: %r", key[1], f.exception())
                result = FabricTaskResult(task_id=run.msg.task_id, attempt=run.msg.attempt, status="refused",
                                          reason="internal_error", detail=repr(f.exception())[:256])
            else:
                result = f.result()
                if result is None:  # cancelled: unrun, or stopped while it ran
                    self.counters["fabric_cancelled_running" if run.ran else "fabric_cancelled_before_start"] += 1
            self._finish(key, result)

        fut.add_done_callback(done)

    def _execute(self, msg: FabricTaskRun, cancel: threading.Event | None = None) -> FabricTaskResult | None:
        """Run one attempt (worker thread); None: ``cancel`` was set and stopped the run (nothing is
        answered). Never raises for anything the task or its module does."""
        rt = self.runtime()
        from chimera.fabric.sandbox import DeadlineExceeded, EngineClosed, FabricError, Limits, TaskCancelled

        t0 = time.perf_counter()
        common = dict(task_id=msg.task_id, attempt=msg.attempt)
        try:
            wasm = self.modules.get(msg.module_sha256)
        except (ModuleNotFound, ModuleIntegrityError) as exc:
            return FabricTaskResult(**common, status="refused", reason="module_unavailable", detail=str(exc)[:256])
        try:
            compiled = rt.sandbox.compile(wasm)
            limits = Limits(fuel=msg.fuel, memory_bytes=msg.memory_bytes, wall_time_s=msg.wall_time_ms / 1000,
                            max_input_bytes=MAX_TASK_INPUT_BYTES, max_output_bytes=MAX_TASK_OUTPUT_BYTES)
            res = rt.sandbox.run_task(compiled, msg.input, limits=limits, name=f"task {msg.task_id}",
                                      cancel=cancel)
        except TaskCancelled:  # (its submitter no longer wants it: PROTOCOL.md 18.2)
            return None
        except DeadlineExceeded as exc:  # wall time is not deterministic (and closing ends runs): not a result
            return FabricTaskResult(**common, status="refused", reason=exc.reason, detail=str(exc)[:256],
                                    elapsed_ms=int((time.perf_counter() - t0) * 1000))
        except EngineClosed as exc:  # this node is shutting down: its doing, not the task's
            return FabricTaskResult(**common, status="refused", reason="internal_error", detail=str(exc)[:256])
        except FabricError as exc:  # deterministic failure: a result replicas can agree on
            reason = exc.reason + ("_wrong" if self.config.fabric_test_wrong_results else "")
            return FabricTaskResult(**common, status="error", reason=reason[:64], detail=str(exc)[:256],
                                    digest=error_digest(reason[:64]),
                                    elapsed_ms=int((time.perf_counter() - t0) * 1000))
        stdout = res.stdout
        if self.config.fabric_test_wrong_results:  # TEST HOOK: a replica that lies
            stdout = (b"WRONG " + stdout)[:MAX_TASK_OUTPUT_BYTES]
            self.counters["fabric_test_wrong_results"] += 1
        return FabricTaskResult(**common, status="ok", exit_code=res.exit_code, stdout=stdout,
                                digest=result_digest(res.exit_code, stdout), fuel_consumed=res.fuel_consumed,
                                elapsed_ms=int((time.perf_counter() - t0) * 1000))

    def _finish(self, key: tuple[str, str, int], result: FabricTaskResult | None) -> None:
        run = self.running.pop(key, None)
        if run is not None:
            self.modules.unpin(run.msg.module_sha256)
        for i, holder in list(self.gpu_leases.items()):
            if holder == key:
                del self.gpu_leases[i]
        if run is None or result is None or self._closed:
            return
        if run.cancelled:
            self.counters["fabric_result_after_cancel"] += 1
            return
        if result.digest is not None:
            self.executed.record(run.submitter, result.task_id, result.digest, run.epoch)
        self.counters[f"fabric_tasks_{result.status}"] += 1
        self._reply(run.submitter, result)

    def _on_vote_request(self, submitter: str, msg: FabricVoteRequest) -> list:
        refusal = self.executed.vote_refusal(submitter, msg.task_id, msg.ballot, msg.digest, self.weights().epoch)
        if refusal is not None:
            self._drop("fabric_vote_refused", submitter, f"task {msg.task_id[:64]}: {refusal}")
            return []
        vote = BallotVote.sign(self.node.identity, msg.ballot, msg.digest, self.network_id)
        self.counters["fabric_votes_signed"] += 1
        if submitter == self.peer_id:
            return self.placement.on_vote(msg.task_id, vote, time.monotonic())
        self.node.send(submitter, FabricVote(task_id=msg.task_id, vote=vote))
        return []

    # ------------------------------------------------------------ modules between peers

    def _fetch(self, sha: str, source: str, key: tuple[str, str, int]) -> None:
        fetch = self.fetches.get((sha, source))
        if fetch is None:
            fetch = self.fetches[(sha, source)] = _Fetch(ModuleAssembler(sha, MAX_MODULE_BYTES), source,
                                                         time.monotonic() + FETCH_CHUNK_TIMEOUT_S)
            self.node.send(source, FabricModuleRequest(module_sha256=sha, offset=0,
                                                       max_chunk_bytes=self._chunk_bytes()))
            self.counters["fabric_module_fetches"] += 1
        fetch.waiting.append(key)
        self._wake.set()

    def _chunk_bytes(self) -> int:
        """Chunk size to ask for: 512 KiB, less when our own envelope limit is smaller (edge profile)."""
        return max(MIN_CHUNK_BYTES, min(CHUNK_BYTES, self.config.max_message_bytes - (16 << 10)))

    def _fail_fetch(self, fkey: tuple[str, str], detail: str, *, rejected: bool = False) -> None:
        """End a fetch: its waiting attempts are refused ``module_unavailable``, or with
        ``rejected`` (the bytes are not WebAssembly) answered with the deterministic
        ``error``/``module_rejected`` result every sandbox gives such a module."""
        fetch = self.fetches.pop(fkey, None)
        if fetch is None:
            return
        self.counters["fabric_module_fetch_failed"] += 1
        for key in fetch.waiting:
            run = self.running.get(key)
            if run is None:
                continue
            common = dict(task_id=run.msg.task_id, attempt=run.msg.attempt, detail=detail[:256])
            if rejected:
                reason = "module_rejected" + ("_wrong" if self.config.fabric_test_wrong_results else "")
                result = FabricTaskResult(**common, status="error", reason=reason, digest=error_digest(reason))
            else:
                result = FabricTaskResult(**common, status="refused", reason="module_unavailable")
            self._finish(key, result)

    def _expire_fetches(self, now: float) -> None:
        for fkey, fetch in list(self.fetches.items()):
            if now >= fetch.deadline:
                self._fail_fetch(fkey, f"no chunk from {fetch.source[:10]} within {FETCH_CHUNK_TIMEOUT_S} s")

    def _module_request_allowed(self, peer: str) -> bool:
        now = time.monotonic()
        buckets = self._module_request_buckets
        bucket = buckets.get(peer)
        if bucket is None:
            bucket = buckets[peer] = TokenBucket(self.config.fabric_module_requests_per_s,
                                                 self.config.fabric_module_request_burst, now)
            while len(buckets) > 1024:
                buckets.popitem(last=False)
        buckets.move_to_end(peer)
        return bucket.take(now)

    async def _serve_module(self, peer: str, msg: FabricModuleRequest) -> None:
        """One chunk of a stored module. Each stored file is hashed once (ModuleStore.read_chunk),
        not on every request; reads of large or unverified chunks run off the event loop; each
        peer gets at most ``fabric_module_requests_per_s`` requests a second after a burst of
        ``fabric_module_request_burst`` (more: dropped, counted)."""
        sha = msg.module_sha256
        if not self._module_request_allowed(peer):
            self._drop("fabric_module_request_rate", peer, f"over {self.config.fabric_module_requests_per_s:g} module requests/s")
            return
        n = min(msg.max_chunk_bytes, CHUNK_BYTES)
        try:
            if n <= INLINE_CHUNK_BYTES and self.modules.is_verified(sha):
                data, total = self.modules.read_chunk(sha, msg.offset, n)
            else:
                data, total = await self.loop.run_in_executor(self.admin_pool, self.modules.read_chunk, sha,
                                                              msg.offset, n)
        except (ModuleNotFound, ModuleIntegrityError):
            self.node.send(peer, FabricModuleChunk(module_sha256=sha, offset=0, total_bytes=0, error="not_found"))
            return
        except BadOffset as exc:  # offset beyond the end
            self.node.send(peer, FabricModuleChunk(module_sha256=sha, offset=0,
                                                   total_bytes=min(exc.size, MAX_MODULE_BYTES), error="bad_offset"))
            return
        if self.config.fabric_test_tamper_chunks and data:  # TEST HOOK: a peer serving bad bytes (the
            data = data[:-1] + bytes([data[-1] ^ 0xFF])   # last byte: the module header stays intact)
        self.node.send(peer, FabricModuleChunk(module_sha256=sha, offset=msg.offset, total_bytes=total, data=data))
        self.counters["fabric_module_chunks_served"] += 1

    def _deployed_modules(self) -> set[str]:
        """Every module named by the deployment history of an agent that is not removed (any
        version: rollbacks need them). Read from SQLite directly (the module store's quota
        asks, on the admin pool thread)."""
        path = self.root / "agents.sqlite3"
        if not path.exists():
            return set()
        db = sqlite3.connect(path)
        try:
            rows = db.execute("SELECT name, action, module_sha256 FROM agent_deployments ORDER BY seq").fetchall()
        except sqlite3.Error:
            return set(self.modules.list())  # cannot tell: evict nothing
        finally:
            db.close()
        last = {name: action for name, action, _ in rows}
        return {sha for name, _, sha in rows if last.get(name) != "remove"}

    async def _on_chunk(self, peer: str, msg: FabricModuleChunk) -> None:
        fkey = (msg.module_sha256, peer)
        fetch = self.fetches.get(fkey)
        if fetch is None:
            self._drop("fabric_unexpected_chunk", peer, f"module {msg.module_sha256[:12]} was not requested")
            return
        if msg.error:  # an honest "cannot serve": no fault of the peer's
            self._fail_fetch(fkey, f"{peer[:10]} cannot serve it: {msg.error}")
            return
        try:
            wasm = fetch.assembler.add(msg)
        except NotWebAssembly as exc:  # the submitter's own module: its tasks fail, deterministically
            self.counters["fabric_module_not_wasm"] += 1
            self._fail_fetch(fkey, str(exc), rejected=True)
            return
        except (ModuleIntegrityError, ModuleTooLarge, MalformedError) as exc:
            self._fail_fetch(fkey, f"{exc.reason}: {exc}")
            raise
        if wasm is None:
            fetch.deadline = time.monotonic() + FETCH_CHUNK_TIMEOUT_S
            self.node.send(peer, FabricModuleRequest(module_sha256=msg.module_sha256,
                                                     offset=fetch.assembler.next_offset,
                                                     max_chunk_bytes=self._chunk_bytes()))
            return
        fetch.deadline = math.inf  # stored now: the chunk timeout no longer applies
        try:
            # (admin pool thread: stores it and applies the quota; pinned and deployed modules are kept)
            await self.loop.run_in_executor(self.admin_pool, self.modules.accept_fetched, msg.module_sha256, wasm)
        except Exception as exc:  # noqa: BLE001 - a disk failure: refuse its attempts, keep serving
            log.error("could not store fetched module %s: %r", msg.module_sha256[:12], exc)
            if self.fetches.get(fkey) is fetch:
                self._fail_fetch(fkey, f"could not store it: {exc}")
            return
        # (the store's own count: two fetches stored at once each saw the other's evictions)
        self.counters["fabric_fetched_modules_evicted"] = self.modules.evicted
        if self.fetches.get(fkey) is not fetch:  # ended while it was stored (closing): its attempts are answered
            return
        del self.fetches[fkey]
        self.counters["fabric_modules_fetched"] += 1
        log.info("fetched module %s (%d bytes) from %s; SHA-256 verified", msg.module_sha256[:12], len(wasm),
                 peer[:10])
        for key in fetch.waiting:
            self._start_run(key)

    # ------------------------------------------------------------ submitting (placement side)

    def cancel(self, task_id: str) -> None:
        """End the running task ``task_id`` (submitted here) ``failed`` with reason ``cancelled``:
        every attempt in flight is told to stop (``fabric_task_cancel``: a replica drops a queued
        one and stops a run in progress), its leases and module pin are released, its record
        and ``task_completed`` event written as for any end. A task waiting to be resumed after a
        restart is not placed again (its earlier attempts are told to stop too).

        Raises:
            KeyError: no task ``task_id`` was submitted here (or it is no longer kept).
            ValueError: the task already ended (the message names its state).
        """
        rec = self.tasks.get(task_id)
        if rec is None:
            raise KeyError(task_id)
        if rec.state != "running":
            raise ValueError(f"task {task_id} already ended: {rec.state}")
        if self._resuming.pop(task_id, None) is not None:  # not placed again yet
            self._cancel_earlier_attempts(rec, rec.resumes[-1]["first_attempt"])
            self._end_unresumed(rec, "cancelled by the submitter before it was placed again after the restart",
                                reason="cancelled")
        else:
            self._run_actions(self.placement.cancel(task_id, time.monotonic()))
        if rec.state == "running":  # (the core no longer had it: end it here all the same)
            self._run_actions([TaskFailed(task_id, "cancelled", "cancelled by the submitter")])
        self.counters["fabric_tasks_cancelled"] += 1
        self._wake.set()

    def submit(self, module_sha256: str, stdin: bytes, req: TaskRequirements) -> str:
        """Place a task; returns its id. Raises LocalProtocolError for a bad request."""
        check_hash_name(module_sha256)
        if len(stdin) > MAX_TASK_INPUT_BYTES:
            raise LocalProtocolError(f"task input is {len(stdin)} bytes; the limit is {MAX_TASK_INPUT_BYTES}")
        # pinned until the task ends (_release): its attempts, here and at the replicas that
        # fetch it from this node, need it even if this node once fetched it itself
        if not self.modules.pin(module_sha256):
            self.modules.unpin(module_sha256)
            raise LocalProtocolError(f"module {module_sha256[:12]} is not in this node's store")
        self._task_seq += 1
        task_id = f"t{self._task_seq}-{os.urandom(4).hex()}"
        rec = _Submitted(task_id, module_sha256, stdin, req, _wall_ms(), time.monotonic(), seq=self._task_seq)
        self.tasks[task_id] = rec
        excess = len(self.tasks) - MAX_TASKS_KEPT
        if excess > 0:  # the oldest finished ones go; running ones stay (a task always ends: timeouts)
            for old_id in [t for t, r in self.tasks.items() if r.state != "running"][:excess]:
                del self.tasks[old_id]
        now = time.monotonic()
        try:
            self._refresh_peers(now)
            actions = self.placement.submit(task_id, req, now)
        except BaseException:
            del self.tasks[task_id]
            self._release(rec)
            raise
        try:
            self._run_actions(actions)
        finally:  # the submission's record, with its first dispatches (one that ended at once: written)
            if rec.saved is None:
                self._save_record(rec)
        self._wake.set()
        return task_id

    def _on_task_result(self, sender: str, msg: FabricTaskResult) -> None:
        rec = self.tasks.get(msg.task_id)
        task = self.placement.tasks.get(msg.task_id)
        att = task.attempts.get(msg.attempt) if task is not None else None
        if rec is None or att is None or att.peer_id != sender:
            self.counters["fabric_result_ignored"] += 1
            return
        now = time.monotonic()
        row = {"peer_id": sender, "attempt": msg.attempt, "status": msg.status,
               "exit_code": msg.exit_code if msg.status == "ok" else None,
               "reason": msg.reason, "detail": msg.detail, "stdout_bytes": len(msg.stdout),
               "digest": msg.digest.hex() if msg.digest else None, "elapsed_ms": msg.elapsed_ms,
               "fuel_consumed": msg.fuel_consumed}
        if msg.status == "refused":
            rec.results[sender] = row
            self._run_actions(self.placement.on_failure(msg.task_id, msg.attempt, sender, msg.reason, now))
            return
        expected = result_digest(msg.exit_code, msg.stdout) if msg.status == "ok" else error_digest(msg.reason)
        if msg.digest != expected:
            self._drop("fabric_bad_result_digest", sender, f"task {msg.task_id}: digest does not match the result")
            row.update(status="refused", reason="inconsistent_digest")
            rec.results[sender] = row
            self._run_actions(self.placement.on_failure(msg.task_id, msg.attempt, sender, "inconsistent_digest",
                                                        now))
            return
        row["_stdout"] = msg.stdout
        rec.results[sender] = row
        self._run_actions(self.placement.on_result(msg.task_id, msg.attempt, sender, msg.digest, now))

    def _run_actions(self, actions: list) -> None:
        queue = deque(actions)
        while queue:
            action = queue.popleft()
            try:
                queue.extend(self._run_action(action))
            except LocalProtocolError as exc:
                self.counters["fabric_action_errors"] += 1
                log.error("fabric action %s failed: %s", type(action).__name__, exc)

    def _run_action(self, a: object) -> list:
        now = time.monotonic()
        rec = self.tasks.get(getattr(a, "task_id", ""))
        if isinstance(a, Dispatch):
            if rec is None:
                return []
            req = rec.req
            msg = FabricTaskRun(task_id=a.task_id, attempt=a.attempt, module_sha256=rec.module_sha256,
                                input=rec.input, fuel=req.fuel, memory_bytes=req.memory_bytes,
                                wall_time_ms=wire_wall_time_ms(req.wall_time_s), gpu_indices=a.gpu_indices)
            rec.dispatches.append({"attempt": a.attempt, "peer_id": a.peer_id, "gpus": list(a.gpu_indices),
                                   "at_ms": _wall_ms()})
            self._placement_changed(rec)  # (written with the submission when dispatched by it)
            self.node.emit_event("task_dispatched", self.peer_id, task_id=a.task_id, to=a.peer_id,
                                 attempt=a.attempt, gpus=list(a.gpu_indices))
            if a.peer_id == self.peer_id:
                self.loop.call_soon(self._on_task_run, self.peer_id, msg)
            elif not self.node.send(a.peer_id, msg):
                self.capacity.pop(a.peer_id, None)
                return self.placement.remove_peer(a.peer_id, now)
            return []
        if isinstance(a, Cancel):
            if a.peer_id == self.peer_id:
                run = self.running.get((self.peer_id, a.task_id, a.attempt))
                if run is not None:
                    run.cancel.set()
            else:
                self.node.send(a.peer_id, FabricTaskCancel(task_id=a.task_id, attempt=a.attempt,
                                                           reason=a.reason[:64]))
            return []
        if isinstance(a, RequestVote):
            msg = FabricVoteRequest(task_id=a.task_id, ballot=a.ballot, digest=a.digest)
            if a.peer_id == self.peer_id:
                return self._on_vote_request(self.peer_id, msg)
            self.node.send(a.peer_id, msg)
            return []
        if isinstance(a, Observe):
            self.reputation.observe(a.peer_id, a.kind, now)
            doc = {"peer_id": a.peer_id, "kind": a.kind.value, "task_id": a.task_id, "reason": a.reason,
                   "at_ms": _wall_ms()}
            self.observations.append(doc)
            if rec is not None:
                rec.observations.append(doc)
            self.counters[f"fabric_observed_{a.kind.value}"] += 1
            return []
        if isinstance(a, TaskAccepted):
            if rec is None:
                return []
            try:  # the certificate must stand on its own before anyone is told
                verify_task_certificate(a.certificate, a.table, self.network_id, a.task_id, submitter=self.peer_id)
            except CertificateError as exc:
                log.error("task %s: certificate does not verify: %s", a.task_id, exc)
                rec.state, rec.failure = "failed", ("bad_certificate", str(exc))
            else:
                rec.state, rec.accepted = "accepted", a
                row = next((r for p, r in rec.results.items()
                            if p in a.agreeing and r.get("digest") == a.digest.hex()), None)
                if row is None:  # cannot happen: every agreeing replica's result is recorded
                    log.error("task %s: no recorded result has the accepted digest", a.task_id)
                    rec.state, rec.failure = "failed", ("internal_error", "the accepted result was not recorded")
                elif row["status"] == "error":
                    # the replicas agree that the task failed (out of fuel, module rejected...): an
                    # outcome with a certificate, but not a success
                    rec.state, rec.outcome = "failed", "error"
                    rec.failure = (row["reason"], row["detail"])
                else:
                    rec.outcome = "ok"
                    rec.stdout, rec.exit_code = row.get("_stdout", b""), row["exit_code"]
            rec.finished_ms, rec.latency_s = _wall_ms(), time.monotonic() - rec.submitted_mono
            self._count_outcome(rec)
            self._release(rec)
            self._save_record(rec)
            extra = {"reason": rec.failure[0]} if rec.failure is not None else {}
            self.node.emit_event("task_completed", self.peer_id,
                                 **({"priority": "warning"} if rec.state == "failed" else {}),
                                 task_id=a.task_id, state=rec.state, digest=a.digest.hex()[:16],
                                 agreeing=len(a.agreeing), disagreeing=len(a.disagreeing), **extra)
            rec.done.set()
            return []
        if isinstance(a, BreakerOpened):
            self.counters["fabric_breaker_opened"] += 1
            self.node.emit_event("task_breaker_opened", a.peer_id, priority="warning",
                                 open_for_s=round(a.open_for_s, 3), failures=a.failures)
            return []
        if isinstance(a, TaskFailed):
            if rec is None:
                return []
            rec.state, rec.failure, rec.finished_ms = "failed", (a.reason, a.detail), _wall_ms()
            rec.latency_s = time.monotonic() - rec.submitted_mono
            self._count_outcome(rec)
            self._release(rec)
            self._save_record(rec)
            self.node.emit_event("task_completed", self.peer_id, priority="warning", task_id=a.task_id,
                                 state="failed", reason=a.reason)
            rec.done.set()
            return []
        return []

    def _count_outcome(self, rec: _Submitted) -> None:
        """Metrics of a finished task: latency histogram and outcome per module (labels bounded)."""
        self.task_latency.observe(rec.latency_s or 0.0)
        module = rec.module_sha256[:12]
        if not any(key[0] == module for key in self.task_outcomes) and \
                len({key[0] for key in self.task_outcomes}) >= 64:
            module = "other"
        key = (module, "accepted" if rec.state == "accepted" else "failed")
        self.task_outcomes[key] = self.task_outcomes.get(key, 0) + 1

    def _release(self, rec: _Submitted) -> None:
        """A finished task keeps only what its view shows: drop the input and the replicas' stdout,
        unpin its module (once)."""
        if rec.module_pinned:
            rec.module_pinned = False
            self.modules.unpin(rec.module_sha256)
        rec.input_bytes, rec.input = len(rec.input), b""
        for row in rec.results.values():
            row.pop("_stdout", None)

    # ------------------------------------------------------------ actor agents

    def _remote_send(self, peer_id: str, name: str, sender: str, payload: bytes) -> bool:
        """AgentHost callback (agent worker threads): an agent's message to another peer."""
        if peer_id not in self.node.routes or self._closed:
            return False
        try:
            msg = FabricActorMessage(to_name=name, from_address=sender, payload=payload)
            encode_fields(msg)  # bounds checked here, in the agent's thread
        except LocalProtocolError:
            return False
        try:
            self.loop.call_soon_threadsafe(self.node.send, peer_id, msg)
        except RuntimeError:  # the loop is closed: the node is stopping
            return False
        self.counters["fabric_actor_messages_sent"] += 1
        return True

    def _on_actor_message(self, sender: str, msg: FabricActorMessage) -> None:
        peer, sep, _ = msg.from_address.rpartition("/")
        if not sep or peer != sender:
            self._drop("fabric_bad_actor_sender", sender, "from_address is not the sender's")
            return
        rt = self._runtime
        if rt is not None and rt.host.is_sink(msg.to_name):  # sinks ("admin") answer local callers only
            self._drop("fabric_actor_to_sink", sender, f"{msg.to_name[:64]!r} is a local sink")
            return
        if rt is None or not rt.host.deliver(msg.to_name, msg.from_address, msg.payload):
            self._drop("fabric_actor_undeliverable", sender, f"no agent {msg.to_name[:64]!r} took it")
            return
        self.counters["fabric_actor_messages_received"] += 1

    def _admin_sink(self, sender: str, payload: bytes) -> None:
        self._replies.append((time.monotonic(), sender, payload))

    def _on_deployment_event(self, event) -> None:
        if event.action in ("upgrade", "rollback", "auto_rollback"):
            fields = dict(agent=event.name, version=event.version, action=event.action,
                          module=event.module_sha256[:12], reason=event.reason)
            try:
                self.loop.call_soon_threadsafe(
                    lambda: self.node.emit_event("agent_swapped", self.peer_id,
                                                 priority="warning" if event.action == "auto_rollback" else "info",
                                                 **fields))
            except RuntimeError:
                pass

    # ------------------------------------------------------------ views

    def task_view(self, rec: _Submitted, *, brief: bool = False) -> dict:
        """A task as the admin API shows it; ``brief`` leaves out stdout and the encoded certificate
        (listings stay far below the admin response limit)."""
        doc: dict = {
            "task_id": rec.task_id, "state": rec.state, "module_sha256": rec.module_sha256,
            "input_bytes": len(rec.input) if rec.input_bytes is None else rec.input_bytes, "submitted_ms": rec.submitted_ms, "finished_ms": rec.finished_ms,
            "latency_s": rec.latency_s,
            "requirements": {"fuel": rec.req.fuel, "memory_bytes": rec.req.memory_bytes,
                             "wall_time_s": rec.req.wall_time_s, "gpus": rec.req.gpus,
                             "replicas": rec.req.replicas, "rule": rec.req.rule},
            "placement": rec.dispatches,
            "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rec.results.values()],
            "observations": rec.observations,
            "resumed": rec.resumes,
        }
        if rec.failure is not None:
            # agreed: the replicas voted for this failure (the certificate below proves it)
            doc["failure"] = {"reason": rec.failure[0], "detail": rec.failure[1],
                              "agreed": rec.outcome == "error"}
        a = rec.accepted
        if a is not None and rec.outcome is not None:
            cert = a.certificate
            doc["result"] = {"status": rec.outcome, "digest": a.digest.hex(), "exit_code": rec.exit_code,
                             "stdout": rec.stdout.decode("utf-8", errors="replace"),
                             "stdout_b64": base64.b64encode(rec.stdout).decode()}
            if rec.outcome == "error":
                doc["result"].update(reason=rec.failure[0], detail=rec.failure[1])
            doc["certificate"] = {
                "ballot_id": cert.ballot.ballot_id.hex(), "purpose": cert.ballot.purpose,
                "rule": cert.ballot.rule, "threshold": str(cert.ballot.threshold), "epoch": cert.ballot.epoch,
                "voters": cert.voters(), "agreeing": list(a.agreeing), "disagreeing": list(a.disagreeing),
                "replica_table": {"epoch": a.table.epoch, "weights": dict(a.table.weights)},
                "network_id": self.network_id.hex(),
                "encoded_hex": msgpack.packb(encode_fields(cert), use_bin_type=True).hex(),
                "verified": True,
            }
            if brief:
                doc["result"] = {k: v for k, v in doc["result"].items() if not k.startswith("stdout")}
                doc["certificate"].pop("encoded_hex")
        return doc

    def metric_families(self) -> list:
        """Prometheus gauges of this peer's advertised capacity and fabric state (called on the
        exporter's thread; reads only immutable snapshots)."""
        from prometheus_client.core import GaugeMetricFamily

        own, running, peers = self.own, len(self.running), len(self.capacity)
        out = [GaugeMetricFamily("chimera_fabric_task_slots", "Tasks this peer runs at once", value=self.slots),
               GaugeMetricFamily("chimera_fabric_tasks_running", "Attempts held (running or queued)", value=running),
               GaugeMetricFamily("chimera_fabric_peers_with_capacity", "Peers with a fresh capacity advertisement",
                                 value=peers)]
        if own is None:
            return out
        for name, help_, value in (
                ("cpu_count", "Logical CPUs advertised", own.cpu_count),
                ("load_1m", "1-minute load average advertised", own.load_1m),
                ("memory_total_bytes", "RAM advertised", own.memory_total_bytes),
                ("memory_available_bytes", "Available RAM advertised", own.memory_available_bytes),
                ("disk_free_bytes", "Free disk of the data directory", own.disk_free_bytes),
                ("gpus", "GPUs advertised (NVML)", own.gpu_count)):
            out.append(GaugeMetricFamily(f"chimera_fabric_{name}", help_, value=value))
        used = GaugeMetricFamily("chimera_fabric_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("chimera_fabric_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        util = GaugeMetricFamily("chimera_fabric_gpu_utilization_percent", "GPU busy percent", labels=["gpu"])
        for g in own.gpus:
            used.add_metric([str(g.index)], g.memory_used_bytes)
            total.add_metric([str(g.index)], g.memory_total_bytes)
            util.add_metric([str(g.index)], g.utilization_percent)
        return out + [used, total, util]

    def status(self) -> dict:
        """The fabric's state for ``tasks_status``; ``slots_distrusted``: peers that refused room
        they advertised (PROTOCOL.md §18.4 step 2), with the slots they advertised and the ones
        placement trusts them with now; ``slots_unhonoured``: such refusals and timeouts counted."""
        now = time.monotonic()
        distrusted = {}
        for peer in sorted(self.placement.slot_trust):
            trusted, advertised = self.placement.trusted_slots(peer, now), self.placement.slots.get(peer)
            if trusted is not None and advertised is not None and trusted < advertised.task_slots:
                distrusted[peer] = {"advertised": advertised.task_slots, "trusted": trusted}
        return {"task_slots": self.slots, "tasks_running": len(self.running),
                "gpu_leases": {str(i): list(k[1:]) for i, k in self.gpu_leases.items()},
                "peers_with_capacity": sorted(self.capacity), "runtime_loaded": self._runtime is not None,
                "own": None if self.own is None else self.own.describe(),
                "slots_unhonoured": self.placement.counters.get("slots_unhonoured", 0),
                "slots_distrusted": distrusted, "tasks_resuming": len(self._resuming)}


# ------------------------------------------------------------------ wiring


def start_fabric(node) -> FabricService:
    """Create the service, spawn the ``fabric`` actor and its timer (in ``node._tasks``)."""
    service = FabricService(node)
    node.fabric = service
    node.supervisor.spawn(FabricActor(service))
    node._tasks.append(asyncio.get_running_loop().create_task(service.run(), name="fabric-timer"))
    return service


class _BadArgument(ValueError):
    """An admin argument failed its check in an admin pool thread: a usage error (code 2)."""


def _checked(check, *a):
    """``check(*a)``, its ValueError (a bad name, version...) turned into :class:`_BadArgument`."""
    try:
        return check(*a)
    except ValueError as exc:
        raise _BadArgument(str(exc)) from None


def _plain(exc: BaseException) -> str:
    """The message of an exception; for a KeyError its argument, not its repr."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


_FRACTION_TEXT = re.compile(r"\d{1,9}(/\d{1,9}|\.\d{1,9})?|\.\d{1,9}")


def _threshold_arg(args: dict, rule: str = "majority") -> Fraction | None:
    """``threshold``: a fraction as text (``"2/3"``, ``"0.75"``) or a number that agreement rule
    ``rule`` allows (:func:`~chimera.fabric.placement.check_threshold`: exactly 1 for
    ``unanimous``, in [1/2, 1) for the others); None when absent. Anything else is a usage error.

    Text is matched before :class:`~fractions.Fraction` sees it: ``Fraction("1e999999999")``
    would compute a billion-digit integer on the event loop.
    """
    value = args.get("threshold")
    if value is None:
        return None
    if type(value) is int or (type(value) is float and math.isfinite(value)):
        threshold = Fraction(str(value))
    elif type(value) is str and _FRACTION_TEXT.fullmatch(value.strip()):
        try:
            threshold = Fraction(value.strip())
        except ZeroDivisionError:
            threshold = Fraction(0)
    else:
        raise admin_api.AdminError(f"threshold must be a fraction like 2/3 or 0.75, not {str(value)[:40]!r}",
                                   admin_api.EXIT_USAGE)
    try:
        check_threshold(rule, threshold)
    except LocalProtocolError as exc:
        raise admin_api.AdminError(str(exc), admin_api.EXIT_USAGE) from None
    return threshold


def admin_handlers(node) -> dict:
    """Admin API commands of the fabric (operator: agents_deploy/upgrade/rollback/remove/call,
    tasks_submit; read-only: agents_list, tasks_status, modules_list)."""

    def service() -> FabricService:
        svc = getattr(node, "fabric", None)
        if svc is None:
            raise admin_api.AdminError("the execution fabric is off on this node (fabric = false)")
        return svc

    async def in_thread(svc: FabricService, fn, *a):
        """Run ``fn`` on the admin pool; its errors become one-line AdminErrors: a bad argument
        (:class:`_BadArgument`) is a usage error (code 2), the rest are failures at the node (code 1)."""
        try:
            return await svc.loop.run_in_executor(svc.admin_pool, fn, *a)
        except _BadArgument as exc:
            raise admin_api.AdminError(str(exc), admin_api.EXIT_USAGE) from None
        except KeyError as exc:  # ModuleNotFound too; str() of a KeyError is the repr of its message
            raise admin_api.AdminError(_plain(exc)) from None
        except Exception as exc:
            reason = getattr(exc, "reason", None)
            if isinstance(reason, str):  # FabricError family (module rejected, trap...)
                raise admin_api.AdminError(f"{reason}: {exc}") from None
            if isinstance(exc, ValueError):  # a state conflict: deployed already, no previous version...
                raise admin_api.AdminError(str(exc)) from None
            raise

    def deploy_ref(ref: str, what: str) -> tuple[str, str]:
        """``name@version`` checked (admin pool thread: chimera.fabric.deploy imports wasmtime)."""
        from chimera.fabric.deploy import parse_ref

        name, version = _checked(parse_ref, ref)
        if version is None:
            raise _BadArgument(f"{what} needs name@version, not {ref[:80]!r}")
        return name, version

    def agent_name(name: str) -> str:
        from chimera.fabric.host import check_agent_name

        return _checked(check_agent_name, name)

    def module_of(svc: FabricService, args: dict) -> bytes | str:
        wasm = admin_api.bytes_arg(args, "module", None, MAX_MODULE_BYTES, text=True)
        if wasm is not None:
            return wasm
        sha = admin_api.str_arg(args, "sha256", None, max_len=64)
        if sha is None:
            raise admin_api.AdminError("give the module bytes (module) or a stored module's sha256",
                                       admin_api.EXIT_USAGE)
        try:
            check_hash_name(sha)
        except ValueError as exc:
            raise admin_api.AdminError(f"sha256: {exc}", admin_api.EXIT_USAGE) from None
        if not svc.modules.has(sha):
            raise admin_api.AdminError(f"module {sha[:12]} is not in this node's store")
        return sha

    def event_doc(event) -> dict:
        return {"name": event.name, "version": event.version, "action": event.action, "kind": event.kind,
                "module_sha256": event.module_sha256, "at_ms": event.at_ms, "reason": event.reason}

    async def agents_deploy(args: dict) -> dict:
        svc = service()
        ref = admin_api.str_arg(args, "ref", max_len=256)
        kind = admin_api.str_arg(args, "kind", "task", choices=("task", "actor"))
        module = module_of(svc, args)

        def deploy():
            deploy_ref(ref, "deploy")
            return svc.runtime().deploy.deploy(ref, module, kind=kind)

        return event_doc(await in_thread(svc, deploy))

    async def agents_upgrade(args: dict) -> dict:
        svc = service()
        ref = admin_api.str_arg(args, "ref", max_len=256)
        module = module_of(svc, args)

        def upgrade():
            deploy_ref(ref, "upgrade")
            return svc.runtime().deploy.upgrade(ref, module)

        return event_doc(await in_thread(svc, upgrade))

    async def agents_rollback(args: dict) -> dict:
        svc = service()
        name = admin_api.str_arg(args, "name", max_len=256)
        return event_doc(await in_thread(
            svc, lambda: svc.runtime().deploy.rollback(agent_name(name), reason="by hand")))

    async def agents_remove(args: dict) -> dict:
        svc = service()
        name = admin_api.str_arg(args, "name", max_len=256)
        return event_doc(await in_thread(svc, lambda: svc.runtime().deploy.remove(agent_name(name))))

    async def agents_call(args: dict) -> dict:
        svc = service()
        name = admin_api.str_arg(args, "name", max_len=256)
        payload = admin_api.bytes_arg(args, "input", b"", LOCAL_CALL_INPUT_BYTES, text=True)
        wait_s = admin_api.float_arg(args, "reply_wait_s", 1.0, 0.0, 60.0)
        await in_thread(svc, agent_name, name)
        rt = await in_thread(svc, svc.runtime)
        deployed = await in_thread(svc, rt.deploy.get, name)
        if deployed.kind == "task":
            res = await in_thread(svc, rt.deploy.run_task, name, payload)
            return {"name": name, "version": deployed.version, "kind": "task", "exit_code": res.exit_code,
                    "stdout": res.stdout.decode("utf-8", errors="replace"),
                    "stderr": res.stderr.decode("utf-8", errors="replace"), "fuel_consumed": res.fuel_consumed,
                    "digest": res.digest().hex()}
        if len(payload) > MAX_ACTOR_PAYLOAD_BYTES:
            raise admin_api.AdminError(f"an actor message is at most {MAX_ACTOR_PAYLOAD_BYTES} bytes")
        since = time.monotonic()
        agent_addr = rt.host.address(name)
        outcome = await in_thread(svc, lambda: rt.host.call(name, payload, sender=rt.host.address("admin")))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not any(t >= since and s == agent_addr for t, s, _ in svc._replies):
            await asyncio.sleep(0.01)
        replies = [p.decode("utf-8", errors="replace") for t, s, p in svc._replies if t >= since and s == agent_addr]
        return {"name": name, "version": outcome.version, "kind": "actor", "ok": outcome.ok,
                "outcome": outcome.reason, "replies": replies}

    async def agents_list(args: dict) -> dict:
        svc = service()
        rt = svc._runtime
        if rt is None:
            if not (svc.root / "agents.sqlite3").exists():
                return {"agents": [], "runtime_loaded": False}
            rt = await in_thread(svc, svc.runtime)
        current = rt.deploy.current()
        running = {a.name: a for a in rt.host.agents()}
        rows = []
        for name, d in sorted(current.items()):
            state, failure = rt.deploy.state(name)
            row = {"name": name, "version": d.version, "kind": d.kind, "module_sha256": d.module_sha256,
                   "previous": d.previous[0] if d.previous else None, "state": state, "failure": failure or None}
            info = running.get(name)
            if info is not None:
                row.update(queued=info.queued, handled=info.handled, errors=info.errors, crashes=info.crashes,
                           memory_bytes=info.memory_bytes, logs=rt.host.logs(name)[-20:])
            rate, samples = rt.deploy.error_rate(name, d.version)
            row.update(error_rate=rate, samples=samples)
            rows.append(row)
        history = [event_doc(e) for e in rt.deploy.history()[-50:]]
        return {"agents": rows, "history": history, "runtime_loaded": True}

    async def record_written(rec: _Submitted) -> None:
        """Wait (``RECORD_WAIT_S`` at most) for the latest write of ``rec``'s record; one that
        times out or is refused was counted and logged by _save_record (the task goes on in
        memory either way)."""
        if rec.saved is not None:
            try:
                await asyncio.wait_for(asyncio.shield(rec.saved), RECORD_WAIT_S)
            except Exception:  # noqa: BLE001 - see the docstring
                pass

    async def tasks_submit(args: dict) -> dict:
        svc = service()
        # every argument is checked before the module is stored or anything is submitted
        stdin = admin_api.bytes_arg(args, "input", b"", MAX_TASK_INPUT_BYTES, text=True)
        rule = admin_api.str_arg(args, "rule", "majority", choices=tuple(RULES))
        threshold = _threshold_arg(args, rule)
        wait = admin_api.bool_arg(args, "wait", False)
        wait_s = admin_api.float_arg(args, "wait_s", 120.0, 0.1, 3600.0)
        req_args = dict(
            fuel=admin_api.int_arg(args, "fuel", DEFAULT_FUEL, 1, 2**62),
            memory_bytes=admin_api.int_arg(args, "memory_bytes", DEFAULT_TASK_MEMORY_BYTES, 65536, 1 << 32),
            wall_time_s=admin_api.float_arg(args, "timeout_s", DEFAULT_WALL_TIME_S, 0.001, 86_400.0),
            gpus=admin_api.int_arg(args, "gpus", 0, 0, 64),
            gpu_memory_bytes=admin_api.int_arg(args, "gpu_memory_bytes", 0, 0, 2**62),
            replicas=admin_api.int_arg(args, "replicas", 1, 1, 64), rule=rule, threshold=threshold)
        try:
            req = TaskRequirements(**req_args)
        except LocalProtocolError as exc:
            raise admin_api.AdminError(str(exc), admin_api.EXIT_USAGE) from None
        module = module_of(svc, args)
        sha = module if isinstance(module, str) else await in_thread(svc, svc.modules.put, module)
        try:
            task_id = svc.submit(sha, stdin, req)
        except (LocalProtocolError, ValueError, ZeroDivisionError) as exc:
            raise admin_api.AdminError(str(exc)) from None
        rec = svc.tasks[task_id]
        await record_written(rec)  # the submission's record is durable before its id is answered
        if wait:
            try:
                await asyncio.wait_for(rec.done.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        return svc.task_view(rec)

    async def tasks_cancel(args: dict) -> dict:
        """end a running task submitted here (failed: cancelled); its replicas stop their runs"""
        svc = service()
        task_id = admin_api.str_arg(args, "task_id", None, max_len=128)
        if task_id is None:
            raise admin_api.AdminError("tasks_cancel needs task_id", admin_api.EXIT_USAGE)
        try:
            svc.cancel(task_id)
        except KeyError:
            raise admin_api.AdminError(f"no task {task_id[:64]!r} was submitted here") from None
        except ValueError as exc:
            raise admin_api.AdminError(str(exc)) from None
        rec = svc.tasks[task_id]
        await record_written(rec)  # its end is durable before it is answered
        return svc.task_view(rec)

    async def tasks_status(args: dict) -> Any:
        svc = service()
        task_id = admin_api.str_arg(args, "task_id", None, max_len=128)
        wait_s = admin_api.float_arg(args, "wait_s", 0.0, 0.0, 3600.0)  # wait for a running task's end
        if task_id is not None:
            rec = svc.tasks.get(task_id)
            if rec is None:
                raise admin_api.AdminError(f"no task {str(task_id)[:64]!r} was submitted here")
            # an observer's command: its waits must not fill the admin API's places (the remote
            # server serves 16 requests at once); beyond MAX_STATUS_WAITERS it answers at once
            if wait_s > 0 and not rec.done.is_set() and svc.status_waiters < MAX_STATUS_WAITERS:
                svc.status_waiters += 1
                try:
                    await asyncio.wait_for(rec.done.wait(), wait_s)
                except asyncio.TimeoutError:
                    pass  # still running: its view says so
                finally:
                    svc.status_waiters -= 1
            return svc.task_view(rec)
        limit = admin_api.int_arg(args, "limit", 50, 1, MAX_TASKS_KEPT)  # the latest tasks and observations
        return {"fabric": svc.status(), "observations": list(svc.observations)[-limit:],
                "tasks": [svc.task_view(r, brief=True) for r in list(svc.tasks.values())[-limit:]]}

    async def modules_list(args: dict) -> dict:
        svc = service()
        rows = []
        for sha in svc.modules.list():
            try:
                size = svc.modules.size(sha)
            except (OSError, KeyError):
                continue
            rows.append({"sha256": sha, "size_bytes": size, "fetched": svc.modules.is_fetched(sha)})
        return {"modules": rows, "total_bytes": sum(r["size_bytes"] for r in rows)}

    async def resources(args: dict) -> dict:
        """capacity this peer advertises and the fresh advertisements of the others (psutil, NVML)"""
        svc = service()
        now = time.monotonic()

        def doc(res: Resources) -> dict:
            out = encode_fields(res)
            out["gpus"] = [encode_fields(g) for g in res.gpus]
            out["summary"] = res.describe()
            return out
        def breaker(peer_id: str) -> str:
            b = svc.placement.breakers.get(peer_id)
            return "closed" if b is None else b.current(now).value

        return {"peer_id": svc.peer_id, "own": None if svc.own is None else doc(svc.own),
                "peers": {p: dict(doc(res), expires_in_s=round(exp - now, 3), breaker=breaker(p),
                                  task_slots_trusted=svc.placement.trusted_slots(p, now))
                          for p, (res, exp) in sorted(svc.capacity.items())}}

    return {"agents_deploy": agents_deploy, "agents_upgrade": agents_upgrade, "agents_rollback": agents_rollback,
            "agents_remove": agents_remove, "agents_call": agents_call, "tasks_submit": tasks_submit,
            "agents_list": agents_list, "tasks_status": tasks_status, "tasks_cancel": tasks_cancel,
            "modules_list": modules_list,
            "resources": resources}
