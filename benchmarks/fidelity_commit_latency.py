"""Simulator fidelity: the same small BFT network run for real and in the simulator.

Issue 7's fidelity check. One run measures, on this machine:

1. **real**: ``--peers`` peer processes on loopback (``LocalNetwork``; full
   transport, CURVE, signatures, SQLite), the BFT settings of
   ``benchmarks/bench_consensus.py``. The signed-envelope round trip between
   two peers (200 echo requests) and the commit latency of ``--samples``
   decisions submitted one at a time at peer 0 (submission to stored commit).
2. **simulated**: the shipped ``commit_latency`` scenario with the same number
   of validators and the same :class:`~chimera.consensus.bft.BftConfig`, its
   network latency set from the measured round trip (lognormal, median = half
   the measured p50 round trip, sigma from the measured p50/p90 spread), values
   arriving one at a time (Poisson, 4 values/s, below the commit rate). The
   simulator charges no CPU time unless told, so it is run again with every
   inbound envelope delayed by ``d`` ms (the ``[slow]`` model with fraction 1)
   for each ``d`` of ``--processing-ms``: the ``d`` whose p50 matches the real
   p50 is the per-envelope processing cost the simulator needs to be faithful
   on this machine.

The report (stdout, and with ``--out DIR`` also ``fidelity.json`` and
``fidelity.png``, a bar chart of p50/p95) puts the distributions side by side.
Nothing asserts on time; a noisy machine moves the real numbers, so compare
within one run. Run: ``python -m benchmarks.fidelity_commit_latency [--peers 4]
[--samples 60] [--processing-ms 0,1,2,4] [--out DIR] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np

from benchmarks.bench_consensus import signed_rtts_and_latencies, validator_network

# the BftConfig the node builds from SETTINGS (node/runtime.py: vote timeout for prevote and
# precommit, rebroadcast max(0.5, 2 x vote timeout))
BFT_CONFIG = {"propose_timeout_s": 1.0, "prevote_timeout_s": 0.5, "precommit_timeout_s": 0.5,
              "commit_wait_s": 0.0, "max_batch": 256, "empty_block_interval_s": 1.0,
              "rebroadcast_interval_s": 1.0}


def real_run(peers: int, samples: int) -> dict:
    with validator_network(peers, name="fidelity") as net:
        rtts, latencies = signed_rtts_and_latencies(net, samples)
    return {"rtt_s": rtts, "latency_s": latencies}


def sim_run(peers: int, rtt_s: list[float], processing_ms: float, heights: int, seed: int) -> dict:
    from chimera.simulations.runner import run_one
    from chimera.simulations.scenario import load_scenarios

    p50, p90 = np.percentile(rtt_s, [50, 90])
    # lognormal one-way delay: median = RTT/2; p90/p50 = exp(1.2816 sigma)
    sigma = max(0.05, min(1.5, math.log(max(p90 / p50, 1.0001)) / 1.2816))
    overrides = {
        "scenario.peers": peers, "scenario.seed": seed, "scenario.duration_s": 600.0, "sweep": {},
        "network.latency": {"kind": "lognormal", "median_ms": float(p50) / 2 * 1e3, "sigma": sigma},
        "network.bandwidth_bytes_per_s": 1_000_000_000,
        "bft.target_heights": heights, "bft.values_per_s": 4.0, "bft.config": BFT_CONFIG,
        "output.trace": False,
    }
    if processing_ms > 0:
        overrides["slow"] = {"fraction": 1.0, "delay_ms": processing_ms}
    (scenario,) = load_scenarios("commit_latency", overrides)
    result = run_one(scenario, trace=False)
    if result.violation:
        raise RuntimeError(f"simulated run failed: {result.violation}")
    row = result.row
    return {"processing_ms": processing_ms, "one_way_median_ms": float(p50) / 2 * 1e3, "sigma": sigma,
            "p50_ms": row["commit_latency_p50_s"] * 1e3, "p95_ms": row["commit_latency_p95_s"] * 1e3,
            "values": row["values_committed"], "block_interval_mean_ms": row["block_interval_mean_s"] * 1e3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--processing-ms", default="0,1,2,3,4",
                    help="comma-separated per-envelope processing delays to simulate (ms)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    delays = [float(x) for x in args.processing_ms.split(",") if x.strip()]

    real = real_run(args.peers, args.samples)
    lat = np.array(real["latency_s"]) * 1e3
    real_row = {"rtt_p50_ms": statistics.median(real["rtt_s"]) * 1e3,
                "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                "values": len(lat)}
    sims = [sim_run(args.peers, real["rtt_s"], d, heights=max(30, args.samples // 2), seed=args.seed)
            for d in delays]
    # the per-envelope processing delay that reproduces the real p50 (linear interpolation)
    fitted = None
    for a, b in zip(sims, sims[1:]):
        if (a["p50_ms"] - real_row["p50_ms"]) * (b["p50_ms"] - real_row["p50_ms"]) <= 0 and b["p50_ms"] != a["p50_ms"]:
            t = (real_row["p50_ms"] - a["p50_ms"]) / (b["p50_ms"] - a["p50_ms"])
            fitted = a["processing_ms"] + t * (b["processing_ms"] - a["processing_ms"])
            break
    report = {"peers": args.peers, "real": real_row, "simulated": sims, "fitted_processing_ms": fitted}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fidelity.json").write_text(json.dumps(report, indent=2))
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            labels = ["real"] + [f"sim +{s['processing_ms']:g} ms" for s in sims]
            p50 = [real_row["p50_ms"]] + [s["p50_ms"] for s in sims]
            p95 = [real_row["p95_ms"]] + [s["p95_ms"] for s in sims]
            x = np.arange(len(labels))
            fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
            ax.bar(x - 0.2, p50, 0.4, label="p50")
            ax.bar(x + 0.2, p95, 0.4, label="p95")
            ax.set_xticks(x, labels, rotation=20)
            ax.set_ylabel("commit latency (ms)")
            ax.set_title(f"{args.peers} validators: real peers vs simulator")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.out / "fidelity.png")
            plt.close(fig)
        except ModuleNotFoundError:
            pass
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.peers} validators; real signed round trip p50 {real_row['rtt_p50_ms']:.3f} ms")
    print(f"{'run':<28} {'p50 ms':>8} {'p95 ms':>8} {'values':>7}")
    print(f"{'real peers':<28} {real_row['p50_ms']:8.2f} {real_row['p95_ms']:8.2f} {real_row['values']:7d}")
    for s in sims:
        name = f"sim, +{s['processing_ms']:g} ms/envelope"
        print(f"{name:<28} {s['p50_ms']:8.2f} {s['p95_ms']:8.2f} {s['values']:7d}")
    if fitted is None:
        print("no simulated processing delay in the sweep brackets the real p50; widen --processing-ms")
    else:
        print(f"the simulator matches the real p50 with {fitted:.2f} ms of processing per received envelope")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
