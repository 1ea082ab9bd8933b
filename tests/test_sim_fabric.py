"""The simulator drives the fabric's placement core: determinism, wrong task results,
certificates, reputation at the submitters, scenario checks.

Small fabrics (7 peers, a few dozen tasks, 3 replicas) over the real
:class:`~chimera.fabric.placement.Placement`, ballots and vote certificates
(simulations/fabric_world.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from chimera.consensus.quorum import CertificateError, WeightTable
from chimera.fabric.placement import verify_task_certificate
from chimera.simulations.behaviours import Behaviour, WrongResult, make_behaviour
from chimera.simulations.cli import main
from chimera.simulations.engine import Simulator
from chimera.simulations.fabric_world import FabricSetup, FabricWorld, shared_fabric_verification, word_count_task
from chimera.simulations.network import Latency, LinkSpec, SimNetwork
from chimera.simulations.runner import run_one
from chimera.simulations.scenario import ScenarioError, load_scenarios
from chimera.simulations.world import NETWORK_ID

BASE = """
[scenario]
name = "t"
kind = "fabric"
seed = {seed}
peers = {peers}
duration_s = 200.0
[network]
latency = {{ kind = "lognormal", median_ms = 5.0, sigma = 0.5 }}
loss = {loss}
[fabric]
tasks = {tasks}
tasks_per_s = 8.0
submitters = 2
replicas = 3
wrong_peers = {wrong}
wrong_collude = {collude}
capacity_interval_s = 2.0
sample_interval_s = 2.0
"""


def scenario(tmp_path, *, seed=4, peers=7, loss=0.02, tasks=40, wrong=1, collude="true", extra=""):
    path = tmp_path / f"f-{seed}-{peers}-{loss}-{tasks}-{wrong}-{collude}.toml"
    path.write_text(BASE.format(seed=seed, peers=peers, loss=loss, tasks=tasks, wrong=wrong, collude=collude)
                    + extra)
    return load_scenarios(path)[0]


def test_same_seed_gives_byte_identical_trace_and_metrics(tmp_path):
    sc = scenario(tmp_path, wrong=2, collude="false")
    a, b = run_one(sc, trace=True), run_one(sc, trace=True)
    assert a.violation is None and a.row["live"] and a.row["tasks_submitted"] == 40
    assert a.trace.text() == b.trace.text() and len(a.trace) > 500
    assert json.dumps(a.row, sort_keys=True) == json.dumps(b.row, sort_keys=True)
    assert json.dumps(a.series, sort_keys=True) == json.dumps(b.series, sort_keys=True)
    text = a.trace.text()
    assert "task-run " in text and "vote-request " in text and " accepted p" in text
    other = run_one(dataclasses.replace(sc, seed=5), trace=True)
    assert other.trace.digest() != a.trace.digest()


@pytest.mark.parametrize("wrong, collude", [(1, "true"), (2, "false")])
def test_minority_of_wrong_peers_never_gets_a_wrong_result_accepted(tmp_path, wrong, collude):
    """One colluding liar is a minority of every 3-replica set; two non-colluding liars
    never agree with each other, so their sets fail instead of accepting a lie."""
    r = run_one(scenario(tmp_path, wrong=wrong, collude=collude, tasks=60), trace=False)
    row = r.row
    assert r.violation is None and row["live"]
    assert row["wrong_results_returned"] > 0 and row["tasks_accepted"] > 0
    assert row["tasks_accepted_wrong"] == 0 and row["tasks_byzantine_majority"] == 0
    assert row["certificates_verified"] == row["tasks_accepted"]
    assert row["tasks_accepted"] + row["tasks_failed"] == row["tasks_submitted"] == 60
    assert row["observed_task_disagree"] > 0
    # every submitter ranks every honest peer above every liar
    assert row["honest_score_min"] > row["byzantine_score_max"]
    last = r.series["time"][-1]
    assert last["honest_score_mean"] > 0.8 > 0.3 > last["byzantine_score_mean"]


def test_colluding_majority_is_the_only_way_a_wrong_result_is_accepted(tmp_path):
    """3 colluding liars of 7: a replica set with two of them accepts their lie; the world
    checks (SafetyViolation otherwise) that each such set's liars meet the rule alone."""
    r = run_one(scenario(tmp_path, wrong=3, collude="true", tasks=60, loss=0.0), trace=False)
    row = r.row
    assert r.violation is None
    assert 0 < row["tasks_accepted_wrong"] == row["tasks_byzantine_majority"] < row["tasks_accepted"]
    assert row["honest_score_mean"] > row["byzantine_score_mean"]


def _small_world(behaviours, seed=2, tasks=12, setup=None):
    sim = Simulator(seed)
    net = SimNetwork(sim, LinkSpec(latency=Latency.uniform(0.001, 0.01)))
    setup = setup or FabricSetup(tasks=tasks, tasks_per_s=10.0, submitters=1, replicas=3, capacity_interval_s=1.0)
    return sim, FabricWorld(sim, net, setup, behaviours)


def _run_honest(setup, seed, peers=5):
    """``peers`` honest peers run ``setup`` to the end; returns the world and its metrics row."""
    sim, world = _small_world([Behaviour() for _ in range(peers)], seed=seed, setup=setup)
    with shared_fabric_verification():
        world.start_all()
        sim.run(300.0, world.finished)
    return world, world.metrics()


def test_accepted_certificate_verifies_with_the_real_verifier_and_only_for_its_task():
    sim, world = _small_world([Behaviour() for _ in range(4)] + [make_behaviour("wrong_result")])
    with shared_fabric_verification():
        world.start_all()
        sim.run(100.0, world.finished)
    assert world.finished() and world.violation is None
    accepted = world.example
    assert accepted is not None
    cert, table = accepted.certificate, accepted.table
    name = world.records[accepted.task_id].submitter  # the submitting peer's name
    submitter = next(p.peer_id for p in world.peers if p.name == name)
    verify_task_certificate(cert, table, NETWORK_ID, accepted.task_id, submitter=submitter)  # outside the memo too
    assert set(cert.voters()) <= set(accepted.agreeing) and len(cert.voters()) >= 2
    assert accepted.digest == world.records[accepted.task_id].correct
    with pytest.raises(CertificateError):
        verify_task_certificate(cert, table, NETWORK_ID, accepted.task_id + "x", submitter=submitter)
    with pytest.raises(CertificateError):  # the same task id of another submitter
        verify_task_certificate(cert, table, NETWORK_ID, accepted.task_id,
                                submitter=next(p.peer_id for p in world.peers if p.peer_id != submitter))
    with pytest.raises(CertificateError):
        verify_task_certificate(cert, WeightTable(table.epoch, {**table.weights, world.peers[0].peer_id: 5}),
                                NETWORK_ID, accepted.task_id, submitter=submitter)
    with pytest.raises(CertificateError):
        verify_task_certificate(cert, table, bytes(16), accepted.task_id, submitter=submitter)


def test_an_overload_waits_at_the_submitters_and_blames_no_honest_peer():
    """A burst far beyond the peers' slots: the cores use only the slots the peers advertise free,
    so no replica refuses ``busy`` (was: honest peers scored ``task_disagree`` and their breakers
    opened); what finds no room within queue_timeout_s fails ``no_capacity``."""
    world, row = _run_honest(FabricSetup(tasks=60, tasks_per_s=200.0, submitters=2, replicas=3, task_slots=1,
                                         exec_base_s=0.5, capacity_interval_s=1.0), seed=3)
    assert world.finished() and world.violation is None
    assert row["refused_busy"] == 0 and row["breaker_openings"] == 0 and row["observed_task_disagree"] == 0
    assert row["tasks_accepted"] > 0
    assert row["tasks_accepted"] + row.get("failed_no_capacity", 0) == 60


def test_tasks_that_always_run_past_their_wall_time_fail_deadline_exceeded_and_open_no_breaker():
    """Every run takes longer than the task's wall time (a module that loops): each replica stops
    it at its epoch deadline and refuses ``deadline_exceeded``. The tasks fail with that reason and
    no honest peer's breaker opens (was: every such report counted for the breaker, so the
    submitter's breakers opened for the peers, and the tasks failed ``retries_exhausted``)."""
    world, row = _run_honest(FabricSetup(tasks=8, tasks_per_s=2.0, submitters=1, replicas=2, wall_time_s=1.0,
                                         exec_base_s=3.0, capacity_interval_s=1.0), seed=5)
    assert world.finished() and world.violation is None
    assert row["failed_deadline_exceeded"] == row["tasks_submitted"] == 8 and row["tasks_accepted"] == 0
    assert world.counters["refused_deadline_exceeded"] == row["dispatched"] > 8
    assert row["breaker_openings"] == 0 and row["observed_task_disagree"] == 0 and row["results_returned"] == 0


def test_every_failure_reason_has_a_column_zeros_included(tmp_path):
    """Runs with and without failures write the same failed_<reason> columns (a CSV of a sweep
    used to miss a column where a reason never occurred)."""
    reasons = ("unsatisfiable", "no_capacity", "retries_exhausted", "deadline_exceeded", "no_agreement",
               "vote_timeout", "cancelled", "invalid_ballot", "submitter_crashed")  # TaskFailed's and the world's
    row = run_one(scenario(tmp_path, wrong=1, loss=0.0, tasks=10), trace=False).row
    assert row["tasks_failed"] == 0
    assert {f"failed_{r}": row.get(f"failed_{r}") for r in reasons} == {f"failed_{r}": 0 for r in reasons}


class CountingHonest(Behaviour):
    """Honest, counting the results that pass through the hook."""

    def __init__(self) -> None:
        self.calls = 0

    def task_result(self, ctx, task, result):
        self.calls += 1
        assert result == word_count_task(task.input)
        return result


def test_every_returned_result_goes_through_the_behaviour_hook():
    behaviours = [CountingHonest() for _ in range(5)]
    sim, world = _small_world(behaviours, tasks=10)
    with shared_fabric_verification():
        world.start_all()
        sim.run(100.0, world.finished)
    assert world.counters["results_returned"] == sum(b.calls for b in behaviours) >= 30
    assert world.metrics()["tasks_accepted"] == 10


def test_wrong_result_strategy_and_its_parameters():
    class Ctx:
        import random as _r
        rng = _r.Random(1)

    honest = b"1 2 3 abc\n"
    assert make_behaviour("wrong_result").task_result(Ctx, None, honest) == b"WRONG " + honest
    lies = {make_behaviour("wrong_result", collude=False).task_result(Ctx, None, honest) for _ in range(5)}
    assert len(lies) == 5 and honest not in lies
    assert make_behaviour("wrong_result", probability=0.0).task_result(Ctx, None, honest) == honest
    w = make_behaviour("wrong_result", probability=0.5)
    outs = [w.task_result(Ctx, None, honest) for _ in range(200)]
    assert 50 < outs.count(honest) < 150
    assert isinstance(w, WrongResult) and w.byzantine
    with pytest.raises(ValueError, match="probability"):
        make_behaviour("wrong_result", probability=1.5)
    with pytest.raises(ValueError, match="collude"):
        make_behaviour("wrong_result", collude="yes")
    with pytest.raises(TypeError):
        word_count_task("text")


@pytest.mark.parametrize("extra, field", [
    ("wrong_peers = 6\n", "fabric.wrong_peers"),  # no room beside the 2 submitters
    ('threshold = "1/3"\n', "fabric.threshold"),
    ("replicas = 9\n", "fabric.replicas"),
    ("[fabric.placement]\nmax_retries = -1\n", "fabric.placement.max_retries"),
    ("[fabric.placement]\nbreaker_failures = 0\n", "fabric.placement"),
    ("color = 1\n", "fabric.color"),
])
def test_bad_fabric_scenario_names_the_field(tmp_path, extra, field):
    body = BASE.format(seed=1, peers=7, loss=0.0, tasks=5, wrong=1, collude="true")
    body = body.replace("replicas = 3\n", "") if field == "fabric.replicas" else body
    body = body.replace("wrong_peers = 1\n", "") if field == "fabric.wrong_peers" else body
    path = tmp_path / "bad.toml"
    path.write_text(body + extra)
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    assert info.value.field == field


def test_shipped_scenario_runs_through_the_cli(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "wrong_task_results", "--out", str(out), "--no-progress", "--set", "fabric.tasks=40",
                 "--set", "churn=[]", "--set", "scenario.peers=8"])
    assert code == 0, capsys.readouterr()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["fabric.wrong_collude"] for r in rows] == ["False", "True"]
    assert all(r["tasks_submitted"] == "40" and r["live"] == "True" for r in rows)
    assert rows[0]["tasks_accepted_wrong"] == "0"
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["kind"] == "fabric" and doc["runs"][0]["series"]["time"]
    for name in ("reputation_over_time.png", "tasks_over_time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
