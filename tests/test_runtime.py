"""In-process runtime: actor addressing, local delivery, supervision."""

from __future__ import annotations

import asyncio

from chimera.node.actors import Actor, ActorRef
from chimera.protocol.diagnostics import ECHO_ACTOR, EchoReply, EchoRequest
from tests.conftest import async_wait_until


async def test_tell_local_stays_in_process_and_remote_is_signed(node_factory):
    a = await node_factory("a")
    b = await node_factory("b", a.config.replace(bootstrap=(a.contact_uri,)))
    assert await async_wait_until(lambda: b.peer_id in a.routes and a.peer_id in b.routes, 30)
    sent_before = a.counters["frames_sent"]
    assert a.tell(ActorRef(a.peer_id, ECHO_ACTOR), EchoRequest(nonce=1, reply=False))
    assert a.counters["frames_sent"] == sent_before  # synchronous, local: no transport
    assert await async_wait_until(lambda: a.counters["echo_requests_received"] == 1, 10)
    assert a.tell(ActorRef(b.peer_id, ECHO_ACTOR), EchoRequest(nonce=2, reply=False))
    assert await async_wait_until(lambda: b.counters["echo_requests_received"] == 1, 10)
    assert a.counters["echo_requests_received"] == 1
    assert not a.tell(ActorRef(a.peer_id, "nobody"), EchoReply(nonce=1))
    assert a.counters["drop_local_no_actor"] == 1


async def test_supervisor_restarts_crashed_actor_and_drops_poison(node_factory):
    node = await node_factory("a")

    class Fragile(Actor):
        name = "fragile"

        def __init__(self) -> None:
            self.handled: list[int] = []
            self.restarts = 0

        async def handle(self, item) -> None:
            if item.message.nonce == 13:
                raise RuntimeError("poison")
            self.handled.append(item.message.nonce)

        def on_restart(self) -> None:
            self.restarts += 1

    actor = Fragile()
    node.supervisor.spawn(actor)
    for nonce in (1, 13, 2):
        assert node.tell(ActorRef(node.peer_id, "fragile"), EchoRequest(nonce=nonce))
    assert await async_wait_until(lambda: actor.handled == [1, 2], 10)
    assert actor.restarts == 2
    assert node.counters["actor_crashes.fragile"] == 2
    assert node.counters["poison_dropped.fragile"] == 1


async def test_a_node_whose_store_was_lost_still_numbers_above_what_it_sent(tmp_path, network):
    """PROTOCOL §6.3: the sequence floor lived only in the store, so a node restarted with its
    store lost (or an older copy) numbered from 1 again, below every peer's replay window:
    all it sent was dropped as ``replay`` for as long as its peers ran (found by a chaos
    walk-through: the peer stayed at height 0 and, with one more crash, the log stopped).
    Blocks now start no lower than the wall clock in ms x SEQ_BLOCK."""
    from chimera.node.config import NodeConfig
    from chimera.node.runtime import Node
    from tests.conftest import FAST

    sent = 0
    for _ in range(2):  # a restart: the second start continues past the first block
        node = Node(tmp_path / "n", NodeConfig(**FAST), network)
        await node.start()
        assert node.sealer.next_seq > sent
        sent = node.sealer.next_seq + 3
        await node.stop()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / "n" / f"node.sqlite3{suffix}").unlink(missing_ok=True)
    node = Node(tmp_path / "n", NodeConfig(**FAST), network)
    await node.start()
    try:
        assert node.sealer.next_seq > sent  # above everything sent before the store was lost
    finally:
        await node.stop()


async def test_keys_reused_across_restart_and_never_logged(tmp_path, network, caplog):
    from chimera.node.config import NodeConfig
    from chimera.node.runtime import Node
    from tests.conftest import FAST

    caplog.set_level("DEBUG")
    first = Node(tmp_path / "n", NodeConfig(**FAST), network)
    await first.start()
    peer_id, transport_public = first.peer_id, first.transport_keys.public
    seed, transport_secret = first.identity.seed_bytes(), first.transport_keys.secret
    await first.stop()
    second = Node(tmp_path / "n", NodeConfig(**FAST), network)
    await second.start()
    try:
        assert second.peer_id == peer_id and second.transport_keys.public == transport_public
        assert second.incarnation == first.incarnation + 1
        assert second.sealer.next_seq > first.sealer.next_seq  # never reuses a sequence number
    finally:
        await second.stop()
    for secret in (seed, transport_secret, network.secret):
        for form in (secret.hex(), repr(secret)):
            assert form not in caplog.text
    for name in ("identity.key", "transport.key", "node.sqlite3"):
        assert (tmp_path / "n" / name).stat().st_mode & 0o077 == 0, name
    await asyncio.sleep(0)
