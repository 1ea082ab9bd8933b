"""Federated training in the node: the light entry point (``start_training``, admin commands).

The node calls :func:`start_training` once its consensus log runs. The
returned :class:`TrainingHost` is the ledger's ``app_validator`` for ``fl_*``
log values and a commit hook of the :class:`~chimera.node.consensus.ConsensusService`;
it loads the real :class:`~chimera.node.training_service.TrainingService`
(numpy, the round core and its ``fl_*`` wire messages; scikit-learn later,
when a job trains) on the first ``fl_*`` activity: a gossiped or committed
``fl_*`` value, ``train start``, or at start-up when the store holds a job. An
idle peer without training data therefore loads none of it (footprint); a peer
configured with training data (``training_data`` or ``training_digits_shard``)
loads the service, its data and scikit-learn at start, in a worker thread
(:meth:`~chimera.node.training_service.TrainingService.prepare`). Until then the ``fl_*``
message kinds are unknown to the envelope decoder and counted as drops; a
participant fetches any update it lacks once its round needs it.

Admin commands (:func:`training_admin_handlers`): ``train_start`` (args ``job``:
TOML text or a map, ``timeout_s``), ``train_status`` (``job``: id prefix or
name, optional), ``train_export`` (``job``: id prefix or name, optional; returns
the newest certified model as ``.npz`` bytes plus a JSON sidecar text and writes
no file on the node: ``chimera train export PATH`` writes both on the client).
"""

from __future__ import annotations

import asyncio
import logging

from . import admin as admin_api

log = logging.getLogger("chimera.training")


class TrainingHost:
    """Owns the node's training service, loading it on first use."""

    def __init__(self, node) -> None:
        self.node = node
        self.service = None
        node.consensus.ledger.app_validator = self.validate_value
        node.consensus.ledger.app_proposable = self.proposable
        node.consensus.commit_hooks.append(self.on_commit)
        if self._store_has_jobs():  # a restart: resume the jobs now
            self.load(node.store.last_height())
        if node.config.training_data or node.config.training_digits_shard:
            # configured to train: load the data and scikit-learn now, off the event loop, so
            # round 1 does not wait for them and a bad data file is reported at start
            self.load(node.store.last_height()).prepare()

    def _store_has_jobs(self) -> bool:
        db = self.node.store.db
        if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='fl_jobs'").fetchone() is None:
            return False
        return db.execute("SELECT 1 FROM fl_jobs LIMIT 1").fetchone() is not None

    def load(self, replay_until: int):
        """The service, created on first call (replaying the stored log up to ``replay_until``)."""
        if self.service is None:
            from .training_service import TrainingActor, TrainingService

            node = self.node
            self.service = TrainingService(node, replay_until)
            node.supervisor.spawn(TrainingActor(self.service))
            node._tasks.append(asyncio.get_running_loop().create_task(self.service.run_timer(),
                                                                      name="training-timer"))
            log.info("training service loaded")
        return self.service

    def validate_value(self, value: bytes) -> bool | None:
        """The ledger's ``app_validator`` (``fl_*`` values only; None: not yet decidable here)."""
        return self.load(self.node.store.last_height()).validate_value(value)

    def proposable(self, value: bytes, sender: str | None) -> bool:
        """The ledger's ``app_proposable`` (training inclusions only, already found valid)."""
        return self.load(self.node.store.last_height()).proposable(value, sender)

    def on_commit(self, height: int, outcome) -> None:
        """Commit hook: blocks with ``fl_*`` values (and, once loaded, new weight tables)."""
        if self.service is None and not outcome.app_values:
            return
        try:
            service = self.load(height - 1)  # this block is stored already: the hook applies it
        except Exception:
            self.node.counters["training_load_errors"] += 1
            log.exception("training service failed to load")
            return
        service.on_commit(height, outcome)


def start_training(node) -> TrainingHost:
    """Attach training to ``node`` (after its ConsensusService exists); sets ``node.training``."""
    node.training = TrainingHost(node)
    return node.training


def training_admin_handlers(node) -> dict:
    """Admin commands ``train_start``, ``train_status``, ``train_export`` of ``node``."""

    def host() -> TrainingHost:
        found = getattr(node, "training", None)
        if found is None:
            raise admin_api.AdminError("this node runs no consensus log, so no training (the network has "
                                       "no genesis validators, or consensus = false)")
        return found

    async def train_start(args: dict) -> dict:
        timeout_s = admin_api.float_arg(args, "timeout_s", 60.0, 0.1, 600.0)
        service = host().load(node.store.last_height())
        return await service.start_job(args.get("job"), timeout_s)

    async def train_status(args: dict) -> dict:
        service = host().service
        if service is None:
            if admin_api.str_arg(args, "job", None, max_len=64):
                raise admin_api.AdminError("no training job has been committed")
            return {"peer_id": node.peer_id, "jobs": [], "bytes_sent": 0,
                    "data": {"state": "not_loaded", "train_samples": None, "test_samples": None, "error": None}}
        ref = admin_api.str_arg(args, "job", None, max_len=64)
        states = [service.find(ref)] if ref else sorted(service.jobs.values(), key=lambda s: s.height)
        return {"peer_id": node.peer_id, "jobs": [service.job_doc(s) for s in states],
                "bytes_sent": node.counters.get("training_bytes_sent", 0), "data": service.data_status()}

    async def train_export(args: dict) -> dict:
        service = host().service
        if service is None:
            raise admin_api.AdminError("no training job has been committed")
        return service.export(admin_api.str_arg(args, "job", None, max_len=64))

    return {"train_start": train_start, "train_status": train_status, "train_export": train_export}
