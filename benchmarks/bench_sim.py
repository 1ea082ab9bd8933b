"""Simulator scale benchmark: simulated events/s and wall time on one core.

(a) membership (SWIM + Lifeguard cores, real signed envelopes): ``n`` virtual
    peers from a converged start for ``--membership-virtual-s`` virtual seconds,
    n in ``--membership-sizes`` (default 100, 300, 1000), anti-entropy every
    ``--membership-sync-s`` (default 60: none in a 30 s run; each round sends
    every peer's n-row member list to one peer and back, 2n^2 rows in all).
    Reports setup (warm start) wall time and peak RSS, wall seconds per virtual
    second, and between consecutive sizes the growth of wall per virtual second
    divided by the growth of n (1.0: linear in n, the target; 2.0: quadratic);
(b) the BFT log core: ``n`` validators (equal weights, LAN latency, a value
    load of 20 values/s) until every validator committed ``--heights`` heights
    (default 100), n in ``--bft-sizes`` (default 4, 16, 32, 64, 128). A size
    that would exceed ``--budget-s`` wall seconds stops early; its figures are
    then per committed height and the 100-height wall time is extrapolated.
    A power law ``wall_per_height = a * n**b`` fitted to the measured sizes
    extrapolates to 1000 validators.
(c) federated averaging (the real TrainingCore per peer, scikit-learn local
    fits on digits shards, signed updates through real envelopes): ``n``
    peers through ``--training-rounds`` rounds (default 20), n in
    ``--training-sizes`` (default 10, 100) over the ideal log, and n in
    ``--training-bft-sizes`` (default 10, 25, 100) over the real BFT log (every
    peer a validator), each within ``--budget-s`` wall seconds. More than 64
    peers train as ``ceil(n / 64)`` concurrent jobs (a job has at most 64
    participants); all share the one log. Reports the wall time spent in local
    fits (scikit-learn) separately.
(d) a large network following a validator committee: ``n`` peers of which
    ``k`` validate and the others are observers that follow the log by
    fetching and verifying certified commits, until *every* peer holds
    ``--heights`` committed heights; ``--observer-runs`` (default ``1000:16``,
    i.e. 1000 peers, 16 validators). This is how 1000 peers reach 100
    committed heights on one core: with every peer a validator the O(n^2)
    votes per height make that hours (the extrapolation of (b)).
(e) with ``--profile``: where the time goes (cProfile, grouped by component)
    for one membership and one BFT size.

Events are engine events (a frame arrival, a timer); frames are signed
envelopes. Nothing here asserts on time; it prints figures.
Run: ``python -m benchmarks.bench_sim [--json] [--quick] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import platform
import pstats
import sys
import time

import numpy as np

from chimera.consensus.bft import BftConfig
from chimera.consensus.models import make_adapter
from chimera.protocol.membership import MembershipConfig
from chimera.simulations.bft_world import BftWorld, rng_values
from chimera.simulations.engine import Simulator
from chimera.simulations.membership_world import MembershipWorld
from chimera.simulations.network import Latency, LinkSpec, SimNetwork
from chimera.simulations.scenario import SIM_BFT_DEFAULTS
from chimera.simulations.signatures import shared_vote_verification
from chimera.simulations.training_world import (
    Federation,
    TrainingSetup,
    digits_federation,
    make_world,
    shared_training_verification,
)

LAN = LinkSpec(latency=Latency.lognormal(0.002, 0.5))
VALUES_PER_S = 20.0


def _max_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def membership(n: int, virtual_s: float, seed: int = 1, sync_s: float = 60.0) -> dict:
    sim = Simulator(seed, trace=False)
    net = SimNetwork(sim, LAN)
    world = MembershipWorld(sim, net, MembershipConfig(probe_interval_s=1.0, probe_timeout_s=0.5,
                                                       sync_interval_s=sync_s))
    for _ in range(n):
        world.add_peer()
    start = time.perf_counter()
    world.start_all(warm_start=True)
    setup = time.perf_counter() - start
    setup_rss = _max_rss_mb()
    start = time.perf_counter()
    sim.run(virtual_s)
    wall = time.perf_counter() - start
    return {"peers": n, "virtual_s": virtual_s, "sync_interval_s": sync_s,
            "sync_rounds": int(virtual_s // sync_s), "setup_wall_s": round(setup, 3),
            "setup_max_rss_mb": setup_rss, "wall_s": round(wall, 3),
            "wall_per_virtual_s": round(wall / virtual_s, 3),
            "events": sim.events_processed, "events_per_s": round(sim.events_processed / wall),
            "frames": net.stats["frames_sent"], "frames_per_s": round(net.stats["frames_sent"] / wall),
            "virtual_per_wall": round(virtual_s / wall, 3), "max_rss_mb": _max_rss_mb(),
            "views_consistent": world.live_view_ok()}


def membership_scaling(rows: list[dict]) -> list[dict]:
    """Growth of wall per virtual second over growth of n between consecutive sizes
    (1.0: linear, 2.0: quadratic); the same for setup time (2.0 is the n(n-1) table)."""
    out = []
    for a, b in zip(rows, rows[1:]):
        growth = b["peers"] / a["peers"]
        if growth <= 1 or not a["wall_per_virtual_s"] or not a["setup_wall_s"]:
            continue
        out.append({"from": a["peers"], "to": b["peers"],
                    "run_exponent": round(math.log(b["wall_per_virtual_s"] / a["wall_per_virtual_s"])
                                          / math.log(growth), 2),
                    "setup_exponent": round(math.log(max(b["setup_wall_s"], 1e-3) / a["setup_wall_s"])
                                            / math.log(growth), 2)})
    return out


def bft(n: int, heights: int, budget_s: float, seed: int = 1, validators: int | None = None) -> dict:
    k = n if validators is None else validators
    sim = Simulator(seed, trace=False)
    net = SimNetwork(sim, LAN, bandwidth_bytes_per_s=125e6)
    world = BftWorld(sim, net, BftConfig(**SIM_BFT_DEFAULTS), [1] * k + [0] * (n - k))
    with shared_vote_verification() as verifier:
        start = time.perf_counter()
        world.start_all()

        def arrival() -> None:
            world.submit(sim.rng.choice(world.peers), rng_values(sim.rng, 1)[0])
            sim.schedule(sim.now + sim.rng.expovariate(VALUES_PER_S), arrival)

        sim.schedule(0.0, arrival)
        deadline = start + budget_s
        done = lambda: min(world.honest_heights()) >= heights or time.perf_counter() > deadline  # noqa: E731
        while not done():
            sim.run(sim.now + 0.5, done)
        wall = time.perf_counter() - start
    reached = min(world.honest_heights())
    per_height = wall / max(1, reached)
    m = world.metrics()
    return {"peers": n, "validators": k, "heights": reached, "complete": reached >= heights, "wall_s": round(wall, 3),
            "wall_per_height_s": round(per_height, 4),
            "wall_for_target_s": round(wall if reached >= heights else per_height * heights, 1),
            "virtual_s": round(sim.now, 3), "events": sim.events_processed,
            "events_per_s": round(sim.events_processed / wall), "frames": net.stats["frames_sent"],
            "frames_per_height": round(net.stats["frames_sent"] / max(1, reached)),
            "signatures_verified": verifier.verified, "signature_checks_reused": verifier.reused,
            "block_interval_s": round(m["block_interval_mean_s"], 4)}


def training(n: int, rounds: int, log: str, budget_s: float, seed: int = 1) -> dict:
    """``n`` honest peers through ``rounds`` federated rounds (FedAvg, IID digits shards)."""
    from chimera.simulations.behaviours import Behaviour

    sim = Simulator(seed, trace=False)
    net = SimNetwork(sim, LAN, bandwidth_bytes_per_s=125e6)
    jobs = max(1, math.ceil(n / 64))
    setup = TrainingSetup(log=log, rule="fedavg", rounds=rounds, jobs=jobs, round_deadline_s=10.0)
    fit_wall = [0.0]
    original = Federation.local_fit

    def timed_fit(self, *args):
        t0 = time.perf_counter()
        try:
            return original(self, *args)
        finally:
            fit_wall[0] += time.perf_counter() - t0

    digits_federation(n, setup.split, setup.alpha, setup.test_fraction, setup.data_seed)  # import + load, untimed
    make_adapter("sgd_classifier", 64, range(10)).fit(np.zeros((2, 64)), np.array([0, 1]), epochs=1,
                                                      learning_rate=0.1, seed=0)
    Federation.local_fit = timed_fit
    try:
        with shared_training_verification():
            start = time.perf_counter()
            world = make_world(sim, net, setup, [Behaviour() for _ in range(n)],
                               bft_config=BftConfig(**{**SIM_BFT_DEFAULTS, "max_batch": 128}))
            world.start_all()
            deadline = start + budget_s
            done = lambda: world.fed.finished() or time.perf_counter() > deadline  # noqa: E731
            while not done():
                sim.run(sim.now + 1.0, done)
            wall = time.perf_counter() - start
    finally:
        Federation.local_fit = original
    m = world.metrics()
    reached = m["rounds_certified"]
    return {"peers": n, "log": log, "jobs": jobs, "rounds": reached, "complete": reached >= rounds,
            "wall_s": round(wall, 2), "local_fit_wall_s": round(fit_wall[0], 2),
            "wall_per_round_s": round(wall / max(1, reached), 3),
            "wall_for_target_s": round(wall if reached >= rounds else wall / max(1, reached) * rounds, 1),
            "virtual_s": round(sim.now, 3), "events": sim.events_processed,
            "events_per_s": round(sim.events_processed / wall), "frames": net.stats["frames_sent"],
            "frames_per_round": round(net.stats["frames_sent"] / max(1, reached)),
            "local_fits": m["local_fits"], "final_accuracy": round(m["final_accuracy"], 4),
            "log_values": m["log_values_committed"]}


def fit_power_law(rows: list[dict]) -> tuple[float, float] | None:
    """Least squares of log(wall_per_height) on log(n) over sizes >= 16."""
    pts = [(math.log(r["validators"]), math.log(r["wall_per_height_s"])) for r in rows
           if r["validators"] >= 16 and r["heights"] > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return math.exp(my - b * mx), b


FILE_GROUPS = [
    ("membership.py", "membership core"), ("bft.py", "bft core"), ("quorum.py", "quorum/weights"),
    ("reputation.py", "quorum/weights"), ("messages.py", "message codec (encode/decode fields)"),
    ("envelope.py", "envelope seal/open"), ("identity.py", "envelope seal/open"),
    ("engine.py", "engine + network model"), ("network.py", "engine + network model"),
    ("ports.py", "engine + network model"), ("world.py", "simulator driver"),
    ("behaviours.py", "simulator driver"), ("signatures.py", "signature memo"),
]


def _group(filename: str, func: str) -> str:
    if filename == "~":  # C functions
        if "sign'" in func or func.endswith("crypto_sign>"):
            return "ed25519 sign"
        if "verify'" in func or "crypto_sign_open" in func:
            return "ed25519 verify"
        if "getrandbits" in func or "Random" in func:
            return "rng draws"
        if "MemberTable" in func:
            return "membership core"
        if "pack" in func or "Packer" in func:
            return "msgpack"
        if "heap" in func:
            return "engine + network model"
        return "other builtins"
    if filename.endswith("random.py"):
        return "rng draws"
    for part, label in FILE_GROUPS:
        if filename.endswith(part):
            return label
    return "other Python"


def profile(fn, *args) -> dict:
    """Share (%) of total own time (cProfile tottime) per component."""
    prof = cProfile.Profile()
    prof.enable()
    fn(*args)
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values())
    shares: dict[str, float] = {}
    for (filename, _, func), v in stats.items():
        name = _group(filename, func)
        shares[name] = shares.get(name, 0.0) + v[2]
    return {k: round(100 * v / total, 1) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="also report where the time goes")
    parser.add_argument("--membership-sizes", type=int, nargs="*", default=[100, 300, 1000])
    parser.add_argument("--membership-virtual-s", type=float, default=30.0)
    parser.add_argument("--membership-sync-s", type=float, default=60.0,
                        help="anti-entropy interval (sync_interval_s) of the membership runs")
    parser.add_argument("--bft-sizes", type=int, nargs="*", default=[4, 16, 32, 64, 128])
    parser.add_argument("--heights", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=90.0, help="wall seconds per BFT size at most")
    parser.add_argument("--training-sizes", type=int, nargs="*", default=[10, 100])
    parser.add_argument("--training-bft-sizes", type=int, nargs="*", default=[10, 25, 100])
    parser.add_argument("--training-rounds", type=int, default=20)
    parser.add_argument("--observer-runs", nargs="*", default=["1000:16"],
                        help="PEERS:VALIDATORS runs of part (d)")
    parser.add_argument("--observer-budget-s", type=float, default=300.0)
    parser.add_argument("--only", choices=("membership", "bft", "observers", "training"),
                        help="run one part only")
    args = parser.parse_args(argv)
    if args.quick:
        args.membership_sizes, args.bft_sizes, args.heights = [50], [4, 16], 20
        args.training_sizes, args.training_bft_sizes, args.training_rounds = [10], [4], 3
        args.observer_runs = ["100:4"]
    if args.only:
        for part, attrs in (("membership", ["membership_sizes"]), ("bft", ["bft_sizes"]),
                            ("observers", ["observer_runs"]),
                            ("training", ["training_sizes", "training_bft_sizes"])):
            if part != args.only:
                for attr in attrs:
                    setattr(args, attr, [])
    started = time.perf_counter()
    results: dict = {"membership": [], "bft": [], "bft_observers": [], "training": []}
    for n in args.membership_sizes:
        results["membership"].append(membership(n, args.membership_virtual_s, sync_s=args.membership_sync_s))
        if not args.json:
            print("membership", results["membership"][-1], flush=True)
    if len(results["membership"]) > 1:
        results["membership_scaling"] = membership_scaling(results["membership"])
    for n in args.bft_sizes:
        results["bft"].append(bft(n, args.heights, args.budget_s))
        if not args.json:
            print("bft", results["bft"][-1], flush=True)
    for run in args.observer_runs:
        n, _, k = run.partition(":")
        results["bft_observers"].append(bft(int(n), args.heights, args.observer_budget_s, validators=int(k)))
        if not args.json:
            print("bft_observers", results["bft_observers"][-1], flush=True)
    for log, sizes in (("ideal", args.training_sizes), ("bft", args.training_bft_sizes)):
        for n in sizes:
            results["training"].append(training(n, args.training_rounds, log, args.budget_s))
            if not args.json:
                print("training", results["training"][-1], flush=True)
    fit = fit_power_law(results["bft"])
    if fit is not None:
        a, b = fit
        results["bft_extrapolation"] = {
            "model": "wall_per_height_s = a * n**b", "a": a, "b": round(b, 3),
            "validators_1000_wall_per_height_s": round(a * 1000 ** b, 1),
            "validators_1000_wall_for_target_h": round(a * 1000 ** b * args.heights / 3600, 2)}
    if args.profile:
        results["profile_membership_300"] = profile(membership, 300, 10.0)
        results["profile_bft_64"] = profile(bft, 64, 10, 60.0)
    results["environment"] = {"python": platform.python_version(), "machine": platform.machine(),
                              "processor": platform.processor() or "?", "wall_s": round(time.perf_counter() - started, 1)}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key in ("membership_scaling", "bft_extrapolation", "profile_membership_300", "profile_bft_64",
                    "environment"):
            if key in results:
                print(key, json.dumps(results[key]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
