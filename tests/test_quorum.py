"""Quorum arithmetic and certificate verification (unit + property tests)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chimera.consensus.quorum import (
    CertificateError,
    QuorumCertificate,
    WeightTable,
    sign_vote,
    verify_certificate,
)
from chimera.protocol.errors import LocalProtocolError, RemoteProtocolError
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.messages import decode_fields, encode_fields

IDS = [SigningIdentity(bytes([i + 1]) * 32) for i in range(7)]
NET = b"\x09" * 16
STATEMENT = [5, 0, b"\x11" * 32]


@given(st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=7), st.data())
def test_passes_matches_exact_model(weights, data):
    table = WeightTable(epoch=0, weights={IDS[i].peer_id: w for i, w in enumerate(weights)})
    chosen = data.draw(st.sets(st.integers(min_value=0, max_value=len(weights) - 1)))
    voters = [IDS[i].peer_id for i in chosen] * 2  # duplicates never count twice
    got = sum(weights[i] for i in chosen)
    assert table.passes(voters) == (Fraction(got, sum(weights)) > Fraction(2, 3))
    assert table.passes(voters, Fraction(1, 2)) == (2 * got > sum(weights))


def test_exactly_two_thirds_is_not_enough():
    table = WeightTable(epoch=1, weights={IDS[0].peer_id: 1, IDS[1].peer_id: 1, IDS[2].peer_id: 1})
    assert not table.passes([IDS[0].peer_id, IDS[1].peer_id])
    assert table.passes([i.peer_id for i in IDS[:3]])


def test_weight_table_rejects_bad_weights():
    for weights in ({}, {IDS[0].peer_id: 0}, {IDS[0].peer_id: 1.5}, {IDS[0].peer_id: True}):
        with pytest.raises(LocalProtocolError):
            WeightTable(epoch=0, weights=weights)


def _cert(signers, purpose="precommit", epoch=3, statement=STATEMENT):
    return QuorumCertificate(votes=tuple(sign_vote(s, purpose, NET, epoch, statement) for s in signers))


def test_certificate_verifies_and_rejects_every_defect():
    table = WeightTable(epoch=3, weights={i.peer_id: 10 for i in IDS[:4]})
    good = _cert(IDS[:3])
    verify_certificate(good, table, "precommit", NET, STATEMENT)
    # survives the wire codec
    verify_certificate(decode_fields(QuorumCertificate, encode_fields(good)), table, "precommit", NET, STATEMENT)
    bad_cases = [
        _cert(IDS[:2]),                                    # not enough weight
        QuorumCertificate(votes=good.votes + good.votes[:1]),  # duplicate voter
        _cert(IDS[:2] + [IDS[5]]),                         # unknown voter
        _cert(IDS[:3], purpose="prevote"),                 # other purpose
        _cert(IDS[:3], epoch=4),                           # other epoch
        _cert(IDS[:3], statement=[5, 1, b"\x11" * 32]),    # other round
    ]
    for cert in bad_cases:
        with pytest.raises(CertificateError):
            verify_certificate(cert, table, "precommit", NET, STATEMENT)
    assert issubclass(CertificateError, RemoteProtocolError)
    forged = list(good.votes)
    forged[0] = type(forged[0])(voter=forged[0].voter, signature=bytes(64))
    with pytest.raises(CertificateError):
        verify_certificate(QuorumCertificate(votes=tuple(forged)), table, "precommit", NET, STATEMENT)


def test_weight_table_digest_is_order_independent():
    a = WeightTable(epoch=2, weights={IDS[0].peer_id: 1, IDS[1].peer_id: 2})
    b = WeightTable(epoch=2, weights={IDS[1].peer_id: 2, IDS[0].peer_id: 1})
    assert a.digest() == b.digest() and len(a.digest()) == 32
    assert a.digest() != WeightTable(epoch=3, weights=a.weights).digest()
