"""``chimera train``: start a federated training job, follow its rounds, export the model.

* ``chimera train start JOB.toml``: commits the job (see ``examples/digits-job.toml``) through
  the consensus log and prints its id.
* ``chimera train status [--job ID] [--follow]``: per-round accuracy, loss, updates, round time;
  ``--follow`` shows a live progress display (rich) until the jobs finish (their last round
  committed), plain lines when stdout is not a terminal (a line per committed round, accuracy and
  loss "-" on a node without test data, and whenever a job's state changes);
  with no job committed it says so and exits 1.
* ``chimera train export PATH [--job ID] [--force]``: the latest certified model as ``.npz`` plus
  a JSON sidecar (job spec, round, digest).

``--json`` prints ``{"ok": true, "result": ...}`` like the other commands.
"""

from __future__ import annotations

import argparse
import os
import shlex
import stat
import sys
import time
from pathlib import Path


def _cli():
    """The running ``chimera.node.cli`` module (its ``CliError`` is what ``main`` catches; under
    ``python -m chimera.node.cli`` that is ``__main__``, not a second import of the module)."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == "chimera.node.cli":
        return main
    from . import cli

    return cli


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def job_header(job: dict) -> str:
    role = "participant" if job["participant"] else "observer"
    return (f"job {job['job_id'][:16]}  {job['name']}  {job['state']}  round {job['model_round']}/"
            f"{job['rounds_total']}  {job['rule']}  {job['participants']} participants (quorum {job['quorum']})  "
            f"this peer: {role}")


ROUND_HEADER = f"{'ROUND':>5}  {'ACCURACY':>8}  {'LOSS':>7}  {'UPDATES':>7}  {'ROUND s':>7}  {'FIT s':>6}  " \
               f"{'SENT B':>7}  DIGEST"


def round_line(r: dict) -> str:
    return (f"{r['round']:>5}  {_fmt(r['accuracy'], '8.4f'):>8}  {_fmt(r['loss'], '7.4f'):>7}  "
            f"{_fmt(r['participants'], 'd'):>7}  {_fmt(r['round_s'], '7.2f'):>7}  {_fmt(r['fit_s'], '6.3f'):>6}  "
            f"{r['bytes_sent']:>7}  {(r['digest'] or '-')[:16]}" + ("  (checkpoint not written)"
                                                                    if r.get("saved") is False else ""))


def status_text(res: dict) -> str:
    if not res["jobs"]:
        return "no training job committed yet (`chimera train start JOB.toml`)"
    lines = []
    for job in res["jobs"]:
        lines += [job_header(job), ROUND_HEADER, *[round_line(r) for r in job["rounds"]]]
        if job.get("sklearn_version_mismatch"):
            lines.append(f"this peer runs scikit-learn {job.get('sklearn_version') or '(none)'}, the job's anomaly "
                         f"screen needs {job['spec'].get('sklearn_version')}: it trains but does not check or "
                         "confirm aggregates (it fetches the certified models)")
        checkpoint = job.get("checkpoint") or {}
        if checkpoint.get("state") == "failing":
            lines.append(f"checkpoint: round {checkpoint['unsaved_round']} is in memory only "
                         f"({checkpoint['failures']} failed writes, retried): {checkpoint['error']}")
        if job["last_error"]:
            lines.append(f"last error: {job['last_error']}")
        lines.append("")
    return "\n".join(lines).rstrip()


def cmd_train_start(args: argparse.Namespace) -> int:
    cli = _cli()
    path = Path(args.job_file)
    try:
        info = path.stat()  # a device or FIFO would read without end
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_JOB_FILE_BYTES:
            raise cli.CliError(f"{path}: not a regular file of at most {MAX_JOB_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise cli.CliError(f"cannot read {path}: {exc}") from None
    res = cli._call(args, "train_start", {"job": text, "timeout_s": args.timeout_s}, timeout_s=args.timeout_s + 5)
    where = f" --data-dir {shlex.quote(str(args.data_dir))}" if args.data_dir else ""
    from .shell import train_start_text

    cli._print(args, res, f"{train_start_text(res)}\nfollow it: chimera train status --follow{where}")
    return 0


def _status(args: argparse.Namespace) -> dict:
    return _cli()._call(args, "train_status", {"job": args.job} if args.job else {})


MAX_JOB_FILE_BYTES = 1 << 20  # a job file is a few hundred bytes of TOML
MIN_POLL_S = 0.2  # every poll is an admin request, and the node writes an audit row for each
NO_JOB = "no training job committed yet (`chimera train start JOB.toml`)"


def cmd_train_status(args: argparse.Namespace) -> int:
    if not args.follow:
        _cli()._show(args, "train_status", _status(args))
        return 0
    res = _status(args)
    if not res["jobs"]:
        cli = _cli()
        raise cli.CliError(NO_JOB, cli.EXIT_FAIL)
    if args.json or not sys.stdout.isatty():
        return _follow_plain(args, res)
    return _follow_rich(args, res)


def _finished(res: dict) -> bool:
    """Every job finished with its last round committed here (listed with its digest: a round
    shows once its checkpoint row is written, after this node scored it on its test data, so
    an observer without test data lists its rounds with accuracy None)."""
    return bool(res["jobs"]) and all(
        j["state"] == "finished" and any(r["round"] == j["rounds_total"] and r["digest"] for r in j["rounds"])
        for j in res["jobs"])


def state_line(job: dict) -> str:
    line = (f"{job['job_id'][:16]} {job['name']}: {job['state']}, round {job['round']}, "
            f"{job['model_round']}/{job['rounds_total']} rounds committed")
    return line + (f", last error: {job['last_error']}" if job["last_error"] else "")


def _changes(res: dict, seen: dict[str, tuple], printed: dict[str, int]) -> list[tuple[str, dict, dict | None]]:
    """What a poll shows that the previous ones did not: ``("round", job, r)`` for each newly
    committed round (digest set; accuracy and loss None where this node has no test data); else, when a job is new or its state, current round or last error changed,
    ``("state", job, None)`` (a poll with new rounds of a job says enough about it)."""
    out: list[tuple[str, dict, dict | None]] = []
    for job in res["jobs"]:
        key = job["job_id"]
        rounds = [r for r in job["rounds"] if r["round"] > printed.get(key, 0) and r["digest"]]
        for r in rounds:
            printed[key] = max(printed.get(key, 0), r["round"])
            out.append(("round", job, r))
        state = (job["state"], job["round"], job["last_error"])
        if seen.get(key) != state:
            seen[key] = state
            if not rounds:
                out.append(("state", job, None))
    return out


def _follow_plain(args: argparse.Namespace, res: dict) -> int:
    """A line per committed round, and one when a job's state changes otherwise (``--json``: one
    JSON document each, with ``event`` "round" or "state"), until the jobs finish."""
    from .shell import json_line, with_audit_failure

    seen: dict[str, tuple] = {}
    printed: dict[str, int] = {}
    while True:
        for what, job, r in _changes(res, seen, printed):
            if args.json:
                doc = ({"event": "round", "job_id": job["job_id"], **r} if what == "round" else
                       {"event": "state", **{k: job[k] for k in ("job_id", "name", "state", "round", "model_round",
                                                                  "rounds_total", "last_error")}})
                print(json_line(with_audit_failure({"ok": True, "result": doc})), flush=True)
            elif what == "round":
                print(f"{job['job_id'][:16]} {job['name']}: round {r['round']}/{job['rounds_total']} "
                      f"accuracy {_fmt(r['accuracy'], '.4f')} loss {_fmt(r['loss'], '.4f')} updates {r['participants']} "
                      f"time {_fmt(r['round_s'], '.2f')} s", flush=True)
            else:
                print(state_line(job), flush=True)
        if _finished(res):
            return 0
        time.sleep(args.interval)
        res = _status(args)


def _follow_rich(args: argparse.Namespace, res: dict) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    bars: dict[str, int] = {}
    seen: dict[str, tuple] = {}
    printed: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("acc {task.fields[accuracy]}  loss {task.fields[loss]}"), TimeElapsedColumn(),
                  console=console) as progress:
        while True:
            for what, job, r in _changes(res, seen, printed):
                key = job["job_id"]
                if key not in bars:
                    bars[key] = progress.add_task(f"{key[:12]} {job['name']}", total=job["rounds_total"],
                                                  accuracy="-", loss="-")
                    progress.console.print(job_header(job))
                    progress.console.print(ROUND_HEADER)
                if what == "round":
                    progress.console.print(round_line(r))
                else:
                    progress.console.print(state_line(job))
            for job in res["jobs"]:
                done = [r for r in job["rounds"] if r["accuracy"] is not None]
                last = done[-1] if done else None
                if job["job_id"] in bars:
                    progress.update(bars[job["job_id"]], completed=job["model_round"],
                                    accuracy=_fmt(last and last["accuracy"], ".4f"),
                                    loss=_fmt(last and last["loss"], ".4f"))
            if _finished(res):
                return 0
            time.sleep(args.interval)
            res = _status(args)


def export_paths(path_text: str, force: bool) -> tuple[Path, Path]:
    """The ``.npz`` and ``.json`` paths a ``train_export`` result goes to (client side).

    Raises:
        FileExistsError: one exists and ``force`` is false.
        ValueError: ``path_text`` is empty or names a directory (the files would land next
            to it, outside it).
    """
    if not path_text.strip():
        raise ValueError("the export path is empty: name the .npz file to write")
    if path_text.endswith(("/", os.sep)) or Path(path_text).expanduser().is_dir():
        raise ValueError(f"{path_text} is a directory: name the .npz file to write (e.g. {path_text.rstrip('/')}/model.npz)")
    path = Path(path_text).expanduser().resolve()
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    sidecar = path.with_suffix(".json")
    for target in (path, sidecar):
        if target.exists() and not force:
            raise FileExistsError(f"{target} exists")
    return path, sidecar


def write_export(result: dict, path: Path, sidecar: Path) -> dict:
    """Write a ``train_export`` result (``npz`` bytes, ``sidecar`` text) atomically; returns the
    rest of it with ``path`` and ``sidecar``. Raises OSError when a file cannot be written."""
    from .keys import atomic_write

    rest = dict(result)
    atomic_write(path, rest.pop("npz"), mode=0o644)
    atomic_write(sidecar, rest.pop("sidecar").encode(), mode=0o644)
    rest.update(path=str(path), sidecar=str(sidecar))
    return rest


def cmd_train_export(args: argparse.Namespace) -> int:
    cli = _cli()
    try:
        path, sidecar = export_paths(args.path, args.force)
    except FileExistsError as exc:
        raise cli.CliError(f"{exc} (use --force to overwrite)", cli.EXIT_USAGE) from None
    except ValueError as exc:
        raise cli.CliError(str(exc), cli.EXIT_USAGE) from None
    res = cli._call(args, "train_export", {"job": args.job} if args.job else {})
    try:
        res = write_export(res, path, sidecar)
    except OSError as exc:
        raise cli.CliError(f"cannot write {path}: {exc.strerror or exc}", cli.EXIT_FAIL) from None
    cli._show(args, "train_export", res)
    return 0


def register(sub) -> None:
    """Add ``chimera train ...`` to the CLI's subparsers ``sub``."""
    train = sub.add_parser("train", help="federated training: start a job, follow it, export the model")
    train_sub = train.add_subparsers(dest="train_command", required=True)
    from .cli_fabric import finite_float, old_spelling

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="node data directory (default: $CHIMERA_HOME or "
                                          "the platform user data dir)")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = train_sub.add_parser("start", help="commit a training job (TOML, see examples/digits-job.toml)")
    common(p)
    p.add_argument("job_file", metavar="JOB.toml")
    p.add_argument("--timeout-s", type=finite_float(0.1, 600.0), default=60.0,
                   help="seconds to wait for the job's commit (0.1..600)")
    old_spelling(p, "--timeout", "--timeout-s")
    p.set_defaults(func=cmd_train_start)
    p = train_sub.add_parser("status", help="jobs and per-round accuracy/loss")
    common(p)
    p.add_argument("--job", help="job id (prefix) or name (default: all jobs)")
    p.add_argument("--follow", action="store_true", help="follow until the jobs finish (progress display)")
    p.add_argument("--interval", type=finite_float(MIN_POLL_S, 3600.0), default=0.5,
                   help=f"seconds between polls with --follow ({MIN_POLL_S:g}..3600; each poll is audited)")
    p.set_defaults(func=cmd_train_status)
    p = train_sub.add_parser("export", help="write the latest certified model as .npz + JSON sidecar")
    common(p)
    p.add_argument("path", metavar="PATH")
    p.add_argument("--job", help="job id (prefix) or name (default: the latest job)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_train_export)
