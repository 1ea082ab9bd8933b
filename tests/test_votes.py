"""Application ballots: rules against an exact model, tally inputs, certificates, equivocation."""

from __future__ import annotations

from fractions import Fraction

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chimera.consensus.quorum import CertificateError, SignedVote, WeightTable, sign_vote
from chimera.consensus.votes import (
    RULES,
    Ballot,
    BallotVote,
    Equivocation,
    OutcomeStatus,
    Tally,
    VoteCertificate,
    VoteStatus,
    evaluate,
    rule_met,
    verify_equivocation,
    verify_vote_certificate,
)
from chimera.protocol.errors import LocalProtocolError, MalformedError, RemoteProtocolError
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.messages import decode_fields, encode_fields, reject_duplicate_keys

IDS = [SigningIdentity(bytes([i + 101]) * 32) for i in range(8)]
NET = b"\x07" * 16
A, B, C = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32
EPOCH = 4

_SIGNED: dict[tuple[bytes, int, bytes], BallotVote] = {}


def vote(ballot: Ballot, i: int, choice: bytes) -> BallotVote:
    key = (ballot.ballot_id, i, choice)
    if key not in _SIGNED:
        _SIGNED[key] = BallotVote.sign(IDS[i], ballot, choice, NET)
    return _SIGNED[key]


def forged(v: BallotVote) -> BallotVote:
    return BallotVote(ballot_id=v.ballot_id, choice=v.choice, voter=v.voter,
                      signature=bytes([v.signature[0] ^ 1]) + v.signature[1:])


def table_of(weights: list[int], epoch: int = EPOCH) -> WeightTable:
    return WeightTable(epoch=epoch, weights={IDS[i].peer_id: w for i, w in enumerate(weights)})


def wire(obj):
    """Through the codec and msgpack, as a peer would receive it."""
    raw = msgpack.packb(encode_fields(obj), use_bin_type=True)
    return decode_fields(type(obj), msgpack.unpackb(raw, raw=False, object_pairs_hook=reject_duplicate_keys))


# ---------------------------------------------------------------- the model


def model_met(rule: str, t: Fraction, weights: list[int], supporters: set[int]) -> bool:
    """The rules, written as plainly as possible with Fractions."""
    if rule == "unanimous":
        return supporters == set(range(len(weights)))
    if rule == "majority":
        return Fraction(len(supporters), len(weights)) > t
    return Fraction(sum(weights[i] for i in supporters), sum(weights)) > t


def model_run(rule, t, weights, votes):
    """Replay ``votes`` [(voter index, choice, forged)]: (decided choice, index of deciding vote, reachable)."""
    n = len(weights)
    counted: dict[int, bytes] = {}
    excluded: set[int] = set()
    decided = None
    for k, (i, choice, bad) in enumerate(votes):
        if i >= n or bad or i in excluded:
            continue
        if i in counted:
            if counted[i] != choice:
                excluded.add(i)
                del counted[i]
            continue
        counted[i] = choice
        if decided is None and model_met(rule, t, weights, {j for j, c in counted.items() if c == choice}):
            decided = (choice, k)
    remaining = set(range(n)) - counted.keys() - excluded
    reachable = any(model_met(rule, t, weights, {j for j, c in counted.items() if c == ch} | remaining)
                    for ch in (A, B, C))
    return decided, reachable


rules = st.sampled_from(RULES)
thresholds = st.sampled_from([Fraction(1, 2), Fraction(3, 5), Fraction(2, 3), Fraction(3, 4), Fraction(9, 10)])


def make_ballot(rule: str, t: Fraction, **kw) -> Ballot:
    return Ballot.create(epoch=EPOCH, purpose="task 17 result", rule=rule,
                         threshold=None if rule == "unanimous" else t, **kw)


@settings(max_examples=150, deadline=None)
@given(rules, thresholds,
       st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=6),
       st.lists(st.tuples(st.integers(min_value=0, max_value=6),  # 6, 7: often unknown voters
                          st.sampled_from([A, A, A, A, B, C]),  # skewed, so rules are often met
                          st.sampled_from([False] * 5 + [True])), max_size=16))
def test_tally_matches_model(rule, t, weights, raw_votes):
    ballot = make_ballot(rule, t)
    t = ballot.threshold
    table = table_of(weights)
    tally = Tally(ballot, table, NET)
    decided_at = None
    for k, (i, choice, bad) in enumerate(raw_votes):
        v = vote(ballot, i, choice)
        result = tally.add(forged(v) if bad else v)
        if i >= len(weights):
            assert result.status is VoteStatus.UNKNOWN_VOTER
        elif bad:
            assert result.status in (VoteStatus.BAD_SIGNATURE, VoteStatus.EQUIVOCATOR)
        if result.decided:
            assert decided_at is None
            decided_at = (choice, k)
    expected, reachable = model_run(rule, t, weights, raw_votes)
    assert decided_at == expected  # early: decided by exactly the vote the model names
    out = tally.outcome()
    if expected is None:
        assert out.choice is None and out.certificate is None
        assert tally.can_still_decide() == reachable
        assert out.status is (OutcomeStatus.PENDING if reachable else OutcomeStatus.FAILED)
        assert out.reason == ("pending" if reachable else "impossible")
    else:
        assert out.decided and out.choice == expected[0] and tally.can_still_decide()
        cert = out.certificate
        verify_vote_certificate(cert, table, NET)
        verify_vote_certificate(wire(cert), table, NET)
        assert wire(cert) == cert
    # the batch helper agrees
    batch = evaluate(ballot, table, NET, [forged(vote(ballot, i, c)) if bad else vote(ballot, i, c)
                                          for i, c, bad in raw_votes])
    assert (batch.status, batch.choice) == (out.status, out.choice)


@settings(max_examples=100, deadline=None)
@given(rules, thresholds, st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=6),
       st.data())
def test_once_everyone_voted_the_ballot_is_decided_or_failed(rule, t, weights, data):
    ballot = make_ballot(rule, t)
    table = table_of(weights)
    choices = data.draw(st.lists(st.sampled_from([A, A, B]), min_size=len(weights), max_size=len(weights)))
    order = data.draw(st.permutations(range(len(weights))))
    raw = [(i, choices[i], False) for i in order]
    out = evaluate(ballot, table, NET, [vote(ballot, i, c) for i, c, _ in raw])
    expected, reachable = model_run(rule, ballot.threshold, weights, raw)
    assert out.status is (OutcomeStatus.DECIDED if expected else OutcomeStatus.FAILED)
    assert out.choice == (expected and expected[0]) and reachable == bool(expected)
    if expected:
        assert out.certificate.voters() == sorted(IDS[i].peer_id for i in order[:expected[1] + 1]
                                                  if choices[i] == expected[0])


@settings(max_examples=150, deadline=None)
@given(rules, thresholds, st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=6),
       st.data())
def test_certificate_verification_recomputes_the_rule(rule, t, weights, data):
    ballot = make_ballot(rule, t)
    table = table_of(weights)
    chosen = data.draw(st.sets(st.integers(min_value=0, max_value=len(weights) - 1)))
    cert = VoteCertificate(ballot=ballot, choice=B,
                           votes=tuple(vote(ballot, i, B).signed_vote() for i in sorted(chosen)))
    assert rule_met(ballot, table, cert.voters()) == model_met(rule, ballot.threshold, weights, chosen)
    if model_met(rule, ballot.threshold, weights, chosen):
        verify_vote_certificate(wire(cert), table, NET)
    else:
        with pytest.raises(CertificateError):
            verify_vote_certificate(wire(cert), table, NET)


# ------------------------------------------------------- exact thresholds


def test_thresholds_are_strict():
    four = table_of([1, 1, 1, 1])
    majority = make_ballot("majority", Fraction(1, 2))
    assert not rule_met(majority, four, [IDS[0].peer_id, IDS[1].peer_id])  # exactly half
    assert rule_met(majority, four, [i.peer_id for i in IDS[:3]])
    # majority counts peers, not weight
    skewed = table_of([100, 1, 1])
    assert not rule_met(majority, skewed, [IDS[0].peer_id])
    assert rule_met(make_ballot("weighted", Fraction(1, 2)), skewed, [IDS[0].peer_id])
    halves = table_of([5, 3, 2])
    weighted = make_ballot("weighted", Fraction(1, 2))
    assert not rule_met(weighted, halves, [IDS[0].peer_id])  # 5 of 10: not more than half
    assert rule_met(weighted, halves, [IDS[0].peer_id, IDS[2].peer_id])
    quorum = make_ballot("quorum", None)
    assert quorum.threshold == Fraction(2, 3)
    three = table_of([1, 1, 1])
    assert not rule_met(quorum, three, [IDS[0].peer_id, IDS[1].peer_id])  # exactly 2/3
    assert rule_met(quorum, three, [i.peer_id for i in IDS[:3]])
    unanimous = make_ballot("unanimous", None)
    assert unanimous.threshold == 1
    assert not rule_met(unanimous, three, [IDS[0].peer_id, IDS[1].peer_id, IDS[5].peer_id])
    assert rule_met(unanimous, three, [i.peer_id for i in IDS[:3]] * 2)


# ------------------------------------------------------------ ballot record


def test_ballot_terms_are_validated_and_bound_to_the_id():
    ballot = make_ballot("weighted", Fraction(3, 5), options=(A, B), deadline_ms=1_000)
    assert wire(ballot) == ballot and len(ballot.ballot_id) == 32
    assert "weighted>3/5" in ballot.describe()
    fields = encode_fields(ballot)
    for change in ({"threshold_num": 1, "threshold_den": 2},  # a lower threshold under the same id
                   {"rule": "majority"}, {"purpose": "other"}, {"epoch": 5}, {"options": [A]},
                   {"deadline_ms": None},
                   {"threshold_num": 6, "threshold_den": 10},  # not reduced
                   {"ballot_id": b"\x00" * 32}, {"rule": "plurality"}, {"extra": 1}):
        with pytest.raises(MalformedError):
            decode_fields(Ballot, {**fields, **change})
    for rule, t in (("majority", Fraction(1, 3)), ("weighted", Fraction(1)), ("quorum", Fraction(0)),
                    ("unanimous", Fraction(1, 2)), ("plurality", None)):
        with pytest.raises(LocalProtocolError):
            Ballot.create(epoch=0, purpose="x", rule=rule, threshold=t)
    for bad in (dict(threshold=0.5), dict(threshold=True), dict(threshold=Fraction(2**33 - 1, 2**33)),
                dict(options=(A, A)), dict(options=(b"",)),
                dict(options=(b"x" * 65,)), dict(purpose="p" * 257)):
        kw = dict(epoch=0, purpose="x", rule="weighted") | bad
        with pytest.raises(LocalProtocolError):
            Ballot.create(**kw)
    with pytest.raises(ValueError):  # direct construction with a made-up id
        Ballot(ballot_id=b"\x01" * 32, epoch=0, purpose="x", rule="weighted",
               threshold_num=1, threshold_den=2)


def test_vote_signing_and_choice_rules():
    ballot = make_ballot("majority", Fraction(1, 2), options=(A, B))
    v = vote(ballot, 0, A)
    assert wire(v) == v and v.verify(EPOCH, NET)
    assert not v.verify(EPOCH + 1, NET) and not v.verify(EPOCH, b"\x08" * 16)
    with pytest.raises(LocalProtocolError):
        BallotVote.sign(IDS[0], ballot, C, NET)  # not an option
    with pytest.raises(LocalProtocolError):
        BallotVote.sign(IDS[0], make_ballot("weighted", Fraction(1, 2)), b"x" * 65, NET)
    with pytest.raises(MalformedError):
        decode_fields(BallotVote, {**encode_fields(v), "choice": b""})


# ------------------------------------------------------------------- tally


def test_tally_refuses_bad_votes_without_changing_the_count():
    ballot = make_ballot("weighted", Fraction(1, 2), options=(A, B), deadline_ms=5_000)
    other = make_ballot("weighted", Fraction(2, 3), options=(A, B), deadline_ms=5_000)
    tally = Tally(ballot, table_of([1, 1, 1, 1]), NET)
    cases = [
        (vote(other, 0, A), VoteStatus.WRONG_BALLOT),
        (vote(ballot, 6, A), VoteStatus.UNKNOWN_VOTER),
        (forged(vote(ballot, 0, A)), VoteStatus.BAD_SIGNATURE),
        (BallotVote(ballot_id=ballot.ballot_id, choice=C, voter=IDS[0].peer_id,
                    signature=vote(ballot, 0, A).signature), VoteStatus.INVALID_CHOICE),
        # a vote signed for the same ballot id by another network does not verify
        (BallotVote.sign(IDS[0], ballot, A, b"\x08" * 16), VoteStatus.BAD_SIGNATURE),
    ]
    for v, status in cases:
        result = tally.add(v, now_ms=4_999)
        assert result.status is status and not result.accepted, (status, result)
    assert tally.counts() == {} and tally.evidence == []
    assert tally.add(vote(ballot, 0, A), now_ms=5_000).status is VoteStatus.LATE
    assert tally.add(vote(ballot, 0, A), now_ms=4_999).accepted
    assert tally.add(vote(ballot, 0, A), now_ms=4_999).status is VoteStatus.DUPLICATE
    # a forged "other choice" from a counted voter is a bad signature, never an equivocation
    assert tally.add(forged(vote(ballot, 0, B))).status is VoteStatus.BAD_SIGNATURE
    assert tally.counts() == {A: (1, 1)} and tally.evidence == []
    with pytest.raises(LocalProtocolError):
        Tally(ballot, table_of([1, 1], epoch=EPOCH + 1), NET)


def test_early_decision_is_final_and_its_certificate_stays_valid():
    ballot = make_ballot("weighted", Fraction(1, 2))
    table = table_of([3, 2, 2, 2])  # total 9: more than 4.5 needed
    tally = Tally(ballot, table, NET)
    assert not tally.add(vote(ballot, 0, A)).decided
    assert tally.outcome().status is OutcomeStatus.PENDING
    assert not tally.add(vote(ballot, 1, B)).decided
    result = tally.add(vote(ballot, 2, A))  # 3 + 2 = 5 > 4.5
    assert result.decided and tally.decided
    out = tally.outcome()
    assert out.choice == A and out.certificate.voters() == sorted([IDS[0].peer_id, IDS[2].peer_id])
    # later votes: counted, decision unchanged; a supporter caught equivocating is listed
    assert not tally.add(vote(ballot, 3, A)).decided
    eq = tally.add(vote(ballot, 0, B))
    assert eq.status is VoteStatus.EQUIVOCATION
    later = tally.outcome(now_ms=10**12)
    assert later.decided and later.choice == A and later.certificate == out.certificate
    assert later.equivocators == (IDS[0].peer_id,)
    verify_vote_certificate(later.certificate, table, NET)


def test_equivocation_is_detected_reported_and_excluded():
    ballot = make_ballot("majority", Fraction(1, 2))
    table = table_of([1, 1, 1, 1, 1])
    tally = Tally(ballot, table, NET)
    tally.add(vote(ballot, 0, A))
    tally.add(vote(ballot, 1, A))
    result = tally.add(vote(ballot, 1, B))
    assert result.status is VoteStatus.EQUIVOCATION and not result.accepted
    evidence = result.evidence
    assert (evidence.first, evidence.second) == (vote(ballot, 1, A), vote(ballot, 1, B))
    assert verify_equivocation(wire(evidence), EPOCH, NET) == IDS[1].peer_id
    assert tally.evidence == [evidence]
    assert tally.add(vote(ballot, 1, A)).status is VoteStatus.EQUIVOCATOR
    assert tally.counts() == {A: (1, 1)}
    # the equivocator's weight is gone: 4 voters left, A needs 3 of 5 -> still reachable
    tally.add(vote(ballot, 2, A))
    assert not tally.decided
    assert tally.add(vote(ballot, 3, A)).decided
    assert IDS[1].peer_id not in tally.outcome().certificate.voters()
    for bogus in (Equivocation(first=vote(ballot, 1, A), second=vote(ballot, 1, A)),   # same choice
                  Equivocation(first=vote(ballot, 1, A), second=vote(ballot, 2, B)),   # two voters
                  Equivocation(first=vote(ballot, 1, A), second=forged(vote(ballot, 1, B)))):
        with pytest.raises(CertificateError) as err:
            verify_equivocation(bogus, EPOCH, NET)
        assert err.value.reason == "bad_evidence"


def test_unanimous_fails_as_soon_as_split_and_deadline_fails_pending():
    ballot = make_ballot("unanimous", None, deadline_ms=1_000)
    tally = Tally(ballot, table_of([1, 1, 1]), NET)
    tally.add(vote(ballot, 0, A), now_ms=10)
    assert tally.can_still_decide()
    assert tally.outcome(now_ms=999).status is OutcomeStatus.PENDING
    out = tally.outcome(now_ms=1_000)
    assert (out.status, out.reason) == (OutcomeStatus.FAILED, "deadline")
    tally.add(vote(ballot, 1, B), now_ms=20)
    assert not tally.can_still_decide()
    assert tally.outcome().reason == "impossible"
    # an equivocation also makes unanimity impossible
    tally2 = Tally(ballot, table_of([1, 1, 1]), NET)
    tally2.add(vote(ballot, 0, A))
    tally2.add(vote(ballot, 0, B))
    assert not tally2.can_still_decide()
    # and all three agreeing decides
    ok = evaluate(ballot, table_of([1, 1, 1]), NET, [vote(ballot, i, C) for i in range(3)])
    assert ok.decided and ok.choice == C and "decided" in ok.describe()


# ------------------------------------------------------------ certificates


def test_certificate_round_trip_and_every_rejection():
    ballot = make_ballot("quorum", Fraction(2, 3), options=(A, B))
    table = table_of([10, 10, 10, 10])
    good = evaluate(ballot, table, NET, [vote(ballot, i, A) for i in range(3)]).certificate
    verify_vote_certificate(good, table, NET)
    assert wire(good) == good and good.ballot_votes()[0] == vote(ballot, 0, A)
    sigs = list(good.votes)
    other = make_ballot("quorum", Fraction(3, 4), options=(A, B))

    def cert(votes, *, b=ballot, choice=A):
        return VoteCertificate(ballot=b, choice=choice, votes=tuple(votes))

    tampered_sig = SignedVote(voter=sigs[0].voter, signature=bytes(64))
    bad = {
        "tampered signature": cert([tampered_sig] + sigs[1:]),
        "tampered choice": cert(sigs, choice=B),
        "insufficient": cert(sigs[:2]),
        "duplicate voter": cert(sigs + sigs[:1]),
        "unknown voter": cert(sigs + [vote(ballot, 6, A).signed_vote()]),
        "votes of another ballot": cert([vote(other, i, A).signed_vote() for i in range(3)]),
        "votes moved to another ballot": cert(sigs, b=other),
        "choice outside the options": cert(   # validly signed, but C is not an option
            [sign_vote(IDS[i], "ballot", NET, EPOCH, [ballot.ballot_id, C]) for i in range(3)], choice=C),
    }
    for name, c in bad.items():
        try:
            verify_vote_certificate(wire(c), table, NET)
        except CertificateError:
            continue
        pytest.fail(f"accepted a certificate with {name}")
    with pytest.raises(CertificateError):
        verify_vote_certificate(good, table_of([10, 10, 10, 10], epoch=EPOCH + 1), NET)
    with pytest.raises(CertificateError):
        verify_vote_certificate(good, table, b"\x08" * 16)
    with pytest.raises(CertificateError):  # another epoch's weights: voter 2 is gone
        verify_vote_certificate(good, WeightTable(epoch=EPOCH, weights={IDS[i].peer_id: 10 for i in (0, 1, 3)}),
                                NET)
    assert issubclass(CertificateError, RemoteProtocolError)
    # a wire certificate cannot smuggle a lower threshold under the same ballot id
    fields = encode_fields(good)
    fields["ballot"] = {**fields["ballot"], "threshold_num": 1, "threshold_den": 2}
    with pytest.raises(MalformedError):
        decode_fields(VoteCertificate, fields)
