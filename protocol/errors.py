"""The two error families of DESIGN.md.

``LocalProtocolError``: our own code misused an API (a bug here).
``RemoteProtocolError``: a peer (or a file, or a user) handed us bad input. The
receive boundary turns every ``RemoteProtocolError`` into a counted drop with
its ``reason``; it never propagates into a crash.
"""

from __future__ import annotations


class LocalProtocolError(Exception):
    """This process used a protocol API wrongly (e.g. encoding an invalid field)."""


class RemoteProtocolError(Exception):
    """Input from outside was rejected.

    Attributes:
        reason: short stable snake_case token used as the drop-counter label
            (e.g. ``"bad_signature"``, ``"replay"``); see docs/PROTOCOL.md.
        sender: the peer id that provably sent the input (its signature over it
            verified), so the drop is that peer's fault; ``None`` when it cannot be
            attributed (unsigned, or the signature did not verify).
    """

    reason = "malformed"
    sender: str | None = None

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class MalformedError(RemoteProtocolError):
    reason = "malformed"


class OversizeError(RemoteProtocolError):
    reason = "oversize"


class UnsupportedVersionError(RemoteProtocolError):
    reason = "bad_version"


class UnknownKindError(RemoteProtocolError):
    reason = "unknown_kind"


class WrongRecipientError(RemoteProtocolError):
    reason = "wrong_recipient"


class BadSignatureError(RemoteProtocolError):
    reason = "bad_signature"


class ReplayError(RemoteProtocolError):
    reason = "replay"


class StaleError(RemoteProtocolError):
    reason = "stale"


class InvalidTokenError(RemoteProtocolError):
    reason = "bad_token"
