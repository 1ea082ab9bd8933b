"""The admin API against anonymous and low-role abuse: the audit log keeps the record of
changes whatever arrives, a request costs bounded work before anyone is authenticated,
the replay table cannot be used to lock other keys out, revoked keys lose their streams."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import struct
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from chimera.node import admin, admin_keys, audit, cli_admin
from chimera.node.admin import EXIT_REFUSED, EXIT_USAGE, AdminServer
from chimera.node.admin_keys import (
    KeyRing,
    Refused,
    RequestVerifier,
    generate_key,
    public_bytes,
    sign_request,
)
from chimera.node.audit import AuditLog

NODE = "sha256:node"


def _server(tmp_path: Path, **kw) -> AdminServer:
    async def ok(args: dict) -> str:
        return "ran"

    handlers = {"agents_deploy": ok, "tasks_submit": ok, "train_start": ok, "status": ok}
    return AdminServer(tmp_path / "admin.sock", handlers, db=sqlite3.connect(tmp_path / "db", isolation_level=None),
                       node_fingerprint=NODE, **kw)


def _signed(key, cmd: str, args: dict, **kw) -> bytes:
    return msgpack.packb(sign_request(key, NODE, cmd, args, **kw), use_bin_type=True)


# ------------------------------------------------------------------ audit retention


async def test_a_flood_of_refused_remote_requests_keeps_changes_and_costs_few_writes(tmp_path: Path):
    server = _server(tmp_path)
    reply, _ = await server.dispatch(msgpack.packb({"cmd": "admin_key_add", "args": {
        "name": "ops", "role": "admin", "public_key": public_bytes(generate_key())}}), "local")
    assert reply["ok"], reply
    writes = []
    server.audit.db.set_trace_callback(lambda sql: writes.append(sql) if "admin_audit" in sql
                                       and sql.lstrip().startswith(("INSERT", "UPDATE")) else None)
    started = time.monotonic()
    for i in range(20_000):
        reply, _ = await server.dispatch(msgpack.packb({"cmd": "status"}), "remote", address="203.0.113.9")
        assert reply["code"] == EXIT_REFUSED
    elapsed = time.monotonic() - started
    rows = server.audit.rows(10_000)
    assert rows[0]["command"] == "admin_key_add"
    refused = [r for r in rows if r["result"] == "refused: unsigned remote request"]
    assert sum(r["count"] for r in refused) == 20_000
    # at most one row (and one count update) per source per second
    assert len(writes) <= 2 * (int(elapsed) + 2), (len(writes), elapsed)


def test_refusals_are_aggregated_per_source_and_window():
    log = AuditLog(sqlite3.connect(":memory:", isolation_level=None))

    def refuse(at_ms: int, source: str, who: str = "x") -> None:
        log.append(at_ms=at_ms, who=f"{who} via {source}", transport="remote", role="-", command="-",
                   args={}, result="refused: bad signature", duration_s=0.0, aggregate=source)

    for i in range(500):  # the claimed key changes every time: still one source
        refuse(5_000 + i, "remote 203.0.113.9", who=f"sha256:{i:016x}")
    refuse(5_100, "remote 198.51.100.1")
    refuse(6_000, "remote 203.0.113.9")  # a new window
    counts = [(r["who"].split(" via ")[1], r["count"]) for r in log.rows(100)]
    assert counts == [("remote 203.0.113.9", 500), ("remote 198.51.100.1", 1), ("remote 203.0.113.9", 1)]


def test_refusals_from_many_sources_share_one_row_beyond_the_open_windows(monkeypatch):
    monkeypatch.setattr(audit, "MAX_OPEN_AGGREGATES", 4)
    log = AuditLog(sqlite3.connect(":memory:", isolation_level=None))
    for i in range(100):
        log.append(at_ms=1_000, who=f"k via remote 10.0.0.{i}", transport="remote", role="-", command="-",
                   args={}, result="refused: x", duration_s=0.0, aggregate=f"remote 10.0.0.{i}")
    rows = log.rows(100)
    assert len(rows) == 5 and sum(r["count"] for r in rows) == 100
    assert rows[-1]["who"].endswith("and other sources") and rows[-1]["count"] == 96


def test_the_audit_log_is_pruned_when_opened(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(audit, "MAX_READ_ROWS", 50)
    monkeypatch.setattr(audit, "PRUNE_EVERY", 10**9)  # a process that never reaches its prune count
    db = sqlite3.connect(tmp_path / "db", isolation_level=None)
    log = AuditLog(db)
    for _ in range(300):
        log.append(at_ms=1, who="w", transport="local", role="observer", command="status", args={},
                   result="ok", duration_s=0.0)
    assert len(log.rows(10_000)) == 300
    AuditLog(db)  # the next start
    assert len(log.rows(10_000)) == 50


async def test_audit_args_keys_are_cut_and_a_row_is_at_most_4_kib(tmp_path: Path):
    server = _server(tmp_path)
    key = generate_key()
    server.keys.add("obs", "observer", public_bytes(key), 1)
    for args in ({"A" * 100_000: 1}, {f"k{i}": "v" * 250 for i in range(60)}):
        reply, _ = await server.dispatch(_signed(key, "no_such_command", args), "remote", address="198.51.100.1")
        assert reply["code"] == EXIT_USAGE
    lengths = [n for (n,) in server.audit.db.execute("SELECT length(args) FROM admin_audit")]
    assert len(lengths) == 2 and max(lengths) <= audit.MAX_ARGS_JSON
    first, second = (r["args"] for r in server.audit.rows(2))
    assert list(first) == ["A" * 256 + "...<100000 chars>"]
    assert second["<cut>"].split()[1] == "chars" and "head" in second


async def test_the_audit_row_of_a_key_revocation_names_the_key(tmp_path: Path):
    server = _server(tmp_path)
    public = public_bytes(generate_key())
    await server.dispatch(msgpack.packb({"cmd": "admin_key_add", "args": {
        "name": "bob", "role": "admin", "public_key": public}}), "local")
    reply, _ = await server.dispatch(msgpack.packb({"cmd": "admin_key_revoke", "args": {"key": "bob"}}), "local")
    assert reply["ok"]
    added, revoked = server.audit.rows(2)
    assert added["args"]["public_key"] == public.hex()
    assert revoked["args"] == {"key": "bob"}
    assert audit.redact({"key": "k", "api_key": "s"}) == {"key": "<redacted>", "api_key": "<redacted>"}
