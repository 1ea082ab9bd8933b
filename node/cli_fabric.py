"""``chimera agent ...`` and ``chimera task ...``: the execution fabric from the command line.

Each command is one admin call to the local node (``--data-dir``); ``--json``
prints the node's answer as is. Module files are read here (at most 16 MiB)
and sent in the request; a 64-hex-digit argument that is not a file names a
module already in the node's store.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

MAX_MODULE_BYTES = 16 << 20
MAX_INPUT_BYTES = 512 << 10        # a task's stdin travels in an envelope
MAX_LOCAL_INPUT_BYTES = 4 << 20    # agent call runs on the local node
_SHA_RE = re.compile(r"[0-9a-f]{64}")


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
        data = args.text.encode()
    elif getattr(args, "input", None):
        data = _read(args.input, limit, "input")
    else:
        return {}
    return {"input": data}


def _event_text(e: dict) -> str:
    return (f"{e['action']} {e['name']}@{e['version']} ({e['kind']}, module {e['module_sha256'][:12]})"
            + (f": {e['reason']}" if e.get("reason") else ""))


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
    cli._print(args, res, _event_text(res))
    return cli.EXIT_OK


def cmd_agent_list(args: argparse.Namespace) -> int:
    cli = _cli()
    res = cli._call(args, "agents_list", timeout_s=60.0)
    lines = [f"{'NAME':<20} {'VERSION':<10} {'KIND':<6} {'MODULE':<12} {'HANDLED':>7} {'ERRORS':>6} {'QUEUED':>6}"]
    for a in res["agents"]:
        lines.append(f"{a['name']:<20} {a['version']:<10} {a['kind']:<6} {a['module_sha256'][:12]:<12} "
                     f"{a.get('handled', '-'):>7} {a.get('errors', '-'):>6} {a.get('queued', '-'):>6}")
    cli._print(args, res, "\n".join(lines) if res["agents"] else "no agents deployed")
    return cli.EXIT_OK


def cmd_agent_call(args: argparse.Namespace) -> int:
    cli = _cli()
    res = cli._call(args, "agents_call", {"name": args.name, **_input_args(args, MAX_LOCAL_INPUT_BYTES),
                                          "reply_wait_s": args.reply_wait_s}, timeout_s=120.0)
    if res["kind"] == "task":
        text = res["stdout"].rstrip("\n") + f"\n(exit {res['exit_code']}, fuel {res['fuel_consumed']})"
    else:
        text = "\n".join(res["replies"]) or f"(no reply; outcome {res['outcome']})"
    cli._print(args, res, text)
    return cli.EXIT_OK if res.get("exit_code", 0) == 0 and res.get("ok", True) else cli.EXIT_FAIL


def task_text(t: dict) -> str:
    req = t["requirements"]
    lines = [f"task {t['task_id']}  {t['state']}  module {t['module_sha256'][:12]}  "
             f"replicas {req['replicas']} ({req['rule']})  gpus {req['gpus']}"]
    for d in t["placement"]:
        gpus = f" gpus {d['gpus']}" if d["gpus"] else ""
        lines.append(f"  attempt {d['attempt']} -> {d['peer_id']}{gpus}")
    for r in t["results"]:
        what = f"exit {r['exit_code']} digest {r['digest'][:16]}" if r["status"] == "ok" else r["reason"]
        lines.append(f"  result from {r['peer_id'][:16]}: {r['status']} {what}")
    if "result" in t:
        c = t["certificate"]
        lines.append(f"accepted digest {t['result']['digest'][:16]} (exit {t['result']['exit_code']}); "
                     f"certificate {c['rule']}>{c['threshold']} signed by {len(c['voters'])}: "
                     + ", ".join(v[:16] for v in c["voters"]))
        if c["disagreeing"]:
            lines.append("disagreed: " + ", ".join(p[:16] for p in c["disagreeing"]))
        lines.append(t["result"]["stdout"].rstrip("\n"))
    if "failure" in t:
        lines.append(f"failed: {t['failure']['reason']} {t['failure']['detail']}")
    return "\n".join(lines)


def cmd_task_submit(args: argparse.Namespace) -> int:
    cli = _cli()
    cargs = {**_module_args(args.module), **_input_args(args), "replicas": args.replicas,
             "rule": args.agreement, "gpus": args.gpus, "fuel": args.fuel, "timeout_s": args.timeout_s,
             "wait": args.wait, "wait_s": args.wait_s}
    if args.memory_mib is not None:
        cargs["memory_bytes"] = args.memory_mib << 20
    res = cli._call(args, "tasks_submit", cargs, timeout_s=args.wait_s + 10 if args.wait else 60.0)
    cli._print(args, res, task_text(res))
    return cli.EXIT_FAIL if res["state"] == "failed" else cli.EXIT_OK


def cmd_task_status(args: argparse.Namespace) -> int:
    cli = _cli()
    if args.task_id:
        res = cli._call(args, "tasks_status", {"task_id": args.task_id})
        cli._print(args, res, task_text(res))
        return cli.EXIT_OK
    res = cli._call(args, "tasks_status", {"limit": args.limit})
    lines = [f"{'TASK':<20} {'STATE':<9} {'REPLICAS':>8} {'PEERS'}"]
    for t in res["tasks"]:
        lines.append(f"{t['task_id']:<20} {t['state']:<9} {t['requirements']['replicas']:>8} "
                     + ", ".join(d["peer_id"][:10] for d in t["placement"]))
    f = res["fabric"]
    lines.append(f"{f['tasks_running']}/{f['task_slots']} task slots busy here; "
                 f"{len(f['peers_with_capacity'])} peers advertise capacity")
    cli._print(args, res, "\n".join(lines))
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
    p.add_argument("--reply-wait-s", type=float, default=1.0, help="actor: seconds to wait for a reply")
    p.set_defaults(func=cmd_agent_call)

    task = sub.add_parser("task", help="run tasks across the peers (placement, replicas, votes)")
    tsub = task.add_subparsers(dest="task_command", required=True)
    p = tsub.add_parser("submit", help="place a task agent run on the best peers")
    common(p)
    p.add_argument("module", metavar="FILE.wasm|SHA256")
    p.add_argument("--input", metavar="FILE", help="stdin of the task (<= 512 KiB)")
    p.add_argument("--text", help="stdin of the task, as text")
    p.add_argument("--replicas", type=int, default=1, help="distinct peers that run it (1..64)")
    p.add_argument("--agreement", choices=["majority", "weighted", "unanimous", "quorum"], default="majority")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per replica")
    p.add_argument("--fuel", type=int, default=1_000_000_000, help="fuel units per run")
    p.add_argument("--memory-mib", type=int, help="linear memory cap (default 64 MiB)")
    p.add_argument("--timeout-s", type=float, default=10.0, help="wall time of one run, seconds")
    p.add_argument("--wait", action="store_true", help="wait for the accepted result")
    p.add_argument("--wait-s", type=float, default=120.0, help="with --wait: seconds at most")
    p.set_defaults(func=cmd_task_submit)
    p = tsub.add_parser("status", help="one task in detail, or the recent ones")
    common(p)
    p.add_argument("task_id", nargs="?")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_task_status)
