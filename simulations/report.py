"""Write run results: metrics as CSV and JSON, plots as PNG (matplotlib, Agg backend), pivot tables
(Markdown + CSV)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

from .runner import RunResult
from .scenario import REPORT_FILES, PlotSpec, ScenarioError, TableSpec


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_metrics(results: Sequence[RunResult], out: Path) -> tuple[Path, Path]:
    """``metrics.csv`` (one row per run, union of columns in first-seen order) and
    ``metrics.json`` (rows, series and violations). Non-finite floats become empty/null."""
    out.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in results:
        for key in r.row:
            if key not in columns:
                columns.append(key)
    csv_path = out / "metrics.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in results:
            writer.writerow({k: ("" if _clean(r.row.get(k)) is None else r.row.get(k)) for k in columns})
    json_path = out / "metrics.json"
    doc = {
        "scenario": results[0].scenario.name if results else None,
        "kind": results[0].scenario.kind if results else None,
        "runs": [{"sweep": _clean(r.scenario.sweep_values), "metrics": _clean(r.row),
                  "series": _clean(r.series), "violation": r.violation,
                  "trace_sha256": r.trace.digest() if r.trace is not None else None} for r in results],
    }
    json_path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return csv_path, json_path


def _target(out: Path, name: str) -> Path:
    """``out / name`` for a plot or table file; never a path elsewhere or a file the report
    writes itself (the scenario loader refuses such names first)."""
    if Path(name).name != name or name in ("", ".", "..") or "\\" in name or \
            name.lower() in REPORT_FILES or name.lower().startswith("trace-"):
        raise ValueError(f"output file {name!r}: not a plain file name, or one the report writes itself")
    return out / name


def _names(keys: set[str]) -> str:
    shown = sorted(keys)
    return ", ".join(shown[:40]) + (f" ... ({len(shown)} in all)" if len(shown) > 40 else "")


def check_columns(results: Sequence[RunResult], plots: Sequence[PlotSpec], tables: Sequence[TableSpec]) -> None:
    """Every metric a plot draws (x, y) or a table shows (value) must be a column of some
    run (a name no run produced would make an empty plot or table).

    Raises:
        ScenarioError: naming the scenario file and the field (``output.plots[0].y``).
    """
    if not results:
        return
    source = results[0].scenario.source
    columns = {k for r in results for k in (*r.row, *r.scenario.sweep_values)}
    per_series = {kind: {k for r in results for p in r.series.get(kind, []) for k in p}
                  for kind in ("rounds", "time")}

    def check(field_name: str, name: str | None, known: set[str], what: str) -> None:
        if name is not None and known and name not in known:
            raise ScenarioError(source, field_name, f"no run produced {what} {name!r}; "
                                                    f"known: {_names(known)}")

    for i, spec in enumerate(plots):
        where = f"output.plots[{i}]"
        points = columns if spec.kind == "runs" else per_series[spec.kind]
        what = "a metric" if spec.kind == "runs" else f"a per-{'round' if spec.kind == 'rounds' else 'sample'} value"
        check(f"{where}.x", spec.x, points, what)
        for metric in spec.y:
            check(f"{where}.y", metric, points, what)
    for i, spec in enumerate(tables):
        check(f"output.tables[{i}].value", spec.value, columns, "a metric")
    # series, facet, rows and columns only group the runs: a name no run has makes one group


def _as_float(value) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def write_plots(results: Sequence[RunResult], plots: Sequence[PlotSpec], out: Path) -> list[Path]:
    """One PNG per :class:`PlotSpec`; with no spec, a reputation plot when the runs have one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for spec in plots:
        if spec.kind == "rounds":
            written.append(_rounds_plot(plt, results, spec, out))
            continue
        if spec.kind == "time":
            written.append(_time_plot(plt, results, spec, out))
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        groups: dict[str, list[RunResult]] = {}
        for r in results:
            label = "" if spec.series is None else f"{spec.series}={r.scenario.sweep_values.get(spec.series, r.row.get(spec.series))}"
            groups.setdefault(label, []).append(r)
        for label, runs in groups.items():
            runs = sorted(runs, key=lambda r: _as_float(r.row.get(spec.x)))
            xs = [_as_float(r.row.get(spec.x)) for r in runs]
            for metric in spec.y:
                ys = [_as_float(r.row.get(metric)) for r in runs]
                name = metric if not label else f"{metric} ({label})" if len(spec.y) > 1 else label
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel(spec.x)
        ax.set_ylabel(", ".join(spec.y) if len(spec.y) < 3 else "value")
        ax.set_title(spec.title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = _target(out, spec.file)
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    reputation = [r for r in results if r.series.get("reputation") and len(r.series["reputation"]) > 1]
    if reputation:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for r in reputation:
            rows = r.series["reputation"]
            tag = " ".join(f"{k}={v}" for k, v in r.scenario.sweep_values.items())
            ax.plot([x["epoch"] for x in rows], [x["mean_honest_weight"] for x in rows], marker="o",
                    label=f"honest {tag}".strip())
            ax.plot([x["epoch"] for x in rows], [x["mean_byzantine_weight"] for x in rows], marker="x",
                    linestyle="--", label=f"byzantine {tag}".strip())
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean voting weight")
        ax.set_title("Reputation-weighted voting power per epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / "reputation.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _value_of(r: RunResult, name: str | None):
    if name is None:
        return ""
    return r.scenario.sweep_values.get(name, r.row.get(name))


def _rounds_plot(plt, results: Sequence[RunResult], spec: PlotSpec, out: Path) -> Path:
    """Per-round series (``series["rounds"]``, job 0): one panel per value of ``spec.facet``,
    one line per value of ``spec.series``; x the round, y ``spec.y[0]`` (and more metrics
    as extra line styles)."""
    facets: list = []
    for r in results:
        value = _value_of(r, spec.facet)
        if value not in facets:
            facets.append(value)
    cols = min(len(facets), 2)
    rows = (len(facets) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.0 * rows), dpi=100, squeeze=False)
    styles = ["-", "--", ":", "-."]
    for k, facet in enumerate(facets):
        ax = axes[k // cols][k % cols]
        for r in results:
            if _value_of(r, spec.facet) != facet:
                continue
            points = [p for p in r.series.get("rounds", []) if p.get("job", 0) == 0]
            label = str(_value_of(r, spec.series)) if spec.series else r.scenario.name
            for m, metric in enumerate(spec.y):
                xs = [_as_float(p.get(spec.x)) for p in points]
                ys = [_as_float(p.get(metric)) for p in points]
                ax.plot(xs, ys, linestyle=styles[m % len(styles)], marker="." if len(xs) < 40 else None,
                        label=label if len(spec.y) == 1 else f"{label} {metric}")
        ax.set_title(f"{spec.facet.split('.')[-1]} = {facet}" if spec.facet else spec.title, fontsize="medium")
        ax.set_xlabel(spec.x)
        ax.set_ylabel(", ".join(spec.y))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    for k in range(len(facets), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(spec.title)
    fig.tight_layout()
    path = _target(out, spec.file)
    fig.savefig(path)
    plt.close(fig)
    return path


def _time_plot(plt, results: Sequence[RunResult], spec: PlotSpec, out: Path) -> Path:
    """Sampled series (``series["time"]``, fabric runs): x ``spec.x`` (virtual seconds),
    one line per metric of ``spec.y`` per run (labelled by ``spec.series`` or the sweep values)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    styles = ["-", "--", ":", "-."]
    for k, r in enumerate(results):
        points = r.series.get("time", [])
        if spec.series:
            tag = f"{spec.series.split('.')[-1]}={_value_of(r, spec.series)}"
        else:
            tag = " ".join(f"{key.split('.')[-1]}={v}" for key, v in r.scenario.sweep_values.items())
        xs = [_as_float(p.get(spec.x)) for p in points]
        for m, metric in enumerate(spec.y):
            ys = [_as_float(p.get(metric)) for p in points]
            ax.plot(xs, ys, linestyle=styles[k % len(styles)], marker="." if len(xs) < 60 else None,
                    label=f"{metric} {tag}".strip())
    ax.set_xlabel(spec.x)
    ax.set_ylabel(", ".join(spec.y) if len(spec.y) < 3 else "value")
    ax.set_title(spec.title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    path = _target(out, spec.file)
    fig.savefig(path)
    plt.close(fig)
    return path


def pivot(results: Sequence[RunResult], spec: TableSpec) -> tuple[list, list, dict]:
    """Row keys, column keys (first-seen order) and ``{(row, col): value}`` of ``spec.value``
    (the mean when several runs share a cell)."""
    row_keys: list = []
    col_keys: list = []
    cells: dict = {}
    for r in results:
        rk, ck = _value_of(r, spec.rows), _value_of(r, spec.columns)
        if rk not in row_keys:
            row_keys.append(rk)
        if ck not in col_keys:
            col_keys.append(ck)
        cells.setdefault((rk, ck), []).append(_as_float(r.row.get(spec.value)))
    return row_keys, col_keys, {k: sum(v) / len(v) for k, v in cells.items()}


def write_tables(results: Sequence[RunResult], tables: Sequence[TableSpec], out: Path) -> list[Path]:
    """Each :class:`TableSpec` as a Markdown table (``file``) and a CSV next to it."""
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for spec in tables:
        row_keys, col_keys, cells = pivot(results, spec)

        def fmt(v: float) -> str:
            return "" if not math.isfinite(v) else f"{v:.4f}"

        lines = [f"{spec.title}", "", f"| {spec.rows.split('.')[-1]} \\ {spec.columns.split('.')[-1]} | "
                 + " | ".join(str(c) for c in col_keys) + " |",
                 "|---" * (len(col_keys) + 1) + "|"]
        for rk in row_keys:
            lines.append(f"| {rk} | " + " | ".join(fmt(cells.get((rk, ck), math.nan)) for ck in col_keys) + " |")
        md = _target(out, spec.file)
        csv_path = _target(out, md.with_suffix(".csv").name)
        md.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with csv_path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow([spec.rows, *col_keys])
            for rk in row_keys:
                writer.writerow([rk, *(fmt(cells.get((rk, ck), math.nan)) for ck in col_keys)])
        written.extend([md, csv_path])
    return written
