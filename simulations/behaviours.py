"""Pluggable peer behaviours: honest, and byzantine strategies.

A behaviour sits between a peer's *real* core and its transport: the core
decides what to send (it is never re-implemented), the behaviour decides what
actually leaves the peer. Strategies:

* ``silent``: sends nothing (a crashed-looking peer that still listens).
* ``equivocate``: signs two conflicting votes (or two proposals) for the same
  (height, round) and sends each to half of the peers.
* ``badsig``: corrupts its vote/proposal signatures, signs votes in other
  validators' names, and sends envelopes whose signature does not verify.
* ``flood``: re-sends (re-sealed) each message several times and floods
  invalid application values.
* ``sybil``: operates extra identities: in membership they join as peers, in
  consensus they send votes signed by keys that hold no weight.

Hooks for later issues: :meth:`Behaviour.model_update` (poisoned federated
updates: sign flip, scaling, ALIE) and :meth:`Behaviour.task_result` (wrong
task results) pass through unchanged by default; strategies override them.
Register new strategies with :func:`register`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

from chimera.consensus.bft import (
    PREVOTE,
    PROPOSAL,
    BftProposal,
    BftValues,
    BftVote,
    Vote,
    block_hash,
    value_hash,
)
from chimera.consensus.quorum import SignedVote, sign_vote
from chimera.protocol.identity import SigningIdentity


@dataclass(frozen=True, slots=True)
class Outgoing:
    """``message`` to each peer id of ``targets``, sealed by ``sender`` (None: the peer itself).

    ``corrupt_envelope``: the envelope signature is altered after sealing.
    """

    targets: tuple[str, ...]
    message: object
    sender: SigningIdentity | None = None
    corrupt_envelope: bool = False


class PeerContext(Protocol):
    """What a behaviour may see of its peer (read only)."""

    name: str
    identity: SigningIdentity
    network_id: bytes
    rng: random.Random
    epoch: int  # epoch of the weight table in force (bound into vote signatures)

    def honest_peer_ids(self) -> Sequence[str]: ...

    def sybil_identities(self) -> Sequence[SigningIdentity]: ...


class Behaviour:
    """Honest: everything the core decides goes out unchanged.

    Subclasses override :meth:`outgoing` (and optionally :meth:`flood`).
    ``sybils``: how many extra identities the driver creates for this peer.
    """

    name = "honest"
    byzantine = False
    sybils = 0
    flood_interval_s: float | None = None

    def outgoing(self, ctx: PeerContext, message: object, targets: tuple[str, ...]) -> list[Outgoing]:
        """What actually leaves the peer when its core sends ``message`` to ``targets``."""
        return [Outgoing(targets, message)]

    def flood(self, ctx: PeerContext, targets: tuple[str, ...]) -> list[Outgoing]:
        """Extra traffic sent every ``flood_interval_s`` virtual seconds."""
        return []

    def model_update(self, ctx: PeerContext, update, honest_updates=()):  # noqa: ANN001
        """Hook: the model update this peer submits (a numpy array; federated issues)."""
        return update

    def task_result(self, ctx: PeerContext, task: object, result: bytes) -> bytes:
        """Hook: the result this peer reports for ``task`` (fabric issues)."""
        return result


def _split(ctx: PeerContext, targets: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    shuffled = list(targets)
    ctx.rng.shuffle(shuffled)
    half = len(shuffled) // 2
    return tuple(sorted(shuffled[:half])), tuple(sorted(shuffled[half:]))


def _random_hash(rng: random.Random) -> bytes:
    return rng.getrandbits(256).to_bytes(32, "big")


class Silent(Behaviour):
    name = "silent"
    byzantine = True

    def outgoing(self, ctx, message, targets):
        return []


class Equivocate(Behaviour):
    name = "equivocate"
    byzantine = True

    def outgoing(self, ctx, message, targets):
        if isinstance(message, BftVote):
            v = message.vote
            other = None if v.block_hash is not None else _random_hash(ctx.rng)
            twin = BftVote(vote=Vote(vote_type=v.vote_type, height=v.height, round=v.round, block_hash=other,
                                     signed=sign_vote(ctx.identity, v.vote_type, ctx.network_id,
                                                      ctx.epoch, [v.height, v.round, other])))
            a, b = _split(ctx, targets)
            return [Outgoing(a, message), Outgoing(b, twin)]
        if isinstance(message, BftProposal) and message.signed.voter == ctx.identity.peer_id:
            block = message.block
            extra = b"x%d" % ctx.rng.getrandbits(30)
            other = replace(block, values=tuple(sorted(block.values + (extra,), key=value_hash)))
            digest = block_hash(other)
            twin = replace(message, block=other, signed=sign_vote(
                ctx.identity, PROPOSAL, ctx.network_id, other.epoch,
                [message.height, message.round, digest, message.valid_round]))
            a, b = _split(ctx, targets)
            return [Outgoing(a, message), Outgoing(b, twin)]
        return [Outgoing(targets, message)]


class BadSignature(Behaviour):
    name = "badsig"
    byzantine = True

    def outgoing(self, ctx, message, targets):
        rng = ctx.rng
        out: list[Outgoing] = []
        if isinstance(message, BftVote):
            bad = replace(message, vote=replace(message.vote, signed=SignedVote(
                voter=message.vote.voter, signature=rng.getrandbits(512).to_bytes(64, "big"))))
            out.append(Outgoing(targets, bad if rng.random() < 0.7 else message))
            honest = ctx.honest_peer_ids()
            if honest:  # impersonation: another voter's name, our signature over something else
                victim = rng.choice(list(honest))
                v = message.vote
                forged = Vote(vote_type=PREVOTE, height=v.height, round=v.round, block_hash=None,
                              signed=SignedVote(voter=victim, signature=ctx.identity.sign(b"not that statement")))
                out.append(Outgoing(targets, BftVote(vote=forged)))
            return out
        if isinstance(message, BftProposal):
            bad = replace(message, signed=SignedVote(voter=message.signed.voter, signature=bytes(64)))
            return [Outgoing(targets, bad if rng.random() < 0.7 else message)]
        # anything else: the envelope signature itself is broken 30% of the time
        return [Outgoing(targets, message, corrupt_envelope=rng.random() < 0.3)]


class Flood(Behaviour):
    name = "flood"
    byzantine = True
    copies = 3
    flood_interval_s = 0.5

    def outgoing(self, ctx, message, targets):
        return [Outgoing(targets, message) for _ in range(self.copies)]

    def flood(self, ctx, targets):
        junk = tuple(b"BAD-flood-" + ctx.rng.getrandbits(64).to_bytes(8, "big") for _ in range(16))
        return [Outgoing(targets, BftValues(values=junk))]


class Sybil(Behaviour):
    """Honest-looking traffic plus ``sybils`` extra identities (see module docstring)."""

    name = "sybil"
    byzantine = True
    sybils = 4

    def outgoing(self, ctx, message, targets):
        out = [Outgoing(targets, message)]
        if isinstance(message, BftVote):
            v = message.vote
            for identity in ctx.sybil_identities():
                statement = [v.height, v.round, None]
                vote = Vote(vote_type=v.vote_type, height=v.height, round=v.round, block_hash=None,
                            signed=sign_vote(identity, v.vote_type, ctx.network_id, ctx.epoch,
                                             statement))
                out.append(Outgoing(targets, BftVote(vote=vote), sender=identity))
        return out


BEHAVIOURS: dict[str, type[Behaviour]] = {}


def register(cls: type[Behaviour]) -> type[Behaviour]:
    """Make ``cls`` available to scenarios under ``cls.name`` (usable as a decorator)."""
    BEHAVIOURS[cls.name] = cls
    return cls


for _cls in (Behaviour, Silent, Equivocate, BadSignature, Flood, Sybil):
    register(_cls)

BYZANTINE_STRATEGIES = ("silent", "equivocate", "badsig", "flood", "sybil")


def make_behaviour(name: str) -> Behaviour:
    """A fresh behaviour by name. Raises ``KeyError`` naming the known ones."""
    cls = BEHAVIOURS.get(name)
    if cls is None:
        raise KeyError(f"unknown behaviour {name!r}; known: {', '.join(sorted(BEHAVIOURS))}")
    return cls()


def sybil_identity(owner: str, index: int, salt: bytes = b"") -> SigningIdentity:
    """Deterministic identity number ``index`` of the Sybil operator ``owner``."""
    return SigningIdentity(hashlib.sha256(b"chimera-sim/sybil/" + salt + owner.encode() + b"/%d" % index).digest())


__all__ = ["BEHAVIOURS", "BYZANTINE_STRATEGIES", "Behaviour", "Outgoing", "PeerContext", "make_behaviour",
           "register", "sybil_identity"]
