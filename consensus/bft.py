"""BFT replicated log core: Tendermint consensus (pure, sans-IO).

Reference: Buchman, Kwon, Milosevic, "The latest gossip on BFT consensus"
(2018), Algorithm 1; proposer rotation and pacing as in CometBFT. Line numbers
in comments (``L22`` ...) refer to Algorithm 1.

Model
-----
* Validators and weights come from a :class:`~chimera.consensus.quorum.WeightTable`
  in force for a range of heights (:meth:`BftCore.set_weight_table`). A quorum
  is strictly more than 2/3 of the weight (``WeightTable.passes``); round
  skipping (L55) uses strictly more than 1/3.
* Each height runs rounds of propose / prevote / precommit with locking
  (``locked_round``/``locked_hash``) and ``valid_round``/``valid_block`` exactly
  as in Algorithm 1; timeouts grow per round: ``base + round * delta``.
* A block holds a batch of application values (sorted by SHA-256, no
  duplicates), the proposer, the epoch and the parent block hash; its content
  does not depend on the round, so a block re-proposed with a valid round keeps
  its hash. ``block_hash`` = SHA-256 of the canonical msgpack of the block.
* Proposals and votes are signed with :func:`~chimera.consensus.quorum.sign_vote`
  (purposes ``"proposal"``, ``"prevote"``, ``"precommit"``; statements
  ``[height, round, block_hash]`` for votes and ``[height, round, block_hash,
  valid_round]`` for proposals), so a commit carries a
  :class:`~chimera.consensus.quorum.QuorumCertificate` of precommits that anyone
  holding the epoch's weight table verifies with :func:`verify_commit`.
* Proposer of ``(height, round)``: the CometBFT proposer-priority algorithm
  (every step adds each validator's weight to its priority, picks the highest,
  ties to the smallest peer id, and subtracts the total weight from it). Step
  ``(height - table_height) + round`` of the sequence that starts from all-zero
  priorities when the table comes into force. Starting from zero, the sequence
  repeats every ``total weight`` steps (each validator is picked exactly
  ``weight`` times per period), so any peer (also one joining late) computes
  the same proposer from the table and its first height alone. Unlike CometBFT,
  priorities are *not* carried over across a table change.

Beyond the paper's pseudocode (all safe: they only change what is proposed or
which signed messages are seen, never a voting rule):

* "2f+1 prevotes for id(v)" counts every voter that signed ``id(v)``: an
  equivocator's second vote still counts for a block we know (the paper counts
  messages), so a polka that locked a correct peer is visible to the others.
* a polka of an earlier round seen late still raises ``valid_round`` (L36 only
  looks at the current round), so the next correct proposer re-proposes the
  value correct peers may be locked on; a re-proposer relays the polka's signed
  prevotes with its proposal (what L28 needs at every peer).

Gossip and catch-up
-------------------
Messages can be lost: every ``rebroadcast_interval_s`` the core re-broadcasts
its own signed votes of the rounds that matter (current, previous, lock, valid
round) and its proposal. A message of a *lower* height from a peer makes the
core push the certified commits that peer misses; a message of a *higher*
height makes it ask for commits (``BftCommitRequest``). Commits received are
verified (certificate against the weight table of their height, parent hash
against our chain) before they are applied: no peer is trusted. A proposer
that fell behind cannot know it (peers waiting for a proposal send nothing of
the new height), so at half the propose timeout the :data:`NUDGERS`
validators after it push it the last commit (:meth:`BftCore._nudge`).
Proposals and votes of the *next* height that arrive before our own commit
are held (bounded) and delivered when we get there (:meth:`BftCore._hold`);
a quorum of precommits for a block we never received makes us ask two of its
precommitters for the commit at once (:meth:`BftCore._fetch_decided`), and a
request for the height in progress is answered when it commits. Votes from
more than 1/3 of the weight for a block whose proposal we lack make us ask
two of the voters for the proposal if it has not come ``proposal_fetch_delay_s``
later (:meth:`BftCore._fetch_proposal`; ``BftProposalRequest``); still without the
commit well after our vote in a round, we ask two validators for it and for the
round's signed votes we lack (:meth:`BftCore._commit_poll`; ``BftVoteRequest``).

Driver duties (the order of :meth:`BftCore.take_actions` matters)
-----------------------------------------------------------------
* :class:`PersistVote`: write ``state`` durably *before* running the next
  action (which sends the signed proposal/vote). Pass the last persisted state
  back as ``sign_state`` on restart: the core then never signs a conflicting
  proposal or vote for the same or an earlier (height, round, step), and at
  the state's height (at once, or when catch-up gets there after the store lost
  commits) it resumes in the stored round with the stored lock.
* :class:`Commit`: persist the block with its certificate *before* running any
  later action and before acknowledging its values to clients.
* :class:`Broadcast` goes to every validator of the current table except us;
  :class:`Send` to one peer.
* :class:`Evidence`, :class:`Rejected`: feed reputation / audit log.
* :class:`ServeCommits`: a peer asked for commits older than the in-memory
  cache; answer from the store with a :class:`BftCommitResponse`.

The core never reads a clock: pass ``now`` (monotonic seconds) to every input
and call :meth:`BftCore.tick` at :meth:`BftCore.next_deadline`.
"""

from __future__ import annotations

import hashlib
import heapq
import statistics
from collections import Counter, deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Any, Callable, Iterable, Iterator

import msgpack

from chimera.consensus.quorum import (
    MAX_VOTERS,
    TWO_THIRDS,
    CertificateError,
    QuorumCertificate,
    SignedVote,
    WeightTable,
    sign_vote,
    verify_certificate,
    verify_vote,
)
from chimera.protocol.errors import LocalProtocolError, RemoteProtocolError
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.messages import Len, MaxItems, MaxLen, PeerId, Range, encode_fields, message, record

BFT_ACTOR = "consensus"
PROPOSAL = "proposal"
PREVOTE = "prevote"
PRECOMMIT = "precommit"
VOTE_TYPES = (PREVOTE, PRECOMMIT)
_STEP_RANK = {PROPOSAL: 0, PREVOTE: 1, PRECOMMIT: 2}
NEW_HEIGHT = "new_height"  # waiting commit_wait_s before round 0 of a fresh height
PROPOSE = "propose"

MAX_HEIGHT = 2**62
MAX_ROUND = 2**31
MAX_EPOCH = 2**62
MAX_BLOCK_VALUES = 256
MAX_VALUE_BYTES = 4096
MAX_VALUES_PER_MESSAGE = 64
MAX_COMMITS_PER_RESPONSE = 16
NUDGERS = 2  # validators after a silent proposer (peer-id order) that push it the last commit
MAX_HELD_PER_SENDER = 8  # proposals/votes of the next height held per validator until we get there
FETCH_DECIDED_FROM = 2  # precommitters asked for the commit of a decided block we never received
MAX_COMMIT_WAITERS = 64  # requests for the height in progress, answered when it commits
MAX_FOLLOW_UPS = 32  # catch-up follow-ups answered per peer per catchup_interval_s
GENESIS_HASH = bytes(32)  # default parent of height 1 for bare cores (tests, simulator); nodes pass Network.genesis_hash()
ONE_THIRD = Fraction(1, 3)

Height = Annotated[int, Range(1, MAX_HEIGHT)]
Round = Annotated[int, Range(0, MAX_ROUND)]
Hash32 = Annotated[bytes, Len(32)]
Value = Annotated[bytes, MaxLen(MAX_VALUE_BYTES)]


def _h8(digest: bytes | None) -> str:
    return "nil" if digest is None else digest.hex()[:8]


def value_hash(value: bytes) -> bytes:
    """SHA-256 of an application value (its identity in pools and blocks)."""
    return hashlib.sha256(value).digest()


# ------------------------------------------------------------------- wire types


@record
class Block:
    """A batch of values at ``height`` on top of ``parent_hash`` (round independent).

    ``values`` are sorted by :func:`value_hash`, strictly (no duplicates).
    ``parent_hash`` is the hash of the block at ``height - 1`` (at height 1 the network's
    genesis hash, PROTOCOL.md §3.1: the core's ``last_block_hash``).
    """

    height: Height
    epoch: Annotated[int, Range(0, MAX_EPOCH)]
    proposer: PeerId
    parent_hash: Hash32
    values: Annotated[tuple[Value, ...], MaxItems(MAX_BLOCK_VALUES)] = ()

    def describe(self) -> str:
        return (f"block h={self.height} {_h8(block_hash(self))} {len(self.values)} values "
                f"by {self.proposer[:10]}")


def block_hash(block: Block) -> bytes:
    """SHA-256 of the canonical msgpack encoding of ``block`` (field order fixed)."""
    return hashlib.sha256(msgpack.packb(encode_fields(block), use_bin_type=True)).digest()


@record
class Vote:
    """A signed prevote or precommit for ``block_hash`` (None: nil) in (height, round)."""

    vote_type: Annotated[str, MaxLen(9)]
    height: Height
    round: Round
    block_hash: Hash32 | None = None
    signed: SignedVote

    def __post_init__(self) -> None:
        if self.vote_type not in VOTE_TYPES:
            raise ValueError(f"unknown vote type {self.vote_type[:9]!r}")

    @property
    def voter(self) -> str:
        return self.signed.voter

    def statement(self) -> list:
        return [self.height, self.round, self.block_hash]

    def describe(self) -> str:
        return (f"{self.vote_type} h={self.height} r={self.round} {_h8(self.block_hash)} "
                f"by {self.voter[:10]}")


@record
class Equivocation:
    """Two different signed votes of one voter for the same (type, height, round)."""

    first: Vote
    second: Vote

    def describe(self) -> str:
        a = self.first
        return (f"equivocation by {a.voter[:10]}: {a.vote_type} h={a.height} r={a.round} "
                f"{_h8(a.block_hash)} vs {_h8(self.second.block_hash)}")


@record
class CertifiedCommit:
    """A decided block with the quorum certificate of precommits of ``round``."""

    round: Round
    block: Block
    certificate: QuorumCertificate

    @property
    def height(self) -> int:
        return self.block.height

    def describe(self) -> str:
        return f"commit h={self.height} r={self.round} {_h8(block_hash(self.block))} {self.certificate.describe()}"


@record
class SignState:
    """What the driver persists before sending a signed proposal or vote.

    ``step`` is ``"proposal"``, ``"prevote"`` or ``"precommit"``; ``locked_*``
    carry the lock (Algorithm 1 lockedRound / id(lockedValue)) at that moment.
    Store it with ``encode_fields`` and load it with ``decode_fields``.
    """

    height: Height
    round: Round
    step: Annotated[str, MaxLen(9)]
    block_hash: Hash32 | None = None
    valid_round: Round | None = None
    locked_round: Round | None = None
    locked_hash: Hash32 | None = None

    def __post_init__(self) -> None:
        if self.step not in _STEP_RANK:
            raise ValueError(f"unknown step {self.step[:9]!r}")

    def position(self) -> tuple[int, int, int]:
        return (self.height, self.round, _STEP_RANK[self.step])

    def describe(self) -> str:
        return f"signed {self.step} h={self.height} r={self.round} {_h8(self.block_hash)}"


@message("bft_proposal", actor=BFT_ACTOR)
class BftProposal:
    """The proposer of (height, round) proposes ``block`` (``valid_round``: L16 validRound)."""

    height: Height
    round: Round
    block: Block
    valid_round: Round | None = None
    signed: SignedVote

    def __post_init__(self) -> None:
        if self.block.height != self.height:
            raise ValueError("proposal height differs from its block's height")
        if self.valid_round is not None and self.valid_round >= self.round:
            raise ValueError("valid_round must be below round")

    def statement(self, digest: bytes) -> list:
        return [self.height, self.round, digest, self.valid_round]

    def describe(self) -> str:
        vr = "" if self.valid_round is None else f" vr={self.valid_round}"
        return (f"proposal h={self.height} r={self.round}{vr} {_h8(block_hash(self.block))} "
                f"{len(self.block.values)} values by {self.signed.voter[:10]}")


@message("bft_vote", actor=BFT_ACTOR)
class BftVote:
    vote: Vote

    def describe(self) -> str:
        return self.vote.describe()


@message("bft_values", actor=BFT_ACTOR)
class BftValues:
    """Application values for the pools of every proposer."""

    values: Annotated[tuple[Value, ...], MaxItems(MAX_VALUES_PER_MESSAGE)]

    def describe(self) -> str:
        return f"values x{len(self.values)}"


@message("bft_commit_request", actor=BFT_ACTOR)
class BftCommitRequest:
    """Ask for the certified commits from ``from_height`` on."""

    from_height: Height
    max_count: Annotated[int, Range(1, MAX_COMMITS_PER_RESPONSE)] = MAX_COMMITS_PER_RESPONSE

    def describe(self) -> str:
        return f"commit-request from h={self.from_height} max {self.max_count}"


@message("bft_proposal_request", actor=BFT_ACTOR)
class BftProposalRequest:
    """Ask for the proposal of (``height``, ``round``): more than 1/3 of the weight voted
    for a block whose proposal never reached the requester."""

    height: Height
    round: Round

    def describe(self) -> str:
        return f"proposal-request h={self.height} r={self.round}"


@message("bft_vote_request", actor=BFT_ACTOR)
class BftVoteRequest:
    """Ask for the signed votes of (``height``, ``round``) the requester lacks.

    ``prevotes`` and ``precommits`` are bitmaps over the validators of the height's
    weight table in ascending peer-id order: bit i (byte ``i // 8``, bit ``i % 8``, least
    significant first) set means the requester holds that validator's vote of the type;
    each is exactly ``ceil(validators / 8)`` bytes. (CometBFT's VoteSetBits, pulled on
    a stall instead of pushed continuously.)"""

    height: Height
    round: Round
    prevotes: Annotated[bytes, MaxLen(MAX_VOTERS // 8)]
    precommits: Annotated[bytes, MaxLen(MAX_VOTERS // 8)]

    def describe(self) -> str:
        return (f"vote-request h={self.height} r={self.round} has {_popcount(self.prevotes)} prevotes "
                f"{_popcount(self.precommits)} precommits")


def _popcount(bitmap: bytes) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


def vote_bitmap(order: list[str], voters: Iterable[str]) -> bytes:
    """The :class:`BftVoteRequest` bitmap of ``voters`` over ``order`` (validators in
    ascending peer-id order): ``ceil(len(order) / 8)`` bytes, bit i set iff ``order[i]``
    is a voter. Peer ids not in ``order`` are ignored."""
    index = {peer_id: i for i, peer_id in enumerate(order)}
    bits = 0
    for voter in voters:
        i = index.get(voter)
        if i is not None:
            bits |= 1 << i
    return bits.to_bytes((len(order) + 7) // 8, "little")


@message("bft_commit_response", actor=BFT_ACTOR)
class BftCommitResponse:
    """Consecutive certified commits; ``latest_height``: the sender's last committed height."""

    commits: Annotated[tuple[CertifiedCommit, ...], MaxItems(MAX_COMMITS_PER_RESPONSE)]
    latest_height: Annotated[int, Range(0, MAX_HEIGHT)]

    def describe(self) -> str:
        span = f"h={self.commits[0].height}..{self.commits[-1].height}" if self.commits else "none"
        return f"commit-response {span} latest {self.latest_height}"


MAX_OWN_VOTES = 3  # a bft_own_votes answer: the top prevote, the top precommit, the top block precommit


@message("bft_own_votes_request", actor=BFT_ACTOR)
class BftOwnVotesRequest:
    """Ask a validator for the votes the *requester* signed at ``height`` that it holds: a
    validator that lost its log and its sign state recovers what it signed at the height the
    network is deciding before it signs there again (PROTOCOL.md §14.12). Answered once per
    (peer, height) with :class:`BftOwnVotes`, by validators at that height."""

    height: Height

    def describe(self) -> str:
        return f"own-votes-request h={self.height}"


@message("bft_own_votes", actor=BFT_ACTOR)
class BftOwnVotes:
    """The answer to :class:`BftOwnVotesRequest`: of the requester's votes at ``height`` the
    sender holds, the prevote of the highest round, the precommit of the highest round and
    the precommit for a block of the highest round (its lock), each once; maybe none."""

    height: Height
    votes: Annotated[tuple[Vote, ...], MaxItems(MAX_OWN_VOTES)]

    def describe(self) -> str:
        return f"own-votes h={self.height} x{len(self.votes)}"


# ------------------------------------------------------------------ verifiers


def verify_commit(commit: CertifiedCommit, table: WeightTable, network_id: bytes) -> None:
    """Check a certified commit against the weight table of its height's epoch.

    Raises:
        CertificateError: wrong epoch, duplicate/unknown voter, bad signature,
            or the precommitters' weight not strictly above 2/3.
    """
    if commit.block.epoch != table.epoch:
        raise CertificateError(f"block of epoch {commit.block.epoch}, table of epoch {table.epoch}")
    statement = [commit.block.height, commit.round, block_hash(commit.block)]
    verify_certificate(commit.certificate, table, PRECOMMIT, network_id, statement)


def verify_equivocation(evidence: Equivocation, table: WeightTable, network_id: bytes) -> bool:
    """True when ``evidence`` proves that a validator of ``table`` signed two conflicting votes."""
    a, b = evidence.first, evidence.second
    if a.voter != b.voter or a.voter not in table.weights:
        return False
    if (a.vote_type, a.height, a.round) != (b.vote_type, b.height, b.round) or a.block_hash == b.block_hash:
        return False
    return all(verify_vote(v.signed, v.vote_type, network_id, table.epoch, v.statement()) for v in (a, b))


def commit_certificate(table: WeightTable, votes: dict[str, SignedVote]) -> QuorumCertificate:
    """The certificate of a decided block from its precommits (``votes``: voter -> signature).

    Up to :data:`MAX_VOTERS` precommitters: all of them, in peer id order. More than that
    (a certificate holds at most :data:`MAX_VOTERS` votes, PROTOCOL §14.3): the voters by
    descending weight (ties by peer id) up to the shortest prefix whose weight passes the
    quorum, at most :data:`MAX_VOTERS` of them, again in peer id order. (Cutting the peer id
    order at :data:`MAX_VOTERS` could leave out the heavy voters: a certificate that no
    peer accepts.)
    """
    if len(votes) <= MAX_VOTERS:
        return QuorumCertificate(votes=tuple(votes[v] for v in sorted(votes)))
    chosen: list[str] = []
    weight = 0
    for voter in sorted(votes, key=lambda v: (-table.weights.get(v, 0), v))[:MAX_VOTERS]:
        chosen.append(voter)
        weight += table.weights.get(voter, 0)
        if 3 * weight > 2 * table.total:
            break
    return QuorumCertificate(votes=tuple(votes[v] for v in sorted(chosen)))


# ---------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class PersistVote:
    """Persist ``state`` durably before running the next action (it sends the signature).

    ``locked_block``: while the state holds a lock, the block it is locked on (its
    ``block_hash`` is ``state.locked_hash``), persisted with the state (PROTOCOL.md
    §14.12): after a restart the core must hold that block to commit it, and when no peer
    has it (a lone validator, or every validator restarted before storing the commit) it
    would be lost, the lock unreleasable and the log stopped for good.
    """

    state: SignState
    locked_block: Block | None = None

    def describe(self) -> str:
        return f"persist {self.state.describe()}"


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Send ``message`` to every validator of the current table except ourselves."""

    message: object

    def describe(self) -> str:
        return f"broadcast {self.message.describe()}"


@dataclass(frozen=True, slots=True)
class Send:
    peer_id: str
    message: object

    def describe(self) -> str:
        return f"send {self.peer_id[:10]} {self.message.describe()}"


@dataclass(frozen=True, slots=True)
class Commit:
    """``commit`` is decided: persist it before any later action and before acknowledging."""

    commit: CertifiedCommit
    block_hash: bytes

    @property
    def height(self) -> int:
        return self.commit.block.height

    @property
    def block(self) -> Block:
        return self.commit.block

    @property
    def certificate(self) -> QuorumCertificate:
        return self.commit.certificate

    def describe(self) -> str:
        return f"commit h={self.height} r={self.commit.round} {_h8(self.block_hash)} " \
               f"{len(self.block.values)} values {self.certificate.describe()}"


@dataclass(frozen=True, slots=True)
class Evidence:
    """A verifiable equivocation (see :func:`verify_equivocation`)."""

    equivocation: Equivocation

    def describe(self) -> str:
        return self.equivocation.describe()


#: Reasons of :class:`Rejected` that prove a fault of the peer it names (a signed message
#: that no correct peer sends or relays: every correct relay checks first), so both
#: drivers (the node and the simulator) record them as a ``vote_fault`` reputation
#: observation. The other reasons are counted only: they can come from a correct peer
#: that is behind or ahead of us. PROTOCOL.md §14.13.
FAULT_REASONS = frozenset({"bad_signature", "unknown_voter", "wrong_proposer", "conflicting_proposal",
                           "invalid_value", "bad_commit", "bad_certificate"})


@dataclass(frozen=True, slots=True)
class Rejected:
    """Input from ``peer_id`` was dropped for ``reason`` (a ``vote_fault`` reputation
    observation against ``peer_id`` when the reason is in :data:`FAULT_REASONS`). For
    ``conflicting_proposal`` ``peer_id`` is the proposer that signed both proposals,
    whoever relayed the second."""

    peer_id: str
    reason: str
    detail: str = ""

    def describe(self) -> str:
        return f"rejected {self.reason} from {self.peer_id[:10]}"


@dataclass(frozen=True, slots=True)
class ServeCommits:
    """``peer_id`` wants commits from ``from_height`` that are no longer cached in memory."""

    peer_id: str
    from_height: int
    max_count: int

    def describe(self) -> str:
        return f"serve-commits {self.peer_id[:10]} from h={self.from_height}"


@dataclass(frozen=True, slots=True)
class BftEvent:
    """``kind``: new_height | new_round | round_skip | timeout_propose |
    timeout_prevote | timeout_precommit | locked | committed | sign_refused | vote_resent |
    double_sign_risk | network_heard | own_votes_recovered (and the driver-visible kinds of PROTOCOL.md §14.13)."""

    kind: str
    height: int
    round: int
    detail: str = ""

    def describe(self) -> str:
        return f"{self.kind} h={self.height} r={self.round}" + (f" {self.detail}" if self.detail else "")


Action = PersistVote | Broadcast | Send | Commit | Evidence | Rejected | ServeCommits | BftEvent


# ----------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class BftConfig:
    """Timeouts in seconds (``base + round * delta``) and limits."""

    propose_timeout_s: float = 3.0
    propose_timeout_delta_s: float = 0.5
    prevote_timeout_s: float = 1.0
    prevote_timeout_delta_s: float = 0.5
    precommit_timeout_s: float = 1.0
    precommit_timeout_delta_s: float = 0.5
    commit_wait_s: float = 1.0  # pause after a commit before round 0 (CometBFT timeout_commit)
    rebroadcast_interval_s: float = 2.0
    value_regossip_interval_s: float = 5.0  # re-send our own submitted, uncommitted values
    catchup_interval_s: float = 1.0  # per-peer rate limit of commit pushes/requests
    # More than 1/3 of the weight voted for a block whose proposal we lack: if it has not
    # arrived this long after (it may be in flight), ask voters of it for the proposal.
    proposal_fetch_delay_s: float = 0.1
    # No commit yet this long (at least; twice the median time from our first vote of a
    # height to its commit over the last 15 heights when that is longer) after we voted in a
    # round: ask 2 validators for the commit (a lost vote otherwise comes back only with its
    # sender's rebroadcast).
    commit_poll_delay_s: float = 0.2
    max_batch: int = 64  # values per block
    max_value_bytes: int = MAX_VALUE_BYTES
    max_pool: int = 10_000
    # Values gossiped by one sender (envelope sender: values are not forwarded, so its author)
    # held at most; a full pool makes room by dropping the oldest value of the sender holding
    # the most (never a value submitted here), so one or a few flooding senders cannot shut out
    # the others or our own submissions.
    max_pool_per_sender: int = 1024
    max_future_rounds: int = 4  # votes further ahead only count for round skipping
    dedupe_heights: int = 1000  # a value committed this recently is never committed again
    commit_cache: int = 256  # certified commits kept in memory for catch-up
    # both fit the edge profile's 256 KiB envelopes with room for signatures and framing
    max_response_bytes: int = 192 * 1024
    max_block_bytes: int = 192 * 1024  # sum of a block's value sizes
    # 0: round 0 of every height starts after commit_wait_s (a block, maybe empty,
    # every height). > 0: round 0 waits until a value is pending here or a
    # proposal/vote of this height arrives, or at most this long, then starts
    # (CometBFT create_empty_blocks = false / create_empty_blocks_interval): an
    # idle network makes one empty block per interval, and a value submitted to
    # an idle network is proposed at once.
    empty_block_interval_s: float = 0.0
    # A proposal whose block holds a value this peer cannot decide yet ("not yet", e.g.
    # a training update still in flight) is prevoted only when it becomes decidable, or
    # nil after this wait (at most timeout_propose): long enough for a message in
    # flight, short enough that a peer which is behind does not stall the round.
    not_ready_wait_s: float = 0.2
    # A certified commit carrying a precommit of ours at a height our sign state does not hold
    # (the sign state was lost with the log, or restored from an old copy, or this key also
    # signs on another node): we signed there in a life we do not remember, and maybe at later
    # heights whose certificates happen to lack our precommit. Nothing is signed up to this
    # many heights past the one after it (CometBFT's double_sign_check_height, applied by
    # itself; PROTOCOL.md §14.12).
    double_sign_margin_heights: int = 2
    # False: trust that this key signed nothing it does not remember (no floor from
    # certificates; CometBFT's double_sign_check_height = 0). Only to restart a log that
    # stopped waiting for this validator to sit a height out (PROTOCOL.md §14.12).
    double_sign_check: bool = True
    # A core started with await_network (no sign state: a fresh validator, or one whose sign
    # state was lost) asks every validator for commits of its height after this long, the
    # interval doubling up to rebroadcast_interval_s, until it has heard enough of them
    # (PROTOCOL.md §14.12).
    await_network_ask_interval_s: float = 0.25

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= MAX_BLOCK_VALUES:
            raise LocalProtocolError(f"max_batch must be in 1..{MAX_BLOCK_VALUES}")
        if min(self.max_pool, self.max_pool_per_sender) < 1:
            raise LocalProtocolError("max_pool and max_pool_per_sender must be >= 1")
        if not 1 <= self.max_value_bytes <= MAX_VALUE_BYTES:
            raise LocalProtocolError(f"max_value_bytes must be in 1..{MAX_VALUE_BYTES}")
        if self.max_block_bytes < self.max_value_bytes:
            raise LocalProtocolError("max_block_bytes must hold at least one value of max_value_bytes")
        if min(self.propose_timeout_s, self.prevote_timeout_s, self.precommit_timeout_s,
               self.rebroadcast_interval_s) <= 0:
            raise LocalProtocolError("timeouts and the rebroadcast interval must be > 0")
        if min(self.propose_timeout_delta_s, self.prevote_timeout_delta_s, self.precommit_timeout_delta_s,
               self.commit_wait_s, self.catchup_interval_s, self.proposal_fetch_delay_s,
               self.commit_poll_delay_s, self.empty_block_interval_s,
               self.not_ready_wait_s) < 0:
            raise LocalProtocolError("deltas and waits must be >= 0")
        if self.await_network_ask_interval_s <= 0:
            raise LocalProtocolError("await_network_ask_interval_s must be > 0")
        if self.double_sign_margin_heights < 0:
            raise LocalProtocolError("double_sign_margin_heights must be >= 0")

    def timeout_s(self, step: str, round_: int) -> float:
        if step == PROPOSE:
            return self.propose_timeout_s + round_ * self.propose_timeout_delta_s
        if step == PREVOTE:
            return self.prevote_timeout_s + round_ * self.prevote_timeout_delta_s
        return self.precommit_timeout_s + round_ * self.precommit_timeout_delta_s


# ------------------------------------------------------------ proposer rotation


class ProposerSchedule:
    """CometBFT proposer priorities for one weight table, from all-zero priorities.

    ``proposer(height, round)`` is the validator picked at step
    ``(height - start_height + round) mod total_weight`` of the sequence.
    """

    def __init__(self, table: WeightTable, start_height: int) -> None:
        self.table = table
        self.start_height = start_height
        self.total = table.total
        self._ids = sorted(table.weights)
        self._reset()

    def _reset(self) -> None:
        self._priority = {v: 0 for v in self._ids}
        self._next_index = 0
        self._picked: dict[int, str] = {}

    def _step(self) -> str:
        priority, weights = self._priority, self.table.weights
        best = None
        for v in self._ids:  # sorted: the first maximum is the smallest peer id
            priority[v] += weights[v]
            if best is None or priority[v] > priority[best]:
                best = v
        priority[best] -= self.total
        return best

    def at(self, index: int) -> str:
        """The validator picked at step ``index`` (0-based) of the sequence."""
        index %= self.total
        picked = self._picked.get(index)
        if picked is not None:
            return picked
        if index < self._next_index:
            self._reset()
        if len(self._picked) > 65536:
            self._picked.clear()
        while self._next_index <= index:
            self._picked[self._next_index] = self._step()
            self._next_index += 1
            if self._next_index == self.total:  # back at all-zero priorities
                self._priority = {v: 0 for v in self._ids}
        return self._picked[index]

    def proposer(self, height: int, round_: int) -> str:
        if height < self.start_height:
            raise LocalProtocolError(f"height {height} is before this table ({self.start_height})")
        return self.at(height - self.start_height + round_)


# ------------------------------------------------------------------------ state


class _VoteSet:
    """Votes of one (type, round) at the current height.

    ``votes`` holds the first vote of each voter (for "2f+1 of any value");
    ``by_hash`` counts, per value, every voter that signed it, so an
    equivocator's second vote still counts for a block we know (as in the paper,
    where messages, not voters, are counted; a polka some correct peer saw must
    be visible to the others).
    """

    __slots__ = ("votes", "by_hash")

    def __init__(self) -> None:
        self.votes: dict[str, Vote] = {}
        self.by_hash: dict[bytes | None, dict[str, Vote]] = {}

    def add(self, vote: Vote) -> None:
        self.votes.setdefault(vote.voter, vote)
        self.by_hash.setdefault(vote.block_hash, {}).setdefault(vote.voter, vote)


class BftCore:
    """The Tendermint state machine of one validator (or observer) peer.

    Args:
        identity: our signing key; we vote only when our peer id is in the table.
        network_id: bound into every signature (as with envelopes).
        table: the weight table in force from ``table_height``.
        config: timeouts and limits.
        now: monotonic seconds at construction.
        height: the next height to decide (last committed + 1).
        last_block_hash: hash of the block at ``height - 1``; at height 1 the network's genesis
            hash (``Network.genesis_hash()``, PROTOCOL.md §3.1; :data:`GENESIS_HASH`, zeros, by default).
        table_height: first height of ``table`` (proposer rotation starts there).
        sign_state: the last :class:`SignState` persisted (after a restart). At its height
            (now, or once catch-up gets there) the core resumes in its round with its lock.
        locked_block: the block persisted with ``sign_state`` (:class:`PersistVote`), or
            None. Used only when it is the block of ``sign_state.locked_hash`` at that
            height: the core then holds it again (it can commit it on the resent precommit)
            and proposes it when it is the proposer, without a valid round (the polka that
            made us lock may be lost with every validator's restart).
        sign_from_height: the core signs nothing (proposal or vote) at heights below this
            (default 1: no floor). A driver whose sign state was lost while its log
            survived passes the last committed height + 2: it may have signed at the
            height after its last commit, so it sits that height out and follows it
            from the certified commit (PROTOCOL.md §14.12). The core raises it itself
            when a commit carries a precommit of ours its sign state does not hold
            (event ``double_sign_risk``; :attr:`BftConfig.double_sign_margin_heights`).
        await_network: start no round and sign nothing until validators holding more than
            1/3 of the weight without us, or more than 2/3 with us, were heard at our
            height (a proposal,
            a vote or a commit request of that height), asking the others for commits
            after :attr:`BftConfig.await_network_ask_interval_s` meanwhile, the interval
            doubling up to ``rebroadcast_interval_s`` (event
            ``network_heard`` when the wait ends). A driver without a sign state passes
            True: if the network is ahead, the commits it fetches first carry the
            precommits of a life it forgot and raise ``sign_from_height`` before it
            signs anything. Started at height 1 (no log either), where the wait ends at a
            height h > 1 below no floor it first asks the validators for the votes of
            ours they hold at h (:class:`BftOwnVotesRequest`) and adopts the highest as
            its sign state (event ``own_votes_recovered``; PROTOCOL.md §14.12).
            Default False (the simulator's cores).
        validate_value: pure application check of one value (default: accept all):
            True valid, False invalid (the sender of an invalid value is at fault),
            None "not yet": this peer lacks what the check needs (e.g. a training
            update it has not received). A not-yet value is neither pooled nor
            held against its sender. A proposal whose block holds one is not
            prevoted yet: the core waits, asks again at every input and at
            :meth:`recheck` (only the undecided values), and prevotes nil if it is
            still undecidable ``not_ready_wait_s`` (at most timeout_propose) after
            the first "not yet" of the round.
        on_commit: pure application hook run inside the core for every commit,
            in height order, right after the height advanced (also for commits
            applied during catch-up). When it returns a :class:`WeightTable`,
            that table is put in force from the next height at once, so the
            next commit of the same catch-up batch is verified under it (an
            epoch change). It must be deterministic: every peer runs it on the
            same committed blocks.
        choice_key: proposer policy (not a validity rule): ``(group, rank)`` for a
            value that is one of several alternatives of which only one matters
            (e.g. the training inclusions of one round: the first committed one
            counts), else None. A block we propose carries at most one value per
            group, the one of smallest rank among the valid pooled values; the
            others stay pooled.
        proposable: proposer policy (not a validity rule): ``proposable(value, sender)``
            says whether a valid pooled value may go into a block we propose;
            ``sender`` is the peer that gossiped it to us, i.e. its submitter
            (values are not forwarded), or None for a value submitted here. A value
            it refuses stays pooled (the next proposer may take it). E.g. a
            validator that cannot check a training inclusion (it is not a
            participant) takes only those a participant gossiped. Default: all.

    A peer that is not in the table (an observer) votes on nothing; it learns
    new heights by asking a validator for commits every
    ``rebroadcast_interval_s`` (validators in turn, in peer id order).
    """

    def __init__(self, identity: SigningIdentity, network_id: bytes, table: WeightTable,
                 config: BftConfig, now: float, *, height: int = 1,
                 last_block_hash: bytes = GENESIS_HASH, table_height: int = 1,
                 sign_state: SignState | None = None,
                 validate_value: Callable[[bytes], bool | None] | None = None,
                 on_commit: Callable[[CertifiedCommit], WeightTable | None] | None = None,
                 choice_key: Callable[[bytes], tuple[bytes, Any] | None] | None = None,
                 proposable: Callable[[bytes, str | None], bool] | None = None,
                 sign_from_height: int = 1, locked_block: Block | None = None,
                 await_network: bool = False) -> None:
        if not 1 <= table_height <= height:
            raise LocalProtocolError("table_height must be in 1..height")
        if len(last_block_hash) != 32:
            raise LocalProtocolError("last_block_hash is 32 bytes")
        self.identity = identity
        self.peer_id = identity.peer_id
        self.network_id = network_id
        self.config = config
        self.validate_value = validate_value
        self.on_commit = on_commit
        self.choice_key = choice_key
        self.proposable = proposable
        # nothing is signed below this height: a driver whose sign state was lost sets it past
        # every height it may have signed at (it follows those heights from certified commits)
        self.sign_from_height = sign_from_height
        # await_network: validators heard at self.height (reset with the height) until the wait ends
        self.awaiting_network = await_network
        # Started with neither log nor sign state: where the wait ends at a height some
        # validator reached through commits, we may have signed there in a life we forgot, in
        # votes no certificate shows yet. We then ask the validators for the votes of ours they
        # hold (bft_own_votes_request) and sign nothing there until those heard at that height
        # answered, or the first propose timeout passed (_recovery_height > 0 meanwhile).
        self._amnesiac = await_network and height == 1
        self._recovery_height = 0
        self._recovery_answered: set[str] = set()
        self._recovery_expected: set[str] = set()
        self._recovered: list[Vote] = []
        self._heard: set[str] = set()
        self._heard_height = height
        self._next_network_ask = now
        self._network_ask_interval_s = config.await_network_ask_interval_s  # doubles up to rebroadcast
        self._observer_polls = 0
        self.height = height
        self.drops: Counter[str] = Counter()  # reason -> count (duplicates included)
        # voter -> fresh valid votes of it counted in a vote set since take_accepted_votes()
        self._accepted_votes: Counter[str] = Counter()
        self._tables: list[tuple[int, ProposerSchedule]] = [(table_height, ProposerSchedule(table, table_height))]
        self._last_hash = last_block_hash
        self._sign_state = sign_state
        self._restored_block = None  # (hash, block) of sign_state's lock, until its height is entered
        if sign_state is not None and locked_block is not None and sign_state.locked_hash is not None \
                and locked_block.height == sign_state.height and block_hash(locked_block) == sign_state.locked_hash:
            self._restored_block = (sign_state.locked_hash, locked_block)
        self._actions: list[Action] = []
        self._timers: list[tuple[float, int, str, int, int]] = []
        self._timer_seq = 0
        self._pool: dict[bytes, bytes] = {}  # value hash -> value, arrival order
        self._own_pending: dict[bytes, None] = {}  # hashes of values submitted here, uncommitted
        # Gossiped values by sender (quota and eviction, see _pool_add): value hash -> sender;
        # sender -> its pooled values in arrival order; count -> the senders holding that many
        # (in the order they reached it), with the largest count in _pool_top.
        self._pool_sender: dict[bytes, str] = {}
        self._sender_values: dict[str, dict[bytes, None]] = {}
        self._pool_holders: dict[int, dict[str, None]] = {}
        self._pool_top = 0
        self._next_value_gossip = now + config.value_regossip_interval_s
        self._recent: dict[bytes, int] = {}  # committed value hash -> height
        self._commits: dict[int, CertifiedCommit] = {}
        self._last_push: dict[str, float] = {}
        self._served_to: dict[str, int] = {}  # peer -> first height after the last commits sent to it
        self._follow_ups: dict[str, tuple[float, int]] = {}  # peer -> (window start, follow-ups answered)
        self._next_request_at = now
        self._next_rebroadcast = now + config.rebroadcast_interval_s
        # Proposals and votes of the next height that arrived before our commit of this one
        # (sender -> messages, in arrival order), replayed when we get there: see _hold.
        self._held: dict[str, list[BftProposal | Vote]] = {}
        self._held_height = 0
        self._vote_to_commit_s: deque[float] = deque(maxlen=15)  # our first vote of a height -> its commit
        self._first_vote_at: float | None = None  # when we first voted at this height
        self._commit_waiters: dict[str, int] = {}  # peer -> max_count, asked for our current height
        self._enter_height()
        self._schedule(now, "start", height, self.round)

    # ------------------------------------------------------------- inspection

    @property
    def table(self) -> WeightTable:
        """The weight table of the current height."""
        return self._schedule_for(self.height).table

    def table_for(self, height: int) -> WeightTable:
        return self._schedule_for(height).table

    def proposer(self, height: int, round_: int) -> str:
        return self._schedule_for(height).proposer(height, round_)

    @property
    def pool_size(self) -> int:
        return len(self._pool)

    @property
    def last_block_hash(self) -> bytes:
        return self._last_hash

    def cached_commits(self, from_height: int, max_count: int) -> list[CertifiedCommit]:
        """Consecutive certified commits from ``from_height`` still held in memory."""
        out = []
        for h in range(from_height, min(self.height, from_height + max_count)):
            commit = self._commits.get(h)
            if commit is None:
                break
            out.append(commit)
        return out

    # ------------------------------------------------------------ public inputs

    def take_actions(self) -> list[Action]:
        """Actions produced since the last call, in the order they must run."""
        out, self._actions = self._actions, []
        return out

    def take_accepted_votes(self) -> Counter[str]:
        """Per voter (other than us), the votes counted in a vote set since the last call:
        fresh (not a duplicate), with a valid signature (or, for a prevote from its own
        voter, a verified envelope), not the second of an equivocating pair. Drivers record
        them as ``vote_ok`` reputation observations (PROTOCOL.md §14.13)."""
        out, self._accepted_votes = self._accepted_votes, Counter()
        return out

    def next_deadline(self) -> float:
        """Monotonic time at which :meth:`tick` must be called next."""
        deadline = self._next_rebroadcast
        if self.awaiting_network:
            deadline = min(deadline, self._next_network_ask)
        if self._timers:
            deadline = min(deadline, self._timers[0][0])
        return deadline

    def set_weight_table(self, height: int, table: WeightTable) -> None:
        """Put ``table`` in force from ``height`` on (a height boundary).

        ``height`` must be above the current height, or equal to it before the
        height's first round started (i.e. right after a :class:`Commit`).
        """
        if height < self.height or (height == self.height and self.step != NEW_HEIGHT):
            raise LocalProtocolError(f"cannot change the weight table at height {height} "
                                     f"(now at {self.height}, step {self.step})")
        self._tables = [(h, s) for h, s in self._tables if h < height]
        self._tables.append((height, ProposerSchedule(table, height)))
        if height == self.height:  # votes verified under the old table are void
            self._enter_height()
        self._prune_tables()

    def submit(self, value: bytes, now: float) -> bool:
        """Add an application value to the pool and gossip it; False if refused.

        Refused: already pending or recently committed, the pool full of values
        submitted here (gossiped ones make room), or the application check fails.
        Raises:
            LocalProtocolError: ``value`` is not bytes or too long.
        """
        if type(value) is not bytes or len(value) > self.config.max_value_bytes:
            raise LocalProtocolError(f"a value is bytes of <= {self.config.max_value_bytes} bytes")
        reason = self._pool_add(value, None)
        if reason != "pooled":
            if reason == "invalid_value":
                self.drops[reason] += 1
            return False
        self._own_pending[value_hash(value)] = None
        self._actions.append(Broadcast(BftValues(values=(value,))))
        if self._idle_wait and self.step == NEW_HEIGHT:
            # End the idle wait at the next tick, not inside this call: values the driver
            # submits together (one loop iteration, e.g. an inclusion, a confirm and a
            # start) then go into one block instead of the first alone.
            self._schedule(now, "idle_end", self.height, 0)
        return True

    def on_message(self, sender: str, msg: object, now: float) -> None:
        """Deliver a verified envelope's message from ``sender`` (a peer id)."""
        try:
            if isinstance(msg, BftVote):
                self._on_vote(sender, msg.vote, now)
            elif isinstance(msg, BftProposal):
                self._on_proposal(sender, msg, now)
            elif isinstance(msg, BftValues):
                self._on_values(sender, msg)
            elif isinstance(msg, BftCommitRequest):
                self._on_commit_request(sender, msg, now)
            elif isinstance(msg, BftProposalRequest):
                self._on_proposal_request(sender, msg, now)
            elif isinstance(msg, BftVoteRequest):
                self._on_vote_request(sender, msg, now)
            elif isinstance(msg, BftCommitResponse):
                self._on_commit_response(sender, msg, now)
            elif isinstance(msg, BftOwnVotesRequest):
                self._on_own_votes_request(sender, msg, now)
            elif isinstance(msg, BftOwnVotes):
                self._on_own_votes(sender, msg, now)
            else:
                raise LocalProtocolError(f"not a consensus message: {type(msg).__name__}")
        except RemoteProtocolError as exc:
            self._reject(sender, exc.reason, str(exc))
        if self.awaiting_network:
            self._hear(sender, msg, now)
        if self._idle_wait and self._wakes(msg):
            if isinstance(msg, BftValues):  # at the next tick: values arriving together share a block
                self._schedule(now, "idle_end", self.height, 0)
            else:  # a peer moved on: follow at once
                self._end_idle_wait(now)
        self._process(now)

    @property
    def awaiting_values(self) -> bool:
        """True while a block of this height holds a value ``validate_value`` answered "not
        yet" for (the driver then calls :meth:`recheck` when the application learns more)."""
        return bool(self._not_ready)

    def recheck(self, now: float) -> None:
        """The application may now decide a value it answered "not yet" for (e.g. a training
        update arrived): run the rules again, so a proposal waiting on it is prevoted (and a
        polka waiting on it precommitted) at once rather than at the next message."""
        if self._not_ready:
            self._process(now)

    def tick(self, now: float) -> None:
        """Run every timer due at ``now`` (the rebroadcast first: what the timers
        sign next is new and goes out with its own broadcast)."""
        if self.awaiting_network and now >= self._next_network_ask and self._network_unheard(now):
            # (doubling up to rebroadcast_interval_s: a validator started long before the others
            # does not send all of them a request every 0.25 s meanwhile)
            self._next_network_ask = now + self._network_ask_interval_s
            self._network_ask_interval_s = min(2 * self._network_ask_interval_s,
                                               max(self.config.rebroadcast_interval_s,
                                                   self.config.await_network_ask_interval_s))
            # to every validator, heard or not: each must hear us too (asking only the unheard
            # ones, three validators whose first requests were lost in a ring, A to B, B to C and
            # C to A, each went on to ask the one validator that had heard it already: none ever
            # heard a second one, and the network never started)
            self._tell_every_validator(BftCommitRequest(from_height=self.height))
        if now >= self._next_rebroadcast:
            self._next_rebroadcast = now + self.config.rebroadcast_interval_s
            self._rebroadcast()
            self._observer_poll()
            if now >= self._next_value_gossip:
                self._next_value_gossip = now + self.config.value_regossip_interval_s
                self._regossip_values()
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, height, round_ = heapq.heappop(self._timers)
            if height == self.height:
                self._on_timer(kind, round_, now)
                self._process(now)

    # ------------------------------------------------------------- internals

    def _schedule_for(self, height: int) -> ProposerSchedule:
        found = None
        for start, schedule in self._tables:
            if start <= height:
                found = schedule
        if found is None:
            raise LocalProtocolError(f"no weight table for height {height}")
        return found

    def _prune_tables(self) -> None:
        current = [i for i, (h, _) in enumerate(self._tables) if h <= self.height]
        if len(current) > 1:
            del self._tables[:current[-1]]

    def _enter_height(self) -> None:
        """Fresh state for the current height, in round 0; but at the height of the persisted
        sign state (a restart, or catching up to it after the store lost commits, PROTOCOL.md
        §14.12), in its round and with its lock (L22/L28 may never prevote against a lock we
        signed under)."""
        self._reset_height_state()
        self.round = 0
        state = self._sign_state
        if state is not None and state.height == self.height:
            self.round = state.round
            self.locked_round = state.locked_round
            self.locked_hash = state.locked_hash
            restored = self._restored_block
            if restored is not None and restored[0] == state.locked_hash:
                # the locked block, persisted with the lock: we hold it again (a resent precommit
                # can commit it), and as proposer we propose it, with no valid round: the polka
                # of locked_round (prevotes are not persisted) may exist nowhere after a restart
                # of every validator, and a re-proposal naming that round (L28) would be
                # prevoted by nobody while those locked on it refuse any other block. Proposed
                # fresh, it is prevoted under L22 by those locked on it and the unlocked ones
                # (any proposer may propose any valid block; the voters' locks keep safety).
                self._blocks[restored[0]] = restored[1]
                self.valid_round, self.valid_block = None, restored[1]
        self._restored_block = None if state is None or state.height <= self.height else self._restored_block

    def _reset_height_state(self) -> None:
        self.step = NEW_HEIGHT
        self._idle_wait = False
        self._start_held = False  # a "start" timer the await_network wait swallowed
        self._own_votes_served: set[str] = set()  # peers whose bft_own_votes_request we answered
        self.locked_round: int | None = None
        self.locked_hash: bytes | None = None
        self.valid_round: int | None = None
        self.valid_block: Block | None = None
        self._proposals: dict[int, tuple[bytes, int | None]] = {}
        self._proposal_msgs: dict[int, BftProposal] = {}  # the signed proposal of each round (to relay)
        self._proposals_served: set[tuple[str, int]] = set()  # (peer, round) sent on request
        self._votes_served: set[tuple[str, int]] = set()  # (peer, round) votes sent on request
        self._blocks: dict[bytes, Block] = {}
        self._extra_blocks: dict[int, int] = {}
        self._valid_cache: dict[bytes, bool] = {}
        self._not_ready: dict[bytes, tuple[bytes, ...]] = {}  # block hash -> its values still "not yet"
        self._await_until = 0.0  # monotonic end of the wait for a not-yet proposal of this round
        self._prevotes: dict[int, _VoteSet] = {}
        self._precommits: dict[int, _VoteSet] = {}
        self._max_round: dict[str, int] = {}
        self._done: set[tuple[str, int]] = set()  # "for the first time" rules fired
        self._own_votes: dict[tuple[str, int], Vote] = {}
        self._evidence_seen: set[tuple[str, str, int]] = set()

    def _schedule(self, at: float, kind: str, height: int, round_: int) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (at, self._timer_seq, kind, height, round_))

    def _event(self, kind: str, detail: str = "") -> None:
        self._actions.append(BftEvent(kind, self.height, self.round, detail))

    def _reject(self, sender: str, reason: str, detail: str = "") -> None:
        self.drops[reason] += 1
        self._actions.append(Rejected(sender, reason, detail[:200]))

    def _pool_add(self, value: bytes, sender: str | None) -> str:
        """Pool ``value``, submitted here (``sender`` None) or gossiped by ``sender``. Returns
        ``"pooled"`` or why not (counted in ``drops``, but ``invalid_value``): ``duplicate_value``,
        ``pool_sender_full`` (the sender already holds ``max_pool_per_sender`` values),
        ``pool_full``, ``invalid_value``, ``value_not_ready``.

        Room: a sender's gossiped values hold at most ``max_pool_per_sender`` places. In a full
        pool, a value submitted here, or one from a sender holding at least 2 values fewer than
        the sender holding the most, replaces that sender's oldest value (``pool_evicted``; its
        author re-gossips it, §14.9). Values submitted here are never evicted, so a flood by one
        or a few senders shuts out neither our own submissions nor the other senders' values.
        The cheap checks run before the application check (which may verify a signature)."""
        digest = value_hash(value)
        if digest in self._pool or digest in self._recent:
            reason = "duplicate_value"
        else:
            held = 0 if sender is None else len(self._sender_values.get(sender, ()))
            if held >= self.config.max_pool_per_sender:
                reason = "pool_sender_full"
            elif len(self._pool) >= self.config.max_pool and \
                    (self._pool_top == 0 if sender is None else held + 1 >= self._pool_top):
                reason = "pool_full"
            else:
                ok = True if self.validate_value is None else self.validate_value(value)
                reason = "pooled" if ok else "invalid_value" if ok is False else "value_not_ready"
        if reason != "pooled":
            if reason != "invalid_value":  # (counted by the caller: once per message for gossip)
                self.drops[reason] += 1
            return reason
        while len(self._pool) >= self.config.max_pool:  # checked above: a foreign value to evict
            victim = next(iter(self._pool_holders[self._pool_top]))
            self._pool_remove(next(iter(self._sender_values[victim])))
            self.drops["pool_evicted"] += 1
        self._pool[digest] = value
        if sender is not None:
            values = self._sender_values.setdefault(sender, {})
            values[digest] = None
            self._pool_sender[digest] = sender
            self._pool_holding(sender, len(values) - 1, len(values))
        return "pooled"

    def _pool_remove(self, digest: bytes) -> None:
        """Take a value out of the pool (committed, expired or evicted)."""
        self._own_pending.pop(digest, None)
        if self._pool.pop(digest, None) is None:
            return
        sender = self._pool_sender.pop(digest, None)
        if sender is not None:
            values = self._sender_values[sender]
            del values[digest]
            if not values:
                del self._sender_values[sender]
            self._pool_holding(sender, len(values) + 1, len(values))

    def _pool_holding(self, sender: str, old: int, new: int) -> None:
        """``sender`` now holds ``new`` pooled values instead of ``old`` (they differ by 1)."""
        if old:
            bucket = self._pool_holders[old]
            del bucket[sender]
            if not bucket:
                del self._pool_holders[old]
        if new:
            self._pool_holders.setdefault(new, {})[sender] = None
        self._pool_top = max(self._pool_top, new)
        if self._pool_top not in self._pool_holders:
            self._pool_top = max(self._pool_top - 1, 0)  # held by the sender that went down by 1

    # ---- messages

    def _on_values(self, sender: str, msg: BftValues) -> None:
        invalid = 0
        for value in msg.values:
            if len(value) > self.config.max_value_bytes:
                invalid += 1
                continue
            if self._pool_add(value, sender) == "invalid_value":
                invalid += 1
        if invalid:
            self._reject(sender, "invalid_value", f"{invalid} invalid values")

    def _other_height(self, sender: str, height: int, now: float, held: bool = False) -> None:
        if not held:
            self.drops["other_height"] += 1
        if height > self.height:
            if now >= self._next_request_at:
                self._next_request_at = now + self.config.catchup_interval_s
                self._actions.append(Send(sender, BftCommitRequest(from_height=self.height)))
        elif self._may_serve(sender, now):
            self._answer(sender, height, MAX_COMMITS_PER_RESPONSE)

    def _may_serve(self, sender: str, now: float, from_height: int | None = None) -> bool:
        """At most one answer per ``catchup_interval_s`` per peer, except the follow-up of a
        catch-up: a request from beyond what we last sent that peer (a peer cannot loop on the
        log), at most :data:`MAX_FOLLOW_UPS` of them per ``catchup_interval_s`` (a peer asking
        ahead without applying anything cannot make us serve the whole log at once; one
        catching up walks at network speed up to the cap, then again from its next request
        an interval later)."""
        interval = self.config.catchup_interval_s
        last = self._last_push.get(sender)
        window = None
        if last is not None and now - last < interval:
            served_to = self._served_to.get(sender)
            if from_height is None or served_to is None or from_height < served_to:
                return False
            start, count = self._follow_ups.get(sender, (now, 0))
            window = (start, count + 1) if now - start < interval else (now, 1)
            if window[1] > MAX_FOLLOW_UPS:
                self.drops["follow_up_limit"] += 1
                return False
        if len(self._last_push) >= 4096:
            self._last_push.clear()
            self._served_to.clear()
            self._follow_ups.clear()
        self._last_push[sender] = now
        if window is not None:
            self._follow_ups[sender] = window
        return True

    def _answer(self, sender: str, from_height: int, max_count: int) -> None:
        if from_height >= self.height:
            return
        commits, size = [], 0
        for commit in self.cached_commits(from_height, max_count):
            size += 256 + sum(len(v) + 8 for v in commit.block.values) + 128 * len(commit.certificate.votes)
            if commits and size > self.config.max_response_bytes:
                break
            commits.append(commit)
        if not commits:  # the driver serves them from its store (up to max_count)
            self._served_to[sender] = from_height + 1
            self._actions.append(ServeCommits(sender, from_height, max_count))
            return
        self._served_to[sender] = commits[-1].block.height + 1
        self._actions.append(Send(sender, BftCommitResponse(commits=tuple(commits),
                                                            latest_height=self.height - 1)))

    def _on_commit_request(self, sender: str, msg: BftCommitRequest, now: float) -> None:
        if msg.from_height < self.height and self._may_serve(sender, now, msg.from_height):
            self._answer(sender, msg.from_height, msg.max_count)
        elif msg.from_height == self.height and (sender in self._commit_waiters
                                                 or len(self._commit_waiters) < MAX_COMMIT_WAITERS):
            # The height in progress: answered when we commit it (_apply_commit). A peer that
            # saw a quorum precommit a block it never received asks at once, usually a few
            # ms before the precommitters have the quorum themselves; observers polling for
            # the next commit get it as soon as it exists.
            self._commit_waiters[sender] = msg.max_count

    def _on_commit_response(self, sender: str, msg: BftCommitResponse, now: float) -> None:
        applied = False
        for commit in msg.commits:
            height = commit.block.height
            if height < self.height:
                continue
            if height > self.height:  # we are further behind than these: ask for what we miss
                if not applied:
                    self._other_height(sender, height, now)
                break
            digest = self._check_commit(commit)
            self._apply_commit(commit, digest, now, "catch-up")
            applied = True
        if applied and msg.latest_height >= self.height:
            self._next_request_at = now + self.config.catchup_interval_s
            self._actions.append(Send(sender, BftCommitRequest(from_height=self.height)))

    def _after_me(self, peer_ids: Iterable[str]) -> list[str]:
        """``peer_ids`` without us, in peer-id order starting after ours (cyclically): whom
        to ask first, so that the askers of one moment spread over different peers."""
        ring = sorted(p for p in peer_ids if p != self.peer_id)
        return [p for p in ring if p > self.peer_id] + [p for p in ring if p < self.peer_id]

    def _ask(self, peer_ids: list[str], *messages: object) -> int:
        """Send ``messages`` to the first :data:`FETCH_DECIDED_FROM` of ``peer_ids`` (in that
        order); returns how many peers were asked."""
        asked = peer_ids[:FETCH_DECIDED_FROM]
        for msg in messages:
            for peer_id in asked:
                self._actions.append(Send(peer_id, msg))
        return len(asked)

    def _fetch_decided(self, digest: bytes, voters: Iterable[str]) -> None:
        """A quorum precommitted ``digest`` but its proposal never reached us: the height is
        decided, only the block is missing, and no rule of ours can use those precommits.
        Ask :data:`FETCH_DECIDED_FROM` of the precommitters (the next ones after us in
        peer-id order) for the commit of this height; a precommitter that has not committed
        yet answers when it does (:meth:`_on_commit_request`). Without this we would wait
        for the precommit timeout and a round change to reveal that we are behind."""
        asked = self._ask(self._after_me(voters), BftCommitRequest(from_height=self.height))
        self._event("fetch_commit", f"{_h8(digest)} from {asked}")

    def _schedule_commit_poll(self, now: float) -> None:
        """We voted in this round: if the height is not committed after
        ``max(commit_poll_delay_s, 2 x the median vote-to-commit time of the last 15
        heights)``, :meth:`_commit_poll` (the median: heights slowed by loss must not
        postpone the poll; a network whose heights are slow anyway is not polled each one)."""
        self._done.add(("poll", self.round))
        if self._first_vote_at is None:
            self._first_vote_at = now
        usual = statistics.median(self._vote_to_commit_s) if self._vote_to_commit_s else 0.0
        delay = max(self.config.commit_poll_delay_s, 2 * usual)
        self._schedule(now + delay, "commit_poll", self.height, self.round)

    def _commit_poll(self, round_: int) -> None:
        """Still at this height well after voting in ``round_``: we probably lost votes (or
        a proposal), and they would come back only with their senders' rebroadcast. Ask the
        :data:`FETCH_DECIDED_FROM` validators after us in peer-id order (those we heard vote
        in this round first: a crashed one would not answer) for the commit of this height:
        one that has it answers at once, one that has not yet answers when it commits
        (:meth:`_on_commit_request`). Once per round; not when we moved on to a later
        round, nor when we saw more than 2/3 of the round's precommits (or, still prevoting,
        of nil prevotes): then nothing is missing here and the round's timeout follows.
        The same two get a :class:`BftVoteRequest` with bitmaps of the round's votes we
        hold: when every validator misses some vote short of a quorum nobody commits, and
        only the votes we lack end that stall before the round's timeouts."""
        table = self.table
        precommits = self._precommits.get(round_)
        prevotes = self._prevotes.get(round_)
        if round_ != self.round or (precommits is not None and table.passes(precommits.votes)) or (
                self.step == PREVOTE and prevotes is not None and None in prevotes.by_hash
                and table.passes(prevotes.by_hash[None])):
            return
        # validators we heard vote in this round first (they are up and in it), then the rest
        heard = {v for sets in (precommits, prevotes) if sets is not None for v in sets.votes}
        ring = self._after_me(table.weights)
        ring = [p for p in ring if p in heard] + [p for p in ring if p not in heard]
        order = sorted(table.weights)
        asked = self._ask(ring, BftCommitRequest(from_height=self.height), BftVoteRequest(
            height=self.height, round=round_,
            prevotes=vote_bitmap(order, prevotes.votes if prevotes is not None else ()),
            precommits=vote_bitmap(order, precommits.votes if precommits is not None else ())))
        self._event("commit_poll", f"r={round_} ask {asked}")

    def _fetch_proposal(self, round_: int) -> None:
        """Voters of more than 1/3 of the weight voted in ``round_`` for a block we still do
        not hold, ``proposal_fetch_delay_s`` after that became true: its proposal was lost on
        the way to us. Ask :data:`FETCH_DECIDED_FROM` of its voters (the next ones after us
        in peer-id order) for the proposal of ``round_``. Without it we would prevote nil
        (and, if others locked on the block, the next proposer that lacks it too proposes
        another block the locked peers refuse: a whole round lost) until a rebroadcast."""
        table = self.table
        for sets in (self._precommits, self._prevotes):
            votes = sets.get(round_)
            if votes is None:
                continue
            for digest, voters in votes.by_hash.items():
                if digest is None or digest in self._blocks or not table.passes(voters, ONE_THIRD):
                    continue
                asked = self._ask(self._after_me(voters), BftProposalRequest(height=self.height, round=round_))
                self._event("fetch_proposal", f"r={round_} {_h8(digest)} from {asked}")
                return

    def _on_proposal_request(self, sender: str, msg: BftProposalRequest, now: float) -> None:
        """Send a validator the signed proposal of (our height, ``msg.round``) if we hold it,
        once per (peer, round) and height; with a re-proposal, also the prevotes of its polka
        (the requester needs them for L28). A request for another height is a height hint
        like any message (§14.10: we push commits, or ask for them)."""
        if msg.height != self.height:
            self._other_height(sender, msg.height, now)
            return
        proposal = self._proposal_msgs.get(msg.round)
        if sender not in self.table.weights or proposal is None or (sender, msg.round) in self._proposals_served:
            self.drops["proposal_request_unanswered"] += 1
            return
        self._proposals_served.add((sender, msg.round))
        self._actions.append(Send(sender, proposal))
        self._relay_polka(proposal.valid_round, block_hash(proposal.block), to=sender)

    def _on_vote_request(self, sender: str, msg: BftVoteRequest, now: float) -> None:
        """Send a validator the signed votes of (our height, ``msg.round``) we hold and its
        bitmaps say it lacks: the first vote of each voter per type, ours or one whose
        signature verifies (relayed votes are proofs), never the requester's own. Once per
        (peer, round) and height, only for a round we hold votes of, only to validators, and
        only with bitmaps of the table's size; else no answer (``vote_request_unanswered``).
        A request for another height is a height hint like any message (§14.10)."""
        if msg.height != self.height:
            self._other_height(sender, msg.height, now)
            return
        table = self.table
        size = (len(table.weights) + 7) // 8
        sets = [(self._prevotes.get(msg.round), msg.prevotes), (self._precommits.get(msg.round), msg.precommits)]
        if sender not in table.weights or (sender, msg.round) in self._votes_served \
                or len(msg.prevotes) != size or len(msg.precommits) != size \
                or all(votes is None for votes, _ in sets):
            self.drops["vote_request_unanswered"] += 1
            return
        self._votes_served.add((sender, msg.round))
        order = sorted(table.weights)
        for votes, bitmap in sets:
            if votes is None:
                continue
            have = int.from_bytes(bitmap, "little")
            for i, voter in enumerate(order):
                vote = votes.votes.get(voter)
                if vote is None or voter == sender or (have >> i) & 1:
                    continue
                if voter == self.peer_id or self._signature_ok(vote, table):
                    self._actions.append(Send(sender, BftVote(vote=vote)))
                else:
                    self.drops["unrelayable_vote"] += 1

    def _hold(self, sender: str, msg: BftProposal | Vote, height: int) -> bool:
        """Keep a proposal or vote of the *next* height from a validator until we get there
        (True if held). A peer that missed a precommit or two of this height (loss, or the
        others simply committed a few ms earlier) hears the next height's proposal and votes
        before it can use them; dropped, they would come back only with the senders'
        rebroadcast, and the peer would trail the others by a catch-up interval at every
        height. Held, they are delivered (and checked) as if they arrived the moment this
        peer enters that height (:meth:`_replay_held`), like a message delayed in flight, so
        no voting rule changes. Bounded: only the current validators' messages, at most
        :data:`MAX_HELD_PER_SENDER` per sender and one proposal per sender; the rest is
        dropped (``held_overflow``) as before."""
        if height != self.height + 1 or sender not in self.table.weights:
            return False
        if self._held_height != height:
            self._held, self._held_height = {}, height
        msgs = self._held.setdefault(sender, [])
        if len(msgs) >= MAX_HELD_PER_SENDER or (
                isinstance(msg, BftProposal) and any(isinstance(m, BftProposal) for m in msgs)):
            self.drops["held_overflow"] += 1
            return False
        msgs.append(msg)
        self.drops["held_next_height"] += 1  # not a drop: counted to show how often it helps
        return True

    def _replay_held(self, now: float) -> None:
        """We reached (or passed) the height of the held messages: deliver them now."""
        held, height = self._held, self._held_height
        self._held, self._held_height = {}, 0
        if height != self.height:  # we jumped past it (a catch-up batch): stale
            self.drops["held_stale"] += sum(len(m) for m in held.values())
            return
        for sender, msgs in held.items():
            for msg in msgs:
                try:
                    if isinstance(msg, BftProposal):
                        self._on_proposal(sender, msg, now)
                    else:
                        self._on_vote(sender, msg, now)
                except RemoteProtocolError as exc:
                    self._reject(sender, exc.reason, str(exc))

    def _check_commit(self, commit: CertifiedCommit) -> bytes:
        verify_commit(commit, self.table_for(commit.block.height), self.network_id)
        if commit.block.parent_hash != self._last_hash:
            raise CertificateError(f"commit h={commit.block.height} does not extend our chain",
                                   reason="bad_commit")
        return block_hash(commit.block)

    def _on_proposal(self, sender: str, msg: BftProposal, now: float) -> None:
        if msg.height != self.height:
            self._other_height(sender, msg.height, now, self._hold(sender, msg, msg.height))
            return
        r = msg.round
        if r > self.round + self.config.max_future_rounds:
            self.drops["far_future_round"] += 1
            return
        signer = msg.signed.voter
        if signer != self.proposer(msg.height, r):
            self._reject(sender, "wrong_proposer", f"r={r} by {signer[:10]}")
            return
        digest = block_hash(msg.block)
        known = self._proposals.get(r)
        if known == (digest, msg.valid_round):
            self.drops["duplicate"] += 1
            return
        if not verify_vote(msg.signed, PROPOSAL, self.network_id, self.table.epoch, msg.statement(digest)):
            self._reject(sender, "bad_signature", f"proposal r={r}")
            return
        self._max_round[signer] = max(self._max_round.get(signer, 0), r)
        if known is not None:
            # both proposals carry the signer's signature: its fault, not the relay's
            self._reject(signer, "conflicting_proposal", f"r={r} from {sender[:10]}")
            if self._extra_blocks.get(r, 0) < 2:  # keep a few: a quorum may precommit the twin
                self._extra_blocks[r] = self._extra_blocks.get(r, 0) + 1
                self._blocks.setdefault(digest, msg.block)
            return
        self._proposals[r] = (digest, msg.valid_round)
        self._proposal_msgs[r] = msg
        self._blocks[digest] = msg.block

    def _on_vote(self, sender: str, vote: Vote, now: float) -> None:
        if vote.height != self.height:
            self._other_height(sender, vote.height, now, self._hold(sender, vote, vote.height))
            return
        table = self.table
        voter = vote.voter
        if voter not in table.weights:
            self._reject(sender, "unknown_voter", vote.describe())
            return
        sets = self._prevotes if vote.vote_type == PREVOTE else self._precommits
        votes = sets.get(vote.round)
        if votes is not None and votes.by_hash.get(vote.block_hash, {}).get(voter) == vote:
            self.drops["duplicate"] += 1
            return
        # A prevote that comes from its own voter is counted on the strength of the envelope
        # signature (the driver delivers only verified envelopes, so the voter did send it);
        # its own signature matters only to third parties and is checked when the vote
        # leaves this peer as proof (a polka relay, equivocation evidence). Precommits are
        # always checked: they go into the commit certificate.
        checked = vote.vote_type != PREVOTE or sender != voter
        if checked and not self._signature_ok(vote, table):
            self._reject(sender, "bad_signature", vote.describe())
            return
        self._max_round[voter] = max(self._max_round.get(voter, 0), vote.round)
        existing = votes.votes.get(voter) if votes is not None else None
        if existing is not None:
            if existing.block_hash == vote.block_hash or voter in votes.by_hash.get(vote.block_hash, {}):
                self.drops["duplicate"] += 1
                return
            if not checked and not self._signature_ok(vote, table):  # proof against the voter: both must verify
                self._reject(sender, "bad_signature", vote.describe())
                return
            key = (voter, vote.vote_type, vote.round)
            if key not in self._evidence_seen and self._signature_ok(existing, table):
                self._evidence_seen.add(key)
                self.drops["equivocation"] += 1
                self._actions.append(Evidence(Equivocation(first=existing, second=vote)))
            if vote.block_hash is not None and vote.block_hash not in self._blocks:
                self.drops["conflicting_vote"] += 1  # bounded: only votes for known blocks are kept
                return
        if vote.round > self.round + self.config.max_future_rounds:
            self.drops["far_future_round"] += 1  # counted for round skipping only
            return
        votes = sets.setdefault(vote.round, _VoteSet())
        votes.add(vote)
        if existing is None and voter != self.peer_id:
            self._accepted_votes[voter] += 1
        digest = vote.block_hash
        if digest is not None and digest not in self._blocks and ("want", vote.round) not in self._done \
                and table.passes(votes.by_hash[digest], ONE_THIRD):
            # A correct peer holds that block (it voted for it); its proposal may still be in
            # flight to us, or lost: ask for it if it has not come in proposal_fetch_delay_s.
            self._done.add(("want", vote.round))
            self._schedule(now + self.config.proposal_fetch_delay_s, "fetch_proposal", self.height, vote.round)

    def _signature_ok(self, vote: Vote, table: WeightTable) -> bool:
        return verify_vote(vote.signed, vote.vote_type, self.network_id, table.epoch, vote.statement())

    # ---- signing (never conflicting with what was persisted)

    def _may_sign(self, step: str, round_: int, digest: bytes | None, valid_round: int | None) -> bool:
        if self.height < self.sign_from_height:
            self._event("sign_refused", f"{step}: nothing is signed below height {self.sign_from_height}")
            return False
        if self.awaiting_network and not self._heard_enough():
            self._event("sign_refused", f"{step}: the network is not heard yet")
            return False
        if self._recovery_height == self.height:
            self._event("sign_refused", f"{step}: asking for the votes we signed at this height before")
            return False
        last = self._sign_state
        position = (self.height, round_, _STEP_RANK[step])
        if last is not None:
            if position < last.position():
                self._event("sign_refused", f"{step} behind {last.describe()}")
                return False
            if position == last.position():
                if (last.block_hash, last.valid_round) != (digest, valid_round):
                    self._event("sign_refused", f"{step} conflicts with {last.describe()}")
                    return False
                return True  # the same statement again: same (deterministic) signature
        self._sign_state = SignState(height=self.height, round=round_, step=step, block_hash=digest,
                                     valid_round=valid_round, locked_round=self.locked_round,
                                     locked_hash=self.locked_hash)
        locked = None if self.locked_hash is None else self._blocks.get(self.locked_hash)
        self._actions.append(PersistVote(self._sign_state, locked))
        return True

    def _vote(self, vote_type: str, digest: bytes | None) -> None:
        if vote_type == PREVOTE:
            self.step = PREVOTE
        else:
            self.step = PRECOMMIT
        if self.peer_id not in self.table.weights:
            return
        if not self._may_sign(vote_type, self.round, digest, None):
            self._resend_signed_vote()
            return
        self._send_vote(vote_type, self.round, digest)

    def _send_vote(self, vote_type: str, round_: int, digest: bytes | None) -> None:
        statement = [self.height, round_, digest]
        vote = Vote(vote_type=vote_type, height=self.height, round=round_, block_hash=digest,
                    signed=sign_vote(self.identity, vote_type, self.network_id, self.table.epoch, statement))
        self._own_votes[(vote_type, round_)] = vote
        sets = self._prevotes if vote_type == PREVOTE else self._precommits
        sets.setdefault(round_, _VoteSet()).add(vote)
        self._actions.append(Broadcast(BftVote(vote=vote)))

    def _resend_signed_vote(self) -> None:
        """A vote was refused because the persisted sign state is at or past it (a restart at
        the height we had signed in): send the vote the sign state holds instead, once, if this
        run has not sent it. It is the very statement we signed before (the same signature),
        so it conflicts with nothing; without it, validators that all restarted after signing
        votes nobody received would wait in the same round for ever, each having sent nothing
        (no 2/3 of any votes, no timeout: PROTOCOL.md §14.12)."""
        last = self._sign_state
        if last is None or last.height != self.height or last.step not in (PREVOTE, PRECOMMIT) \
                or (last.step, last.round) in self._own_votes:
            return
        self._event("vote_resent", f"{last.step} of round {last.round} from the sign state")
        self._send_vote(last.step, last.round, last.block_hash)

    def _pool_round_robin(self) -> Iterator[bytes]:
        """The pooled values' hashes, fairly by sender: our own first, then one value of each
        gossiping sender in turn (senders in the order of their oldest pooled value), each
        sender's in arrival order. A sender holding its whole quota then delays another
        sender's value by at most one value per block, not by its queue (with arrival order a
        flooder's 1024 values went into the next 4-16 blocks first)."""
        # (nothing changes the pool while a block is built: the iterators stay valid)
        queues = [iter(self._own_pending)] + [iter(v) for v in self._sender_values.values()]
        while queues:
            alive = []
            for q in queues:
                d = next(q, None)
                if d is not None:
                    alive.append(q)
                    yield d
            queues = alive

    def _make_block(self) -> Block:
        chosen: list[bytes] = []
        expired: list[bytes] = []
        groups: dict[bytes, tuple[Any, bytes]] = {}  # choice group -> (rank, value chosen)
        size = 0
        for d in self._pool_round_robin():
            if len(chosen) >= self.config.max_batch:
                break
            v = self._pool.get(d)
            if v is None or size + len(v) > self.config.max_block_bytes or d in self._recent:
                continue  # (a smaller value may still fit)
            ok = True if self.validate_value is None else self.validate_value(v)
            if ok is False:  # no longer valid (e.g. a decision past its window): leaves the pool
                expired.append(d)
            elif ok and (self.proposable is None or self.proposable(v, self._pool_sender.get(d))):
                choice = None if self.choice_key is None else self.choice_key(v)
                if choice is not None:  # one value per group of alternatives: the best ranked
                    group, rank = choice
                    held = groups.get(group)
                    if held is not None:
                        if rank >= held[0]:
                            continue
                        chosen.remove(held[1])
                        size -= len(held[1])
                    groups[group] = (rank, v)
                chosen.append(v)
                size += len(v)
        for d in expired:
            self._pool_remove(d)
            self.drops["expired_value"] += 1
        chosen.sort(key=value_hash)
        return Block(height=self.height, epoch=self.table.epoch, proposer=self.peer_id,
                     parent_hash=self._last_hash, values=tuple(chosen))

    def _valid(self, block: Block, digest: bytes) -> bool:
        """Algorithm 1 valid(v) ("not yet" counts as not valid)."""
        return self._validity(block, digest) is True

    def _validity(self, block: Block, digest: bytes) -> bool | None:
        """valid(v): True, False, or None while ``block`` holds a value that this peer cannot
        decide yet (``validate_value`` said "not yet"). Definite answers are cached for the
        height; of a not-yet block only its undecided values are asked again."""
        ok = self._valid_cache.get(digest)
        if ok is not None:
            return ok
        pending = self._not_ready.get(digest)
        if pending is None:
            if not self._block_shape_ok(block):
                self._valid_cache[digest] = False
                return False
            pending = block.values
        undecided = []
        for value in pending:
            ok = True if self.validate_value is None else self.validate_value(value)
            if ok is False:
                self._not_ready.pop(digest, None)
                self._valid_cache[digest] = False
                return False
            if ok is None:
                undecided.append(value)
        if undecided:
            if digest not in self._not_ready:
                self.drops["block_not_ready"] += 1
            self._not_ready[digest] = tuple(undecided)
            return None
        self._not_ready.pop(digest, None)
        self._valid_cache[digest] = True
        return True

    def _block_shape_ok(self, block: Block) -> bool:
        """The checks of valid(v) that need no application state (§14.7)."""
        if (block.height, block.parent_hash, block.epoch) != (self.height, self._last_hash, self.table.epoch):
            return False
        if block.proposer not in self.table.weights or len(block.values) > self.config.max_batch \
                or sum(len(v) for v in block.values) > self.config.max_block_bytes:
            return False
        previous = b""
        for value in block.values:
            digest = value_hash(value)
            if digest <= previous or digest in self._recent or len(value) > self.config.max_value_bytes:
                return False
            previous = digest
        return True

    def _await_valid(self, round_: int, now: float) -> bool:
        """The proposal of ``round_`` holds a value that is "not yet" decidable here: True to
        wait (no prevote yet; :meth:`recheck` or the next input asks again), False once
        ``not_ready_wait_s`` has passed (then the block counts as not valid: nil)."""
        if ("await", round_) not in self._done:
            self._done.add(("await", round_))
            self._await_until = now + min(self.config.not_ready_wait_s, self.config.timeout_s(PROPOSE, round_))
            self._event("awaiting_values", f"r={round_}")
            self._schedule(self._await_until, "await_end", self.height, round_)
        return now < self._await_until

    # ---- rounds, timers, rules

    def _start_round(self, round_: int, now: float) -> None:
        """Algorithm 1 StartRound (L11-21)."""
        self.round = round_
        self.step = PROPOSE
        self._event("new_round", f"proposer {self.proposer(self.height, round_)[:10]}")
        if self.proposer(self.height, round_) != self.peer_id:
            timeout = self.config.timeout_s(PROPOSE, round_)
            self._schedule(now + timeout, PROPOSE, self.height, round_)
            if self._nudges(round_):
                self._schedule(now + timeout / 2, "nudge", self.height, round_)
            return
        if self.valid_block is not None:
            block, valid_round = self.valid_block, self.valid_round
        else:
            block, valid_round = self._make_block(), None
        digest = block_hash(block)
        if not self._may_sign(PROPOSAL, round_, digest, valid_round):
            self._schedule(now + self.config.timeout_s(PROPOSE, round_), PROPOSE, self.height, round_)
            return
        statement = [self.height, round_, digest, valid_round]
        proposal = BftProposal(height=self.height, round=round_, block=block, valid_round=valid_round,
                               signed=sign_vote(self.identity, PROPOSAL, self.network_id, self.table.epoch,
                                                statement))
        self._proposal_msgs[round_] = proposal
        self._proposals[round_] = (digest, valid_round)
        self._blocks[digest] = block
        self._actions.append(Broadcast(proposal))
        self._relay_polka(valid_round, digest)

    def _nudges(self, round_: int) -> bool:
        """Whether we are one of the :data:`NUDGERS` validators after the proposer of
        ``round_`` in peer-id order (a bounded, predictable load on a late proposer)."""
        ring = sorted(self.table.weights)
        if self.peer_id not in self.table.weights or len(ring) < 2:
            return False
        proposer = ring.index(self.proposer(self.height, round_))
        return (ring.index(self.peer_id) - proposer) % len(ring) <= NUDGERS

    def _nudge(self, round_: int) -> None:
        """Half the propose timeout passed without a proposal: push our last certified
        commit to the proposer. A proposer that fell a height behind (it missed the
        precommits of the last height under loss) applies it and proposes; one further
        behind takes it as the sign to ask for commits (:meth:`_on_commit_response`);
        one that is current ignores it. Without this the others waited the whole propose
        timeout for a proposer that could not know it was late: while they wait in the
        propose step they send it nothing of this height."""
        last = self.cached_commits(self.height - 1, 1)
        if last:
            self._event("nudge", f"proposer {self.proposer(self.height, round_)[:10]}")
            self._actions.append(Send(self.proposer(self.height, round_),
                                      BftCommitResponse(commits=(last[0],), latest_height=self.height - 1)))

    def _relay_polka(self, valid_round: int | None, digest: bytes, to: str | None = None) -> None:
        """Send the signed prevotes that justify a re-proposal (L28 needs them at every peer;
        ``to``: only to that peer)."""
        votes = self._prevotes.get(valid_round) if valid_round is not None else None
        if votes is not None:
            polka = votes.by_hash.get(digest, {})
            table = self.table
            for voter in sorted(polka):
                vote = polka[voter]
                if voter == self.peer_id or self._signature_ok(vote, table):  # relayed: a proof
                    msg = BftVote(vote=vote)
                    self._actions.append(Broadcast(msg) if to is None else Send(to, msg))
                else:
                    self.drops["unrelayable_prevote"] += 1

    def _on_timer(self, kind: str, round_: int, now: float) -> None:
        if kind == "start":
            if self.step == NEW_HEIGHT and not self._idle_wait:
                if self._network_unheard(now) or self._recovery_height == self.height:
                    self._start_held = True  # started when the wait (and the recovery) ends
                    return
                if round_ == 0 and self.config.empty_block_interval_s > 0 and not self._has_values() \
                        and not (self._proposals or self._prevotes or self._precommits):  # (held ones)
                    self._idle_wait = True
                    self._schedule(now + self.config.empty_block_interval_s, "idle_end", self.height, 0)
                else:
                    self._start_round(round_, now)
            return
        if kind == "idle_end":
            self._end_idle_wait(now)
            return
        if kind == "recovery_end":
            self._finish_recovery(now)
            return
        if kind == "await_end":  # _rule prevotes nil for a proposal still not decidable
            return
        if kind == "fetch_proposal":
            self._fetch_proposal(round_)
            return
        if kind == "commit_poll":
            self._commit_poll(round_)
            return
        if round_ != self.round:
            return
        if kind == "nudge":
            if self.step == PROPOSE and round_ not in self._proposals:
                self._nudge(round_)
            return
        if kind == PROPOSE and self.step == PROPOSE:  # L57
            self._event("timeout_propose")
            self._vote(PREVOTE, None)
        elif kind == PREVOTE and self.step == PREVOTE:  # L61
            self._event("timeout_prevote")
            self._vote(PRECOMMIT, None)
        elif kind == PRECOMMIT:  # L65
            self._event("timeout_precommit")
            self._start_round(round_ + 1, now)

    def _process(self, now: float) -> None:
        """Apply the upon-rules of Algorithm 1 until none fires."""
        for _ in range(100_000):
            if self._held_height and self._held_height <= self.height:
                self._replay_held(now)
            if not self._rule(now):
                if self.step in (PREVOTE, PRECOMMIT) and ("poll", self.round) not in self._done \
                        and self.peer_id in self.table.weights:
                    self._schedule_commit_poll(now)
                return
        raise LocalProtocolError("BFT rules did not settle")  # a bug here, never input-driven

    def _rule(self, now: float) -> bool:
        table = self.table
        # L49: 2f+1 precommits for a block we hold, any round -> decide.
        for r, votes in self._precommits.items():
            for digest, voters in votes.by_hash.items():
                if digest is not None and digest in self._blocks and table.passes(voters):
                    block = self._blocks[digest]
                    if (block.height, block.parent_hash) != (self.height, self._last_hash):
                        continue
                    cert = commit_certificate(table, {v: vote.signed for v, vote in voters.items()})
                    self._apply_commit(CertifiedCommit(round=r, block=block, certificate=cert), digest, now,
                                       "consensus")
                    return True
                if digest is not None and digest not in self._blocks and ("fetch", r) not in self._done \
                        and table.passes(voters):
                    self._done.add(("fetch", r))
                    self._fetch_decided(digest, voters)
                    return True
        # L55: more than 1/3 of the weight is in a higher round -> skip there.
        ahead = sorted({m for m in self._max_round.values() if m > self.round}, reverse=True)
        for r in ahead:
            if table.passes([v for v, m in self._max_round.items() if m >= r], ONE_THIRD):
                self._event("round_skip", f"to r={r}")
                self._start_round(r, now)
                return True
        if self.step == NEW_HEIGHT:
            return False
        r = self.round
        proposal = self._proposals.get(r)
        prevotes = self._prevotes.get(r)
        if proposal is not None and self.step == PROPOSE:
            digest, vr = proposal
            old = None if vr is None else self._prevotes.get(vr)
            if vr is None or (vr < r and old is not None and digest in old.by_hash
                              and table.passes(old.by_hash[digest])):  # L22 (no vr) / L28
                valid = self._validity(self._blocks[digest], digest)
                if valid is not None or not self._await_valid(r, now):  # (else wait for the value)
                    unlocked = self.locked_round is None or self.locked_hash == digest \
                        or (vr is not None and self.locked_round <= vr)
                    self._vote(PREVOTE, digest if valid is True and unlocked else None)
                    return True
        if prevotes is not None and self.step == PREVOTE and ("L34", r) not in self._done \
                and table.passes(prevotes.votes):  # L34
            self._done.add(("L34", r))
            self._schedule(now + self.config.timeout_s(PREVOTE, r), PREVOTE, self.height, r)
            return True
        if proposal is not None and prevotes is not None and self.step in (PREVOTE, PRECOMMIT) \
                and ("L36", r) not in self._done:  # L36
            digest = proposal[0]
            block = self._blocks[digest]
            if digest in prevotes.by_hash and table.passes(prevotes.by_hash[digest]) \
                    and self._valid(block, digest):
                self._done.add(("L36", r))
                if self.step == PREVOTE:
                    self.locked_round, self.locked_hash = r, digest
                    self._event("locked", _h8(digest))
                    self._vote(PRECOMMIT, digest)
                self.valid_round, self.valid_block = r, block
                return True
        # Extension (safe: a re-proposal is checked by every peer against the polka, L28):
        # a polka of an earlier round seen late still raises valid_round, so the next
        # honest proposer re-proposes the value that correct peers may be locked on.
        for rr, votes in self._prevotes.items():
            if rr < r and (self.valid_round is None or rr > self.valid_round):
                for digest, voters in votes.by_hash.items():
                    if digest is not None and digest in self._blocks and table.passes(voters) \
                            and self._valid(self._blocks[digest], digest):
                        self.valid_round, self.valid_block = rr, self._blocks[digest]
                        return True
        if prevotes is not None and self.step == PREVOTE and None in prevotes.by_hash \
                and table.passes(prevotes.by_hash[None]):  # L44
            self._vote(PRECOMMIT, None)
            return True
        precommits = self._precommits.get(r)
        if precommits is not None and ("L47", r) not in self._done and table.passes(precommits.votes):  # L47
            self._done.add(("L47", r))
            self._schedule(now + self.config.timeout_s(PRECOMMIT, r), PRECOMMIT, self.height, r)
            return True
        return False

    def remember_committed(self, height: int, values: Iterable[bytes]) -> None:
        """Tell a restarted core what was committed at ``height`` (< its current height), so the
        dedupe of committed values (``dedupe_heights``) survives a restart: the driver feeds the
        stored blocks of the window before the first message. Older heights are ignored."""
        if self.height - self.config.dedupe_heights < height < self.height:
            for value in values:
                self._recent[value_hash(value)] = height

    def _apply_commit(self, commit: CertifiedCommit, digest: bytes, now: float, source: str) -> None:
        height = self.height
        last = self._sign_state
        if self.config.double_sign_check and (last is None or last.height < height) \
                and any(v.voter == self.peer_id for v in commit.certificate.votes):
            # our precommit, which we never persisted: see BftConfig.double_sign_margin_heights
            floor = height + 2 + self.config.double_sign_margin_heights
            if floor > self.sign_from_height:
                self.sign_from_height = floor
                self._event("double_sign_risk", f"our precommit is in the certificate of height {height} but "
                            f"not in our sign state: nothing is signed below height {floor}")
        if self._first_vote_at is not None and source == "consensus":
            self._vote_to_commit_s.append(now - self._first_vote_at)
        self._first_vote_at = None
        self._actions.append(Commit(commit, digest))
        self._event("committed", f"{_h8(digest)} via {source}")
        self._commits[height] = commit
        self._commits.pop(height - self.config.commit_cache, None)
        for value in commit.block.values:
            vh = value_hash(value)
            self._pool_remove(vh)
            self._recent[vh] = height
        if len(self._recent) > 4 * self.config.dedupe_heights * self.config.max_batch or height % 64 == 0:
            floor = height - self.config.dedupe_heights
            self._recent = {d: h for d, h in self._recent.items() if h > floor}
        self.height = height + 1
        self._last_hash = digest
        self._enter_height()
        if self.on_commit is not None:
            table = self.on_commit(commit)
            if table is not None:
                self._tables = [(h, sch) for h, sch in self._tables if h < self.height]
                self._tables.append((self.height, ProposerSchedule(table, self.height)))
        self._prune_tables()
        self._event("new_height")
        self._schedule(now + self.config.commit_wait_s, "start", self.height, self.round)
        if self._recovery_height == height and self._may_have_signed_here():
            # the height committed while we asked for our votes there: our forgotten life may have
            # entered the next one first (it had the commit): ask again there
            self._start_recovery(now)
        waiters, self._commit_waiters = self._commit_waiters, {}
        for peer_id, max_count in waiters.items():
            self._last_push[peer_id] = now
            self._answer(peer_id, height, max_count)

    def _regossip_values(self) -> None:
        """Our own submitted values are re-sent until committed (the first gossip may be lost)."""
        pending = [self._pool[d] for d in self._own_pending if d in self._pool][:MAX_VALUES_PER_MESSAGE]
        if pending:
            self._actions.append(Broadcast(BftValues(values=tuple(pending))))

    def _has_values(self) -> bool:
        return any(d not in self._recent for d in self._pool)

    def _tell_every_validator(self, msg: object) -> None:
        for peer_id in self._after_me(self.table.weights):
            self._actions.append(Send(peer_id, msg))

    def _may_have_signed_here(self) -> bool:
        """Whether a forgotten life of ours may hold signatures at this height that nothing
        here bounds (we are a validator, below no floor, with no sign state): the own-vote
        recovery asks for them."""
        return self.peer_id in self.table.weights and self._sign_state is None \
            and self.height >= self.sign_from_height

    def _votes_of(self, voter: str) -> list[Vote]:
        """``voter``'s first vote of each (type, round) we hold at this height."""
        return [vs.votes[voter] for sets in (self._prevotes, self._precommits) for vs in sets.values()
                if voter in vs.votes]

    def _network_unheard(self, now: float) -> bool:
        """True while the await_network wait holds (we are a validator and :meth:`_heard_enough`
        is not yet true at this height); ends the wait (event ``network_heard``, a last commit
        request to every validator, then the own-vote recovery or the round start it held) the
        first time it finds otherwise."""
        if not self.awaiting_network:
            return False
        if not self._heard_enough():
            return True
        self.awaiting_network = False
        self._event("network_heard", f"{len(self._heard)} validators heard at height {self.height}")
        if self.peer_id in self.table.weights:
            # one more request to every validator, so that those still waiting hear us now and not
            # only at our first vote (which an idle wait of round 0 can delay by
            # empty_block_interval_s, and which a validator alone of its kind cannot send earlier)
            self._tell_every_validator(BftCommitRequest(from_height=self.height))
        if self._amnesiac and self.height > 1 and self._may_have_signed_here():
            self._start_recovery(now)
        elif self._start_held:
            self._start_held = False
            self._schedule(now, "start", self.height, self.round)
        return False

    def _start_recovery(self, now: float) -> None:
        """Ask every validator for the votes of ours it holds at this height (see __init__)."""
        self._amnesiac = False
        self._recovery_height, self._recovery_answered, self._recovered = self.height, set(), []
        # whose answers we wait for: the validators heard where the wait ended (asked again at
        # the next height, they are the reachable ones still)
        self._recovery_expected = set(self._heard_here()) or self._recovery_expected
        self._tell_every_validator(BftOwnVotesRequest(height=self.height))
        self._schedule(now + self.config.timeout_s(PROPOSE, 0), "recovery_end", self.height, 0)

    def _on_own_votes_request(self, sender: str, msg: BftOwnVotesRequest, now: float) -> None:
        """Answer a validator at our height once with the votes of it we hold (BftOwnVotes;
        relayed votes are proofs: each must verify here, as for a vote request)."""
        if msg.height != self.height:
            self._other_height(sender, msg.height, now)
            return
        table = self.table
        if sender not in table.weights or sender in self._own_votes_served:
            self.drops["own_votes_unanswered"] += 1
            return
        self._own_votes_served.add(sender)
        found = [v for v in self._votes_of(sender) if self._signature_ok(v, table)]
        chosen: list[Vote] = []
        for pick in (lambda v: v.vote_type == PREVOTE, lambda v: v.vote_type == PRECOMMIT,
                     lambda v: v.vote_type == PRECOMMIT and v.block_hash is not None):
            top = max((v for v in found if pick(v)), key=lambda v: v.round, default=None)
            if top is not None and top not in chosen:
                chosen.append(top)
        self._actions.append(Send(sender, BftOwnVotes(height=self.height, votes=tuple(chosen))))

    def _on_own_votes(self, sender: str, msg: BftOwnVotes, now: float) -> None:
        if self._recovery_height != self.height or msg.height != self.height or sender not in self.table.weights:
            self.drops["unexpected_own_votes"] += 1
            return
        for vote in msg.votes:
            if vote.voter != self.peer_id or vote.height != self.height:
                self.drops["invalid_own_votes"] += 1
            elif not self._signature_ok(vote, self.table):  # a correct peer checks what it relays
                self._reject(sender, "bad_signature", vote.describe())
            else:
                self._recovered.append(vote)  # (whatever its round: see _finish_recovery)
                self._on_vote(sender, vote, now)  # and counted, as any relayed vote
        self._recovery_answered.add(sender)
        if self._recovery_expected <= self._recovery_answered:
            self._finish_recovery(now)

    def _finish_recovery(self, now: float) -> None:
        """Adopt the highest of our recovered votes as our sign state (persisted before anything
        else is signed; with the lock of our highest precommit for a block) and start the round
        the wait held, from the round of that vote."""
        if self._recovery_height != self.height:
            return
        self._recovery_height = 0
        mine = list({(v.vote_type, v.round, v.block_hash): v
                     for v in self._recovered + self._votes_of(self.peer_id)}.values())
        self._recovered = []
        if mine:
            top = max(mine, key=lambda v: (v.round, _STEP_RANK[v.vote_type]))
            lock = max((v for v in mine if v.vote_type == PRECOMMIT and v.block_hash is not None),
                       key=lambda v: v.round, default=None)
            if lock is not None and (self.locked_round is None or lock.round > self.locked_round):
                self.locked_round, self.locked_hash = lock.round, lock.block_hash
            for vote in mine:
                self._own_votes[(vote.vote_type, vote.round)] = vote
            self.round = max(self.round, top.round)
            self._sign_state = SignState(height=self.height, round=top.round, step=top.vote_type,
                                         block_hash=top.block_hash, locked_round=self.locked_round,
                                         locked_hash=self.locked_hash)
            locked = None if self.locked_hash is None else self._blocks.get(self.locked_hash)
            self._actions.append(PersistVote(self._sign_state, locked))
            self._event("own_votes_recovered", f"{len(mine)} of ours, the last {self._sign_state.describe()}")
        else:
            self._event("own_votes_recovered", f"none of ours among {len(self._recovery_answered)} answers")
        if self.step == NEW_HEIGHT:  # (in the round of our last vote: a pending start names round 0)
            self._start_held = False
            self._schedule(now, "start", self.height, self.round)

    def _heard_enough(self) -> bool:
        """Whether we are no validator, or the validators heard at this height hold more than
        1/3 of the weight without us (one of them at least is correct) or more than 2/3 with
        us (a quorum is there: waiting longer could only stop the log). Validators of under
        1/3 alone, byzantine ones say, never end the wait of one of small weight."""
        table = self.table
        if self.peer_id not in table.weights:
            return True
        heard = self._heard_here()
        return table.passes(heard, ONE_THIRD) or table.passes(heard | {self.peer_id}, TWO_THIRDS)

    def _heard_here(self) -> set[str]:
        """The validators heard at this height (the set restarts with each height)."""
        if self._heard_height != self.height:
            self._heard, self._heard_height = set(), self.height
        return self._heard

    def _hear(self, sender: str, msg: object, now: float) -> None:
        """await_network: count ``sender`` when ``msg`` shows it at our height."""
        if isinstance(msg, BftVote):
            height = msg.vote.height
        elif isinstance(msg, BftProposal):
            height = msg.height
        elif isinstance(msg, BftCommitRequest):
            height = msg.from_height
        elif isinstance(msg, (BftOwnVotesRequest, BftOwnVotes)):
            height = msg.height
        else:
            return
        if height == self.height and sender in self.table.weights:
            self._heard_here().add(sender)
            self._network_unheard(now)

    def _wakes(self, msg: object) -> bool:
        if isinstance(msg, BftValues):
            return self._has_values()
        if isinstance(msg, BftProposal):
            return msg.height == self.height
        return isinstance(msg, BftVote) and msg.vote.height == self.height

    def _end_idle_wait(self, now: float) -> None:
        """Leave the idle wait of round 0 (a value is pending, a peer moved on, or time is up)."""
        if self._idle_wait and self.step == NEW_HEIGHT:
            self._idle_wait = False
            self._start_round(0, now)

    def _observer_poll(self) -> None:
        """An observer hears no broadcast: ask the validators for new commits in turn."""
        validators = [p for p in self.table.weights if p != self.peer_id]
        if self.peer_id in self.table.weights or not validators:
            return
        target = validators[self._observer_polls % len(validators)]
        self._observer_polls += 1
        self._actions.append(Send(target, BftCommitRequest(from_height=self.height)))

    def _rebroadcast(self) -> None:
        """Re-send our own signed messages of the rounds that still matter (lossy links)."""
        if self.step == NEW_HEIGHT:
            return
        rounds = {self.round, self.round - 1, self.valid_round, self.locked_round}
        proposal = self._proposals.get(self.round)
        if proposal is not None:
            rounds.add(proposal[1])
        own = self._proposal_msgs.get(self.round)
        if own is not None and own.signed.voter == self.peer_id:
            self._actions.append(Broadcast(own))
            self._relay_polka(own.valid_round, block_hash(own.block))
        for vote_type in VOTE_TYPES:
            for r in sorted(r for r in rounds if r is not None and r >= 0):
                vote = self._own_votes.get((vote_type, r))
                if vote is not None:
                    self._actions.append(Broadcast(BftVote(vote=vote)))
