"""Signed envelopes: the only thing that crosses the wire between peers.

Wire frame (one ZeroMQ frame; full spec in docs/PROTOCOL.md)::

    frame     = payload || signature                (signature: last 64 bytes)
    payload   = msgpack array [version, kind, sender, recipient, seq, sent_at_ms, body]
    signature = Ed25519(sender_key, SIGNING_DOMAIN || network_id || payload)

``SIGNING_DOMAIN`` names the purpose, ``network_id`` binds the signature to one
network and ``kind`` is inside the signed payload, so a signature made for one
message kind or network can never be accepted as another.

:class:`EnvelopeOpener` is pure: the caller passes ``now_ms``. Checks run
cheapest first (size, structure, version, kind, recipient, timestamp, replay,
body schema) and the Ed25519 verification (~100 us) last (a frame signed for another network
fails it as ``bad_signature``); the replay window is only
updated after the signature verified, so forged frames cannot poison it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgpack

from . import PROTOCOL_VERSION
from .errors import (
    BadSignatureError,
    LocalProtocolError,
    MalformedError,
    OversizeError,
    RemoteProtocolError,
    ReplayError,
    StaleError,
    UnknownKindError,
    UnsupportedVersionError,
    WrongRecipientError,
)
from .identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    SigningIdentity,
    Verifier,
    peer_id_from_public_key,
    public_key_from_peer_id,
)
from .messages import MESSAGE_TYPES, decode_fields, encode_fields, reject_duplicate_keys
from .ratelimit import TokenBucket

# Importing the message modules registers their kinds, so an opener built from
# this module alone knows every kind of this protocol version.
from . import diagnostics as _diagnostics  # noqa: E402,F401
from . import membership as _membership  # noqa: E402,F401

SIGNING_DOMAIN = b"chimera-mesh/envelope/v1\x00"
NETWORK_ID_BYTES = 16
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB
DEFAULT_MAX_CLOCK_SKEW_MS = 30_000
REPLAY_WINDOW = 1024  # sequence numbers tracked below the highest seen
U64_MAX = 2**64 - 1


def _reject_ext(code: int, data: bytes) -> Any:
    raise MalformedError("msgpack extension types are not allowed")


def signing_input(network_id: bytes, payload: bytes) -> bytes:
    """The exact bytes an envelope signature covers."""
    return SIGNING_DOMAIN + network_id + payload


@dataclass(frozen=True, slots=True)
class Envelope:
    """An opened, verified envelope.

    ``message`` is an instance of the ``@message`` class registered for ``kind``.
    """

    version: int
    kind: str
    sender: str  # peer id
    recipient: str | None
    seq: int
    sent_at_ms: int
    message: Any
    size_bytes: int

    def describe(self) -> str:
        return f"{self.kind} #{self.seq} from {self.sender[:10]}: {self.message.describe()}"


class EnvelopeSealer:
    """Encodes and signs outgoing envelopes for one identity.

    Args:
        identity: this node's signing identity.
        network_id: 16-byte network id.
        first_seq: first sequence number to use; the node persists a floor so
            a restarted node never reuses a sequence number (see node.store).
    """

    def __init__(self, identity: SigningIdentity, network_id: bytes, first_seq: int = 1) -> None:
        if len(network_id) != NETWORK_ID_BYTES:
            raise LocalProtocolError("network id is 16 bytes")
        self.identity = identity
        self.network_id = network_id
        self.next_seq = first_seq
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)

    def seal(self, message: Any, *, sent_at_ms: int, recipient: str | None = None) -> bytes:
        """Encode and sign ``message``; returns the wire frame (bytes).

        Raises:
            LocalProtocolError: unknown message class or a field out of bounds.
        """
        kind = getattr(message, "KIND", None)
        if kind is None or MESSAGE_TYPES.get(kind) is not type(message):
            raise LocalProtocolError(f"{type(message).__name__} is not a registered message")
        seq = self.next_seq
        self.next_seq += 1
        payload = self._packer.pack(
            [
                PROTOCOL_VERSION,
                kind,
                self.identity.public_key,
                None if recipient is None else public_key_from_peer_id(recipient),
                seq,
                sent_at_ms,
                encode_fields(message),
            ]
        )
        return payload + self.identity.sign(signing_input(self.network_id, payload))


_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1


class _ReplayWindow:
    """Sliding anti-replay window (as IPsec, RFC 4303 s3.4.3) over seq numbers."""

    __slots__ = ("highest", "bits", "last_ms")

    def __init__(self) -> None:
        self.highest = 0
        self.bits = 0  # bit i set: highest - i was seen
        self.last_ms = 0  # receiver's wall clock when a seq was last marked

    def seen(self, seq: int) -> bool:
        if seq > self.highest:
            return False
        offset = self.highest - seq
        return offset >= REPLAY_WINDOW or bool((self.bits >> offset) & 1)

    def mark(self, seq: int) -> None:
        if seq > self.highest:
            shift = seq - self.highest
            # a jump past the window forgets it: never build a shift-sized integer (a seq
            # of 2**40 ahead would allocate 128 GiB before the mask)
            self.bits = 1 if shift >= REPLAY_WINDOW else ((self.bits << shift) | 1) & _WINDOW_MASK
            self.highest = seq
        else:
            self.bits |= 1 << (self.highest - seq)


class EnvelopeOpener:
    """Strictly decodes and verifies incoming frames for one local peer.

    Args:
        local_peer_id: our peer id; envelopes addressed to anyone else are dropped.
        network_id: 16-byte network id the signatures must be bound to.
        max_message_bytes: frames longer than this are rejected before decoding.
        max_clock_skew_ms: ``|now_ms - sent_at_ms|`` above this is stale.
        max_tracked_senders: replay windows kept. Only a window idle for more than
            ``2 * max_clock_skew_ms`` is evicted (every frame it recorded is stale by
            then, so forgetting it cannot let a replay through); while the table is
            full of windows active more recently, frames from senders without a
            window are refused (``replay_table_full``) instead.
        new_senders_per_source_per_s: replay windows one source (the network address
            the driver names in :meth:`open`) may create per second once its burst is
            spent; a frame from a sender without a window past that is refused
            (``new_sender_rate``). Otherwise one token holder signing with fresh
            identities (free to make) fills the table in ``2 x skew`` and keeps every
            other new sender out for as long as it goes on (§6.4).
        new_senders_burst: windows one source may create at once (e.g. a restarted
            node on a host that runs many peers).
        max_sources: sources whose budget is remembered (least recently seen beyond
            that are forgotten, i.e. start again with a full burst).
    """

    def __init__(
        self,
        local_peer_id: str,
        network_id: bytes,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_clock_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS,
        max_tracked_senders: int = 65536,
        new_senders_per_source_per_s: float = 16.0,
        new_senders_burst: int = 256,
        max_sources: int = 4096,
    ) -> None:
        self.local_public_key = public_key_from_peer_id(local_peer_id)
        self.network_id = network_id
        self.max_message_bytes = max_message_bytes
        self.max_clock_skew_ms = max_clock_skew_ms
        self._max_senders = max_tracked_senders
        self._windows: OrderedDict[bytes, _ReplayWindow] = OrderedDict()
        self._verifier = Verifier()
        self._source_rate_per_s = new_senders_per_source_per_s
        self._source_burst = new_senders_burst
        self._max_sources = max_sources
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()  # source -> new-sender budget

    def open(self, frame: bytes, now_ms: int, source: str | None = None) -> Envelope:
        """Decode, check and verify ``frame``.

        ``source``: where the frame came from (the reference node: the connection's peer
        IP address), whose budget of new replay windows a sender without one uses; None:
        no budget (in-process drivers, simulations).

        Raises:
            RemoteProtocolError: a subclass naming the reason (``oversize``,
                ``malformed``, ``bad_version``, ``unknown_kind``,
                ``wrong_recipient``, ``stale``, ``replay``, ``replay_table_full``,
                ``new_sender_rate``, ``bad_signature``).
                Nothing else is raised for any input bytes.
        """
        size = len(frame)
        if size > self.max_message_bytes:
            raise OversizeError(f"frame of {size} bytes exceeds {self.max_message_bytes}")
        if size <= SIGNATURE_BYTES:
            raise MalformedError("frame shorter than a signature")
        payload = frame[:-SIGNATURE_BYTES]
        signature = frame[-SIGNATURE_BYTES:]
        try:
            outer = msgpack.unpackb(
                payload,
                raw=False,
                use_list=True,
                strict_map_key=True,
                ext_hook=_reject_ext,
                object_pairs_hook=reject_duplicate_keys,
                max_bin_len=self.max_message_bytes,
                max_str_len=self.max_message_bytes,
                max_array_len=65536,
                max_map_len=4096,
                max_ext_len=0,
            )
        except MalformedError:
            raise
        except Exception as exc:  # msgpack raises a zoo (ExtraData, ValueError, ...)
            raise MalformedError(f"not a msgpack payload: {type(exc).__name__}") from None
        if type(outer) is not list or len(outer) != 7:
            raise MalformedError("payload is not a 7-element array")
        version, kind, sender, recipient, seq, sent_at_ms, body = outer
        if type(version) is not int:
            raise MalformedError("version is not an int")
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersionError(f"protocol version {version} not supported")
        if type(kind) is not str:
            raise MalformedError("kind is not a str")
        cls = MESSAGE_TYPES.get(kind)
        if cls is None:
            raise UnknownKindError(f"unknown message kind {kind[:32]!r}")
        if type(sender) is not bytes or len(sender) != PUBLIC_KEY_BYTES:
            raise MalformedError("sender is not a 32-byte key")
        if recipient is not None:
            if type(recipient) is not bytes or len(recipient) != PUBLIC_KEY_BYTES:
                raise MalformedError("recipient is neither nil nor a 32-byte key")
            if recipient != self.local_public_key:
                raise WrongRecipientError("envelope addressed to another peer")
        if type(seq) is not int or not 0 < seq <= U64_MAX:
            raise MalformedError("seq is not a positive uint64")
        if type(sent_at_ms) is not int or not 0 <= sent_at_ms <= U64_MAX:
            raise MalformedError("sent_at_ms is not a uint64")
        if abs(now_ms - sent_at_ms) > self.max_clock_skew_ms:
            raise StaleError(f"sent_at_ms is {now_ms - sent_at_ms} ms from our clock")
        window = self._windows.get(sender)
        budget = None
        if window is None:
            if source is not None:
                budget = self._budget(source, now_ms)
                if not budget.ready(now_ms / 1000.0):
                    raise ReplayError(f"over {self._source_rate_per_s:g} new senders/s from {source[:64]}",
                                      reason="new_sender_rate")
            if len(self._windows) >= self._max_senders and not self._evict_idle(now_ms):
                raise ReplayError("replay table full of recently active senders",
                                  reason="replay_table_full")
        elif window.seen(seq):
            raise ReplayError(f"seq {seq} already seen or below the replay window")
        try:
            message = decode_fields(cls, body)
        except RemoteProtocolError as exc:
            # A body that fails its schema under a valid signature is its sender's fault
            # (an invalid_envelope observation, §6.5); its seq is spent like an accepted
            # one, so nobody can replay it to blame the sender again.
            if self._verifier.verify(sender, signature, signing_input(self.network_id, payload)):
                self._mark(sender, window, seq, now_ms)
                if budget is not None:
                    budget.spend()
                exc.sender = peer_id_from_public_key(sender)
            raise
        if not self._verifier.verify(sender, signature, signing_input(self.network_id, payload)):
            raise BadSignatureError("Ed25519 signature does not verify")
        self._mark(sender, window, seq, now_ms)
        if budget is not None:  # charged only for a window made (forged frames cost nothing)
            budget.spend()
        return Envelope(
            version=version,
            kind=kind,
            sender=peer_id_from_public_key(sender),
            recipient=None if recipient is None else peer_id_from_public_key(recipient),
            seq=seq,
            sent_at_ms=sent_at_ms,
            message=message,
            size_bytes=size,
        )

    def _budget(self, source: str, now_ms: int) -> TokenBucket:
        """``source``'s new-sender budget (made full on first sight)."""
        sources = self._sources
        budget = sources.get(source)
        if budget is None:
            if len(sources) >= self._max_sources:
                sources.popitem(last=False)
            budget = sources[source] = TokenBucket(self._source_rate_per_s, self._source_burst, now_ms / 1000.0)
        else:
            sources.move_to_end(source)
        return budget

    def _evict_idle(self, now_ms: int) -> bool:
        """Make room for one window: evict the least recently active one if it has been
        idle for more than twice the clock skew; False if it has not (nothing evicted).

        A frame marked at receiver time ``t`` had ``sent_at_ms >= t - skew`` and is
        stale for good once ``now_ms > t + 2 * skew``, so such a window no longer
        stops any replay. A younger one still does: evicting it would let an
        attacker who floods fresh identities replay a captured frame (§6.4).
        """
        oldest = next(iter(self._windows.values()))
        if now_ms - oldest.last_ms <= 2 * self.max_clock_skew_ms:
            return False
        self._windows.popitem(last=False)
        return True

    def _mark(self, sender: bytes, window: "_ReplayWindow | None", seq: int, now_ms: int) -> None:
        """Record ``seq`` of ``sender`` (whose signature verified) in its replay window."""
        if window is None:
            # open() made room; never evict an active window here (§6.4)
            window = self._windows[sender] = _ReplayWindow()
        else:
            self._windows.move_to_end(sender)
        window.mark(seq)
        # the order stays by last activity; a clock stepped back keeps the newer time
        window.last_ms = max(window.last_ms, now_ms)
