"""Admin keys, roles and signed admin requests.

* An admin key is an Ed25519 keypair. The node keeps only the public half, with
  a name and a role, in the ``admin_keys`` table of its store
  (``DATA_DIR/node.sqlite3``); the private half is a PKCS#8 PEM file (mode
  0600) held by whoever runs the shell.
* Roles, weakest first: ``observer`` (reads), ``operator`` (also acts:
  propose, train, deploy, submit), ``admin`` (also changes membership, keys
  and config). :data:`COMMAND_ROLES` is the one table that says which role
  each admin command needs; a command missing from it needs ``admin``.
* A signed request is ``{"signed": BIN, "sig": BIN}``: ``signed`` is the
  msgpack map ``{"node", "key", "cmd", "args", "nonce", "sent_at_ms"}`` and
  ``sig`` the Ed25519 signature of :data:`REQUEST_DOMAIN` followed by exactly
  those bytes (docs/PROTOCOL.md §19).
"""

from __future__ import annotations

import heapq
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from chimera.protocol.errors import MalformedError
from chimera.protocol.identity import fingerprint, is_usable_public_key, verify_signature
from chimera.protocol.messages import reject_duplicate_keys

from .keys import atomic_write

ROLES = ("observer", "operator", "admin")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
REQUEST_DOMAIN = b"chimera-admin-request-v1\x00"
REPLAY_WINDOW_S = 60.0
MAX_TRACKED_NONCES = 65536  # all keys together (a key under its share of this is still served)
MAX_NONCES_PER_KEY = 4096  # one key's requests in the replay window (~34 per second sustained)
NONCE_BYTES = 16
MAX_KEY_NAME_CHARS = 64

# The role each admin command needs, in one place. Observers read; operators
# also act; admins also change membership, keys and config. A command that is
# not listed needs "admin" (secure by default).
COMMAND_ROLES: dict[str, str] = {
    # read
    **dict.fromkeys((
        "status", "peers", "events", "events_follow", "log", "certificate", "reputation", "resources", "metrics",
        "train_status", "agents_list", "tasks_status", "modules_list", "audit", "commands",
        "config_get", "whoami", "revoked_peers"), "observer"),
    # act
    **dict.fromkeys((
        "propose", "ping", "train_start", "train_export", "agents_deploy", "agents_upgrade",
        "agents_rollback", "agents_remove", "agents_call", "tasks_submit", "tasks_cancel"), "operator"),
    # change membership, keys, config
    **dict.fromkeys((
        "add_contact", "stop", "config_set", "log_level", "admit", "revoke_peer",
        "admin_key_add", "admin_key_list", "admin_key_revoke"), "admin"),
}

# One-line help and argument names (positional order in the shell) of the
# commands this package knows; handlers added elsewhere fall back to their
# docstring's first line.
COMMAND_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "status": ("this node: identity, network, members, limits, counters", ()),
    "peers": ("members as this node sees them (id, address, state, rtt, last seen)", ()),
    "events": ("recent events, newest last", ("limit", "kind", "min_priority")),
    "events_follow": ("live tail of events until interrupted (local socket only)",
                      ("kind", "min_priority", "max_events", "duration_s")),
    "log": ("committed decisions of the consensus log", ("limit", "from_height")),
    "reputation": ("committed voting weights and local scores", ()),
    "certificate": ("the quorum certificate of a committed height, re-verified here", ("height",)),
    "resources": ("this machine's CPU, memory, disk and GPUs", ()),
    "metrics": ("Prometheus text of this node (or a summary when the exporter is off)", ()),
    "audit": ("the admin audit log, newest last", ("limit",)),
    "commands": ("the commands this node serves, their arguments and roles", ()),
    "whoami": ("who this connection is and its role", ()),
    "config_get": ("runtime configuration (all fields, or one)", ("field",)),
    "config_set": ("change a runtime-changeable config field", ("field", "value")),
    "log_level": ("change the node's log level (debug, info, warning, error)", ("level",)),
    "propose": ("commit a decision to the consensus log and wait for it", ("data", "timeout_s", "count")),
    "ping": ("round-trip signed echo requests to a member", ("peer_id", "count")),
    "add_contact": ("add a static contact URI (chm://...)", ("uri",)),
    "stop": ("stop this node gracefully", ()),
    "revoked_peers": ("the revoked peer ids with time and reason", ()),
    "admit": ("lift the revocation of a peer id (uri: reconnect at this contact)", ("peer_id", "uri")),
    "revoke_peer": ("refuse a peer id from now on and drop it from membership", ("peer_id", "reason")),
    "admin_key_add": ("register an admin public key with a role", ("name", "role", "public_key")),
    "admin_key_list": ("the admin keys of this node", ()),
    "admin_key_revoke": ("revoke an admin key by name or fingerprint", ("key",)),
    "train_status": ("federated training jobs and rounds", ("job",)),
    "train_start": ("start a federated training job", ("job", "timeout_s")),
    "train_export": ("the latest certified model of a job (npz bytes + JSON sidecar); the CLI or the shell "
                     "writes them (shell: train export path=FILE [job=ID] [force=true])",
                     ("job",)),
    "agents_list": ("deployed WASM agents", ()),
    "agents_deploy": ("deploy a WASM agent (module=@FILE.wasm or sha256=...)", ("ref", "module", "kind")),
    "agents_upgrade": ("upgrade a WASM agent (module=@FILE.wasm or sha256=...)", ("ref", "module")),
    "agents_rollback": ("roll a WASM agent back to its previous version", ("name",)),
    "agents_remove": ("remove a WASM agent", ("name",)),
    "agents_call": ("call a WASM agent with an input", ("name", "input", "reply_wait_s")),
    "tasks_submit": ("submit a WASM task to the fabric (module=@FILE.wasm or sha256=...)", ("module", "input")),
    "tasks_status": ("status of submitted tasks", ("task_id", "limit")),
    "tasks_cancel": ("end a running task submitted here (failed: cancelled; its replicas stop it)", ("task_id",)),
    "modules_list": ("stored WASM modules", ()),
}

# Named-only arguments (name=value in the shell; no positional place) a command's
# handler reads besides those COMMAND_HELP lists; `commands` reports them as "options".
COMMAND_OPTIONS: dict[str, tuple[str, ...]] = {
    "agents_deploy": ("sha256",),
    "agents_upgrade": ("sha256",),
    "tasks_submit": ("sha256", "rule", "threshold", "wait", "wait_s", "fuel", "memory_bytes", "timeout_s",
                     "gpus", "gpu_memory_bytes", "replicas"),
    "tasks_status": ("wait_s",),
}


def required_role(cmd: str) -> str:
    """The role ``cmd`` needs (``admin`` when the command is not in the table)."""
    return COMMAND_ROLES.get(cmd, "admin")


def role_allows(role: str, cmd: str) -> bool:
    return ROLE_RANK.get(role, -1) >= ROLE_RANK[required_role(cmd)]


class AdminKeyError(Exception):
    """A key name, role or key file is unusable, or a key is unknown."""


@dataclass(frozen=True, slots=True)
class AdminKey:
    name: str
    role: str
    public_key: bytes
    fingerprint: str
    created_ms: int
    revoked_ms: int | None

    def as_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "fingerprint": self.fingerprint,
                "created_ms": self.created_ms, "revoked_ms": self.revoked_ms,
                "state": "revoked" if self.revoked_ms is not None else "active"}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS admin_keys (
    fingerprint TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    public_key BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
"""


def check_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_KEY_NAME_CHARS \
            or not all(c.isalnum() or c in "-_." for c in name):
        raise AdminKeyError(f"a key name is 1..{MAX_KEY_NAME_CHARS} letters, digits, '-', '_' or '.'")
    return name


def check_role(role: object) -> str:
    if role not in ROLE_RANK:
        raise AdminKeyError(f"unknown role {role!r}; use {', '.join(ROLES)}")
    return str(role)


class KeyRing:
    """The admin keys of one node, in its SQLite store (any connection to it).

    The node and ``chimera admin key ...`` (node stopped) share the same table;
    every lookup reads the table, so a key revoked by either is refused at once.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(_SCHEMA)

    @classmethod
    def open(cls, data_dir: Path) -> "KeyRing":
        """Open the store of ``data_dir`` directly (for use while the node is stopped).

        Raises:
            AdminKeyError: ``data_dir`` does not exist.
        """
        if not data_dir.is_dir():
            raise AdminKeyError(f"data dir {data_dir} does not exist")
        path = data_dir / "node.sqlite3"
        db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        path.chmod(0o600)
        return cls(db)

    def add(self, name: str, role: str, public_key: bytes, now_ms: int) -> AdminKey:
        """Register a public key. Raises AdminKeyError on a bad name/role/key or a duplicate."""
        check_name(name)
        check_role(role)
        if not isinstance(public_key, bytes) or len(public_key) != 32:
            raise AdminKeyError("an admin public key is 32 raw Ed25519 bytes")
        if not is_usable_public_key(public_key):  # small-order keys can never verify (PROTOCOL §6.2)
            raise AdminKeyError("not a usable Ed25519 public key (not a point of the prime-order subgroup)")
        fp = fingerprint(public_key)
        for key in self.list():
            if key.revoked_ms is None and key.name == name:
                raise AdminKeyError(f"an active key named {name!r} exists; revoke it first")
            if key.fingerprint == fp:
                raise AdminKeyError(f"key {fp} is already registered (as {key.name!r})")
        self.db.execute("INSERT INTO admin_keys(fingerprint, name, role, public_key, created_ms) "
                        "VALUES(?,?,?,?,?)", (fp, name, role, public_key, now_ms))
        return AdminKey(name, role, public_key, fp, now_ms, None)

    def list(self) -> list[AdminKey]:
        return [AdminKey(n, r, bytes(k), f, c, v) for f, n, r, k, c, v in self.db.execute(
            "SELECT fingerprint, name, role, public_key, created_ms, revoked_ms FROM admin_keys "
            "ORDER BY created_ms, name")]

    def get(self, fp: str) -> AdminKey | None:
        row = self.db.execute("SELECT fingerprint, name, role, public_key, created_ms, revoked_ms "
                              "FROM admin_keys WHERE fingerprint=?", (fp,)).fetchone()
        if row is None:
            return None
        f, n, r, k, c, v = row
        return AdminKey(n, r, bytes(k), f, c, v)

    def revoke(self, name_or_fp: str, now_ms: int) -> AdminKey:
        """Revoke the active key with this name or fingerprint.

        Raises:
            AdminKeyError: no active key matches.
        """
        fp = name_or_fp if name_or_fp.startswith("sha256:") else None
        for key in self.list():
            if key.revoked_ms is None and (key.fingerprint == fp or key.name == name_or_fp):
                self.db.execute("UPDATE admin_keys SET revoked_ms=? WHERE fingerprint=?",
                                (now_ms, key.fingerprint))
                return AdminKey(key.name, key.role, key.public_key, key.fingerprint, key.created_ms, now_ms)
        raise AdminKeyError(f"no active admin key named or with fingerprint {name_or_fp!r}")

    def close(self) -> None:
        self.db.close()


# ------------------------------------------------------------ private key files


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def write_key_file(path: Path, key: Ed25519PrivateKey, *, overwrite: bool = False) -> None:
    """Write the private key as unencrypted PKCS#8 PEM, mode 0600, atomically.

    Raises:
        AdminKeyError: the file exists and ``overwrite`` is false.
    """
    if path.exists() and not overwrite:
        raise AdminKeyError(f"{path} exists; choose another --out")
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    atomic_write(path, pem, 0o600)


def load_key_file(path: Path) -> Ed25519PrivateKey:
    """Read an admin private key file.

    Raises:
        AdminKeyError: missing, readable by others, or not an Ed25519 PEM key.
    """
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise AdminKeyError(f"cannot read admin key {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise AdminKeyError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise AdminKeyError(f"{path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AdminKeyError(f"{path} is not an Ed25519 key")
    return key


# ------------------------------------------------------------- signed requests


def sign_request(key: Ed25519PrivateKey, node: str, cmd: str, args: dict, *,
                 now_ms: int | None = None, nonce: bytes | None = None) -> dict:
    """The signed request map for ``cmd`` to the node whose transport-key fingerprint is ``node``."""
    signed = msgpack.packb({
        "node": node, "key": fingerprint(public_bytes(key)), "cmd": cmd, "args": args,
        "nonce": nonce if nonce is not None else os.urandom(NONCE_BYTES),
        "sent_at_ms": now_ms if now_ms is not None else time.time_ns() // 1_000_000,
    }, use_bin_type=True)
    return {"signed": signed, "sig": key.sign(REQUEST_DOMAIN + signed)}


class Refused(Exception):
    """An admin request is not allowed (authentication or role)."""

    def __init__(self, message: str, who: str = "unknown", role: str = "-") -> None:
        super().__init__(message)
        self.who, self.role = who, role


class MalformedRequest(Refused):
    """A signed request that is not well-formed (a map with a duplicate key): a usage error
    (code 2), not a refusal; still a :class:`Refused` for callers that only know that."""


@dataclass(frozen=True, slots=True)
class SignedRequest:
    key: AdminKey
    cmd: str
    args: dict


@dataclass(frozen=True, slots=True)
class Claim:
    """A signed request whose key is registered and active, its signature not yet checked."""
    body: dict
    key: AdminKey
    signed: bytes
    sig: bytes
    who: str

    def signature_ok(self) -> bool:
        return verify_signature(self.key.public_key, self.sig, REQUEST_DOMAIN + self.signed)  # PROTOCOL §6.2


class RequestVerifier:
    """Checks signed requests: audience, freshness, nonce, key state, signature.

    Args:
        keys: the node's key ring.
        node: this node's transport-key fingerprint (the audience).
        window_s: ``|now - sent_at|`` allowed, seconds. A nonce is remembered
            until the request it came with is stale (``max(now, sent_at) +
            window``, plus 1 ms), so a replay is refused for as long as the
            original would still be fresh.

    Each key may have at most :data:`MAX_NONCES_PER_KEY` nonces remembered; all
    keys together :data:`MAX_TRACKED_NONCES`. When the table is full, only keys
    holding at least their share of it (the cap over the number of keys in it)
    are refused: one key (an observer's included) cannot lock the others out.
    """

    def __init__(self, keys: KeyRing, node: str, window_s: float = REPLAY_WINDOW_S) -> None:
        self.keys = keys
        self.node = node
        self.window_ms = int(window_s * 1000)
        self._seen: set[tuple[str, bytes]] = set()
        self._expiry: list[tuple[int, str, bytes]] = []  # heap of (forget at ms, key, nonce)
        self._per_key: dict[str, int] = {}

    def _expire(self, now_ms: int) -> None:
        while self._expiry and self._expiry[0][0] <= now_ms:
            _, fp, nonce = heapq.heappop(self._expiry)
            self._seen.discard((fp, nonce))
            left = self._per_key[fp] - 1
            if left:
                self._per_key[fp] = left
            else:
                del self._per_key[fp]

    def verify(self, req: dict, now_ms: int) -> SignedRequest:
        """Raises Refused (with the claimed key, when readable) for every failure."""
        claim = self.claim(req)
        return self.admit(claim, claim.signature_ok(), now_ms)

    def claim(self, req: dict) -> "Claim":
        """The first checks, in order: shape and fields (decoded at bounded cost), the key is
        registered and not revoked. Then :meth:`Claim.signature_ok` (the one step whose cost
        grows with the request: run it off the event loop for a big one) and :meth:`admit`.

        Raises:
            Refused: with the claimed key, when readable.
        """
        signed, sig = req.get("signed"), req.get("sig")
        if not isinstance(signed, bytes) or not isinstance(sig, bytes) or len(sig) != 64:
            raise Refused("a signed request is {signed: bytes, sig: 64 bytes}")
        try:
            body = unpack_request(signed)
        except MalformedError:  # which of two values counts would be ambiguous: never run it
            raise MalformedRequest("signed part has a map with a duplicate key") from None
        except UnreadableRequest as exc:
            raise Refused(f"signed part {exc}") from None
        if type(body) is not dict:
            raise Refused("signed part must be a map")
        fp = body.get("key")
        who = fp if isinstance(fp, str) else "unknown"
        for field, tp in (("node", str), ("key", str), ("cmd", str), ("args", dict), ("nonce", bytes),
                          ("sent_at_ms", int)):
            if type(body.get(field)) is not tp:
                raise Refused(f"signed field {field!r} missing or not {tp.__name__}", who)
        key = self.keys.get(fp)
        if key is None:
            raise Refused(f"unknown admin key {fp[:40]}", who)
        who = f"{key.name} ({key.fingerprint})"
        if key.revoked_ms is not None:
            raise Refused(f"admin key {key.name!r} ({key.fingerprint}) is revoked", who, key.role)
        return Claim(body, key, signed, sig, who)

    def admit(self, claim: "Claim", signature_ok: bool, now_ms: int) -> SignedRequest:
        """The remaining checks: signature, audience, freshness, nonce (remembered if all pass).

        Raises:
            Refused: the first that fails.
        """
        body, key, who = claim.body, claim.key, claim.who
        if not signature_ok:
            raise Refused("bad signature", who, key.role)
        if body["node"] != self.node:
            raise Refused(f"request is for node {body['node'][:40]}, this is {self.node}", who, key.role)
        sent_at = body["sent_at_ms"]
        if abs(now_ms - sent_at) > self.window_ms:
            raise Refused(f"request time is more than {self.window_ms // 1000} s from the node's clock",
                          who, key.role)
        if not 8 <= len(body["nonce"]) <= 64:
            raise Refused("nonce must be 8..64 bytes", who, key.role)
        self._expire(now_ms)
        marker = (key.fingerprint, body["nonce"])
        if marker in self._seen:
            raise Refused("replayed request (nonce already used)", who, key.role)
        held = self._per_key.get(key.fingerprint, 0)
        if held >= MAX_NONCES_PER_KEY:
            raise Refused(f"this key sent more than {MAX_NONCES_PER_KEY} requests in the replay window; "
                          "retry later", who, key.role)
        if len(self._seen) >= MAX_TRACKED_NONCES \
                and held >= MAX_TRACKED_NONCES // (len(self._per_key) + (held == 0)):
            raise Refused("too many signed requests in the replay window; retry later", who, key.role)
        self._seen.add(marker)
        self._per_key[key.fingerprint] = held + 1
        # fresh while now <= sent_at + window: remember it until then (and at least a window from now)
        heapq.heappush(self._expiry, (max(now_ms, sent_at) + self.window_ms + 1, key.fingerprint, body["nonce"]))
        return SignedRequest(key, body["cmd"], body["args"])


# ------------------------------------------------------------ bounded decoding

MAX_REQUEST_VALUES = 8192
"""msgpack values in one request (or its signed part), all levels: a training job with
1 024 classes and 64 participants has about 1 200."""
MAX_REQUEST_DEPTH = 16
"""Nesting of maps and arrays (a job map inside ``args`` inside the request is 4)."""
MAX_MAP_LEN = 64
"""Entries of one map (the longest is a job spec: 18 fields)."""
MAX_ARRAY_LEN = 1024
"""Items of one array (a job's ``classes``: at most 1 024)."""

# msgpack first byte -> bytes of length to read (for str/bin) or fixed payload size.
_FIXED = {0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8, 0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8}
_SIZED = {0xc4: 1, 0xc5: 2, 0xc6: 4, 0xd9: 1, 0xda: 2, 0xdb: 4}  # bin8/16/32, str8/16/32
_ARRAYS = {0xdc: 2, 0xdd: 4}
_MAPS = {0xde: 2, 0xdf: 4}


class UnreadableRequest(ValueError):
    """A request (or signed part) that is not msgpack, or is beyond the decoding limits."""


def check_shape(data: bytes, max_values: int = MAX_REQUEST_VALUES, max_depth: int = MAX_REQUEST_DEPTH) -> None:
    """Walk the msgpack encoding of one value without building it, and stop at the first
    of ``max_values`` values: the cost of looking at any input is bounded (a 17 MiB array of
    empty maps costs as much as 8 192 values), before :func:`msgpack.unpackb` builds anything.

    Raises:
        UnreadableRequest: truncated, an extension type or an unused code, a map longer than
            :data:`MAX_MAP_LEN`, an array longer than :data:`MAX_ARRAY_LEN`, more values than
            ``max_values`` or nested deeper than ``max_depth``.
    """
    end, pos, count = len(data), 0, 0
    left = [1]  # values still to read at each open level
    while left:
        if not left[-1]:
            left.pop()
            continue
        left[-1] -= 1
        if pos >= end:
            raise UnreadableRequest("is not msgpack")
        count += 1
        if count > max_values:
            raise UnreadableRequest(f"has more than {max_values} values")
        b = data[pos]
        pos += 1
        if b <= 0x7f or b >= 0xe0 or b in (0xc0, 0xc2, 0xc3):
            continue
        if 0xa0 <= b <= 0xbf:
            pos += b & 0x1f
            continue
        if b in _FIXED:
            pos += _FIXED[b]
            continue
        if b in _SIZED:
            n = _SIZED[b]
            pos += n + int.from_bytes(data[pos:pos + n], "big")
            continue
        if 0x80 <= b <= 0x8f or 0x90 <= b <= 0x9f:
            n, is_map = b & 0x0f, b <= 0x8f
        elif b in _ARRAYS or b in _MAPS:
            size = _ARRAYS.get(b) or _MAPS[b]
            n, is_map = int.from_bytes(data[pos:pos + size], "big"), b in _MAPS
            pos += size
        else:
            raise UnreadableRequest("is not msgpack")  # an extension type, or 0xc1
        if n > (MAX_MAP_LEN if is_map else MAX_ARRAY_LEN):
            raise UnreadableRequest(f"has {'a map' if is_map else 'an array'} of {n} entries "
                                    f"(at most {MAX_MAP_LEN if is_map else MAX_ARRAY_LEN})")
        if n:
            if len(left) > max_depth:
                raise UnreadableRequest(f"is nested deeper than {max_depth}")
            left.append(2 * n if is_map else n)


def unpack_request(data: bytes) -> object:
    """Decode one admin request (or signed part) strictly and at bounded cost: :func:`check_shape`
    first, then msgpack with the same limits, no extension types, string or bytes map keys,
    no duplicate keys.

    Raises:
        MalformedError: a map with a duplicate key.
        UnreadableRequest: anything else that is not a well-formed, bounded msgpack value.
    """
    check_shape(data)
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext,
                               max_bin_len=len(data), max_str_len=len(data), max_ext_len=0,
                               max_map_len=MAX_MAP_LEN, max_array_len=MAX_ARRAY_LEN,
                               object_pairs_hook=reject_duplicate_keys)
    except MalformedError:
        raise
    except Exception:
        raise UnreadableRequest("is not msgpack") from None


def _no_ext(code: int, data: bytes) -> None:
    raise ValueError("no extension types")
