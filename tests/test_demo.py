"""The README's main command, end to end: `chimera demo` (4 peer processes: mesh, BFT commits,
a SIGKILL and catch-up, reputation, federated training, WASM agents) exits 0 with its report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_demo_runs_to_its_report_and_exits_0(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "chimera.node", "demo", "--workdir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=420)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for line in ("identical on all 4 peers: True", "same model on all peers: True", "graceful stop"):
        assert line in out, out[-4000:]
