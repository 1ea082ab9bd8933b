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

Writing: with ``background=True`` (the node's admin server) the rows are written by
one thread with its own connection to the store (``synchronous=FULL``), never on
the caller's event loop. Rows queued while a commit is in flight go into the next
single transaction (group commit), in the order they were queued; the future
returned by :meth:`AuditLog.submit` is resolved once its row is durable, or with
the SQLite error that kept it from being written. Without ``background`` (the
offline CLI, a database without a file) every row is written at once by the caller.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from .admin_keys import COMMAND_ROLES

log = logging.getLogger("chimera.audit")

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
BUSY_TIMEOUT_S = 5.0  # the writer waits at most this long for another connection's write lock
DURABLE_WAIT_S = 8.0  # a caller waits at most this long for its row (below the clients' 10 s timeout)
CLOSE_WAIT_S = 10.0  # close() waits at most this long for the rows still queued

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


class AuditError(Exception):
    """An audit row or read did not complete within its deadline (a hung disk, a wedged
    writer). SQLite's own failures arrive as :class:`sqlite3.Error`."""


@dataclass(slots=True)
class _Window:
    start_ms: int
    row_id: int | None = None  # set by the writer once the window's row is inserted
    more: int = 0  # requests counted after the row was written


@dataclass(slots=True)
class _Insert:
    values: tuple
    window: _Window | None
    future: Future


@dataclass(slots=True)
class _Read:
    limit: int
    future: Future


@dataclass(slots=True)
class _Stop:
    future: Future


def _future() -> Future:
    fut: Future = Future()
    fut.set_running_or_notify_cancel()  # a waiter giving up (asyncio.wait_for) cannot cancel the write
    return fut


def _file_of(db: sqlite3.Connection) -> str | None:
    """The file of ``db``'s main database; None for ``:memory:`` or a temporary one."""
    for _seq, name, path in db.execute("PRAGMA database_list"):
        if name == "main":
            return path or None
    return None


def wait(future: Future | None, timeout_s: float = DURABLE_WAIT_S):
    """Block until ``future`` (from :meth:`AuditLog.submit` or :meth:`AuditLog.read`) is done.

    Returns its result (None for a row).

    Raises:
        sqlite3.Error: the store refused the write or read.
        AuditError: not done within ``timeout_s`` seconds.
    """
    if future is None:
        return None
    try:
        return future.result(timeout_s)
    except FutureTimeout:
        raise AuditError(f"the audit log did not answer within {timeout_s:g} s") from None


class AuditLog:
    """Append-only audit rows in the store.

    Args:
        db: the node's connection (the table is created and pruned through it at once).
        background: write through a dedicated thread with its own connection to the same
            file (ignored for a database without a file: rows are then written at once).
    """

    def __init__(self, db: sqlite3.Connection, *, background: bool = False) -> None:
        self.db = db
        db.executescript(_SCHEMA)
        if "count" not in {row[1] for row in db.execute("PRAGMA table_info(admin_audit)")}:
            db.execute("ALTER TABLE admin_audit ADD COLUMN count INTEGER NOT NULL DEFAULT 1")
        self._appended = 0  # rows inserted (by the writer), for PRUNE_EVERY
        self._windows: dict[str, _Window] = {}  # aggregation source -> its open row
        self._lock = threading.Lock()  # guards _windows and _queue: callers and the writer
        self._queue: queue.SimpleQueue | None = None  # None: rows are written by the caller
        self.write_db = db  # the connection rows are written through
        self._thread: threading.Thread | None = None
        self.prune()  # a restarted node (or the offline CLI) prunes too: not only every PRUNE_EVERY appends
        path = _file_of(db) if background else None
        if path is not None:
            self.write_db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                                            check_same_thread=False)
            self.write_db.execute("PRAGMA synchronous=FULL")  # per connection: as durable as the store's
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ callers

    def submit(self, *, at_ms: int, who: str, transport: str, role: str, command: str,
               args: object, result: str, duration_s: float, aggregate: str | None = None) -> Future | None:
        """Queue one row; returns a future resolved (result None) once it is durable, or with the
        :class:`sqlite3.Error` that kept it out. Never blocks on the disk in background mode.

        With ``aggregate`` (the request's source), a request within :data:`AGGREGATE_WINDOW_MS`
        of the last row written for that source only adds one to that row's ``count`` and
        None is returned: the count is written when the window is over (background mode:
        by wall clock, at most about a second later; else at the next row), or at
        :meth:`read` or :meth:`close`.
        """
        with self._lock:
            ops: list = self._close_windows(at_ms) if self._windows else []
            window = None
            if aggregate is not None:
                if aggregate not in self._windows and len(self._windows) >= MAX_OPEN_AGGREGATES:
                    aggregate, who = "(other sources)", f"{who[:100]} and other sources"
                window = self._windows.get(aggregate)
                if window is not None:
                    window.more += 1
                    self._run_ops(ops)
                    return None
                window = self._windows[aggregate] = _Window(at_ms)
            fut = _future()  # (the args are encoded only for a row written: not for a counted one)
            ops.append(_Insert((at_ms, who[:200], transport, role, command[:80], args_json(command, args), result[:500],
                                round(duration_s, 6)), window, fut))
            self._run_ops(ops)
        return fut

    def append(self, *, at_ms: int, who: str, transport: str, role: str, command: str,
               args: object, result: str, duration_s: float, aggregate: str | None = None) -> None:
        """:meth:`submit` and wait until the row is durable (blocking; for the offline CLI).

        Raises:
            sqlite3.Error: the store refused the row.
            AuditError: the writer did not finish within :data:`DURABLE_WAIT_S`.
        """
        wait(self.submit(at_ms=at_ms, who=who, transport=transport, role=role, command=command, args=args,
                         result=result, duration_s=duration_s, aggregate=aggregate))

    def read(self, limit: int = 50) -> Future:
        """The newest ``limit`` rows, oldest first, as a future (after every row queued before,
        with the counts of open aggregated rows written first)."""
        fut = _future()
        with self._lock:
            self._run_ops([*self._close_windows(None), _Read(limit, fut)])
        return fut

    def rows(self, limit: int = 50) -> list[dict]:
        """The newest ``limit`` rows, oldest first (blocking).

        Raises:
            sqlite3.Error: the store could not be read.
            AuditError: no answer within :data:`DURABLE_WAIT_S`.
        """
        return wait(self.read(limit))

    def close(self) -> Future:
        """Write the open counts and every queued row, then close the writer's connection.

        Returns a future resolved once that is done (with the SQLite error if the last
        commit failed). Rows submitted afterwards are written at once through ``db``.
        """
        fut = _future()
        with self._lock:
            ops = self._close_windows(None)
            if self._queue is None:
                self._run_ops(ops)
                fut.set_result(None)
            else:
                self._run_ops([*ops, _Stop(fut)])
        return fut

    @property
    def pending(self) -> int:
        """Operations queued for the writer and not yet taken (0 without a writer)."""
        q = self._queue
        return 0 if q is None else q.qsize()

    def prune(self) -> None:
        """Keep the newest :data:`MAX_CHANGE_ROWS` changes, :data:`MAX_READ_ROWS` reads and
        :data:`MAX_OTHER_ROWS` other rows; each bucket is pruned on its own (through ``db``)."""
        self._prune(self.db)

    # ------------------------------------------------------------ internals

    def _close_windows(self, now_ms: int | None) -> list:
        """Close the windows that are over at ``now_ms`` (None: all); their count updates."""
        ops = []
        for source, window in list(self._windows.items()):
            if now_ms is None or not window.start_ms <= now_ms < window.start_ms + AGGREGATE_WINDOW_MS:
                del self._windows[source]
                if window.more:  # (closed: its count no longer changes)
                    ops.append(window)
        return ops

    def _run_ops(self, ops: list) -> None:
        """Queue ``ops`` for the writer, or apply them now without one (under ``_lock``)."""
        if not ops:
            return
        if self._queue is not None:
            for op in ops:
                self._queue.put(op)
        else:
            self._apply(self.write_db, ops)

    def _prune(self, conn: sqlite3.Connection) -> None:
        reads = [cmd for cmd, role in COMMAND_ROLES.items() if role == "observer"]
        caps = {"change": MAX_CHANGE_ROWS, "read": MAX_READ_ROWS, "other": MAX_OTHER_ROWS}
        for bucket, (where, params) in _bucket_sql(reads).items():
            conn.execute(f"DELETE FROM admin_audit WHERE id IN (SELECT id FROM admin_audit WHERE {where} "
                         "ORDER BY id DESC LIMIT -1 OFFSET ?)", (*params, caps[bucket]))

    def _apply(self, conn: sqlite3.Connection, ops: list) -> Exception | None:
        """Write ``ops`` in one transaction; resolve their futures after the commit (or fail
        them all with the error). Returns that error (None: committed); never raises."""
        done: list[tuple[Future, object]] = []
        inserted: list[_Window] = []
        own = not conn.in_transaction
        try:
            if own:
                conn.execute("BEGIN IMMEDIATE")
            for op in ops:
                if isinstance(op, _Insert):
                    cur = conn.execute(
                        "INSERT INTO admin_audit(at_ms, who, transport, role, command, args, result, duration_s) "
                        "VALUES(?,?,?,?,?,?,?,?)", op.values)
                    if op.window is not None:
                        op.window.row_id = cur.lastrowid
                        inserted.append(op.window)
                    self._appended += 1
                    if self._appended % PRUNE_EVERY == 0:
                        self._prune(conn)
                    done.append((op.future, None))
                elif isinstance(op, _Window):  # a closed window's count
                    if op.row_id is not None:  # None: its row was lost with a failed commit
                        conn.execute("UPDATE admin_audit SET count = count + ? WHERE id=?", (op.more, op.row_id))
                elif isinstance(op, _Read):
                    done.append((op.future, _read_rows(conn, op.limit)))
            if own:
                conn.execute("COMMIT")
        except Exception as exc:
            if own and conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            for window in inserted:
                window.row_id = None
            lost = sum(isinstance(op, _Insert) for op in ops)
            counts = sum(op.more for op in ops if isinstance(op, _Window))
            log.error("audit log write failed (%s rows, %s aggregated counts not written): %s", lost, counts, exc)
            for op in ops:
                if isinstance(op, (_Insert, _Read)):
                    _settle(op.future, exc=exc)
            return exc
        for fut, value in done:
            _settle(fut, value)
        return None

    def _next_expiry_s(self) -> float | None:
        """Seconds until the first open window is over (None: none open)."""
        with self._lock:
            if not self._windows:
                return None
            end_ms = min(w.start_ms for w in self._windows.values()) + AGGREGATE_WINDOW_MS
        return min(max((end_ms - time.time_ns() // 1_000_000) / 1000, 0.001), AGGREGATE_WINDOW_MS / 1000)

    def _run(self) -> None:
        """The writer thread: group commits until a stop, then the rows queued meanwhile."""
        q = self._queue
        assert q is not None
        stop: _Stop | None = None
        error = None  # of the last commit: the stop's result
        while stop is None:
            try:
                first = q.get(timeout=self._next_expiry_s())
            except queue.Empty:  # an aggregated row's second is over: write its count
                with self._lock:
                    for op in self._close_windows(time.time_ns() // 1_000_000):
                        q.put(op)
                continue
            batch = [first]
            while True:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            stop = next((op for op in batch if isinstance(op, _Stop)), None)
            if stop is not None:  # resolved last: after its connection is closed
                batch.remove(stop)
            if batch:
                error = self._apply(self.write_db, batch)
        with self._lock:  # callers wait here: nothing queued can be left behind
            rest = []
            while True:
                try:
                    rest.append(q.get_nowait())
                except queue.Empty:
                    break
            if rest:
                error = self._apply(self.write_db, rest)
            try:
                self.write_db.close()
            except sqlite3.Error:
                pass
            self.write_db, self._queue = self.db, None  # from now on the caller writes
        _settle(stop.future, exc=error)


def _read_rows(conn: sqlite3.Connection, limit: int) -> list[dict]:
    rows = conn.execute(
        "SELECT id, at_ms, who, transport, role, command, args, result, duration_s, count FROM admin_audit "
        "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()[::-1]
    return [{"id": i, "at_ms": t, "who": w, "transport": tr, "role": r, "command": c,
             "args": json.loads(a), "result": res, "duration_s": d, "count": n}
            for i, t, w, tr, r, c, a, res, d, n in rows]


def _settle(fut: Future, value: object = None, exc: BaseException | None = None) -> None:
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
    except Exception:  # already settled
        pass
