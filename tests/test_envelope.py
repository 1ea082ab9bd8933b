"""Envelope codec: sign/verify, tampering, replay, staleness, limits, fuzzing."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chimera.protocol.diagnostics import EchoRequest
from chimera.protocol.envelope import (
    SIGNING_DOMAIN,
    EnvelopeOpener,
    EnvelopeSealer,
    signing_input,
)
from chimera.protocol.errors import (
    LocalProtocolError,
    RemoteProtocolError,
)
from chimera.protocol.identity import (
    SigningIdentity,
    is_usable_public_key,
    peer_id_from_public_key,
    verify_signature,
)
from chimera.protocol.membership import Hello, MemberList, MemberUpdate, PeerContact
from chimera.protocol.messages import decode_fields, encode_fields
from chimera.protocol.network import Network, format_contact_uri, parse_contact_uri

NOW_MS = 1_700_000_000_000
ALICE = SigningIdentity(bytes(range(32)))
BOB = SigningIdentity(bytes(range(32, 64)))
NET = Network(name="t", secret=b"\x02" * 32)


def sealer(identity=ALICE, network=NET, first_seq=1):
    return EnvelopeSealer(identity, network.network_id, first_seq=first_seq)


def opener(**kw):
    return EnvelopeOpener(BOB.peer_id, NET.network_id, **kw)


def frame(msg=None, *, at=NOW_MS, recipient=None, s=None):
    return (s or sealer()).seal(msg or EchoRequest(nonce=7, payload=b"hi"), sent_at_ms=at,
                                recipient=recipient)


def reason(op, data, now=NOW_MS):
    with pytest.raises(RemoteProtocolError) as info:
        op.open(data, now)
    return info.value.reason


def test_roundtrip_and_fields():
    env = opener().open(frame(recipient=BOB.peer_id), NOW_MS)
    assert env.sender == ALICE.peer_id
    assert env.recipient == BOB.peer_id
    assert env.kind == "echo_request"
    assert env.message == EchoRequest(nonce=7, payload=b"hi")
    assert env.seq == 1 and env.sent_at_ms == NOW_MS
    assert "echo-request 7" in env.describe()


def test_signature_covers_domain_network_and_payload():
    data = frame()
    payload, sig = data[:-64], data[-64:]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = Ed25519PublicKey.from_public_bytes(ALICE.public_key)
    key.verify(sig, SIGNING_DOMAIN + NET.network_id + payload)  # raises if wrong
    assert signing_input(NET.network_id, payload).startswith(b"chimera-mesh/envelope/v1\x00")


def test_every_flipped_byte_is_rejected():
    data = frame(recipient=BOB.peer_id)
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(RemoteProtocolError):
            opener().open(bytes(tampered), NOW_MS)


def test_other_network_signature_rejected():
    other = Network(name="x", secret=b"\x03" * 32)
    data = EnvelopeSealer(ALICE, other.network_id).seal(EchoRequest(nonce=1), sent_at_ms=NOW_MS)
    assert reason(opener(), data) == "bad_signature"


def test_replay_and_window():
    op = opener()
    s = sealer()
    first = frame(s=s)
    op.open(first, NOW_MS)
    assert reason(op, first) == "replay"
    # out-of-order delivery inside the window is accepted once
    frames = [frame(s=s) for _ in range(5)]
    for f in reversed(frames):
        op.open(f, NOW_MS)
    for f in frames:
        assert reason(op, f) == "replay"
    # far below the window: rejected as replay even if never seen
    old = frame(s=sealer(first_seq=2))
    far = sealer(first_seq=5000)
    op.open(frame(s=far), NOW_MS)
    assert reason(op, old) == "replay"


def test_a_huge_seq_jump_costs_nothing_and_keeps_the_window_exact():
    """A member may jump its seq anywhere in 1..2**64-1; the window must not build an
    integer the size of the jump (that froze a node for 18 s at 2**34, MemoryError at 2**40)."""
    op = opener()
    op.open(frame(s=sealer(first_seq=1)), NOW_MS)
    tracemalloc.start()
    try:
        for seq in (2**34, 2**40, 2**64 - 2):
            op.open(frame(s=sealer(first_seq=seq)), NOW_MS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert reason(op, frame(s=sealer(first_seq=2**64 - 2))) == "replay"
    assert reason(op, frame(s=sealer(first_seq=2**40 + 1))) == "replay"  # far below the window
    op.open(frame(s=sealer(first_seq=2**64 - 3)), NOW_MS)  # inside the window, unseen: accepted once
    assert reason(op, frame(s=sealer(first_seq=2**64 - 3))) == "replay"
    op.open(frame(s=sealer(first_seq=2**64 - 1)), NOW_MS)


def test_a_replay_window_is_kept_while_its_frames_could_still_be_fresh():
    """A token holder signing envelopes with fresh identities evicted the least recently
    used window (65 536 of them: ~14 s), after which a captured nil-recipient frame of the
    victim was accepted again. Only windows idle for more than 2 x skew are evicted now;
    while the table is full of younger ones, new senders are refused (and counted)."""
    skew = 30_000
    op = opener(max_tracked_senders=4, max_clock_skew_ms=skew)
    victim = frame(s=sealer(ALICE))  # nil recipient, as bft_* broadcasts
    op.open(victim, NOW_MS)
    honest = sealer(SigningIdentity(bytes([9]) * 32))
    op.open(frame(s=honest), NOW_MS)
    for i in range(2):  # the table is now full
        op.open(frame(s=sealer(SigningIdentity(bytes([40 + i]) * 32))), NOW_MS)
    for i in range(20):  # a flood of fresh identities is refused before any signature check
        fresh = frame(s=sealer(SigningIdentity(bytes([60 + i]) * 32)), at=NOW_MS + 1000)
        assert reason(op, fresh, NOW_MS + 1000) == "replay_table_full"
    assert len(op._windows) == 4
    assert reason(op, victim, NOW_MS + 1000) == "replay"  # the victim's window survived
    # an existing sender is still served during the flood
    op.open(frame(s=honest, at=NOW_MS + 2 * skew), NOW_MS + 2 * skew)
    # once the oldest window has been idle for more than 2 x skew every frame it recorded is
    # stale, so it can go: a new sender takes its place, and the replay is stale anyway
    late = NOW_MS + 2 * skew + 1
    newcomer = sealer(SigningIdentity(bytes([99]) * 32))
    op.open(frame(s=newcomer, at=late), late)
    assert len(op._windows) == 4 and ALICE.public_key not in op._windows
    assert reason(op, victim, late) == "stale"
    # the other idle windows go the same way, one per new sender; the honest sender's
    # (active at NOW + 2 x skew) and the newcomers' stay, so the next new one is refused
    for i in range(2):
        op.open(frame(s=sealer(SigningIdentity(bytes([100 + i]) * 32)), at=late), late)
    assert reason(op, frame(s=sealer(SigningIdentity(bytes([98]) * 32)), at=late), late) == (
        "replay_table_full")
    assert len(op._windows) == 4 and honest.identity.public_key in op._windows
    op.open(frame(s=honest, at=late), late)


def test_new_senders_from_one_address_are_bounded_and_other_addresses_are_not_charged():
    """A token holder signing with fresh identities (free to make) filled the replay table in
    2 x skew and kept every new sender out meanwhile. Each source address now has a budget of
    new windows (burst, then a rate), charged only when the signature verifies; senders that
    have a window, other addresses and frames without a source are not limited by it."""
    op = opener(new_senders_burst=3, new_senders_per_source_per_s=2.0)

    def fresh(i, at=NOW_MS):
        return frame(s=sealer(SigningIdentity(bytes([70 + i]) * 32)), at=at)

    forged = bytearray(fresh(50))
    forged[-1] ^= 0xFF
    for _ in range(5):  # forged frames cost the address nothing
        with pytest.raises(RemoteProtocolError) as info:
            op.open(bytes(forged), NOW_MS, "10.0.0.66")
        assert info.value.reason == "bad_signature"
    known = sealer(SigningIdentity(bytes([69]) * 32))
    op.open(frame(s=known), NOW_MS, "10.0.0.66")
    for i in range(2):
        op.open(fresh(i), NOW_MS, "10.0.0.66")
    with pytest.raises(RemoteProtocolError) as info:
        op.open(fresh(2), NOW_MS, "10.0.0.66")
    assert info.value.reason == "new_sender_rate"
    op.open(frame(s=known), NOW_MS, "10.0.0.66")  # a sender with a window is served
    op.open(fresh(3), NOW_MS, "10.0.0.7")  # another address has its own budget
    op.open(fresh(4), NOW_MS)  # no source: no budget (in-process drivers)
    op.open(fresh(2, NOW_MS + 500), NOW_MS + 500, "10.0.0.66")  # 2/s: one more after 0.5 s
    with pytest.raises(RemoteProtocolError) as info:
        op.open(fresh(5, NOW_MS + 500), NOW_MS + 500, "10.0.0.66")
    assert info.value.reason == "new_sender_rate"
    assert len(op._windows) == 6


def test_forged_frame_does_not_poison_replay_window():
    op = opener()
    s = sealer()
    good = frame(s=s)
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    assert reason(op, bytes(bad)) == "bad_signature"
    op.open(good, NOW_MS)  # still accepted


def test_stale_and_future_timestamps():
    op = opener(max_clock_skew_ms=30_000)
    assert reason(op, frame(at=NOW_MS - 30_001)) == "stale"
    assert reason(op, frame(at=NOW_MS + 30_001)) == "stale"
    op.open(frame(at=NOW_MS - 29_000), NOW_MS)


def test_wrong_recipient():
    assert reason(opener(), frame(recipient=ALICE.peer_id)) == "wrong_recipient"


def test_size_limits():
    op = opener(max_message_bytes=200)
    big = frame(EchoRequest(nonce=1, payload=b"x" * 300))
    assert reason(op, big) == "oversize"
    assert reason(op, b"\x00" * 10) == "malformed"
    with pytest.raises(LocalProtocolError):  # we never send an out-of-bounds field
        sealer().seal(EchoRequest(nonce=1, payload=b"x" * 70000), sent_at_ms=NOW_MS)
    with pytest.raises(LocalProtocolError):
        sealer().seal(EchoRequest(nonce=-1), sent_at_ms=NOW_MS)


def _resign(payload_obj) -> bytes:
    payload = msgpack.packb(payload_obj, use_bin_type=True)
    return payload + ALICE.sign(signing_input(NET.network_id, payload))


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda p: p.__setitem__(0, 2), "bad_version"),
        (lambda p: p.__setitem__(1, "no_such_kind"), "unknown_kind"),
        (lambda p: p[6].__setitem__("extra", 1), "malformed"),
        (lambda p: p[6].pop("nonce"), "malformed"),
        (lambda p: p[6].__setitem__("nonce", -1), "malformed"),
        (lambda p: p[6].__setitem__("nonce", "7"), "malformed"),
        (lambda p: p.__setitem__(4, 0), "malformed"),
        (lambda p: p.append(1), "malformed"),
        (lambda p: p.__setitem__(2, b"short"), "malformed"),
    ],
)
def test_strict_decode_of_signed_but_invalid_payloads(mutate, expected):
    payload = [1, "echo_request", ALICE.public_key, None, 1, NOW_MS,
               {"nonce": 7, "payload": b"", "reply": True}]
    mutate(payload)
    assert reason(opener(), _resign(payload)) == expected


def test_a_signed_body_that_fails_its_schema_is_attributed_to_its_sender_once():
    """§6.5: such a drop is the sender's fault (an invalid_envelope observation), and its
    seq is spent so that replaying the frame cannot blame the sender again."""
    body = {"nonce": -1, "payload": b"", "reply": True}
    signed = _resign([1, "echo_request", ALICE.public_key, None, 5, NOW_MS, body])
    op = opener()
    with pytest.raises(RemoteProtocolError) as info:
        op.open(signed, NOW_MS)
    assert info.value.reason == "malformed" and info.value.sender == ALICE.peer_id
    with pytest.raises(RemoteProtocolError) as info:
        op.open(signed, NOW_MS)
    assert info.value.reason == "replay" and info.value.sender is None
    # the same body under a signature that does not verify proves nothing about anyone
    payload = msgpack.packb([1, "echo_request", ALICE.public_key, None, 6, NOW_MS, body], use_bin_type=True)
    for signature in (bytes(64), BOB.sign(signing_input(NET.network_id, payload))):
        with pytest.raises(RemoteProtocolError) as info:
            op.open(payload + signature, NOW_MS)
        assert info.value.reason == "malformed" and info.value.sender is None
    assert op.open(frame(s=sealer(first_seq=6)), NOW_MS).seq == 6  # seq 6 was not spent by forgeries


def test_extension_types_rejected():
    payload = msgpack.packb([1, "echo_request", ALICE.public_key, None, 1, NOW_MS,
                             {"nonce": msgpack.ExtType(1, b"x")}], use_bin_type=True)
    data = payload + ALICE.sign(signing_input(NET.network_id, payload))
    assert reason(opener(), data) == "malformed"


def test_nested_records_strict():
    contact = PeerContact(peer_id=ALICE.peer_id, transport_key=b"k" * 32, addresses=("tcp://h:1",))
    msg = MemberList(members=(MemberUpdate(peer_id=ALICE.peer_id, state="alive", incarnation=3,
                                           contact=contact),))
    env = opener().open(frame(msg), NOW_MS)
    assert env.message == msg
    bad = encode_fields(msg)
    bad["members"][0]["state"] = "zombie"
    with pytest.raises(RemoteProtocolError):
        decode_fields(MemberList, bad)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_documented_errors(data):
    try:
        opener().open(data, NOW_MS)
    except RemoteProtocolError:
        pass


VALID = frame(Hello(contact=PeerContact(peer_id=ALICE.peer_id, transport_key=b"k" * 32,
                                        addresses=("tcp://127.0.0.1:7420",)), incarnation=1))


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(VALID) - 1), st.integers(min_value=1, max_value=255),
       st.integers(min_value=0, max_value=len(VALID)))
def test_mutations_and_truncations_of_a_valid_frame(pos, xor, cut):
    mutated = bytearray(VALID)
    mutated[pos] ^= xor
    for candidate in (bytes(mutated), VALID[:cut], VALID[cut:]):
        try:
            opener().open(candidate, NOW_MS)
        except RemoteProtocolError:
            continue
        assert candidate == VALID  # only the untouched frame may open


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1)
    | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=8), children, max_size=8),
    max_leaves=30))
def test_arbitrary_msgpack_bodies(body):
    payload = msgpack.packb([1, "hello", ALICE.public_key, None, 1, NOW_MS, body], use_bin_type=True)
    try:
        opener().open(payload + ALICE.sign(signing_input(NET.network_id, payload)), NOW_MS)
    except RemoteProtocolError:
        pass


def test_identity_and_peer_id():
    assert len(ALICE.peer_id) == 52 and ALICE.peer_id == ALICE.peer_id.lower()
    assert peer_id_from_public_key(ALICE.public_key) == ALICE.peer_id
    assert "seed" not in repr(ALICE) and ALICE.seed_bytes().hex() not in repr(ALICE)


def test_signatures_are_rfc8032_and_interoperate_with_openssl():
    """Signing and verification use libsodium (PyNaCl): RFC 8032 test vector 1, and
    signatures cross-verify with OpenSSL (``cryptography``) both ways. The verification
    rule is libsodium's (PROTOCOL.md §6.2): besides S >= L it rejects a small-order key,
    e.g. the identity point with R = identity and S = 0, which "signs" any message and
    which OpenSSL accepts."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    ident = SigningIdentity(seed)
    assert ident.public_key.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert ident.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    assert ident.seed_bytes() == seed and SigningIdentity(ident.seed_bytes()).peer_id == ident.peer_id
    message = b"chimera" * 50
    Ed25519PublicKey.from_public_bytes(ident.public_key).verify(ident.sign(message), message)  # raises if bad
    other = Ed25519PrivateKey.generate()
    other_public = other.public_key().public_bytes_raw()
    assert verify_signature(other_public, other.sign(message), message)
    assert not verify_signature(other_public, other.sign(message), message + b"!")
    sig = bytearray(ident.sign(message))
    order = 2**252 + 27742317777372353535851937790883648493  # L: S + L is the same scalar, not canonical
    sig[32:] = (int.from_bytes(sig[32:], "little") + order).to_bytes(32, "little")
    assert not verify_signature(ident.public_key, bytes(sig), message)
    assert not verify_signature(ident.public_key, ident.sign(message)[:63], message)  # lengths: False
    assert not verify_signature(ident.public_key[:31], ident.sign(message), message)
    identity_point = bytes([1]) + bytes(31)
    forged = identity_point + bytes(32)
    Ed25519PublicKey.from_public_bytes(identity_point).verify(forged, message)  # OpenSSL: "valid"
    assert not verify_signature(identity_point, forged, message)
    assert is_usable_public_key(ident.public_key) and not is_usable_public_key(identity_point)


def test_token_roundtrip_and_rejection():
    net = Network.create(name="lab", bootstrap=("chm://x@h:1?key=y",))
    back = Network.from_token(net.token())
    assert back == net and back.network_id == net.network_id
    assert len(net.network_id) == 16
    pub, sec = net.curve_client_keypair()
    assert len(pub) == len(sec) == 32
    for bad in ("", "chm1_", "chm1_!!!!", net.token()[:-4], "xyz" + net.token(), "chm1_" + "A" * 9000):
        with pytest.raises(RemoteProtocolError):
            Network.from_token(bad)


def test_contact_uri_roundtrip():
    uri = format_contact_uri(ALICE.peer_id, "127.0.0.1", 7420, b"\x05" * 32)
    assert parse_contact_uri(uri) == (ALICE.peer_id, "tcp://127.0.0.1:7420", b"\x05" * 32)
    for bad in ("tcp://127.0.0.1:1", f"chm://{ALICE.peer_id}@h:1", f"chm://bad@h:1?key=aaaa",
                uri.replace("key=", "key=zz1"), "chm://" + "a" * 600):
        with pytest.raises(RemoteProtocolError):
            parse_contact_uri(bad)


def test_a_contact_uri_host_is_an_address_or_a_dns_name_never_endpoint_syntax():
    """§4: ``1.2.3.4;5.6.7.8`` passed and became ``tcp://1.2.3.4;5.6.7.8:80``, ZeroMQ's
    source-address syntax (the node dialled 5.6.7.8); ``*``, spaces, NUL and non-ASCII
    names passed and then failed in libzmq on every Hello retry."""
    key = format_contact_uri(ALICE.peer_id, "h", 1, b"\x05" * 32).split("?")[1]
    for host, endpoint in (("10.0.0.7", "tcp://10.0.0.7:80"), ("[fe80::1%eth0]", "tcp://[fe80::1%eth0]:80"),
                           ("[::1]", "tcp://[::1]:80"), ("Node-7.LAN", "tcp://node-7.lan:80"),
                           ("xn--bcher-kva.example", "tcp://xn--bcher-kva.example:80")):
        assert parse_contact_uri(f"chm://{ALICE.peer_id}@{host}:80?{key}")[1] == endpoint
    for host in ("1.2.3.4;5.6.7.8", "*", "a b", "x\0y", "ü.example", "1.2.3", "-a.lan", "a..lan",
                 "a_b.lan", "999.1.1.1", "a" * 64 + ".lan"):
        with pytest.raises(RemoteProtocolError, match="host"):
            parse_contact_uri(f"chm://{ALICE.peer_id}@{host}:80?{key}")


def test_a_contact_carries_only_tcp_endpoints_whose_host_a_uri_would_accept():
    """A contact in a signed Hello, member list or mDNS record had only its ``tcp://`` prefix
    checked, so a member could spread ``tcp://1.2.3.4;5.6.7.8:80`` (ZeroMQ source-address
    syntax) to every peer; its addresses now follow the contact URI's host rule (§4, §8.1)."""
    from chimera.protocol.membership import PeerContact
    from chimera.protocol.messages import decode_fields, encode_fields

    good = PeerContact(peer_id=ALICE.peer_id, transport_key=b"\x05" * 32,
                       addresses=("tcp://10.0.0.7:7420", "tcp://[fe80::1%eth0]:7420", "tcp://node-7.lan:1"))
    assert decode_fields(PeerContact, encode_fields(good)) == good
    for bad in ("tcp://1.2.3.4;5.6.7.8:80", "tcp://*:80", "tcp://a b:1", "tcp://h:0", "tcp://h:65536",
                "tcp://::1:80", "tcp://h", "udp://h:1"):
        with pytest.raises(RemoteProtocolError, match="tcp://HOST:PORT"):
            decode_fields(PeerContact, {**encode_fields(good), "addresses": [bad]})


def test_peer_id_has_exactly_one_spelling():
    from chimera.protocol.identity import public_key_from_peer_id

    pid = ALICE.peer_id
    public_key_from_peer_id(pid)
    last = "abcdefghijklmnopqrstuvwxyz234567"
    twin = pid[:-1] + last[(last.index(pid[-1]) ^ 1)]  # differs only in unused bits
    for bad in (pid.upper(), twin, pid[:-1], pid + "a"):
        with pytest.raises(RemoteProtocolError):
            public_key_from_peer_id(bad)


def test_duplicate_map_keys_rejected():
    body = b"\x83" + msgpack.packb("nonce") + msgpack.packb(1) + msgpack.packb("nonce") + \
        msgpack.packb(2) + msgpack.packb("reply") + msgpack.packb(True)
    head = msgpack.packb([1, "echo_request", ALICE.public_key, None, 1, NOW_MS], use_bin_type=True)
    payload = b"\x97" + head[1:] + body  # 7-element array: the 6 header items, then the body
    data = payload + ALICE.sign(signing_input(NET.network_id, payload))
    assert reason(opener(), data) == "malformed"


def test_gossiped_invalid_peer_id_or_address_rejected_at_decode():
    contact = encode_fields(PeerContact(peer_id=ALICE.peer_id, transport_key=b"k" * 32,
                                        addresses=("tcp://h:1",)))
    for field, value in (("peer_id", "zz"), ("peer_id", ALICE.peer_id.upper()),
                         ("addresses", ["ipc:///tmp/x"])):
        bad = dict(contact, **{field: value})
        with pytest.raises(RemoteProtocolError):
            decode_fields(PeerContact, bad)


def test_token_rejects_non_int_version_and_non_alphabet():
    net = Network(name="t", secret=b"\x02" * 32)
    packed = msgpack.packb([True, "t", net.secret, []], use_bin_type=True)
    import base64

    forged = "chm1_" + base64.urlsafe_b64encode(packed).decode().rstrip("=")
    with pytest.raises(RemoteProtocolError):
        Network.from_token(forged)
    token = net.token()
    with pytest.raises(RemoteProtocolError):
        Network.from_token(token[:10] + "*" + token[10:])
