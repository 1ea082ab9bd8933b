"""``chimera agent ...`` and ``chimera task ...``: the execution fabric from the command line.

Each command is one admin call to the local node (``--data-dir``; ``task submit
--wait`` then waits in ``tasks_status {task_id, wait_s}``); ``--json`` prints the node's answer as is. Module files are read here (at most 16 MiB)
and sent in the request; a 64-hex-digit argument that is not a file names a
module already in the node's store.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

MAX_MODULE_BYTES = 16 << 20
MAX_INPUT_BYTES = 512 << 10        # a task's stdin travels in an envelope
MAX_LOCAL_INPUT_BYTES = 4 << 20    # agent call runs on the local node
_SHA_RE = re.compile(r"[0-9a-f]{64}")

# The node's own bounds (node/fabric.py: tasks_submit, tasks_status, agents_call), checked here
# first so that a bad value is a usage error before anything is read or sent.
MAX_REPLICAS = 64
MAX_GPUS = 64
MAX_FUEL = 2**62
MAX_MEMORY_MIB = 4096              # memory_bytes <= 1 << 32
MAX_TASKS_KEPT = 256               # fabric.MAX_TASKS_KEPT: what tasks_status can list


# ------------------------------------------------------- argument types (shared by the chimera CLI)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def bounded_int(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type=``: a whole number in ``lo..hi``; anything else is a usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:  # also a number of more digits than int() converts
            raise argparse.ArgumentTypeError(f"expected an integer in {lo}..{hi}, got {_shown(text)}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}, got {_shown(text)}")
        return value

    parse.__name__ = f"integer in {lo}..{hi}"
    return parse


def finite_float(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse ``type=``: a finite number in ``[lo, hi]`` (not NaN or infinite); else exit 2."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in [{lo:g}, {hi:g}], got {_shown(text)}") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be a finite number in [{lo:g}, {hi:g}], got {_shown(text)}")
        return value

    parse.__name__ = f"number in [{lo:g}, {hi:g}]"
    return parse


def folder_path(text: str) -> str:
    """An argparse ``type=``: a folder that exists or can be created (an existing file or
    an empty string is a usage error, exit 2); returned as given."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder path, got an empty string")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{_shown(text)} exists and is not a folder")
    return text


folder_path.__name__ = "folder path"


def old_spelling(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept ``old`` as another spelling of the option ``new`` already added to ``parser``
    (same destination, type and choices; scripts written for it keep working); ``--help``
    shows only ``new``."""
    action = next(a for a in parser._actions if new in a.option_strings)
    parser.add_argument(old, dest=action.dest, type=action.type, choices=action.choices,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _cli():
    from . import cli  # imported late: cli builds its parser with register()

    return cli


def _read(path: str, limit: int, what: str) -> bytes:
    cli = _cli()
    p = Path(path).expanduser()
    try:
        size = p.stat().st_size
        if size > limit:
            raise cli.CliError(f"{what} {path} is {size} bytes; the limit is {limit}")
        return p.read_bytes()
    except OSError as exc:
        raise cli.CliError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _module_args(ref: str) -> dict:
    if _SHA_RE.fullmatch(ref) and not Path(ref).exists():
        return {"sha256": ref}
    return {"module": _read(ref, MAX_MODULE_BYTES, "module")}


def _input_args(args: argparse.Namespace, limit: int = MAX_INPUT_BYTES) -> dict:
    if getattr(args, "text", None) is not None:
        data = args.text.encode("utf-8", "surrogateescape")  # bytes that are not UTF-8 pass as given
    elif getattr(args, "input", None):
        data = _read(args.input, limit, "input")
    else:
        return {}
    return {"input": data}


def cmd_agent_change(args: argparse.Namespace) -> int:
    cli = _cli()
    op = args.agent_command
    if op in ("deploy", "upgrade"):
        cargs = {"ref": args.ref, **_module_args(args.module)}
        if op == "deploy":
            cargs["kind"] = args.kind
    else:
        cargs = {"name": args.name}
    res = cli._call(args, f"agents_{op}", cargs, timeout_s=120.0)
    cli._show(args, f"agents_{op}", res)
    return cli.EXIT_OK


def cmd_agent_list(args: argparse.Namespace) -> int:
    cli = _cli()
    cli._show(args, "agents_list", cli._call(args, "agents_list", timeout_s=60.0))
    return cli.EXIT_OK


def cmd_agent_call(args: argparse.Namespace) -> int:
    cli = _cli()
    res = cli._call(args, "agents_call", {"name": args.name, **_input_args(args, MAX_LOCAL_INPUT_BYTES),
                                          "reply_wait_s": args.reply_wait_s}, timeout_s=120.0)
    cli._show(args, "agents_call", res)
    return cli.EXIT_OK if res.get("exit_code", 0) == 0 and res.get("ok", True) else cli.EXIT_FAIL


def task_exit_code(t: dict) -> int:
    """1 for a failed task (an agreed error such as fuel_exhausted included) or an accepted result
    with a non-zero exit status (as ``agent call``); else 0."""
    cli = _cli()
    if t["state"] == "failed":
        return cli.EXIT_FAIL
    res = t.get("result")
    if res is not None and (res.get("status", "ok") != "ok" or res.get("exit_code") not in (0, None)):
        return cli.EXIT_FAIL
    return cli.EXIT_OK


def cmd_task_submit(args: argparse.Namespace) -> int:
    """Submit; with ``--wait`` the task id goes to stderr at once (stdout keeps one document),
    then ``tasks_status`` waits (in the node) until it ends or ``--wait-s`` pass."""
    cli = _cli()
    cargs = {**_module_args(args.module), **_input_args(args), "replicas": args.replicas,
             "rule": args.rule, "gpus": args.gpus, "fuel": args.fuel, "timeout_s": args.timeout_s}
    if args.memory_mib is not None:
        cargs["memory_bytes"] = args.memory_mib << 20
    deadline = time.monotonic() + args.wait_s
    res = cli._call(args, "tasks_submit", cargs, timeout_s=60.0)
    if args.wait and res["state"] == "running":
        print(f"task {res['task_id']} submitted; waiting up to {args.wait_s:g} s for its result",
              file=sys.stderr, flush=True)
        res = _wait_for_task(args, res["task_id"], deadline)
    cli._show(args, "tasks_submit", res)
    return task_exit_code(res)


def _wait_for_task(args: argparse.Namespace, task_id: str, deadline: float) -> dict:
    """The task's view once it is no longer ``running``, or when ``deadline`` (monotonic) has
    passed: ``tasks_status {task_id, wait_s}``, which the node answers when the task ends (one
    call, one audit row; again only if the node answered early).

    Raises:
        CliError: the node went away (a reset connection included) or refused the call; the
            message names the task and how to look it up once the node runs again (exit 3 when
            no node answers).
    """
    cli = _cli()
    while True:
        left_s = max(0.0, deadline - time.monotonic())
        asked_at = time.monotonic()
        try:
            res = cli._call(args, "tasks_status", {"task_id": task_id, "wait_s": min(left_s, 3600.0)},
                            timeout_s=left_s + 10.0)
        except (cli.CliError, OSError) as exc:  # (OSError: the connection reset as the node died)
            code = exc.code if isinstance(exc, cli.CliError) else cli.EXIT_NO_NODE
            why = str(exc) if isinstance(exc, cli.CliError) else f"lost the node: {exc.strerror or exc}"
            again = f"chimera task status {task_id}" + (f" --data-dir {shlex.quote(args.data_dir)}" if args.data_dir else "")
            raise cli.CliError(f"{why} while waiting for task {task_id}; once the node runs again, "
                               f"`{again}` shows it (the node resumes a task it was running when it "
                               "stopped; one older than fabric_resume_max_age_s shows failed: interrupted)", code) from None
        if res["state"] != "running" or deadline - time.monotonic() <= 0:
            return res
        if time.monotonic() - asked_at < 1.0:  # answered without waiting (its waiters are busy): poll
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def cmd_task_status(args: argparse.Namespace) -> int:
    cli = _cli()
    if args.task_id:
        res = cli._call(args, "tasks_status", {"task_id": args.task_id})
        cli._show(args, "tasks_status", res)
        return task_exit_code(res)  # as `task submit --wait`: a failed task is 1 (running: 0)
    res = cli._call(args, "tasks_status", {"limit": args.limit})
    # the node applies the limit to both lists; cut here too for nodes that sent more
    res["observations"] = list(res.get("observations") or [])[-args.limit:]
    res["tasks"] = list(res["tasks"])[-args.limit:]
    cli._show(args, "tasks_status", res)
    return cli.EXIT_OK


def cmd_task_cancel(args: argparse.Namespace) -> int:
    cli = _cli()
    res = cli._call(args, "tasks_cancel", {"task_id": args.task_id})
    cli._show(args, "tasks_cancel", res)
    return cli.EXIT_OK


def register(sub) -> None:
    """Add ``agent`` and ``task`` to the ``chimera`` subcommands."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="node data directory (default: $CHIMERA_HOME or the platform "
                                          "user data dir)")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    agent = sub.add_parser("agent", help="deploy, call and manage WASM agents on the local node")
    asub = agent.add_subparsers(dest="agent_command", required=True)
    p = asub.add_parser("deploy", help="deploy NAME@VERSION from a .wasm file (or a stored module's sha256)")
    common(p)
    p.add_argument("ref", metavar="NAME@VERSION")
    p.add_argument("module", metavar="FILE.wasm|SHA256")
    p.add_argument("--kind", choices=["task", "actor"], default="task",
                   help="task: WASI command run per input; actor: long-lived, one message at a time")
    p.set_defaults(func=cmd_agent_change)
    p = asub.add_parser("upgrade", help="hot-swap an agent to a new version (queued messages kept)")
    common(p)
    p.add_argument("ref", metavar="NAME@VERSION")
    p.add_argument("module", metavar="FILE.wasm|SHA256")
    p.set_defaults(func=cmd_agent_change)
    for name, help_ in (("rollback", "return an agent to its previous version"),
                        ("remove", "stop and forget an agent")):
        p = asub.add_parser(name, help=help_)
        common(p)
        p.add_argument("name")
        p.set_defaults(func=cmd_agent_change)
    p = asub.add_parser("list", help="deployed agents, versions and counters")
    common(p)
    p.set_defaults(func=cmd_agent_list)
    p = asub.add_parser("call", help="run a task agent on an input, or send an actor one message")
    common(p)
    p.add_argument("name")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--input", metavar="FILE", help="input bytes from a file (<= 4 MiB)")
    group.add_argument("--text", help="input text")
    p.add_argument("--reply-wait-s", type=finite_float(0.0, 60.0), default=1.0,
                   help="actor: seconds to wait for a reply (0..60)")
    p.set_defaults(func=cmd_agent_call)

    task = sub.add_parser("task", help="run tasks across the peers (placement, replicas, votes)")
    tsub = task.add_subparsers(dest="task_command", required=True)
    p = tsub.add_parser("submit", help="place a task agent run on the best peers")
    common(p)
    p.add_argument("module", metavar="FILE.wasm|SHA256")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--input", metavar="FILE", help="stdin of the task (<= 512 KiB)")
    group.add_argument("--text", help="stdin of the task, as text")
    p.add_argument("--replicas", type=bounded_int(1, MAX_REPLICAS), default=1,
                   help=f"distinct peers that run it (1..{MAX_REPLICAS})")
    p.add_argument("--rule", choices=["majority", "weighted", "unanimous", "quorum"], default="majority",
                   help="how the replicas' results are accepted (the task's requirements.rule)")
    old_spelling(p, "--agreement", "--rule")
    p.add_argument("--gpus", type=bounded_int(0, MAX_GPUS), default=0, help=f"GPUs per replica (0..{MAX_GPUS})")
    p.add_argument("--fuel", type=bounded_int(1, MAX_FUEL), default=1_000_000_000, help="fuel units per run")
    p.add_argument("--memory-mib", type=bounded_int(1, MAX_MEMORY_MIB),
                   help=f"linear memory cap, 1..{MAX_MEMORY_MIB} (default 64 MiB)")
    p.add_argument("--timeout-s", type=finite_float(0.001, 86_400.0), default=10.0,
                   help="wall time of one run, seconds (at most 86400)")
    p.add_argument("--wait", action="store_true", help="wait for the accepted result")
    p.add_argument("--wait-s", type=finite_float(0.1, 3600.0), default=120.0,
                   help="with --wait: seconds at most (0.1..3600)")
    p.set_defaults(func=cmd_task_submit)
    p = tsub.add_parser("status", help="one task in detail, or the recent ones")
    common(p)
    p.add_argument("task_id", nargs="?")
    p.add_argument("--limit", type=bounded_int(1, MAX_TASKS_KEPT), default=20,
                   help=f"the most recent tasks and observations (1..{MAX_TASKS_KEPT})")
    p.set_defaults(func=cmd_task_status)
    p = tsub.add_parser("cancel", help="end a running task submitted on this node (its replicas stop it)")
    common(p)
    p.add_argument("task_id")
    p.set_defaults(func=cmd_task_cancel)
