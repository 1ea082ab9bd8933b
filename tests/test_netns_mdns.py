"""Real LAN discovery: peers in separate network namespaces on a bridge find each
other through mDNS alone (no bootstrap contacts). Root only."""

from __future__ import annotations

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
