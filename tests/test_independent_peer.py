"""Interop: a clean-room peer written from docs/PROTOCOL.md alone (tests/independent_peer.py,
no ``chimera`` import) against a real ``chimera node`` process on loopback, mDNS off.

One node serves the whole module: it is created the way an operator does it (``chimera
network init``, then ``chimera node``), and the independent peer gets the join token from
that command's output and the node's contact URI from the node's own ``listening`` line.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import msgpack
import nacl.signing
import pytest
import zmq

from chimera.node import admin
from tests.node_process import NodeProcess
from tests import independent_peer as ip
from tests.conftest import wait_until

CLI = [sys.executable, "-m", "chimera.node.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


class RealNode(NodeProcess):
    """One ``chimera node`` process of a network created by ``chimera network init``."""

    def __init__(self, root: Path) -> None:
        data_dir = root / "node"
        out = _cli("network", "init", "--data-dir", str(data_dir), "--name", "interop")
        assert out.returncode == 0, out.stderr
        self.init_token = out.stdout.strip()
        self.started_ms = ip.now_ms()
        super().__init__(data_dir, root / "node.log")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    real = RealNode(tmp_path_factory.mktemp("interop"))
    yield real
    assert real.stop() == 0, "the node did not stop cleanly on SIGTERM"


@pytest.fixture(scope="module")
def peer(node):
    # README: `chimera network token` beside a running node prints a token carrying its contact.
    out = _cli("network", "token", "--data-dir", str(node.data_dir))
    assert out.returncode == 0, out.stderr
    network = ip.Network.from_token(out.stdout.strip())
    p = ip.IndependentPeer(network)
    yield p
    p.close()


def _joined(node: RealNode, peer: ip.IndependentPeer) -> str:
    """Join (through the token's bootstrap contact) if not yet; returns the node's peer id
    once each side holds the other ALIVE."""
    node_id = ip.parse_contact_uri(peer.network.bootstrap[0]).peer_id
    if node_id not in peer.members:
        peer.join(peer.network.bootstrap[0])
    assert peer.wait_for(lambda: node_id in peer.members, 30), f"no hello from the node: {peer.stats}"
    assert wait_until(lambda: any(r["peer_id"] == peer.peer_id and r["state"] == "alive" for r in node.peers()),
                      timeout_s=30), f"the node does not list the independent peer as alive: {node.peers()}"
    return node_id


def test_the_independent_peer_imports_nothing_from_chimera():
    tree = ast.parse(Path(ip.__file__).read_text())
    imported = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("chimera", "tests")}, imported
    # the standard library, pyzmq, PyNaCl and msgpack only
    assert {m.split(".")[0] for m in imported} - set(sys.stdlib_module_names) <= {"msgpack", "nacl", "zmq"}, imported


def test_join_token_derivation_admission_hello_and_membership(node, peer):
    # The token as the operator gets it: printed by `network init`, kept in network.token.
    assert node.init_token.startswith("chm1_")
    assert (node.data_dir / "network.token").read_text().strip() == node.init_token
    assert os.stat(node.data_dir / "network.token").st_mode & 0o777 == 0o600
    network = peer.network
    assert ip.Network.from_token(node.init_token) == ip.Network(network.name, network.secret, (), network.genesis,
                                                                network.epoch_length)
    assert network.bootstrap == (node.contact_uri,), network.bootstrap
    status = node.status()
    # §3.1: the network id the independent peer derives is the node's (by its fingerprint, §2).
    assert network.fingerprint == status["network_fingerprint"]
    assert network.name == status["network"] == "interop"
    # §3.2: `network init` made the node the one genesis validator; the epoch length default.
    assert network.genesis == (status["peer_id"],) and network.epoch_length == 100
    assert status["consensus"]["epoch_length"] == network.epoch_length
    # §4: the printed contact names the node and its transport key.
    contact = ip.parse_contact_uri(node.contact_uri)
    assert contact.peer_id == status["peer_id"]
    assert ip.fingerprint(contact.transport_key) == status["transport_key_fingerprint"]
    assert contact.endpoint in status["addresses"]

    # §5.3: a CURVE client with any other key is refused by the node's ZAP handler.
    refused_before = node.counter("handshakes_refused")
    ctx = zmq.Context.instance()
    stranger_key = nacl.signing.SigningKey.generate()
    stranger = ctx.socket(zmq.DEALER)
    stranger.linger = 0
    public, secret = zmq.curve_keypair()
    stranger.curve_serverkey = contact.transport_key
    stranger.curve_publickey, stranger.curve_secretkey = public, secret
    stranger.connect(contact.endpoint)
    stranger_hello = ip.seal(stranger_key, network.network_id, "hello", ip.public_key_of(contact.peer_id),
                             1, ip.now_ms(),
                             {"contact": ip.contact_body(ip.peer_id_of(bytes(stranger_key.verify_key)),
                                                         os.urandom(32), ["tcp://127.0.0.1:9"], []),
                              "incarnation": 1, "reply_requested": True})
    stranger.send(stranger_hello, zmq.NOBLOCK)
    assert wait_until(lambda: node.counter("handshakes_refused") > refused_before, timeout_s=30), \
        "the node admitted a CURVE client without the network key"
    assert node.counter("drop_handshake_refused") >= 1
    stranger.close(0)

    # §5.3 + §9.2: the independent peer, holding the token, is admitted, says hello, is a member.
    admitted_before = node.counter("handshakes_admitted")
    node_id = _joined(node, peer)
    assert node_id == status["peer_id"]
    assert node.counter("handshakes_admitted") > admitted_before
    assert peer.stats.zap_admitted >= 1, "the node's DEALER never passed our ZAP handler"
    assert peer.stats.zap_refused == 0
    # The node's hello bound its contact (§9.1): the same key and address as its URI.
    held = peer.members[node_id].contact
    assert held["transport_key"] == contact.transport_key and held["addresses"][0] == contact.endpoint
    # §9.2: the node followed its hello with member_list(reply_requested=true), which we answered.
    assert peer.wait_for(lambda: peer.stats.received["member_list"] >= 1, 30), peer.stats
    assert peer.stats.sent["member_list"] >= 1
    # The operator's view: `chimera peers --json` lists us alive at our address and incarnation.
    out = _cli("peers", "--data-dir", str(node.data_dir), "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["peer_id"]: r for r in json.loads(out.stdout)["result"]}
    assert ip.peer_id_of(bytes(stranger_key.verify_key)) not in rows
    row = rows[peer.peer_id]
    assert row["state"] == "alive" and row["incarnation"] == peer.incarnation, row
    assert peer.address in json.dumps(row), row
    # §10.2: the node probes its new member; our acks keep us alive.
    assert peer.wait_for(lambda: peer.stats.sent["ack"] >= 1, 30), f"no ping from the node: {peer.stats}"
    assert {r["peer_id"]: r["state"] for r in node.peers()}[peer.peer_id] == "alive"
    assert not peer.stats.drops, f"the independent peer dropped frames of the node: {peer.stats.drops}"


def test_echo_reply_verifies_by_section_6(node, peer):
    node_id = _joined(node, peer)
    node_key = ip.public_key_of(node_id)
    replies = []
    for _ in range(2):
        nonce, payload = secrets.randbits(63), os.urandom(100)
        peer.send(node_id, "echo_request", {"nonce": nonce, "payload": payload, "reply": True})
        assert peer.wait_for(lambda: nonce in peer.echo_replies, 30), f"no echo_reply: {peer.stats}"
        env, frame = peer.echo_replies[nonce]
        assert env.kind == "echo_reply" and env.body == {"nonce": nonce, "payload": payload}
        replies.append((env, frame))
    for env, frame in replies:
        # §6.1/§6.2: the sender is the node's key, the recipient us, the signature verifies
        # over the domain, our network id and the exact payload bytes.
        assert env.sender == node_key and env.recipient == peer.public_key
        payload, signature = frame[:-64], frame[-64:]
        nacl.signing.VerifyKey(env.sender).verify(ip.signing_input(peer.network_id, payload), signature)
        assert msgpack.unpackb(payload)[0] == 1
        # §6.4: the time is the node's wall clock, within the skew.
        assert abs(ip.now_ms() - env.sent_at_ms) <= ip.MAX_CLOCK_SKEW_MS
        # §6.3: never below wall-clock ms × 2^20 at the node's start.
        assert env.seq >= node.started_ms * 2**20, env.seq
        # The same frame opened afresh: it verifies; under another network id it does not;
        # a second time it is a replay (§6.4, §6.5).
        windows: dict = {}
        ip.open_envelope(frame, peer.network_id, peer.public_key, ip.now_ms(), windows)
        with pytest.raises(ip.ProtocolError) as exc:
            ip.open_envelope(frame, peer.network_id, peer.public_key, ip.now_ms(), windows)
        assert exc.value.reason == "replay"
        with pytest.raises(ip.ProtocolError) as exc:
            ip.open_envelope(frame, os.urandom(16), peer.public_key, ip.now_ms(), {})
        assert exc.value.reason == "bad_signature"
        with pytest.raises(ip.ProtocolError) as exc:
            ip.open_envelope(frame, peer.network_id, os.urandom(32), ip.now_ms(), {})
        assert exc.value.reason == "wrong_recipient"
        with pytest.raises(ip.ProtocolError) as exc:
            ip.open_envelope(frame, peer.network_id, peer.public_key, env.sent_at_ms + 30_001, {})
        assert exc.value.reason == "stale"
    # §6.3: one strictly increasing counter per sender.
    assert replies[1][0].seq > replies[0][0].seq
    assert not peer.stats.drops, peer.stats.drops
    # §8.2: a request from a peer that never sent its hello is answered with nothing, and
    # the node counts the reply it could not route.
    unverified = ip.IndependentPeer(peer.network)
    try:
        unroutable_before = node.counter("drop_unroutable")
        nonce = secrets.randbits(63)
        route = peer.members[node_id].contact
        unverified.send(node_id, "echo_request", {"nonce": nonce, "payload": b"", "reply": True}, contact=route)
        assert wait_until(lambda: node.counter("drop_unroutable") > unroutable_before, timeout_s=30)
        assert nonce not in unverified.echo_replies and node_id not in unverified.members
    finally:
        unverified.close()


def test_section_13_worked_example_byte_for_byte():
    sk = nacl.signing.SigningKey(bytes([1]) * 32)
    pk = bytes(sk.verify_key)
    net = ip.Network("example", bytes([2]) * 32)
    assert pk.hex() == "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
    pid = ip.peer_id_of(pk)
    assert pid == "rkeohxlubhyzl7ks3mwtzos5olfgocn7dwkbeg7toseadnapn5oa"
    assert ip.public_key_of(pid) == pk
    assert net.network_id.hex() == "f9ebc14caf54723ac3b1ea8443470ebb"
    assert net.fingerprint == "sha256:1ec482737b4e5f4b"
    assert net.curve_client_secret.hex() == "ea0e572e67b4c42b7496293aa3cf57c5d36fcc710cb73d231b1309336898bf8d"
    assert net.curve_client_public.hex() == "24e2a6ecaca0213b91cbc5ab50e5fbe74d317a3b3474ff49746639b02a0ea15e"
    v2 = "chm1_lgKnZXhhbXBsZcQgAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgKQkGQ"
    v1 = "chm1_lAGnZXhhbXBsZcQgAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgKQ"
    assert net.token(2) == v2 and net.token(1) == v1
    assert ip.Network.from_token(v1) == ip.Network.from_token(v2) == net
    uri = ("chm://rkeohxlubhyzl7ks3mwtzos5olfgocn7dwkbeg7toseadnapn5oa@192.0.2.10:7420"
           "?key=etrkn3fmuaqtxeolywvvbzp345gtc6r3gr2p6slumy43akqoufpa")
    assert ip.Contact(pid, "192.0.2.10", 7420, net.curve_client_public).uri() == uri
    assert ip.parse_contact_uri(uri) == ip.Contact(pid, "192.0.2.10", 7420, net.curve_client_public)

    body = {"nonce": 7, "payload": b"hi", "reply": True}
    payload = ip.payload_bytes("echo_request", pk, None, 1, 1700000000000, body)
    assert payload.hex() == (
        "9701ac6563686f5f72657175657374c4208a88e3dd7409f195fd52db2d3cba5d72"
        "ca6709bf1d94121bf3748801b40f6f5cc001cf0000018bcfe5680083a56e6f6e63"
        "6507a77061796c6f6164c4026869a57265706c79c3") and len(payload) == 87
    signing_input = ip.signing_input(net.network_id, payload)
    assert len(signing_input) == 128
    assert signing_input.hex() == ("6368696d6572612d6d6573682f656e76656c6f70652f763100"
                                   "f9ebc14caf54723ac3b1ea8443470ebb" + payload.hex())
    signature = ("b7eb6bdc550418816f1a9be7011502ea4d362d5937416205ca5fd15a2ab12cfb"
                 "5d5d3fa623797bf43cc6d404523bf1b6abb36ab1ac01522416f9822f1cfea303")
    frame = ip.seal(sk, net.network_id, "echo_request", None, 1, 1700000000000, body)
    assert frame == payload + bytes.fromhex(signature) and len(frame) == 151
    # "A receiver whose clock reads 1700000000000 ± 30000 ms accepts it once."
    any_key = os.urandom(32)  # a nil recipient: any member
    windows: dict = {}
    env = ip.open_envelope(frame, net.network_id, any_key, 1700000000000 + 30000, windows)
    assert (env.kind, env.sender, env.recipient, env.seq, env.body) == ("echo_request", pk, None, 1, body)
    with pytest.raises(ip.ProtocolError) as exc:
        ip.open_envelope(frame, net.network_id, any_key, 1700000000000, windows)
    assert exc.value.reason == "replay"
    ip.open_envelope(frame, net.network_id, any_key, 1700000000000 - 30000, {})
    for skewed in (1700000000000 + 30001, 1700000000000 - 30001):
        with pytest.raises(ip.ProtocolError) as exc:
            ip.open_envelope(frame, net.network_id, any_key, skewed, {})
        assert exc.value.reason == "stale"

    statement = ip.alive_statement(net.network_id, pid, 7)
    assert statement.hex() == (
        "6368696d6572612d6d6573682f6d656d6265722f763100"
        "94a5616c697665c410f9ebc14caf54723ac3b1ea8443470ebb"
        "d934726b656f68786c756268797a6c376b73336d77747a6f73356f6c66676f636e37"
        "64776b62656737746f736561646e61706e356f6107") and len(statement) == 103
    alive_sig = sk.sign(statement).signature
    assert alive_sig.hex() == ("be11233dc8189d807012b6d5de70d2bb4400fb9ecc5e1e749a27767c820805c2"
                               "7de26e094546052f568a506cb9f0204e980e18ec36b4986b58d2e999cf2f6a00")
    signed = ip.packb(ip.member_update(pid, "alive", 7, None, alive_sig))
    assert len(signed) == 173 and signed[0] == 0x85
    assert signed.endswith(bytes.fromhex("a97369676e6174757265c440") + alive_sig)
    unsigned = ip.packb(ip.member_update(pid, "alive", 7))
    assert len(unsigned) == 97 and unsigned[0] == 0x84


def test_tampered_envelope_is_dropped_and_counted_as_bad_signature(node, peer):
    node_id = _joined(node, peer)
    node_key = ip.public_key_of(node_id)
    route = peer.members[node_id].contact
    nonce = secrets.randbits(63)
    frame = peer.seal("echo_request", node_key, {"nonce": nonce, "payload": b"tamper-me", "reply": True})
    at = frame.index(b"tamper-me")
    tampered = frame[:at] + bytes([frame[at] ^ 0x01]) + frame[at + 1:]
    # Still a well-formed envelope with a valid body (§6.5 steps 1–16 pass): only the signature fails.
    with pytest.raises(ip.ProtocolError) as exc:
        ip.open_envelope(tampered, peer.network_id, node_key, ip.now_ms(), {})
    assert exc.value.reason == "bad_signature"
    bad_before, replay_before = node.counter("drop_bad_signature"), node.counter("drop_replay")
    peer.send_frame(route["transport_key"], route["addresses"][0], tampered)
    assert wait_until(lambda: node.counter("drop_bad_signature") == bad_before + 1, timeout_s=30), \
        f"drop_bad_signature did not count the tampered frame: {node.status()['counters']}"
    assert nonce not in peer.echo_replies
    # The forged frame did not move the node's replay window (§6.4): the genuine frame with
    # the same seq is then accepted and answered ...
    peer.send_frame(route["transport_key"], route["addresses"][0], frame)
    assert peer.wait_for(lambda: nonce in peer.echo_replies, 30), "the genuine frame was not answered"
    # ... once: its copy is a counted replay (§12.2).
    peer.send_frame(route["transport_key"], route["addresses"][0], frame)
    assert wait_until(lambda: node.counter("drop_replay") == replay_before + 1, timeout_s=30)
    assert node.counter("drop_bad_signature") == bad_before + 1



def test_the_node_joins_the_independent_peer_from_its_contact_uri(node, peer):
    """§4 + §9.2 the other way round: the node is the joiner. Given the independent peer's
    contact URI (the admin `add_contact` call, as `--bootstrap` does at start), it sends a
    hello(reply_requested=true) addressed to that peer id, and both end up members."""
    node_id = ip.parse_contact_uri(node.contact_uri).peer_id
    joiner = ip.IndependentPeer(peer.network)
    try:
        admin.call(node.data_dir, "add_contact", {"uri": joiner.contact_uri()}, timeout_s=10)
        assert joiner.wait_for(lambda: node_id in joiner.members, 30), f"no hello from the node: {joiner.stats}"
        first = joiner.hellos[0]
        assert first.sender_id == node_id and first.recipient == joiner.public_key
        assert first.body["reply_requested"] is True
        assert wait_until(lambda: {r["peer_id"]: r["state"] for r in node.peers()}.get(joiner.peer_id) == "alive",
                          timeout_s=30), node.peers()
        assert joiner.wait_for(lambda: joiner.stats.received["member_list"] >= 1, 30), joiner.stats
        assert not joiner.stats.drops, joiner.stats.drops
    finally:
        joiner.close()

# --- The edge cases the spec now states (§3.2, §4, §8): the independent code, written from
# the text, and the reference give the outcome the text says. A difference is a spec gap.

_S = bytes([0xFB]) * 32  # its base64url has '-' and '_'
_PID = "rkeohxlubhyzl7ks3mwtzos5olfgocn7dwkbeg7toseadnapn5oa"
_KEY = "etrkn3fmuaqtxeolywvvbzp345gtc6r3gr2p6slumy43akqoufpa"


def _token(value: list) -> str:
    import base64
    return "chm1_" + base64.urlsafe_b64encode(ip.packb(value)).decode().rstrip("=")


_T = _token([2, "lab", _S, [], [], 100])
TOKENS = [  # (case, token, parses)
    ("plain", _T, True),
    ("whitespace before the prefix", " " + _T, False),
    ("whitespace after the prefix and a trailing newline", "chm1_ " + _T[5:] + "\n", True),
    ("whitespace inside", _T[:20] + " " + _T[20:], False),
    ("uppercase prefix", "CHM1_" + _T[5:], False),
    ("= padding present", _T + "=" * (-len(_T[5:]) % 4), True),
    ("standard alphabet + and /", "chm1_" + _T[5:].replace("-", "+").replace("_", "/"), True),
    ("a character of neither alphabet", _T[:-1] + "*", False),
    ("name with a space", _token([2, "my lab", _S, [], [], 100]), True),
    ("name with an emoji", _token([2, "lab \U0001F600", _S, [], [], 100]), True),
    ("name with a tab", _token([2, "a\tb", _S, [], [], 100]), False),
    ("name with U+00A0", _token([2, "a\u00a0b", _S, [], [], 100]), False),
    ("name with U+2028", _token([2, "a\u2028b", _S, [], [], 100]), False),
    ("8193 characters", _T + " " * (8193 - len(_T)), False),
]


@pytest.mark.parametrize("case,token,parses", TOKENS, ids=[c[0] for c in TOKENS])
def test_join_token_edge_cases_as_section_3_2_states(case, token, parses):
    from chimera.protocol.network import Network

    results = []
    for parse in (Network.from_token, ip.Network.from_token):
        try:
            net = parse(token)
            results.append((net.name, net.network_id))
        except Exception as exc:  # InvalidTokenError of either side
            assert "Token" in type(exc).__name__, exc
            results.append(None)
    assert results[0] == results[1], results
    assert (results[1] is not None) == parses
    if parses and "alphabet" in case:
        assert results[1] == ("lab", ip.Network("lab", _S).network_id)


_U = f"chm://{_PID}@h.example:7420?key={_KEY}"
URIS = [  # (case, uri, endpoint or None)
    ("plain", _U, "tcp://h.example:7420"),
    ("512 with surrounding whitespace counted", " " * (513 - len(_U)) + _U, None),
    ("key in uppercase", _U.replace(_KEY, _KEY.upper()), "tcp://h.example:7420"),
    ("key with = padding", _U + "====", "tcp://h.example:7420"),
    ("key with unused bits set", _U[:-1] + "b", "tcp://h.example:7420"),
    ("key of 31 bytes", _U.replace(_KEY, _KEY[:50]), None),
    ("key percent-escaped", _U[:-1] + "%" + format(ord(_U[-1]), "02x"), "tcp://h.example:7420"),
    ("an empty key= left out", _U + "&key=", "tcp://h.example:7420"),
    ("two keys", _U + f"&key={_KEY}", None),
    ("a path", _U.replace(":7420?", ":7420/x?"), "tcp://h.example:7420"),
    ("trailing dot", _U.replace("h.example", "h.example."), "tcp://h.example.:7420"),
    ("two trailing dots", _U.replace("h.example", "h.example.."), None),
    ("host uppercased", _U.replace("h.example", "H.Example"), "tcp://h.example:7420"),
    ("port with a leading zero", _U.replace(":7420", ":07420"), "tcp://h.example:7420"),
    ("IPv4 with a leading zero", _U.replace("h.example", "192.0.2.010"), None),
    ("peer id in uppercase", _U.replace(_PID, _PID.upper()), None),
    ("IPv6 with a scope", _U.replace("h.example", "[FE80::1%eth0]"), "tcp://[fe80::1%eth0]:7420"),
]


@pytest.mark.parametrize("case,uri,endpoint", URIS, ids=[c[0] for c in URIS])
def test_contact_uri_edge_cases_as_section_4_states(case, uri, endpoint):
    from chimera.protocol.errors import MalformedError
    from chimera.protocol.network import parse_contact_uri

    try:
        ref = parse_contact_uri(uri)[1]
    except MalformedError:
        ref = None
    try:
        mine = ip.parse_contact_uri(uri).endpoint
    except ip.ProtocolError:
        mine = None
    assert ref == mine == endpoint


def _hello(addresses: list[str]) -> dict:
    return {"contact": ip.contact_body(_PID, bytes(32), addresses, []), "incarnation": 1}


BODIES = [  # (case, kind, body, decodes)
    ("a DNS address in lowercase", "hello", _hello(["tcp://h.lan:7420"]), True),
    ("a DNS address with an uppercase letter", "hello", _hello(["tcp://H.lan:7420"]), False),
    ("an address with a trailing dot", "hello", _hello(["tcp://h.lan.:7420"]), True),
    ("an address with two trailing dots", "hello", _hello(["tcp://h.lan..:7420"]), False),
    ("an IPv6 address in uppercase hex", "hello", _hello(["tcp://[FE80::1]:7420"]), True),
    ("an address port with a leading zero", "hello", _hello(["tcp://h.lan:07420"]), False),
    ("no address at all", "hello", _hello([]), True),
    ("ping_req target not a peer id", "ping_req", {"probe_id": 1, "target": "x"}, False),
    ("ping_req target in uppercase", "ping_req", {"probe_id": 1, "target": _PID.upper()}, False),
    ("ack of not a peer id", "ack", {"probe_id": 1, "of": "x"}, False),
    ("ack of a peer id", "ack", {"probe_id": 1, "of": _PID}, True),
]


@pytest.mark.parametrize("case,kind,body,decodes", BODIES, ids=[c[0] for c in BODIES])
def test_body_edge_cases_as_section_8_states(case, kind, body, decodes):
    from chimera.protocol.envelope import EnvelopeOpener
    from chimera.protocol.errors import RemoteProtocolError

    sender = nacl.signing.SigningKey(bytes([5]) * 32)
    receiver = ip.peer_id_of(bytes(nacl.signing.SigningKey(bytes([6]) * 32).verify_key))
    network_id, now = bytes([7]) * 16, 1700000000000
    frame = ip.seal(sender, network_id, kind, ip.public_key_of(receiver), 3, now, body)
    outcomes = []
    try:
        EnvelopeOpener(receiver, network_id).open(frame, now)
        outcomes.append("ok")
    except RemoteProtocolError as exc:
        outcomes.append(exc.reason)
    try:
        ip.open_envelope(frame, network_id, ip.public_key_of(receiver), now, {})
        outcomes.append("ok")
    except ip.ProtocolError as exc:
        outcomes.append(exc.reason)
    assert outcomes == (["ok", "ok"] if decodes else ["malformed", "malformed"])
