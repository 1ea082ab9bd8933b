"""What an operator sees when the node's disk fills up or a handler meets the machine's
trouble: every admin answer is the command's own (flagged ``audit_failure`` when its
audit row could not be written; the clients warn once per process and keep the flag in
``--json``), a handler's OSError is one line, a start on a full disk says so (the store
is intact: no "move it away"), and the remote admin API's ZAP errors reach ``status``.

The end-to-end test fills a real tmpfs (root only: skipped where mounting is refused)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from chimera.node import admin, audit
from chimera.node.admin import EXIT_FAIL, EXIT_USAGE, AdminError, AdminServer
from chimera.node.config import NodeConfig
from chimera.node.launcher import LocalNetwork
from chimera.node.store import Store
from tests.conftest import FAST, async_wait_until, wait_until
from tests.test_audit_writer import _locker, _request

CHIMERA = str(Path(sys.executable).with_name("chimera"))
WARNING = "warning: the node could not record this request in its audit log"
PROCESS_FAST = ["--set", "fabric=false", "--set", "consensus_commit_wait_s=0.05",
                "--set", "consensus_propose_timeout_s=1", "--set", "consensus_vote_timeout_s=0.5"]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Each test is one 'process' for the once-per-process audit warning."""
    monkeypatch.setattr(admin, "_audit_warned", set())
    monkeypatch.setattr(admin, "_audit_noted", [])


# ------------------------------------------------- clients: warn once, keep the flag


def test_the_client_warns_once_per_reason_and_raises_the_nodes_own_error(capsys):
    full = "OperationalError: database or disk is full"
    replies = [{"ok": True, "result": 1, "audit_failure": full},
               {"ok": True, "result": 2, "audit_failure": full},
               {"ok": False, "error": "unknown command 'x'", "code": EXIT_USAGE, "audit_failure": full},
               {"ok": True, "result": 4, "audit_failure": "no commit within 8 s"},
               {"ok": True, "result": 5}]
    got = []
    for reply in replies:
        try:
            got.append(admin._result(reply))
        except AdminError as exc:
            got.append((str(exc), exc.code))
    assert got == [1, 2, ("unknown command 'x'", EXIT_USAGE), 4, 5]
    err = capsys.readouterr().err
    assert err.count(WARNING) == 2, err  # one per distinct reason, not one per reply
    assert f"{WARNING}: {full}\n" in err and f"{WARNING}: no commit within 8 s\n" in err
    assert admin.take_audit_failures() == f"{full}; no commit within 8 s"
    assert admin.take_audit_failures() is None  # taken: the next document does not repeat it


async def test_the_shell_json_document_keeps_audit_failure(tmp_path: Path, monkeypatch, capsys):
    """A real AdminServer on its socket, its store locked past the audit's busy timeout; the
    shell (real LocalClient, in a thread) prints each answer with the node's flag."""
    from chimera.node.shell import Shell

    monkeypatch.setattr(audit, "BUSY_TIMEOUT_S", 0.2)

    async def status(args: dict) -> dict:
        return {"height": 7}

    async def drain(args: dict) -> dict:
        raise AdminError("consensus halted: the store refused a write", EXIT_FAIL)

    store = Store(tmp_path)
    server = AdminServer(tmp_path / admin.SOCKET_NAME, {"status": status, "drain": drain}, db=store.db,
                         node_fingerprint="sha256:node")
    await server.start()
    locker = _locker(store.path)
    try:
        out = io.StringIO()
        shell = Shell(admin.LocalClient(tmp_path / admin.SOCKET_NAME, timeout_s=30), json_output=True, out=out)
        codes = [await asyncio.to_thread(shell.execute, line) for line in ("status", "drain", "status")]
    finally:
        locker.execute("COMMIT")
        await server.close()
        store.close()
    assert codes == [0, EXIT_FAIL, 0]
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [d["ok"] for d in docs] == [True, False, True], docs
    assert docs[0]["result"] == {"height": 7} and docs[2]["result"] == {"height": 7}
    assert docs[1]["error"] == "consensus halted: the store refused a write" and docs[1]["code"] == EXIT_FAIL
    assert all("database is locked" in d["audit_failure"] for d in docs), docs
    assert capsys.readouterr().err.count(WARNING) == 1


# --------------------------------------------- a handler's OSError is no internal error


async def test_a_handlers_oserror_is_one_line_and_a_bug_is_still_an_internal_error(tmp_path: Path, caplog):
    async def deploy(args: dict) -> dict:
        with open("/dev/full", "wb", buffering=0) as f:  # a real ENOSPC
            f.write(b"module")
        return {}

    async def save(args: dict) -> dict:
        (tmp_path / "gone" / "x.wasm").write_bytes(b"module")  # a real ENOENT, with its path
        return {}

    async def buggy(args: dict) -> dict:
        return 1 // 0

    server = AdminServer(tmp_path / admin.SOCKET_NAME, {"agents_deploy": deploy, "save": save, "buggy": buggy})
    caplog.set_level(logging.INFO, logger="chimera")
    reply, _ = await server.dispatch(_request("agents_deploy"), "local")
    assert reply == {"ok": False, "error": "agents_deploy: No space left on device", "code": EXIT_FAIL}
    reply, _ = await server.dispatch(_request("save"), "local")
    assert reply == {"ok": False, "error": f"save: No such file or directory ({tmp_path / 'gone' / 'x.wasm'})",
                     "code": EXIT_FAIL}
    records = [r for r in caplog.records if "agents_deploy" in r.getMessage() or "save" in r.getMessage()]
    assert records and all(r.levelno == logging.ERROR and r.exc_info is None for r in records), records
    caplog.clear()
    reply, _ = await server.dispatch(_request("buggy"), "local")
    assert reply["code"] == EXIT_FAIL and reply["error"].startswith("internal error in buggy: ZeroDivisionError")
    assert any(r.exc_info is not None for r in caplog.records)  # a bug keeps its traceback


# ------------------------------------------------------- starting on a full disk


def test_a_store_that_cannot_grow_is_a_full_disk_not_a_damaged_store(tmp_path: Path):
    """SQLite's own SQLITE_FULL (a database that reached max_page_count) while the stored
    state is read: the operator is told to free space, not to move the intact store away."""
    from chimera.node.runtime import NodeStartError, _reading_stored_state

    conn = sqlite3.connect(tmp_path / "node.sqlite3")
    conn.execute("CREATE TABLE t(x)")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(NodeStartError) as caught:
        with _reading_stored_state(tmp_path):
            conn.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
    conn.close()
    message = str(caught.value)
    assert message.startswith(f"the disk holding {tmp_path} is full (")
    assert "database or disk is full" in message and message.endswith("free space and start the node again")
    assert "move it away" not in message and "restore" not in message
    (tmp_path / "node.sqlite3").write_bytes(b"\x00garbage" * 512)  # a damaged store is still one
    with pytest.raises(NodeStartError, match="cannot be read.*move it away"):
        with _reading_stored_state(tmp_path):
            sqlite3.connect(tmp_path / "node.sqlite3").execute("SELECT * FROM sqlite_master").fetchall()


@contextlib.contextmanager
def _small_disk(path: Path, size: str):
    """A real tmpfs of ``size`` at ``path`` (root only; skips where mounting is refused)."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # a straggler holds a file


def _fill(path: Path) -> Path:
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == 28, exc
        try:
            while True:  # the last pages
                f.write(b"\0" * 512)
        except OSError:
            pass
    return filler


def _cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([CHIMERA, *args], capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)


def test_a_node_on_a_full_disk_answers_its_commands_and_says_why_it_cannot_start(tmp_path: Path):
    with _small_disk(tmp_path / "disk", "24m") as disk:
        network = LocalNetwork(disk / "net", 1, extra_args=PROCESS_FAST)
        data_dir = network.peers[0].data_dir
        try:
            network.start()
            assert wait_until(lambda: network.query(0, "status")["consensus"]["height"] >= 1, timeout_s=60)
            filler = _fill(disk)
            # reads: the answer, one warning however many calls the command makes
            peers = _cli("peers", "--data-dir", str(data_dir))
            assert peers.returncode == 0, peers.stderr
            assert peers.stderr.count(WARNING) == 1 and "full" in peers.stderr, peers.stderr
            status = _cli("status", "--json", "--data-dir", str(data_dir))
            doc = json.loads(status.stdout)
            assert status.returncode == 0 and doc["ok"] and doc["result"]["peer_id"], status
            assert "full" in doc["audit_failure"], doc
            shell = _cli("shell", "--json", "-c", "status", str(data_dir))
            doc = json.loads(shell.stdout)
            assert shell.returncode == 0 and doc["ok"] and "full" in doc["audit_failure"], shell
            # a change: its own answer (here its own failure and code), flagged: not an audit error
            propose = _cli("propose", "--json", "--data-dir", str(data_dir), "on a full disk", timeout_s=120)
            doc = json.loads(propose.stdout)
            assert propose.returncode == doc["code"] != 0 and "audit log" not in doc["error"], propose
            assert "full" in doc["audit_failure"] and propose.stderr.count(WARNING) == 1, propose
            network.peers[0].terminate()
            network.peers[0].stop(timeout_s=30)
            # a start on the full disk: the disk is named, the intact store is not to be moved away
            start = _cli("node", "--data-dir", str(data_dir), "--port", "0", "--no-mdns", *PROCESS_FAST)
            assert start.returncode == 1 and "Traceback" not in start.stderr, start.stderr
            line = start.stderr.strip()
            assert line.count("\n") == 0 and f"cannot start: the disk holding {data_dir} is full (" in line, line
            assert line.endswith("free space and start the node again") and "move it away" not in line, line
            filler.unlink()
            network.start()  # space freed: the same store starts with its log
            assert wait_until(lambda: network.query(0, "status")["consensus"]["height"] >= 2, timeout_s=60)
        finally:
            network.stop()


# ---------------------------------------------------- remote admin ZAP errors


async def test_remote_admin_zap_errors_are_the_nodes_counters(node_factory):
    """The remote admin API counted ``zap_errors`` in a Counter nothing read; now in the
    node's counters (``status``, metrics). The failing check is a fault injected into the
    admission callback, as in test_rejoin."""
    node = await node_factory("a", NodeConfig(**FAST, fabric=False, admin_listen="tcp://127.0.0.1:0"))
    remote = node.admin.remote
    assert remote is not None and remote.counters is node.counters

    class FailsOnce:
        calls = 0

        def callback(self, domain: str, key: bytes) -> bool:
            FailsOnce.calls += 1
            if FailsOnce.calls == 1:
                raise RuntimeError("a bug in the admission check")
            return True

    remote.auth.allow_any = False
    remote.auth.credentials_providers["chimera-admin"] = FailsOnce()
    client = admin.RemoteClient(f"tcp://127.0.0.1:{remote.port}", node.transport_keys.public, None, timeout_s=2)
    with pytest.raises(AdminError):  # the handshake failed: no answer
        await asyncio.to_thread(client.send_raw, b"\x80")
    assert await async_wait_until(lambda: node.status()["counters"].get("zap_errors") == 1, timeout_s=30)
    reply = await asyncio.to_thread(admin.RemoteClient(f"tcp://127.0.0.1:{remote.port}",
                                                       node.transport_keys.public, None, timeout_s=10).send_raw,
                                    b"\x80")
    assert reply["ok"] is False and reply["code"] == admin.EXIT_REFUSED  # later handshakes are answered
    server = AdminServer(Path("unused.sock"), {}, remote_endpoint="tcp://127.0.0.1:0",
                         transport_keys=(b"s" * 32, b"p" * 32))
    assert server.remote is not None and server.remote.counters == {}  # no node: its own
