"""Command line of the simulator (``python -m chimera.simulations``; ``chimera simulate``).

::

    python -m chimera.simulations run SCENARIO [--seed N] [--peers N] [--out DIR] [--set FIELD=VALUE]...
    python -m chimera.simulations search SCENARIO --seeds N [--first-seed N] [--peers N] [--out DIR] [--liveness]
    python -m chimera.simulations list
    chimera simulate SCENARIO [--seed N] [--peers N] ...   (same as ``run``)

``SCENARIO`` is a TOML file or the name of a shipped one (``list`` shows
them): ``commit-latency``, the name the scenario and its output folder carry;
the file's spelling ``commit_latency`` works too. ``run`` writes ``metrics.csv``, ``metrics.json``, PNG plots, pivot tables
(``[[output.tables]]``: Markdown + CSV) and (for small runs)
``trace-<k>.txt`` to ``--out`` (default ``sim-out/<name>``).
``search`` stops at the first seed that violates a safety property and writes
its trace and ``violation.json``; the replay command it prints (shell-quoted,
``--set`` values in TOML, the searched sweep point pinned) reproduces it byte
for byte.

Exit status: 0 success; 1 a property was violated (search found a seed, or a
run broke safety: BFT/training/fabric safety, or a live peer seen as failed at
the end of a membership run); 2 bad usage or an invalid scenario file, checked
before the first run where it can be (the message names the file and field;
a plot or table naming a metric no run produced is reported after the runs,
their metrics kept).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .scenario import SCENARIO_DIR, ScenarioError, load_scenarios, shipped_name


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chimera simulate",
                                     description="Deterministic simulator of Chimera Mesh peers.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario (all its sweep points)")
    search = sub.add_parser("search", help="run many seeds; stop at the first safety violation")
    for p in (run, search):
        p.add_argument("scenario", help="TOML file or shipped scenario name (commit-latency; "
                                        "commit_latency works too)")
        p.add_argument("--peers", type=int, help="override scenario.peers (removes it from the sweep)")
        p.add_argument("--out", type=Path, help="output folder (default sim-out/<scenario name>)")
        p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override any field, e.g. --set network.loss=0.1 (value parsed as TOML)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--seed", type=int, help="override scenario.seed")
    search.add_argument("--seeds", type=int, required=True, help="number of seeds to try")
    search.add_argument("--first-seed", type=int, default=0)
    search.add_argument("--liveness", action="store_true", help="also stop at a run that misses its target height")
    sub.add_parser("list", help="list the shipped scenarios")
    return parser


def _overrides(args) -> dict:
    import tomllib

    out: dict = {}
    if getattr(args, "seed", None) is not None:
        out["scenario.seed"] = args.seed
    if args.peers is not None:
        out["scenario.peers"] = args.peers
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ScenarioError("--set", item, "expected FIELD=VALUE")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), disable=not enabled, transient=False)


def cmd_run(args) -> int:
    from .report import check_columns, write_metrics, write_plots, write_tables
    from .runner import check_layout, is_safety_violation, run_one

    scenarios = load_scenarios(args.scenario, _overrides(args))
    for sc in scenarios:  # seed-drawn byzantine weights: refused before the first run
        check_layout(sc)
    out = args.out or Path("sim-out") / scenarios[0].name
    out.mkdir(parents=True, exist_ok=True)
    results = []
    started = time.perf_counter()
    with _progress(not args.no_progress) as progress:
        for k, sc in enumerate(scenarios):
            label = " ".join(f"{key.split('.')[-1]}={v}" for key, v in sc.sweep_values.items()) or sc.name
            task = progress.add_task(f"[{k + 1}/{len(scenarios)}] {label}", total=sc.duration_s, info="")

            def tick(t: float, task=task) -> None:
                progress.update(task, completed=t, info=f"t={t:.1f} s")

            result = run_one(sc, progress=tick)
            progress.update(task, completed=sc.duration_s, info=f"done at t={result.virtual_s:.1f} s, "
                                                               f"{result.events} events")
            if result.trace is not None:
                result.trace.write(out / f"trace-{k}.txt")
            results.append(result)
    csv_path, json_path = write_metrics(results, out)
    check_columns(results, scenarios[0].plots, scenarios[0].tables)  # after the metrics: they are kept
    tables = write_tables(results, scenarios[0].tables, out)
    try:
        plots = write_plots(results, scenarios[0].plots, out)
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        plots = []
        print("plots skipped: matplotlib is not installed (pip install 'chimera-mesh[sim]'); "
              "the metrics are complete", file=sys.stderr)
    broken = [r for r in results if is_safety_violation(r.violation)]
    late = [r for r in results if r.violation and not is_safety_violation(r.violation)]
    print(f"{len(results)} run(s) of {scenarios[0].name} in {time.perf_counter() - started:.1f} s wall")
    print(f"metrics: {csv_path} {json_path}")
    for path in plots:
        print(f"plot: {path}")
    for path in tables:
        if path.suffix == ".md":
            print(f"table: {path}")
            print(path.read_text(encoding="utf-8"))
    for r in late:
        print(f"warning: seed {r.scenario.seed} {r.violation}")
    for r in broken:
        print(f"VIOLATION with seed {r.scenario.seed}: {r.violation}", file=sys.stderr)
    return 1 if broken else 0


def cmd_search(args) -> int:
    from .search import replay_command, replay_overrides, search

    overrides = _overrides(args)
    scenario = load_scenarios(args.scenario, overrides)[0]
    out = args.out or Path("sim-out") / f"{scenario.name}-search"
    with _progress(not args.no_progress) as progress:
        task = progress.add_task(f"search {scenario.name}", total=args.seeds, info="")

        def on_seed(seed, result) -> None:
            progress.update(task, advance=1, info=f"seed {seed}: {result.events} events")

        found = search(scenario, args.seeds, first_seed=args.first_seed, out=out, liveness=args.liveness,
                       on_seed=on_seed, overrides=overrides, scenario_arg=args.scenario)
    if found.failing_seed is None:
        print(f"no violation in {found.seeds_tried} seeds ({args.first_seed}..{args.first_seed + args.seeds - 1})")
        return 0
    print(f"VIOLATION at seed {found.failing_seed} (after {found.seeds_tried} seeds): {found.violation}")
    print(f"trace: {found.trace_path} (sha256 {found.trace_sha256})")
    print(f"replay: {replay_command(args.scenario, found.failing_seed, replay_overrides(scenario, overrides))}")
    return 1


def cmd_list() -> int:
    import tomllib

    for path in sorted(SCENARIO_DIR.glob("*.toml")):
        doc = tomllib.loads(path.read_text(encoding="utf-8")).get("scenario", {})
        print(f"{shipped_name(path):28} {doc.get('kind', '?'):11} {doc.get('description', '')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in {"run", "search", "list", "-h", "--help"}:
        argv = ["run", *argv]  # `chimera simulate SCENARIO ...` is `run SCENARIO ...`
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            code = cmd_list()
        elif args.command == "run":
            code = cmd_run(args)
        else:
            code = cmd_search(args)
        sys.stdout.flush()  # (a closed pipe shows here, not at exit)
        return code
    except BrokenPipeError:  # `simulate list | head -1`: the reader went away, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. byzantine weight >= 1/3
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --out names a file, or a folder that cannot be created
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
