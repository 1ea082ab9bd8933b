"""Search mode: run many seeds of a scenario and stop at the first that violates a property.

Properties checked (every run):

* ``bft``: safety, on every commit of an honest validator (one block per
  height across honest validators, contiguous chain, certificate verifies
  against the height's weight table, identical weight tables); with
  ``liveness=True`` also that all honest validators reached the target height.
* ``membership``: at the end of the run every live peer sees every other live
  peer alive or suspect (no live peer left declared failed).

The failing seed's trace is written; running the same scenario with
``--seed`` of that seed reproduces it byte for byte (same SHA-256).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chimera.consensus.bft import BftCore

from .runner import RunResult, run_one
from .scenario import Scenario


@dataclass
class SearchResult:
    """``failing_seed`` is None when every seed passed."""

    seeds_tried: int
    failing_seed: int | None
    violation: str | None
    trace_path: Path | None
    trace_sha256: str | None
    result: RunResult | None


def violation_of(result: RunResult, liveness: bool) -> str | None:
    """The property a finished run violates, or None."""
    if result.scenario.kind == "membership":
        return None if result.row.get("views_consistent") else "membership: a live peer is seen as failed at the end"
    v = result.violation
    if v is None or (v.startswith("liveness") and not liveness):
        return None
    return v


def search(scenario: Scenario, seeds: int, *, first_seed: int = 0, out: Path | None = None,
           liveness: bool = False, core_class: Callable[..., BftCore] = BftCore,
           on_seed: Callable[[int, RunResult], None] | None = None) -> SearchResult:
    """Run ``seeds`` seeds from ``first_seed``; stop at the first violation.

    Args:
        scenario: one sweep point; its seed is replaced by each searched seed.
        seeds: how many seeds to try (>= 1).
        out: folder for ``trace-seed-<N>.txt`` and ``violation.json`` of the
            failing seed (nothing is written if all pass).
        liveness: also treat "target height not reached" as a violation.
        core_class: the consensus core to run (tests pass a mutant).
    Raises:
        ValueError: ``seeds`` < 1.
    """
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    for i, seed in enumerate(range(first_seed, first_seed + seeds)):
        sc = dataclasses.replace(scenario, seed=seed, trace=True)
        result = run_one(sc, core_class=core_class, trace=True, check_liveness=True)
        if on_seed is not None:
            on_seed(seed, result)
        problem = violation_of(result, liveness)
        if problem is None:
            continue
        trace_path = None
        digest = result.trace.digest() if result.trace is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            trace_path = out / f"trace-seed-{seed}.txt"
            result.trace.write(trace_path)
            (out / "violation.json").write_text(json.dumps({
                "scenario": scenario.name, "seed": seed, "violation": problem, "trace": trace_path.name,
                "trace_sha256": digest, "seeds_tried": i + 1,
                "replay": f"python -m chimera.simulations run {scenario.source} --seed {seed}",
            }, indent=2) + "\n", encoding="utf-8")
        return SearchResult(i + 1, seed, problem, trace_path, digest, result)
    return SearchResult(seeds, None, None, None, None, None)
