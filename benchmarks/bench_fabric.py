"""Fabric across peers: remote task round trip vs the signed-envelope round trip, and tasks/s.

One run starts ``--peers`` (default 4) peer processes on loopback
(:class:`~chimera.node.launcher.LocalNetwork`, no consensus log: equal
placement weights) and measures, in that run:

(d) **signed-envelope round trip**: the node's own echo ping between peer 0
    and peer 1 (sign, CURVE-encrypt, send, verify, answer), median of
    ``--pings``;
(e) **remote task round trip**: a ``wordfreq`` task on a 64-byte input with
    replicas=1, submitted at peer 0 and placed on another peer, timed inside
    peer 0 from submit to the accepted result (dispatch -> run in the
    sandbox -> signed result -> vote request -> signed vote -> certificate:
    two envelope round trips plus the run), median over ``--tasks`` tasks
    that landed remotely; the run's own time on the peer (``elapsed_ms``, whole
    milliseconds) and the same task placed on the submitter are shown too;
(f) **tasks/s across the peers**: ``--burst`` wordfreq tasks (1 KiB input,
    replicas=1) submitted at every peer at once, placed across all peers
    (2 task slots each), from the first submit to the last accepted result.

Every peer first runs one replicas=N task so modules are fetched and wasmtime
is loaded everywhere before timing. Medians; nothing asserts on time.
Run: ``python -m benchmarks.bench_fabric [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from chimera.node import admin
from chimera.node.launcher import LocalNetwork

ROOT = Path(__file__).resolve().parent.parent
WORDFREQ = ROOT / "agents" / "wasm" / "wordfreq.wasm"
FAST = ["--set", "probe_interval_s=0.5", "--set", "probe_timeout_s=0.2", "--set", "reconnect_interval_s=1",
        "--set", "fabric_capacity_interval_s=1", "--set", "fabric_probe_gpus=0"]


def measure(peers: int = 4, pings: int = 200, tasks: int = 60, burst: int = 100) -> dict:
    wasm = WORDFREQ.read_bytes()
    workdir = Path(tempfile.mkdtemp(prefix="chimera-bench-fabric-"))
    net = LocalNetwork(workdir, peers, extra_args=FAST, name="bench", genesis=False)
    try:
        net.start()
        if not net.wait_for(lambda: len(net.query(0, "tasks_status", {"limit": 1})["fabric"]["peers_with_capacity"])
                            >= peers - 1, timeout_s=60):
            raise RuntimeError("capacity advertisements did not arrive")
        ids = [p.status["peer_id"] for p in net.peers]

        def q(i: int, cmd: str, args: dict | None = None):  # LocalNetwork.query waits 10 s at most
            return admin.call(net.peers[i].data_dir, cmd, args, timeout_s=180.0)

        warm = q(0, "tasks_submit", {"module": wasm, "input": b"warm up", "replicas": peers,
                                             "wait": True, "wait_s": 120})
        if warm["state"] != "accepted":
            raise RuntimeError(f"warm-up task failed: {warm.get('failure')}")
        sha = warm["module_sha256"]
        for i in range(peers):  # every peer holds the module now: let each submit too
            q(i, "agents_deploy", {"ref": "wordfreq@1", "sha256": sha, "kind": "task"})

        rtts = [r for r in q(0, "ping", {"peer_id": ids[1], "count": pings})["rtt_s"] if r is not None]

        small = b"the quick brown fox jumps over the lazy dog the end of it all ok"[:64]
        remote, local_all, run_ms = [], [], []
        for _ in range(tasks):
            res = q(0, "tasks_submit", {"sha256": sha, "input": small, "wait": True, "wait_s": 60})
            if res["state"] == "accepted" and res["placement"][0]["peer_id"] != ids[0]:
                remote.append(res["latency_s"])
                run_ms.append(res["results"][0]["elapsed_ms"])
            elif res["state"] == "accepted":
                local_all.append(res["latency_s"])

        text = (b"lorem ipsum dolor sit amet consectetur adipiscing elit " * 20)[:1024]
        per_peer = max(1, burst // peers)

        def submit_all(i: int) -> list[str]:
            return [q(i, "tasks_submit", {"sha256": sha, "input": text})["task_id"] for _ in range(per_peer)]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(peers) as pool:
            submitted = list(pool.map(submit_all, range(peers)))

        def states() -> list[str]:
            out = []
            for i in range(peers):
                rows = net.query(i, "tasks_status", {"limit": per_peer})["tasks"]
                mine = set(submitted[i])
                out += [r["state"] for r in rows if r["task_id"] in mine]
            return out

        net.wait_for(lambda: "running" not in states(), timeout_s=300, interval_s=0.05)
        burst_s = time.perf_counter() - t0
        final = states()
        placed_on: dict[str, int] = {}
        for i in range(peers):
            for r in net.query(i, "tasks_status", {"limit": per_peer})["tasks"]:
                for d in r["placement"]:
                    placed_on[d["peer_id"]] = placed_on.get(d["peer_id"], 0) + 1
        return {
            "peers": peers,
            "envelope_rtt_ms": statistics.median(rtts) * 1000,
            "remote_task_rtt_ms": statistics.median(remote) * 1000 if remote else None,
            "remote_tasks_measured": len(remote),
            "local_placement_task_ms": statistics.median(local_all) * 1000 if local_all else None,
            "remote_run_ms": statistics.median(run_ms) if run_ms else None,
            "burst_tasks": len(final),
            "burst_accepted": final.count("accepted"),
            "burst_s": burst_s,
            "tasks_per_s": final.count("accepted") / burst_s,
            "placement_counts": {f"peer {ids.index(p)}": n for p, n in sorted(placed_on.items())},
        }
    finally:
        net.stop()


def _table(r: dict) -> str:
    ratio = (r["remote_task_rtt_ms"] / r["envelope_rtt_ms"]) if r["remote_task_rtt_ms"] else float("nan")
    return "\n".join([
        f"fabric across {r['peers']} peer processes (loopback, CURVE + Ed25519)",
        f"(d) signed-envelope round trip (echo)      {r['envelope_rtt_ms']:8.3f} ms",
        f"(e) remote task round trip, replicas=1      {r['remote_task_rtt_ms'] or float('nan'):8.3f} ms"
        f"   = {ratio:.1f}x the envelope round trip ({r['remote_tasks_measured']} remote tasks)",
        f"    same task placed on the submitter       {r['local_placement_task_ms'] or float('nan'):8.3f} ms",
        f"    of which the run on the peer (sandbox)  {r['remote_run_ms'] or float('nan'):8.0f} ms (whole ms)",
        f"(f) burst: {r['burst_accepted']}/{r['burst_tasks']} accepted in {r['burst_s']:.2f} s "
        f"= {r['tasks_per_s']:.1f} tasks/s; placed: "
        + ", ".join(f"{k}: {v}" for k, v in r["placement_counts"].items()),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    r = measure(args.peers, args.pings, args.tasks, args.burst)
    print(json.dumps(r, indent=2, sort_keys=True) if args.json else _table(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
