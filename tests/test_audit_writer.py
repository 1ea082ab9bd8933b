"""The audit log's writer thread: an answered request is on disk, rows keep their order,
a slow or failing disk never stalls the event loop nor hangs a request, and stopping
the node (SIGTERM) writes everything still queued. Real AdminServer, real store (WAL,
synchronous=FULL), real SQLite locks held from a second connection."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from pathlib import Path

import msgpack

from chimera.node import admin, audit
from chimera.node.admin import AdminServer
from chimera.node.admin_keys import generate_key, sign_request
from chimera.node.launcher import LocalNetwork
from chimera.node.store import Store
from tests.conftest import async_wait_until

NODE = "sha256:node"


def _server(tmp_path: Path, ran: list | None = None) -> tuple[AdminServer, Path]:
    ran = [] if ran is None else ran

    async def propose(args: dict) -> dict:
        await asyncio.sleep(random.random() * 0.01)  # handlers finish out of order
        ran.append(args.get("i"))
        return {"i": args.get("i")}

    async def status(args: dict) -> dict:
        ran.append("status")
        return {"ok": 1}

    store = Store(tmp_path)  # the node's own store: WAL, synchronous=FULL
    server = AdminServer(tmp_path / "admin.sock", {"propose": propose, "status": status}, db=store.db,
                         node_fingerprint=NODE)
    return server, store.path


def _request(cmd: str, args: dict | None = None) -> bytes:
    return msgpack.packb({"cmd": cmd, "args": args or {}}, use_bin_type=True)


def _locker(path: Path) -> sqlite3.Connection:
    """Another connection holding the database's write lock (as a long commit elsewhere would)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def _on_disk(path: Path, sql: str, params: tuple = ()) -> list:
    """What a fresh connection (another process after a crash) reads."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def test_every_answered_request_is_on_disk_and_rows_keep_their_order(tmp_path: Path):
    ran: list = []
    server, path = _server(tmp_path, ran)
    missing = []

    async def one(i: int) -> None:
        reply, _ = await server.dispatch(_request("propose", {"i": i}), "local")
        assert reply == {"ok": True, "result": {"i": i}}
        # answered: its row is committed, visible to any other connection
        if not _on_disk(path, "SELECT 1 FROM admin_audit WHERE args=?", (f'{{"i":{i}}}',)):
            missing.append(i)

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(300))), 60)
    assert missing == []
    rows = _on_disk(path, "SELECT command, args, result FROM admin_audit ORDER BY id")
    assert [r[2] for r in rows] == ["ok"] * 300
    assert [json.loads(r[1])["i"] for r in rows] == ran  # the order the requests finished in
    assert sorted(ran) == list(range(300)) and ran != list(range(300))  # (they did finish out of order)
    await server.close()


async def test_rows_queued_during_a_commit_share_the_next_transaction(tmp_path: Path):
    ran: list = []
    server, path = _server(tmp_path, ran)
    commits = []
    server.audit.write_db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    locker = _locker(path)
    tasks = [asyncio.ensure_future(server.dispatch(_request("propose", {"i": i}), "local")) for i in range(50)]
    # all 50 ran: the writer holds the first few in a transaction waiting for the lock, the rest are queued
    assert await async_wait_until(lambda: len(ran) == 50 and server.audit.pending > 0, timeout_s=30)
    locker.execute("COMMIT")
    replies = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert all(reply["ok"] for reply, _ in replies)
    assert len(commits) <= 2, commits  # 50 rows: the one that met the lock, then one group commit
    assert _on_disk(path, "SELECT count(*) FROM admin_audit") == [(50,)]
    await server.close()


async def test_the_event_loop_is_served_while_a_commit_waits_for_the_disk(tmp_path: Path):
    ran: list = []
    server, path = _server(tmp_path, ran)
    locker = _locker(path)  # the audit row of the next request cannot be committed for now
    try:
        slow = asyncio.ensure_future(server.dispatch(_request("propose", {"i": 1}), "local"))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.ensure_future(ticker())
        assert await async_wait_until(lambda: 1 in ran, timeout_s=10)  # the command ran; its row waits
        status = asyncio.ensure_future(server.dispatch(_request("status"), "local"))
        assert await async_wait_until(lambda: "status" in ran and ticks >= 20, timeout_s=10)
        assert not slow.done() and not status.done()  # answers wait for their rows, the loop does not
        tick_task.cancel()
    finally:
        locker.execute("COMMIT")
    (first, _), (second, _) = await asyncio.wait_for(asyncio.gather(slow, status), 30)
    assert first["ok"] and second["ok"]
    assert _on_disk(path, "SELECT command FROM admin_audit ORDER BY id") == [("propose",), ("status",)]
    await server.close()


async def test_a_full_disk_answers_the_commands_own_result_flagged_and_the_log_recovers(tmp_path: Path):
    """A change that ran is answered with its own result plus ``audit_failure`` (an error in its
    place made `task submit --wait` lose the task id, and the operator submit it again); its
    row is not in the log; the next request's row is written once there is room again."""
    ran: list = []
    server, path = _server(tmp_path, ran)
    big = {"note": "x" * 200}
    reply, _ = await server.dispatch(_request("propose", {"i": 0, **big}), "local")
    assert reply == {"ok": True, "result": {"i": 0}}
    pages = server.audit.write_db.execute("PRAGMA page_count").fetchone()[0]
    server.audit.write_db.execute(f"PRAGMA max_page_count={pages}")  # SQLITE_FULL from the next new page
    failed = None
    for i in range(1, 200):
        reply, _ = await asyncio.wait_for(server.dispatch(_request("propose", {"i": i, **big}), "local"), 30)
        if "audit_failure" in reply:
            failed = (i, reply)
            break
        assert reply == {"ok": True, "result": {"i": i}}
    assert failed is not None, "the database never filled up"
    i, reply = failed
    assert i in ran and reply["ok"] and reply["result"] == {"i": i}, reply  # the command's own answer
    assert "database or disk is full" in reply["audit_failure"], reply
    # a request that fails is answered with its own error and code, flagged the same way
    reply, _ = await asyncio.wait_for(server.dispatch(_request("nope", {"note": "x" * 400}), "local"), 30)
    assert reply["code"] == admin.EXIT_USAGE and reply["error"].startswith("unknown command 'nope'"), reply
    assert "database or disk is full" in reply["audit_failure"], reply
    server.audit.write_db.execute("PRAGMA max_page_count=1073741823")
    reply, _ = await server.dispatch(_request("propose", {"i": 999}), "local")
    assert reply == {"ok": True, "result": {"i": 999}}
    logged = [json.loads(a)["i"] for (a,) in _on_disk(path, "SELECT args FROM admin_audit WHERE command='propose' "
                                                            "ORDER BY id")]
    assert i not in logged and logged[-1] == 999
    assert _on_disk(path, "SELECT count(*) FROM admin_audit WHERE command='nope'") == [(0,)]
    await server.close()


async def test_a_store_locked_past_the_busy_timeout_is_flagged_not_a_hang(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(audit, "BUSY_TIMEOUT_S", 0.2)
    ran: list = []
    server, path = _server(tmp_path, ran)
    locker = _locker(path)
    try:
        reply, _ = await asyncio.wait_for(server.dispatch(_request("propose", {"i": 1}), "local"), 30)
        assert reply["result"] == {"i": 1} and "database is locked" in reply["audit_failure"], reply
    finally:
        locker.execute("COMMIT")
    reply, _ = await server.dispatch(_request("propose", {"i": 2}), "local")
    assert reply == {"ok": True, "result": {"i": 2}}
    assert _on_disk(path, "SELECT args FROM admin_audit") == [('{"i":2}',)]  # the first is not on record
    await server.close()


async def test_a_read_is_answered_and_flagged_when_its_row_cannot_be_written(tmp_path: Path, monkeypatch, capsys):
    """On a full or locked disk `status` must still answer: it is how the operator sees why."""
    monkeypatch.setattr(audit, "BUSY_TIMEOUT_S", 0.2)
    monkeypatch.setattr(admin, "_audit_warned", set())  # this test's own process, for the warning
    ran: list = []
    server, path = _server(tmp_path, ran)
    locker = _locker(path)
    try:
        reply, _ = await asyncio.wait_for(server.dispatch(_request("status"), "local"), 30)
    finally:
        locker.execute("COMMIT")
    assert reply["ok"] and "status" in ran, reply
    assert "database is locked" in reply["audit_failure"], reply
    assert admin._result(reply) == reply["result"]  # the client returns the result and warns on stderr
    assert "could not record this request in its audit log: OperationalError: database is locked" \
        in capsys.readouterr().err
    await server.close()


async def test_a_refusal_count_is_written_when_its_second_is_over(tmp_path: Path):
    server, path = _server(tmp_path)
    for _ in range(5):
        reply, _ = await server.dispatch(_request("status"), "remote", address="203.0.113.9")
        assert reply["code"] == admin.EXIT_REFUSED
    # nobody reads the log and no other request comes: the count still reaches the disk
    assert await async_wait_until(lambda: _on_disk(path, "SELECT sum(count) FROM admin_audit") == [(5,)],
                                  timeout_s=10)
    await server.close()


async def test_close_writes_every_queued_row_and_open_count(tmp_path: Path):
    ran: list = []
    server, path = _server(tmp_path, ran)
    locker = _locker(path)
    tasks = [asyncio.ensure_future(server.dispatch(_request("propose", {"i": i}), "local")) for i in range(40)]
    # refusals: one row, the count of the other six held in memory for the rest of the second
    refusals = [asyncio.ensure_future(server.dispatch(_request("status"), "remote", address="198.51.100.7"))
                for _ in range(7)]
    # every row is queued, or held by the writer's transaction that waits for the lock
    assert await async_wait_until(lambda: len(ran) == 40 and sum(t.done() for t in refusals) == 6
                                  and server.audit.pending > 0, timeout_s=30)
    closing = asyncio.ensure_future(server.close())
    await asyncio.sleep(0.05)
    locker.execute("COMMIT")
    await asyncio.wait_for(closing, 30)
    assert all(reply["ok"] for reply, _ in await asyncio.gather(*tasks))
    assert {reply["code"] for reply, _ in await asyncio.gather(*refusals)} == {admin.EXIT_REFUSED}
    assert _on_disk(path, "SELECT count(*), sum(count) FROM admin_audit") == [(41, 47)]


def test_sigterm_writes_the_rows_still_queued(tmp_path: Path):
    network = LocalNetwork(tmp_path / "net", 1)
    peer = network.peers[0]
    try:
        network.start()
        key = generate_key()  # an unknown key: every request is refused, one row per second with a count
        node = admin.node_fingerprint_of(peer.data_dir)
        client = admin.LocalClient(peer.data_dir / admin.SOCKET_NAME)
        for _ in range(20):
            reply = client.send_raw(msgpack.packb(sign_request(key, node, "status", {}), use_bin_type=True))
            assert reply["code"] == admin.EXIT_REFUSED
        network.query(0, "status")
        peer.terminate()
        assert peer.stop(timeout_s=30) == 0
    finally:
        network.stop()
    db = peer.data_dir / "node.sqlite3"
    refused = _on_disk(db, "SELECT sum(count) FROM admin_audit WHERE result LIKE 'refused%'")
    assert refused == [(20,)]
    assert _on_disk(db, "SELECT count(*) FROM admin_audit WHERE command='status' AND result='ok'")[0][0] >= 2


def test_close_reports_the_failed_commit_of_the_rows_before_it(tmp_path: Path, monkeypatch):
    """close() promises the error of the last commit: rows taken in the same batch as the stop
    (or just before it) that could not be committed were reported as a clean close."""
    monkeypatch.setattr(audit, "BUSY_TIMEOUT_S", 0.2)
    store = Store(tmp_path)
    log = audit.AuditLog(store.db, background=True)
    locker = _locker(store.path)
    try:
        row = log.submit(at_ms=1, who="local", transport="local", role="admin", command="propose",
                         args={"i": 1}, result="ok", duration_s=0.0)
        closed = log.close()
        assert isinstance(closed.exception(30), sqlite3.OperationalError)
        assert isinstance(row.exception(30), sqlite3.OperationalError)  # (the row's own error too)
    finally:
        locker.execute("COMMIT")
        store.db.close()
