"""The fabric stage of ``chimera demo``: real WASM agents across the local peers.

1. deploy the C word-frequency task agent (agents/wasm/wordfreq.wasm) on peer 0
   and call it there;
2. submit it as a task with replicas=3 and majority agreement: the placement
   core picks three peers by committed reputation weight and load, the
   peers that lack the module fetch it from peer 0 (SHA-256 verified), each
   runs it in its own sandbox, signs its result digest, and peer 0 shows the
   accepted result with its vote certificate (who agreed);
3. actor ping-pong: the C counter actor on peer 1 and on peer 2 exchange
   messages through ``chimera.send`` (signed envelopes between the peers).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import admin
from .launcher import LocalNetwork

AGENTS = Path(__file__).resolve().parent.parent / "agents" / "wasm"
TEXT = (b"Every peer hosts sandboxed WebAssembly agents and accepts work from the others; a task goes "
        b"to the peers best placed to run it, and redundant results are accepted by vote. No peer is "
        b"special: no heart node, no server, no head. Every peer the same. ") * 40


def run_fabric_stage(net: LocalNetwork, console: Console) -> dict[str, str]:
    """Run the stage on ``net`` (>= 3 peers, started); returns report lines (label -> text)."""
    report: dict[str, str] = {}
    wordfreq, counter = AGENTS / "wordfreq.wasm", AGENTS / "counter.wasm"
    if not (wordfreq.exists() and counter.exists()):
        console.print(f"[yellow]fabric stage skipped: no agent builds under {AGENTS}[/yellow]")
        return report
    peers = len(net.peers)
    names = {p.status["peer_id"]: f"peer {p.index}" for p in net.peers}
    console.rule("[bold]WASM agent fabric")
    t0 = time.monotonic()
    net.wait_for(lambda: len(net.query(0, "tasks_status", {"limit": 1})["fabric"]["peers_with_capacity"])
                 >= peers - 1, timeout_s=30, interval_s=0.1)
    seen = net.query(0, "tasks_status", {"limit": 1})["fabric"]["peers_with_capacity"]
    console.print(f"peer 0 holds signed capacity advertisements of {len(seen)} peers "
                  f"(after {time.monotonic() - t0:.2f} s)")

    def q(i: int, cmd: str, args: dict):  # LocalNetwork.query waits 10 s at most; wasmtime loads on first use
        return admin.call(net.peers[i].data_dir, cmd, args, timeout_s=90.0)

    dep = q(0, "agents_deploy", {"ref": "wordfreq@1", "module": wordfreq.read_bytes(), "kind": "task"})
    local = q(0, "agents_call", {"name": "wordfreq", "input": b"to be or not to be"})
    console.print(f"deployed [cyan]wordfreq@1[/cyan] (C, wasm32-wasi, module {dep['module_sha256'][:12]}) "
                  f"on peer 0; local call: {local['stdout'].strip().replace(chr(10), ', ')}")

    t0 = time.perf_counter()
    res = q(0, "tasks_submit", {"sha256": dep["module_sha256"], "input": TEXT, "replicas": 3,
                                        "rule": "majority", "fuel": 500_000_000, "wait": True, "wait_s": 60})
    wall = time.perf_counter() - t0
    if res["state"] != "accepted":
        console.print(f"[red]task {res['task_id']} {res['state']}: {res.get('failure')}[/red]")
        report["fabric task"] = f"failed: {res.get('failure')}"
        return report
    table = Table(title=f"task {res['task_id']}: wordfreq over {len(TEXT)} bytes, replicas=3, majority")
    for col in ("replica", "peer id", "exit", "result digest", "run ms", "signed the certificate"):
        table.add_column(col)
    cert = res["certificate"]
    for r in res["results"]:
        table.add_row(names.get(r["peer_id"], "?"), r["peer_id"][:16] + "...", str(r["exit_code"]),
                      (r["digest"] or r["reason"])[:16], str(r["elapsed_ms"]),
                      "yes" if r["peer_id"] in cert["voters"] else "no")
    table.caption = ("run ms: the first run on a peer includes fetching the module, loading wasmtime "
                     "and compiling; the certificate needs more than half of the replicas, so the first "
                     "matching signatures decide")
    console.print(table)
    top = res["result"]["stdout"].splitlines()[:5]
    console.print(f"accepted result {res['result']['digest'][:16]} in {wall * 1000:.0f} ms: top words "
                  + ", ".join(top))
    console.print(f"vote certificate: ballot {cert['ballot_id'][:16]}, rule {cert['rule']} > {cert['threshold']} "
                  f"of the replica table (epoch {cert['replica_table']['epoch']}, weights "
                  + ", ".join(f"{names.get(p, p[:8])}={w}" for p, w in cert["replica_table"]["weights"].items())
                  + f"), signed by {', '.join(names.get(v, v[:8]) for v in cert['voters'])}; "
                  "checked with verify_task_certificate")
    report["fabric task (replicas=3)"] = (f"accepted in {wall * 1000:.0f} ms on "
                                          + ", ".join(names.get(d['peer_id'], '?') for d in res["placement"])
                                          + f"; certificate signed by {len(cert['voters'])}")

    # actor ping-pong across two peers
    a, b = 1, 2
    for i, name in ((a, "ping"), (b, "pong")):
        q(i, "agents_deploy", {"ref": f"{name}@1", "module": counter.read_bytes(), "kind": "actor"})
    target = f"{net.peers[b].status['peer_id']}/pong"
    rounds = 20
    t0 = time.perf_counter()
    q(a, "agents_call", {"name": "ping", "input": f"fwd {target} ping 0 {rounds}".encode(),
                                 "reply_wait_s": 0})

    def finished() -> bool:
        logs = [row["logs"] for i, n in ((a, "ping"), (b, "pong"))
                for row in net.query(i, "agents_list")["agents"] if row["name"] == n]
        return any(f"done {rounds}" in line for rows in logs for line in rows)

    ok = net.wait_for(finished, timeout_s=30, interval_s=0.05)
    wall = time.perf_counter() - t0
    if ok:
        console.print(f"actor ping-pong: counter agents on peer {a} and peer {b} exchanged {rounds + 1} messages "
                      f"through chimera.send (signed envelopes) in {wall * 1000:.0f} ms")
        report["actor ping-pong"] = f"{rounds + 1} cross-peer messages in {wall * 1000:.0f} ms"
    else:
        console.print("[red]actor ping-pong did not finish within 30 s[/red]")
        report["actor ping-pong"] = "did not finish"
    return report
