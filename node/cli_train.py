"""``chimera train``: start a federated training job, follow its rounds, export the model.

* ``chimera train start JOB.toml``: commits the job (see ``examples/digits-job.toml``) through
  the consensus log and prints its id.
* ``chimera train status [--job ID] [--follow]``: per-round accuracy, loss, updates, round time;
  ``--follow`` shows a live progress display (rich) until the jobs finish, plain lines when
  stdout is not a terminal.
* ``chimera train export PATH [--job ID] [--force]``: the latest certified model as ``.npz`` plus
  a JSON sidecar (job spec, round, digest).

``--json`` prints ``{"ok": true, "result": ...}`` like the other commands.
"""

from __future__ import annotations

import argparse
import json
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
            f"{r['bytes_sent']:>7}  {(r['digest'] or '-')[:16]}")


def status_text(res: dict) -> str:
    if not res["jobs"]:
        return "no training job committed yet (`chimera train start JOB.toml`)"
    lines = []
    for job in res["jobs"]:
        lines += [job_header(job), ROUND_HEADER, *[round_line(r) for r in job["rounds"]]]
        if job["last_error"]:
            lines.append(f"last error: {job['last_error']}")
        lines.append("")
    return "\n".join(lines).rstrip()


def cmd_train_start(args: argparse.Namespace) -> int:
    cli = _cli()
    path = Path(args.job_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise cli.CliError(f"cannot read {path}: {exc}") from None
    res = cli._call(args, "train_start", {"job": text, "timeout_s": args.timeout}, timeout_s=args.timeout + 5)
    cli._print(args, res, f"job {res['job_id']} ({res['name']}) committed at height {res['height']}: "
                      f"{res['participants']} participants, quorum {res['quorum']}, update {res['update_bytes']} "
                      f"bytes\nfollow it: chimera train status --follow")
    return 0


def _status(args: argparse.Namespace) -> dict:
    return _cli()._call(args, "train_status", {"job": args.job} if args.job else {})


def cmd_train_status(args: argparse.Namespace) -> int:
    if not args.follow:
        res = _status(args)
        _cli()._print(args, res, status_text(res))
        return 0
    if args.json or not sys.stdout.isatty():
        return _follow_plain(args)
    return _follow_rich(args)


def _finished(res: dict) -> bool:
    return bool(res["jobs"]) and all(j["state"] == "finished" and j["rounds"]
                                     and j["rounds"][-1]["accuracy"] is not None for j in res["jobs"])


def _follow_plain(args: argparse.Namespace) -> int:
    """One line per committed round (``--json``: one JSON document per round), until finished."""
    printed: dict[str, int] = {}
    while True:
        res = _status(args)
        for job in res["jobs"]:
            for r in job["rounds"]:
                if r["round"] > printed.get(job["job_id"], 0) and r["accuracy"] is not None:
                    printed[job["job_id"]] = r["round"]
                    if args.json:
                        print(json.dumps({"ok": True, "result": {"job_id": job["job_id"], **r}}), flush=True)
                    else:
                        print(f"{job['job_id'][:16]} {job['name']}: round {r['round']}/{job['rounds_total']} "
                              f"accuracy {r['accuracy']:.4f} loss {r['loss']:.4f} updates {r['participants']} "
                              f"time {_fmt(r['round_s'], '.2f')} s", flush=True)
        if _finished(res):
            return 0
        time.sleep(args.interval)


def _follow_rich(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    bars: dict[str, int] = {}
    printed: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("acc {task.fields[accuracy]}  loss {task.fields[loss]}"), TimeElapsedColumn(),
                  console=console) as progress:
        while True:
            res = _status(args)
            for job in res["jobs"]:
                key = job["job_id"]
                if key not in bars:
                    bars[key] = progress.add_task(f"{key[:12]} {job['name']}", total=job["rounds_total"],
                                                  accuracy="-", loss="-")
                    progress.console.print(job_header(job))
                    progress.console.print(ROUND_HEADER)
                done = [r for r in job["rounds"] if r["accuracy"] is not None]
                for r in done:
                    if r["round"] > printed.get(key, 0):
                        printed[key] = r["round"]
                        progress.console.print(round_line(r))
                last = done[-1] if done else None
                progress.update(bars[key], completed=job["model_round"],
                                accuracy=_fmt(last and last["accuracy"], ".4f"),
                                loss=_fmt(last and last["loss"], ".4f"))
            if _finished(res):
                return 0
            time.sleep(args.interval)


def export_paths(path_text: str, force: bool) -> tuple[Path, Path]:
    """The ``.npz`` and ``.json`` paths a ``train_export`` result goes to (client side).

    Raises:
        FileExistsError: one exists and ``force`` is false.
    """
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
    res = cli._call(args, "train_export", {"job": args.job} if args.job else {})
    try:
        res = write_export(res, path, sidecar)
    except OSError as exc:
        raise cli.CliError(f"cannot write {path}: {exc.strerror or exc}", cli.EXIT_FAIL) from None
    acc = "" if res["accuracy"] is None else f", accuracy {res['accuracy']:.4f}"
    cli._print(args, res, f"wrote {res['path']} and {res['sidecar']} (job {res['job_id'][:16]}, round {res['round']}, "
                      f"digest {res['digest'][:16]}{acc})")
    return 0


def register(sub) -> None:
    """Add ``chimera train ...`` to the CLI's subparsers ``sub``."""
    train = sub.add_parser("train", help="federated training: start a job, follow it, export the model")
    train_sub = train.add_subparsers(dest="train_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="node data directory (default: $CHIMERA_HOME or "
                                          "the platform user data dir)")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = train_sub.add_parser("start", help="commit a training job (TOML, see examples/digits-job.toml)")
    common(p)
    p.add_argument("job_file", metavar="JOB.toml")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job's commit")
    p.set_defaults(func=cmd_train_start)
    p = train_sub.add_parser("status", help="jobs and per-round accuracy/loss")
    common(p)
    p.add_argument("--job", help="job id (prefix) or name (default: all jobs)")
    p.add_argument("--follow", action="store_true", help="follow until the jobs finish (progress display)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between polls with --follow")
    p.set_defaults(func=cmd_train_status)
    p = train_sub.add_parser("export", help="write the latest certified model as .npz + JSON sidecar")
    common(p)
    p.add_argument("path", metavar="PATH")
    p.add_argument("--job", help="job id (prefix) or name (default: the latest job)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_train_export)
