"""Signed alive claims (PROTOCOL.md §10.3): only a peer raises its own incarnation, so an
``alive`` update that raises it is taken from a third party only with the peer's
signature; the signature is kept and re-gossiped; peers that do not sign (older
peers) keep the old rule and never receive the new field."""

from __future__ import annotations

import random

import msgpack
import pytest

from chimera.protocol.errors import LocalProtocolError, MalformedError
from chimera.protocol.identity import SigningIdentity, verify_signature
from chimera.protocol.membership import (
    ALIVE_DOMAIN,
    ALIVE_PROOF_CAPABILITY,
    GOSSIP_INCARNATION_STEP,
    AliveProofs,
    Hello,
    MemberList,
    Membership,
    MembershipConfig,
    MemberState,
    MemberUpdate,
    PeerContact,
    Ping,
    Send,
    alive_statement,
)
from chimera.protocol.messages import decode_fields, encode_fields, record

NETWORK_ID = bytes.fromhex("f9ebc14caf54723ac3b1ea8443470ebb")  # the network id of §13
CFG = MembershipConfig(probe_interval_s=1.0, probe_timeout_s=0.4)


class CountingVerifier:
    """``verify_signature`` that counts its calls (real checks, no mock answers)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, public_key: bytes, signature: bytes, message: bytes) -> bool:
        self.calls += 1
        return verify_signature(public_key, signature, message)


def _identity(i: int) -> SigningIdentity:
    return SigningIdentity(bytes([i]) * 32)


def _contact(identity: SigningIdentity, i: int, *, signs: bool = True) -> PeerContact:
    return PeerContact(peer_id=identity.peer_id, transport_key=bytes([i]) * 32,
                       addresses=(f"tcp://10.0.0.{i}:7420",),
                       capabilities=("membership", ALIVE_PROOF_CAPABILITY) if signs else ("membership",))


class Group:
    """Our core (identity 1) with members 2..n preloaded; ``signs``: which members list the
    capability (default all)."""

    def __init__(self, n: int = 6, *, unsigned: tuple[int, ...] = ()) -> None:
        self.ids = {i: _identity(i) for i in range(1, n + 1)}
        self.verify = CountingVerifier()
        self.core = Membership(_contact(self.ids[1], 1), 1, CFG, random.Random(3), 0.0,
                               proofs=AliveProofs(NETWORK_ID, self.ids[1].sign, self.verify))
        self.contacts = {i: _contact(self.ids[i], i, signs=i not in unsigned) for i in range(2, n + 1)}
        self.core.preload_members(self.contacts.values(), 0.0)

    def pid(self, i: int) -> str:
        return self.ids[i].peer_id

    def member(self, i: int):
        return self.core.members[self.pid(i)]

    def proof(self, i: int, incarnation: int) -> bytes:
        return self.ids[i].sign(alive_statement(NETWORK_ID, self.pid(i), incarnation))

    def gossip(self, sender: int, *updates: MemberUpdate, now: float = 0.0) -> None:
        self.core.on_message(self.pid(sender), Ping(probe_id=1, updates=updates), now)

    def alive(self, about: int, incarnation: int, signature: bytes | None = None) -> MemberUpdate:
        return MemberUpdate(peer_id=self.pid(about), state="alive", incarnation=incarnation, signature=signature)

    def suspect(self, about: int, incarnation: int) -> MemberUpdate:
        return MemberUpdate(peer_id=self.pid(about), state="suspect", incarnation=incarnation)


def _run_until(core: Membership, end: float) -> None:
    now = 0.0
    while now < end:
        now = min(max(core.next_deadline(), now + 1e-3), end)
        core.tick(now)
        core.take_actions()


# ------------------------------------------------------------------ the attack


def test_an_unsigned_alive_claim_cannot_keep_a_suspect_alive_and_it_goes_dead():
    """A member gossiping "P alive at inc + 1" for a P that really died made every receiver
    take P back (a higher incarnation overrides the suspicion): P stayed alive for ever."""
    g = Group()
    victim, liar = 2, 3
    g.gossip(4, g.suspect(victim, 1))
    assert g.member(victim).state is MemberState.SUSPECT
    for k in range(2, 12):  # again and again, one incarnation higher each time
        g.gossip(liar, g.alive(victim, k), now=0.1 * k)
        assert g.member(victim).state is MemberState.SUSPECT and g.member(victim).incarnation == 1
    assert g.core.alive_unsigned == 10 and g.verify.calls == 0
    deadline = g.member(victim).suspect_deadline
    _run_until(g.core, deadline + 0.01)
    assert g.member(victim).state is MemberState.DEAD
    # nor does it make us re-check a dead peer (a Hello to it per forged claim)
    g.core.take_actions()
    g.gossip(liar, g.alive(victim, 20))
    assert g.member(victim).incarnation == 1
    assert not [a for a in g.core.take_actions() if isinstance(a, Send) and isinstance(a.message, Hello)]
    assert g.core.alive_unsigned == 11


def test_a_signed_refutation_relayed_by_a_third_party_clears_the_suspicion_and_is_regossiped():
    g = Group()
    victim, relay = 2, 3
    g.gossip(4, g.suspect(victim, 1))
    signature = g.proof(victim, 2)
    g.gossip(relay, g.alive(victim, 2, signature))
    member = g.member(victim)
    assert member.state is MemberState.ALIVE and member.incarnation == 2
    assert (member.proof, member.proof_incarnation) == (signature, 2) and g.verify.calls == 1
    # copies of the same claim cost no further check
    for sender in (4, 5, 3):
        g.gossip(sender, g.alive(victim, 2, signature))
    assert g.verify.calls == 1
    # it spreads on with the signature: a ping we send carries it
    g.core.take_actions()
    g.core._start_probe(1.0)
    pings = [a.message for a in g.core.take_actions() if isinstance(a, Send) and isinstance(a.message, Ping)]
    about = [u for p in pings for u in p.updates if u.peer_id == g.pid(victim)]
    assert about and all(u.signature == signature and u.incarnation == 2 for u in about)
    # and in the full member list
    g.core._send_member_list(g.pid(5), reply_requested=False)
    (lst,) = [a.message for a in g.core.take_actions() if isinstance(a.message, MemberList)]
    row = next(u for u in lst.members if u.peer_id == g.pid(victim))
    assert row.signature == signature


def test_a_forged_signature_is_counted_and_ends_the_checks_of_that_message():
    g = Group()
    victim, liar = 2, 3
    g.gossip(4, g.suspect(victim, 1))
    forged = bytes(range(64))
    wrong_inc = g.proof(victim, 5)  # a real signature, for another incarnation
    g.gossip(liar, g.alive(victim, 2, forged), g.alive(victim, 3, wrong_inc), g.alive(victim, 4, forged))
    assert g.member(victim).state is MemberState.SUSPECT and g.member(victim).incarnation == 1
    assert g.core.alive_bad_signatures == 3 and g.verify.calls == 1  # one check for the message
    g.gossip(liar, g.alive(victim, 5, wrong_inc))  # the next message is checked again: it is valid
    assert g.verify.calls == 2 and g.member(victim).state is MemberState.ALIVE
    assert g.member(victim).incarnation == 5


def test_the_peer_itself_needs_no_signature_but_a_bad_one_is_not_kept():
    g = Group()
    peer = 2
    g.gossip(4, g.suspect(peer, 1))
    g.gossip(peer, g.alive(peer, 2))  # its own envelope speaks for it
    assert g.member(peer).state is MemberState.ALIVE and g.member(peer).incarnation == 2
    assert g.member(peer).proof is None and g.core.alive_unsigned == 0
    g.gossip(peer, g.alive(peer, 3, bytes(64)))
    assert g.member(peer).incarnation == 3 and g.member(peer).proof is None
    assert g.core.alive_bad_signatures == 1


def test_a_member_that_does_not_sign_keeps_the_old_rule_and_never_gets_the_field():
    """An older peer neither signs nor knows the field: alive claims about it are taken as
    before, and what we send it carries no signature (it would reject the whole message)."""
    g = Group(unsigned=(2,))
    old, signer, relay = 2, 5, 3
    g.gossip(4, g.suspect(old, 1))
    g.gossip(relay, g.alive(old, 2))
    assert g.member(old).state is MemberState.ALIVE and g.member(old).incarnation == 2
    assert g.core.alive_unsigned == 0
    signature = g.proof(signer, 2)
    g.gossip(relay, g.alive(signer, 2, signature))
    g.core.take_actions()
    g.core._send_member_list(g.pid(old), reply_requested=False)
    g.core._send(g.pid(old), Ping(probe_id=9, updates=g.core._piggyback(g.pid(old))))
    sent = [a.message for a in g.core.take_actions() if isinstance(a, Send)]
    rows = [u for m in sent for u in (m.members if isinstance(m, MemberList) else m.updates)]
    assert any(u.peer_id == g.pid(signer) and u.incarnation == 2 for u in rows)
    assert all(u.signature is None for u in rows)
    for m in sent:  # on the wire: no "signature" key at all
        assert b"signature" not in msgpack.packb(encode_fields(m), use_bin_type=True)


def test_a_signature_learned_after_a_hello_is_kept_for_the_same_incarnation():
    """A restarted peer's Hello raises its incarnation without a signature; the signed self
    update that follows (its member list) is kept, and the queued gossip carries it."""
    g = Group()
    peer = 2
    g.core.on_message(g.pid(peer), Hello(contact=g.contacts[peer], incarnation=4, reply_requested=False), 1.0)
    assert g.member(peer).incarnation == 4 and g.member(peer).proof is None
    signature = g.proof(peer, 4)
    g.core.on_message(g.pid(peer), MemberList(members=(g.alive(peer, 4, signature),)), 1.0)
    assert (g.member(peer).proof, g.member(peer).proof_incarnation) == (signature, 4)
    # a forged one for the incarnation we already hold is refused the same way
    g2 = Group()
    g2.core.on_message(g2.pid(peer), Hello(contact=g2.contacts[peer], incarnation=4, reply_requested=False), 1.0)
    g2.gossip(3, g2.alive(peer, 4, bytes(64)))
    assert g2.member(peer).proof is None and g2.core.alive_bad_signatures == 1


def test_we_sign_our_alive_claim_at_start_refutation_and_contact_change():
    g = Group()
    me = g.ids[1]

    def own() -> MemberUpdate:
        return g.core._self_update()

    def valid(update: MemberUpdate) -> bool:
        return verify_signature(me.public_key, update.signature,
                                alive_statement(NETWORK_ID, me.peer_id, update.incarnation))

    assert own().incarnation == 1 and valid(own())
    g.gossip(3, MemberUpdate(peer_id=me.peer_id, state="suspect", incarnation=1))
    assert g.core.incarnation == 2 and valid(own())
    g.core.change_contact(PeerContact(peer_id=me.peer_id, transport_key=g.core.contact.transport_key,
                                      addresses=("tcp://10.0.9.9:7420",),
                                      capabilities=g.core.contact.capabilities), 2.0)
    assert g.core.incarnation == 3 and valid(own())


def test_a_contact_that_advertises_signing_needs_a_signer():
    identity = _identity(1)
    with pytest.raises(LocalProtocolError, match=ALIVE_PROOF_CAPABILITY):
        Membership(_contact(identity, 1), 1, CFG, random.Random(1), 0.0)
    Membership(_contact(identity, 1, signs=False), 1, CFG, random.Random(1), 0.0)  # an older peer's way
    with pytest.raises(LocalProtocolError, match="16 bytes"):
        AliveProofs(b"short", identity.sign)


def test_a_claim_about_us_far_above_our_incarnation_is_not_refuted():
    """Our incarnation near REFUTE_LIMIT cannot refute any more: one forged "suspect at
    REFUTE_LIMIT - 1" took us there. A claim more than the step above our own is refused."""
    g = Group()
    me = g.pid(1)
    g.gossip(3, MemberUpdate(peer_id=me, state="suspect", incarnation=1 + GOSSIP_INCARNATION_STEP + 1))
    assert g.core.incarnation == 1 and g.core.incarnations_refused == 1
    g.gossip(3, MemberUpdate(peer_id=me, state="suspect", incarnation=1 + GOSSIP_INCARNATION_STEP))
    assert g.core.incarnation == 2 + GOSSIP_INCARNATION_STEP


# ------------------------------------------------------------------ the wire


@record
class _OldMemberUpdate:  # the record as peers before signed alive claims declare it
    peer_id: str
    state: str
    incarnation: int
    contact: PeerContact | None = None


def test_old_and_new_peers_decode_each_other_and_the_signature_goes_only_with_alive():
    identity = _identity(1)
    signature = identity.sign(alive_statement(NETWORK_ID, identity.peer_id, 7))
    unsigned = MemberUpdate(peer_id=identity.peer_id, state="alive", incarnation=7)
    signed = MemberUpdate(peer_id=identity.peer_id, state="alive", incarnation=7, signature=signature)
    old_map = encode_fields(_OldMemberUpdate(peer_id=identity.peer_id, state="alive", incarnation=7))
    assert decode_fields(MemberUpdate, old_map) == unsigned  # an old peer's update
    assert encode_fields(unsigned) == old_map  # what an old peer receives from us
    assert decode_fields(_OldMemberUpdate, encode_fields(unsigned)).incarnation == 7
    with pytest.raises(MalformedError, match="unknown field 'signature'"):  # why old peers never get it
        decode_fields(_OldMemberUpdate, encode_fields(signed))
    assert decode_fields(MemberUpdate, encode_fields(signed)) == signed
    assert decode_fields(MemberUpdate, {**old_map, "signature": None}) == unsigned
    with pytest.raises(MalformedError, match="only goes with state alive"):
        decode_fields(MemberUpdate, {**encode_fields(signed), "state": "suspect"})
    with pytest.raises(MalformedError, match="64 bytes"):
        decode_fields(MemberUpdate, {**old_map, "signature": signature[:63]})


def test_the_alive_statement_vector_of_protocol_section_13():
    """PROTOCOL.md §13, "Signed alive claim": the bytes and the signature for the §13 key."""
    identity = _identity(1)
    assert identity.peer_id == "rkeohxlubhyzl7ks3mwtzos5olfgocn7dwkbeg7toseadnapn5oa"
    statement = alive_statement(NETWORK_ID, identity.peer_id, 7)
    assert ALIVE_DOMAIN.hex() == "6368696d6572612d6d6573682f6d656d6265722f763100"
    assert statement.hex() == (
        "6368696d6572612d6d6573682f6d656d6265722f763100"
        "94a5616c697665c410f9ebc14caf54723ac3b1ea8443470ebb"
        "d934726b656f68786c756268797a6c376b73336d77747a6f73356f6c66676f636e37"
        "64776b62656737746f736561646e61706e356f6107")
    signature = identity.sign(statement)
    assert signature.hex() == (
        "be11233dc8189d807012b6d5de70d2bb4400fb9ecc5e1e749a27767c820805c2"
        "7de26e094546052f568a506cb9f0204e980e18ec36b4986b58d2e999cf2f6a00")
    update = MemberUpdate(peer_id=identity.peer_id, state="alive", incarnation=7, signature=signature)
    wire = msgpack.packb(encode_fields(update), use_bin_type=True)
    assert len(wire) == 173 and wire.hex().endswith("a97369676e6174757265c440" + signature.hex())


# ------------------------------------------------------------------ real nodes


async def test_nodes_sign_their_refutation_and_members_keep_the_signature(node_factory):
    """Three nodes on loopback: C, suspected, refutes; A and B hold C's new incarnation with
    C's signature (checked by the node's own wiring: its network id, C's key)."""
    import time

    from tests.conftest import async_wait_until

    a = await node_factory("a")
    b = await node_factory("b", a.config.replace(bootstrap=(a.contact_uri,)))
    c = await node_factory("c", a.config.replace(bootstrap=(a.contact_uri,)))
    nodes = (a, b, c)

    def meshed() -> bool:
        return all(len([m for m in n.membership.members.values() if m.state is MemberState.ALIVE]) == 2
                   for n in nodes)

    assert await async_wait_until(meshed, 60)
    assert all(ALIVE_PROOF_CAPABILITY in n.contact.capabilities for n in nodes)
    before = c.membership.incarnation
    # B tells A that C is suspect; A passes the suspicion on to C, which refutes
    a.membership.on_message(b.peer_id, Ping(probe_id=1, updates=(
        MemberUpdate(peer_id=c.peer_id, state="suspect", incarnation=before),)), time.monotonic())
    a.run_membership_actions()

    def refuted_everywhere() -> bool:
        rows = [n.membership.members.get(c.peer_id) for n in (a, b)]
        return all(r is not None and r.state is MemberState.ALIVE and r.incarnation > before
                   and r.proof_incarnation == r.incarnation for r in rows)

    assert await async_wait_until(refuted_everywhere, 60)
    row = a.membership.members[c.peer_id]
    assert verify_signature(c.identity.public_key, row.proof,
                            alive_statement(a.network.network_id, c.peer_id, row.incarnation))
    for n in nodes:
        counters = n.status()["counters"]
        assert "membership_alive_bad_signatures" not in counters
        assert "membership_alive_unsigned" not in counters


def test_a_repeated_signed_claim_about_a_dead_member_is_checked_once():
    """A dead member's row keeps the incarnation it failed at (an alive claim is only asked
    about), so the "claim we hold" shortcut no longer caught a repeat: every copy of one signed
    claim in the others' gossip cost an Ed25519 verification."""
    g = Group()
    dead, relayer = 2, 3
    g.gossip(4, MemberUpdate(peer_id=g.pid(dead), state="dead", incarnation=1))
    assert g.member(dead).state is MemberState.DEAD
    calls = g.verify.calls
    for k in range(5):
        g.gossip(relayer, g.alive(dead, 2, g.proof(dead, 2)), now=1.0 + k)
    assert g.verify.calls == calls + 1
    assert g.member(dead).state is MemberState.DEAD and g.member(dead).incarnation == 1
