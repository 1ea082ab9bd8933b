"""Diagnostic messages: echo (round-trip measurement, ``chimera ping``, benchmarks)."""

from __future__ import annotations

from typing import Annotated

from .messages import MaxLen, message

ECHO_ACTOR = "echo"


@message("echo_request", actor=ECHO_ACTOR)
class EchoRequest:
    """Ask the recipient to send ``payload`` back (when ``reply`` is true).

    ``payload``: opaque bytes, at most 65536; ``nonce``: chosen by the sender.
    """

    nonce: int
    payload: Annotated[bytes, MaxLen(65536)] = b""
    reply: bool = True

    def describe(self) -> str:
        return f"echo-request {self.nonce} ({len(self.payload)} B){'' if self.reply else ' no reply'}"


@message("echo_reply", actor=ECHO_ACTOR)
class EchoReply:
    nonce: int
    payload: Annotated[bytes, MaxLen(65536)] = b""

    def describe(self) -> str:
        return f"echo-reply {self.nonce} ({len(self.payload)} B)"
