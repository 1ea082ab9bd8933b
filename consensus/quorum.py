"""Weighted quorums, signed votes and quorum certificates (pure).

A *weight table* maps peer ids to integer voting weights for one epoch. A
*signed vote* is an Ed25519 signature by a voter over a canonical statement,
bound to a purpose (domain string), the network id and the epoch. A *quorum
certificate* is a set of signed votes for the same statement whose voters'
weight passes a threshold; anyone holding the epoch's weight table can verify
it, without trusting whoever handed it over.

Threshold arithmetic is exact (integers and :class:`fractions.Fraction`):
"more than 2/3" means ``3 * weight > 2 * total`` (Tendermint/CometBFT), never a
float comparison.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Iterable, Mapping

import msgpack

from chimera.protocol.identity import SIGNATURE_BYTES, SigningIdentity, public_key_from_peer_id, verify_signature
from chimera.protocol.errors import LocalProtocolError, MalformedError, RemoteProtocolError
from chimera.protocol.messages import Len, MaxItems, MaxLen, PeerId, record

VOTE_DOMAIN = b"chimera-mesh/vote/v1\x00"
TWO_THIRDS = Fraction(2, 3)
MAX_VOTERS = 1024


class CertificateError(RemoteProtocolError):
    """A certificate or vote does not verify against the weight table."""

    reason = "bad_certificate"


@dataclass(frozen=True, slots=True)
class WeightTable:
    """Voting weights of one epoch.

    Args:
        epoch: epoch number (>= 0) the weights belong to.
        weights: peer id -> weight, integers >= 1 (peers of weight 0 are left out).
    Raises:
        LocalProtocolError: a weight is not a positive int, or the table is empty.
    """

    epoch: int
    weights: Mapping[str, int]

    def __post_init__(self) -> None:
        if not self.weights:
            raise LocalProtocolError("a weight table needs at least one voter")
        for peer_id, weight in self.weights.items():
            if type(weight) is not int or weight < 1:
                raise LocalProtocolError(f"weight of {peer_id[:10]} must be a positive int")
        object.__setattr__(self, "weights", dict(sorted(self.weights.items())))

    @property
    def total(self) -> int:
        return sum(self.weights.values())

    def weight_of(self, voters: Iterable[str]) -> int:
        """Total weight of the distinct known ``voters`` (unknown ones count 0)."""
        return sum(self.weights.get(v, 0) for v in set(voters))

    def passes(self, voters: Iterable[str], threshold: Fraction = TWO_THIRDS) -> bool:
        """True when the voters' weight is *strictly more* than ``threshold`` of the total."""
        return self.weight_of(voters) * threshold.denominator > threshold.numerator * self.total

    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding (epoch, sorted (peer id, weight) pairs)."""
        return hashlib.sha256(msgpack.packb([self.epoch, list(self.weights.items())])).digest()


def statement_bytes(purpose: str, network_id: bytes, epoch: int, statement: list) -> bytes:
    """The exact bytes a vote signature covers.

    ``VOTE_DOMAIN || msgpack([purpose, network_id, epoch, statement])``; the
    statement is a msgpack-encodable list (ints, str, bytes, None, nested lists).
    """
    return VOTE_DOMAIN + msgpack.packb([purpose, network_id, epoch, statement], use_bin_type=True)


@record
class SignedVote:
    """One voter's signature over a statement (the statement itself travels beside it)."""

    voter: PeerId
    signature: Annotated[bytes, Len(SIGNATURE_BYTES)]

    def describe(self) -> str:
        return f"vote by {self.voter[:10]}"


def sign_vote(identity: SigningIdentity, purpose: str, network_id: bytes, epoch: int,
              statement: list) -> SignedVote:
    """Sign ``statement`` for ``purpose`` (e.g. ``"precommit"``) in ``epoch``."""
    return SignedVote(voter=identity.peer_id,
                      signature=identity.sign(statement_bytes(purpose, network_id, epoch, statement)))


@record
class QuorumCertificate:
    """Signed votes of distinct voters for one statement.

    The statement (purpose, epoch, statement list) is carried by whatever
    contains the certificate (e.g. a commit carries height, round, block hash).
    """

    votes: Annotated[tuple[SignedVote, ...], MaxItems(MAX_VOTERS)]

    def describe(self) -> str:
        return f"QC of {len(self.votes)} votes"

    def voters(self) -> list[str]:
        return [v.voter for v in self.votes]


def verify_vote(vote: SignedVote, purpose: str, network_id: bytes, epoch: int, statement: list) -> bool:
    """True when ``vote`` is a valid signature of its voter over the statement."""
    try:
        key = public_key_from_peer_id(vote.voter)
    except MalformedError:
        return False
    return verify_signature(key, vote.signature, statement_bytes(purpose, network_id, epoch, statement))


def verify_votes(votes: Iterable[SignedVote], table: WeightTable, purpose: str, network_id: bytes,
                 statement: list) -> set[str]:
    """Check each vote (distinct voter, weighted in ``table``, valid signature over
    the statement in the table's epoch); returns the set of voters.

    Raises:
        CertificateError: on the first duplicate or unknown voter or bad signature.
    """
    seen: set[str] = set()
    for vote in votes:
        if vote.voter in seen:
            raise CertificateError(f"voter {vote.voter[:10]} appears twice")
        seen.add(vote.voter)
        if vote.voter not in table.weights:
            raise CertificateError(f"voter {vote.voter[:10]} has no weight in epoch {table.epoch}")
        if not verify_vote(vote, purpose, network_id, table.epoch, statement):
            raise CertificateError(f"signature of {vote.voter[:10]} does not verify")
    return seen


def verify_certificate(cert: QuorumCertificate, table: WeightTable, purpose: str, network_id: bytes,
                       statement: list, threshold: Fraction = TWO_THIRDS) -> None:
    """Check ``cert`` against the epoch's weight table.

    Raises:
        CertificateError: a duplicate or unknown voter, a bad signature, or the
            voters' weight not strictly above ``threshold`` of the table's total.
    """
    seen = verify_votes(cert.votes, table, purpose, network_id, statement)
    if not table.passes(seen, threshold):
        raise CertificateError(
            f"voters hold {table.weight_of(seen)} of {table.total} weight; need more than {threshold}")
