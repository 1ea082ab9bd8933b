"""A node restarted in the same process (and event loop) rejoins its peers.

Tests build several nodes in one process, and restart a node on its data directory while
its peers keep running (the simulator's peers use no ZeroMQ). The restarted node's transport must
answer CURVE handshakes again: every inbound connection waits on this node's ZAP handler.
"""

from __future__ import annotations

from chimera.node.actors import ActorRef
from chimera.node.config import NodeConfig
from chimera.node.runtime import Node
from chimera.protocol.diagnostics import ECHO_ACTOR, EchoRequest
from tests.conftest import FAST, async_wait_until


async def test_a_node_restarted_in_process_on_a_new_port_rejoins(tmp_path, network):
    """B stops and starts again on its data directory, on a new port, in A's event loop.

    Before: B's new ZAP socket got the file descriptor number of its old one, and pyzmq's
    AsyncioAuthenticator, stopped with the old transport, removed the event-loop reader of
    that number one loop turn later: the new ZAP handler was never woken, no handshake into
    B's ROUTER completed, and A's Hellos and probes to B never arrived (B's routes stayed
    empty; A declared B suspect and failed over and over).
    """
    a = Node(tmp_path / "a", NodeConfig(**FAST), network)
    await a.start()
    b = b2 = None
    try:
        b = Node(tmp_path / "b", NodeConfig(**FAST).replace(bootstrap=(a.contact_uri,)), network)
        await b.start()
        assert await async_wait_until(lambda: b.peer_id in a.routes and a.peer_id in b.routes, 30)
        old_port = b.port
        await b.stop()
        b2 = Node(tmp_path / "b", NodeConfig(**FAST).replace(bootstrap=(a.contact_uri,)), network)
        await b2.start()
        assert b2.peer_id == b.peer_id and b2.port != old_port

        def rejoined() -> bool:
            route = a.routes.get(b2.peer_id)
            return (a.peer_id in b2.routes and route is not None
                    and route.addresses == b2.contact.addresses)

        assert await async_wait_until(rejoined, 30), (dict(b2.counters), dict(a.counters))
        assert b2.counters["handshakes_admitted"] >= 1  # A's DEALER got through B2's ZAP handler
        # both directions carry envelopes
        assert a.tell(ActorRef(b2.peer_id, ECHO_ACTOR), EchoRequest(nonce=1, reply=False))
        assert b2.tell(ActorRef(a.peer_id, ECHO_ACTOR), EchoRequest(nonce=2, reply=False))
        assert await async_wait_until(lambda: b2.counters["echo_requests_received"] == 1
                                      and a.counters["echo_requests_received"] == 1, 30)
    finally:
        for node in (b2, b, a):
            if node is not None:
                await node.stop()


def _transport(network, keys, got: list):
    from collections import Counter

    from chimera.node.transport import Transport

    return Transport(network, keys[1], keys[0], on_frames=got.extend, counters=Counter(),
                     on_drop=lambda reason, who, detail: None, max_message_bytes=1 << 20,
                     send_hwm=1000, recv_hwm=1000)


def _curve_keys() -> tuple[bytes, bytes]:
    import zmq
    from zmq.utils import z85

    public, secret = zmq.curve_keypair()
    return z85.decode(public), z85.decode(secret)


async def test_a_transport_started_again_in_the_same_loop_admits_handshakes(network):
    """The transport-level cause of the test above: close a Transport and start another with
    the same keys in the same event loop at once; a DEALER's handshake into the new one must
    be admitted (before, its ZAP socket could lose its event-loop reader to the old one's
    deferred clean-up, and no handshake ever completed)."""
    keys = _curve_keys()
    sender_got: list = []
    sender = _transport(network, _curve_keys(), sender_got)
    await sender.start("127.0.0.1", 0)
    try:
        for round_ in range(3):
            got: list = []
            receiver = _transport(network, keys, got)
            port = await receiver.start("127.0.0.1", 0)
            try:
                frame = b"round %d" % round_
                assert sender.send(keys[0], f"tcp://127.0.0.1:{port}", frame)
                assert await async_wait_until(lambda: [f for _, f in got] == [frame], 30), \
                    (round_, dict(receiver.counters))
                assert receiver.counters["handshakes_admitted"] == 1
            finally:
                await receiver.close()
    finally:
        await sender.close()


async def test_a_failing_zap_check_fails_that_handshake_and_later_ones_are_still_answered(network):
    """An exception in the admission check is answered (ZAP status 500: that handshake fails,
    and libzmq's client does not retry it), counted ``zap_errors`` and logged; the ZAP handler
    keeps answering, so the next connection is admitted. (Unanswered, the REP socket would
    refuse every later request: no handshake into the node would ever complete again.)"""
    keys = _curve_keys()
    got: list = []
    receiver = _transport(network, keys, got)
    port = await receiver.start("127.0.0.1", 0)
    endpoint = f"tcp://127.0.0.1:{port}"
    admission = receiver.auth.credentials_providers["chimera"]

    class FailsOnce:
        def __init__(self) -> None:
            self.calls = 0

        def callback(self, domain: str, key: bytes) -> bool:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("a bug in the admission check")
            return admission.callback(domain, key)

    receiver.auth.credentials_providers["chimera"] = FailsOnce()
    first = _transport(network, _curve_keys(), [])
    second = _transport(network, _curve_keys(), [])
    try:
        assert first.send(keys[0], endpoint, b"lost with its handshake")
        assert await async_wait_until(lambda: receiver.counters["zap_errors"] == 1, 30)
        assert second.send(keys[0], endpoint, b"admitted")
        assert await async_wait_until(lambda: [f for _, f in got] == [b"admitted"], 30), \
            dict(receiver.counters)
        assert receiver.counters["handshakes_admitted"] == 1
    finally:
        for transport in (first, second, receiver):
            await transport.close()


async def test_a_transport_that_cannot_bind_leaves_nothing_running(network):
    """A listen port that is taken: start() raises and closes what it had opened (the ZAP
    task and its event-loop reader, the sockets, the context); closing again is harmless."""
    import zmq

    first = _transport(network, _curve_keys(), [])
    port = await first.start("127.0.0.1", 0)
    second = _transport(network, _curve_keys(), [])
    try:
        try:
            await second.start("127.0.0.1", port)
        except zmq.ZMQError as exc:
            assert exc.errno == zmq.EADDRINUSE
        else:
            raise AssertionError("a second ROUTER bound a port that is taken")
        assert second._zap_task is not None and second._zap_task.done()
        assert second.ctx.closed and second.router.closed
        await second.close()
    finally:
        await first.close()


async def test_the_remote_admin_api_restarted_in_process_answers(tmp_path):
    """The remote admin server had the same deferred clean-up (pyzmq's AsyncioAuthenticator):
    a server started right after another closed in the same event loop could lose its ZAP
    reader, and then no client's CURVE handshake completed (the client got no answer)."""
    import asyncio

    import zmq

    from chimera.node import admin

    secret, public = (z := zmq.curve_keypair())[1], z[0]
    from zmq.utils import z85
    secret, public = z85.decode(secret), z85.decode(public)

    async def dispatch(body: bytes, transport: str, address=None):
        return {"ok": True, "result": {"transport": transport}}, None

    for attempt in range(3):
        server = admin.RemoteAdminServer("tcp://127.0.0.1:0", secret, public, dispatch)
        await server.start()
        try:
            client = admin.RemoteClient(f"tcp://127.0.0.1:{server.port}", public, None, timeout_s=10)
            reply = await asyncio.to_thread(client.send_raw, b"\x80")
            assert reply == {"ok": True, "result": {"transport": "remote"}}, (attempt, reply)
        finally:
            await server.close()
