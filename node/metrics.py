"""Prometheus metrics of a peer (optional extra ``[metrics]``: prometheus_client).

Metrics are read from the node's state at scrape time by a custom collector, so
nothing is counted twice and the hot path pays nothing. Served over HTTP by
``prometheus_client.start_http_server`` on ``metrics_host:metrics_port`` (off by
default; ``127.0.0.1`` unless configured otherwise: metrics reveal peer ids and
addresses).

Names (all prefixed ``chimera_``):

* ``envelopes_accepted_total``, ``frames_received_total``, ``frames_sent_total``
* ``envelopes_dropped_total{reason}``: every ``drop_<reason>`` counter
* ``handshakes_total{result="admitted"|"refused"}``
* ``membership_events_total{kind}``
* ``members{state}``: members per SWIM state; ``member_rtt_seconds{peer_id}``
* ``local_health``, ``incarnation``, ``uptime_seconds``, ``resident_memory_bytes``
* ``actor_crashes_total{actor}``, ``info{peer_id,profile,network}`` (value 1)
* ``process_cpu_seconds_total`` (user + system CPU of the peer process)
* ``node_counter_total{name}``: every other counter of the node's ``status`` counters
  (discovery, fabric refusals, joins deferred, ...) under its name, names of the
  code's fixed sets only (``[a-z0-9_.]``, at most :data:`MAX_GENERIC_COUNTERS`)
* consensus: ``consensus_height``, ``consensus_epoch``, ``consensus_commits_total``,
  ``consensus_values_committed_total``, ``consensus_rejected_total{reason}`` (input
  rejected, a fault of its sender), ``consensus_drops_total{reason}`` (messages the core
  dropped or left unanswered without blaming anyone), ``consensus_events_total{kind}``
  (the core's events: rounds, timeouts, fetches, polls; reasons and kinds are
  PROTOCOL.md §14.13's fixed names), ``consensus_commit_latency_seconds`` (histogram:
  submission of this peer's own values to their stored commit),
  ``reputation_weight{peer_id}`` (committed voting weight of the epoch; validators only),
  ``reputation_local_score{peer_id}`` (this peer's Beta score in [0, 1])
* training: ``training_round{job}``, ``training_accuracy{job}``, ``training_loss{job}``
  (the latest certified round of each job; ``job`` is the 16-hex-digit job id prefix,
  the newest 8 jobs)
* fabric: ``fabric_*`` capacity and GPU gauges (memory used/total bytes, utilization
  percent per GPU index), ``fabric_task_latency_seconds`` (histogram, submission to the
  accepted or failed outcome of tasks submitted here), ``fabric_tasks_total{module,outcome}``
  (``module``: the first 12 hex digits of the module's SHA-256, at most 64 distinct, then
  ``other``; ``outcome``: accepted | failed)

Label sets are bounded: peer ids of the validator set or the membership (local
reputation keeps no entry for any other key, and at most 4096), at most 8 jobs, at
most 65 modules.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import re
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from .runtime import Node

log = logging.getLogger("chimera.metrics")

MAX_GENERIC_COUNTERS = 1024
_OWN_FAMILY = ("envelopes_accepted", "frames_received", "frames_sent", "handshakes_admitted",
               "handshakes_refused", "consensus_commits", "consensus_values_committed")
_OWN_PREFIXES = ("drop_", "actor_crashes.", "events.", "consensus_rejected.", "consensus_events.")
_COUNTER_NAME = re.compile(r"[a-z0-9_.]{1,96}")


class LatencyHistogram:
    """Durations in seconds counted into fixed buckets (exported as a Prometheus histogram).

    Kept by the services without prometheus_client (the extra may be absent);
    :meth:`cumulative` gives the ``le`` buckets Prometheus expects.
    """

    BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS_S) + 1)  # the last bucket: above every bound
        self.sum_s = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        self.counts[bisect.bisect_left(self.BOUNDS_S, seconds)] += 1
        self.sum_s += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count of observations <= le), ..., ("+Inf", count)]``."""
        out, total = [], 0
        for bound, n in zip(self.BOUNDS_S, self.counts):
            total += n
            out.append((repr(bound), total))
        out.append(("+Inf", self.count))
        return out


class NodeCollector:
    """A prometheus_client collector over one :class:`~chimera.node.runtime.Node`."""

    def __init__(self, node: "Node") -> None:
        self.node = node

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        node = self.node
        # Scrapes run on the exporter's thread; the node's state belongs to the
        # event loop, so the snapshot is taken there.
        future = asyncio.run_coroutine_threadsafe(_snapshot(node), node.loop)
        counters, status, peers, reputation, training = future.result(timeout=10)
        for name, help_ in (("envelopes_accepted", "Envelopes that passed every check"),
                            ("frames_received", "Frames received on the ROUTER"),
                            ("frames_sent", "Frames queued on outbound connections")):
            yield CounterMetricFamily(f"chimera_{name}", help_, value=counters.get(name, 0))
        yield _by_prefix(counters, "drop_", "chimera_envelopes_dropped", "Dropped input by reason", "reason")
        yield _by_prefix(counters, "actor_crashes.", "chimera_actor_crashes", "Actor crashes", "actor")
        yield _by_prefix(counters, "events.", "chimera_membership_events", "Membership events", "kind")
        handshakes = CounterMetricFamily("chimera_handshakes", "CURVE handshakes", labels=["result"])
        handshakes.add_metric(["admitted"], counters.get("handshakes_admitted", 0))
        handshakes.add_metric(["refused"], counters.get("handshakes_refused", 0))
        yield handshakes
        members = GaugeMetricFamily("chimera_members", "Members by SWIM state", labels=["state"])
        for state, count in status["members"].items():
            members.add_metric([state], count)
        yield members
        rtt = GaugeMetricFamily("chimera_member_rtt_seconds", "Smoothed probe round trip",
                                labels=["peer_id"])
        for row in peers:
            if row["rtt_ms"] is not None and row["state"] in ("alive", "suspect"):
                rtt.add_metric([row["peer_id"]], row["rtt_ms"] / 1000)
        yield rtt
        for name, help_, value in (
                ("local_health", "Lifeguard local health multiplier (0 = healthy)", status["local_health"]),
                ("incarnation", "This peer's SWIM incarnation", status["incarnation"]),
                ("uptime_seconds", "Seconds since start", status["uptime_s"]),
                ("resident_memory_bytes", "Resident set size", status["rss_bytes"])):
            yield GaugeMetricFamily(f"chimera_{name}", help_, value=value)
        yield CounterMetricFamily("chimera_process_cpu_seconds", "User + system CPU of this peer",
                                  value=status.get("cpu_s", 0.0))
        yield from _consensus_families(node, counters, reputation, status)
        yield from _training_families(training)
        if getattr(node, "fabric", None) is not None:  # advertised capacity, GPUs, task slots, tasks
            yield from node.fabric.metric_families()
            yield _histogram("chimera_fabric_task_latency_seconds",
                             "Submission to outcome of tasks submitted here", node.fabric.task_latency)
            tasks = CounterMetricFamily("chimera_fabric_tasks", "Tasks submitted here by module and outcome",
                                        labels=["module", "outcome"])
            for (module, outcome), n in sorted(node.fabric.task_outcomes.items()):
                tasks.add_metric([module, outcome], n)
            yield tasks
        yield _generic_counters(status["counters"])
        yield InfoMetricFamily("chimera", "This peer", value={
            "peer_id": node.peer_id, "profile": node.config.profile, "network": node.network.fingerprint()})


def _histogram(name: str, help_: str, hist: LatencyHistogram):
    from prometheus_client.core import HistogramMetricFamily

    return HistogramMetricFamily(name, help_, buckets=hist.cumulative(), sum_value=hist.sum_s)


def _by_prefix(counters: dict, prefix: str, name: str, help_: str, label: str):
    """A counter family with one sample per key of ``counters`` starting with ``prefix``
    (the rest of the key is the ``label`` value)."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, help_, labels=[label])
    for key, value in counters.items():
        if key.startswith(prefix):
            family.add_metric([key[len(prefix):]], value)
    return family


def _generic_counters(counters: dict):
    """``chimera_node_counter_total{name}``: the counters no other family exports."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily("chimera_node_counter", "Other node counters by name (status counters)",
                                 labels=["name"])
    names = sorted(k for k in counters if k not in _OWN_FAMILY and not k.startswith(_OWN_PREFIXES)
                   and _COUNTER_NAME.fullmatch(k))
    for name in names[:MAX_GENERIC_COUNTERS]:
        family.add_metric([name], counters[name])
    return family


def _consensus_families(node: "Node", counters: dict, reputation: dict | None, status: dict) -> Iterator:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    service = getattr(node, "consensus", None)
    if service is None or reputation is None:
        return
    yield GaugeMetricFamily("chimera_consensus_height", "Last committed height", value=reputation["height"])
    yield GaugeMetricFamily("chimera_consensus_epoch", "Epoch of the weight table in force",
                            value=reputation["epoch"])
    yield CounterMetricFamily("chimera_consensus_commits", "Heights committed by this peer",
                              value=counters.get("consensus_commits", 0))
    yield CounterMetricFamily("chimera_consensus_values_committed", "Log values committed",
                              value=counters.get("consensus_values_committed", 0))
    yield _by_prefix(counters, "consensus_rejected.", "chimera_consensus_rejected",
                     "Consensus input rejected, by reason", "reason")
    yield _by_prefix(counters, "consensus_events.", "chimera_consensus_events",
                     "Consensus core events, by kind", "kind")
    yield _by_prefix((status.get("consensus") or {}).get("drops") or {}, "", "chimera_consensus_drops",
                     "Messages the consensus core dropped or left unanswered, by reason", "reason")
    yield _histogram("chimera_consensus_commit_latency_seconds",
                     "Submission of this peer's values to their stored commit", service.commit_latency)
    weight = GaugeMetricFamily("chimera_reputation_weight", "Committed voting weight (this epoch)",
                               labels=["peer_id"])
    score = GaugeMetricFamily("chimera_reputation_local_score", "This peer's Beta reputation score",
                              labels=["peer_id"])
    for row in reputation["peers"]:
        if row["weight"]:
            weight.add_metric([row["peer_id"]], row["weight"])
        score.add_metric([row["peer_id"]], row["local_score"])
    yield weight
    yield score


def _training_families(training: list[dict]) -> Iterator:
    from prometheus_client.core import GaugeMetricFamily

    if not training:
        return
    round_ = GaugeMetricFamily("chimera_training_round", "Latest certified round", labels=["job"])
    acc = GaugeMetricFamily("chimera_training_accuracy", "Accuracy of the latest certified model "
                            "on this peer's test data (0..1)", labels=["job"])
    loss = GaugeMetricFamily("chimera_training_loss", "Loss of the latest certified model", labels=["job"])
    for job in training[-8:]:
        label = [job["job_id"][:16]]
        round_.add_metric(label, job["model_round"])
        last = next((r for r in reversed(job.get("rounds", [])) if r.get("accuracy") is not None), None)
        if last is not None:
            acc.add_metric(label, last["accuracy"])
            if last.get("loss") is not None:
                loss.add_metric(label, last["loss"])
    yield round_
    yield acc
    yield loss


async def _snapshot(node: "Node") -> tuple[dict, dict, list, dict | None, list[dict]]:
    consensus = getattr(node, "consensus", None)
    reputation = consensus.reputation_rows() if consensus is not None else None
    training: list[dict] = []
    host = getattr(node, "training", None)
    service = getattr(host, "service", None) if host is not None else None
    if service is not None:
        states = sorted(service.jobs.values(), key=lambda s: s.height)
        training = [service.job_doc(s) for s in states]
    return dict(node.counters), node.status(), node.peers(), reputation, training


def serve(node: "Node", host: str, port: int) -> tuple[object, object] | None:
    """Start the HTTP exporter; None (logged) when prometheus_client is missing."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        log.warning("metrics_port set but prometheus_client is not installed "
                    "(pip install 'chimera-mesh[metrics]'); metrics are off")
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    server, thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread
