"""Result digests replicas vote on (pure: hashlib only, no wasmtime).

Kept apart from :mod:`chimera.fabric.sandbox` so a peer can check results
(and the wire layer can describe them) without loading wasmtime;
``sandbox`` re-exports both functions.
"""

from __future__ import annotations

import hashlib


def result_digest(exit_code: int, stdout: bytes) -> bytes:
    """``sha256(b"chimera-task-result/v1\\0" || exit_code as 4-byte signed big-endian || stdout)``, 32 bytes."""
    return hashlib.sha256(b"chimera-task-result/v1\x00" + exit_code.to_bytes(4, "big", signed=True)
                          + stdout).digest()


def error_digest(reason: str) -> bytes:
    """Digest standing for a deterministic failure (e.g. ``"fuel_exhausted"``), so
    replicas that fail the same way agree: ``sha256(b"chimera-task-error/v1\\0" || reason)``, 32 bytes."""
    return hashlib.sha256(b"chimera-task-error/v1\x00" + reason.encode()).digest()
