"""ZeroMQ transport: one inbound ROUTER, one outbound DEALER per peer, CURVE + ZAP.

* The ROUTER is a CURVE server with the node's own transport key. A ZAP handler
  (``zmq.auth``'s checks, driven by :func:`serve_zap`) admits only the
  network's client key, which is derived from the join token: a process without the
  token cannot finish a handshake.
* Every outbound DEALER is a CURVE client with the network's client keypair and
  the peer's transport key as ``curve_serverkey``.
* ``LINGER`` is 0 (pyzmq's default of -1 hangs shutdown), high-water marks are
  bounded, ``ZMQ_MAXMSGSIZE`` caps what libzmq will allocate (a bigger frame
  closes that connection), and each drop point is counted in ``counters``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict, deque
from typing import Callable

import zmq
from zmq.auth.base import Authenticator
from zmq.utils import z85

from chimera.protocol.network import Network

log = logging.getLogger("chimera.transport")

# libzmq closes a connection whose frame exceeds MAXMSGSIZE; keep some slack over
# max_message_bytes so slightly-oversize frames reach the codec and are counted.
MAXMSGSIZE_SLACK_BYTES = 64 * 1024
_POLLIN, _EVENTS, _NOBLOCK = int(zmq.POLLIN), int(zmq.EVENTS), int(zmq.NOBLOCK)  # plain ints: no enum ops per frame
_RCVMORE = int(zmq.RCVMORE)

DEFAULT_SEND_QUEUE_MAX_BYTES = 64 << 20
MAX_KNOWN_CONNECTIONS = 8192  # connections whose peer address is remembered (newest first kept)
MAX_DEALERS = 4096  # DEALERs to verified contacts (max_members); beyond: the least recently used closed
# DEALERs to contacts nobody verified yet (Hellos to candidates: mDNS records, gossip, bootstrap);
# beyond: the least recently used closed, which also ends libzmq's reconnect attempts to it
MAX_UNVERIFIED_DEALERS = 128
# libzmq's default is 1023 sockets per context: past that every new DEALER failed, members' too
MAX_SOCKETS = MAX_DEALERS + MAX_UNVERIFIED_DEALERS + 64
# Bytes sent to one DEALER between two tracked frames. A tracked frame is sent zero-copy
# and libzmq releases it once it has left the socket's queue; queues are FIFO, so that
# release proves that everything sent before it left too. Up to this many bytes per
# DEALER (the tail after its last tracked frame) are never counted.
CHECKPOINT_BYTES = 16 << 10


DropCallback = Callable[[str, str, str], None]  # (reason, who, detail)


def raise_open_files_limit(wanted: int = 2 * MAX_SOCKETS + 1024) -> int:
    """Raise this process's soft limit of open files to ``wanted`` (within the hard limit);
    returns the soft limit now in force. Each DEALER holds a descriptor for its libzmq mailbox
    and one for its TCP connection: a node talking to a few thousand members needs more than
    the usual soft limit of 1024, and past it libzmq fails (or aborts) creating sockets."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class _Backlog:
    """What one DEALER still holds: the tracked frames not yet released by libzmq, each
    with the bytes it covers (itself and the untracked frames sent just before it)."""

    __slots__ = ("checkpoints", "queued", "untracked")

    def __init__(self) -> None:
        self.checkpoints: deque[tuple[zmq.MessageTracker, int]] = deque()
        self.queued = 0  # bytes of the checkpoints still pending
        self.untracked = 0  # bytes sent since the last tracked frame

    def reap(self) -> int:
        """Drop the checkpoints libzmq has released; returns the bytes freed."""
        freed = 0
        checkpoints = self.checkpoints
        while checkpoints and checkpoints[0][0].done:
            freed += checkpoints.popleft()[1]
        self.queued -= freed
        return freed


class _Admission:
    """ZAP credentials provider: admit exactly the network's client key."""

    def __init__(self, client_public: bytes, counters: Counter, on_drop: DropCallback) -> None:
        self.allowed_z85 = z85.encode(client_public)
        self.counters = counters
        self.on_drop = on_drop

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.allowed_z85:
            self.counters["handshakes_admitted"] += 1
            return True
        self.counters["handshakes_refused"] += 1
        # one log line per interval for all outsiders (fresh keys cost nothing)
        self.on_drop("handshake_refused", "outsider",
                     "CURVE client key is not this network's (no or wrong join token)")
        return False


async def serve_zap(auth: Authenticator, counters: Counter) -> None:
    """Answer libzmq's ZAP requests (one per CURVE handshake into a server socket of
    ``auth``'s context) with ``auth``'s checks, until cancelled or the context ends;
    waits on the ZAP socket's file descriptor as :meth:`Transport._recv_loop` waits on
    the ROUTER's. ``auth`` must be started on a plain (not ``zmq.asyncio``) context or
    a shadow of one; its ZAP socket is closed by ``auth.stop()`` after this returns.

    The event-loop reader is removed when this coroutine ends (callers cancel and await
    it before ``auth.stop()``). pyzmq's ``AsyncioAuthenticator`` removed it from a
    callback one loop turn after ``stop()``, by descriptor number: a server started in
    the same event loop in between (a node restarted in process, as tests and the
    simulator do) could get that number for its own ZAP socket and lose its reader. Its
    ZAP requests then went unanswered and no handshake into it ever completed.

    A check that raises answers that request with ZAP status 500 (the handshake fails;
    ``counters["zap_errors"]``) instead of ending authentication for good.
    """
    sock = auth.zap_socket
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    fd = sock.getsockopt(zmq.FD)
    loop.add_reader(fd, readable.set)
    try:
        while True:
            readable.clear()  # (edge-triggered: clear, then ask EVENTS, then sleep)
            try:
                while sock.getsockopt(_EVENTS) & _POLLIN:
                    request = sock.recv_multipart(_NOBLOCK)
                    try:
                        await auth.handle_zap_message(request)
                    except zmq.ZMQError:
                        raise
                    except Exception:  # a bug must not end authentication for good
                        counters["zap_errors"] += 1
                        log.exception("ZAP request failed")
                        # answer it (RFC 27 status 500: the handshake fails), else the REP
                        # socket refuses every later request
                        sock.send_multipart([b"1.0", request[1] if len(request) > 1 else b"",
                                             b"500", b"internal error", b"", b""], _NOBLOCK)
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    return
                counters["zap_errors"] += 1
                log.warning("ZAP socket error: %s", exc)
                await asyncio.sleep(0.01)
                continue
            await readable.wait()
    finally:
        loop.remove_reader(fd)


class Transport:
    """Owns the node's sockets. Not thread-safe: use from the event loop only.

    Args:
        network: the network (client keys derive from its secret).
        server_secret/server_public: raw 32-byte CURVE keys of this node.
        on_frames: called with a list of ``(connection_id, frame)`` for each
            batch of received frames (connection_id: the ROUTER routing id).
        counters: shared counter dict; keys documented in docs/PROTOCOL.md.
        send_queue_max_bytes: bytes that all DEALERs together may hold queued
            (not yet taken by libzmq for the wire): a DEALER whose peer never
            drains holds up to ``send_hwm`` frames, and there may be 4096 of them.
    """

    def __init__(
        self,
        network: Network,
        server_secret: bytes,
        server_public: bytes,
        *,
        on_frames: Callable[[list[tuple[bytes, bytes]]], None],
        counters: Counter,
        on_drop: DropCallback,
        max_message_bytes: int,
        send_hwm: int,
        recv_hwm: int,
        send_queue_max_bytes: int = DEFAULT_SEND_QUEUE_MAX_BYTES,
    ) -> None:
        # A plain (not zmq.asyncio) context: every socket is used with NOBLOCK and waited on
        # through its file descriptor by this class (no futures per send or wake).
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, MAX_SOCKETS)  # (applied when the first socket is made)
        self.network = network
        self.server_secret, self.server_public = server_secret, server_public
        self.client_public, self.client_secret = network.curve_client_keypair()
        self.on_frames = on_frames
        self.counters = counters
        self.on_drop = on_drop
        self.max_message_bytes = max_message_bytes
        self.send_hwm, self.recv_hwm = send_hwm, recv_hwm
        self.router: zmq.Socket | None = None
        self.auth: Authenticator | None = None
        self.dealers: OrderedDict[tuple[bytes, str], zmq.Socket] = OrderedDict()
        self.unverified: OrderedDict[tuple[bytes, str], zmq.Socket] = OrderedDict()
        self.send_queue_max_bytes = send_queue_max_bytes
        self.queued_bytes = 0  # sum of the backlogs' queued bytes
        self._backlogs: dict[tuple[bytes, str], _Backlog] = {}  # one per DEALER
        self._pending: dict[tuple[bytes, str], _Backlog] = {}  # those with queued bytes
        self.port = 0
        self._recv_task: asyncio.Task | None = None
        self._zap_task: asyncio.Task | None = None
        # ROUTER connection id -> the peer's IP address (libzmq's Peer-Address), learned from
        # the first frame of each connection; the newest MAX_KNOWN_CONNECTIONS are kept
        self._conn_address: OrderedDict[bytes, str] = OrderedDict()

    def source_of(self, conn_id: bytes) -> str | None:
        """The IP address the connection ``conn_id`` comes from (None: unknown)."""
        return self._conn_address.get(conn_id)

    async def start(self, host: str, port: int) -> int:
        """Bind the ROUTER on ``host:port`` (0: any free port); returns the port.

        Raises:
            zmq.ZMQError: the address cannot be bound (e.g. ``EADDRINUSE``, a host not of
                this machine); the transport is then closed (no task, socket or event-loop
                reader is left behind)."""
        raise_open_files_limit()
        # pyzmq's checks, our own wait (see serve_zap): AsyncioAuthenticator's poller removed
        # its event-loop reader of the ZAP socket's descriptor only a loop turn after stop()
        self.auth = Authenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve_callback(
            domain="chimera", credentials_provider=_Admission(self.client_public, self.counters, self.on_drop)
        )
        self._zap_task = asyncio.get_running_loop().create_task(serve_zap(self.auth, self.counters))
        # A plain socket: _recv_loop waits on its file descriptor itself (no futures per wake).
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.IPV6, 1)
        router.setsockopt(zmq.RCVHWM, self.recv_hwm)
        router.setsockopt(zmq.SNDHWM, self.send_hwm)
        router.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes + MAXMSGSIZE_SLACK_BYTES)
        router.curve_server = True
        router.curve_secretkey = self.server_secret
        router.curve_publickey = self.server_public
        router.setsockopt(zmq.ZAP_DOMAIN, b"chimera")
        self.router = router
        endpoint_host = f"[{host}]" if ":" in host else host
        try:
            if port:
                router.bind(f"tcp://{endpoint_host}:{port}")
                self.port = port
            else:
                self.port = router.bind_to_random_port(f"tcp://{endpoint_host}")
        except BaseException:
            await self.close()
            raise
        self._recv_task = asyncio.get_running_loop().create_task(self._recv_loop())
        return self.port

    async def _recv_loop(self) -> None:
        """Drain the ROUTER in bursts of up to 512 frames, yielding to the actors between
        bursts; when it is empty, wait for its file descriptor.

        libzmq's ``ZMQ_FD`` is edge-triggered: it signals that the socket's state may
        have changed, and only ``ZMQ_EVENTS`` (or a receive) tells whether a frame is
        queued, consuming the signal. So the loop clears its flag, asks ``EVENTS``, and
        only then sleeps: a frame that arrives after the question signals the FD again.
        (Waiting through ``zmq.asyncio``'s ``poll`` did the same with a future, a poller
        and several loop callbacks per wake: about a tenth of the node's CPU under load.)
        """
        router = self.router
        assert router is not None
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fd = router.getsockopt(zmq.FD)
        loop.add_reader(fd, readable.set)
        try:
            while True:
                batch: list[tuple[bytes, bytes]] = []
                # ask EVENTS before each receive: ending every burst on zmq.Again built an exception
                while len(batch) < 512:
                    try:
                        if not router.getsockopt(_EVENTS) & _POLLIN:
                            break
                        # Part by part, not recv_multipart: a message of N parts (each
                        # under MAXMSGSIZE, libzmq caps nothing else) would be copied
                        # into N Python bytes objects before it could be refused.
                        conn_id = router.recv(_NOBLOCK, copy=True)
                        if not router.getsockopt(_RCVMORE):
                            frame = None
                        elif conn_id in self._conn_address:
                            frame = router.recv(_NOBLOCK, copy=True)
                        else:  # a new connection: learn its address (a property of the frame)
                            part = router.recv(_NOBLOCK, copy=False)
                            frame = part.bytes
                            self._learn_address(conn_id, part)
                        extra = self._discard_rest(router) if router.getsockopt(_RCVMORE) else 0
                    except zmq.Again:
                        break
                    except zmq.ZMQError as exc:
                        if self._terminated(exc):
                            return
                        break
                    if frame is not None and not extra:
                        batch.append((conn_id, frame))
                    else:
                        self.on_drop("malformed", f"conn:{conn_id.hex()}",
                                     f"{0 if frame is None else 1 + extra} frames; an envelope is exactly one")
                if batch:
                    try:
                        self.on_frames(batch)
                    except Exception:  # the node must keep receiving whatever a handler does
                        self.counters["handler_errors"] += 1
                        log.exception("frame handler failed")
                    await asyncio.sleep(0)  # let actors run between bursts
                    continue
                readable.clear()
                try:
                    if router.getsockopt(_EVENTS) & _POLLIN:
                        continue
                except zmq.ZMQError as exc:
                    if self._terminated(exc):
                        return
                    await asyncio.sleep(0.01)
                    continue
                await readable.wait()
        finally:
            if not router.closed:
                loop.remove_reader(fd)

    def _learn_address(self, conn_id: bytes, part: zmq.Frame) -> None:
        try:
            address = part.get("Peer-Address")
        except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
            return  # (no address: the frame is still received, without a new-sender budget)
        known = self._conn_address
        if len(known) >= MAX_KNOWN_CONNECTIONS:
            known.popitem(last=False)
        known[conn_id] = address

    @staticmethod
    def _discard_rest(router: zmq.Socket) -> int:
        """Receive and free the remaining parts of a multipart message without copying
        them into Python (``copy=False``: each part is released as it is received);
        returns how many there were. libzmq delivers a message only whole, so they
        are all there already: holding them until now is the libzmq-side cost that no
        socket option bounds (PROTOCOL.md §5.4)."""
        parts = 0
        while True:
            router.recv(_NOBLOCK, copy=False)
            parts += 1
            if not router.getsockopt(_RCVMORE):
                return parts

    def _terminated(self, exc: zmq.ZMQError) -> bool:
        """True when the context is being terminated (stop receiving); else count and log."""
        if exc.errno == zmq.ETERM:
            return True
        self.counters["recv_errors"] += 1
        log.warning("receive error: %s", exc)
        return False

    def _dealer(self, transport_key: bytes, endpoint: str, unverified: bool = False) -> zmq.Socket:
        """The DEALER to ``endpoint`` (made on first use). ``unverified``: for a contact
        that nobody verified yet (a Hello to a candidate); such DEALERs live in a pool of
        their own of :data:`MAX_UNVERIFIED_DEALERS` (forged mDNS records with fresh keys made
        a node open a lasting DEALER each, up to libzmq's socket limit, which then refused
        every new DEALER, members' too, while the old ones kept reconnecting to whatever
        address the records named). A verified send through such a DEALER promotes it."""
        key = (transport_key, endpoint)
        sock = self.dealers.get(key)
        if sock is not None:
            self.dealers.move_to_end(key)
            return sock
        sock = self.unverified.get(key)
        if sock is not None:
            if unverified:
                self.unverified.move_to_end(key)
                return sock
            del self.unverified[key]
            self.dealers[key] = sock
            self._trim_dealers()
            return sock
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.SNDHWM, self.send_hwm)
        sock.setsockopt(zmq.RCVHWM, 16)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        sock.setsockopt(zmq.MAXMSGSIZE, 1024)  # nothing legitimate ever arrives on a DEALER
        sock.copy_threshold = 0  # a copy=False send is zero-copy whatever its size (tracked)
        sock.curve_serverkey = transport_key
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret
        sock.connect(endpoint)
        self._backlogs[key] = _Backlog()
        self.counters["connections_opened"] += 1
        if unverified:
            self.unverified[key] = sock
            while len(self.unverified) > MAX_UNVERIFIED_DEALERS:
                old_key, old = self.unverified.popitem(last=False)
                self._close(old_key, old)
                self.counters["unverified_connections_closed"] += 1
        else:
            self.dealers[key] = sock
            self._trim_dealers()
        return sock

    def _trim_dealers(self) -> None:
        while len(self.dealers) > MAX_DEALERS:
            old_key, old = self.dealers.popitem(last=False)
            self._close(old_key, old)

    def _pop_dealer(self, key: tuple[bytes, str]) -> zmq.Socket | None:
        sock = self.dealers.pop(key, None)
        return self.unverified.pop(key, None) if sock is None else sock

    def _close(self, key: tuple[bytes, str], sock: zmq.Socket) -> None:
        """Close a DEALER (LINGER 0: libzmq frees what it queued) and forget its backlog."""
        sock.close(linger=0)
        backlog = self._backlogs.pop(key, None)
        if backlog is not None:
            self.queued_bytes -= backlog.queued
            self._pending.pop(key, None)

    def _reap(self, key: tuple[bytes, str], backlog: _Backlog) -> None:
        """Release what libzmq has sent from ``backlog`` (the DEALER ``key``'s)."""
        self.queued_bytes -= backlog.reap()
        if not backlog.queued:
            self._pending.pop(key, None)

    def _make_room(self, key: tuple[bytes, str], size: int) -> bool:
        """Whether ``size`` more counted bytes fit under ``send_queue_max_bytes``.

        Releases what libzmq has sent meanwhile; then, while over the cap, closes the
        DEALER with the largest backlog if it is larger than the one of ``key`` (a peer
        that never drains, counted ``send_backlogs_shed``): a contact that never drains
        cannot take the whole budget from the peers that do."""
        for k, backlog in list(self._pending.items()):
            self._reap(k, backlog)
        own = self._backlogs[key].queued
        while self.queued_bytes + size > self.send_queue_max_bytes:
            worst = max(self._pending, key=lambda k: self._pending[k].queued, default=None)
            if worst is None or worst == key or self._pending[worst].queued <= own:
                return False
            stuck = self._pending[worst].queued
            self._close(worst, self._pop_dealer(worst))
            self.counters["send_backlogs_shed"] += 1
            log.info("closed the connection to %s: it held %d queued bytes", worst[1], stuck)
        return True

    def send(self, transport_key: bytes, endpoint: str, frame: bytes, *, unverified: bool = False) -> bool:
        """Queue ``frame`` to the peer at ``endpoint``; False (and counted) if dropped.
        ``unverified``: ``endpoint`` comes from a contact nobody verified yet (see
        :meth:`_dealer`)."""
        key = (transport_key, endpoint)
        size = len(frame)
        try:
            sock = self._dealer(transport_key, endpoint, unverified)
            backlog = self._backlogs[key]
            if backlog.checkpoints:
                self._reap(key, backlog)
            covered = backlog.untracked + size
            if covered < CHECKPOINT_BYTES:
                sock.send(frame, flags=_NOBLOCK, copy=True)
                backlog.untracked = covered
            else:
                if (self.queued_bytes + covered > self.send_queue_max_bytes
                        and not self._make_room(key, covered)):
                    self.counters["drop_send_bytes"] += 1
                    return False
                tracker = sock.send(frame, flags=_NOBLOCK, copy=False, track=True)
                backlog.checkpoints.append((tracker, covered))
                backlog.queued += covered
                backlog.untracked = 0
                self.queued_bytes += covered
                self._pending[key] = backlog
        except zmq.Again:
            self.counters["drop_send_hwm"] += 1
            return False
        except zmq.ZMQError as exc:
            self.counters["drop_send_error"] += 1
            log.debug("send to %s failed: %s", endpoint, exc)
            return False
        self.counters["frames_sent"] += 1
        return True

    def disconnect(self, transport_key: bytes, endpoint: str) -> None:
        key = (transport_key, endpoint)
        sock = self._pop_dealer(key)
        if sock is not None:
            self._close(key, sock)

    async def close(self) -> None:
        # the tasks remove their event-loop readers as they end: before the sockets close
        for task in (self._recv_task, self._zap_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        for key, sock in [*self.dealers.items(), *self.unverified.items()]:
            self._close(key, sock)
        self.dealers.clear()
        self.unverified.clear()
        if self.router is not None:
            self.router.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
