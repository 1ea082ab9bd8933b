"""Write run results: metrics as CSV and JSON, plots as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

from .runner import RunResult
from .scenario import PlotSpec


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
        path = out / spec.file
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
