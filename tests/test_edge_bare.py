"""A peer installed WITHOUT any extra (``pip install chimera-mesh`` into a fresh venv).

The venv is created here from this checkout (non-editable install, core
dependencies from the package index, as on a Raspberry Pi). Its peer joins a
peer of the test's own installation over loopback and reports what it lacks
(scikit-learn, prometheus_client, uvloop, matplotlib) with the install hint,
instead of failing at import. The simulator still runs without matplotlib
(metrics, no plots).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_until

REPO = Path(__file__).resolve().parents[1]
EXTRA_MODULES = {"sklearn": "learn", "prometheus_client": "metrics", "uvloop": "fast", "matplotlib": "sim"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           str(REPO)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"pip install of the bare peer failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return venv


def test_bare_install_has_no_extras(bare_venv: Path):
    py = str(bare_venv / "bin" / "python")
    code = ("import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None "
            f"for m in {sorted(EXTRA_MODULES)!r}}}))")
    found = json.loads(subprocess.run([py, "-c", code], capture_output=True, text=True, check=True,
                                      cwd=bare_venv, timeout=120).stdout)
    assert not any(found.values()), f"the bare install pulled in an extra: {found}"
    # the installed package is the bare venv's own copy, not this checkout
    where = subprocess.run([py, "-c", "import chimera.node, sys; print(chimera.node.__file__)"],
                           capture_output=True, text=True, check=True, cwd=bare_venv, timeout=120).stdout
    assert str(bare_venv) in where


def test_bare_peer_joins_and_reports_missing_capabilities(bare_venv: Path, tmp_path: Path):
    from chimera.node.launcher import LocalNetwork

    net = LocalNetwork(tmp_path / "net", 2, extra_args=["--set", "probe_interval_s=0.3",
                                                        "--set", "probe_timeout_s=0.1"], name="bare")
    net.peers[1].python = str(bare_venv / "bin" / "python")
    try:
        net.start(timeout_s=120)
        assert net.wait_for(net.full_mesh, timeout_s=60), "the bare peer did not join"
        chimera = str(bare_venv / "bin" / "chimera")
        out = subprocess.run([chimera, "status", "--json", "--data-dir", str(net.peers[1].data_dir)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        features = json.loads(out.stdout)["result"]["features"]
        for name, extra in (("federated_training", "learn"), ("prometheus_metrics", "metrics"),
                            ("fast_event_loop", "fast"), ("simulator_plots", "sim")):
            assert features[name]["available"] is False, name
            assert f"pip install 'chimera-mesh[{extra}]'" in features[name]["detail"], features[name]
        text = subprocess.run([chimera, "status", "--data-dir", str(net.peers[1].data_dir)],
                              capture_output=True, text=True, timeout=60).stdout
        assert "optional     federated_training: no" in text
        # the consensus log works on the bare peer (core, not an extra)
        res = net.query(1, "propose", {"data": "from the bare peer", "timeout_s": 60})
        assert res["height"] >= 1
        assert wait_until(lambda: any(r["data_text"] == "from the bare peer"
                                      for r in net.query(0, "log", {"limit": 50})["decisions"]), 60)
    finally:
        net.stop()


def test_bare_simulator_runs_without_plots(bare_venv: Path, tmp_path: Path):
    chimera = str(bare_venv / "bin" / "chimera")
    proc = subprocess.run([chimera, "simulate", "swim_loss", "--no-progress", "--out", str(tmp_path / "out"),
                           "--set", "scenario.duration_s=3", "--set", "sweep={}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "metrics.csv").exists()
    assert "matplotlib is not installed (pip install 'chimera-mesh[sim]')" in proc.stderr
    assert "Traceback" not in proc.stderr
