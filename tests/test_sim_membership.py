"""The simulator driving the real SWIM/Lifeguard membership core: joins, crashes,
restarts with a persisted incarnation, leaves, Sybil joins, slow peers, metrics."""

from __future__ import annotations

import math

import pytest

from chimera.protocol.membership import MembershipConfig, MemberState
from chimera.simulations.behaviours import make_behaviour
from chimera.simulations.engine import Simulator
from chimera.simulations.membership_world import EventRecord, MembershipWorld
from chimera.simulations.network import Latency, LinkSpec, SimNetwork
from chimera.simulations.runner import swim_expected_first_detection_periods, swim_false_suspicion_per_probe

CFG = MembershipConfig(probe_interval_s=1.0, probe_timeout_s=0.4, sync_interval_s=5.0, reconnect_interval_s=2.0)


def _world(n: int, seed: int = 1, loss: float = 0.0, behaviours=None) -> tuple[Simulator, MembershipWorld]:
    sim = Simulator(seed)
    net = SimNetwork(sim, LinkSpec(latency=Latency.uniform(0.001, 0.02), loss=loss))
    world = MembershipWorld(sim, net, CFG)
    for i in range(n):
        world.add_peer(behaviours[i] if behaviours else None)
    return sim, world


def test_cold_join_through_one_contact_converges_and_crash_is_detected():
    sim, world = _world(8)
    world.start_all(warm_start=False)
    sim.run(15.0)
    assert world.live_view_ok()
    victim = world.peers[5]
    world.crash(victim)
    sim.run(60.0)
    m = world.metrics(60.0)
    assert m["detected_by_all"] == 1 and m["false_failures"] == 0
    assert 0 < m["detect_first_suspect_s"] < m["detect_all_failed_s"] < 30
    assert all(p.core.members[victim.peer_id].state is MemberState.DEAD for p in world.peers if p is not victim)


def test_restart_bumps_the_persisted_incarnation_and_rejoins():
    sim, world = _world(5, seed=2)
    world.start_all(warm_start=True)
    sim.run(5.0)
    victim = world.peers[4]
    assert victim.store.get(b"incarnation") == (1).to_bytes(8, "big")
    world.crash(victim)
    sim.run(40.0)
    assert world.peers[0].core.members[victim.peer_id].state is MemberState.DEAD
    world.restart(victim)
    assert victim.core.incarnation == 2
    sim.run(70.0)
    assert world.live_view_ok()
    assert any(e.kind == "peer_joined" and e.target == victim.name and e.incarnation >= 2 for e in world.events)


def test_graceful_leave_and_late_join():
    sim, world = _world(4, seed=3)
    world.start_all(warm_start=True)
    sim.run(3.0)
    world.leave(world.peers[1])
    newcomer = world.join()
    sim.run(25.0)
    assert all(p.core.members[world.peers[1].peer_id].state is MemberState.LEFT
               for p in world.peers if p.up and p is not newcomer)
    assert all(newcomer.peer_id in p.core.members for p in world.peers if p.up and p is not newcomer)
    assert world.metrics(25.0)["false_failures"] == 0


def test_sybil_operator_identities_join_and_silent_peer_is_failed():
    behaviours = [None, None, None, make_behaviour("silent")]
    sim, world = _world(4, seed=4, behaviours=behaviours)
    for _ in range(3):  # identities run by one operator: ordinary-looking peers
        world.add_peer()
    world.start_all(warm_start=False)
    sim.run(40.0)
    silent = world.peers[3].peer_id
    watcher = world.peers[0].core
    assert sum(1 for p in world.peers[4:] if watcher.members.get(p.peer_id) is not None) == 3
    member = watcher.members.get(silent)
    assert member is None or member.state is not MemberState.ALIVE  # it never answers a probe


def test_loss_gives_suspicions_but_no_false_failures_and_metrics_match_swim_order():
    sim, world = _world(16, seed=5, loss=0.1)
    world.start_all(warm_start=True)
    sim.run(120.0)
    m = world.metrics(120.0)
    assert m["false_failures"] == 0 and m["views_consistent"]
    predicted = swim_false_suspicion_per_probe(0.1, 3)
    assert m["probes"] > 1500 and m["false_suspect_per_probe"] < 10 * predicted + 0.01


def test_swim_formulas():
    assert swim_expected_first_detection_periods(10_000) == pytest.approx(math.e / (math.e - 1), rel=1e-3)
    assert swim_false_suspicion_per_probe(0.0, 3) == 0.0
    assert swim_false_suspicion_per_probe(1.0, 3) == 1.0


def test_stalled_peer_delays_its_processing():
    sim, world = _world(6, seed=6)
    world.network.add_stall("p2", 10.0, 14.0)
    world.start_all(warm_start=True)
    sim.run(30.0)
    # a 4 s stall: others suspect it, it refutes after the stall, nobody declares it failed
    assert any(e.kind == "peer_suspected" and e.target == "p2" for e in world.events)
    assert world.live_view_ok()


def test_warm_start_refuses_more_peers_than_a_member_table_holds():
    """A warm start wrote every peer into every table, past max_members (the core's own
    bound on its table): 20 peers with max_members = 10 held 19 members each."""
    sim = Simulator(1, trace=False)
    world = MembershipWorld(sim, SimNetwork(sim, LinkSpec(latency=Latency.constant(0.001))),
                            MembershipConfig(max_members=10))
    for _ in range(20):
        world.add_peer()
    with pytest.raises(ValueError, match="max_members"):
        world.start_all(warm_start=True)
    assert not any(p.up for p in world.peers)
    world.peers[11:] = []  # 11 peers: 10 others each, the bound exactly
    world.start_all(warm_start=True)
    sim.run(5.0)
    assert {len(p.core.members) for p in world.peers} == {10} and world.live_view_ok()


def test_restarted_peer_detection_counts_and_is_not_a_false_positive():
    """Crash p3 at 10 s, restart it at 40 s: its detection is measured and its
    suspicions and failures while down (or about its crashed run) are true ones."""
    runs = []
    for _ in range(2):
        sim, world = _world(8, seed=1)
        world.start_all(warm_start=True)
        sim.schedule(10.0, world.crash, world.peers[3])
        sim.schedule(40.0, world.restart, world.peers[3])
        sim.run(60.0)
        runs.append((sim.trace.text(), world.metrics(60.0)))
    (trace, m), (trace2, m2) = runs
    assert trace == trace2  # same seed, same run
    assert m["crashed"] == 1 and m["detected_by_all"] == 1
    assert 0 < m["detect_first_suspect_s"] < m["detect_all_failed_s"] < 30
    assert m["false_suspicions"] == 0 and m["false_failures"] == 0
    assert m["views_consistent"]


def test_false_failure_rate_is_per_live_honest_peer_hour():
    """The denominator is the time honest peers were up: not downtime, not sybil
    identities (it was peers x duration)."""
    sim, world = _world(4, seed=7)
    sybil = world.add_peer(sybil=True)
    world.start_all(warm_start=True)
    sim.schedule(10.0, world.crash, world.peers[2])
    sim.schedule(30.0, world.restart, world.peers[2])
    sim.run(60.0)
    assert world.honest_hosts() == {"p0", "p1", "p2", "p3"} and sybil.name == "p4"
    assert world.live_seconds("p2", 60.0) == pytest.approx(40.0)
    m = world.metrics(60.0)
    assert m["false_failures"] == 0
    # a live honest peer declared failed (its current run, while it was up) is a false failure
    inc = world.peers[1].core.incarnation
    world.events.append(EventRecord(20.0, "p0", "peer_failed", "p1", inc, True))
    world.events.append(EventRecord(20.0, "p0", "peer_failed", "p4", 1, True))  # a sybil: not counted
    m = world.metrics(60.0)
    assert m["false_failures"] == 1
    assert m["false_failures_per_peer_hour"] == pytest.approx(1 / ((3 * 60 + 40) / 3600))


def test_large_warm_start_rows_are_kept_out_of_the_garbage_collector():
    import gc

    sim = Simulator(1, trace=False)
    world = MembershipWorld(sim, SimNetwork(sim, LinkSpec(latency=Latency.constant(0.001))), CFG)
    n = 520  # 269 880 rows, over GC_FREEZE_ROWS
    for _ in range(n):
        world.add_peer()
    try:
        world.start_all(warm_start=True)
        assert gc.get_freeze_count() >= n * (n - 1)
        assert gc.isenabled()
        # one shared route table for the warm start, not n per peer
        assert all(p.routes == {} and p.warm_routes is world.peers[0].warm_routes for p in world.peers)
        sim.run(3.0)
        assert world.live_view_ok()
    finally:
        gc.unfreeze()


def _zombie_run(signed: bool) -> tuple[MembershipWorld, object]:
    """10 peers, p9 gossips forged alive claims (and floods them each second); p3 crashes."""
    import dataclasses

    sim, world = _world(10, seed=3, behaviours=[None] * 9 + [make_behaviour("zombie")])
    if not signed:  # the rules before signed alive claims: nobody signs, nobody asks for it
        for peer in world.peers:
            peer.contact, peer.proofs = dataclasses.replace(peer.contact, capabilities=()), None
    world.start_all(warm_start=True)
    sim.run(5.0)
    victim = world.peers[3]
    world.crash(victim)
    sim.run(90.0)
    return world, victim


def test_a_zombie_gossiper_cannot_keep_a_crashed_peer_alive():
    """One byzantine member claiming "P alive at inc + 1" (unsigned, or with a forged
    signature) for every peer it suspects kept a crashed peer from being declared failed
    by every live peer; with signed alive claims (PROTOCOL §10.3) they all declare it."""
    world, victim = _zombie_run(signed=True)
    m = world.metrics(90.0)
    assert m["detected_by_all"] == 1 and m["false_failures"] == 0 and m["views_consistent"]
    assert all(p.core.members[victim.peer_id].state is MemberState.DEAD for p in world.peers if p.up)
    assert m["alive_unsigned"] > 0 and m["alive_bad_signatures"] > 0
    assert world.peers[9].behaviour.sent > 50
    # the same run under the old rules: the attack works (so the test above can fail)
    world, victim = _zombie_run(signed=False)
    assert world.metrics(90.0)["detected_by_all"] == 0
