"""A minimal Chimera Mesh peer written from docs/PROTOCOL.md alone (clean room).

It uses only pyzmq, PyNaCl, msgpack and the standard library, and imports nothing
from ``chimera``: it is the proof that the wire spec (§1–§9, §12, §13) is enough to
write a compatible peer. What it does:

* derives the network values of a join token (§3.1, §3.2) and its own identity (§2);
* listens on a CURVE-server ROUTER with a ZAP handler that admits only the network's
  client key (§5.1, §5.3) and sends through CURVE-client DEALERs (§5.1, §5.2);
* seals and opens envelopes (§6.1–§6.5) with a per-sender replay window (§6.4) and a
  strict body codec for the kinds it handles (§7, §8);
* joins by Hello (§9.1, §9.2), answers member lists (§9.3), pings (§10.2, with an
  ``ack``), refutes suspicions about itself (§10.4) and answers echo requests (§8.2).

What it leaves out (a real peer needs them, a one-node interop test does not): probing
others, relaying ``ping_req``, gossip dissemination, peer exchange, signed alive claims
(it does not list ``signed_alive``), discovery, consensus, training and fabric kinds (they
are verified and then dropped as ``no_actor``).

Times: wall-clock milliseconds on the wire (§1); sizes in bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import nacl.bindings
import nacl.exceptions
import nacl.signing
import zmq

PROTOCOL_VERSION = 1
ENVELOPE_DOMAIN = b"chimera-mesh/envelope/v1\x00"          # §6.1, 25 bytes
ALIVE_DOMAIN = b"chimera-mesh/member/v1\x00"               # §10.3, 23 bytes
INFO_NETWORK_ID = b"chimera-mesh/v1 network id"            # §3.1
INFO_CURVE_CLIENT = b"chimera-mesh/v1 curve client key"    # §3.1
TOKEN_PREFIX = "chm1_"                                     # §3.2
ZAP_DOMAIN = b"chimera"                                    # §5.1
SIGNATURE_BYTES = 64
MAX_MESSAGE_BYTES = 1_048_576                              # §6.6
MAX_CLOCK_SKEW_MS = 30_000                                 # §6.4
REPLAY_WINDOW = 1024                                       # §6.4
U64_MAX = 2**64 - 1
INC_MAX = 2**62                                            # §8.2 hello.incarnation
MAX_GENESIS = 64
MAX_EPOCH_LENGTH = 2**20

# §6.1: every registered kind (an unregistered one is `unknown_kind`).
REGISTERED_KINDS = frozenset(
    "hello ping ping_req ack member_list leave echo_request echo_reply "
    "bft_proposal bft_vote bft_values bft_proposal_request bft_vote_request "
    "bft_commit_request bft_commit_response "
    "fl_update fl_update_request fl_model_request fl_model fl_part "
    "fabric_capacity fabric_task_run fabric_task_result fabric_task_cancel "
    "fabric_vote_request fabric_vote fabric_module_request fabric_module_chunk "
    "fabric_actor_message".split())


class ProtocolError(Exception):
    """A remote input that breaks the spec; ``reason`` is the §12.2 drop token."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class InvalidTokenError(ValueError):
    """A join token that §3.2 does not allow (the local ``bad_token`` error, §12.3)."""


# ---------------------------------------------------------------------------------------
# §1 encodings, §2 identities

_B32_RE = re.compile(r"[a-z2-7]+")


def b32(raw: bytes) -> str:
    """base32, RFC 4648 §6 alphabet, lowercase, no padding (§1)."""
    return base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def b32_decode(text: str, size_bytes: int) -> bytes:
    """Decode canonical lowercase unpadded base32 of exactly ``size_bytes`` bytes.

    Raises ProtocolError('malformed') on any other spelling (§2, §12.4)."""
    if not isinstance(text, str) or not _B32_RE.fullmatch(text):
        raise ProtocolError("malformed", "not lowercase base32")
    try:
        raw = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("malformed", f"base32: {exc}") from None
    if len(raw) != size_bytes or b32(raw) != text:
        raise ProtocolError("malformed", "not the canonical base32 of the right size")
    return raw


def peer_id_of(public_key: bytes) -> str:
    """§2: the 52-character peer id of a 32-byte Ed25519 public key."""
    return b32(public_key)


def public_key_of(peer_id: str) -> bytes:
    """§2: the public key a canonical peer id encodes; ProtocolError('malformed') else."""
    if not isinstance(peer_id, str) or len(peer_id) != 52:
        raise ProtocolError("malformed", "peer id is not 52 characters")
    return b32_decode(peer_id, 32)


def fingerprint(raw: bytes) -> str:
    """§2: 'sha256:' + first 16 hex digits of SHA-256."""
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def hkdf_sha256(ikm: bytes, info: bytes, length_bytes: int) -> bytes:
    """RFC 5869 HKDF-SHA256 with no salt (32 zero bytes), as §3.1 says."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length_bytes:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length_bytes]


def x25519_public(secret: bytes) -> bytes:
    """X25519(secret, 9): the public key of a 32-byte secret (libsodium clamps)."""
    return nacl.bindings.crypto_scalarmult_base(secret)


def packb(value: Any) -> bytes:
    """msgpack with bin for bytes and str for text, shortest integers (§1)."""
    return msgpack.packb(value, use_bin_type=True)


# ---------------------------------------------------------------------------------------
# §3 networks and join tokens

@dataclass(frozen=True)
class Network:
    """The values of one join token (§3.2) and what §3.1 derives from its secret."""

    name: str
    secret: bytes
    bootstrap: tuple[str, ...] = ()
    genesis: tuple[str, ...] = ()
    epoch_length: int = 100

    @property
    def network_id(self) -> bytes:
        return hkdf_sha256(self.secret, INFO_NETWORK_ID, 16)

    @property
    def curve_client_secret(self) -> bytes:
        return hkdf_sha256(self.secret, INFO_CURVE_CLIENT, 32)

    @property
    def curve_client_public(self) -> bytes:
        return x25519_public(self.curve_client_secret)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.network_id)

    @property
    def genesis_hash(self) -> bytes:
        """§3.1: SHA-256(msgpack([network_id, sorted dedup genesis, epoch_length]))."""
        return hashlib.sha256(packb([self.network_id, sorted(set(self.genesis)), self.epoch_length])).digest()

    def token(self, version: int = 2) -> str:
        """The join token (§3.2), version 2 (or 1: no genesis, epoch length 100)."""
        if version == 2:
            value = [2, self.name, self.secret, list(self.bootstrap), sorted(set(self.genesis)), self.epoch_length]
        elif version == 1:
            value = [1, self.name, self.secret, list(self.bootstrap)]
        else:
            raise ValueError(f"token version must be 1 or 2, not {version!r}")
        return TOKEN_PREFIX + base64.urlsafe_b64encode(packb(value)).decode("ascii").rstrip("=")

    @classmethod
    def from_token(cls, token: str) -> "Network":
        """Parse a join token by the rules of §3.2. Raises InvalidTokenError."""
        if not isinstance(token, str) or len(token) > 8192:
            raise InvalidTokenError("a join token is a string of at most 8192 characters")
        if not token.startswith(TOKEN_PREFIX):
            raise InvalidTokenError("a join token starts with chm1_")
        body = token[len(TOKEN_PREFIX):].strip()
        if not re.fullmatch(r"[A-Za-z0-9_+/-]*=*", body):
            raise InvalidTokenError("a join token has characters outside base64url")
        try:
            raw = base64.b64decode(body.replace("-", "+").replace("_", "/") + "=" * (-len(body) % 4),
                                   validate=True)
            value = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=64, max_str_len=4096,
                                    max_array_len=64, max_map_len=0, max_ext_len=0,
                                    ext_hook=_refuse_ext)
        except (ValueError, binascii.Error, msgpack.UnpackException, msgpack.ExtraData) as exc:
            raise InvalidTokenError(f"join token does not decode: {exc}") from None
        if not isinstance(value, list) or not value or type(value[0]) is not int:
            raise InvalidTokenError("a join token is an array starting with its version")
        if value[0] == 2 and len(value) == 6:
            _, name, secret, bootstrap, genesis, epoch_length = value
        elif value[0] == 1 and len(value) == 4:
            (_, name, secret, bootstrap), genesis, epoch_length = value, [], 100
        else:
            raise InvalidTokenError("a join token is [2, ...6 items] or [1, ...4 items]")
        if (not isinstance(name, str) or not 1 <= len(name) <= 64
                or any(not ch.isprintable() for ch in name)):
            raise InvalidTokenError("network name: 1..64 printable characters")
        if not isinstance(secret, bytes) or len(secret) != 32:
            raise InvalidTokenError("network secret: 32 bytes")
        if (not isinstance(bootstrap, list) or len(bootstrap) > 32
                or any(not isinstance(b, str) or len(b) > 255 for b in bootstrap)):
            raise InvalidTokenError("bootstrap: at most 32 strings of at most 255 characters")
        if not isinstance(genesis, list) or len(genesis) > MAX_GENESIS:
            raise InvalidTokenError(f"genesis: at most {MAX_GENESIS} peer ids")
        for entry in genesis:
            if not isinstance(entry, str) or len(entry) >= 128:
                raise InvalidTokenError("genesis entry is not a short string")
            try:
                public_key_of(entry)
            except ProtocolError:
                raise InvalidTokenError(f"genesis entry {entry!r} is not a canonical peer id") from None
        if type(epoch_length) is not int or not 1 <= epoch_length <= MAX_EPOCH_LENGTH:
            raise InvalidTokenError("epoch_length: an int in 1 .. 2^20")
        return cls(name, secret, tuple(bootstrap), tuple(sorted(set(genesis))), epoch_length)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is forbidden")


# ---------------------------------------------------------------------------------------
# §4 contact URIs

@dataclass(frozen=True)
class Contact:
    peer_id: str
    host: str
    port: int
    transport_key: bytes

    @property
    def endpoint(self) -> str:
        return f"tcp://[{self.host}]:{self.port}" if ":" in self.host else f"tcp://{self.host}:{self.port}"

    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"chm://{self.peer_id}@{host}:{self.port}?key={b32(self.transport_key)}"


_URI_RE = re.compile(r"(?i:chm)://([^@/?#]+)@(\[[^\]]+\]|[^:/?#\[\]]+):([0-9]+)(?:/[^?#]*)?(?:\?([^#]*))?(?:#.*)?")
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def valid_host(host: str) -> bool:
    """§4 hosts (already lowercased where the caller lowercases): an IPv4 dotted quad
    without leading zeros, an IPv6 literal (no brackets, optional %scope), or an LDH DNS
    name of at most 253 characters, not all digits, one dot at the end (a fully qualified name) left out of the check."""
    if not 0 < len(host) <= 253:
        return False
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    if ":" in host:
        addr, _, scope = host.partition("%")
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            return False
        return "%" not in host or bool(scope)
    name = host[:-1] if host.endswith(".") else host  # one root dot: "h.." has an empty label
    return (bool(name) and not name.replace(".", "").isdigit()
            and all(_DNS_LABEL_RE.fullmatch(label) for label in name.split(".")))


def parse_contact_uri(text: str) -> Contact:
    """§4: ``chm://PEER_ID@HOST:PORT?key=TRANSPORT_KEY``. Raises ProtocolError('malformed')."""
    if not isinstance(text, str) or len(text) > 512:
        raise ProtocolError("malformed", "contact URI: a string of at most 512 characters")
    text = text.strip()
    match = _URI_RE.fullmatch(text)
    if not match:
        raise ProtocolError("malformed", f"not a contact URI: {text[:60]!r}")
    user, host, port_text, query = match.groups()
    peer_id = user.split(":", 1)[0]
    public_key_of(peer_id)
    host = host[1:-1].lower() if host.startswith("[") else host.lower()
    if not valid_host(host) or (":" in host) != match.group(2).startswith("["):
        raise ProtocolError("malformed", f"bad host {host!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ProtocolError("malformed", "port must be 1..65535")
    keys = urllib.parse.parse_qs(query or "").get("key", [])
    if len(keys) != 1:
        raise ProtocolError("malformed", "exactly one key= parameter")
    key = keys[0].upper().rstrip("=")  # lenient: case, padding and unused bits (§4)
    if not re.fullmatch(r"[A-Z2-7]{52}", key):
        raise ProtocolError("malformed", "key is not base32 of 32 bytes")
    return Contact(peer_id, host, port, base64.b32decode(key + "===="))


# ---------------------------------------------------------------------------------------
# §7, §8 the codec of the kinds this peer handles

@dataclass(frozen=True)
class F:
    """One field of a record: a checker, whether it is required, its default."""

    check: Callable[[Any], Any]
    required: bool = True
    default: Any = None


def _int(lo: int = 0, hi: int = U64_MAX) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise ProtocolError("malformed", f"int in {lo}..{hi} expected, got {v!r}")
        return v
    return check


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise ProtocolError("malformed", "bool expected")
    return v


def _str(max_chars: int = 1024, choices: frozenset[str] | None = None) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or len(v) > max_chars or (choices is not None and v not in choices):
            raise ProtocolError("malformed", f"str of at most {max_chars} characters expected")
        return v
    return check


def _bin(max_bytes: int = 65536, exact: int | None = None) -> Callable[[Any], bytes]:
    def check(v: Any) -> bytes:
        if not isinstance(v, bytes) or len(v) > max_bytes or (exact is not None and len(v) != exact):
            raise ProtocolError("malformed", "bin of the wrong size")
        return v
    return check


def _array(item: Callable[[Any], Any], max_items: int = 1024) -> Callable[[Any], tuple]:
    def check(v: Any) -> tuple:
        if not isinstance(v, list) or len(v) > max_items:
            raise ProtocolError("malformed", f"array of at most {max_items} items expected")
        return tuple(item(x) for x in v)
    return check


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def _peer_id(v: Any) -> str:
    if not isinstance(v, str):
        raise ProtocolError("malformed", "peer id must be a str")
    public_key_of(v)
    return v


_ADDR_RE = re.compile(r"tcp://(?:\[([^\]]+)\]|([^:/\[\]]+)):([1-9][0-9]{0,4})")


def _address(v: Any) -> str:
    """§8.1: ``tcp://HOST:PORT``, HOST as in §4 but not lowercased (IPv6 hex in any case)."""
    if not isinstance(v, str) or len(v) > 128:
        raise ProtocolError("malformed", "address: str of at most 128 characters")
    m = _ADDR_RE.fullmatch(v)
    if not m or int(m.group(3)) > 65535:
        raise ProtocolError("malformed", f"address {v!r} is not tcp://HOST:PORT")
    v6, name = m.group(1), m.group(2)
    if not (valid_host(v6.lower()) and ":" in v6 if v6 is not None else valid_host(name) and ":" not in name):
        raise ProtocolError("malformed", f"address {v!r}: bad host")
    return v


def _record(fields: dict[str, F]) -> Callable[[Any], dict]:
    def check(v: Any) -> dict:
        if not isinstance(v, dict):
            raise ProtocolError("malformed", "map expected")
        unknown = set(v) - set(fields)
        if unknown:
            raise ProtocolError("malformed", f"unknown fields {sorted(unknown)}")
        out = {}
        for name, spec in fields.items():
            if name in v:
                out[name] = spec.check(v[name])
            elif spec.required:
                raise ProtocolError("malformed", f"missing field {name!r}")
            else:
                out[name] = spec.default
        return out
    return check


PEER_CONTACT = _record({
    "peer_id": F(_peer_id),
    "transport_key": F(_bin(exact=32)),
    "addresses": F(_array(_address, 8)),
    "capabilities": F(_array(_str(64), 32), False, ()),
    "profile": F(_str(32), False, "default"),
})


def _member_update(v: Any) -> dict:
    u = _record({
        "peer_id": F(_peer_id),
        "state": F(_str(8, frozenset({"alive", "suspect", "dead", "left"}))),
        "incarnation": F(_int(0, INC_MAX)),
        "contact": F(_optional(PEER_CONTACT), False, None),
        "signature": F(_optional(_bin(exact=64)), False, None),
    })(v)
    if u["signature"] is not None and u["state"] != "alive":
        raise ProtocolError("malformed", "a signature only on an alive update")
    return u


UPDATES = F(_array(_member_update, 16), False, ())
BODIES: dict[str, Callable[[Any], dict]] = {
    "hello": _record({"contact": F(PEER_CONTACT), "incarnation": F(_int(0, INC_MAX)),
                      "reply_requested": F(_bool, False, True)}),
    "ping": _record({"probe_id": F(_int()), "updates": UPDATES}),
    "ping_req": _record({"probe_id": F(_int()), "target": F(_peer_id), "updates": UPDATES}),
    "ack": _record({"probe_id": F(_int()), "of": F(_optional(_peer_id), False, None), "updates": UPDATES}),
    "member_list": _record({"members": F(_array(_member_update, 256)),
                            "reply_requested": F(_bool, False, False)}),
    "leave": _record({"incarnation": F(_int(0, INC_MAX))}),
    "echo_request": _record({"nonce": F(_int()), "payload": F(_bin(), False, b""),
                             "reply": F(_bool, False, True)}),
    "echo_reply": _record({"nonce": F(_int()), "payload": F(_bin(), False, b"")}),
}


def contact_body(peer_id: str, transport_key: bytes, addresses: list[str],
                 capabilities: list[str], profile: str = "default") -> dict:
    """A PeerContact (§8.1) in declaration order."""
    return {"peer_id": peer_id, "transport_key": transport_key, "addresses": addresses,
            "capabilities": capabilities, "profile": profile}


def member_update(peer_id: str, state: str, incarnation: int, contact: dict | None = None,
                  signature: bytes | None = None) -> dict:
    """A MemberUpdate (§8.1); ``signature`` is left out while it is None (§7)."""
    u: dict[str, Any] = {"peer_id": peer_id, "state": state, "incarnation": incarnation, "contact": contact}
    if signature is not None:
        u["signature"] = signature
    return u


def alive_statement(network_id: bytes, peer_id: str, incarnation: int) -> bytes:
    """§10.3: ALIVE_DOMAIN || msgpack(["alive", network_id, peer_id, incarnation])."""
    return ALIVE_DOMAIN + packb(["alive", network_id, peer_id, incarnation])


# ---------------------------------------------------------------------------------------
# §6 envelopes

def payload_bytes(kind: str, sender: bytes, recipient: bytes | None, seq: int, sent_at_ms: int,
                  body: dict) -> bytes:
    """§6.1: msgpack([version, kind, sender, recipient, seq, sent_at_ms, body])."""
    return packb([PROTOCOL_VERSION, kind, sender, recipient, seq, sent_at_ms, body])


def signing_input(network_id: bytes, payload: bytes) -> bytes:
    return ENVELOPE_DOMAIN + network_id + payload


def seal(signing_key: nacl.signing.SigningKey, network_id: bytes, kind: str, recipient: bytes | None,
         seq: int, sent_at_ms: int, body: dict) -> bytes:
    """One wire frame: payload || Ed25519 signature (§6.1)."""
    payload = payload_bytes(kind, bytes(signing_key.verify_key), recipient, seq, sent_at_ms, body)
    return payload + signing_key.sign(signing_input(network_id, payload)).signature


@dataclass(frozen=True)
class Envelope:
    kind: str
    sender: bytes
    recipient: bytes | None
    seq: int
    sent_at_ms: int
    body: dict

    @property
    def sender_id(self) -> str:
        return peer_id_of(self.sender)


class ReplayWindow:
    """§6.4: highest verified seq H and a bitmap of the 1024 numbers up to H."""

    def __init__(self) -> None:
        self.highest = 0
        self.seen = 0  # bit i: H - i was seen

    def fresh(self, seq: int) -> bool:
        if seq > self.highest:
            return True
        offset = self.highest - seq
        return offset < REPLAY_WINDOW and not (self.seen >> offset) & 1

    def mark(self, seq: int) -> None:
        if seq > self.highest:
            shift = seq - self.highest
            self.seen = ((self.seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) if shift < REPLAY_WINDOW else 1
            self.highest = seq
        else:
            self.seen |= 1 << (self.highest - seq)


def _no_duplicates(pairs: list[tuple[Any, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate map key")
    return out


def _check_no_ext(value: Any) -> None:
    if isinstance(value, (msgpack.ExtType, msgpack.Timestamp)):
        raise ValueError("msgpack extension types are forbidden")
    if isinstance(value, list):
        for item in value:
            _check_no_ext(item)
    elif isinstance(value, dict):
        for k, item in value.items():
            _check_no_ext(item)


def open_envelope(frame: bytes, network_id: bytes, own_public_key: bytes, now_ms: int,
                  windows: dict[bytes, ReplayWindow]) -> Envelope:
    """Checks 1–18 of §6.5 in their order; raises ProtocolError(reason) on the first failure.

    ``windows`` (sender key -> ReplayWindow) is updated only for an authentic frame."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError("oversize")
    if len(frame) <= SIGNATURE_BYTES:
        raise ProtocolError("malformed", "shorter than a signature")
    payload, signature = frame[:-SIGNATURE_BYTES], frame[-SIGNATURE_BYTES:]
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True,
                                max_bin_len=MAX_MESSAGE_BYTES, max_str_len=MAX_MESSAGE_BYTES,
                                max_array_len=65536, max_map_len=4096, ext_hook=_refuse_ext,
                                object_pairs_hook=_no_duplicates)
        _check_no_ext(value)
    except (ValueError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise ProtocolError("malformed", f"payload: {exc}") from None
    if not isinstance(value, list) or len(value) != 7:
        raise ProtocolError("malformed", "payload is not an array of 7")
    version, kind, sender, recipient, seq, sent_at_ms, body = value
    if type(version) is not int:
        raise ProtocolError("malformed", "version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version")
    if not isinstance(kind, str):
        raise ProtocolError("malformed", "kind")
    if kind not in REGISTERED_KINDS:
        raise ProtocolError("unknown_kind", kind)
    if not isinstance(sender, bytes) or len(sender) != 32:
        raise ProtocolError("malformed", "sender")
    if recipient is not None and (not isinstance(recipient, bytes) or len(recipient) != 32):
        raise ProtocolError("malformed", "recipient")
    if recipient is not None and recipient != own_public_key:
        raise ProtocolError("wrong_recipient")
    if type(seq) is not int or not 0 < seq <= U64_MAX:
        raise ProtocolError("malformed", "seq")
    if type(sent_at_ms) is not int or not 0 <= sent_at_ms <= U64_MAX:
        raise ProtocolError("malformed", "sent_at_ms")
    if abs(now_ms - sent_at_ms) > MAX_CLOCK_SKEW_MS:
        raise ProtocolError("stale", f"{now_ms - sent_at_ms} ms off")
    window = windows.get(sender)
    if window is not None and not window.fresh(seq):
        raise ProtocolError("replay", f"seq {seq}")
    decoded, body_error = None, None
    try:
        decoded = BODIES[kind](body) if kind in BODIES else body
        if not isinstance(body, dict):
            raise ProtocolError("malformed", "body is not a map")
    except ProtocolError as exc:
        body_error = exc
    try:
        nacl.signing.VerifyKey(sender).verify(signing_input(network_id, payload), signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        if body_error is not None:
            raise body_error from None  # step 16's reason; nobody is blamed
        raise ProtocolError("bad_signature") from None
    windows.setdefault(sender, ReplayWindow()).mark(seq)  # step 18 (also for a bad body: step 16)
    if body_error is not None:
        raise body_error
    return Envelope(kind, sender, recipient, seq, sent_at_ms, decoded)


# ---------------------------------------------------------------------------------------
# The peer

def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Member:
    peer_id: str
    contact: dict
    incarnation: int
    state: str = "alive"
    last_hello_incarnation: int = 0


@dataclass
class Stats:
    drops: Counter = field(default_factory=Counter)          # drop_<reason> of §12.2
    received: Counter = field(default_factory=Counter)       # accepted envelopes per kind
    sent: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)        # authentic, but not for this minimal peer
    zap_admitted: int = 0
    zap_refused: int = 0


class IndependentPeer:
    """One peer: a ROUTER (CURVE server, ZAP) to receive, DEALERs (CURVE client) to send.

    Threads: one receives and answers, one serves ZAP; ``send*`` may be called from any
    thread. ``close()`` stops both and closes every socket."""

    CAPABILITIES = ["membership", "echo"]

    def __init__(self, network: Network, host: str = "127.0.0.1", incarnation: int = 1) -> None:
        self.network = network
        self.network_id = network.network_id
        self.signing_key = nacl.signing.SigningKey.generate()
        self.public_key = bytes(self.signing_key.verify_key)
        self.peer_id = peer_id_of(self.public_key)
        self.transport_secret = secrets.token_bytes(32)
        self.transport_public = x25519_public(self.transport_secret)
        self.incarnation = incarnation
        self.stats = Stats()
        self.members: dict[str, Member] = {}
        self.echo_replies: dict[int, tuple[Envelope, bytes]] = {}  # nonce -> (reply, its frame)
        self.hellos: list[Envelope] = []  # every authentic hello received, in order
        self.windows: dict[bytes, ReplayWindow] = {}
        self._seq = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._dealers: dict[tuple[bytes, str], zmq.Socket] = {}
        # ZAP (RFC 27) must be bound before the CURVE server accepts a handshake.
        self._zap = self._ctx.socket(zmq.REP)
        self._zap.linger = 0
        self._zap.bind("inproc://zeromq.zap.01")
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.linger = 0
        self._router.curve_server = True
        self._router.curve_secretkey = self.transport_secret
        self._router.curve_publickey = self.transport_public
        self._router.zap_domain = ZAP_DOMAIN
        self._router.maxmsgsize = MAX_MESSAGE_BYTES + 65536
        self.port = self._router.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{self.port}"
        self.contact = contact_body(self.peer_id, self.transport_public, [self.address], self.CAPABILITIES)
        self._threads = [threading.Thread(target=self._serve_zap, daemon=True, name="zap"),
                         threading.Thread(target=self._receive, daemon=True, name="receive")]
        for t in self._threads:
            t.start()

    # -- transport -------------------------------------------------------------------

    def _serve_zap(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            request = self._zap.recv_multipart()
            version, request_id, domain, _address, _identity, mechanism = request[:6]
            credentials = request[6:]
            ok = (domain == ZAP_DOMAIN and mechanism == b"CURVE" and len(credentials) == 1
                  and credentials[0] == self.network.curve_client_public)
            with self._lock:
                if ok:
                    self.stats.zap_admitted += 1
                else:
                    self.stats.zap_refused += 1
                    self.stats.drops["handshake_refused"] += 1
            self._zap.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                      b"OK" if ok else b"not a member key", b"", b""])

    def _dealer(self, transport_key: bytes, endpoint: str) -> zmq.Socket:
        key = (transport_key, endpoint)
        sock = self._dealers.get(key)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.curve_serverkey = transport_key
            sock.curve_publickey = self.network.curve_client_public
            sock.curve_secretkey = self.network.curve_client_secret
            sock.sndhwm = 1000
            sock.rcvhwm = 16
            sock.reconnect_ivl = 100
            sock.reconnect_ivl_max = 5000
            sock.maxmsgsize = 1024
            sock.connect(endpoint)
            self._dealers[key] = sock
        return sock

    def send_frame(self, transport_key: bytes, endpoint: str, frame: bytes) -> None:
        """Queue one frame (one ZeroMQ part, §5.2) on the DEALER to that endpoint."""
        with self._lock:
            self._dealer(transport_key, endpoint).send(frame, zmq.NOBLOCK)

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def seal(self, kind: str, recipient: bytes | None, body: dict, seq: int | None = None,
             sent_at_ms: int | None = None) -> bytes:
        return seal(self.signing_key, self.network_id, kind, recipient,
                    self.next_seq() if seq is None else seq, now_ms() if sent_at_ms is None else sent_at_ms, body)

    def send(self, peer_id: str, kind: str, body: dict, contact: dict | None = None) -> bytes:
        """Seal ``body`` for ``peer_id`` and send it to its verified contact (or ``contact``).

        Returns the frame. Raises KeyError when there is no route (``unroutable``)."""
        if contact is None:
            with self._lock:
                member = self.members.get(peer_id)
            if member is None:
                with self._lock:
                    self.stats.drops["unroutable"] += 1
                raise KeyError(f"no verified contact for {peer_id}")
            contact = member.contact
        frame = self.seal(kind, public_key_of(peer_id), body)
        self.send_frame(contact["transport_key"], contact["addresses"][0], frame)
        with self._lock:
            self.stats.sent[kind] += 1
        return frame

    # -- membership ----------------------------------------------------------------------

    def contact_uri(self) -> str:
        """Our contact URI (§4), for an operator to give to a node (``--bootstrap``, ``add_contact``)."""
        host, port = self.address[len("tcp://"):].rsplit(":", 1)
        return Contact(self.peer_id, host, int(port), self.transport_public).uri()

    def hello_body(self, reply_requested: bool) -> dict:
        return {"contact": self.contact, "incarnation": self.incarnation, "reply_requested": reply_requested}

    def join(self, contact_uri: str) -> None:
        """Send our hello(reply_requested=true) to a candidate (§9.1, §9.2 step 1)."""
        c = parse_contact_uri(contact_uri)
        candidate = contact_body(c.peer_id, c.transport_key, [c.endpoint], [])
        self.send(c.peer_id, "hello", self.hello_body(True), contact=candidate)

    def member_list_body(self, reply_requested: bool) -> dict:
        with self._lock:
            rows = [member_update(self.peer_id, "alive", self.incarnation, self.contact)]
            rows += [member_update(m.peer_id, m.state, m.incarnation, m.contact) for m in self.members.values()]
        return {"members": rows[:256], "reply_requested": reply_requested}

    def _apply_updates(self, updates: tuple[dict, ...]) -> list[dict]:
        """Apply the §10.3 rows this peer needs; returns updates to piggyback (a refutation)."""
        out: list[dict] = []
        for u in updates:
            if u["peer_id"] == self.peer_id:
                if u["state"] in ("suspect", "dead", "left") and self.incarnation <= u["incarnation"] \
                        and u["incarnation"] < 2**62 - 2**20 and u["incarnation"] <= self.incarnation + 2**16:
                    with self._lock:
                        self.incarnation = u["incarnation"] + 1  # §10.4
                        self.stats.received["refutations"] += 1
                    out.append(member_update(self.peer_id, "alive", self.incarnation, self.contact))
        return out

    def _handle(self, env: Envelope, frame: bytes) -> None:
        sender = env.sender_id
        body = env.body
        with self._lock:
            member = self.members.get(sender)
        if env.kind == "hello":
            with self._lock:
                self.hellos.append(env)
            contact = body["contact"]
            if contact["peer_id"] != sender or sender == self.peer_id:
                return  # §9.1: ignored
            with self._lock:
                known = member is not None
                if member is None:
                    member = self.members[sender] = Member(sender, contact, body["incarnation"])
                else:
                    if contact != member.contact and body["incarnation"] > member.last_hello_incarnation:
                        member.contact = contact
                    member.incarnation = max(member.incarnation, body["incarnation"])
                    member.state = "alive"
                member.last_hello_incarnation = max(member.last_hello_incarnation, body["incarnation"])
                self._changed.notify_all()
            if not known:  # §9.2 "unknown" row
                self.send(sender, "hello", self.hello_body(False))
                self.send(sender, "member_list", self.member_list_body(True))
            elif body["reply_requested"]:
                self.send(sender, "hello", self.hello_body(False))
            return
        if member is None:
            with self._lock:
                self.stats.ignored[f"{env.kind} from a non-member"] += 1
            return  # §9.1: other kinds from a non-member are ignored
        if env.kind == "ping":
            refute = self._apply_updates(body["updates"])
            self.send(sender, "ack", {"probe_id": body["probe_id"], "of": None, "updates": refute})
        elif env.kind in ("ack", "ping_req"):
            self._apply_updates(body["updates"])
        elif env.kind == "member_list":
            refute = self._apply_updates(body["members"])
            if refute:
                self.send(sender, "hello", self.hello_body(False))
            if body["reply_requested"]:
                self.send(sender, "member_list", self.member_list_body(False))
        elif env.kind == "leave":
            with self._lock:
                member.state = "left"
                member.incarnation = max(member.incarnation, body["incarnation"])
        elif env.kind == "echo_request":
            if body["reply"]:
                self.send(sender, "echo_reply", {"nonce": body["nonce"], "payload": body["payload"]})
        elif env.kind == "echo_reply":
            with self._lock:
                self.echo_replies[body["nonce"]] = (env, frame)
                self._changed.notify_all()
        else:
            with self._lock:
                self.stats.ignored[env.kind] += 1  # §6.5 step 21: no actor here

    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            if len(parts) != 2:
                with self._lock:
                    self.stats.drops["malformed"] += 1
                continue
            self._on_frame(parts[1])

    def _on_frame(self, frame: bytes) -> None:
        """One frame from the ROUTER (receive thread): opened (§6), counted, handled. A subclass
        may look at frames first (the discovery clean room's trap peer)."""
        try:
            env = open_envelope(frame, self.network_id, self.public_key, now_ms(), self.windows)
        except ProtocolError as exc:
            with self._lock:
                self.stats.drops[exc.reason] += 1
            return
        with self._lock:
            self.stats.received[env.kind] += 1
        self._dispatch(env, frame)

    def _dispatch(self, env: Envelope, frame: bytes) -> None:
        try:
            self._handle(env, frame)
        except (KeyError, zmq.ZMQError):
            with self._lock:
                self.stats.drops["send_error"] += 1

    # -- waiting -------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``predicate()`` (called under the peer's lock) is true, or the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.2))
            return True

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        with self._lock:
            for sock in self._dealers.values():
                sock.close(0)
            self._dealers.clear()
        self._router.close(0)
        self._zap.close(0)
        self._ctx.term()
