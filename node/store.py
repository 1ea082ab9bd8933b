"""The node's SQLite store (stdlib sqlite3, WAL).

Tables: ``meta`` (key/value: sequence-number floor, incarnation), ``peers``
(verified contacts, so a restarted node reconnects without discovery), and the
consensus log: ``blocks`` (every committed height with its certificate),
``decisions`` (the application decisions in them), ``ledger_snapshots`` (the
shared state at each epoch boundary), ``epochs`` (each epoch's weight table),
``evidence`` and ``blobs`` (older releases kept the last signed vote state
there). A commit and everything derived from it are written in one
transaction, before anything is acknowledged. ``fabric_tasks`` holds the
records of the fabric tasks submitted on this node (:class:`TaskRecords`,
written by node/fabric.py through its own connection, off the event loop).

Schema steps: every table is created with ``CREATE TABLE IF NOT EXISTS`` at
open, so a store written by an older release gains the tables added since
(``fabric_tasks``: added after the consensus tables) and opens as before; a
column added to a table since (:data:`_ADDED_COLUMNS`: ``fabric_tasks.input``)
is added with ``ALTER TABLE ... ADD COLUMN``, NULL in the rows written before.

The last signed vote state lives in its own small file (:class:`SignStateFile`,
the role of CometBFT's ``priv_validator_state.json``): it is written before
every vote this node sends, and a 150-byte ``pwrite`` + ``fdatasync`` costs
about a third of an SQLite WAL transaction with synchronous=FULL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import struct
from pathlib import Path

import msgpack

from chimera.protocol.errors import RemoteProtocolError
from chimera.protocol.membership import MAX_INCARNATION, PeerContact
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
CREATE TABLE IF NOT EXISTS blobs (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY,
    hash BLOB NOT NULL,
    round INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    proposer TEXT NOT NULL,
    value_count INTEGER NOT NULL,
    committed_ms INTEGER NOT NULL,
    commit_blob BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    height INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    author TEXT NOT NULL,
    nonce INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (height, idx)
);
CREATE TABLE IF NOT EXISTS ledger_snapshots (height INTEGER PRIMARY KEY, snapshot BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS epochs (
    epoch INTEGER PRIMARY KEY,
    from_height INTEGER NOT NULL,
    weights BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS evidence (
    height INTEGER NOT NULL,
    offender TEXT NOT NULL,
    PRIMARY KEY (height, offender)
);
CREATE TABLE IF NOT EXISTS fabric_tasks (
    task_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    module_sha256 TEXT NOT NULL,
    requirements BLOB NOT NULL,
    input_bytes INTEGER NOT NULL,
    submitted_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    state TEXT NOT NULL,
    outcome TEXT,
    exit_code INTEGER,
    stdout BLOB NOT NULL,
    digest BLOB,
    certificate BLOB,
    acceptance BLOB,
    failure_reason TEXT,
    failure_detail TEXT,
    history BLOB NOT NULL,
    input BLOB
);
CREATE INDEX IF NOT EXISTS fabric_tasks_by_seq ON fabric_tasks(seq);
"""


def _schema_columns() -> dict[str, tuple[str, ...]]:
    """The columns of each table of :data:`_SCHEMA`, in table order (read from an in-memory copy)."""
    mem = sqlite3.connect(":memory:")
    try:
        mem.executescript(_SCHEMA)
        tables = [t for (t,) in mem.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: tuple(row[1] for row in mem.execute(f"PRAGMA table_info({t})")) for t in tables}
    finally:
        mem.close()


_COLUMNS = _schema_columns()

_ADDED_COLUMNS = (("fabric_tasks", "input", "BLOB"),)
"""Columns added to a table after its first release: ``(table, column, type)``, added at open
to a store that lacks them (nullable, so the rows written before read as NULL)."""


class Store:
    """One SQLite database per node, at ``data_dir/node.sqlite3``.

    Raises (from the constructor):
        sqlite3.DatabaseError: the file is not an SQLite database, is locked, or holds a
            table of ours without the columns it needs (a foreign or damaged schema: it
            would fail later, mid-start, with a traceback).
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "node.sqlite3"
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            for table, column, kind in _ADDED_COLUMNS:
                have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            for table, needed in _COLUMNS.items():
                missing = set(needed) - {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
                if missing:
                    raise sqlite3.DatabaseError(f"table {table} lacks column(s) {', '.join(sorted(missing))}")
            self.path.chmod(0o600)
        except BaseException:
            self.db.close()  # a file that is no database (or is locked) is not held open
            raise

    def close(self) -> None:
        self.db.close()

    def get_meta(self, key: str, default: int = 0) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def set_meta(self, key: str, value: int) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def bump_incarnation(self) -> int:
        """Next incarnation (persisted before it is used), at most ``MAX_INCARNATION``:
        a stored value at or above 2**62 (written by a node that refuted a forged claim
        before refutations were capped) is clamped there, since no Hello can carry more."""
        value = min(max(self.get_meta("incarnation"), 0) + 1, MAX_INCARNATION)
        self.set_meta("incarnation", value)
        return value

    def reserve_seq_block(self, now_ms: int) -> int:
        """Reserve ``SEQ_BLOCK`` sequence numbers; returns the first: the stored floor, or
        ``now_ms * SEQ_BLOCK`` (wall clock, ms) when that is higher.

        The floor is committed before any of them is used, so a node killed at
        any point never reuses a sequence number after restart. The clock term covers a
        store that was lost or replaced by an older copy (its floor is behind numbers
        already sent): a node sends far fewer than ``SEQ_BLOCK`` envelopes per millisecond,
        so numbers drawn at a later millisecond are above every one it used before (its
        peers' replay windows otherwise dropped all it sent as ``replay`` for good, and it
        could never catch up).
        """
        first = max(self.get_meta("seq_floor"), 1, now_ms * SEQ_BLOCK)
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

    # ------------------------------------------------------------ consensus

    def get_blob(self, key: str) -> bytes | None:
        row = self.db.execute("SELECT value FROM blobs WHERE key=?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_blob(self, key: str, value: bytes) -> None:
        """Durable (synchronous=FULL) before it returns."""
        self.db.execute("INSERT INTO blobs(key, value) VALUES(?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def delete_blob(self, key: str) -> None:
        self.db.execute("DELETE FROM blobs WHERE key=?", (key,))

    def save_commit(self, *, height: int, block_hash: bytes, round_: int, epoch: int, proposer: str,
                    value_count: int, committed_ms: int, commit_blob: bytes,
                    decisions: list[tuple[int, str, int, bytes]], offenders: list[str],
                    snapshot: bytes | None, new_table: tuple[int, int, bytes] | None,
                    meta: dict[str, int] | None = None) -> None:
        """Write one committed height and what it changed, atomically.

        ``decisions``: (index, author, nonce, data); ``new_table``: (epoch,
        from_height, msgpack weights) when the height closed an epoch; ``meta``:
        integer meta values stored in the same transaction (:meth:`get_meta`).
        A height already stored is left as it is (the same block: the log is final).
        """
        with self._transaction():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO blocks(height, hash, round, epoch, proposer, value_count, "
                "committed_ms, commit_blob) VALUES(?,?,?,?,?,?,?,?)",
                (height, block_hash, round_, epoch, proposer, value_count, committed_ms, commit_blob))
            if cur.rowcount == 0:
                return
            self.db.executemany("INSERT OR IGNORE INTO decisions(height, idx, author, nonce, data) "
                                "VALUES(?,?,?,?,?)", [(height, *d) for d in decisions])
            self.db.executemany("INSERT OR IGNORE INTO evidence(height, offender) VALUES(?,?)",
                                [(height, o) for o in offenders])
            if snapshot is not None:
                self.db.execute("INSERT OR REPLACE INTO ledger_snapshots(height, snapshot) VALUES(?,?)",
                                (height, snapshot))
            if new_table is not None:
                self.db.execute("INSERT OR REPLACE INTO epochs(epoch, from_height, weights) VALUES(?,?,?)",
                                new_table)
            for key, value in (meta or {}).items():
                self.set_meta(key, value)

    @contextlib.contextmanager
    def _transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def last_height(self) -> int:
        row = self.db.execute("SELECT MAX(height) FROM blocks").fetchone()
        return int(row[0] or 0)

    def commit_blobs(self, from_height: int, limit: int) -> list[bytes]:
        """Consecutive stored commits (msgpack of CertifiedCommit fields) from ``from_height``."""
        rows = self.db.execute("SELECT height, commit_blob FROM blocks WHERE height >= ? "
                               "ORDER BY height LIMIT ?", (from_height, limit)).fetchall()
        out = []
        for expected, (height, blob) in enumerate(rows, start=from_height):
            if height != expected:
                break
            out.append(bytes(blob))
        return out

    def block_hash(self, height: int) -> bytes | None:
        row = self.db.execute("SELECT hash FROM blocks WHERE height=?", (height,)).fetchone()
        return None if row is None else bytes(row[0])

    def latest_snapshot(self, below: int | None = None) -> tuple[int, bytes] | None:
        """The ledger snapshot stored with the highest height (below ``below`` when given):
        (that height, the snapshot)."""
        row = self.db.execute("SELECT height, snapshot FROM ledger_snapshots WHERE height < ? "
                              "ORDER BY height DESC LIMIT 1",
                              (1 << 62 if below is None else below,)).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def blocks(self, from_height: int, limit: int) -> list[dict]:
        rows = self.db.execute("SELECT height, hash, round, epoch, proposer, value_count, committed_ms "
                               "FROM blocks WHERE height >= ? ORDER BY height LIMIT ?",
                               (from_height, limit)).fetchall()
        return [{"height": h, "hash": bytes(d).hex(), "round": r, "epoch": e, "proposer": p,
                 "value_count": n, "committed_ms": t} for h, d, r, e, p, n, t in rows]

    def decisions(self, from_height: int = 1, limit: int = 100, last: bool = False) -> list[dict]:
        """Committed decisions in log order (``last``: the most recent ``limit``)."""
        if last:
            rows = self.db.execute("SELECT height, idx, author, nonce, data FROM decisions "
                                   "ORDER BY height DESC, idx DESC LIMIT ?", (limit,)).fetchall()[::-1]
        else:
            rows = self.db.execute("SELECT height, idx, author, nonce, data FROM decisions "
                                   "WHERE height >= ? ORDER BY height, idx LIMIT ?",
                                   (from_height, limit)).fetchall()
        return [{"height": h, "index": i, "author": a, "nonce": n, "data": bytes(d)} for h, i, a, n, d in rows]

    def epoch_tables(self) -> list[tuple[int, int, bytes]]:
        return [(int(e), int(h), bytes(w)) for e, h, w in
                self.db.execute("SELECT epoch, from_height, weights FROM epochs ORDER BY epoch")]


TASK_RECORD_COLUMNS = _COLUMNS["fabric_tasks"]
"""The columns of a ``fabric_tasks`` record (from :data:`_SCHEMA`), the keys of the dicts
:class:`TaskRecords` takes and returns."""


def _utf8_or_bytes(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return bytes(raw)


class TaskRecords:
    """The ``fabric_tasks`` table of a node's store (created by :class:`Store`), through a
    connection of its own (``synchronous=FULL``), so that a write never runs inside a
    transaction the event loop's connection has open.

    A record is a dict with the keys of :data:`TASK_RECORD_COLUMNS`: ``seq`` orders the
    tasks by submission; ``requirements``, ``acceptance`` and ``history`` are msgpack maps
    and ``certificate`` the msgpack of the vote certificate (node/fabric.py encodes and
    checks them); ``input`` is the task's stdin while it runs (what a restarted node needs to
    place it again; None once it ended, and in records written before the column existed). The connection may be used from one thread at a time (node/fabric.py:
    at start on the event loop, then only from its record writer thread).

    Raises (from the constructor):
        sqlite3.Error: the file cannot be opened.
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_s, check_same_thread=False)
        # a text value that is not UTF-8 comes back as bytes (the caller's type check refuses
        # that one record) instead of failing the read of every record
        self.db.text_factory = _utf8_or_bytes
        try:
            self.db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            self.db.close()
            raise

    def save(self, *records: dict, keep: int) -> None:
        """Insert or replace each of ``records`` (by task id), then delete the oldest records (by
        ``seq``) that are not ``running`` beyond the newest ``keep`` (>= 1) records, in one
        transaction; durable when it returns. A record without the key ``input`` keeps the
        stored row's input (a running task's input, up to 512 KiB, is written once, not again
        with each change of its placement); one with ``input`` None clears it.

        Raises:
            KeyError: a record lacks a column other than ``input``.
            sqlite3.Error: the store refused the write (disk full, locked beyond the busy timeout,
                read-only); nothing of it was written.
        """
        full = [tuple(r[c] for c in TASK_RECORD_COLUMNS) for r in records if "input" in r]
        kept = [c for c in TASK_RECORD_COLUMNS if c != "input"]
        rest = [tuple(r[c] for c in kept) for r in records if "input" not in r]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if full:
                self.db.executemany(f"INSERT OR REPLACE INTO fabric_tasks({', '.join(TASK_RECORD_COLUMNS)}) "
                                    f"VALUES({', '.join('?' * len(TASK_RECORD_COLUMNS))})", full)
            if rest:  # (a row not stored yet gets input NULL: a restart then cannot resume it)
                self.db.executemany(f"INSERT INTO fabric_tasks({', '.join(kept)}) VALUES({', '.join('?' * len(kept))}) "
                                    f"ON CONFLICT(task_id) DO UPDATE SET "
                                    + ", ".join(f"{c}=excluded.{c}" for c in kept if c != "task_id"), rest)
            (count,) = self.db.execute("SELECT COUNT(*) FROM fabric_tasks").fetchone()
            if count > keep:
                self.db.execute("DELETE FROM fabric_tasks WHERE task_id IN (SELECT task_id FROM fabric_tasks "
                                "WHERE state != 'running' ORDER BY seq LIMIT ?)", (count - keep,))
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise

    def load(self, limit: int) -> list[dict]:
        """The newest ``limit`` records by ``seq`` and every ``running`` record older than those
        (a restart must resume or end each task that was running, however many there were;
        :meth:`save` never trims them), oldest first (values as SQLite stores them: the caller
        checks their types).

        Raises:
            sqlite3.Error: the table cannot be read.
        """
        rows = self.db.execute(f"SELECT {', '.join(TASK_RECORD_COLUMNS)} FROM fabric_tasks "
                               "WHERE task_id IN (SELECT task_id FROM fabric_tasks ORDER BY seq DESC LIMIT ?) "
                               "OR state = 'running' ORDER BY seq", (limit,)).fetchall()
        return [dict(zip(TASK_RECORD_COLUMNS, row)) for row in rows]

    def max_seq(self) -> int:
        """The highest ``seq`` of every stored record, those :meth:`load` leaves out or the caller
        cannot decode included (0: none; a value that is not an integer counts as none).

        Raises:
            sqlite3.Error: the table cannot be read.
        """
        (top,) = self.db.execute("SELECT MAX(seq) FROM fabric_tasks WHERE typeof(seq) = 'integer'").fetchone()
        return top if type(top) is int and top > 0 else 0

    def close(self) -> None:
        self.db.close()


class SignStateError(Exception):
    """The sign-state file exists but neither slot holds a valid record (corrupt or foreign file)."""


class SignStateFile:
    """The last signed vote state of a validator, durable before every signature leaves.

    Layout (``data_dir/bft_sign_state.bin``, mode 0600): two slots of 512 bytes
    written alternately, then the extra records. A slot is ``b"CMSS"``, a
    big-endian u64 sequence number, a big-endian u16 payload length, the payload,
    the locator of the slot's extra record (big-endian u64 file offset, u32
    length and the extra's 16-byte BLAKE2b digest; all zeros: none), zero
    padding, and a 16-byte BLAKE2b digest of the slot's first 496 bytes at its
    end. A write is a ``pwrite`` of the extra record (when it is not the one the
    last slot already points at) at an offset that does not overlap the last
    slot's extra record, one ``pwrite`` of the whole slot, and one
    ``fdatasync``; only then may what was signed leave. A slot counts only when
    its digest and its extra record's digest both verify: after a power loss
    during a write, any part of it may be on disk, but then the sync never
    completed and nothing signed after the previous state was sent, so the other
    slot (with its extra record, never written over) is the state to resume
    from. :meth:`load` returns the payload of the valid slot with the highest
    sequence number and :meth:`load_extra` its extra record (the node keeps the
    locked block there). Files written before the extra record existed read the
    same (their padding is a zero locator).

    Raises:
        SignStateError: from the constructor when the file exists but no slot
            verifies (the node must not guess what it signed last).
        OSError: the file cannot be created, read or synced.
    """

    SLOT_BYTES = 512
    MAGIC = b"CMSS"
    _HEAD = struct.Struct(">4sQH")
    _LOCATOR = struct.Struct(">QI16s")  # extra record: offset, length, BLAKE2b-128 of its bytes
    MAX_PAYLOAD_BYTES = SLOT_BYTES - 16 - _HEAD.size - _LOCATOR.size  # 454
    MAX_EXTRA_BYTES = 64 << 20
    EXTRA_ALIGN = 4096
    _NO_EXTRA = (0, 0, bytes(16))

    def __init__(self, path: Path) -> None:
        self.path = path
        created = not path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if created or os.fstat(self._fd).st_size == 0:
                os.pwrite(self._fd, bytes(2 * self.SLOT_BYTES), 0)
                os.fsync(self._fd)
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)  # the new file's name is durable too
                finally:
                    os.close(dir_fd)
            self._seq, self._payload, self._extra_at, self._extra = self._read()
        except BaseException:
            os.close(self._fd)
            raise

    @staticmethod
    def _digest(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=16).digest()

    def _slot(self, raw: bytes) -> tuple[int, bytes, tuple[int, int, bytes], bytes | None] | None:
        """``(seq, payload, locator, extra)`` of a slot whose digest and extra record verify."""
        if len(raw) != self.SLOT_BYTES or raw[:4] != self.MAGIC:
            return None
        if self._digest(raw[:-16]) != raw[-16:]:
            return None
        _, seq, length = self._HEAD.unpack_from(raw)
        if length > self.SLOT_BYTES - 16 - self._HEAD.size:
            return None
        start = self._HEAD.size
        # (a payload longer than MAX_PAYLOAD_BYTES was possible before the locator existed)
        at = self._LOCATOR.unpack_from(raw, start + length) if length <= self.MAX_PAYLOAD_BYTES else self._NO_EXTRA
        extra = None
        if at[1]:
            offset, size, digest = at
            if size > self.MAX_EXTRA_BYTES or offset < 2 * self.SLOT_BYTES:
                return None
            extra = os.pread(self._fd, size, offset)
            if len(extra) != size or self._digest(extra) != digest:
                return None  # its write never completed (so nothing signed under it left)
        return seq, raw[start:start + length], at, extra

    def _read(self) -> tuple[int, bytes | None, tuple[int, int, bytes], bytes | None]:
        data = os.pread(self._fd, 2 * self.SLOT_BYTES, 0)
        slots = [self._slot(data[k * self.SLOT_BYTES:(k + 1) * self.SLOT_BYTES]) for k in (0, 1)]
        valid = [s for s in slots if s is not None]
        if not valid:
            if any(data):
                raise SignStateError(f"{self.path}: no valid sign-state record (corrupt file); "
                                     "restore it or remove it only if this key never signed")
            return 0, None, self._NO_EXTRA, None
        return max(valid, key=lambda slot: slot[0])

    @property
    def seq(self) -> int:
        """How many times a payload was saved in this file (0: never; an older copy of the
        file has a smaller count)."""
        return self._seq

    def load(self) -> bytes | None:
        """The last saved payload, or None when nothing was ever saved."""
        return self._payload

    def load_extra(self) -> bytes | None:
        """The extra record saved with the last payload (verified by its digest), or None."""
        return self._extra

    def save(self, payload: bytes, extra: bytes | None = None) -> None:
        """Write ``payload`` (and ``extra``, an opaque record kept with it) durably
        (returns after ``fdatasync``).

        Raises:
            ValueError: ``payload`` is longer than :data:`MAX_PAYLOAD_BYTES` or ``extra``
                than :data:`MAX_EXTRA_BYTES`.
            OSError: a write or the sync failed (the caller must not send what it signed).
        """
        if len(payload) > self.MAX_PAYLOAD_BYTES:
            raise ValueError(f"sign state of {len(payload)} bytes > {self.MAX_PAYLOAD_BYTES}")
        if extra is not None and len(extra) > self.MAX_EXTRA_BYTES:
            raise ValueError(f"sign-state extra record of {len(extra)} bytes > {self.MAX_EXTRA_BYTES}")
        seq = self._seq + 1
        extra_at = self._NO_EXTRA
        if extra:
            if extra == self._extra:  # already on disk, synced with the last slot: point at it again
                extra_at = self._extra_at
            else:
                # the last slot (the state kept until this write is durable) may point at its
                # own extra record: never write over it
                offset = 2 * self.SLOT_BYTES
                kept_at, kept_len, _ = self._extra_at
                if kept_len and offset < kept_at + kept_len and kept_at < offset + len(extra):
                    offset = -(-(kept_at + kept_len) // self.EXTRA_ALIGN) * self.EXTRA_ALIGN
                written = os.pwrite(self._fd, extra, offset)
                if written != len(extra):
                    raise OSError(f"{self.path}: short write ({written} of {len(extra)} bytes)")
                extra_at = (offset, len(extra), self._digest(extra))
        body = self._HEAD.pack(self.MAGIC, seq, len(payload)) + payload + self._LOCATOR.pack(*extra_at)
        body += bytes(self.SLOT_BYTES - 16 - len(body))
        slot = body + self._digest(body)
        written = os.pwrite(self._fd, slot, (seq % 2) * self.SLOT_BYTES)
        if written != self.SLOT_BYTES:
            raise OSError(f"{self.path}: short write ({written} of {self.SLOT_BYTES} bytes)")
        os.fdatasync(self._fd)
        self._seq, self._payload, self._extra_at, self._extra = seq, payload, extra_at, (extra or None)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):  # already failed (the node halted on it)
                os.close(fd)
