"""Chimera Mesh LAN discovery (mDNS / DNS-SD) written from docs/PROTOCOL.md §11 alone (clean room).

It imports nothing from ``chimera``. mDNS itself (RFC 6762/6763: probing, caching,
queries, goodbyes) is python-zeroconf's; what §11 adds on top is written here:

* :func:`instance_name`, :func:`host_name`, :func:`txt_strings`: what a peer advertises
  (service ``_chimera._tcp.local.``, instance ``<peer_id[0:24]>-<port>``, SRV target
  ``chimera-<peer_id[0:16]>.local.``, TXT ``v net id tk caps prof``);
* :func:`candidate_from_record`: the receiver's acceptance rules and the candidate
  contact it builds (addresses filtered and capped at 8, capabilities at 32, profile at 32
  characters, bytes that are not UTF-8 replaced);
* :class:`Browser`: browses the service type and resolves each announced instance (3 s
  resolve timeout, one lookup at a time), keeps the candidates it derived, the records it
  ignored (with the reason) and the goodbyes it saw;
* :class:`Advertiser`: registers a peer's service on one IPv4 interface, and its goodbye;
* :class:`Forger`: raw mDNS responses (RFC 1035 wire format) sent to 224.0.0.251:5353 from
  port 5353, for records a well-behaved advertiser never sends (bad TXT values, port 0, no or
  unusable A records, goodbyes with TTL 0, floods);
* :class:`TrapPeer`: a clean-room peer (tests/independent_peer.py) that records, for every
  authentic envelope it receives, whom it was addressed to: a node that took a forged record
  naming the trap's address and key as a candidate sends the trap a hello for the forged id;
* :func:`in_netns`: runs a constructor in a thread that has entered a network namespace,
  so the sockets and threads it makes (zeroconf's, ZeroMQ's) live there.

Times are seconds unless named ``_ms``; TTLs are DNS seconds.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ipaddress
import os
import queue
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import msgpack
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from tests import independent_peer as ip

SERVICE_TYPE = "_chimera._tcp.local."            # §11
PROTOCOL_VERSION = "1"                          # §1, §11 TXT v
RESOLVE_TIMEOUT_S = 3.0                         # §11
MAX_ADDRESSES = 8                               # §11
MAX_CAPABILITIES = 32                           # §11
MAX_PROFILE_CHARS = 32                          # §11
MAX_CAPABILITY_CHARS = 64                       # §8.1 (§11 as amended by this clean room)
MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class Ignored(Exception):
    """A resolved service that §11 says to ignore; ``reason`` names the failed rule."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------
# What a peer advertises

def instance_name(peer_id: str, port: int) -> str:
    """§11: ``<peer_id[0:24]>-<port>._chimera._tcp.local.``"""
    return f"{peer_id[:24]}-{port}.{SERVICE_TYPE}"


def host_name(peer_id: str) -> str:
    """§11: the SRV target ``chimera-<peer_id[0:16]>.local.``"""
    return f"chimera-{peer_id[:16]}.local."


def txt_strings(network_id: bytes, peer_id: str, transport_key: bytes, capabilities: list[str],
                profile: str) -> list[bytes]:
    """§11: the TXT record's ``key=value`` strings (UTF-8), in the table's order."""
    pairs = [("v", PROTOCOL_VERSION), ("net", network_id.hex()), ("id", peer_id), ("tk", ip.b32(transport_key)),
             ("caps", ",".join(capabilities)), ("prof", profile)]
    return [f"{k}={v}".encode() for k, v in pairs]


def parse_txt_rdata(rdata: bytes) -> list[bytes]:
    """RFC 6763 §6: the character-strings of a TXT record's RDATA (an empty string skipped)."""
    out, i = [], 0
    while i < len(rdata):
        n = rdata[i]
        out.append(rdata[i + 1:i + 1 + n])
        i += 1 + n
    return [s for s in out if s]


def txt_map(strings: list[bytes]) -> dict[str, str | None]:
    """``key=value`` strings to a map. Keys are taken as they are (no case folding) and the
    first occurrence of a key wins (RFC 6763 §6.4); a string without ``=`` maps to None.
    Bytes that are not valid UTF-8 are replaced (§11)."""
    out: dict[str, str | None] = {}
    for raw in strings:
        text = raw.decode("utf-8", "replace")
        key, eq, value = text.partition("=")
        out.setdefault(key, value if eq else None)
    return out


# ---------------------------------------------------------------------------------------
# What a receiver makes of a resolved service

@dataclass(frozen=True)
class Candidate:
    """A candidate contact (§9.1) derived from one resolved service (§11)."""

    peer_id: str
    transport_key: bytes
    addresses: tuple[str, ...]
    capabilities: tuple[str, ...]
    profile: str
    port: int

    def contact_body(self) -> dict:
        """The PeerContact (§8.1) it stands for, as the codec of tests/independent_peer.py has it."""
        return ip.contact_body(self.peer_id, self.transport_key, list(self.addresses), list(self.capabilities),
                               self.profile)

    def uri(self) -> str:
        """A contact URI (§4) for the first address."""
        host = self.addresses[0][len("tcp://"):].rsplit(":", 1)[0]
        return ip.Contact(self.peer_id, host, self.port, self.transport_key).uri()


def _lenient_key(text: str | None) -> bytes:
    """§12.4: a TXT ``tk`` is base32 decoded leniently (any case, padding or not, unused
    bits not checked) and must be 32 bytes."""
    if text is None:
        raise Ignored("tk missing")
    body = text.upper().rstrip("=")
    if not body or any(ch not in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567" for ch in body):
        raise Ignored("tk is not base32")
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError):
        raise Ignored("tk is not base32") from None
    if len(raw) != 32:
        raise Ignored(f"tk decodes to {len(raw)} bytes, not 32")
    return raw


def usable_ipv4(address: str) -> bool:
    """§11: not 0.0.0.0, not multicast (224/4), not reserved (240/4, 255.255.255.255 included)."""
    a = ipaddress.IPv4Address(address)
    return not (a.is_unspecified or a.is_multicast or a in ipaddress.IPv4Network("240.0.0.0/4"))


def candidate_from_record(txt: list[bytes], port: int, ipv4_addresses: list[str], network_id: bytes,
                          own_peer_id: str | None = None) -> Candidate:
    """§11's acceptance rules, then the PeerContact it builds. Raises :class:`Ignored`.

    ``txt`` are the TXT record's strings, ``port`` the SRV port, ``ipv4_addresses`` the A
    records of the SRV target in the order resolved."""
    values = txt_map(txt)
    if values.get("v") != PROTOCOL_VERSION:
        raise Ignored("v is not 1")
    if values.get("net") != network_id.hex():
        raise Ignored("another network")
    peer_id = values.get("id")
    try:
        ip.public_key_of(peer_id)
    except ip.ProtocolError:
        raise Ignored("id is not a peer id") from None
    if peer_id == own_peer_id:
        raise Ignored("our own record")
    transport_key = _lenient_key(values.get("tk"))
    if not 0 < port <= 65535:
        raise Ignored("port 0")
    if not ipv4_addresses:
        raise Ignored("no IPv4 address")
    addresses = tuple(f"tcp://{a}:{port}" for a in ipv4_addresses if usable_ipv4(a))[:MAX_ADDRESSES]
    if not addresses:
        raise Ignored("no usable IPv4 address")
    caps = tuple(c for c in (values.get("caps") or "").split(",") if c)[:MAX_CAPABILITIES]
    if any(len(c) > MAX_CAPABILITY_CHARS for c in caps):
        raise Ignored("a capability of more than 64 characters")
    profile = values.get("prof")
    profile = "default" if profile is None else profile[:MAX_PROFILE_CHARS]
    return Candidate(peer_id, transport_key, addresses, caps, profile, port)


def join_candidate(peer: ip.IndependentPeer, candidate: Candidate) -> None:
    """§9.1: a candidate gets our hello (recipient = its claimed id) at its first two addresses."""
    for address in candidate.addresses[:2]:
        body = ip.contact_body(candidate.peer_id, candidate.transport_key, [address], list(candidate.capabilities))
        peer.send(candidate.peer_id, "hello", peer.hello_body(True), contact=body)


# ---------------------------------------------------------------------------------------
# Network namespaces

_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str | None, make: Callable[[], T]) -> T:
    """Call ``make()`` in a new thread that first entered network namespace ``netns``
    (``/var/run/netns/NAME``; None: this one) and return its result. Sockets it creates, and
    threads it starts, stay in that namespace after it returns. Raises what ``make`` raises,
    or OSError when the namespace cannot be entered (root only)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            if netns is not None:
                fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({netns}): {os.strerror(err)}")
                finally:
                    os.close(fd)
            box["value"] = make()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, name=f"netns-{netns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---------------------------------------------------------------------------------------
# Browser

@dataclass
class BrowserView:
    candidates: dict[str, Candidate] = field(default_factory=dict)   # instance name -> candidate
    ignored: dict[str, str] = field(default_factory=dict)            # instance name -> reason
    removed: list[str] = field(default_factory=list)                 # goodbyes seen, in order
    errors: int = 0                                                  # resolves that timed out


class Browser:
    """Browses ``_chimera._tcp.local.`` on one IPv4 interface and turns each resolved
    instance into a candidate by §11 (or records why it is ignored). Create it inside the
    namespace (:func:`in_netns`); ``close()`` from anywhere."""

    def __init__(self, interface_ip: str, network_id: bytes, own_peer_id: str | None = None) -> None:
        self.network_id = network_id
        self.own_peer_id = own_peer_id
        self.view = BrowserView()
        self._lock = threading.Condition()
        self._todo: queue.Queue[str | None] = queue.Queue()
        self.zc = Zeroconf(interfaces=[interface_ip], ip_version=IPVersion.V4Only)
        self._worker = threading.Thread(target=self._resolve_loop, daemon=True, name="browser-resolve")
        self._worker.start()
        self._browser = ServiceBrowser(self.zc, SERVICE_TYPE, handlers=[self._on_change])

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                self.view.candidates.pop(name, None)
                self.view.removed.append(name)
                self._lock.notify_all()
        else:  # Added, Updated: (re)resolve
            self._todo.put(name)

    def _resolve_loop(self) -> None:
        while True:
            name = self._todo.get()
            if name is None:
                return
            try:
                info = self.zc.get_service_info(SERVICE_TYPE, name, timeout=int(RESOLVE_TIMEOUT_S * 1000))
            except Exception:  # a closing zeroconf
                info = None
            with self._lock:
                if info is None:
                    self.view.errors += 1
                else:
                    try:
                        cand = candidate_from_record(parse_txt_rdata(info.text or b""), info.port or 0,
                                                     info.parsed_addresses(IPVersion.V4Only), self.network_id,
                                                     self.own_peer_id)
                        self.view.candidates[name] = cand
                        self.view.ignored.pop(name, None)
                    except Ignored as exc:
                        self.view.ignored[name] = exc.reason
                self._lock.notify_all()

    def wait_for(self, predicate: Callable[[BrowserView], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not predicate(self.view):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.2))
            return True

    def find(self, peer_id: str) -> Candidate | None:
        with self._lock:
            return next((c for c in self.view.candidates.values() if c.peer_id == peer_id), None)

    def close(self) -> None:
        self._browser.cancel()
        self._todo.put(None)
        self._worker.join(5)
        self.zc.close()


# ---------------------------------------------------------------------------------------
# Advertiser

class Advertiser:
    """Registers peers' services on one IPv4 interface (zeroconf probes and announces);
    ``goodbye()`` unregisters one (TTL 0 records). Create it inside the namespace."""

    def __init__(self, interface_ip: str) -> None:
        self.interface_ip = interface_ip
        self.zc = Zeroconf(interfaces=[interface_ip], ip_version=IPVersion.V4Only)

    def advertise(self, network_id: bytes, peer_id: str, transport_key: bytes, port: int, hosts: list[str],
                  capabilities: list[str], profile: str = "default") -> ServiceInfo:
        info = ServiceInfo(SERVICE_TYPE, instance_name(peer_id, port),
                           addresses=[socket.inet_aton(h) for h in hosts], port=port,
                           properties=_rdata_props(txt_strings(network_id, peer_id, transport_key, capabilities,
                                                               profile)),
                           server=host_name(peer_id))
        self.zc.register_service(info, allow_name_change=True)
        return info

    def goodbye(self, info: ServiceInfo) -> None:
        self.zc.unregister_service(info)

    def close(self) -> None:
        self.zc.close()


def _rdata_props(strings: list[bytes]) -> bytes:
    """TXT RDATA from strings (zeroconf takes raw RDATA bytes as ``properties``)."""
    return b"".join(bytes([len(s)]) + s for s in strings)


# ---------------------------------------------------------------------------------------
# Raw mDNS responses (RFC 1035 §4, RFC 6762 §18)

TYPE_A, TYPE_PTR, TYPE_TXT, TYPE_AAAA, TYPE_SRV = 1, 12, 16, 28, 33
CLASS_IN, CACHE_FLUSH = 1, 0x8000


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode()
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad DNS label {label!r}")
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def rr(name: str, rtype: int, ttl_s: int, rdata: bytes, cache_flush: bool = True) -> bytes:
    cls = CLASS_IN | (CACHE_FLUSH if cache_flush else 0)
    return encode_name(name) + struct.pack("!HHIH", rtype, cls, ttl_s, len(rdata)) + rdata


@dataclass
class Record:
    """One forged service: its TXT strings, SRV port and target, A (and AAAA) addresses."""

    instance: str
    txt: list[bytes]
    port: int
    host: str
    ipv4: list[str]
    ipv6: list[str] = field(default_factory=list)
    srv: bool = True
    txt_record: bool = True

    def records(self, ttl_s: int = 120) -> list[bytes]:
        full = f"{self.instance}.{SERVICE_TYPE}"
        out = [rr(SERVICE_TYPE, TYPE_PTR, 4500 if ttl_s else 0, encode_name(full), cache_flush=False)]
        if self.srv:
            out.append(rr(full, TYPE_SRV, ttl_s, struct.pack("!HHH", 0, 0, self.port) + encode_name(self.host)))
        if self.txt_record:
            out.append(rr(full, TYPE_TXT, ttl_s, _rdata_props(self.txt) or b"\x00"))
        out += [rr(self.host, TYPE_A, ttl_s, socket.inet_aton(a)) for a in self.ipv4]
        out += [rr(self.host, TYPE_AAAA, ttl_s, socket.inet_pton(socket.AF_INET6, a)) for a in self.ipv6]
        return out


def response_packet(records: list[bytes]) -> bytes:
    """An unsolicited mDNS response (id 0, QR|AA) carrying ``records`` as answers."""
    return struct.pack("!HHHHHH", 0, 0x8400, 0, len(records), 0, 0) + b"".join(records)


def decode_name(packet: bytes, offset: int) -> tuple[str, int]:
    """RFC 1035 §4.1.4: a name at ``offset`` (compression pointers followed, at most 32);
    returns (name with a trailing dot, offset after it). Raises ValueError."""
    labels, end, hops = [], None, 0
    while True:
        n = packet[offset]
        if n & 0xC0 == 0xC0:
            if end is None:
                end = offset + 2
            offset = ((n & 0x3F) << 8) | packet[offset + 1]
            hops += 1
            if hops > 32:
                raise ValueError("compression loop")
            continue
        if n == 0:
            return ".".join(labels) + ".", end if end is not None else offset + 1
        labels.append(packet[offset + 1:offset + 1 + n].decode("utf-8", "replace"))
        offset += 1 + n


def parse_message(packet: bytes) -> tuple[bool, list[tuple[str, int]], list[tuple[str, int, int, str]]]:
    """An mDNS message: (is_response, questions as (name, qtype), resource records of every
    section as (name, rtype, ttl_s, PTR target or "")). Raises ValueError, IndexError, struct.error."""
    _ident, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", packet[:12])
    questions, records, offset = [], [], 12
    for _ in range(qd):
        name, offset = decode_name(packet, offset)
        qtype, _cls = struct.unpack("!HH", packet[offset:offset + 4])
        offset += 4
        questions.append((name, qtype))
    for _ in range(an + ns + ar):
        name, offset = decode_name(packet, offset)
        rtype, _cls, ttl_s, length = struct.unpack("!HHIH", packet[offset:offset + 10])
        offset += 10
        target = decode_name(packet, offset)[0] if rtype == TYPE_PTR else ""
        offset += length
        records.append((name, rtype, ttl_s, target))
    return bool(flags & 0x8000), questions, records


class Forger:
    """Sends raw mDNS responses to 224.0.0.251:5353 out of one IPv4 interface, from port 5353
    (RFC 6762 §6: responses come from 5353), and records the questions asked on the LAN
    (``questions``: (name, qtype) -> count; ``askers``: name -> who asked) and the records
    answered (``heard``). Create it inside the namespace."""

    def __init__(self, interface_ip: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface_ip))
        self.sock.bind(("", MDNS_PORT))
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                             socket.inet_aton(MDNS_GROUP) + socket.inet_aton(interface_ip))
        self.sock.settimeout(0.2)
        self.interface_ip = interface_ip
        self.sent_packets = 0
        self.questions: Counter = Counter()
        self.askers: dict[str, set[str]] = {}  # name asked about -> source addresses of the questions
        self.heard: list[tuple[str, str, int, int, str]] = []  # answers: (source, name, type, ttl_s, PTR target)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True, name="forger-listen")
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                packet, (source_ip, _port) = self.sock.recvfrom(9000)
            except (socket.timeout, OSError):
                continue
            try:
                is_response, asked, records = parse_message(packet)
            except (ValueError, IndexError, struct.error):
                continue
            with self._lock:
                if is_response:
                    asked = []
                    for name, rtype, ttl_s, target in records:
                        self.heard.append((source_ip, name.lower(), rtype, ttl_s, target.lower()))
                for q in asked:
                    self.questions[q] += 1
                    self.askers.setdefault(q[0].lower(), set()).add(source_ip)

    def asked(self, name: str) -> int:
        """How many questions about ``name`` (any type) were seen."""
        with self._lock:
            return sum(n for (qname, _), n in self.questions.items() if qname.lower() == name.lower())

    def announce(self, *services: Record, ttl_s: int = 120) -> None:
        """One packet per service (each well under 1500 bytes)."""
        for service in services:
            self.sock.sendto(response_packet(service.records(ttl_s)), (MDNS_GROUP, MDNS_PORT))
            self.sent_packets += 1

    def query(self, name: str, qtype: int) -> None:
        """One multicast question (QM) for ``name``."""
        packet = struct.pack("!HHHHHH", 0, 0, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)
        self.sock.sendto(packet, (MDNS_GROUP, MDNS_PORT))

    def goodbye(self, *services: Record) -> None:
        """RFC 6762 §10.1: the same records with TTL 0."""
        self.announce(*services, ttl_s=0)

    def ttls(self, source_ip: str, name: str) -> list[tuple[int, int]]:
        """(rtype, ttl_s) of every record about ``name`` (or PTR to it) sent by ``source_ip``."""
        with self._lock:
            return [(rtype, ttl) for src, n, rtype, ttl, target in self.heard
                    if src == source_ip and name.lower() in (n, target)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# ---------------------------------------------------------------------------------------
# A peer that records whom the envelopes it gets were meant for

class TrapPeer(ip.IndependentPeer):
    """An :class:`~tests.independent_peer.IndependentPeer` that also accepts (verifies, then
    records without answering) envelopes addressed to other peer ids: ``addressed[peer_id]``
    counts authentic envelopes per recipient, ``addressed_kinds`` per (recipient, kind).
    Envelopes for itself are handled as the clean-room peer does."""

    def __init__(self, network: ip.Network, host: str) -> None:
        self.addressed: Counter = Counter()
        self.addressed_kinds: Counter = Counter()
        self.senders: Counter = Counter()
        super().__init__(network, host)

    def _on_frame(self, frame: bytes) -> None:
        try:  # §6.1: recipient is field 3 of the payload array
            recipient = msgpack.unpackb(frame[:-ip.SIGNATURE_BYTES], raw=False)[3]
        except Exception:
            recipient = None
        own = recipient is None or recipient == self.public_key
        try:
            env = ip.open_envelope(frame, self.network_id, self.public_key if own else recipient, ip.now_ms(),
                                   self.windows if own else {})
        except ip.ProtocolError as exc:
            with self._lock:
                self.stats.drops[exc.reason] += 1
            return
        with self._lock:
            rid = ip.peer_id_of(recipient) if recipient is not None else "nil"
            self.addressed[rid] += 1
            self.addressed_kinds[(rid, env.kind)] += 1
            self.senders[env.sender_id] += 1
            self._changed.notify_all()
            if own:
                self.stats.received[env.kind] += 1
        if own:
            self._dispatch(env, frame)
