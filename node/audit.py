"""The admin audit log: one row per admin request, in the node's SQLite store.

Table ``admin_audit`` (created here, next to the store's own tables): time
(ms since the epoch), who (an admin key's name and fingerprint, or
``local-owner uid=N``), transport (``local`` or ``remote``), role, command,
arguments as JSON with secrets redacted, result (``ok``, ``error: LINE`` or
``refused: LINE``) and duration in seconds. The newest :data:`MAX_ROWS` rows
are kept, but successful reads (commands an observer may run) only up to the newest
:data:`MAX_READ_ROWS` of them: polling (``train status --follow``, dashboards, or an
observer doing it on purpose) cannot push out the record of what was changed or
refused.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3

from .admin_keys import COMMAND_ROLES

MAX_ROWS = 100_000
MAX_READ_ROWS = 10_000
PRUNE_EVERY = 1000  # appends between two prunes
MAX_BYTES_SHOWN = 64
MAX_TEXT_CHARS = 256
SECRET_WORDS = ("secret", "token", "key", "password")

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
    duration_s REAL NOT NULL
);
"""


def redact(value: object, depth: int = 0) -> object:
    """A JSON-safe copy of request arguments with secrets hidden.

    Map entries whose key contains secret/token/key/password become
    ``"<redacted>"``; bytes longer than 64 become ``"<N bytes sha256:PREFIX>"``
    (shorter ones hex); long strings are cut at 256 characters.
    """
    if depth > 8:
        return "<nested too deep>"
    if isinstance(value, dict):
        out = {}
        for k, v in list(value.items())[:64]:
            name = str(k)
            out[name] = "<redacted>" if any(w in name.lower() for w in SECRET_WORDS) else redact(v, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [redact(v, depth + 1) for v in value[:64]]
    if isinstance(value, (bytes, bytearray)):
        if len(value) > MAX_BYTES_SHOWN:
            return f"<{len(value)} bytes sha256:{hashlib.sha256(value).hexdigest()[:16]}>"
        return bytes(value).hex()
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT_CHARS else value[:MAX_TEXT_CHARS] + f"...<{len(value)} chars>"
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return repr(value)[:MAX_TEXT_CHARS]


class AuditLog:
    """Append-only audit rows in the store (``db``: the node's connection)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(_SCHEMA)
        self._appended = 0

    def append(self, *, at_ms: int, who: str, transport: str, role: str, command: str,
               args: object, result: str, duration_s: float) -> None:
        self.db.execute(
            "INSERT INTO admin_audit(at_ms, who, transport, role, command, args, result, duration_s) "
            "VALUES(?,?,?,?,?,?,?,?)",
            (at_ms, who[:200], transport, role, command[:80],
             json.dumps(redact(args), separators=(",", ":"), default=str), result[:500],
             round(duration_s, 6)))
        self._appended += 1
        if self._appended % PRUNE_EVERY == 0:
            self.prune()

    def prune(self) -> None:
        """Drop successful reads beyond the newest :data:`MAX_READ_ROWS`, then any row beyond
        the newest :data:`MAX_ROWS`."""
        reads = [cmd for cmd, role in COMMAND_ROLES.items() if role == "observer"]
        marks = ",".join("?" * len(reads))
        self.db.execute(
            f"DELETE FROM admin_audit WHERE id IN (SELECT id FROM admin_audit WHERE command IN ({marks}) "
            "AND result LIKE 'ok%' ORDER BY id DESC LIMIT -1 OFFSET ?)", (*reads, MAX_READ_ROWS))
        self.db.execute("DELETE FROM admin_audit WHERE id IN "
                        "(SELECT id FROM admin_audit ORDER BY id DESC LIMIT -1 OFFSET ?)", (MAX_ROWS,))

    def rows(self, limit: int = 50) -> list[dict]:
        """The newest ``limit`` rows, oldest first."""
        rows = self.db.execute(
            "SELECT id, at_ms, who, transport, role, command, args, result, duration_s FROM admin_audit "
            "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()[::-1]
        return [{"id": i, "at_ms": t, "who": w, "transport": tr, "role": r, "command": c,
                 "args": json.loads(a), "result": res, "duration_s": d}
                for i, t, w, tr, r, c, a, res, d in rows]
