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


def test_piped_demo_output_is_as_wide_as_its_content(monkeypatch):
    """Piped with COLUMNS unset, the demo's console was fixed at 160 columns: every rule was 160
    characters of '─' and a wider table wrapped its cells, splitting peer ids. Now rules are 80
    columns and lines and tables are as wide as their content, whole; COLUMNS still wins."""
    import io

    from rich.table import Table

    from chimera.node.demo import demo_console

    monkeypatch.delenv("COLUMNS", raising=False)
    ids = [chr(ord("a") + k) * 52 for k in range(4)]
    out = io.StringIO()
    console = demo_console(out)
    console.rule("[bold]Chimera Mesh demo")
    table = Table(title="report", show_header=False)
    table.add_row("peers", " ".join(ids))
    console.print(table)
    console.print(f"e.g. chimera shell /tmp/{'d' * 150} -c \"peers\"")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("── Chimera Mesh demo ─") and len(lines[0]) == 80, lines[0]
    assert any(" ".join(ids) in line for line in lines), lines  # one cell, not wrapped
    assert f"/tmp/{'d' * 150} -c \"peers\"" in lines[-1]
    assert max(len(line.rstrip()) for line in lines) < 260
    monkeypatch.setenv("COLUMNS", "100")
    assert demo_console(io.StringIO()).width == 100
