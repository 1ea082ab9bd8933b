"""The ledger: log values, their validation and the epoch state machine (pure)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chimera.consensus.bft import Block, CertifiedCommit, Equivocation, Vote
from chimera.consensus.ledger import (
    Decision,
    Join,
    Ledger,
    decode_value,
    encode_decision,
    encode_evidence,
    encode_join,
    encode_opinion,
)
from chimera.consensus.quorum import QuorumCertificate, WeightTable, sign_vote
from chimera.consensus.reputation import sign_opinion
from chimera.protocol.errors import LocalProtocolError, MalformedError
from chimera.protocol.identity import SigningIdentity

NID = b"\x07" * 16
IDS = [SigningIdentity.generate() for _ in range(5)]
VALIDATORS = IDS[:4]
NEWCOMER = IDS[4]


def genesis() -> WeightTable:
    return WeightTable(epoch=0, weights={i.peer_id: 1000 for i in VALIDATORS})


def commit(height: int, values, epoch: int = 0) -> CertifiedCommit:
    # The ledger trusts the BFT core to have verified the certificate; an empty one will do here.
    block = Block(height=height, epoch=epoch, proposer=VALIDATORS[0].peer_id, parent_hash=bytes(32),
                  values=tuple(sorted(values, key=lambda v: __import__("hashlib").sha256(v).digest())))
    return CertifiedCommit(round=0, block=block, certificate=QuorumCertificate(votes=()))


def test_values_round_trip_and_validate():
    ledger = Ledger(NID, genesis(), epoch_length=4)
    d = encode_decision(VALIDATORS[1], NID, 5, b"hello")
    assert decode_value(d) == Decision(VALIDATORS[1].peer_id, 5, b"hello", decode_value(d).signature)
    assert ledger.validate_value(d)
    j = encode_join(NEWCOMER, NID)
    assert isinstance(decode_value(j), Join) and ledger.validate_value(j)
    # Bound to the network and to the author: another network or a swapped author fails.
    assert not Ledger(b"\x08" * 16, genesis(), 4).validate_value(d)
    forged = msgpack.unpackb(d)
    forged[1] = VALIDATORS[2].peer_id
    assert not ledger.validate_value(msgpack.packb(forged))
    with pytest.raises(LocalProtocolError):
        encode_decision(VALIDATORS[0], NID, 1, b"x" * 5000)


def test_a_join_names_its_epoch_and_is_valid_in_it_and_the_next():
    """A join was signed for epoch 0 and had the same bytes every time: one deferred by a full
    epoch was asked again next epoch and the BFT core's dedupe refused it for dedupe_heights
    (~11 epochs of 100). It now names the epoch it was asked in (valid then and one epoch
    after), so every epoch's request is a new value; the legacy 3-element form still applies."""
    ledger = Ledger(NID, genesis(), epoch_length=1)
    joins = [encode_join(NEWCOMER, NID, e) for e in range(4)]
    assert len(set(joins)) == 4 and [decode_value(j).epoch for j in joins] == [0, 1, 2, 3]
    assert [ledger.validate_value(j) for j in joins] == [True, None, False, False]  # None: not yet
    ledger.apply(commit(1, [], epoch=0))
    assert [ledger.validate_value(j) for j in joins] == [True, True, None, False]
    ledger.apply(commit(2, [], epoch=1))
    assert [ledger.validate_value(j) for j in joins] == [False, True, True, None]  # the first is stale
    out = ledger.apply(commit(3, [joins[0], joins[2]], epoch=2))
    assert out.joins == [NEWCOMER.peer_id] and out.ignored == ["invalid: bad signature, or outside its epoch window"]
    # the signed epoch is the named one: a join moved to another epoch does not verify
    moved = msgpack.unpackb(joins[2])
    moved[2] = 3
    assert not ledger.validate_value(msgpack.packb(moved))
    # legacy ["join", peer_id, signature] (signed for epoch 0): no window, canonical, applied
    legacy_sig = sign_vote(IDS[3], "validator_join", NID, 0, [IDS[3].peer_id]).signature
    legacy = msgpack.packb(["join", IDS[3].peer_id, legacy_sig])
    assert decode_value(legacy) == Join(IDS[3].peer_id, legacy_sig) and decode_value(legacy).epoch is None
    fresh = Ledger(NID, WeightTable(epoch=0, weights={i.peer_id: 1000 for i in IDS[:3]}), epoch_length=1)
    assert fresh.validate_value(legacy)
    assert fresh.apply(commit(1, [legacy])).joins == [IDS[3].peer_id]
    for bad in (-1, 2**32, True):
        with pytest.raises(LocalProtocolError):
            encode_join(NEWCOMER, NID, bad)
    with pytest.raises(MalformedError):
        decode_value(msgpack.packb(["join", NEWCOMER.peer_id, 2**32, bytes(64)]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_of_arbitrary_bytes_only_raises_malformed(blob):
    try:
        decode_value(blob)
    except MalformedError:
        pass
    assert Ledger(NID, genesis(), 4).validate_value(blob) in (True, False)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=70) | st.text(max_size=60),
                    lambda inner: st.lists(inner, max_size=6), max_leaves=12))
def test_decode_of_arbitrary_msgpack_only_raises_malformed(obj):
    try:
        decode_value(msgpack.packb(["decision", *obj] if isinstance(obj, list) else obj))
    except MalformedError:
        pass


def _opinion(author, epoch, scores):
    return encode_opinion(sign_opinion(author, NID, epoch, {p.peer_id: s for p, s in scores.items()}))


def _equivocation(voter, height=1):
    votes = []
    for digest in (b"\x01" * 32, None):
        statement = [height, 0, digest]
        votes.append(Vote(vote_type="prevote", height=height, round=0, block_hash=digest,
                          signed=sign_vote(voter, "prevote", NID, 0, statement)))
    return Equivocation(first=votes[0], second=votes[1])


def test_epoch_boundary_applies_opinions_joins_and_cuts_an_equivocator():
    ledger = Ledger(NID, genesis(), epoch_length=3)
    cheater = VALIDATORS[3]
    honest = VALIDATORS[:3]
    out1 = ledger.apply(commit(1, [encode_decision(honest[0], NID, 1, b"a"), encode_join(NEWCOMER, NID)]))
    assert [d.data for d in out1.decisions] == [b"a"] and out1.joins == [NEWCOMER.peer_id]
    opinions = [_opinion(a, 0, {p: 900_000 for p in VALIDATORS if p is not a}) for a in honest]
    # The cheater's low opinions cannot move the weighted median of the honest majority.
    opinions.append(_opinion(cheater, 0, {p: 0 for p in honest}))
    out2 = ledger.apply(commit(2, opinions + [encode_evidence(_equivocation(cheater))]))
    assert sorted(out2.opinions) == sorted(a.peer_id for a in VALIDATORS) and out2.evidence == [cheater.peer_id]
    # A second opinion by the same author and a repeated join are committed but ignored.
    out3 = ledger.apply(commit(3, [_opinion(honest[0], 0, {honest[1]: 1}), encode_join(NEWCOMER, NID)]))
    assert len(out3.ignored) == 2
    table = out3.new_table
    assert table is not None and table.epoch == 1 and ledger.table_height == 4
    assert table.weights[cheater.peer_id] == 1  # cut to the floor
    assert table.weights[NEWCOMER.peer_id] == 100  # newcomer bound (WeightPolicy default)
    assert all(table.weights[h.peer_id] == 900 for h in honest)  # median 0.9 * weight_scale
    # Opinions of the old epoch no longer count.
    out4 = ledger.apply(commit(4, [_opinion(honest[1], 0, {honest[0]: 1})], epoch=1))
    assert out4.opinions == [] and out4.ignored


def test_evidence_against_a_non_validator_or_not_conflicting_is_ignored():
    ledger = Ledger(NID, genesis(), epoch_length=10)
    out = ledger.apply(commit(1, [encode_evidence(_equivocation(NEWCOMER))]))
    assert out.evidence == [] and out.ignored


def test_heights_must_come_in_order():
    ledger = Ledger(NID, genesis(), epoch_length=10)
    with pytest.raises(LocalProtocolError):
        ledger.apply(commit(2, []))


def test_snapshot_restore_then_replay_equals_straight_replay():
    blocks = [commit(1, [encode_join(NEWCOMER, NID)]),
              commit(2, [_opinion(a, 0, {p: 800_000 for p in VALIDATORS if p is not a}) for a in VALIDATORS]),
              commit(3, [encode_decision(VALIDATORS[0], NID, 9, b"z")]),
              commit(4, [encode_evidence(_equivocation(VALIDATORS[2], height=4))], epoch=1)]
    straight = Ledger(NID, genesis(), epoch_length=2)
    for b in blocks:
        straight.apply(b)
    partial = Ledger(NID, genesis(), epoch_length=2)
    for b in blocks[:2]:
        partial.apply(b)
    restored = Ledger(NID, genesis(), epoch_length=2)
    restored.restore(partial.snapshot())
    for b in blocks[2:]:
        restored.apply(b)
    assert restored.snapshot() == straight.snapshot()
    with pytest.raises(MalformedError):
        restored.restore(b"\x93junk")


def test_a_re_encoded_copy_of_a_signed_value_is_invalid():
    """Dedupe is by the hash of the exact bytes: a longer encoding of the same fields must not pass."""
    ledger = Ledger(NID, genesis(), epoch_length=4)
    value = encode_decision(VALIDATORS[0], NID, 5, b"pay")
    items = msgpack.unpackb(value)
    packer = msgpack.Packer()
    wide_nonce = b"\xcf" + (5).to_bytes(8, "big")  # uint64 form of 5: same value, other bytes
    reencoded = (b"\x95" + packer.pack(items[0]) + packer.pack(items[1]) + wide_nonce
                 + packer.pack(items[3]) + packer.pack(items[4]))
    assert decode_value(reencoded) == decode_value(value) and reencoded != value
    assert ledger.validate_value(value) and not ledger.validate_value(reencoded)


def test_training_values_pass_only_through_the_app_validator_and_reach_the_outcome():
    from chimera.consensus.training import JobSpec, encode_log_value

    job = encode_log_value(JobSpec(name="j", model_kind="sgd_classifier", n_features=4, classes=(0, 1),
                                   rounds=2, learning_rate=0.1,
                                   participants=tuple(sorted(i.peer_id for i in VALIDATORS)), quorum=3,
                                   round_deadline_s=5.0))
    assert not Ledger(NID, genesis(), 4).validate_value(job)  # no app validator: refused
    seen = []
    verdict = {"ok": False}

    def app(value: bytes) -> bool:
        seen.append(value)
        return verdict["ok"]

    ledger = Ledger(NID, genesis(), 4, app_validator=app)
    assert not ledger.validate_value(job)
    verdict["ok"] = True
    assert ledger.validate_value(job) and len(seen) == 2  # state-dependent: never cached
    # a non-canonical re-encoding or an unknown fl_ tag never reaches the app validator
    tag, body = msgpack.unpackb(job)
    assert not ledger.validate_value(msgpack.packb([tag, dict(reversed(list(body.items())))]))
    assert not ledger.validate_value(msgpack.packb(["fl_other", {}])) and len(seen) == 2
    d = encode_decision(VALIDATORS[0], NID, 1, b"x")
    out = ledger.apply(commit(1, [job, d, msgpack.packb(["fl_bogus", 1])]))
    assert out.app_values == [job] and len(out.decisions) == 1
    assert out.ignored == ["malformed application value"]


def test_a_decision_is_valid_only_inside_its_epoch_window():
    """A signed decision names the epoch it was made in (the nonce's high 32 bits, signed): a
    replay after its window fails (PROTOCOL.md §15); inside the window the BFT dedupe holds."""
    from chimera.consensus.ledger import decision_nonce, decision_window_epochs, dedupe_heights_for

    length = 250
    window = decision_window_epochs(length)
    assert window == 4 and dedupe_heights_for(length) == 5 * length + 1 >= 1000
    assert decision_window_epochs(5000) == 1 and dedupe_heights_for(5000) == 10_001
    ledger = Ledger(NID, genesis(), epoch_length=length)
    old = encode_decision(VALIDATORS[0], NID, decision_nonce(0, 7), b"pay once")
    ahead = encode_decision(VALIDATORS[0], NID, decision_nonce(2, 8), b"from a peer ahead")
    far = encode_decision(VALIDATORS[0], NID, decision_nonce(window + 1, 9), b"far ahead")
    assert ledger.validate_value(old) is True
    assert ledger.validate_value(ahead) is None  # this ledger is behind: not the author's fault
    assert ledger.validate_value(far) is False
    ledger.table = WeightTable(epoch=window, weights=ledger.table.weights)  # the epochs pass
    assert ledger.validate_value(old) is True and ledger.validate_value(ahead) is True
    ledger.table = WeightTable(epoch=window + 1, weights=ledger.table.weights)
    assert ledger.validate_value(old) is False  # its window is over: a replay is refused
    ledger.height = 1  # apply refuses it too (deterministically, from the block's epoch)
    out = ledger.apply(commit(2, [old], epoch=window + 1))
    assert out.decisions == [] and out.ignored
    with pytest.raises(LocalProtocolError):
        decision_nonce(1 << 32, 0)


def test_late_evidence_of_the_last_epoch_counts_once():
    """An equivocation in the last heights of an epoch is committed in the next one: it is checked
    against the last epoch's table and cuts the offender at the following boundary, once."""
    ledger = Ledger(NID, genesis(), epoch_length=2)
    cheater = VALIDATORS[3]
    ledger.apply(commit(1, []))
    assert ledger.apply(commit(2, [])).new_table.epoch == 1
    late = encode_evidence(_equivocation(cheater, height=2))  # votes of epoch 0
    out3 = ledger.apply(commit(3, [late], epoch=1))
    assert out3.evidence == [cheater.peer_id]
    out4 = ledger.apply(commit(4, [], epoch=1))
    assert out4.new_table.weights[cheater.peer_id] == 1
    # the same offence again in epoch 2 (its votes are now two epochs old) changes nothing
    again = ledger.apply(commit(5, [encode_evidence(_equivocation(cheater, height=1))], epoch=2))
    assert again.evidence == [] and again.ignored
    restored = Ledger(NID, genesis(), epoch_length=2)
    restored.restore(ledger.snapshot())
    assert restored.previous_table == ledger.previous_table and restored.snapshot() == ledger.snapshot()


def test_opinions_in_parts_give_the_same_table_as_whole_opinions():
    """With many validators an opinion does not fit one 4096-byte value: an author commits
    it in parts (disjoint peers, each signed); the next table is the same as from whole
    opinions, and a part about peers already scored is ignored."""
    many = [SigningIdentity.generate() for _ in range(70)]
    table = WeightTable(epoch=0, weights={i.peer_id: 1000 for i in many})
    scores = {a.peer_id: {p.peer_id: 500_000 + 7_000 * ((k + j) % 60) for j, p in enumerate(many) if p is not a}
              for k, a in enumerate(many)}

    def signed(author, part):
        return encode_opinion(sign_opinion(author, NID, 0, part))

    whole, parts = Ledger(NID, table, epoch_length=2), Ledger(NID, table, epoch_length=2)
    whole.apply(commit(1, [signed(a, scores[a.peer_id]) for a in many]))
    split = []
    for a in many:
        peers = sorted(scores[a.peer_id])
        split += [signed(a, {p: scores[a.peer_id][p] for p in peers[k:k + 32]}) for k in range(0, len(peers), 32)]
    assert all(len(v) <= 4096 for v in split) and len(split) == 3 * len(many)
    out = parts.apply(commit(1, split))
    assert not out.ignored
    again = parts.apply(commit(2, [signed(many[0], {many[1].peer_id: 0})]))  # already scored: ignored
    assert again.ignored and again.new_table is not None
    expected = whole.apply(commit(2, [])).new_table
    assert again.new_table == expected
    assert expected.weights != table.weights  # the opinions did move the weights


def test_a_join_flood_admits_the_epochs_share_in_commit_order_and_keeps_the_quorum():
    """Anyone with a key can commit a join. The ledger admits max(1, budget // newcomer weight)
    joins per epoch (budget: a quarter of the table's total), in commit order; the rest are
    committed but ignored (counted in the outcome) and may join in a later epoch. Before
    2026-12 every join was admitted and each newcomer kept weight >= 1: a few thousand fresh
    keys outweighed the validators, who could never pass a quorum again."""
    import hashlib

    flood = [SigningIdentity(hashlib.sha256(b"sybil-%d" % i).digest()) for i in range(60)]
    joins = [encode_join(s, NID) for s in flood]
    ledger = Ledger(NID, genesis(), epoch_length=4)
    admitted, deferred = [], []
    for height in range(1, 5):
        out = ledger.apply(commit(height, joins[(height - 1) * 15:height * 15]))
        admitted += out.joins
        deferred += out.joins_deferred
    order = [v for h in range(4) for v in commit(h + 1, joins[h * 15:(h + 1) * 15]).block.values]
    by_value = {encode_join(s, NID): s.peer_id for s in flood}
    assert admitted == [by_value[v] for v in order][:10] and len(deferred) == 50  # 4000 // 4 // 100
    table = out.new_table
    honest = [v.peer_id for v in VALIDATORS]
    assert len(table.weights) == 14 and table.total - table.weight_of(honest) == 1000
    assert table.passes(honest)
    # next epoch (total 5000: 12 joins), a deferred peer joins again and is admitted
    out = ledger.apply(commit(5, [encode_join(flood[k], NID) for k in range(60)
                                  if flood[k].peer_id in deferred[:13]], epoch=1))
    assert len(out.joins) == 12 and len(out.joins_deferred) == 1


def test_joins_never_grow_the_table_beyond_max_voters():
    from chimera.consensus.quorum import MAX_VOTERS

    big = [SigningIdentity.generate().peer_id for _ in range(MAX_VOTERS - 2)]
    ledger = Ledger(NID, WeightTable(epoch=0, weights={p: 1000 for p in big}), epoch_length=1)
    out = ledger.apply(commit(1, [encode_join(i, NID) for i in IDS]))
    assert len(out.joins) == 2 and len(out.joins_deferred) == 3
    assert len(out.new_table.weights) == MAX_VOTERS
    out = ledger.apply(commit(2, [encode_join(i, NID) for i in IDS], epoch=1))
    assert out.joins == [] and len(out.joins_deferred) == 3
