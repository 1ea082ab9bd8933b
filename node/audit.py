"""The admin audit log: one row per admin request, in the node's SQLite store.

Table ``admin_audit`` (created here, next to the store's own tables): time
(ms since the epoch), who (an admin key's name and fingerprint, or
``local-owner uid=N``), transport (``local`` or ``remote``), role, command,
arguments as JSON with secrets redacted (at most :data:`MAX_ARGS_JSON`
characters), result (``ok``, ``error: LINE`` or ``refused: LINE``), duration
in seconds and ``count``, the number of requests the row stands for.

Rows are kept in three buckets that never evict each other: changes
(successful commands that need more than an observer; the newest
:data:`MAX_CHANGE_ROWS`), reads (successful observer commands;
:data:`MAX_READ_ROWS`) and everything else, refusals, malformed requests and
failed commands (:data:`MAX_OTHER_ROWS`). Nobody can push the record of a
change out by polling or by sending junk. Refusals and requests nobody was
authenticated for are also aggregated: at most one row per source (a
connection's uid or remote address) per :data:`AGGREGATE_WINDOW_MS`, whose
``count`` says how many there were, so a flood costs a bounded number of writes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
from dataclasses import dataclass

from .admin_keys import COMMAND_ROLES

MAX_CHANGE_ROWS = 100_000  # successful state-changing commands
MAX_READ_ROWS = 10_000  # successful reads (commands an observer may run)
MAX_OTHER_ROWS = 10_000  # refusals, malformed requests, failed commands
PRUNE_EVERY = 1000  # appends between two prunes (and one at open)
AGGREGATE_WINDOW_MS = 1000  # refusals from one source within this share one row
MAX_OPEN_AGGREGATES = 64  # sources with an open window; more share one row
MAX_BYTES_SHOWN = 64
MAX_TEXT_CHARS = 256
MAX_ARGS_JSON = 4096  # characters of one row's args JSON
SECRET_WORDS = ("secret", "token", "key", "password")
# Arguments whose names look secret but are not: the audit log must say which key.
PUBLIC_ARGS = {"admin_key_revoke": ("key",), "admin_key_add": ("public_key",)}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS admin_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    who TEXT NOT NULL,
    transport TEXT NOT NULL,
    role TEXT NOT NULL,
    command TEXT NOT NULL,
    args TEXT NOT NULL,
    result TEXT NOT NULL,
    duration_s REAL NOT NULL,
    count INTEGER NOT NULL DEFAULT 1
);
"""


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + f"...<{len(text)} chars>"


def redact(value: object, depth: int = 0, public: tuple[str, ...] = ()) -> object:
    """A JSON-safe copy of request arguments with secrets hidden.

    Map entries whose key contains secret/token/key/password become
    ``"<redacted>"`` (except the top-level names in ``public``); bytes longer than
    64 become ``"<N bytes sha256:PREFIX>"`` (shorter ones hex); long strings and
    map keys are cut at 256 characters.
    """
    if depth > 8:
        return "<nested too deep>"
    if isinstance(value, dict):
        out = {}
        for k, v in itertools.islice(value.items(), 64):
            name = k if isinstance(k, str) else repr(k)
            secret = name not in public and any(w in name.lower() for w in SECRET_WORDS)
            out[_cut(name)] = "<redacted>" if secret else redact(v, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [redact(v, depth + 1) for v in value[:64]]
    if isinstance(value, (bytes, bytearray)):
        if len(value) > MAX_BYTES_SHOWN:
            return f"<{len(value)} bytes sha256:{hashlib.sha256(value).hexdigest()[:16]}>"
        return bytes(value).hex()
    if isinstance(value, str):
        return _cut(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return repr(value)[:MAX_TEXT_CHARS]


def args_json(command: str, args: object) -> str:
    """The ``args`` column: :func:`redact` as JSON, at most :data:`MAX_ARGS_JSON` characters
    (longer: ``{"<cut>": "N chars sha256:PREFIX", "head": the first characters}``)."""
    text = json.dumps(redact(args, public=PUBLIC_ARGS.get(command, ())), separators=(",", ":"), default=str)
    if len(text) <= MAX_ARGS_JSON:
        return text
    mark = f"{len(text)} chars sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    head = text[:MAX_ARGS_JSON // 2]
    while True:
        out = json.dumps({"<cut>": mark, "head": head}, separators=(",", ":"))
        if len(out) <= MAX_ARGS_JSON:
            return out
        head = head[:len(head) // 2]


def _bucket_sql(reads: list[str]) -> dict[str, tuple[str, tuple]]:
    marks = ",".join("?" * len(reads))
    return {"read": (f"command IN ({marks}) AND result LIKE 'ok%'", tuple(reads)),
            "change": (f"command NOT IN ({marks}) AND result LIKE 'ok%'", tuple(reads)),
            "other": ("result NOT LIKE 'ok%'", ())}


@dataclass(slots=True)
class _Window:
    row_id: int
    start_ms: int
    more: int = 0  # requests counted after the row was written


class AuditLog:
    """Append-only audit rows in the store (``db``: the node's connection)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(_SCHEMA)
        if "count" not in {row[1] for row in db.execute("PRAGMA table_info(admin_audit)")}:
            db.execute("ALTER TABLE admin_audit ADD COLUMN count INTEGER NOT NULL DEFAULT 1")
        self._appended = 0
        self._windows: dict[str, _Window] = {}  # aggregation source -> its open row
        self.prune()  # a restarted node (or the offline CLI) prunes too: not only every PRUNE_EVERY appends

    def append(self, *, at_ms: int, who: str, transport: str, role: str, command: str,
               args: object, result: str, duration_s: float, aggregate: str | None = None) -> None:
        """Write one row. With ``aggregate`` (the request's source), a request within
        :data:`AGGREGATE_WINDOW_MS` of the last row written for that source only adds one to
        that row's ``count`` (written when the window closes, or at :meth:`flush`)."""
        if self._windows:
            self._close_windows(at_ms)
        if aggregate is not None:
            if aggregate not in self._windows and len(self._windows) >= MAX_OPEN_AGGREGATES:
                aggregate, who = "(other sources)", f"{who[:100]} and other sources"
            window = self._windows.get(aggregate)
            if window is not None:
                window.more += 1
                return
        cur = self.db.execute(
            "INSERT INTO admin_audit(at_ms, who, transport, role, command, args, result, duration_s) "
            "VALUES(?,?,?,?,?,?,?,?)",
            (at_ms, who[:200], transport, role, command[:80], args_json(command, args), result[:500],
             round(duration_s, 6)))
        if aggregate is not None:
            self._windows[aggregate] = _Window(cur.lastrowid, at_ms)
        self._appended += 1
        if self._appended % PRUNE_EVERY == 0:
            self.prune()

    def _close_windows(self, now_ms: int | None) -> None:
        for source, window in list(self._windows.items()):
            if now_ms is None or not window.start_ms <= now_ms < window.start_ms + AGGREGATE_WINDOW_MS:
                del self._windows[source]
                if window.more:
                    self.db.execute("UPDATE admin_audit SET count = count + ? WHERE id=?",
                                    (window.more, window.row_id))

    def flush(self) -> None:
        """Write the counts of aggregated rows still open."""
        self._close_windows(None)

    def prune(self) -> None:
        """Keep the newest :data:`MAX_CHANGE_ROWS` changes, :data:`MAX_READ_ROWS` reads and
        :data:`MAX_OTHER_ROWS` other rows; each bucket is pruned on its own."""
        reads = [cmd for cmd, role in COMMAND_ROLES.items() if role == "observer"]
        caps = {"change": MAX_CHANGE_ROWS, "read": MAX_READ_ROWS, "other": MAX_OTHER_ROWS}
        for bucket, (where, params) in _bucket_sql(reads).items():
            self.db.execute(f"DELETE FROM admin_audit WHERE id IN (SELECT id FROM admin_audit WHERE {where} "
                            "ORDER BY id DESC LIMIT -1 OFFSET ?)", (*params, caps[bucket]))

    def rows(self, limit: int = 50) -> list[dict]:
        """The newest ``limit`` rows, oldest first."""
        self.flush()
        rows = self.db.execute(
            "SELECT id, at_ms, who, transport, role, command, args, result, duration_s, count FROM admin_audit "
            "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()[::-1]
        return [{"id": i, "at_ms": t, "who": w, "transport": tr, "role": r, "command": c,
                 "args": json.loads(a), "result": res, "duration_s": d, "count": n}
                for i, t, w, tr, r, c, a, res, d, n in rows]
