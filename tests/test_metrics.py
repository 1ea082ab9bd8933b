"""Prometheus exporter: real HTTP scrape of a running peer; dashboard queries match it."""

from __future__ import annotations

import asyncio
import json
import re
import select
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from chimera.node.config import NodeConfig
from chimera.protocol.diagnostics import EchoRequest
from tests.conftest import FAST, async_wait_until

pytest.importorskip("prometheus_client")

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "chimera-mesh.json"


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


async def test_metrics_endpoint_reports_live_state(node_factory):
    a = await node_factory("a", NodeConfig(**FAST, metrics_port=0))
    b = await node_factory("b", NodeConfig(**FAST).replace(bootstrap=(a.contact_uri,)))
    assert await async_wait_until(lambda: b.peer_id in a.routes and len(a.peers()) == 1
                                  and a.peers()[0]["rtt_ms"] is not None, 30)
    url = a.status()["metrics_url"]
    assert url and url.startswith("http://127.0.0.1:")
    text = await asyncio.to_thread(_scrape, url)
    assert 'chimera_members{state="alive"} 1.0' in text
    assert re.search(r"chimera_envelopes_accepted_total [1-9]", text)
    assert f'chimera_member_rtt_seconds{{peer_id="{b.peer_id}"}}' in text
    assert f'peer_id="{a.peer_id}"' in text and "chimera_resident_memory_bytes" in text
    # a replayed frame shows up as a labelled drop
    frame = b._seal(EchoRequest(nonce=1, reply=False), a.peer_id)
    b.transport.send(a.transport_keys.public, a.contact.addresses[0], frame)
    b.transport.send(a.transport_keys.public, a.contact.addresses[0], frame)
    assert await async_wait_until(lambda: a.counters["drop_replay"] == 1, 20)
    text = await asyncio.to_thread(_scrape, url)
    assert 'chimera_envelopes_dropped_total{reason="replay"} 1.0' in text
    # every other counter is exported by name (discovery, fabric refusals were invisible)
    assert re.search(r'chimera_node_counter_total\{name="membership_[a-z_]+"\} [0-9]', text) or \
        re.search(r'chimera_node_counter_total\{name="[a-z0-9_.]+"\}', text)
    a.counters["discovery_readvertised"] += 2
    text = await asyncio.to_thread(_scrape, url)
    assert 'chimera_node_counter_total{name="discovery_readvertised"} 2.0' in text
    assert 'chimera_node_counter_total{name="drop_replay"}' not in text  # has its own family


async def test_a_metrics_port_in_use_is_a_start_error_that_names_the_setting(tmp_path, network):
    """It was "chimera: [Errno 98] Address already in use", which reads as the node's own
    port, and the node exited without closing what it had opened."""
    import socket

    from chimera.node.runtime import Node, NodeStartError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = Node(tmp_path / "a", NodeConfig(**FAST, metrics_port=port), network)
        with pytest.raises(NodeStartError, match=f"metrics exporter on 127.0.0.1:{port} "
                                                 r"\(metrics_host, metrics_port\): Address already in use"):
            await node.start()
    again = Node(tmp_path / "a", NodeConfig(**FAST, metrics_port=0), network)  # the data dir was released
    await again.start()
    try:
        assert again.metrics_server is not None
    finally:
        await again.stop()


def _closed_by_server(socks: list[socket.socket], deadline_s: float) -> set[socket.socket]:
    """The sockets the server closed (EOF or reset) within ``deadline_s`` seconds."""
    closed: set[socket.socket] = set()
    end = time.monotonic() + deadline_s
    while len(closed) < len(socks) and time.monotonic() < end:
        readable, _, _ = select.select([c for c in socks if c not in closed], [], [], 0.2)
        for c in readable:
            try:
                data = c.recv(4096)
            except OSError:  # reset: refused with the request unread
                data = b""
            if not data:
                closed.add(c)
    return closed


async def test_half_sent_requests_hold_no_more_than_the_cap_and_time_out_while_scrapes_are_answered(
        node_factory, monkeypatch):
    """Each connection had its own thread without limit or timeout: 400 half-sent requests
    held 400 threads until the clients left. Now at most MAX_CONNECTIONS are served, a scrape
    is answered during the flood (the longest-waiting slow connection makes room), and the
    slow ones are closed after REQUEST_TIMEOUT_S, counted."""
    from chimera.node import metrics

    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT_S", 3.0)
    a = await node_factory("a", NodeConfig(**FAST, metrics_port=0))
    url = a.status()["metrics_url"]
    port = a.metrics_server.server_port
    await asyncio.to_thread(_scrape, url)
    def serving() -> int:  # the exporter's connection threads (ThreadingMixIn names them so); other
        # threads (asyncio's default executor, the fabric's pool) come and go on their own
        return sum("process_request_thread" in t.name for t in threading.enumerate())

    assert await async_wait_until(lambda: serving() == 0, 20)

    def flood(n: int) -> list[socket.socket]:
        socks = []
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"GET /metrics HTTP/1.1\r\n")  # the headers never end
            socks.append(c)
        return socks

    socks = await asyncio.to_thread(flood, 200)
    try:
        assert serving() <= metrics.MAX_CONNECTIONS + 1
        # (the accept thread may still be sorting the listen backlog: a place is free for a moment
        # after each eviction)
        assert await async_wait_until(lambda: a.metrics_server.open_connections() == metrics.MAX_CONNECTIONS, 10)
        text = await asyncio.to_thread(_scrape, url)  # every place is held by a slow client
        assert 'chimera_members{state="alive"}' in text
        assert serving() <= metrics.MAX_CONNECTIONS + 1
        # every slow connection is closed by the server: made room for a newer one, or timed out
        closed = await asyncio.to_thread(_closed_by_server, socks, 30)
        assert len(closed) == len(socks)
        assert await async_wait_until(lambda: a.counters["metrics_connections_timed_out"] >= 1
                                      and a.counters["metrics_connections_evicted"]
                                      + a.counters["metrics_connections_refused"]
                                      + a.counters["metrics_connections_timed_out"] >= len(socks), 20)
        assert a.metrics_server.open_connections() <= 1
        text = await asyncio.to_thread(_scrape, url)
        assert re.search(r'chimera_node_counter_total\{name="metrics_connections_evicted"\} [1-9]', text)
        assert await async_wait_until(lambda: serving() == 0, 20), [t.name for t in threading.enumerate()]
    finally:
        for c in socks:
            c.close()


async def test_a_request_dripped_byte_by_byte_is_closed_at_the_deadline(node_factory, monkeypatch):
    """A per-read timeout alone would let a client that sends a byte every second hold its
    thread for ever; the deadline counts from accept."""
    from chimera.node import metrics

    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT_S", 2.0)
    a = await node_factory("a", NodeConfig(**FAST, metrics_port=0))
    port = a.metrics_server.server_port

    def drip() -> float:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET /metrics HTTP/1.1\r\n")
            while time.monotonic() - start < 30:
                try:
                    c.sendall(b"X")
                except OSError:
                    break
                if _closed_by_server([c], 0.5):
                    break
            return time.monotonic() - start

    held_s = await asyncio.to_thread(drip)
    assert 2.0 <= held_s < 8.0
    assert await async_wait_until(lambda: a.counters["metrics_connections_timed_out"] == 1, 20)
    text = await asyncio.to_thread(_scrape, a.status()["metrics_url"])
    assert "chimera_uptime_seconds" in text


async def test_consensus_reputation_and_process_metrics_match_the_node(tmp_path):
    """Three validators; a decision committed; the scrape, parsed by prometheus_client's own text
    parser, agrees with the node's state (height, weights, commit latency count, CPU)."""
    from prometheus_client.parser import text_string_to_metric_families

    from chimera.node.keys import load_or_create_identity
    from chimera.node.runtime import Node
    from chimera.protocol.network import Network

    ids = [load_or_create_identity(tmp_path / f"n{i}").peer_id for i in range(3)]
    net = Network.create("m", genesis=ids)
    fast = dict(consensus_commit_wait_s=0.05, consensus_propose_timeout_s=1.0, consensus_vote_timeout_s=0.5)
    nodes = []
    try:
        for i in range(3):
            cfg = NodeConfig(**FAST, **fast, **({"metrics_port": 0} if i == 0 else {}))
            node = Node(tmp_path / f"n{i}", cfg, net)
            await node.start()
            nodes.append(node)
        for node in nodes[1:]:
            node.add_contact_uri(nodes[0].contact_uri, static=True)
            node.run_membership_actions()
        a = nodes[0]
        for k in range(3):
            await a.consensus.propose(f"metrics {k}".encode(), 60)
        # a request the core leaves unanswered (no proposal of round 1000 here): a counted drop
        from chimera.consensus.bft import BftProposalRequest

        dropped = sum(a.consensus.core.drops.values())
        nodes[1].send(a.peer_id, BftProposalRequest(height=a.consensus.core.height, round=1000))
        assert await async_wait_until(lambda: sum(a.consensus.core.drops.values()) > dropped, 20)
        text = await asyncio.to_thread(_scrape, a.status()["metrics_url"])
        families = {f.name: f for f in text_string_to_metric_families(text)}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in families.values() for s in f.samples}
        assert samples[("chimera_consensus_height", ())] >= 3
        assert samples[("chimera_consensus_height", ())] <= a.consensus.height
        assert samples[("chimera_consensus_commit_latency_seconds_count", ())] >= 3
        assert samples[("chimera_consensus_commit_latency_seconds_bucket", (("le", "+Inf"),))] >= 3
        assert samples[("chimera_consensus_values_committed_total", ())] >= 3
        for peer_id, weight in a.consensus.core.table.weights.items():
            assert samples[("chimera_reputation_weight", (("peer_id", peer_id),))] == weight
        assert samples[("chimera_process_cpu_seconds_total", ())] > 0
        assert samples[("chimera_consensus_events_total", (("kind", "committed"),))] >= 3
        drops = {dict(labels)["reason"]: v for (name, labels), v in samples.items()
                 if name == "chimera_consensus_drops_total"}
        assert sum(drops.values()) > dropped
        assert all(0 < v <= a.consensus.core.drops[reason] for reason, v in drops.items())
        assert a.status()["consensus"]["drops"].keys() >= drops.keys()
        assert families["chimera_consensus_commit_latency_seconds"].type == "histogram"
        # the durable writes each height waits for: a commit store per stored height, a
        # sign-state sync before each height's votes left (coalesced per action batch)
        writes = a.status()["consensus"]["durable_writes"]
        stores = samples[("chimera_consensus_commit_store_seconds_count", ())]
        assert a.consensus.height <= stores <= writes["commit"]["count"]
        assert samples[("chimera_consensus_sign_state_sync_seconds_count", ())] >= 3
        assert 0 < samples[("chimera_consensus_commit_store_seconds_sum", ())] <= writes["commit"]["total_s"] + 1e-6
        assert samples[("chimera_consensus_sign_state_sync_seconds_bucket", (("le", "0.0001"),))] <= \
            samples[("chimera_consensus_sign_state_sync_seconds_bucket", (("le", "+Inf"),))]
        assert families["chimera_consensus_sign_state_sync_seconds"].type == "histogram"
    finally:
        for node in nodes:
            await node.stop()


def test_grafana_dashboard_queries_only_exported_metrics():
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 6
    exported = {"chimera_envelopes_accepted_total", "chimera_frames_received_total",
                "chimera_frames_sent_total", "chimera_envelopes_dropped_total",
                "chimera_handshakes_total", "chimera_membership_events_total", "chimera_members",
                "chimera_member_rtt_seconds", "chimera_local_health", "chimera_incarnation",
                "chimera_uptime_seconds", "chimera_resident_memory_bytes", "chimera_actor_crashes_total",
                "chimera_info", "chimera_consensus_commit_latency_seconds_bucket", "chimera_consensus_height",
                "chimera_consensus_values_committed_total", "chimera_reputation_weight",
                "chimera_training_accuracy", "chimera_fabric_tasks_total",
                "chimera_fabric_task_latency_seconds_bucket", "chimera_fabric_gpu_utilization_percent",
                "chimera_process_cpu_seconds_total", "chimera_consensus_events_total",
                "chimera_consensus_rejected_total", "chimera_consensus_drops_total",
                "chimera_consensus_sign_state_sync_seconds_bucket", "chimera_consensus_commit_store_seconds_bucket"}
    for expr in exprs:
        names = set(re.findall(r"chimera_[a-z_]+", expr))
        assert names and names <= exported, expr
