"""Footprint of a peer next to a bare interpreter, measured in the same run.

Reports (median of ``--runs`` runs):
* bare ``python -c pass``: wall time; RSS of an idle bare interpreter
  (``python -c "import time; time.sleep(...)"``);
* an idle peer (``chimera node``, no mDNS, loopback): time from process start
  to its ``listening`` line and its RSS after ``--settle-s`` seconds idle;
  the same with ``--profile edge``;
* a peer with the learning extra loaded: a one-validator network that has run
  a 2-round training job on its digits shard (scikit-learn, numpy and the
  model in memory), RSS after the job finished;
* a peer running one agent: the C counter actor (agents/wasm/counter.wasm)
  deployed and called once (wasmtime, the compiled module, one instance).
Targets on x86-64: idle peer <= 60 MB RSS; start-up to listening <= 1.5 s.
Run: ``python -m benchmarks.bench_footprint [--json] [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RSS_TARGET_MB = 60.0
STARTUP_TARGET_S = 1.5


def bare_python(settle_s: float) -> tuple[float, float]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    wall = time.perf_counter() - start
    proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({settle_s + 5})"])
    try:
        time.sleep(settle_s)
        rss = psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.kill()
        proc.wait()
    return wall, rss / 1e6


def idle_peer(data_dir: Path, settle_s: float, profile: str) -> tuple[float, float]:
    from chimera.node.keys import save_network
    from chimera.protocol.network import Network

    if not (data_dir / "network.token").exists():
        save_network(data_dir, Network.create(name="footprint"))
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chimera.node.cli", "node", "--data-dir", str(data_dir), "--listen",
         "127.0.0.1", "--port", "0", "--no-mdns", "--profile", profile, "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        startup = time.perf_counter() - start
        if not line.startswith("listening"):
            raise RuntimeError(f"peer did not start: {line!r}")
        time.sleep(settle_s)
        rss = psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.terminate()
        proc.wait(20)
    return startup, rss / 1e6


REPO = Path(__file__).resolve().parents[1]
JOB = """[job]
name = "footprint"
model_kind = "sgd_classifier"
n_features = 64
classes = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
dataset = "digits"
rounds = 2
local_epochs = 1
learning_rate = 0.1
rule = "fedavg"
participants = "validators"
round_deadline_s = 5.0
"""


def busy_peer(data_dir: Path, settle_s: float, kind: str) -> tuple[float, float]:
    """Start-up and RSS of a peer that has loaded the learning extra (``kind="learn"``) or runs
    one actor agent (``kind="agent"``), measured ``settle_s`` after the work."""
    from chimera.node import admin
    from chimera.node.keys import load_or_create_identity, save_network
    from chimera.protocol.network import Network

    if not (data_dir / "network.token").exists():
        me = load_or_create_identity(data_dir).peer_id
        save_network(data_dir, Network.create(name="footprint", genesis=(me,)))
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chimera.node.cli", "node", "--data-dir", str(data_dir), "--listen",
         "127.0.0.1", "--port", "0", "--no-mdns", "--log-level", "warning",
         "--set", "consensus_commit_wait_s=0.05", "--set", "consensus_empty_block_interval_s=0.2",
         # training data only where it trains: a peer configured with it loads scikit-learn at start
         *(["--set", "training_digits_shard=0/1"] if kind == "learn" else [])],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        startup = time.perf_counter() - start
        if not line.startswith("listening"):
            raise RuntimeError(f"peer did not start: {line!r}")
        if kind == "learn":
            job = admin.call(data_dir, "train_start", {"job": JOB, "timeout_s": 60}, timeout_s=90)["job_id"]
            deadline = time.monotonic() + 120
            while admin.call(data_dir, "train_status", {"job": job})["jobs"][0]["state"] != "finished":
                if time.monotonic() > deadline:
                    raise RuntimeError("the footprint training job did not finish")
                time.sleep(0.2)
        else:
            module = (REPO / "agents" / "wasm" / "counter.wasm").read_bytes()
            admin.call(data_dir, "agents_deploy", {"ref": "counter@1", "module": module, "kind": "actor"},
                       timeout_s=60)
            admin.call(data_dir, "agents_call", {"name": "counter", "input": b"inc"}, timeout_s=60)
        time.sleep(settle_s)
        rss = psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.terminate()
        proc.wait(20)
    return startup, rss / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        bare = [bare_python(args.settle_s) for _ in range(args.runs)]
        rows["python -c pass"] = (statistics.median(b[0] for b in bare), statistics.median(b[1] for b in bare))
        for profile in ("default", "edge"):
            runs = [idle_peer(Path(tmp) / profile, args.settle_s, profile) for _ in range(args.runs)]
            rows[f"idle peer ({profile})"] = (statistics.median(r[0] for r in runs),
                                              statistics.median(r[1] for r in runs))
        for kind, label in (("learn", "peer, learning extra loaded"), ("agent", "peer running one agent")):
            runs = [busy_peer(Path(tmp) / f"{kind}-{k}", args.settle_s, kind) for k in range(max(1, args.runs // 2))]
            rows[label] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
    base_wall, base_rss = rows["python -c pass"]
    peer_wall, peer_rss = rows["idle peer (default)"]
    result = {
        "rows": {k: {"startup_s": v[0], "rss_mb": v[1]} for k, v in rows.items()},
        "ratios": {"rss_vs_bare_python": peer_rss / base_rss, "startup_vs_bare_python": peer_wall / base_wall},
        "targets": {"rss_target_met": peer_rss <= RSS_TARGET_MB, "startup_target_met": peer_wall <= STARTUP_TARGET_S},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'':28} {'start-up s':>10} {'RSS MB':>8}")
    for name, (wall, rss) in rows.items():
        print(f"{name:28} {wall:10.3f} {rss:8.1f}")
    print(f"idle peer / bare python: RSS x{result['ratios']['rss_vs_bare_python']:.1f}, "
          f"start-up x{result['ratios']['startup_vs_bare_python']:.1f}")
    print(f"targets: RSS <= {RSS_TARGET_MB:.0f} MB {'met' if result['targets']['rss_target_met'] else 'NOT met'}; "
          f"start-up <= {STARTUP_TARGET_S} s {'met' if result['targets']['startup_target_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
