"""Message codec benchmark: the strict decode and encode of realistic bodies, on one core.

For each body (the map inside an envelope; the envelope framing, signature and
replay checks are not in these figures):

* ``member_list x4``: an anti-entropy sync of 1000 member rows (4 ``member_list``
  messages of up to 256 rows, each row with its contact: peer id, 32-byte transport
  key, one tcp address), per member row;
* ``ping +8``: a ping piggybacking 8 member updates, per message;
* ``bft_vote``: a prevote (vote, signed vote), per message;
* ``bft_proposal 256``: a proposal whose block holds 256 values of 64 bytes;
* ``certified_commit 16``: a commit of 16 values with a quorum certificate of 16 votes.

Figures, each the best of ``--repeat`` timed loops, the figures of a body taking
turns (a shared machine only ever adds time), in microseconds per unit:

* ``unpackb``: plain ``msgpack.unpackb(raw=False)`` of the same bytes, the
  ceiling: decoding cannot cost less than reading the bytes once;
* ``unpack strict``: what the envelope opener's unpack costs (duplicate-key hook);
* ``decode``: :func:`~chimera.protocol.messages.decode_fields` of the unpacked map
  (the compiled decoder: every check of the schema, the records built);
* ``reference``: the same rules walked field by field (``_decode_checked``, which
  was ``decode_fields`` before the compiled decoder and still produces every error);
* ``packb`` / ``encode``: plain ``msgpack.packb`` of the wire map, the encode
  ceiling, and :func:`~chimera.protocol.messages.encode_fields` of the record.

Ratios: ``decode / unpackb`` (the codec's cost in units of the ceiling, lower is
better), ``reference / decode`` (the compiled decoder's speed-up, same run) and
``encode / packb``. Nothing here asserts on time.
Run: ``python -m benchmarks.bench_codec [--json] [--quick] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from typing import Any, Callable

import msgpack

from chimera.consensus.bft import Block, BftProposal, BftVote, CertifiedCommit, Vote
from chimera.consensus.quorum import QuorumCertificate, SignedVote
from chimera.protocol import messages
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.membership import MemberList, MemberUpdate, PeerContact, Ping
from chimera.protocol.messages import decode_fields, encode_fields, reject_duplicate_keys


def _peers(n: int) -> list[str]:
    return [SigningIdentity(hashlib.sha256(i.to_bytes(4, "big")).digest()).peer_id for i in range(n)]


def bodies() -> dict[str, tuple[list[Any], int]]:
    """name -> (records, units they count as)."""
    peers = _peers(1000)
    rows = [MemberUpdate(peer_id=p, state="alive", incarnation=3,
                         contact=PeerContact(peer_id=p, transport_key=hashlib.sha256(p.encode()).digest(),
                                             addresses=(f"tcp://10.0.{i // 250}.{i % 250}:7420",)))
            for i, p in enumerate(peers)]
    member_lists = [MemberList(members=tuple(rows[k:k + 256])) for k in range(0, len(rows), 256)]
    signed = [SignedVote(voter=p, signature=hashlib.sha512(p.encode()).digest()) for p in peers[:16]]
    values = tuple(sorted(hashlib.sha256(i.to_bytes(2, "big")).digest() * 2 for i in range(256)))
    block = Block(height=5, epoch=0, proposer=peers[1], parent_hash=b"\x02" * 32, values=values)
    return {
        "member_list x4 (per row)": (member_lists, len(rows)),
        "ping +8": ([Ping(probe_id=7, updates=tuple(rows[:8]))], 1),
        "bft_vote": ([BftVote(vote=Vote(vote_type="prevote", height=123, round=0, block_hash=b"\x07" * 32,
                                        signed=signed[0]))], 1),
        "bft_proposal 256": ([BftProposal(height=5, round=1, block=block, signed=signed[1])], 1),
        "certified_commit 16": ([CertifiedCommit(round=0, block=Block(height=5, epoch=0, proposer=peers[1],
                                                                      parent_hash=b"\x02" * 32, values=values[:16]),
                                                 certificate=QuorumCertificate(votes=tuple(signed)))], 1),
    }


def _best(fns: dict[str, Callable[[], Any]], repeat: int, target_s: float = 0.03) -> dict[str, float]:
    """Best seconds per call of each function over ``repeat`` loops of about ``target_s``,
    the functions taking turns (a burst of load on a shared machine then hits all of them,
    and the best loop of each is one it missed)."""
    loops = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        loops[name] = max(1, int(target_s / max(time.perf_counter() - start, 1e-7)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / loops[name])
    return best


def _unpack_strict(data: bytes) -> Any:  # the envelope opener's options
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                           object_pairs_hook=reject_duplicate_keys)


def measure(repeat: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, (records, units) in bodies().items():
        cls = type(records[0])
        maps = [encode_fields(r) for r in records]
        wires = [msgpack.packb(m, use_bin_type=True) for m in maps]
        bodies_ = [_unpack_strict(w) for w in wires]
        assert [decode_fields(cls, b) for b in bodies_] == records
        assert [messages._decode_checked(cls, b) for b in bodies_] == records
        us = _best({
            "unpackb": lambda: [msgpack.unpackb(w, raw=False) for w in wires],
            "unpack_strict": lambda: [_unpack_strict(w) for w in wires],
            "decode": lambda: [decode_fields(cls, b) for b in bodies_],
            "reference": lambda: [messages._decode_checked(cls, b) for b in bodies_],
            "packb": lambda: [msgpack.packb(m, use_bin_type=True) for m in maps],
            "encode": lambda: [encode_fields(r) for r in records],
        }, repeat)
        row = {k: round(v * 1e6 / units, 3) for k, v in us.items()}
        row["decode_per_unpackb"] = round(us["decode"] / us["unpackb"], 2)
        row["reference_per_decode"] = round(us["reference"] / us["decode"], 2)
        row["encode_per_packb"] = round(us["encode"] / us["packb"], 2)
        row["bytes_per_unit"] = round(sum(map(len, wires)) / units, 1)
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeat", type=int, default=15, help="timed loops per figure (the best is kept)")
    parser.add_argument("--quick", action="store_true", help="3 loops per figure")
    args = parser.parse_args(argv)
    results = measure(3 if args.quick else args.repeat)
    if args.json:
        print(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                          "msgpack": ".".join(map(str, msgpack.version)), "us_per_unit": results}, indent=2))
        return 0
    print(f"message codec, us per unit, best of {3 if args.quick else args.repeat} ({platform.python_version()}, "
          f"msgpack {'.'.join(map(str, msgpack.version))})")
    cols = ["unpackb", "unpack_strict", "decode", "reference", "packb", "encode"]
    print(f"  {'body':26s}" + "".join(f"{c:>14s}" for c in cols)
          + f"{'decode/unpackb':>16s}{'ref/decode':>12s}{'encode/packb':>14s}")
    for name, row in results.items():
        print(f"  {name:26s}" + "".join(f"{row[c]:14.2f}" for c in cols)
              + f"{row['decode_per_unpackb']:15.2f}x{row['reference_per_decode']:11.2f}x"
              f"{row['encode_per_packb']:13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
