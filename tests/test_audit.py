"""Audit log retention: polling cannot push out the record of changes and refusals."""

from __future__ import annotations

import sqlite3

from chimera.node import audit
from chimera.node.audit import AuditLog


def test_each_bucket_is_pruned_on_its_own(monkeypatch):
    monkeypatch.setattr(audit, "MAX_CHANGE_ROWS", 500)
    monkeypatch.setattr(audit, "MAX_READ_ROWS", 50)
    monkeypatch.setattr(audit, "MAX_OTHER_ROWS", 50)
    monkeypatch.setattr(audit, "PRUNE_EVERY", 100)
    log = AuditLog(sqlite3.connect(":memory:", isolation_level=None))

    def row(command: str, result: str = "ok") -> None:
        log.append(at_ms=1, who="w", transport="local", role="observer", command=command, args={},
                   result=result, duration_s=0.0)

    row("config_set")                       # a change
    row("propose", "refused: needs operator")  # a refusal
    row("status", "error: boom")            # a failed read: "other", like refusals
    for _ in range(2000):                   # an observer polling
        row("train_status")
    commands = [r["command"] for r in log.rows(10_000)]
    assert commands[:3] == ["config_set", "propose", "status"]
    assert 50 <= commands.count("train_status") <= 50 + 100
    for _ in range(2000):                   # refusals never push out a change
        row("stop", "refused: needs admin")
    commands = [r["command"] for r in log.rows(10_000)]
    assert commands[0] == "config_set" and 50 <= commands.count("stop") <= 50 + 100
    for _ in range(600):                    # beyond MAX_CHANGE_ROWS the oldest changes go
        row("agents_deploy")
    rows = log.rows(10_000)
    assert "config_set" not in [r["command"] for r in rows]
    assert sum(r["command"] == "agents_deploy" for r in rows) <= 500 + 100  # pruned every 100 appends
