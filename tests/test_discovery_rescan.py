"""mDNS follows the machine's interfaces: the change detection (pure) and the
re-registration state machine of :meth:`Discovery.refresh` (zeroconf replaced by a
fake). The real thing, in network namespaces: tests/test_netns_mdns.py."""

from __future__ import annotations

import asyncio
import collections

import pytest

from chimera.node import discovery as disc
from chimera.node.discovery import Binding, Discovery, Interface, plan_binding, resolve_interfaces
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.membership import PeerContact

LAN = {"lo": Interface(1, ("127.0.0.1",)), "eth0": Interface(2, ("192.168.1.20",)),
       "wlan0": Interface(3, ())}


def test_named_interfaces_resolve_to_their_addresses_and_all_watches_every_ipv4():
    assert resolve_interfaces(("eth0", "10.0.0.9"), LAN) == ["192.168.1.20", "10.0.0.9"]
    assert resolve_interfaces((), LAN) is None
    with pytest.raises(ValueError, match="'wlan0' has no IPv4 address"):
        resolve_interfaces(("wlan0",), LAN)
    with pytest.raises(ValueError, match="unknown interface or IPv4 address 'usb0'"):
        resolve_interfaces(("usb0",), LAN)
    named = plan_binding(("eth0",), LAN, ["192.168.1.20"])
    assert named.interfaces == ("192.168.1.20",)
    assert named.watched == {("eth0", 2, "192.168.1.20")}
    every = plan_binding((), LAN, ["192.168.1.20"])
    assert every.interfaces is None
    assert every.watched == {("lo", 1, "127.0.0.1"), ("eth0", 2, "192.168.1.20")}
    assert plan_binding(("10.0.0.9",), LAN, []).watched == {("", 0, "10.0.0.9")}  # not (yet) here


@pytest.mark.parametrize("interfaces", [("eth0",), ()])
def test_a_change_is_a_new_address_a_recreated_interface_or_other_hosts(interfaces):
    hosts = ["192.168.1.20"]
    before = plan_binding(interfaces, LAN, hosts)
    assert before.differs(None)
    assert not plan_binding(interfaces, dict(LAN), list(hosts)).differs(before)  # a poll, nothing new
    dhcp = {**LAN, "eth0": Interface(2, ("192.168.1.37",))}
    assert plan_binding(interfaces, dhcp, hosts).differs(before)
    replugged = {**LAN, "eth0": Interface(7, ("192.168.1.20",))}  # same name and address, new device
    assert plan_binding(interfaces, replugged, hosts).differs(before)
    assert plan_binding(interfaces, LAN, ["192.168.1.37"]).differs(before)
    two = plan_binding(interfaces, LAN, ["192.168.1.20", "10.0.0.9"])
    assert not plan_binding(interfaces, LAN, ["10.0.0.9", "192.168.1.20"]).differs(two)  # order only


def test_all_interfaces_notice_an_interface_coming_up_and_named_ones_ignore_it():
    up = {**LAN, "wlan0": Interface(3, ("192.168.4.2",))}
    assert plan_binding((), up, []).differs(plan_binding((), LAN, []))
    assert not plan_binding(("eth0",), up, []).differs(plan_binding(("eth0",), LAN, []))


class FakeZeroconf:
    """Stands for an AsyncZeroconf registration; records open and closed ones."""

    def __init__(self, log: list, plan: Binding) -> None:
        self.plan, self.log = plan, log
        log.append(("open", plan.interfaces, plan.hosts))


@pytest.fixture
def fake(monkeypatch):
    """A Discovery over a settable interface table; ``fail`` makes the next opens raise."""
    state = type("State", (), {})()
    state.table, state.hosts, state.fail, state.log = dict(LAN), ["192.168.1.20"], [], []

    async def _open(self, plan):
        if state.fail:
            raise state.fail.pop(0)
        self.azc, self.binding = FakeZeroconf(state.log, plan), plan

    async def _close_registration(self):
        if self.azc is not None:
            state.log.append(("close", self.binding.interfaces))
        self.azc = self.binding = None

    monkeypatch.setattr(disc, "interface_table", lambda: dict(state.table))
    monkeypatch.setattr(Discovery, "_open", _open)
    monkeypatch.setattr(Discovery, "_close_registration", _close_registration)
    me = SigningIdentity.generate()
    contact = PeerContact(peer_id=me.peer_id, transport_key=bytes(32), addresses=("tcp://192.168.1.20:7420",))
    state.counters = collections.Counter()

    def make(interfaces, *, follow_hosts=True, poll_s=0.01):
        return Discovery(contact, bytes(16), 7420, ["192.168.1.20"], interfaces, lambda c: None, state.counters,
                         hosts_now=(lambda: list(state.hosts)) if follow_hosts else None, poll_s=poll_s)

    state.make = make
    return state


async def test_a_named_interface_without_ipv4_starts_advertising_once_it_has_one(fake):
    d = fake.make(("wlan0",))
    with pytest.raises(ValueError, match="no IPv4"):
        await d.start()  # the node logs it and starts without mDNS
    assert not d.advertising
    assert not await d.refresh()  # still none
    fake.table["wlan0"] = Interface(3, ("192.168.4.2",))
    fake.hosts = ["192.168.1.20", "192.168.4.2"]
    assert await d.refresh()
    assert d.advertising and fake.log == [("open", ("192.168.4.2",), ("192.168.1.20", "192.168.4.2"))]
    assert fake.counters["discovery_readvertised"] == 1
    assert not await d.refresh()  # nothing changed: the registration stays
    assert len(fake.log) == 1


async def test_a_new_address_closes_the_registration_and_makes_it_again(fake):
    d = fake.make(("eth0",))
    await d.start()
    fake.table["eth0"] = Interface(2, ("192.168.1.37",))
    fake.hosts = ["192.168.1.37"]
    assert await d.refresh()
    assert fake.log == [("open", ("192.168.1.20",), ("192.168.1.20",)), ("close", ("192.168.1.20",)),
                        ("open", ("192.168.1.37",), ("192.168.1.37",))]
    assert fake.counters["discovery_readvertised"] == 1  # the start is not counted


async def test_pinned_hosts_stay_while_the_interfaces_change(fake):
    d = fake.make((), follow_hosts=False)
    await d.start()
    fake.table["wlan0"] = Interface(3, ("192.168.4.2",))
    fake.hosts = ["192.168.4.2"]  # not asked: the operator pinned advertise_hosts
    assert await d.refresh()
    assert fake.log[-1] == ("open", None, ("192.168.1.20",))


async def test_a_vanished_interface_stops_advertising_until_it_is_back(fake):
    d = fake.make(("eth0",))
    await d.start()
    del fake.table["eth0"]
    assert not await d.refresh()
    assert not d.advertising and fake.log[-1] == ("close", ("192.168.1.20",))
    assert not await d.refresh()
    fake.table["eth0"] = Interface(9, ("192.168.1.20",))
    assert await d.refresh() and d.advertising


async def test_a_failing_registration_is_counted_and_tried_again_at_the_next_check(fake):
    d = fake.make(("eth0",))
    await d.start()
    fake.table["eth0"] = Interface(2, ("192.168.1.37",))
    fake.fail = [OSError(99, "Cannot assign requested address"), RuntimeError("zeroconf bug")]
    assert not await d.refresh() and not d.advertising
    assert not await d.refresh()  # same plan, still not advertising: tried again
    assert fake.counters["discovery_readvertise_errors"] == 2
    assert await d.refresh() and d.advertising
    assert fake.counters["discovery_readvertised"] == 1


async def test_follow_polls_until_close_and_survives_a_bug(fake, monkeypatch):
    d = fake.make(("wlan0",))
    calls = []
    real = Discovery.plan

    def flaky(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("a bug")  # not a network state: counted, logged, the checks go on
        return real(self)

    monkeypatch.setattr(Discovery, "plan", flaky)
    d.follow()
    fake.table["wlan0"] = Interface(3, ("192.168.4.2",))
    for _ in range(500):
        if d.advertising and len(calls) > 3:
            break
        await asyncio.sleep(0.01)
    assert d.advertising
    assert fake.counters["discovery_readvertise_errors"] == 1
    await d.close()
    assert d._follow_task.done() and not d.advertising
    n = len(calls)
    await asyncio.sleep(0.05)
    assert len(calls) == n


async def test_no_polling_when_the_interval_is_zero(fake):
    d = fake.make(("eth0",), poll_s=0)
    await d.start()
    d.follow()
    assert d._follow_task is None
    await d.close()
