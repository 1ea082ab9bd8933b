"""Admin audit log cost: how long the node's event loop stalls while admin commands are audited.

Two measurements (same machine; run the old and the new code alternately by putting
the tree to measure first on ``PYTHONPATH``):

* ``loop``: a real :class:`~chimera.node.admin.AdminServer` on its Unix socket over the
  node's real store (WAL, ``synchronous=FULL``), in this process; ``--clients``
  processes send ``--commands`` signed (authenticated) admin commands each. A ticker
  coroutine on the server's event loop sleeps 2 ms at a time and records how late it
  wakes: the loop lag p50 / p99 / max, and the time the loop was more than 5 ms late;
  and the time the loop's thread spends inside the audit log per command.
* ``consensus``: ``--peers`` validator processes on loopback (``LocalNetwork``); peer 0
  is flooded by ``--clients`` threads sending ``status`` admin commands while this
  process submits ``--proposals`` decisions one at a time at peer 0 (``propose``: the
  commit latency measured inside the node).

Run: ``python -m benchmarks.bench_audit [loop|consensus|both] [--json]``.
Nothing asserts on time; the run prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

NODE = "sha256:bench"
TICK_S = 0.002


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def client_main(sock: str, key_hex: str, commands: int) -> None:
    """One client process: ``commands`` signed admin commands, one at a time, on one socket each."""
    import msgpack
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from chimera.node.admin import LocalClient
    from chimera.node.admin_keys import sign_request

    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key_hex))
    client = LocalClient(Path(sock), timeout_s=30)
    for i in range(commands):
        reply = client.send_raw(msgpack.packb(sign_request(key, NODE, "propose", {"data": f"c{i}"}),
                                              use_bin_type=True))
        if not reply.get("ok"):
            raise SystemExit(f"command failed: {reply}")


async def _loop_run(clients: int, commands: int) -> dict:
    from cryptography.hazmat.primitives import serialization

    from chimera.node.admin import AdminServer
    from chimera.node.admin_keys import generate_key, public_bytes
    from chimera.node.store import Store

    async def propose(args: dict) -> dict:
        return {"accepted": True}

    with tempfile.TemporaryDirectory(prefix="chimera-audit-bench-") as tmp:
        store = Store(Path(tmp))
        server = AdminServer(Path(tmp) / "admin.sock", {"propose": propose}, db=store.db, node_fingerprint=NODE)
        key = generate_key()
        server.keys.add("bench", "operator", public_bytes(key), int(time.time() * 1000))
        key_hex = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption()).hex()
        await server.start()
        on_loop = [0.0]  # seconds the event loop's thread spent inside the audit log's entry point
        name = "submit" if hasattr(server.audit, "submit") else "append"  # the new code / the old one
        entry = getattr(server.audit, name)

        def timed(**row):
            t = time.perf_counter()
            try:
                return entry(**row)
            finally:
                on_loop[0] += time.perf_counter() - t

        setattr(server.audit, name, timed)
        lags: list[float] = []
        running = True

        async def ticker() -> None:
            while running:
                t = time.perf_counter()
                await asyncio.sleep(TICK_S)
                lags.append(time.perf_counter() - t - TICK_S)

        tick = asyncio.ensure_future(ticker())
        started = time.perf_counter()
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.bench_audit", "--client", str(server.path), key_hex, str(commands),
            env=dict(os.environ)) for _ in range(clients)]
        codes = [await p.wait() for p in procs]
        wall_s = time.perf_counter() - started
        running = False
        await tick
        rows = len(server.audit.rows(clients * commands + 10)) if hasattr(server.audit, "rows") else -1
        await server.close()
        store.close()
    late = [lag for lag in lags if lag > 0.005]
    return {"clients": clients, "commands": clients * commands, "failed_clients": sum(c != 0 for c in codes),
            "wall_s": round(wall_s, 3), "commands_per_s": round(clients * commands / wall_s, 1),
            "audit_rows": rows, "audit_on_loop_ms_per_command": round(on_loop[0] * 1000 / (clients * commands), 4),
            "loop_lag_p50_ms": round(_pct(lags, 0.5) * 1000, 3),
            "loop_lag_p99_ms": round(_pct(lags, 0.99) * 1000, 3), "loop_lag_max_ms": round(max(lags) * 1000, 3),
            "loop_late_over_5ms_s": round(sum(late), 3)}


def run_consensus(peers: int, clients: int, proposals: int) -> dict:
    from benchmarks.bench_consensus import validator_network
    from chimera.node import admin

    with validator_network(peers, name="audit") as net:
        stop = threading.Event()
        sent = [0] * clients

        def flood(j: int) -> None:
            client = admin.LocalClient(net.peers[0].data_dir / admin.SOCKET_NAME, timeout_s=30)
            while not stop.is_set():
                client.call("status")
                sent[j] += 1

        threads = [threading.Thread(target=flood, args=(j,)) for j in range(clients)]
        for t in threads:
            t.start()
        started = time.perf_counter()
        latencies = [net.query(0, "propose", {"data": f"audit {k}", "timeout_s": 60})["latency_s"]
                     for k in range(proposals)]
        wall_s = time.perf_counter() - started
        stop.set()
        for t in threads:
            t.join()
    return {"peers": peers, "flood_clients": clients, "proposals": proposals,
            "status_per_s": round(sum(sent) / wall_s, 1),
            "commit_latency_p50_ms": round(statistics.median(latencies) * 1000, 2),
            "commit_latency_p90_ms": round(_pct(latencies, 0.9) * 1000, 2),
            "commit_latency_max_ms": round(max(latencies) * 1000, 2)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="?", default="both", choices=["loop", "consensus", "both"])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--commands", type=int, default=300, help="per client (loop)")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--proposals", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import chimera.node.audit as audit_module

    out: dict = {"code": str(Path(audit_module.__file__).parent.parent)}
    if args.what in ("loop", "both"):
        out["loop"] = asyncio.run(_loop_run(args.clients, args.commands))
    if args.what in ("consensus", "both"):
        out["consensus"] = run_consensus(args.peers, args.clients, args.proposals)
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
