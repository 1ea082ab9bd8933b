"""Real LAN discovery: peers in separate network namespaces on a bridge find each
other through mDNS alone (no bootstrap contacts). Root only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from chimera.node import admin
from chimera.node.keys import save_network
from chimera.protocol.network import Network
from tests.conftest import wait_until
from tests.netns import LanBridge, netns_available

ok, why = netns_available()
pytestmark = [pytest.mark.netns, pytest.mark.slow,
              pytest.mark.skipif(not ok, reason=f"needs Linux network namespaces: {why}")]


def test_three_namespaced_peers_discover_each_other_by_mdns_only(tmp_path: Path):
    network = Network.create(name="lan")
    n = 3
    with LanBridge(n) as lan:
        dirs, procs = [], []
        for i, host in enumerate(lan.hosts):
            d = tmp_path / f"peer-{i}"
            save_network(d, network)
            dirs.append(d)
            procs.append(lan.popen(i, [
                sys.executable, "-m", "chimera.node.cli", "node", "--data-dir", str(d),
                "--listen", host.ip, "--port", "7420", "--interface", host.ip,
                "--set", "probe_interval_s=0.5", "--set", "probe_timeout_s=0.2",
            ], stdout=open(tmp_path / f"peer-{i}.log", "wb"), stderr=-2))
        ids = []
        for d, p in zip(dirs, procs):
            assert wait_until(lambda: p.poll() is None and _status(d) is not None, 60), \
                (tmp_path / "peer-0.log").read_text()[-2000:]
            ids.append(_status(d)["peer_id"])
            assert _status(d)["mdns"] is True

        def mesh() -> bool:
            for i, d in enumerate(dirs):
                rows = admin.call(d, "peers")
                alive = {r["peer_id"] for r in rows if r["state"] == "alive"}
                if alive != set(ids) - {ids[i]}:
                    return False
            return True

        assert wait_until(mesh, timeout_s=60), [admin.call(d, "peers") for d in dirs]
        rows = admin.call(dirs[0], "peers")
        assert {r["addresses"][0] for r in rows} == {f"tcp://{h.ip}:7420" for h in lan.hosts[1:]}
        for p in procs:
            assert lan.terminate(p) == 0


def _status(d: Path):
    try:
        return admin.call(d, "status", timeout_s=2)
    except admin.AdminError:
        return None


def test_an_interface_without_ipv4_is_an_error_not_silently_no_mdns():
    """``--interface wlan0`` before wlan0 has an address (an edge box booting) gave zeroconf
    an empty interface list: no socket answered or asked, and nothing said so."""
    code = ("from chimera.node.discovery import resolve_interfaces\n"
            "print(resolve_interfaces(('lan0',)))\n"
            "try:\n    resolve_interfaces(('nov4',))\n"
            "except ValueError as exc:\n    print('ValueError:', exc)\n")
    with LanBridge(1) as lan:
        lan.run(0, ["ip", "link", "add", "nov4", "type", "veth", "peer", "name", "nov4b"], check=True)
        lan.run(0, ["ip", "link", "set", "nov4", "up"], check=True)  # up, IPv6 link-local only
        out = lan.run(0, [sys.executable, "-c", code], check=True).stdout.splitlines()
    assert out[0] == f"['{lan.hosts[0].ip}']"
    assert out[1] == "ValueError: interface 'nov4' has no IPv4 address (down or not configured yet?)"


def test_an_announcement_flood_runs_a_bounded_number_of_lookups():
    """Each Added/Updated announcement started a 3-second lookup task, without bound."""
    code = """
import asyncio, collections
from zeroconf import ServiceStateChange
from chimera.node.discovery import MAX_RESOLVING, SERVICE_TYPE, Discovery
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.membership import PeerContact

async def main():
    me = SigningIdentity.generate()
    contact = PeerContact(peer_id=me.peer_id, transport_key=bytes(32), addresses=("tcp://HOST_IP:7420",))
    counters = collections.Counter()
    d = Discovery(contact, bytes(32), 7420, ["HOST_IP"], ["HOST_IP"], lambda c: None, counters)
    await d.start()
    for i in range(300):  # nobody answers these: every lookup waits its 3 s
        d._on_change(None, SERVICE_TYPE, f"forged-{i % 200}.{SERVICE_TYPE}", ServiceStateChange.Added)
    print(len(d._tasks), MAX_RESOLVING, counters["discovery_resolves_dropped"])
    await d.close()

asyncio.run(main())
"""
    with LanBridge(1) as lan:
        ip = lan.hosts[0].ip
        out = lan.run(0, [sys.executable, "-c", code.replace("HOST_IP", ip)], check=True, timeout=60).stdout.split()
    running, cap, dropped = map(int, out)
    assert running == cap == 64 and dropped == 300 - 64 - 64  # a repeat of a name in flight: no lookup, no drop


def _node(lan: LanBridge, i: int, d: Path, log: Path, *args: str):
    return lan.popen(i, [sys.executable, "-m", "chimera.node.cli", "node", "--data-dir", str(d), "--port", "7420",
                         "--set", "probe_interval_s=0.5", "--set", "probe_timeout_s=0.2", *args],
                     stdout=open(log, "wb"), stderr=-2)


def test_a_node_whose_interface_gets_ipv4_after_start_is_found_there_by_mdns(tmp_path: Path):
    """``--interface lan0`` before lan0 had an address (a Pi booting before its DHCP lease)
    turned mDNS off until a restart; now the node starts advertising once lan0 has one."""
    network = Network.create(name="lan")
    with LanBridge(2) as lan:
        a, b = lan.hosts
        lan.run(0, ["ip", "-4", "addr", "flush", "dev", a.ifname], check=True)  # its routes go with it
        da, db = tmp_path / "a", tmp_path / "b"
        for d in (da, db):
            save_network(d, network)
        pa = _node(lan, 0, da, tmp_path / "a.log", "--interface", a.ifname, "--advertise", a.ip,
                   "--set", "mdns_interface_poll_s=0.2")
        pb = _node(lan, 1, db, tmp_path / "b.log", "--listen", b.ip, "--interface", b.ip)
        for d, p in ((da, pa), (db, pb)):
            assert wait_until(lambda: p.poll() is None and _status(d) is not None, 60), \
                (tmp_path / "a.log").read_text()[-2000:]
        assert _status(da)["mdns"] is False
        assert _status(db)["mdns"] is True
        a_id = _status(da)["peer_id"]
        lan.run(0, ["ip", "addr", "add", a.cidr, "dev", a.ifname], check=True)  # the lease arrives
        lan.run(0, ["ip", "route", "replace", "224.0.0.0/4", "dev", a.ifname], check=True)

        def b_has_a() -> bool:
            return any(r["peer_id"] == a_id and r["state"] == "alive"
                       and r["addresses"][0] == f"tcp://{a.ip}:7420" for r in admin.call(db, "peers"))

        assert wait_until(b_has_a, 30), (admin.call(db, "peers"), (tmp_path / "a.log").read_text()[-2000:])
        status = _status(da)
        assert status["mdns"] is True and status["counters"]["discovery_readvertised"] == 1
        text = (tmp_path / "a.log").read_text()
        assert "mDNS discovery unavailable for now (interface 'lan0' has no IPv4 address" in text
        assert f"mDNS advertising on interfaces {a.ip}, hosts {a.ip} (before: not advertising)" in text
        for p in (pa, pb):
            assert lan.terminate(p) == 0


BROWSE = """
import asyncio, sys
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
from chimera.node.discovery import SERVICE_TYPE

async def main(want):
    azc = AsyncZeroconf(interfaces=[sys.argv[2]], ip_version=IPVersion.V4Only)
    names = set()
    AsyncServiceBrowser(azc.zeroconf, [SERVICE_TYPE], handlers=[lambda name, **kw: names.add(name)])
    seen = set()
    while True:  # ask again and again: a cached answer may be the old address
        for name in list(names):
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if await info.async_request(azc.zeroconf, 500):
                got = info.parsed_addresses(IPVersion.V4Only)
                if tuple(got) not in seen:
                    seen.add(tuple(got))
                    print(name, got, flush=True)
                if want in got:
                    await azc.async_close()
                    return
        await asyncio.sleep(0.2)

asyncio.run(main(sys.argv[1]))
"""


def test_the_advertised_address_follows_a_changed_address(tmp_path: Path):
    """A DHCP lease that changes the address: the node's mDNS record (A records and the
    interface it listens on) moves to the new address; a browser on another host sees it."""
    network = Network.create(name="lan")
    with LanBridge(2) as lan:
        a, b = lan.hosts
        new_ip = a.ip.rsplit(".", 1)[0] + ".101"
        save_network(tmp_path / "a", network)
        pa = _node(lan, 0, tmp_path / "a", tmp_path / "a.log", "--interface", a.ifname,
                   "--set", "mdns_interface_poll_s=0.2")
        assert wait_until(lambda: pa.poll() is None and _status(tmp_path / "a") is not None, 60), \
            (tmp_path / "a.log").read_text()[-2000:]
        assert _status(tmp_path / "a")["mdns"] is True
        for ip in (a.ip, new_ip):
            browser = lan.popen(1, [sys.executable, "-c", BROWSE, ip, b.ip], stdout=subprocess.PIPE, text=True)
            if ip == new_ip:  # the lease changes
                lan.run(0, ["ip", "addr", "del", a.cidr, "dev", a.ifname], check=True)
                lan.run(0, ["ip", "addr", "add", f"{new_ip}/24", "dev", a.ifname], check=True)
                lan.run(0, ["ip", "route", "replace", "224.0.0.0/4", "dev", a.ifname], check=True)
            try:
                out, _ = browser.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                lan.terminate(browser)
                out = browser.stdout.read() if browser.stdout else ""
                pytest.fail(f"no mDNS record with {ip}: {out}\n{(tmp_path / 'a.log').read_text()[-2000:]}")
            assert browser.returncode == 0 and f"'{ip}'" in out, out
        status = _status(tmp_path / "a")
        assert status["mdns"] is True and status["counters"]["discovery_readvertised"] >= 1
        # (the address is deleted, then added, by two commands: a poll between them may see the
        # interface without an address and stop advertising until the new one appears)
        assert re.search(rf"mDNS advertising on interfaces {re.escape(new_ip)}, hosts {re.escape(new_ip)} "
                         rf"\(before: (interfaces {re.escape(a.ip)}, hosts {re.escape(a.ip)}|not advertising)\)",
                         (tmp_path / "a.log").read_text())
        assert lan.terminate(pa) == 0


def test_re_registering_leaves_no_socket_or_thread_behind():
    """Each change closes the old zeroconf (sockets, tasks) before the new one opens; an
    interface deleted under it stops advertising without an error, and a registration
    zeroconf refuses (an address not on this host yet) is counted and retried."""
    code = """
import asyncio, collections, os, subprocess, threading
from chimera.node.discovery import Discovery
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.membership import PeerContact

def ip(*args):
    subprocess.run(["ip", *args], check=True)

def veth(addr):
    ip("link", "add", "v0", "type", "veth", "peer", "name", "v0b")
    ip("link", "set", "v0b", "up")
    ip("link", "set", "v0", "up")
    ip("addr", "add", addr, "dev", "v0")

async def main():
    me = SigningIdentity.generate()
    contact = PeerContact(peer_id=me.peer_id, transport_key=bytes(32), addresses=("tcp://10.99.0.1:7420",))
    counters = collections.Counter()
    veth("10.99.0.1/24")
    d = Discovery(contact, bytes(16), 7420, ["10.99.0.1"], ("v0", "10.98.0.1"), lambda c: None, counters,
                  poll_s=0)
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    try:
        await d.start()
    except OSError as exc:  # 10.98.0.1 is not here (yet)
        print("start", type(exc).__name__)
    print("refresh", await d.refresh(), d.advertising, counters["discovery_readvertise_errors"])
    ip("addr", "add", "10.98.0.1/24", "dev", "v0")
    print("refresh", await d.refresh(), d.advertising, sorted(d.binding.interfaces))
    ip("addr", "del", "10.99.0.1/24", "dev", "v0")
    ip("addr", "add", "10.99.0.2/24", "dev", "v0")
    print("refresh", await d.refresh(), d.advertising, sorted(d.binding.interfaces))
    ip("link", "del", "v0")
    print("vanished", await d.refresh(), d.advertising)
    veth("10.99.0.2/24")
    ip("addr", "add", "10.98.0.1/24", "dev", "v0")
    print("back", await d.refresh(), d.advertising)
    await d.close()
    print("left", len(os.listdir("/proc/self/fd")) - fds, threading.active_count() - threads,
          counters["discovery_readvertised"], counters["discovery_readvertise_errors"])

asyncio.run(main())
"""
    with LanBridge(1) as lan:
        out = lan.run(0, [sys.executable, "-c", code], check=True, timeout=60).stdout.splitlines()
    assert out == ["start OSError",  # ENODEV: no interface with that address to join on
                   "refresh False False 1",
                   "refresh True True ['10.98.0.1', '10.99.0.1']",
                   "refresh True True ['10.98.0.1', '10.99.0.2']",
                   "vanished False False",
                   "back True True",
                   "left 0 0 3 1"]
