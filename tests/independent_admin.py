"""A clean-room admin client of a Chimera Mesh node, written from docs/PROTOCOL.md §19 alone.

It uses only pyzmq, PyNaCl, msgpack and the standard library, and imports nothing from
``chimera``: it is what a dashboard in another language would have to do.

- Local transport (§19.1): a Unix stream socket ``DATA_DIR/admin.sock``; every frame is a
  4-byte big-endian length, then that many bytes of msgpack. Requests are unsigned (the owner,
  role ``admin``) or signed (the key's role).
- Remote transport (§19.1): a ZeroMQ DEALER, CURVE client of the node's transport key (any
  client keypair); one frame per request and per response; every request signed (§19.2).
- Signed requests (§19.2): ``{"signed": BIN, "sig": BIN(64)}``, the signature Ed25519 over
  ``b"chimera-admin-request-v1\\x00" + signed``.
- Admin private keys (§19.4): unencrypted PKCS#8 PEM of an Ed25519 key (RFC 8410).

Errors: :class:`AdminClientError` for a transport failure (no answer within the timeout, a
closed connection, a frame that is not a msgpack map); an answer ``{"ok": false, ...}`` is
returned as it is, never raised, so a test can look at its ``code``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import nacl.signing
import zmq

SIGN_DOMAIN = b"chimera-admin-request-v1\x00"   # §19.2
MAX_REQUEST_BYTES = 17 * 1024 * 1024           # §19.1
MAX_RESPONSE_BYTES = 16 * 1024 * 1024          # §19.1
ED25519_OID = b"\x06\x03\x2b\x65\x70"          # 1.3.101.112 (RFC 8410)


class AdminClientError(Exception):
    """The node gave no usable answer (code 3 in §19.3 terms: not running, timeout, closed)."""


# --- identities (§2, §1) --------------------------------------------------------------------

def fingerprint(public_key: bytes) -> str:
    """§2: ``"sha256:" + lowercase_hex(SHA-256(x))[0:16]`` of raw public key bytes."""
    return "sha256:" + hashlib.sha256(public_key).hexdigest()[:16]


def b32decode(text: str) -> bytes:
    """§1 base32 (lowercase, unpadded) to bytes; read leniently (case, padding) as §4 allows.
    Raises ValueError for anything that is not base32."""
    text = text.strip().rstrip("=").upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


def transport_key_from(server_key: str) -> bytes:
    """The node's 32-byte transport public key from a contact URI (§4: ``key=`` parameter) or
    from its bare base32 (§19.1 ``server_key``). Raises ValueError when it is neither."""
    if server_key.startswith("chm://"):
        from urllib.parse import parse_qs, urlsplit
        keys = parse_qs(urlsplit(server_key).query).get("key", [])
        if len(keys) != 1:
            raise ValueError("contact URI needs exactly one key= parameter")
        server_key = keys[0]
    raw = b32decode(server_key)
    if len(raw) != 32:
        raise ValueError(f"transport key is {len(raw)} bytes, not 32")
    return raw


# --- admin key files (§19.4) ----------------------------------------------------------------

def _der_read(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """One DER TLV at ``pos``: (tag, value, next position). Raises ValueError when cut short."""
    if pos + 2 > len(data):
        raise ValueError("DER truncated")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("DER truncated")
    return tag, data[pos:pos + length], pos + length


def load_private_key(pem: bytes) -> nacl.signing.SigningKey:
    """An Ed25519 signing key from an unencrypted PKCS#8 PEM (RFC 5958 OneAsymmetricKey with the
    RFC 8410 algorithm id-Ed25519; the private key is an OCTET STRING holding the OCTET STRING of
    the 32-byte seed). Raises ValueError for any other file."""
    text = pem.decode("ascii", "strict")
    begin, end = "-----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY-----"
    if begin not in text or end not in text:
        raise ValueError("not an unencrypted PKCS#8 PEM (BEGIN PRIVATE KEY)")
    body = text.split(begin, 1)[1].split(end, 1)[0]
    der = base64.b64decode("".join(body.split()), validate=True)
    tag, seq, _ = _der_read(der, 0)
    if tag != 0x30:
        raise ValueError("PKCS#8: not a SEQUENCE")
    tag, _version, pos = _der_read(seq, 0)
    if tag != 0x02:
        raise ValueError("PKCS#8: no version")
    tag, alg, pos = _der_read(seq, pos)
    if tag != 0x30 or not alg.startswith(ED25519_OID):
        raise ValueError("PKCS#8: not an Ed25519 key")
    tag, octets, pos = _der_read(seq, pos)
    if tag != 0x04:
        raise ValueError("PKCS#8: no private key")
    tag, seed, _ = _der_read(octets, 0)
    if tag != 0x04 or len(seed) != 32:
        raise ValueError("PKCS#8: the Ed25519 private key is not a 32-byte OCTET STRING")
    return nacl.signing.SigningKey(seed)


# --- requests (§19.2) -----------------------------------------------------------------------

def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_response(frame: bytes) -> dict:
    """A response frame to its map. Raises AdminClientError when it is not a msgpack map."""
    try:
        doc = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 (any decoding failure is the node's fault here)
        raise AdminClientError(f"response is not msgpack: {exc}") from exc
    if not isinstance(doc, dict):
        raise AdminClientError(f"response is a {type(doc).__name__}, not a map")
    return doc


def signed_request(key: nacl.signing.SigningKey, node_fingerprint: str, cmd: str,
                   args: dict | None = None, *, nonce: bytes | None = None,
                   sent_at_ms: int | None = None) -> dict:
    """§19.2 signed request map. ``nonce`` 8..64 bytes (default 16 random); ``sent_at_ms`` the
    wall clock in ms since the Unix epoch (default now)."""
    signed = pack({
        "node": node_fingerprint,
        "key": fingerprint(bytes(key.verify_key)),
        "cmd": cmd,
        "args": args or {},
        "nonce": nonce if nonce is not None else os.urandom(16),
        "sent_at_ms": sent_at_ms if sent_at_ms is not None else int(time.time() * 1000),
    })
    return {"signed": signed, "sig": key.sign(SIGN_DOMAIN + signed).signature}


class LocalAdmin:
    """One connection to ``DATA_DIR/admin.sock`` (§19.1). Requests are unsigned unless a key is
    given (then signed for ``node_fingerprint``). ``timeout_s`` bounds each read/write."""

    def __init__(self, socket_path: Path, *, timeout_s: float = 30.0,
                 key: nacl.signing.SigningKey | None = None, node_fingerprint: str | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(str(socket_path))
        except OSError as exc:
            self.sock.close()
            raise AdminClientError(f"cannot connect to {socket_path}: {exc}") from exc
        self.key, self.node_fingerprint = key, node_fingerprint

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "LocalAdmin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_frame(self, payload: bytes, *, length: int | None = None) -> None:
        """Send one frame; ``length`` overrides the prefix (to test the node's limits)."""
        self.sock.sendall(struct.pack(">I", len(payload) if length is None else length) + payload)

    def _read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except socket.timeout as exc:
                raise AdminClientError("no answer within the timeout") from exc
            if not chunk:
                raise AdminClientError("connection closed by the node")
            out += chunk
        return bytes(out)

    def recv_frame(self) -> dict:
        (length,) = struct.unpack(">I", self._read_exact(4))
        if length > MAX_RESPONSE_BYTES:
            raise AdminClientError(f"response of {length} bytes is over the 16 MiB limit")
        return unpack_response(self._read_exact(length))

    def request_map(self, cmd: str, args: dict | None = None) -> dict:
        if self.key is not None:
            if self.node_fingerprint is None:
                raise ValueError("a signed request needs the node's fingerprint")
            return signed_request(self.key, self.node_fingerprint, cmd, args)
        return {"cmd": cmd, "args": args or {}}

    def call(self, cmd: str, args: dict | None = None) -> dict:
        """One request, its response map (``ok``/``result`` or ``ok``/``error``/``code``)."""
        self.send_frame(pack(self.request_map(cmd, args)))
        return self.recv_frame()

    def follow(self, cmd: str, args: dict | None = None) -> Iterator[dict]:
        """A streaming command (§19.2): yields the first response, then each ``{"event": ...}``
        frame, then the ``{"end": REASON}`` frame, after which the node closes the connection.
        Raises AdminClientError when a frame does not come within the timeout or the node closes
        the connection before the end frame."""
        self.send_frame(pack(self.request_map(cmd, args)))
        first = self.recv_frame()
        yield first
        if not first.get("ok"):
            return
        while True:
            frame = self.recv_frame()
            yield frame
            if "end" in frame:
                return

    def hang_up(self) -> None:
        """End a stream from the client side (§19.2: any byte sent ends it)."""
        self.sock.sendall(b"\0")

    def closed_by_node(self) -> bool:
        """True when the node has closed the connection (EOF) with nothing more to read."""
        try:
            return self.sock.recv(1) == b""
        except socket.timeout:
            return False


class RemoteAdmin:
    """A DEALER to the node's remote admin ROUTER (§19.1), CURVE client of ``server_key`` (raw 32
    bytes), every request signed with ``key``. ``timeout_s`` bounds each answer."""

    def __init__(self, endpoint: str, server_key: bytes, key: nacl.signing.SigningKey,
                 node_fingerprint: str, *, timeout_s: float = 30.0):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        public, secret = zmq.curve_keypair()  # any client key: §19.1, the signature authenticates
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.curve_serverkey = server_key
        self.sock.curve_publickey = public
        self.sock.curve_secretkey = secret
        self.sock.connect(endpoint)
        self.key, self.node_fingerprint, self.timeout_s = key, node_fingerprint, timeout_s

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> "RemoteAdmin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_frame(self, payload: bytes) -> None:
        self.sock.send(payload)

    def recv_frame(self, timeout_s: float | None = None) -> dict:
        if not self.sock.poll(int(1000 * (timeout_s if timeout_s is not None else self.timeout_s))):
            raise AdminClientError("no answer within the timeout")
        return unpack_response(self.sock.recv())

    def call(self, cmd: str, args: dict | None = None, **sign: Any) -> dict:
        """One signed request; ``sign`` passes ``nonce``/``sent_at_ms`` to :func:`signed_request`."""
        self.send_frame(pack(signed_request(self.key, self.node_fingerprint, cmd, args, **sign)))
        return self.recv_frame()
