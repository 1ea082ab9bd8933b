"""Networks and join tokens.

A network is created once (``chimera network init``) from a random 32-byte
secret. Everything else is derived from the secret with HKDF-SHA256 (RFC 5869):

* ``network_id`` (16 bytes): public; in discovery TXT records and signatures.
* the network's CURVE client keypair (X25519): every member connects with it,
  and each node's ZAP handler admits only that client key, so a process
  without the token cannot complete a handshake (docs/PROTOCOL.md, Admission).

The join token is ``"chm1_" + base64url(msgpack [2, name, secret, bootstrap, genesis, epoch_length])``
without padding (version 1 tokens, ``[1, name, secret, bootstrap]``, are still
read: no genesis). It contains the secret: treat it like a password.

``genesis`` lists the peer ids of the validators of epoch 0 of the consensus
log (sorted, at most :data:`MAX_GENESIS`). The log's first block names
:meth:`Network.genesis_hash` as its parent, so peers holding tokens with
different genesis lists never accept each other's commits. A network without
genesis validators runs membership only. ``epoch_length`` (heights per epoch,
1..2**20) must be the same on every peer, so it travels with the token too.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import re
import secrets
from dataclasses import dataclass

import msgpack
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import InvalidTokenError, LocalProtocolError, MalformedError
from .identity import fingerprint, public_key_from_peer_id

TOKEN_PREFIX = "chm1_"
SECRET_BYTES = 32
MAX_TOKEN_CHARS = 8192
MAX_BOOTSTRAP = 32
MAX_GENESIS = 64
DEFAULT_EPOCH_LENGTH = 100
MAX_NAME_CHARS = 64  # the token's limit on the human label
MAX_EPOCH_LENGTH = 1 << 20


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


@dataclass(frozen=True, slots=True)
class Network:
    """A network's shared secret plus what is derived from it.

    Attributes:
        name: human label (<= 64 chars), not authenticated.
        secret: 32 random bytes; never logged.
        bootstrap: contact URIs (``chm://PEER_ID@HOST:PORT?key=TRANSPORT_KEY``) to try
            first, for where multicast does not reach.
        genesis: peer ids of the epoch-0 validators (sorted, deduplicated).
        epoch_length: heights per consensus epoch (1..MAX_EPOCH_LENGTH).
    Raises:
        LocalProtocolError: a secret not of 32 bytes, more than MAX_GENESIS
            genesis validators, or one that is not a peer id.
    """

    name: str
    secret: bytes
    bootstrap: tuple[str, ...] = ()
    genesis: tuple[str, ...] = ()
    epoch_length: int = DEFAULT_EPOCH_LENGTH

    def __post_init__(self) -> None:
        if type(self.name) is not str or not 1 <= len(self.name) <= MAX_NAME_CHARS or not self.name.isprintable():
            raise LocalProtocolError(f"a network name is 1..{MAX_NAME_CHARS} printable characters")
        if type(self.epoch_length) is not int or not 1 <= self.epoch_length <= MAX_EPOCH_LENGTH:
            raise LocalProtocolError(f"epoch_length must be an int in 1..{MAX_EPOCH_LENGTH}")
        if len(self.secret) != SECRET_BYTES:
            raise LocalProtocolError("a network secret is 32 bytes")
        genesis = tuple(sorted(set(self.genesis)))
        if len(genesis) > MAX_GENESIS:
            raise LocalProtocolError(f"at most {MAX_GENESIS} genesis validators")
        for peer_id in genesis:
            try:
                public_key_from_peer_id(peer_id)
            except MalformedError as exc:
                raise LocalProtocolError(f"genesis validator is not a peer id: {exc}") from None
        object.__setattr__(self, "genesis", genesis)

    @classmethod
    def create(cls, name: str = "chimera", bootstrap: tuple[str, ...] = (),
               genesis: tuple[str, ...] = (), epoch_length: int = DEFAULT_EPOCH_LENGTH) -> "Network":
        return cls(name=name, secret=secrets.token_bytes(SECRET_BYTES), bootstrap=tuple(bootstrap),
                   genesis=tuple(genesis), epoch_length=epoch_length)

    def genesis_hash(self) -> bytes:
        """Parent hash of the log's first block: SHA-256 of msgpack [network_id, genesis, epoch_length]."""
        return hashlib.sha256(msgpack.packb([self.network_id, list(self.genesis), self.epoch_length])).digest()

    @property
    def network_id(self) -> bytes:
        return _hkdf(self.secret, b"chimera-mesh/v1 network id", 16)

    def curve_client_keypair(self) -> tuple[bytes, bytes]:
        """(public, secret) raw 32-byte X25519 keys every member connects with."""
        seed = _hkdf(self.secret, b"chimera-mesh/v1 curve client key", 32)
        public = X25519PrivateKey.from_private_bytes(seed).public_key()
        return public.public_bytes(Encoding.Raw, PublicFormat.Raw), seed

    def fingerprint(self) -> str:
        return fingerprint(self.network_id)

    def with_bootstrap(self, bootstrap: tuple[str, ...]) -> "Network":
        return Network(name=self.name, secret=self.secret, bootstrap=tuple(bootstrap), genesis=self.genesis,
                       epoch_length=self.epoch_length)

    def token(self) -> str:
        packed = msgpack.packb([2, self.name, self.secret, list(self.bootstrap), list(self.genesis),
                                self.epoch_length], use_bin_type=True)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(packed).decode("ascii").rstrip("=")

    @classmethod
    def from_token(cls, token: str) -> "Network":
        """Parse a join token.

        Raises:
            InvalidTokenError: the token is not one ``token()`` produced.
        """
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
            raise InvalidTokenError(f"a join token starts with {TOKEN_PREFIX!r}")
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidTokenError("join token too long")
        body = token[len(TOKEN_PREFIX):].strip()
        try:
            raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
            value = msgpack.unpackb(raw, raw=False, ext_hook=_no_ext, max_bin_len=64,
                                    max_str_len=4096, max_array_len=64, max_map_len=0)
        except Exception:
            raise InvalidTokenError("join token is not valid base64url msgpack") from None
        if type(value) is list and len(value) == 4 and type(value[0]) is int and value[0] == 1:
            value = [2, *value[1:], [], DEFAULT_EPOCH_LENGTH]  # version 1: no genesis
        if (type(value) is not list or len(value) != 6 or type(value[0]) is not int or value[0] != 2
                or type(value[1]) is not str or len(value[1]) > MAX_NAME_CHARS
                or type(value[2]) is not bytes or len(value[2]) != SECRET_BYTES
                or type(value[3]) is not list or len(value[3]) > MAX_BOOTSTRAP
                or not all(type(b) is str and len(b) < 256 for b in value[3])
                or type(value[4]) is not list or len(value[4]) > MAX_GENESIS
                or not all(type(g) is str and len(g) < 128 for g in value[4])
                or type(value[5]) is not int):
            raise InvalidTokenError("join token has the wrong structure or version")
        try:
            return cls(name=value[1], secret=value[2], bootstrap=tuple(value[3]), genesis=tuple(value[4]),
                       epoch_length=value[5])
        except LocalProtocolError as exc:
            raise InvalidTokenError(f"join token: {exc}") from None


def _no_ext(code: int, data: bytes) -> None:
    raise ValueError("extension types are not allowed")


# ------------------------------------------------------------------ contacts

CONTACT_SCHEME = "chm"


def format_contact_uri(peer_id: str, host: str, port: int, transport_key: bytes) -> str:
    """``chm://PEER_ID@HOST:PORT?key=TRANSPORT_KEY`` (key: base32 of 32 bytes).

    A self-certifying contact: the peer id says who must answer, the key which
    CURVE server to expect, the host and port where to connect.
    """
    from .identity import b32

    if ":" in host:
        host = f"[{host}]"
    return f"{CONTACT_SCHEME}://{peer_id}@{host}:{port}?key={b32(transport_key)}"


_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def valid_host(host: str) -> bool:
    """Whether ``host`` is an IPv4 literal, an IPv6 literal (no brackets; an optional
    ``%scope``), or a DNS name of letters, digits and hyphens (labels of 1-63, at most 253
    characters, lowercase, one optional dot at the end): the hosts a contact may name (§4). Anything else could be
    ZeroMQ endpoint syntax (``1.2.3.4;5.6.7.8`` connects *from* the first address *to*
    the second), or is refused by libzmq on every connection attempt."""
    if not isinstance(host, str) or not 0 < len(host) <= 253:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    # one dot at the end: a fully qualified name (``h.example.``); ``h..`` has an empty label
    labels = (host[:-1] if host.endswith(".") else host).split(".") if host != "." else [""]
    return all(_DNS_LABEL.fullmatch(label) for label in labels) and not host.replace(".", "").isdigit()


_PORT = re.compile(r"[1-9][0-9]{0,4}")


@functools.lru_cache(maxsize=16384)  # every decoded contact's addresses: mostly the same few
def valid_endpoint(address: str) -> bool:
    """Whether ``address`` is ``tcp://HOST:PORT`` as a contact carries it (§4, §8.1): HOST
    a :func:`valid_host` (an IPv6 literal in brackets), PORT 1-65535 without leading zeros."""
    if not isinstance(address, str) or not address.startswith("tcp://"):
        return False
    host, sep, port = address[6:].rpartition(":")
    if not sep or not _PORT.fullmatch(port) or int(port) > 65535:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        return ":" in host and valid_host(host)
    return ":" not in host and valid_host(host)


def parse_contact_uri(uri: str) -> tuple[str, str, bytes]:
    """Parse a contact URI into (peer_id, ``tcp://HOST:PORT`` endpoint, transport key).

    Raises:
        MalformedError: anything that :func:`format_contact_uri` would not produce.
    """
    from urllib.parse import parse_qs, urlsplit

    from .errors import MalformedError
    from .identity import public_key_from_peer_id, unb32

    if not isinstance(uri, str) or len(uri) > 512:
        raise MalformedError("a contact URI is a string of at most 512 characters")
    try:
        parts = urlsplit(uri.strip())
        port = parts.port
    except ValueError as exc:
        raise MalformedError(f"bad contact URI {uri[:60]!r}: {exc}") from None
    if parts.scheme != CONTACT_SCHEME or not parts.username or not parts.hostname or not port:
        raise MalformedError(
            f"bad contact URI {uri[:60]!r}: expected chm://PEER_ID@HOST:PORT?key=TRANSPORT_KEY")
    peer_id = parts.username
    public_key_from_peer_id(peer_id)
    keys = parse_qs(parts.query).get("key", [])
    if len(keys) != 1:
        raise MalformedError(f"contact URI {uri[:60]!r} needs exactly one key=")
    key = unb32(keys[0])
    if len(key) != 32:
        raise MalformedError("transport key must be 32 bytes")
    host = parts.hostname
    if not valid_host(host):
        raise MalformedError(f"contact URI {uri[:60]!r}: the host must be an IPv4 or [IPv6] literal "
                             "or a DNS name of letters, digits and hyphens")
    endpoint = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    return peer_id, endpoint, key
