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
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from .runtime import Node

log = logging.getLogger("chimera.metrics")


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
        counters, status, peers = future.result(timeout=10)
        for name, help_ in (("envelopes_accepted", "Envelopes that passed every check"),
                            ("frames_received", "Frames received on the ROUTER"),
                            ("frames_sent", "Frames queued on outbound connections")):
            yield CounterMetricFamily(f"chimera_{name}", help_, value=counters.get(name, 0))
        dropped = CounterMetricFamily("chimera_envelopes_dropped", "Dropped input by reason",
                                      labels=["reason"])
        crashes = CounterMetricFamily("chimera_actor_crashes", "Actor crashes", labels=["actor"])
        events = CounterMetricFamily("chimera_membership_events", "Membership events", labels=["kind"])
        for key, value in counters.items():
            if key.startswith("drop_"):
                dropped.add_metric([key[5:]], value)
            elif key.startswith("actor_crashes."):
                crashes.add_metric([key.split(".", 1)[1]], value)
            elif key.startswith("events."):
                events.add_metric([key.split(".", 1)[1]], value)
        yield dropped
        yield crashes
        yield events
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
        if getattr(node, "fabric", None) is not None:  # advertised capacity, GPUs, task slots
            yield from node.fabric.metric_families()
        yield InfoMetricFamily("chimera", "This peer", value={
            "peer_id": node.peer_id, "profile": node.config.profile, "network": node.network.fingerprint()})


async def _snapshot(node: "Node") -> tuple[dict, dict, list]:
    return dict(node.counters), node.status(), node.peers()


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
