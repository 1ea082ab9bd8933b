"""LAN discovery with zeroconf (mDNS/DNS-SD, RFC 6762/6763).

Each node registers ``<instance>._chimera._tcp.local.`` with a TXT record
(docs/PROTOCOL.md, Discovery) and browses for the same type. Whatever is heard
is only a *hint*: it becomes a membership candidate, and the peer is believed
only after the CURVE handshake and its own signed Hello.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Callable

import psutil
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from chimera.protocol import PROTOCOL_VERSION
from chimera.protocol.errors import LocalProtocolError, RemoteProtocolError
from chimera.protocol.identity import b32, public_key_from_peer_id, unb32
from chimera.protocol.membership import PeerContact
from chimera.protocol.messages import decode_fields, encode_fields

SERVICE_TYPE = "_chimera._tcp.local."
MAX_RESOLVING = 64
"""Service lookups in flight at once (each waits up to 3 s for an answer)."""
log = logging.getLogger("chimera.discovery")


def resolve_interfaces(names_or_ips: tuple[str, ...]) -> list[str] | None:
    """Map interface names (``eth0``) or IPv4 addresses to IPv4 addresses.

    Returns None for "all interfaces".

    Raises:
        ValueError: an unknown name, or an interface without an IPv4 address (down, not
            configured yet, IPv6 only): zeroconf given no address answers and asks nothing,
            so mDNS would be silently off.
    """
    if not names_or_ips:
        return None
    addrs = psutil.net_if_addrs()
    out = []
    for item in names_or_ips:
        if item in addrs:
            found = [a.address for a in addrs[item] if a.family == socket.AF_INET]
            if not found:
                raise ValueError(f"interface {item!r} has no IPv4 address (down or not configured yet?)")
            out.extend(found)
        else:
            try:
                socket.inet_aton(item)
            except OSError:
                raise ValueError(f"unknown interface or IPv4 address {item!r}") from None
            out.append(item)
    return out


def txt_record(contact: PeerContact, network_id: bytes) -> dict[str, str]:
    return {
        "v": str(PROTOCOL_VERSION),
        "net": network_id.hex(),
        "id": contact.peer_id,
        "tk": b32(contact.transport_key),
        "caps": ",".join(contact.capabilities),
        "prof": contact.profile,
    }


def contact_from_service(info: AsyncServiceInfo, network_id: bytes) -> PeerContact | None:
    """A candidate contact from a resolved service, or None if not ours / malformed."""
    props = {}
    for k, v in (info.properties or {}).items():
        if isinstance(k, bytes) and isinstance(v, bytes):
            props[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
    if props.get("v") != str(PROTOCOL_VERSION) or props.get("net") != network_id.hex():
        return None
    try:
        peer_id = props["id"]
        public_key_from_peer_id(peer_id)
        key = unb32(props["tk"])
        if len(key) != 32 or not info.port:
            return None
        addresses = tuple(f"tcp://{a}:{info.port}" for a in info.parsed_addresses(IPVersion.V4Only))[:8]
        if not addresses:
            return None
        caps = tuple(c for c in props.get("caps", "").split(",") if c)[:32]
        contact = PeerContact(peer_id=peer_id, transport_key=key, addresses=addresses,
                              capabilities=caps, profile=props.get("prof", "default")[:32])
        # same bounds as a contact received on the wire
        return decode_fields(PeerContact, encode_fields(contact), "txt")
    except (KeyError, RemoteProtocolError, LocalProtocolError, ValueError):
        return None


class Discovery:
    """Advertise this node and report candidate contacts to ``on_contact``."""

    def __init__(self, contact: PeerContact, network_id: bytes, port: int, hosts: list[str],
                 interfaces: list[str] | None,
                 on_contact: Callable[[PeerContact], None], counters) -> None:
        self.contact, self.network_id, self.port, self.hosts = contact, network_id, port, hosts
        self.interfaces = interfaces
        self.on_contact = on_contact
        self.counters = counters
        self.azc: AsyncZeroconf | None = None
        self.browser: AsyncServiceBrowser | None = None
        self.info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task] = set()
        self._resolving: set[str] = set()  # service names being looked up

    async def start(self) -> None:
        """Register and browse. On any failure what was opened is closed again (the
        multicast socket stayed bound for the node's life) and the error propagates."""
        kwargs = {"ip_version": IPVersion.V4Only}
        if self.interfaces is not None:
            kwargs["interfaces"] = self.interfaces
        self.azc = AsyncZeroconf(**kwargs)
        try:
            self.info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{self.contact.peer_id[:24]}-{self.port}.{SERVICE_TYPE}",
                addresses=[socket.inet_aton(h) for h in self.hosts],
                port=self.port,
                properties=txt_record(self.contact, self.network_id),
                server=f"chimera-{self.contact.peer_id[:16]}.local.",
            )
            await self.azc.async_register_service(self.info, allow_name_change=True)
            self.browser = AsyncServiceBrowser(self.azc.zeroconf, [SERVICE_TYPE],
                                               handlers=[self._on_change])
        except BaseException:
            azc, self.azc, self.info, self.browser = self.azc, None, None, None
            with contextlib.suppress(Exception):
                await azc.async_close()
            raise

    def _on_change(self, zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        # Anyone on the LAN can announce services: at most MAX_RESOLVING lookups run at once
        # (each waits up to 3 s), one per name; the rest are counted and dropped (a real
        # peer re-announces, and bootstrap and peer exchange do not depend on this).
        if name in self._resolving:
            return
        if len(self._resolving) >= MAX_RESOLVING:
            self.counters["discovery_resolves_dropped"] += 1
            return
        self._resolving.add(name)
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        try:
            if not await info.async_request(self.azc.zeroconf, 3000):
                return
        except Exception as exc:  # a broken advertisement must not hurt us
            self.counters["discovery_errors"] += 1
            log.debug("could not resolve %s: %s", name, exc)
            return
        finally:
            self._resolving.discard(name)
        contact = contact_from_service(info, self.network_id)
        if contact is None or contact.peer_id == self.contact.peer_id:
            return
        self.counters["discovery_hints"] += 1
        self.on_contact(contact)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.browser is not None:
            await self.browser.async_cancel()
        if self.azc is not None:
            if self.info is not None:
                await self.azc.async_unregister_service(self.info)
            await self.azc.async_close()
