"""The federated training stage of ``chimera demo`` (node/demo.py calls :func:`run_training_stage`).

Every demo peer holds one non-IID shard of scikit-learn's digits (Dirichlet
alpha 0.5 over labels, peer k of the sorted genesis gets shard k: config
:data:`TRAINING_ARGS`). Peer 0 commits a job through the consensus log; all
peers train locally and agree on each round's global model through the log.
The stage prints each round's test accuracy as it commits, checks that every
peer holds the same final model (digest), and compares the final accuracy with
the same model trained centrally on all the training data for the same number
of epochs.
"""

from __future__ import annotations

import time

from rich.console import Console

from .launcher import LocalNetwork

TRAINING_ARGS = ["--set", "training_digits_shard=genesis", "--set", "training_split=dirichlet:0.5"]
"""Extra ``chimera node`` flags of the demo peers: each holds its digits shard."""
DEMO_ROUNDS = 10
LOCAL_EPOCHS = 2
LEARNING_RATE = 0.1
JOB = f"""
[job]
name = "demo-digits"
model_kind = "sgd_classifier"
n_features = 64
classes = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
dataset = "digits:dirichlet:0.5"
rounds = {DEMO_ROUNDS}
local_epochs = {LOCAL_EPOCHS}
learning_rate = {LEARNING_RATE}
rule = "fedavg"
round_deadline_s = 3.0
max_update_norm = 1000.0
seed = {{seed}}
"""


def central_accuracy(rounds: int = DEMO_ROUNDS) -> float:
    """Test accuracy of the same model trained on all the digits training data (``rounds * LOCAL_EPOCHS`` epochs)."""
    from chimera.consensus.datasets import load_digits_data, train_test_split_fixed
    from chimera.consensus.models import make_adapter

    X, y = load_digits_data()
    train, test = train_test_split_fixed(X, y, 0.2, seed=0)
    adapter = make_adapter("sgd_classifier", 64, tuple(range(10)), 1e-4)
    adapter.fit(train.X, train.y, epochs=rounds * LOCAL_EPOCHS, learning_rate=LEARNING_RATE, seed=7)
    return adapter.evaluate(test.X, test.y).accuracy


def run_training_stage(net: LocalNetwork, console: Console, report: dict[str, str],
                       timeout_s: float = 120.0) -> bool:
    """Run one federated job across the demo peers; True when it finished with identical models."""
    peers = len(net.peers)
    console.print(f"[bold]federated training[/bold]: {peers} peers, each with its own non-IID digits shard "
                  f"(Dirichlet 0.5); FedAvg, {DEMO_ROUNDS} rounds agreed through the log (no server)")
    t0 = time.monotonic()
    try:
        res = net.query(0, "train_start", {"job": JOB.format(seed=int(time.time()) % 100_000), "timeout_s": 60})
    except Exception as exc:  # an admin error: say so, the rest of the demo goes on
        console.print(f"[red]training job refused: {exc}[/red]")
        report["federated training"] = f"not run: {exc}"
        return False
    job_id = res["job_id"]
    console.print(f"  job {job_id[:16]} committed at height {res['height']}; update {res['update_bytes']} bytes")
    shown = 0
    doc: dict = {}
    while time.monotonic() - t0 < timeout_s:
        doc = net.query(0, "train_status", {"job": job_id})["jobs"][0]
        for r in doc["rounds"]:
            if r["round"] > shown and r["accuracy"] is not None:
                shown = r["round"]
                console.print(f"  round {r['round']:>2}/{DEMO_ROUNDS}  accuracy {r['accuracy']:.4f}  "
                              f"loss {r['loss']:.4f}  {r['participants']} updates  "
                              f"{r['round_s'] or 0:.2f} s")
        if doc["state"] == "finished" and shown >= DEMO_ROUNDS:
            break
        time.sleep(0.1)
    wall = time.monotonic() - t0
    if shown < DEMO_ROUNDS:
        console.print(f"[red]training did not finish within {timeout_s:.0f} s (round {shown})[/red]")
        report["federated training"] = f"stopped at round {shown} of {DEMO_ROUNDS}"
        return False
    final = {net.query(i, "train_status", {"job": job_id})["jobs"][0]["rounds"][-1]["digest"]
             for i in range(peers) if net.peers[i].alive()}
    identical = len(final) == 1
    federated = doc["rounds"][-1]["accuracy"]
    central = central_accuracy()
    console.print(f"  final accuracy [bold]{federated:.4f}[/bold] vs centrally trained {central:.4f} "
                  f"({100 * (federated - central):+.2f} points) after {wall:.1f} s; final model identical on all "
                  f"{peers} peers: {identical} (digest {next(iter(final))[:16]})")
    report["federated training"] = (f"{DEMO_ROUNDS} rounds in {wall:.1f} s, accuracy {federated:.4f} vs central "
                                    f"{central:.4f}; same model on all peers: {identical}")
    return identical
