"""The admin API is up while the node is still starting (before mDNS, metrics and the services):
``status`` then says so in a clear error that clients retry, instead of failing with a traceback."""

from __future__ import annotations

from chimera.node import admin, admin_ops
from chimera.node.config import NodeConfig
from chimera.node.runtime import Node
from tests.conftest import FAST, async_wait_until


async def test_status_during_start_is_a_clear_retryable_error(tmp_path, network, monkeypatch, caplog):
    """status() read ``metrics_server`` before start() had set it: every status call in that
    window failed with an AttributeError traceback in the log (seen while mDNS started). Now the
    admin ``status`` answers "still starting" until start() has finished (LocalNetwork.wait_ready
    and the tests poll it), and Node.status() itself works at any time."""
    seen: list = []
    build = admin_ops.build_admin_server

    def build_and_ask(node):
        server = build(node)
        start = server.start

        async def start_then_ask():
            await start()
            seen.append(node.status())  # the node's own view works
            try:
                await node._admin_handlers()["status"]({})  # what an admin client asking now gets
            except admin.AdminError as exc:
                seen.append(str(exc))
        server.start = start_then_ask
        return server

    monkeypatch.setattr(admin_ops, "build_admin_server", build_and_ask)
    node = Node(tmp_path / "a", NodeConfig(**FAST, metrics_port=0), network)
    await node.start()
    try:
        assert seen[0]["metrics_url"] is None and seen[0]["consensus"] is None
        assert seen[1] == "the node is still starting; ask again in a moment"
        answer = await node._admin_handlers()["status"]({})
        assert answer["metrics_url"].startswith("http://127.0.0.1:")  # once started
        assert "Traceback" not in caplog.text
    finally:
        await node.stop()


async def test_the_membership_cores_refusal_counters_reach_status(node_factory):
    node = await node_factory("m")
    assert "membership_relays_refused" not in node.status()["counters"]  # reported when nonzero
    node.membership.relays_refused = 3
    node.membership.member_lists_refused = 2
    node.membership.incarnations_refused = 1
    counters = node.status()["counters"]
    assert (counters["membership_relays_refused"], counters["membership_member_lists_refused"],
            counters["membership_incarnations_refused"]) == (3, 2, 1)


async def test_a_node_whose_addresses_change_tells_its_members(node_factory):
    """Only the mDNS record followed a changed address: the signed contact kept the start
    addresses and members kept dialling those until a restart. Now the contact follows: the
    incarnation rises (stored first), members get a Hello and route to the new address."""
    a = await node_factory("a", NodeConfig(**{**FAST, "listen_host": "0.0.0.0"}, advertise_hosts=("127.0.0.1",)))
    b = await node_factory("b", NodeConfig(**FAST).replace(bootstrap=(a.contact_uri,)))
    assert await async_wait_until(lambda: a.peer_id in b.membership.members
                                  and b.peer_id in a.membership.members, 30)
    before = a.membership.incarnation
    assert not a.follow_addresses(["127.0.0.1"])  # unchanged: nothing happens
    assert a.follow_addresses(["127.0.0.2"])
    assert a.contact.addresses == (f"tcp://127.0.0.2:{a.port}",) and "127.0.0.2" in a.contact_uri
    assert a.membership.incarnation == before + 1 and a.store.get_meta("incarnation") == before + 1
    assert await async_wait_until(
        lambda: b.membership.members[a.peer_id].contact.addresses == (f"tcp://127.0.0.2:{a.port}",), 30)
    assert b.membership.members[a.peer_id].incarnation == before + 1
    ok = await b.ping(a.peer_id, count=1, timeout_s=10)  # reached at the new address
    assert ok[0] is not None and a.counters["contact_changed"] == 1
