"""``chimera shell``, ``chimera admin key create|list|revoke`` and ``chimera audit``.

Exit codes (also the ``code`` of ``--json`` errors): 0 success; 1 the
command failed at the node; 2 usage error, malformed request, unknown
command or bad arguments; 3 no node answered; 4 refused (not authenticated,
key unknown or revoked, role too low). Key management and ``audit`` use the
running node when there is one (so they are audited) and the data dir's store
directly when the node is stopped.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from pathlib import Path

from . import admin
from .admin import EXIT_FAIL, EXIT_NO_NODE, EXIT_OK, EXIT_USAGE, AdminError
from .admin_keys import MAX_KEY_NAME_CHARS, ROLES, AdminKeyError, KeyRing, check_name


def _data_dir(args: argparse.Namespace) -> Path:
    from .config import default_data_dir

    return Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if getattr(args, "json", False):
        from .shell import json_line, with_audit_failure

        print(json_line(with_audit_failure({"ok": False, "error": message, "code": code})))
    else:
        print(f"chimera: {message}", file=sys.stderr)
    return code


def _via_node_or_store(data_dir: Path, cmd: str, cargs: dict):
    """Run ``cmd`` on the node of ``data_dir``; when none runs, on its store directly."""
    try:
        return admin.call(data_dir, cmd, cargs)
    except AdminError as exc:
        if exc.code != EXIT_NO_NODE:
            raise
    from .audit import AuditLog

    try:
        ring = KeyRing.open(data_dir)
    except (sqlite3.Error, OSError) as exc:  # unreadable, locked, not a database: one line, no traceback
        raise AdminError(f"cannot open the store of {data_dir}: {exc}", EXIT_FAIL) from None
    try:
        audit = AuditLog(ring.db)
        now_ms = time.time_ns() // 1_000_000
        if cmd == "audit":
            return audit.rows(admin.int_arg(cargs, "limit", 50, 1, 10_000))
        started = time.perf_counter()
        result = "ok"
        try:
            if cmd == "admin_key_add":
                return ring.add(admin.str_arg(cargs, "name", max_len=MAX_KEY_NAME_CHARS),
                                admin.str_arg(cargs, "role", "observer", choices=ROLES),
                                admin.bytes_arg(cargs, "public_key", max_len=1024), now_ms).as_dict()
            if cmd == "admin_key_list":
                return [k.as_dict() for k in ring.list()]
            if cmd == "admin_key_revoke":
                return ring.revoke(admin.str_arg(cargs, "key", max_len=128), now_ms).as_dict()
            raise AdminError(f"{cmd} needs a running node", EXIT_NO_NODE)
        except (AdminKeyError, AdminError) as exc:
            result = f"error: {exc}"
            raise
        finally:  # the node is stopped: its owner changed the store directly
            audit.append(at_ms=now_ms, who=f"offline-owner uid={os.geteuid()}", transport="offline",
                         role="admin", command=cmd, args=cargs, result=result,
                         duration_s=time.perf_counter() - started)
    except sqlite3.Error as exc:
        raise AdminError(f"the store of {data_dir}: {exc}", EXIT_FAIL) from None
    finally:
        ring.close()


def _print_result(args: argparse.Namespace, result, cmd: str) -> int:
    """``--json``: the answer as is; else the text the shell shows for ``cmd``."""
    from .shell import json_line, render, with_audit_failure

    print(json_line(with_audit_failure({"ok": True, "result": result})) if args.json else render(cmd, result))
    return EXIT_OK


def cmd_key_create(args: argparse.Namespace) -> int:
    from .shell import create_key

    try:  # before anything is created: a name like "a/b" must not make directories
        check_name(args.name)
    except AdminKeyError as exc:
        return _fail(args, str(exc), EXIT_USAGE)
    data_dir = _data_dir(args)
    if not data_dir.is_dir():
        return _fail(args, f"data dir {data_dir} does not exist", EXIT_USAGE)
    if args.out:
        out = Path(args.out).expanduser()
    else:
        out = data_dir / "admin-keys" / f"{args.name}.pem"
        out.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        info = create_key(lambda cmd, cargs: _via_node_or_store(data_dir, cmd, cargs), args.name, args.role, out)
    except AdminKeyError as exc:
        return _fail(args, str(exc), EXIT_USAGE)
    except AdminError as exc:
        return _fail(args, str(exc), exc.code)
    return _print_result(args, info, "admin_key_add")


def cmd_key_list(args: argparse.Namespace) -> int:
    try:
        rows = _via_node_or_store(_data_dir(args), "admin_key_list", {})
    except (AdminKeyError, AdminError) as exc:
        return _fail(args, str(exc), getattr(exc, "code", EXIT_USAGE))
    return _print_result(args, rows, "admin_key_list")


def cmd_key_revoke(args: argparse.Namespace) -> int:
    try:
        info = _via_node_or_store(_data_dir(args), "admin_key_revoke", {"key": args.key})
    except (AdminKeyError, AdminError) as exc:
        return _fail(args, str(exc), getattr(exc, "code", EXIT_USAGE))
    return _print_result(args, info, "admin_key_revoke")


def cmd_audit(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 10_000:
        return _fail(args, "--limit must be in 1..10000", EXIT_USAGE)
    try:
        rows = _via_node_or_store(_data_dir(args), "audit", {"limit": args.limit})
    except (AdminKeyError, AdminError) as exc:
        return _fail(args, str(exc), getattr(exc, "code", EXIT_USAGE))
    return _print_result(args, rows, "audit")



def cmd_shell(args: argparse.Namespace) -> int:
    from .shell import Shell, ShellError, connect, interactive

    try:
        client = connect(args.target, data_dir=Path(args.data_dir).expanduser() if args.data_dir else None,
                         key_file=args.key, server_key=args.server_key, timeout_s=args.timeout_s)
    except ShellError as exc:
        return _fail(args, str(exc), exc.code)
    shell = Shell(client, json_output=args.json, assume_yes=args.yes)
    if args.command_line is not None:
        return shell.execute(args.command_line)
    if not sys.stdin.isatty():  # a script piped in: one command per line, stop at the first failure
        for line in sys.stdin:
            if line.strip() and not line.lstrip().startswith("#"):
                code = shell.execute(line)
                if code:
                    return code
        return EXIT_OK
    return interactive(shell)


def register(sub) -> None:
    """Add ``shell``, ``admin`` and ``audit`` to the ``chimera`` subcommands."""
    p = sub.add_parser("shell", help="interactive admin shell (or one command with -c)",
                       description="The admin shell: interactive on a terminal; `-c COMMAND` runs one command; "
                                   "commands piped in (one per line) run in order and the shell stops at the "
                                   "first that fails, with its exit status.")
    p.add_argument("target", nargs="?", help="data dir, admin socket, or tcp://HOST:PORT (remote)")
    p.add_argument("--data-dir", help="node data directory when no TARGET is given")
    p.add_argument("-c", dest="command_line", metavar="COMMAND", help="run one command and exit")
    p.add_argument("--json", action="store_true", help='{"ok": ..., "result"|"error", "code"} output')
    p.add_argument("--yes", action="store_true", help="do not ask before destructive commands")
    p.add_argument("--key", help="admin private key file: sign requests (required for remote)")
    p.add_argument("--server-key", help="remote node's contact URI or base32 transport key")
    p.add_argument("--timeout-s", type=float, default=10.0, help="seconds to wait for an answer")
    from .cli_fabric import old_spelling

    old_spelling(p, "--timeout", "--timeout-s")
    p.set_defaults(func=cmd_shell)

    adm = sub.add_parser("admin", help="admin keys of the local node")
    adm_sub = adm.add_subparsers(dest="admin_command", required=True)
    key = adm_sub.add_parser("key", help="create, list or revoke admin keys")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    for name, func, help_ in (("create", cmd_key_create, "create a key (private file 0600; prints the fingerprint)"),
                              ("list", cmd_key_list, "list the node's admin keys"),
                              ("revoke", cmd_key_revoke, "revoke a key by name or fingerprint")):
        p = key_sub.add_parser(name, help=help_)
        p.add_argument("--data-dir", help="node data directory")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "create":
            p.add_argument("name")
            p.add_argument("--role", choices=ROLES, default="observer")
            p.add_argument("--out", help="private key file (default DATA_DIR/admin-keys/NAME.pem)")
        elif name == "revoke":
            p.add_argument("key", metavar="NAME|FINGERPRINT")
        p.set_defaults(func=func)

    p = sub.add_parser("audit", help="the admin audit log of the local node")
    p.add_argument("--data-dir", help="node data directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_audit)
