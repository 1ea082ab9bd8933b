"""Peer reputation: local observations, signed opinions, per-epoch weight tables (pure).

Three stages, each usable on its own:

1. **Local reputation** (:class:`LocalReputation`). The driver reports what this
   node saw a peer do (:class:`ObservationKind`); each kind adds its configured
   weight to the peer's positive evidence ``r`` or negative evidence ``s``.
   The local score is the expected value of the Beta reputation
   (Jøsang & Ismail, "The Beta Reputation System", 15th Bled eCommerce
   Conference, 2002)::

       E = (r + 1) / (r + s + 2)          # in [0, 1]; 0.5 with no evidence

   with exponential forgetting: both ``r`` and ``s`` are multiplied by
   ``2 ** (-dt / half_life_s)`` as time passes (applied lazily from the ``now``
   passed in; this module never reads a clock). Equivocation (two conflicting
   signed statements, a *proof* of misbehaviour) is a strong negative: its
   default weight is 100 units of ``s``, enough to push the score near 0 for
   several half-lives.

   **Only faults the sender itself caused count.** The driver must report an
   observation only against a peer id whose envelope signature verified (so
   nobody can frame a third party) and only for behaviour the peer controls:
   a malformed body it signed, a vote that fails validation, a conflicting
   signature, a disagreeing task result. It must *not* report our own
   connection drops, timeouts of our own link, partitions, back-pressure
   (high-water mark) drops or rate-limit drops of well-formed traffic. A
   missed heartbeat is ambiguous; report ``heartbeat_missed`` only while the
   transport to that peer is otherwise up (its other traffic still arrives).

   Local scores are floats: they are never compared across peers. What crosses
   the wire is an integer in parts per million (:data:`PPM`).

2. **Signed opinions** (:class:`Opinion`, :func:`sign_opinion`,
   :func:`verify_opinion`). Once per epoch a node signs its local scores of
   other peers, as integer ppm, with the vote signature of
   :mod:`chimera.consensus.quorum` under purpose :data:`OPINION_PURPOSE`
   (domain separated from every other vote kind, bound to network id and
   epoch). Opinions are meant to be committed to the replicated log.

3. **Global weights** (:func:`next_weight_table`). At an epoch boundary every
   peer computes the next epoch's :class:`~chimera.consensus.quorum.WeightTable`
   from committed inputs only (previous table, committed opinions, committed
   member list, the network's :class:`WeightPolicy`): per peer, the
   reputation-weighted median of the opinions about it (each author weighted by
   its weight in the previous table), turned into an integer weight with a
   newcomer bound and a per-epoch growth cap (Sybil resistance). The function
   uses integer and :class:`fractions.Fraction` arithmetic only, so every
   honest peer gets the identical table.

Optionally :func:`eigentrust_scores` aggregates the same opinions with
EigenTrust (Kamvar, Schlosser & Garcia-Molina, "The EigenTrust Algorithm for
Reputation Management in P2P Networks", WWW 2003) in integer fixed point.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Annotated, Callable, Iterable, Mapping, Sequence

import msgpack

from chimera.consensus.quorum import MAX_VOTERS, SignedVote, WeightTable, sign_vote, verify_vote
from chimera.protocol.errors import LocalProtocolError, MalformedError
from chimera.protocol.identity import SIGNATURE_BYTES, SigningIdentity, public_key_from_peer_id
from chimera.protocol.messages import U64_MAX, Len, MaxItems, PeerId, Range, encode_fields, record

PPM = 1_000_000
"""Scores on the wire are integers in parts per million: 0 (worst) .. 1_000_000 (best)."""

OPINION_PURPOSE = "reputation_opinion"
"""Vote purpose (domain string) of opinion signatures."""

MAX_OPINION_ENTRIES = MAX_VOTERS
"""Most (peer id, score) entries one opinion may carry."""


# ------------------------------------------------------------------ observations


class ObservationKind(str, enum.Enum):
    """What this node saw a peer do. ``positive`` kinds add to ``r``, the others to ``s``."""

    VALID_ENVELOPE = "valid_envelope"      # a signed envelope that decoded and validated
    INVALID_ENVELOPE = "invalid_envelope"  # signature ok, body rejected (RemoteProtocolError)
    HEARTBEAT_TIMELY = "heartbeat_timely"
    HEARTBEAT_MISSED = "heartbeat_missed"  # only while the link to the peer is otherwise up
    VOTE_OK = "vote_ok"
    VOTE_FAULT = "vote_fault"              # a signed vote that is invalid for the state it names
    TASK_AGREE = "task_agree"              # its task result matched the agreed result
    TASK_DISAGREE = "task_disagree"
    UPDATE_GOOD = "update_good"            # a model update accepted by the aggregation rule
    UPDATE_FLAGGED = "update_flagged"      # an update rejected as an outlier (Krum / trimmed mean)
    EQUIVOCATION = "equivocation"          # two conflicting signed statements: proof of fault

    @property
    def positive(self) -> bool:
        return self in _POSITIVE


_POSITIVE = frozenset({ObservationKind.VALID_ENVELOPE, ObservationKind.HEARTBEAT_TIMELY,
                       ObservationKind.VOTE_OK, ObservationKind.TASK_AGREE, ObservationKind.UPDATE_GOOD})

DEFAULT_OBSERVATION_WEIGHTS: Mapping[ObservationKind, float] = MappingProxyType({
    ObservationKind.VALID_ENVELOPE: 0.01,   # frequent and cheap to produce: small
    ObservationKind.INVALID_ENVELOPE: 1.0,
    ObservationKind.HEARTBEAT_TIMELY: 0.1,
    ObservationKind.HEARTBEAT_MISSED: 0.5,
    ObservationKind.VOTE_OK: 0.5,
    ObservationKind.VOTE_FAULT: 5.0,
    ObservationKind.TASK_AGREE: 1.0,
    ObservationKind.TASK_DISAGREE: 2.0,
    ObservationKind.UPDATE_GOOD: 1.0,
    ObservationKind.UPDATE_FLAGGED: 2.0,
    ObservationKind.EQUIVOCATION: 100.0,   # strong negative
})


@dataclass(frozen=True, slots=True, kw_only=True)
class ReputationConfig:
    """Local reputation settings (each node may choose its own).

    Args:
        weights: evidence units added per observation of each kind (finite, > 0);
            kinds left out keep :data:`DEFAULT_OBSERVATION_WEIGHTS`.
        half_life_s: seconds after which old evidence counts half (> 0, finite).
        max_peers: most peers tracked (>= 1); when a new peer would exceed it, the
            ``max(1, max_peers // 16)`` peers with the least decayed evidence (ties:
            smallest peer id) are forgotten to make room.
        min_opinion_evidence: decayed ``r + s`` a peer needs before this node
            states an opinion about it (>= 0).
    Raises:
        LocalProtocolError: a value out of range or an unknown kind.
    """

    weights: Mapping[ObservationKind, float] = field(default_factory=dict)
    half_life_s: float = 3600.0
    max_peers: int = 4096
    min_opinion_evidence: float = 1.0

    def __post_init__(self) -> None:
        merged = dict(DEFAULT_OBSERVATION_WEIGHTS)
        for kind, weight in self.weights.items():
            merged[_kind(kind)] = weight
        for kind, weight in merged.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                    or not math.isfinite(weight) or weight <= 0:
                raise LocalProtocolError(f"weight of {kind.value} must be a finite number > 0")
        object.__setattr__(self, "weights", MappingProxyType({k: float(v) for k, v in merged.items()}))
        if not (isinstance(self.half_life_s, (int, float)) and math.isfinite(self.half_life_s)
                and self.half_life_s > 0):
            raise LocalProtocolError("half_life_s must be a finite number > 0")
        if type(self.max_peers) is not int or self.max_peers < 1:
            raise LocalProtocolError("max_peers must be an int >= 1")
        if isinstance(self.min_opinion_evidence, bool) or not isinstance(self.min_opinion_evidence, (int, float)) \
                or not (math.isfinite(self.min_opinion_evidence) and self.min_opinion_evidence >= 0):
            raise LocalProtocolError("min_opinion_evidence must be finite and >= 0")


def _kind(kind: ObservationKind | str) -> ObservationKind:
    try:
        return ObservationKind(kind)
    except ValueError:
        raise LocalProtocolError(f"unknown observation kind {str(kind)[:32]!r}") from None


def _check_now(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise LocalProtocolError("now must be finite monotonic seconds")
    return float(now)


def beta_expectation(r: float, s: float) -> float:
    """Expected value ``(r + 1) / (r + s + 2)`` of Beta(r + 1, s + 1); in [0, 1]."""
    return (r + 1.0) / (r + s + 2.0)


def score_to_ppm(score: float) -> int:
    """A score in [0, 1] as integer parts per million, rounded half up and clamped."""
    return min(PPM, max(0, math.floor(score * PPM + 0.5)))


class _Evidence:
    __slots__ = ("r", "s", "at")

    def __init__(self, at: float) -> None:
        self.r = 0.0
        self.s = 0.0
        self.at = at


class LocalReputation:
    """This node's own Beta reputation of every peer it observed (pure; no clock).

    ``now`` is monotonic seconds from the driver. Decay is applied lazily: an
    entry stores ``r`` and ``s`` as of its last update time and is decayed on
    read or write. A ``now`` earlier than an entry's last update is treated as
    that update's time (no negative decay; the entry's time never goes back).
    """

    def __init__(self, config: ReputationConfig | None = None,
                 tracks: Callable[[str], bool] | None = None) -> None:
        """``tracks``: whether a peer not tracked yet may get an entry (the node passes "is a
        member or a validator"); observations of a peer it refuses are counted in
        ``untracked`` and dropped. Without it every peer is tracked (up to ``max_peers``).
        An attacker who signs junk with fresh keys then costs no entry, no eviction of a
        real peer's evidence and no exported series."""
        self.config = config or ReputationConfig()
        self.tracks = tracks
        self.untracked = 0
        self._peers: dict[str, _Evidence] = {}

    # -- evidence
    def _decay(self, elapsed_s: float) -> float:
        return 0.5 ** (max(0.0, elapsed_s) / self.config.half_life_s)

    def _decayed(self, entry: _Evidence, now: float) -> tuple[float, float]:
        factor = self._decay(now - entry.at)
        return entry.r * factor, entry.s * factor

    def observe(self, peer_id: str, kind: ObservationKind | str, now: float, count: int = 1) -> None:
        """Record ``count`` observations of ``kind`` about ``peer_id`` at ``now``.

        Raises:
            LocalProtocolError: unknown kind, ``count`` not an int >= 1, ``now``
                not finite, or ``peer_id`` not a str.
        """
        kind = _kind(kind)
        now = _check_now(now)
        if type(count) is not int or count < 1:
            raise LocalProtocolError("count must be an int >= 1")
        if not isinstance(peer_id, str):
            raise LocalProtocolError("peer_id must be a str")
        entry = self._peers.get(peer_id)
        if entry is None:
            if self.tracks is not None and not self.tracks(peer_id):
                self.untracked += 1
                return
            if len(self._peers) >= self.config.max_peers:
                self._evict(now)
            entry = self._peers[peer_id] = _Evidence(now)
        if now > entry.at:
            entry.r, entry.s = self._decayed(entry, now)
            entry.at = now
        amount = self.config.weights[kind] * count
        if kind.positive:
            entry.r += amount
        else:
            entry.s += amount

    def _evict(self, now: float) -> None:
        # The 1/16 of the entries with the least decayed evidence (ties: smallest peer id) in
        # one O(n log n) pass: evicting one entry per new peer scanned all n entries each
        # time (4 ms per observation at 4096 peers).
        keyed = sorted((sum(self._decayed(e, now)), p) for p, e in self._peers.items())
        for _, victim in keyed[:max(1, self.config.max_peers // 16)]:
            del self._peers[victim]

    def forget(self, peer_id: str) -> None:
        """Drop everything known about ``peer_id`` (no error if unknown)."""
        self._peers.pop(peer_id, None)

    def peers(self) -> list[str]:
        """Peer ids with stored evidence, sorted."""
        return sorted(self._peers)

    def evidence(self, peer_id: str, now: float) -> tuple[float, float]:
        """Decayed ``(r, s)`` of ``peer_id`` at ``now``; ``(0.0, 0.0)`` when unknown."""
        now = _check_now(now)
        entry = self._peers.get(peer_id)
        return (0.0, 0.0) if entry is None else self._decayed(entry, now)

    # -- scores
    def score(self, peer_id: str, now: float) -> float:
        """Beta expectation ``(r+1)/(r+s+2)`` in [0, 1] at ``now`` (0.5 for an unknown peer)."""
        return beta_expectation(*self.evidence(peer_id, now))

    def scores(self, now: float) -> dict[str, float]:
        """``score`` of every tracked peer at ``now``, keyed by peer id (sorted)."""
        return {p: self.score(p, now) for p in sorted(self._peers)}

    def opinion_scores(self, now: float, peers: Iterable[str] | None = None,
                       exclude: str | None = None) -> dict[str, int]:
        """Scores in ppm of the tracked peers with enough evidence to state an opinion.

        Args:
            now: monotonic seconds.
            peers: restrict to these peer ids (e.g. the epoch's members); default all.
            exclude: a peer id to leave out (the author itself).
        Returns:
            peer id -> score ppm (0..1_000_000), sorted by peer id; peers whose
            decayed ``r + s`` is below ``config.min_opinion_evidence`` are left out.
        """
        now = _check_now(now)
        wanted = set(self._peers) if peers is None else set(peers) & set(self._peers)
        out = {}
        for peer_id in sorted(wanted):
            if peer_id == exclude:
                continue
            r, s = self._decayed(self._peers[peer_id], now)
            if r + s >= self.config.min_opinion_evidence:
                out[peer_id] = score_to_ppm(beta_expectation(r, s))
        return out


# ---------------------------------------------------------------------- opinions


@record
class OpinionEntry:
    """One author's score of one peer, in parts per million (0..1_000_000)."""

    peer_id: PeerId
    score_ppm: Annotated[int, Range(0, PPM)]


@record
class Opinion:
    """An author's signed scores of other peers for one epoch.

    ``entries`` are strictly sorted by peer id (one canonical encoding per
    opinion). ``signature`` is the author's vote signature (purpose
    :data:`OPINION_PURPOSE`, bound to network id and ``epoch``) over
    :meth:`statement`. An entry about the author itself is allowed on the wire
    but ignored by :func:`next_weight_table`.

    Raises:
        ValueError: entries not strictly sorted by peer id (``MalformedError``
            when decoding).
    """

    epoch: int
    author: PeerId
    entries: Annotated[tuple[OpinionEntry, ...], MaxItems(MAX_OPINION_ENTRIES)]
    signature: Annotated[bytes, Len(SIGNATURE_BYTES)]

    def __post_init__(self) -> None:
        for a, b in zip(self.entries, self.entries[1:]):
            if not a.peer_id < b.peer_id:
                raise ValueError("opinion entries must be strictly sorted by peer id")

    def statement(self) -> list:
        """The signed statement: ``[[peer id, score ppm], ...]``."""
        return opinion_statement(self.entries)

    def describe(self) -> str:
        return f"opinion by {self.author[:10]} epoch {self.epoch}: {len(self.entries)} peers"


def opinion_statement(entries: Sequence[OpinionEntry]) -> list:
    return [[e.peer_id, e.score_ppm] for e in entries]


def sign_opinion(identity: SigningIdentity, network_id: bytes, epoch: int,
                 scores: Mapping[str, int]) -> Opinion:
    """Sign ``scores`` (peer id -> ppm) as ``identity``'s opinion for ``epoch``.

    Raises:
        LocalProtocolError: a score not an int in 0..1_000_000, a bad peer id,
            more than :data:`MAX_OPINION_ENTRIES` entries, or a bad epoch.
    """
    if len(scores) > MAX_OPINION_ENTRIES:
        raise LocalProtocolError(f"an opinion holds at most {MAX_OPINION_ENTRIES} entries")
    if type(epoch) is not int or not 0 <= epoch <= U64_MAX:
        raise LocalProtocolError("epoch must be an int in 0..2**64-1")
    entries = []
    for peer_id in sorted(scores):
        ppm = scores[peer_id]
        if type(ppm) is not int or not 0 <= ppm <= PPM:
            raise LocalProtocolError(f"score of {str(peer_id)[:10]} must be an int in 0..{PPM}")
        try:
            public_key_from_peer_id(peer_id)
        except MalformedError as exc:
            raise LocalProtocolError(f"not a peer id: {exc}") from None
        entries.append(OpinionEntry(peer_id=peer_id, score_ppm=ppm))
    entries_t = tuple(entries)
    vote = sign_vote(identity, OPINION_PURPOSE, network_id, epoch, opinion_statement(entries_t))
    return Opinion(epoch=epoch, author=identity.peer_id, entries=entries_t, signature=vote.signature)


def verify_opinion(opinion: Opinion, network_id: bytes) -> bool:
    """True when ``opinion.signature`` is its author's signature for this network and epoch."""
    try:
        vote = SignedVote(voter=opinion.author, signature=opinion.signature)
        return verify_vote(vote, OPINION_PURPOSE, network_id, opinion.epoch, opinion.statement())
    except (TypeError, ValueError, MalformedError):
        return False


def opinion_from_reputation(identity: SigningIdentity, network_id: bytes, epoch: int,
                            reputation: LocalReputation, now: float,
                            peers: Iterable[str] | None = None) -> Opinion:
    """Sign this node's current local scores (ppm) of ``peers`` (itself excluded)."""
    return sign_opinion(identity, network_id, epoch,
                        reputation.opinion_scores(now, peers, exclude=identity.peer_id))


# ---------------------------------------------------------------- global weights


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightPolicy:
    """Network-wide rules turning opinions into weights (must be identical on every peer).

    All values are integers or :class:`~fractions.Fraction`; weights are in
    voting-weight units (a peer with median score 1.0 targets ``weight_scale``).

    Args:
        weight_scale: target weight of a peer whose median score is 1_000_000 ppm (>= 1).
        newcomer_weight: most weight a peer absent from the previous table can
            get in its first epoch, however many peers vouch for it (>= 1).
        max_growth_per_epoch: most weight a member can gain from one epoch to
            the next (>= 0). Decreases are not capped.
        min_evidence: opinions about a peer must come from authors holding
            *strictly more* than this fraction of the previous table's weight
            (the peer's own weight excluded); otherwise the peer's weight is
            carried over unchanged (newcomers: ``newcomer_weight``). In [0, 1).
            With the default 2/3: if byzantine authors hold less than 1/3 of
            that eligible weight, the honest authors hold more than half of
            the weight behind any median that is computed, so the median lies
            within the honest opinions' range whatever the byzantine ones say
            or withhold (withholding can only keep a weight unchanged).
        max_newcomer_share: total weight all newcomers of one epoch may get, as
            a fraction of the previous table's total and of the weight its
            members keep in the next table (the smaller); see
            :func:`next_weight_table` and :func:`max_joins_per_epoch`. In (0, 1],
            or ``None`` for no such bound. Below 1/2 the members of the previous
            table alone keep more than 2/3 of the next table's weight.
    Raises:
        LocalProtocolError: a value out of range or of the wrong type.
    """

    weight_scale: int = 1000
    newcomer_weight: int = 100
    max_growth_per_epoch: int = 100
    min_evidence: Fraction = Fraction(2, 3)
    max_newcomer_share: Fraction | None = Fraction(1, 4)

    def __post_init__(self) -> None:
        for name in ("weight_scale", "newcomer_weight"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise LocalProtocolError(f"{name} must be an int >= 1")
        if type(self.max_growth_per_epoch) is not int or self.max_growth_per_epoch < 0:
            raise LocalProtocolError("max_growth_per_epoch must be an int >= 0")
        if not isinstance(self.min_evidence, (int, Fraction)) or isinstance(self.min_evidence, bool) \
                or not 0 <= self.min_evidence < 1:
            raise LocalProtocolError("min_evidence must be a Fraction in [0, 1)")
        share = self.max_newcomer_share
        if share is not None and (not isinstance(share, (int, Fraction)) or isinstance(share, bool)
                                  or not 0 < share <= 1):
            raise LocalProtocolError("max_newcomer_share must be a Fraction in (0, 1] or None")
        object.__setattr__(self, "min_evidence", Fraction(self.min_evidence))
        if share is not None:
            object.__setattr__(self, "max_newcomer_share", Fraction(share))


def _canonical(opinion: Opinion) -> bytes | None:
    try:
        return msgpack.packb(encode_fields(opinion), use_bin_type=True)
    except (LocalProtocolError, TypeError, ValueError, AttributeError):
        return None


def select_opinions(previous: WeightTable, opinions: Iterable[Opinion],
                    network_id: bytes | None = None) -> dict[str, Opinion]:
    """The one opinion per author that counts for the epoch after ``previous``.

    Kept: opinions whose ``epoch == previous.epoch``, whose author holds weight
    in ``previous``, whose fields encode under the wire codec and, when
    ``network_id`` is given, whose signature verifies. Of several such
    opinions by one author, the one with the smallest SHA-256 of its canonical
    msgpack encoding is kept (independent of input order).

    Returns:
        author peer id -> opinion.
    """
    best: dict[str, tuple[bytes, Opinion]] = {}
    for opinion in opinions:
        if not isinstance(opinion, Opinion) or type(opinion.epoch) is not int \
                or opinion.epoch != previous.epoch or opinion.author not in previous.weights:
            continue
        raw = _canonical(opinion)
        if raw is None:
            continue
        if network_id is not None and not verify_opinion(opinion, network_id):
            continue
        key = hashlib.sha256(raw).digest() + raw
        kept = best.get(opinion.author)
        if kept is None or key < kept[0]:
            best[opinion.author] = (key, opinion)
    return {author: best[author][1] for author in sorted(best)}


def weighted_median(values: Iterable[tuple[int, int]]) -> int:
    """Lower weighted median of ``(value, weight)`` pairs (weights >= 1).

    The smallest value ``v`` such that the weight of values ``<= v`` is at
    least half the total. If weight strictly below half the total lies
    outside ``[lo, hi]`` (a byzantine minority), the result lies in
    ``[lo, hi]``. Integers only.

    Raises:
        LocalProtocolError: no values, or a weight < 1.
    """
    pairs = sorted(values)
    if not pairs:
        raise LocalProtocolError("weighted median of nothing")
    if any(type(w) is not int or w < 1 for _, w in pairs):
        raise LocalProtocolError("weights must be ints >= 1")
    total = sum(w for _, w in pairs)
    running = 0
    for value, weight in pairs:
        running += weight
        if 2 * running >= total:
            return value
    raise AssertionError("unreachable")  # pragma: no cover


def median_scores(previous: WeightTable, opinions: Iterable[Opinion], peers: Iterable[str],
                  policy: WeightPolicy | None = None,
                  network_id: bytes | None = None) -> dict[str, int | None]:
    """Reputation-weighted median score (ppm) of each of ``peers``.

    Each counted opinion (see :func:`select_opinions`) is weighted by its
    author's weight in ``previous``; an author's entry about itself is
    ignored. ``None`` where the authors with an opinion about the peer do not
    hold strictly more than ``policy.min_evidence`` of the previous table's
    weight (the peer's own weight excluded).
    """
    policy = policy or WeightPolicy()
    chosen = select_opinions(previous, opinions, network_id)
    about: dict[str, list[tuple[int, int]]] = {}
    for author, opinion in chosen.items():
        weight = previous.weights[author]
        for entry in opinion.entries:
            if entry.peer_id != author:
                about.setdefault(entry.peer_id, []).append((entry.score_ppm, weight))
    total = previous.total
    out: dict[str, int | None] = {}
    for peer_id in sorted(set(peers)):
        pairs = about.get(peer_id, [])
        evidence = sum(w for _, w in pairs)
        eligible = total - previous.weights.get(peer_id, 0)
        need = policy.min_evidence
        if not pairs or evidence * need.denominator <= need.numerator * eligible:
            out[peer_id] = None
        else:
            out[peer_id] = weighted_median(pairs)
    return out


def next_weight_table(previous: WeightTable, opinions: Iterable[Opinion], members: Iterable[str],
                      policy: WeightPolicy | None = None, *,
                      network_id: bytes | None = None) -> WeightTable:
    """The weight table of epoch ``previous.epoch + 1`` (deterministic; integers only).

    Inputs must be committed (the same on every honest peer): the previous
    table, the opinions committed during ``previous.epoch``, and the member
    list of the next epoch. The result does not depend on the order of
    ``opinions`` or ``members``.

    For each member ``p`` (duplicates ignored), with ``m`` its weighted median
    score in ppm from :func:`median_scores`:

    * target ``t = max(1, m * weight_scale // 1_000_000)`` (floor division,
      then raised to 1: **a member's weight never drops below 1**; removing a
      peer is a membership decision, not a reputation one, and keeping it at 1
      means it cannot re-enter later as a fresh newcomer);
    * a member of ``previous`` with weight ``w``: ``min(t, w + max_growth_per_epoch)``,
      or ``w`` unchanged when ``m`` is ``None`` (too little evidence);
    * a newcomer: ``min(t, newcomer_weight)``, or ``newcomer_weight`` when
      ``m`` is ``None``;
    * the newcomer cap: ``budget = floor(min(previous.total, kept) *
      max_newcomer_share)``, ``kept`` being the total weight of the members of
      ``previous`` just computed. At most ``n = min(newcomer_count, budget,
      MAX_VOTERS - members of previous)`` newcomers enter, the first ``n`` in
      peer id order (the others are left out; they may join in a later epoch);
      if their weights add up to more than ``budget``, each is cut to at most
      ``budget // n``. So newcomers never hold more than ``budget`` together,
      and the table never exceeds :data:`~chimera.consensus.quorum.MAX_VOTERS`
      peers because of them. (Before 2026-12 the cut was ``max(1, budget //
      count)`` with no bound on the count: a flood of joins at weight 1 each
      outweighed the validators, and a quorum was never reached again.)

    Peers of ``previous`` that are not in ``members`` are left out. Opinions
    by peers outside ``previous`` count for nothing, so fresh identities
    cannot vouch for each other; a member vouched for by everyone still gains
    at most ``max_growth_per_epoch`` per epoch. No normalisation of the total
    is done (it would break these per-peer bounds).

    Args:
        previous: the current epoch's table.
        opinions: committed opinions (any order; invalid and extra ones are
            dropped, see :func:`select_opinions`).
        members: peer ids of the next epoch (at least one).
        policy: the network's :class:`WeightPolicy` (default values if ``None``).
        network_id: when given, opinions whose signature does not verify are dropped.
    Raises:
        LocalProtocolError: ``members`` is empty or holds a non-peer-id, or (with a
            newcomer cap) no member of ``previous`` is left to admit newcomers.
    """
    policy = policy or WeightPolicy()
    member_set = set(members)
    if not member_set:
        raise LocalProtocolError("the next epoch needs at least one member")
    for peer_id in member_set:
        try:
            public_key_from_peer_id(peer_id)
        except MalformedError as exc:
            raise LocalProtocolError(f"member is not a peer id: {exc}") from None
    medians = median_scores(previous, opinions, member_set, policy, network_id)
    weights: dict[str, int] = {}
    newcomers = []
    for peer_id in sorted(member_set):
        median = medians[peer_id]
        target = None if median is None else max(1, median * policy.weight_scale // PPM)
        old = previous.weights.get(peer_id)
        if old is not None:
            weights[peer_id] = old if target is None else min(target, old + policy.max_growth_per_epoch)
        else:
            newcomers.append(peer_id)
            weights[peer_id] = policy.newcomer_weight if target is None else min(target, policy.newcomer_weight)
    if newcomers:
        room = max(0, MAX_VOTERS - (len(weights) - len(newcomers)))
        share = policy.max_newcomer_share
        budget = None
        if share is not None:
            kept = sum(w for p, w in weights.items() if p in previous.weights)
            budget = min(previous.total, kept) * share.numerator // share.denominator
            room = min(room, budget)  # every newcomer holds at least 1
        for peer_id in newcomers[room:]:  # newcomers are in peer id order
            del weights[peer_id]
        entering = newcomers[:room]
        if budget is not None and entering and sum(weights[p] for p in entering) > budget:
            each = budget // len(entering)  # >= 1: at most `budget` enter
            for peer_id in entering:
                weights[peer_id] = min(weights[peer_id], each)
        if not weights:
            raise LocalProtocolError("no member of the previous table is left to admit newcomers")
    return WeightTable(epoch=previous.epoch + 1, weights=weights)


def newcomer_budget(previous: WeightTable, policy: WeightPolicy | None = None) -> int | None:
    """``floor(previous.total * max_newcomer_share)``: the most weight the newcomers of the
    epoch after ``previous`` can hold together (None: no such bound). :func:`next_weight_table`
    also bounds them by the share of what the previous members keep."""
    share = (policy or WeightPolicy()).max_newcomer_share
    return None if share is None else previous.total * share.numerator // share.denominator


def max_joins_per_epoch(previous: WeightTable, policy: WeightPolicy | None = None) -> int:
    """How many committed joins the ledger admits during the epoch of ``previous``
    (PROTOCOL §15.3): ``max(1, budget // newcomer_weight)`` (none when the budget is 0),
    and no more than the :data:`~chimera.consensus.quorum.MAX_VOTERS` bound on the table
    leaves room for. Joins beyond it are committed but ignored (they may join again in
    a later epoch), so a flood of joins cannot grow the table or the newcomers' weight."""
    policy = policy or WeightPolicy()
    room = max(0, MAX_VOTERS - len(previous.weights))
    budget = newcomer_budget(previous, policy)
    if budget is None:
        return room
    return min(room, budget, max(1, budget // policy.newcomer_weight))


# -------------------------------------------------------------------- EigenTrust

EIGENTRUST_ONE = 1 << 32
"""Fixed-point 1.0 of :func:`eigentrust_scores` (trust values are ints in 0..2**32)."""


def eigentrust_scores(previous: WeightTable, opinions: Iterable[Opinion], pretrusted: Iterable[str],
                      *, alpha: Fraction = Fraction(1, 10), iterations: int = 20,
                      network_id: bytes | None = None) -> dict[str, int]:
    """Global trust by EigenTrust (Kamvar et al. 2003), deterministic fixed point.

    Peers: those of ``previous``. Local trust ``c_ij`` is author ``i``'s
    opinion score of ``j`` (self entries and unknown peers ignored),
    normalised per author to sum 1; an author with no usable entries trusts
    the pre-trusted distribution ``p`` (uniform over ``pretrusted`` peers in
    the table, or over all peers if none). Starting from ``t = p``, each of
    ``iterations`` rounds computes ``t = (1 - alpha) * C^T t + alpha * p``.
    All values are integers scaled by :data:`EIGENTRUST_ONE`; every product is
    floor-divided, so the result is identical on every peer (it may sum to
    slightly less than 1.0 by rounding).

    Returns:
        peer id -> trust in 0..EIGENTRUST_ONE, sorted by peer id.
    Raises:
        LocalProtocolError: ``alpha`` not in [0, 1] or ``iterations`` < 0.
    """
    alpha = Fraction(alpha)
    if not 0 <= alpha <= 1:
        raise LocalProtocolError("alpha must be in [0, 1]")
    if type(iterations) is not int or iterations < 0:
        raise LocalProtocolError("iterations must be an int >= 0")
    peers = sorted(previous.weights)
    one = EIGENTRUST_ONE
    trusted = sorted(set(pretrusted) & set(peers)) or peers
    p = {j: (one // len(trusted) if j in trusted else 0) for j in peers}
    chosen = select_opinions(previous, opinions, network_id)
    rows: dict[str, list[tuple[str, int]]] = {}
    for i in peers:
        opinion = chosen.get(i)
        scores = [] if opinion is None else [
            (e.peer_id, e.score_ppm) for e in opinion.entries
            if e.peer_id != i and e.peer_id in previous.weights and e.score_ppm > 0]
        total = sum(s for _, s in scores)
        if total == 0:
            rows[i] = [(j, v) for j, v in p.items() if v]
        else:
            rows[i] = [(j, s * one // total) for j, s in scores]
    keep_num, keep_den = (1 - alpha).numerator, (1 - alpha).denominator
    t = dict(p)
    for _ in range(iterations):
        spread = dict.fromkeys(peers, 0)
        for i in peers:
            if t[i]:
                for j, c in rows[i]:
                    spread[j] += c * t[i] // one
        t = {j: (spread[j] * keep_num // keep_den) + (p[j] * alpha.numerator // alpha.denominator)
             for j in peers}
    return t
