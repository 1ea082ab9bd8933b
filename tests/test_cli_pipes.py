"""A closed pipe on stdout (``chimera log | head``) ends a command quietly: exit status 141
(128 + SIGPIPE, as for tools a closed pipe kills), no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("argv", [
    ["chimera.node.cli", "--help"],
    ["chimera.node.cli", "resources"],
    ["chimera.simulations", "list"],
])
def test_a_reader_that_goes_away_gives_no_traceback(argv):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", *argv], stdout=write_end, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=60, text=True)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-800:]
    assert proc.returncode in (0, 141), (proc.returncode, proc.stderr[-300:])
