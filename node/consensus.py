"""Drives the BFT log core, the ledger and local reputation inside a node.

One actor (``consensus``) owns the :class:`~chimera.consensus.bft.BftCore`: it
receives the ``bft_*`` envelopes, runs the core's timers and executes its
action batches in order (DESIGN.md): a :class:`PersistVote` is written to
the sign-state file (``fdatasync``) before the next action sends the signature; a
:class:`Commit` is written with everything the ledger derived from it in one
transaction before any later action runs and before a ``chimera propose``
caller hears about it. Restart: the last ledger snapshot is loaded, the blocks
after it are replayed through the (pure) ledger, and the core resumes at the
next height with the persisted sign state, so a node SIGKILLed at any point
never signs a conflicting vote and keeps every commit it acknowledged.

Reputation: the node's :class:`~chimera.consensus.reputation.LocalReputation`
(``node.reputation``, weights from ``reputation_weights``) is fed from what this
node verifies itself (PROTOCOL.md §14.13): valid envelopes per sender, the votes
the core counted and the membership state of each member, once per second;
rejected input whose reason is in :data:`~chimera.consensus.bft.FAULT_REASONS`,
equivocation evidence, and (by the runtime) signed envelopes whose body fails
its schema, as they happen. Once per epoch, half way through it, a validator commits its signed
opinion of the other validators; the next epoch's table is computed from the
committed opinions by every peer alike (:mod:`chimera.consensus.ledger`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import sqlite3
import time
from collections import Counter, OrderedDict

import msgpack

from chimera.consensus.bft import (
    BFT_ACTOR,
    Broadcast,
    BftCommitResponse,
    BftConfig,
    BftCore,
    MAX_VALUES_PER_MESSAGE,
    BftEvent,
    BftValues,
    BftVote,
    Block,
    CertifiedCommit,
    Commit,
    FAULT_REASONS,
    Evidence,
    PersistVote,
    Rejected,
    Send,
    ServeCommits,
    SignState,
    Vote,
    block_hash,
    value_hash,
    verify_commit,
)
from chimera.consensus.ledger import (
    Ledger,
    decision_nonce,
    dedupe_heights_for,
    encode_decision,
    encode_evidence,
    encode_join,
    encode_opinion,
)
from chimera.consensus.quorum import CertificateError, WeightTable, sign_vote
from chimera.consensus.reputation import (
    PPM,
    ObservationKind,
    WeightPolicy,
    sign_opinion,
)
from chimera.protocol.envelope import Envelope
from chimera.protocol.errors import LocalProtocolError, MalformedError
from chimera.protocol.membership import MemberState
from chimera.protocol.messages import decode_fields, encode_fields

from .actors import Actor, call_soon_once, wait_event
from .logs import printable
from .metrics import LatencyHistogram
from .store import SignStateFile

log = logging.getLogger("chimera.consensus")
SIGN_STATE_KEY = "bft_sign_state"  # where releases before 2026-12 kept it (SQLite blobs table)
SIGN_STATE_FILE = "bft_sign_state.bin"
SIGN_STATE_SEQ_KEY = "sign_state_seq"  # store meta: the sign-state file's write count at the last commit
GENESIS_WEIGHT = WeightPolicy().weight_scale  # each genesis validator starts at full weight
def _pack(obj: object) -> bytes:
    return msgpack.packb(encode_fields(obj), use_bin_type=True)


def _unpack_commit(blob: bytes) -> CertifiedCommit:
    return decode_fields(CertifiedCommit, msgpack.unpackb(blob, raw=False), "commit")


class ConsensusActor(Actor):
    name = BFT_ACTOR

    def __init__(self, service: "ConsensusService") -> None:
        self.service = service

    async def handle(self, item: object) -> None:
        if isinstance(item, Envelope):
            self.service.on_envelope(item)


class ConsensusService:
    """The consensus part of one node (created by :class:`~chimera.node.runtime.Node`)."""

    def __init__(self, node, config: BftConfig) -> None:
        self.node = node
        net = node.network
        self.network_id = net.network_id
        genesis = WeightTable(epoch=0, weights={p: GENESIS_WEIGHT for p in net.genesis})
        self.genesis_table = genesis
        self.ledger = Ledger(self.network_id, genesis, net.epoch_length)
        self.store = node.store
        self.reputation = node.reputation
        self.valid_counts: Counter[str] = Counter()  # filled by the runtime's receive path
        self.waiters: dict[bytes, asyncio.Future] = {}
        self.counters = node.counters
        self.last_commit_mono: float | None = None
        self._opinion_epoch = -1
        self._join_epoch = -1
        self._wake = asyncio.Event()
        self._sleep_until = 0.0  # monotonic time the timer task sleeps until (0: awake)
        self._soon: set[str] = set()  # steps scheduled for the next loop iteration (call_soon_once)
        self.halted: str | None = None  # why consensus stopped (fail-stop, see _halt)
        self.commit_latency = LatencyHistogram()  # own values: submission -> stored commit
        # the durable writes each height waits for (wall time, so a slow or busy disk shows)
        self.sign_state_sync = LatencyHistogram(LatencyHistogram.DISK_BOUNDS_S)
        self.commit_store = LatencyHistogram(LatencyHistogram.DISK_BOUNDS_S)
        self._submitted_at: OrderedDict[bytes, float] = OrderedDict()
        self.commit_hooks: list = []  # fn(height, outcome) after a commit is stored (training service)
        self._recover()
        self.stored_height = self.ledger.height
        self.sign_state_file = SignStateFile(node.data_dir / SIGN_STATE_FILE)
        sign_state = self._load_sign_state()
        height = self.ledger.height
        # The sign state is durable before a vote leaves and the commit before it is acknowledged,
        # so a store that ends more than one height below our last signature lost committed
        # heights (a zero-length or older file: restored from an old backup, or damaged). The node
        # still runs: it fetches them again as certified commits, and it signs nothing below the
        # sign state, so it cannot equivocate; but the operator must hear it.
        self.store_gap: tuple[int, int] | None = None
        if sign_state is not None and sign_state.height > height + 1:
            self.store_gap = (height + 1, sign_state.height - 1)
            log.error("%s ends at height %d but this node signed at height %d: committed heights %d..%d "
                      "are missing (the store was lost or replaced by an older copy); they are fetched "
                      "again from peers, and nothing is signed below height %d", self.store.path, height,
                      sign_state.height, height + 1, sign_state.height - 1, sign_state.height)
            node.emit_event("store_behind_sign_state", node.peer_id, priority="warning",
                            stored_height=height, signed_height=sign_state.height)
        # The reverse: a validator with committed heights but no sign state (the file was lost,
        # emptied or replaced), or an older sign state than the one it held at its last commit
        # (the file was restored from an old copy: each commit stores the file's write count),
        # cannot know what it signed after its last commit. It signs nothing at the next height
        # (the others decide it; it follows from the certified commit) and resumes after it: it
        # cannot have signed beyond, since it stores each commit before it enters the next
        # height. A validator that never signed (it just joined) loses one height.
        self._double_sign_reported = False
        self.sign_from_height = 1
        signed_height = None if sign_state is None else sign_state.height
        older = self.sign_state_file.seq < self.store.get_meta(SIGN_STATE_SEQ_KEY, 0)
        if (sign_state is None or older) and height >= 1 and node.peer_id in self.ledger.table.weights:
            held = "no sign state" if signed_height is None else f"a sign state of height {signed_height}"
            if config.double_sign_check:
                self.sign_from_height = height + 2
                log.error("%s holds %s but the log is at height %d: what this validator signed at height %d "
                          "cannot be known, so it signs nothing there and resumes at height %d (restore the "
                          "file from a recent backup to avoid this)", self.sign_state_file.path, held, height,
                          height + 1, height + 2)
            else:
                log.warning("%s holds %s but the log is at height %d, and consensus_double_sign_check is "
                            "false: this validator signs at height %d as if it had signed nothing there (if "
                            "it did, it equivocates)", self.sign_state_file.path, held, height, height + 1)
            node.emit_event("sign_state_missing", node.peer_id, priority="warning", stored_height=height,
                            signed_height=signed_height, signs_from_height=max(self.sign_from_height, height + 1))
        last_hash = self.store.block_hash(height) if height else net.genesis_hash()
        # a decision is valid for a window of epochs: the dedupe of committed values must span it
        config = dataclasses.replace(config, dedupe_heights=max(config.dedupe_heights,
                                                                dedupe_heights_for(net.epoch_length)))
        self.core = BftCore(node.identity, self.network_id, self.ledger.table, config, time.monotonic(),
                            height=height + 1, last_block_hash=last_hash,
                            table_height=self.ledger.table_height, sign_state=sign_state,
                            sign_from_height=self.sign_from_height,
                            # no usable sign state (a fresh validator, or the file was lost): sign
                            # nothing before hearing where the network is (PROTOCOL.md §14.12)
                            await_network=(sign_state is None or older) and config.double_sign_check,
                            locked_block=self._load_locked_block(sign_state, height),
                            validate_value=self.ledger.validate_value, on_commit=self.ledger.on_commit,
                            choice_key=self.ledger.choice_key, proposable=self.ledger.proposable)
        # the dedupe of committed values survives a restart (a replayed value is refused)
        start = max(1, height - config.dedupe_heights + 1)
        while start <= height:
            blobs = self.store.commit_blobs(start, 512)
            if not blobs:
                break
            for blob in blobs:
                self.core.remember_committed(start, _unpack_commit(blob).block.values)
                start += 1
        if net.epoch_length == 1:
            log.warning("this network's epoch_length is 1: a validator's opinion can commit in its "
                        "epoch only if it reaches the proposer of the epoch's one height before the "
                        "proposal, which it rarely does, so reputation weights hardly ever change; "
                        "use an epoch_length of 2 or more (PROTOCOL.md §15.5)")
        log.info("consensus at height %d, epoch %d, %s (%d validators)", height + 1, self.ledger.table.epoch,
                 "validator" if self.is_validator else "observer", len(self.ledger.table.weights))

    # ------------------------------------------------------------- recovery

    def _recover(self) -> None:
        """Ledger state = last usable snapshot + replay of the blocks stored after it.

        A snapshot holding a height above the store's last one (or one whose block is not
        stored) is skipped with a warning, and the one before it is tried (none left: replay
        from genesis). Releases before 2026-12 stored, at an epoch boundary met during a
        catch-up, the ledger state after the whole response under the boundary's height; a
        node killed before the response's last commit was stored then held a snapshot ahead
        of its log, and could not start again.
        """
        last = self.store.last_height()
        below = None
        while (snap := self.store.latest_snapshot(below)) is not None:
            ledger = Ledger(self.network_id, self.genesis_table, self.ledger.epoch_length)
            ledger.restore(snap[1])
            if ledger.height <= last and self.store.block_hash(ledger.height) is not None:
                self.ledger = ledger
                break
            self.counters["consensus_snapshots_skipped"] += 1
            log.warning("%s: the ledger snapshot stored at height %d holds height %d, but the log ends at "
                        "height %d: skipped (the ledger is rebuilt from an earlier snapshot and the stored "
                        "blocks)", self.store.path, snap[0], ledger.height, last)
            below = snap[0]
        height = self.ledger.height + 1
        while height <= last:
            blobs = self.store.commit_blobs(height, 256)
            if not blobs:
                break
            for blob in blobs:
                self.ledger.apply(_unpack_commit(blob))
                height += 1
        self.ledger.outcomes.clear()

    def _load_sign_state(self) -> SignState | None:
        """The last signed vote state: the sign-state file, or (first start after an upgrade)
        the SQLite row older releases kept, moved into the file; the higher position wins."""
        legacy = self.store.get_blob(SIGN_STATE_KEY)
        states = [decode_fields(SignState, msgpack.unpackb(blob, raw=False), "sign_state")
                  for blob in (self.sign_state_file.load(), legacy) if blob is not None]
        state = max(states, key=SignState.position, default=None)
        if legacy is not None:
            self.sign_state_file.save(_pack(state))
            self.store.delete_blob(SIGN_STATE_KEY)
        return state

    def _load_locked_block(self, state: SignState | None, stored_height: int) -> Block | None:
        """The block persisted with the sign state's lock (PersistVote.locked_block), or None.
        The file verifies its bytes (a digest in the slot); a block that still does not decode
        or whose hash is not the lock's (a file written before blocks were kept, or by other
        code) is ignored (logged): the lock stays, and the block must then come from a peer."""
        if state is None or state.locked_hash is None or state.height <= stored_height:
            return None  # (no lock, or its height is committed and stored: nothing to resume)
        blob = self.sign_state_file.load_extra()
        try:
            block = decode_fields(Block, msgpack.unpackb(blob, raw=False), "locked_block") if blob else None
        except Exception:  # noqa: BLE001 - damaged bytes: the same as no block
            block = None
        if block is None or block_hash(block) != state.locked_hash or block.height != state.height:
            log.warning("%s: this validator is locked on block %s at height %d but the block is not "
                        "stored with the lock; it is fetched from peers", self.sign_state_file.path,
                        state.locked_hash.hex()[:16], state.height)
            return None
        return block

    def close(self) -> None:
        self.sign_state_file.close()

    # ------------------------------------------------------------ properties

    @property
    def is_validator(self) -> bool:
        return self.node.peer_id in self.core.table.weights if hasattr(self, "core") \
            else self.node.peer_id in self.ledger.table.weights

    @property
    def height(self) -> int:
        """Last committed height stored on this node (the core may be ahead of it only
        inside one action batch, or after a halt: then what is on disk counts)."""
        return self.stored_height

    # ---------------------------------------------------------------- inputs

    def on_envelope(self, env: Envelope) -> None:
        if self.halted is not None:
            self.counters["consensus_drop_halted"] += 1
            return
        self.core.on_message(env.sender, env.message, time.monotonic())
        self.run_actions()

    def submit(self, value: bytes) -> bool:
        """Add a value to the core's pool; its gossip leaves at the end of this loop iteration.

        Values submitted in the same iteration (a burst of proposals) share one
        ``bft_values`` envelope per peer (up to ``MAX_VALUES_PER_MESSAGE``) instead of
        one envelope, and one Ed25519 verification at every peer, per value.
        """
        if self.halted is not None:
            raise LocalProtocolError(f"consensus is halted: {self.halted}")
        ok = self.core.submit(value, time.monotonic())
        if ok:
            self._submitted_at[value_hash(value)] = time.monotonic()
            if len(self._submitted_at) > 65_536:
                self._submitted_at.popitem(last=False)
        if not call_soon_once(self._soon, "flush", self.run_actions):  # no loop: tests driving it
            self.run_actions()
        return ok

    def recheck_soon(self) -> None:
        """The application learned something (a training update arrived): when a proposal
        waits on a value the ledger answered "not yet" for, run the core's rules again at the
        next loop iteration (never inside the caller: it may be running our own actions)."""
        if self.halted is None and self.core.awaiting_values:
            call_soon_once(self._soon, "recheck", self._recheck)

    def _recheck(self) -> None:
        if self.halted is None:
            self.core.recheck(time.monotonic())
            self.run_actions()

    async def propose(self, data: bytes, timeout_s: float) -> dict:
        """Submit a signed decision and wait until it is committed (and stored).

        Returns ``height``, ``nonce``, ``value_hash`` (hex) and ``latency_s``: seconds
        from submission to the moment the commit was durable in this node's store (not
        to when this coroutine resumed, which can trail it by a loop iteration).

        Raises:
            LocalProtocolError: data too long, the pool refused it, no commit within ``timeout_s``,
                or consensus halted on this node (at once, also while waiting).
        """
        nonce = decision_nonce(self.ledger.table.epoch, random.getrandbits(32))  # epoch-bound: no replay
        value = encode_decision(self.node.identity, self.network_id, nonce, data)
        digest = value_hash(value)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        fut = loop.create_future()
        self.waiters[digest] = fut
        try:
            if not self.submit(value):
                raise LocalProtocolError("the consensus pool refused the value (full or duplicate)")
            try:
                height, stored_at = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
            except asyncio.TimeoutError:
                raise LocalProtocolError(f"not committed within {timeout_s} s (is a quorum of "
                                         f"validators up? height {self.height})") from None
        finally:
            self.waiters.pop(digest, None)
        return {"height": height, "nonce": nonce, "value_hash": digest.hex(), "latency_s": stored_at - t0}

    async def propose_many(self, data: bytes, count: int, timeout_s: float) -> dict:
        """Submit ``count`` decisions (``data`` + `` #k``) at once; wait for all (load testing).

        Returns the commit height of each and its latency in seconds, measured in
        this node from submission to the stored commit.
        """
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def one(k: int) -> tuple[int, float]:
            submitted = loop.time()
            res = await self.propose(data + f" #{k}".encode(), timeout_s)
            return res["height"], submitted - t0 + res["latency_s"]

        done = await asyncio.gather(*(one(k) for k in range(count)))
        return {"heights": [h for h, _ in done], "latency_s": [x for _, x in done],
                "wall_s": loop.time() - t0}

    async def run_timer(self) -> None:
        next_sample = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_sample:
                next_sample = now + 1.0
                try:
                    self._sample_reputation(now)
                    self._periodic_submissions()
                except Exception:
                    self.counters["consensus_sample_errors"] += 1
                    log.exception("reputation sampling failed")
            delay = min(self.core.next_deadline(), next_sample) - time.monotonic()
            if delay > 0:
                self._wake.clear()
                self._sleep_until = time.monotonic() + min(delay, 5.0)
                woken = await wait_event(self._wake, min(delay, 5.0))
                self._sleep_until = 0.0
                if woken:
                    continue
            if self.halted is not None:
                await asyncio.sleep(1.0)
                continue
            try:
                self.core.tick(time.monotonic())
                self.run_actions()
            except Exception:
                self.counters["consensus_timer_errors"] += 1
                log.exception("consensus tick failed")
            await asyncio.sleep(0)

    # --------------------------------------------------------------- actions

    def run_actions(self) -> None:
        for action in _coalesce_persists(_coalesce_values(self.core.take_actions())):
            if self.halted is not None:
                break
            try:
                self._run(action)
            except LocalProtocolError as exc:
                self.counters["consensus_action_errors"] += 1
                log.error("consensus action %s failed: %s", type(action).__name__, exc)
            except (OSError, ValueError, sqlite3.Error) as exc:
                if not isinstance(action, (PersistVote, Commit)):
                    raise
                self._halt(f"{type(action).__name__} could not be stored: {exc}")
        deadline = self.core.next_deadline()
        if deadline < self._sleep_until:  # only an earlier deadline needs the timer task
            self._wake.set()
        if self.halted is None and deadline <= time.monotonic():
            # A timer is already due (e.g. the end of a proposer's idle wait that a value just
            # scheduled "at the next tick"): run it right after the input being handled (and
            # the rest of its receive burst, which the consensus actor drains in one step),
            # not after the timer task's wake-up, which trails by a loop iteration or two.
            call_soon_once(self._soon, "tick", self._tick_due)

    def _tick_due(self) -> None:
        if self.halted is None:
            self.core.tick(time.monotonic())
            self.run_actions()

    def _halt(self, reason: str) -> None:
        """Fail-stop: what must be durable before it is acted on could not be written (disk
        full, I/O error). Sending a signature whose sign state is not stored could make a
        restarted node equivocate, and going on past an unstored commit would acknowledge
        data that is not on disk; so this node stops taking part in consensus (nothing of
        the failed batch is sent) until it is restarted. Its committed log stays intact."""
        self.halted = reason
        self.counters["consensus_halted"] += 1
        log.critical("consensus halted: %s; fix the disk and restart the node", reason)
        self.node.emit_event("consensus_halted", self.node.peer_id, priority="critical", detail=reason)
        for fut in self.waiters.values():  # nothing more commits here: waiting proposers learn it now
            if not fut.done():
                fut.set_exception(LocalProtocolError(f"consensus is halted: {reason}"))

    def _run(self, action: object) -> None:
        node = self.node
        if isinstance(action, PersistVote):
            locked = action.locked_block
            started = time.perf_counter()
            self.sign_state_file.save(_pack(action.state), None if locked is None else _pack(locked))
            self.sign_state_sync.observe(time.perf_counter() - started)
        elif isinstance(action, Broadcast):
            node.broadcast(self.core.table.weights, action.message)  # signed once for all validators
            if node.config.test_equivocate and isinstance(action.message, BftVote) \
                    and action.message.vote.voter == node.peer_id:
                self._equivocate(action.message.vote)
        elif isinstance(action, Send):
            node.send(action.peer_id, action.message)
        elif isinstance(action, Commit):
            self._on_commit(action)
        elif isinstance(action, Evidence):
            offender = action.equivocation.first.voter
            self.counters["consensus_evidence"] += 1
            self.reputation.observe(offender, ObservationKind.EQUIVOCATION, time.monotonic())
            log.warning("equivocation by %s: %s", offender, action.equivocation.describe())
            node.emit_event("equivocation_detected", offender, priority="warning",
                            detail=action.equivocation.describe())
            try:
                self.core.submit(encode_evidence(action.equivocation), time.monotonic())
            except LocalProtocolError:
                self.counters["consensus_evidence_too_large"] += 1
        elif isinstance(action, Rejected):
            self.counters[f"consensus_rejected.{action.reason}"] += 1
            if action.reason in FAULT_REASONS:
                self.reputation.observe(action.peer_id, ObservationKind.VOTE_FAULT, time.monotonic())
        elif isinstance(action, ServeCommits):
            self._serve(action)
        elif isinstance(action, BftEvent):
            self.counters[f"consensus_events.{action.kind}"] += 1
            if action.kind == "network_heard":
                # (a fresh network hears itself at height 1: not worth a line each start)
                (log.info if action.height > 1 else log.debug)(
                    "heard enough validators at height %d: signing from here on (nothing below height %d)",
                    action.height, self.core.sign_from_height)
            if action.kind == "own_votes_recovered":
                log.warning("started without log and sign state at height %d, which the network is still "
                            "deciding: asked the validators for the votes this validator signed there: %s",
                            action.height, action.detail)
            if action.kind == "double_sign_risk" and not self._double_sign_reported:
                # once per start (a catch-up through a forgotten past may raise it at every
                # height); status `signs_from_height` follows the floor
                self._double_sign_reported = True
                log.error("a certified commit of height %d carries a precommit of this validator that its "
                          "sign state (%s) does not hold: the sign state was lost or is an old copy, or "
                          "this key signs on another node too; nothing is signed below height %d",
                          action.height, self.sign_state_file.path, self.core.sign_from_height)
                node.emit_event("double_sign_risk", node.peer_id, priority="warning", height=action.height,
                                signs_from_height=self.core.sign_from_height)

    def _equivocate(self, vote: Vote) -> None:
        """TEST HOOK (``test_equivocate``): also sign a conflicting vote. Never in production."""
        other = None if vote.block_hash is not None else bytes(32)
        twin = Vote(vote_type=vote.vote_type, height=vote.height, round=vote.round, block_hash=other,
                    signed=sign_vote(self.node.identity, vote.vote_type, self.network_id, self.core.table.epoch,
                                     [vote.height, vote.round, other]))
        self.counters["test_equivocations_sent"] += 1
        for peer_id in self.core.table.weights:
            if peer_id != self.node.peer_id:
                self.node.send(peer_id, BftVote(vote=twin))

    def _serve(self, action: ServeCommits) -> None:
        commits, size = [], 0
        for blob in self.store.commit_blobs(action.from_height, action.max_count):
            size += len(blob)
            if commits and size > self.core.config.max_response_bytes:
                break
            try:
                commits.append(_unpack_commit(blob))
            except MalformedError:
                self.counters["consensus_store_corrupt"] += 1
                break
        if commits:
            self.counters["consensus_commits_served_from_store"] += len(commits)
            self.node.send(action.peer_id, BftCommitResponse(commits=tuple(commits),
                                                             latest_height=self.height))

    def _on_commit(self, action: Commit) -> None:
        outcome = self.ledger.outcomes.pop(0) if self.ledger.outcomes else None
        if outcome is None or outcome.height != action.height:
            raise LocalProtocolError(f"ledger outcome missing for height {action.height}")
        block = action.block
        snapshot = new_table = None
        if outcome.new_table is not None:
            # the ledger's state right after this height, taken when it was applied: the core
            # applies a whole catch-up response before the first of its commits is stored here,
            # so the ledger may already be further ahead now
            snapshot = outcome.snapshot
            table = outcome.new_table
            new_table = (table.epoch, action.height + 1, msgpack.packb(list(table.weights.items())))
        # Durable before anything below: events, waiters, the next action.
        started = time.perf_counter()
        self.store.save_commit(
            height=action.height, block_hash=action.block_hash, round_=action.commit.round,
            epoch=block.epoch, proposer=block.proposer, value_count=len(block.values),
            committed_ms=time.time_ns() // 1_000_000, commit_blob=_pack(action.commit),
            decisions=[(d.index, d.author, d.nonce, d.data) for d in outcome.decisions],
            offenders=outcome.evidence, snapshot=snapshot, new_table=new_table,
            meta={SIGN_STATE_SEQ_KEY: self.sign_state_file.seq})
        stored_mono = time.monotonic()  # the commit is durable: latencies end here
        self.commit_store.observe(time.perf_counter() - started)
        self.stored_height = action.height
        self.last_commit_mono = stored_mono
        self.counters["consensus_commits"] += 1
        self.counters["consensus_values_committed"] += len(block.values)
        node = self.node
        for d in outcome.decisions:
            node.emit_event("decision_committed", d.author, height=d.height, index=d.index,
                            data=_preview(d.data))
        for peer_id in outcome.joins:
            node.emit_event("validator_join_committed", peer_id, height=action.height)
        for peer_id in outcome.evidence:
            node.emit_event("evidence_committed", peer_id, height=action.height, priority="warning")
        if outcome.joins_deferred:  # over the epoch's join limit (PROTOCOL §15.3): may join later
            self.counters["consensus_joins_deferred"] += len(outcome.joins_deferred)
        for reason in outcome.ignored:
            self.counters["consensus_values_ignored"] += 1
            log.info("committed value ignored at height %d: %s", action.height, reason)
        if outcome.new_table is not None:
            table = outcome.new_table
            node.emit_event("reputation_changed", node.peer_id, epoch=table.epoch, from_height=action.height + 1,
                            weights=dict(table.weights))
            log.info("epoch %d from height %d: weights %s", table.epoch, action.height + 1,
                     {p[:10]: w for p, w in table.weights.items()})
        for hook in self.commit_hooks:
            hook(action.height, outcome)
        # The height that makes our opinion due is reached by a commit: submit it now (at the
        # next loop iteration, after this batch of actions), not at the next 1 s sample.
        call_soon_once(self._soon, "opinion", self._opinion_after_commit)
        for value in block.values:
            digest = value_hash(value)
            t0 = self._submitted_at.pop(digest, None)
            if t0 is not None:
                self.commit_latency.observe(stored_mono - t0)
            fut = self.waiters.get(digest)
            if fut is not None and not fut.done():
                fut.set_result((action.height, stored_mono))

    # ------------------------------------------------------------ reputation

    def _sample_reputation(self, now: float) -> None:
        rep = self.reputation
        counts, self.valid_counts = self.valid_counts, Counter()
        for peer_id, count in counts.items():
            rep.observe(peer_id, ObservationKind.VALID_ENVELOPE, now, count)
        for voter, count in self.core.take_accepted_votes().items():
            rep.observe(voter, ObservationKind.VOTE_OK, now, count)
        for peer_id, member in self.node.membership.members.items():
            if member.state is MemberState.ALIVE:
                rep.observe(peer_id, ObservationKind.HEARTBEAT_TIMELY, now)
            elif member.state in (MemberState.SUSPECT, MemberState.DEAD):
                rep.observe(peer_id, ObservationKind.HEARTBEAT_MISSED, now)

    def _periodic_submissions(self) -> None:
        """Once per epoch: our opinion (validators, half way through) or our join request."""
        table = self.core.table
        epoch = table.epoch
        me = self.node.peer_id
        if me in table.weights:
            self._submit_opinion_if_due()
        elif self.node.config.consensus_validator and epoch != self._join_epoch \
                and me not in self.ledger.joins:
            self._join_epoch = epoch
            self.submit(encode_join(self.node.identity, self.network_id, epoch))  # new bytes each epoch

    def _opinion_after_commit(self) -> None:
        """After the commits of a loop iteration: our opinion, if its height has come."""
        if self.halted is not None:
            return
        try:
            self._submit_opinion_if_due()
        except Exception:
            self.counters["consensus_sample_errors"] += 1
            log.exception("submitting our reputation opinion failed")

    def _submit_opinion_if_due(self) -> None:
        """Our signed opinion of epoch ``e`` (the current table's), once, when the height in
        progress has reached :func:`opinion_height` (PROTOCOL.md §15.5): a part per
        :data:`OPINION_PART_ENTRIES` scored validators, each scored one with at least
        ``min_opinion_evidence`` of local evidence; nothing when none qualifies.

        Called after every stored commit (the height that makes it due) and by the 1 s
        timer. Until 2026-12 only the timer asked, so with epochs shorter than about two
        seconds most epochs were over before it looked (or it looked at their last height,
        and the opinion committed in the next epoch, where the ledger ignores it).
        """
        table = self.core.table
        epoch = table.epoch
        me = self.node.peer_id
        if me not in table.weights or epoch == self._opinion_epoch:
            return
        if self.core.height < opinion_height(epoch, self.ledger.epoch_length):
            return
        now = time.monotonic()
        peers = [p for p in table.weights if p != me]
        scores = {p: int(round(self.reputation.score(p, now) * PPM)) for p in peers
                  if sum(self.reputation.evidence(p, now)) >= self.reputation.config.min_opinion_evidence}
        self._opinion_epoch = epoch
        self.counters["consensus_opinions_submitted" if scores else "consensus_opinions_empty"] += 1
        for part in _opinion_parts(scores):  # each part one signed value of <= 4096 bytes
            value = encode_opinion(sign_opinion(self.node.identity, self.network_id, epoch, part))
            if len(value) <= self.core.config.max_value_bytes:
                self.submit(value)
            else:
                self.counters["consensus_opinion_too_large"] += 1

    # ----------------------------------------------------------------- reads

    def status(self) -> dict:
        table = self.core.table
        return {
            "height": self.height,
            "epoch": table.epoch,
            "role": "validator" if self.is_validator else "observer",
            "validators": len(table.weights),
            "total_weight": table.total,
            "weight": table.weights.get(self.node.peer_id, 0),
            "halted": self.halted,
            # committed heights missing from this node's store below its last signature (see __init__)
            "store_gap": None if self.store_gap is None or self.height >= self.store_gap[1]
            else list(self.store_gap),  # until peers have refilled it (the event stays in `events`)
            # the sign state was missing or old at start, or a commit carried a precommit of ours it
            # does not hold: nothing is signed below this height
            "signs_from_height": self.core.sign_from_height if self.core.height < self.core.sign_from_height
            else None,
            "awaiting_network": self.core.awaiting_network and self.is_validator,
            "round": self.core.round,
            "step": self.core.step,
            "pool_size": self.core.pool_size,
            "epoch_length": self.ledger.epoch_length,
            "last_commit_s_ago": None if self.last_commit_mono is None
            else round(time.monotonic() - self.last_commit_mono, 3),
            "drops": dict(sorted(self.core.drops.items())),  # the core's counted drops (PROTOCOL §14.13)
            # durable writes so far: how many, and the wall seconds spent waiting on them
            "durable_writes": {name: {"count": hist.count, "total_s": round(hist.sum_s, 6)}
                               for name, hist in (("sign_state", self.sign_state_sync),
                                                  ("commit", self.commit_store))},
        }

    def reputation_rows(self) -> dict:
        now = time.monotonic()
        table = self.core.table
        peers = sorted(set(table.weights) | set(self.reputation.peers()) | self.ledger.joins)
        rows = []
        for p in peers:
            r, s = self.reputation.evidence(p, now)
            rows.append({"peer_id": p, "weight": table.weights.get(p, 0),
                         "share": round(table.weights.get(p, 0) / table.total, 6),
                         "local_score": round(self.reputation.score(p, now), 6),
                         "evidence_positive": round(r, 3), "evidence_negative": round(s, 3),
                         "joining": p in self.ledger.joins, "me": p == self.node.peer_id})
        return {"epoch": table.epoch, "total_weight": table.total, "height": self.height,
                "epochs": [{"epoch": e, "from_height": h,
                            "weights": dict(msgpack.unpackb(w, raw=False))}
                           for e, h, w in self.store.epoch_tables()[-10:]],
                "peers": rows}

    def table_for_height(self, height: int) -> WeightTable:
        """The committed weight table in force at ``height`` (epoch 0: the genesis table)."""
        table = self.genesis_table
        for epoch, from_height, weights in self.store.epoch_tables():
            if from_height <= height:
                table = WeightTable(epoch=epoch, weights=dict(msgpack.unpackb(weights, raw=False)))
        return table

    def certificate_doc(self, height: int) -> dict:
        """The quorum certificate of committed ``height``, re-verified here against its epoch's table.

        Returns the block (hash, round, epoch, proposer, value count), every precommit
        (voter, weight, signature hex), the signed and total weight, whether
        :func:`~chimera.consensus.bft.verify_commit` accepts it (with the reason if not),
        and ``commit_hex``: the certified commit's canonical encoding, for anyone to
        verify independently with the epoch's weight table (docs/PROTOCOL.md §14).
        Raises:
            LocalProtocolError: ``height`` is not committed on this peer.
        """
        blobs = self.store.commit_blobs(height, 1) if height >= 1 else []
        if not blobs:
            raise LocalProtocolError(f"height {height} is not committed on this peer (last {self.height})")
        commit = _unpack_commit(blobs[0])
        table = self.table_for_height(height)
        error = None
        try:
            verify_commit(commit, table, self.network_id)
        except CertificateError as exc:
            error = str(exc)
        votes = [{"voter": v.voter, "weight": table.weights.get(v.voter, 0), "signature": v.signature.hex()}
                 for v in commit.certificate.votes]
        return {"height": height, "round": commit.round, "block_hash": block_hash(commit.block).hex(),
                "epoch": commit.block.epoch, "proposer": commit.block.proposer,
                "value_count": len(commit.block.values), "precommits": votes,
                "signed_weight": sum(v["weight"] for v in votes), "total_weight": table.total,
                "rule": "precommits of strictly more than 2/3 of the epoch's weight",
                "verified": error is None, "error": error, "commit_hex": blobs[0].hex()}

    def log_rows(self, limit: int, from_height: int | None) -> dict:
        if from_height is None:
            decisions = self.store.decisions(limit=limit, last=True)
            blocks = self.store.blocks(max(1, self.height - limit + 1), limit)
        else:
            decisions = self.store.decisions(from_height, limit)
            blocks = self.store.blocks(from_height, limit)
        for d in decisions:
            d["data_text"] = _preview(d.pop("data"))
        return {"height": self.height, "decisions": decisions, "blocks": blocks}


def _coalesce_values(actions: list) -> list:
    """Merge the ``bft_values`` broadcasts of one batch of core actions into as few envelopes
    as the message limit allows (order of values kept, duplicates dropped), at the place of
    the first one."""
    values: list[bytes] = []
    out: list = []
    first = -1
    for action in actions:
        if isinstance(action, Broadcast) and isinstance(action.message, BftValues):
            if first < 0:
                first = len(out)
            values.extend(action.message.values)
        else:
            out.append(action)
    if first < 0:
        return out
    unique = list(dict.fromkeys(values))
    merged = [Broadcast(BftValues(values=tuple(unique[k:k + MAX_VALUES_PER_MESSAGE])))
              for k in range(0, len(unique), MAX_VALUES_PER_MESSAGE)]
    return out[:first] + merged + out[first:]


def opinion_height(epoch: int, epoch_length: int) -> int:
    """The height (in progress) from which a validator submits its opinion of ``epoch``
    (PROTOCOL.md §15.5): ``e·L + 1 + min(L div 2, max(0, L - 2))``, half way through the
    epoch, but at least two heights before its end when the epoch has two (``L = 2``: its
    first height). The opinion counts only if committed by the epoch's last height; one
    submitted for the last height reaches only that height's proposer in time (measured:
    with ``L = 2`` and 0.1 s blocks, one opinion of four per epoch committed in it).

    ``epoch`` >= 0 and ``epoch_length`` >= 1 (heights)."""
    return epoch * epoch_length + 1 + min(epoch_length // 2, max(0, epoch_length - 2))


OPINION_PART_ENTRIES = 32  # scores per opinion value: 32 x ~80 bytes fits the 4096-byte value limit


def _opinion_parts(scores: dict[str, int]) -> list[dict[str, int]]:
    """``scores`` (peer id -> ppm) cut into parts of at most :data:`OPINION_PART_ENTRIES`
    peers in peer id order; the ledger merges an author's parts (disjoint peers)."""
    peers = sorted(scores)
    return [{p: scores[p] for p in peers[k:k + OPINION_PART_ENTRIES]}
            for k in range(0, len(peers), OPINION_PART_ENTRIES)]


def _coalesce_persists(actions: list) -> list:
    """One sign-state write per batch: the last (highest) :class:`PersistVote`, at the place
    of the first one.

    The core appends a ``PersistVote`` only for a position above the last one, so the
    last state of a batch covers every signature of the batch (after a restart, nothing
    at or below it is signed differently); writing it before the batch's first send keeps
    "persisted before sent" for all of them. A proposer signing its proposal and its
    prevote in one step syncs once instead of twice.
    """
    persists = [k for k, a in enumerate(actions) if isinstance(a, PersistVote)]
    if len(persists) < 2:
        return actions
    out = [a for a in actions if not isinstance(a, PersistVote)]
    out.insert(persists[0], actions[persists[-1]])
    return out


def _preview(data: bytes, limit: int = 200) -> str:
    """At most ``limit`` characters of ``data`` as text, non-printable ones escaped (a decision
    is any peer's bytes: it must not reach an operator's terminal as control sequences)."""
    text = data.decode("utf-8", errors="replace")
    return printable(text if len(text) <= limit else text[:limit]) + ("…" if len(text) > limit else "")

