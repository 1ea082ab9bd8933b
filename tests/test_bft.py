"""BFT log core: proposer rotation, locking, certificates, evidence, catch-up,
and a seeded randomized simulation (delay, loss, duplication, reordering, a
healing partition, byzantine peers below 1/3 of the weight; on odd seeds every
core starts waiting to hear the network, as a fresh validator does, and on
seeds 3 mod 4 an honest validator loses its log and sign state after the heal
and comes back, never seen to equivocate where no message is lost) checking
safety on every run and liveness after the heal.

Reproduce one simulation seed: ``BFT_SEED=123 pytest tests/test_bft.py -k simulation``.
More seeds: ``BFT_SEEDS=1000``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import os
import random
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chimera.consensus import bft
from chimera.consensus.bft import (
    MAX_COMMITS_PER_RESPONSE,
    MAX_VALUES_PER_MESSAGE,
    PRECOMMIT,
    PREVOTE,
    PROPOSAL,
    BftCommitRequest,
    BftCommitResponse,
    BftConfig,
    BftCore,
    BftEvent,
    BftProposal,
    BftOwnVotes,
    BftOwnVotesRequest,
    BftProposalRequest,
    BftValues,
    BftVote,
    BftVoteRequest,
    Block,
    Broadcast,
    CertifiedCommit,
    Commit,
    Equivocation,
    Evidence,
    FAULT_REASONS,
    PersistVote,
    ProposerSchedule,
    Rejected,
    Send,
    SignState,
    Vote,
    block_hash,
    value_hash,
    verify_commit,
    verify_equivocation,
    vote_bitmap,
)
from chimera.consensus.quorum import CertificateError, QuorumCertificate, SignedVote, WeightTable, sign_vote
from chimera.protocol.errors import LocalProtocolError, MalformedError
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.messages import MESSAGE_TYPES, decode_fields, encode_fields

NET = b"\x42" * 16
IDS = [SigningIdentity(hashlib.sha256(b"bft-test-%d" % i).digest()) for i in range(10)]
FAST = BftConfig(propose_timeout_s=1.0, propose_timeout_delta_s=0.25, prevote_timeout_s=0.5,
                 prevote_timeout_delta_s=0.25, precommit_timeout_s=0.5, precommit_timeout_delta_s=0.25,
                 commit_wait_s=0.05, rebroadcast_interval_s=1.0, catchup_interval_s=0.5, max_batch=8)


def valid_value(value: bytes) -> bool:
    return not value.startswith(b"BAD")


def table_of(ids, weights=None, epoch=0) -> WeightTable:
    weights = weights or [1] * len(ids)
    return WeightTable(epoch=epoch, weights={i.peer_id: w for i, w in zip(ids, weights)})


def roundtrip(msg):
    """Encode to msgpack and decode strictly, as the envelope layer does."""
    wire = msgpack.packb(encode_fields(msg), use_bin_type=True)
    return decode_fields(type(msg), msgpack.unpackb(wire, raw=False))


# ------------------------------------------------------------- proposer rotation


def naive_sequence(weights: dict[str, int], steps: int) -> list[str]:
    priority = {v: 0 for v in weights}
    total = sum(weights.values())
    out = []
    for _ in range(steps):
        for v in priority:
            priority[v] += weights[v]
        best = max(sorted(priority), key=lambda v: priority[v])  # first max = smallest id
        priority[best] -= total
        out.append(best)
    return out


def test_proposer_rotation_is_weighted_deterministic_and_periodic():
    rng = random.Random(7)
    for _ in range(20):
        n = rng.randint(1, 8)
        weights = [rng.randint(1, 9) for _ in range(n)]
        table = table_of(IDS[:n], weights)
        total = table.total
        expected = naive_sequence(table.weights, 3 * total)
        a, b = ProposerSchedule(table, 1), ProposerSchedule(table, 1)
        got = [a.proposer(1, r) for r in range(3 * total)]
        assert got == expected
        # deterministic from the table alone, in any query order; heights shift the sequence by one
        assert [b.proposer(1 + r, 0) for r in reversed(range(3 * total))] == list(reversed(expected))
        assert a.proposer(5, 3) == b.proposer(8, 0) == b.proposer(2, 6)
        # exact weighted frequency over each period
        for period in range(3):
            window = got[period * total:(period + 1) * total]
            assert {v: window.count(v) for v in table.weights} == dict(table.weights)


def test_proposer_ties_go_to_smallest_peer_id_and_table_height_offsets():
    table = table_of(IDS[:4])
    order = sorted(table.weights)
    schedule = ProposerSchedule(table, 10)
    assert [schedule.proposer(10, r) for r in range(4)] == order
    assert schedule.proposer(11, 0) == order[1]
    with pytest.raises(LocalProtocolError):
        schedule.proposer(9, 0)


# --------------------------------------------------------- deterministic cluster


class Cluster:
    """Cores with instant FIFO delivery (for scripted unit tests)."""

    def __init__(self, n=4, weights=None, config=FAST, table=None):
        self.ids = IDS[:n]
        self.table = table or table_of(self.ids, weights)
        self.now = 0.0
        self.cores = {i.peer_id: BftCore(i, NET, self.table, config, 0.0, validate_value=valid_value)
                      for i in self.ids}
        self.log: dict[str, list] = {p: [] for p in self.cores}
        self.commits: dict[str, list[Commit]] = {p: [] for p in self.cores}
        self.down: set[str] = set()
        self.transcript: list[str] = []
        self.lose = None  # (src, dst, action) -> True: that delivery is lost

    def pump(self):
        queue = []
        for pid, core in self.cores.items():
            queue.extend((pid, a) for a in core.take_actions())
        while queue:
            src, action = queue.pop(0)
            self.log[src].append(action)
            self.transcript.append(f"{self.now:6.2f} {src[:6]} {action.describe()}")
            if isinstance(action, Commit):
                self.commits[src].append(action)
            targets = []
            if isinstance(action, Broadcast):
                targets = [(p, action.message) for p in self.cores if p != src]
            elif isinstance(action, Send):
                targets = [(action.peer_id, action.message)]
            for dst, msg in targets:
                if src in self.down or dst in self.down or (self.lose is not None and self.lose(src, dst, action)):
                    continue
                self.cores[dst].on_message(src, roundtrip(msg), self.now)
                queue.extend((dst, a) for a in self.cores[dst].take_actions())

    def advance(self, until):
        while True:
            self.pump()
            deadline = min(c.next_deadline() for p, c in self.cores.items() if p not in self.down)
            if deadline > until:
                self.now = until
                return
            self.now = max(self.now, deadline)
            for pid, core in self.cores.items():
                if pid not in self.down:
                    core.tick(self.now)


def test_happy_path_commits_batched_values_with_verifiable_certificate():
    cluster = Cluster(4)
    first = cluster.cores[cluster.ids[0].peer_id]
    for k in range(20):
        assert first.submit(b"value-%d" % k, 0.0)
    assert not first.submit(b"value-0", 0.0)  # dedupe by hash
    cluster.advance(3.0)
    heights = {p: [c.height for c in cs] for p, cs in cluster.commits.items()}
    assert all(h[:3] == [1, 2, 3] for h in heights.values()), heights
    chains = [[c.block_hash for c in cs[:3]] for cs in cluster.commits.values()]
    assert all(chain == chains[0] for chain in chains)
    committed = []
    for commit in cluster.commits[first.peer_id]:
        verify_commit(commit.commit, cluster.table, NET)
        assert len(commit.block.values) <= FAST.max_batch
        assert list(commit.block.values) == sorted(commit.block.values, key=value_hash)
        committed.extend(commit.block.values)
    assert sorted(committed) == sorted(b"value-%d" % k for k in range(20))  # each exactly once
    assert all(core.pool_size == 0 for core in cluster.cores.values())
    # ordering duty: a PersistVote precedes every broadcast of our own signed vote/proposal
    log = cluster.log[first.peer_id]
    for index, action in enumerate(log):
        if isinstance(action, Broadcast) and isinstance(action.message, (BftVote, BftProposal)):
            assert any(isinstance(a, PersistVote) for a in log[max(0, index - 3):index])


def _core_and_others(n=4, weights=None, me=None):
    table = table_of(IDS[:n], weights)
    schedule = ProposerSchedule(table, 1)
    # a core that proposes neither in round 0 nor 1 nor 2 when possible
    me = me if me is not None else next(
        i for i in IDS[:n] if i.peer_id not in {schedule.proposer(1, r) for r in range(3)}) \
        if n > 3 else IDS[n - 1]
    core = BftCore(me, NET, table, FAST, 0.0, validate_value=valid_value)
    core.tick(0.0)
    core.take_actions()
    by_id = {i.peer_id: i for i in IDS[:n]}
    return core, table, schedule, by_id


def make_proposal(identity, height, round_, block, valid_round=None, epoch=0):
    digest = block_hash(block)
    return BftProposal(height=height, round=round_, block=block, valid_round=valid_round,
                       signed=sign_vote(identity, PROPOSAL, NET, epoch, [height, round_, digest, valid_round]))


def make_vote(identity, vote_type, height, round_, digest, epoch=0):
    return BftVote(vote=Vote(vote_type=vote_type, height=height, round=round_, block_hash=digest,
                             signed=sign_vote(identity, vote_type, NET, epoch, [height, round_, digest])))


def block_of(proposer, values=(), height=1, parent=bytes(32), epoch=0):
    return Block(height=height, epoch=epoch, proposer=proposer.peer_id, parent_hash=parent,
                 values=tuple(sorted(values, key=value_hash)))


def own_votes(actions, vote_type=None):
    return [a.message.vote for a in actions if isinstance(a, Broadcast) and isinstance(a.message, BftVote)
            and (vote_type is None or a.message.vote.vote_type == vote_type)]


def test_locking_and_unlocking_follow_algorithm_1():
    core, table, schedule, by_id = _core_and_others(4)
    others = [by_id[p] for p in table.weights if p != core.peer_id]
    p0, p1, p2 = (by_id[schedule.proposer(1, r)] for r in range(3))
    block_b = block_of(p0, [b"b"])
    hb = block_hash(block_b)
    core.on_message(p0.peer_id, make_proposal(p0, 1, 0, block_b), 0.1)
    assert [(v.vote_type, v.block_hash) for v in own_votes(core.take_actions())] == [(PREVOTE, hb)]
    # exactly 2/3 of the weight (2 of 3 others + us = 3 of 4 > 2/3) -> one other is not enough
    core.on_message(others[0].peer_id, make_vote(others[0], PREVOTE, 1, 0, hb), 0.2)
    assert own_votes(core.take_actions()) == [] and core.locked_round is None
    core.on_message(others[1].peer_id, make_vote(others[1], PREVOTE, 1, 0, hb), 0.2)
    actions = core.take_actions()
    assert [(v.vote_type, v.block_hash) for v in own_votes(actions)] == [(PRECOMMIT, hb)]
    assert (core.locked_round, core.locked_hash) == (0, hb)
    persisted = [a.state for a in actions if isinstance(a, PersistVote)]
    assert persisted[-1].locked_hash == hb and persisted[-1].step == PRECOMMIT
    # everyone else precommits nil: no decision; precommit timeout -> round 1
    for other in others:
        core.on_message(other.peer_id, make_vote(other, PRECOMMIT, 1, 0, None), 0.3)
    core.tick(0.3 + FAST.timeout_s(PRECOMMIT, 0))
    assert core.round == 1
    core.take_actions()
    # round 1: a fresh block C (no valid round) -> locked on B, prevote nil
    block_c = block_of(p1, [b"c"])
    hc = block_hash(block_c)
    core.on_message(p1.peer_id, make_proposal(p1, 1, 1, block_c), 1.0)
    assert [(v.vote_type, v.block_hash) for v in own_votes(core.take_actions())] == [(PREVOTE, None)]
    # nobody else saw a polka either: precommit nil, timeout -> round 2
    for other in others:
        core.on_message(other.peer_id, make_vote(other, PRECOMMIT, 1, 1, None), 1.2)
    core.tick(5.0)
    core.take_actions()
    assert core.round == 2 and core.locked_hash == hb
    # round 2 re-proposes C with vr=1: we wait for the round-1 polka (L28) ...
    core.on_message(p2.peer_id, make_proposal(p2, 1, 2, block_c, valid_round=1), 5.1)
    assert own_votes(core.take_actions()) == []
    for other in others[:2]:
        core.on_message(other.peer_id, make_vote(other, PREVOTE, 1, 1, hc), 5.1)
    assert own_votes(core.take_actions()) == []
    # ... and a polka of round 1 > locked round 0 unlocks: prevote C
    core.on_message(others[2].peer_id, make_vote(others[2], PREVOTE, 1, 1, hc), 5.1)
    assert [(v.vote_type, v.block_hash) for v in own_votes(core.take_actions())] == [(PREVOTE, hc)]
    assert core.valid_round is None or core.valid_round < 2
    # C commits with precommits of round 2 from 3 of 4
    for other in others:
        core.on_message(other.peer_id, make_vote(other, PRECOMMIT, 1, 2, hc), 5.2)
    commits = [a for a in core.take_actions() if isinstance(a, Commit)]
    assert [c.block_hash for c in commits] == [hc] and core.height == 2
    verify_commit(commits[0].commit, table, NET)


def test_polka_after_nil_prevote_moves_the_lock_l36():
    core, table, schedule, by_id = _core_and_others(4)
    others = [by_id[p] for p in table.weights if p != core.peer_id]
    p0 = by_id[schedule.proposer(1, 0)]
    block = block_of(p0, [b"BAD but proposed"])  # invalid for us: we prevote nil
    digest = block_hash(block)
    core.on_message(p0.peer_id, make_proposal(p0, 1, 0, block), 0.1)
    assert [(v.block_hash) for v in own_votes(core.take_actions())] == [None]
    for other in others:
        core.on_message(other.peer_id, make_vote(other, PREVOTE, 1, 0, digest), 0.2)
    # L36 needs valid(v): no lock, no precommit for an invalid block even with a polka
    assert core.locked_round is None and own_votes(core.take_actions()) == []
    # a late proposal after our timeout-propose nil prevote, then a polka: lock + precommit (L36)
    good = block_of(p0, [b"fine"])
    core2, *_ = _core_and_others(4)
    core2.tick(FAST.timeout_s("propose", 0))
    assert {v.block_hash for v in own_votes(core2.take_actions())} == {None}
    core2.on_message(p0.peer_id, make_proposal(p0, 1, 0, good), 1.1)
    assert own_votes(core2.take_actions()) == []
    for other in others:
        core2.on_message(other.peer_id, make_vote(other, PREVOTE, 1, 0, block_hash(good)), 1.2)
    assert [(v.vote_type, v.block_hash) for v in own_votes(core2.take_actions())] == [
        (PRECOMMIT, block_hash(good))]
    assert core2.locked_hash == block_hash(good) and core2.valid_block == good


def test_exactly_two_thirds_does_not_lock_or_commit():
    table = table_of(IDS[:3])
    p0 = next(i for i in IDS[:3] if i.peer_id == ProposerSchedule(table, 1).proposer(1, 0))
    me, third = [i for i in IDS[:3] if i is not p0]
    core = BftCore(me, NET, table, FAST, 0.0)
    core.tick(0.0)
    block = block_of(p0)
    digest = block_hash(block)
    core.on_message(p0.peer_id, make_proposal(p0, 1, 0, block), 0.1)
    core.on_message(p0.peer_id, make_vote(p0, PREVOTE, 1, 0, digest), 0.1)
    core.on_message(p0.peer_id, make_vote(p0, PRECOMMIT, 1, 0, digest), 0.1)
    assert core.locked_round is None and core.height == 1  # 2 of 3 is exactly 2/3: not a quorum
    core.on_message(third.peer_id, make_vote(third, PREVOTE, 1, 0, digest), 0.2)
    assert core.locked_round == 0  # 3 of 3: polka -> lock + precommit, and with p0's precommit...
    assert core.height == 1  # ... still only 2 of 3 precommits
    core.on_message(third.peer_id, make_vote(third, PRECOMMIT, 1, 0, digest), 0.3)
    assert core.height == 2


def test_pool_is_bounded_and_commit_cache_falls_back_to_the_store():
    config = replace(FAST, max_pool=3, commit_cache=2)
    table = table_of(IDS[:1])
    solo = BftCore(IDS[0], NET, table, config, 0.0)
    assert [solo.submit(b"%d" % k, 0.0) for k in range(4)] == [True, True, True, False]
    with pytest.raises(LocalProtocolError):
        solo.submit(b"x" * (config.max_value_bytes + 1), 0.0)
    now = 0.0
    while solo.height < 6:  # a single validator decides alone
        now = solo.next_deadline()
        solo.tick(now)
    commits = [a for a in solo.take_actions() if isinstance(a, Commit)]
    assert [c.height for c in commits] == [1, 2, 3, 4, 5] and solo.pool_size == 0
    assert solo.submit(b"4", now) and not solo.submit(b"0", now)  # committed values stay deduped
    solo.on_message(IDS[1].peer_id, BftCommitRequest(from_height=1), now)
    assert [a.describe() for a in solo.take_actions()][-1].startswith("serve-commits")
    solo.on_message(IDS[2].peer_id, BftCommitRequest(from_height=4), now)
    response = solo.take_actions()[-1].message
    assert [c.height for c in response.commits] == [4, 5] and response.latest_height == 5


def test_round_skip_needs_more_than_one_third():
    core, table, schedule, by_id = _core_and_others(4)
    others = [by_id[p] for p in table.weights if p != core.peer_id]
    core.on_message(others[0].peer_id, make_vote(others[0], PREVOTE, 1, 3, None), 0.1)
    assert core.round == 0  # 1 of 4 is not more than 1/3
    core.on_message(others[1].peer_id, make_vote(others[1], PRECOMMIT, 1, 7, None), 0.1)
    assert core.round == 3  # 2 of 4 reached round >= 3
    events = [a.describe() for a in core.take_actions() if isinstance(a, BftEvent)]
    assert any(e.startswith("round_skip h=1") for e in events)


def test_golden_transcript_proposer_down_then_round_1(golden):
    cluster = Cluster(4)
    order = [ProposerSchedule(cluster.table, 1).proposer(1, r) for r in range(2)]
    cluster.down.add(order[0])  # the round-0 proposer is down: timeouts, nil votes, round 1
    submitter = next(p for p in cluster.cores if p not in order)
    cluster.cores[submitter].submit(b"hello", 0.0)
    cluster.cores[submitter].submit(b"world", 0.0)
    cluster.advance(1.52)  # timeout propose 1.0 + timeout precommit 0.5, then round 1 commits
    assert all(len(cluster.commits[p]) == 1 for p in cluster.cores if p != order[0])
    golden("bft_proposer_down.txt", "\n".join(cluster.transcript) + "\n")


# --------------------------------------------------------------- certificates


def _committed_cluster(n=4, weights=None):
    cluster = Cluster(n, weights)
    cluster.cores[IDS[0].peer_id].submit(b"payload", 0.0)
    cluster.advance(0.5)
    commit = cluster.commits[IDS[0].peer_id][0].commit
    return cluster, commit


def test_verify_commit_accepts_good_and_rejects_tampered_insufficient_wrong_epoch():
    cluster, commit = _committed_cluster(4, [1, 1, 1, 1])
    table = cluster.table
    verify_commit(commit, table, NET)
    verify_commit(roundtrip(BftCommitResponse(commits=(commit,), latest_height=1)).commits[0], table, NET)
    bad = [
        replace(commit, block=replace(commit.block, values=(b"forged",))),  # tampered content
        replace(commit, round=commit.round + 1),  # tampered round
        replace(commit, certificate=QuorumCertificate(votes=commit.certificate.votes[:2])),  # 2 of 4
        replace(commit, certificate=QuorumCertificate(
            votes=commit.certificate.votes[:2] + commit.certificate.votes[:1])),  # duplicate voter
        replace(commit, certificate=QuorumCertificate(votes=(
            SignedVote(voter=commit.certificate.votes[0].voter, signature=bytes(64)),)
            + commit.certificate.votes[1:]))  # bad signature
    ]
    for forged in bad:
        with pytest.raises(CertificateError):
            verify_commit(forged, table, NET)
    with pytest.raises(CertificateError):  # same validators, next epoch
        verify_commit(commit, WeightTable(epoch=1, weights=dict(table.weights)), NET)
    with pytest.raises(CertificateError):  # another network
        verify_commit(commit, table, b"\x00" * 16)
    with pytest.raises(CertificateError):  # a weight table in which these voters hold too little
        heavy = dict(table.weights)
        heavy[IDS[9].peer_id] = 100
        verify_commit(commit, WeightTable(epoch=0, weights=heavy), NET)
    stranger = sign_vote(IDS[9], PRECOMMIT, NET, 0, [1, commit.round, block_hash(commit.block)])
    with pytest.raises(CertificateError):  # unknown voter
        verify_commit(replace(commit, certificate=QuorumCertificate(
            votes=commit.certificate.votes + (stranger,))), table, NET)


def test_equivocation_produces_verifiable_evidence_once():
    core, table, schedule, by_id = _core_and_others(4)
    liar = next(by_id[p] for p in table.weights if p != core.peer_id)
    a = make_vote(liar, PREVOTE, 1, 0, b"\x01" * 32)
    b = make_vote(liar, PREVOTE, 1, 0, None)
    core.on_message(liar.peer_id, a, 0.1)
    core.on_message(liar.peer_id, b, 0.1)
    core.on_message(liar.peer_id, b, 0.1)
    core.on_message(liar.peer_id, a, 0.1)
    evidence = [x for x in core.take_actions() if isinstance(x, Evidence)]
    assert len(evidence) == 1
    ev = evidence[0].equivocation
    wire = decode_fields(Equivocation, msgpack.unpackb(msgpack.packb(encode_fields(ev))))
    assert verify_equivocation(wire, table, NET)
    assert not verify_equivocation(Equivocation(first=a.vote, second=a.vote), table, NET)
    assert not verify_equivocation(ev, WeightTable(epoch=3, weights=dict(table.weights)), NET)
    assert core.drops["equivocation"] == 1 and core.drops["duplicate"] >= 1


def test_accepted_votes_are_the_fresh_valid_votes_of_others_each_once():
    """What both drivers record as ``vote_ok`` observations (PROTOCOL.md §14.13)."""
    core, table, schedule, by_id = _core_and_others(4)
    other, third = [by_id[p] for p in table.weights if p != core.peer_id][:2]
    prevote = make_vote(other, PREVOTE, 1, 0, None)
    core.on_message(other.peer_id, prevote, 0.1)
    core.on_message(other.peer_id, prevote, 0.1)  # duplicate
    core.on_message(third.peer_id, make_vote(other, PRECOMMIT, 1, 0, None), 0.1)  # relayed: the voter's
    forged = replace(make_vote(third, PRECOMMIT, 1, 0, None).vote,
                     signed=SignedVote(voter=third.peer_id, signature=bytes(64)))
    core.on_message(third.peer_id, BftVote(vote=forged), 0.1)  # rejected
    core.on_message(IDS[9].peer_id, make_vote(IDS[9], PREVOTE, 1, 0, None), 0.1)  # not a validator
    core.on_message(third.peer_id, make_vote(third, PREVOTE, 1, 0, None), 0.1)
    core.on_message(third.peer_id, make_vote(third, PREVOTE, 1, 0, b"\x01" * 32), 0.1)  # equivocation
    assert core.take_accepted_votes() == {other.peer_id: 2, third.peer_id: 1}
    assert core.take_accepted_votes() == {}  # taken
    reasons = {(a.peer_id, a.reason) for a in core.take_actions() if isinstance(a, Rejected)}
    assert reasons == {(third.peer_id, "bad_signature"), (IDS[9].peer_id, "unknown_voter")}
    assert {r for _, r in reasons} <= FAULT_REASONS
    # over whole heights: every other validator is credited, never ourselves
    cluster = Cluster(4)
    cluster.cores[cluster.ids[0].peer_id].submit(b"value", 0.0)
    cluster.advance(1.0)
    for pid, c in cluster.cores.items():
        counts = c.take_accepted_votes()
        assert set(counts) == set(cluster.cores) - {pid} and all(n >= 1 for n in counts.values())


def test_a_conflicting_proposal_is_the_signers_fault_not_the_relays():
    core, table, schedule, by_id = _core_and_others(4)
    proposer = by_id[schedule.proposer(1, 0)]
    relay = next(by_id[p] for p in table.weights if p not in (core.peer_id, proposer.peer_id))
    core.on_message(proposer.peer_id, make_proposal(proposer, 1, 0, block_of(proposer, [b"a"])), 0.1)
    core.on_message(relay.peer_id, make_proposal(proposer, 1, 0, block_of(proposer, [b"b"])), 0.1)
    rejected = [a for a in core.take_actions() if isinstance(a, Rejected)]
    assert [(a.peer_id, a.reason) for a in rejected] == [(proposer.peer_id, "conflicting_proposal")]


def test_a_core_with_a_sign_floor_signs_nothing_below_it_and_follows_the_others():
    """A validator whose sign state was lost sits out the height after its last commit (it may
    have signed there): no proposal, no vote, no PersistVote; the others commit it, it commits
    it from their precommits, and it signs again from the floor on (PROTOCOL.md §14.12)."""
    cluster = Cluster(4)
    lost = next(i for i in cluster.ids if i.peer_id != ProposerSchedule(cluster.table, 1).proposer(1, 0))
    cluster.cores[lost.peer_id] = BftCore(lost, NET, cluster.table, FAST, 0.0, validate_value=valid_value,
                                          sign_from_height=2)
    for core in cluster.cores.values():
        core.submit(b"value", 0.0)
    cluster.advance(3.0)
    assert all([c.height for c in cs][:2] == [1, 2] for cs in cluster.commits.values()), cluster.commits
    mine = cluster.log[lost.peer_id]
    signed = [a.state.height for a in mine if isinstance(a, PersistVote)]
    assert signed and min(signed) == 2  # nothing at height 1, votes from height 2 on
    refused = [a for a in mine if isinstance(a, BftEvent) and a.kind == "sign_refused"]
    assert refused and all("below height 2" in a.detail for a in refused)


def test_a_commit_carrying_a_precommit_we_do_not_remember_raises_the_sign_floor():
    """A validator that lost its log and its sign state together catches up from certified
    commits. One whose certificate carries its own precommit proves a signature it does not
    remember: it signs nothing below that height + 2 + the margin (PROTOCOL.md §14.12), each
    such commit raising the floor again; certificates without its precommit, and any its sign
    state holds, change nothing."""
    cluster = Cluster(4)
    for core in cluster.cores.values():
        core.submit(b"value", 0.0)
    cluster.advance(3.0)
    me, other = cluster.ids[1], cluster.ids[2]
    commits = [c.commit for c in cluster.commits[me.peer_id]][:MAX_COMMITS_PER_RESPONSE]
    assert len(commits) >= 5
    mine = [c.block.height for c in commits if me.peer_id in c.certificate.voters()]
    assert mine, "the cluster never counted this validator's precommit"
    # the same validator, its log and sign state lost: it learns its past from the commits
    amnesiac = BftCore(me, NET, cluster.table, FAST, cluster.now, validate_value=valid_value)
    amnesiac.on_message(other.peer_id, roundtrip(BftCommitResponse(commits=tuple(commits),
                                                                   latest_height=len(commits))), cluster.now)
    actions = amnesiac.take_actions()
    assert [a.height for a in actions if isinstance(a, Commit)] == [c.block.height for c in commits]
    assert amnesiac.sign_from_height == max(mine) + 2 + FAST.double_sign_margin_heights
    risks = [a for a in actions if isinstance(a, BftEvent) and a.kind == "double_sign_risk"]
    assert [r.height for r in risks] == mine  # (one per commit that raised the floor)
    assert not [a for a in actions if isinstance(a, (PersistVote, Broadcast)) and
                (not isinstance(a, Broadcast) or isinstance(a.message, (BftVote, BftProposal)))]
    # a validator whose certificates never carry its precommit learns nothing to fear
    others = [c for c in commits if me.peer_id not in c.certificate.voters()]
    if others and others[0].block.height == 1:
        clean = BftCore(me, NET, cluster.table, FAST, cluster.now, validate_value=valid_value)
        clean.on_message(other.peer_id, BftCommitResponse(commits=(others[0],), latest_height=1), cluster.now)
        assert clean.sign_from_height == 1
    # the check turned off (the operator vouches that the key signed nothing it lost): no floor
    trusting = BftCore(me, NET, cluster.table, replace(FAST, double_sign_check=False), cluster.now,
                       validate_value=valid_value)
    trusting.on_message(other.peer_id, BftCommitResponse(commits=tuple(commits), latest_height=len(commits)),
                        cluster.now)
    assert trusting.height == len(commits) + 1 and trusting.sign_from_height == 1
    # the live validator itself, whose sign state holds its precommits: no floor
    assert cluster.cores[me.peer_id].sign_from_height == 1
    with pytest.raises(LocalProtocolError, match="double_sign_margin_heights"):
        BftConfig(double_sign_margin_heights=-1)


def test_a_core_awaiting_the_network_signs_nothing_before_hearing_it():
    """await_network (a validator without a sign state, PROTOCOL.md §14.12): a fresh network
    of such cores starts as fast as any (their commit requests of height 1 are heard at
    once); one whose log and sign state were lost while the others went on signs nothing at
    its stale height 1: it catches up first, and the certificates carrying its forgotten
    precommits raise its floor before its first signature."""
    def first_signatures(actions):
        return [a.state.height for a in actions if isinstance(a, PersistVote)]

    cluster = Cluster(4)
    for pid in cluster.cores:
        cluster.cores[pid] = BftCore(next(i for i in cluster.ids if i.peer_id == pid), NET, cluster.table, FAST,
                                     0.0, validate_value=valid_value, await_network=True)
    cluster.advance(1.0)
    assert all([c.height for c in cs][:3] == [1, 2, 3] for cs in cluster.commits.values())
    for pid, actions in cluster.log.items():
        kinds = [a.kind for a in actions if isinstance(a, BftEvent)]
        assert "network_heard" in kinds and not cluster.cores[pid].awaiting_network
        first_sign = next(k for k, a in enumerate(actions) if isinstance(a, PersistVote))
        heard = next(k for k, a in enumerate(actions) if isinstance(a, BftEvent) and a.kind == "network_heard")
        assert heard < first_sign
    me = cluster.ids[3]
    mine = [c.height for c in cluster.commits[me.peer_id] if me.peer_id in c.commit.certificate.voters()]
    assert mine
    # its disk replaced: a fresh core at height 1 while the others are far ahead
    cluster.log[me.peer_id] = []
    cluster.cores[me.peer_id] = amnesiac = BftCore(me, NET, cluster.table, FAST, cluster.now,
                                                   validate_value=valid_value, await_network=True)
    start = cluster.now
    cluster.advance(start + 3.0)
    signed = first_signatures(cluster.log[me.peer_id])
    assert signed, "it never signed again"
    assert min(signed) >= max(mine) + 2 + FAST.double_sign_margin_heights
    messages = [a.message for a in cluster.log[me.peer_id] if isinstance(a, (Broadcast, Send))]
    own = [m.vote.height for m in messages if isinstance(m, BftVote) and m.vote.voter == me.peer_id] + \
        [m.height for m in messages if isinstance(m, BftProposal) and amnesiac.proposer(m.height, m.round) == me.peer_id]
    assert own and min(own) >= min(signed)  # what it sent it signed from its floor on (others' are relays)
    assert amnesiac.height >= cluster.cores[cluster.ids[0].peer_id].height - 1
    # one of four equal validators (a byzantine one, say) cannot end the wait alone: 1/4 without
    # us, 1/2 with us; a second one can (1/2 without us)
    waiting = BftCore(me, NET, cluster.table, FAST, 0.0, await_network=True)
    waiting.tick(0.0)
    waiting.on_message(cluster.ids[0].peer_id, BftCommitRequest(from_height=1), 0.0)
    assert waiting.awaiting_network and not [a for a in waiting.take_actions() if isinstance(a, PersistVote)]
    waiting.on_message(cluster.ids[1].peer_id, BftCommitRequest(from_height=1), 0.0)
    assert not waiting.awaiting_network
    # and it tells every validator at once (those still waiting need not wait for its first vote)
    told = [a.peer_id for a in waiting.take_actions() if isinstance(a, Send) and isinstance(a.message, BftCommitRequest)]
    assert sorted(told) == sorted(i.peer_id for i in cluster.ids if i.peer_id != me.peer_id)
    # unheard, it asks again after 0.25 s, the interval doubling up to rebroadcast_interval_s (1 s)
    alone, now, asked_at = BftCore(me, NET, cluster.table, FAST, 0.0, await_network=True), 0.0, []
    while now < 4.0:
        alone.tick(now)
        if any(isinstance(a, Send) and isinstance(a.message, BftCommitRequest) for a in alone.take_actions()):
            asked_at.append(now)
        now = alone.next_deadline()
    assert asked_at == [0.0, 0.25, 0.75, 1.75, 2.75, 3.75] and alone.awaiting_network
    # three equal validators whose first requests are lost in a ring (A to B, B to C, C to A):
    # each hears one other at first and needs both; asking every validator again (not only the
    # unheard ones) gets each heard by all, and the network starts
    ring = Cluster(3)
    for ident in ring.ids:
        ring.cores[ident.peer_id] = BftCore(ident, NET, ring.table, FAST, 0.0, validate_value=valid_value,
                                            await_network=True)
    a, b, c = (i.peer_id for i in ring.ids)
    ring.lose = lambda src, dst, action: ring.now == 0.0 and (src, dst) in ((a, b), (b, c), (c, a))
    ring.advance(2.0)
    assert not any(core.awaiting_network for core in ring.cores.values())
    assert all(len(commits) >= 3 for commits in ring.commits.values())
    # two equal validators: each waits for the other (its own 1/2 is not enough), and hears its
    # commit request
    pair = table_of([me, cluster.ids[0]])
    first, second = (BftCore(i, NET, pair, FAST, 0.0, await_network=True) for i in (me, cluster.ids[0]))
    first.tick(0.0)
    asks = [a for a in first.take_actions() if isinstance(a, Send)]
    assert first.awaiting_network and [(a.peer_id, a.message.from_height) for a in asks] == [(cluster.ids[0].peer_id, 1)]
    second.on_message(me.peer_id, roundtrip(asks[0].message), 0.0)
    assert not second.awaiting_network
    # a lone validator hears itself: no wait
    lone = BftCore(me, NET, table_of([me]), FAST, 0.0, await_network=True)
    lone.tick(0.0)
    assert not lone.awaiting_network and any(isinstance(a, Commit) for a in lone.take_actions())
    with pytest.raises(LocalProtocolError, match="await_network_ask_interval_s"):
        BftConfig(await_network_ask_interval_s=0)


def test_an_amnesiac_recovers_the_votes_it_signed_at_the_height_the_network_is_deciding():
    """A validator whose precommits never made a certificate (they reached nobody) prevotes at
    the height its network is deciding, crashes and loses its disk; another validator is down,
    so that height waits for it. Back, it finds no precommit of it in the commits it fetches,
    yet it prevoted at that height: it asks the validators for the votes of it they hold
    (bft_own_votes_request, PROTOCOL.md §14.12), adopts that prevote as its sign state before
    signing anything there, and the height commits with nobody seeing it equivocate."""
    cluster = Cluster(4)
    me, gone = cluster.ids[3], cluster.ids[0]
    other = cluster.cores[cluster.ids[1].peer_id]

    def precommit_of_me(src, action):
        return src == me.peer_id and isinstance(action, (Broadcast, Send)) and \
            isinstance(action.message, BftVote) and action.message.vote.vote_type == PRECOMMIT

    cluster.lose = lambda src, dst, action: precommit_of_me(src, action)
    cluster.advance(1.0)
    assert not any(me.peer_id in c.commit.certificate.voters() for c in cluster.commits[other.peer_id])
    cluster.down.add(gone.peer_id)  # from now on every height needs us
    crashed = []  # our last message before the crash: a prevote at the height the others are at

    def lose(src, dst, action):
        if src != me.peer_id:
            return False
        if crashed:
            return action is not crashed[0]
        msg = getattr(action, "message", None)
        if isinstance(action, Broadcast) and isinstance(msg, BftVote) and msg.vote.vote_type == PREVOTE \
                and msg.vote.height == other.height:
            crashed.append(action)
            return False
        return precommit_of_me(src, action)

    cluster.lose = lose
    while not crashed:
        cluster.advance(cluster.now + 0.01)
    prevote = crashed[0].message.vote
    height = prevote.height
    cluster.advance(cluster.now + 0.5)
    assert other.height == height  # the height waits for us
    cluster.lose = None
    cluster.log[me.peer_id] = []
    cluster.cores[me.peer_id] = amnesiac = BftCore(me, NET, cluster.table, FAST, cluster.now,
                                                   validate_value=valid_value, await_network=True)
    cluster.advance(cluster.now + 5.0)
    log = cluster.log[me.peer_id]
    assert amnesiac.sign_from_height == 1  # no certificate betrayed it
    persisted = [a.state for a in log if isinstance(a, PersistVote)]
    assert (persisted[0].height, persisted[0].round, persisted[0].step, persisted[0].block_hash) == \
        (height, prevote.round, PREVOTE, prevote.block_hash)  # adopted before anything was signed
    recovered = [a for a in log if isinstance(a, BftEvent) and a.kind == "own_votes_recovered"]
    assert len(recovered) == 1 and recovered[0].height == height
    asks = [a for a in log if isinstance(a, Send) and isinstance(a.message, BftOwnVotesRequest)]
    assert {a.peer_id for a in asks} == {i.peer_id for i in cluster.ids} - {me.peer_id}
    assert other.height > height + 1 and amnesiac.height == other.height
    assert not any(isinstance(a, Evidence) for actions in cluster.log.values() for a in actions)
    # a validator answers a request once per height, only a validator, only at its height
    responder = cluster.cores[cluster.ids[2].peer_id]
    outsider = SigningIdentity(hashlib.sha256(b"outsider").digest())
    for sender, height_asked in ((me.peer_id, responder.height), (me.peer_id, responder.height),
                                 (outsider.peer_id, responder.height)):
        responder.on_message(sender, BftOwnVotesRequest(height=height_asked), cluster.now)
    answers = [a for a in responder.take_actions() if isinstance(a, Send) and isinstance(a.message, BftOwnVotes)]
    assert len(answers) == 1 and responder.drops["own_votes_unanswered"] == 2
    # an answer nobody asked for is dropped
    amnesiac.on_message(other.peer_id, BftOwnVotes(height=amnesiac.height, votes=()), cluster.now)
    assert amnesiac.drops["unexpected_own_votes"] == 1


def test_bad_inputs_are_dropped_and_reported_never_crash():
    core, table, schedule, by_id = _core_and_others(4)
    other = next(by_id[p] for p in table.weights if p != core.peer_id)
    third = next(by_id[p] for p in table.weights if p not in (core.peer_id, other.peer_id))
    vote = make_vote(other, PREVOTE, 1, 0, None)
    bad_sig = SignedVote(voter=other.peer_id, signature=bytes(64))
    forged = BftVote(vote=replace(make_vote(other, PRECOMMIT, 1, 0, None).vote, signed=bad_sig))
    relayed = BftVote(vote=replace(vote.vote, signed=bad_sig))  # another peer passes on a forgery
    stranger = make_vote(IDS[9], PREVOTE, 1, 0, None)
    p0 = by_id[schedule.proposer(1, 0)]
    not_proposer = next(i for i in IDS[:4] if i.peer_id != p0.peer_id)
    wrong = make_proposal(not_proposer, 1, 0, block_of(not_proposer))
    core.on_message(other.peer_id, forged, 0.1)
    core.on_message(third.peer_id, relayed, 0.1)
    core.on_message(IDS[9].peer_id, stranger, 0.1)
    core.on_message(not_proposer.peer_id, wrong, 0.1)
    core.on_message(other.peer_id, BftValues(values=(b"BAD value", b"good")), 0.1)
    core.on_message(other.peer_id, vote, 0.1)
    core.on_message(other.peer_id, vote, 0.1)
    reasons = [a.reason for a in core.take_actions() if isinstance(a, Rejected)]
    assert reasons == ["bad_signature", "bad_signature", "unknown_voter", "wrong_proposer", "invalid_value"]
    assert core.drops["duplicate"] == 1 and core.pool_size == 1
    # the strict codec rejects malformed wire maps with MalformedError only
    wire = encode_fields(vote)
    for broken in ({**wire, "extra": 1}, {"vote": {**wire["vote"], "vote_type": "maybe"}},
                   {"vote": {**wire["vote"], "round": -1}}, {"vote": {**wire["vote"], "block_hash": b"x"}}):
        with pytest.raises(MalformedError):
            decode_fields(BftVote, broken)


def test_messages_roundtrip_and_are_registered():
    cluster, commit = _committed_cluster()
    kinds = {k for k in MESSAGE_TYPES if k.startswith("bft_")}
    assert kinds == {"bft_proposal", "bft_vote", "bft_values", "bft_commit_request", "bft_commit_response",
                     "bft_proposal_request", "bft_vote_request", "bft_own_votes_request", "bft_own_votes"}
    samples = [BftValues(values=(b"a", b"b")), BftCommitRequest(from_height=3),
               BftOwnVotesRequest(height=4),
               BftOwnVotes(height=4, votes=(make_vote(IDS[0], PREVOTE, 4, 0, None).vote,)),
               BftProposalRequest(height=2, round=1),
               BftVoteRequest(height=2, round=1, prevotes=b"\x05\x01", precommits=b"\x00\x00"),
               BftCommitResponse(commits=(commit,), latest_height=1),
               make_vote(IDS[0], PRECOMMIT, 1, 2, b"\x07" * 32),
               make_proposal(IDS[0], 2, 1, block_of(IDS[0], [b"x"], height=2), valid_round=0)]
    for msg in samples:
        assert roundtrip(msg) == msg
        assert msg.describe() and "\n" not in msg.describe()
    with pytest.raises(MalformedError):  # valid_round must be below round
        decode_fields(BftProposal, {**encode_fields(samples[-1]), "valid_round": 1})


_wire = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.binary(max_size=40) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["vote", "signed", "voter", "signature", "height", "round", "block", "values",
                         "commits", "vote_type", "block_hash", "latest_height", "from_height", "prevotes",
                         "precommits", "votes"]) | st.text(max_size=5),
        inner, max_size=6),
    max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(k for k in MESSAGE_TYPES if k.startswith("bft_"))), _wire)
def test_decoders_raise_only_malformed_on_arbitrary_input(kind, value):
    try:
        decode_fields(MESSAGE_TYPES[kind], value)
    except MalformedError:
        pass


def test_restart_never_signs_conflicting_votes_and_keeps_lock():
    table = table_of(IDS[:4])
    schedule = ProposerSchedule(table, 1)
    me = next(i for i in IDS[:4] if i.peer_id not in {schedule.proposer(1, r) for r in range(3)})
    locked = b"\x05" * 32
    state = SignState(height=1, round=2, step=PRECOMMIT, block_hash=locked, locked_round=2, locked_hash=locked)
    state = decode_fields(SignState, msgpack.unpackb(msgpack.packb(encode_fields(state))))
    core = BftCore(me, NET, table, FAST, 0.0, sign_state=state, validate_value=valid_value)
    core.tick(0.0)
    assert core.round == 2 and core.locked_hash == locked
    core.take_actions()
    p2 = next(i for i in IDS[:4] if i.peer_id == schedule.proposer(1, 2))
    core.on_message(p2.peer_id, make_proposal(p2, 1, 2, block_of(p2)), 0.1)
    actions = core.take_actions()
    # a prevote of round 2 would go back behind the persisted precommit: refused; the precommit
    # signed before the restart is sent again instead (the same statement: nothing conflicts)
    assert [(v.vote_type, v.round, v.block_hash) for v in own_votes(actions)] == [(PRECOMMIT, 2, locked)]
    assert any(isinstance(a, BftEvent) and a.kind == "sign_refused" for a in actions)
    assert not any(isinstance(a, PersistVote) for a in actions)
    # round 3: signs again, still locked on the persisted hash -> prevote nil for another block
    others = [i for i in IDS[:4] if i.peer_id != me.peer_id]
    for other in others:
        core.on_message(other.peer_id, make_vote(other, PRECOMMIT, 1, 3, None), 0.2)
    core.take_actions()
    assert core.round == 3
    p3 = next(i for i in IDS[:4] if i.peer_id == schedule.proposer(1, 3))
    if p3.peer_id != me.peer_id:
        core.on_message(p3.peer_id, make_proposal(p3, 1, 3, block_of(p3, [b"z"])), 0.3)
        assert [(v.vote_type, v.block_hash) for v in own_votes(core.take_actions())] == [(PREVOTE, None)]


def test_lagging_core_catches_up_verifying_commits_and_rejects_forged_ones():
    cluster = Cluster(5)
    late = IDS[4].peer_id
    cluster.down.add(late)
    for k in range(30):
        cluster.cores[IDS[k % 4].peer_id].submit(b"v%d" % k, 0.0)
    cluster.advance(3.0)
    leader_height = cluster.cores[IDS[0].peer_id].height
    assert leader_height >= 5 and cluster.cores[late].height == 1
    # a forged commit (signed by the forger alone) is refused
    forger = IDS[3]
    block = block_of(forger, [b"evil"])
    cert = QuorumCertificate(votes=(sign_vote(forger, PRECOMMIT, NET, 0, [1, 0, block_hash(block)]),))
    lagging = cluster.cores[late]
    lagging.on_message(forger.peer_id, BftCommitResponse(
        commits=(CertifiedCommit(round=0, block=block, certificate=cert),), latest_height=9), 3.0)
    assert [a.reason for a in lagging.take_actions() if isinstance(a, Rejected)] == ["bad_certificate"]
    assert lagging.height == 1
    cluster.down.clear()
    cluster.advance(8.0)
    chains = {p: [c.block_hash for c in cs] for p, cs in cluster.commits.items()}
    ref = chains[IDS[0].peer_id]
    assert chains[late][:leader_height - 1] == ref[:leader_height - 1]
    assert any("via catch-up" in a.describe() for a in cluster.log[late])
    assert all(core.height >= leader_height for core in cluster.cores.values())


def test_weight_table_change_at_height_boundary():
    cluster, _ = _committed_cluster(4)
    new = WeightTable(epoch=1, weights={i.peer_id: w for i, w in zip(IDS[:4], [3, 1, 1, 1])})
    switch = {core.height + 1 for core in cluster.cores.values()}
    assert len(switch) == 1  # instant delivery: all cores wait at the same height
    switch = switch.pop()
    for core in cluster.cores.values():
        core.set_weight_table(switch, new)
        with pytest.raises(LocalProtocolError):
            core.set_weight_table(1, new)
    cluster.advance(1.5)
    commits = cluster.commits[IDS[0].peer_id]
    assert len(commits) > switch
    for c in commits:
        assert c.block.epoch == (1 if c.height >= switch else 0)
        verify_commit(c.commit, new if c.height >= switch else cluster.table, NET)
    # the proposer sequence restarts from zero priorities at the switch height
    schedule = ProposerSchedule(new, switch)
    assert [c.block.proposer for c in commits[switch - 1:switch + 5]] == [
        schedule.proposer(h, 0) for h in range(switch, switch + 6)]


# ------------------------------------- value pool quota, lock after a store gap, follow-up cap


def test_a_flood_of_gossiped_values_leaves_room_for_our_own_and_other_senders_values():
    """One sender gossiping values as fast as it can fills only its quota of the pool: a value
    submitted here and an honest peer's gossiped value are still pooled."""
    core, table, _, by_id = _core_and_others(4)
    flooder = IDS[8].peer_id  # a member holding the join token, not a validator
    for k in range(FAST.max_pool // MAX_VALUES_PER_MESSAGE + 2):
        core.on_message(flooder, BftValues(values=tuple(b"flood-%d-%d" % (k, i)
                                                        for i in range(MAX_VALUES_PER_MESSAGE))), 0.1)
    assert core.pool_size == FAST.max_pool_per_sender
    assert core.drops["pool_sender_full"] > 0 and not any(isinstance(a, Rejected) for a in core.take_actions())
    assert core.submit(b"evidence or opinion of ours", 0.2)
    honest = next(p for p in table.weights if p != core.peer_id)
    core.on_message(honest, BftValues(values=(b"an honest peer's value",)), 0.3)
    assert core.pool_size == FAST.max_pool_per_sender + 2


def test_a_full_pool_drops_the_largest_senders_oldest_value_never_our_own():
    config = replace(FAST, max_pool=8, max_pool_per_sender=3)
    core = BftCore(IDS[0], NET, table_of(IDS[:1]), config, 0.0, validate_value=valid_value)  # decides alone
    a, b, c, d = (IDS[k].peer_id for k in (6, 7, 8, 9))
    for sender in (a, b):
        core.on_message(sender, BftValues(values=tuple(b"%s-%d" % (sender[:4].encode(), i) for i in range(5))),
                        0.1)
    assert core.pool_size == 6 and core.drops["pool_sender_full"] == 4
    assert core.submit(b"own-0", 0.1) and core.submit(b"own-1", 0.1)  # pool full (8)
    core.on_message(c, BftValues(values=(b"c-0",)), 0.2)  # c holds fewer: a's oldest value goes
    assert core.pool_size == 8 and core.drops["pool_evicted"] == 1
    assert value_hash(b"%s-0" % a[:4].encode()) not in core._pool
    core.on_message(c, BftValues(values=(b"c-1", b"c-2")), 0.2)  # b's oldest, then (2 vs 2) dropped
    assert core.drops["pool_evicted"] == 2 and core.drops["pool_full"] == 1
    for k in range(2, 6):  # our own submissions push the gossiped values out, never each other
        assert core.submit(b"own-%d" % k, 0.3)
    assert core.submit(b"own-6", 0.3) and core.submit(b"own-7", 0.3)
    assert not core.submit(b"own-8", 0.3) and core.drops["pool_full"] == 2
    assert sorted(core._pool.values()) == [b"own-%d" % k for k in range(8)]
    core.on_message(d, BftValues(values=(b"d-0",)), 0.4)  # nothing gossiped left to make room
    assert core.pool_size == 8 and core.drops["pool_full"] == 3
    assert core.drops["pool_evicted"] == 8
    while core.height == 1:  # our 8 values are committed (max_batch 8): the pool is empty again
        core.tick(core.next_deadline())
    assert core.pool_size == 0
    core.on_message(a, BftValues(values=tuple(b"late-%d" % i for i in range(4))), 5.0)
    assert core.pool_size == 3  # the quota counts the values a sender holds now


def test_a_core_that_catches_up_to_its_sign_state_height_keeps_the_lock_signed_there():
    """The store lost commits the sign state is past (store_behind_sign_state): the core starts
    below its last signature, fetches the commits, and at the signed height it is in the signed
    round and locked as it was: a proposal of another block in a later round gets a nil prevote."""
    table = table_of(IDS[:4])
    schedule = ProposerSchedule(table, 1)
    me = next(i for i in IDS[:4] if i.peer_id not in {schedule.proposer(2, r) for r in range(2)})
    others = [i for i in IDS[:4] if i is not me]
    c1 = block_of(others[0])
    d1 = block_hash(c1)
    commit1 = CertifiedCommit(round=0, block=c1, certificate=QuorumCertificate(votes=tuple(sorted(
        (sign_vote(i, PRECOMMIT, NET, 0, [1, 0, d1]) for i in IDS[:4]), key=lambda v: v.voter))))
    x = block_of(others[0], [b"x"], height=2, parent=d1)
    y = block_of(others[1], [b"y"], height=2, parent=d1)
    state = SignState(height=2, round=0, step=PRECOMMIT, block_hash=block_hash(x),
                      locked_round=0, locked_hash=block_hash(x))
    core = BftCore(me, NET, table, replace(FAST, commit_wait_s=0.0), 0.0, height=1, sign_state=state,
                   validate_value=valid_value)
    core.on_message(others[0].peer_id, BftCommitResponse(commits=(commit1,), latest_height=1), 0.0)
    core.tick(0.01)
    assert (core.height, core.round, core.locked_round, core.locked_hash) == (2, 0, 0, block_hash(x))
    for other in others[:2]:  # more than 1/3 moved to round 1
        core.on_message(other.peer_id, make_vote(other, PREVOTE, 2, 1, None), 0.02)
    assert core.round == 1
    core.take_actions()
    p1 = next(i for i in IDS[:4] if i.peer_id == schedule.proposer(2, 1))
    core.on_message(p1.peer_id, make_proposal(p1, 2, 1, y), 0.03)
    assert [(v.vote_type, v.block_hash) for v in own_votes(core.take_actions(), PREVOTE)] == [(PREVOTE, None)]


def _solo_log(heights):
    """A single validator (it decides alone) at ``heights`` + 1, holding every commit in memory."""
    config = replace(FAST, commit_cache=2 * heights)
    solo = BftCore(IDS[0], NET, table_of(IDS[:1]), config, 0.0)
    while solo.height <= heights:
        solo.tick(solo.next_deadline())
    solo.take_actions()
    return solo, config


def test_catch_up_follow_ups_are_capped_per_peer_and_an_honest_walk_still_completes():
    heights = (bft.MAX_FOLLOW_UPS + 8) * MAX_COMMITS_PER_RESPONSE
    server, config = _solo_log(heights)
    now = server.next_deadline()
    # a peer asking ahead without applying anything: answered until the cap, then not
    asker = IDS[2].peer_id
    answered = 0
    for _ in range(2):
        for from_height in range(1, server.height, MAX_COMMITS_PER_RESPONSE):
            server.on_message(asker, BftCommitRequest(from_height=from_height), now)
            answered += sum(isinstance(a, Send) for a in server.take_actions())
    assert answered == 1 + bft.MAX_FOLLOW_UPS
    # counted: the requests beyond the cap, in both walks (a request going back is simply refused)
    assert server.drops["follow_up_limit"] == 2 * (heights // MAX_COMMITS_PER_RESPONSE - answered)
    # an observer catching up at network speed (1 ms links) crosses the cap and still gets there
    walker = BftCore(IDS[1], NET, table_of(IDS[:1]), config, now)
    limited = server.drops["follow_up_limit"]
    start, target = now, server.height
    queue: list = []  # (due, seq, sender, receiver, message)
    seq = 0
    while walker.height < target and now < start + 10.0:
        for src, dst in ((server, walker), (walker, server)):
            for action in src.take_actions():
                if isinstance(action, Send):
                    seq += 1
                    heapq.heappush(queue, (now + 0.001, seq, src, dst, roundtrip(action.message)))
        if queue and queue[0][0] <= walker.next_deadline():
            now, _, src, dst, msg = heapq.heappop(queue)
            dst.on_message(src.peer_id, msg, now)
        else:
            now = walker.next_deadline()
            walker.tick(now)
    assert walker.height == target and server.drops["follow_up_limit"] > limited
    assert now - start < 3 * config.rebroadcast_interval_s  # two observer polls: a walk, then the rest


# ------------------------------------------------------- randomized simulation


class Sim:
    """N cores on a simulated network driven by one seeded ``random.Random``."""

    BYZ_KINDS = ("silent", "equivocate", "garbage", "badsig")

    def __init__(self, seed: int):
        rng = self.rng = random.Random(seed)
        self.seed = seed
        n = rng.randint(4, 8)
        ids = IDS[:n]
        weights = [rng.randint(1, 4) for _ in ids]
        self.table = table_of(ids, weights)
        total = self.table.total
        self.byz: dict[str, str] = {}
        byz_weight = 0
        for i in rng.sample(range(n), n):
            if rng.random() < 0.6 and 3 * (byz_weight + weights[i]) < total:
                byz_weight += weights[i]
                self.byz[ids[i].peer_id] = rng.choice(self.BYZ_KINDS)
        self.ids = {i.peer_id: i for i in ids}
        self.honest = [p for p in self.table.weights if p not in self.byz]
        # odd seeds: every core starts as the reference node starts a fresh validator, waiting to
        # hear the network (PROTOCOL.md §14.12), which must cost no safety or liveness either
        self.await_network = seed % 2 == 1
        self.cores = {i.peer_id: BftCore(i, NET, self.table, FAST, 0.0, validate_value=valid_value,
                                         await_network=self.await_network) for i in ids}
        self.loss = rng.choice([0.0, 0.05, 0.15])
        self.dup = rng.choice([0.0, 0.05])
        self.max_delay = rng.choice([0.01, 0.05, 0.2])
        start = rng.uniform(0.5, 4.0)
        self.partition = (start, start + rng.uniform(1.0, 10.0))
        side = set(rng.sample(sorted(self.cores), rng.randint(1, n - 1)))
        self.side = side
        self.heap: list = []
        self.seq = 0
        self.now = 0.0
        self.tick_at: dict[str, float] = {}
        self.decided: dict[int, bytes] = {}
        self.chains: dict[str, list[Commit]] = {p: [] for p in self.cores}
        self.submitted: set[bytes] = set()
        for k in range(rng.randint(5, 40)):
            value = b"s%d-v%d" % (seed, k)
            self.push(rng.uniform(0.0, self.partition[1] + 2.0), "submit", rng.choice(self.honest), None, value)
        # Seeds 3 mod 4 (odd: the cores wait to hear the network): one honest validator, of a
        # weight that keeps the byzantine ones and it under 1/3, crashes after the heal, loses its
        # log and its sign state, and comes back a second later (PROTOCOL.md §14.12). Its own
        # random stream: the other seeds' scenarios stay as they were.
        self.amnesiac: str | None = None
        self.down: set[str] = set()
        self.evidence_against: dict[str, int] = {}
        if seed % 4 == 3:
            arng = random.Random(seed + 10_000)
            fit = [p for p in sorted(self.honest) if 3 * (byz_weight + self.table.weights[p]) < total]
            if fit:
                self.amnesiac = arng.choice(fit)
                crash_at = self.partition[1] + arng.uniform(0.2, 1.0)
                self.push(crash_at, "crash", self.amnesiac, None, None)
                self.push(crash_at + 1.0, "restart", self.amnesiac, None, None)
        for pid in self.cores:
            self.reschedule(pid)

    def push(self, at, kind, dst, src, payload):
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, kind, dst, src, payload))

    def reschedule(self, pid):
        at = self.cores[pid].next_deadline()
        if self.tick_at.get(pid) != at:
            self.tick_at[pid] = at
            self.push(at, "tick", pid, None, at)

    def partitioned(self, a, b):
        lo, hi = self.partition
        return lo <= self.now < hi and ((a in self.side) != (b in self.side))

    def send(self, src, dst, msg):
        if dst == src or self.partitioned(src, dst) or self.rng.random() < self.loss:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            self.push(self.now + self.rng.uniform(0.001, self.max_delay), "msg", dst, src, msg)

    def broadcast(self, src, msg, targets=None):
        msg = roundtrip(msg)
        for dst in targets if targets is not None else sorted(self.cores):
            self.send(src, dst, msg)

    def emit(self, pid, actions):
        kind = self.byz.get(pid)
        for action in actions:
            if isinstance(action, Commit):
                self.on_commit(pid, action)
            elif isinstance(action, Evidence) and kind is None:
                offender = action.equivocation.first.voter
                self.evidence_against[offender] = self.evidence_against.get(offender, 0) + 1
            elif isinstance(action, Broadcast):
                if kind is None:
                    self.broadcast(pid, action.message)
                else:
                    self.byzantine_broadcast(pid, kind, action.message)
            elif isinstance(action, Send) and kind != "silent":
                self.send(pid, action.peer_id, roundtrip(action.message))

    def byzantine_broadcast(self, pid, kind, msg):
        rng, me = self.rng, self.ids[pid]
        peers = sorted(self.cores)
        if kind == "silent":
            return
        if kind == "badsig" and isinstance(msg, (BftVote, BftProposal)):
            if isinstance(msg, BftVote):
                bad = replace(msg, vote=replace(msg.vote, signed=SignedVote(
                    voter=msg.vote.voter, signature=bytes(rng.getrandbits(8) for _ in range(64)))))
            else:
                bad = replace(msg, signed=SignedVote(voter=pid, signature=bytes(64)))
            self.broadcast(pid, bad if rng.random() < 0.7 else msg)
            victim = rng.choice(self.honest)  # impersonation: another voter's name, our signature
            vote = Vote(vote_type=PREVOTE, height=self.cores[victim].height, round=0, block_hash=None,
                        signed=SignedVote(voter=victim, signature=me.sign(b"not that statement")))
            self.broadcast(pid, BftVote(vote=vote))
            return
        if kind == "equivocate" and isinstance(msg, BftVote):
            v = msg.vote
            other_hash = None if v.block_hash is not None else bytes(rng.getrandbits(8) for _ in range(32))
            twin = make_vote(me, v.vote_type, v.height, v.round, other_hash)
            half = set(rng.sample(peers, len(peers) // 2))
            self.broadcast(pid, msg, [p for p in peers if p in half])
            self.broadcast(pid, twin, [p for p in peers if p not in half])
            return
        if isinstance(msg, BftProposal) and kind in ("equivocate", "garbage"):
            if kind == "garbage":
                values = (b"BAD-" + bytes(rng.getrandbits(8) for _ in range(8)),)
                parent = msg.block.parent_hash if rng.random() < 0.5 else b"\xee" * 32
                block = replace(msg.block, values=values, parent_hash=parent)
                self.broadcast(pid, make_proposal(me, msg.height, msg.round, block, msg.valid_round))
                self.broadcast(pid, BftValues(values=(b"BAD-pool",)))
                # a forged certified commit for the block
                cert = QuorumCertificate(votes=(sign_vote(me, PRECOMMIT, NET, 0,
                                                          [msg.height, msg.round, block_hash(block)]),))
                self.broadcast(pid, BftCommitResponse(
                    commits=(CertifiedCommit(round=msg.round, block=block, certificate=cert),),
                    latest_height=msg.height))
                return
            other = replace(msg.block, values=tuple(sorted(msg.block.values + (b"x%d" % rng.getrandbits(30),),
                                                           key=value_hash)))
            twin = make_proposal(me, msg.height, msg.round, other, msg.valid_round)
            half = set(rng.sample(peers, len(peers) // 2))
            self.broadcast(pid, msg, [p for p in peers if p in half])
            self.broadcast(pid, twin, [p for p in peers if p not in half])
            return
        self.broadcast(pid, msg)

    def on_commit(self, pid, action: Commit):
        if pid in self.byz:
            return
        h, digest = action.height, action.block_hash
        prior = self.decided.setdefault(h, digest)
        assert prior == digest, f"seed {self.seed}: SAFETY: two blocks at height {h}"
        chain = self.chains[pid]
        assert h == len(chain) + 1, f"seed {self.seed}: gap in the chain of {pid[:10]}"
        if chain:
            assert action.block.parent_hash == chain[-1].block_hash
        verify_commit(action.commit, self.table, NET)
        chain.append(action)

    def run(self, until, stop=None):
        while self.heap and self.heap[0][0] <= until:
            at, _, kind, dst, src, payload = heapq.heappop(self.heap)
            self.now = at
            if kind == "crash":
                self.down.add(dst)
                self.tick_at.pop(dst, None)
                continue
            if kind == "restart":  # a new disk: no log, no sign state
                self.down.discard(dst)
                self.cores[dst] = BftCore(self.ids[dst], NET, self.table, FAST, at, validate_value=valid_value,
                                          await_network=True)
                self.chains[dst] = []
            elif dst in self.down:
                continue
            if kind == "submit" and dst == self.amnesiac:  # (a value pending there would die with it)
                dst = next(p for p in self.honest if p != dst)
            core = self.cores[dst]
            if kind == "tick":
                if self.tick_at.get(dst) != payload:
                    continue
                self.tick_at.pop(dst)
                core.tick(at)
            elif kind == "msg":
                core.on_message(src, payload, at)
            elif kind == "submit":
                if core.submit(payload, at):
                    self.submitted.add(payload)
            self.emit(dst, core.take_actions())
            self.reschedule(dst)
            if stop is not None and stop():
                return True
        return stop() if stop is not None else False

    def honest_values(self, pid):
        return [v for c in self.chains[pid] for v in c.block.values]


SEEDS = [int(os.environ["BFT_SEED"])] if "BFT_SEED" in os.environ else \
    range(int(os.environ.get("BFT_SEEDS", "200")))
TARGET_HEIGHT = 5


def _simulate(seed: int) -> Sim:
    sim = Sim(seed)
    heal = sim.partition[1]
    # through the partition (safety is checked at every commit)
    sim.run(heal)
    base = max((len(sim.chains[p]) for p in sim.honest), default=0)
    target = base + TARGET_HEIGHT

    def done():
        if not all(len(sim.chains[p]) >= target for p in sim.honest):
            return False
        committed = set(sim.honest_values(sim.honest[0]))
        return sim.submitted <= committed

    reached = sim.run(heal + 120.0, done)
    heights = {p[:6]: len(sim.chains[p]) for p in sim.honest}
    assert reached, (f"seed {seed}: LIVENESS: honest heights {heights}, target {target}, "
                     f"missing values {len(sim.submitted - set(sim.honest_values(sim.honest[0])))}, "
                     f"byzantine {sorted(sim.byz.values())}")
    sim.run(sim.now + 2.0)  # (an amnesiac that has just caught up hears its new height a moment later)
    assert not any(sim.cores[p].awaiting_network for p in sim.honest), f"seed {seed}: still waiting"
    if sim.amnesiac is not None and sim.loss == 0:  # (a lost vote may stay unseen: §14.12)
        assert not sim.evidence_against.get(sim.amnesiac), f"seed {seed}: the amnesiac equivocated"
    for p in sim.honest:  # no value committed twice, no invalid value committed
        values = sim.honest_values(p)
        assert len(values) == len(set(values)), f"seed {seed}: a value committed twice"
        assert all(valid_value(v) for v in values), f"seed {seed}: invalid value committed"
    return sim


@pytest.fixture
def shared_verify(monkeypatch):
    """All simulated peers live in one process: memoize the (pure) signature check.

    Same answers as ``verify_vote``; each distinct signed statement is verified once
    instead of once per recipient, which keeps 100 seeds well under a minute.
    """
    import chimera.consensus.bft as bft_module
    import chimera.consensus.quorum as quorum_module

    memo: dict = {}
    real = quorum_module.verify_vote

    def verify(vote, purpose, network_id, epoch, statement):
        key = (vote.voter, vote.signature, purpose, network_id, epoch, msgpack.packb(statement))
        if key not in memo:
            memo[key] = real(vote, purpose, network_id, epoch, statement)
        return memo[key]

    monkeypatch.setattr(bft_module, "verify_vote", verify)
    monkeypatch.setattr(quorum_module, "verify_vote", verify)  # used by verify_certificate


@pytest.mark.parametrize("chunk", range(4))
def test_simulation_safety_and_liveness(chunk, shared_verify):
    seeds = [s for i, s in enumerate(SEEDS) if i % 4 == chunk]
    for seed in seeds:
        _simulate(seed)


def test_simulation_is_reproducible_and_exercises_byzantine_paths(shared_verify):
    a, b = _simulate(3), _simulate(3)
    assert [c.block_hash for c in a.chains[a.honest[0]]] == [c.block_hash for c in b.chains[b.honest[0]]]
    assert a.now == b.now
    kinds = set()
    for seed in range(40):
        kinds |= set(Sim(seed).byz.values())
    assert kinds == set(Sim.BYZ_KINDS)


def test_idle_network_waits_for_values_then_proposes_at_once():
    """empty_block_interval_s > 0: no empty block per commit_wait, a value is proposed at once."""
    config = BftConfig(**{**{f: getattr(FAST, f) for f in FAST.__dataclass_fields__},
                          "empty_block_interval_s": 10.0})
    cluster = Cluster(4, config=config)
    cluster.advance(1.0)
    assert all(not cs for cs in cluster.commits.values()), "an idle network made a block early"
    start = cluster.now
    cluster.cores[cluster.ids[2].peer_id].submit(b"wake", start)
    cluster.advance(start + 0.01)  # instant delivery: no timeout needs to fire
    assert all([c.height for c in cs] == [1] for cs in cluster.commits.values()), cluster.commits
    assert all(cs[0].block.values == (b"wake",) for cs in cluster.commits.values())
    cluster.advance(start + 5.0)
    assert all(len(cs) == 1 for cs in cluster.commits.values())  # idle again: nothing new
    cluster.advance(start + 12.0)
    assert all(len(cs) == 2 and cs[1].block.values == () for cs in cluster.commits.values())


def test_values_submitted_together_to_an_idle_proposer_share_one_block():
    """The idle wait ends at the next tick, not inside submit(): a driver submitting several
    values in one go (training: inclusion, confirm, start) gets them into one block."""
    config = BftConfig(**{**{f: getattr(FAST, f) for f in FAST.__dataclass_fields__},
                          "empty_block_interval_s": 10.0})
    cluster = Cluster(4, config=config)
    cluster.advance(1.0)
    start = cluster.now
    some_core = cluster.cores[cluster.ids[0].peer_id]
    proposer = cluster.cores[some_core.proposer(1, 0)]
    for k in range(3):
        assert proposer.submit(b"together %d" % k, start)
    assert not any(isinstance(a, Broadcast) and isinstance(a.message, BftProposal) for a in proposer._actions)
    cluster.advance(start + 0.01)
    assert all(len(cs) == 1 and len(cs[0].block.values) == 3 for cs in cluster.commits.values()), cluster.commits


def test_a_restarted_core_remembers_recent_commits_and_refuses_their_replay():
    """The dedupe of committed values survives a restart: the driver feeds the stored blocks of
    the window (remember_committed); a value committed inside it is refused by the pool and a
    block holding it gets no prevote; older ones are forgotten as before."""
    table = table_of(IDS[:4])
    me = IDS[0]
    core = BftCore(me, NET, table, FAST, 0.0, height=50, last_block_hash=b"\x01" * 32)
    core.remember_committed(49, [b"paid at 49"])
    core.remember_committed(50 - FAST.dedupe_heights, [b"too old to remember"])  # outside the window
    core.remember_committed(50, [b"not committed yet"])  # not below the core's height: ignored
    assert core.submit(b"paid at 49", 0.0) is False and core.drops["duplicate_value"] == 1
    assert core.submit(b"too old to remember", 0.0) is True
    assert core.submit(b"not committed yet", 0.0) is True


def test_blocks_fit_the_byte_budget_and_an_oversize_block_gets_no_prevote():
    """max_block_bytes: a proposer packs values up to the budget (a full block of 4 KiB values
    would not fit an edge peer's 256 KiB envelope); a larger block is invalid."""
    table = table_of(IDS[:4])
    config = dataclasses.replace(FAST, max_block_bytes=20_000)
    core = BftCore(IDS[0], NET, table, config, 0.0)
    for k in range(10):
        assert core.submit(bytes([k]) * 4000, 0.0)
    block = core._make_block()
    assert len(block.values) == 5 and sum(map(len, block.values)) <= 20_000
    proposer = IDS[1]
    big = Block(height=1, epoch=0, proposer=proposer.peer_id, parent_hash=bytes(32),
                values=tuple(sorted((bytes([k]) * 4000 for k in range(6)), key=value_hash)))
    fits = Block(height=1, epoch=0, proposer=proposer.peer_id, parent_hash=bytes(32),
                 values=tuple(sorted((bytes([k]) * 4000 for k in range(5)), key=value_hash)))
    assert core._block_shape_ok(fits) is True and core._block_shape_ok(big) is False
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(FAST, max_block_bytes=100)


def test_catch_up_follow_ups_are_served_at_once_but_repeats_are_rate_limited():
    """A lagging peer walks the log at network speed: each follow-up request (from beyond what it
    was last sent) is answered at once; a repeated request within catchup_interval_s is not."""
    cluster = Cluster(4)
    cluster.advance(6.0)
    server = cluster.cores[IDS[0].peer_id]
    assert server.height > 2 * MAX_COMMITS_PER_RESPONSE + 1, server.height
    asker = IDS[3].peer_id
    now = 6.0

    def ask(from_height: int) -> list:
        server.take_actions()
        server.on_message(asker, BftCommitRequest(from_height=from_height), now)
        return [a.message for a in server.take_actions()
                if isinstance(a, Send) and isinstance(a.message, BftCommitResponse)]

    first = ask(1)
    assert first and first[0].commits[-1].block.height == MAX_COMMITS_PER_RESPONSE
    follow_up = ask(MAX_COMMITS_PER_RESPONSE + 1)
    assert follow_up and follow_up[0].commits[0].block.height == MAX_COMMITS_PER_RESPONSE + 1
    assert ask(1) == []  # a repeat within the interval: refused (no amplification)
    assert ask(MAX_COMMITS_PER_RESPONSE + 1) == []


def test_a_prevote_from_its_voter_counts_on_the_envelope_and_is_checked_before_it_is_proof():
    """Prevotes sent by their own voter are not signature-checked on arrival (the verified
    envelope authenticates them); a bad vote signature is caught when the vote would become
    proof: equivocation evidence is only built from votes whose signatures verify."""
    core, table, schedule, by_id = _core_and_others(4)
    other = next(by_id[p] for p in table.weights if p != core.peer_id)
    bad = BftVote(vote=replace(make_vote(other, PREVOTE, 1, 0, None).vote,
                               signed=SignedVote(voter=other.peer_id, signature=bytes(64))))
    core.on_message(other.peer_id, bad, 0.1)
    assert not [a for a in core.take_actions() if isinstance(a, Rejected)]
    assert other.peer_id in core._prevotes[0].votes  # counted
    twin = make_vote(other, PREVOTE, 1, 0, b"\x05" * 32)  # a validly signed conflicting prevote
    core.on_message(other.peer_id, twin, 0.2)
    actions = core.take_actions()
    assert not any(isinstance(a, Evidence) for a in actions)  # the first one proves nothing
    good = make_vote(other, PRECOMMIT, 1, 0, None)
    good_twin = make_vote(other, PRECOMMIT, 1, 0, b"\x05" * 32)
    core.on_message(other.peer_id, good, 0.3)
    core.on_message(other.peer_id, good_twin, 0.3)
    evidence = [a for a in core.take_actions() if isinstance(a, Evidence)]
    assert len(evidence) == 1 and evidence[0].equivocation.first == good.vote


def test_a_proposal_holding_a_not_yet_value_waits_for_it_a_little():
    """A block with a value this peer cannot decide yet (validate_value None, e.g. a training
    update still in flight) is not prevoted nil at once: the core waits, asks only about the
    undecided value again, prevotes the block when recheck() finds it decidable, and prevotes
    nil when not_ready_wait_s passes first."""
    asked: list[bytes] = []
    held: set[bytes] = set()

    def validate(value: bytes) -> bool | None:
        asked.append(value)
        return None if value.startswith(b"needs ") and value not in held else True

    for arrives in (True, False):
        table = table_of(IDS[:4])
        schedule = ProposerSchedule(table, 1)
        me = next(i for i in IDS[:4] if i.peer_id != schedule.proposer(1, 0))
        core = BftCore(me, NET, table, FAST, 0.0, validate_value=validate)
        core.tick(0.0)
        core.take_actions()
        proposer = next(i for i in IDS[:4] if i.peer_id == schedule.proposer(1, 0))
        block = block_of(proposer, [b"plain value", b"needs update"])
        asked.clear()
        core.on_message(proposer.peer_id, make_proposal(proposer, 1, 0, block), 0.1)
        assert own_votes(core.take_actions()) == [] and core.awaiting_values
        assert core.drops["block_not_ready"] == 1 and sorted(asked) == [b"needs update", b"plain value"]
        other = next(i for i in IDS[:4] if i.peer_id not in (me.peer_id, proposer.peer_id))
        core.on_message(other.peer_id, make_vote(other, PREVOTE, 1, 0, block_hash(block)), 0.2)
        assert own_votes(core.take_actions()) == []  # a new input asks again: still not yet
        assert asked.count(b"plain value") == 1 and asked.count(b"needs update") >= 2
        assert core.drops["block_not_ready"] == 1  # counted once per block
        if arrives:
            held.add(b"needs update")
            core.recheck(0.3)
            assert [v.block_hash for v in own_votes(core.take_actions(), PREVOTE)] == [block_hash(block)]
            assert not core.awaiting_values
        else:
            core.tick(0.1 + FAST.not_ready_wait_s - 0.01)
            assert own_votes(core.take_actions()) == []
            core.tick(0.1 + FAST.not_ready_wait_s)  # the wait is over: not valid
            assert [v.block_hash for v in own_votes(core.take_actions(), PREVOTE)] == [None]
        held.clear()


def test_a_proposed_block_carries_one_value_per_group_of_alternatives():
    """choice_key (proposer policy, not validity): of pooled values in one group a block
    carries the best ranked one; the others stay pooled; ungrouped values are unaffected."""
    def choice(value: bytes):
        return (value[:5], -len(value)) if value.startswith(b"alt") else None

    table = table_of(IDS[:4])
    core = BftCore(IDS[0], NET, table, FAST, 0.0, validate_value=valid_value, choice_key=choice)
    values = [b"alt-A short", b"plain 1", b"alt-A the longest one", b"alt-B x", b"alt-A mid one", b"plain 2"]
    for v in values:
        assert core.submit(v, 0.0)
    block = core._make_block()
    assert sorted(block.values) == sorted([b"alt-A the longest one", b"alt-B x", b"plain 1", b"plain 2"])
    assert core.pool_size == len(values)  # the alternatives left out stay pooled
    plain = BftCore(IDS[0], NET, table, FAST, 0.0, validate_value=valid_value)
    for v in values:
        plain.submit(v, 0.0)
    assert len(plain._make_block().values) == len(values)


def test_a_proposed_block_leaves_out_the_values_the_proposable_policy_refuses():
    """proposable (proposer policy, not validity) sees each pooled value with the peer that
    gossiped it (None: submitted here); a value it refuses stays out of our blocks but stays
    pooled, valid, for a proposer that may take it."""
    table = table_of(IDS[:4])
    seen = []

    def proposable(value: bytes, sender):
        seen.append((value, sender))
        return not value.startswith(b"fl") or sender == IDS[1].peer_id

    core = BftCore(IDS[0], NET, table, FAST, 0.0, validate_value=valid_value, proposable=proposable)
    core.submit(b"own value", 0.0)
    core.on_message(IDS[1].peer_id, BftValues(values=(b"fl from a participant", b"plain 1")), 0.0)
    core.on_message(IDS[2].peer_id, BftValues(values=(b"fl from anyone", b"plain 2")), 0.0)
    block = core._make_block()
    assert sorted(block.values) == sorted([b"own value", b"fl from a participant", b"plain 1", b"plain 2"])
    assert (b"fl from anyone", IDS[2].peer_id) in seen and (b"own value", None) in seen
    assert core.pool_size == 5
    assert core.drops["invalid_value"] == 0


@pytest.mark.parametrize("nudgers", [bft.NUDGERS, 0])
def test_a_proposer_that_missed_the_last_commit_is_nudged_before_the_propose_timeout(monkeypatch, nudgers):
    """The proposer of height 2 missed height 1's precommits (it was cut off) and, back, sits
    silently in height 1's propose step; the others wait in height 2's propose step and send it
    nothing of height 2. Half a propose timeout in, the NUDGERS validators after it push it
    the last commit: it applies it, proposes, and height 2 commits in round 0 well before the
    others' propose timeout. Without the nudge (nudgers=0) nothing happens until a timeout."""
    monkeypatch.setattr(bft, "NUDGERS", nudgers)
    cluster = Cluster(4)
    any_core = cluster.cores[IDS[0].peer_id]
    late = any_core.proposer(2, 0)
    assert any_core.proposer(1, 0) != late
    cluster.down.add(late)
    cluster.cores[any_core.proposer(1, 0)].submit(b"first", 0.0)
    cluster.advance(0.3)  # height 1 committed by the other three (3 of 4 > 2/3)
    assert all(c.height == 2 for p, c in cluster.cores.items() if p != late)
    assert cluster.cores[late].height == 1
    cluster.down.clear()  # back, but its own propose timeout of height 1 is at 1.0 s
    cluster.advance(0.9)  # the others' propose timeout of height 2 is at about 1.1 s
    nudged = [a for p in cluster.cores for a in cluster.log[p] if isinstance(a, bft.BftEvent) and a.kind == "nudge"]
    if nudgers:
        assert len(nudged) == nudgers
        assert all(c.height >= 3 for c in cluster.cores.values())  # height 2 committed (and more since)
        assert [(c.height, c.commit.round) for c in cluster.commits[late][:2]] == [(1, 0), (2, 0)]
    else:
        assert not nudged and all(c.height <= 2 for c in cluster.cores.values())


def _certified(block, signers, round_=0):
    digest = block_hash(block)
    votes = tuple(sorted((sign_vote(s, PRECOMMIT, NET, 0, [block.height, round_, digest]) for s in signers),
                         key=lambda v: v.voter))
    return CertifiedCommit(round=round_, block=block, certificate=QuorumCertificate(votes=votes))


def _prevoted_height_1(core, schedule, by_id, others):
    """Height 1's proposal and the others' prevotes for it, delivered to ``core``; its block hash."""
    p0 = by_id[schedule.proposer(1, 0)]
    block1 = block_of(p0, [b"one"])
    h1 = block_hash(block1)
    core.on_message(p0.peer_id, make_proposal(p0, 1, 0, block1), 0.1)
    for other in others:
        core.on_message(other.peer_id, make_vote(other, PREVOTE, 1, 0, h1), 0.1)
    return h1


def test_the_next_heights_messages_that_arrive_before_our_commit_are_held_and_replayed():
    """The others committed height 1 a moment before us and their height-2 proposal and
    prevotes reach us while we still wait for height 1's last precommits. Before, those were
    dropped (other_height) and we re-heard them only at the senders' rebroadcast, a second
    later; now they are held (bounded) and delivered when we enter height 2: we prevote and
    lock height 2's block at once, with nothing further received."""
    core, table, schedule, by_id = _core_and_others(4)
    others = [by_id[p] for p in table.weights if p != core.peer_id]
    h1 = _prevoted_height_1(core, schedule, by_id, others)
    assert [v.vote_type for v in own_votes(core.take_actions())] == [PREVOTE, PRECOMMIT]
    q0 = by_id[core.proposer(2, 0)]
    assert q0.peer_id != core.peer_id
    block2 = block_of(q0, [b"two"], height=2, parent=h1)
    h2 = block_hash(block2)
    core.on_message(q0.peer_id, make_proposal(q0, 2, 0, block2), 0.2)
    for other in others:
        core.on_message(other.peer_id, make_vote(other, PREVOTE, 2, 0, h2), 0.2)
    assert own_votes(core.take_actions()) == [] and core.height == 1
    assert core.drops["held_next_height"] == 4 and core.drops["other_height"] == 0
    for other in others[:2]:  # height 1's precommits, late: 3 of 4 with ours
        core.on_message(other.peer_id, make_vote(other, PRECOMMIT, 1, 0, h1), 0.3)
    assert [a.block_hash for a in core.take_actions() if isinstance(a, Commit)] == [h1]
    core.tick(0.3 + FAST.commit_wait_s)  # round 0 of height 2 starts with what was held
    assert [(v.height, v.vote_type, v.block_hash) for v in own_votes(core.take_actions())] == [
        (2, PREVOTE, h2), (2, PRECOMMIT, h2)]
    assert core.locked_hash == h2


def test_held_messages_are_bounded_per_validator_and_stale_ones_are_discarded():
    core, table, schedule, by_id = _core_and_others(4)
    others = [by_id[p] for p in table.weights if p != core.peer_id]
    stranger = IDS[7]  # not a validator: its messages of the next height are not held
    core.on_message(stranger.peer_id, make_vote(stranger, PREVOTE, 2, 0, None), 0.1)
    assert core.drops["other_height"] == 1 and core.drops["held_next_height"] == 0
    spammer = others[0]
    for r in range(bft.MAX_HELD_PER_SENDER + 3):
        core.on_message(spammer.peer_id, make_vote(spammer, PREVOTE, 2, r, None), 0.1)
    assert core.drops["held_next_height"] == bft.MAX_HELD_PER_SENDER and core.drops["held_overflow"] == 3
    q0 = by_id[core.proposer(2, 0)]
    fake = block_of(q0, [b"x"], height=2)
    core.on_message(others[1].peer_id, make_proposal(q0, 2, 0, fake), 0.1)
    core.on_message(others[1].peer_id, make_proposal(q0, 2, 1, fake), 0.1)  # one proposal per sender
    assert core.drops["held_overflow"] == 4
    core.take_actions()
    # a catch-up takes us past height 2 in one response: what was held for it is stale
    p0 = by_id[schedule.proposer(1, 0)]
    block1 = block_of(p0, [b"one"])
    block2 = block_of(q0, [b"two"], height=2, parent=block_hash(block1))
    core.on_message(others[2].peer_id, BftCommitResponse(
        commits=(_certified(block1, others), _certified(block2, others)), latest_height=2), 0.2)
    assert core.height == 3
    assert core.drops["held_stale"] == bft.MAX_HELD_PER_SENDER + 1
    assert not [a for a in core.take_actions() if isinstance(a, Rejected)]


def test_a_quorum_precommitting_a_block_we_never_received_fetches_its_commit_at_once():
    """Height 1's proposal was lost on its way to us. Before, the precommit quorum we did see
    was useless until the precommit timeout moved us to round 1 and our round-1 messages made
    a peer push the commit. Now we ask two precommitters for the commit right away; one that
    has not committed yet answers when it does (test below); the answer is verified."""
    core, table, schedule, by_id = _core_and_others(4)
    others = sorted((by_id[p] for p in table.weights if p != core.peer_id), key=lambda i: i.peer_id)
    p0 = by_id[schedule.proposer(1, 0)]
    block1 = block_of(p0, [b"one"])
    h1 = block_hash(block1)
    for other in others[:2]:
        core.on_message(other.peer_id, make_vote(other, PRECOMMIT, 1, 0, h1), 0.2)
    assert not [a for a in core.take_actions() if isinstance(a, Send)]  # 2 of 4: not decided
    core.on_message(others[2].peer_id, make_vote(others[2], PRECOMMIT, 1, 0, h1), 0.2)
    actions = core.take_actions()
    asked = [a.peer_id for a in actions if isinstance(a, Send) and isinstance(a.message, BftCommitRequest)]
    ring = [o.peer_id for o in others if o.peer_id > core.peer_id] + \
        [o.peer_id for o in others if o.peer_id < core.peer_id]
    assert asked == ring[:bft.FETCH_DECIDED_FROM]
    assert [a.kind for a in actions if isinstance(a, BftEvent)] == ["fetch_commit"]
    assert all(a.message.from_height == 1 for a in actions if isinstance(a, Send))
    core.on_message(others[2].peer_id, make_vote(others[2], PRECOMMIT, 1, 0, h1), 0.2)
    assert not [a for a in core.take_actions() if isinstance(a, Send)]  # asked once per round
    core.on_message(asked[0], BftCommitResponse(commits=(_certified(block1, others),), latest_height=1), 0.25)
    assert [a.block_hash for a in core.take_actions() if isinstance(a, Commit)] == [h1] and core.height == 2


def test_a_request_for_the_height_in_progress_is_answered_when_it_commits():
    core, table, schedule, by_id = _core_and_others(4)
    others = [by_id[p] for p in table.weights if p != core.peer_id]
    asker = others[0].peer_id
    core.on_message(asker, BftCommitRequest(from_height=1), 0.05)
    core.on_message(IDS[8].peer_id, BftCommitRequest(from_height=5), 0.05)  # ahead of us: nothing
    assert not [a for a in core.take_actions() if isinstance(a, Send)]
    h1 = _prevoted_height_1(core, schedule, by_id, others)
    for other in others[1:]:
        core.on_message(other.peer_id, make_vote(other, PRECOMMIT, 1, 0, h1), 0.2)
    actions = core.take_actions()
    sent = [(a.peer_id, a.message) for a in actions if isinstance(a, Send)]
    assert [(p, [c.block.height for c in m.commits], m.latest_height) for p, m in sent] == [(asker, [1], 1)]
    verify_commit(sent[0][1].commits[0], table, NET)
    core.tick(1.0)
    assert not [a for a in core.take_actions() if isinstance(a, Send)]  # answered once


def test_a_block_over_a_third_voted_for_whose_proposal_we_lack_is_requested_after_a_delay():
    """Height 1's proposal was lost on its way to us while the others prevoted its block.
    Before, we prevoted nil at the propose timeout (and, if the others locked on it while
    the next proposer lacked it too, a whole round was lost). Now, once voters of more than
    1/3 of the weight voted for the block and the proposal has still not come
    ``proposal_fetch_delay_s`` later, we ask two of them for it; a relayed proposal counts
    (it is signed by the proposer), and we prevote and lock at once."""
    core, table, schedule, by_id = _core_and_others(4)
    others = sorted((by_id[p] for p in table.weights if p != core.peer_id), key=lambda i: i.peer_id)
    p0 = by_id[schedule.proposer(1, 0)]
    block1 = block_of(p0, [b"one"])
    h1 = block_hash(block1)
    voters = [o for o in others if o is not p0][:2]
    core.on_message(voters[0].peer_id, make_vote(voters[0], PREVOTE, 1, 0, h1), 0.2)  # 1/4: not > 1/3
    core.tick(0.2 + FAST.proposal_fetch_delay_s)
    assert not [a for a in core.take_actions() if isinstance(a, Send)]
    core.on_message(voters[1].peer_id, make_vote(voters[1], PREVOTE, 1, 0, h1), 0.3)  # 2/4 > 1/3
    core.tick(0.3 + FAST.proposal_fetch_delay_s * 0.9)  # it may still be in flight
    assert not [a for a in core.take_actions() if isinstance(a, Send)]
    core.tick(0.3 + FAST.proposal_fetch_delay_s)
    actions = core.take_actions()
    asked = [a.peer_id for a in actions if isinstance(a, Send)]
    ring = sorted(v.peer_id for v in voters)
    ring = [p for p in ring if p > core.peer_id] + [p for p in ring if p < core.peer_id]
    assert asked == ring[:bft.FETCH_DECIDED_FROM]
    assert all(a.message == BftProposalRequest(height=1, round=0) for a in actions if isinstance(a, Send))
    assert [a.kind for a in actions if isinstance(a, BftEvent)] == ["fetch_proposal"]
    core.on_message(voters[0].peer_id, make_vote(p0, PREVOTE, 1, 0, h1), 0.45)  # the proposer's, relayed
    core.tick(0.6)
    assert not [a for a in core.take_actions() if isinstance(a, Send)]  # asked once per round
    core.on_message(asked[0], make_proposal(p0, 1, 0, block1), 0.5)  # relayed by a voter
    assert [(v.vote_type, v.block_hash) for v in own_votes(core.take_actions())] == [
        (PREVOTE, h1), (PRECOMMIT, h1)]
    assert core.locked_hash == h1 and not core.drops["wrong_proposer"]


def test_a_proposal_that_arrives_within_the_delay_is_not_requested():
    core, table, schedule, by_id = _core_and_others(4)
    others = [by_id[p] for p in table.weights if p != core.peer_id]
    p0 = by_id[schedule.proposer(1, 0)]
    block1 = block_of(p0, [b"one"])
    h1 = block_hash(block1)
    for other in others[:2]:
        core.on_message(other.peer_id, make_vote(other, PREVOTE, 1, 0, h1), 0.2)
    core.on_message(p0.peer_id, make_proposal(p0, 1, 0, block1), 0.25)
    core.tick(0.2 + 2 * FAST.proposal_fetch_delay_s)
    actions = core.take_actions()
    assert not [a for a in actions if isinstance(a, Send)] and not core.drops["proposal_request_unanswered"]
    assert [(v.vote_type, v.block_hash) for v in own_votes(actions)] == [(PREVOTE, h1), (PRECOMMIT, h1)]


def test_a_proposal_request_is_answered_once_per_peer_with_the_signed_proposal_and_its_polka():
    core, table, schedule, by_id = _core_and_others(4)
    others = [by_id[p] for p in table.weights if p != core.peer_id]
    h1 = _prevoted_height_1(core, schedule, by_id, others)  # round 0's proposal and a polka for it
    core.take_actions()
    asker = others[0].peer_id
    core.on_message(asker, BftProposalRequest(height=1, round=1), 0.2)  # no proposal of round 1 here
    core.on_message(IDS[8].peer_id, BftProposalRequest(height=1, round=0), 0.2)  # not a validator
    assert not [a for a in core.take_actions() if isinstance(a, Send)]
    assert core.drops["proposal_request_unanswered"] == 2
    core.on_message(asker, BftProposalRequest(height=1, round=0), 0.2)
    sent = [a for a in core.take_actions() if isinstance(a, Send)]
    assert [(a.peer_id, a.message) for a in sent] == [
        (asker, make_proposal(by_id[schedule.proposer(1, 0)], 1, 0, core._blocks[h1]))]
    core.on_message(asker, BftProposalRequest(height=1, round=0), 0.3)  # answered once
    assert not [a for a in core.take_actions() if isinstance(a, Send)]
    # a re-proposal (round 1, valid round 0) goes with the prevotes of its polka, for L28
    p1 = by_id[schedule.proposer(1, 1)]
    core.on_message(p1.peer_id, make_proposal(p1, 1, 1, core._blocks[h1], valid_round=0), 0.4)
    core.take_actions()
    core.on_message(asker, BftProposalRequest(height=1, round=1), 0.4)
    sent = [a.message for a in core.take_actions() if isinstance(a, Send)]
    assert isinstance(sent[0], BftProposal) and sent[0].round == 1 and sent[0].valid_round == 0
    assert sorted(m.vote.voter for m in sent[1:]) == sorted(table.weights)
    assert all(m.vote.vote_type == PREVOTE and m.vote.round == 0 and m.vote.block_hash == h1 for m in sent[1:])
    # a request from a peer behind us is a height hint: it gets the commit pushed
    for other in others:
        core.on_message(other.peer_id, make_vote(other, PRECOMMIT, 1, 0, h1), 0.5)
    core.take_actions()
    core.on_message(asker, BftProposalRequest(height=1, round=0), 2.0)
    sent = [a.message for a in core.take_actions() if isinstance(a, Send)]
    assert [type(m).__name__ for m in sent] == ["BftCommitResponse"]


def _ring_after(core, peer_ids):
    ring = sorted(p for p in peer_ids if p != core.peer_id)
    return [p for p in ring if p > core.peer_id] + [p for p in ring if p < core.peer_id]


def test_a_validator_without_the_commit_well_after_its_vote_polls_two_validators_for_it():
    """We prevoted height 1's block, then heard nothing more (the others' votes were lost).
    Before, we waited for their rebroadcast; now, commit_poll_delay_s after our vote, we ask
    the two validators after us for the commit (once per round), and a poll for a height we
    then commit by voting is moot. The delay follows the usual vote-to-commit time."""
    core, table, schedule, by_id = _core_and_others(4)
    others = [by_id[p] for p in table.weights if p != core.peer_id]
    p0 = by_id[schedule.proposer(1, 0)]
    block1 = block_of(p0, [b"one"])
    core.on_message(p0.peer_id, make_proposal(p0, 1, 0, block1), 0.1)
    assert [v.vote_type for v in own_votes(core.take_actions())] == [PREVOTE]
    ring = _ring_after(core, table.weights)
    heard = by_id[ring[-1]]  # its prevote came through: it is up, so it is asked first
    core.on_message(heard.peer_id, make_vote(heard, PREVOTE, 1, 0, block_hash(block1)), 0.12)
    core.tick(0.1 + FAST.commit_poll_delay_s * 0.9)
    assert not [a for a in core.take_actions() if isinstance(a, Send)]
    core.tick(0.1 + FAST.commit_poll_delay_s)
    actions = core.take_actions()
    sent = [(a.peer_id, a.message) for a in actions if isinstance(a, Send)]
    order = sorted(table.weights)
    # the commit, and the round's votes we lack (bitmaps: we hold our prevote and heard's)
    have = vote_bitmap(order, [core.peer_id, heard.peer_id])
    assert have == sum(1 << order.index(p) for p in (core.peer_id, heard.peer_id)).to_bytes(1, "little")
    assert sent == [(p, BftCommitRequest(from_height=1)) for p in (ring[-1], ring[0])] + [
        (p, BftVoteRequest(height=1, round=0, prevotes=have, precommits=b"\x00")) for p in (ring[-1], ring[0])]
    assert [a.kind for a in actions if isinstance(a, BftEvent)] == ["commit_poll"]
    core.tick(0.9)
    assert not [a for a in core.take_actions() if isinstance(a, Send)]  # once per round
    # the answer (a commit) is verified and applied like any catch-up
    core.on_message(sent[0][0], BftCommitResponse(commits=(_certified(block1, others),), latest_height=1), 0.95)
    assert core.height == 2


def test_a_vote_request_is_answered_once_with_the_verified_votes_the_requester_lacks():
    """The stall the commit poll cannot end alone: every peer misses some vote short of a
    quorum, so nobody commits. A validator asked with bitmaps of what the requester holds
    sends it exactly the votes it lacks (ours, and others' that verify), once per round."""
    core, table, schedule, by_id = _core_and_others(4)
    others = [by_id[p] for p in table.weights if p != core.peer_id]
    h1 = _prevoted_height_1(core, schedule, by_id, others)  # prevotes of all, our precommit
    core.take_actions()
    order = sorted(table.weights)
    asker, holder = others[0], others[1]
    precommit = make_vote(holder, PRECOMMIT, 1, 0, h1).vote
    core.on_message(holder.peer_id, BftVote(vote=precommit), 0.15)
    core.take_actions()
    # the asker holds its own votes and the holder's prevote: it lacks 2 prevotes and 2 precommits
    request = BftVoteRequest(height=1, round=0, prevotes=vote_bitmap(order, [asker.peer_id, holder.peer_id]),
                             precommits=vote_bitmap(order, [asker.peer_id]))
    for bad in (BftVoteRequest(height=1, round=0, prevotes=b"\x00\x00", precommits=b"\x00"),  # wrong size
                BftVoteRequest(height=1, round=5, prevotes=b"\x00", precommits=b"\x00")):  # no votes of round 5
        core.on_message(asker.peer_id, bad, 0.2)
    core.on_message(IDS[8].peer_id, request, 0.2)  # not a validator
    assert not [a for a in core.take_actions() if isinstance(a, Send)]
    assert core.drops["vote_request_unanswered"] == 3
    core.on_message(asker.peer_id, request, 0.2)
    sent = [(a.peer_id, a.message.vote) for a in core.take_actions() if isinstance(a, Send)]
    lacking = [p for p in order if p not in (asker.peer_id, holder.peer_id)]
    assert sorted((v.vote_type, v.voter) for _, v in sent) == sorted(
        [(PREVOTE, p) for p in lacking] + [(PRECOMMIT, core.peer_id), (PRECOMMIT, holder.peer_id)])
    assert all(to == asker.peer_id and v.height == 1 and v.round == 0 and v.block_hash == h1 for to, v in sent)
    core.on_message(asker.peer_id, request, 0.3)  # answered once per round
    assert not [a for a in core.take_actions() if isinstance(a, Send)]
    # a relayed vote is a proof: the requester checks its signature (a forged one is rejected)
    asker_core = BftCore(asker, NET, table, FAST, 0.0)
    asker_core.on_message(core.peer_id, BftVote(vote=precommit), 0.3)
    assert not [a for a in asker_core.take_actions() if isinstance(a, Rejected)]
    assert asker_core._precommits[0].votes == {holder.peer_id: precommit}
    forged = dataclasses.replace(precommit, signed=dataclasses.replace(precommit.signed, signature=b"\x01" * 64))
    asker_core.on_message(core.peer_id, BftVote(vote=forged), 0.3)
    assert [a.reason for a in asker_core.take_actions() if isinstance(a, Rejected)] == ["bad_signature"]
    # a request of a height behind ours is a height hint: the commit is pushed
    for other in others:
        core.on_message(other.peer_id, make_vote(other, PRECOMMIT, 1, 0, h1), 0.5)
    core.take_actions()
    core.on_message(asker.peer_id, BftVoteRequest(height=1, round=0, prevotes=b"\x00", precommits=b"\x00"), 2.0)
    assert [type(a.message).__name__ for a in core.take_actions() if isinstance(a, Send)] == ["BftCommitResponse"]


@pytest.mark.parametrize("vote_requests_delivered", [True, False])
def test_a_precommit_quorum_short_at_every_peer_is_completed_by_the_vote_requests(vote_requests_delivered):
    """The first broadcast of each round-0 precommit reaches only the next validator in
    peer-id order (heavy loss): every peer holds 2 of the 3 precommits a quorum needs, so
    nobody commits and no timeout runs (no quorum of any value). The commit requests of
    the polls wait for a commit nobody has; the vote requests sent with them bring each
    peer the precommits it lacks, and all commit in round 0 well before the senders'
    rebroadcast (1 s). With the vote requests lost too, nobody commits before it."""
    cluster = Cluster(4)
    order = sorted(cluster.cores)
    lost_once: set[tuple[str, str]] = set()

    def lose(src, dst, action):
        msg = action.message
        if isinstance(msg, BftVoteRequest):
            return not vote_requests_delivered
        if isinstance(action, Broadcast) and isinstance(msg, BftVote) and msg.vote.vote_type == PRECOMMIT \
                and msg.vote.round == 0 and dst != order[(order.index(src) + 1) % 4] \
                and (src, dst) not in lost_once:
            lost_once.add((src, dst))
            return True
        return False

    cluster.lose = lose
    cluster.cores[order[0]].submit(b"value", 0.0)
    cluster.advance(0.9)
    assert len(lost_once) == 8  # each peer lost 2 of the 3 others' precommits of height 1
    if vote_requests_delivered:  # height 1 committed in round 0 (and empty heights followed)
        assert all(cs and (cs[0].height, cs[0].commit.round) == (1, 0) for cs in cluster.commits.values())
        assert all(any(isinstance(a, BftEvent) and a.kind == "commit_poll" for a in cluster.log[p]) for p in order)
    else:
        assert cluster.commits == {p: [] for p in order}
    cluster.advance(2.0)  # the rebroadcast (1 s) completes the height either way
    assert all(cs and (cs[0].height, cs[0].commit.round) == (1, 0) for cs in cluster.commits.values())


def test_no_commit_poll_after_a_quorum_of_precommits_and_a_later_delay_after_slow_heights():
    core, table, schedule, by_id = _core_and_others(4)
    others = [by_id[p] for p in table.weights if p != core.peer_id]
    h1 = _prevoted_height_1(core, schedule, by_id, others)  # our prevote and precommit at t = 0.1
    core.take_actions()
    for other in others:  # nil precommits: the round's outcome is known here, a timeout follows
        core.on_message(other.peer_id, make_vote(other, PRECOMMIT, 1, 0, None), 0.15)
    core.tick(0.1 + FAST.commit_poll_delay_s)
    assert not [a for a in core.take_actions() if isinstance(a, Send)]
    # round 1: height 1 commits by voting 0.5 s after our first vote of round 1
    core.tick(0.15 + FAST.timeout_s(PRECOMMIT, 0))
    core.take_actions()
    assert core.round == 1
    for other in others:
        core.on_message(other.peer_id, make_vote(other, PRECOMMIT, 1, 0, h1), 0.2)  # r0 precommits for h1
    assert core.height == 2  # decided (any round counts, L49)
    assert list(core._vote_to_commit_s) == [pytest.approx(0.1)]  # first vote at 0.1, commit at 0.2
    core._vote_to_commit_s.extend([0.3, 0.3])  # as if the last heights were slow: median 0.3 s
    core.tick(0.2 + FAST.commit_wait_s)
    core.take_actions()
    q0 = by_id[core.proposer(2, 0)]
    block2 = block_of(q0, [b"two"], height=2, parent=h1)
    start = 0.3
    core.on_message(q0.peer_id, make_proposal(q0, 2, 0, block2), start)
    assert [v.vote_type for v in own_votes(core.take_actions())] == [PREVOTE]
    core.tick(start + 0.59)  # 2 x median 0.3 s, not 0.2 s
    assert not [a for a in core.take_actions() if isinstance(a, Send)]
    core.tick(start + 0.6)
    sent = [a.message for a in core.take_actions() if isinstance(a, Send)]
    assert sent[:2] == [BftCommitRequest(from_height=2)] * 2
    assert [(type(m), m.height, m.round) for m in sent[2:]] == [(BftVoteRequest, 2, 0)] * 2


@pytest.mark.parametrize("field", ["proposal_fetch_delay_s", "commit_poll_delay_s", "catchup_interval_s"])
def test_negative_waits_are_refused(field):
    with pytest.raises(LocalProtocolError, match="must be >= 0"):
        BftConfig(**{field: -0.1})
    assert getattr(BftConfig(**{field: 0.0}), field) == 0.0


def test_a_certificate_of_more_than_1024_precommitters_takes_the_heaviest_and_verifies():
    """A certificate holds at most MAX_VOTERS votes (PROTOCOL §14.3): with more precommitters
    the core keeps the heaviest, up to the shortest set that passes the quorum (it used to
    cut the peer id order at 1024, leaving out the heavy validators: a certificate no peer
    accepted). 4 validators of weight 1000 that sort last and 1196 of weight 1."""
    from chimera.consensus.quorum import MAX_VOTERS

    net = b"\x42" * 16
    ids = sorted((SigningIdentity(hashlib.sha256(b"c%d" % i).digest()) for i in range(1200)),
                 key=lambda i: i.peer_id)
    heavy, light = ids[-4:], ids[:-4]
    table = WeightTable(epoch=1, weights={**{i.peer_id: 1000 for i in heavy}, **{i.peer_id: 1 for i in light}})
    core = BftCore(SigningIdentity(hashlib.sha256(b"observer").digest()), net, table, BftConfig(), 0.0)
    by_id = {i.peer_id: i for i in ids}
    proposer = by_id[core.proposer(1, 0)]
    block = Block(height=1, epoch=1, proposer=proposer.peer_id, parent_hash=bytes(32))
    digest = block_hash(block)
    core.on_message(proposer.peer_id, BftProposal(height=1, round=0, block=block, signed=sign_vote(
        proposer, PROPOSAL, net, 1, [1, 0, digest, None])), 0.0)
    for i in ids:
        core.on_message(i.peer_id, BftVote(vote=Vote(vote_type=PRECOMMIT, height=1, round=0, block_hash=digest,
                                                      signed=sign_vote(i, PRECOMMIT, net, 1, [1, 0, digest]))), 0.0)
    [commit] = [a.commit for a in core.take_actions() if isinstance(a, Commit)]
    verify_commit(commit, table, net)
    voters = [v.voter for v in commit.certificate.votes]
    assert len(voters) <= MAX_VOTERS and voters == sorted(voters)
    # votes arrive in peer id order: the quorum is reached with the 3rd heavy vote (1196 + 3000
    # of 5196); the shortest passing prefix by weight is those 3 and 465 light voters (3465)
    assert set(i.peer_id for i in heavy[:3]) <= set(voters)
    assert len(voters) == 468 and table.weight_of(voters) == 3465
    # up to MAX_VOTERS precommitters: every one of them, in peer id order (unchanged)
    few = {i.peer_id: sign_vote(i, PRECOMMIT, net, 1, [1, 0, digest]) for i in ids[:MAX_VOTERS]}
    assert [v.voter for v in bft.commit_certificate(table, few).votes] == sorted(few)


def test_blocks_take_pooled_values_round_robin_by_sender():
    """A sender at its pool quota delayed another sender's value by its whole queue (arrival
    order: 1024 values, 16 blocks of 64). Blocks now take our own values first, then one value
    of each sender in turn: the honest value that arrived after the flood is in the next block."""
    core = BftCore(IDS[0], NET, table_of(IDS[:1]), FAST, 0.0, validate_value=valid_value)  # decides alone
    flooder, honest = IDS[8].peer_id, IDS[9].peer_id
    for k in range(4):
        core.on_message(flooder, BftValues(values=tuple(b"flood-%d-%d" % (k, i)
                                                        for i in range(MAX_VALUES_PER_MESSAGE))), 0.1)
    core.on_message(honest, BftValues(values=(b"honest-0", b"honest-1")), 0.2)
    assert core.submit(b"own-0", 0.3)
    assert core.pool_size > FAST.max_batch + 3
    block = core._make_block()
    assert len(block.values) == FAST.max_batch
    assert {b"own-0", b"honest-0", b"honest-1"} <= set(block.values)
    floods = [v for v in block.values if v.startswith(b"flood-")]  # the flooder's oldest, in order
    assert sorted(floods) == sorted(b"flood-0-%d" % i for i in range(FAST.max_batch - 3))


def test_validators_restarted_after_signing_votes_the_others_never_saw_still_commit():
    """Seen on `chimera up` after a run with 2 of 4 validators: every validator restarted at a
    height where its sign state held a prevote of round 0 that nobody had received. In round
    0 each wanted another prevote (nil after the propose timeout), the sign state refused it
    as a conflict, so none sent a prevote, nobody saw 2/3 of any prevotes, no timeout fired:
    the log stalled for good. A core now sends the vote it signed before instead (the same
    statement, so the same signature), and the height commits."""
    cluster = Cluster(4)
    for k, ident in enumerate(cluster.ids):
        signed = SignState(height=1, round=0, step=PREVOTE, block_hash=bytes([k + 1]) * 32 if k % 2 else None)
        cluster.cores[ident.peer_id] = BftCore(ident, NET, cluster.table, FAST, 0.0, sign_state=signed,
                                               validate_value=valid_value)
    first = cluster.cores[cluster.ids[0].peer_id]
    assert first.submit(b"after the restart", 0.0)
    cluster.advance(30.0)
    assert all(len(cs) >= 1 for cs in cluster.commits.values()), {p[:6]: len(c) for p, c in cluster.commits.items()}
    assert len({cs[0].block_hash for cs in cluster.commits.values()}) == 1
    # what each sent in round 0 is what it had signed before the restart: never a conflicting vote
    for k, ident in enumerate(cluster.ids):
        prevotes = [v for v in own_votes(cluster.log[ident.peer_id])
                    if v.vote_type == PREVOTE and (v.height, v.round) == (1, 0)]
        assert prevotes and {v.block_hash for v in prevotes} == {bytes([k + 1]) * 32 if k % 2 else None}


def test_every_validator_restarting_after_a_lock_of_an_older_round_still_commits():
    """Round 0: only A and B see the polka for X, lock it and precommit it; C and D precommit
    nil; round 1's proposal is lost and every validator precommits nil in round 1. Then all
    four restart (a power cut) with their sign state and the locked block persisted with it.
    The polka of round 0 (prevotes are not persisted) exists nowhere: a re-proposal of X naming
    valid round 0 (L28) was prevoted by nobody while A and B, locked on X, refused anything
    else: the height never committed. X is now proposed without a valid round (L22)."""
    c = Cluster(4)
    schedule = ProposerSchedule(c.table, 1)
    a = schedule.proposer(1, 0)
    b, c_, d = [i.peer_id for i in c.ids if i.peer_id != a]
    c.cores[a].submit(b"value-x", 0.0)

    def votes_in(message) -> list:
        return [message.vote] if isinstance(message, BftVote) else list(getattr(message, "votes", ()) or ())

    def lose(src, dst, action) -> bool:
        m = getattr(action, "message", None)
        if isinstance(m, BftProposal) and ((m.round == 0 and dst == d) or m.round == 1):
            return True
        return dst in (c_, d) and any(v.vote_type == PREVOTE and v.round == 0 and v.voter == a
                                      for v in votes_in(m))

    c.lose = lose
    t, last = 0.0, {}
    while t < 60:
        t += 0.01
        c.advance(t)
        persisted = {p: [x for x in c.log[p] if isinstance(x, PersistVote)] for p in c.cores}
        if all(persisted.values()):
            last = {p: v[-1] for p, v in persisted.items()}
            if all(x.state.round == 1 and x.state.step == PRECOMMIT for x in last.values()):
                break
    assert last and not any(c.commits.values())
    locked = {p: x.state.locked_round for p, x in last.items()}
    assert locked == {a: 0, b: 0, c_: None, d: None}, locked
    assert last[a].locked_block is not None and last[a].state.locked_hash == block_hash(last[a].locked_block)

    restarted = Cluster(4)
    for identity in restarted.ids:
        x = last[identity.peer_id]
        restarted.cores[identity.peer_id] = BftCore(identity, NET, restarted.table, FAST, 0.0,
                                                    validate_value=valid_value, sign_state=x.state,
                                                    locked_block=x.locked_block)
    t = 0.0
    while t < 600 and not all(restarted.commits.values()):
        t += 1.0
        restarted.advance(t)
    firsts = {p: v[0] for p, v in restarted.commits.items() if v}
    assert len(firsts) == 4, {p: len(v) for p, v in restarted.commits.items()}
    assert {x.block_hash for x in firsts.values()} == {last[a].state.locked_hash}  # X, the locked block
