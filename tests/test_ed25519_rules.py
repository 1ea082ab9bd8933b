"""PROTOCOL §6.2's Ed25519 rule is complete: a verifier written from its text alone accepts
exactly what the reference (libsodium's ``crypto_sign_verify_detached`` through PyNaCl,
``chimera.protocol.identity.verify_signature``) accepts, on a few hundred edge-case vectors
built here (no downloads) in the classes of the C2SP/CCTV ed25519 vectors: small-order A and
R, non-canonical A and R encodings, A and R with a low-order (torsion) component, a
low-order residue (an equation that only holds cofactored), S >= L, k hashed over a
re-encoded A, plus valid signatures and flipped bits. A byzantine sender could otherwise
craft a signature only some peers accept and split them (a vote counted by some).

The arithmetic is RFC 8032 §5.1 (modeled on its §6 Python), written for reading, not speed.

OpenSSL (``cryptography``'s ``Ed25519PublicKey.verify``), informative: on these vectors it
accepts, where libsodium and §6.2 refuse, signatures under a small-order A (low_order_A; and
low_order_A_R_zero: A and R small-order, S = 0, which "signs" any message for the identity
key), with a small-order R under a mixed-order A or R the identity (low_order_R), and under
a non-canonical A that decodes to a small-order point (6 of the non_canonical_A vectors:
y = p or p + 1, and the sign bit set on x = 0). It agrees on S >= L, on the low-order
residue (it is cofactorless too), on mixed-order keys, on non-canonical R and on
reencoded_k (it hashes A as sent). ``test_openssl_differs_only_where_recorded`` keeps this
list honest. The same vectors also agree with the system's libsodium 1.0.18 (checked by
hand through ctypes; not part of the test).

Not told apart by any vector: comparing R as bytes (§6.2) or decoding R and comparing
points. They differ only for a non-canonical R of large order (y = p + c, c <= 18), and no
one can make a signature whose R is such a point, as no one knows its discrete log.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import pytest

from chimera.protocol.identity import SigningIdentity, is_usable_public_key, verify_signature

# ---------------------------------------------------------------- RFC 8032 §5.1 arithmetic

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # order of the prime-order subgroup
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
IDENTITY = (0, 1, 1, 0)  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, xy = T/Z


def point_add(p1: tuple, p2: tuple) -> tuple:
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * t1 * t2 * D % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def point_neg(pt: tuple) -> tuple:
    x, y, z, t = pt
    return (-x % P, y, z, -t % P)


def point_mul(scalar: int, pt: tuple) -> tuple:
    acc = IDENTITY
    while scalar > 0:
        if scalar & 1:
            acc = point_add(acc, pt)
        pt = point_add(pt, pt)
        scalar >>= 1
    return acc


def point_equal(p1: tuple, p2: tuple) -> bool:
    return (p1[0] * p2[2] - p2[0] * p1[2]) % P == 0 and (p1[1] * p2[2] - p2[1] * p1[2]) % P == 0


def recover_x(y: int, sign: int) -> int | None:
    """RFC 8032 §5.1.3 steps 2-4 for y < p: the x with that parity, None when there is none
    (x^2 not a square, or x = 0 with the sign bit set)."""
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P:
        return None
    return P - x if (x & 1) != sign else x


def decode_point(raw: bytes) -> tuple | None:
    """RFC 8032 §5.1.3, strict: None unless ``raw`` is the canonical encoding of a curve
    point (y < p; the sign bit clear when x = 0)."""
    y = int.from_bytes(raw, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= P:
        return None
    x = recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % P)


def encode_point(pt: tuple) -> bytes:
    z_inv = pow(pt[2], P - 2, P)
    x, y = pt[0] * z_inv % P, pt[1] * z_inv % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


BASE_Y = 4 * pow(5, P - 2, P) % P
BASE = (recover_x(BASE_Y, 0), BASE_Y, 1, recover_x(BASE_Y, 0) * BASE_Y % P)


def has_small_order(pt: tuple) -> bool:
    """One of the 8 points of order 1, 2, 4 or 8 ([8]P is the identity)."""
    return point_equal(point_mul(8, pt), IDENTITY)


def in_prime_order_subgroup(pt: tuple) -> bool:
    return point_equal(point_mul(L, pt), IDENTITY)


def challenge(r_bytes: bytes, a_bytes: bytes, message: bytes) -> int:
    """k = SHA-512(R || A || M) as a little-endian integer, mod L."""
    return int.from_bytes(hashlib.sha512(r_bytes + a_bytes + message).digest(), "little") % L


# ---------------------------------------------------------------- the §6.2 verifier


def spec_verify(public_key: bytes, signature: bytes, message: bytes, *, mutation: str = "") -> bool:
    """PROTOCOL §6.2, step by step. ``mutation`` names one plausible misreading of the
    rule (see ``MUTATIONS``), to check that the vectors tell it apart from the rule."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    r_bytes = signature[:32]
    s = int.from_bytes(signature[32:], "little")
    if mutation == "s_reduced_mod_l":
        s %= L
    elif s >= L:  # 1. S < L (the 32 bytes read as one little-endian integer)
        return False
    a_point = decode_point(public_key)  # 2. A: canonical encoding of a curve point ...
    if a_point is None:
        return False
    if has_small_order(a_point) and mutation != "small_order_accepted":
        return False  # ... that is not one of the 8 small-order points
    if mutation == "prime_order_keys_only" and not in_prime_order_subgroup(a_point):
        return False
    k = challenge(r_bytes, public_key, message)  # 3. k over the bytes as sent
    q = point_add(point_mul(s, BASE), point_neg(point_mul(k, a_point)))  # Q = [S]B - [k]A
    if mutation == "cofactored":  # [8]R = [8]Q, R decoded
        r_point = decode_point(r_bytes)
        return (r_point is not None and not has_small_order(r_point)
                and has_small_order(point_add(r_point, point_neg(q))))
    if has_small_order(q) and mutation != "small_order_accepted":
        return False  # 4. R is not a small-order point ...
    return encode_point(q) == r_bytes  # ... and is, byte for byte, the encoding of Q


MUTATIONS = ("s_reduced_mod_l", "small_order_accepted", "prime_order_keys_only", "cofactored")

# ---------------------------------------------------------------- vectors


def _scalar(label: str) -> int:
    return int.from_bytes(hashlib.sha512(label.encode()).digest(), "little") % L


def _torsion_generator() -> tuple:
    """A point of order 8: [L]P for a point P of order 8L (here y = small integer)."""
    for c in range(2, 64):
        pt = decode_point(c.to_bytes(32, "little"))
        if pt is not None:
            t = point_mul(L, pt)
            if not point_equal(point_mul(4, t), IDENTITY):
                return t
    raise AssertionError("no point of order 8L with a small y")


T8 = _torsion_generator()
TORSION = [point_mul(i, T8) for i in range(8)]  # TORSION[i] = [i]T8; [k]TORSION[i] = TORSION[k*i % 8]


@dataclass(frozen=True)
class Vector:
    kind: str
    public_key: bytes
    signature: bytes
    message: bytes
    valid: bool  # what §6.2 says


def _sign(a: int, a_tors: int, r: int, r_tors: int, want, label: str, pub: bytes | None = None,
          hash_pub: bytes | None = None) -> tuple[bytes, bytes, bytes]:
    """A signature S = r + k*a with A = [a]B + TORSION[a_tors] (or the bytes ``pub``),
    R = [r]B + TORSION[r_tors], over the first message ``label/n`` whose k satisfies
    ``want(k)``. With ``hash_pub``, k hashes those bytes in place of the public key's, and
    the k over the public key as sent must not satisfy ``want``."""
    if pub is None:
        pub = encode_point(point_add(point_mul(a, BASE), TORSION[a_tors]))
    r_bytes = encode_point(point_add(point_mul(r, BASE), TORSION[r_tors]))
    for n in range(400):
        message = f"{label}/{n}".encode()
        k = challenge(r_bytes, hash_pub or pub, message)
        if want(k) and not (hash_pub and want(challenge(r_bytes, pub, message))):
            return pub, r_bytes + ((r + k * a) % L).to_bytes(32, "little"), message
    raise AssertionError(f"no message for {label}")


def _exact(a_tors: int, r_tors: int):
    """k for which the cofactorless equation holds: [k]T_A + T_R is the identity."""
    return lambda k: (k * a_tors + r_tors) % 8 == 0


def _residue(a_tors: int, r_tors: int):
    """k for which only the cofactored equation holds (a non-zero low-order residue)."""
    return lambda k: (k * a_tors + r_tors) % 8 != 0


def _non_canonical_encodings() -> list[tuple[bytes, tuple]]:
    """Every non-canonical 32-byte string that decodes (y reduced mod p, or x = 0 with the
    sign bit set) with the point it decodes to: y = p + c for c in 0..18, both signs."""
    out = []
    for c in range(19):
        for sign in (0, 1):
            x = recover_x(c, 0)
            if x is None:
                continue
            raw = ((P + c) | (sign << 255)).to_bytes(32, "little")
            out.append((raw, (P - x if sign and x else x, c, 1, x * c % P)))
    for y in (1, P - 1):  # x = 0: the identity and the point of order 2, "negative zero"
        out.append(((y | (1 << 255)).to_bytes(32, "little"), (0, y, 1, 0)))
    return out


def _flip(raw: bytes, bit: int) -> bytes:
    out = bytearray(raw)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def build_vectors() -> list[Vector]:
    vs: list[Vector] = []
    add = vs.append
    # valid signatures by real keys (the reference's signer: clamped RFC 8032 keys)
    for i in range(24):
        ident = SigningIdentity(hashlib.sha256(b"key%d" % i).digest())
        message = hashlib.sha256(b"msg%d" % i).digest() * (i % 10)  # 0 to 288 bytes
        sig = ident.sign(message)
        add(Vector("valid", ident.public_key, sig, message, True))
        if i < 8:  # flipped bits: in R, in S, in A, in the message
            for bit in (0, 100, 254, 255):
                add(Vector("flipped_R", ident.public_key, _flip(sig, bit), message, False))
            for bit in (256, 400, 507, 509, 511):
                add(Vector("flipped_S", ident.public_key, _flip(sig, bit), message, False))
            for bit in (0, 77, 254, 255):
                add(Vector("flipped_A", _flip(ident.public_key, bit), sig, message, False))
            add(Vector("flipped_M", ident.public_key, sig, message + b"\0", False))
            # S >= L: S + nL is the same scalar; and S with its top bits set
            s = int.from_bytes(sig[32:], "little")
            for n in range(1, 16):
                if s + n * L < 2**256:
                    add(Vector("S_ge_L", ident.public_key, sig[:32] + (s + n * L).to_bytes(32, "little"),
                               message, False))
            for top in (0x20, 0x40, 0x80, 0xE0, 0xF0):
                add(Vector("S_top_bits", ident.public_key, sig[:63] + bytes([sig[63] | top]), message, False))
    # valid signatures by scalars of our own (any a, not only clamped ones)
    for i in range(8):
        pub, sig, m = _sign(_scalar(f"a{i}"), 0, _scalar(f"r{i}"), 0, _exact(0, 0), f"own{i}")
        add(Vector("valid", pub, sig, m, True))
    # small-order A (all 8), the equation holding; and A, R small-order with S = 0
    for t in range(8):
        pub = encode_point(TORSION[t])
        _, sig, m = _sign(0, t, _scalar(f"lr{t}"), 0, _exact(t, 0), f"loA{t}", pub=pub)
        add(Vector("low_order_A", pub, sig, m, False))
        for r_t in sorted({0, t}):  # R the identity, or R = A (k = -1 mod the order of A)
            _, sig, m = _sign(0, t, 0, r_t, _exact(t, r_t), f"loAR{t}.{r_t}", pub=pub)
            add(Vector("low_order_A_R_zero", pub, sig, m, False))
    # A with a low-order component (mixed order): valid when the equation holds exactly,
    # including with R mixed too; invalid when only the cofactored one holds
    for t in range(1, 8):
        a = _scalar(f"ma{t}")
        for r_t in (0, 1, 2, 4, 6):
            pub, sig, m = _sign(a, t, _scalar(f"mr{t}.{r_t}"), r_t, _residue(t, r_t), f"resA{t}.{r_t}")
            add(Vector("low_order_residue", pub, sig, m, False))
            if r_t % math.gcd(t, 8) == 0:  # else no k makes [k]T_A cancel T_R
                pub, sig, m = _sign(a, t, _scalar(f"mr{t}.{r_t}"), r_t, _exact(t, r_t), f"mixA{t}.{r_t}")
                add(Vector("low_order_component_A", pub, sig, m, True))
    # R with a low-order component, A of prime order: only the cofactored equation holds
    for t in range(1, 8):
        pub, sig, m = _sign(_scalar("pa"), 0, _scalar(f"pr{t}"), t, _exact(0, 0), f"mixR{t}")
        add(Vector("low_order_component_R", pub, sig, m, False))
    # small-order R with the cofactorless equation holding: R = identity under a prime-order
    # A (S = k*a), and every small-order R under a mixed A
    pub, sig, m = _sign(_scalar("pa"), 0, 0, 0, _exact(0, 0), "loR0")
    add(Vector("low_order_R", pub, sig, m, False))
    for a_t in (1, 3, 2):
        for r_t in range(1, 8):
            if r_t % math.gcd(a_t, 8) == 0:  # -T_R is a multiple of T_A
                pub, sig, m = _sign(_scalar(f"la{a_t}"), a_t, 0, r_t, _exact(a_t, r_t), f"loR{a_t}.{r_t}")
                add(Vector("low_order_R", pub, sig, m, False))
    # non-canonical encodings: as A (equation holding for the point it decodes to, with k
    # over the bytes as sent, and with k over the canonical re-encoding), and as R
    mixed_a = _scalar("nca")
    for raw, pt in _non_canonical_encodings():
        canonical = encode_point(pt)
        small = has_small_order(pt)
        if small:
            t = next(i for i in range(8) if point_equal(TORSION[i], pt))
            _, sig, m = _sign(0, t, _scalar("ncr"), 0, _exact(t, 0), "ncA", pub=raw)
            add(Vector("non_canonical_A", raw, sig, m, False))
            if t:  # (under the identity any k satisfies the equation)
                _, sig, m = _sign(0, t, _scalar("ncr"), 0, _exact(t, 0), "rek", pub=raw, hash_pub=canonical)
                add(Vector("reencoded_k", raw, sig, m, False))
            # as R: the point [S]B - [k]A is this small-order point, A mixed
            for a_t in (1, 3):
                pub = encode_point(point_add(point_mul(mixed_a, BASE), TORSION[a_t]))
                for n in range(400):
                    m = f"ncR{n}".encode()
                    k = challenge(raw, pub, m)
                    if _exact(a_t, t)(k):
                        break
                else:
                    raise AssertionError("no message for ncR")
                add(Vector("non_canonical_R", pub, raw + (k * mixed_a % L).to_bytes(32, "little"), m, False))
        else:  # a point of large order whose discrete log nobody knows: no valid signature exists
            for label in ("ncA", "ncR"):
                ident = SigningIdentity(hashlib.sha256(raw + label.encode()).digest())
                sig = ident.sign(b"m")
                if label == "ncA":
                    add(Vector("non_canonical_A", raw, sig, b"m", False))
                else:
                    add(Vector("non_canonical_R", ident.public_key, raw + sig[32:], b"m", False))
    # bytes that decode to no point at all, as A and as R; and wrong lengths
    ident = SigningIdentity(hashlib.sha256(b"offcurve").digest())
    sig = ident.sign(b"m")
    off = [c.to_bytes(32, "little") for c in range(2, 40) if decode_point(c.to_bytes(32, "little")) is None]
    for raw in off[:6]:
        add(Vector("A_not_a_point", raw, sig, b"m", False))
        add(Vector("R_not_a_point", ident.public_key, raw + sig[32:], b"m", False))
    add(Vector("length", ident.public_key[:31], sig, b"m", False))
    add(Vector("length", ident.public_key, sig[:63], b"m", False))
    add(Vector("length", ident.public_key, sig + b"\0", b"m", False))
    return vs


VECTORS = build_vectors()
KINDS = sorted({v.kind for v in VECTORS})


def _openssl_verify(v: Vector) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(v.public_key).verify(v.signature, v.message)
    except (InvalidSignature, ValueError):
        return False
    return True


# ---------------------------------------------------------------- tests


def test_arithmetic_matches_libsodium() -> None:
    """The hand-written arithmetic is right: [a]B, point sums and the 8 small-order points
    agree with libsodium's own."""
    from nacl.bindings import crypto_core_ed25519_add, crypto_scalarmult_ed25519_base_noclamp

    for i in range(4):
        a, b = _scalar(f"x{i}"), _scalar(f"y{i}")
        pa, pb = encode_point(point_mul(a, BASE)), encode_point(point_mul(b, BASE))
        assert pa == crypto_scalarmult_ed25519_base_noclamp(a.to_bytes(32, "little"))
        assert crypto_core_ed25519_add(pa, pb) == encode_point(point_mul(a + b, BASE))
    small = {encode_point(t) for t in TORSION}
    assert len(small) == 8 and bytes([1]) + bytes(31) in small and bytes(32) in small
    assert bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05") in small


def test_vectors_cover_every_class() -> None:
    counts = {k: sum(v.kind == k for v in VECTORS) for k in KINDS}
    assert set(counts) >= {
        "valid", "flipped_R", "flipped_S", "flipped_A", "flipped_M", "S_ge_L", "S_top_bits",
        "low_order_A", "low_order_A_R_zero", "low_order_R", "non_canonical_A", "non_canonical_R",
        "reencoded_k", "low_order_component_A", "low_order_component_R", "low_order_residue",
        "A_not_a_point", "R_not_a_point", "length"}, counts
    assert len(VECTORS) >= 250 and all(n >= 1 for n in counts.values()), counts
    # the constructions did what they claim: each low-order residue satisfies the
    # cofactored equation only, each mixed A is of order 2L, 4L or 8L
    for v in VECTORS:
        if v.kind in ("low_order_residue", "low_order_component_R"):
            assert spec_verify(v.public_key, v.signature, v.message, mutation="cofactored")
        if v.kind == "low_order_component_A":
            a_point = decode_point(v.public_key)
            assert not has_small_order(a_point) and not in_prime_order_subgroup(a_point)


@pytest.mark.parametrize("kind", KINDS)
def test_libsodium_and_the_spec_agree(kind: str) -> None:
    """For every vector the reference (libsodium) and the §6.2 verifier give the same
    answer, and it is the answer §6.2 implies for its class."""
    for v in (v for v in VECTORS if v.kind == kind):
        spec = spec_verify(v.public_key, v.signature, v.message)
        ref = verify_signature(v.public_key, v.signature, v.message)
        assert (ref, spec) == (v.valid, v.valid), (v.kind, v.public_key.hex(), v.signature.hex(), v.message)


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_misreading_is_caught(mutation: str) -> None:
    """The vectors tell the rule apart from each plausible misreading of it: a verifier
    that reduces S mod L, accepts small-order points, refuses keys with a low-order
    component, or checks the cofactored equation disagrees with libsodium somewhere."""
    assert any(spec_verify(v.public_key, v.signature, v.message, mutation=mutation) != v.valid
               for v in VECTORS)


def test_is_usable_public_key_agrees_with_the_key_rule() -> None:
    """``is_usable_public_key`` (where keys are registered) accepts a key only if §6.2's key
    rule does, and exactly the keys of the prime-order subgroup: stricter than verification,
    which accepts a key with a low-order component (low_order_component_A vectors verify)."""
    keys = {v.public_key for v in VECTORS if len(v.public_key) == 32}
    keys |= {raw for raw, _ in _non_canonical_encodings()} | {encode_point(t) for t in TORSION}
    for key in keys:
        a_point = decode_point(key)
        key_rule = a_point is not None and not has_small_order(a_point)
        prime = key_rule and in_prime_order_subgroup(a_point)
        assert is_usable_public_key(key) == prime, key.hex()
    assert any(v.valid and not is_usable_public_key(v.public_key) for v in VECTORS)


def test_openssl_differs_only_where_recorded() -> None:
    """Informative (module docstring): OpenSSL accepts some vectors libsodium refuses, in
    these classes only, never the other way round, and it does accept the small-order key
    forgery §6.2 mentions."""
    pytest.importorskip("cryptography")
    differ = {}
    for v in VECTORS:
        ossl = _openssl_verify(v)
        if ossl != v.valid:
            assert ossl and not v.valid, (v.kind, "OpenSSL refuses what libsodium accepts")
            differ[v.kind] = differ.get(v.kind, 0) + 1
    assert set(differ) <= {"low_order_A", "low_order_A_R_zero", "low_order_R", "non_canonical_A"}, differ
    assert "low_order_A_R_zero" in differ, differ
