"""Aggregation maths benchmark: wall time of each rule, per round, on one core.

What one peer spends computing a round's aggregate with
:func:`chimera.consensus.aggregation.aggregate` (flattening to float64 deltas,
the rule, casting back, the SHA-256 aggregate hash), for

* the digits model of the demo (``SGDClassifier`` on 8x8 digits: ``coef``
  float64 (10, 64) + ``intercept`` float64 (10,), 650 parameters), and
* a larger model: one float32 vector of 1,000,000 parameters,

with 5, 10 and 50 updates (``f = 1`` for 5 updates, else ``f = n // 5``), and
FedAvg with the anomaly detector on (``fedavg+detect``: IsolationForest of 25
trees + robust z-scores). Updates are random normal parameters (the maths
costs the same whatever the values).

Each figure is the median of ``--repeat`` runs (5; ``--repeat-large``, 3, for
the 1e6-parameter model). Nothing here
asserts on time; it prints a table (``--json``: the same figures as JSON).
Run: ``python -m benchmarks.bench_aggregation [--json] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

from chimera.consensus.aggregation import (
    AggregationConfig,
    ModelSpec,
    TensorSpec,
    Update,
    aggregate,
)

RULE_SETTINGS = {
    "fedavg": dict(rule="fedavg"),
    "fedavg+detect": dict(rule="fedavg", detect=True),
    "median": dict(rule="median"),
    "trimmed_mean": dict(rule="trimmed_mean"),
    "krum": dict(rule="krum"),
    "multi_krum": dict(rule="multi_krum"),
    "reputation_clipped": dict(rule="reputation_clipped"),
}
SIZES = (5, 10, 50)

MODELS = {
    "digits (650 params)": ModelSpec((TensorSpec("coef", (10, 64), "float64"),
                                      TensorSpec("intercept", (10,), "float64"))),
    "vector (1e6 params)": ModelSpec((TensorSpec("w", (1_000_000,), "float32"),)),
}


def _updates(spec: ModelSpec, n: int, seed: int = 0) -> list[Update]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        params = {t.name: rng.normal(size=t.shape).astype(np.float32 if t.dtype == "float32" else np.float64)
                  for t in spec.tensors}
        out.append(Update(sender=f"peer-{i:03d}", params=params, num_samples=int(rng.integers(50, 500)),
                          weight=float(rng.integers(1, 100)), loss_before=1.0,
                          loss_after=float(rng.uniform(0.2, 0.9))))
    return out


def time_rule(spec: ModelSpec, updates: list[Update], config: AggregationConfig, repeat: int) -> float:
    """Median wall seconds of ``aggregate`` over ``repeat`` runs (time.perf_counter)."""
    base = spec.zeros()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        aggregate(updates, spec, config, base=base)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(repeat: int = 5, repeat_large: int = 3, quick: bool = False) -> dict:
    results: dict[str, dict[str, dict[int, float]]] = {}
    for model, spec in MODELS.items():
        large = spec.size >= 1_000_000
        results[model] = {}
        for n in SIZES:
            if quick and large and n == 50:
                continue
            updates = _updates(spec, n)
            f = 1 if n == 5 else n // 5
            for name, settings in RULE_SETTINGS.items():
                config = AggregationConfig(f=f, **settings)
                reps = repeat_large if large else repeat
                results[model].setdefault(name, {})[n] = time_rule(spec, updates, config, reps)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (digits model)")
    parser.add_argument("--repeat-large", type=int, default=3, help="runs per figure (1e6 parameters)")
    parser.add_argument("--quick", action="store_true", help="skip the 1e6-parameter model with 50 updates")
    args = parser.parse_args(argv)
    results = measure(args.repeat, args.repeat_large, args.quick)
    if args.json:
        print(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                          "numpy": np.__version__, "seconds": results}, indent=2))
        return 0
    print(f"aggregation wall time per round, one peer, one core ({platform.python_version()}, numpy {np.__version__})")
    for model, by_rule in results.items():
        sizes = sorted({n for per in by_rule.values() for n in per})
        print(f"\n{model}")
        print(f"  {'rule':20s}" + "".join(f"{f'{n} updates':>14s}" for n in sizes))
        for name, per in by_rule.items():
            cells = "".join(f"{per[n] * 1000:11.2f} ms" if n in per else f"{'-':>14s}" for n in sizes)
            print(f"  {name:20s}{cells}")
    print("\nf = 1 for 5 updates, n // 5 otherwise; fedavg+detect adds IsolationForest (25 trees) + robust z.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
