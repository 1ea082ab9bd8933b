"""The node runtime: drives the pure cores with asyncio, ZeroMQ, zeroconf and SQLite.

Receive path (per frame, cheapest first): connection rate limit (token bucket
per ZeroMQ connection) -> strict decode + checks + Ed25519 verify
(:class:`EnvelopeOpener`) -> the mailbox of the actor that owns the message
kind. Every drop is counted by reason (``counters``) and logged at most once
per peer and reason per ``drop_log_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import random
import socket
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Iterable
from pathlib import Path

import psutil

from chimera.consensus.reputation import LocalReputation, ObservationKind
from chimera.protocol import PROTOCOL_VERSION
from chimera.protocol.diagnostics import ECHO_ACTOR, EchoReply, EchoRequest
from chimera.protocol.envelope import Envelope, EnvelopeOpener, EnvelopeSealer
from chimera.protocol.errors import LocalProtocolError, MalformedError, RemoteProtocolError
from chimera.protocol.identity import fingerprint, public_key_from_peer_id
from chimera.protocol.membership import (
    ALIVE_PROOF_CAPABILITY,
    HELLO_ADDRESSES,
    MEMBERSHIP_ACTOR,
    AliveProofs,
    Connect,
    Hello,
    MemberEvent,
    Membership,
    MembershipConfig,
    MemberState,
    PeerContact,
    Send,
)
from chimera.protocol.network import Network, format_contact_uri, parse_contact_uri
from chimera.protocol.ratelimit import TokenBucket

from . import admin as admin_api
from . import admin_ops, features
from .actors import Actor, ActorRef, Supervisor, wait_event
from .config import NodeConfig, reputation_config
from .discovery import Discovery
from .events import EVENT_KINDS
from .keys import load_or_create_identity, load_or_create_transport_keys
from .logs import DropLog
from .store import SEQ_BLOCK, SignStateError, Store
from .transport import Transport

log = logging.getLogger("chimera.node")
CAPABILITIES = ("membership", "echo", ALIVE_PROOF_CAPABILITY)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _hosts_pinned(config: NodeConfig) -> bool:
    """Whether the operator fixed the addresses we advertise (else they follow the machine's)."""
    return bool(config.advertise_hosts) or config.listen_host not in ("0.0.0.0", "")


def advertise_hosts(config: NodeConfig) -> list[str]:
    """IPv4 addresses peers should use to reach us."""
    if config.advertise_hosts:
        return list(config.advertise_hosts)
    if config.listen_host not in ("0.0.0.0", ""):
        return [config.listen_host]
    hosts = []
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                hosts.append(a.address)
    return hosts or ["127.0.0.1"]


class MembershipActor(Actor):
    name = MEMBERSHIP_ACTOR

    def __init__(self, node: "Node") -> None:
        self.node = node

    async def handle(self, item: object) -> None:
        node = self.node
        if isinstance(item, Envelope):
            node.membership.on_message(item.sender, item.message, time.monotonic())
        elif isinstance(item, PeerContact):  # a discovery hint
            node.membership.add_candidate(item, time.monotonic())
        node.run_membership_actions()


class EchoActor(Actor):
    name = ECHO_ACTOR

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.pending: dict[int, asyncio.Future] = {}

    async def handle(self, item: object) -> None:
        assert isinstance(item, Envelope)
        msg = item.message
        if isinstance(msg, EchoRequest):
            self.node.counters["echo_requests_received"] += 1
            if msg.reply:
                self.node.send(item.sender, EchoReply(nonce=msg.nonce, payload=msg.payload))
        elif isinstance(msg, EchoReply):
            fut = self.pending.pop(msg.nonce, None)
            if fut is not None and not fut.done():
                fut.set_result(time.perf_counter())


LOCK_FILE = "node.lock"


def _lock_data_dir(data_dir: Path) -> int:
    """Hold ``DATA_DIR/node.lock`` (an exclusive ``flock``, released when the process dies) for
    as long as the node runs; the file says which pid holds it. Two processes with one
    identity and one sign-state file could sign conflicting votes (equivocation) and would
    fight over ``admin.sock``.

    Raises:
        NodeStartError: another process (or another Node in this one) holds the lock.
    """
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise NodeStartError(f"a node (pid {holder}) is already running on {data_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class NodeStartError(Exception):
    """The node cannot start: its store or sign-state file cannot be read or decoded, or a
    listener it is configured to open (the metrics exporter) cannot be opened. The message
    names the file or the setting and what the operator can do."""


DISK_NEARLY_FULL_BYTES = 1 << 20
"""Free space (bytes) under which a write error met while starting is taken for a full disk:
SQLite reports a full disk as ``disk I/O error`` when it cannot size its shared-memory file."""


def _free_space(path: Path) -> tuple[int, int] | None:
    """``(bytes, inodes)`` this process may still use on the file system of ``path`` (root
    may use the blocks reserved for it), or None when it cannot be asked."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    root = os.geteuid() == 0
    return ((st.f_bfree if root else st.f_bavail) * st.f_frsize,
            st.f_ffree if root else st.f_favail)


def _disk_full(exc: BaseException, data_dir: Path) -> str | None:
    """Why ``exc`` (met while starting on ``data_dir``) is a full disk, or None if it is not.

    Full: SQLite's SQLITE_FULL (``database or disk is full``), an OSError ENOSPC or EDQUOT;
    or an SQLite I/O or cannot-open error, or another OSError, while the file system of ``data_dir`` has less
    than :data:`DISK_NEARLY_FULL_BYTES` or no inode left. Returns the one-line reason."""
    reason = f"{type(exc).__name__}: {str(exc)[:160]}"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{type(exc).__name__}: {exc.strerror}"
    if isinstance(exc, sqlite3.Error) and (
            (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_FULL
            or "database or disk is full" in str(exc)):
        return reason
    io_error = isinstance(exc, OSError) or (isinstance(exc, sqlite3.OperationalError) and (
        (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN)
        or "disk I/O error" in str(exc)))
    if io_error:  # (not "locked", "no such table", ...: those are no full disk)
        free = _free_space(data_dir)
        if free is not None and (free[0] < DISK_NEARLY_FULL_BYTES or free[1] == 0):
            return f"{reason}; {free[0]} bytes" + (" and no inode" if free[1] == 0 else "") + " free"
    return None


def _disk_full_text(data_dir: Path, reason: str) -> str:
    return f"the disk holding {data_dir} is full ({reason}); free space and start the node again"


@contextlib.contextmanager
def _reading_stored_state(data_dir: Path):
    """Turn a corrupt store or sign-state file, or a full disk, met while starting into
    :class:`NodeStartError` (one clear line for the operator instead of a traceback).
    Another OSError passes through unchanged."""
    try:
        yield
    except SignStateError as exc:  # a corrupt record (a write failure is an OSError)
        raise NodeStartError(str(exc)) from None
    except OSError as exc:
        full = _disk_full(exc, data_dir)
        if full is None:
            raise
        raise NodeStartError(_disk_full_text(data_dir, full)) from None
    except (sqlite3.DatabaseError, RemoteProtocolError, ValueError) as exc:
        full = _disk_full(exc, data_dir)
        if full is not None:  # the store is intact: moving it away would lose the log
            raise NodeStartError(_disk_full_text(data_dir, full)) from None
        path = data_dir / "node.sqlite3"
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            raise NodeStartError(f"{path} is locked by another process "
                                 "(is a node already running on this data directory?)") from None
        raise NodeStartError(
            f"{path} cannot be read or holds records that do not decode ({type(exc).__name__}: "
            f"{str(exc)[:160]}); restore it from a backup, or move it away to start with an empty "
            "store (this node then fetches the committed log again from its peers)") from None


class Node:
    """One peer. ``await start()``, then ``await wait_stopped()`` / ``await stop()``."""

    def __init__(self, data_dir: Path, config: NodeConfig, network: Network) -> None:
        self.data_dir = data_dir
        self.config = config
        self.network = network
        self.counters: Counter = Counter()
        self.events: deque[dict] = deque(maxlen=500)
        self.started_mono = time.monotonic()
        self._stopped = asyncio.Event()  # stop() has begun
        self._closed = asyncio.Event()  # stop() has finished
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._buckets: dict[bytes | str, TokenBucket] = {}  # by owner peer id, else connection
        self._conn_owner: dict[bytes, str] = {}  # ROUTER connection id -> first verified sender
        self.discovery: Discovery | None = None
        self.routes: dict[str, PeerContact] = {}
        self.consensus = None  # ConsensusService once started (networks with genesis validators)
        self.metrics_server = None  # (status() may be asked while start() still runs: admin is up early)
        self.started = False  # start() finished: the admin ``status`` answers from then on
        # this node's local reputation of every peer (consensus, training and fabric feed it);
        # only members and validators get an entry (fresh keys signing junk get none)
        self.reputation = LocalReputation(reputation_config(config), tracks=self._tracks_reputation)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the data directory and start serving.

        Raises:
            NodeStartError: the store or the sign-state file cannot be read or decoded
                (the message names the file and what to do); nothing was acknowledged.
            KeyFileError: a key file is unreadable or foreign.
            OSError, zmq.ZMQError: the listen address cannot be bound.
        """
        self.loop = asyncio.get_running_loop()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = _lock_data_dir(self.data_dir)
        try:
            await self._start()
        except BaseException:
            if not self._stopped.is_set():  # a failure before the node runs: nothing to stop
                os.close(self._lock_fd)
            raise

    async def _start(self) -> None:
        cfg = self.config
        self.identity = load_or_create_identity(self.data_dir)
        self.transport_keys = load_or_create_transport_keys(self.data_dir)
        self.peer_id = self.identity.peer_id
        with _reading_stored_state(self.data_dir):
            self.store = Store(self.data_dir)
            try:
                self.incarnation = self.store.bump_incarnation()
                self.revoked: set[str] = admin_ops.load_revoked(self.store)  # peer ids refused (admit/revoke_peer)
            except BaseException:
                self.store.close()
                raise
        self._seq_limit = 0
        self.sealer = EnvelopeSealer(self.identity, self.network.network_id, first_seq=1)
        self._reserve_seq()
        self.opener = EnvelopeOpener(
            self.peer_id, self.network.network_id,
            max_message_bytes=cfg.max_message_bytes,
            max_clock_skew_ms=int(cfg.max_clock_skew_s * 1000),
            new_senders_per_source_per_s=cfg.new_senders_per_address_per_s,
            new_senders_burst=cfg.new_senders_burst,
        )
        self.drops = DropLog(self.counters, cfg.drop_log_interval_s, log)
        self.transport = Transport(
            self.network, self.transport_keys.secret, self.transport_keys.public,
            on_frames=self._on_frames, counters=self.counters,
            on_drop=lambda reason, who, detail: self.drops.record(reason, who, detail, time.monotonic()),
            max_message_bytes=cfg.max_message_bytes, send_hwm=cfg.send_hwm, recv_hwm=cfg.recv_hwm,
            send_queue_max_bytes=cfg.send_queue_max_bytes,
        )
        self.port = await self.transport.start(cfg.listen_host, cfg.port)
        self.hosts = advertise_hosts(cfg)
        self.contact = PeerContact(
            peer_id=self.peer_id, transport_key=self.transport_keys.public,
            addresses=tuple(f"tcp://{h}:{self.port}" for h in self.hosts)[:8],
            capabilities=CAPABILITIES + (("consensus",) if cfg.consensus and self.network.genesis else ()),
            profile=cfg.profile,
        )
        now = time.monotonic()
        self.membership = Membership(
            self.contact, self.incarnation,
            MembershipConfig(
                probe_interval_s=cfg.probe_interval_s, probe_timeout_s=cfg.probe_timeout_s,
                indirect_checks=cfg.indirect_checks, suspicion_alpha=cfg.suspicion_alpha,
                suspicion_beta=cfg.suspicion_beta, sync_interval_s=cfg.sync_interval_s,
                reconnect_interval_s=cfg.reconnect_interval_s,
            ),
            random.Random(int.from_bytes(os.urandom(8), "big")), now,
            proofs=AliveProofs(self.network.network_id, self.identity.sign),  # signed alive claims, §10.3
        )
        self.supervisor = Supervisor(self.counters, cfg.mailbox_size)
        self.supervisor.spawn(MembershipActor(self))
        self.echo = EchoActor(self)
        self.supervisor.spawn(self.echo)
        for uri in (*self.network.bootstrap, *cfg.bootstrap):
            self.add_contact_uri(uri, static=True)
        for contact in self.store.known_peers():
            self.membership.add_candidate(contact, now)
        self.admin = admin_ops.build_admin_server(self)  # local socket, keys, audit, remote (node/admin_ops.py)
        await self.admin.start()
        if cfg.mdns:
            # hosts not pinned (advertise_hosts, a listen address) follow the machine's addresses
            pinned = _hosts_pinned(cfg)
            self.discovery = Discovery(
                self.contact, self.network.network_id, self.port, self.hosts, cfg.interfaces,
                self._on_discovered, self.counters, poll_s=cfg.mdns_interface_poll_s,
                hosts_now=None if pinned else (lambda: advertise_hosts(cfg)))
            try:
                await self.discovery.start()
            except (OSError, ValueError) as exc:
                if cfg.mdns_interface_poll_s:
                    log.warning("mDNS discovery unavailable for now (%s); using bootstrap and peer exchange "
                                "until it starts (interfaces checked every %g s)", exc, cfg.mdns_interface_poll_s)
                else:
                    log.warning("mDNS discovery unavailable (%s); using bootstrap and peer exchange only", exc)
                    self.discovery = None
            if self.discovery is not None:
                self.discovery.follow()
        if cfg.metrics_port >= 0:
            from . import metrics

            try:
                served = metrics.serve(self, cfg.metrics_host, cfg.metrics_port)
            except OSError as exc:  # port taken, host not of this machine or not resolvable
                await self.stop()  # what already runs (sockets, admin, mDNS) closes again
                raise NodeStartError(
                    f"metrics exporter on {cfg.metrics_host}:{cfg.metrics_port} (metrics_host, "
                    f"metrics_port): {exc.strerror or exc}") from None
            if served is not None:
                self.metrics_server = served[0]
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._membership_timer(), name="membership-timer"))
        if not _hosts_pinned(cfg) and cfg.mdns_interface_poll_s > 0:
            self._tasks.append(loop.create_task(self._follow_addresses(), name="follow-addresses"))
        if cfg.consensus and self.network.genesis:
            from chimera.consensus.bft import BftConfig

            from .consensus import ConsensusActor, ConsensusService

            try:
                with _reading_stored_state(self.data_dir):
                    self.consensus = ConsensusService(self, BftConfig(
                        propose_timeout_s=cfg.consensus_propose_timeout_s,
                        prevote_timeout_s=cfg.consensus_vote_timeout_s,
                        precommit_timeout_s=cfg.consensus_vote_timeout_s,
                        commit_wait_s=cfg.consensus_commit_wait_s,
                        max_batch=cfg.consensus_max_batch,
                        empty_block_interval_s=cfg.consensus_empty_block_interval_s,
                        rebroadcast_interval_s=max(0.5, 2 * cfg.consensus_vote_timeout_s),
                        double_sign_check=cfg.consensus_double_sign_check,
                    ))
            except NodeStartError:
                await self.stop()  # what already runs (sockets, admin) closes again
                raise
            self.supervisor.spawn(ConsensusActor(self.consensus))
            self._tasks.append(loop.create_task(self.consensus.run_timer(), name="consensus-timer"))
            from .training import start_training

            start_training(self)
        if cfg.fabric:  # WASM agents and tasks (node/fabric.py); wasmtime loads on first use
            from .fabric import start_fabric

            start_fabric(self)
        self.run_membership_actions()
        log.info("peer %s listening on %s (network %s %s, incarnation %d, transport key %s, profile %s)",
                 self.peer_id, ", ".join(self.contact.addresses), self.network.name,
                 self.network.fingerprint(), self.incarnation, fingerprint(self.transport_keys.public),
                 cfg.profile)
        self.started = True
        for name, feature in features.report().items():
            if not feature["available"]:
                log.info("optional %s unavailable: %s", name, feature["detail"])

    @property
    def contact_uri(self) -> str:
        return format_contact_uri(self.peer_id, self.hosts[0], self.port, self.transport_keys.public)

    def add_contact_uri(self, uri: str, *, static: bool) -> None:
        try:
            peer_id, endpoint, key = parse_contact_uri(uri)
        except MalformedError as exc:
            log.warning("ignoring bootstrap contact: %s", exc)
            return
        self.membership.add_candidate(
            PeerContact(peer_id=peer_id, transport_key=key, addresses=(endpoint,)),
            time.monotonic(), static=static)

    async def stop(self) -> None:
        """Graceful stop: announce leave, flush briefly, close everything."""
        if self._stopped.is_set():
            await self._closed.wait()
            return
        self._stopped.set()
        try:
            self.membership.leave(time.monotonic())
            self.run_membership_actions()
            await asyncio.sleep(0.05)  # let the Leave frames reach the wire (LINGER is 0)
        except Exception:
            log.exception("error while announcing leave")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self.discovery is not None:
            try:
                await asyncio.wait_for(self.discovery.close(), timeout=3)
            except (Exception, asyncio.TimeoutError):
                log.warning("zeroconf did not close cleanly")
        await self.admin.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        await self.supervisor.stop()
        await self.transport.close()
        if self.consensus is not None:
            self.consensus.close()
        self.store.close()
        os.close(self._lock_fd)  # last: another node may use the directory from now on
        log.info("peer %s stopped", self.peer_id)
        self._closed.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`stop` has completed (sockets closed, store closed)."""
        await self._closed.wait()

    # ------------------------------------------------------------------ sending

    def _reserve_seq(self) -> None:
        first = self.store.reserve_seq_block(wall_ms())
        self.sealer.next_seq = max(self.sealer.next_seq, first)
        self._seq_limit = first + SEQ_BLOCK

    def _seal(self, msg: object, recipient: str) -> bytes:
        if self.sealer.next_seq >= self._seq_limit:
            self._reserve_seq()
        return self.sealer.seal(msg, sent_at_ms=wall_ms(), recipient=recipient)

    def send(self, peer_id: str, msg: object) -> bool:
        """Sign and send ``msg`` to a verified member. False (counted) when unroutable."""
        contact = self.routes.get(peer_id)
        if contact is None or not contact.addresses:
            self.counters["drop_unroutable"] += 1
            return False
        return self.transport.send(contact.transport_key, contact.addresses[0], self._seal(msg, peer_id))

    def broadcast(self, peer_ids: Iterable[str], msg: object) -> int:
        """Sign ``msg`` once, with a nil recipient, and send the same frame to each of
        ``peer_ids`` (ourselves skipped); returns how many it went to.

        For messages meant for every one of them (consensus proposals, votes, values):
        one signature instead of one per peer. A nil-recipient envelope replayed to
        another member is accepted there at most once (per-receiver replay windows) and
        carries what every validator receives anyway (docs/PROTOCOL.md §6.1).
        """
        frame = None
        sent = 0
        for peer_id in peer_ids:
            if peer_id == self.peer_id:
                continue
            contact = self.routes.get(peer_id)
            if contact is None or not contact.addresses:
                self.counters["drop_unroutable"] += 1
                continue
            if frame is None:
                frame = self._seal(msg, None)
            sent += bool(self.transport.send(contact.transport_key, contact.addresses[0], frame))
        return sent

    def tell(self, ref: ActorRef, msg: object) -> bool:
        """Deliver to a local actor in process, or to a remote one as an envelope.

        Actors always receive an :class:`Envelope`; a local one is never encoded
        or signed (``seq`` 0, ``size_bytes`` 0) and never touches the transport.
        """
        if ref.peer_id == self.peer_id:
            cell = self.supervisor.get(ref.name)
            local = Envelope(version=PROTOCOL_VERSION, kind=type(msg).KIND, sender=self.peer_id,
                             recipient=self.peer_id, seq=0, sent_at_ms=wall_ms(), message=msg,
                             size_bytes=0)
            if cell is None or not cell.tell(local):
                self.counters[f"drop_local_{'no_actor' if cell is None else 'mailbox_full'}"] += 1
                return False
            return True
        return self.send(ref.peer_id, msg)

    def run_membership_actions(self) -> None:
        if self.membership.incarnation > self.incarnation:  # refuted: persist before it is sent
            self.incarnation = self.membership.incarnation
            self.store.set_meta("incarnation", self.incarnation)
        for action in self.membership.take_actions():
            try:
                self._run_action(action)
            except LocalProtocolError as exc:  # e.g. a field out of bounds: skip that action
                self.counters["action_errors"] += 1
                log.error("membership action %s failed: %s", type(action).__name__, exc)
        self._wake.set()

    def _run_action(self, action: object) -> None:
        if admin_ops.blocked_action(self, action):  # nothing goes to a revoked peer
            return
        if isinstance(action, Send):
            if action.via is not None:
                if not isinstance(action.message, Hello):
                    return  # only a Hello ever goes to an unverified contact
                for endpoint in action.via.addresses[:HELLO_ADDRESSES]:
                    self.transport.send(action.via.transport_key, endpoint,
                                        self._seal(action.message, action.peer_id), unverified=True)
            else:
                self.send(action.peer_id, action.message)
        elif isinstance(action, Connect):
            old = self.routes.get(action.contact.peer_id)
            self.routes[action.contact.peer_id] = action.contact
            if old is not None and old.transport_key != action.contact.transport_key:
                for endpoint in old.addresses:
                    self.transport.disconnect(old.transport_key, endpoint)
            self.store.save_peer(action.contact, wall_ms(), "alive")
        elif isinstance(action, MemberEvent):
            self._on_member_event(action)

    def emit_event(self, kind: str, peer_id: str, *, priority: str = "info", **fields: object) -> None:
        """Record a typed event (admin ``events``, logs, metrics counter ``events.KIND``).

        ``kind`` must be one of :data:`chimera.node.events.EVENT_KINDS`; another is still
        recorded but also counted as ``events_unregistered`` (a bug in the emitting code).
        """
        if kind not in EVENT_KINDS:
            self.counters["events_unregistered"] += 1
        self.counters[f"events.{kind}"] += 1
        doc = {"kind": kind, "peer_id": peer_id, "at_ms": wall_ms(), "priority": priority, **fields}
        self.events.append(doc)
        log.log(logging.WARNING if priority == "warning" else logging.INFO, "%s %s %s", kind, peer_id,
                " ".join(f"{k}={v}" for k, v in fields.items() if k != "weights"),
                extra={"peer_id": peer_id, "event": kind})

    def _on_member_event(self, event: MemberEvent) -> None:
        self.counters[f"events.{event.kind}"] += 1
        doc = {"kind": event.kind, "peer_id": event.peer_id, "incarnation": event.incarnation,
               "at_ms": wall_ms(), "priority": "warning" if event.kind == "peer_failed" else "info"}
        self.events.append(doc)
        level = logging.WARNING if event.kind in ("peer_failed", "peer_suspected") else logging.INFO
        log.log(level, "%s %s (incarnation %d)", event.kind, event.peer_id, event.incarnation,
                extra={"peer_id": event.peer_id, "event": event.kind})
        state = {"peer_failed": "dead", "peer_left": "left", "peer_suspected": "suspect"}.get(
            event.kind, "alive")
        self.store.set_peer_state(event.peer_id, state)
        if event.kind == "peer_joined":
            # A member back from dead or left (restarted): our DEALER to it kept reconnecting
            # with libzmq's backoff (up to RECONNECT_IVL_MAX, 5 s), so our answers to its Hello
            # waited up to that long and it saw nobody for ~3 s. A fresh DEALER connects at once
            # (the frames queued while it was gone are stale). A first join has no DEALER yet.
            route = self.routes.get(event.peer_id)
            if route is not None:
                for endpoint in route.addresses:
                    if (route.transport_key, endpoint) in self.transport.dealers:
                        self.transport.disconnect(route.transport_key, endpoint)
                        self.counters["dealers_renewed"] += 1

    # ---------------------------------------------------------------- receiving

    def _on_frames(self, batch: list[tuple[bytes, bytes]]) -> None:
        now = time.monotonic()
        now_ms = wall_ms()
        cfg = self.config
        for conn_id, frame in batch:
            self.counters["frames_received"] += 1
            # Rate limit before any verification. A connection is charged to the
            # first peer that it delivered a verified envelope addressed to us for, so all of a
            # peer's connections share one bucket and reconnecting gains nothing;
            # a connection not yet bound gets only a small bucket of its own.
            owner = self._conn_owner.get(conn_id)
            key = owner if owner is not None else conn_id
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= 8192:  # evict the least recently created
                    self._buckets.pop(next(iter(self._buckets)))
                burst = cfg.rate_limit_burst if owner is not None else min(cfg.rate_limit_burst, 32)
                bucket = self._buckets[key] = TokenBucket(cfg.rate_limit_msgs_per_s, burst, now)
            if not bucket.take(now):
                self.drops.record("rate_limited", f"conn:{conn_id.hex()}", "over the token bucket", now)
                continue
            try:
                env = self.opener.open(frame, now_ms, self.transport.source_of(conn_id))
            except RemoteProtocolError as exc:
                if exc.sender is not None:  # signed by its sender: its fault (§6.5)
                    self.drops.record(exc.reason, exc.sender, str(exc), now)
                    self.reputation.observe(exc.sender, ObservationKind.INVALID_ENVELOPE, now)
                else:
                    self.drops.record(exc.reason, f"conn:{conn_id.hex()}", str(exc), now)
                continue
            except Exception:  # open() raises only RemoteProtocolError; a bug must not lose the batch
                self.counters["handler_errors"] += 1
                log.exception("opening a frame failed")
                continue
            if env.sender in self.revoked:  # network admission: `revoke_peer` (node/admin_ops.py)
                self.drops.record("revoked", env.sender, env.kind, now)
                continue
            self.counters["envelopes_accepted"] += 1
            if self.consensus is not None:
                self.consensus.valid_counts[env.sender] += 1
            # Bind only on an envelope addressed to us (the opener let through no other
            # recipient): only its sender can have sent it to us, whereas a nil-recipient
            # frame (bft_* broadcasts) reached other members too, and any of them could
            # replay it on a connection of its own to charge that connection to the sender.
            if owner is None and env.recipient is not None:
                if len(self._conn_owner) >= 8192:
                    self._conn_owner.pop(next(iter(self._conn_owner)))
                self._conn_owner[conn_id] = env.sender
                self._buckets.pop(conn_id, None)
            cell = self.supervisor.get(type(env.message).ACTOR)
            if cell is None:
                self.drops.record("no_actor", env.sender, env.kind, now)
            elif not cell.tell(env):
                self.drops.record("mailbox_full", env.sender, env.kind, now)

    def _tracks_reputation(self, peer_id: str) -> bool:
        """Whether ``peer_id`` may get a local reputation entry: a member (any state) or a
        validator of the current epoch. Anyone holding the join token can sign envelopes
        with fresh keys; each one tracked cost an entry, an eviction scan once the table
        was full and an exported ``chimera_reputation_local_score`` series."""
        membership = getattr(self, "membership", None)
        if membership is not None and peer_id in membership.members:
            return True
        consensus = self.consensus
        return consensus is not None and peer_id in consensus.ledger.table.weights

    def _on_discovered(self, contact: PeerContact) -> None:
        cell = self.supervisor.get(MEMBERSHIP_ACTOR)
        if cell is not None and not cell.tell(contact):
            self.counters["drop_discovery_hint"] += 1

    async def _membership_timer(self) -> None:
        while True:
            delay = min(self.membership.next_deadline() - time.monotonic(), 3600.0)
            if delay > 0:
                self._wake.clear()
                if await wait_event(self._wake, min(delay, 5.0)):
                    continue  # something changed: recompute the deadline
            try:
                self.membership.tick(time.monotonic())
                self.run_membership_actions()
            except Exception:  # a bug must not stop failure detection for good
                self.counters["membership_timer_errors"] += 1
                log.exception("membership tick failed")
            await asyncio.sleep(0)  # never starve the loop, whatever the core reports

    async def _follow_addresses(self) -> None:
        """Every ``mdns_interface_poll_s``: when the machine's IPv4 addresses changed (hosts not
        pinned by ``advertise_hosts`` or a listen address), our signed contact follows them."""
        while not await wait_event(self._stopped, self.config.mdns_interface_poll_s):
            try:
                self.follow_addresses(advertise_hosts(self.config))
            except Exception:  # a bug here must not end the checks
                self.counters["contact_change_errors"] += 1
                log.exception("address check failed")

    def follow_addresses(self, hosts: list[str]) -> bool:
        """Make ``hosts`` (IPv4, at most 8 used) our contact's addresses if they differ: the
        membership core raises our incarnation and sends members a Hello (PROTOCOL.md §9.2), so
        they dial the new addresses. True when the contact changed."""
        hosts = list(dict.fromkeys(hosts))[:8]
        if not hosts or set(hosts) == set(self.hosts):
            return False
        contact = dataclasses.replace(self.contact, addresses=tuple(f"tcp://{h}:{self.port}" for h in hosts))
        before = self.hosts
        self.hosts, self.contact = hosts, contact
        if self.membership.change_contact(contact, time.monotonic()):
            self.run_membership_actions()  # the new incarnation is stored before the Hellos go out
        self.counters["contact_changed"] += 1
        log.info("our addresses changed: %s (were %s); members are told", ", ".join(hosts), ", ".join(before))
        return True

    # -------------------------------------------------------------- diagnostics

    async def ping(self, peer_id: str, count: int = 5, payload_bytes: int = 64,
                   timeout_s: float = 2.0) -> list[float | None]:
        """Round-trip times in seconds of ``count`` echo requests (None: timed out)."""
        out: list[float | None] = []
        loop = asyncio.get_running_loop()
        for _ in range(count):
            nonce = random.getrandbits(63)
            fut = loop.create_future()
            self.echo.pending[nonce] = fut
            start = time.perf_counter()
            if not self.send(peer_id, EchoRequest(nonce=nonce, payload=b"\0" * payload_bytes)):
                self.echo.pending.pop(nonce, None)
                out.append(None)
                continue
            try:
                out.append(await asyncio.wait_for(fut, timeout_s) - start)
            except asyncio.TimeoutError:
                self.echo.pending.pop(nonce, None)
                out.append(None)
        return out

    def status(self) -> dict:
        states = Counter(m.state.value for m in self.membership.members.values())
        proc = psutil.Process()
        return {
            "peer_id": self.peer_id,
            "contact": self.contact_uri,
            "addresses": list(self.contact.addresses),
            "network": self.network.name,
            "network_fingerprint": self.network.fingerprint(),
            "transport_key_fingerprint": fingerprint(self.transport_keys.public),
            "protocol_version": PROTOCOL_VERSION,
            "incarnation": self.membership.incarnation,
            "profile": self.config.profile,
            "pid": os.getpid(),
            "data_dir": str(self.data_dir),
            "uptime_s": round(time.monotonic() - self.started_mono, 3),
            "rss_bytes": proc.memory_info().rss,
            "cpu_s": round(sum(proc.cpu_times()[:2]), 3),
            "members": {s.value: states.get(s.value, 0) for s in MemberState},
            "local_health": self.membership.local_health,
            "mdns": self.discovery is not None and self.discovery.advertising,
            "metrics_url": (f"http://{self.config.metrics_host}:{self.metrics_server.server_port}/metrics"
                            if self.metrics_server is not None else None),
            "features": features.report(),
            "consensus": None if self.consensus is None else self.consensus.status(),
            "limits": {k: getattr(self.config, k) for k in (
                "max_message_bytes", "send_hwm", "recv_hwm", "send_queue_max_bytes", "mailbox_size", "rate_limit_msgs_per_s",
                "rate_limit_burst", "probe_interval_s", "probe_timeout_s", "max_clock_skew_s",
                "fabric_task_slots", "fabric_max_wasm_memory_bytes", "fabric_max_task_wall_s")},
            "counters": dict(sorted({**self.counters, **self._core_counters()}.items())),
        }

    def _core_counters(self) -> dict[str, int]:
        """Counts the pure cores keep themselves, when nonzero (in ``status`` counters)."""
        counts = {"reputation_untracked": self.reputation.untracked,
                  "membership_candidates_evicted": self.membership.candidates_evicted,
                  "membership_candidates_refused": self.membership.candidates_refused,
                  "membership_member_lists_refused": self.membership.member_lists_refused,
                  "membership_hellos_refused": self.membership.hellos_refused,
                  "membership_incarnations_refused": self.membership.incarnations_refused,
                  "membership_relays_refused": self.membership.relays_refused,
                  "membership_alive_unsigned": self.membership.alive_unsigned,
                  "membership_alive_bad_signatures": self.membership.alive_bad_signatures}
        return {k: v for k, v in counts.items() if v}

    def peers(self) -> list[dict]:
        now = time.monotonic()
        rows = []
        fabric = getattr(self, "fabric", None)
        adverts = fabric.capacity if fabric is not None else {}  # signed capacity advertisements
        for m in sorted(self.membership.members.values(), key=lambda m: m.peer_id):
            rows.append({
                "peer_id": m.peer_id, "state": m.state.value, "incarnation": m.incarnation,
                "addresses": list(m.contact.addresses), "profile": m.contact.profile,
                "capabilities": list(m.contact.capabilities),
                "rtt_ms": None if m.rtt_s is None else round(m.rtt_s * 1000, 3),
                "last_seen_s": round(now - m.last_seen, 3),
                "state_for_s": round(now - m.state_since, 3),
                "resources": adverts[m.peer_id][0].describe() if m.peer_id in adverts else None,
            })
        return rows

    def _admin_handlers(self) -> dict:
        async def status(args: dict) -> dict:
            if not self.started:  # (clients such as LocalNetwork.wait_ready poll until it answers)
                raise admin_api.AdminError("the node is still starting; ask again in a moment")
            return self.status()

        async def peers(args: dict) -> list:
            return self.peers()

        async def events(args: dict) -> list:
            return list(self.events)[-admin_api.int_arg(args, "limit", 100, 1, 10_000):]

        async def ping(args: dict) -> dict:
            peer = admin_api.str_arg(args, "peer_id", max_len=64)
            public_key_from_peer_id(peer)
            if peer == self.peer_id:
                raise admin_api.AdminError("that is this node's own peer id", admin_api.EXIT_USAGE)
            if peer not in self.routes:
                raise admin_api.AdminError(f"{peer} is not a verified member")
            rtts = await self.ping(peer, count=admin_api.int_arg(args, "count", 5, 1, 1000))
            return {"peer_id": peer, "rtt_s": rtts}

        async def add_contact(args: dict) -> dict:
            uri = admin_api.str_arg(args, "uri", max_len=4096)
            parse_contact_uri(uri)
            self.add_contact_uri(uri, static=True)
            self.run_membership_actions()
            return {"added": uri}

        def need_consensus():
            if self.consensus is None:
                raise admin_api.AdminError(
                    "this node runs no consensus log (the network has no genesis validators, "
                    "or consensus = false in its config)")
            return self.consensus

        async def propose(args: dict) -> dict:
            service = need_consensus()
            data = admin_api.bytes_arg(args, "data", max_len=1 << 20, text=True)  # the log's limit is checked there
            timeout_s = admin_api.float_arg(args, "timeout_s", 30.0, 0.1, 3600.0)
            count = admin_api.int_arg(args, "count", 1, 1, 100_000)
            try:
                if count > 1:
                    return await service.propose_many(data, count, timeout_s)
                return await service.propose(data, timeout_s)
            except LocalProtocolError as exc:
                raise admin_api.AdminError(str(exc)) from None

        async def log_(args: dict) -> dict:
            limit = admin_api.int_arg(args, "limit", 20, 1, 10_000)
            start = admin_api.int_arg(args, "from_height", None, 0, admin_api.SQL_INT_MAX)
            return need_consensus().log_rows(limit, None if start is None else max(1, start))

        async def reputation(args: dict) -> dict:
            return need_consensus().reputation_rows()

        async def certificate(args: dict) -> dict:
            """the quorum certificate of a committed height, re-verified against its epoch's weights"""
            service = need_consensus()
            height = admin_api.int_arg(args, "height", service.height, 0, admin_api.SQL_INT_MAX)
            try:
                return service.certificate_doc(height)
            except LocalProtocolError as exc:
                raise admin_api.AdminError(str(exc)) from None

        async def stop(args: dict) -> dict:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.stop()))
            return {"stopping": True}

        from .fabric import admin_handlers as fabric_admin_handlers
        from .training import training_admin_handlers

        return {**training_admin_handlers(self), **fabric_admin_handlers(self),
                "status": status, "peers": peers, "events": events, "ping": ping,
                "add_contact": add_contact, "stop": stop, "propose": propose, "log": log_,
                "reputation": reputation, "certificate": certificate}
