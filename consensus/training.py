"""Federated averaging round core: serverless rounds agreed through the replicated log (pure, sans-IO).

One :class:`TrainingCore` per peer per training job. No peer holds the global
model on behalf of the others: every peer aggregates the committed inclusion
set itself (:mod:`chimera.consensus.aggregation`, bitwise deterministic) and
the round is certified only once correct participants are known to have
computed the same aggregate hash: those that precommitted the inclusion (each
recomputed its ``aggregate_hash`` before voting for it: the fast path, one
commit per round) or, where validators outside the job hold more than 1/3 of
the weight, signed confirmations of more than 2/3 of the participants'
reputation weight.

Round protocol
--------------
1. **Job.** Someone proposes ``fl_job`` (a :class:`JobSpec`) to the log. Its
   ``job_id`` is the SHA-256 of the exact committed log value. On commit the
   driver creates a core per job (:meth:`TrainingCore.for_committed_job`).
2. **Round start.** No value starts a round: round 1 starts where the job
   commits (its epoch: the job's block's), and round ``r + 1`` starts where
   round ``r`` is certified (step 5: the commit of its inclusion on the fast
   path, else the commit that completes its confirmations), from the
   certified model, with the epoch of that block. A rule over the log alone,
   so every peer starts every round at the same point of the log, and no
   committed value can hold a round back. (Earlier drafts committed
   ``fl_start`` values; a byzantine proposer could commit starts naming bogus
   bases ahead of the honest one and stall a job.) A restart from the
   checkpoint of round ``k`` takes round ``k + 1``'s epoch from the checkpoint
   (:class:`Checkpoint` ``next_epoch``).
3. **Local training.** Each participant gets :class:`TrainLocal` (the driver
   runs the model adapter on its own data, seeded by
   :func:`local_seed`) and feeds the result back with
   :meth:`TrainingCore.on_local_result`; the core broadcasts a signed
   :class:`FlUpdate` (parameters as raw little-endian bytes with declared
   shape and dtype). Received updates are checked (participant, signature,
   names/shapes/dtypes, finite values, delta norm bound) before use. An update
   of a round not begun here (one or two ahead, never past ``rounds``) is kept
   only once its signature verifies (the peer id is the author's key, the
   update names its epoch), at most two per author and round, and checked in
   full when the round begins; every rejection is blamed on the peer that sent
   it to us (:meth:`TrainingCore._on_update`).
   A participant does not wait for round ``r - 1`` to be certified to start
   this fit: as soon as it has aggregated round ``r - 1`` itself (step 5) it
   trains round ``r`` from its own aggregate (``TrainLocal.speculative``).
   Aggregation is deterministic, so when the certified hash is its own (the
   normal case) the fit is exactly the one round ``r`` would run; the update is
   signed and sent only once round ``r`` has begun here from the certified
   model. If the certified hash differs, the speculative fit is dropped
   (``speculative_base_mismatch``) and the round trains again.
4. **Inclusion.** The quorum counts *distinct senders with weight in the
   round's table*, never hashes (the aggregate keeps one update per sender and
   skips senders without weight). As soon as a peer holds an update from every
   participant with weight, or after ``round_deadline_s`` (local time since the
   round began here) from at least ``quorum`` of them, it aggregates the first
   update of each such sender (step 5) and proposes ``fl_include(job_id, r,
   sorted update hashes, aggregate_hash)`` (with its confirmation off the fast
   path), except a set whose aggregate has an error that could still grow
   (it waits for more updates). The first committed inclusion of round ``r``
   with ``quorum`` … ``len(participants)`` hashes counts. A participant that
   died or is late does not stall the round. With the log's validity hook wired
   to :meth:`TrainingCore.validate_log_value`, a correct participant prevotes
   (and precommits) an inclusion only if it holds its updates, they are of
   distinct senders, ``quorum`` of them with weight, and its own aggregate of
   them has the hash ``aggregate_hash`` and no error (unless the set names
   every weighted participant), so a committed one is held by at least one
   correct peer. A participant missing an update that an inclusion
   names asks for it (:class:`FlUpdateRequest`) as soon as it checks that
   inclusion (:meth:`TrainingCore.fetch_wanted`), and again after the commit
   while the round is not certified; a certified round's missing updates are
   not fetched: the peer asks for the certified model (step 5). Every fetch
   goes to 2 participants first, twice as many further ones at each retry.
5. **Aggregate and certify.** Every peer aggregates (anomaly detection, then
   the job's rule) over ``base``. *Fast path* (:meth:`TrainingCore.fast_path`
   of the committing block's epoch, passed to :meth:`on_committed`): the
   inclusion's commit certifies round ``r`` with its ``aggregate_hash``.
   Otherwise each participant with weight in the round proposes a signed ``fl_confirm(job_id, r,
   inclusion_hash, aggregate_hash)`` (a peer proposing an inclusion confirms
   with it, so when that set commits the confirmations ride in the same block;
   a confirm counts only for the inclusion committed), and once confirmations
   of more than 2/3 of the participants' weight (weights: the weight table of
   the round's ``epoch``) name one hash, round ``r`` is **certified**. Then a peer whose own result
   matches emits :class:`Checkpoint` and ``round_committed``; one whose result
   differs (``aggregate_mismatch``) or that has none fetches the model
   (:class:`FlModelRequest`) and accepts it only if its hash is the certified
   one. Flagged updates become ``update_flagged`` observations against their
   senders, credited ones ``update_good`` (:class:`Observe`; credited: see
   :class:`~chimera.consensus.aggregation.AggregateResult`, e.g. not an update
   Krum passed over, and nobody under the coordinate-wise rules).

Resume and late join: construct the core with the last checkpoint (round,
parameters and the next round's epoch) and replay the job's committed log values in order
(:meth:`on_committed`); rounds certified beyond the checkpoint are fetched
from peers and verified against the certified hash.

Log values (each at most 4096 bytes, opaque bytes to :class:`~chimera.consensus.bft.BftCore`)
------------------------------------------------------------------------------------------
A value is ``msgpack([tag, body])`` (``use_bin_type``; no extension types):
``tag`` is a str and ``body`` the msgpack map of a record's fields, decoded
strictly (unknown/missing fields or wrong types reject the value)::

    ["fl_job",     {name, model_kind, n_features, classes, l2, dataset, rounds,
                    local_epochs, learning_rate, rule, byzantine_f, detect_anomalies,
                    participants, quorum, round_deadline_s, max_update_norm, seed}]
    ["fl_include", {job_id: bin32, round: int>=1, updates: [bin32, ...] (strictly ascending),
                    aggregate_hash: bin32}]
    ["fl_confirm", {job_id: bin32, round: int>=1, inclusion_hash: bin32, aggregate_hash: bin32,
                    signed: {voter: peer id, signature: bin64}}]

``job_id = SHA-256(fl_job value)``; ``aggregate_hash`` is
:func:`~chimera.consensus.aggregation.aggregate_hash` of a model;
``inclusion_hash`` is :func:`inclusion_hash` of the confirmed set;
``fl_confirm.signed`` is :func:`~chimera.consensus.quorum.sign_vote` with
purpose ``"fl_confirm"``, the round's epoch and statement ``[job_id, round,
inclusion_hash, aggregate_hash]``.

Wire messages (actor ``"training"``)
-----------------------------------
* ``fl_update`` (:class:`FlUpdate`): one participant's signed update.
  ``update_hash = SHA-256(UPDATE_DOMAIN || msgpack(body without signature))``;
  ``signature``: ``sign_vote`` purpose ``"fl_update"``, the round's epoch,
  statement ``[job_id, round, update_hash]`` (verifiable when relayed).
* ``fl_update_request`` (:class:`FlUpdateRequest`): ask for updates by hash.
* ``fl_model_request`` / ``fl_model`` (:class:`FlModelRequest`,
  :class:`FlModel`): fetch the certified global model of a round.

Driver duties (the order of :meth:`TrainingCore.take_actions` matters)
---------------------------------------------------------------------
* :class:`Checkpoint`: write the model atomically (temp + fsync + rename) and
  its SQLite record, with ``next_epoch``, *before* running any later action.
* :class:`ProposeValue`: ``BftCore.submit(value, now)``; feed every committed
  log value of the job back with :meth:`TrainingCore.on_committed` in log order.
* :class:`TrainLocal`: run :meth:`~chimera.consensus.models.ModelAdapter.fit`
  (off the event loop), then :meth:`TrainingCore.on_local_result`. Local
  training is deterministic given the seed, so a peer restarted mid-round
  produces the same update again (never two conflicting signed updates).
* :class:`Broadcast` to every participant but us; :class:`Send` to one peer.
* :class:`Observe` / :class:`Rejected`: reputation observations / counted drops.

The core never reads a clock: ``now`` is monotonic seconds from the driver;
call :meth:`TrainingCore.tick` at :meth:`TrainingCore.next_deadline`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Collection, Mapping

import msgpack
import numpy as np

from chimera.consensus.aggregation import (
    DTYPES,
    RULES,
    AggregateResult,
    AggregationConfig,
    ModelSpec,
    Update,
    UpdateRejected,
    aggregate,
    aggregate_hash,
    validate_update,
)
from chimera.consensus.models import ADAPTERS, FitResult, make_adapter
from chimera.consensus.quorum import SignedVote, WeightTable, sign_vote, verify_vote
from chimera.consensus.reputation import ObservationKind
from chimera.protocol.errors import LocalProtocolError, MalformedError, RemoteProtocolError
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.messages import (
    Len,
    MaxItems,
    MaxLen,
    PeerId,
    Range,
    decode_fields,
    encode_fields,
    message,
    record,
    reject_duplicate_keys,
)

TRAINING_ACTOR = "training"
UPDATE_PURPOSE = "fl_update"
CONFIRM_PURPOSE = "fl_confirm"
UPDATE_DOMAIN = b"chimera-mesh/fl-update/v1\x00"
INCLUSION_DOMAIN = b"chimera-mesh/fl-include/v1\x00"
SEED_DOMAIN = b"chimera-mesh/fl-seed/v1\x00"

MAX_PARTICIPANTS = 64
MAX_HELD_CONFIRMS_PER_VOTER = 4  # confirms of one participant held per round until its inclusion commits
MAX_ROUNDS = 1_000_000
MAX_TENSOR_BYTES = 256 << 20  # larger models travel in fl_part messages (PART_BYTES each)
PART_BYTES = 192 << 10  # an fl_update/fl_model body above this goes as parts (fits 256 KiB edge envelopes)
MAX_PARTS = 1400  # parts of one body (~262 MiB)
MAX_ASSEMBLIES_PER_SENDER = 4  # bodies being reassembled from one peer at once
MAX_LOG_VALUE_BYTES = 4096  # chimera.consensus.bft.MAX_VALUE_BYTES
UPDATE_FETCH_FANOUT = 2  # participants asked at once for updates an uncommitted inclusion names
MAX_AGGREGATES_PER_ROUND = 8  # inclusion sets of one round aggregated to check them (bounds a flood:
#   an aggregate with anomaly screening costs 30-45 ms of CPU here)
MAX_EPOCH = 2**62
MAX_EARLY_UPDATES_PER_SENDER = 2  # updates of one author kept for a round not yet begun here (two:
#   enough to see an equivocation; each is signature-checked on arrival, so only its author can fill them)

Hash32 = Annotated[bytes, Len(32)]
RoundNo = Annotated[int, Range(1, MAX_ROUNDS)]
Epoch = Annotated[int, Range(0, MAX_EPOCH)]


def _h8(digest: bytes | None) -> str:
    return "none" if digest is None else digest.hex()[:8]


# ------------------------------------------------------------------ log records


@record
class JobSpec:
    """A training job, committed through the log (``fl_job``).

    Fields: ``model_kind`` a key of :data:`~chimera.consensus.models.ADAPTERS`;
    ``n_features`` >= 1; ``classes`` the label set (classifiers); ``l2`` the L2
    strength (>= 0); ``dataset`` a reference each node resolves to its own data
    (e.g. a config key or ``"digits:dirichlet:0.5"``); ``rounds`` >= 1;
    ``local_epochs`` >= 1; ``learning_rate`` > 0; ``rule`` one of
    :data:`~chimera.consensus.aggregation.RULES`; ``byzantine_f`` the f the rule
    assumes; ``detect_anomalies`` run the anomaly detector; ``participants``
    sorted distinct peer ids; ``quorum`` distinct senders with weight in the round's
    table whose updates an inclusion needs (1..len(participants), at least what the rule
    needs; see :meth:`TrainingCore.validate_log_value`); ``round_deadline_s``
    seconds (> 0); ``max_update_norm`` L2 bound of an update's delta (> 0);
    ``seed`` for local training seeds; ``sklearn_version`` the scikit-learn version of
    the job's proposer, recorded with ``detect_anomalies`` (the screen's IsolationForest
    is reproducible only with the same version, PROTOCOL.md §17.7: a participant running
    another one neither checks, confirms nor proposes the job's aggregates, see
    :attr:`TrainingCore.checks_aggregates`), empty when not recorded (a job without the
    screen, or from before the field) and then left out of the encoding, so such a job's
    value and id are what they were before the field existed. The four floats must be
    finite (the codec carries finite floats only). Invalid combinations raise
    ``ValueError`` (``MalformedError`` when decoded).
    """

    name: Annotated[str, MaxLen(64)]
    model_kind: Annotated[str, MaxLen(32)]
    n_features: Annotated[int, Range(1, 1 << 20)]
    classes: Annotated[tuple[Annotated[int, Range(0, 2**31)], ...], MaxItems(1024)] = ()
    l2: float = 1e-4
    dataset: Annotated[str, MaxLen(256)] = ""
    rounds: Annotated[int, Range(1, MAX_ROUNDS)]
    local_epochs: Annotated[int, Range(1, 10_000)] = 1
    learning_rate: float
    rule: Annotated[str, MaxLen(32)] = "fedavg"
    byzantine_f: Annotated[int, Range(0, MAX_PARTICIPANTS)] = 0
    detect_anomalies: bool = False
    participants: Annotated[tuple[PeerId, ...], MaxItems(MAX_PARTICIPANTS)]
    quorum: Annotated[int, Range(1, MAX_PARTICIPANTS)]
    round_deadline_s: float
    max_update_norm: float = 1e6
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0
    sklearn_version: Annotated[str, MaxLen(32)] = ""

    def __post_init__(self) -> None:
        if self.model_kind not in ADAPTERS:
            raise ValueError(f"unknown model kind {self.model_kind!r}")
        if self.rule not in RULES:
            raise ValueError(f"unknown aggregation rule {self.rule!r}")
        if list(self.participants) != sorted(set(self.participants)) or not self.participants:
            raise ValueError("participants must be sorted, distinct and not empty")
        if not 1 <= self.quorum <= len(self.participants):
            raise ValueError("quorum must be in 1..len(participants)")
        if self.quorum < self.aggregation().min_updates():
            raise ValueError(f"rule {self.rule} with f={self.byzantine_f} needs quorum >= "
                             f"{self.aggregation().min_updates()}")
        # finite first: a value built with inf or NaN would encode, but fail decoding at every
        # peer (the codec takes finite floats only), so a committed one would be ignored
        for name in ("learning_rate", "round_deadline_s", "max_update_norm", "l2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number")
        for name in ("learning_rate", "round_deadline_s", "max_update_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if not self.l2 >= 0:
            raise ValueError("l2 must be >= 0")
        if self.model_kind == "sgd_classifier" and len(set(self.classes)) < 2:
            raise ValueError("a classifier needs at least two classes")
        if self.sklearn_version and not self.detect_anomalies:
            raise ValueError("sklearn_version is recorded only for a job with detect_anomalies")
        if not all(33 <= ord(c) <= 126 for c in self.sklearn_version):
            raise ValueError("sklearn_version must be printable ASCII without spaces")

    def aggregation(self) -> AggregationConfig:
        return AggregationConfig(rule=self.rule, f=self.byzantine_f, detect=self.detect_anomalies)

    def model_spec(self) -> ModelSpec:
        return make_adapter(self.model_kind, self.n_features, self.classes, self.l2).spec

    def describe(self) -> str:
        return (f"job {self.name} {self.model_kind} {self.rule} f={self.byzantine_f} rounds={self.rounds} "
                f"{len(self.participants)} participants quorum {self.quorum}"
                + (f" screen sklearn {self.sklearn_version}" if self.sklearn_version else ""))


@record
class Inclusion:
    """``fl_include``: the update hashes (strictly ascending) aggregated in ``round``, and
    ``aggregate_hash``, the proposer's aggregate of them (checked by every participant that
    prevotes it; the round is certified by the commit itself where :meth:`TrainingCore.fast_path`
    holds for the committing block's epoch)."""

    job_id: Hash32
    round: RoundNo
    updates: Annotated[tuple[Hash32, ...], MaxItems(2 * MAX_PARTICIPANTS)]
    aggregate_hash: Hash32

    def __post_init__(self) -> None:
        if any(a >= b for a, b in zip(self.updates, self.updates[1:])):
            raise ValueError("inclusion hashes must be strictly ascending")

    def describe(self) -> str:
        return f"include r={self.round} {len(self.updates)} updates aggregate {_h8(self.aggregate_hash)}"


@record
class AggregateConfirm:
    """``fl_confirm``: ``signed.voter`` computed ``aggregate_hash`` for ``round`` from the
    updates whose :func:`inclusion_hash` is ``inclusion_hash``.

    Binding the inclusion lets a peer confirm right when it proposes an inclusion
    (before any inclusion commits): the confirm counts only if that inclusion is
    the one committed.
    """

    job_id: Hash32
    round: RoundNo
    inclusion_hash: Hash32
    aggregate_hash: Hash32
    signed: SignedVote

    def statement(self) -> list:
        return [self.job_id, self.round, self.inclusion_hash, self.aggregate_hash]

    def describe(self) -> str:
        return (f"confirm r={self.round} {_h8(self.aggregate_hash)} of {_h8(self.inclusion_hash)} "
                f"by {self.signed.voter[:10]}")


def inclusion_hash(updates: tuple[bytes, ...]) -> bytes:
    """SHA-256 of ``INCLUSION_DOMAIN || the update hashes`` (ascending, 32 bytes each)."""
    return hashlib.sha256(INCLUSION_DOMAIN + b"".join(updates)).digest()


LOG_TAGS: Mapping[str, type] = {"fl_job": JobSpec, "fl_include": Inclusion, "fl_confirm": AggregateConfirm}
# ("fl_start", an explicit round start of earlier drafts, is retired: rounds start by rule, see
# TrainingCore._start_next; such a value decodes as no training value, i.e. invalid.)
_TAG_OF = {cls: tag for tag, cls in LOG_TAGS.items()}


def encode_log_value(value: Any) -> bytes:
    """``msgpack([tag, fields])`` of a log record.

    Raises:
        LocalProtocolError: not a log record, a field out of bounds, or longer than 4096 bytes.
    """
    tag = _TAG_OF.get(type(value))
    if tag is None:
        raise LocalProtocolError(f"{type(value).__name__} is not a training log record")
    fields = encode_fields(value)
    if tag == "fl_job" and not fields["sklearn_version"]:
        del fields["sklearn_version"]  # left out when empty: a job's bytes (its id) as before the field
    raw = msgpack.packb([tag, fields], use_bin_type=True)
    if len(raw) > MAX_LOG_VALUE_BYTES:
        raise LocalProtocolError(f"log value of {len(raw)} bytes exceeds {MAX_LOG_VALUE_BYTES}")
    return raw


def _reject_ext(code: int, data: bytes) -> Any:
    raise MalformedError("msgpack extension types are not allowed")


def decode_log_value(value: bytes) -> Any:
    """The record of a training log value.

    Raises:
        MalformedError: not a training value (other tag, bad msgpack, bad fields, too long).
    """
    if type(value) is not bytes or len(value) > MAX_LOG_VALUE_BYTES:
        raise MalformedError("a training log value is bytes of <= 4096")
    try:
        outer = msgpack.unpackb(value, raw=False, use_list=True, strict_map_key=True, ext_hook=_reject_ext,
                                object_pairs_hook=reject_duplicate_keys)
    except MalformedError:
        raise
    except Exception as exc:  # msgpack raises several types on garbage
        raise MalformedError(f"bad msgpack: {type(exc).__name__}") from None
    if type(outer) is not list or len(outer) != 2 or type(outer[0]) is not str or outer[0] not in LOG_TAGS:
        raise MalformedError("not a training log value")
    if outer[0] == "fl_job" and type(outer[1]) is dict and outer[1].get("sklearn_version") == "":
        raise MalformedError("fl_job: an empty sklearn_version is left out, not sent")  # one encoding
    return decode_fields(LOG_TAGS[outer[0]], outer[1], outer[0])


def inclusion_choice(value: bytes) -> tuple[bytes, tuple[int, bytes]] | None:
    """Block-building policy for the log (``BftCore(choice_key=...)``): the inclusions of one
    (job, round) are alternatives, since only the first committed one counts, so a proposed
    block carries one of them: the one naming the most updates (ties: the smallest value
    bytes). None for any other value.

    Why: a block is valid at a peer only if every value in it is, and a participant can
    check only a bounded number of sets per round (:data:`MAX_AGGREGATES_PER_ROUND`; the
    largest is always checkable, see :meth:`TrainingCore.validate_log_value`). Under message
    loss the proposers' deadline sets differ; a block bundling several of them was
    checkable in full by too few peers and the log stalled on it.
    """
    try:
        rec = decode_log_value(value)
    except MalformedError:
        return None
    if not isinstance(rec, Inclusion):
        return None
    return rec.job_id + rec.round.to_bytes(8, "big"), (-len(rec.updates), value)


def inclusion_proposable(value: bytes, sender: str | None, job_of: Callable[[bytes], JobSpec | None],
                         peer_id: str) -> bool:
    """Block-building policy for the log (``BftCore(proposable=...)``): may the validator
    ``peer_id`` put the training inclusion ``value``, gossiped to it by ``sender`` (None:
    submitted by ``peer_id`` itself), into a block it proposes? ``job_of(job_id)``: the
    committed :class:`JobSpec` of a job as this peer knows it (None: unknown here).

    A participant of the job checks every inclusion before it pools it (its aggregate must
    match), so it may propose any it pooled: True. A validator that is not a participant
    holds no updates and cannot check one (any inclusion within the stateless bounds is
    valid at it), so it takes only those gossiped by a participant of the job (values are
    not forwarded: the gossiping peer is the submitter): otherwise any peer could gossip an
    inclusion naming an update no participant can get, and every block of a
    non-participant proposer would carry it (the largest set is chosen) and get no
    participant's prevote until the round's inclusion committed elsewhere. Unknown job:
    False (its participants are unknown here). Any other value: True.
    PROTOCOL.md §14.6 and §17.4 step 3.
    """
    try:
        rec = decode_log_value(value)
    except MalformedError:
        return False
    if not isinstance(rec, Inclusion):
        return True
    job = job_of(rec.job_id)
    if job is None:
        return False
    return peer_id in job.participants or (sender is not None and sender in job.participants)


def is_training_value(value: bytes) -> bool:
    """True when ``value`` decodes as a training log value (for routing committed values)."""
    try:
        decode_log_value(value)
    except MalformedError:
        return False
    return True


def job_id_of(job_value: bytes) -> bytes:
    """SHA-256 of the committed ``fl_job`` value: the job's id."""
    return hashlib.sha256(job_value).digest()


# ---------------------------------------------------------------- wire messages


@record
class FlTensor:
    """One tensor as raw bytes: ``dtype`` ``"float32"``/``"float64"`` (little endian), C order."""

    name: Annotated[str, MaxLen(64)]
    dtype: Annotated[str, MaxLen(8)]
    shape: Annotated[tuple[Annotated[int, Range(0, 2**31)], ...], MaxItems(8)]
    data: Annotated[bytes, MaxLen(MAX_TENSOR_BYTES)]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        if len(self.data) != math.prod(self.shape) * DTYPES[self.dtype].itemsize:
            raise ValueError(f"tensor {self.name[:16]}: {len(self.data)} bytes do not match shape and dtype")


def tensors_from_params(params: Mapping[str, np.ndarray], spec: ModelSpec) -> tuple[FlTensor, ...]:
    """Wire tensors (name order) of ``params`` cast to the spec's dtypes.

    Raises:
        LocalProtocolError: a tensor is missing or not of the declared shape.
    """
    for t in spec.tensors:
        if t.name not in params or tuple(np.shape(params[t.name])) != t.shape:
            raise LocalProtocolError(f"tensor {t.name}: missing or not of shape {t.shape}")
    return tuple(FlTensor(name=t.name, dtype=t.dtype, shape=t.shape,
                          data=np.ascontiguousarray(params[t.name], dtype=DTYPES[t.dtype]).tobytes())
                 for t in spec.tensors)


def params_from_tensors(tensors: tuple[FlTensor, ...], spec: ModelSpec) -> dict[str, np.ndarray]:
    """Arrays from wire tensors; names, shapes and dtypes must be exactly the spec's.

    Raises:
        UpdateRejected: a mismatch (the byte count was already checked at decode).
    """
    if tuple(t.name for t in tensors) != spec.names:
        raise UpdateRejected(f"tensor names {[t.name[:16] for t in tensors][:8]} differ from the job's")
    out = {}
    for wire, want in zip(tensors, spec.tensors):
        if wire.dtype != want.dtype or tuple(wire.shape) != want.shape:
            raise UpdateRejected(f"tensor {want.name}: {wire.dtype}{tuple(wire.shape)}, "
                                 f"expected {want.dtype}{want.shape}")
        out[want.name] = np.frombuffer(wire.data, dtype=DTYPES[want.dtype]).reshape(want.shape).copy()
    return out


@message("fl_update", actor=TRAINING_ACTOR)
class FlUpdate:
    """A participant's signed model update for ``round`` (signature: see the module docstring).

    ``loss_before``/``loss_after``: local loss of the base / trained model on
    the sender's data; ``accuracy``: local accuracy after training (0..1).
    """

    job_id: Hash32
    round: RoundNo
    epoch: Epoch
    sender: PeerId
    tensors: Annotated[tuple[FlTensor, ...], MaxItems(64)]
    num_samples: Annotated[int, Range(1, 2**40)]
    loss_before: float = 0.0
    loss_after: float = 0.0
    accuracy: float = 0.0
    signature: Annotated[bytes, Len(64)]

    def describe(self) -> str:
        return (f"update r={self.round} {_h8(update_hash(self))} by {self.sender[:10]} "
                f"n={self.num_samples} loss {self.loss_before:.3f}->{self.loss_after:.3f}")


@message("fl_update_request", actor=TRAINING_ACTOR)
class FlUpdateRequest:
    """Ask for the updates of ``round`` with these hashes."""

    job_id: Hash32
    round: RoundNo
    hashes: Annotated[tuple[Hash32, ...], MaxItems(2 * MAX_PARTICIPANTS)]

    def describe(self) -> str:
        return f"update-request r={self.round} x{len(self.hashes)}"


@message("fl_model_request", actor=TRAINING_ACTOR)
class FlModelRequest:
    """Ask for the certified global model after ``round``."""

    job_id: Hash32
    round: RoundNo

    def describe(self) -> str:
        return f"model-request r={self.round}"


@message("fl_model", actor=TRAINING_ACTOR)
class FlModel:
    """The global model after ``round`` (verified by the receiver against the certified hash)."""

    job_id: Hash32
    round: RoundNo
    tensors: Annotated[tuple[FlTensor, ...], MaxItems(64)]

    def describe(self) -> str:
        return f"model r={self.round} {len(self.tensors)} tensors"


@message("fl_part", actor=TRAINING_ACTOR)
class FlPart:
    """Part ``index`` of ``count`` of the msgpack body of an ``fl_update`` or ``fl_model``
    (``kind``) too large for one envelope (over :data:`PART_BYTES`). ``digest`` is the
    update hash (``fl_update``) or the model hash (``fl_model``) of the whole; the receiver
    joins the parts in index order, decodes the body strictly and checks the digest."""

    job_id: Hash32
    round: RoundNo
    kind: Annotated[str, MaxLen(16)]
    digest: Hash32
    index: Annotated[int, Range(0, MAX_PARTS - 1)]
    count: Annotated[int, Range(2, MAX_PARTS)]
    data: Annotated[bytes, MaxLen(PART_BYTES)]

    def describe(self) -> str:
        return f"part {self.index + 1}/{self.count} of {self.kind} r={self.round} {_h8(self.digest)}"


_PART_KINDS: Mapping[str, type] = {"fl_update": FlUpdate, "fl_model": FlModel}


def in_parts(msg: FlUpdate | FlModel, digest: bytes) -> tuple[FlUpdate | FlModel | FlPart, ...]:
    """``msg`` itself when its body fits :data:`PART_BYTES`, else its body cut into :class:`FlPart`.

    ``digest``: the update hash or the model hash of ``msg``.
    """
    body = msgpack.packb(encode_fields(msg), use_bin_type=True)
    if len(body) <= PART_BYTES:
        return (msg,)
    chunks = [body[k:k + PART_BYTES] for k in range(0, len(body), PART_BYTES)]
    if len(chunks) > MAX_PARTS:
        raise LocalProtocolError(f"{type(msg).KIND} of {len(body)} bytes needs more than {MAX_PARTS} parts")
    return tuple(FlPart(job_id=msg.job_id, round=msg.round, kind=type(msg).KIND, digest=digest, index=k,
                        count=len(chunks), data=chunk) for k, chunk in enumerate(chunks))


def update_hash(update: FlUpdate) -> bytes:
    """SHA-256 of ``UPDATE_DOMAIN || msgpack(fields except signature)``: the update's identity."""
    body = encode_fields(update)
    body.pop("signature")
    return hashlib.sha256(UPDATE_DOMAIN + msgpack.packb(body, use_bin_type=True)).digest()


def local_seed(job: JobSpec, job_id: bytes, round_: int, peer_id: str) -> int:
    """Deterministic 32-bit training seed of ``peer_id`` in ``round_``."""
    raw = SEED_DOMAIN + job_id + round_.to_bytes(8, "big") + job.seed.to_bytes(8, "big") + peer_id.encode()
    return int.from_bytes(hashlib.sha256(raw).digest()[:4], "big")


# ---------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class ProposeValue:
    """Submit ``value`` to the replicated log (``BftCore.submit``)."""

    value: bytes

    def describe(self) -> str:
        try:
            return f"propose {decode_log_value(self.value).describe()}"
        except MalformedError:  # pragma: no cover - the core only proposes valid values
            return f"propose {len(self.value)} bytes"


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Send ``message`` to every participant of the job except ourselves."""

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
class TrainLocal:
    """Run local training from ``params`` (the round's base model) on this node's data,
    ``epochs`` passes at ``learning_rate`` with ``seed``; then call ``on_local_result``."""

    job_id: bytes
    round: int
    params: Mapping[str, np.ndarray]
    epochs: int
    learning_rate: float
    seed: int
    speculative: bool = False  # from our own aggregate of the previous round, before its certification

    def describe(self) -> str:
        return (f"train r={self.round} epochs={self.epochs} lr={self.learning_rate:g} seed={self.seed}"
                + (" (speculative)" if self.speculative else ""))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The certified global model after ``round``: write it atomically (and its SQLite
    record) before any later action. ``params``: name -> array (declared dtypes).
    ``next_epoch``: the epoch of round ``round + 1`` (where the log started it), None when
    ``round`` is the job's last; store it with the checkpoint, a restart needs it (the
    ``checkpoint`` argument of :class:`TrainingCore`)."""

    job_id: bytes
    round: int
    params: Mapping[str, np.ndarray]
    digest: bytes
    next_epoch: int | None = None

    def describe(self) -> str:
        return f"checkpoint r={self.round} {_h8(self.digest)}" + (
            "" if self.next_epoch is None else f" next epoch {self.next_epoch}")


@dataclass(frozen=True, slots=True)
class Observe:
    """A reputation observation about ``peer_id`` (feed ``LocalReputation.observe``)."""

    peer_id: str
    kind: ObservationKind

    def describe(self) -> str:
        return f"observe {self.kind.value} {self.peer_id[:10]}"


@dataclass(frozen=True, slots=True)
class Rejected:
    """Input from ``peer_id`` dropped for ``reason`` (a counted drop)."""

    peer_id: str
    reason: str
    detail: str = ""

    def describe(self) -> str:
        return f"rejected {self.reason} from {self.peer_id[:10]}"


@dataclass(frozen=True, slots=True)
class TrainingEvent:
    """``kind``: round_started | update_accepted | inclusion_committed | aggregated |
    round_committed | aggregate_mismatch | model_fetched | job_finished | local_failed |
    waiting_weight_table | sklearn_version_mismatch; ``detail``: one line (hashes shortened
    to 8 hex digits)."""

    kind: str
    round: int
    detail: str = ""

    def describe(self) -> str:
        return f"{self.kind} r={self.round}" + (f" {self.detail}" if self.detail else "")


Action = ProposeValue | Broadcast | Send | TrainLocal | Checkpoint | Observe | Rejected | TrainingEvent


# ------------------------------------------------------------------------- core


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    """Local pacing (may differ per node): ``fetch_interval_s`` between re-requests of
    missing updates or models (> 0); ``fetch_grace_s`` (>= 0) from the first sight of an
    uncommitted inclusion naming updates we lack to the first request for them (an update
    still on its way from its author would otherwise arrive twice).

    ``checked_log``: the log commits a value only after its validators checked it with
    :meth:`TrainingCore.validate_log_value` (the BFT log with the validity hook wired, as
    in the node). False for a log that commits whatever is proposed (the ideal-log
    simulator): then :meth:`TrainingCore.fast_path` is always False, so proposers confirm
    with their inclusions, as only confirmations certify.

    ``sklearn_version``: the scikit-learn version installed here (the driver's input, e.g.
    :func:`~chimera.consensus.aggregation.screen_library_version`), None when unknown. A job
    with ``detect_anomalies`` that records another version (any, when this is None) has
    aggregates this peer cannot reproduce: see :attr:`TrainingCore.checks_aggregates`."""

    fetch_interval_s: float = 1.0
    fetch_grace_s: float = 0.1
    checked_log: bool = True
    sklearn_version: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fetch_interval_s) and self.fetch_interval_s > 0):
            raise LocalProtocolError("fetch_interval_s must be finite and > 0")
        if not (math.isfinite(self.fetch_grace_s) and self.fetch_grace_s >= 0):
            raise LocalProtocolError("fetch_grace_s must be finite and >= 0")


class _Round:
    __slots__ = ("number", "epoch", "started_at", "deadline", "deadline_fired", "updates", "first_by_sender",
                 "raw", "inclusion", "aggregates", "checked", "proposed", "confirmed", "result", "mismatch",
                 "inclusion_epoch", "unverified", "votes", "certified",
                 "trained", "waiting", "wanted", "wanted_next", "wanted_asks")

    def __init__(self, number: int) -> None:
        self.number = number
        self.epoch: int | None = None  # set where the log starts the round (see TrainingCore._start_next)
        self.started_at: float | None = None
        self.deadline: float | None = None
        self.deadline_fired = False
        self.updates: dict[bytes, tuple[FlUpdate, dict[str, np.ndarray]]] = {}  # verified, valid
        self.first_by_sender: dict[str, bytes] = {}
        self.raw: dict[bytes, tuple[FlUpdate, str]] = {}  # received before the start: signature checked,
        #   the rest at the start; with the envelope sender (blamed then); at most
        #   MAX_EARLY_UPDATES_PER_SENDER per claimed sender
        self.inclusion: tuple[bytes, ...] | None = None
        self.inclusion_epoch = 0  # epoch of the block that committed ``inclusion``
        self.aggregates: dict[tuple[bytes, ...], AggregateResult] = {}  # our own sets -> our aggregate
        self.checked: dict[tuple[bytes, ...], tuple[bytes, bool]] = {}  # others' sets -> our aggregate's
        #   hash and whether the rule ran (bounded)
        self.proposed: set[tuple[bytes, ...]] = set()  # sets we proposed as the inclusion
        self.confirmed: set[tuple[bytes, ...]] = set()  # sets we confirmed with the inclusion
        self.result: AggregateResult | None = None
        self.mismatch = False
        self.unverified: list[tuple[AggregateConfirm, int]] = []  # committed confirms not yet checked,
        #   with the epoch of their block
        self.votes: dict[str, bytes] = {}  # voter -> aggregate hash (first valid confirm counts)
        self.certified: bytes | None = None
        self.trained = False
        self.waiting = False
        self.wanted: set[bytes] = set()  # updates named by an uncommitted inclusion, not held (bounded)
        self.wanted_next = math.inf  # time of the next request for ``wanted`` (inf: none due)
        self.wanted_asks = 0  # requests sent for ``wanted`` (rotates the peers asked)


class TrainingCore:
    """The round state machine of one peer for one job.

    Args:
        identity: our signing key (we train and confirm only if we are a participant).
        network_id: bound into update and confirm signatures.
        job: the committed :class:`JobSpec`; ``job_id`` its id (:func:`job_id_of`).
        tables: weight tables by epoch (reputation weights; more with :meth:`set_weight_table`).
        now: monotonic seconds.
        epoch: the epoch of the block that committed the job (0 … 2**62): round 1's epoch.
        config: local pacing.
        checkpoint: ``(round, params, next_epoch)`` of the last checkpoint written
            (resume; see :class:`Checkpoint`); the core then ignores log values of rounds
            up to it and starts round ``round + 1`` with the epoch ``next_epoch``.

    Attributes:
        checks_aggregates: whether this peer computes the job's aggregates itself: checks
            inclusions (:meth:`validate_log_value`), proposes them and confirms. False at a
            non-participant (it takes no updates: pushed ones are dropped, counted
            ``update_at_non_participant``; it follows the certified models), and where the
            job records a scikit-learn version for its anomaly screen (``JobSpec.sklearn_version``)
            other than ``config.sklearn_version`` (``version_mismatch``; counted
            ``sklearn_version_mismatch``, event ``sklearn_version_mismatch``): its screened
            aggregate would differ from the others' (PROTOCOL.md §17.7). Such a participant still
            trains and sends updates, answers "not yet" for the job's inclusions (counted
            ``inclusion_unchecked_sklearn_version``) and fetches every certified model.

    Raises:
        LocalProtocolError: ``job_id`` is not 32 bytes, an epoch is out of range, or a
            checkpoint before the job's last round has no ``next_epoch``.
    """

    def __init__(self, identity: SigningIdentity, network_id: bytes, job: JobSpec, job_id: bytes,
                 tables: Mapping[int, WeightTable], now: float, *, epoch: int,
                 config: TrainingConfig | None = None,
                 checkpoint: tuple[int, Mapping[str, np.ndarray], int | None] | None = None) -> None:
        if len(job_id) != 32:
            raise LocalProtocolError("job_id is 32 bytes")
        if checkpoint is not None and checkpoint[0] < job.rounds:
            epoch = checkpoint[2]
        if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
            raise LocalProtocolError(f"round epoch {epoch!r} is not an int in 0 … 2**62")
        self.identity = identity
        self.peer_id = identity.peer_id
        self.network_id = network_id
        self.job = job
        self.job_id = job_id
        self.config = config or TrainingConfig()
        self.spec = job.model_spec()
        self.aggregation = job.aggregation()
        self.participant = self.peer_id in job.participants
        self._participants = frozenset(job.participants)
        # the anomaly screen's IsolationForest is reproducible only with the scikit-learn version
        # the job records (PROTOCOL.md §17.7): with another one our aggregate hash would differ
        self.version_mismatch = bool(job.detect_anomalies and job.sklearn_version
                                     and job.sklearn_version != self.config.sklearn_version)
        # a non-participant holds no updates (they go to participants; it never asks for any): it
        # can neither check an inclusion nor know that participants can get the updates it names
        self.checks_aggregates = self.participant and not self.version_mismatch
        self.drops: Counter[str] = Counter()
        self._tables: dict[int, WeightTable] = dict(tables)
        self._actions: list[Action] = []
        self._rounds: dict[int, _Round] = {}
        self._certified: dict[int, bytes] = {0: aggregate_hash(self.spec.zeros(), self.spec)}
        self.model_round = 0
        self.model: dict[str, np.ndarray] = self.spec.zeros()
        if checkpoint is not None:
            round_, params, _ = checkpoint
            self.model = {k: np.array(v) for k, v in params.items()}
            self.model_round = round_
            self._certified[round_] = aggregate_hash(self.model, self.spec)
        self.finished = self.model_round >= job.rounds
        if self.participant and self.version_mismatch and not self.finished:
            self.drops["sklearn_version_mismatch"] += 1
            self._event("sklearn_version_mismatch", self.model_round + 1,
                        f"the job's anomaly screen needs scikit-learn {job.sklearn_version}, this peer runs "
                        f"{self.config.sklearn_version or 'an unknown version'}: it trains but neither checks, "
                        "confirms nor proposes aggregates (it takes the certified models from peers)")
        self._next_fetch = math.inf
        self._model_requested = 0
        self._model_asks = 0  # tries for the model of _model_requested (widens the peers asked, see _ask)
        self._model_waiters: dict[str, int] = {}  # peer -> round whose model it asked for before we had it
        # where an observer starts in the participant ring when it asks (spreads the load)
        self._ring_start = (job.participants.index(self.peer_id) + 1 if self.participant else
                            int.from_bytes(hashlib.sha256(self.peer_id.encode()).digest()[:4], "big")
                            % len(job.participants))
        # bodies arriving in fl_part messages: (sender, kind, digest) -> (round, count, {index: data})
        self._assemblies: dict[tuple[str, str, bytes], tuple[int, int, dict[int, bytes]]] = {}
        self._assembly_bytes = 0
        self._max_body_bytes = (sum(math.prod(t.shape) * DTYPES[t.dtype].itemsize for t in self.spec.tensors)
                                + (64 << 10))
        self._speculative: dict[int, bytes] = {}  # round -> base hash of our speculative fit of it
        self._early_results: dict[int, tuple] = {}  # round -> (params, fit, accuracy) before it began
        if not self.finished:
            self._rnd(self.model_round + 1).epoch = epoch
            self._progress(now)

    @classmethod
    def for_committed_job(cls, identity: SigningIdentity, network_id: bytes, job_value: bytes,
                          tables: Mapping[int, WeightTable], now: float, **kwargs: Any) -> "TrainingCore":
        """A core for the committed ``fl_job`` log value. Raises ``MalformedError`` if it is not one."""
        job = decode_log_value(job_value)
        if not isinstance(job, JobSpec):
            raise MalformedError("not an fl_job value")
        return cls(identity, network_id, job, job_id_of(job_value), tables, now, **kwargs)

    # ------------------------------------------------------------ inspection

    @property
    def round(self) -> int:
        """The round in progress (model_round + 1), or ``job.rounds`` when finished."""
        return min(self.model_round + 1, self.job.rounds)

    def certified_hash(self, round_: int) -> bytes | None:
        return self._certified.get(round_)

    def take_actions(self) -> list[Action]:
        """Actions since the last call, in the order they must run."""
        out, self._actions = self._actions, []
        return out

    def next_deadline(self) -> float:
        """Monotonic time at which :meth:`tick` must run next (``math.inf``: none)."""
        deadline = self._next_fetch
        rnd = self._rounds.get(self.model_round + 1)
        if rnd is not None and rnd.deadline is not None and not rnd.deadline_fired and not self.finished:
            deadline = min(deadline, rnd.deadline)
        if rnd is not None and rnd.inclusion is None and rnd.wanted:
            deadline = min(deadline, rnd.wanted_next)
        return deadline

    def set_weight_table(self, table: WeightTable, now: float) -> None:
        """Add the weight table of ``table.epoch`` (rounds naming it can now proceed)."""
        self._tables[table.epoch] = table
        for number in sorted(self._rounds):
            self._try_certify(self._rounds[number])
        self._progress(now)

    # ----------------------------------------------------------- log input

    def fast_path(self, epoch: int) -> bool:
        """Whether an inclusion committed in a block of ``epoch`` certifies its round by itself.

        True when the validators of ``epoch`` that are not participants of the job
        (they cannot check an aggregate: they hold no updates) have at most 1/3 of the
        epoch's weight. A block commits with the precommits of more than 2/3 of the
        weight; with byzantine weight under 1/3 (the log's assumption) more than
        1/3 - (non-participant weight) >= 0 of it is honest participants, who precommit
        an inclusion only after computing its aggregate themselves and finding
        ``aggregate_hash`` (Tendermint's valid(v) is checked before a precommit, see
        :meth:`validate_log_value`). False for an epoch whose table we do not know, and always
        without ``TrainingConfig.checked_log``.
        """
        table = self._tables.get(epoch)
        if table is None or not self.config.checked_log:
            return False
        outside = sum(w for p, w in table.weights.items() if p not in self._participants)
        return 3 * outside <= table.total

    def validate_log_value(self, value: bytes) -> bool | None:
        """Validity hook for ``BftCore(validate_value=...)`` on values of this job.

        False for: a malformed value; at every peer, an inclusion with fewer than
        ``quorum`` hashes or more than ``len(participants)``; at a participant, an
        inclusion of the current round (begun here) that

        * names two updates it holds of one sender (an equivocator's pair: the aggregate
          would drop one, so the hashes would overstate the senders; checked before any
          missing update is fetched),
        * or, once it holds every named update: names updates of fewer than
          ``min(quorum, participants with weight in the round's table)`` distinct
          senders with weight in the round's table (updates of senders without
          weight are allowed but count for nothing: the aggregate skips them),
        * or whose ``aggregate_hash`` is not our own aggregate of its updates,
        * or whose aggregate has an error (the rule could not run, e.g. anomaly screening
          left fewer updates than it needs; the result would be the old model, a wasted
          round), unless the set names an update of every participant with weight in the
          round's table (then no larger set can come and the round must not stall);

        and a confirm whose signature does not verify. None ("not yet", no fault
        of the sender): an inclusion a participant cannot check yet (it lacks one of
        the updates, the round has not begun here, or the round is ahead of our
        model), or cannot check at all (:attr:`checks_aggregates` is False: the job's
        anomaly screen needs another scikit-learn version than ours); the BFT core neither pools it nor prevotes a block holding it, and
        asks again later. Values of other jobs or of past rounds are True
        (harmless: ignored on commit); so is any inclusion at a non-participant,
        which holds no updates (see :meth:`fast_path`), past the stateless checks.
        """
        try:
            rec = decode_log_value(value)
        except MalformedError:
            return False
        if isinstance(rec, JobSpec) or rec.job_id != self.job_id:
            return True
        rnd = self._rounds.get(rec.round)
        if isinstance(rec, Inclusion):
            # stateless: fewer hashes than the quorum, or more than one per participant
            if not self.job.quorum <= len(rec.updates) <= len(self.job.participants):
                return False
            if not self.participant or rec.round <= self.model_round or rec.round > self.job.rounds \
                    or (rnd is not None and rnd.inclusion is not None):
                return True  # not checkable here, or ignored on commit
            if not self.checks_aggregates:  # another scikit-learn version: we cannot reproduce the
                #   screened aggregate, and a participant's prevote must mean it did (fast_path)
                self.drops["inclusion_unchecked_sklearn_version"] += 1
                return None
            if rec.round != self.model_round + 1 or rnd is None or rnd.started_at is None:
                return None
            held = [rnd.updates[h][0].sender for h in rec.updates if h in rnd.updates]
            if len(set(held)) < len(held):  # two updates of one sender: never valid, whatever else
                self.drops["inclusion_duplicate_sender"] += 1
                return False
            missing = [h for h in rec.updates if h not in rnd.updates]
            if missing:  # remembered for fetch_wanted (bounded: a bogus inclusion names any hashes)
                rnd.wanted.update(missing[:max(0, len(self.job.participants) - len(rnd.wanted))])
                return None
            table = self._round_table(rnd)
            counted = {s for s in held if s in table.weights}
            if len(counted) < min(self.job.quorum, len(table.weights)):
                self.drops["inclusion_below_quorum"] += 1
                return False
            checked = self._aggregate_hash_of(rnd, rec.updates)
            if checked is None:
                return None
            digest, ok = checked
            if digest != rec.aggregate_hash:
                return False
            if not ok and len(counted) < len(table.weights):  # the rule failed on a set that could grow
                self.drops["inclusion_aggregate_error"] += 1
                return False
            return True
        table = self._round_table(rnd)
        return table is None or self._confirm_ok(rec, table)

    def on_committed(self, value: bytes, now: float, *, epoch: int) -> None:
        """Feed one committed log value of this job (in log order; others are ignored).

        ``epoch``: the epoch of the block that committed it. Its weight table decides
        :meth:`fast_path`, and a round certified by this value starts the next round with
        this epoch (:meth:`_start_next`). A log without epochs passes its one epoch.
        """
        try:
            rec = decode_log_value(value)
        except MalformedError:
            self.drops["malformed_log_value"] += 1
            return
        if isinstance(rec, JobSpec) or rec.job_id != self.job_id:
            return
        if rec.round > self.job.rounds or rec.round <= self.model_round:
            self.drops["stale_log_value"] += 1
            return
        if isinstance(rec, Inclusion):
            self._on_inclusion(rec, now, epoch)
        else:
            self._on_confirm(rec, epoch)
        self._progress(now)

    # ------------------------------------------------------- messages input

    def on_message(self, sender: str, msg: object, now: float) -> None:
        """A verified envelope's message from ``sender`` (peer id). Bad input becomes a
        :class:`Rejected` action, never an exception."""
        try:
            if getattr(msg, "job_id", None) != self.job_id:
                raise RemoteProtocolError("message for another job", reason="unknown_job")
            if isinstance(msg, FlUpdate):
                self._on_update(sender, msg, now)
            elif isinstance(msg, FlUpdateRequest):
                self._on_update_request(sender, msg)
            elif isinstance(msg, FlModelRequest):
                self._on_model_request(sender, msg)
            elif isinstance(msg, FlModel):
                self._on_model(sender, msg, now)
            elif isinstance(msg, FlPart):
                self._on_part(sender, msg, now)
            else:
                raise LocalProtocolError(f"not a training message: {type(msg).__name__}")
        except RemoteProtocolError as exc:
            self._reject(sender, exc.reason, str(exc))
        self._progress(now)

    def on_local_result(self, job_id: bytes, round_: int, params: Mapping[str, np.ndarray], fit: FitResult,
                        now: float, accuracy: float = 0.0) -> None:
        """The result of a :class:`TrainLocal`: sign and broadcast our update.

        A result for a round no longer in progress, or with 0 samples, is
        dropped (event ``local_failed``).
        Raises:
            LocalProtocolError: ``params`` do not match the job's model spec.
        """
        rnd = self._rounds.get(round_)
        if job_id == self.job_id and round_ in self._speculative:
            base = self._speculative[round_]
            if round_ > self.model_round + 1 or rnd is None or rnd.started_at is None:
                self._early_results[round_] = (params, fit, accuracy)  # the round has not begun here
                return
            del self._speculative[round_]
            if base != self._certified.get(round_ - 1):  # trained from a model that was not certified
                self.drops["speculative_base_mismatch"] += 1
                self._train(rnd)
                self._progress(now)
                return
        if job_id != self.job_id or rnd is None or rnd.epoch is None or round_ != self.model_round + 1 \
                or self.peer_id in rnd.first_by_sender:
            self.drops["late_local_result"] += 1
            return
        self._send_local(rnd, params, fit, accuracy)
        self._progress(now)

    def _send_local(self, rnd: _Round, params: Mapping[str, np.ndarray], fit: FitResult,
                    accuracy: float) -> None:
        """Check, sign and broadcast our update of the round in progress ``rnd``."""
        round_ = rnd.number
        if fit.num_samples < 1:
            self._event("local_failed", round_, "no local samples")
            return
        try:
            tensors_from_params(params, self.spec)
        except LocalProtocolError as exc:
            raise LocalProtocolError(f"local result does not match the job's model: {exc}") from None
        try:  # the same checks every peer applies: an update others would reject is not sent
            validate_update(dict(params), self.spec, base=self.model, max_norm=self.job.max_update_norm)
        except UpdateRejected as exc:
            self._event("local_failed", round_, str(exc))
            return
        loss_before, loss_after = (v if math.isfinite(v) else 0.0 for v in (fit.loss_before, fit.loss_after))
        unsigned = FlUpdate(job_id=self.job_id, round=round_, epoch=rnd.epoch, sender=self.peer_id,
                            tensors=tensors_from_params(params, self.spec), num_samples=fit.num_samples,
                            loss_before=float(loss_before), loss_after=float(loss_after),
                            accuracy=float(accuracy) if math.isfinite(accuracy) else 0.0,
                            signature=bytes(64))
        digest = update_hash(unsigned)
        vote = sign_vote(self.identity, UPDATE_PURPOSE, self.network_id, rnd.epoch,
                         [self.job_id, round_, digest])
        update = dataclasses.replace(unsigned, signature=vote.signature)
        self._accept_update(rnd, update, digest, params_from_tensors(update.tensors, self.spec))
        self._actions.extend(Broadcast(m) for m in in_parts(update, digest))

    def on_local_failed(self, job_id: bytes, round_: int, reason: str, now: float) -> None:
        """Local training failed (e.g. no data): we just do not send an update this round.

        A speculative fit that failed is given up: the round trains from the certified
        model when it begins (or at once, when it has begun already)."""
        if job_id != self.job_id:
            return
        if self._speculative.pop(round_, None) is not None:
            rnd = self._rounds.get(round_)
            if rnd is not None and rnd.started_at is not None and round_ == self.model_round + 1:
                self._train(rnd)
                self._progress(now)
            return
        self._event("local_failed", round_, reason[:200])

    @property
    def wants_updates(self) -> bool:
        """True while an uncommitted inclusion of the current round names updates we lack
        (the driver's cue to call :meth:`fetch_wanted`)."""
        rnd = self._rounds.get(self.model_round + 1)
        return rnd is not None and rnd.inclusion is None and any(h not in rnd.updates for h in rnd.wanted)

    def fetch_wanted(self, now: float) -> None:
        """Ask for the updates that an inclusion of the current round names and we lack
        (:meth:`validate_log_value` answered "not yet" and remembered them), so that a peer
        that missed an update (it was down, or a message was lost) can check the inclusion
        before it commits and prevote it, rather than only fetch the updates after the commit.

        The first request leaves ``fetch_grace_s`` after the first call that finds updates
        missing (one still on its way, or arriving in parts, is not asked for), then one per
        ``fetch_interval_s`` while some are missing; each goes to
        :data:`UPDATE_FETCH_FANOUT` other participants, twice as many further ones at every
        retry (see :meth:`_ask`).
        At most ``len(participants)`` hashes are remembered per round. :meth:`tick` calls
        this too (:meth:`next_deadline` includes the next request)."""
        rnd = self._rounds.get(self.model_round + 1)
        if rnd is None or not rnd.wanted or rnd.inclusion is not None or rnd.started_at is None:
            return
        rnd.wanted -= rnd.updates.keys()
        if not rnd.wanted:
            rnd.wanted_next = math.inf
            return
        if rnd.wanted_next == math.inf:  # newly missing: a grace period first, then a first try
            rnd.wanted_next = now + self.config.fetch_grace_s
            rnd.wanted_asks = 0
        if now < rnd.wanted_next:
            return
        rnd.wanted_next = now + self.config.fetch_interval_s
        in_parts = {digest for _, kind, digest in self._assemblies if kind == FlUpdate.KIND}
        ask = tuple(sorted(rnd.wanted - in_parts))
        if ask:
            self._ask(FlUpdateRequest(job_id=self.job_id, round=rnd.number, hashes=ask), rnd.wanted_asks,
                      rnd.first_by_sender)
            rnd.wanted_asks += 1

    def _ask(self, request: FlUpdateRequest | FlModelRequest, asks: int, reached: Collection[str]) -> None:
        """Send the ``asks``-th try (0, 1, ...) of a fetch ``request`` to the next group of
        other participants: :data:`UPDATE_FETCH_FANOUT` of them at first, twice as many at
        each retry (2, 4, 8, ... but at most all), continuing around the ring. The ring:
        first those in ``reached`` (their update of the round reached us: their link to us
        works; the author of a missing update may be behind a link that lost it), each part in
        participant order after our own position (an observer's: from a hash of its peer id,
        so observers spread their requests). Every holder answers a request, so asking all at
        once would return that many copies (n² updates per round for a peer missing n); the
        widening keeps a retry under heavy loss from waiting on two lossy links again."""
        participants = self.job.participants
        start = self._ring_start
        ring = [p for p in participants[start:] + participants[:start] if p != self.peer_id]
        ordered = sorted(ring, key=lambda p: p not in reached)
        if not ordered:
            return
        widen = 1 << min(asks, 6)
        first = UPDATE_FETCH_FANOUT * (widen - 1)
        for k in range(min(UPDATE_FETCH_FANOUT * widen, len(ordered))):
            self._actions.append(Send(ordered[(first + k) % len(ordered)], request))

    def tick(self, now: float) -> None:
        """Run the timers due at ``now`` (round deadline, re-fetches)."""
        self.fetch_wanted(now)
        rnd = self._rounds.get(self.model_round + 1)
        if rnd is not None and rnd.deadline is not None and now >= rnd.deadline:
            rnd.deadline_fired = True
        if now >= self._next_fetch:
            self._next_fetch = math.inf
            self._refetch(now)
        self._progress(now)

    # ------------------------------------------------------------ internals

    def _rnd(self, number: int) -> _Round:
        rnd = self._rounds.get(number)
        if rnd is None:
            rnd = self._rounds[number] = _Round(number)
        return rnd

    def _event(self, kind: str, round_: int, detail: str = "") -> None:
        self._actions.append(TrainingEvent(kind, round_, detail))

    def _reject(self, sender: str, reason: str, detail: str = "") -> None:
        self.drops[reason] += 1
        self._actions.append(Rejected(sender, reason, detail[:200]))

    def _round_table(self, rnd: _Round | None) -> WeightTable | None:
        """The participants' weights in the round's epoch (None: not started, or table unknown)."""
        if rnd is None or rnd.epoch is None:
            return None
        table = self._tables.get(rnd.epoch)
        if table is None:
            return None
        weights = {p: table.weights[p] for p in self.job.participants if p in table.weights}
        if not weights:
            return None
        return WeightTable(epoch=table.epoch, weights=weights)

    def _begin(self, rnd: _Round, now: float) -> None:
        """Round ``rnd`` (the next one) has started in the log, we know its weight table, and
        our model is its base (the certified model of the previous round)."""
        rnd.started_at = now
        rnd.deadline = now + self.job.round_deadline_s
        self._event("round_started", rnd.number,
                    f"epoch {rnd.epoch} base {_h8(self._certified.get(rnd.number - 1))}")
        raw, rnd.raw = rnd.raw, {}
        for digest, (update, relayer) in sorted(raw.items(), key=lambda item: item[0]):
            try:
                self._check_update(rnd, update, digest)
            except RemoteProtocolError as exc:  # blamed on the peer that sent it to us
                self._reject(relayer, exc.reason, str(exc))
        if self.participant and not rnd.trained:
            rnd.trained = True
            base = self._speculative.get(rnd.number)
            if base is None:
                self._train(rnd)
            elif rnd.number in self._early_results:  # our speculative fit is done: use it or redo it
                del self._speculative[rnd.number]
                params, fit, accuracy = self._early_results.pop(rnd.number)
                if base == self._certified.get(rnd.number - 1):
                    self._send_local(rnd, params, fit, accuracy)
                else:
                    self.drops["speculative_base_mismatch"] += 1
                    self._train(rnd)
            # else: still running; on_local_result takes it (or trains again on a mismatch)

    def _train(self, rnd: _Round) -> None:
        """Train round ``rnd`` from the certified model we hold (it has begun here)."""
        self._actions.append(TrainLocal(self.job_id, rnd.number, {k: v.copy() for k, v in self.model.items()},
                                        self.job.local_epochs, self.job.learning_rate,
                                        local_seed(self.job, self.job_id, rnd.number, self.peer_id)))

    def _speculate(self, number: int, result: AggregateResult) -> None:
        """Start training round ``number`` from our own aggregate of round ``number - 1`` now,
        before that round is certified: aggregation is deterministic, so when the certified
        hash is ours (the normal case) the fit is exactly the one the round would run, and
        the update leaves only once the round has begun here from the certified model.
        Otherwise the fit is dropped and the round trains again. At most one per round."""
        if not self.participant or number > self.job.rounds or number in self._speculative \
                or number <= self.model_round + 1:
            return
        self._speculative[number] = result.digest
        self._actions.append(TrainLocal(self.job_id, number, {k: v.copy() for k, v in result.params.items()},
                                        self.job.local_epochs, self.job.learning_rate,
                                        local_seed(self.job, self.job_id, number, self.peer_id),
                                        speculative=True))

    def _on_inclusion(self, inc: Inclusion, now: float, epoch: int | None) -> None:
        """A committed inclusion: the first of its round committed after the round started
        counts if it names ``quorum`` … ``len(participants)`` hashes.

        This rule is over the log alone, as every commit-time rule must be: every peer,
        also one holding none of the updates (an observer, a peer catching up), must reach
        the same verdict at the same point of the log, and an update's sender is not in the
        log. Counting distinct weighted senders is the validity rule's job
        (:meth:`validate_log_value`): on the fast path a committed inclusion was found
        valid by a correct participant, so it names ``quorum`` distinct weighted senders and
        its aggregate has no error (or the set is complete)."""
        rnd = self._rnd(inc.round)
        if rnd.epoch is None or rnd.inclusion is not None:
            self.drops["inclusion_ignored"] += 1
            return
        if not self.job.quorum <= len(inc.updates) <= len(self.job.participants):
            self.drops["inclusion_below_quorum" if len(inc.updates) < self.job.quorum
                       else "inclusion_duplicate_sender"] += 1
            return
        rnd.inclusion = inc.updates
        rnd.inclusion_epoch = epoch
        self._event("inclusion_committed", inc.round, f"{len(inc.updates)} updates")
        if self.fast_path(epoch):  # checked by the commit's precommitters
            rnd.unverified.clear()
            self._certify(rnd, inc.aggregate_hash, epoch)
            return
        # confirms of this round committed before it (earlier in the block) count now, also
        # when this is not our current round (a peer catching up through the log)
        self._try_certify(rnd)

    def _confirm_ok(self, rec: AggregateConfirm, table: WeightTable) -> bool:
        return rec.signed.voter in table.weights and verify_vote(
            rec.signed, CONFIRM_PURPOSE, self.network_id, table.epoch, rec.statement())

    def _on_confirm(self, rec: AggregateConfirm, epoch: int) -> None:
        """Hold a committed confirm until it can be counted (:meth:`_try_certify`): at most
        :data:`MAX_HELD_CONFIRMS_PER_VOTER` per participant and round (later ones of that
        participant: ``confirm_overflow``), none of a voter that is no participant (it is not
        in the round table: ``bad_confirm``). A per-voter bound, not one for the round: 256
        confirms one participant committed before the inclusion made the round's bound drop
        every honest confirm after them, and the round never certified (PROTOCOL §17.4)."""
        rnd = self._rnd(rec.round)
        if rnd.certified is not None:
            return
        voter = rec.signed.voter
        if voter not in self._participants:
            self.drops["bad_confirm"] += 1
            return
        if voter in rnd.votes:
            return  # its first valid confirm counted already
        if sum(held.signed.voter == voter for held, _ in rnd.unverified) >= MAX_HELD_CONFIRMS_PER_VOTER:
            self.drops["confirm_overflow"] += 1
            return
        rnd.unverified.append((rec, epoch))
        self._try_certify(rnd)

    def _try_certify(self, rnd: _Round | None) -> None:
        """Count committed confirms (log order; a voter's first valid one counts) and certify
        the hash confirmed by more than 2/3 of the participants' weight. Log-only: every
        peer certifies the same hash for a round, whether or not it holds the model, at the
        same point of the log (the later of the inclusion and the confirm that passes 2/3,
        which may come first: held), so the next round starts with the same epoch everywhere,
        even where the round's weight table arrived late (:meth:`set_weight_table`)."""
        if rnd is None or rnd.certified is not None or not rnd.unverified or rnd.inclusion is None:
            return
        table = self._round_table(rnd)
        if table is None:
            return
        pending, rnd.unverified = rnd.unverified, []
        included = inclusion_hash(rnd.inclusion)
        for rec, epoch in pending:
            if rec.inclusion_hash != included:  # made for an inclusion that did not commit
                self.drops["confirm_other_inclusion"] += 1
                continue
            if rec.signed.voter in rnd.votes:
                continue
            if not self._confirm_ok(rec, table):
                self.drops["bad_confirm"] += 1
                continue
            rnd.votes[rec.signed.voter] = rec.aggregate_hash
            if table.passes([v for v, d in rnd.votes.items() if d == rec.aggregate_hash]):
                self._certify(rnd, rec.aggregate_hash, max(epoch, rnd.inclusion_epoch))
                return

    def _certify(self, rnd: _Round, digest: bytes, epoch: int) -> None:
        """Round ``rnd`` is certified with hash ``digest`` by a value committed in a block of
        ``epoch``; that point of the log also starts the next round (:meth:`_start_next`)."""
        rnd.certified = digest
        self._certified[rnd.number] = digest
        self._start_next(rnd.number, epoch)

    def _start_next(self, number: int, epoch: int) -> None:
        """Round ``number`` was certified by a value committed in a block of ``epoch``: round
        ``number + 1`` starts there, from the certified model, with the weight table of
        ``epoch`` (round 1 starts where the job commits, see :class:`TrainingCore`). No
        value starts a round, so no committed value can hold one back: with the explicit
        ``fl_start`` values of earlier drafts a byzantine proposer could commit starts
        naming bogus bases ahead of the honest one (all valid before the certification,
        nobody holding that aggregate yet), past what a peer held, and stall the job."""
        if number >= self.job.rounds:
            return
        nxt = self._rnd(number + 1)
        if nxt.epoch is None:
            nxt.epoch = epoch
            self._try_certify(nxt)

    def _on_update(self, sender: str, update: FlUpdate, now: float) -> None:
        """An update relayed by ``sender`` (its author or any other peer). Faults raise
        :class:`RemoteProtocolError`, blamed on ``sender`` (whoever sent us a bad signature
        or a wrong epoch is at fault: an honest relayer checks before it relays).

        Rounds: the current one is checked in full at once; one or two rounds ahead (not
        begun here yet) the update is kept, bounded, once its signature verifies (the peer id
        is the author's key and the update names its epoch, so this needs nothing the round's
        start brings) and its epoch is the round's where that is known; the rest (contents
        against the round's base) is checked at the start. Past rounds, and rounds beyond the
        job's last (a finished job keeps nothing), are counted drops; so is every update at a
        non-participant (``update_at_non_participant``: see :attr:`checks_aggregates`)."""
        if not self.participant:  # nobody sends us updates, nor do we ask for any: someone pushes
            #   them (only an inclusion of them could come of it, which participants may not be able
            #   to check: a private update only we got)
            self.drops["update_at_non_participant"] += 1
            return
        if update.sender not in self.job.participants:
            raise RemoteProtocolError(f"{update.sender[:10]} is not a participant", reason="not_participant")
        if update.round > self.job.rounds:
            raise RemoteProtocolError(f"update of round {update.round}, the job has {self.job.rounds}",
                                      reason="update_past_last_round")
        if update.round <= self.model_round or update.round > self.model_round + 2:
            self.drops["update_other_round"] += 1
            return
        digest = update_hash(update)
        rnd = self._rounds.get(update.round)
        if rnd is not None and (digest in rnd.updates or digest in rnd.raw):
            self.drops["duplicate_update"] += 1
            return
        if rnd is not None and rnd.started_at is not None:
            self._check_update(rnd, update, digest)
            return
        # not begun here yet: keep it (bounded) if it is genuine, check the rest at the start
        if rnd is not None and rnd.epoch is not None and update.epoch != rnd.epoch:
            raise RemoteProtocolError(f"update of epoch {update.epoch}, round epoch {rnd.epoch}",
                                      reason="wrong_epoch")
        self._verify_update_signature(update, digest)
        rnd = self._rnd(update.round)
        if sum(1 for u, _ in rnd.raw.values() if u.sender == update.sender) >= MAX_EARLY_UPDATES_PER_SENDER:
            self.drops["update_buffer_full"] += 1
            return
        rnd.raw[digest] = (update, sender)

    def _verify_update_signature(self, update: FlUpdate, digest: bytes) -> None:
        """Raises RemoteProtocolError (``bad_signature``) unless ``update.sender`` signed
        ``[job_id, round, digest]`` with purpose ``fl_update`` in ``update.epoch``."""
        vote = SignedVote(voter=update.sender, signature=update.signature)
        if not verify_vote(vote, UPDATE_PURPOSE, self.network_id, update.epoch,
                           [self.job_id, update.round, digest]):
            raise RemoteProtocolError(f"update signature of {update.sender[:10]} does not verify",
                                      reason="bad_signature")

    def _check_update(self, rnd: _Round, update: FlUpdate, digest: bytes) -> None:
        """Verify and validate an update of the started round ``rnd``; raises RemoteProtocolError."""
        if update.epoch != rnd.epoch:
            raise RemoteProtocolError(f"update of epoch {update.epoch}, round epoch {rnd.epoch}",
                                      reason="wrong_epoch")
        self._verify_update_signature(update, digest)
        try:
            params = params_from_tensors(update.tensors, self.spec)
            validate_update(params, self.spec, base=self.model, max_norm=self.job.max_update_norm)
        except UpdateRejected:
            self._actions.append(Observe(update.sender, ObservationKind.UPDATE_FLAGGED))
            raise
        self._accept_update(rnd, update, digest, params)

    def _accept_update(self, rnd: _Round, update: FlUpdate, digest: bytes, params: dict[str, np.ndarray]) -> None:
        first = rnd.first_by_sender.get(update.sender)
        if first is not None and first != digest:  # two signed updates for one round: equivocation
            self.drops["equivocation"] += 1
            if sum(1 for u, _ in rnd.updates.values() if u.sender == update.sender) >= 2:
                return  # keep at most two per sender (bounded memory)
            self._actions.append(Observe(update.sender, ObservationKind.EQUIVOCATION))
        rnd.updates[digest] = (update, params)
        rnd.first_by_sender.setdefault(update.sender, digest)
        self._event("update_accepted", rnd.number, f"{_h8(digest)} by {update.sender[:10]}")

    def _on_update_request(self, sender: str, req: FlUpdateRequest) -> None:
        rnd = self._rounds.get(req.round)
        if rnd is None:
            return
        for digest in req.hashes:
            held = rnd.updates.get(digest)
            if held is not None:
                self._actions.extend(Send(sender, m) for m in in_parts(held[0], digest))

    def _on_model_request(self, sender: str, req: FlModelRequest) -> None:
        """Answer with our model if it is the one of ``req.round``; a request for the round in
        progress here is remembered (at most ``2 * MAX_PARTICIPANTS`` peers) and answered when
        we adopt that round: a peer asks only 2 peers at a time (:meth:`_ask`), right after
        the commit that certified the round, and those may be a moment behind it."""
        if req.round == self.model_round:
            self._send_model(sender)
        elif req.round == self.model_round + 1 and not self.finished and (
                sender in self._model_waiters or len(self._model_waiters) < 2 * MAX_PARTICIPANTS):
            self._model_waiters[sender] = req.round
        else:
            self.drops["model_request_other_round"] += 1

    def _send_model(self, peer_id: str) -> None:
        model = FlModel(job_id=self.job_id, round=self.model_round, tensors=tensors_from_params(self.model, self.spec))
        self._actions.extend(Send(peer_id, m) for m in in_parts(model, self._certified[self.model_round]))

    def _drop_assembly(self, key: tuple[str, str, bytes]) -> None:
        held = self._assemblies.pop(key, None)
        if held is not None:
            self._assembly_bytes -= sum(len(d) for d in held[2].values())

    def _on_part(self, sender: str, part: FlPart, now: float) -> None:
        """Collect the parts of a large ``fl_update``/``fl_model``; the whole is handled like
        one that came in a single envelope. Bounded: a body no larger than the job's model
        needs, parts of at most :data:`MAX_ASSEMBLIES_PER_SENDER` bodies per sender, only for
        rounds an update or a fetched model would be taken for."""
        cls = _PART_KINDS.get(part.kind)
        if cls is None:
            raise RemoteProtocolError(f"unknown part kind {part.kind[:16]!r}", reason="bad_part")
        if part.index >= part.count or (part.count - 1) * PART_BYTES > self._max_body_bytes:
            raise RemoteProtocolError(f"part {part.index} of {part.count}: more than this job's model "
                                      "can need", reason="bad_part")
        if cls is FlUpdate and not self.participant:
            self.drops["update_at_non_participant"] += 1
            return
        if cls is FlUpdate and not self.model_round < part.round <= min(self.model_round + 2, self.job.rounds):
            self.drops["update_other_round"] += 1
            return
        if cls is FlModel and (part.round <= self.model_round or self._certified.get(part.round) != part.digest):
            self.drops["model_not_certified"] += 1
            return
        key = (sender, part.kind, part.digest)
        held = self._assemblies.get(key)
        if held is None:
            mine = [k for k in self._assemblies if k[0] == sender]
            if len(mine) >= MAX_ASSEMBLIES_PER_SENDER:
                self._drop_assembly(mine[0])  # the oldest of this sender's
                self.drops["part_assembly_evicted"] += 1
            held = self._assemblies[key] = (part.round, part.count, {})
        round_, count, parts = held
        if (part.round, part.count) != (round_, count):
            raise RemoteProtocolError("parts of one body disagree on round or count", reason="bad_part")
        if part.index in parts:
            self.drops["duplicate_part"] += 1
            return
        if part.index < count - 1 and len(part.data) != PART_BYTES:
            raise RemoteProtocolError("only the last part may be shorter", reason="bad_part")
        parts[part.index] = part.data
        self._assembly_bytes += len(part.data)
        if len(parts) < count:
            # all senders together buffer at most what (participants + 2) whole bodies need
            limit = (len(self.job.participants) + 2) * self._max_body_bytes
            while self._assembly_bytes > limit and self._assemblies:
                self._drop_assembly(next(iter(self._assemblies)))
                self.drops["part_assembly_evicted"] += 1
            return
        self._drop_assembly(key)
        body = b"".join(parts[k] for k in range(count))
        try:
            raw = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_reject_ext,
                                  object_pairs_hook=reject_duplicate_keys, max_bin_len=len(body),
                                  max_str_len=4096, max_array_len=65536, max_map_len=256)
        except MalformedError:
            raise
        except Exception as exc:  # msgpack raises a zoo
            raise MalformedError(f"{part.kind} from parts: not msgpack ({type(exc).__name__})") from None
        msg = decode_fields(cls, raw, part.kind)
        if msg.job_id != self.job_id or msg.round != part.round:
            raise RemoteProtocolError("parts name another job or round than their body", reason="bad_part")
        if cls is FlUpdate:
            if update_hash(msg) != part.digest:
                raise RemoteProtocolError("update from parts does not match its hash", reason="bad_part")
            self._on_update(sender, msg, now)
        else:
            self._on_model(sender, msg, now)

    def _on_model(self, sender: str, msg: FlModel, now: float) -> None:
        if msg.round <= self.model_round:
            self.drops["stale_model"] += 1
            return
        certified = self._certified.get(msg.round)
        if certified is None:
            self.drops["model_not_certified"] += 1
            return
        params = params_from_tensors(msg.tensors, self.spec)
        if aggregate_hash(params, self.spec) != certified:
            raise RemoteProtocolError(f"model of round {msg.round} does not match the certified hash",
                                      reason="bad_model")
        self._event("model_fetched", msg.round, f"{_h8(certified)} from {sender[:10]}")
        self._adopt(msg.round, params, certified)

    def _adopt(self, number: int, params: dict[str, np.ndarray], digest: bytes) -> None:
        """Round ``number`` is certified and we hold its model: checkpoint and move on."""
        self.model = params
        self.model_round = number
        self._next_fetch = math.inf
        nxt = self._rounds.get(number + 1)
        self._actions.append(Checkpoint(self.job_id, number, {k: v.copy() for k, v in params.items()}, digest,
                                        next_epoch=None if nxt is None else nxt.epoch))
        self._event("round_committed", number, _h8(digest))
        waiters, self._model_waiters = self._model_waiters, {}
        for peer_id, wanted in waiters.items():
            if wanted == number:
                self._send_model(peer_id)
        for old in [r for r in self._rounds if r <= number - 1]:
            del self._rounds[old]
        for old in [r for r in self._speculative if r <= number]:
            del self._speculative[old]
        for old in [r for r in self._early_results if r <= number]:
            del self._early_results[old]
        for key in [k for k, held in self._assemblies.items() if held[0] <= number]:
            self._drop_assembly(key)
        for old in [r for r in self._certified if r < number - 1]:
            del self._certified[old]
        if number >= self.job.rounds:
            self.finished = True
            for later in [r for r in self._rounds if r > number]:  # nothing of a later round is kept
                del self._rounds[later]
            self._speculative.clear()
            self._early_results.clear()
            for key in list(self._assemblies):
                self._drop_assembly(key)
            self._event("job_finished", number, _h8(digest))

    def _progress(self, now: float) -> None:
        """Advance the current round as far as the inputs allow (idempotent)."""
        while not self.finished:
            number = self.model_round + 1
            rnd = self._rounds.get(number)
            if rnd is None:
                return
            if rnd.epoch is not None and rnd.started_at is None:
                if self._round_table(rnd) is None:
                    if not rnd.waiting:
                        rnd.waiting = True  # announced once per round
                        self._event("waiting_weight_table", number, f"epoch {rnd.epoch}")
                    return
                self._begin(rnd, now)
            self._maybe_propose_inclusion(rnd, now)
            self._maybe_aggregate(rnd, now)
            self._try_certify(rnd)
            if rnd.certified is None:
                self._maybe_catch_up(now)
                return
            if rnd.result is not None and rnd.result.digest == rnd.certified:
                self._adopt(number, rnd.result.params, rnd.certified)
                continue
            if rnd.result is not None and not rnd.mismatch:
                rnd.mismatch = True
                self._event("aggregate_mismatch", number,
                            f"own {_h8(rnd.result.digest)} certified {_h8(rnd.certified)}")
            self._request_model(max(self._certified), now)
            return

    def _maybe_catch_up(self, now: float) -> None:
        """A round beyond the current one is certified (we were behind): fetch its model."""
        latest = max(self._certified)
        if latest > self.model_round + 1:
            self._request_model(latest, now)

    def _request_model(self, number: int, now: float) -> None:
        if self._next_fetch == math.inf or number > self._model_requested:
            if number > self._model_requested:  # a first try for this round
                self._model_asks = 0
            self._model_requested = number
            rnd = self._rounds.get(number)
            self._ask(FlModelRequest(job_id=self.job_id, round=number), self._model_asks,
                      () if rnd is None else rnd.first_by_sender)
            self._model_asks += 1
            self._next_fetch = now + self.config.fetch_interval_s

    def _maybe_propose_inclusion(self, rnd: _Round, now: float) -> None:
        """Propose the inclusion of the first update of each sender with weight in the round's
        table once we hold one of every such participant, or after the deadline once they
        are ``quorum`` distinct senders; never a set the rule fails on (``error``: we wait
        for more updates) unless it is complete, and each set larger than the last we
        proposed. What :meth:`validate_log_value` accepts, so an honest proposal is valid.
        Only where :attr:`checks_aggregates` holds: never at a non-participant (it could not
        know that participants can get the updates it names, e.g. one pushed only to it)."""
        if rnd.started_at is None or rnd.inclusion is not None or not self.checks_aggregates:
            return
        table = self._round_table(rnd)
        if table is None:  # pragma: no cover - a round begins only with its table
            return
        weighted = sorted(d for s, d in rnd.first_by_sender.items() if s in table.weights)
        complete = len(weighted) == len(table.weights)
        if len(weighted) < min(self.job.quorum, len(table.weights)) or not (complete or rnd.deadline_fired):
            return
        if len(weighted) < self.job.quorum:
            # fewer participants have weight in this epoch than the quorum (some lost it): the
            # log still counts quorum hashes, so name updates of participants without weight
            # too (the aggregate skips them); without them the round waits
            unweighted = sorted(d for s, d in rnd.first_by_sender.items() if s not in table.weights)
            if len(weighted) + len(unweighted) < self.job.quorum:
                return
            weighted += unweighted[:self.job.quorum - len(weighted)]
        chosen = tuple(sorted(weighted))
        if any(len(p) >= len(chosen) for p in rnd.proposed):
            return
        result = rnd.aggregates.get(chosen)
        if result is None:
            result = rnd.aggregates[chosen] = self._aggregate(rnd, chosen)
            if result.error is not None and not complete:
                self.drops["inclusion_aggregate_error"] += 1  # once per set: kept in rnd.aggregates
        if result.error is not None and not complete:
            return  # wait for more updates: a larger set may pass (or the set becomes complete)
        rnd.proposed.add(chosen)
        self._actions.append(ProposeValue(encode_log_value(Inclusion(
            job_id=self.job_id, round=rnd.number, updates=chosen, aggregate_hash=result.digest))))
        if not self.fast_path(max(self._tables)):
            # confirm it with the inclusion: if this set commits, the confirmations
            # ride in the same block (no second commit)
            rnd.confirmed.add(chosen)
            self._confirm(rnd, chosen, result)
        self._speculate(rnd.number + 1, result)

    def _maybe_aggregate(self, rnd: _Round, now: float) -> None:
        if rnd.inclusion is None or rnd.result is not None or rnd.started_at is None or not self.checks_aggregates:
            return  # (a peer that does not check aggregates takes the certified model: _progress)
        missing = [h for h in rnd.inclusion if h not in rnd.updates]
        if missing:
            # Only a participant whose confirmation may still be needed fetches updates; once
            # the round is certified (or at an observer, which never confirms) the certified
            # model is what it needs: one fetch of the model's size (_progress asks for it).
            if rnd.certified is None and self.participant and self._next_fetch == math.inf:
                self._ask(FlUpdateRequest(job_id=self.job_id, round=rnd.number, hashes=tuple(missing)),
                          rnd.wanted_asks, rnd.first_by_sender)
                rnd.wanted_asks += 1
                self._next_fetch = now + self.config.fetch_interval_s
            return
        result = rnd.aggregates.get(rnd.inclusion)
        if result is None:
            result = self._aggregate(rnd, rnd.inclusion)
        rnd.aggregates.clear()
        rnd.checked.clear()
        rnd.result = result
        for sender in result.senders_credited:  # see AggregateResult: Krum's choice, not its rejects
            self._actions.append(Observe(sender, ObservationKind.UPDATE_GOOD))
        for sender in result.senders_flagged:
            self._actions.append(Observe(sender, ObservationKind.UPDATE_FLAGGED))
        if result.error is not None:  # a complete set the rule fails on, or (off the fast path,
            #   where no correct participant need have checked it) a byzantine one: the base model
            self.drops["committed_inclusion_aggregate_error"] += 1
        detail = f"{_h8(result.digest)} used {len(result.used)} flagged {len(result.flagged)}" + (
            " (kept: excluding them would leave the rule too few)" if result.screen_skipped else "")
        self._event("aggregated", rnd.number, detail + (f" error: {result.error}" if result.error else ""))
        if rnd.certified is None and rnd.inclusion not in rnd.confirmed:
            self._confirm(rnd, rnd.inclusion, result)
        if rnd.inclusion not in rnd.proposed:  # else done when we proposed it
            self._speculate(rnd.number + 1, result)

    def _aggregate_hash_of(self, rnd: _Round, chosen: tuple[bytes, ...]) -> tuple[bytes, bool] | None:
        """The hash of our aggregate of the held updates ``chosen`` (to check an inclusion)
        and whether the rule ran (no ``error``), computed once per set; only these are kept
        for a set we did not propose (bounded memory whatever the model size).

        Once :data:`MAX_AGGREGATES_PER_ROUND` sets of the round were aggregated, a set is
        checked only if it is larger than every set aggregated so far (it displaces the
        smallest set we did not propose); else None ("not yet"). So the largest set, which
        every participant can check once it holds those updates, is always checkable: with
        a hard cap, peers whose budgets went to different smaller sets (each proposer's view
        at its deadline differs under loss) could never agree on any set. Each set past the
        cap is larger than the last and holds only held updates (at most two per
        participant), so fewer than ``2 * len(participants)`` get past it per round."""
        own = rnd.aggregates.get(chosen)
        if own is not None:
            return own.digest, own.error is None
        checked = rnd.checked.get(chosen)
        if checked is None:
            if len(rnd.aggregates) + len(rnd.checked) >= MAX_AGGREGATES_PER_ROUND:
                largest = max(map(len, itertools.chain(rnd.aggregates, rnd.checked)))
                if len(chosen) <= largest:
                    self.drops["aggregates_per_round_exceeded"] += 1
                    return None
                if rnd.checked:
                    del rnd.checked[min(rnd.checked, key=len)]
            result = self._aggregate(rnd, chosen)
            checked = rnd.checked[chosen] = (result.digest, result.error is None)
        return checked

    def _aggregate(self, rnd: _Round, chosen: tuple[bytes, ...]) -> AggregateResult:
        """The job's rule over the updates ``chosen`` (held, ascending hashes) on our model."""
        table = self._round_table(rnd)
        updates = []
        senders: set[str] = set()
        for digest in chosen:  # ascending: of an equivocator's updates the smallest hash counts
            update, params = rnd.updates[digest]
            if update.sender in senders or update.sender not in table.weights:
                continue
            senders.add(update.sender)
            updates.append(Update(sender=update.sender, params=params, num_samples=update.num_samples,
                                  weight=float(table.weights[update.sender]), digest=digest,
                                  loss_before=update.loss_before, loss_after=update.loss_after))
        return aggregate(updates, self.spec, self.aggregation, base=self.model)

    def _confirm(self, rnd: _Round, chosen: tuple[bytes, ...], result: AggregateResult) -> None:
        """Propose our signed confirm of ``result`` over ``chosen`` (participants with weight)."""
        table = self._round_table(rnd)
        if self.participant and self.peer_id in table.weights:
            included = inclusion_hash(chosen)
            statement = [self.job_id, rnd.number, included, result.digest]
            confirm = AggregateConfirm(job_id=self.job_id, round=rnd.number, inclusion_hash=included,
                                       aggregate_hash=result.digest,
                                       signed=sign_vote(self.identity, CONFIRM_PURPOSE, self.network_id,
                                                        table.epoch, statement))
            self._actions.append(ProposeValue(encode_log_value(confirm)))

    def _refetch(self, now: float) -> None:
        """Re-send the pending fetch (missing included updates, or a certified model)."""
        rnd = self._rounds.get(self.model_round + 1)
        if self.finished or rnd is None:
            return
        if rnd.certified is None and rnd.inclusion is not None and rnd.result is None:
            self._maybe_aggregate(rnd, now)
        elif rnd.certified is not None or max(self._certified) > self.model_round + 1:
            self._request_model(max(self._certified), now)
