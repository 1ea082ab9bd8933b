"""``chimera shell``: an interactive (prompt_toolkit) or one-shot client of the admin API.

Grammar (the same interactively and with ``-c``)::

    CMD [positional ...] [name=value ...]

split with :mod:`shlex`. ``CMD`` is an admin command name, written with
spaces or underscores (``train start`` = ``train_start``); help writes the
command groups as ``chimera`` does (``agent list``, ``task submit``, ``module
list``) and the admin API's plural works too (``agents list`` = ``agents_list``).
Positionals fill the command's arguments in the order ``commands`` lists them. Values are typed conservatively: integers, decimals,
``true``/``false``, otherwise text (arguments that name things -- peer_id,
data, uri, name, field, key, kind, ... -- always stay text); ``@FILE`` passes
a file's bytes (``module=@agent.wasm``; ``@@`` escapes a literal ``@``;
``train start job=@job.toml`` sends the file as TOML text, checked here first).
Integers must fit the admin API's msgpack (-2**63..2**64-1). A ``name=value``
the command does not take is a usage error listing the ones it does.
Nothing is evaluated. Built-ins: ``help [CMD]``, ``admin key create NAME [role=R]
[out=FILE]``, ``exit [CODE]`` / ``quit`` (interactively, with ``-c`` and in a
piped script).

Errors are one line (``error: ...`` on stderr, or the ``--json`` error map)
and never end an interactive session; only EOF (Ctrl-D) and ``exit`` do.

Output: plain text (no colours unless stdout is a terminal), the text the
``chimera`` command of the same name prints (:data:`VIEWS`); ``--json`` prints
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "...", "code": N}``
(codes: :data:`chimera.node.admin.EXIT_CODES`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import stat
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Iterable

from chimera.protocol.identity import unb32

from . import admin
from .admin import EXIT_FAIL, EXIT_OK, EXIT_USAGE, AdminError
from .admin_keys import (
    COMMAND_HELP,
    COMMAND_OPTIONS,
    AdminKeyError,
    check_name,
    check_role,
    generate_key,
    load_key_file,
    public_bytes,
    write_key_file,
)
from .admin_keys import fingerprint as key_fingerprint
from .events import EVENT_KINDS
from .logs import local_time_text, printable

DESTRUCTIVE = frozenset({"stop", "revoke_peer", "agents_remove", "admin_key_revoke", "config_set"})
STRING_ARGS = frozenset({"peer_id", "data", "uri", "name", "field", "key", "kind", "reason", "level",
                         "role", "agent", "module", "job", "task_id", "path", "out", "min_priority",
                         "ref", "sha256", "rule", "input"})
MAX_FILE_ARG_BYTES = 16 << 20
BUILTINS = ("help", "exit", "quit", "admin key create")
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
"""The integers msgpack (the admin API's encoding) carries; others are refused before sending."""
ECHO_CHARS = 40
"""How much of the user's input an error message echoes."""
MAX_ERROR_CHARS = 1000
# The shell's own arguments of a command (the node never sees them); the node's
# named-only ones come from `commands` ("options"; admin_keys.COMMAND_OPTIONS for a
# node too old to send them).
SHELL_ARGS: dict[str, tuple[str, ...]] = {"train_export": ("path", "force")}
# Arguments without which the node would refuse the command: checked here first, so
# the error names the missing argument (not a later one) and comes before a confirmation.
REQUIRED_ARGS: dict[str, tuple[str, ...]] = {
    "agents_deploy": ("ref",), "agents_upgrade": ("ref",), "agents_call": ("name",),
    "agents_remove": ("name",), "agents_rollback": ("name",), "train_start": ("job",),
    "ping": ("peer_id",), "propose": ("data",), "add_contact": ("uri",), "revoke_peer": ("peer_id",),
    "admit": ("peer_id",), "config_set": ("field", "value"), "log_level": ("level",),
    "admin_key_revoke": ("key",),
}
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")


class ShellError(Exception):
    """A line the shell cannot run (usage error, code 2 unless given)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class ShellExit(SystemExit):
    """``exit [CODE]`` / ``quit``: raised by :meth:`Shell.execute` so that whatever runs the
    lines (the interactive loop, a piped script, ``-c``) stops; uncaught, the process exits
    with ``code``."""


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters (``...`` marks a cut): what an error echoes of the input."""
    return text if len(text) <= limit else text[:limit] + "..."


def one_line(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """An error message as one line of at most ``limit`` characters."""
    return clip(re.sub(r"\s*[\r\n]+\s*", " ", message).strip(), limit)


def typed(value: str) -> object:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, anything else stays text."""
    if _INT.match(value):
        return int(value)
    if _FLOAT.match(value):
        return float(value)
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def value_of(name: str, text: str) -> object:
    """One argument value: ``@FILE`` is the file's bytes (``@@x`` is the text ``@x``);
    names in STRING_ARGS stay text; others are :func:`typed`.

    Raises:
        ShellError: an unreadable or too large file, or an integer msgpack cannot carry
            (outside ``INT_MIN..INT_MAX``), naming the argument.
    """
    if text.startswith("@@"):
        return text[1:]
    if text.startswith("@") and len(text) > 1:
        path = Path(text[1:]).expanduser()
        try:
            size = path.stat().st_size
            if size > MAX_FILE_ARG_BYTES:
                raise ShellError(f"{name}: {path} is {size} bytes; the limit is {MAX_FILE_ARG_BYTES}")
            return path.read_bytes()
        except OSError as exc:
            raise ShellError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    if name in STRING_ARGS:
        return text
    try:
        value = typed(text)
    except ValueError:  # more digits than int() converts: far out of range anyway
        value = None
    if value is None or (type(value) is int and not INT_MIN <= value <= INT_MAX):
        raise ShellError(f"{name} must be an integer in {INT_MIN}..{INT_MAX} (what the admin API "
                         f"carries), not {clip(text)}")
    return value


GROUP_WORDS = {"agents": "agent", "tasks": "task", "modules": "module"}
"""Admin command groups the shell shows as the CLI names them (``chimera agent list``, ``agent
list`` here; ``agents list`` = ``agents_list``, the admin API's name, keeps working)."""


def phrase(cmd: str) -> str:
    """How the shell and its help write an admin command: words, the group as the CLI names it
    (``agents_list`` -> ``agent list``)."""
    first, sep, rest = cmd.partition("_")
    return f"{GROUP_WORDS.get(first, first)}{sep and ' '}{rest.replace('_', ' ')}"


# ------------------------------------------------------------------ targets


def connect(target: str | None, *, data_dir: Path | None = None, key_file: str | None = None,
            server_key: str | None = None, timeout_s: float = 10.0):
    """A client for TARGET: a data dir, a socket path, or ``tcp://HOST:PORT``.

    Raises:
        ShellError: a bad target, key file, server key or timeout (code 2).
    """
    if not (math.isfinite(timeout_s) and 0 < timeout_s <= 86_400):
        raise ShellError(f"--timeout-s must be in (0, 86400] seconds, not {timeout_s:g}")
    try:
        key = load_key_file(Path(key_file).expanduser()) if key_file else None
    except AdminKeyError as exc:
        raise ShellError(str(exc)) from None
    if target and target.startswith("tcp://"):
        if key is None:
            raise ShellError("a remote target needs --key FILE (an admin key; requests are signed)")
        if not server_key:
            raise ShellError("a remote target needs --server-key (the node's contact URI or transport key)")
        try:
            return admin.RemoteClient(target, parse_server_key(server_key), key, timeout_s=timeout_s)
        except AdminError as exc:  # a bad endpoint (no or out-of-range port)
            raise ShellError(str(exc), exc.code) from None
    if target:
        path = Path(target).expanduser()
    else:
        from .config import default_data_dir

        path = data_dir or default_data_dir()
    if path.is_dir():
        path = path / admin.SOCKET_NAME
    elif not path.exists() and path.name != admin.SOCKET_NAME:
        raise ShellError(f"{target}: no such data dir or socket")
    try:
        return admin.LocalClient(path, key, timeout_s=timeout_s)
    except AdminError as exc:
        raise ShellError(str(exc), exc.code) from None


def parse_server_key(text: str) -> bytes:
    """The raw transport key from a contact URI (``...?key=B32``) or a base32 key."""
    raw_text = text.rsplit("key=", 1)[1] if "key=" in text else text
    try:
        raw = unb32(raw_text.strip())
    except Exception:
        raw = b""
    if len(raw) != 32:
        raise ShellError("--server-key: give the node's contact URI (chm://...?key=...) or its base32 "
                         "transport key")
    return raw


# -------------------------------------------------------------- formatting


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "nan"
    if isinstance(value, bytes):
        return value.hex() if len(value) <= 32 else f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, default=_json_default, separators=(",", ":"))
    return printable(str(value))  # peers' text (addresses, names, reasons): no control sequences


UNIT_WORDS = {"ms": "ms", "s": "s", "bytes": "bytes", "mib": "MiB"}
"""Field-name unit suffixes a column header keeps as written (``rtt_ms`` -> ``RTT ms``)."""
HEADINGS = {"incarnation": "INC", "last_seen_s": "SEEN s", "module_sha256": "MODULE", "index": "IDX"}
"""Headers shorter than the field's name (the CLI's since its first tables)."""


def heading(column: str) -> str:
    """A table column's header: the field's words upper case, a unit suffix as written
    (``peer_id`` -> ``PEER ID``, ``rtt_ms`` -> ``RTT ms``, ``duration_s`` -> ``DURATION s``)."""
    if column in HEADINGS:
        return HEADINGS[column]
    *words, last = column.split("_")
    if words and last in UNIT_WORDS:
        return f"{' '.join(words).upper()} {UNIT_WORDS[last]}"
    return column.replace("_", " ").upper()


def table(rows: list[dict], columns: Iterable[str] | None = None) -> str:
    """``rows`` as a text table of ``columns`` (default: the first row's keys), headed by
    :func:`heading`; a column of numbers only is right-aligned. The CLI's and the shell's tables."""
    cols = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(heading(c)), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    numeric = [all(r.get(c) is None or (isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool))
                   for r in rows) and any(r.get(c) is not None for r in rows) for c in cols]
    pad = [str.rjust if n else str.ljust for n in numeric]
    lines = ["  ".join(p(heading(c), w) for c, w, p in zip(cols, widths, pad)).rstrip()]
    lines += ["  ".join(p(v, w) for v, w, p in zip(row, widths, pad)).rstrip() for row in cells]
    return "\n".join(lines)


def render(cmd: str, result: Any, extra: dict | None = None) -> str:
    """Plain text for one command's result: the view :data:`VIEWS` has for ``cmd`` (the same text
    the ``chimera`` command of that name prints) when the answer has its shape, else a generic
    table or key/value block. ``extra``: :func:`peers_extra` for ``peers``."""
    view = VIEWS.get(cmd)
    if view is not None and view[0](result):
        return view[1](result, extra) if cmd == "peers" else view[1](result)
    if cmd == "metrics" and isinstance(result, dict) and result.get("format") == "prometheus":
        return result["text"].rstrip()
    if isinstance(result, list):
        if result and all(isinstance(r, dict) for r in result):
            return table(result)
        return "\n".join(_cell(r) for r in result) or "(none)"
    if isinstance(result, dict):
        return _block(result) or "(empty)"
    return _cell(result)


def _block(doc: dict, indent: str = "") -> str:
    """Key/value lines; nested maps indented, lists of maps as tables."""
    width = max((len(str(k)) for k in doc), default=0)
    lines = []
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            lines += [f"{indent}{k}:", _block(v, indent + "  ")]
        elif isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            lines += [f"{indent}{k}:", "\n".join(indent + "  " + line for line in table(v).split("\n"))]
        else:
            lines.append(f"{indent}{str(k).ljust(width)}  {_cell(v)}")
    return "\n".join(lines)


def event_line(e: dict) -> str:
    extra = " ".join(f"{k}={_cell(v)}" for k, v in e.items()
                     if k not in ("at_ms", "kind", "peer_id", "priority", "weights"))
    stamp = local_time_text(e.get("at_ms", 0))
    return printable(f"{stamp}  {e.get('priority', 'info'):<7} {e.get('kind', '?'):<24} {e.get('peer_id', '')} "
                     f"{extra}".rstrip())


def status_text(s: dict) -> str:
    """A node's ``status`` answer as text (the CLI's ``chimera status`` and the shell's ``status``)."""
    members = ", ".join(f"{v} {k}" for k, v in s["members"].items() if v) or "no members yet"
    text = "\n".join([
        f"peer id      {s['peer_id']}",
        f"contact      {s['contact']}",
        f"network      {s['network']} ({s['network_fingerprint']})",
        f"incarnation  {s['incarnation']}   profile {s['profile']}   pid {s['pid']}",
        f"uptime       {s['uptime_s']:.1f} s   RSS {s['rss_bytes'] / 2**20:.1f} MiB",
        f"members      {members}",
        f"mdns         {'on' if s['mdns'] else 'off'}   local health {s['local_health']}",
        *_wrapped("limits       ", [f"{k}={v}" for k, v in s["limits"].items()]),
        *[f"optional     {name}: {'yes' if f['available'] else 'no'} ({f['detail']})"
          for name, f in s["features"].items()],
        "drops        " + (", ".join(f"{k[5:]}={v}" for k, v in s["counters"].items()
                                     if k.startswith("drop_")) or "none"),
        *_consensus_lines(s.get("consensus")),
    ])
    return text


def _wrapped(head: str, items: list[str], width: int = 100) -> list[str]:
    """``items`` joined by ", " on lines of at most ``width`` characters, the first after ``head``."""
    lines, line = [], head
    for item in items:
        if line.strip() and len(line) + len(item) + 2 > width and line != head:
            lines.append(line.rstrip(", ") + ",")
            line = " " * len(head)
        line += item + ", "
    lines.append(line.rstrip(", "))
    return lines


def _consensus_lines(c: dict | None) -> list[str]:
    if not c:
        return ["consensus    none (no genesis validators, or consensus = false)"]
    lines = [f"consensus    height {c['height']}  epoch {c['epoch']}  {c['role']}  weight {c['weight']}"
             f"/{c['total_weight']} of {c['validators']} validators  round {c['round']} {c['step']}"
             f"  pool {c['pool_size']}",
             "  dropped    " + (", ".join(f"{k}={v}" for k, v in (c.get("drops") or {}).items()) or "none")]
    if c.get("halted"):
        lines.append(f"CONSENSUS HALTED  {c['halted']} (fix the disk, then restart the node)")
    if c.get("signs_from_height"):
        lines.append(f"NOT SIGNING  below height {c['signs_from_height']}: the sign state was missing or old at "
                     "start, or a certified commit carries a precommit of this node it does not remember "
                     "(restore bft_sign_state.bin to avoid this)")
    if c.get("awaiting_network"):
        lines.append("NOT SIGNING YET  no sign state at start: waiting to hear validators of more than 1/3 of "
                     "the weight (2/3 with this one) at this height, and fetching the commits it missed")
    if c.get("store_gap"):
        lo, hi = c["store_gap"]
        lines.append(f"STORE GAP    committed heights {lo}..{hi}, which this node signed for, were missing "
                     "from its store at start (lost or an older copy); being fetched again from peers")
    return lines


def audit_text(rows: list[dict]) -> str:
    """Audit rows as a table: local time with offset, cells clipped (``--json`` keeps all)."""
    if not rows:
        return "no audit records"
    shown = [dict(r, time=local_time_text(r["at_ms"]), result=_clip_cell(str(r["result"]), 60),
                  args=_clip_cell(_cell(r.get("args")), 60)) for r in rows]
    return table(shown, ["time", "who", "transport", "role", "command", "args", "result", "count", "duration_s"])


def _clip_cell(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters for a table cell."""
    return text if len(text) <= width else text[:width - 1] + "…"


def log_text(result: dict) -> str:
    """The committed decisions of a ``log`` answer as a table (the CLI's and the shell's)."""
    lines = [f"height {result.get('height')}"]
    if result["decisions"]:
        lines.append(f"{'HEIGHT':>8} {'IDX':>4}  {'AUTHOR':<16}  DATA")
        lines += [f"{d['height']:>8} {d['index']:>4}  {str(d.get('author', ''))[:16]:<16}  "
                  f"{printable(str(d.get('data_text', _cell(d.get('data')))))}" for d in result["decisions"]]
    else:
        lines.append("no decisions committed yet")
    return "\n".join(lines)


PEER_COLUMNS = ("peer_id", "state", "incarnation", "rtt_ms", "last_seen_s", "weight", "profile", "resources",
                "address")
"""The members view of ``chimera peers`` and the shell's ``peers``."""


def peers_text(rows: list[dict], extra: dict | None = None) -> str:
    """Members as a table of :data:`PEER_COLUMNS` (``chimera peers``, the shell's ``peers``):
    ``extra["self"]`` (this node's own row) first, ``extra["weights"]`` the committed voting
    weight per peer id ("-" without consensus). Raises KeyError for a row without peer_id or state."""
    weights = (extra or {}).get("weights") or {}
    rows = ([extra["self"]] if extra and extra.get("self") else []) + list(rows)
    if not rows:
        return "no peers known yet"
    return table([{"peer_id": r["peer_id"], "state": r["state"], "incarnation": r.get("incarnation"),
                   "rtt_ms": r.get("rtt_ms"), "last_seen_s": r.get("last_seen_s"),
                   "weight": weights.get(r["peer_id"]), "profile": r.get("profile"),
                   "resources": r.get("resources"), "address": (r.get("addresses") or ["-"])[0]}
                  for r in rows], PEER_COLUMNS)


def peers_extra(call) -> dict:
    """What the members view shows besides the ``peers`` answer: ``self`` (this node's row, from
    ``status`` and ``resources``) and ``weights`` (peer id -> committed weight, from ``reputation``).
    ``call(cmd)`` asks the node; best effort: a part whose call fails is left out."""
    extra: dict = {}
    try:
        me = call("status")
        extra["self"] = {"peer_id": me["peer_id"], "addresses": me["addresses"], "state": "self",
                         "incarnation": me.get("incarnation"), "profile": me["profile"], "rtt_ms": None,
                         "last_seen_s": None}
        try:
            own = call("resources").get("own")
            extra["self"]["resources"] = own and own.get("summary")
        except (AdminError, AttributeError, KeyError, TypeError):  # a node without the fabric
            pass
        if me.get("consensus"):
            extra["weights"] = {r["peer_id"]: r["weight"] for r in call("reputation").get("peers", [])}
    except (AdminError, AttributeError, KeyError, TypeError):
        pass
    return extra


def reputation_text(res: dict) -> str:
    """A ``reputation`` answer: the epoch, then weight, share and local score per peer."""
    rows = [{"peer_id": r["peer_id"], "weight": r["weight"], "share": f"{r['share']:.1%}",
             "local_score": r["local_score"],
             "note": " ".join(x for x, on in (("me", r.get("me")), ("joining", r.get("joining"))) if on)}
            for r in res["peers"]]
    head = f"epoch {res['epoch']}  total weight {res['total_weight']}  height {res['height']}"
    return "\n".join([head, table(rows, ("peer_id", "weight", "share", "local_score", "note"))]) if rows else head


def certificate_text(res: dict) -> str:
    """A ``certificate`` answer: the height's block, the signed weight and whether it verifies."""
    lines = [f"height {res['height']} round {res['round']} epoch {res['epoch']} block {res['block_hash'][:16]} "
             f"({res['value_count']} values, proposer {res['proposer'][:16]})",
             f"precommits of {res['signed_weight']}/{res['total_weight']} weight; {res['rule']}: "
             + ("verified" if res["verified"] else f"DOES NOT VERIFY: {printable(str(res['error']))}")]
    lines += [f"  {v['voter']}  weight {v['weight']:>5}  sig {v['signature'][:32]}…" for v in res["precommits"]]
    return "\n".join(lines)


def ping_text(res: dict) -> str:
    """A ``ping`` answer: one round trip (ms) or ``timeout`` per request, then the count answered."""
    ok = [r for r in res["rtt_s"] if r is not None]
    return "\n".join([f"{'timeout' if r is None else f'{r * 1000:.3f} ms'}" for r in res["rtt_s"]]
                     + [f"{len(ok)}/{len(res['rtt_s'])} answered"])


def propose_text(res: dict) -> str:
    return f"committed at height {res['height']}" + (
        f" (value {str(res['value_hash'])[:16]})" if "value_hash" in res else "")


def _printable_lines(text: str) -> str:
    """:func:`printable` line by line: a task's or an agent's output keeps its lines and tabs."""
    return "\n".join("\t".join(printable(part) for part in line.split("\t")) for line in text.split("\n"))


def agents_text(res: dict) -> str:
    """An ``agents_list`` answer: a table of the deployed agents, then why any is not running."""
    agents = res["agents"]
    if not agents:
        return "no agents deployed"
    rows = [{**a, "module_sha256": str(a["module_sha256"])[:12]} for a in agents]
    lines = [table(rows, ("name", "version", "kind", "state", "module_sha256", "handled", "errors", "queued"))]
    lines += [f"  {printable(str(a['name']))} not running: {printable(str(a['failure']))}"
              for a in agents if a.get("failure")]
    return "\n".join(lines)


def agent_event_text(e: dict) -> str:
    """The deployment event an ``agents_deploy|upgrade|rollback|remove`` answers with."""
    return printable(f"{e['action']} {e['name']}@{e['version']} ({e['kind']}, module {e['module_sha256'][:12]})"
                     + (f": {e['reason']}" if e.get("reason") else ""))


def agent_call_text(res: dict) -> str:
    """An ``agents_call`` answer: a task's stdout and exit status, or an actor's replies."""
    if res["kind"] == "task":
        return _printable_lines(res["stdout"].rstrip("\n")) \
            + f"\n(exit {res['exit_code']}, fuel {res['fuel_consumed']})"
    return _printable_lines("\n".join(res["replies"])) or f"(no reply; outcome {res['outcome']})"


def task_text(t: dict) -> str:
    """One task of ``tasks_submit`` / ``tasks_status task_id=...``: placement, results, the
    accepted (or agreed failed) result with its certificate, the task's stdout."""
    req = t["requirements"]
    lines = [f"task {t['task_id']}  {t['state']}  module {t['module_sha256'][:12]}  "
             f"replicas {req['replicas']} ({req['rule']})  gpus {req['gpus']}"]
    resumed = list(t.get("resumed") or [])  # restarts that placed it again (absent from older nodes)
    for d in t["placement"]:
        while resumed and d["attempt"] >= resumed[0]["first_attempt"]:
            lines.append(f"  resumed after the node restarted (attempts from {resumed.pop(0)['first_attempt']})")
        gpus = f" gpus {d['gpus']}" if d["gpus"] else ""
        lines.append(f"  attempt {d['attempt']} -> {d['peer_id']}{gpus}")
    lines += [f"  resumed after the node restarted (attempts from {r['first_attempt']})" for r in resumed]
    for r in t["results"]:
        what = f"exit {r['exit_code']} digest {r['digest'][:16]}" if r["status"] == "ok" else r["reason"]
        lines.append(f"  result from {r['peer_id'][:16]}: {r['status']} {what}")
    if "result" in t:
        c, res = t["certificate"], t["result"]
        signed = (f"certificate {c['rule']}>{c['threshold']} signed by {len(c['voters'])}: "
                  + ", ".join(v[:16] for v in c["voters"]))
        if res.get("status", "ok") == "ok":
            lines.append(f"accepted digest {res['digest'][:16]} (exit {res['exit_code']}); {signed}")
        else:  # the replicas agree that the task failed: an outcome, not a success
            lines.append(f"agreed error {res.get('reason', '?')} (digest {res['digest'][:16]}); {signed}")
        if c["disagreeing"]:
            lines.append("disagreed: " + ", ".join(p[:16] for p in c["disagreeing"]))
        if res.get("status", "ok") == "ok":
            lines.append(res["stdout"].rstrip("\n"))
    if "failure" in t:
        lines.append(f"failed: {t['failure']['reason']}"
                     + (f": {t['failure']['detail']}" if t["failure"].get("detail") else ""))
    return _printable_lines("\n".join(lines))


def tasks_text(res: dict) -> str:
    """A ``tasks_status`` list: the recent tasks, then this node's task slots."""
    rows = [{"task_id": t["task_id"], "state": t["state"], "replicas": t["requirements"]["replicas"],
             "peers": ", ".join(d["peer_id"][:10] for d in t["placement"]) or "-"} for t in res["tasks"]]
    f = res["fabric"]
    return "\n".join([table(rows, ("task_id", "state", "replicas", "peers")) if rows else "no tasks yet",
                      f"{f['tasks_running']}/{f['task_slots']} task slots busy here; "
                      f"{len(f['peers_with_capacity'])} peers advertise capacity"])


def modules_text(res: dict) -> str:
    """A ``modules_list`` answer: the stored WASM modules and their total size."""
    if not res["modules"]:
        return "no modules stored"
    return "\n".join([table(res["modules"], ("sha256", "size_bytes", "fetched")),
                      f"{res['total_bytes']} bytes in {len(res['modules'])} module(s)"])


def resources_text(res: dict) -> str:
    """A node's ``resources`` answer: the capacity it advertises, then the fresh advertisements
    of the others (breaker state, seconds until each expires). ``chimera resources`` is this
    machine's own probe, without a node."""
    rows = []
    if res.get("own"):
        rows.append({"peer_id": res.get("peer_id"), "resources": res["own"].get("summary"), "breaker": "self",
                     "expires_in_s": None, "slots_trusted": None})
    rows += [{"peer_id": p, "resources": r.get("summary"), "breaker": r.get("breaker"),
              "expires_in_s": r.get("expires_in_s"), "slots_trusted": _trusted(r)}
             for p, r in (res.get("peers") or {}).items()]
    return (table(rows, ("peer_id", "breaker", "expires_in_s", "slots_trusted", "resources")) if rows
            else "no capacity advertised")


def _trusted(peer: dict) -> str | None:
    """``trusted/advertised`` task slots of a peer that refused room it advertised (placement
    counts on fewer until it recovers), else None."""
    trusted, advertised = peer.get("task_slots_trusted"), peer.get("task_slots")
    if trusted is None or advertised is None or trusted >= advertised:
        return None
    return f"{trusted}/{advertised}"


def keys_text(rows: list[dict]) -> str:
    """An ``admin_key_list`` answer."""
    return table(rows, ("name", "role", "fingerprint", "state")) if rows else "no admin keys"


def key_text(info: dict) -> str:
    """An ``admin_key_add`` / ``admin_key_revoke`` answer (``admin key create`` adds ``key_file``)."""
    if info.get("state") == "revoked":
        return f"revoked admin key {info['name']} ({info['fingerprint']})"
    text = f"admin key {info['name']} (role {info['role']})\nfingerprint  {info['fingerprint']}"
    if info.get("key_file"):
        text = f"created {text}\nprivate key  {info['key_file']} (mode 0600; keep it secret)"
    return text


def train_start_text(res: dict) -> str:
    return (f"job {res['job_id'][:16]} ({printable(str(res['name']))}) committed at height {res['height']}: "
            f"{res['participants']} participants, quorum {res['quorum']}, update {res['update_bytes']} bytes")


def train_export_text(res: dict) -> str:
    acc = "" if res.get("accuracy") is None else f", accuracy {res['accuracy']:.4f}"
    return (f"wrote {res['path']} and {res['sidecar']} (job {res['job_id'][:16]}, round {res['round']}, "
            f"digest {res['digest'][:16]}{acc})")


def _train_status_text(res: dict) -> str:
    from .cli_train import status_text as train_status_text

    return train_status_text(res)


def _commands_text(rows: list[dict]) -> str:
    return table([{"command": phrase(c["name"]), "role": c["role"], "args": " ".join(c["args"]),
                   "help": c["help"]} for c in rows])


def _is_list(result: Any) -> bool:
    return isinstance(result, list)


def _has(*keys: str):
    return lambda result: isinstance(result, dict) and all(k in result for k in keys)


VIEWS: dict[str, tuple[Any, Any]] = {
    "status": (_has("peer_id", "limits"), status_text),
    "peers": (_is_list, peers_text),
    "events": (_is_list, lambda rows: "\n".join(event_line(e) for e in rows) or "no events"),
    "events_follow": (_is_list, lambda rows: "\n".join(event_line(e) for e in rows) or "no events"),
    "log": (_has("decisions"), log_text),
    "audit": (_is_list, audit_text),
    "propose": (_has("height"), propose_text),
    "ping": (_has("rtt_s"), ping_text),
    "certificate": (_has("precommits", "verified"), certificate_text),
    "reputation": (_has("peers", "epoch"), reputation_text),
    "commands": (_is_list, _commands_text),
    "agents_list": (_has("agents"), agents_text),
    "agents_deploy": (_has("action", "name", "version"), agent_event_text),
    "agents_upgrade": (_has("action", "name", "version"), agent_event_text),
    "agents_rollback": (_has("action", "name", "version"), agent_event_text),
    "agents_remove": (_has("action", "name", "version"), agent_event_text),
    "agents_call": (_has("kind"), agent_call_text),
    "tasks_submit": (_has("task_id", "requirements"), task_text),
    "tasks_cancel": (_has("task_id", "requirements"), task_text),
    "tasks_status": (lambda r: _has("task_id", "requirements")(r) or _has("tasks", "fabric")(r),
                     lambda r: task_text(r) if "task_id" in r else tasks_text(r)),
    "modules_list": (_has("modules", "total_bytes"), modules_text),
    "resources": (_has("own", "peers"), resources_text),
    "admin_key_list": (_is_list, keys_text),
    "admin_key_add": (_has("name", "role", "fingerprint"), key_text),
    "admin_key_revoke": (_has("name", "fingerprint"), key_text),
    "train_status": (_has("jobs"), _train_status_text),
    "train_start": (_has("job_id", "height"), train_start_text),
    "train_export": (_has("path", "sidecar"), train_export_text),
}
"""Admin command -> (does the answer have the view's shape, its text): what the shell shows and
the ``chimera`` command of the same name prints (``chimera peers`` = ``peers`` here)."""


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def with_audit_failure(doc: dict) -> dict:
    """``doc`` plus ``"audit_failure": REASON`` when a reply read since the last such call
    carried one (the node ran the request but could not write its audit row, PROTOCOL
    §19.6): a ``--json`` document keeps what the node said."""
    reasons = admin.take_audit_failures()
    return doc if reasons is None else {**doc, "audit_failure": reasons}


def json_line(doc: dict) -> str:
    return json.dumps(doc, default=_json_default, separators=(",", ":"))


# ------------------------------------------------------------------ session


class Shell:
    """Parses lines, runs them against ``client``, formats results."""

    def __init__(self, client, *, json_output: bool = False, assume_yes: bool = False,
                 out=None, interactive: bool = False) -> None:
        self.client = client
        self.json = json_output
        self.assume_yes = assume_yes
        self.out = out or sys.stdout
        self.interactive = interactive
        self._commands: dict[str, dict] | None = None
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._positional: list[str] = []  # argument names the last line's positional words filled

    # -------------------------------------------------------------- model

    @property
    def commands(self) -> dict[str, dict]:
        if self._commands is None:
            self._commands = {c["name"]: c for c in self.client.call("commands")}
        return self._commands

    def phrases(self) -> list[str]:
        return sorted({*(phrase(c) for c in self.commands), *BUILTINS})

    def names(self, kind: str) -> list[str]:
        """Peer ids (``peer``) or agent names (``agent``) for completion; cached 5 s, [] on error."""
        now = time.monotonic()
        hit = self._cache.get(kind)
        if hit is not None and now - hit[0] < 5.0:
            return hit[1]
        values: list[str] = []
        try:
            if kind == "peer":
                values = [r["peer_id"] for r in self.client.call("peers", timeout_s=3.0)]
            elif kind == "agent" and "agents_list" in self.commands:
                rows = self.client.call("agents_list", timeout_s=3.0)
                rows = rows.get("agents", []) if isinstance(rows, dict) else rows
                values = [str(r.get("name")) for r in rows if isinstance(r, dict) and r.get("name")]
        except Exception:  # completion is best effort
            values = []
        self._cache[kind] = (now, values)
        return values

    def accepted(self, cmd: str) -> list[str] | None:
        """The argument names ``cmd`` takes: those ``commands`` lists, then the ones its handler
        reads as named-only options and the shell's own (:data:`SHELL_ARGS`). None: unknown (a command the node lists without
        arguments and this shell does not know: any name is let through)."""
        entry = self.commands[cmd]
        listed = list(entry.get("args", []))
        options = entry.get("options", COMMAND_OPTIONS.get(cmd, ()))
        extra = [a for a in (*options, *SHELL_ARGS.get(cmd, ())) if a not in listed]
        if not listed and not extra and cmd not in COMMAND_HELP:
            return None
        return listed + extra

    def takes(self, cmd: str) -> str:
        names = self.accepted(cmd)
        return f"takes: {' '.join(names)}" if names else "takes no arguments"

    def resolve(self, words: list[str]) -> tuple[str, list[str]]:
        """(command name, remaining words) for the longest matching command phrase.

        Raises:
            ShellError: no command matches.
        """
        known = self.commands
        for n in range(min(4, len(words)), 0, -1):
            name = "_".join(words[:n]).replace("-", "_")
            variants = [name]
            first, _, rest = name.partition("_")
            variants.append((first[:-1] if first.endswith("s") else first + "s") + (f"_{rest}" if rest else ""))
            for candidate in variants:
                if candidate in known:
                    return candidate, words[n:]
        close = [phrase(c) for c in known if c.startswith(words[0].replace("-", "_")[:3])]
        hint = f"; did you mean: {', '.join(sorted(close)[:6])}" if close else "; `help` lists the commands"
        raise ShellError(f"unknown command {clip(' '.join(words[:3]))!r}{hint}")

    def parse(self, line: str) -> tuple[str, dict]:
        """``(command, args)`` for one line of the grammar. Raises ShellError."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise ShellError(f"cannot parse the line: {exc}") from None
        if not words:
            raise ShellError("empty command")
        cmd, rest = self.resolve(words)
        arg_names = list(self.commands[cmd].get("args", []))
        self._positional = []  # the argument names the positional words filled, in order
        accepted = self.accepted(cmd)
        args: dict[str, object] = {}
        files: dict[str, str] = {}  # argument -> the @FILE it was read from
        positional = 0
        for word in rest:
            name, sep, value = word.partition("=")
            if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                if accepted is not None and name not in accepted:
                    raise ShellError(f"{phrase(cmd)}: unknown argument {clip(name)!r} ({self.takes(cmd)})")
                text = value
            else:
                while positional < len(arg_names) and arg_names[positional] in args:
                    positional += 1
                if positional >= len(arg_names):
                    usage = " ".join(arg_names) or "no positional arguments"
                    raise ShellError(f"{phrase(cmd)}: too many arguments (takes: {usage}; use name=value)")
                name, text = arg_names[positional], word
                positional += 1
                self._positional.append(name)
            args[name] = value_of(name, text)
            if text.startswith("@") and not text.startswith("@@") and len(text) > 1:
                files[name] = text[1:]
            else:
                files.pop(name, None)
        self._check_required(cmd, args)
        if cmd == "train_start" and isinstance(args.get("job"), bytes):
            args["job"] = toml_job(args["job"], files.get("job", "job"))
        return cmd, args

    def _check_required(self, cmd: str, args: dict) -> None:
        """Raise a ShellError naming the first missing argument (of those the node lists)."""
        listed = self.commands[cmd].get("args", [])
        for name in REQUIRED_ARGS.get(cmd, ()):
            if name in listed and args.get(name) is None:
                raise ShellError(f"{phrase(cmd)}: missing argument {name!r} ({self.takes(cmd)})")
        if cmd in ("agents_deploy", "agents_upgrade", "tasks_submit") and "module" in listed \
                and args.get("module") is None and args.get("sha256") is None:
            raise ShellError(f"{phrase(cmd)}: missing argument 'module' (module=@FILE.wasm, or sha256=HEX "
                             "of a stored module)")

    # ---------------------------------------------------------------- run

    def help(self, words: list[str]) -> str:
        if not words:
            rows = [{"command": phrase(c["name"]), "role": c["role"], "help": c["help"]}
                    for c in self.commands.values()]
            rows.append({"command": "admin key create", "role": "admin",
                         "help": "create an admin key here and register it: NAME [role=R] [out=FILE]"})
            rows.append({"command": "help [CMD]", "role": "-", "help": "this list, or one command's help"})
            return table(rows) + "\n\nsyntax: CMD [positional ...] [name=value ...]"
        cmd, _ = self.resolve(words)
        c = self.commands[cmd]
        usage = " ".join([phrase(cmd), *(f"[{a}]" for a in c["args"]),
                          *(f"[{a}=V]" for a in self.accepted(cmd) or () if a not in c["args"])])
        notes = ["streams until interrupted (Ctrl-C)"] if c.get("stream") else []
        if cmd in DESTRUCTIVE:
            notes.append("asks for confirmation (--yes skips)")
        return "\n".join([f"usage: {usage}", f"  {c['help']}", f"  needs role: {c['role']}",
                          f"  admin command: {cmd}", *(f"  {n}" for n in notes)])

    def confirm(self, cmd: str, args: dict) -> bool:
        if self.assume_yes or cmd not in DESTRUCTIVE:
            return True
        text = f"{phrase(cmd)} {' '.join(f'{k}={v}' for k, v in args.items())}".strip()
        if not sys.stdin.isatty():
            raise ShellError(f"{phrase(cmd)} is destructive: confirm interactively or pass --yes")
        text = clip(text, 200)
        if self.interactive:
            from prompt_toolkit.shortcuts import confirm

            return confirm(f"really run `{text}`?")
        try:
            answer = input(f"really run `{text}`? [y/N] ")
        except EOFError:
            return False
        return answer.strip().lower() in ("y", "yes")

    def execute(self, line: str) -> int:
        """Run one line; print its result or its error (one line). Returns the exit code:
        the node's code, 2 for a line the shell cannot run, 1 for any other failure.

        Raises:
            ShellExit: the line was ``exit [CODE]`` or ``quit``.
            KeyboardInterrupt: Ctrl-C (a following stream ends quietly instead).
        """
        admin.take_audit_failures()  # what an earlier line's replies noted is not this line's
        self._positional = []
        try:
            return self._execute(line)
        except ShellError as exc:
            return self._fail(str(exc), exc.code)
        except AdminError as exc:
            return self._fail(str(exc) + self._positional_hint(str(exc), exc.code), exc.code)
        except AdminKeyError as exc:
            return self._fail(str(exc), EXIT_USAGE)
        except OSError as exc:
            return self._fail(str(exc), EXIT_FAIL)
        except Exception as exc:  # a bug here or an odd answer: one line, and the session goes on
            return self._fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_FAIL)

    def _positional_hint(self, message: str, code: int) -> str:
        """For a usage error about an argument that a later positional word filled (``propose
        hello from shell``: 'from' became timeout_s): say how the words were mapped."""
        names = self._positional
        if code != EXIT_USAGE or len(names) < 2 or not any(re.search(rf"\b{re.escape(n)}\b", message)
                                                          for n in names[1:]):
            return ""
        return f" (the words after the command filled {', '.join(names)} in order; quote text with spaces)"

    def _fail(self, message: str, code: int) -> int:
        message = one_line(message) or "unknown error"
        if self.json:
            self._print(json_line(with_audit_failure({"ok": False, "error": message, "code": code})))
        else:
            self._print(f"error: {message}", err=True)
        return code

    def _train_export(self, args: dict) -> int:
        """``train export path=FILE [job=ID] [force=true]``: the node sends the certified model, the
        shell writes ``FILE`` (.npz) and its ``.json`` sidecar here, on the operator's machine."""
        from .cli_train import export_paths, write_export

        path_arg = args.pop("path", None)
        force = args.pop("force", False)
        if type(force) is not bool:
            raise ShellError(f"force must be true or false, not {str(force)[:20]!r}")
        if not isinstance(path_arg, str) or not path_arg:
            raise ShellError("train export needs path=FILE (where this shell writes the .npz and .json)")
        try:
            path, sidecar = export_paths(path_arg, force)
        except FileExistsError as exc:
            raise ShellError(f"{exc} (add force=true to overwrite)") from None
        except ValueError as exc:
            raise ShellError(str(exc)) from None
        res = self.client.call("train_export", args, timeout_s=60.0)
        try:
            res = write_export(res, path, sidecar)
        except OSError as exc:
            raise ShellError(f"cannot write {path}: {exc.strerror or exc}", EXIT_FAIL) from None  # as the CLI
        self._emit("train_export", res)
        return EXIT_OK

    def _print(self, text: str, err: bool = False) -> None:
        stream = sys.stderr if err and not self.interactive else self.out
        print(text, file=stream, flush=True)

    def _execute(self, line: str) -> int:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise ShellError(f"cannot parse the line: {exc}") from None
        if not words:
            return EXIT_OK
        if words[0] in ("exit", "quit"):
            if len(words) > 2 or (len(words) == 2 and not re.fullmatch(r"\d{1,3}", words[1])) \
                    or (len(words) == 2 and int(words[1]) > 255):
                raise ShellError(f"usage: {words[0]} [CODE] (CODE: 0..255)")
            raise ShellExit(int(words[1]) if len(words) == 2 else EXIT_OK)
        if words[0] == "help":
            self._emit("help", self.help(words[1:]), raw=True)
            return EXIT_OK
        if words[:3] == ["admin", "key", "create"]:
            return self._key_create(words[3:])
        cmd, args = self.parse(line)
        if not self.confirm(cmd, args):
            self._print("cancelled")
            return EXIT_OK
        if self.commands[cmd].get("stream"):
            return self._follow(cmd, args)
        if cmd == "train_export":
            return self._train_export(args)
        result = self.client.call(cmd, args, timeout_s=self._timeout(cmd, args))
        extra = None
        if cmd == "peers" and not self.json:  # the members view: this peer too, with its weights
            extra = peers_extra(lambda c: self.client.call(c, timeout_s=3.0))
        self._emit(cmd, result, extra=extra)
        return EXIT_OK

    def _timeout(self, cmd: str, args: dict) -> float | None:
        """How long to wait for ``cmd``'s answer: None (the client's), 60 s for the slow commands,
        longer when the request itself waits (``timeout_s``, ``wait_s``: capped at an hour)."""
        slow = cmd in ("propose", "ping", "train_start", "agents_deploy", "tasks_submit", "agents_call")
        waits = [float(args[k]) for k in ("timeout_s", "wait_s")
                 if type(args.get(k)) in (int, float) and not math.isnan(args[k])]
        if not waits:
            return 60.0 if slow else None
        return max(60.0 if slow else float(getattr(self.client, "timeout_s", 10.0)),
                   min(max(waits), 3600.0) + 5.0)

    def _emit(self, cmd: str, result: Any, extra: dict | None = None, raw: bool = False) -> None:
        if self.json:
            self._print(json_line(with_audit_failure({"ok": True, "result": result})))
        else:
            self._print(result if raw else render(cmd, result, extra))

    def _follow(self, cmd: str, args: dict) -> int:
        stream = self.client.follow(cmd, args)
        try:
            for event in stream:
                self._print(json_line({"ok": True, "result": event}) if self.json else event_line(event))
        except KeyboardInterrupt:
            pass
        finally:
            stream.close()
        return EXIT_OK

    def _key_create(self, words: list[str]) -> int:
        name, role, out = None, "observer", None
        for word in words:
            key, sep, value = word.partition("=")
            if sep and key == "role":
                role = value
            elif sep and key == "out":
                out = value
            elif not sep and name is None:
                name = word
            else:
                raise ShellError("usage: admin key create NAME [role=observer|operator|admin] [out=FILE]")
        if name is None:
            raise ShellError("usage: admin key create NAME [role=observer|operator|admin] [out=FILE]")
        path = Path(out).expanduser() if out else Path.cwd() / f"{name}.admin.key"
        info = create_key(self.client.call, name, role, path)
        self._emit("admin_key_add", info)
        return EXIT_OK


def toml_job(raw: bytes, source: str) -> str:
    """A training job file's text, checked to be TOML here so that an error names the
    file and says what the parser found (the node checks the fields).

    Raises:
        ShellError: not UTF-8, or not TOML.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShellError(f"job: {source} is not UTF-8 text (byte {exc.start})") from None
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ShellError(f"job: {source} is not valid TOML: {one_line(str(exc), 200)}") from None
    except RecursionError:
        raise ShellError(f"job: {source} is not valid TOML: nested too deeply") from None
    return text


def create_key(call, name: str, role: str, path: Path) -> dict:
    """Generate an admin key, write its private half to ``path`` (0600), register the public half.

    ``call(cmd, args)`` reaches the node (or an offline key ring). Returns the
    registered key (fingerprint, no secret). Raises AdminKeyError / AdminError.
    """
    check_name(name)
    check_role(role)
    key = generate_key()
    write_key_file(path, key)
    try:
        info = call("admin_key_add", {"name": name, "role": role, "public_key": public_bytes(key)})
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return {**info, "key_file": str(path), "fingerprint": key_fingerprint(public_bytes(key))}


# -------------------------------------------------------------- interactive


def _completer(shell: Shell):
    from prompt_toolkit.completion import Completer, Completion

    class AdminCompleter(Completer):
        def get_completions(self, document, complete_event):
            try:  # completion is best effort: never an exception into the prompt
                yield from self._completions(document)
            except Exception:
                return

        def _completions(self, document):
            text = document.text_before_cursor
            stripped = text.lstrip()
            phrases = shell.phrases()
            spoken = {*phrases, *(c.replace("_", " ") for c in shell.commands)}  # agents deploy too
            matched = None
            for p in sorted(spoken, key=len, reverse=True):
                if stripped.startswith(p + " "):
                    matched = p
                    break
            if matched is None:  # the shown phrases; the admin API's plural when only it fits
                fits = [p for p in phrases if p.startswith(stripped)] \
                    or sorted(p for p in spoken if p.startswith(stripped))
                for p in fits:
                    yield Completion(p, start_position=-len(stripped))
                return
            if matched == "help":
                word = stripped[len("help "):]
                for p in phrases:
                    if p.startswith(word):
                        yield Completion(p, start_position=-len(word))
                return
            cmd = shell.resolve(matched.split())[0] if matched not in BUILTINS else matched.replace(" ", "_")
            info = shell.commands.get(cmd, {"args": []})
            word = "" if text.endswith(" ") else text.split()[-1]
            candidates = [f"{a}=" for a in (shell.accepted(cmd) if cmd in shell.commands else None)
                          or info["args"]]
            arg_names = set(info["args"])
            if "peer_id" in arg_names or cmd in ("ping", "revoke_peer", "admit"):
                candidates += shell.names("peer")
            if cmd.startswith("agents_"):
                candidates += shell.names("agent")
            if cmd in ("events", "events_follow") and word.startswith("min_priority="):
                candidates += [f"min_priority={p}" for p in ("info", "warning", "critical")]
            if cmd in ("events", "events_follow") and word.startswith("kind="):
                candidates += [f"kind={k}" for k in sorted(EVENT_KINDS)]
            for c in candidates:
                if c.startswith(word):
                    yield Completion(c, start_position=-len(word))

    return AdminCompleter()


def history_path() -> Path:
    """The shell history file (in the platform state dir), created owner-only (0600; it can
    hold secrets typed as arguments); an existing file's wider mode is narrowed.

    Raises:
        OSError: the file cannot be created or its mode cannot be fixed.
    """
    import platformdirs

    path = Path(platformdirs.user_state_dir("chimera-mesh", appauthor=False)) / "shell_history"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return path


def interactive(shell: Shell) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    shell.interactive = True
    try:
        me = shell.client.call("whoami")
        if not isinstance(me, dict):
            raise AdminError("the node sent an unreadable whoami answer", EXIT_FAIL)
        who = f"{me.get('role', '?')}@{str(me.get('peer_id', shell.client.target))[:10]}"
    except AdminError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return exc.code
    try:
        history = FileHistory(str(history_path()))
    except OSError as exc:
        print(f"warning: no shell history: {one_line(str(exc))}", file=sys.stderr)
        history = InMemoryHistory()
    session = PromptSession(history=history, completer=_completer(shell), complete_while_typing=False)
    print(f"connected to {shell.client.target} as {me.get('who')} ({me.get('role')}); "
          "`help` lists commands, Ctrl-D leaves", flush=True)
    prompt_failures = 0
    while True:
        try:
            line = session.prompt(f"chimera {who}> ")
            prompt_failures = 0
        except KeyboardInterrupt:
            continue
        except EOFError:
            return EXIT_OK
        except Exception as exc:  # the terminal itself failing: give up after a few in a row
            prompt_failures += 1
            print(f"error: {one_line(f'{type(exc).__name__}: {exc}')}", flush=True)
            if prompt_failures >= 3:
                return EXIT_FAIL
            continue
        try:
            shell.execute(line)
        except ShellExit as exc:
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        except Exception as exc:  # execute reports its own errors; this is a last resort
            print(f"error: internal error: {one_line(f'{type(exc).__name__}: {exc}')}", flush=True)
