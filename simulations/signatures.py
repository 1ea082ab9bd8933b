"""Signature verification shared by all simulated peers (one process, same answers).

Every simulated peer verifies the same signed bytes the real peers would; since
Ed25519 verification is a pure function of (public key, signature, message),
the answer for exact bytes is computed once and reused by the other peers
(the memo is keyed by the exact bytes, so a forged or altered signature is
never confused with a valid one). Without this, a broadcast to ``n`` peers
costs ``n`` verifications (~60-120 us each) instead of one.

* :class:`SharedVerifier` replaces the per-opener ``Verifier`` of
  :class:`~chimera.protocol.envelope.EnvelopeOpener` (envelope signatures).
* :func:`shared_vote_verification` memoizes ``verify_vote`` inside the
  consensus modules for the duration of a run (vote, proposal, certificate and
  opinion signatures), as ``tests/test_bft.py``'s ``shared_verify`` fixture does.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from chimera.protocol.identity import public_key_from_peer_id, verify_signature
from chimera.protocol.errors import MalformedError

MAX_MEMO_ENTRIES = 500_000
"""The memo is cleared when it grows past this many entries (memory bound)."""


class SharedVerifier:
    """Drop-in for :class:`~chimera.protocol.identity.Verifier` with a result memo."""

    def __init__(self) -> None:
        self._memo: dict[tuple[bytes, bytes, bytes], bool] = {}
        self.verified = 0
        self.reused = 0

    def verify(self, public_key: bytes, signature: bytes, message: bytes) -> bool:
        key = (public_key, signature, message)
        ok = self._memo.get(key)
        if ok is None:
            ok = verify_signature(public_key, signature, message)
            if len(self._memo) >= MAX_MEMO_ENTRIES:
                self._memo.clear()
            self._memo[key] = ok
            self.verified += 1
        else:
            self.reused += 1
        return ok


_MODULES = ("chimera.consensus.quorum", "chimera.consensus.bft", "chimera.consensus.reputation")


@contextlib.contextmanager
def shared_vote_verification(verifier: SharedVerifier | None = None,
                             also: tuple[str, ...] = ()) -> Iterator[SharedVerifier]:
    """Within the block, ``verify_vote`` in the consensus modules (and in the modules
    named in ``also``, e.g. ``"chimera.consensus.training"``) answers from a memo keyed
    by (voter key, signature, exact statement bytes).

    Restores the original function on exit (also on error).
    """
    import importlib

    from chimera.consensus import quorum

    verifier = verifier or SharedVerifier()
    statement_bytes = quorum.statement_bytes

    def verify_vote(vote, purpose, network_id, epoch, statement) -> bool:
        try:
            key = public_key_from_peer_id(vote.voter)
        except MalformedError:
            return False
        return verifier.verify(key, vote.signature, statement_bytes(purpose, network_id, epoch, statement))

    modules = [importlib.import_module(name) for name in _MODULES + tuple(also)]
    saved = [(m, m.verify_vote) for m in modules if hasattr(m, "verify_vote")]
    for module, _ in saved:
        module.verify_vote = verify_vote
    try:
        yield verifier
    finally:
        for module, original in saved:
            module.verify_vote = original
