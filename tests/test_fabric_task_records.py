"""Fabric task records survive a restart of the submitting node (node/fabric.py, store table
``fabric_tasks``): finished tasks show as before, a task running when the node stopped or was
killed is ``failed`` (``interrupted``), a store that refuses writes (disk full) is counted and
the task goes on in memory. Real SQLite, real nodes (in-process and an OS process killed with
SIGKILL), real WASM modules from agents/wasm/."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from fractions import Fraction
from pathlib import Path

import msgpack
import pytest

from chimera.node import admin
from chimera.node.config import NodeConfig
from chimera.node.fabric import INTERRUPTED_DETAIL
from chimera.node.store import TASK_RECORD_COLUMNS, Store, TaskRecords
from conftest import async_wait_until, wait_until
from fabric_helpers import reference_wordfreq, wasm
from test_fabric_node import FABRIC_FAST, call, start_nodes, stop_all

# a stdout of about 60 KB: the record of its result needs new database pages
WIDE_TEXT = b" ".join(b"w%05d" % k for k in range(6000))


async def test_finished_tasks_show_the_same_after_a_restart(node_factory, capsys):
    from chimera.node.cli import main

    async def task_status_text(node, task_id: str) -> tuple[int, str]:
        code = await asyncio.to_thread(main, ["task", "status", task_id, "--data-dir", str(node.data_dir)])
        return code, capsys.readouterr().out

    cfg = NodeConfig(**FABRIC_FAST)
    node = await node_factory("r", cfg)
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    ok = await call(node, "tasks_submit", {"module": wasm("wordfreq"), "input": b"b a b", "wait": True,
                                           "wait_s": 60})
    agreed_error = await call(node, "tasks_submit", {"module": wasm("hostile_loop"), "fuel": 100_000,
                                                     "wait": True, "wait_s": 60})
    unsatisfiable = await call(node, "tasks_submit", {"sha256": ok["module_sha256"], "gpus": 2, "wait": True})
    assert ok["state"] == "accepted" and ok["result"]["stdout"] == "2 b\n1 a\n", ok
    assert agreed_error["state"] == "failed" and agreed_error["failure"]["agreed"], agreed_error
    assert unsatisfiable["state"] == "failed" and unsatisfiable["failure"]["reason"] == "unsatisfiable"
    ids = [ok["task_id"], agreed_error["task_id"], unsatisfiable["task_id"]]
    before = {t: await call(node, "tasks_status", {"task_id": t}) for t in ids}
    listed = (await call(node, "tasks_status", {}))["tasks"]
    assert before[ok["task_id"]]["certificate"]["verified"] and before[ok["task_id"]]["latency_s"] > 0
    texts = {t: await task_status_text(node, t) for t in ids}
    assert texts[ok["task_id"]][0] == 0 and "2 b" in texts[ok["task_id"]][1]
    await node.stop()

    again = await node_factory("r", cfg)  # same data dir
    for t in ids:
        assert await call(again, "tasks_status", {"task_id": t}) == before[t]
    assert (await call(again, "tasks_status", {}))["tasks"] == listed
    assert {t: await task_status_text(again, t) for t in ids} == texts  # chimera task status: the same
    assert again.counters["fabric_task_records_unreadable"] == 0 and again.counters["fabric_tasks_interrupted"] == 0
    # numbering goes on after the restored tasks, and a new task is listed after them
    assert await async_wait_until(lambda: again.fabric.own is not None, 30)
    new = await call(again, "tasks_submit", {"sha256": ok["module_sha256"], "input": b"c", "wait": True})
    assert new["state"] == "accepted" and new["task_id"].startswith("t4-")
    assert [t["task_id"] for t in (await call(again, "tasks_status", {}))["tasks"]] == [*ids, new["task_id"]]


async def test_a_task_running_when_the_node_stops_is_failed_interrupted_after_the_restart(node_factory):
    cfg = NodeConfig(**FABRIC_FAST, fabric_resume_max_age_s=0)  # resumption off (tests/test_fabric_resume.py)
    node = await node_factory("i", cfg)
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    done = await call(node, "tasks_submit", {"module": wasm("wordfreq"), "input": b"x", "wait": True})
    looping = await call(node, "tasks_submit", {"module": wasm("hostile_loop"), "fuel": 2**62,
                                                "timeout_s": 600})
    assert looping["state"] == "running"
    assert await async_wait_until(lambda: node.fabric.running and node.fabric._runtime is not None
                                  and node.fabric._runtime.sandbox.calls_in_flight > 0, 60)
    await node.stop()  # the run is ended by the closing sandbox: no result is agreed

    again = await node_factory("i", cfg)
    view = await call(again, "tasks_status", {"task_id": looping["task_id"]})
    assert view["state"] == "failed", view
    assert view["failure"] == {"reason": "interrupted", "detail": INTERRUPTED_DETAIL, "agreed": False}
    assert "result" not in view and "certificate" not in view and view["finished_ms"] >= view["submitted_ms"]
    assert (await call(again, "tasks_status", {"task_id": done["task_id"]}))["state"] == "accepted"
    assert again.counters["fabric_tasks_interrupted"] == 1
    # the verdict is stored too: a second restart shows it without counting it again
    assert await async_wait_until(lambda: again.fabric.tasks[looping["task_id"]].saved is not None
                                  and again.fabric.tasks[looping["task_id"]].saved.done(), 30)
    await again.stop()
    third = await node_factory("i", cfg)
    assert await call(third, "tasks_status", {"task_id": looping["task_id"]}) == view
    assert third.counters["fabric_tasks_interrupted"] == 0


@pytest.mark.slow
def test_a_task_running_when_the_node_process_is_killed_shows_interrupted(tmp_path: Path):
    """SIGKILL of the submitting node's process while its task runs: the submission's record was
    durable before ``tasks_submit`` answered, and the restarted process reports the task failed."""
    from chimera.node.launcher import LocalNetwork

    net = LocalNetwork(tmp_path, 1, extra_args=["--set", "fabric_capacity_interval_s=0.3",
                                                "--set", "fabric_resume_max_age_s=0"])  # (else resumed)
    try:
        net.start()
        assert wait_until(lambda: net.query(0, "resources")["own"] is not None, timeout_s=60)
        done = net.query(0, "tasks_submit", {"module": wasm("wordfreq"), "input": b"a a", "wait": True})
        assert done["state"] == "accepted"
        looping = net.query(0, "tasks_submit", {"module": wasm("hostile_loop"), "fuel": 2**62, "timeout_s": 600})
        assert wait_until(lambda: net.query(0, "tasks_status", {})["fabric"]["tasks_running"] == 1, timeout_s=60)
        net.peers[0].kill()
        net.restart(0)
        view = net.query(0, "tasks_status", {"task_id": looping["task_id"]})
        assert view["state"] == "failed" and view["failure"]["reason"] == "interrupted", view
        again = net.query(0, "tasks_status", {"task_id": done["task_id"]})
        assert again["state"] == "accepted" and again["result"]["stdout"] == "2 a\n"
    finally:
        net.stop()


async def test_a_store_that_refuses_the_record_is_counted_and_the_task_goes_on(node_factory, caplog):
    node = await node_factory("full", NodeConfig(**FABRIC_FAST))
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    svc = node.fabric
    sha = await asyncio.to_thread(svc.modules.put, wasm("wordfreq"))
    db = svc._records.db  # (the writer is idle: nothing submitted yet)
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages}")  # SQLITE_FULL from the next new page
    caplog.set_level(logging.ERROR, logger="chimera.fabric.node")
    res = await call(node, "tasks_submit", {"sha256": sha, "input": WIDE_TEXT, "wait": True, "wait_s": 60})
    assert res["state"] == "accepted" and res["result"]["stdout"].encode() == reference_wordfreq(WIDE_TEXT)
    assert await async_wait_until(lambda: node.counters["fabric_task_record_errors"] >= 1, 30)
    assert any("could not write the record of task" in r.getMessage() and "full" in r.getMessage()
               for r in caplog.records)
    assert (await call(node, "tasks_status", {"task_id": res["task_id"]}))["state"] == "accepted"
    db.execute("PRAGMA max_page_count=1073741823")  # room again: the next records are written
    errors = node.counters["fabric_task_record_errors"]
    later = await call(node, "tasks_submit", {"sha256": sha, "input": WIDE_TEXT, "wait": True, "wait_s": 60})
    assert later["state"] == "accepted"
    rec = svc.tasks[later["task_id"]]
    assert await async_wait_until(lambda: rec.saved.done(), 30)
    assert node.counters["fabric_task_record_errors"] == errors


async def _two_finished_tasks(node_factory, name: str, cfg: NodeConfig):
    """A node named ``name`` that ran two accepted wordfreq tasks, then stopped: (node, first, second)."""
    node = await node_factory(name, cfg)
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    first = await call(node, "tasks_submit", {"module": wasm("wordfreq"), "input": b"a", "wait": True})
    second = await call(node, "tasks_submit", {"sha256": first["module_sha256"], "input": b"b", "wait": True})
    assert first["state"] == second["state"] == "accepted"
    await node.stop()
    return node, first, second


async def test_an_unreadable_record_is_skipped_and_counted(node_factory):
    cfg = NodeConfig(**FABRIC_FAST)
    node, first, second = await _two_finished_tasks(node_factory, "bad", cfg)
    db = sqlite3.connect(node.data_dir / "node.sqlite3")
    (blob,) = db.execute("SELECT certificate FROM fabric_tasks WHERE task_id=?", (first["task_id"],)).fetchone()
    cert = msgpack.unpackb(blob, raw=False)
    cert["votes"][0]["signature"] = bytes(64)  # a forged vote: the certificate no longer verifies
    db.execute("UPDATE fabric_tasks SET certificate=? WHERE task_id=?",
               (msgpack.packb(cert, use_bin_type=True), first["task_id"]))
    db.execute("UPDATE fabric_tasks SET history=x'c1' WHERE task_id=?", (second["task_id"],))  # not msgpack
    db.commit()
    db.close()
    again = await node_factory("bad", cfg)
    assert again.counters["fabric_task_records_unreadable"] == 2
    assert (await call(again, "tasks_status", {}))["tasks"] == []
    with pytest.raises(admin.AdminError):
        await call(again, "tasks_status", {"task_id": first["task_id"]})


def _record(task_id: str, seq: int, state: str) -> dict:
    row = dict.fromkeys(TASK_RECORD_COLUMNS)
    row.update(task_id=task_id, seq=seq, module_sha256="0" * 64, requirements=b"\x80", input_bytes=0,
               submitted_ms=seq, state=state, stdout=b"", history=b"\x80")
    return row


def test_the_store_keeps_the_newest_finished_records_and_every_running_one(tmp_path):
    Store(tmp_path).close()
    records = TaskRecords(tmp_path / "node.sqlite3")
    try:
        records.save(_record("stuck", 1, "running"), keep=3)
        for k in range(2, 7):
            records.save(_record(f"t{k}", k, "accepted"), keep=3)
        assert [r["task_id"] for r in records.load(10)] == ["stuck", "t5", "t6"]
        # a running record older than the newest `limit` is loaded too: a restart resumes or ends it
        assert [r["task_id"] for r in records.load(2)] == ["stuck", "t5", "t6"]
        assert [r["task_id"] for r in records.load(1)] == ["stuck", "t6"]
        records.save(_record("stuck", 1, "failed"), keep=3)  # its end: now it may go
        records.save(_record("t7", 7, "failed"), keep=3)
        assert [r["task_id"] for r in records.load(10)] == ["t5", "t6", "t7"]
        assert [r["task_id"] for r in records.load(2)] == ["t6", "t7"]
    finally:
        records.close()


def test_a_store_from_before_the_task_records_opens_and_gains_the_table(tmp_path):
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "node.sqlite3")
    db.execute("DROP TABLE fabric_tasks")  # the schema of a release without task records
    db.execute("INSERT INTO meta(key, value) VALUES('incarnation', 7)")
    db.commit()
    db.close()
    store = Store(tmp_path)
    try:
        assert store.get_meta("incarnation") == 7
        assert {row[1] for row in store.db.execute("PRAGMA table_info(fabric_tasks)")} == set(TASK_RECORD_COLUMNS)
    finally:
        store.close()


def _stored(data_dir: Path) -> dict[str, dict]:
    """The stored records of the node in ``data_dir`` by task id (a connection of the test's own)."""
    db = sqlite3.connect(data_dir / "node.sqlite3")
    try:
        rows = db.execute(f"SELECT {', '.join(TASK_RECORD_COLUMNS)} FROM fabric_tasks").fetchall()
    finally:
        db.close()
    return {row[0]: dict(zip(TASK_RECORD_COLUMNS, row)) for row in rows}


async def test_a_damaged_stored_threshold_is_rejected_at_once(node_factory):
    """A record whose threshold reads "1e10000000" held the node's start for seconds (Fraction
    computed a ten-million-digit integer on the event loop); it is now unreadable at once, and a
    real threshold still comes back."""
    cfg = NodeConfig(**FABRIC_FAST)
    node = await node_factory("th", cfg)
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    kept = await call(node, "tasks_submit", {"module": wasm("wordfreq"), "input": b"a", "threshold": "2/3",
                                             "wait": True})
    damaged = await call(node, "tasks_submit", {"sha256": kept["module_sha256"], "input": b"b", "wait": True})
    assert kept["state"] == damaged["state"] == "accepted"
    await node.stop()
    db = sqlite3.connect(node.data_dir / "node.sqlite3")
    (blob,) = db.execute("SELECT requirements FROM fabric_tasks WHERE task_id=?", (damaged["task_id"],)).fetchone()
    req = msgpack.unpackb(blob, raw=False)
    req["threshold"] = "1e10000000"
    db.execute("UPDATE fabric_tasks SET requirements=? WHERE task_id=?",
               (msgpack.packb(req, use_bin_type=True), damaged["task_id"]))
    db.commit()
    db.close()
    started = time.monotonic()
    again = await node_factory("th", cfg)
    assert time.monotonic() - started < 5.0  # (about 8 s before, on this machine)
    assert again.counters["fabric_task_records_unreadable"] == 1
    assert again.fabric.tasks[kept["task_id"]].req.threshold == Fraction(2, 3)
    assert [t["task_id"] for t in (await call(again, "tasks_status", {}))["tasks"]] == [kept["task_id"]]


async def test_task_numbers_go_on_after_an_unreadable_newest_record(node_factory):
    """The newest record is unreadable: its number is not given to the next task."""
    cfg = NodeConfig(**FABRIC_FAST)
    node, first, second = await _two_finished_tasks(node_factory, "seq", cfg)
    assert second["task_id"].startswith("t2-")
    db = sqlite3.connect(node.data_dir / "node.sqlite3")
    db.execute("UPDATE fabric_tasks SET history=x'c1' WHERE task_id=?", (second["task_id"],))
    db.commit()
    db.close()
    again = await node_factory("seq", cfg)
    assert again.counters["fabric_task_records_unreadable"] == 1
    assert await async_wait_until(lambda: again.fabric.own is not None, 30)
    new = await call(again, "tasks_submit", {"sha256": first["module_sha256"], "input": b"c", "wait": True})
    assert new["state"] == "accepted" and new["task_id"].startswith("t3-"), new["task_id"]


async def test_records_that_cannot_be_read_at_all_are_left_alone(node_factory, caplog, monkeypatch):
    """A read of the table that fails as a whole (an I/O error; stood in for by the read raising
    what SQLite raises, since a real one cannot be made here): the node starts without records,
    numbers its tasks after the stored ones and writes nothing to the table in this run (its
    trim, lowest numbers first, would otherwise delete what it cannot see)."""
    cfg = NodeConfig(**FABRIC_FAST)
    node = await node_factory("unread", cfg)
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    first = await call(node, "tasks_submit", {"module": wasm("wordfreq"), "input": b"a", "wait": True})
    second = await call(node, "tasks_submit", {"sha256": first["module_sha256"], "input": b"b", "wait": True})
    await node.stop()
    assert second["state"] == "accepted"

    def failing_load(self, limit: int) -> list[dict]:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(TaskRecords, "load", failing_load)
    raw = sqlite3.connect(node.data_dir / "node.sqlite3")
    raw.text_factory = bytes
    before = raw.execute("SELECT * FROM fabric_tasks ORDER BY seq").fetchall()
    caplog.set_level(logging.ERROR, logger="chimera.fabric.node")
    again = await node_factory("unread", cfg)
    assert again.counters["fabric_task_record_errors"] == 1 and again.fabric._records is None
    assert any("cannot read the task records" in r.getMessage() for r in caplog.records)
    assert (await call(again, "tasks_status", {}))["tasks"] == []
    assert await async_wait_until(lambda: again.fabric.own is not None, 30)
    new = await call(again, "tasks_submit", {"sha256": first["module_sha256"], "input": b"c", "wait": True})
    assert new["state"] == "accepted" and new["task_id"].startswith("t3-"), new["task_id"]
    await again.stop()  # (any write it had queued is done)
    try:
        assert raw.execute("SELECT * FROM fabric_tasks ORDER BY seq").fetchall() == before
    finally:
        raw.close()


async def test_a_record_with_a_text_value_that_is_not_utf8_is_skipped_alone(node_factory):
    """One text value that is not UTF-8 failed the read of every record (the node ran the whole
    session without records); now only that record is skipped and counted."""
    cfg = NodeConfig(**FABRIC_FAST)
    node, first, second = await _two_finished_tasks(node_factory, "utf8", cfg)
    db = sqlite3.connect(node.data_dir / "node.sqlite3")
    db.execute("UPDATE fabric_tasks SET failure_detail=CAST(x'ff' AS TEXT) WHERE task_id=?", (second["task_id"],))
    db.commit()
    db.close()
    again = await node_factory("utf8", cfg)
    assert again.fabric._records is not None and again.counters["fabric_task_records_unreadable"] == 1
    assert [t["task_id"] for t in (await call(again, "tasks_status", {}))["tasks"]] == [first["task_id"]]


async def test_an_interrupted_task_shows_where_it_was_dispatched(tmp_path):
    """The record of a running task follows its dispatches: the submission's record has the first
    one, a retry on the other peer is written when it is dispatched, and after a restart the
    interrupted task still shows both (it showed none: the record was written before them)."""
    from chimera.node.runtime import Node

    nodes = await start_nodes(tmp_path, [{}, {}], genesis=False)
    node, svc = nodes[0], nodes[0].fabric
    try:
        # loops until its 2 s wall time ends the attempt: deadline_exceeded, retried on the other peer
        res = await call(node, "tasks_submit", {"module": wasm("hostile_loop"), "fuel": 2**62, "timeout_s": 2})
        task_id = res["task_id"]
        stored = (await asyncio.to_thread(_stored, node.data_dir))[task_id]  # durable before the answer
        first = msgpack.unpackb(stored["history"], raw=False)["placement"]
        assert stored["state"] == "running" and [d["attempt"] for d in first] == [1], first
        rec = svc.tasks[task_id]
        assert await async_wait_until(lambda: len(rec.dispatches) >= 2, 60), rec.dispatches
        assert {d["peer_id"] for d in rec.dispatches} == {n.peer_id for n in nodes}
        assert await async_wait_until(lambda: task_id not in svc._placed and rec.saved.done(), 30)
        stored = (await asyncio.to_thread(_stored, node.data_dir))[task_id]
        assert stored["state"] == "running", "ended before the test looked: the retry's write was not checked"
        placed = msgpack.unpackb(stored["history"], raw=False)["placement"]
        assert placed == rec.dispatches[:len(placed)] and len(placed) >= 2, placed
        await node.stop()  # (the running attempts end with the nodes: no result is agreed)
    finally:
        await stop_all(nodes)
    again = Node(node.data_dir, NodeConfig(**FABRIC_FAST, fabric_resume_max_age_s=0), node.network)
    await again.start()
    try:
        view = await call(again, "tasks_status", {"task_id": task_id})
        assert view["failure"]["reason"] == "interrupted" and view["placement"] == placed, view
    finally:
        await again.stop()


@pytest.mark.slow
def test_task_submit_wait_names_the_task_when_the_node_dies(tmp_path: Path, capsys):
    """`chimera task submit --wait` while the node process is killed: the task id was printed when
    it was submitted and the error names it and how to look it up; after the restart `chimera task
    status ID` shows it interrupted, with where it had been dispatched. (Before, only `node closed
    the connection`: the operator had no id to ask about.)"""
    import re
    from concurrent.futures import ThreadPoolExecutor

    from chimera.node.cli import main
    from chimera.node.launcher import LocalNetwork
    from fabric_helpers import AGENTS

    net = LocalNetwork(tmp_path, 1, extra_args=["--set", "fabric_capacity_interval_s=0.3",
                                                "--set", "fabric_resume_max_age_s=0"])  # (else resumed)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        net.start()
        d = str(net.peers[0].data_dir)
        assert wait_until(lambda: net.query(0, "resources")["own"] is not None, timeout_s=60)
        peer_id = net.query(0, "resources")["peer_id"]
        waiting = pool.submit(main, ["task", "submit", str(AGENTS / "hostile_loop.wasm"), "--fuel", str(2**62),
                                     "--timeout-s", "600", "--wait", "--wait-s", "600", "--data-dir", d])
        assert wait_until(lambda: net.query(0, "tasks_status", {})["fabric"]["tasks_running"] == 1, timeout_s=60)
        # the CLI printed the id once the node answered the submission (a loaded machine can
        # run the task before that answer arrives: a kill then left the CLI no id to name)
        err: list[str] = []
        submitted = re.compile(r"^task (t1-[0-9a-f]{8}) submitted; waiting", re.M)
        assert wait_until(lambda: err.append(capsys.readouterr().err) or submitted.search("".join(err)),
                          timeout_s=60), err
        net.peers[0].kill()
        assert waiting.result(timeout=60) == 3
        out = "".join(err) + capsys.readouterr().err
        task_id = submitted.search(out).group(1)
        error = out.splitlines()[-1]
        assert error.startswith("chimera: ") and f"while waiting for task {task_id}" in error, error
        assert f"chimera task status {task_id} --data-dir {d}" in error, error
        net.restart(0)
        assert main(["task", "status", task_id, "--data-dir", d]) == 1
        shown = capsys.readouterr().out
        assert "failed: interrupted" in shown and f"attempt 1 -> {peer_id}" in shown, shown
        assert main(["task", "status", "--data-dir", d]) == 0  # the list: PEERS is where it ran, not -
        assert re.search(rf"{task_id} +failed +1 +{peer_id[:10]}", capsys.readouterr().out)
    finally:
        pool.shutdown(wait=False)
        net.stop()


async def test_tasks_status_waits_for_a_running_task_to_end(node_factory):
    """`tasks_status {task_id, wait_s}` answers when the task ends (what `chimera task submit
    --wait` uses after printing the task id: one call and one audit row, not a poll per 0.05-1 s)."""
    node = await node_factory("w", NodeConfig(**FABRIC_FAST))
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    from chimera.node.fabric import MAX_STATUS_WAITERS

    res = await call(node, "tasks_submit", {"module": wasm("hostile_loop"), "fuel": 2**62, "timeout_s": 5})
    task_id = res["task_id"]
    assert (await call(node, "tasks_status", {"task_id": task_id}))["state"] == "running"  # wait_s 0: at once
    waits = [asyncio.ensure_future(call(node, "tasks_status", {"task_id": task_id, "wait_s": 120}))
             for _ in range(MAX_STATUS_WAITERS)]
    assert await async_wait_until(lambda: node.fabric.status_waiters == MAX_STATUS_WAITERS, 30)
    # an observer's command: its waits must not fill the admin API's places; one more answers at once
    more = await call(node, "tasks_status", {"task_id": task_id, "wait_s": 120})
    assert more["state"] == "running" and not any(w.done() for w in waits), more
    for ended in await asyncio.gather(*waits):
        assert ended["state"] == "failed" and ended["failure"]["reason"] != "interrupted", ended
    with pytest.raises(admin.AdminError, match="wait_s"):
        await call(node, "tasks_status", {"task_id": task_id, "wait_s": 4000})
