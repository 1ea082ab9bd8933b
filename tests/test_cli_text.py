"""Text output of the CLI and the shell: readable times with their UTC offset, headed tables,
table cells cut to a width, empty values refused before a node is asked."""

from __future__ import annotations

import re
import subprocess
import sys

from chimera.node.logs import local_time_text
from chimera.node.shell import _clip_cell, audit_text, event_line, log_text, status_text

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
    assert _clip_cell("x" * 300, 60) == "x" * 59 + "…" and _clip_cell("short", 60) == "short"
    row = {"at_ms": 0, "who": "local-owner uid=0", "transport": "local", "role": "admin", "command": "train_start",
           "args": {"job": "j" * 500}, "result": "error: " + "e" * 300, "count": 1, "duration_s": 0.01}
    text = audit_text([row])
    assert max(len(line) for line in text.splitlines()) < 230 and "COUNT" in text.splitlines()[0]


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


def test_status_text_is_the_same_in_the_cli_and_the_shell_and_wraps_its_limits():
    from chimera.node.shell import render

    s = {"peer_id": "p" * 52, "contact": "chm://x", "network": "lab", "network_fingerprint": "sha256:ab",
         "incarnation": 3, "profile": "default", "pid": 42, "uptime_s": 1.5, "rss_bytes": 57 << 20,
         "members": {"alive": 3, "suspect": 0}, "mdns": False, "local_health": 0,
         "limits": {f"setting_number_{i}": 1000 * i for i in range(14)}, "features": {},
         "counters": {"drop_replay": 2}, "consensus": None}
    text = status_text(s)
    assert render("status", s) == text
    assert "RSS 57.0 MiB" in text and "mdns         off" in text and "drops        replay=2" in text
    limits = [line for line in text.splitlines() if "setting_number_" in line]
    assert len(limits) > 1 and all(len(line) <= 101 for line in limits), limits  # was one 300-character line
    assert text.count("setting_number_") == 14
