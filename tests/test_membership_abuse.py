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
    Membership,
    MembershipConfig,
    MemberState,
    MemberUpdate,
    PeerContact,
    Ping,
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
