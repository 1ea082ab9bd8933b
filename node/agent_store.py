"""SQLite history of agent deployments (the node's :class:`~chimera.fabric.deploy.DeploymentStore`).

One table, ``agent_deployments``, append-only: each row is a
:class:`~chimera.fabric.deploy.DeploymentEvent`; ``seq`` is the row id. The
connection runs in WAL mode with ``synchronous=FULL`` and autocommit, so an
``append`` is durable when it returns (commit before acknowledging,
DESIGN.md). It can share the node's database file (``node.sqlite3``) or use
its own.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from chimera.fabric.deploy import DeploymentEvent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_deployments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    action TEXT NOT NULL,
    kind TEXT NOT NULL,
    module_sha256 TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS agent_deployments_name ON agent_deployments(name, seq);
"""

_COLUMNS = "seq, name, version, action, kind, module_sha256, at_ms, reason"


class SqliteDeploymentStore:
    """Deployment history in SQLite (stdlib ``sqlite3``, WAL).

    Args:
        path: database file (created 0600 if new).
    Raises:
        sqlite3.Error: the file cannot be opened.
    A row that no longer decodes (edited by hand) raises ``ValueError`` on read.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        new = not self.path.exists()
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        if new:
            self.path.chmod(0o600)
        self._lock = threading.Lock()

    def append(self, event: DeploymentEvent) -> DeploymentEvent:
        """Insert ``event`` (its ``seq`` is ignored) and return it with the assigned ``seq``."""
        with self._lock:
            cur = self.db.execute(
                "INSERT INTO agent_deployments(name, version, action, kind, module_sha256, at_ms, reason) "
                "VALUES(?,?,?,?,?,?,?)",
                (event.name, event.version, event.action, event.kind, event.module_sha256, event.at_ms,
                 event.reason))
            seq = int(cur.lastrowid)
        return DeploymentEvent(seq=seq, name=event.name, version=event.version, action=event.action,
                               kind=event.kind, module_sha256=event.module_sha256, at_ms=event.at_ms,
                               reason=event.reason)

    def events(self, name: str | None = None) -> list[DeploymentEvent]:
        with self._lock:
            if name is None:
                rows = self.db.execute(f"SELECT {_COLUMNS} FROM agent_deployments ORDER BY seq").fetchall()
            else:
                rows = self.db.execute(f"SELECT {_COLUMNS} FROM agent_deployments WHERE name=? ORDER BY seq",
                                       (name,)).fetchall()
        return [DeploymentEvent(seq=r[0], name=r[1], version=r[2], action=r[3], kind=r[4], module_sha256=r[5],
                                at_ms=r[6], reason=r[7]) for r in rows]

    def close(self) -> None:
        self.db.close()
