"""Application ballots: signed votes, tally rules and vote certificates (pure).

This is the "swarm consensus" of the earlier prototypes, rebuilt on
:mod:`chimera.consensus.quorum`: the agent fabric asks several peers to compute
the same result, each peer signs the digest of what it computed, and the result
is accepted once a rule over the epoch's :class:`~chimera.consensus.quorum.WeightTable`
holds. Whoever accepted it can hand out a :class:`VoteCertificate` that anyone
holding the same weight table re-checks with :func:`verify_vote_certificate`.

Pieces:

* :class:`Ballot` (wire record): the question. Its ``ballot_id`` is the SHA-256
  of its terms (epoch, purpose, options, rule, threshold, deadline), so a vote
  signed for one ballot can never be presented under other terms (say a lower
  threshold). Two ballots with identical terms are the same ballot: put what
  makes a question unique (task id, run number) into ``purpose``.
* :class:`BallotVote` (wire record): one voter's signed choice. The signature is
  :func:`~chimera.consensus.quorum.sign_vote` with purpose ``"ballot"``, the
  ballot's epoch and the statement ``[ballot_id, choice]``.
* :class:`Tally`: a pure accumulator for one ballot (no clock: the driver passes
  ``now_ms``). It verifies every vote, drops unknown voters, duplicates and
  votes for other ballots, reports equivocation (:class:`Equivocation` evidence)
  and decides as soon as the rule holds.
* :func:`evaluate`: the same rules over a batch of votes, in one call.

Rules (``Ballot.rule``), ``t`` the ballot's threshold (a :class:`~fractions.Fraction`),
*eligible* the peers of the weight table (all weights >= 1), a choice's
*supporters* the distinct eligible voters whose (non-equivocating) vote is for it:

* ``"majority"``: one peer one vote. Decided for ``c`` when
  ``supporters(c) > t * eligible_count`` (strictly). ``t`` defaults to 1/2.
* ``"weighted"``: reputation weighted. Decided for ``c`` when
  ``weight(supporters(c)) > t * total_weight`` (strictly). ``t`` defaults to 1/2.
* ``"quorum"``: the same weight test, named for supermajorities; ``t``
  defaults to 2/3 (CometBFT's "more than two thirds").
* ``"unanimous"``: every eligible peer voted for ``c`` (``t`` is stored as 1/1).

All arithmetic is exact (integers): ``amount * t.denominator > t.numerator * total``.
For the three threshold rules ``1/2 <= t < 1``, so at most one choice can ever
be decided; that makes an early decision final (see :class:`Tally`).

Errors: building a record with invalid fields raises ``ValueError`` (turned into
``MalformedError`` by the codec when the fields came from the wire); misuse of
the API raises ``LocalProtocolError``; a certificate or evidence that does not
hold raises :class:`~chimera.consensus.quorum.CertificateError` (a
``RemoteProtocolError``).

Units: ``deadline_ms`` and every ``now_ms`` are integer milliseconds of the
same wall clock (milliseconds only on the wire, as everywhere). The deadline is
enforced by the tally that receives the votes; a certificate proves that the
votes exist, not when they arrived.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Collection, Iterable

import msgpack

from chimera.consensus.quorum import (
    MAX_VOTERS,
    CertificateError,
    SignedVote,
    WeightTable,
    sign_vote,
    verify_vote,
    verify_votes,
)
from chimera.protocol.errors import LocalProtocolError
from chimera.protocol.identity import SIGNATURE_BYTES, SigningIdentity
from chimera.protocol.messages import Len, MaxItems, MaxLen, PeerId, Range, record

BALLOT_PURPOSE = "ballot"
"""Purpose (signature domain) of every ballot vote."""
BALLOT_ID_DOMAIN = b"chimera-mesh/ballot/v1\x00"
BALLOT_ID_BYTES = 32
MAX_CHOICE_BYTES = 64
MAX_OPTIONS = 64
MAX_PURPOSE_CHARS = 256
MAX_THRESHOLD_TERM = 2**32

MAJORITY = "majority"
WEIGHTED = "weighted"
UNANIMOUS = "unanimous"
QUORUM = "quorum"
RULES = (MAJORITY, WEIGHTED, UNANIMOUS, QUORUM)
DEFAULT_THRESHOLDS = {MAJORITY: Fraction(1, 2), WEIGHTED: Fraction(1, 2),
                      QUORUM: Fraction(2, 3), UNANIMOUS: Fraction(1)}

Choice = Annotated[bytes, MaxLen(MAX_CHOICE_BYTES)]
BallotId = Annotated[bytes, Len(BALLOT_ID_BYTES)]


def _short(raw: bytes) -> str:
    return raw[:4].hex()


def _check_choice(choice: bytes) -> None:
    if not 1 <= len(choice) <= MAX_CHOICE_BYTES:
        raise ValueError(f"a choice is 1 to {MAX_CHOICE_BYTES} bytes")


# ------------------------------------------------------------------ wire types


@record
class Ballot:
    """A question put to the voters of one epoch.

    Fields:
        ballot_id: 32 bytes, :meth:`compute_id` of the other fields (checked).
        epoch: the epoch whose weight table decides who votes and with what weight.
        purpose: what is being decided, <= 256 characters (e.g. ``"task 17 result"``).
        options: allowed choices (distinct, 1..64 bytes each, at most 64); empty
            means free-form: any 1..64-byte choice, typically a result digest.
        rule: one of :data:`RULES`.
        threshold_num, threshold_den: the threshold as a reduced fraction;
            ``1/2 <= t < 1`` for majority/weighted/quorum, exactly ``1/1`` for unanimous.
        deadline_ms: optional wall-clock milliseconds; a vote arriving at or after
            it is late, and an undecided ballot fails there.
    Raises:
        ValueError: any field breaks the rules above (``MalformedError`` when decoded).

    Build one with :meth:`create`, which fills in the id and the default threshold.
    """

    ballot_id: BallotId
    epoch: Annotated[int, Range(0, 2**63 - 1)]
    purpose: Annotated[str, MaxLen(MAX_PURPOSE_CHARS)]
    options: Annotated[tuple[Choice, ...], MaxItems(MAX_OPTIONS)] = ()
    rule: Annotated[str, MaxLen(16)]
    threshold_num: Annotated[int, Range(0, MAX_THRESHOLD_TERM)]
    threshold_den: Annotated[int, Range(1, MAX_THRESHOLD_TERM)]
    deadline_ms: Annotated[int, Range(0, 2**63 - 1)] | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown ballot rule {self.rule[:16]!r}")
        for option in self.options:
            _check_choice(option)
        if len(set(self.options)) != len(self.options):
            raise ValueError("ballot options must be distinct")
        num, den = self.threshold_num, self.threshold_den
        if den < 1 or math.gcd(num, den) != 1:
            raise ValueError("threshold must be a reduced fraction with a positive denominator")
        if num > MAX_THRESHOLD_TERM or den > MAX_THRESHOLD_TERM:  # the wire's bound on both terms
            raise ValueError(f"threshold {num}/{den}: numerator and denominator must be at most 2**32")
        t = Fraction(num, den)
        if self.rule == UNANIMOUS:
            if t != 1:
                raise ValueError("a unanimous ballot has threshold 1/1")
        elif not Fraction(1, 2) <= t < 1:
            raise ValueError(f"threshold of a {self.rule} ballot must be in [1/2, 1), got {t}")
        if self.ballot_id != self.compute_id(
                epoch=self.epoch, purpose=self.purpose, options=self.options, rule=self.rule,
                threshold=t, deadline_ms=self.deadline_ms):
            raise ValueError("ballot id does not match the ballot's terms")

    @staticmethod
    def compute_id(*, epoch: int, purpose: str, options: tuple[bytes, ...], rule: str,
                   threshold: Fraction, deadline_ms: int | None) -> bytes:
        """SHA-256 of ``BALLOT_ID_DOMAIN || msgpack([epoch, purpose, options, rule, num, den, deadline_ms])``."""
        terms = [epoch, purpose, list(options), rule, threshold.numerator, threshold.denominator,
                 deadline_ms]
        return hashlib.sha256(BALLOT_ID_DOMAIN + msgpack.packb(terms, use_bin_type=True)).digest()

    @classmethod
    def create(cls, *, epoch: int, purpose: str, rule: str, threshold: Fraction | None = None,
               options: Iterable[bytes] = (), deadline_ms: int | None = None) -> "Ballot":
        """A ballot with its id computed; ``threshold`` defaults to :data:`DEFAULT_THRESHOLDS`.

        Raises:
            LocalProtocolError: unknown rule, bad threshold, options or purpose.
        """
        if rule not in RULES:
            raise LocalProtocolError(f"unknown ballot rule {rule!r}; one of {RULES}")
        if threshold is not None and (type(threshold) is bool or not isinstance(threshold, (Fraction, int))):
            raise LocalProtocolError(f"threshold must be an exact fraction (Fraction), not {type(threshold).__name__}")
        t = DEFAULT_THRESHOLDS[rule] if threshold is None else Fraction(threshold)
        if not isinstance(purpose, str) or len(purpose) > MAX_PURPOSE_CHARS:
            raise LocalProtocolError(f"purpose must be a str of <= {MAX_PURPOSE_CHARS} characters")
        options = tuple(options)
        try:
            ballot_id = cls.compute_id(epoch=epoch, purpose=purpose, options=options, rule=rule,
                                       threshold=t, deadline_ms=deadline_ms)
            return cls(ballot_id=ballot_id, epoch=epoch, purpose=purpose, options=options, rule=rule,
                       threshold_num=t.numerator, threshold_den=t.denominator,
                       deadline_ms=deadline_ms)
        except (ValueError, TypeError) as exc:
            raise LocalProtocolError(f"invalid ballot: {exc}") from None

    @property
    def threshold(self) -> Fraction:
        return Fraction(self.threshold_num, self.threshold_den)

    def allows(self, choice: bytes) -> bool:
        """True when ``choice`` is a valid answer (one of the options, or any 1..64 bytes if free-form)."""
        if type(choice) is not bytes or not 1 <= len(choice) <= MAX_CHOICE_BYTES:
            return False
        return not self.options or choice in self.options

    def describe(self) -> str:
        rule = self.rule if self.rule == UNANIMOUS else f"{self.rule}>{self.threshold}"
        options = f"{len(self.options)} options" if self.options else "free-form"
        return f"ballot {_short(self.ballot_id)} epoch {self.epoch} {rule} {options}: {self.purpose[:40]}"


def ballot_statement(ballot_id: bytes, choice: bytes) -> list:
    """The statement a ballot vote signs: ``[ballot_id, choice]``."""
    return [ballot_id, choice]


@record
class BallotVote:
    """One voter's signed choice on one ballot.

    ``signature`` is Ed25519 over
    ``statement_bytes("ballot", network_id, ballot.epoch, [ballot_id, choice])``.
    Build with :meth:`sign`.
    """

    ballot_id: BallotId
    choice: Choice
    voter: PeerId
    signature: Annotated[bytes, Len(SIGNATURE_BYTES)]

    def __post_init__(self) -> None:
        _check_choice(self.choice)

    @classmethod
    def sign(cls, identity: SigningIdentity, ballot: Ballot, choice: bytes,
             network_id: bytes) -> "BallotVote":
        """``identity`` votes ``choice`` on ``ballot``.

        Raises:
            LocalProtocolError: ``choice`` is not allowed by the ballot.
        """
        if not ballot.allows(choice):
            raise LocalProtocolError(f"choice {_short(choice) if isinstance(choice, bytes) else choice!r} "
                                     f"is not allowed on {ballot.describe()}")
        signed = sign_vote(identity, BALLOT_PURPOSE, network_id, ballot.epoch,
                           ballot_statement(ballot.ballot_id, choice))
        return cls(ballot_id=ballot.ballot_id, choice=choice, voter=signed.voter,
                   signature=signed.signature)

    def verify(self, epoch: int, network_id: bytes) -> bool:
        """True when the signature is the voter's over this ballot id and choice in ``epoch``."""
        return verify_vote(self.signed_vote(), BALLOT_PURPOSE, network_id, epoch,
                           ballot_statement(self.ballot_id, self.choice))

    def signed_vote(self) -> SignedVote:
        return SignedVote(voter=self.voter, signature=self.signature)

    def describe(self) -> str:
        return f"{self.voter[:10]} votes {_short(self.choice)} on {_short(self.ballot_id)}"


@record
class Equivocation:
    """Evidence: one voter signed two different choices on the same ballot."""

    first: BallotVote
    second: BallotVote

    def describe(self) -> str:
        return (f"equivocation by {self.first.voter[:10]} on {_short(self.first.ballot_id)}: "
                f"{_short(self.first.choice)} vs {_short(self.second.choice)}")


def verify_equivocation(evidence: Equivocation, epoch: int, network_id: bytes) -> str:
    """Check equivocation evidence; return the equivocating peer id.

    Raises:
        CertificateError (reason ``bad_evidence``): not the same voter and
            ballot, the same choice twice, or a signature that does not verify.
    """
    a, b = evidence.first, evidence.second
    if a.voter != b.voter or a.ballot_id != b.ballot_id:
        raise CertificateError("evidence votes differ in voter or ballot", reason="bad_evidence")
    if a.choice == b.choice:
        raise CertificateError("evidence votes have the same choice", reason="bad_evidence")
    for vote in (a, b):
        if not vote.verify(epoch, network_id):
            raise CertificateError(f"evidence signature of {vote.voter[:10]} does not verify",
                                   reason="bad_evidence")
    return a.voter


@record
class VoteCertificate:
    """Proof that ``ballot`` was decided for ``choice``.

    ``votes`` are the signatures (distinct voters, sorted by peer id) over
    ``[ballot.ballot_id, choice]``; together they meet the ballot's rule under the
    epoch's weight table. Check with :func:`verify_vote_certificate`.
    """

    ballot: Ballot
    choice: Choice
    votes: Annotated[tuple[SignedVote, ...], MaxItems(MAX_VOTERS)]

    def __post_init__(self) -> None:
        _check_choice(self.choice)

    def voters(self) -> list[str]:
        return [v.voter for v in self.votes]

    def ballot_votes(self) -> list[BallotVote]:
        """The votes as self-contained :class:`BallotVote` records."""
        return [BallotVote(ballot_id=self.ballot.ballot_id, choice=self.choice, voter=v.voter,
                           signature=v.signature) for v in self.votes]

    def describe(self) -> str:
        return (f"vote certificate {_short(self.ballot.ballot_id)}={_short(self.choice)} "
                f"({len(self.votes)} votes, {self.ballot.rule})")


# ----------------------------------------------------------------------- rules


def rule_met(ballot: Ballot, table: WeightTable, voters: Iterable[str]) -> bool:
    """True when ``voters`` (all for one choice) satisfy ``ballot.rule`` under ``table``.

    Distinct voters only count once; voters absent from ``table`` count 0.
    ``majority``: ``count * den > num * len(table)``; ``weighted``/``quorum``:
    ``weight * den > num * total``; ``unanimous``: every peer of ``table``.
    """
    known = set(voters) & table.weights.keys()
    if ballot.rule == UNANIMOUS:
        return len(known) == len(table.weights)
    if ballot.rule == MAJORITY:
        amount, total = len(known), len(table.weights)
    else:
        amount, total = table.weight_of(known), table.total
    return amount * ballot.threshold_den > ballot.threshold_num * total


def _need(ballot: Ballot, table: WeightTable, voters: Collection[str]) -> str:
    """Human summary of how far ``voters`` are from the rule."""
    if ballot.rule == UNANIMOUS:
        return f"{len(voters)} of all {len(table.weights)} voters"
    if ballot.rule == MAJORITY:
        return f"{len(voters)} of {len(table.weights)} voters, need more than {ballot.threshold}"
    return f"weight {table.weight_of(voters)} of {table.total}, need more than {ballot.threshold}"


def verify_vote_certificate(cert: VoteCertificate, table: WeightTable, network_id: bytes) -> None:
    """Recompute the ballot's rule from ``cert`` alone.

    Args:
        cert: the certificate (its ballot's id was already checked on construction).
        table: the weight table of ``cert.ballot.epoch``.
        network_id: the network the votes were signed for.
    Raises:
        CertificateError: epoch of ``table`` differs from the ballot's, choice not
            allowed by the ballot, a voter twice, a voter without weight in the
            table, a signature that does not verify over ``[ballot_id, choice]``,
            or the voters not meeting the rule (strictly above the threshold).
    """
    ballot = cert.ballot
    if table.epoch != ballot.epoch:
        raise CertificateError(f"certificate is for epoch {ballot.epoch}, weight table for {table.epoch}")
    if not ballot.allows(cert.choice):
        raise CertificateError(f"choice {_short(cert.choice)} is not an option of the ballot")
    statement = ballot_statement(ballot.ballot_id, cert.choice)
    seen = verify_votes(cert.votes, table, BALLOT_PURPOSE, network_id, statement)
    if not rule_met(ballot, table, seen):
        raise CertificateError(f"certificate does not meet {ballot.rule}: {_need(ballot, table, seen)}")


# ----------------------------------------------------------------------- tally


class VoteStatus(str, enum.Enum):
    """What :meth:`Tally.add` did with a vote. Values double as drop-reason tokens."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"            # same voter, same choice again (harmless)
    EQUIVOCATION = "equivocation"      # same voter, another choice: both votes excluded
    EQUIVOCATOR = "equivocator"        # a later vote of a known equivocator
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_VOTER = "unknown_voter"    # no weight in the ballot's epoch
    WRONG_BALLOT = "wrong_ballot"
    INVALID_CHOICE = "invalid_choice"  # not one of the ballot's options
    LATE = "late"                      # now_ms >= deadline_ms


@dataclass(frozen=True, slots=True)
class AddResult:
    """Result of :meth:`Tally.add`.

    ``evidence`` is set for ``EQUIVOCATION``; ``decided`` is True for the one
    vote that made the ballot decided.
    """

    status: VoteStatus
    detail: str = ""
    evidence: Equivocation | None = None
    decided: bool = False

    @property
    def accepted(self) -> bool:
        return self.status is VoteStatus.ACCEPTED


class OutcomeStatus(str, enum.Enum):
    DECIDED = "decided"
    PENDING = "pending"    # undecided, a decision is still reachable
    FAILED = "failed"      # no choice can meet the rule any more, or the deadline passed


@dataclass(frozen=True, slots=True)
class Outcome:
    """A ballot's state.

    Attributes:
        status: decided, pending or failed.
        reason: stable token: ``"rule_met"``, ``"pending"``, ``"impossible"``
            (no choice can meet the rule with the votes still possible) or
            ``"deadline"``.
        detail: one human line.
        choice: the decided choice (None unless decided).
        certificate: a :class:`VoteCertificate` (None unless decided).
        equivocators: peer ids whose votes were excluded, sorted.
    """

    status: OutcomeStatus
    reason: str
    detail: str = ""
    choice: bytes | None = None
    certificate: VoteCertificate | None = None
    equivocators: tuple[str, ...] = ()

    @property
    def decided(self) -> bool:
        return self.status is OutcomeStatus.DECIDED

    def describe(self) -> str:
        head = f"{self.status.value} {_short(self.choice)}" if self.choice else self.status.value
        extra = f", {len(self.equivocators)} equivocators" if self.equivocators else ""
        return f"{head} ({self.reason}: {self.detail}{extra})"


class Tally:
    """Accumulates the votes of one ballot and decides it (pure, no clock).

    Args:
        ballot: the ballot.
        table: the weight table of ``ballot.epoch`` (its peers are the eligible voters).
        network_id: the network the votes are signed for.
    Raises:
        LocalProtocolError: ``table.epoch != ballot.epoch``, or the table has
            more than ``MAX_VOTERS`` peers (a certificate could not carry them).

    Each vote goes through :meth:`add`. Checks, in order: ballot id, voter
    eligibility, choice, signature, then duplicate / equivocation. A voter who
    signs two different choices is an equivocator: its first vote is withdrawn
    from the count, the two votes are returned (and kept) as
    :class:`Equivocation` evidence, and its later votes are refused.

    The ballot is decided by the first accepted vote after which a choice meets
    the rule. The decision is final: its certificate is frozen at that moment
    (it stays verifiable whatever arrives later), and since every threshold is
    at least 1/2 no other choice can meet the rule afterwards, even if a
    supporter is later caught equivocating (it is then listed in
    ``Outcome.equivocators``).
    """

    def __init__(self, ballot: Ballot, table: WeightTable, network_id: bytes) -> None:
        if table.epoch != ballot.epoch:
            raise LocalProtocolError(f"weight table of epoch {table.epoch} for a ballot of epoch {ballot.epoch}")
        if len(table.weights) > MAX_VOTERS:
            raise LocalProtocolError(f"more than {MAX_VOTERS} voters")
        self.ballot = ballot
        self.table = table
        self.network_id = network_id
        self._votes: dict[str, BallotVote] = {}              # voter -> counted vote
        self._support: dict[bytes, dict[str, BallotVote]] = {}  # choice -> voter -> vote
        self._equivocations: dict[str, Equivocation] = {}    # voter -> first evidence
        self._decision: Outcome | None = None

    # ---------------------------------------------------------------- inputs

    def add(self, vote: BallotVote, now_ms: int | None = None) -> AddResult:
        """Count ``vote`` if valid; see :class:`VoteStatus` for every result.

        ``now_ms``: current wall-clock milliseconds, only needed when the ballot
        has a deadline (a vote at or after ``deadline_ms`` is ``LATE``). Never
        raises for bad votes: a non-accepted status is the peer's fault, for
        the caller to count and report.
        """
        ballot = self.ballot
        if vote.ballot_id != ballot.ballot_id:
            return AddResult(VoteStatus.WRONG_BALLOT, f"vote for ballot {_short(vote.ballot_id)}")
        if self._late(now_ms):
            return AddResult(VoteStatus.LATE, f"at {now_ms} ms, deadline {ballot.deadline_ms} ms")
        if vote.voter not in self.table.weights:
            return AddResult(VoteStatus.UNKNOWN_VOTER, f"{vote.voter[:10]} has no weight in epoch {ballot.epoch}")
        if vote.voter in self._equivocations:
            return AddResult(VoteStatus.EQUIVOCATOR, f"{vote.voter[:10]} already equivocated")
        if not ballot.allows(vote.choice):
            return AddResult(VoteStatus.INVALID_CHOICE, f"{_short(vote.choice)} is not an option")
        previous = self._votes.get(vote.voter)
        if previous == vote:
            return AddResult(VoteStatus.DUPLICATE, "same vote again")
        if not vote.verify(ballot.epoch, self.network_id):
            return AddResult(VoteStatus.BAD_SIGNATURE, f"vote of {vote.voter[:10]} does not verify")
        if previous is not None:
            if previous.choice == vote.choice:
                return AddResult(VoteStatus.DUPLICATE, "same choice again")
            evidence = Equivocation(first=previous, second=vote)
            self._equivocations[vote.voter] = evidence
            del self._votes[vote.voter]
            del self._support[previous.choice][vote.voter]
            if not self._support[previous.choice]:
                del self._support[previous.choice]
            return AddResult(VoteStatus.EQUIVOCATION, evidence.describe(), evidence=evidence)
        self._votes[vote.voter] = vote
        supporters = self._support.setdefault(vote.choice, {})
        supporters[vote.voter] = vote
        if self._decision is None and rule_met(ballot, self.table, supporters):
            self._decision = Outcome(
                OutcomeStatus.DECIDED, "rule_met", _need(ballot, self.table, supporters),
                choice=vote.choice, certificate=self._certificate(vote.choice))
            return AddResult(VoteStatus.ACCEPTED, decided=True)
        return AddResult(VoteStatus.ACCEPTED)

    # --------------------------------------------------------------- queries

    def outcome(self, now_ms: int | None = None) -> Outcome:
        """The ballot's state now.

        Decided (final, with the certificate frozen at decision time); otherwise
        failed with reason ``"impossible"`` when :meth:`can_still_decide` is
        False, failed with ``"deadline"`` when ``now_ms >= deadline_ms``, else
        pending.
        """
        equivocators = tuple(sorted(self._equivocations))
        if self._decision is not None:
            if equivocators == self._decision.equivocators:
                return self._decision
            return Outcome(self._decision.status, self._decision.reason, self._decision.detail,
                           self._decision.choice, self._decision.certificate, equivocators)
        best = self._best_reachable()
        detail = f"best reachable: {_need(self.ballot, self.table, best)}"
        if not rule_met(self.ballot, self.table, best):
            return Outcome(OutcomeStatus.FAILED, "impossible", detail, equivocators=equivocators)
        if self._late(now_ms):
            return Outcome(OutcomeStatus.FAILED, "deadline",
                           f"deadline {self.ballot.deadline_ms} ms passed; {detail}", equivocators=equivocators)
        leading = max(self._support.values(), key=len, default={})
        return Outcome(OutcomeStatus.PENDING, "pending",
                       f"{len(self._votes)} votes counted; leading {_need(self.ballot, self.table, leading)}",
                       equivocators=equivocators)

    def can_still_decide(self) -> bool:
        """True when decided, or when some choice could still meet the rule if
        every eligible peer that has not voted (and has not equivocated) voted for it.

        False means the ballot has failed for good: the driver may stop waiting
        before the deadline. Monotone: once False, always False.
        """
        if self._decision is not None:
            return True
        return rule_met(self.ballot, self.table, self._best_reachable())

    @property
    def decided(self) -> bool:
        return self._decision is not None

    @property
    def evidence(self) -> list[Equivocation]:
        """Equivocation evidence, one per equivocating voter, in detection order."""
        return list(self._equivocations.values())

    def voters(self) -> frozenset[str]:
        """Peer ids whose vote was counted or who equivocated (nobody to ask again)."""
        return frozenset(self._votes) | frozenset(self._equivocations)

    def votes_for(self, choice: bytes) -> list[BallotVote]:
        """Counted votes for ``choice`` (equivocators excluded), sorted by voter."""
        return [v for _, v in sorted(self._support.get(choice, {}).items())]

    def counts(self) -> dict[bytes, tuple[int, int]]:
        """choice -> (number of counted voters, their total weight)."""
        return {c: (len(s), self.table.weight_of(s)) for c, s in self._support.items()}

    # -------------------------------------------------------------- internals

    def _late(self, now_ms: int | None) -> bool:
        deadline = self.ballot.deadline_ms
        return deadline is not None and now_ms is not None and now_ms >= deadline

    def _best_reachable(self) -> set[str]:
        """The largest supporter set any choice could still reach (by the rule's measure)."""
        remaining = self.table.weights.keys() - self._votes.keys() - self._equivocations.keys()
        candidates = [set(s) | remaining for s in self._support.values()] + [set(remaining)]
        if self.ballot.rule in (MAJORITY, UNANIMOUS):  # both count peers
            return max(candidates, key=len)
        return max(candidates, key=self.table.weight_of)

    def _certificate(self, choice: bytes) -> VoteCertificate:
        votes = tuple(v.signed_vote() for v in self.votes_for(choice))
        return VoteCertificate(ballot=self.ballot, choice=choice, votes=votes)

    def describe(self) -> str:
        return f"tally of {self.ballot.describe()}: {self.outcome().describe()}"


def evaluate(ballot: Ballot, table: WeightTable, network_id: bytes, votes: Iterable[BallotVote],
             now_ms: int | None = None) -> Outcome:
    """Apply ``ballot.rule`` to a batch of votes (a fresh :class:`Tally`, votes added in order).

    Invalid votes are skipped exactly as :meth:`Tally.add` refuses them.
    Raises ``LocalProtocolError`` as :class:`Tally` does.
    """
    tally = Tally(ballot, table, network_id)
    for vote in votes:
        tally.add(vote, now_ms)
    return tally.outcome(now_ms)
