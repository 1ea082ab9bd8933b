"""Federated training inside a node: drives :class:`~chimera.consensus.training.TrainingCore`.

One :class:`TrainingService` per node, loaded by :mod:`chimera.node.training`
on the first ``fl_*`` activity (so an idle peer never imports numpy or
scikit-learn). It

* creates a :class:`TrainingCore` for every committed ``fl_job`` (a participant
  trains; any other peer follows the job's certified rounds: status only);
* feeds every committed ``fl_*`` log value to the cores in log order (a
  :class:`~chimera.node.consensus.ConsensusService` commit hook; the ledger hands
  the values over in :attr:`~chimera.consensus.ledger.ApplyOutcome.app_values`)
  and is the ledger's ``app_validator`` (a correct peer prevotes an inclusion
  only when it holds the included updates: :meth:`TrainingCore.validate_log_value`);
* routes ``fl_*`` envelopes (actor ``"training"``) to the cores;
* runs :class:`TrainLocal` off the event loop (:func:`asyncio.to_thread`) on
  this node's own data (config ``training_data`` or ``training_digits_shard``);
* executes the cores' actions in order: broadcasts and sends as signed
  envelopes (bytes counted per job and round), log proposals through
  ``ConsensusService.submit``, checkpoints as atomic files (temp + fsync +
  ``os.replace``; ``.npz`` without pickle) plus a SQLite row **before** any later
  action, observations into the node's local reputation, events
  ``round_started`` / ``round_committed`` (and ``job_finished``,
  ``aggregate_mismatch``, ``model_fetched``, ``local_failed``);
* runs the cores' timers (round deadlines, re-fetches).

Restart: the latest checkpoint of each job is loaded (its digest checked; with
the epoch the log started the next round at, stored in its row) and every
committed ``fl_*`` value stored in the log is replayed in order; rounds
certified since are fetched from peers and verified against the certified hash.

scikit-learn is imported only when a job trains or evaluates (never by an idle
peer). An update or model larger than one 192 KiB part travels as ``fl_part``
messages (:func:`chimera.consensus.training.in_parts`); a job whose model fits
neither one envelope nor :data:`~chimera.consensus.training.MAX_PARTS` parts
(or whose parts do not fit this node's ``max_message_bytes``) is refused at
``train start`` and is not a valid log value here.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import io
import json
import logging
import math
import sqlite3
import time
import tomllib
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import msgpack
import numpy as np

from chimera.consensus.aggregation import AggregationConfig, aggregate_hash
from chimera.consensus.bft import value_hash
from chimera.consensus.ledger import app_value_ok, has_app_tag
from chimera.consensus.quorum import WeightTable
from chimera.consensus.training import (
    MAX_PARTICIPANTS,
    MAX_PARTS,
    PART_BYTES,
    TRAINING_ACTOR,
    Broadcast,
    Checkpoint,
    FlPart,
    FlUpdate,
    Inclusion,
    JobSpec,
    Observe,
    ProposeValue,
    Rejected,
    Send,
    TrainingConfig,
    TrainingCore,
    TrainingEvent,
    TrainLocal,
    decode_log_value,
    encode_log_value,
    inclusion_proposable,
    job_id_of,
)
from chimera.protocol.envelope import Envelope
from chimera.protocol.errors import LocalProtocolError, MalformedError, RemoteProtocolError
from chimera.protocol.messages import decode_fields, encode_fields

from . import admin as admin_api
from .actors import Actor, call_soon_once, wait_event
from .keys import atomic_write

log = logging.getLogger("chimera.training")

ENVELOPE_MARGIN_BYTES = 64 * 1024
"""Room kept in an envelope for everything of an update but its tensor bytes."""
CHECKPOINT_FILES_KEPT = 3
"""Checkpoint files kept per job (older rounds keep their SQLite row, not the file)."""
CHECKPOINT_RETRY_S = 30.0
"""Seconds between tries to write again a checkpoint whose write failed (the model is kept in memory)."""
CHECKPOINT_FAILURE_LOG_INTERVAL_S = 300.0
"""During one checkpoint outage, the first failure is logged as an error and then at most one
warning per this many seconds (each later round and retry fails too; all are counted)."""
EVENT_KINDS = {"round_started", "round_committed", "job_finished", "aggregate_mismatch", "model_fetched",
               "sklearn_version_mismatch",
               "local_failed", "waiting_weight_table"}
JOB_FIELDS = {"name", "model_kind", "n_features", "classes", "l2", "dataset", "rounds", "local_epochs",
              "learning_rate", "rule", "byzantine_f", "detect_anomalies", "participants", "quorum",
              "round_deadline_s", "max_update_norm", "seed", "sklearn_version"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fl_jobs (
    job_id BLOB PRIMARY KEY,
    height INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS fl_checkpoints (
    job_id BLOB NOT NULL,
    round INTEGER NOT NULL,
    digest BLOB NOT NULL,
    path TEXT NOT NULL,
    committed_ms INTEGER NOT NULL,
    accuracy REAL,
    loss REAL,
    round_s REAL,
    fit_s REAL,
    included INTEGER,
    bytes_sent INTEGER,
    next_epoch INTEGER,
    PRIMARY KEY (job_id, round)
);
"""


class TrainingDataError(Exception):
    """This node's training data is not configured or cannot be loaded (one clear line)."""


def installed_sklearn_version() -> str | None:
    """scikit-learn's version as installed (its package metadata: read without importing it),
    None when it is not installed. What the anomaly screen's results depend on (PROTOCOL.md §17.7)."""
    try:
        return importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------ data


def parse_split(text: str) -> tuple[str, float]:
    """``"iid"`` or ``"dirichlet:ALPHA"`` (ALPHA > 0) -> (kind, alpha).

    Raises:
        TrainingDataError: anything else.
    """
    text = text.strip().lower()
    if text == "iid":
        return "iid", 0.0
    kind, _, alpha = text.partition(":")
    try:
        value = float(alpha)
    except ValueError:
        value = -1.0
    if kind != "dirichlet" or not (math.isfinite(value) and value > 0):
        raise TrainingDataError(f"training_split {text!r}: use 'iid' or 'dirichlet:ALPHA' with ALPHA > 0")
    return "dirichlet", value


def parse_shard(text: str, genesis: tuple[str, ...], peer_id: str) -> tuple[int, int]:
    """``"k/n"`` (0 <= k < n) or ``"genesis"`` (k = our index among the sorted genesis validators).

    Raises:
        TrainingDataError: malformed, out of range, or ``genesis`` while we are not a genesis validator.
    """
    text = text.strip()
    if text == "genesis":
        ordered = sorted(genesis)
        if peer_id not in ordered:
            raise TrainingDataError("training_digits_shard = 'genesis' but this peer is not a genesis validator")
        return ordered.index(peer_id), len(ordered)
    k, sep, n = text.partition("/")
    try:
        index, count = int(k), int(n)
    except ValueError:
        index, count = -1, 0
    if not sep or not 0 <= index < count:
        raise TrainingDataError(f"training_digits_shard {text!r}: use 'k/n' with 0 <= k < n, or 'genesis'")
    return index, count


def load_node_data(config, genesis: tuple[str, ...], peer_id: str):
    """This node's ``(train, test)`` :class:`~chimera.consensus.datasets.Shard` pair.

    * ``training_digits_shard`` (``"k/n"`` or ``"genesis"``): shard ``k`` of ``n``
      of scikit-learn's ``load_digits`` training part (fixed stratified 20 %
      held-out test set, seed 0), split by ``training_split`` (``"iid"`` or
      ``"dirichlet:ALPHA"``) with ``training_split_seed``; the test set is the
      held-out part (identical on every peer).
    * else ``training_data`` (``.csv`` / ``.npz``, label column
      ``training_label_column``); the test set is ``training_test_data`` if set,
      else the training data itself.

    Raises:
        TrainingDataError: nothing configured, or the data cannot be loaded.
    """
    from chimera.consensus import datasets as ds

    from .datasets import DatasetError, load_dataset

    if config.training_digits_shard:
        index, count = parse_shard(config.training_digits_shard, genesis, peer_id)
        kind, alpha = parse_split(config.training_split)
        X, y = ds.load_digits_data()
        train, test = ds.train_test_split_fixed(X, y, 0.2, seed=0)
        try:
            shards = (ds.split_iid(train, count, seed=config.training_split_seed) if kind == "iid"
                      else ds.split_dirichlet(train, count, alpha=alpha, seed=config.training_split_seed))
        except LocalProtocolError as exc:
            raise TrainingDataError(f"digits split: {exc}") from None
        return shards[index], test
    if not config.training_data:
        raise TrainingDataError("this node has no training data: set training_data (CSV/NPZ file) or "
                                "training_digits_shard in its config")
    label = config.training_label_column or None
    try:
        train = load_dataset(Path(config.training_data).expanduser(), label)
        test = load_dataset(Path(config.training_test_data).expanduser(), label) \
            if config.training_test_data else train
    except DatasetError as exc:
        raise TrainingDataError(str(exc)) from None
    return train, test


def parse_poison(text: str) -> float | None:
    """TEST HOOK ``training_test_poison``: ``"sign_flip:S"`` -> S (send ``base - S * delta``)."""
    if not text:
        return None
    kind, _, scale = text.partition(":")
    try:
        value = float(scale or "1")
    except ValueError:
        value = math.nan
    if kind != "sign_flip" or not (math.isfinite(value) and value > 0):
        raise TrainingDataError(f"training_test_poison {text!r}: use 'sign_flip:SCALE'")
    return value


def param_bytes(job: JobSpec) -> int:
    """Bytes of the job's model parameters (what one update carries as raw tensors).

    Computed from the spec, never by building the model: a job's ``n_features`` and
    ``classes`` come from a peer or an admin, and the model's arrays are allocated
    only once the job is known to fit (:func:`_params_fit`). The shapes are those of
    :mod:`chimera.consensus.models` (float64 ``coef`` and ``intercept``).

    Raises:
        LocalProtocolError: ``n_features`` is not an int >= 1, or a classifier has < 2 classes.
    """
    if type(job.n_features) is not int or job.n_features < 1:
        raise LocalProtocolError("n_features must be an int >= 1")
    if job.model_kind == "sgd_classifier":  # (k, n_features) and (k,), k = 1 for two classes
        distinct = len(set(job.classes))
        if distinct < 2:
            raise LocalProtocolError("a classifier needs at least two classes")
        k = 1 if distinct == 2 else distinct
        return 8 * k * (job.n_features + 1)
    if job.model_kind == "sgd_regressor":  # (n_features,) and (1,)
        return 8 * (job.n_features + 1)
    return sum(t.nbytes for t in job.model_spec().tensors)  # a kind without a formula here


def _params_fit(job: JobSpec, max_message_bytes: int) -> tuple[bool, int]:
    """Whether this node can send and receive the job's updates: in one envelope, or in
    ``fl_part`` messages of ``PART_BYTES`` (each an envelope of its own); and the size."""
    try:
        size = param_bytes(job)
    except (LocalProtocolError, TypeError, ValueError):
        return False, 0
    whole = size + ENVELOPE_MARGIN_BYTES <= max_message_bytes
    parts = PART_BYTES + ENVELOPE_MARGIN_BYTES <= max_message_bytes and \
        size + ENVELOPE_MARGIN_BYTES <= MAX_PARTS * PART_BYTES
    return whole or parts, size


def check_class_labels(job: JobSpec, y: np.ndarray, what: str) -> None:
    """A classifier job's labels must be the job's integer class ids; say which row is not.

    The data loader keeps non-integral labels (a regressor's targets); only a
    classifier job knows they are wrong.

    Raises:
        LocalProtocolError: a label of ``y`` (``what``: "training data", "test data") is not an
            integer, or not one of ``job.classes``.
    """
    if job.model_kind != "sgd_classifier":
        return
    y = np.asarray(y)
    if y.dtype.kind == "f":
        fractional = np.flatnonzero(y != np.round(y))
        if fractional.size:
            row = int(fractional[0])
            raise LocalProtocolError(f"{what}: label of row {row} is {float(y[row]):g}, not an integer class id "
                                     f"(a classifier job needs one of its classes {_classes_text(job)})")
    outside = np.flatnonzero(~np.isin(y, np.array(sorted(set(job.classes)), dtype=np.int64)))
    if outside.size:
        row = int(outside[0])
        raise LocalProtocolError(f"{what}: label of row {row} is {y[row].item()!r}, not one of the job's classes "
                                 f"{_classes_text(job)}")


def _classes_text(job: JobSpec) -> str:
    classes = sorted(set(job.classes))
    return str(classes) if len(classes) <= 12 else f"[{classes[0]} .. {classes[-1]}] ({len(classes)} ids)"


# ------------------------------------------------------------------ files


def npz_bytes(params: Mapping[str, np.ndarray]) -> bytes:
    """``params`` (name -> array) as the bytes of a NumPy ``.npz`` archive (no pickle)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.ascontiguousarray(v) for k, v in params.items()})
    return buffer.getvalue()


def write_npz_atomic(path: Path, params: Mapping[str, np.ndarray]) -> None:
    """Write ``params`` as ``.npz`` atomically (:func:`chimera.node.keys.atomic_write`: temp file,
    fsync, rename, fsync dir)."""
    atomic_write(path, npz_bytes(params), mode=0o600)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` written by :func:`write_npz_atomic` (``allow_pickle=False``).

    Raises:
        OSError: unreadable. ValueError: not an npz, or a damaged one (truncated, bad
            compressed data: ``np.load`` raises zipfile/zlib errors for those, turned into this).
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise ValueError(f"{path}: damaged .npz ({str(exc)[:120]})") from None


# ------------------------------------------------------------------ state


@dataclass
class RoundInfo:
    """What this node saw of one round (monotonic seconds; ``None``: not yet). ``saved``: its
    checkpoint file is on disk (False: the write failed; the round is listed all the same)."""

    started_mono: float | None = None
    round_s: float | None = None
    fit_s: float | None = None
    included: int | None = None
    bytes_sent: int = 0
    digest: str | None = None
    committed_ms: int | None = None
    accuracy: float | None = None
    loss: float | None = None
    saved: bool = True

    def doc(self, number: int) -> dict:
        return {"round": number, "digest": self.digest, "accuracy": self.accuracy, "loss": self.loss,
                "participants": self.included, "round_s": self.round_s, "fit_s": self.fit_s,
                "bytes_sent": self.bytes_sent, "committed_ms": self.committed_ms, "saved": self.saved}


@dataclass
class JobState:
    job: JobSpec
    job_id: bytes
    value: bytes
    height: int
    core: TrainingCore
    rounds: dict[int, RoundInfo] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    last_error: str | None = None
    pending: list = field(default_factory=list)  # actions left by the restart replay
    checkpoint_task: asyncio.Task | None = None  # the newest checkpoint write (they run in round order)
    unsaved: Checkpoint | None = None  # the newest certified model whose checkpoint write failed (kept
    #   in memory: export serves it, a retry writes it; a later round's checkpoint supersedes it)
    checkpoint_error: str | None = None  # why the last checkpoint write failed (None once one succeeds)
    checkpoint_failures: int = 0  # failed checkpoint writes of this job (retries included)
    checkpoint_logged_s: float = -math.inf  # time.monotonic() of the last log line about a failed write
    checkpoint_failures_logged: int = 0  # checkpoint_failures at that line
    retry_at: float = math.inf  # monotonic time of the next try to write ``unsaved``

    def checkpoint_doc(self) -> dict:
        """``train_status``'s ``checkpoint``: ``state`` ``ok`` or ``failing`` (the newest certified
        model, round ``unsaved_round``, is only in memory; retried every ``CHECKPOINT_RETRY_S``)."""
        return {"state": "ok" if self.unsaved is None else "failing",
                "unsaved_round": None if self.unsaved is None else self.unsaved.round,
                "failures": self.checkpoint_failures, "error": self.checkpoint_error}

    def info(self, number: int) -> RoundInfo:
        rnd = self.rounds.get(number)
        if rnd is None:
            rnd = self.rounds[number] = RoundInfo()
        return rnd


class TrainingActor(Actor):
    name = TRAINING_ACTOR

    def __init__(self, service: "TrainingService") -> None:
        self.service = service

    async def handle(self, item: object) -> None:
        if isinstance(item, Envelope):
            self.service.on_envelope(item)


class TrainingService:
    """The training part of one node (needs the node's :class:`ConsensusService`)."""

    def __init__(self, node, replay_until: int) -> None:
        self.node = node
        self.consensus = node.consensus
        self.store = node.store
        self.counters: Counter = node.counters
        self.jobs: dict[bytes, JobState] = {}
        self._fetch_soon: set[bytes] = set()  # job ids with a fetch_wanted due (call_soon_once)
        self.refused: set[bytes] = set()  # committed jobs we participate in but cannot run (too large here)
        self.root = node.data_dir / "training"
        self._wake = asyncio.Event()
        self._data = None  # (train, test) once loaded
        self._data_error: str | None = None  # why the last load failed (cleared by a good load)
        self._preparing = False
        self._data_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.poison = parse_poison(node.config.training_test_poison)
        self.sklearn_version = installed_sklearn_version()  # passed to the cores; recorded in screened jobs
        self.drop_updates_from = node.config.training_test_drop_updates_from  # TEST HOOK
        self.store.db.executescript(_SCHEMA)
        columns = {row[1] for row in self.store.db.execute("PRAGMA table_info(fl_checkpoints)")}
        if "next_epoch" not in columns:  # a store written before rounds started by rule
            self.store.db.execute("ALTER TABLE fl_checkpoints ADD COLUMN next_epoch INTEGER")
        self._replay(replay_until)

    # ------------------------------------------------------------ helpers

    def _tables(self) -> dict[int, WeightTable]:
        from .consensus import GENESIS_WEIGHT

        tables = {0: WeightTable(epoch=0, weights={p: GENESIS_WEIGHT for p in self.node.network.genesis})}
        for epoch, _, blob in self.store.epoch_tables():
            tables[epoch] = WeightTable(epoch=epoch, weights=dict(msgpack.unpackb(blob, raw=False)))
        return tables

    def _checkpoint_of(self, job_id: bytes, job: JobSpec) -> tuple[int, dict[str, np.ndarray], int | None] | None:
        """The latest readable checkpoint whose file matches its recorded digest, as
        ``(round, params, next round's epoch)`` (the ``checkpoint`` of :class:`TrainingCore`).
        A row without the next round's epoch (written by a release before rounds started by
        rule) is skipped: the log replay re-derives everything from an older one or round 0."""
        spec = job.model_spec()
        rows = self.store.db.execute("SELECT round, digest, path, next_epoch FROM fl_checkpoints WHERE job_id=? "
                                     "AND path != '' ORDER BY round DESC LIMIT ?",  # '': the write failed
                                     (job_id, CHECKPOINT_FILES_KEPT)).fetchall()
        for number, digest, path, next_epoch in rows:
            if next_epoch is None and number < job.rounds:
                self.counters["training_checkpoint_without_epoch"] += 1
                continue
            try:
                params = read_npz(Path(path))
                if aggregate_hash(params, spec) == bytes(digest):
                    return int(number), params, next_epoch
            except (OSError, ValueError, TypeError, LocalProtocolError, RemoteProtocolError, KeyError):
                pass  # unreadable, or tensors of other names, shapes or dtypes (UpdateRejected)
            self.counters["training_checkpoint_unusable"] += 1
            log.warning("checkpoint %s of job %s round %d unusable; trying an older one", path,
                        job_id.hex()[:16], number)
        return None

    # ------------------------------------------------------------ validity

    def validate_value(self, value: bytes) -> bool | None:
        """The ledger's ``app_validator`` for ``fl_*`` values (already strictly decoded and canonical).

        None means "not yet" (an inclusion naming an update this peer has not received).

        An ``fl_job`` is valid when its update fits in one envelope; a value of
        a job we run is checked by its core (an inclusion only when we hold its
        updates and agree with its aggregate hash, if we participate); values of
        unknown jobs pass (we may be behind; they are ignored on commit unless
        their job is committed first), except the inclusions of a committed job
        we participate in but refused (None: we cannot check them).
        """
        try:
            rec = decode_log_value(value)
        except MalformedError:
            return False
        if isinstance(rec, JobSpec):
            return _params_fit(rec, self.node.config.max_message_bytes)[0]
        state = self.jobs.get(rec.job_id)
        if state is None:
            # A committed job we participate in but cannot run: its inclusions are never valid
            # here, since we cannot check their aggregate (a committed inclusion may certify its
            # round on the strength of the participants' checks, TrainingCore.fast_path).
            return None if isinstance(rec, Inclusion) and rec.job_id in self.refused else True
        core = state.core
        # (at a non-participant the core's stateless bounds only: quorum ... len(participants)
        # hashes, as at every peer; a wider check here let this peer pool, and choose for its
        # blocks as the largest set, an inclusion every participant refuses)
        ok = core.validate_log_value(value)
        if ok is None and core.wants_updates:
            # ask for the missing updates after the consensus step that asked us (its actions
            # first); without a loop (tests driving the service) the commit fetches them
            call_soon_once(self._fetch_soon, rec.job_id, lambda: self._fetch_wanted(state))
        return ok

    def proposable(self, value: bytes, sender: str | None) -> bool:
        """Block-building policy for an inclusion we found valid
        (:func:`~chimera.consensus.training.inclusion_proposable`): a job we do not take part
        in contributes only inclusions a participant gossiped to our blocks."""
        return inclusion_proposable(value, sender, self._job_of, self.node.peer_id)

    def _job_of(self, job_id: bytes) -> JobSpec | None:
        state = self.jobs.get(job_id)
        return None if state is None else state.job

    def _fetch_wanted(self, state: JobState) -> None:
        state.core.fetch_wanted(time.monotonic())
        self.run_actions(state)

    # ------------------------------------------------------------ log input

    def _replay(self, last: int) -> None:
        """Feed the ``fl_*`` values of the stored log up to height ``last`` to fresh cores
        (from their checkpoints): a restart, or the first load of the service."""
        from .consensus import _unpack_commit

        row = self.store.db.execute("SELECT MIN(height) FROM fl_jobs").fetchone()
        height = int(row[0]) if row and row[0] is not None else 1
        seen: set[bytes] = set()
        now = time.monotonic()
        count = 0
        while height <= last:
            blobs = self.store.commit_blobs(height, 256)
            if not blobs:
                break
            for blob in blobs:
                if height > last:  # stored already, but the commit hook delivers it
                    break
                try:
                    commit = _unpack_commit(blob)
                except (MalformedError, ValueError):
                    self.counters["training_replay_corrupt"] += 1
                    height += 1
                    continue
                for value in commit.block.values:
                    if has_app_tag(value) and app_value_ok(value):
                        seen.add(value_hash(value))
                        self._apply_value(height, value, now, replay=True, epoch=commit.block.epoch)
                        count += 1
                height += 1
        if count:
            log.info("training: replayed %d committed fl values (%d jobs)", count, len(self.jobs))
        for state in self.jobs.values():  # a value we see committed is not proposed again
            actions = [a for a in state.core.take_actions()
                       if not (isinstance(a, ProposeValue) and value_hash(a.value) in seen)]
            state.pending = actions  # run once the loop runs (run_timer)

    def on_commit(self, height: int, outcome) -> None:
        """ConsensusService commit hook: the block's ``fl_*`` values in order, then a new weight table."""
        now = time.monotonic()
        try:
            for value in outcome.app_values:
                self._apply_value(height, value, now, epoch=outcome.epoch)
            if outcome.new_table is not None:
                for state in self.jobs.values():
                    state.core.set_weight_table(outcome.new_table, now)
            self.run_all()
        except Exception:  # never let training break the consensus driver
            self.counters["training_commit_errors"] += 1
            log.exception("training: commit hook failed at height %d", height)

    def _apply_value(self, height: int, value: bytes, now: float, *, epoch: int, replay: bool = False) -> None:
        """One committed ``fl_*`` value of the block at ``height`` of ``epoch``."""
        try:
            rec = decode_log_value(value)
        except MalformedError:
            self.counters["training_values_malformed"] += 1
            return
        self.counters["training_values_committed"] += 1
        if isinstance(rec, JobSpec):
            self._on_job(height, value, rec, now, replay, epoch)
            return
        state = self.jobs.get(rec.job_id)
        if state is None:
            self.counters["training_values_unknown_job"] += 1
            return
        if isinstance(rec, Inclusion) and rec.round > state.core.model_round:
            info = state.info(rec.round)
            if info.included is None:
                info.included = len(rec.updates)
        state.core.on_committed(value, now, epoch=epoch)

    def _on_job(self, height: int, value: bytes, job: JobSpec, now: float, replay: bool, epoch: int) -> None:
        job_id = job_id_of(value)
        if job_id in self.jobs:
            self.counters["training_duplicate_job"] += 1
            return
        ok, _ = _params_fit(job, self.node.config.max_message_bytes)
        if not ok:
            if self.node.peer_id in job.participants:
                self.refused.add(job_id)
            self.counters["training_job_too_large"] += 1
            log.warning("job %s committed but its update does not fit in one envelope here; ignored", job.name)
            return
        self.store.db.execute("INSERT OR IGNORE INTO fl_jobs(job_id, height, value) VALUES(?,?,?)",
                              (job_id, height, value))
        checkpoint = self._checkpoint_of(job_id, job)
        if checkpoint is not None:
            self.counters["training_resumed_from_checkpoint"] += 1
        core = TrainingCore(self.node.identity, self.node.network.network_id, job, job_id, self._tables(), now,
                            epoch=epoch, checkpoint=checkpoint,
                            config=TrainingConfig(fetch_interval_s=self.node.config.training_fetch_interval_s,
                                                  sklearn_version=self.sklearn_version))
        state = JobState(job=job, job_id=job_id, value=value, height=height, core=core)
        for number, digest, path, committed_ms, acc, loss, round_s, fit_s, included, sent in self.store.db.execute(
                "SELECT round, digest, path, committed_ms, accuracy, loss, round_s, fit_s, included, bytes_sent "
                "FROM fl_checkpoints WHERE job_id=? ORDER BY round", (job_id,)):
            state.rounds[int(number)] = RoundInfo(round_s=round_s, fit_s=fit_s, included=included,
                                                  bytes_sent=sent or 0, digest=bytes(digest).hex(),
                                                  committed_ms=committed_ms, accuracy=acc, loss=loss,
                                                  saved=bool(path))
        self.jobs[job_id] = state
        log.info("training job %s (%s) committed at height %d: %s%s", job.name, job_id.hex()[:16], height,
                 job.describe(), f", resuming after round {checkpoint[0]}" if checkpoint else "")
        if not replay:
            self.node.emit_event("job_committed", self.node.peer_id, job=job_id.hex()[:16], name=job.name,
                                 participant=core.participant)

    # ------------------------------------------------------------ messages

    def on_envelope(self, env: Envelope) -> None:
        msg = env.message
        if env.sender == self.drop_updates_from and (
                isinstance(msg, FlUpdate) or (isinstance(msg, FlPart) and msg.kind == "fl_update")):
            # TEST HOOK: as if lost on the way, so counted also when the job has not committed here yet
            self.counters["training_test_dropped_updates"] += 1
            return
        state = self.jobs.get(getattr(msg, "job_id", b""))
        if state is None:
            self.node.drops.record("training_unknown_job", env.sender, env.kind, time.monotonic())
            return
        self.counters[f"training_received.{env.kind}"] += 1
        state.core.on_message(env.sender, msg, time.monotonic())
        self.run_actions(state)

    # ------------------------------------------------------------ actions

    def run_all(self) -> None:
        for state in list(self.jobs.values()):
            self.run_actions(state)

    def run_actions(self, state: JobState) -> None:
        actions, state.pending = state.pending + state.core.take_actions(), []
        for action in actions:
            try:
                self._run(state, action)
            except (LocalProtocolError, OSError, ValueError) as exc:
                self.counters["training_action_errors"] += 1
                state.last_error = f"{type(action).__name__}: {exc}"
                log.error("training action %s failed: %s", type(action).__name__, exc)
        self.consensus.recheck_soon()  # an update that arrived may decide a waiting proposal
        self._wake.set()

    def _run(self, state: JobState, action: object) -> None:
        if isinstance(action, ProposeValue):
            if not self.consensus.submit(action.value):
                self.counters["training_proposals_refused"] += 1
        elif isinstance(action, Broadcast):
            for peer_id in state.job.participants:
                if peer_id != self.node.peer_id:
                    self._send(state, peer_id, action.message)
        elif isinstance(action, Send):
            self._send(state, action.peer_id, action.message)
        elif isinstance(action, TrainLocal):
            self._spawn(self._train(state, action))
        elif isinstance(action, Checkpoint):
            self._checkpoint(state, action)
        elif isinstance(action, Observe):
            self.consensus.reputation.observe(action.peer_id, action.kind, time.monotonic())
        elif isinstance(action, Rejected):
            self.counters[f"training_rejected.{action.reason}"] += 1
            self.node.drops.record(f"training_{action.reason}", action.peer_id, action.detail, time.monotonic())
        elif isinstance(action, TrainingEvent):
            self._on_event(state, action)

    def _send(self, state: JobState, peer_id: str, msg: object) -> None:
        """Sign and send like ``Node.send``, counting the envelope bytes per job and round."""
        node = self.node
        contact = node.routes.get(peer_id)
        if contact is None or not contact.addresses:
            self.counters["drop_unroutable"] += 1
            return
        frame = node._seal(msg, peer_id)
        if node.transport.send(contact.transport_key, contact.addresses[0], frame):
            self.counters["training_bytes_sent"] += len(frame)
            self.counters[f"training_sent.{type(msg).KIND}"] += 1
            number = getattr(msg, "round", None)
            if number is not None:
                state.info(number).bytes_sent += len(frame)

    def _on_event(self, state: JobState, event: TrainingEvent) -> None:
        now = time.monotonic()
        self.counters[f"training_events.{event.kind}"] += 1
        state.events.append(f"{time.time_ns() // 1_000_000} {event.describe()}")
        del state.events[:-50]
        info = state.info(event.round)
        if event.kind == "round_started":
            info.started_mono = now
        elif event.kind == "round_committed" and info.started_mono is not None and info.round_s is None:
            info.round_s = now - info.started_mono
        if event.kind in EVENT_KINDS:
            self.node.emit_event(event.kind, self.node.peer_id, job=state.job_id.hex()[:16], round=event.round,
                                 detail=event.detail, priority="warning" if event.kind in (
                                     "aggregate_mismatch", "local_failed", "sklearn_version_mismatch")
                                 else "info")

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ local work

    def prepare(self) -> asyncio.Task:
        """Load this node's training data and scikit-learn in worker threads now (a node
        configured with training data calls it at start). A data error is logged as a
        warning and counted (``training_data_errors``); the first round reports it again."""
        return self._spawn(self._prepare())

    async def _prepare(self) -> None:
        from chimera.consensus.models import import_model_library

        self._preparing = True
        try:
            train, test = await self._load_data()
            await asyncio.to_thread(import_model_library)
        except (TrainingDataError, ImportError) as exc:
            self._data_error = str(exc)
            self.counters["training_data_errors"] += 1
            log.warning("training is configured but not ready: %s", exc)
            return
        finally:
            self._preparing = False
        log.info("training ready: %d training and %d test samples of %d features",
                 len(train.y), len(test.y), train.X.shape[1])

    def data_status(self) -> dict:
        """This node's training data for ``train_status``: ``{"state", "train_samples",
        "test_samples", "error"}``; state ``"loading"`` (being loaded at start), ``"ready"``,
        ``"error"`` (``error`` says why; a round retries the load) or ``"not_loaded"``
        (loaded when a job first trains here)."""
        if self._data is not None:
            train, test = self._data
            return {"state": "ready", "train_samples": len(train.y), "test_samples": len(test.y), "error": None}
        state = "loading" if self._preparing else "error" if self._data_error else "not_loaded"
        return {"state": state, "train_samples": None, "test_samples": None, "error": self._data_error}

    async def _load_data(self):
        async with self._data_lock:
            if self._data is None:
                try:
                    self._data = await asyncio.to_thread(load_node_data, self.node.config,
                                                         tuple(self.node.network.genesis), self.node.peer_id)
                except TrainingDataError as exc:
                    self._data_error = str(exc)
                    raise
                self._data_error = None
        return self._data

    def _fit(self, job: JobSpec, action: TrainLocal, train) -> tuple[dict, Any, float, float]:
        from chimera.consensus.models import make_adapter

        check_class_labels(job, train.y, "training data")
        adapter = make_adapter(job.model_kind, job.n_features, job.classes, job.l2)
        adapter.set_params(action.params)
        t0 = time.perf_counter()
        fit = adapter.fit(train.X, train.y, epochs=action.epochs, learning_rate=action.learning_rate,
                          seed=action.seed)
        fit_s = time.perf_counter() - t0
        params = adapter.get_params()
        accuracy = adapter.evaluate(train.X, train.y).accuracy
        if self.poison is not None:  # TEST HOOK: a poisoning participant
            params = {k: action.params[k] - self.poison * (params[k] - action.params[k]) for k in params}
        return params, fit, fit_s, accuracy

    async def _train(self, state: JobState, action: TrainLocal) -> None:
        core = state.core
        try:
            train, _ = await self._load_data()
            params, fit, fit_s, accuracy = await asyncio.to_thread(self._fit, state.job, action, train)
        except (TrainingDataError, LocalProtocolError, ValueError) as exc:
            state.last_error = str(exc)
            self.counters["training_local_failed"] += 1
            core.on_local_failed(action.job_id, action.round, str(exc), time.monotonic())
            self.run_actions(state)
            return
        state.info(action.round).fit_s = fit_s
        self.counters["training_local_fits"] += 1
        try:
            core.on_local_result(action.job_id, action.round, params, fit, time.monotonic(), accuracy=accuracy)
        except LocalProtocolError as exc:
            state.last_error = str(exc)
            core.on_local_failed(action.job_id, action.round, str(exc), time.monotonic())
        self.run_actions(state)

    def _checkpoint(self, state: JobState, action: Checkpoint) -> None:
        """Atomic file + SQLite row, written behind the round's critical path.

        The file (write, fsync, rename, directory fsync: several ms when peers share a
        disk) is written in a thread while the next actions (``round_committed``, the next
        round's training) run at once; the model is then scored on this node's test
        data (thread) and one row with the figures follows on the loop; only then does the
        round show its digest. Checkpoints of one job are written in round order.
        Nothing is lost by the delay: the certified hash is in the log, so a peer killed
        before the row exists resumes from the previous checkpoint and fetches the model.

        A write that fails (disk full, no permission, a file where the directory should be)
        holds nothing up: the round is listed all the same (its digest, ``saved`` false, a
        row without a file), the model stays in memory (:attr:`JobState.unsaved`, which
        ``train export`` serves) and is written again every :data:`CHECKPOINT_RETRY_S` until
        a write succeeds or a later round's checkpoint supersedes it. Each failure is
        counted (``training_checkpoint_failures``) and logged, and ``train_status`` shows it
        (``checkpoint``, ``last_error``); ``training_checkpoint_recovered`` counts the ends
        of such streaks.
        """
        certified_ms = time.time_ns() // 1_000_000
        state.checkpoint_task = self._spawn(self._write_checkpoint(state, action, certified_ms,
                                                                   state.checkpoint_task))

    def _checkpoint_path(self, state: JobState, number: int) -> Path:
        return self.root / state.job_id.hex()[:32] / f"round-{number:07d}.npz"

    async def _write_checkpoint(self, state: JobState, action: Checkpoint, certified_ms: int,
                                previous: asyncio.Task | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        saved = await self._save_file(state, action)
        info = state.info(action.round)
        info.accuracy, info.loss = await self._evaluate(state, dict(action.params))
        if self.node._stopped.is_set():
            return  # the store may be closed already
        info.digest = action.digest.hex()
        info.committed_ms = certified_ms  # when the round was certified here, not when the file landed
        info.saved = saved
        self._record(state, action, info)

    async def _save_file(self, state: JobState, action: Checkpoint) -> bool:
        """Write the checkpoint file of ``action``; False (counted, logged, kept for a retry) if
        that fails."""
        path = self._checkpoint_path(state, action.round)
        try:
            await asyncio.to_thread(write_npz_atomic, path, dict(action.params))
        except (OSError, ValueError) as exc:
            self._checkpoint_failed(state, action, str(exc))
            return False
        return True

    def _record(self, state: JobState, action: Checkpoint, info: RoundInfo) -> None:
        """The round's row (one write, one fsync, with the model's test figures); ``path`` empty
        when its file could not be written (a restart skips such a row)."""
        path = str(self._checkpoint_path(state, action.round)) if info.saved else ""
        try:
            self.store.db.execute(
                "INSERT OR REPLACE INTO fl_checkpoints(job_id, round, digest, path, committed_ms, accuracy, "
                "loss, round_s, fit_s, included, bytes_sent, next_epoch) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                (state.job_id, action.round, action.digest, path, info.committed_ms, info.accuracy, info.loss,
                 info.round_s, info.fit_s, info.included, info.bytes_sent, action.next_epoch))
        except sqlite3.Error as exc:  # a restart would not find the file: not durable yet
            info.saved = False
            self._checkpoint_failed(state, action, f"its row: {exc}")
            return
        if info.saved:
            self._checkpoint_saved(state, action)

    def _checkpoint_failed(self, state: JobState, action: Checkpoint, why: str) -> None:
        """A checkpoint write failed: count and log it, keep the model in memory and retry later."""
        self.counters["training_checkpoint_failures"] += 1
        state.checkpoint_failures += 1
        first = state.checkpoint_error is None
        state.checkpoint_error = state.last_error = f"checkpoint of round {action.round} not written: {why}"
        if state.unsaved is None or state.unsaved.round <= action.round:
            state.unsaved = action  # the newest certified model is what a restart or an export needs
        now = time.monotonic()
        state.retry_at = now + CHECKPOINT_RETRY_S
        self._wake.set()
        if first or now - state.checkpoint_logged_s >= CHECKPOINT_FAILURE_LOG_INTERVAL_S:
            # the first failure of an outage, then one line per interval (not per round or retry)
            since = "" if first else \
                f" ({state.checkpoint_failures - state.checkpoint_failures_logged} failed writes since the last report)"
            (log.error if first else log.warning)(
                "training job %s: %s%s; the model stays in memory, retried every %g s", state.job_id.hex()[:16],
                state.checkpoint_error, since, CHECKPOINT_RETRY_S)
            state.checkpoint_logged_s, state.checkpoint_failures_logged = now, state.checkpoint_failures
        if first:  # once per outage, not per retry
            self.node.emit_event("checkpoint_failed", self.node.peer_id, priority="warning",
                                 job=state.job_id.hex()[:16], round=action.round, detail=why[:200])

    def _checkpoint_saved(self, state: JobState, action: Checkpoint) -> None:
        """The checkpoint of ``action.round`` is on disk (file and row)."""
        number = action.round
        self.counters["training_checkpoints"] += 1
        if state.unsaved is not None and state.unsaved.round <= number:  # written, or superseded
            state.unsaved = None
            state.retry_at = math.inf
        if state.unsaved is None and state.checkpoint_error is not None:
            state.checkpoint_error = None
            state.checkpoint_logged_s = -math.inf  # a next outage is reported at once
            self.counters["training_checkpoint_recovered"] += 1
            log.info("training job %s: checkpoints are written again (round %d)", state.job_id.hex()[:16], number)
        for (old,) in self.store.db.execute("SELECT path FROM fl_checkpoints WHERE job_id=? AND round<=? "
                                            "AND path != ''",
                                            (state.job_id, number - CHECKPOINT_FILES_KEPT)).fetchall():
            try:
                Path(old).unlink()
            except OSError:  # gone already (or unreachable: nothing to keep either way)
                pass
        for old in [r for r in state.rounds if r < number - 1000]:  # bound memory of very long jobs
            del state.rounds[old]

    def retry_checkpoint(self, state: JobState) -> asyncio.Task | None:
        """Write the checkpoint kept in memory after a failed write again (the timer calls this
        every :data:`CHECKPOINT_RETRY_S`); after the job's other checkpoint writes. None: nothing
        to write."""
        state.retry_at = math.inf
        if state.unsaved is None:
            return None
        state.checkpoint_task = self._spawn(self._rewrite_checkpoint(state, state.unsaved, state.checkpoint_task))
        return state.checkpoint_task

    async def _rewrite_checkpoint(self, state: JobState, action: Checkpoint, previous: asyncio.Task | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        if state.unsaved is not action:  # superseded meanwhile by a later round's checkpoint
            return
        info = state.info(action.round)
        if not await self._save_file(state, action) or self.node._stopped.is_set():
            return
        info.saved = True
        self._record(state, action, info)

    def _score(self, job: JobSpec, params: dict, test) -> tuple[float, float]:
        from chimera.consensus.models import make_adapter

        check_class_labels(job, test.y, "test data")
        adapter = make_adapter(job.model_kind, job.n_features, job.classes, job.l2)
        adapter.set_params(params)
        result = adapter.evaluate(test.X, test.y)
        return float(result.accuracy), float(result.loss)

    async def _evaluate(self, state: JobState, params: dict) -> tuple[float | None, float | None]:
        """(accuracy, loss) of a certified model on this node's test data, (None, None) if it has none."""
        try:
            _, test = await self._load_data()
            return await asyncio.to_thread(self._score, state.job, params, test)
        except (TrainingDataError, LocalProtocolError, ValueError) as exc:
            state.last_error = str(exc)
            return None, None

    # ------------------------------------------------------------ timer

    async def run_timer(self) -> None:
        """Tick every core at its ``next_deadline`` (woken early when actions ran). Cancelled
        when the node stops; it then cancels the service's local work (fits, evaluations)."""
        try:
            await self._timer_loop()
        finally:
            for task in list(self._tasks):
                task.cancel()

    async def _timer_loop(self) -> None:
        self.run_all()  # actions left by the replay
        while True:
            now = time.monotonic()
            deadline = min((min(s.core.next_deadline(), s.retry_at) for s in self.jobs.values()), default=math.inf)
            delay = deadline - now
            if delay > 0:
                self._wake.clear()
                if await wait_event(self._wake, min(delay, 5.0)):
                    continue
            now = time.monotonic()
            for state in list(self.jobs.values()):
                try:
                    if state.retry_at <= now:
                        self.retry_checkpoint(state)
                    if state.core.next_deadline() <= now:
                        state.core.tick(now)
                        self.run_actions(state)
                except Exception:
                    self.counters["training_timer_errors"] += 1
                    log.exception("training tick failed")
            await asyncio.sleep(0)

    # ------------------------------------------------------------ admin

    def job_doc(self, state: JobState, rounds: bool = True) -> dict:
        core, job = state.core, state.job
        update_bytes = param_bytes(job)
        state_name = ("finished" if core.finished else "running" if core.participant else "observing")
        doc = {"job_id": state.job_id.hex(), "name": job.name, "state": state_name,
               "participant": core.participant, "round": core.round, "model_round": core.model_round,
               "rounds_total": job.rounds, "rule": job.rule, "model_kind": job.model_kind,
               "participants": len(job.participants), "quorum": job.quorum, "height": state.height,
               "round_deadline_s": job.round_deadline_s, "update_bytes": update_bytes,
               "drops": dict(core.drops), "last_error": state.last_error, "recent_events": state.events[-40:],
               "checkpoint": state.checkpoint_doc(), "sklearn_version": self.sklearn_version,
               "sklearn_version_mismatch": core.version_mismatch, "spec": _spec_doc(job)}
        if rounds:
            doc["rounds"] = [info.doc(n) for n, info in sorted(state.rounds.items()) if info.digest is not None]
        return doc

    def find(self, ref: str | None) -> JobState:
        if not self.jobs:
            raise admin_api.AdminError("no training job has been committed")
        if not ref:
            return max(self.jobs.values(), key=lambda s: s.height)
        ref = str(ref).lower()
        hits = [s for s in self.jobs.values() if s.job_id.hex().startswith(ref) or s.job.name == ref]
        if len(hits) != 1:
            raise admin_api.AdminError(f"job {ref!r} {'is ambiguous' if hits else 'is unknown'}; "
                                       f"known: {', '.join(s.job_id.hex()[:16] for s in self.jobs.values())}")
        return max(hits, key=lambda s: s.height)

    def job_from_args(self, raw: Any) -> JobSpec:
        """A :class:`JobSpec` from TOML text or a map (``[job]`` table optional).

        Defaults: ``participants`` every validator of the current epoch (also
        ``"validators"``); ``quorum`` ``max(n - (n - 1) // 3, rule minimum)``; with
        ``detect_anomalies``, ``sklearn_version`` this node's scikit-learn version (the
        anomaly screen is reproducible only with it; peers running another one do not
        check the job's aggregates).
        The participants are checked first (not empty, no peer id twice, at least
        the rule's minimum for its ``byzantine_f``), then every field as the log
        checks a committed job (type, range, finite floats, invariants) before
        anything is built from it.

        Raises:
            admin.AdminError (code 2): bad TOML, unknown keys, or an invalid job
                (the message names the field, or the duplicate peer id), or
                ``detect_anomalies`` without ``sklearn_version`` on a node without scikit-learn.
        """
        def bad(message: str) -> admin_api.AdminError:
            return admin_api.AdminError(message, admin_api.EXIT_USAGE)

        if isinstance(raw, str):
            try:
                raw = tomllib.loads(raw)
            except (tomllib.TOMLDecodeError, ValueError) as exc:  # ValueError: an integer of > 4300 digits
                raise bad(f"job file: {str(exc)[:200]}") from None
            except RecursionError:
                raise bad("job file: nested too deeply") from None
        if not isinstance(raw, dict):
            raise bad("job must be TOML text or a map")
        fields = raw.get("job", raw)
        if not isinstance(fields, dict):
            raise bad("job: the [job] table must be a table of fields")
        fields = dict(fields)
        unknown = sorted(str(k)[:40] for k in fields if k not in JOB_FIELDS)
        if unknown:
            raise bad(f"unknown job keys: {', '.join(unknown[:20])}; known: {', '.join(sorted(JOB_FIELDS))}")
        participants = fields.get("participants", "validators")
        defaulted = isinstance(participants, str) and participants in ("validators", "all")
        if defaulted:
            participants = sorted(self.consensus.core.table.weights)
        if not isinstance(participants, (list, tuple)) or not all(isinstance(p, str) for p in participants):
            raise bad("invalid job: participants: a list of peer ids or \"validators\"")
        if not participants:
            raise bad("invalid job: participants: the list is empty (name at least one peer id, or "
                      "\"validators\")")
        twice = sorted(p for p, k in Counter(participants).items() if k > 1)
        if twice:
            raise bad(f"invalid job: participants: {', '.join(repr(p[:64]) for p in twice[:3])} "
                      f"listed more than once")
        fields["participants"] = sorted(participants)
        n = len(participants)
        rule, f = fields.get("rule", "fedavg"), fields.get("byzantine_f", 0)
        try:  # the rule's minimum, before a default quorum could hide it (bad values: their own checks below)
            need = (AggregationConfig(rule=rule, f=f).min_updates()
                    if type(f) is int and f <= MAX_PARTICIPANTS else 1)
        except (LocalProtocolError, TypeError):
            need = 1
        if n < need:
            where = " (the validators of the current epoch)" if defaulted else ""
            raise bad(f"invalid job: rule {rule} with f={f} needs at least "
                      f"{need} participants, the job has {n}{where}")
        classes = fields.get("classes", [])
        fields["classes"] = list(classes) if isinstance(classes, (list, tuple)) else classes
        if "quorum" not in fields:
            fields["quorum"] = min(n, max(n - (n - 1) // 3, need))
        if fields.get("detect_anomalies") is True and "sklearn_version" not in fields:
            if self.sklearn_version is None:
                raise bad("invalid job: detect_anomalies records the scikit-learn version of the anomaly "
                          "screen, and scikit-learn is not installed on this node: install it, or set "
                          "sklearn_version")
            fields["sklearn_version"] = self.sklearn_version
        try:  # the log's own strict decoding: exact types, ranges, finite floats, then the invariants
            return decode_fields(JobSpec, fields, "job")
        except (MalformedError, LocalProtocolError) as exc:  # the latter: AggregationConfig's checks
            text = str(exc)
            raise bad(f"invalid job: {text if len(text) <= 300 else text[:297] + '...'}") from None
        except ValueError as exc:  # formatting a value of > 4300 digits into the message
            raise bad(f"invalid job: a value is far out of range ({str(exc)[:80]})") from None

    async def start_job(self, raw: Any, timeout_s: float) -> dict:
        job = self.job_from_args(raw)
        ok, size = _params_fit(job, self.node.config.max_message_bytes)
        if not ok:
            shape = f"n_features {job.n_features}" + (f" and {len(set(job.classes))} classes"
                                                      if job.model_kind == "sgd_classifier" else "")
            raise admin_api.AdminError(
                f"invalid job: model {job.model_kind} with {shape} has {size} parameter bytes; "
                f"an update must fit in one envelope "
                f"(max_message_bytes {self.node.config.max_message_bytes} minus {ENVELOPE_MARGIN_BYTES} bytes) "
                f"or in {MAX_PARTS} parts of {PART_BYTES} bytes, each an envelope of its own",
                admin_api.EXIT_USAGE)
        if self.node.peer_id in job.participants:
            try:
                await self._load_data()
            except TrainingDataError as exc:
                raise admin_api.AdminError(f"this node participates but cannot train: {exc}") from None
        try:
            value = encode_log_value(job)
        except LocalProtocolError as exc:
            raise admin_api.AdminError(f"invalid job: it does not fit in one log value: {exc}",
                                       admin_api.EXIT_USAGE) from None
        job_id = job_id_of(value)
        if job_id in self.jobs:
            raise admin_api.AdminError(f"job {job_id.hex()[:16]} with this exact spec already exists "
                                       "(change its name or seed)")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        digest = value_hash(value)
        self.consensus.waiters[digest] = fut
        t0 = loop.time()
        try:
            if not self.consensus.submit(value):
                raise admin_api.AdminError("the consensus pool refused the job (full, duplicate or invalid)")
            try:
                height, stored_at = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
            except asyncio.TimeoutError:
                raise admin_api.AdminError(f"job not committed within {timeout_s} s (is a quorum of "
                                           "validators up?)") from None
        finally:
            self.consensus.waiters.pop(digest, None)
        return {"job_id": job_id.hex(), "name": job.name, "height": height, "latency_s": stored_at - t0,
                "participants": len(job.participants), "quorum": job.quorum, "update_bytes": size}

    def export(self, ref: str | None) -> dict:
        """The latest certified model of job ``ref`` (default: the newest job) for the client to write.

        Returns ``{"npz": bytes, "sidecar": str, "job_id", "round", "digest", "accuracy"}``:
        ``npz`` is the model as a NumPy ``.npz`` archive (one float array per
        parameter name, no pickle) and ``sidecar`` a JSON text with the job spec,
        round, digest and tensor shapes. The node writes no file on the caller's
        behalf (a remote operator must not choose paths on the node's disk); the
        CLI writes both next to each other.

        The newest certified model is the newest checkpoint file's, or the model kept in
        memory after its checkpoint write failed (:attr:`JobState.unsaved`) when that is newer.

        Raises:
            AdminError: no such job, no committed round yet, or the checkpoint is
                unreadable, holds tensors of other names or shapes than the job's model,
                or does not match its certified digest.
        """
        state = self.find(ref)
        row = self.store.db.execute("SELECT round, digest, path FROM fl_checkpoints WHERE job_id=? AND path != '' "
                                    "ORDER BY round DESC LIMIT 1", (state.job_id,)).fetchone()
        unsaved = state.unsaved
        if unsaved is not None and (row is None or unsaved.round > int(row[0])):
            number, digest, source = unsaved.round, unsaved.digest, f"the model of round {unsaved.round} in memory"
            params = {k: np.array(v) for k, v in unsaved.params.items()}
        elif row is None:
            raise admin_api.AdminError(f"job {state.job_id.hex()[:16]} has no committed round yet")
        else:
            number, digest, source = int(row[0]), bytes(row[1]), f"checkpoint {row[2]}"
            try:
                params = read_npz(Path(row[2]))
            except (OSError, ValueError) as exc:
                raise admin_api.AdminError(f"{source} unreadable: {exc}") from None
        try:
            ok = aggregate_hash(params, state.job.model_spec()) == digest
        except (ValueError, TypeError, RemoteProtocolError) as exc:  # UpdateRejected: other names or shapes
            raise admin_api.AdminError(f"{source} does not hold this job's model: "
                                       f"{str(exc)[:200]}") from None
        if not ok:
            raise admin_api.AdminError(f"{source} does not match its certified digest")
        info = state.rounds.get(number) or RoundInfo()
        sidecar = json.dumps({
            "job_id": state.job_id.hex(), "round": number, "digest": digest.hex(),
            "digest_algorithm": "chimera.consensus.aggregation.aggregate_hash (SHA-256)",
            "accuracy": info.accuracy, "loss": info.loss, "job": _spec_doc(state.job),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in params.items()},
        }, indent=2) + "\n"
        return {"npz": npz_bytes(params), "sidecar": sidecar, "job_id": state.job_id.hex(), "round": number,
                "digest": digest.hex(), "accuracy": info.accuracy}


def _spec_doc(job: JobSpec) -> dict:
    doc = encode_fields(job)
    doc["classes"] = list(job.classes)
    doc["participants"] = list(job.participants)
    return doc
