"""Search mode: run many seeds of a scenario and stop at the first that violates a property.

Properties checked (every run):

* ``bft``: safety, on every commit of an honest validator (one block per
  height across honest validators, contiguous chain, certificate verifies
  against the height's weight table, identical weight tables); with
  ``liveness=True`` also that all honest validators reached the target height.
* ``membership``: at the end of the run every live peer sees every other live
  peer alive or suspect (no live peer left declared failed).

The failing seed's trace is written, with ``violation.json`` holding the
overrides the search ran with and the replay command (shell-quoted, values in
TOML): running it reproduces the trace byte for byte (same SHA-256).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chimera.consensus.bft import BftCore

from .runner import RunResult, check_layout, is_safety_violation, run_one
from .scenario import MAX_SEED, Scenario


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
    """The property a finished run violates, or None: the run's own violation
    (:func:`~chimera.simulations.runner.run_one` sets it for every kind); a missed
    liveness target only with ``liveness``."""
    v = result.violation
    if is_safety_violation(v) or (v is not None and liveness):
        return v
    return None


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(text: str) -> str:
    # a TOML basic string: JSON's escapes are TOML's ("\/" is never written); TOML also escapes DEL
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value) -> str:
    """``value`` (bool, int, float, str, list, dict) as a TOML value, the syntax ``--set`` parses.

    Raises:
        TypeError: a value TOML cannot hold.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (datetime.date, datetime.time)):  # tomllib's date-times
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        keys = (k if _BARE_KEY.fullmatch(k) else _toml_string(k) for k in map(str, value))
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in zip(keys, value.values())) + "}"
    raise TypeError(f"not a TOML value: {value!r}")


def replay_overrides(scenario: Scenario, overrides: dict | None) -> dict:
    """The ``--set`` overrides that make ``run`` repeat the searched sweep point: the search's
    own overrides (no seed), the point's sweep values (so that ``run`` makes one run, the
    searched one) and a trace when the scenario would not write one."""
    out = {k: v for k, v in (overrides or {}).items() if k != "scenario.seed"}
    for key, value in scenario.sweep_values.items():
        out.setdefault(key, value)
    if not scenario.trace:
        out["output.trace"] = True
    return out


def replay_command(scenario_arg: str, seed: int, overrides: dict) -> str:
    """``python -m chimera.simulations run SCENARIO --seed N --set K=V ...``, every word
    shell-quoted and every value in TOML (``--set`` parses TOML)."""
    words = ["python", "-m", "chimera.simulations", "run", str(scenario_arg), "--seed", str(seed)]
    for key, value in overrides.items():
        words += ["--set", f"{key}={toml_value(value)}"]
    return " ".join(shlex.quote(w) for w in words)


def search(scenario: Scenario, seeds: int, *, first_seed: int = 0, out: Path | None = None,
           liveness: bool = False, core_class: Callable[..., BftCore] = BftCore,
           on_seed: Callable[[int, RunResult], None] | None = None,
           overrides: dict | None = None, scenario_arg: str | None = None) -> SearchResult:
    """Run ``seeds`` seeds from ``first_seed``; stop at the first violation.

    Args:
        scenario: one sweep point; its seed is replaced by each searched seed.
        seeds: how many seeds to try (>= 1).
        out: folder for ``trace-seed-<N>.txt`` and ``violation.json`` of the
            failing seed (nothing is written if all pass).
        liveness: also treat "target height not reached" as a violation.
        core_class: the consensus core to run (tests pass a mutant).
        overrides: the dotted-field overrides ``scenario`` was loaded with (CLI ``--set``,
            ``--peers``); written to ``violation.json`` and into its replay command.
        scenario_arg: the scenario as named on the command line (default: its file name).
    Raises:
        ValueError: ``seeds`` < 1, or seeds outside 0 .. ``MAX_SEED`` (what ``run --seed``
            takes, so every reported seed replays).
        ScenarioError: a searched seed draws byzantine weights >= 1/3 (``bft.weights =
            "random"``), checked for every seed before the first run.
    """
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    if first_seed < 0 or first_seed + seeds - 1 > MAX_SEED:
        raise ValueError(f"seeds must be within 0 .. {MAX_SEED} (first seed {first_seed}, {seeds} seeds)")
    for seed in range(first_seed, first_seed + seeds):
        check_layout(dataclasses.replace(scenario, seed=seed))
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
            replay = replay_overrides(scenario, overrides)
            (out / "violation.json").write_text(json.dumps({
                "scenario": scenario.name, "seed": seed, "violation": problem, "trace": trace_path.name,
                "trace_sha256": digest, "seeds_tried": i + 1, "overrides": replay,
                "replay": replay_command(scenario_arg or scenario.source, seed, replay),
            }, indent=2) + "\n", encoding="utf-8")
        return SearchResult(i + 1, seed, problem, trace_path, digest, result)
    return SearchResult(seeds, None, None, None, None, None)
