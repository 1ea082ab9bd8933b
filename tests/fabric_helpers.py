"""Shared fixtures for the fabric tests: the committed agent builds and a sandbox engine."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

AGENTS = Path(__file__).resolve().parent.parent / "agents" / "wasm"


def wasm(name: str) -> bytes:
    """Bytes of a committed build under agents/wasm/ (no clang needed)."""
    return (AGENTS / f"{name}.wasm").read_bytes()


def reference_wordfreq(text: bytes) -> bytes:
    """Python reference of agents/src/wordfreq.c: ASCII alnum runs, lowercased,
    cut to 64 bytes; "<count> <word>" by count desc then word asc."""
    words = [w.lower()[:64] for w in re.findall(rb"[A-Za-z0-9]+", text)]
    counts = Counter(words)
    lines = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return b"".join(b"%d %s\n" % (n, w) for w, n in lines)
