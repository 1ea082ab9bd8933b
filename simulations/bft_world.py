"""Validators running the BFT log core (:mod:`chimera.consensus.bft`) with
reputation-driven weight tables (:mod:`chimera.consensus.reputation`).

The driver honours the core's ordering duties with the in-memory store:
``PersistVote`` writes the sign state before the next action sends the
signature, ``Commit`` writes the block and its certificate before anything
else runs; a crashed validator restarts from its store (committed log, sign
state, weight tables) and catches up through the core's own commit requests;
``ServeCommits`` is answered from the store.

Reputation (optional, ``epoch_heights > 0``): every validator feeds its
:class:`~chimera.consensus.reputation.LocalReputation` with the real node's
observation policy for the log (PROTOCOL.md §14.13): ``Rejected`` actions whose
reason is in :data:`~chimera.consensus.bft.FAULT_REASONS` are ``vote_fault``,
``Evidence`` is ``equivocation``, the core's accepted votes are ``vote_ok``. (The
node also records each valid envelope and SWIM heartbeat; this world has neither
transport nor membership, so those observations are absent here.) Early in
each epoch it submits its signed opinion as a value of the log; when it
commits height ``B - 1 - EPOCH_LAG`` (``B``: first height of the next epoch)
it computes the next table with
:func:`~chimera.consensus.reputation.next_weight_table` from the opinions
committed in the epoch so far and puts it in force at ``B``. ``EPOCH_LAG``
exceeds the commits one catch-up response may carry, so a lagging validator
always has the table before it verifies a certificate signed under it.

Safety is checked on every commit of an honest validator
(:class:`SafetyViolation`): one block per height across honest validators, a
contiguous chain, and a certificate that verifies against the weight table of
its height; honest validators must also compute identical tables.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Callable

import msgpack

from chimera.consensus.bft import (
    MAX_COMMITS_PER_RESPONSE,
    BftCommitResponse,
    BftConfig,
    BftCore,
    BftEvent,
    Block,
    Broadcast,
    CertifiedCommit,
    Commit,
    FAULT_REASONS,
    Evidence,
    PersistVote,
    Rejected,
    Send,
    ServeCommits,
    SignState,
    block_hash,
    verify_commit,
)
from chimera.consensus.quorum import CertificateError, WeightTable
from chimera.consensus.reputation import (
    LocalReputation,
    ObservationKind,
    Opinion,
    WeightPolicy,
    next_weight_table,
    opinion_from_reputation,
)
from chimera.protocol.envelope import Envelope
from chimera.protocol.messages import decode_fields, encode_fields

from .behaviours import Behaviour, Outgoing
from .world import PeerHost, World

EPOCH_LAG = MAX_COMMITS_PER_RESPONSE + 1
OPINION_PREFIX = b"OPN1"
INVALID_PREFIX = b"BAD"


class SafetyViolation(AssertionError):
    """Two honest validators disagree (a block, a chain link, a certificate or a table)."""


class LivenessViolation(AssertionError):
    """Honest validators did not reach the target height in the time given."""


def validate_value(value: bytes) -> bool:
    """The application check of the simulated log: values starting with ``BAD`` are invalid."""
    return not value.startswith(INVALID_PREFIX)


def _pack(obj) -> bytes:
    return msgpack.packb(encode_fields(obj), use_bin_type=True)


def _unpack(cls, raw: bytes):
    return decode_fields(cls, msgpack.unpackb(raw, raw=False))


def pack_table(table: WeightTable) -> bytes:
    return msgpack.packb([table.epoch, list(table.weights.items())], use_bin_type=True)


def unpack_table(raw: bytes) -> WeightTable:
    epoch, items = msgpack.unpackb(raw, raw=False)
    return WeightTable(epoch=epoch, weights=dict(items))


def _h(height: int) -> bytes:
    return b"%016d" % height


class BftPeer(PeerHost):
    """A validator: the real :class:`BftCore` (or a test mutant) plus its behaviour."""

    def __init__(self, world: "BftWorld", index: int, behaviour: Behaviour | None = None) -> None:
        super().__init__(world, index, behaviour)
        self.bworld = world
        self.core: BftCore | None = None
        self.reputation = LocalReputation()
        self.opinions: dict[int, list[Opinion]] = {}  # epoch -> opinions committed in it
        self.committed_height = 0
        self._next_flood = math.inf

    # ---------------------------------------------------------- context for behaviours

    @property
    def epoch(self) -> int:
        return self.core.table.epoch if self.core is not None else 0

    def honest_peer_ids(self):
        return self.bworld.honest_ids

    # ---------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.boot()
        store, world = self.store, self.bworld
        commits = store.scan(b"commit/")
        height, last_hash = 1, bytes(32)
        self.opinions = {}
        for _, raw in commits:
            commit = _unpack(CertifiedCommit, raw)
            self._collect_opinions(commit)
        if commits:
            last = _unpack(CertifiedCommit, commits[-1][1])
            height = last.block.height + 1
            last_hash = block_hash(last.block)
        self.committed_height = height - 1
        tables = [(int(k[6:]), unpack_table(v)) for k, v in store.scan(b"table/")] or \
                 [(1, world.genesis_table)]
        if not store.get(b"table/" + _h(1)):
            store.put(b"table/" + _h(1), pack_table(world.genesis_table))
        current = [(h, t) for h, t in tables if h <= height][-1]
        raw_state = store.get(b"sign_state")
        sign_state = _unpack(SignState, raw_state) if raw_state else None
        raw_block = store.get(b"locked_block")  # (written with the sign state, as the node does)
        locked_block = _unpack(Block, raw_block) if raw_block else None
        now = self.clock.now()
        self.core = world.core_class(self.identity, self.network_id, current[1], world.config, now,
                                     height=height, last_block_hash=last_hash, table_height=current[0],
                                     sign_state=sign_state, locked_block=locked_block,
                                     validate_value=validate_value)
        for h, table in tables:
            if h > height:
                self.core.set_weight_table(h, table)
        self.reputation = LocalReputation(world.reputation_config) if world.reputation_config else LocalReputation()
        self._next_flood = now + self.behaviour.flood_interval_s if self.behaviour.flood_interval_s else math.inf
        self.sim.log(f"start {self.name} at h={height}")
        self.run_actions(self.core.take_actions())

    def crash(self) -> None:
        super().crash()
        self.core = None

    # ---------------------------------------------------------- inputs

    def submit(self, value: bytes) -> bool:
        if self.core is None:
            return False
        ok = self.core.submit(value, self.clock.now())
        self.run_actions(self.core.take_actions())
        return ok

    def on_envelope(self, envelope: Envelope) -> None:
        core = self.core
        if core is None:
            return
        core.on_message(envelope.sender, envelope.message, self.clock.now())
        self.run_actions(core.take_actions())

    def on_wake(self, now: float) -> None:
        core = self.core
        if core is None:
            return
        if now >= self._next_flood:
            self._next_flood = now + self.behaviour.flood_interval_s
            self.emit(self.behaviour.flood(self, self._targets()), self.bworld.address_of)
        core.tick(now)
        self.run_actions(core.take_actions())

    # ---------------------------------------------------------- actions

    def _targets(self) -> tuple[str, ...]:
        return tuple(p for p in self.core.table.weights if p != self.peer_id)

    def run_actions(self, actions: list) -> None:
        world = self.bworld
        if self.core is not None:  # the node's policy: each counted vote is a vote_ok (§14.13)
            for voter, count in self.core.take_accepted_votes().items():
                self.reputation.observe(voter, ObservationKind.VOTE_OK, self.clock.now(), count)
        for action in actions:
            if self.core is None:
                return  # crashed by a hook
            kind = type(action)
            if kind is Broadcast or kind is Send:
                targets = self._targets() if kind is Broadcast else (action.peer_id,)
                outs = self.behaviour.outgoing(self, action.message, targets) \
                    if self.behaviour.byzantine else [Outgoing(targets, action.message)]
                self.emit(outs, world.address_of)
            elif kind is PersistVote:
                self.store.put(b"sign_state", _pack(action.state))
                if action.locked_block is not None:
                    self.store.put(b"locked_block", _pack(action.locked_block))
            elif kind is Commit:
                self.store.put(b"commit/" + _h(action.height), _pack(action.commit))
                self.committed_height = action.height
                world.on_commit(self, action)
                self._after_commit(action)
            elif kind is Rejected:
                if action.reason in FAULT_REASONS:  # as the node: other reasons are only counted
                    self.reputation.observe(action.peer_id, ObservationKind.VOTE_FAULT, self.clock.now())
                world.counters[f"rejected_{action.reason}"] += 1
                self.sim.log(f"{self.name} {action.describe()}")
            elif kind is Evidence:
                self.reputation.observe(action.equivocation.first.voter, ObservationKind.EQUIVOCATION,
                                        self.clock.now())
                world.counters["evidence"] += 1
                self.sim.log(f"{self.name} evidence {action.describe()}")
            elif kind is ServeCommits:
                self._serve(action)
            elif kind is BftEvent:
                if self.sim.trace is not None:
                    self.sim.log(f"{self.name} {action.describe()}")
        if self.core is not None:
            deadline = self.core.next_deadline()
            if self._next_flood < deadline:
                deadline = self._next_flood
            self.wake_at(deadline)

    def _serve(self, action: ServeCommits) -> None:
        commits = []
        for h in range(action.from_height, action.from_height + action.max_count):
            raw = self.store.get(b"commit/" + _h(h))
            if raw is None:
                break
            commits.append(_unpack(CertifiedCommit, raw))
        if commits:
            msg = BftCommitResponse(commits=tuple(commits), latest_height=self.committed_height)
            self.emit([Outgoing((action.peer_id,), msg)], self.bworld.address_of)

    # ---------------------------------------------------------- reputation epochs

    def _collect_opinions(self, commit: CertifiedCommit) -> None:
        for value in commit.block.values:
            if value.startswith(OPINION_PREFIX):
                try:
                    opinion = _unpack(Opinion, value[len(OPINION_PREFIX):])
                except Exception:  # a malformed opinion value is simply not counted
                    continue
                self.opinions.setdefault(opinion.epoch, []).append(opinion)

    def _after_commit(self, action: Commit) -> None:
        world = self.bworld
        self._collect_opinions(action.commit)
        E = world.epoch_heights
        if not E or self.behaviour.byzantine:
            if E and self.behaviour.byzantine:
                self._epoch_boundary(action.height)  # byzantine peers still follow the tables
            return
        h = action.height
        if (h - 1) % E == 1:  # early in an epoch: state our opinion in the log
            table = self.core.table_for(h)
            opinion = opinion_from_reputation(self.identity, self.network_id, table.epoch, self.reputation,
                                              self.clock.now(), peers=list(table.weights))
            self.core.submit(OPINION_PREFIX + _pack(opinion), self.clock.now())
        self._epoch_boundary(h)

    def _epoch_boundary(self, h: int) -> None:
        world = self.bworld
        E = world.epoch_heights
        if (h + 1 + EPOCH_LAG - 1) % E != 0:
            return
        start = h + 1 + EPOCH_LAG  # first height of the next epoch
        previous = self.core.table_for(h)
        opinions = self.opinions.get(previous.epoch, [])
        table = next_weight_table(previous, opinions, list(previous.weights), world.policy,
                                  network_id=self.network_id)
        self.store.put(b"table/" + _h(start), pack_table(table))
        self.core.set_weight_table(start, table)
        world.on_table(self, start, table, len(opinions))


class BftWorld(World):
    """A consensus run: validators, value load, churn, safety and liveness checks.

    Args:
        sim, network: engine and network.
        config: the core's timeouts (:class:`BftConfig`).
        weights: initial weight of each peer (index order); 0 makes the peer an observer.
        behaviours: one behaviour per validator (honest by default).
        epoch_heights: heights per reputation epoch (0: fixed weights); must
            be 0 or >= ``2 * (EPOCH_LAG + 1)``.
        core_class: the core to run (tests pass a mutant subclass).
    Raises:
        ValueError: bad ``epoch_heights`` or mismatched lengths.
    """

    def __init__(self, sim, network, config: BftConfig, weights: list[int], *,
                 behaviours: list[Behaviour] | None = None, epoch_heights: int = 0,
                 policy: WeightPolicy | None = None, skew=None,
                 core_class: Callable[..., BftCore] = BftCore) -> None:
        super().__init__(sim, network, skew=skew)
        if epoch_heights and epoch_heights < 2 * (EPOCH_LAG + 1):
            raise ValueError(f"epoch_heights must be 0 or >= {2 * (EPOCH_LAG + 1)}")
        behaviours = behaviours or [Behaviour() for _ in weights]
        if len(behaviours) != len(weights):
            raise ValueError("one behaviour per validator")
        self.config = config
        self.core_class = core_class
        self.epoch_heights = epoch_heights
        self.policy = policy or WeightPolicy()
        self.reputation_config = None
        self.peers = [BftPeer(self, i, b) for i, b in enumerate(behaviours)]
        self.by_id = {p.peer_id: p for p in self.peers}
        # weight 0: an observer (not in the table; it follows the log by fetching certified commits)
        self.genesis_table = WeightTable(epoch=0, weights={p.peer_id: w for p, w in zip(self.peers, weights) if w > 0})
        self.honest = [p for p in self.peers if not p.behaviour.byzantine]
        self.honest_ids = tuple(p.peer_id for p in self.honest)
        self.tables: dict[int, WeightTable] = {1: self.genesis_table}
        self.table_history: list[dict] = []
        self.decided: dict[int, bytes] = {}
        self.first_commit_at: dict[int, float] = {}
        self.submitted_at: dict[bytes, float] = {}
        self.value_latency: list[float] = []
        self._value_seen: set[bytes] = set()
        self.violation: str | None = None

    def start_all(self) -> None:
        for peer in self.peers:
            peer.start()

    # ---------------------------------------------------------- load and churn

    def submit(self, peer: BftPeer, value: bytes) -> None:
        if peer.up and peer.submit(value):
            self.submitted_at.setdefault(value, self.sim.now)

    def crash(self, peer: BftPeer) -> None:
        if peer.up:
            peer.crash()

    def restart(self, peer: BftPeer) -> None:
        if not peer.up:
            peer.start()

    # ---------------------------------------------------------- checks

    def _violate(self, text: str) -> None:
        self.violation = text
        self.sim.log(f"SAFETY VIOLATION: {text}")
        raise SafetyViolation(text)

    def on_commit(self, peer: BftPeer, action: Commit) -> None:
        sim = self.sim
        h, digest = action.height, action.block_hash
        if sim.trace is not None:
            sim.log(f"{peer.name} {action.describe()}")
        if peer.behaviour.byzantine:
            return
        prior = self.decided.setdefault(h, digest)
        if prior != digest:
            self._violate(f"height {h}: {peer.name} committed {digest.hex()[:8]}, "
                          f"another honest validator {prior.hex()[:8]}")
        if action.block.height != h:
            self._violate(f"{peer.name}: commit of height {h} holds a block of height {action.block.height}")
        table = self.table_at(h)
        try:
            verify_commit(action.commit, table, self.network_id)
        except CertificateError as exc:
            self._violate(f"height {h}: certificate committed by {peer.name} does not verify: {exc}")
        if h not in self.first_commit_at:
            self.first_commit_at[h] = sim.now
            for value in action.block.values:
                t0 = self.submitted_at.get(value)
                if t0 is not None and value not in self._value_seen:
                    self._value_seen.add(value)
                    self.value_latency.append(sim.now - t0)

    def table_at(self, height: int) -> WeightTable:
        start = max(h for h in self.tables if h <= height)
        return self.tables[start]

    def on_table(self, peer: BftPeer, start: int, table: WeightTable, opinions: int) -> None:
        known = self.tables.get(start)
        if known is None:
            if not peer.behaviour.byzantine:
                self.tables[start] = table
                self.table_history.append({"height": start, "epoch": table.epoch, "opinions": opinions,
                                           "weights": dict(table.weights)})
                self.sim.log(f"{peer.name} table epoch {table.epoch} from h={start}: "
                             f"total {table.total}")
        elif known.digest() != table.digest() and not peer.behaviour.byzantine:
            self._violate(f"{peer.name} computed another weight table for height {start}")

    # ---------------------------------------------------------- progress

    def honest_heights(self) -> list[int]:
        return [p.committed_height for p in self.honest]

    def metrics(self) -> dict:
        heights = sorted(self.first_commit_at)
        times = [self.first_commit_at[h] for h in heights]
        intervals = [b - a for a, b in zip(times, times[1:])]
        lat = sorted(self.value_latency)
        return {
            "validators": sum(1 for p in self.peers if self.genesis_table.weights.get(p.peer_id, 0) > 0),
            "byzantine": len(self.peers) - len(self.honest),
            "observers": sum(1 for p in self.peers if p.peer_id not in self.genesis_table.weights),
            "byzantine_weight_share": round(1 - sum(self.genesis_table.weights.get(p, 0) for p in self.honest_ids)
                                            / self.genesis_table.total, 4),
            "heights": len(heights),
            "min_honest_height": min(self.honest_heights() or [0]),
            "block_interval_mean_s": statistics.fmean(intervals) if intervals else math.nan,
            "commit_latency_p50_s": lat[len(lat) // 2] if lat else math.nan,
            "commit_latency_p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else math.nan,
            "values_committed": len(lat),
            "values_submitted": len(self.submitted_at),
            "evidence": self.counters["evidence"],
            "rejected": sum(v for k, v in self.counters.items() if k.startswith("rejected_")),
            "envelope_drops": sum(v for k, v in self.counters.items() if k.startswith("envelope_drop_")),
            "epochs": len(self.table_history),
        }


def reputation_series(world: BftWorld) -> list[dict]:
    """Weight share of honest vs byzantine validators per epoch (for plots)."""
    rows = []
    honest = set(world.honest_ids)
    for start in sorted(world.tables):
        table = world.tables[start]
        total = table.total
        h_w = sum(w for p, w in table.weights.items() if p in honest)
        rows.append({"epoch": table.epoch, "from_height": start,
                     "honest_weight_share": h_w / total, "byzantine_weight_share": 1 - h_w / total,
                     "mean_honest_weight": h_w / max(1, len(honest)),
                     "mean_byzantine_weight": (total - h_w) / max(1, len(table.weights) - len(honest))})
    return rows


def rng_values(rng: random.Random, count: int, prefix: bytes = b"v") -> list[bytes]:
    return [prefix + rng.getrandbits(48).to_bytes(6, "big") for _ in range(count)]
