"""Pluggable peer behaviours: honest, and byzantine strategies.

A behaviour sits between a peer's *real* core and its transport: the core
decides what to send (it is never re-implemented), the behaviour decides what
actually leaves the peer. Strategies:

* ``silent``: sends nothing (a crashed-looking peer that still listens).
* ``equivocate``: signs two conflicting votes (or two proposals) for the same
  (height, round) and sends each to half of the peers.
* ``badsig``: corrupts its vote/proposal signatures, signs votes in other
  validators' names, and sends envelopes whose signature does not verify.
* ``flood``: re-sends (re-sealed) each message several times, floods
  invalid application values, and with each vote asks every peer for the
  proposal and the votes of that round and the next two (all-zero bitmaps:
  "send me everything") and for the whole log from height 1.
* ``sybil``: operates extra identities: in membership they join as peers, in
  consensus they send votes signed by keys that hold no weight.
* ``zombie`` (membership): every membership message it sends first claims
  "P alive" for each peer P it holds suspect or dead, one incarnation higher
  than its last claim about P (so always above what the receivers hold), without
  P's signature: unsigned, or with a random 64-byte signature (``forge``:
  ``unsigned``, ``badsig`` or ``mixed``, alternating); and every
  ``flood_interval_s`` (1 s) it sends these claims in a ``ping`` to every member
  it holds alive. Without signed alive claims (PROTOCOL s10.3) this kept a
  crashed peer alive.

Federated-averaging strategies (:meth:`Behaviour.model_update`, driven by
:mod:`chimera.simulations.training_world`); the peer's core, envelopes and
log traffic stay honest, only the update it submits is poisoned:

* ``gaussian``: the update's delta is replaced by Gaussian noise
  ``N(0, std^2)`` per coordinate (Blanchard, El Mhamdi, Guerraoui, Stainer,
  NeurIPS 2017, s5 "Gaussian" byzantine workers).
* ``sign_flip``: the delta is multiplied by ``-scale`` (a reversed, scaled
  gradient step; e.g. Li et al., "RSA", AAAI 2019; the "sign flipping"
  attack of the robust-aggregation literature).
* ``alie``: "A Little Is Enough" (Baruch, Baruch, Goldberg, NeurIPS 2019,
  Algorithm 3): every attacker sends ``mean - z * std`` of the honest deltas
  (per coordinate), ``z`` from :func:`alie_z`.
* ``late``: an honest update sent ``delay_s`` virtual seconds after local
  training ends (a straggler; past the round deadline it is dropped by the
  core as ``late_local_result``).
* ``silent`` (above) also withholds its update and its log values.

Fabric strategy (:meth:`Behaviour.task_result`, driven by
:mod:`chimera.simulations.fabric_world` for every result a replica returns;
honest peers return the result unchanged):

* ``wrong_result``: with probability ``probability`` the replica reports a
  wrong stdout (with the digest of that wrong stdout, so the report is
  self-consistent and it signs the wrong digest when asked to vote). With
  ``collude`` (default) every liar reports the same wrong stdout for a task
  (``b"WRONG " + result``), so liars in one replica set agree with each
  other; without it each lie carries a fresh random token and liars never agree.

Register new strategies with :func:`register`; a strategy's
tunable attributes are listed in its ``params`` and set by
:func:`make_behaviour` (``make_behaviour("sign_flip", scale=4.0)``).
"""

from __future__ import annotations

import hashlib
import random
import statistics
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import numpy as np

from chimera.consensus.bft import (
    PREVOTE,
    PROPOSAL,
    BftCommitRequest,
    BftProposal,
    BftProposalRequest,
    BftValues,
    BftVote,
    BftVoteRequest,
    Vote,
    block_hash,
    value_hash,
)
from chimera.consensus.quorum import SignedVote, sign_vote
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.membership import Ack, MemberList, MemberState, MemberUpdate, Ping, PingReq


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
    params: tuple[str, ...] = ()
    needs_honest_updates = False
    update_delay_s = 0.0

    def outgoing(self, ctx: PeerContext, message: object, targets: tuple[str, ...]) -> list[Outgoing]:
        """What actually leaves the peer when its core sends ``message`` to ``targets``."""
        return [Outgoing(targets, message)]

    def flood(self, ctx: PeerContext, targets: tuple[str, ...]) -> list[Outgoing]:
        """Extra traffic sent every ``flood_interval_s`` virtual seconds."""
        return []

    def model_update(self, ctx: PeerContext, delta: np.ndarray, honest_deltas: Sequence[np.ndarray] = (), *,
                     n: int = 0, f: int = 0) -> np.ndarray | None:
        """Hook: the federated update this peer submits.

        Args:
            delta: float64 ``(d,)``: the peer's honestly trained parameters minus the
                round's base model, flattened in the job's
                :class:`~chimera.consensus.aggregation.ModelSpec` order.
            honest_deltas: the honest participants' deltas of this round (same
                shape; given only when :attr:`needs_honest_updates` is set, i.e. an
                omniscient attacker as in Baruch et al. 2019).
            n: participants of the job; ``f``: attackers among them.
        Returns:
            The delta to submit (float64 ``(d,)``), or ``None`` to send no update.
        """
        return delta

    def log_value(self, ctx: PeerContext, value: bytes) -> bytes | None:
        """Hook: a value this peer submits to a simulated (ideal) log; ``None`` withholds it.
        (Over the BFT log, :meth:`outgoing` already sees the value gossip.)"""
        return value

    def task_result(self, ctx: PeerContext, task: object, result: bytes) -> bytes:
        """Hook: the stdout this peer reports for ``task``.

        Args:
            task: the attempt being answered (a :class:`~chimera.fabric.wire.FabricTaskRun`).
            result: the honest stdout of the run (bytes).
        Returns:
            The stdout to report (bytes); the driver computes its digest.
        """
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

    def model_update(self, ctx, delta, honest_deltas=(), *, n=0, f=0):
        return None

    def log_value(self, ctx, value):
        return None


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

    requested_rounds = 3

    def outgoing(self, ctx, message, targets):
        out = [Outgoing(targets, message) for _ in range(self.copies)]
        if isinstance(message, BftVote):
            v = message.vote
            nothing = bytes((len(ctx.honest_peer_ids()) + 1 + 7) // 8)  # bitmaps for n validators
            for round_ in range(v.round, v.round + self.requested_rounds):
                out.append(Outgoing(targets, BftProposalRequest(height=v.height, round=round_)))
                out.append(Outgoing(targets, BftVoteRequest(height=v.height, round=round_, prevotes=nothing,
                                                             precommits=nothing)))
            out.append(Outgoing(targets, BftCommitRequest(from_height=1)))
        return out

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


class Zombie(Behaviour):
    """Keeps peers it holds suspect or dead "alive" by forged gossip (module docstring)."""

    name = "zombie"
    byzantine = True
    params = ("forge", "flood_interval_s")
    flood_interval_s = 1.0
    _forge = "mixed"
    FORGES = ("unsigned", "badsig", "mixed")

    def __init__(self) -> None:
        self.claims: dict[str, int] = {}  # peer id -> the incarnation last claimed for it
        self.sent = 0  # forged claims sent

    @property
    def forge(self) -> str:
        return self._forge

    @forge.setter
    def forge(self, value: str) -> None:
        if value not in self.FORGES:
            raise ValueError(f"zombie forge must be one of {', '.join(self.FORGES)}, got {value!r}")
        self._forge = value

    def _claims(self, ctx, room: int) -> tuple[MemberUpdate, ...]:
        core = getattr(ctx, "core", None)
        if core is None or room <= 0:
            return ()
        out = []
        for pid, member in core.members.items():
            if member.state is not MemberState.SUSPECT and member.state is not MemberState.DEAD:
                continue
            claim = max(self.claims.get(pid, 0), member.incarnation) + 1
            self.claims[pid] = claim
            unsigned = self._forge == "unsigned" or (self._forge == "mixed" and self.sent % 2 == 0)
            signature = None if unsigned else ctx.rng.getrandbits(512).to_bytes(64, "big")
            out.append(MemberUpdate(peer_id=pid, state="alive", incarnation=claim, signature=signature))
            self.sent += 1
            if len(out) >= room:
                break
        return tuple(out)

    def outgoing(self, ctx, message, targets):
        if isinstance(message, (Ping, Ack, PingReq)):
            forged = self._claims(ctx, 16)
            if forged:
                message = replace(message, updates=(forged + message.updates)[:16])
        elif isinstance(message, MemberList):
            forged = self._claims(ctx, 256)
            if forged:
                message = replace(message, members=(forged + message.members)[:256])
        return [Outgoing(targets, message)]

    def flood(self, ctx, targets):
        forged = self._claims(ctx, 16)
        if not forged or not targets:
            return []
        return [Outgoing(targets, Ping(probe_id=ctx.rng.getrandbits(63), updates=forged))]


def alie_z(n: int, f: int) -> float:
    """``z_max`` of "A Little Is Enough" (Baruch, Baruch, Goldberg, NeurIPS 2019, s3 and
    Algorithm 3): with ``s = floor(n/2 + 1) - f`` honest workers the attackers need on
    their side, ``z_max = Phi^-1((n - s) / n)`` (``Phi``: the standard normal CDF).

    Args:
        n: workers in the round (>= 2); f: attackers among them (1 <= f < n).
    Raises:
        ValueError: out-of-range ``n``/``f``, or ``s <= 0`` (the attackers already hold
            a majority: any z works, the formula does not apply).
    """
    if not (isinstance(n, int) and isinstance(f, int) and n >= 2 and 1 <= f < n):
        raise ValueError(f"alie_z needs ints n >= 2 and 1 <= f < n, got n={n!r} f={f!r}")
    s = n // 2 + 1 - f
    if s <= 0:
        raise ValueError(f"n={n}, f={f}: the attackers hold a majority (s = {s})")
    return statistics.NormalDist().inv_cdf((n - s) / n)


def alie_delta(honest_deltas: Sequence[np.ndarray], z: float) -> np.ndarray:
    """The ALIE update: per coordinate ``mean - z * std`` of the honest deltas
    (``std`` the population standard deviation, ``ddof = 0``), float64 ``(d,)``.

    Raises:
        ValueError: no honest delta given.
    """
    if len(honest_deltas) == 0:
        raise ValueError("ALIE needs at least one honest delta")
    X = np.stack([np.asarray(d, dtype=np.float64) for d in honest_deltas])
    return X.mean(axis=0) - z * X.std(axis=0)


class GaussianNoise(Behaviour):
    """Replace the delta by ``N(0, std^2)`` noise (Blanchard et al. 2017)."""

    name = "gaussian"
    byzantine = True
    params = ("std",)
    std = 200.0

    def model_update(self, ctx, delta, honest_deltas=(), *, n=0, f=0):
        gen = np.random.default_rng(ctx.rng.getrandbits(64))
        return gen.normal(0.0, float(self.std), size=np.shape(delta))


class SignFlip(Behaviour):
    """Send ``-scale`` times the honest delta."""

    name = "sign_flip"
    byzantine = True
    params = ("scale",)
    scale = 10.0

    def model_update(self, ctx, delta, honest_deltas=(), *, n=0, f=0):
        return -float(self.scale) * np.asarray(delta, dtype=np.float64)


class Alie(Behaviour):
    """"A Little Is Enough": ``mean - z * std`` of the honest deltas; ``z`` None: :func:`alie_z`."""

    name = "alie"
    byzantine = True
    params = ("z",)
    z: float | None = None
    needs_honest_updates = True

    def model_update(self, ctx, delta, honest_deltas=(), *, n=0, f=0):
        z = self.z if self.z is not None else alie_z(n, f)
        return alie_delta(honest_deltas, z) if len(honest_deltas) else np.asarray(delta, dtype=np.float64)


class Late(Behaviour):
    """An honest update that leaves ``delay_s`` virtual seconds after training ends."""

    name = "late"
    byzantine = True
    params = ("delay_s",)
    delay_s = 30.0

    @property
    def update_delay_s(self) -> float:  # type: ignore[override]
        return float(self.delay_s)


class WrongResult(Behaviour):
    """Report wrong task results (see the module docstring): with probability
    ``probability`` (in [0, 1]) a lie; ``collude``: every liar tells the same lie."""

    name = "wrong_result"
    byzantine = True
    params = ("probability", "collude")
    _probability = 1.0
    _collude = True

    @property
    def probability(self) -> float:
        return self._probability

    @probability.setter
    def probability(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"wrong_result probability must be a number in [0, 1], got {value!r}")
        self._probability = float(value)

    @property
    def collude(self) -> bool:
        return self._collude

    @collude.setter
    def collude(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"wrong_result collude must be true or false, got {value!r}")
        self._collude = value

    def task_result(self, ctx, task, result):
        if self._probability < 1.0 and ctx.rng.random() >= self._probability:
            return result
        if self._collude:
            return b"WRONG " + result
        return b"WRONG %016x " % ctx.rng.getrandbits(64) + result


BEHAVIOURS: dict[str, type[Behaviour]] = {}


def register(cls: type[Behaviour]) -> type[Behaviour]:
    """Make ``cls`` available to scenarios under ``cls.name`` (usable as a decorator)."""
    BEHAVIOURS[cls.name] = cls
    return cls


for _cls in (Behaviour, Silent, Equivocate, BadSignature, Flood, Sybil, Zombie, GaussianNoise, SignFlip, Alie,
             Late, WrongResult):
    register(_cls)

BYZANTINE_STRATEGIES = ("silent", "equivocate", "badsig", "flood", "sybil")
MODEL_ATTACKS = ("gaussian", "sign_flip", "alie", "silent", "late")
"""Strategies that act on federated updates (``training.attack``)."""
TASK_ATTACKS = ("wrong_result",)
"""Strategies that act on task results (``fabric.wrong_peers``)."""


def make_behaviour(name: str, **params: object) -> Behaviour:
    """A fresh behaviour by name, with the given tunables (names in its ``params``; others
    are ignored, ``None`` keeps the default). Raises ``KeyError`` naming the known ones."""
    cls = BEHAVIOURS.get(name)
    if cls is None:
        raise KeyError(f"unknown behaviour {name!r}; known: {', '.join(sorted(BEHAVIOURS))}")
    behaviour = cls()
    for key, value in params.items():
        if key in cls.params and value is not None:
            setattr(behaviour, key, value)
    return behaviour


def sybil_identity(owner: str, index: int, salt: bytes = b"") -> SigningIdentity:
    """Deterministic identity number ``index`` of the Sybil operator ``owner``."""
    return SigningIdentity(hashlib.sha256(b"chimera-sim/sybil/" + salt + owner.encode() + b"/%d" % index).digest())


__all__ = ["BEHAVIOURS", "BYZANTINE_STRATEGIES", "MODEL_ATTACKS", "TASK_ATTACKS", "Alie", "Behaviour",
           "GaussianNoise", "Late", "Outgoing", "PeerContext", "SignFlip", "WrongResult",
           "Zombie", "alie_delta", "alie_z",
           "make_behaviour", "register", "sybil_identity"]
