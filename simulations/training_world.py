"""Simulated peers running the federated-averaging round core (:mod:`chimera.consensus.training`).

Every simulated peer runs the real :class:`~chimera.consensus.training.TrainingCore`
for its job; nothing of the round protocol is re-implemented here. This module
is the driver: it runs the core's actions (DESIGN.md "two drivers") with the
simulator's ports, real signed envelopes and one of two replicated logs.

The log (``training.log`` in a scenario)
----------------------------------------
* ``"bft"`` (:class:`BftTrainingWorld`): every peer is also a validator
  running the real :class:`~chimera.consensus.bft.BftCore`
  (:class:`~chimera.simulations.bft_world.BftPeer`, with its safety checks),
  with the core's validity hook wired to
  :meth:`TrainingCore.validate_log_value` exactly as the node does;
  ``ProposeValue`` becomes ``BftCore.submit`` and every committed block's
  values are fed to the training core in log order.
* ``"ideal"`` (:class:`IdealTrainingWorld`, :class:`IdealLog`): a simulated
  total-order log for scale. A submitted value enters a pool (deduplicated by
  its bytes against the pool and every committed value, as ``BftCore`` does);
  ``commit_latency_s`` virtual seconds after a value finds the pool empty, the
  pool is cut into one block, ordered by SHA-256 of the value (``BftCore``'s
  block order). A value of the block is committed only if peers holding more
  than 2/3 of the weight (crashed peers count as no) find it valid with their
  core's validity hook (what a correct validator would prevote); the others
  stay in the pool for the next block (at most :data:`IdealLog.MAX_ATTEMPTS`
  blocks). Committed values reach every live peer at the cut, in log order;
  a restarted peer replays the committed log (what BFT catch-up gives it).
  No consensus messages are simulated: the log costs ``commit_latency_s`` and
  nothing else.

Local training
--------------
``TrainLocal`` runs the real model adapter
(:func:`~chimera.consensus.models.make_adapter`, scikit-learn) on the peer's
real shard of scikit-learn's ``load_digits`` (IID or Dirichlet(alpha) label
skew, :mod:`chimera.consensus.datasets`), with the core's seed. The result
(deterministic given the seed) is computed at once; its *virtual* duration is
modelled: ``fit_s_per_epoch_per_100 * local_epochs * samples / 100`` seconds,
after which the driver calls :meth:`TrainingCore.on_local_result`.
The certified global model of every round is evaluated once on a fixed
held-out test set (20 % of the data, stratified): accuracy in [0, 1] and log
loss (nats).

Byzantine updates
-----------------
A peer's :class:`~chimera.simulations.behaviours.Behaviour` gets the delta of
its honestly trained update (``model_update``: float64 ``(d,)`` in the job's
``ModelSpec`` order) and returns the delta it submits (gaussian, sign_flip,
alie, or ``None``: silent), possibly late (``update_delay_s``). ALIE is an
omniscient attacker (Baruch et al. 2019): it sees the honest peers' deltas of
the round (computed with their own data and seeds, the same results they
produce). The poisoned update then goes through the real core (signed,
validated by every receiver against the job's norm bound, aggregated by the
job's rule).

Recorded
--------
Per certified round and job: virtual time, accuracy and loss of the global
model, updates included, senders flagged (by the rule's filter, the anomaly
detector or validation; as reported by honest peers' ``Observe`` actions).
Every honest peer's reputation (:class:`~chimera.consensus.reputation.LocalReputation`)
is fed from its core's ``Observe`` actions. Safety (:class:`SafetyViolation`):
every honest peer checkpoints the same model hash for a round.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import msgpack
import numpy as np

from chimera.consensus import training as training_core
from chimera.consensus.aggregation import RULES, AggregationConfig, screen_library_version
from chimera.consensus.bft import BftConfig, BftCore, CertifiedCommit, Commit
from chimera.consensus.datasets import (
    Shard,
    load_digits_data,
    split_dirichlet,
    split_iid,
    train_test_split_fixed,
)
from chimera.consensus.models import FitResult, make_adapter
from chimera.consensus.quorum import WeightTable
from chimera.consensus.reputation import LocalReputation, ObservationKind
from chimera.consensus.training import (
    Broadcast,
    Checkpoint,
    FlModel,
    FlModelRequest,
    FlUpdate,
    FlUpdateRequest,
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
    inclusion_choice,
    inclusion_proposable,
    job_id_of,
    local_seed,
)
from chimera.protocol.envelope import Envelope
from chimera.protocol.errors import MalformedError
from chimera.protocol.messages import decode_fields

from .behaviours import Behaviour, Outgoing
from .bft_world import OPINION_PREFIX, BftPeer, BftWorld, SafetyViolation
from .engine import Simulator
from .network import SimNetwork
from .signatures import SharedVerifier, shared_vote_verification
from .world import PeerHost, SkewSpec, World

TRAINING_MESSAGES = (FlUpdate, FlUpdateRequest, FlModelRequest, FlModel)
LOGS = ("ideal", "bft")
SPLITS = ("iid", "dirichlet")
PEER_WEIGHT = 100
"""Weight of every peer in the (fixed) weight table of epoch 0."""


@dataclass(frozen=True)
class TrainingSetup:
    """How a simulated federation trains (the ``[training]`` table of a scenario).

    Fields (units): ``log`` "ideal" | "bft"; ``rule`` one of
    :data:`~chimera.consensus.aggregation.RULES`; ``detect`` run the anomaly
    detector first; ``byzantine_f`` the f the rule assumes (``None``: the number
    of attackers in the job); ``rounds`` >= 1; ``local_epochs`` >= 1;
    ``learning_rate`` > 0; ``l2`` >= 0; ``quorum`` updates needed after the
    deadline (``None``: ``max(rule minimum, ceil(2n/3))``); ``round_deadline_s``
    virtual seconds (> 0); ``max_update_norm`` L2 bound of a delta (> 0);
    ``jobs`` concurrent jobs (peers assigned round-robin; <= 64 participants
    each); ``split`` "iid" | "dirichlet" with ``alpha`` (> 0); ``test_fraction``
    of the data held out (0..1); ``data_seed`` for the split; ``job_seed`` the
    job's seed field; ``fit_s_per_epoch_per_100`` virtual seconds of local
    training per epoch per 100 samples (>= 0); ``commit_latency_s`` of the ideal
    log (> 0); ``fetch_interval_s`` of the core (> 0).
    """

    log: str = "ideal"
    rule: str = "fedavg"
    detect: bool = False
    byzantine_f: int | None = None
    rounds: int = 20
    local_epochs: int = 2
    learning_rate: float = 0.1
    l2: float = 1e-4
    quorum: int | None = None
    round_deadline_s: float = 10.0
    max_update_norm: float = 1e6
    jobs: int = 1
    split: str = "iid"
    alpha: float = 0.5
    test_fraction: float = 0.2
    data_seed: int = 0
    job_seed: int = 7
    fit_s_per_epoch_per_100: float = 0.05
    commit_latency_s: float = 0.05
    fetch_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.log not in LOGS:
            raise ValueError(f"log must be one of {LOGS}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        if self.jobs < 1:
            raise ValueError("jobs must be >= 1")


@functools.lru_cache(maxsize=8)
def digits_federation(n_peers: int, split: str, alpha: float, test_fraction: float,
                      seed: int) -> tuple[tuple[Shard, ...], Shard]:
    """Shards of ``load_digits`` for ``n_peers`` peers and the fixed held-out test set.

    The training part (``1 - test_fraction`` of 1797 samples, stratified, seed
    ``seed``) is split IID or with per-class ``Dirichlet(alpha)`` proportions
    (at least 10 samples a peer when possible). Cached (the arrays are never
    written to).
    Raises:
        chimera.protocol.errors.LocalProtocolError: too many peers for the data.
    """
    X, y = load_digits_data()
    train, test = train_test_split_fixed(X, y, test_fraction, seed=seed)
    if split == "iid":
        shards = split_iid(train, n_peers, seed=seed + 1)
    else:
        shards = split_dirichlet(train, n_peers, alpha=alpha, seed=seed + 1,
                                 min_samples=min(10, len(train) // n_peers))
    return tuple(shards), test


@contextlib.contextmanager
def shared_training_verification() -> Iterator[SharedVerifier]:
    """:func:`~chimera.simulations.signatures.shared_vote_verification`, extended to
    ``verify_vote`` as imported by the training core (update and confirm
    signatures): one Ed25519 verification per distinct signed statement."""
    with shared_vote_verification(also=("chimera.consensus.training",)) as verifier:
        yield verifier


def default_quorum(n: int, config: AggregationConfig) -> int:
    """``max(rule minimum, ceil(2n/3))`` capped at ``n``."""
    return min(n, max(config.min_updates(), math.ceil(2 * n / 3)))


def _pack_params(params) -> bytes:
    return msgpack.packb({k: [list(np.shape(v)), np.ascontiguousarray(v, dtype="<f8").tobytes()]
                          for k, v in sorted(params.items())}, use_bin_type=True)


def _unpack_params(raw: bytes) -> dict[str, np.ndarray]:
    return {k: np.frombuffer(data, dtype="<f8").reshape(shape).copy()
            for k, (shape, data) in msgpack.unpackb(raw, raw=False).items()}


# ----------------------------------------------------------------------------- federation


class Federation:
    """The training state shared by one run: data, jobs, local fits, per-round records.

    Args:
        sim: the engine.
        setup: :class:`TrainingSetup`.
        peers: every peer host (index order); each has ``training`` (:class:`PeerTraining`).
        table: the weight table of epoch 0 (every peer).
        network_id: bound into signatures.
    Raises:
        ValueError: a job with more than 64 participants, or a rule/quorum the
            job spec refuses (message from :class:`JobSpec`).
    """

    def __init__(self, sim: Simulator, setup: TrainingSetup, peers: Sequence[PeerHost], table: WeightTable,
                 network_id: bytes) -> None:
        self.sim = sim
        self.setup = setup
        self.peers = list(peers)
        self.table = table
        self.network_id = network_id
        n = len(self.peers)
        shards, self.test = digits_federation(n, setup.split, float(setup.alpha), float(setup.test_fraction),
                                              setup.data_seed)
        self.shard_of = {p.peer_id: shards[i] for i, p in enumerate(self.peers)}
        # every simulated peer runs this process's scikit-learn; a screened job records it (§17.7)
        self.sklearn_version = screen_library_version()
        self.jobs: list[JobSpec] = []
        self.job_values: list[bytes] = []
        self.job_ids: list[bytes] = []
        self.job_index: dict[bytes, int] = {}
        self.members: list[list[PeerHost]] = []
        for j in range(setup.jobs):
            members = [p for i, p in enumerate(self.peers) if i % setup.jobs == j]
            if len(members) > training_core.MAX_PARTICIPANTS:
                raise ValueError(f"job {j} would have {len(members)} participants; at most "
                                 f"{training_core.MAX_PARTICIPANTS} (use more jobs)")
            attackers = sum(1 for p in members if p.behaviour.byzantine)
            f = attackers if setup.byzantine_f is None else setup.byzantine_f
            agg = AggregationConfig(rule=setup.rule, f=f, detect=setup.detect)
            quorum = default_quorum(len(members), agg) if setup.quorum is None else setup.quorum
            job = JobSpec(name=f"sim-{j}", model_kind="sgd_classifier", n_features=64, classes=tuple(range(10)),
                          l2=setup.l2, dataset=f"digits:{setup.split}:{setup.alpha:g}", rounds=setup.rounds,
                          local_epochs=setup.local_epochs, learning_rate=setup.learning_rate, rule=setup.rule,
                          byzantine_f=f, detect_anomalies=setup.detect,
                          participants=tuple(sorted(p.peer_id for p in members)), quorum=quorum,
                          round_deadline_s=setup.round_deadline_s, max_update_norm=setup.max_update_norm,
                          seed=setup.job_seed, sklearn_version=self.sklearn_version if setup.detect else "")
            value = encode_log_value(job)
            self.jobs.append(job)
            self.job_values.append(value)
            self.job_ids.append(job_id_of(value))
            self.job_index[self.job_ids[-1]] = j
            self.members.append(sorted(members, key=lambda p: p.index))
        self.spec = self.jobs[0].model_spec()
        self.by_id = {p.peer_id: p for p in self.peers}
        self._fits: dict[tuple[bytes, int, str], tuple[dict[str, np.ndarray], FitResult]] = {}
        self.certified: dict[tuple[int, int], bytes] = {}
        self.records: dict[tuple[int, int], dict] = {}
        self.flags: dict[tuple[int, int], set[str]] = {}
        self.flag_count: Counter[str] = Counter()
        self.good_count: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.fits_run = 0
        self.honest_participants = [p for p in self.peers if not p.behaviour.byzantine]

    # ------------------------------------------------------------ jobs

    def propose_jobs(self) -> None:
        """The first honest member of each job proposes its ``fl_job`` value."""
        for j, members in enumerate(self.members):
            proposer = next((p for p in members if not p.behaviour.byzantine), members[0])
            self.sim.log(f"{proposer.name} proposes {self.jobs[j].describe()}")
            proposer.propose(self.job_values[j])

    def job_for(self, peer_id: str) -> int | None:
        for j, job in enumerate(self.jobs):
            if peer_id in job.participants:
                return j
        return None

    # ------------------------------------------------------------ local training

    def local_fit(self, job_index: int, round_: int, peer_id: str,
                  base: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], FitResult]:
        """The honest local result of ``peer_id`` in ``round_`` from ``base`` (real fit, cached)."""
        job, job_id = self.jobs[job_index], self.job_ids[job_index]
        key = (job_id, round_, peer_id)
        hit = self._fits.get(key)
        if hit is not None:
            return hit
        shard = self.shard_of[peer_id]
        adapter = make_adapter(job.model_kind, job.n_features, job.classes, job.l2)
        adapter.set_params(base)
        fit = adapter.fit(shard.X, shard.y, epochs=job.local_epochs, learning_rate=job.learning_rate,
                          seed=local_seed(job, job_id, round_, peer_id))
        self.fits_run += 1
        out = (adapter.get_params(), fit)
        for old in [k for k in self._fits if k[0] == job_id and k[1] < round_ - 1]:
            del self._fits[old]
        self._fits[key] = out
        return out

    def fit_time_s(self, samples: int, epochs: int) -> float:
        return self.setup.fit_s_per_epoch_per_100 * epochs * samples / 100.0

    def train(self, part: "PeerTraining", action: TrainLocal) -> None:
        """Run ``TrainLocal`` for ``part``'s peer: real fit, behaviour hook, virtual duration."""
        host = part.host
        j = self.job_index[action.job_id]
        base = {k: np.asarray(v) for k, v in action.params.items()}
        params, fit = self.local_fit(j, action.round, host.peer_id, base)
        behaviour = host.behaviour
        if behaviour.byzantine:
            spec = self.spec
            base_vec = spec.flatten(base)
            delta = spec.flatten(params) - base_vec
            honest: list[np.ndarray] = []
            members = self.members[j]
            if behaviour.needs_honest_updates:
                for peer in members:
                    if not peer.behaviour.byzantine:
                        honest.append(spec.flatten(self.local_fit(j, action.round, peer.peer_id, base)[0]) - base_vec)
            out = behaviour.model_update(host, delta, honest, n=len(members),
                                         f=sum(1 for p in members if p.behaviour.byzantine))
            if out is None:
                self.sim.log(f"{host.name} withholds its update r={action.round}")
                return
            params = spec.unflatten(base_vec + np.asarray(out, dtype=np.float64))
        delay = self.fit_time_s(fit.num_samples, action.epochs) + behaviour.update_delay_s
        self.sim.schedule(self.sim.now + delay, part.local_done, part.incarnation, action, params, fit)

    # ------------------------------------------------------------ records

    def on_checkpoint(self, host: PeerHost, cp: Checkpoint) -> None:
        j = self.job_index[cp.job_id]
        key = (j, cp.round)
        prior = self.certified.setdefault(key, cp.digest)
        if prior != cp.digest and not host.behaviour.byzantine:
            text = (f"job {j} round {cp.round}: {host.name} checkpointed {cp.digest.hex()[:8]}, "
                    f"another peer {prior.hex()[:8]}")
            self.sim.log(f"SAFETY VIOLATION: {text}")
            raise SafetyViolation(text)
        rec = self.records.get(key)
        if rec is None:
            job = self.jobs[j]
            adapter = make_adapter(job.model_kind, job.n_features, job.classes, job.l2)
            adapter.set_params(cp.params)
            ev = adapter.evaluate(self.test.X, self.test.y)
            rec = self.records[key] = {"job": j, "round": cp.round, "t_s": round(self.sim.now, 6),
                                       "accuracy": ev.accuracy, "loss": ev.loss, "included": None}
            self.sim.log(f"certified job {j} r={cp.round} {cp.digest.hex()[:8]} accuracy {ev.accuracy:.4f} "
                         f"loss {ev.loss:.4f}")

    def on_event(self, host: PeerHost, ev: TrainingEvent) -> None:
        if ev.kind == "inclusion_committed":
            j = self.job_for(host.peer_id)
            self.counters.setdefault(f"included_{j}_{ev.round}", int(ev.detail.split()[0]))
        elif ev.kind in ("aggregate_mismatch", "local_failed", "model_fetched"):
            self.counters[ev.kind] += 1

    def on_observe(self, host: PeerHost, obs: Observe, round_: int) -> None:
        if host.behaviour.byzantine:
            return
        j = self.job_for(host.peer_id)
        if obs.kind == ObservationKind.UPDATE_FLAGGED:
            flagged = self.flags.setdefault((j, round_), set())
            if obs.peer_id not in flagged:
                flagged.add(obs.peer_id)
                self.flag_count[obs.peer_id] += 1
        elif obs.kind == ObservationKind.UPDATE_GOOD:
            self.good_count[obs.peer_id] += 1

    # ------------------------------------------------------------ results

    def finished(self) -> bool:
        """Every live honest participant's core finished its job."""
        for p in self.honest_participants:
            if p.up and (p.training.core is None or not p.training.core.finished):
                return False
        return True

    def rounds_series(self) -> list[dict]:
        rows = []
        byz = {p.peer_id for p in self.peers if p.behaviour.byzantine}
        for (j, r) in sorted(self.records):
            rec = dict(self.records[(j, r)])
            rec["included"] = self.counters.get(f"included_{j}_{r}")
            flagged = self.flags.get((j, r), set())
            rec["flagged_byzantine"] = sum(1 for p in flagged if p in byz)
            rec["flagged_honest"] = len(flagged) - rec["flagged_byzantine"]
            rows.append(rec)
        return rows

    def metrics(self) -> dict:
        """One row of run metrics (see docs/SIMULATION.md for the column meanings)."""
        series = self.rounds_series()
        last = {}
        for rec in series:
            last[rec["job"]] = rec
        reached = [last[j]["round"] if j in last else 0 for j in range(len(self.jobs))]
        byz = [p for p in self.peers if p.behaviour.byzantine]
        honest = [p for p in self.peers if not p.behaviour.byzantine]
        rounds_done = max(1, min(reached)) if reached else 1
        byz_flagged = sum(self.flag_count[p.peer_id] for p in byz)
        honest_flagged = sum(self.flag_count[p.peer_id] for p in honest)
        times = [rec["t_s"] for rec in series if rec["job"] == 0]
        now = self.sim.now
        observers = [p for p in honest if p.up]

        def mean_score(targets: list[PeerHost]) -> float:
            vals = [o.training.reputation.score(t.peer_id, now) for o in observers for t in targets
                    if t is not o]
            return statistics.fmean(vals) if vals else math.nan

        return {
            "rule": self.setup.rule + ("+detect" if self.setup.detect else ""),
            "log": self.setup.log,
            "jobs": len(self.jobs),
            "participants_per_job": len(self.members[0]),
            "attackers": len(byz),
            "byzantine_f": self.jobs[0].byzantine_f,
            "quorum": self.jobs[0].quorum,
            "rounds_certified": min(reached) if reached else 0,
            "final_accuracy": statistics.fmean(last[j]["accuracy"] for j in last) if last else math.nan,
            "final_loss": statistics.fmean(last[j]["loss"] for j in last) if last else math.nan,
            "best_accuracy": max((rec["accuracy"] for rec in series), default=math.nan),
            "round_time_mean_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else math.nan,
            "finish_s": times[-1] if times else math.nan,
            "byzantine_flag_rate": byz_flagged / (len(byz) * rounds_done) if byz else math.nan,
            "honest_flag_rate": honest_flagged / (len(honest) * rounds_done) if honest else math.nan,
            "reputation_honest": mean_score(honest),
            "reputation_byzantine": mean_score(byz),
            "local_fits": self.fits_run,
            "aggregate_mismatches": self.counters["aggregate_mismatch"],
            "models_fetched": self.counters["model_fetched"],
        }


# ----------------------------------------------------------------------------- one peer


class PeerTraining:
    """The federated part of one simulated peer: its :class:`TrainingCore` and the
    driver of its actions (the order :meth:`TrainingCore.take_actions` gives).

    Persists (in the peer's store, surviving crashes): the job value it trains
    (``fl/job``: the value and the epoch of its block, round 1's) and its last checkpoint
    (``fl/ckpt``: round, parameters and the next round's epoch),
    written when the core emits :class:`Checkpoint`, before any later action.
    """

    def __init__(self, host: PeerHost) -> None:
        self.host = host
        self.core: TrainingCore | None = None
        self.reputation = LocalReputation()
        self.incarnation = 0
        self.rejected: Counter[str] = Counter()

    @property
    def fed(self) -> Federation:
        return self.host.world.fed

    def reset(self) -> None:
        """The peer crashed: the core and everything in memory is gone."""
        self.core = None
        self.incarnation += 1

    def restore(self, committed: Iterable[tuple[bytes, int]], now: float) -> None:
        """(Re)start: rebuild the core from the stored job and checkpoint, replay the log
        (``(value, epoch of its block)``; the ideal log's one epoch, see
        :meth:`TrainingCore.on_committed`)."""
        self.reputation = LocalReputation()
        store = self.host.store
        job = store.get(b"fl/job")
        if job is not None:
            job_value, job_epoch = msgpack.unpackb(job, raw=False)
            raw = store.get(b"fl/ckpt")
            checkpoint = None
            if raw is not None:
                round_, params, next_epoch = msgpack.unpackb(raw, raw=False)
                checkpoint = (round_, _unpack_params(params), next_epoch)
            self._create(job_value, job_epoch, now, checkpoint)
        for value, epoch in committed:
            self.on_committed(value, now, epoch)

    def _create(self, job_value: bytes, epoch: int, now: float, checkpoint=None) -> None:
        fed = self.fed
        self.core = TrainingCore.for_committed_job(
            self.host.identity, self.host.network_id, job_value, {fed.table.epoch: fed.table}, now, epoch=epoch,
            config=TrainingConfig(fetch_interval_s=fed.setup.fetch_interval_s,
                                  checked_log=isinstance(self.host, BftTrainingPeer),
                                  sklearn_version=fed.sklearn_version),
            checkpoint=checkpoint)
        self.host.sim.log(f"{self.host.name} trains job {fed.job_index[self.core.job_id]}"
                          + (f" from checkpoint r={checkpoint[0]}" if checkpoint else ""))
        self.run(self.core.take_actions())

    # ------------------------------------------------------------ inputs

    def validate(self, value: bytes) -> bool:
        """The log's validity hook: a training value, valid for our core (if any)."""
        if self.core is not None:
            return self.core.validate_log_value(value)  # False for a malformed value too
        try:
            decode_log_value(value)
        except MalformedError:
            return False
        return True

    def proposable(self, value: bytes, sender: str | None) -> bool:
        """The log's block-building policy for inclusions (as the node:
        :func:`~chimera.consensus.training.inclusion_proposable`; the job's spec from the
        federation's list, which holds every job the scenario proposes)."""
        return inclusion_proposable(value, sender, self._job_of, self.host.peer_id)

    def _job_of(self, job_id: bytes) -> JobSpec | None:
        j = self.fed.job_index.get(job_id)
        return None if j is None else self.fed.jobs[j]

    def on_committed(self, value: bytes, now: float, epoch: int) -> None:
        if self.core is None:
            try:
                rec = decode_log_value(value)
            except MalformedError:
                return
            if isinstance(rec, JobSpec) and self.host.peer_id in rec.participants \
                    and job_id_of(value) in self.fed.job_index:
                self.host.store.put(b"fl/job", msgpack.packb([value, epoch], use_bin_type=True))
                self._create(value, epoch, now)
            return
        self.core.on_committed(value, now, epoch=epoch)
        self.run(self.core.take_actions())

    def on_message(self, sender: str, msg: object, now: float) -> None:
        if self.core is None:
            return
        self.core.on_message(sender, msg, now)
        self.run(self.core.take_actions())

    def tick(self, now: float) -> None:
        if self.core is not None:
            self.core.tick(now)
            self.run(self.core.take_actions())

    def fetch_wanted(self, now: float) -> None:
        """Ask for the updates that a proposed inclusion names and we lack (as the node)."""
        if self.core is not None and self.core.wants_updates:
            self.core.fetch_wanted(now)
            self.run(self.core.take_actions())

    def deadline(self) -> float:
        return self.core.next_deadline() if self.core is not None else math.inf

    def local_done(self, incarnation: int, action: TrainLocal, params, fit: FitResult) -> None:
        """Local training of ``action`` finished (virtual time); ignored after a crash."""
        if incarnation != self.incarnation or not self.host.up or self.core is None:
            return
        self.core.on_local_result(action.job_id, action.round, params, fit, self.host.clock.now())
        self.run(self.core.take_actions())

    # ------------------------------------------------------------ actions

    def run(self, actions: list) -> None:
        host, fed, sim = self.host, self.fed, self.host.sim
        pending_obs: list[Observe] = []
        for action in actions:
            if not host.up or self.core is None:
                return
            kind = type(action)
            if kind is Broadcast or kind is Send:
                if kind is Broadcast:
                    targets = tuple(p for p in self.core.job.participants if p != host.peer_id)
                else:
                    targets = (action.peer_id,)
                outs = host.behaviour.outgoing(host, action.message, targets) \
                    if host.behaviour.byzantine else [Outgoing(targets, action.message)]
                host.emit(outs, host.world.address_of)
            elif kind is ProposeValue:
                host.propose(action.value)
            elif kind is TrainLocal:
                fed.train(self, action)
            elif kind is Checkpoint:
                host.store.put(b"fl/ckpt", msgpack.packb(
                    [action.round, _pack_params(action.params), action.next_epoch], use_bin_type=True))
                fed.on_checkpoint(host, action)
            elif kind is Observe:
                self.reputation.observe(action.peer_id, action.kind, host.clock.now())
                pending_obs.append(action)
            elif kind is TrainingEvent:
                if action.kind == "aggregated":
                    for obs in pending_obs:
                        fed.on_observe(host, obs, action.round)
                    pending_obs = []
                fed.on_event(host, action)
                if sim.trace is not None:
                    sim.log(f"{host.name} {action.describe()}")
            elif kind is Rejected:
                self.rejected[action.reason] += 1
                fed.counters[f"rejected_{action.reason}"] += 1
                sim.log(f"{host.name} {action.describe()}")
        if pending_obs and self.core is not None:
            for obs in pending_obs:
                fed.on_observe(host, obs, self.core.model_round + 1)
        host.rearm()


def _is_training_message(msg: object) -> bool:
    return isinstance(msg, TRAINING_MESSAGES)


# ----------------------------------------------------------------------------- ideal log


class IdealLog:
    """The simulated total-order log of ``training.log = "ideal"`` (module docstring).

    Args:
        world: the :class:`IdealTrainingWorld`.
        commit_latency_s: virtual seconds from a value entering an empty pool to its block (> 0).
    Raises:
        ValueError: ``commit_latency_s`` not > 0.
    """

    MAX_ATTEMPTS = 50
    """Blocks a value may be refused by the validity check before it is dropped."""

    def __init__(self, world: "IdealTrainingWorld", commit_latency_s: float) -> None:
        if not (math.isfinite(commit_latency_s) and commit_latency_s > 0):
            raise ValueError("commit_latency_s must be finite and > 0")
        self.world = world
        self.sim = world.sim
        self.latency_s = commit_latency_s
        self.pool: list[bytes] = []
        self._pooled: set[bytes] = set()
        self.committed: list[bytes] = []
        self._committed: set[bytes] = set()
        self._attempts: Counter[bytes] = Counter()
        self._cut_scheduled = False
        self.blocks = 0
        self.refused = 0
        self.dropped = 0

    def submit(self, value: bytes) -> bool:
        """Pool ``value`` (False: already pooled or committed)."""
        if value in self._pooled or value in self._committed:
            return False
        self.pool.append(value)
        self._pooled.add(value)
        if not self._cut_scheduled:
            self._cut_scheduled = True
            self.sim.schedule(self.sim.now + self.latency_s, self._cut)
        return True

    def _valid(self, value: bytes) -> bool:
        """Peers (index order) holding more than 2/3 of the weight find ``value`` valid."""
        world = self.world
        weights = world.table.weights
        need = 2 * world.table.total
        yes = 0
        for p in world.peers:
            if p.up and p.training.validate(value):
                yes += weights[p.peer_id]
                if 3 * yes > need:
                    return True
        return False

    def _cut(self) -> None:
        self._cut_scheduled = False
        block = sorted(self.pool, key=lambda v: hashlib.sha256(v).digest())
        self.pool, self._pooled = [], set()
        accepted, retry = [], []
        for value in block:
            if self._valid(value):
                accepted.append(value)
            else:
                self.refused += 1
                self._attempts[value] += 1
                if self._attempts[value] < self.MAX_ATTEMPTS:
                    retry.append(value)
                else:
                    self.dropped += 1
        self.blocks += 1
        for value in accepted:
            self.committed.append(value)
            self._committed.add(value)
            self._attempts.pop(value, None)
        if self.sim.trace is not None and accepted:
            self.sim.log(f"log block {self.blocks}: {len(accepted)} values committed, {len(retry)} retried")
        for value in retry:
            self.submit(value)
        for value in accepted:
            for peer in self.world.peers:
                if peer.up:
                    peer.training.on_committed(value, peer.clock.now(), self.world.table.epoch)


class IdealTrainingPeer(PeerHost):
    """A peer with a training core over the :class:`IdealLog`."""

    def __init__(self, world: "IdealTrainingWorld", index: int, behaviour: Behaviour | None = None) -> None:
        super().__init__(world, index, behaviour)
        self.training = PeerTraining(self)

    epoch = 0  # behaviours' context: the weight table in force

    def honest_peer_ids(self):
        return self.world.honest_ids

    def start(self) -> None:
        self.boot()
        self.sim.log(f"start {self.name}")
        self.training.restore(((v, self.world.table.epoch) for v in self.world.log.committed), self.clock.now())

    def crash(self) -> None:
        super().crash()
        self.training.reset()

    def on_envelope(self, envelope: Envelope) -> None:
        if _is_training_message(envelope.message):
            self.training.on_message(envelope.sender, envelope.message, self.clock.now())

    def on_wake(self, now: float) -> None:
        self.training.tick(now)

    def propose(self, value: bytes) -> None:
        out = self.behaviour.log_value(self, value)
        if out is not None and self.up:
            self.world.log.submit(out)

    def rearm(self) -> None:
        if self.up:
            self.wake_at(self.training.deadline())


class IdealTrainingWorld(World):
    """Peers with training cores over the simulated total-order log.

    Args:
        sim, network: engine and network.
        setup: :class:`TrainingSetup` (``log`` is ignored: this is the ideal log).
        behaviours: one per peer (index order).
    """

    def __init__(self, sim: Simulator, network: SimNetwork, setup: TrainingSetup, behaviours: list[Behaviour], *,
                 skew: SkewSpec | None = None) -> None:
        super().__init__(sim, network, skew=skew)
        self.peers = [IdealTrainingPeer(self, i, b) for i, b in enumerate(behaviours)]
        self.by_id = {p.peer_id: p for p in self.peers}
        self.honest_ids = tuple(p.peer_id for p in self.peers if not p.behaviour.byzantine)
        self.table = WeightTable(epoch=0, weights={p.peer_id: PEER_WEIGHT for p in self.peers})
        self.fed = Federation(sim, setup, self.peers, self.table, self.network_id)
        self.log = IdealLog(self, setup.commit_latency_s)

    def start_all(self) -> None:
        for peer in self.peers:
            peer.start()
        self.fed.propose_jobs()

    def crash(self, peer: IdealTrainingPeer) -> None:
        if peer.up:
            peer.crash()

    def restart(self, peer: IdealTrainingPeer) -> None:
        if not peer.up:
            peer.start()

    def metrics(self) -> dict:
        row = self.fed.metrics()
        row.update({"log_values_committed": len(self.log.committed), "log_blocks": self.log.blocks,
                    "log_refused": self.log.refused, "log_dropped": self.log.dropped})
        return row


# ----------------------------------------------------------------------------- BFT log


class BftTrainingPeer(BftPeer):
    """A validator (real :class:`BftCore`) that also runs a training core over its log."""

    def __init__(self, world: "BftTrainingWorld", index: int, behaviour: Behaviour | None = None) -> None:
        super().__init__(world, index, behaviour)
        self.training = PeerTraining(self)
        self._in_actions = False
        self._proposals: list[bytes] = []

    def start(self) -> None:
        super().start()
        values = []
        for _, raw in self.store.scan(b"commit/"):
            commit = decode_fields(CertifiedCommit, msgpack.unpackb(raw, raw=False))
            values.extend((v, commit.block.epoch) for v in commit.block.values
                          if not v.startswith(OPINION_PREFIX))
        self.training.restore(values, self.clock.now())

    def crash(self) -> None:
        super().crash()
        self.training.reset()

    def on_envelope(self, envelope: Envelope) -> None:
        if _is_training_message(envelope.message):
            if self.core is not None:
                self.training.on_message(envelope.sender, envelope.message, self.clock.now())
                self._after_input(self.clock.now())
            return
        super().on_envelope(envelope)
        self._after_input(self.clock.now())

    def on_wake(self, now: float) -> None:
        super().on_wake(now)
        self.training.tick(now)
        self._after_input(now)

    def _after_input(self, now: float) -> None:
        """As the node: an update that arrived may decide a proposal waiting on it; then ask
        for the updates a proposed inclusion names and we lack (the check just made may
        have found some)."""
        if self.core is not None and self.core.awaiting_values:
            self.core.recheck(now)
            self.run_actions(self.core.take_actions())
        self.training.fetch_wanted(now)

    def wake_at(self, deadline_local: float) -> None:
        PeerHost.wake_at(self, min(deadline_local, self.training.deadline()))

    def rearm(self) -> None:
        if self.core is not None:
            PeerHost.wake_at(self, min(self.core.next_deadline(), self._next_flood, self.training.deadline()))

    def propose(self, value: bytes) -> None:
        if self.core is None:
            return
        if self._in_actions:  # submit after the batch being run (its ordering duties first)
            self._proposals.append(value)
            return
        self.bworld.submit(self, value)

    def run_actions(self, actions: list) -> None:
        outer = not self._in_actions
        self._in_actions = True
        try:
            super().run_actions(actions)
        finally:
            if outer:
                self._in_actions = False
        if outer:
            while self._proposals and self.core is not None:
                batch, self._proposals = self._proposals, []
                for value in batch:
                    self.bworld.submit(self, value)

    def _after_commit(self, action: Commit) -> None:
        super()._after_commit(action)
        now = self.clock.now()
        for value in action.commit.block.values:
            if not value.startswith(OPINION_PREFIX) and self.core is not None:
                self.training.on_committed(value, now, action.commit.block.epoch)


class BftTrainingWorld(BftWorld):
    """Validators running the BFT log core and a training core each (fixed equal weights).

    Args:
        sim, network: engine and network.
        setup: :class:`TrainingSetup`.
        behaviours: one per peer.
        config: the BFT core's timeouts.
    """

    def __init__(self, sim: Simulator, network: SimNetwork, setup: TrainingSetup, behaviours: list[Behaviour],
                 config: BftConfig, *, skew: SkewSpec | None = None) -> None:
        super().__init__(sim, network, config, [PEER_WEIGHT] * len(behaviours), behaviours=behaviours,
                         skew=skew, core_class=self._make_core)
        # the base class built plain validators; the same peers (index, identity, behaviour) with training:
        self.peers = [BftTrainingPeer(self, i, b) for i, b in enumerate(behaviours)]
        self.by_id = {p.peer_id: p for p in self.peers}
        self.honest = [p for p in self.peers if not p.behaviour.byzantine]
        self.honest_ids = tuple(p.peer_id for p in self.honest)
        self.table = self.genesis_table
        self.fed = Federation(sim, setup, self.peers, self.table, self.network_id)

    def _make_core(self, identity, *args, validate_value=None, **kwargs) -> BftCore:
        """The real BftCore with the validity hook of this validator's training core (and the
        node's block-building policy for inclusions)."""
        training = self.by_id[identity.peer_id].training
        return BftCore(identity, *args, validate_value=training.validate, choice_key=inclusion_choice,
                       proposable=training.proposable, **kwargs)

    def start_all(self) -> None:
        super().start_all()
        self.fed.propose_jobs()

    def metrics(self) -> dict:
        row = self.fed.metrics()
        bft = super().metrics()
        row.update({"heights": bft["heights"], "block_interval_mean_s": bft["block_interval_mean_s"],
                    "log_commit_latency_p50_s": bft["commit_latency_p50_s"],
                    "log_values_committed": bft["values_committed"]})
        return row


def make_world(sim: Simulator, network: SimNetwork, setup: TrainingSetup, behaviours: list[Behaviour], *,
               bft_config: BftConfig | None = None, skew: SkewSpec | None = None):
    """An :class:`IdealTrainingWorld` or a :class:`BftTrainingWorld` per ``setup.log``."""
    if setup.log == "bft":
        return BftTrainingWorld(sim, network, setup, behaviours, bft_config or BftConfig(), skew=skew)
    return IdealTrainingWorld(sim, network, setup, behaviours, skew=skew)


__all__ = ["BftTrainingWorld", "Federation", "IdealLog", "IdealTrainingWorld", "PeerTraining", "TrainingSetup",
           "default_quorum", "digits_federation", "make_world", "shared_training_verification"]
