"""The scenario command line: run writes CSV/JSON/PNG, search stops at a violation,
bad scenario files name the field; every shipped scenario file is valid."""

from __future__ import annotations

import csv
import json

import pytest

from chimera.simulations.cli import main
from chimera.simulations.scenario import SCENARIO_DIR, ScenarioError, load_scenarios


def test_run_writes_metrics_plots_and_trace(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "commit_latency", "--peers", "4", "--seed", "3", "--out", str(out),
                 "--set", "bft.target_heights=5", "--no-progress"])
    assert code == 0, capsys.readouterr()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 1 and rows[0]["peers"] == "4" and rows[0]["live"] == "True"
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["scenario"] == "commit-latency" and doc["runs"][0]["violation"] is None
    for name in ("commit_latency.png", "frames_per_height.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "trace-0.txt").read_text().count("\n") > 100
    assert doc["runs"][0]["trace_sha256"]


def test_membership_sweep_writes_one_row_per_point(tmp_path, capsys):
    out = tmp_path / "swim"
    code = main(["run", "swim_loss", "--peers", "6", "--out", str(out), "--set", "scenario.duration_s=40",
                 "--set", 'network.loss=0.05', "--no-progress"])
    assert code == 0, capsys.readouterr()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["membership.lifeguard"] for r in rows] == ["True", "False"]
    assert all(float(r["detect_first_suspect_s"]) > 0 for r in rows)
    assert (out / "detection_time.png").exists() and (out / "false_suspicion.png").exists()


def test_search_cli_reports_no_violation_for_the_real_core(tmp_path, capsys):
    code = main(["search", "mutant_hunt", "--seeds", "2", "--first-seed", "40", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    assert "no violation in 2 seeds" in capsys.readouterr().out


@pytest.mark.parametrize("body, field", [
    ('[scenario]\nname="x"\nkind="bft"\n[network]\nloss=1.5\n', "network.loss"),
    ('[scenario]\nname="x"\nkind="bft"\n[network]\nlatency={kind="gamma"}\n', "network.latency.kind"),
    ('[scenario]\nname="x"\nkind="bft"\n[[churn]]\nat_s=1\naction="explode"\ncount=1\n', "churn[0].action"),
    ('[scenario]\nname="x"\nkind="bft"\n[bft]\ntarget_heights=0\n', "bft.target_heights"),
    ('[scenario]\nname="x"\nkind="bft"\n[bft.config]\nmax_batch=0\n', "bft.config"),
    ('[scenario]\nname="x"\nkind="bft"\nlosss=1\n', "scenario.losss"),
    ('[scenario]\nkind="bft"\n', "scenario.name"),
    ('[scenario]\nname="x"\nkind="bft"\npeers=4\n[[partitions]]\nstart_s=2\nend_s=1\nsplit=0.5\n', "partitions[0].end_s"),
    ('[scenario]\nname="x"\nkind="bft"\n[byzantine]\nstrategies=["evil"]\n', "byzantine.strategies"),
    ('[scenario]\nname="x"\nkind="bft"\n[sweep]\n"scenario.peers"=[]\n', "sweep.scenario.peers"),
    ('[scenario]\nname="x"\nkind="membership"\npeers=20\n[membership.config]\nmax_members=10\n',
     "membership.warm_start"),  # a converged start holds 19 members: more than a table takes
])
def test_bad_scenario_names_the_field(tmp_path, capsys, body, field):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    assert info.value.field == field and f"'{field}'" in str(info.value)
    assert main(["run", str(path), "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert field in capsys.readouterr().err


def test_shipped_scenarios_are_valid():
    names = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
    assert {"commit_latency", "byzantine_partition", "swim_loss", "mutant_hunt"} <= set(names)
    for name in names:
        assert load_scenarios(name)


def test_a_shipped_scenario_has_one_name_in_either_spelling():
    """The files are commit_latency.toml, the scenarios and their output folders commit-latency:
    `run commit-latency` was 'no such file'. Each spelling (with or without .toml) finds the
    file, and the name inside each file is the one `list` shows."""
    from chimera.simulations.scenario import resolve_path, shipped_name, shipped_names

    for path in SCENARIO_DIR.glob("*.toml"):
        name = shipped_name(path)
        assert "_" not in name and load_scenarios(path)[0].name == name, path  # the name inside the file
        for spelling in (name, path.stem, f"{name}.toml", path.name):
            assert resolve_path(spelling) == path, spelling
    assert "commit-latency" in shipped_names() and "commit_latency" not in shipped_names()
    with pytest.raises(ScenarioError, match="shipped scenarios: byzantine-partition, commit-latency"):
        resolve_path("commit-latencyy")


def test_chimera_simulate_is_the_simulator_through_the_plugin_entry_point(tmp_path, capsys):
    """`chimera simulate SCENARIO` reaches the simulator without the node importing it."""
    import subprocess
    import sys

    from chimera.node.cli import main as chimera_main, plugin_commands

    assert plugin_commands()["simulate"].value == "chimera.simulations.cli:main"
    assert chimera_main(["simulate", "list"]) == 0
    listed = capsys.readouterr().out
    assert "commit-latency " in listed and "commit_latency" not in listed  # the name run and sim-out/ use
    out = tmp_path / "out"
    rc = chimera_main(["simulate", "swim-loss", "--no-progress", "--out", str(out),
                       "--set", "scenario.duration_s=3", "--set", "sweep={}"])
    assert rc == 0 and (out / "metrics.csv").exists()
    # from a fresh process too; an unknown scenario is bad usage (exit status 2)
    proc = subprocess.run([sys.executable, "-m", "chimera.node.cli", "simulate", "no-such-scenario"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no-such-scenario" in proc.stderr


SWIM4 = """
[scenario]
name = "swim4"
kind = "membership"
peers = 4
duration_s = 15.0
[sweep]
"network.loss" = [0.0, 0.01]
"""


def test_search_replay_command_reproduces_the_failing_run(tmp_path, capsys):
    """The printed replay line and violation.json's replay, split by a shell, are a `run`
    that repeats the failing seed's run (its --set overrides and sweep point included)."""
    import shlex

    path = tmp_path / "swim 4.toml"  # a space: the replay must quote it
    path.write_text(SWIM4)
    code = main(["search", str(path), "--seeds", "3", "--first-seed", "5", "--out", str(tmp_path / "s"),
                 "--no-progress", "--set", "partitions=[{start_s = 2.0, end_s = 1000.0, groups = [[0, 1]]}]",
                 "--set", "scenario.description=\"it's a \\\"cut\\\"\""])
    out = capsys.readouterr().out
    assert code == 1, out
    doc = json.loads((tmp_path / "s" / "violation.json").read_text())
    assert doc["seed"] == 5 and doc["violation"].startswith("membership:")
    assert doc["overrides"]["partitions"] == [{"start_s": 2.0, "end_s": 1000.0, "groups": [[0, 1]]}]
    assert doc["overrides"]["network.loss"] == 0.0  # the searched sweep point
    printed = next(line for line in out.splitlines() if line.startswith("replay: "))[len("replay: "):]
    for k, command in enumerate((printed, doc["replay"])):
        argv = shlex.split(command)
        assert argv[:4] == ["python", "-m", "chimera.simulations", "run"] and argv[4] == str(path)
        replay_out = tmp_path / f"replay{k}"
        assert main([*argv[4:], "--out", str(replay_out), "--no-progress"]) == 1  # the violation again
        runs = json.loads((replay_out / "metrics.json").read_text())["runs"]
        assert len(runs) == 1 and runs[0]["trace_sha256"] == doc["trace_sha256"]
        assert runs[0]["violation"] == doc["violation"]


def test_a_membership_violation_fails_run_as_it_fails_search(tmp_path, capsys):
    path = tmp_path / "cut.toml"
    path.write_text(SWIM4 + "[[partitions]]\nstart_s = 2.0\nend_s = 1000.0\ngroups = [[0, 1]]\n")
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "membership: a live peer is seen as failed" in capsys.readouterr().err
    assert main(["search", str(path), "--seeds", "1", "--out", str(tmp_path / "s"), "--no-progress"]) == 1


@pytest.mark.parametrize("output, field, problem", [
    ('[[output.tables]]\nrows="seed"\ncolumns="peers"\nvalue="probes"\nfile="metrics.md"\n',
     "output.tables[0].file", "metrics.csv"),
    ('[[output.tables]]\nrows="seed"\ncolumns="peers"\nvalue="probes"\nfile="../t.md"\n',
     "output.tables[0].file", "no path"),
    ('[[output.plots]]\nx="peers"\ny="probes"\nfile="sub/p.png"\n', "output.plots[0].file", "no path"),
    ('[[output.plots]]\nx="peers"\ny="probes"\nfile="reputation.png"\n', "output.plots[0].file", "reputation.png"),
    ('[[output.plots]]\nx="peers"\ny="probes"\nfile="a.png"\n[[output.plots]]\nx="peers"\ny="probes"\nfile="A.png"\n',
     "output.plots[1].file", "a.png"),
    ('[[output.tables]]\nrows="seed"\ncolumns="peers"\nvalue="probes"\nfile="t.md"\n'
     '[[output.tables]]\nrows="seed"\ncolumns="peers"\nvalue="probes"\nfile="t.md"\n', "output.tables[1].file", "t.md"),
])
def test_output_files_cannot_overwrite_each_other_or_leave_the_folder(tmp_path, capsys, output, field, problem):
    path = tmp_path / "o.toml"
    path.write_text(SWIM4 + output)
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    assert info.value.field == field and problem in info.value.problem
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("output, field", [
    ('[[output.plots]]\nx="peerz"\ny="probes"\n', "output.plots[0].x"),
    ('[[output.plots]]\nx="peers"\ny=["probes", "no_such_metric"]\n', "output.plots[0].y"),
    ('[[output.tables]]\nrows="seed"\ncolumns="network.loss"\nvalue="no_such_metric"\n', "output.tables[0].value"),
])
def test_a_plot_or_table_of_a_metric_no_run_has_is_an_error(tmp_path, capsys, output, field):
    path = tmp_path / "m.toml"
    path.write_text(SWIM4.replace("duration_s = 15.0", "duration_s = 2.0") + output)
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"'{field}'" in err and "no run produced" in err and "Traceback" not in err
    assert (tmp_path / "o" / "metrics.csv").exists()  # the runs' metrics are kept


BFT4 = '[scenario]\nname="b"\nkind="bft"\npeers=4\nduration_s=20.0\n[bft]\ntarget_heights=3\n'


@pytest.mark.parametrize("body", [
    BFT4 + '[byzantine]\nstrategies=["silent", "equivocate"]\n',
    BFT4 + '[sweep]\n"scenario.peers"=[7, 4]\n[byzantine]\nstrategies=["silent", "silent"]\n',
    BFT4 + 'weights=[100, 100, 100, 400]\n[byzantine]\nstrategies=["silent"]\n',
])
def test_byzantine_weight_of_a_third_is_refused_when_loaded(tmp_path, capsys, body):
    path = tmp_path / "byz.toml"
    path.write_text(body)
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    assert info.value.field == "byzantine.strategies" and "1/3" in str(info.value)
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "byz.toml: field 'byzantine.strategies'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # no run was made


def test_random_byzantine_weight_is_checked_for_every_point_before_the_first_run(tmp_path, capsys):
    from chimera.simulations.runner import check_layout

    path = tmp_path / "rnd.toml"
    path.write_text(BFT4 + 'weights="random"\n[byzantine]\nstrategies=["silent"]\n')
    refused = [_layout_refused(check_layout, load_scenarios(path, {"scenario.seed": s})[0]) for s in range(40)]
    bad, good = refused.index(True), refused.index(False)
    path.write_text(path.read_text() + f'[sweep]\n"scenario.seed" = [{good}, {bad}]\n')
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "rnd.toml: field 'bft.weights'" in err and f"seed {bad}" in err and "1/3" in err
    assert not (tmp_path / "o" / "metrics.csv").exists()  # refused before the first (good) point ran


def _layout_refused(check, sc) -> bool:
    try:
        check(sc)
    except ScenarioError:
        return True
    return False


@pytest.mark.parametrize("body, field", [
    (BFT4 + "[clock]\nmax_offset_ms = 1e300\n", "clock.max_offset_ms"),
    (BFT4.replace("duration_s=20.0", "duration_s=1e300"), "scenario.duration_s"),
    (BFT4 + "[network]\nlatency = { kind = \"constant\", ms = 1e300 }\n", "network.latency.ms"),
    (BFT4 + "[network]\nreorder_delay_ms = 1e300\n", "network.reorder_delay_ms"),
    (BFT4 + "[slow]\nfraction = 0.5\ndelay_ms = 1e300\n", "slow.delay_ms"),
    (BFT4 + "[[churn]]\nat_s = 1e300\naction = \"crash\"\ncount = 1\n", "churn[0].at_s"),
    (BFT4 + "[[partitions]]\nstart_s = 1.0\nend_s = 1e300\nsplit = 0.5\n", "partitions[0].end_s"),
    (BFT4.replace("target_heights=3", "target_heights=3\nvalues_per_s=1e300"), "bft.values_per_s"),
    (BFT4.replace("target_heights=3", "target_heights=3\nweights=[1, 1, 1, 1000000000000]"), "bft.weights"),
    (BFT4 + "[bft.config]\npropose_timeout_s = 1e300\n", "bft.config.propose_timeout_s"),
    (BFT4.replace("peers=4", "peers=4\nseed=100000000000000000000"), "scenario.seed"),
])
def test_numeric_fields_have_upper_bounds(tmp_path, capsys, body, field):
    path = tmp_path / "big.toml"
    path.write_text(body)
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"field '{field}'" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_directory_is_not_a_scenario(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert main(["run", str(tmp_path / "d"), "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_sweep_axis_can_be_set_from_the_command_line():
    """``--set sweep.FIELD=[...]`` (quoted or not) was silently ignored: it landed in the
    document after the sweep had been expanded (5 runs of commit_latency instead of 1)."""
    assert len(load_scenarios("commit_latency")) > 1
    for key in ("sweep.scenario.peers", 'sweep."scenario.peers"'):
        points = load_scenarios("commit_latency", {key: [4]})
        assert len(points) == 1 and points[0].peers == 4 and points[0].sweep_values == {"scenario.peers": 4}
    with pytest.raises(ScenarioError, match="non-empty list"):
        load_scenarios("commit_latency", {"sweep.scenario.peers": []})


@pytest.mark.parametrize("first, seeds", [(-2, 1), (2**63 - 1, 2)])
def test_search_refuses_seeds_that_run_would_refuse(tmp_path, capsys, first, seeds):
    """``search --first-seed -2`` ran and printed a replay command that ``run --seed -2`` refuses
    (and Random(-2) is Random(2): a repeated seed)."""
    assert main(["search", "mutant_hunt", "--seeds", str(seeds), "--first-seed", str(first),
                 "--out", str(tmp_path), "--no-progress"]) == 2
    assert "seeds must be within 0 .. " in capsys.readouterr().err
