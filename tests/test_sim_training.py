"""The simulator drives the federated-averaging core: determinism, poisoning, ALIE, scenario checks.

Small federations (6-7 peers, 2-4 rounds) on scikit-learn's digits, over the
ideal log and the real BFT log (simulations/training_world.py).
"""

from __future__ import annotations

import dataclasses
import json
import statistics

import numpy as np
import pytest

from chimera.simulations.behaviours import Alie, Behaviour, alie_delta, alie_z, make_behaviour
from chimera.simulations.cli import main
from chimera.simulations.runner import run_one
from chimera.simulations.scenario import ScenarioError, load_scenarios

BASE = """
[scenario]
name = "t"
kind = "training"
seed = 5
peers = {peers}
duration_s = 300.0
[network]
latency = {{ kind = "lognormal", median_ms = 5.0, sigma = 0.5 }}
[training]
log = "{log}"
rule = "{rule}"
rounds = {rounds}
attack = "{attack}"
attackers = {attackers}
byzantine_f = {f}
"""


def scenario(tmp_path, *, peers=6, log="ideal", rule="fedavg", rounds=3, attack="sign_flip", attackers=1, f=1,
             extra=""):
    path = tmp_path / f"t-{log}-{rule}-{attack}-{peers}-{rounds}.toml"
    path.write_text(BASE.format(peers=peers, log=log, rule=rule, rounds=rounds, attack=attack,
                                attackers=attackers, f=f) + extra)
    return load_scenarios(path)[0]


@pytest.mark.parametrize("log", ["ideal", "bft"])
def test_same_seed_gives_byte_identical_trace_and_metrics(tmp_path, log):
    sc = scenario(tmp_path, peers=4 if log == "bft" else 6, log=log, rounds=2, attack="gaussian")
    a, b = run_one(sc, trace=True), run_one(sc, trace=True)
    assert a.violation is None and a.row["rounds_certified"] == 2
    assert a.trace.text() == b.trace.text() and len(a.trace) > 100
    assert json.dumps(a.row, sort_keys=True) == json.dumps(b.row, sort_keys=True)
    assert json.dumps(a.series, sort_keys=True) == json.dumps(b.series, sort_keys=True)
    assert "certified job 0 r=2" in a.trace.text()
    other = run_one(dataclasses.replace(sc, seed=6), trace=True)
    assert other.trace.digest() != a.trace.digest()


def test_sign_flip_breaks_fedavg_but_not_a_robust_rule(tmp_path):
    results = {}
    for rule in ("fedavg", "median", "reputation_clipped"):
        r = run_one(scenario(tmp_path, peers=7, rule=rule, rounds=4, attack="sign_flip", attackers=2, f=2),
                    trace=False)
        assert r.violation is None and r.row["rounds_certified"] == 4
        results[rule] = r
    fedavg = results["fedavg"].row["final_accuracy"]
    for rule in ("median", "reputation_clipped"):
        assert results[rule].row["final_accuracy"] > fedavg + 0.4, (rule, results[rule].row["final_accuracy"], fedavg)
        assert results[rule].row["final_accuracy"] > 0.8
    # reputation_clipped's filter reports the attackers, never an honest peer
    row = results["reputation_clipped"].row
    assert row["byzantine_flag_rate"] == 1.0 and row["honest_flag_rate"] == 0.0
    assert row["reputation_byzantine"] < row["reputation_honest"]


def test_alie_follows_baruch_et_al():
    # z_max = Phi^-1((n - s) / n), s = floor(n/2 + 1) - f (Algorithm 3)
    assert alie_z(10, 3) == pytest.approx(0.5244005, abs=1e-6)   # s = 3, Phi^-1(0.7)
    assert alie_z(10, 2) == pytest.approx(0.2533471, abs=1e-6)   # s = 4, Phi^-1(0.6)
    assert alie_z(50, 12) == pytest.approx(0.5828415, abs=1e-6)  # s = 14, Phi^-1(0.72)
    with pytest.raises(ValueError):
        alie_z(10, 6)  # s <= 0: the attackers hold a majority
    honest = [np.array([1.0, 2.0]), np.array([3.0, 2.0]), np.array([5.0, 8.0])]
    # by hand: mean (3, 4); population std (sqrt(8/3), sqrt(8))
    z = 0.5244005127080407
    expected = np.array([3.0 - z * (8 / 3) ** 0.5, 4.0 - z * 8 ** 0.5])
    assert np.allclose(alie_delta(honest, z), expected, rtol=0, atol=1e-12)

    class Ctx:
        rng = None

    sent = Alie().model_update(Ctx(), np.zeros(2), honest, n=10, f=3)
    assert np.allclose(sent, expected, atol=1e-12)
    assert np.allclose(make_behaviour("alie", z=1.0).model_update(Ctx(), np.zeros(2), honest, n=10, f=3),
                       [3.0 - statistics.pstdev([1, 3, 5]), 4.0 - statistics.pstdev([2, 2, 8])])
    assert make_behaviour("sign_flip", scale=3.0).model_update(Ctx(), np.array([1.0, -2.0])).tolist() == [-3.0, 6.0]


def test_alie_attackers_see_the_honest_deltas_of_the_round(tmp_path, monkeypatch):
    seen = []
    original = Alie.model_update

    def spy(self, ctx, delta, honest_deltas=(), *, n=0, f=0):
        seen.append((len(honest_deltas), n, f))
        return original(self, ctx, delta, honest_deltas, n=n, f=f)

    monkeypatch.setattr(Alie, "model_update", spy)
    r = run_one(scenario(tmp_path, peers=7, rule="trimmed_mean", rounds=2, attack="alie", attackers=2, f=2),
                trace=False)
    assert r.violation is None and r.row["rounds_certified"] == 2
    assert seen and set(seen) == {(5, 7, 2)} and len(seen) == 4  # 2 attackers x 2 rounds


@pytest.mark.parametrize("peers, loss, seeds", [(7, 0.1, (1, 3, 4, 8)), (10, 0.3, (2, 7))])
def test_rounds_over_the_bft_log_stay_live_when_updates_are_lost(tmp_path, peers, loss, seeds):
    """Message loss: participants lack some updates when the inclusions naming them are
    proposed, and the proposers' deadline sets differ. Every run certifies all rounds. Before,
    these seeds stalled for good (0-2 of 4 rounds in 300 s): a participant fetched a missing
    update only after a commit (so an inclusion that more than 1/3 of the weight could not
    check never committed), and blocks bundled several inclusion sets of one round, each
    checkable at a different subset of the peers (MAX_AGGREGATES_PER_ROUND), so no block was
    valid at more than 2/3 of them, and the start that later matched could be dropped with
    more than 8 held. Now a participant asks for missing updates before the commit
    (TrainingCore.fetch_wanted), a block carries one inclusion per round, the largest
    (inclusion_choice), the largest set is always checkable, and starts are held per base."""
    text = BASE.format(peers=peers, log="bft", rule="fedavg", rounds=4, attack="none", attackers=0, f=1)
    for seed in seeds:
        path = tmp_path / f"loss-{peers}-{seed}.toml"
        path.write_text(text.replace("seed = 5", f"seed = {seed}")
                        .replace("sigma = 0.5 }", f"sigma = 0.5 }}\nloss = {loss}"))
        r = run_one(load_scenarios(path)[0], trace=False)
        assert r.violation is None and r.row["rounds_certified"] == 4, (seed, r.violation)
        assert r.row["finish_s"] < 150.0, (seed, r.row["finish_s"])  # (the run allows 300 s)


def test_silent_participants_do_not_stall_rounds(tmp_path):
    r = run_one(scenario(tmp_path, peers=6, rule="fedavg", rounds=2, attack="silent", attackers=1, f=0,
                         extra="quorum = 5\nround_deadline_s = 2.0\n"), trace=False)
    assert r.violation is None and r.row["rounds_certified"] == 2
    assert [p["included"] for p in r.series["rounds"]] == [5, 5]
    assert r.row["finish_s"] > 4.0  # each round waited for the deadline


@pytest.mark.parametrize("body, field", [
    ('rule = "mean"\n', "training.rule"),
    ('rule = "krum+magic"\n', "training.rule"),
    ('attack = "sign_flip"\n', "training.attackers"),
    ('attack = "worm"\nattackers = 1\n', "training.attack"),
    ('log = "raft"\n', "training.log"),
    ('rule = "krum"\nbyzantine_f = 2\n', "training.byzantine_f"),
    ('quorum = 9\n', "training.quorum"),
    ('rounds = 0\n', "training.rounds"),
    ('split = "zipf"\n', "training.split"),
    ('learning_rate = -1.0\n', "training.learning_rate"),
    ('speed = 2\n', "training.speed"),
    ('log = "bft"\nattack = "gaussian"\nattackers = 2\n', "training.attackers"),
    ('attack = "alie"\nattackers = 3\n', "training.attackers"),
])
def test_bad_training_fields_are_named(tmp_path, capsys, body, field):
    path = tmp_path / "bad.toml"
    path.write_text('[scenario]\nname = "x"\nkind = "training"\npeers = 5\n[training]\n' + body)
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    assert info.value.field == field and f"'{field}'" in str(info.value)
    assert main(["run", str(path), "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert field in capsys.readouterr().err


@pytest.mark.parametrize("body, field", [
    ('[scenario]\nname="x"\nkind="training"\npeers=130\n', "training.jobs"),
    ('[scenario]\nname="x"\nkind="training"\n[[churn]]\nat_s=1\naction="join"\n', "churn[0].action"),
    ('[scenario]\nname="x"\nkind="bft"\n[training]\nrounds=2\n', "training"),
    ('[scenario]\nname="x"\nkind="bft"\n[[output.plots]]\nkind="rounds"\ny="accuracy"\n', "output.plots[0].kind"),
    ('[scenario]\nname="x"\nkind="training"\n[[output.tables]]\nrows="a"\ncolumns="b"\nvalue="c"\nfile="t.txt"\n',
     "output.tables[0].file"),
])
def test_bad_training_scenario_structure_is_named(tmp_path, body, field):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    assert info.value.field == field


def test_robust_aggregation_scenario_through_the_cli(tmp_path, capsys):
    out = tmp_path / "robust"
    code = main(["run", "robust_aggregation", "--peers", "6", "--out", str(out), "--no-progress",
                 "--set", "training.rounds=2", "--set", 'training.attack="sign_flip"',
                 "--set", "training.attackers=1", "--set", "training.byzantine_f=1",
                 "--set", 'training.rule="multi_krum"'])
    assert code == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "final_accuracy.md" in printed
    doc = json.loads((out / "metrics.json").read_text())
    assert len(doc["runs"]) == 1 and doc["runs"][0]["metrics"]["rounds_certified"] == 2
    assert (out / "accuracy_vs_rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "final_accuracy.md").read_text()
    assert "sign_flip" in table and "multi_krum" in table
    assert (out / "final_accuracy.csv").exists()


def test_honest_behaviour_passes_updates_through():
    delta = np.arange(3.0)
    assert Behaviour().model_update(None, delta) is delta
    assert make_behaviour("silent").model_update(None, delta) is None
    assert make_behaviour("late", delay_s=5.0).update_delay_s == 5.0
