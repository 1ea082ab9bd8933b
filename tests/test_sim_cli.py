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


def test_chimera_simulate_is_the_simulator_through_the_plugin_entry_point(tmp_path, capsys):
    """`chimera simulate SCENARIO` reaches the simulator without the node importing it."""
    import subprocess
    import sys

    from chimera.node.cli import main as chimera_main, plugin_commands

    assert plugin_commands()["simulate"].value == "chimera.simulations.cli:main"
    assert chimera_main(["simulate", "list"]) == 0
    assert "commit_latency" in capsys.readouterr().out
    out = tmp_path / "out"
    rc = chimera_main(["simulate", "swim_loss", "--no-progress", "--out", str(out),
                       "--set", "scenario.duration_s=3", "--set", "sweep={}"])
    assert rc == 0 and (out / "metrics.csv").exists()
    # from a fresh process too; an unknown scenario is bad usage (exit status 2)
    proc = subprocess.run([sys.executable, "-m", "chimera.node.cli", "simulate", "no-such-scenario"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no-such-scenario" in proc.stderr
