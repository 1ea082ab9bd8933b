"""Interop: LAN discovery written from docs/PROTOCOL.md §11 alone (tests/independent_discovery.py,
no ``chimera`` import) against a real ``chimera node`` with mDNS on, on an emulated LAN of network
namespaces (tests/netns.py). Root only.

    h0: the real node (``chimera network init``, then ``chimera node --interface H0``)
    h1: the clean-room browser, advertiser and peers (tests/independent_peer.py)
    h2: a forger of raw mDNS responses (one source)
"""

from __future__ import annotations

import ast
import secrets
import subprocess
import sys
from pathlib import Path

import nacl.signing
import pytest

from tests.netns import LanBridge, netns_available

ok, why = netns_available()
pytestmark = [pytest.mark.netns, pytest.mark.slow,
              pytest.mark.skipif(not ok, reason=f"needs Linux network namespaces: {why}")]

from chimera.node import admin  # noqa: E402  (test file only: reads the real node's answers)
from tests import independent_discovery as disc  # noqa: E402
from tests import independent_peer as ip  # noqa: E402
from tests.conftest import wait_until  # noqa: E402

CLI = [sys.executable, "-m", "chimera.node.cli"]
PORT = 7420


class Lan:
    """The module's LAN: one real node on h0, the clean-room parts on h1 and h2."""

    def __init__(self, root: Path) -> None:
        self.bridge = LanBridge(3, prefix="chmdisc").start()
        self.h0, self.h1, self.h2 = self.bridge.hosts
        self.root = root
        self.data_dir = root / "node"
        out = subprocess.run([*CLI, "network", "init", "--data-dir", str(self.data_dir), "--name", "disc"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        self.network = ip.Network.from_token(out.stdout.strip())
        self.log_path = root / "node.log"
        self.proc = self.bridge.popen(0, [
            *CLI, "node", "--data-dir", str(self.data_dir), "--listen", self.h0.ip, "--port", str(PORT),
            "--interface", self.h0.ip, "--set", "probe_interval_s=0.5", "--set", "probe_timeout_s=0.2"],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)
        assert wait_until(lambda: self.proc.poll() is None and self._status() is not None, 60), self.log()
        self.node_id = self.status()["peer_id"]
        self.closers: list = []

    def in_h(self, host, make):
        """Build something inside a host namespace; it is closed at teardown."""
        obj = disc.in_netns(host.netns, make)
        self.closers.append(obj.close)
        return obj

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def _status(self):
        try:
            return admin.call(self.data_dir, "status", timeout_s=5)
        except admin.AdminError:
            return None

    def status(self) -> dict:
        return admin.call(self.data_dir, "status", timeout_s=10)

    def counter(self, name: str) -> int:
        return int(self.status()["counters"].get(name, 0))

    def alive(self) -> set[str]:
        return {r["peer_id"] for r in admin.call(self.data_dir, "peers", timeout_s=10) if r["state"] == "alive"}

    def peers(self) -> dict[str, dict]:
        return {r["peer_id"]: r for r in admin.call(self.data_dir, "peers", timeout_s=10)}

    def stop_node(self) -> int | None:
        """SIGTERM the node (once) and return its exit status."""
        if self.proc.poll() is None:
            self.bridge.terminate(self.proc, grace=30)
        return self.proc.returncode

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception:
                pass
        self.bridge.close()


@pytest.fixture(scope="module")
def lan(tmp_path_factory):
    world = Lan(tmp_path_factory.mktemp("disc"))
    try:
        yield world
    finally:
        world.close()


@pytest.fixture(scope="module")
def browser(lan):
    return lan.in_h(lan.h1, lambda: disc.Browser(lan.h1.ip, lan.network.network_id))


@pytest.fixture(scope="module")
def peer1(lan):
    return lan.in_h(lan.h1, lambda: ip.IndependentPeer(lan.network, host=lan.h1.ip))


@pytest.fixture(scope="module")
def advertised(lan):
    """A clean-room peer on h1 that the node learns of by mDNS only, and its registration."""
    peer = lan.in_h(lan.h1, lambda: ip.IndependentPeer(lan.network, host=lan.h1.ip))
    adv = lan.in_h(lan.h1, lambda: disc.Advertiser(lan.h1.ip))
    info = adv.advertise(lan.network.network_id, peer.peer_id, peer.transport_public, peer.port, [lan.h1.ip],
                         peer.CAPABILITIES)
    return peer, adv, info


@pytest.fixture(scope="module")
def trap(lan):
    return lan.in_h(lan.h1, lambda: disc.TrapPeer(lan.network, host=lan.h1.ip))


@pytest.fixture(scope="module")
def forger(lan):
    return lan.in_h(lan.h2, lambda: disc.Forger(lan.h2.ip))


def _fresh_id() -> str:
    return ip.peer_id_of(bytes(nacl.signing.SigningKey.generate().verify_key))


def _forged(lan, trap, tag: str, peer_id: str | None = None, **txt_overrides) -> disc.Record:
    """A record that §11 accepts, naming a fresh id at the trap's address and key, with TXT
    values replaced (a value of None leaves the key out; bytes are put in as they are)."""
    pid = peer_id or _fresh_id()
    values: dict[str, object] = {"v": "1", "net": lan.network.network_id.hex(), "id": pid,
                                 "tk": ip.b32(trap.transport_public), "caps": "membership,echo", "prof": "default"}
    values.update(txt_overrides)
    txt = []
    for key, value in values.items():
        if value is None:
            continue
        txt.append(key.encode() + b"=" + (value if isinstance(value, bytes) else str(value).encode()))
    return disc.Record(f"{tag}-{pid[:8]}", txt, trap.port, f"forged-{tag}-{pid[:8]}.local.", [lan.h1.ip])


def _hinted(trap, record: disc.Record) -> bool:
    return trap.addressed[disc.txt_map(record.txt)["id"]] > 0


# ---------------------------------------------------------------------------------------


def test_the_implementation_imports_nothing_from_chimera():
    tree = ast.parse(Path(disc.__file__).read_text())
    imported = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] == "chimera"}, imported
    assert {m for m in imported if m.split(".")[0] == "tests"} <= {"tests"}, imported  # the clean-room peer only
    assert {m.split(".")[0] for m in imported} - set(sys.stdlib_module_names) <= {"msgpack", "zmq", "zeroconf",
                                                                                   "tests"}, imported


def test_the_browser_derives_the_nodes_contact_and_joins_it(lan, browser, peer1):
    assert lan.status()["mdns"] is True
    assert browser.wait_for(lambda v: browser.find(lan.node_id) is not None, 30), (browser.view, lan.log())
    cand = browser.find(lan.node_id)
    status = lan.status()
    # §11: everything of the contact comes from the record: id, tk, the A records and SRV port.
    assert cand.peer_id == status["peer_id"]
    assert ip.fingerprint(cand.transport_key) == status["transport_key_fingerprint"]
    assert cand.addresses == (f"tcp://{lan.h0.ip}:{PORT}",) and cand.addresses[0] in status["addresses"]
    assert cand.profile == "default"
    assert {"membership", "echo", "signed_alive"} <= set(cand.capabilities)
    # §11's names (not parsed by a receiver, but what the node registers on a LAN without clashes)
    name = next(n for n, c in browser.view.candidates.items() if c.peer_id == lan.node_id)
    assert name == disc.instance_name(lan.node_id, PORT)
    info = browser.zc.get_service_info(disc.SERVICE_TYPE, name, timeout=3000)
    assert info is not None and info.server == disc.host_name(lan.node_id)
    txt = disc.txt_map(disc.parse_txt_rdata(info.text))
    assert set(txt) == {"v", "net", "id", "tk", "caps", "prof"}, txt
    assert txt["tk"] == ip.b32(cand.transport_key)  # canonical spelling (§12.4)
    # The candidate is enough to join: our hello, the node's hello back, each holds the other alive.
    disc.join_candidate(peer1, cand)
    assert peer1.wait_for(lambda: lan.node_id in peer1.members, 30), (peer1.stats, lan.log())
    held = peer1.members[lan.node_id].contact
    assert held["transport_key"] == cand.transport_key and held["addresses"][0] == cand.addresses[0]
    assert tuple(held["capabilities"]) == cand.capabilities and held["profile"] == cand.profile
    assert wait_until(lambda: peer1.peer_id in lan.alive(), 30), lan.peers()


def test_an_advertised_peer_is_found_by_the_node_and_verified_by_its_hello(lan, advertised, browser):
    peer, _, info = advertised
    hints_before = lan.counter("discovery_hints")
    # No bootstrap contact, no add_contact: the node learns of the peer by its record only.
    assert peer.wait_for(lambda: any(h.sender_id == lan.node_id for h in peer.hellos), 30), \
        (peer.stats, lan.log())
    first = next(h for h in peer.hellos if h.sender_id == lan.node_id)
    assert first.recipient == peer.public_key  # §9.1: recipient = the claimed id
    assert first.body["reply_requested"] is True
    assert wait_until(lambda: peer.peer_id in lan.alive(), 30), lan.peers()
    row = lan.peers()[peer.peer_id]
    assert row["addresses"][0] == peer.address
    assert lan.counter("discovery_hints") >= max(1, hints_before)
    # our own browser on the same host derives the same contact from our record
    assert browser.wait_for(lambda v: browser.find(peer.peer_id) is not None, 30), browser.view
    cand = browser.find(peer.peer_id)
    assert cand.contact_body() == ip.contact_body(peer.peer_id, peer.transport_public, [peer.address],
                                                  peer.CAPABILITIES)


def _ignored_records(lan, trap) -> dict[str, disc.Record]:
    """Records §11 says a receiver ignores, each naming the trap's address and key."""
    other_net = secrets.token_bytes(16).hex()
    upper = _fresh_id().upper()
    recs = {
        "other network": _forged(lan, trap, "othernet", net=other_net),
        "v=2": _forged(lan, trap, "v2", v="2"),
        "v missing": _forged(lan, trap, "nov", v=None),
        "v=01": _forged(lan, trap, "v01", v="01"),
        "net in uppercase hex": _forged(lan, trap, "netuc", net=lan.network.network_id.hex().upper()),
        "id not a peer id (uppercase)": _forged(lan, trap, "iduc", peer_id=upper),
        "id not UTF-8": _forged(lan, trap, "id8", id=b"\xff" * 52),
        "id is the node's own": _forged(lan, trap, "own", peer_id=lan.node_id),
        "tk of 31 bytes": _forged(lan, trap, "tk31", tk=ip.b32(secrets.token_bytes(31))),
        "tk missing": _forged(lan, trap, "notk", tk=None),
        "tk not base32": _forged(lan, trap, "tkbad", tk="0" * 52),
        "key without =": _forged(lan, trap, "noeq", v=None),
    }
    recs["key without ="].txt.insert(0, b"v")
    recs["V=1 (keys are lowercase, matched exactly)"] = _forged(lan, trap, "ucv", v=None)
    recs["V=1 (keys are lowercase, matched exactly)"].txt.insert(0, b"V=1")
    recs["id twice, an invalid one first (the first counts)"] = _forged(lan, trap, "dupbad")
    recs["id twice, an invalid one first (the first counts)"].txt.insert(0, b"id=XYZ")
    recs["a capability of 65 characters"] = _forged(lan, trap, "longcap", caps="membership," + "x" * 65)
    port0 = _forged(lan, trap, "port0")
    port0.port = 0
    recs["port 0"] = port0
    unusable = _forged(lan, trap, "unusable")
    unusable.ipv4 = ["0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255"]
    recs["only unusable IPv4"] = unusable
    v6only = _forged(lan, trap, "v6only")
    v6only.ipv4, v6only.ipv6 = [], ["fe80::1"]
    recs["no IPv4 (AAAA only)"] = v6only
    return recs


def _accepted_records(lan, trap) -> dict[str, disc.Record]:
    """Records §11 accepts although they are not what the node itself sends."""
    recs = {
        "plain": _forged(lan, trap, "plain"),
        "tk uppercase with = padding (lenient, §12.4)": _forged(lan, trap, "tkuc",
                                                               tk=ip.b32(trap.transport_public).upper() + "===="),
        "prof of 200 characters (cut to 32)": _forged(lan, trap, "longprof", prof="p" * 200),
        "40 capabilities (first 32 kept)": _forged(lan, trap, "manycaps", caps=",".join(f"c{i}" for i in range(40))),
        "prof and caps not UTF-8 (replaced)": _forged(lan, trap, "utf8", prof=b"\xff\xfe", caps=b"a,\xff,b"),
        "unknown extra key": _forged(lan, trap, "extra", zz="1"),
        "empty caps and no prof": _forged(lan, trap, "nocaps", caps="", prof=None),
        "empty prof": _forged(lan, trap, "emptyprof", prof=""),
        "a capability of 64 characters": _forged(lan, trap, "cap64", caps="z" * 64),
        "id twice, the valid one first (the first counts)": _forged(lan, trap, "dupok"),
    }
    recs["id twice, the valid one first (the first counts)"].txt.append(b"id=XYZ")
    mixed = _forged(lan, trap, "mixed")
    mixed.ipv4 = ["0.0.0.0", "224.0.0.251", lan.h1.ip]
    recs["unusable A records besides a usable one"] = mixed
    return recs


def test_records_section_11_ignores_never_reach_the_node_as_candidates(lan, trap, forger):
    alive_before = lan.alive()
    ignored, accepted = _ignored_records(lan, trap), _accepted_records(lan, trap)
    for name, rec in {**ignored, **accepted}.items():  # the clean-room rules agree with the expectation
        try:
            disc.candidate_from_record(rec.txt, rec.port, rec.ipv4, lan.network.network_id, lan.node_id)
            assert name in accepted, name
        except disc.Ignored:
            assert name in ignored, name
    # 127.0.0.1 is not filtered (§11 filters 0.0.0.0, 224/4, 240/4 only): a hint, counted,
    # whose hello goes to the node's own loopback (the trap never sees it)
    loopback = _forged(lan, trap, "loopback")
    loopback.ipv4 = ["127.0.0.1"]
    assert disc.candidate_from_record(loopback.txt, loopback.port, loopback.ipv4, lan.network.network_id)
    hints_before = lan.counter("discovery_hints")
    forger.announce(*ignored.values())
    forger.announce(*accepted.values(), loopback)
    # every accepted record makes the node send a hello to the claimed id at the trap's address
    assert wait_until(lambda: all(_hinted(trap, r) for r in accepted.values()), 30), \
        ({n: _hinted(trap, r) for n, r in accepted.items()}, lan.status()["counters"])
    # a last record after all the others: once it is in, the ignored ones were read long ago
    last = _forged(lan, trap, "last")
    forger.announce(last)
    assert wait_until(lambda: _hinted(trap, last), 30)
    assert {n for n, r in ignored.items() if _hinted(trap, r)} == set()
    assert not _hinted(trap, loopback)
    assert lan.counter("discovery_hints") - hints_before == len(accepted) + 1 + 1  # + loopback + last
    # a hint is not a member: nobody answered with a signed hello for those ids
    assert not {disc.txt_map(r.txt)["id"] for r in accepted.values()} & set(lan.peers())
    assert lan.alive() == alive_before  # and the node kept serving its members
    assert trap.stats.drops == {}  # every hello the node sent was authentic (addressed to the forged ids)
    assert all(kind == "hello" for (_, kind) in trap.addressed_kinds)


def test_a_service_that_never_resolves_is_looked_up_by_the_node(lan, trap, forger, browser):
    """A PTR record alone: the node asks for the instance's SRV/TXT (nobody answers) and,
    3 s later, gives up; no candidate."""
    browser_errors = browser.view.errors
    bare = _forged(lan, trap, "bare")
    bare.srv = bare.txt_record = False
    bare.ipv4 = []
    forger.announce(bare)
    full = f"{bare.instance}.{disc.SERVICE_TYPE}"
    assert wait_until(lambda: lan.h0.ip in forger.askers.get(full.lower(), ()), 30), forger.askers
    assert browser.wait_for(lambda v: v.errors > browser_errors, 30), browser.view  # ours timed out (3 s)
    assert not _hinted(trap, bare)


def test_a_resolve_that_times_out_is_counted_as_a_discovery_error(lan, trap, forger):
    """§11: discovery_errors counts failed resolves; a lookup nobody answered was not counted."""
    errors_before = lan.counter("discovery_errors")
    bare = _forged(lan, trap, "timeout")
    bare.srv = bare.txt_record = False
    bare.ipv4 = []
    forger.announce(bare)
    full = f"{bare.instance}.{disc.SERVICE_TYPE}"
    assert wait_until(lambda: lan.h0.ip in forger.askers.get(full.lower(), ()), 30), forger.askers
    assert wait_until(lambda: lan.counter("discovery_errors") > errors_before, 12), lan.status()["counters"]


FLOOD = 150


def test_a_flood_of_records_from_one_source_leaves_the_node_serving(lan, trap, forger):
    """§11 sets no bound per source; the node looks up at most 64 at a time (the rest counted in
    discovery_resolves_dropped), and each record it takes is one candidate (§9.1 bounds those)."""
    alive_before = lan.alive()
    c0 = lan.status()["counters"]
    records = [_forged(lan, trap, f"flood{i}") for i in range(FLOOD)]
    forger.announce(*records)
    last = _forged(lan, trap, "afterflood")

    def settled() -> bool:
        forger.announce(last)
        return _hinted(trap, last)

    assert wait_until(settled, 40, interval_s=1.0), lan.status()["counters"]
    c1 = lan.status()["counters"]
    hints = c1.get("discovery_hints", 0) - c0.get("discovery_hints", 0) - 1
    dropped = c1.get("discovery_resolves_dropped", 0) - c0.get("discovery_resolves_dropped", 0)
    reached = sum(1 for r in records if _hinted(trap, r))
    print(f"flood of {FLOOD}: hints {hints}, resolves dropped {dropped}, hellos at the trap for {reached}")
    assert hints + dropped == FLOOD and reached <= hints  # each record looked up once, or counted as not
    assert lan.alive() == alive_before
    assert not {disc.txt_map(r.txt)["id"] for r in records} & set(lan.peers())


def test_a_goodbye_removes_the_record_from_browsers_but_not_the_member(lan, advertised, browser):
    """A goodbye (TTL 0) ends the record in every browser's view; the node's membership does
    not follow mDNS (a hint only): the peer stays alive while it answers probes."""
    peer, adv, info = advertised
    assert wait_until(lambda: peer.peer_id in lan.alive(), 30), lan.peers()
    assert browser.wait_for(lambda v: browser.find(peer.peer_id) is not None, 30), browser.view
    adv.goodbye(info)
    assert browser.wait_for(lambda v: info.name in v.removed and browser.find(peer.peer_id) is None, 30), \
        browser.view
    acks = peer.stats.sent["ack"]
    assert peer.wait_for(lambda: peer.stats.sent["ack"] >= acks + 3, 30), peer.stats  # probed on
    assert peer.peer_id in lan.alive()


def test_a_stopping_node_leaves_its_members(lan, browser, peer1, forger):
    """Next to last: the node stops (SIGTERM, as an operator does); it exits 0 and its members
    get a leave (§10.5). Meanwhile the forger's host checks that it can hear the node's answers
    (so that the next test can tell a missing goodbye from a deaf listener)."""
    name = disc.instance_name(lan.node_id, PORT)
    assert browser.wait_for(lambda v: name in v.candidates, 30), browser.view

    # the node's TTLs (§11 names none): PTR and TXT 4500 s, SRV 120 s
    ttls = {(disc.TYPE_SRV, 120), (disc.TYPE_TXT, 4500), (disc.TYPE_PTR, 4500)}

    def answered() -> bool:
        forger.query(disc.SERVICE_TYPE, disc.TYPE_PTR)
        forger.query(name, disc.TYPE_SRV)
        forger.query(name, disc.TYPE_TXT)
        return ttls <= set(forger.ttls(lan.h0.ip, name))

    assert wait_until(answered, 30, interval_s=1.0), forger.ttls(lan.h0.ip, name)
    joined = lan.node_id in peer1.members
    assert lan.stop_node() == 0, lan.log()
    if joined:
        assert peer1.wait_for(lambda: peer1.members[lan.node_id].state == "left", 10), peer1.stats


def test_a_stopping_node_says_goodbye(lan, browser, forger):
    """RFC 6762 §10.1: the node queued its goodbyes but closed its sockets before they left, so
    every browser kept a stopped node's record for its TTL (SRV 120 s) and handed it out."""
    name = disc.instance_name(lan.node_id, PORT)
    assert browser.wait_for(lambda v: name in v.candidates or name in v.removed or lan.proc.poll() is not None, 30)
    assert lan.stop_node() == 0, lan.log()
    goodbye = browser.wait_for(lambda v: name in v.removed and name not in v.candidates, 10)
    assert goodbye, (browser.view, forger.ttls(lan.h0.ip, name))
    assert any(ttl == 0 for _, ttl in forger.ttls(lan.h0.ip, name))
