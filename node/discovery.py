"""LAN discovery with zeroconf (mDNS/DNS-SD, RFC 6762/6763).

Each node registers ``<instance>._chimera._tcp.local.`` with a TXT record
(docs/PROTOCOL.md, Discovery) and browses for the same type. Whatever is heard
is only a *hint*: it becomes a membership candidate, and the peer is believed
only after the CURVE handshake and its own signed Hello.

The interfaces (and, unless pinned, the advertised IPv4 hosts) are read again every
``mdns_interface_poll_s``: when the addresses changed (a DHCP lease, ``wlan0`` coming up
after the node started, an interface removed), the registration is closed and made
again on the new ones (:meth:`Discovery.refresh`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from typing import Callable, Mapping, NamedTuple, Sequence

import psutil
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from chimera.protocol import PROTOCOL_VERSION
from chimera.protocol.errors import LocalProtocolError, RemoteProtocolError
from chimera.protocol.identity import b32, public_key_from_peer_id, unb32
from chimera.protocol.membership import PeerContact
from chimera.protocol.messages import decode_fields, encode_fields

from .actors import wait_event

SERVICE_TYPE = "_chimera._tcp.local."
MAX_RESOLVING = 64
"""Service lookups in flight at once (each waits up to 3 s for an answer)."""
GOODBYE_WAIT_S = 2.0
"""At most this long for the goodbye packets at close (3 packets 125 ms apart)."""
log = logging.getLogger("chimera.discovery")


class Interface(NamedTuple):
    """One network interface as seen at one moment."""

    index: int  # kernel interface index (0: unknown); a re-created interface gets a new one
    ipv4: tuple[str, ...]


def interface_table() -> dict[str, Interface]:
    """This host's interfaces now: name -> :class:`Interface` (psutil, ``if_nametoindex``)."""
    table = {}
    for name, addrs in psutil.net_if_addrs().items():
        try:
            index = socket.if_nametoindex(name)
        except OSError:  # gone meanwhile, or a name the call does not take (Windows)
            index = 0
        table[name] = Interface(index, tuple(a.address for a in addrs if a.family == socket.AF_INET))
    return table


def resolve_interfaces(names_or_ips: Sequence[str],
                       table: Mapping[str, Interface] | None = None) -> list[str] | None:
    """Map interface names (``eth0``) or IPv4 addresses to IPv4 addresses, in ``table``
    (default: :func:`interface_table` now).

    Returns None for "all interfaces".

    Raises:
        ValueError: an unknown name, or an interface without an IPv4 address (down, not
            configured yet, IPv6 only): zeroconf given no address answers and asks nothing,
            so mDNS would be silently off.
    """
    if not names_or_ips:
        return None
    if table is None:
        table = interface_table()
    out = []
    for item in names_or_ips:
        if item in table:
            found = table[item].ipv4
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


class Binding(NamedTuple):
    """What one registration runs on."""

    interfaces: tuple[str, ...] | None  # zeroconf's IPv4 interfaces; None: all
    watched: frozenset[tuple[str, int, str]]  # (interface, index, IPv4) of those addresses
    hosts: tuple[str, ...]  # the A records

    def differs(self, other: "Binding | None") -> bool:
        """Whether a registration on ``other`` must be made again for this one: another
        address (or interface carrying it) to listen on, or other hosts to advertise."""
        return other is None or self.watched != other.watched or set(self.hosts) != set(other.hosts)


def plan_binding(names_or_ips: Sequence[str], table: Mapping[str, Interface],
                 hosts: Sequence[str]) -> Binding:
    """The :class:`Binding` for the configured interfaces in ``table`` (all: every IPv4
    address there) advertising ``hosts``.

    Raises:
        ValueError: as :func:`resolve_interfaces`.
    """
    resolved = resolve_interfaces(names_or_ips, table)
    owner = {addr: (name, iface.index) for name, iface in table.items() for addr in iface.ipv4}
    addrs = [a for iface in table.values() for a in iface.ipv4] if resolved is None else resolved
    return Binding(None if resolved is None else tuple(dict.fromkeys(resolved)),
                   frozenset((*owner.get(a, ("", 0)), a) for a in addrs), tuple(hosts))


def txt_record(contact: PeerContact, network_id: bytes) -> dict[str, str]:
    return {
        "v": str(PROTOCOL_VERSION),
        "net": network_id.hex(),
        "id": contact.peer_id,
        "tk": b32(contact.transport_key),
        "caps": ",".join(contact.capabilities),
        "prof": contact.profile,
    }


def _dialable(address: str) -> bool:
    """An A record a peer could be listening on: not 0.0.0.0, multicast, broadcast or the
    reserved 240/4 (a forged record with those made the node dial them; 0.0.0.0 reaches this
    host's own services)."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return not (ip.is_unspecified or ip.is_multicast or ip.is_reserved)


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
        addresses = tuple(f"tcp://{a}:{info.port}" for a in info.parsed_addresses(IPVersion.V4Only)
                          if _dialable(a))[:8]
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
    """Advertise this node and report candidate contacts to ``on_contact``.

    ``interfaces``: the configured names or IPv4 addresses (empty or None: all).
    ``hosts``: the IPv4 addresses to advertise; ``hosts_now``, when given, is called at
    every check instead (hosts not pinned by the operator follow the host's addresses).
    ``poll_s``: how often :meth:`follow` checks the interfaces (0: never).
    """

    def __init__(self, contact: PeerContact, network_id: bytes, port: int, hosts: Sequence[str],
                 interfaces: Sequence[str] | None,
                 on_contact: Callable[[PeerContact], None], counters, *,
                 hosts_now: Callable[[], Sequence[str]] | None = None, poll_s: float = 0.0) -> None:
        self.contact, self.network_id, self.port = contact, network_id, port
        self.hosts = list(hosts)
        self.hosts_now = hosts_now
        self.interfaces = tuple(interfaces or ())
        self.poll_s = poll_s
        self.on_contact = on_contact
        self.counters = counters
        self.azc: AsyncZeroconf | None = None
        self.browser: AsyncServiceBrowser | None = None
        self.info: AsyncServiceInfo | None = None
        self.binding: Binding | None = None  # what the registration runs on; None: not advertising
        self._tasks: set[asyncio.Task] = set()
        self._resolving: set[str] = set()  # service names being looked up
        self._follow_task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._last_error = ""  # of the failing state we are in ("" while none): logged once

    @property
    def advertising(self) -> bool:
        return self.azc is not None

    def plan(self) -> Binding:
        """The binding for the interfaces and hosts as they are now.

        Raises:
            ValueError: as :func:`resolve_interfaces`.
        """
        hosts = self.hosts_now() if self.hosts_now is not None else self.hosts
        return plan_binding(self.interfaces, interface_table(), hosts)

    async def start(self) -> None:
        """Register and browse on the interfaces as they are now. On any failure what was
        opened is closed again (the multicast socket stayed bound for the node's life) and
        the error propagates (ValueError: see :func:`resolve_interfaces`; OSError: zeroconf
        could not bind or join)."""
        try:
            await self._open(self.plan())
        except Exception as exc:
            self._last_error = str(exc)  # the caller reports it; checks repeat it only if it changes
            raise

    def follow(self) -> None:
        """Check the interfaces every ``poll_s`` from now on (:meth:`refresh`), whether or
        not :meth:`start` succeeded; :meth:`close` ends it. Nothing when ``poll_s`` is 0."""
        if self.poll_s > 0 and self._follow_task is None:
            self._follow_task = asyncio.get_running_loop().create_task(self._follow(), name="mdns-interfaces")

    async def _follow(self) -> None:
        while not await wait_event(self._stopping, self.poll_s):
            try:
                await self.refresh()
            except Exception:  # a bug here must not end the checks, nor reach the node
                self.counters["discovery_readvertise_errors"] += 1
                log.exception("mDNS interface check failed")

    async def refresh(self) -> bool:
        """One check: when the addresses to listen on or to advertise changed (or the last
        registration failed or stopped), close the registration and make it again on the
        new ones. True when it did. Never raises for a bad state: an interface gone or
        without IPv4 stops advertising until it is back; a failed registration is counted
        (``discovery_readvertise_errors``), logged once, and tried again at the next check."""
        try:
            plan = self.plan()
        except (OSError, ValueError) as exc:
            if self.advertising:
                log.warning("mDNS stopped: %s; interfaces checked again every %g s", exc, self.poll_s)
                self._last_error = str(exc)
                await self._close_registration()
            elif str(exc) != self._last_error:
                log.info("mDNS still waiting: %s", exc)
                self._last_error = str(exc)
            return False
        if self.advertising and not plan.differs(self.binding):
            return False
        old = self.binding
        await self._close_registration()
        if self._stopping.is_set():
            return False
        try:
            await self._open(plan)
        except Exception as exc:  # OSError, zeroconf's own errors: the next check tries again
            self.counters["discovery_readvertise_errors"] += 1
            level = logging.DEBUG if str(exc) == self._last_error else logging.WARNING
            log.log(level, "mDNS could not start on interfaces %s (hosts %s): %s; trying again in %g s",
                    _show(plan.interfaces), ", ".join(plan.hosts), exc, self.poll_s)
            self._last_error = str(exc)
            return False
        self._last_error = ""
        self.counters["discovery_readvertised"] += 1
        before = "not advertising" if old is None else \
            f"interfaces {_show(old.interfaces)}, hosts {', '.join(old.hosts)}"
        log.info("mDNS advertising on interfaces %s, hosts %s (before: %s)",
                 _show(plan.interfaces), ", ".join(plan.hosts), before)
        return True

    async def _open(self, plan: Binding) -> None:
        kwargs = {"ip_version": IPVersion.V4Only}
        if plan.interfaces is not None:
            kwargs["interfaces"] = list(plan.interfaces)
        azc = AsyncZeroconf(**kwargs)
        try:
            info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{self.contact.peer_id[:24]}-{self.port}.{SERVICE_TYPE}",
                addresses=[socket.inet_aton(h) for h in plan.hosts],
                port=self.port,
                properties=txt_record(self.contact, self.network_id),
                server=f"chimera-{self.contact.peer_id[:16]}.local.",
            )
            await azc.async_register_service(info, allow_name_change=True)
            browser = AsyncServiceBrowser(azc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change])
        except BaseException:
            with contextlib.suppress(Exception):
                await azc.async_close()
            raise
        self.azc, self.info, self.browser, self.binding = azc, info, browser, plan
        self.hosts = list(plan.hosts)

    async def _close_registration(self) -> None:
        """Stop lookups, browsing and the registration (goodbye packets), close zeroconf's
        sockets. Errors are logged: the addresses may be gone already."""
        azc, info, browser = self.azc, self.info, self.browser
        self.azc, self.info, self.browser, self.binding = None, None, None, None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resolving.clear()
        if browser is not None:
            with _logged("cancelling the mDNS browser"):
                await browser.async_cancel()
        if azc is not None:
            if info is not None:
                with _logged("unregistering the mDNS service"):
                    # the call only queues the goodbyes (TTL 0, RFC 6762 §10.1): wait until they
                    # are sent (3 packets, 125 ms apart) before closing the sockets; without the
                    # wait none was sent and browsers kept our record for its TTL (SRV 120 s)
                    goodbyes = await azc.async_unregister_service(info)
                    await asyncio.wait_for(goodbyes, GOODBYE_WAIT_S)
            with _logged("closing zeroconf"):
                await azc.async_close()

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
            azc = self.azc
            if azc is None:
                return
            if not await info.async_request(azc.zeroconf, 3000):
                self.counters["discovery_errors"] += 1  # no answer within 3 s: a failed resolve
                log.debug("no answer resolving %s within 3 s", name)
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
        """End the checks (one under way finishes first) and the registration."""
        self._stopping.set()
        if self._follow_task is not None:
            with contextlib.suppress(Exception):
                await self._follow_task
        await self._close_registration()


def _show(interfaces: tuple[str, ...] | None) -> str:
    return "all" if interfaces is None else ", ".join(interfaces)


@contextlib.contextmanager
def _logged(what: str):
    """Log (debug) and swallow an error of one closing step: the addresses may be gone."""
    try:
        yield
    except Exception as exc:
        log.debug("%s: %s", what, exc)
