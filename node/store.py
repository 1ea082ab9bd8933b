"""The node's SQLite store (stdlib sqlite3, WAL).

Tables: ``meta`` (key/value: sequence-number floor, incarnation) and ``peers``
(verified contacts, so a restarted node reconnects without discovery).
Later layers add theirs (log, checkpoints, audit) through :meth:`Store.execute`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgpack

from chimera.protocol.errors import RemoteProtocolError
from chimera.protocol.membership import PeerContact
from chimera.protocol.messages import decode_fields, encode_fields

SEQ_BLOCK = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY,
    contact BLOB NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    state TEXT NOT NULL
);
"""


class Store:
    """One SQLite database per node, at ``data_dir/node.sqlite3``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "node.sqlite3"
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.path.chmod(0o600)

    def close(self) -> None:
        self.db.close()

    def get_meta(self, key: str, default: int = 0) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def set_meta(self, key: str, value: int) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def bump_incarnation(self) -> int:
        """Next incarnation (persisted before it is used)."""
        value = self.get_meta("incarnation") + 1
        self.set_meta("incarnation", value)
        return value

    def reserve_seq_block(self) -> int:
        """Reserve ``SEQ_BLOCK`` sequence numbers; returns the first.

        The floor is committed before any of them is used, so a node killed at
        any point never reuses a sequence number after restart.
        """
        first = max(self.get_meta("seq_floor"), 1)
        self.set_meta("seq_floor", first + SEQ_BLOCK)
        return first

    def save_peer(self, contact: PeerContact, last_seen_ms: int, state: str) -> None:
        blob = msgpack.packb(encode_fields(contact), use_bin_type=True)
        self.db.execute(
            "INSERT INTO peers(peer_id, contact, last_seen_ms, state) VALUES(?,?,?,?) "
            "ON CONFLICT(peer_id) DO UPDATE SET contact=excluded.contact, "
            "last_seen_ms=excluded.last_seen_ms, state=excluded.state",
            (contact.peer_id, blob, last_seen_ms, state),
        )

    def set_peer_state(self, peer_id: str, state: str) -> None:
        self.db.execute("UPDATE peers SET state=? WHERE peer_id=?", (state, peer_id))

    def known_peers(self, limit: int = 256) -> list[PeerContact]:
        """Contacts of peers seen before, most recent first; corrupt rows skipped."""
        out = []
        for (blob,) in self.db.execute(
            "SELECT contact FROM peers ORDER BY last_seen_ms DESC LIMIT ?", (limit,)
        ):
            try:
                out.append(decode_fields(PeerContact, msgpack.unpackb(blob, raw=False), "peer"))
            except (RemoteProtocolError, ValueError, msgpack.UnpackException):
                continue
        return out
