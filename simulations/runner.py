"""Build a world from a :class:`~chimera.simulations.scenario.Scenario`, run it, collect metrics.

:func:`run_one` is deterministic: the same scenario (seed included) gives the
same metrics and the same trace, byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from chimera.consensus.bft import BftCore

from .behaviours import Behaviour, make_behaviour
from .bft_world import BftWorld, LivenessViolation, SafetyViolation, reputation_series, rng_values
from .engine import Simulator, Trace
from .fabric_world import FabricWorld, shared_fabric_verification
from .membership_world import MembershipWorld
from .network import FlappingPartition, Partition, SimNetwork
from .scenario import MAX_STALLS, Scenario, ScenarioError
from .signatures import shared_vote_verification
from .training_world import make_world, shared_training_verification
from .world import SkewSpec


@dataclass
class RunResult:
    """Outcome of one run: a metrics row, extra series, the trace and any violation."""

    scenario: Scenario
    row: dict
    series: dict = field(default_factory=dict)
    trace: Trace | None = None
    violation: str | None = None
    events: int = 0
    virtual_s: float = 0.0


def _network(sim: Simulator, sc: Scenario, hosts: list[str]) -> SimNetwork:
    net = SimNetwork(sim, sc.link, bandwidth_bytes_per_s=sc.bandwidth_bytes_per_s)
    if sc.regions:
        for i, host in enumerate(hosts):
            net.region_of[host] = sc.regions[i % len(sc.regions)]
        for a, b, spec in sc.links:
            net.set_link(a, b, spec)
    for p in sc.partitions:
        if p.groups is not None:
            net.add_partition(Partition(p.start_s, p.end_s, tuple(frozenset(f"p{i}" for i in g) for g in p.groups)))
            continue
        if len(hosts) < 2:
            continue  # one peer: nothing to cut
        side_size = max(1, min(len(hosts) - 1, round(p.split * len(hosts))))
        if p.flap_s:
            # one draw here; each cut window's side is made when a frame first needs it
            net.add_partition(FlappingPartition(p.start_s, p.end_s, p.flap_s, hosts, side_size,
                                                sim.rng.getrandbits(64)))
        else:
            net.add_partition(Partition(p.start_s, p.end_s, (frozenset(sim.rng.sample(hosts, side_size)),)))
    if sc.stall_fraction and sc.stall_duration_s:
        stalled = sim.rng.sample(hosts, round(sc.stall_fraction * len(hosts)))
        count = 0
        for host in sorted(stalled, key=hosts.index):
            t = sim.rng.expovariate(1.0 / sc.stall_every_s)
            while t < sc.duration_s:  # in time order: O(1) per stall
                count += 1
                if count > MAX_STALLS:
                    raise ScenarioError(sc.source, "stalls.every_s", f"more than {MAX_STALLS} stall windows in "
                                        f"a run; raise stalls.every_s or lower stalls.fraction")
                net.add_stall(host, t, t + sc.stall_duration_s)
                t += sc.stall_duration_s + sim.rng.expovariate(1.0 / sc.stall_every_s)
    if sc.slow_fraction and sc.slow_delay_s:
        for host in sim.rng.sample(hosts, max(1, round(sc.slow_fraction * len(hosts)))):
            net.slow[host] = sc.slow_delay_s
    return net


def byzantine_layout(sim: Simulator, sc: Scenario) -> tuple[list[int], list[Behaviour]]:
    """Weights and behaviours of the validators: byzantine peers are drawn by the
    seed and must hold strictly less than 1/3 of the weight.

    Raises:
        ValueError: the byzantine peers would hold >= 1/3 of the weight.
    """
    n = sc.peers
    k = sc.bft_validators or n  # peers k.. are observers (weight 0)
    if sc.bft_weights == "equal":
        weights = [100] * k + [0] * (n - k)
    elif sc.bft_weights == "random":
        weights = [100 * sim.rng.randint(1, 4) for _ in range(k)] + [0] * (n - k)
    else:
        weights = list(sc.bft_weights)
    behaviours = [Behaviour() for _ in range(n)]
    chosen = sim.rng.sample([i for i in range(n) if weights[i] > 0], len(sc.byzantine))
    for index, strategy in zip(chosen, sc.byzantine):
        behaviours[index] = make_behaviour(strategy)
    byz_weight = sum(weights[i] for i in chosen)
    if sc.kind == "bft" and 3 * byz_weight >= sum(weights):
        raise ValueError(f"byzantine peers hold {byz_weight} of {sum(weights)} weight: "
                         f"BFT safety needs strictly less than 1/3")
    return weights, behaviours


def run_one(sc: Scenario, *, core_class: Callable[..., BftCore] = BftCore, trace: bool | None = None,
            progress: Callable[[float], None] | None = None, check_liveness: bool = True) -> RunResult:
    """Run one sweep point of a scenario to completion (or to ``duration_s``)."""
    sim = Simulator(sc.seed, trace=sc.trace if trace is None else trace)
    hosts = [f"p{i}" for i in range(sc.peers)]
    network = _network(sim, sc, hosts)
    skew = SkewSpec(sc.max_offset_s, sc.max_drift_ppm)
    if sc.kind == "bft":
        with shared_vote_verification():
            return _run_bft(sim, network, sc, skew, core_class, progress, check_liveness)
    if sc.kind == "training":
        with shared_training_verification():
            return _run_training(sim, network, sc, skew, progress, check_liveness)
    if sc.kind == "fabric":
        with shared_fabric_verification():
            return _run_fabric(sim, network, sc, skew, progress, check_liveness)
    return _run_membership(sim, network, sc, skew, progress)


def _run_to_target(sim: Simulator, sc: Scenario, done: Callable[[], bool],
                   progress: Callable[[float], None] | None) -> tuple[bool, str | None]:
    """Run until ``done()`` or ``sc.duration_s``: (reached, ``"safety: ..."`` if a check raised)."""
    try:
        return sim.run(sc.duration_s, done, progress), None
    except SafetyViolation as exc:
        return False, f"safety: {exc}"


def _schedule_churn(sim: Simulator, sc: Scenario, world, peers_of: Callable[[], list],
                    honest_only: bool) -> Callable[[], bool]:
    """Schedule every ``[[churn]]`` event; returns "have they all run?" (a run may only
    stop once they have: an event at exactly the settle time can be ordered after
    the event that reached the target)."""
    left = [len(sc.churn)]

    for event in sc.churn:
        def act(event=event) -> None:
            left[0] -= 1
            if event.action == "join":
                if hasattr(world, "join"):
                    world.join()
                return
            if event.peers is not None:
                targets = [peers_of()[i] for i in event.peers]
            else:
                want_up = event.action != "restart"
                pool = [p for p in peers_of() if p.up == want_up
                        and not (honest_only and p.behaviour.byzantine)]
                targets = sim.rng.sample(pool, min(event.count, len(pool)))
            for peer in targets:
                sim.log(f"churn {event.action} {peer.name}")
                getattr(world, event.action)(peer)
        sim.schedule(event.at_s, act)
    return lambda: left[0] == 0


def _too_short(sc: Scenario) -> str:
    """The reason a run stopped at ``duration_s`` although its peers may have reached the
    target: churn or a partition still to come (a run settles only after the last one)."""
    end = sc.disruption_end_s()
    if end < sc.duration_s:
        return ""
    return (f"; the run ends at scenario.duration_s = {sc.duration_s:g} s, before its last churn "
            f"or partition at {end:g} s, so it never settled")


def _run_bft(sim, network, sc: Scenario, skew, core_class, progress, check_liveness) -> RunResult:
    weights, behaviours = byzantine_layout(sim, sc)
    world = BftWorld(sim, network, sc.bft_config, weights, behaviours=behaviours,
                     epoch_heights=sc.bft_epoch_heights, skew=skew, core_class=core_class)
    if sc.trace:
        for peer in world.peers:
            sim.log(f"peer {peer.name} {peer.peer_id[:10]} weight {world.genesis_table.weights.get(peer.peer_id, 0)} "
                    f"{peer.behaviour.name}")
    world.start_all()
    churn_done = _schedule_churn(sim, sc, world, lambda: world.peers, honest_only=False)
    if sc.bft_values_per_s > 0:
        def arrival() -> None:
            up = [p for p in world.honest if p.up]
            if up:
                world.submit(sim.rng.choice(up), rng_values(sim.rng, 1)[0])
            sim.schedule(sim.now + sim.rng.expovariate(sc.bft_values_per_s), arrival)
        sim.schedule(sim.rng.expovariate(sc.bft_values_per_s), arrival)
    settle = sc.disruption_end_s()
    target = sc.bft_target_heights

    def done() -> bool:
        if sim.now < settle or not churn_done():
            return False
        for p in world.honest:
            if p.up and p.committed_height < target:
                return False
        return True

    reached, violation = _run_to_target(sim, sc, done, progress)
    if violation is None and check_liveness and not reached:
        heights = {p.name: p.committed_height for p in world.honest}
        what = f"below target {target}" if any(h < target for h in heights.values()) else "all at target"
        violation = f"liveness: honest heights {heights} {what} at {sc.duration_s} s{_too_short(sc)}"
    row = dict(sc.sweep_values)
    row.update({"seed": sc.seed, "peers": sc.peers, "virtual_s": round(sim.now, 6), "events": sim.events_processed,
                "live": reached, "safe": violation is None or violation.startswith("liveness")})
    row.update(world.metrics())
    row["frames_sent"] = network.stats["frames_sent"]
    row["bytes_sent"] = network.stats["bytes_sent"]
    row["frames_per_height"] = network.stats["frames_sent"] / max(1, row["heights"])
    series = {"reputation": reputation_series(world), "tables": world.table_history}
    return RunResult(sc, row, series, sim.trace, violation, sim.events_processed, sim.now)


def training_behaviours(sim: Simulator, sc: Scenario) -> list[Behaviour]:
    """One behaviour per peer: ``byzantine.strategies`` plus ``training.attackers`` peers
    running ``training.attack`` (with its tunables), placed by the seed."""
    spec = sc.training
    strategies = list(sc.byzantine) + [spec.attack] * spec.attackers
    behaviours = [Behaviour() for _ in range(sc.peers)]
    params = dict(spec.attack_params)
    for index, strategy in zip(sim.rng.sample(range(sc.peers), len(strategies)), strategies):
        behaviours[index] = make_behaviour(strategy, **params)
    return behaviours


def _run_training(sim, network, sc: Scenario, skew, progress, check_liveness) -> RunResult:
    behaviours = training_behaviours(sim, sc)
    world = make_world(sim, network, sc.training.setup, behaviours, bft_config=sc.bft_config, skew=skew)
    if sc.trace:
        for peer in world.peers:
            sim.log(f"peer {peer.name} {peer.peer_id[:10]} {peer.behaviour.name}")
    world.start_all()
    churn_done = _schedule_churn(sim, sc, world, lambda: world.peers, honest_only=False)
    settle = sc.disruption_end_s()
    fed = world.fed

    def done() -> bool:
        return sim.now >= settle and churn_done() and fed.finished()

    reached, violation = _run_to_target(sim, sc, done, progress)
    if violation is None and check_liveness and not reached:
        rounds = {p.name: (p.training.core.model_round if p.training.core else 0) for p in fed.honest_participants}
        violation = (f"liveness: honest peers' rounds {rounds} below {sc.training.setup.rounds} at "
                     f"{sc.duration_s} s{_too_short(sc)}")
    row = dict(sc.sweep_values)
    setup = sc.training.setup
    row.setdefault("training.rule", setup.rule + ("+detect" if setup.detect else ""))
    row.setdefault("training.attack", sc.training.attack)
    row.update({"seed": sc.seed, "peers": sc.peers, "attack": sc.training.attack,
                "virtual_s": round(sim.now, 6), "events": sim.events_processed,
                "live": reached, "safe": violation is None or violation.startswith("liveness")})
    row.update(world.metrics())
    row["frames_sent"] = network.stats["frames_sent"]
    row["bytes_sent"] = network.stats["bytes_sent"]
    return RunResult(sc, row, {"rounds": fed.rounds_series()}, sim.trace, violation, sim.events_processed, sim.now)


def fabric_behaviours(sim: Simulator, sc: Scenario) -> list[Behaviour]:
    """One behaviour per peer: ``byzantine.strategies`` plus ``fabric.wrong_peers`` peers
    running ``wrong_result`` (with its tunables), placed by the seed among the
    non-submitters (peers ``fabric.submitters``..)."""
    spec = sc.fabric
    strategies = list(sc.byzantine) + ["wrong_result"] * spec.wrong_peers
    behaviours = [Behaviour() for _ in range(sc.peers)]
    params = dict(spec.wrong_params)
    pool = range(spec.setup.submitters, sc.peers)
    for index, strategy in zip(sim.rng.sample(pool, len(strategies)), strategies):
        behaviours[index] = make_behaviour(strategy, **(params if strategy == "wrong_result" else {}))
    return behaviours


def _run_fabric(sim, network, sc: Scenario, skew, progress, check_liveness) -> RunResult:
    behaviours = fabric_behaviours(sim, sc)
    world = FabricWorld(sim, network, sc.fabric.setup, behaviours, skew=skew)
    if sc.trace:
        for peer in world.peers:
            sim.log(f"peer {peer.name} {peer.peer_id[:10]} {peer.behaviour.name} cpus {peer.cpu_count} "
                    f"speed {peer.speed:.3f}")
    world.start_all()
    churn_done = _schedule_churn(sim, sc, world, lambda: world.peers, honest_only=False)
    settle = sc.disruption_end_s()

    def done() -> bool:
        return sim.now >= settle and churn_done() and world.finished()

    reached, violation = _run_to_target(sim, sc, done, progress)
    if violation is None and check_liveness and not reached:
        violation = (f"liveness: {world.metrics()['tasks_unfinished']} tasks unfinished, "
                     f"{sc.fabric.setup.tasks - world.arrived} not yet submitted at {sc.duration_s} s"
                     f"{_too_short(sc)}")
    row = dict(sc.sweep_values)
    row.update({"seed": sc.seed, "peers": sc.peers, "replicas": sc.fabric.setup.replicas,
                "loss": sc.link.loss, "virtual_s": round(sim.now, 6), "events": sim.events_processed,
                "live": reached, "safe": violation is None or violation.startswith("liveness")})
    row.update(world.metrics())
    row["frames_sent"] = network.stats["frames_sent"]
    row["bytes_sent"] = network.stats["bytes_sent"]
    series = {"time": world.series, "breaker_openings": world.breaker_openings}
    return RunResult(sc, row, series, sim.trace, violation, sim.events_processed, sim.now)


def swim_expected_first_detection_periods(n: int, failed: int = 1) -> float:
    """SWIM (Das et al. 2002, s3.1): expected protocol periods until some live
    member first probes a failed one: ``1 / (1 - exp(-q_f))``, ``q_f = (n - failed) / n``
    the fraction of live members (-> e/(e-1) ~ 1.582 for large groups); NaN when
    no member is live."""
    if n < 1 or not 0 <= failed < n:
        return math.nan
    qf = (n - failed) / n
    return 1.0 / (1.0 - math.exp(-qf))


def swim_false_suspicion_per_probe(loss: float, k: int) -> float:
    """SWIM (s3.1) with independent loss ``loss`` per message: a probe of a live
    member fails when the ping or ack is lost and each of the ``k`` indirect
    paths (ping-req, ping, ack, relayed ack) loses a message:
    ``(1 - (1-p)^2) * (1 - (1-p)^4)^k``."""
    q = 1.0 - loss
    return (1.0 - q * q) * (1.0 - q ** 4) ** k


def _run_membership(sim, network, sc: Scenario, skew, progress) -> RunResult:
    world = MembershipWorld(sim, network, sc.membership_config, skew=skew)
    _, behaviours = byzantine_layout(sim, sc)
    for behaviour in behaviours:
        world.add_peer(behaviour)
    sybil_hosts = world.add_sybil_identities()  # marked as sybils: left out of the honest metrics
    world.start_all(warm_start=sc.warm_start)
    _schedule_churn(sim, sc, world, lambda: world.peers, honest_only=True)
    sim.run(sc.duration_s, None, progress)
    row = dict(sc.sweep_values)
    metrics = world.metrics(sc.duration_s)
    violation = membership_violation(metrics)
    k = min(sc.membership_config.indirect_checks, len(world.peers) - 2)
    row.update({"seed": sc.seed, "peers": sc.peers, "lifeguard": sc.lifeguard, "loss": sc.link.loss,
                "virtual_s": round(sim.now, 6), "events": sim.events_processed})
    row.update(metrics)
    row["safe"] = violation is None
    # the group SWIM's formula speaks of: the honest members (no sybil identities), of which
    # `crashed` failed
    sybils = set(map(id, sybil_hosts))
    honest = sum(1 for p in world.peers if id(p) not in sybils and not p.behaviour.byzantine)
    row["swim_expected_first_detect_s"] = (swim_expected_first_detection_periods(honest, metrics["crashed"])
                                           * sc.membership_config.probe_interval_s)
    row["swim_false_suspect_per_probe"] = swim_false_suspicion_per_probe(sc.link.loss, max(0, k))
    row["frames_sent"] = network.stats["frames_sent"]
    row["sybils"] = len(sybil_hosts)
    return RunResult(sc, row, {}, sim.trace, violation, sim.events_processed, sim.now)


def membership_violation(metrics: dict) -> str | None:
    """The property a membership run checks: at the end every live peer sees every
    other live peer alive or suspect (no live peer left declared failed)."""
    if metrics.get("views_consistent"):
        return None
    return "membership: a live peer is seen as failed at the end"


def is_safety_violation(violation: str | None) -> bool:
    """A violation that fails a run (exit 1): anything but a missed liveness target."""
    return violation is not None and not violation.startswith("liveness")


def check_layout(sc: Scenario) -> None:
    """Draw what :func:`run_one` draws before the run starts (network, byzantine layout) and
    raise what it would raise, without running: lets the CLI refuse a sweep point whose
    seed-drawn weights give byzantine peers >= 1/3 (``bft.weights = "random"``) before
    the first run.

    Raises:
        ScenarioError: naming the scenario file and ``bft.weights``.
    """
    if sc.kind != "bft" or sc.bft_weights != "random" or not sc.byzantine:
        return  # equal weights and weight lists are checked when the file is loaded
    sim = Simulator(sc.seed, trace=False)
    _network(sim, sc, [f"p{i}" for i in range(sc.peers)])
    try:
        byzantine_layout(sim, sc)
    except ValueError as exc:
        raise ScenarioError(sc.source, "bft.weights", f"with seed {sc.seed}: {exc}") from None


__all__ = ["RunResult", "run_one", "byzantine_layout", "check_layout", "fabric_behaviours", "training_behaviours",
           "is_safety_violation", "membership_violation", "SafetyViolation", "LivenessViolation"]
