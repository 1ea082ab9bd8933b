"""Text output of the CLI and the shell: readable times with their UTC offset, headed tables,
table cells cut to a width, empty values refused before a node is asked."""

from __future__ import annotations

import re
import subprocess
import sys

from chimera.node.cli_admin import _clip
from chimera.node.logs import local_time_text
from chimera.node.shell import event_line, log_text

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}"


def test_event_lines_show_local_time_with_offset_and_priority():
    line = event_line({"at_ms": 1_796_196_208_716, "kind": "peer_joined", "peer_id": "p" * 52,
                       "priority": "info", "incarnation": 3})
    assert re.match(STAMP + r"  info +peer_joined +p{52} incarnation=3$", line), line  # was raw epoch ms
    assert re.fullmatch(STAMP, local_time_text(0))


def test_the_log_is_a_headed_table():
    text = log_text({"height": 7, "decisions": [{"height": 3, "index": 0, "author": "a" * 52,
                                                 "data_text": "deploy v2"}]})
    lines = text.splitlines()
    assert lines[0] == "height 7"
    assert lines[1].split() == ["HEIGHT", "IDX", "AUTHOR", "DATA"]
    assert lines[2].split() == ["3", "0", "a" * 16, "deploy", "v2"]  # was "3.0  aaaa...": a float?
    assert log_text({"height": 1, "decisions": []}).splitlines()[1] == "no decisions committed yet"


def test_audit_cells_are_clipped_for_the_table():
    assert _clip("x" * 300, 60) == "x" * 59 + "…" and _clip("short", 60) == "short"


def test_an_empty_proposal_is_a_usage_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "chimera.node.cli", "propose", "", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "empty" in out.stderr, (out.returncode, out.stderr)
