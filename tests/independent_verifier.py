"""A clean-room verifier of the consensus log, written from docs/PROTOCOL.md alone.

It answers the question of the spec's §14.6/§14.10 claim: can a peer that joins
later verify every commit of the log from the join token (network id, genesis
list, epoch length), the certified commits and the weight tables it derives
itself? It uses only PyNaCl, msgpack, hashlib and the standard library, and
imports nothing from ``chimera`` (tests/test_independent_verifier.py checks this).

Sections implemented (PROTOCOL.md): §2 peer ids, §3.1 network id and genesis
hash, §3.2 join token, §7 strict record decoding, §14.2 canonical encoding and
vote signatures, §14.3 weights, quorums and certificates, §14.4 blocks and
certified commits, §14.6 proposer selection, §15.1-§15.4 log values, the
ledger and the next weight table.

Errors: every malformed or invalid input raises :class:`VerifyError` with a
``reason`` (a short word) and a message; nothing else is raised for bad input.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

VOTE_DOMAIN = b"chimera-mesh/vote/v1\x00"   # §14.2, 21 bytes
NETWORK_ID_INFO = b"chimera-mesh/v1 network id"  # §3.1
TOKEN_PREFIX = "chm1_"
MAX_TOKEN_CHARS = 8192
MAX_GENESIS = 64
MAX_EPOCH_LENGTH = 1 << 20
MAX_HEIGHT = 1 << 62
MAX_ROUND = 1 << 31
MAX_U64 = (1 << 64) - 1
MAX_VOTES = 1024               # §14.3, also MAX_VOTERS of §15.3
MAX_BLOCK_VALUES = 256         # §14.4
MAX_VALUE_BYTES = 4096         # §14.4
MAX_DECODED_VALUE_BYTES = 8192  # §15.1
MAX_DECISION_BYTES = 2048      # §15.2
MAX_OPINION_ENTRIES = 1024     # §15.2
WEIGHT_SCALE = 1000            # §15.4 WeightPolicy
NEWCOMER_WEIGHT = 100
MAX_GROWTH_PER_EPOCH = 100
PPM = 1_000_000
PEER_ID_CHARS = 52


class VerifyError(ValueError):
    """Input that is malformed or does not verify. ``reason`` is one short word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# --- §2 identities ---------------------------------------------------------

def peer_id_of(public_key: bytes) -> str:
    """The peer id (52 lowercase base32 characters, §2) of a 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise VerifyError("malformed", f"a public key is 32 bytes, not {len(public_key)}")
    return base64.b32encode(public_key).decode("ascii").rstrip("=").lower()


def public_key_of(peer_id: object) -> bytes:
    """The 32-byte public key a canonical peer id encodes. Raises VerifyError('malformed')."""
    if not isinstance(peer_id, str) or len(peer_id) != PEER_ID_CHARS:
        raise VerifyError("malformed", f"not a peer id: {peer_id!r}")
    try:
        key = base64.b32decode(peer_id.upper() + "====", casefold=False)
    except (ValueError, base64.binascii.Error) as exc:
        raise VerifyError("malformed", f"not a peer id: {peer_id!r} ({exc})") from None
    if peer_id_of(key) != peer_id:  # lowercase, unused low bits zero: one spelling per key
        raise VerifyError("malformed", f"not a canonical peer id: {peer_id!r}")
    return key


# --- §3 networks -----------------------------------------------------------

def hkdf_sha256(ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-SHA256 without salt (32 zero bytes), ``length`` ≤ 8160 bytes."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def network_id_of(secret: bytes) -> bytes:
    """The 16-byte public network id derived from the 32-byte network secret (§3.1)."""
    return hkdf_sha256(secret, NETWORK_ID_INFO, 16)


def genesis_hash(network_id: bytes, genesis: list[str] | tuple[str, ...], epoch_length: int) -> bytes:
    """SHA-256 of canonical msgpack [network_id, sorted deduplicated genesis, epoch_length] (§3.1)."""
    return hashlib.sha256(canonical([network_id, sorted(set(genesis)), epoch_length])).digest()


@dataclass(frozen=True)
class Token:
    """A parsed join token (§3.2); ``genesis`` is sorted and deduplicated."""

    version: int
    name: str
    secret: bytes
    bootstrap: tuple[str, ...]
    genesis: tuple[str, ...]
    epoch_length: int

    @property
    def network_id(self) -> bytes:
        return network_id_of(self.secret)

    @property
    def genesis_hash(self) -> bytes:
        return genesis_hash(self.network_id, self.genesis, self.epoch_length)


def _no_ext(code: int, data: bytes) -> object:
    raise VerifyError("malformed", f"msgpack extension type {code} is forbidden")


def parse_token(token: str) -> Token:
    """Parse a ``chm1_`` join token (§3.2). Raises VerifyError('bad_token')."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not token.startswith(TOKEN_PREFIX):
        raise VerifyError("bad_token", "a join token starts with chm1_ and is at most 8192 characters")
    body = token[len(TOKEN_PREFIX):].strip()
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        value = msgpack.unpackb(raw, raw=False, max_bin_len=64, max_str_len=4096, max_array_len=64,
                                max_map_len=0, ext_hook=_no_ext, strict_map_key=True)
    except VerifyError:
        raise VerifyError("bad_token", "extension type in the token") from None
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise VerifyError("bad_token", f"token does not decode: {exc}") from None
    if not isinstance(value, list) or not value or type(value[0]) is not int:
        raise VerifyError("bad_token", "a token is an array starting with its version")
    if value[0] == 2 and len(value) == 6:
        _, name, secret, bootstrap, genesis, epoch_length = value
    elif value[0] == 1 and len(value) == 4:
        _, name, secret, bootstrap = value
        genesis, epoch_length = [], 100
    else:
        raise VerifyError("bad_token", f"version {value[0]} with {len(value)} elements")
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
        raise VerifyError("bad_token", "bad name")
    if not isinstance(secret, bytes) or len(secret) != 32:
        raise VerifyError("bad_token", "the secret is 32 bytes")
    if not isinstance(bootstrap, list) or len(bootstrap) > 32 or \
            not all(isinstance(b, str) and len(b) <= 255 for b in bootstrap):
        raise VerifyError("bad_token", "bad bootstrap list")
    if not isinstance(genesis, list) or len(genesis) > MAX_GENESIS:
        raise VerifyError("bad_token", "bad genesis list")
    for g in genesis:
        if not isinstance(g, str) or len(g) >= 128:
            raise VerifyError("bad_token", "a genesis entry is a str of < 128 characters")
        try:
            public_key_of(g)
        except VerifyError as exc:
            raise VerifyError("bad_token", str(exc)) from None
    if type(epoch_length) is not int or not 1 <= epoch_length <= MAX_EPOCH_LENGTH:
        raise VerifyError("bad_token", "epoch_length is an int in 1 .. 2^20")
    return Token(value[0], name, secret, tuple(bootstrap), tuple(sorted(set(genesis))), epoch_length)


# --- §14.2 canonical encoding and vote signatures ----------------------------

def canonical(value: object) -> bytes:
    """Canonical msgpack (§14.2): shortest forms, bin for bytes, str for text, maps in the
    order given (records: field table order)."""
    return msgpack.packb(value, use_bin_type=True)


def statement_bytes(purpose: str, network_id: bytes, epoch: int, statement: list) -> bytes:
    """VOTE_DOMAIN || msgpack([purpose, network_id, epoch, statement]) (§14.2)."""
    return VOTE_DOMAIN + canonical([purpose, network_id, epoch, statement])


def signature_ok(peer_id: str, signature: bytes, purpose: str, network_id: bytes, epoch: int,
                 statement: list) -> bool:
    """Whether ``signature`` is ``peer_id``'s Ed25519 signature over the statement (§14.2)."""
    try:
        key = VerifyKey(public_key_of(peer_id))
        key.verify(statement_bytes(purpose, network_id, epoch, statement), signature)
        return True
    except (VerifyError, BadSignatureError, ValueError, TypeError):
        return False


# --- §7 strict record decoding ------------------------------------------------

def _pairs(pairs: list) -> dict:
    out: dict = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise VerifyError("malformed", f"map key {key!r} is not a str")
        if key in out:
            raise VerifyError("malformed", f"duplicate map key {key!r}")
        out[key] = value
    return out


def unpack_one(data: bytes, *, max_bin: int, max_str: int, max_array: int, max_map: int) -> object:
    """Exactly one msgpack value with no trailing bytes, no extension types and no duplicate
    or non-str map keys. Raises VerifyError('malformed')."""
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, object_pairs_hook=_pairs,
                               ext_hook=_no_ext, strict_map_key=False, max_bin_len=max_bin,
                               max_str_len=max_str, max_array_len=max_array, max_map_len=max_map)
    except VerifyError:
        raise
    except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError) as exc:
        raise VerifyError("malformed", f"does not decode: {exc!r}") from None


def _int(value: object, name: str, low: int = 0, high: int = MAX_U64) -> int:
    if type(value) is not int or not low <= value <= high:
        raise VerifyError("malformed", f"{name} must be an int in {low} .. {high}, not {value!r}")
    return value


def _bin(value: object, name: str, exact: int | None = None, most: int = 65536) -> bytes:
    if not isinstance(value, bytes) or (exact is not None and len(value) != exact) or len(value) > most:
        raise VerifyError("malformed", f"{name} must be bin ({exact or f'<= {most}'} bytes)")
    return value


def _str(value: object, name: str, most: int = 1024) -> str:
    if not isinstance(value, str) or len(value) > most:
        raise VerifyError("malformed", f"{name} must be a str of <= {most} characters")
    return value


def _peer(value: object, name: str) -> str:
    public_key_of(_str(value, name, PEER_ID_CHARS))
    return value  # type: ignore[return-value]


def _array(value: object, name: str, most: int = 1024) -> list:
    if not isinstance(value, list) or len(value) > most:
        raise VerifyError("malformed", f"{name} must be an array of <= {most} items")
    return value


def _record(value: object, name: str, required: tuple[str, ...], optional: dict | None = None) -> dict:
    """A map with exactly the named fields (§7: unknown fields rejected, missing required
    rejected, a missing optional field takes its default)."""
    if not isinstance(value, dict):
        raise VerifyError("malformed", f"{name} must be a map")
    optional = optional or {}
    unknown = set(value) - set(required) - set(optional)
    if unknown:
        raise VerifyError("malformed", f"{name}: unknown fields {sorted(unknown)}")
    missing = [f for f in required if f not in value]
    if missing:
        raise VerifyError("malformed", f"{name}: missing fields {missing}")
    out = dict(optional)
    out.update(value)
    return out


# --- §14.4 records -------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    height: int
    epoch: int
    proposer: str
    parent_hash: bytes
    values: tuple[bytes, ...] = ()

    def as_map(self) -> dict:
        return {"height": self.height, "epoch": self.epoch, "proposer": self.proposer,
                "parent_hash": self.parent_hash, "values": list(self.values)}

    def encode(self) -> bytes:
        return canonical(self.as_map())

    def hash(self) -> bytes:
        """block_hash = SHA-256(canonical msgpack of the 5-field Block map) (§14.4)."""
        return hashlib.sha256(self.encode()).digest()


@dataclass(frozen=True)
class SignedVote:
    voter: str
    signature: bytes


@dataclass(frozen=True)
class Vote:
    vote_type: str
    height: int
    round: int
    block_hash: bytes | None
    signed: SignedVote


@dataclass(frozen=True)
class CertifiedCommit:
    round: int
    block: Block
    votes: tuple[SignedVote, ...]

    def as_map(self) -> dict:
        return {"round": self.round, "block": self.block.as_map(),
                "certificate": {"votes": [{"voter": v.voter, "signature": v.signature}
                                          for v in self.votes]}}

    def encode(self) -> bytes:
        return canonical(self.as_map())


def decode_block(value: object) -> Block:
    m = _record(value, "Block", ("height", "epoch", "proposer", "parent_hash"), {"values": []})
    values = _array(m["values"], "values", MAX_BLOCK_VALUES)
    return Block(_int(m["height"], "height", 1, MAX_HEIGHT), _int(m["epoch"], "epoch", 0, MAX_HEIGHT),
                 _peer(m["proposer"], "proposer"), _bin(m["parent_hash"], "parent_hash", 32),
                 tuple(_bin(v, "value", most=MAX_VALUE_BYTES) for v in values))


def decode_signed_vote(value: object) -> SignedVote:
    m = _record(value, "SignedVote", ("voter", "signature"))
    return SignedVote(_peer(m["voter"], "voter"), _bin(m["signature"], "signature", 64))


def decode_vote(value: object) -> Vote:
    m = _record(value, "Vote", ("vote_type", "height", "round", "signed"), {"block_hash": None})
    vote_type = _str(m["vote_type"], "vote_type", 9)
    if vote_type not in ("prevote", "precommit"):
        raise VerifyError("malformed", f"vote_type {vote_type!r}")
    block_hash = None if m["block_hash"] is None else _bin(m["block_hash"], "block_hash", 32)
    return Vote(vote_type, _int(m["height"], "height", 1, MAX_HEIGHT), _int(m["round"], "round", 0, MAX_ROUND),
                block_hash, decode_signed_vote(m["signed"]))


def decode_certified_commit(data: bytes) -> CertifiedCommit:
    """A CertifiedCommit map (§14.4) from msgpack bytes. Raises VerifyError('malformed')."""
    value = unpack_one(data, max_bin=1 << 20, max_str=1 << 20, max_array=4096, max_map=64)
    m = _record(value, "CertifiedCommit", ("round", "block", "certificate"))
    cert = _record(m["certificate"], "QuorumCertificate", ("votes",))
    votes = _array(cert["votes"], "votes", MAX_VOTES)
    return CertifiedCommit(_int(m["round"], "round", 0, MAX_ROUND), decode_block(m["block"]),
                           tuple(decode_signed_vote(v) for v in votes))


# --- §14.3 weight tables, quorums, certificates ------------------------------

@dataclass(frozen=True)
class WeightTable:
    """The weights of one epoch: peer id -> int ≥ 1, never empty (§14.3)."""

    epoch: int
    weights: dict[str, int]

    def __post_init__(self) -> None:
        if not self.weights or any(type(w) is not int or w < 1 for w in self.weights.values()):
            raise VerifyError("bad_table", "a weight table is non-empty with int weights >= 1")

    @property
    def total(self) -> int:
        return sum(self.weights.values())

    def weight_of(self, voters) -> int:
        """The weight of the distinct voters that are in the table."""
        return sum(self.weights.get(v, 0) for v in set(voters))


def is_quorum(weight: int, total: int) -> bool:
    """More than 2/3, in exact integers: 3·W > 2·total (§14.3)."""
    return 3 * weight > 2 * total


def genesis_table(genesis) -> WeightTable:
    """Epoch 0: every genesis peer id gets weight 1000 (§14.1)."""
    return WeightTable(0, {p: WEIGHT_SCALE for p in sorted(set(genesis))})


def verify_certificate(votes, table: WeightTable, network_id: bytes, purpose: str,
                       statement: list) -> int:
    """Check a quorum certificate against ``table`` (§14.3); return the signed weight.

    Raises VerifyError with reason ``too_many_votes``, ``unknown_voter``, ``duplicate_voter``,
    ``bad_signature`` or ``no_quorum``."""
    if len(votes) > MAX_VOTES:
        raise VerifyError("too_many_votes", f"{len(votes)} votes > {MAX_VOTES}")
    seen: set[str] = set()
    for vote in votes:
        if vote.voter not in table.weights:
            raise VerifyError("unknown_voter", f"{vote.voter} is not in the table of epoch {table.epoch}")
        if vote.voter in seen:
            raise VerifyError("duplicate_voter", f"{vote.voter} appears twice")
        seen.add(vote.voter)
        if not signature_ok(vote.voter, vote.signature, purpose, network_id, table.epoch, statement):
            raise VerifyError("bad_signature", f"the {purpose} of {vote.voter} does not verify")
    weight = table.weight_of(seen)
    if not is_quorum(weight, table.total):
        raise VerifyError("no_quorum", f"weight {weight} of {table.total} is not more than 2/3")
    return weight


def verify_commit(commit: CertifiedCommit, table: WeightTable, network_id: bytes) -> int:
    """A certified commit against the table of its height's epoch (§14.4); the signed weight."""
    if commit.block.epoch != table.epoch:
        raise VerifyError("wrong_epoch", f"block epoch {commit.block.epoch} != table epoch {table.epoch}")
    return verify_certificate(commit.votes, table, network_id, "precommit",
                              [commit.block.height, commit.round, commit.block.hash()])


# --- §14.6 proposer selection -------------------------------------------------

def proposer_sequence(table: WeightTable) -> list[str]:
    """The period-``total`` proposer sequence from all-zero priorities (§14.6)."""
    ids = sorted(table.weights)
    total = table.total
    prio = {v: 0 for v in ids}
    seq = []
    for _ in range(total):
        for v in ids:
            prio[v] += table.weights[v]
        best = max(prio[v] for v in ids)
        pick = next(v for v in ids if prio[v] == best)
        prio[pick] -= total
        seq.append(pick)
    return seq


def proposer(table: WeightTable, first_height: int, height: int, round_: int) -> str:
    seq = proposer_sequence(table)
    return seq[(height - first_height + round_) % len(seq)]


# --- §15 log values ------------------------------------------------------------

@dataclass(frozen=True)
class Opinion:
    epoch: int
    author: str
    entries: tuple[tuple[str, int], ...]
    signature: bytes


def _decode_opinion(value: object) -> Opinion:
    m = _record(value, "Opinion", ("epoch", "author", "entries", "signature"))
    entries = []
    for item in _array(m["entries"], "entries", MAX_OPINION_ENTRIES):
        e = _record(item, "OpinionEntry", ("peer_id", "score_ppm"))
        entries.append((_peer(e["peer_id"], "peer_id"), _int(e["score_ppm"], "score_ppm", 0, PPM)))
    if any(a[0] >= b[0] for a, b in zip(entries, entries[1:])):
        raise VerifyError("malformed", "opinion entries must be strictly ascending by peer_id")
    return Opinion(_int(m["epoch"], "epoch"), _peer(m["author"], "author"), tuple(entries),
                   _bin(m["signature"], "signature", 64))


def _decode_equivocation(value: object) -> tuple[Vote, Vote]:
    m = _record(value, "Equivocation", ("first", "second"))
    return decode_vote(m["first"]), decode_vote(m["second"])


def decode_value(data: bytes) -> tuple:
    """A log value (§15.1): ``("decision", author, nonce, data, sig)``, ``("join", peer,
    join_epoch, sig)`` (legacy: join_epoch 0 and ``legacy`` flag via a 5th element False/True),
    ``("opinion", Opinion)`` or ``("evidence", (Vote, Vote))``. Raises VerifyError('malformed')."""
    if len(data) > MAX_DECODED_VALUE_BYTES:
        raise VerifyError("malformed", "a value is at most 8192 bytes")
    value = unpack_one(data, max_bin=8192, max_str=8192, max_array=4096, max_map=64)
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise VerifyError("malformed", "a value is an array whose first element is a str tag")
    decoded = _decode_tagged(value)
    # canonical (§14.2): shortest forms, and nested records with every field, defaults
    # included, in the order of their field tables (a reordered map decodes under §7 but
    # would hash differently from the canonical value)
    if canonical(encode_value(decoded)) != data:
        raise VerifyError("malformed", "a value must be canonically encoded")
    return decoded


def _vote_map(vote: Vote) -> dict:
    return {"vote_type": vote.vote_type, "height": vote.height, "round": vote.round,
            "block_hash": vote.block_hash,
            "signed": {"voter": vote.signed.voter, "signature": vote.signed.signature}}


def encode_value(decoded: tuple) -> list:
    """The canonical msgpack structure of a decoded value (inverse of :func:`decode_value`)."""
    tag = decoded[0]
    if tag == "decision":
        return list(decoded)
    if tag == "join":
        _, peer, join_epoch, sig, legacy = decoded
        return ["join", peer, sig] if legacy else ["join", peer, join_epoch, sig]
    if tag == "opinion":
        op: Opinion = decoded[1]
        return ["opinion", {"epoch": op.epoch, "author": op.author,
                            "entries": [{"peer_id": p, "score_ppm": s} for p, s in op.entries],
                            "signature": op.signature}]
    first, second = decoded[1]
    return ["evidence", {"first": _vote_map(first), "second": _vote_map(second)}]


def _decode_tagged(value: list) -> tuple:
    tag, rest = value[0], value[1:]
    if tag == "decision" and len(rest) == 4:
        author, nonce, payload, sig = rest
        return ("decision", _peer(author, "author"), _int(nonce, "nonce"),
                _bin(payload, "data", most=MAX_DECISION_BYTES), _bin(sig, "signature", 64))
    if tag == "join" and len(rest) == 3:
        peer, join_epoch, sig = rest
        return ("join", _peer(peer, "peer_id"), _int(join_epoch, "epoch", 0, (1 << 32) - 1),
                _bin(sig, "signature", 64), False)
    if tag == "join" and len(rest) == 2:
        peer, sig = rest
        return ("join", _peer(peer, "peer_id"), 0, _bin(sig, "signature", 64), True)
    if tag == "opinion" and len(rest) == 1:
        return ("opinion", _decode_opinion(rest[0]))
    if tag == "evidence" and len(rest) == 1:
        return ("evidence", _decode_equivocation(rest[0]))
    raise VerifyError("malformed", f"unknown tag {tag!r} or wrong arity {len(value)}")


def decision_window_epochs(epoch_length: int) -> int:
    """W = max(1, 1000 div L) (§15.2)."""
    return max(1, 1000 // epoch_length)


def value_valid(decoded: tuple, network_id: bytes, epoch: int, epoch_length: int) -> bool:
    """Validity without state (§15.2) at a height of ``epoch``; "not yet" counts as not valid."""
    tag = decoded[0]
    if tag == "decision":
        _, author, nonce, payload, sig = decoded
        if not signature_ok(author, sig, "decision", network_id, 0, [nonce, payload]):
            return False
        return 0 <= epoch - (nonce >> 32) <= decision_window_epochs(epoch_length)
    if tag == "join":
        _, peer, join_epoch, sig, legacy = decoded
        if not signature_ok(peer, sig, "validator_join", network_id, join_epoch, [peer]):
            return False
        return legacy or 0 <= epoch - join_epoch <= 1
    if tag == "opinion":
        op: Opinion = decoded[1]
        return signature_ok(op.author, op.signature, "reputation_opinion", network_id, op.epoch,
                             [[p, s] for p, s in op.entries])
    if tag == "evidence":
        first, second = decoded[1]
        return first.signed.voter == second.signed.voter
    return False


def equivocation_valid(first: Vote, second: Vote, table: WeightTable, network_id: bytes) -> bool:
    """§14.11 against ``table``."""
    if first.signed.voter != second.signed.voter or first.signed.voter not in table.weights:
        return False
    if (first.vote_type, first.height, first.round) != (second.vote_type, second.height, second.round):
        return False
    if first.block_hash == second.block_hash:
        return False
    return all(signature_ok(v.signed.voter, v.signed.signature, v.vote_type, network_id, table.epoch,
                            [v.height, v.round, v.block_hash]) for v in (first, second))


def next_weight_table(prev: WeightTable, opinions: dict[str, dict[str, int]], members) -> WeightTable:
    """§15.4 with the default WeightPolicy. ``opinions``: author -> {peer_id: score_ppm}, the
    counted opinions (one per author, authors in ``prev``)."""
    total = prev.total
    step6: dict[str, int] = {}
    for p in sorted(set(members)):
        pairs = [(scores[p], prev.weights[author]) for author, scores in opinions.items()
                 if author in prev.weights and author != p and p in scores]
        evidence = sum(w for _, w in pairs)
        eligible = total - prev.weights[p] if p in prev.weights else 0
        m = None
        if pairs and 3 * evidence > 2 * eligible:
            pairs.sort()
            pair_total = sum(w for _, w in pairs)
            running = 0
            for score, w in pairs:
                running += w
                if 2 * running >= pair_total:
                    m = score
                    break
        target = None if m is None else max(1, m * WEIGHT_SCALE // PPM)
        if p in prev.weights:
            w = prev.weights[p]
            step6[p] = w if target is None else min(target, w + MAX_GROWTH_PER_EPOCH)
        else:
            step6[p] = NEWCOMER_WEIGHT if target is None else min(target, NEWCOMER_WEIGHT)
    old = {p: w for p, w in step6.items() if p in prev.weights}
    newcomers = sorted(p for p in step6 if p not in prev.weights)
    kept = sum(old.values())
    budget = min(total, kept) * 1 // 4
    n = min(len(newcomers), budget, MAX_VOTES - len(prev.weights))
    entering = {p: step6[p] for p in newcomers[:max(0, n)]}
    if entering and sum(entering.values()) > budget:
        entering = {p: min(w, budget // n) for p, w in entering.items()}
    return WeightTable(prev.epoch + 1, {**old, **entering})


@dataclass
class Decision:
    height: int
    index: int
    author: str
    nonce: int
    data: bytes


@dataclass
class Ledger:
    """The deterministic state machine of §15.3, fed committed blocks in height order."""

    network_id: bytes
    epoch_length: int
    table: WeightTable
    previous: WeightTable | None = None
    previous_offenders: set[str] = field(default_factory=set)
    joins: list[str] = field(default_factory=list)
    opinions: dict[str, dict[str, int]] = field(default_factory=dict)
    offenders: set[str] = field(default_factory=set)
    decisions: list[Decision] = field(default_factory=list)
    tables: dict[int, WeightTable] = field(default_factory=dict)
    ignored: int = 0

    def __post_init__(self) -> None:
        self.tables[self.table.epoch] = self.table

    def epoch_of(self, height: int) -> int:
        return (height - 1) // self.epoch_length

    def max_joins(self) -> int:
        budget = self.table.total * 1 // 4
        return min(MAX_VOTES - len(self.table.weights), budget, max(1, budget // NEWCOMER_WEIGHT))

    def apply(self, block: Block) -> None:
        """Apply the values of a committed block in block order, then the epoch end."""
        epoch = self.epoch_of(block.height)
        for index, raw in enumerate(block.values):
            try:
                decoded = decode_value(raw)
            except VerifyError:
                self.ignored += 1
                continue
            if not value_valid(decoded, self.network_id, epoch, self.epoch_length) or \
                    not self._apply_value(decoded, block.height, index):
                self.ignored += 1
        if block.height % self.epoch_length == 0:
            self._end_epoch()

    def _apply_value(self, decoded: tuple, height: int, index: int) -> bool:
        tag = decoded[0]
        if tag == "decision":
            _, author, nonce, payload, _sig = decoded
            self.decisions.append(Decision(height, index, author, nonce, payload))
            return True
        if tag == "join":
            peer = decoded[1]
            if peer in self.table.weights or peer in self.joins or len(self.joins) >= self.max_joins():
                return False
            self.joins.append(peer)
            return True
        if tag == "opinion":
            op: Opinion = decoded[1]
            if op.epoch != self.table.epoch or op.author not in self.table.weights:
                return False
            have = self.opinions.get(op.author, {})
            if any(p in have for p, _ in op.entries) or len(have) + len(op.entries) > MAX_OPINION_ENTRIES:
                return False
            self.opinions[op.author] = {**have, **dict(op.entries)}
            return True
        if tag == "evidence":
            first, second = decoded[1]
            offender = first.signed.voter
            if equivocation_valid(first, second, self.table, self.network_id):
                if offender in self.offenders:
                    return False
                self.offenders.add(offender)
                return True
            if self.previous is not None and equivocation_valid(first, second, self.previous, self.network_id):
                if offender in self.offenders or offender in self.previous_offenders:
                    return False
                self.offenders.add(offender)
                return True
            return False
        return False

    def _end_epoch(self) -> None:
        members = set(self.table.weights) | set(self.joins)
        counted = {a: dict(sorted(s.items())) for a, s in self.opinions.items() if a in self.table.weights}
        nxt = next_weight_table(self.table, counted, members)
        weights = {p: (1 if p in self.offenders else w) for p, w in nxt.weights.items()}
        nxt = WeightTable(nxt.epoch, weights)
        self.previous, self.previous_offenders = self.table, set(self.offenders)
        self.table = nxt
        self.tables[nxt.epoch] = nxt
        self.joins, self.opinions, self.offenders = [], {}, set()


class LogVerifier:
    """What a peer that joins later does with certified commits (§14.10 receiving, §15.3).

    Start from the join token alone; feed commits from height 1 on, in order. Each is
    verified against the table of its height's epoch, which this object derives itself
    from the commits it has verified, and its ``parent_hash`` must chain to the previous
    block (``genesis_hash`` at height 1)."""

    def __init__(self, token: Token) -> None:
        if not token.genesis:
            raise VerifyError("bad_token", "the token names no genesis validators: there is no log")
        self.token = token
        self.network_id = token.network_id
        self.ledger = Ledger(self.network_id, token.epoch_length, genesis_table(token.genesis))
        self.height = 0
        self.last_hash = token.genesis_hash
        self.block_hashes: dict[int, bytes] = {}

    def table_for(self, height: int) -> WeightTable:
        epoch = self.ledger.epoch_of(height)
        if epoch != self.ledger.table.epoch:
            raise VerifyError("no_table", f"the table of epoch {epoch} is not derived yet")
        return self.ledger.table

    def check(self, commit: CertifiedCommit) -> int:
        """Verify the next commit without applying it; return its signed weight."""
        block = commit.block
        if block.height != self.height + 1:
            raise VerifyError("wrong_height", f"expected height {self.height + 1}, got {block.height}")
        if block.parent_hash != self.last_hash:
            raise VerifyError("bad_parent", f"height {block.height}: parent_hash does not chain")
        return verify_commit(commit, self.table_for(block.height), self.network_id)

    def feed(self, commit: CertifiedCommit) -> int:
        """Verify and apply the next commit; return its signed weight. Raises VerifyError."""
        weight = self.check(commit)
        self.ledger.apply(commit.block)
        self.height = commit.block.height
        self.last_hash = commit.block.hash()
        self.block_hashes[self.height] = self.last_hash
        return weight
