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


def _chimera(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "chimera.node.cli", *argv], capture_output=True, text=True,
                          timeout=120, **kw)


def test_up_checks_its_settings_before_starting_anything(tmp_path):
    out = _chimera("up", "--peers", "2", "--workdir", str(tmp_path / "lab"), "--set", "no_such_field=1")
    assert out.returncode == 2 and "no_such_field" in out.stderr and not (tmp_path / "lab").exists()
    out = _chimera("up", "--peers", "2", "--workdir", str(tmp_path / "lab"), "--set", "probe_interval_s=-1")
    assert out.returncode == 2 and "probe_interval_s" in out.stderr


def test_up_passes_settings_to_every_peer_and_warns_below_a_quorum(tmp_path):
    """`up --set` reaches every peer (the README's training step needs a data shard on each);
    fewer peers than the workdir's validators is said at once (the log commits nothing)."""
    import signal
    import time

    lab = tmp_path / "lab"
    first = subprocess.Popen([sys.executable, "-m", "chimera.node.cli", "up", "--peers", "4", "--workdir", str(lab)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_line(first, "press Ctrl-C")
    first.send_signal(signal.SIGINT)
    first.wait(60)
    proc = subprocess.Popen([sys.executable, "-m", "chimera.node.cli", "up", "--peers", "2", "--workdir", str(lab),
                             "--set", "fabric_task_slots=3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = _wait_for_line(proc, "press Ctrl-C")
    try:
        assert "warning: the network has 4 genesis validators and 2 peers start: the log commits nothing" in seen
        from chimera.node import admin

        deadline = time.monotonic() + 30
        while True:
            try:
                limits = admin.call(lab / "peer-1", "status", timeout_s=5)["limits"]
                break
            except admin.AdminError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert limits["fabric_task_slots"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def _wait_for_line(proc, marker: str, timeout_s: float = 120.0) -> str:
    import time

    seen, deadline = "", time.monotonic() + timeout_s
    while marker not in seen:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, seen
        seen += line
    return seen


def test_help_says_each_options_default_but_not_for_flags():
    text = _chimera("task", "submit", "--help").stdout
    assert "fuel units per run (default: 1000000000)" in text and "GPUs per replica (0..64) (default: 0)" in text
    assert "(default: False)" not in text and "(default: None)" not in text
    assert "stops at the first that fails" in " ".join(_chimera("shell", "--help").stdout.split())
