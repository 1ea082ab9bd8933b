"""Membership core against a member that abuses the protocol (PROTOCOL s9-s10): what one
peer can make us send, hold or believe is bounded, and honest behaviour is kept."""

from __future__ import annotations

import random

import pytest

from chimera.protocol.errors import LocalProtocolError
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.membership import (
    GOSSIP_INCARNATION_STEP,
    MAX_INCARNATION,
    REFUTE_LIMIT,
    Ack,
    Hello,
    Leave,
    MemberList,
    Membership,
    MembershipConfig,
    MemberState,
    MemberUpdate,
    PeerContact,
    Ping,
    PingReq,
    Send,
)
from chimera.protocol.messages import decode_fields, encode_fields


def _contact(i: int) -> PeerContact:
    return PeerContact(peer_id=SigningIdentity(i.to_bytes(4, "big") * 8).peer_id,
                       transport_key=i.to_bytes(4, "big") * 8, addresses=(f"tcp://10.0.{i // 256}.{i % 256}:7420",))


def _core(n: int, incarnation: int = 1, **cfg) -> tuple[Membership, list[str]]:
    core = Membership(_contact(1), incarnation, MembershipConfig(**cfg), random.Random(7), 0.0)
    others = [_contact(100 + i) for i in range(n)]
    core.preload_members(others, 0.0)
    return core, [c.peer_id for c in others]


def _sent(core: Membership, kind: type) -> list[Send]:
    return [a for a in core.take_actions() if isinstance(a, Send) and isinstance(a.message, kind)]


# ------------------------------------------------------------ 1. member list amplification


def test_a_peer_gets_our_full_member_list_at_most_once_per_interval():
    """A 175-byte member_list(reply_requested) made us encode and sign the whole table
    (1.2 MB at 4095 members) every time, with no per-peer limit."""
    core, ids = _core(300)
    attacker, honest = ids[0], ids[1]
    interval = core.config.sync_interval_s / 4  # the default member_list_min_interval_s
    for _ in range(5):
        core.on_message(attacker, MemberList(members=(), reply_requested=True), 1.0)
    lists = _sent(core, MemberList)
    assert len(lists) == 2 and {s.peer_id for s in lists} == {attacker}  # one list: 301 rows, 2 chunks
    assert core.member_lists_refused == 4
    core.on_message(honest, MemberList(members=(), reply_requested=True), 1.0)  # per peer
    assert len(_sent(core, MemberList)) == 2
    core.on_message(attacker, MemberList(members=(), reply_requested=True), 1.0 + interval)
    assert len(_sent(core, MemberList)) == 2
    assert core.member_lists_refused == 4


def test_leave_and_hello_again_cannot_pull_the_member_list_each_time():
    """A member that leaves and says Hello again (or is suspect) got a full list per Hello."""
    core, ids = _core(50)
    attacker = ids[0]
    contact = core.members[attacker].contact
    for i in range(6):
        core.on_message(attacker, Leave(incarnation=1), 1.0 + i * 0.01)
        core.on_message(attacker, Hello(contact=contact, incarnation=1, reply_requested=False), 1.0 + i * 0.01)
        assert core.members[attacker].state is MemberState.ALIVE
    assert len(_sent(core, MemberList)) == 1
    assert core.member_lists_refused == 5
    # and a reply request right after is the same limit
    core.on_message(attacker, MemberList(members=(), reply_requested=True), 1.1)
    assert not _sent(core, MemberList) and core.member_lists_refused == 6


def test_member_list_interval_is_configurable_and_checked():
    assert MembershipConfig(member_list_interval_s=2.0).member_list_min_interval_s == 2.0
    with pytest.raises(ValueError, match="member_list_interval_s"):
        MembershipConfig(member_list_interval_s=0.0)


# ------------------------------------------------------------ 2. incarnation brick


def test_a_forged_claim_near_the_cap_cannot_push_our_incarnation_past_what_a_hello_encodes(tmp_path):
    """'you are suspect at 2**62 - 1' made us refute to 2**62; the next start bumped to
    2**62 + 1, which no Hello can encode: the node could never rejoin."""
    from chimera.node.store import Store

    core, ids = _core(3)
    for inc in (MAX_INCARNATION - 1, REFUTE_LIMIT):
        core.on_message(ids[0], Ping(probe_id=1, updates=(
            MemberUpdate(peer_id=core.peer_id, state="suspect", incarnation=inc),)), 0.0)
    core.on_message(ids[0], Ping(probe_id=2, updates=(
        MemberUpdate(peer_id=core.peer_id, state="alive", incarnation=MAX_INCARNATION),)), 0.0)
    assert core.incarnation == 1 and core.incarnations_refused == 3
    # nor a claim more than GOSSIP_INCARNATION_STEP above our own: it pushed us to the cap
    core.on_message(ids[0], Ping(probe_id=3, updates=(
        MemberUpdate(peer_id=core.peer_id, state="dead", incarnation=REFUTE_LIMIT - 1),)), 0.0)
    assert core.incarnation == 1 and core.incarnations_refused == 4
    # a node near the cap (2**20 restarts away from it) refutes up to REFUTE_LIMIT, no further
    core, ids = _core(3, incarnation=REFUTE_LIMIT - 3)
    core.on_message(ids[0], Ping(probe_id=3, updates=(
        MemberUpdate(peer_id=core.peer_id, state="dead", incarnation=REFUTE_LIMIT - 1),)), 0.0)
    assert core.incarnation == REFUTE_LIMIT  # the highest a refutation reaches

    store = Store(tmp_path)
    try:
        store.set_meta("incarnation", core.incarnation)
        assert store.bump_incarnation() == REFUTE_LIMIT + 1
        for stored in (MAX_INCARNATION - 1, MAX_INCARNATION, MAX_INCARNATION + 1, MAX_INCARNATION + 5):
            store.set_meta("incarnation", stored)  # written by an older node: no crash loop
            assert store.bump_incarnation() == MAX_INCARNATION
            assert store.get_meta("incarnation") == MAX_INCARNATION
    finally:
        store.close()
    hello = Hello(contact=core.contact, incarnation=MAX_INCARNATION)
    assert decode_fields(Hello, encode_fields(hello), "hello") == hello
    with pytest.raises(LocalProtocolError, match="2\\*\\*62"):
        Membership(core.contact, MAX_INCARNATION + 1, MembershipConfig(), random.Random(1), 0.0)


# ------------------------------------------------------------ 3. third parties and incarnations


def test_gossip_cannot_pin_another_peer_near_the_cap_but_its_own_hello_can_jump():
    core, ids = _core(5)
    attacker, victim = ids[0], ids[1]

    def gossip(state: str, inc: int) -> None:
        core.on_message(attacker, Ping(probe_id=1, updates=(
            MemberUpdate(peer_id=victim, state=state, incarnation=inc),)), 0.0)

    gossip("alive", MAX_INCARNATION)
    gossip("dead", MAX_INCARNATION)
    gossip("suspect", 2 + GOSSIP_INCARNATION_STEP)
    assert core.members[victim].incarnation == 1 and core.members[victim].state is MemberState.ALIVE
    assert core.incarnations_refused == 3
    gossip("alive", 1 + GOSSIP_INCARNATION_STEP)  # within the bound: honest SWIM precedence
    assert core.members[victim].incarnation == 1 + GOSSIP_INCARNATION_STEP
    contact = core.members[victim].contact
    core.on_message(victim, Hello(contact=contact, incarnation=10**12, reply_requested=False), 0.1)
    assert core.members[victim].incarnation == 10**12


def _drive_suspicion(core: Membership, attacker: str, target: str, heard_from_target: bool) -> float:
    """Our probe of target failed; then every 3 s the attacker gossips 'target suspect at
    inc + 1'. Returns when target was declared dead (inf if never within 300 s)."""
    core._suspect(core.members[target], 1, core.peer_id, 0.0)
    t, inc = 0.0, 1
    while t < 300:
        t += 3.0
        inc += 1
        if heard_from_target:  # target answers us (alive, just unlucky with others)
            core.on_message(target, Ack(probe_id=0), t - 0.1)
        core.on_message(attacker, Ping(probe_id=int(t), updates=(
            MemberUpdate(peer_id=target, state="suspect", incarnation=inc),)), t)
        for dt in (0.0, 0.6, 1.2, 1.8, 2.4):
            core.tick(t + dt)
            for a in core.take_actions():
                if isinstance(a, Send) and a.peer_id == attacker and isinstance(a.message, Ping):
                    core.on_message(attacker, Ack(probe_id=a.message.probe_id), t + dt)
            if core.members[target].state is MemberState.DEAD:
                return t + dt
    return float("inf")


def test_rising_gossiped_suspicions_do_not_postpone_a_silent_peers_death():
    """'P suspect at inc + 1' every few seconds restarted the suspicion timer: a dead P
    was never declared dead."""
    core, ids = _core(10)
    died = _drive_suspicion(core, ids[1], ids[0], heard_from_target=False)
    _, max_s = core.suspicion_bounds_s()
    assert died <= max_s + 3.0


def test_a_suspicion_at_a_new_incarnation_restarts_when_the_peer_was_heard_from():
    core, ids = _core(10)
    target = core.members[ids[0]]
    core._suspect(target, 1, core.peer_id, 0.0)
    core.on_message(ids[0], Ack(probe_id=0), 5.0)  # direct evidence it lives
    core.on_message(ids[1], Ping(probe_id=1, updates=(
        MemberUpdate(peer_id=ids[0], state="suspect", incarnation=2),)), 6.0)
    assert target.suspect_started == 6.0
    core.on_message(ids[2], Ping(probe_id=2, updates=(
        MemberUpdate(peer_id=ids[0], state="suspect", incarnation=3),)), 7.0)
    assert target.suspect_started == 6.0  # not heard from since: the start stays


# ------------------------------------------------------------ 4. piggyback budget


def test_one_peers_pings_cannot_use_up_our_refutation():
    """Each Ack to a member's Ping spent one send of every pending update: 8 pings
    from one peer drained our refutation before anyone else heard it."""
    core, ids = _core(10)
    attacker, honest, others = ids[0], ids[1], ids[2:]
    core.on_message(honest, Ping(probe_id=1, updates=(
        MemberUpdate(peer_id=core.peer_id, state="suspect", incarnation=1),)), 0.0)
    assert core.incarnation == 2
    core.take_actions()
    for i in range(50):
        core.on_message(attacker, Ping(probe_id=100 + i), 0.1)
    acks = [s.message for s in _sent(core, Ack)]
    assert [u.peer_id for u in acks[0].updates] == [core.peer_id]
    assert all(not a.updates for a in acks[1:])  # it already has it: nothing spent
    budget = core.config.gossip_mult * 2  # ceil(log10(11 + 1)) = 2: 8 sends, to 8 distinct peers
    for pid in others[:budget - 2]:  # the honest suspector and the attacker had theirs
        core.on_message(pid, Ping(probe_id=200), 0.2)
        (ack,) = [s.message for s in _sent(core, Ack)]
        assert [(u.peer_id, u.incarnation) for u in ack.updates] == [(core.peer_id, 2)]
    assert core.peer_id not in core._gossip  # spent, on 8 different peers


# ------------------------------------------------------------ 5. relay table


def test_one_requester_cannot_fill_the_relay_table():
    core, ids = _core(10)
    attacker, honest, target = ids[0], ids[1], ids[2]
    for i in range(256):
        core.on_message(attacker, PingReq(probe_id=i, target=target), 0.0)
    quota = 2 * core.config.indirect_checks  # the default relay_quota
    assert len(_sent(core, Ping)) == quota
    assert core.relays_refused == 256 - quota
    core.on_message(honest, PingReq(probe_id=999, target=target), 0.1)
    core.on_message(honest, PingReq(probe_id=999, target=target), 0.1)  # one relay per probe id
    (ping,) = _sent(core, Ping)
    assert core.relays_refused == 256 - quota + 1
    core.on_message(target, Ack(probe_id=ping.message.probe_id), 0.2)
    (ack,) = _sent(core, Ack)
    assert ack.peer_id == honest and ack.message.probe_id == 999 and ack.message.of == target
    # relays expire: the quota frees up
    core.tick(0.0 + 2 * core.config.probe_interval_s)
    core.take_actions()
    assert not core._relays and not core._relays_by
    assert core.config.relay_quota == quota
    core.on_message(attacker, PingReq(probe_id=1000, target=target), 2.5)
    assert len(_sent(core, Ping)) == 1


# ------------------------------------------------------------ 6. confirmations per incarnation


def test_confirmations_of_an_older_incarnation_do_not_count_for_a_newer_one():
    core, ids = _core(10)
    p, a, b, c = ids[:4]

    def suspect(by: str, inc: int) -> None:
        core.on_message(by, Ping(probe_id=1, updates=(
            MemberUpdate(peer_id=p, state="suspect", incarnation=inc),)), 0.0)

    suspect(a, 1)
    suspect(b, 1)
    assert core.members[p].confirmations == {a, b}
    suspect(c, 2)
    member = core.members[p]
    assert member.incarnation == 2 and member.confirmations == {c}
    min_s, max_s = core.suspicion_bounds_s()
    assert member.suspect_deadline - member.suspect_started > min_s + 0.5 * (max_s - min_s) - 1e-9


# ------------------------------------------------------------ 7. full table, static candidate


def test_a_full_table_keeps_the_static_candidate_of_a_peer_it_could_not_add():
    core, ids = _core(4, max_members=4)
    boot = _contact(9999)
    core.add_candidate(boot, 0.0, static=True)
    core.on_message(boot.peer_id, Hello(contact=boot, incarnation=1), 1.0)
    assert boot.peer_id not in core.members
    assert boot.peer_id in core.candidates  # retried later
    core.members.pop(ids[0])  # room again (e.g. a revoked or forgotten member)
    core.tick(1000.0)
    assert [a for a in core.take_actions() if isinstance(a, Send) and a.peer_id == boot.peer_id]
    core.on_message(boot.peer_id, Hello(contact=boot, incarnation=1), 1001.0)
    assert core.members[boot.peer_id].state is MemberState.ALIVE
    assert boot.peer_id not in core.candidates


# ------------------------------------------------------------ 8. a Hello listing no address


def test_a_hello_listing_no_address_is_refused_and_counted():
    """A Hello with an empty address list decoded and added its sender, which nothing could
    reach: it failed every probe and was gossiped as suspect and dead for nothing (§8.1)."""
    core, _ = _core(3)
    mute = _contact(777)
    core.on_message(mute.peer_id, Hello(contact=PeerContact(peer_id=mute.peer_id, transport_key=mute.transport_key, addresses=()),
                                        incarnation=1, reply_requested=True), 1.0)
    assert mute.peer_id not in core.members and core.hellos_refused == 1
    assert not [a for a in core.take_actions() if isinstance(a, Send) and a.peer_id == mute.peer_id]
    core.on_message(mute.peer_id, Hello(contact=mute, incarnation=1), 2.0)  # with an address: added
    assert core.members[mute.peer_id].state is MemberState.ALIVE and core.hellos_refused == 1


# ------------------------------------------------------------ 9. claims about a dead member


def test_an_alive_claim_about_a_dead_member_is_checked_not_passed_on_as_its_death():
    """A dead P claimed alive at j by a third party: the row took j as P's incarnation, so our
    member lists said "P dead at j" and killed P wherever it was alive at j (found by the
    clean-room SWIM member). The row keeps the incarnation P failed at; each higher claim
    gets one Hello to P; P's own Hello makes it alive."""
    core, ids = _core(4)
    p, gossiper, asker = ids[0], ids[1], ids[2]
    core.on_message(gossiper, Ping(probe_id=1, updates=(MemberUpdate(peer_id=p, state="dead", incarnation=1),)), 1.0)
    assert core.members[p].state is MemberState.DEAD
    core.take_actions()
    claim = Ping(probe_id=2, updates=(MemberUpdate(peer_id=p, state="alive", incarnation=3),))
    core.on_message(gossiper, claim, 2.0)
    assert [s.peer_id for s in _sent(core, Hello)] == [p]  # checked with P itself
    core.on_message(gossiper, claim, 2.1)  # the same claim again: no second Hello
    assert not _sent(core, Hello)
    row = core.members[p]
    assert (row.state, row.incarnation) == (MemberState.DEAD, 1)
    core.on_message(asker, MemberList(members=(), reply_requested=True), 3.0)
    rows = [u for s in _sent(core, MemberList) for u in s.message.members if u.peer_id == p]
    assert [(u.state, u.incarnation) for u in rows] == [("dead", 1)]
    core.on_message(gossiper, Ping(probe_id=3, updates=(MemberUpdate(peer_id=p, state="alive", incarnation=4),)),
                    4.0)
    assert [s.peer_id for s in _sent(core, Hello)] == [p]  # a higher claim: asked again
    core.on_message(p, Hello(contact=row.contact, incarnation=2), 5.0)  # P's own word: alive at 2
    assert (row.state, row.incarnation) == (MemberState.ALIVE, 2)


def test_a_member_back_from_dead_gets_our_hello_before_our_member_list():
    """A restarted peer that lost us drops a member list from a non-member (§9.1): sent before
    our Hello, the list was lost and its own request then fell in our per-peer interval, so it
    learned the other members only by anti-entropy (23-30 s in the clean-room SWIM test)."""
    core, ids = _core(4)
    p = ids[0]
    contact = core.members[p].contact
    core.on_message(p, Leave(incarnation=1), 1.0)
    core.take_actions()
    core.on_message(p, Hello(contact=contact, incarnation=2, reply_requested=True), 2.0)
    kinds = [type(a.message) for a in core.take_actions() if isinstance(a, Send) and a.peer_id == p]
    assert kinds[:2] == [Hello, MemberList], kinds
