"""Prometheus metrics of a peer (optional extra ``[metrics]``: prometheus_client).

Metrics are read from the node's state at scrape time by a custom collector, so
nothing is counted twice and the hot path pays nothing. Served over HTTP
(prometheus_client's ``make_wsgi_app`` on a threading wsgiref server) on
``metrics_host:metrics_port`` (off by default; ``127.0.0.1`` unless configured
otherwise: metrics reveal peer ids and addresses).

The exporter bounds what a client can hold (it was a thread per connection, without
limit or timeout: 400 half-sent requests held 400 threads):

* at most :data:`MAX_CONNECTIONS` (16) connections are served at once, one thread each;
* a connection whose request is not complete :data:`REQUEST_TIMEOUT_S` (10 s) after it
  was accepted is closed (counter ``metrics_connections_timed_out``); every socket
  operation of a connection times out after the same time (a client that does not
  read its answer);
* a connection arriving while all are taken closes the one that has waited longest
  for its request to complete (``metrics_connections_evicted``), so a scrape, whose
  request arrives at once, is answered while slow clients hold every place; when all
  are answering, it is closed at once (``metrics_connections_refused``).

The counters are the node's (``status`` counters, ``chimera_node_counter_total{name}``).

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
  ``consensus_sign_state_sync_seconds`` and ``consensus_commit_store_seconds`` (histograms
  of the durable writes every height waits for: the sign state before each signature
  leaves, the commit before anything acts on it; a slow disk shows here first),
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
import socket
import sys
import threading
import time
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

if TYPE_CHECKING:
    from .runtime import Node

log = logging.getLogger("chimera.metrics")

MAX_GENERIC_COUNTERS = 1024
MAX_CONNECTIONS = 16  # connections of the HTTP exporter served at once (one thread each)
REQUEST_TIMEOUT_S = 10.0  # a request not complete this long after accept is closed
EVICT_WAIT_S = 2.0  # longest the accept loop waits for a closed connection's thread to end
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
    # durable writes (an fdatasync, a SQLite commit): 0.1 ms on a quiet SSD, 10-100 ms on an SD card
    DISK_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

    def __init__(self, bounds_s: tuple[float, ...] | None = None) -> None:
        """``bounds_s``: increasing bucket upper bounds in seconds (default :data:`BOUNDS_S`)."""
        if bounds_s is not None:
            self.BOUNDS_S = tuple(bounds_s)
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
    yield _histogram("chimera_consensus_sign_state_sync_seconds",
                     "Writing and syncing the sign state before a signature is sent", service.sign_state_sync)
    yield _histogram("chimera_consensus_commit_store_seconds",
                     "Storing a commit durably (one SQLite transaction)", service.commit_store)
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
    """Start the HTTP exporter on ``host:port`` (0: any free port) in a daemon thread.

    Returns ``(server, thread)``; the server has ``server_port``, ``shutdown()`` and
    ``server_close()``. None (logged) when prometheus_client is missing. Raises
    :class:`OSError` when the address cannot be bound or resolved (port in use, host
    not of this machine). Limits: :data:`MAX_CONNECTIONS`, :data:`REQUEST_TIMEOUT_S`
    (read when called).
    """
    try:
        from prometheus_client import CollectorRegistry, make_wsgi_app
    except ImportError:
        log.warning("metrics_port set but prometheus_client is not installed "
                    "(pip install 'chimera-mesh[metrics]'); metrics are off")
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
    server = BoundedWSGIServer((sockaddr[0], port), family, make_wsgi_app(registry),
                               max_connections=MAX_CONNECTIONS, request_timeout_s=REQUEST_TIMEOUT_S,
                               count=_node_counter(node))
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("metrics on http://%s:%d/metrics (at most %d connections, %g s per request)",
             host, server.server_port, MAX_CONNECTIONS, REQUEST_TIMEOUT_S)
    return server, thread


def _node_counter(node: "Node") -> Callable[[str], None]:
    """A thread-safe ``count(name)``: adds 1 to ``node.counters[name]`` on the node's loop."""
    loop, counters = node.loop, node.counters

    def bump(name: str) -> None:
        counters[name] += 1

    def count(name: str) -> None:
        try:
            loop.call_soon_threadsafe(bump, name)
        except RuntimeError:  # the loop is closed: the node has stopped
            pass

    return count


_READING, _ANSWERING = "reading", "answering"


class _Connection:
    __slots__ = ("sock", "accepted_at", "state")

    def __init__(self, sock: socket.socket, accepted_at: float) -> None:
        self.sock = sock
        self.accepted_at = accepted_at
        self.state = _READING  # then _ANSWERING, or "timed_out" / "evicted" / "closed" when we closed it


class _QuietHandler(WSGIRequestHandler):
    """One request per connection; no access log; socket operations time out."""

    def setup(self) -> None:
        self.timeout = self.server.request_timeout_s  # StreamRequestHandler: sock.settimeout
        super().setup()

    def parse_request(self) -> bool:
        # the request is complete: from now on the connection is answered, never evicted
        return super().parse_request() and self.server._begin_answer(self.connection)

    def log_message(self, format: str, *args) -> None:
        pass


class BoundedWSGIServer(ThreadingMixIn, WSGIServer):
    """A thread-per-connection WSGI server with a cap on connections and a request deadline.

    ``max_connections`` (>= 1) connections are served at once; a connection arriving when
    all are taken closes the one that has waited longest for its request to complete
    (``count("metrics_connections_evicted")``), or, when every one is being answered, is
    closed at once (``count("metrics_connections_refused")``). A request not complete
    ``request_timeout_s`` seconds after accept is closed (``count("metrics_connections_timed_out")``);
    every socket operation times out after ``request_timeout_s``. ``count(name)`` is called
    from the server's threads. Binding raises :class:`OSError`.
    """

    daemon_threads = True
    request_queue_size = 64  # listen backlog: a burst of connects is accepted (and sorted) quickly

    def __init__(self, address: tuple[str, int], family: int, app: Callable, *, max_connections: int,
                 request_timeout_s: float, count: Callable[[str], None]) -> None:
        if max_connections < 1 or not request_timeout_s > 0:
            raise ValueError("max_connections must be >= 1 and request_timeout_s > 0")
        self.address_family = family
        self.max_connections = max_connections
        self.request_timeout_s = float(request_timeout_s)
        self._count = count
        self._cond = threading.Condition()
        self._open: dict[socket.socket, _Connection] = {}
        super().__init__(address, _QuietHandler)
        self.set_app(app)

    def open_connections(self) -> int:
        """Connections being served now (at most ``max_connections``)."""
        with self._cond:
            return len(self._open)

    def verify_request(self, request, client_address) -> bool:  # the accept thread
        with self._cond:
            if len(self._open) >= self.max_connections:
                waiting = [c for c in self._open.values() if c.state == _READING]
                if not waiting:
                    self._count("metrics_connections_refused")
                    return False
                self._close(min(waiting, key=lambda c: c.accepted_at), "evicted")
                if not self._cond.wait_for(lambda: len(self._open) < self.max_connections, EVICT_WAIT_S):
                    self._count("metrics_connections_refused")
                    return False
            self._open[request] = _Connection(request, time.monotonic())
            return True

    def service_actions(self) -> None:  # serve_forever's thread, at least every 0.5 s
        super().service_actions()
        deadline = time.monotonic() - self.request_timeout_s
        with self._cond:
            for conn in list(self._open.values()):
                if conn.state == _READING and conn.accepted_at <= deadline:
                    self._close(conn, "timed_out")

    def _close(self, conn: _Connection, reason: str) -> None:
        """Wake the connection's thread (its reads end); the thread closes the socket. Lock held."""
        if conn.state == _READING and reason in ("timed_out", "evicted"):
            self._count(f"metrics_connections_{reason}")
        conn.state = reason
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # the peer has gone already
            pass

    def _begin_answer(self, sock: socket.socket) -> bool:
        with self._cond:
            conn = self._open.get(sock)
            if conn is None or conn.state != _READING:
                return False  # closed by us meanwhile: a request cut short is not answered
            conn.state = _ANSWERING
            return True

    def shutdown_request(self, request) -> None:
        with self._cond:  # out of the table first: _close never touches a closed socket
            known = self._open.pop(request, None) is not None
        super().shutdown_request(request)
        if known:
            with self._cond:
                self._cond.notify_all()

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        with self._cond:
            conn = self._open.get(request)
            if conn is not None and conn.state == _READING and isinstance(exc, TimeoutError):
                self._close(conn, "timed_out")  # its own read timed out before service_actions looked
                return
        log.debug("metrics connection from %s ended: %r", client_address, exc)

    def server_close(self) -> None:
        with self._cond:
            for conn in list(self._open.values()):
                self._close(conn, "closed")
        super().server_close()
