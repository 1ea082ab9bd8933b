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
        assert "warning: 2 of the network's 4 genesis validators run: the log commits nothing" in seen
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


_READERS: dict = {}  # a process -> the queue its stdout lines go to (read on a thread)


def _wait_for_line(proc, marker: str, timeout_s: float = 120.0) -> str:
    """What ``proc`` printed up to and with the first line holding ``marker``; fails after
    ``timeout_s`` seconds with what was read (a blocking readline hung the test)."""
    import queue
    import threading
    import time

    if proc not in _READERS:
        lines = _READERS[proc] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put("")],
                         daemon=True).start()
    seen, deadline = "", time.monotonic() + timeout_s
    while marker not in seen:
        try:
            line = _READERS[proc].get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        assert line, f"no {marker!r} within {timeout_s:g} s (or the output ended): {seen}"
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


def test_old_option_spellings_still_work_and_help_shows_the_new():
    """The CLI said --agreement and --timeout where the shell, the admin API and the task's own
    fields say rule and timeout_s (and the other options carry their unit: --timeout-s, --wait-s).
    The new names are the ones --help shows; scripts with the old spelling keep working."""
    from chimera.node.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["task", "submit", "m.wasm", "--agreement", "unanimous"]).rule == "unanimous"
    assert parser.parse_args(["task", "submit", "m.wasm", "--rule", "quorum"]).rule == "quorum"
    assert parser.parse_args(["task", "submit", "m.wasm"]).rule == "majority"
    assert parser.parse_args(["propose", "v", "--timeout", "5"]).timeout_s == 5.0
    assert parser.parse_args(["propose", "v"]).timeout_s == 30.0
    assert parser.parse_args(["train", "start", "j.toml", "--timeout", "7"]).timeout_s == 7.0
    assert parser.parse_args(["shell", "--timeout", "3"]).timeout_s == 3.0
    assert parser.parse_args(["shell", "--timeout-s", "4"]).timeout_s == 4.0
    for argv, new, old in ((["task", "submit"], "--rule", "--agreement"), (["propose"], "--timeout-s", "--timeout "),
                           (["train", "start"], "--timeout-s", "--timeout "), (["shell"], "--timeout-s", "--timeout ")):
        text = _chimera(*argv, "--help").stdout
        assert new in text and old not in text, text
    out = _chimera("task", "submit", "m.wasm", "--agreement", "most")  # the old spelling is checked as the new
    assert out.returncode == 2 and "invalid choice: 'most'" in out.stderr


def test_the_cli_prints_what_the_shell_shows(node_answers, capsys):
    """`chimera agent list`, `task status`, `reputation`, `admin key list` had their own tables
    (NAME VERSION ..., PEER ID WEIGHT SHARE LOCAL) and the shell a generic dump of the same
    answers (agents: ... a JSON line per row). Both print the shell's view now."""
    from chimera.node import cli
    from chimera.node.shell import heading, render

    agents = {"agents": [{"name": "wf", "version": "1", "kind": "task", "state": "running",
                          "module_sha256": "ab" * 32, "handled": 12, "errors": 0, "queued": 0},
                         {"name": "pp", "version": "2", "kind": "actor", "state": "failed",
                          "module_sha256": "cd" * 32, "handled": 3, "errors": 1, "queued": 0, "failure": "trap"}]}
    tasks = {"fabric": {"task_slots": 2, "tasks_running": 1, "peers_with_capacity": ["p"]},
             "observations": [], "tasks": [{"task_id": "t1", "state": "accepted", "requirements": {"replicas": 3},
                                            "placement": [{"peer_id": "q" * 52}]}]}
    rep = {"epoch": 2, "total_weight": 300, "height": 17,
           "peers": [{"peer_id": "p" * 52, "weight": 100, "share": 1 / 3, "local_score": 0.75, "me": True,
                      "joining": False}]}
    for argv, cmd, answer in ((["agent", "list"], "agents_list", agents), (["task", "status"], "tasks_status", tasks),
                              (["reputation"], "reputation", rep)):
        node_answers["answers"] = [answer]
        code, out = cli.main(argv), capsys.readouterr().out
        assert code == 0 and out == render(cmd, answer) + "\n", out
    lines = render("agents_list", agents).splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "KIND", "STATE", "MODULE", "HANDLED", "ERRORS", "QUEUED"]
    assert lines[1].split()[:5] == ["wf", "1", "task", "running", "ab" * 6] and lines[-1] == "  pp not running: trap"
    assert render("tasks_status", tasks).splitlines()[0].split() == ["TASK", "ID", "STATE", "REPLICAS", "PEERS"]
    assert render("reputation", rep).splitlines()[1].split() == ["PEER", "ID", "WEIGHT", "SHARE", "LOCAL", "SCORE",
                                                                 "NOTE"]
    # the shell's own views of answers the CLI has no command for: tables, not nested key dumps
    assert render("modules_list", {"modules": [{"sha256": "ab" * 32, "size_bytes": 1234, "fetched": True}],
                                   "total_bytes": 1234}).splitlines()[0].split() == ["SHA256", "SIZE", "bytes",
                                                                                     "FETCHED"]
    res = render("resources", {"peer_id": "a" * 52, "own": {"summary": "2 cpu"},
                               "peers": {"b" * 52: {"summary": "4 cpu", "breaker": "open", "expires_in_s": 9.5}}})
    assert [line.split()[:3] for line in res.splitlines()] == [
        ["PEER", "ID", "BREAKER"], ["a" * 52, "self", "-"], ["b" * 52, "open", "9.5"]]
    assert [heading(c) for c in ("peer_id", "rtt_ms", "last_seen_s", "duration_s", "size_bytes")] == [
        "PEER ID", "RTT ms", "SEEN s", "DURATION s", "SIZE bytes"]


def test_peers_have_the_same_columns_in_the_cli_and_the_shell():
    """`chimera peers` showed PEER ID STATE INC RTT ms SEEN s ADDRESS, the shell PEER_ID ADDRESS
    STATE REPUTATION PROFILE RESOURCES RTT_MS LAST_SEEN_S: one table now, numbers right-aligned."""
    from chimera.node.shell import peers_text, render

    rows = [{"peer_id": "p" * 52, "state": "alive", "incarnation": 3, "rtt_ms": 0.512, "last_seen_s": 1.25,
             "addresses": ["tcp://10.0.0.2:7420"], "profile": "edge", "resources": "4 cpu load 0.10"}]
    extra = {"self": {"peer_id": "s" * 52, "state": "self", "incarnation": 1, "addresses": ["tcp://10.0.0.1:7420"],
                      "profile": "default", "rtt_ms": None, "last_seen_s": None},
             "weights": {"p" * 52: 100, "s" * 52: 100}}
    text = render("peers", rows, extra)
    assert peers_text(rows, extra) == text
    head, me, peer = text.splitlines()
    assert head.split() == ["PEER", "ID", "STATE", "INC", "RTT", "ms", "SEEN", "s", "WEIGHT", "PROFILE",
                            "RESOURCES", "ADDRESS"]
    assert me.split()[:5] == ["s" * 52, "self", "1", "-", "-"]
    assert peer.split()[:7] == ["p" * 52, "alive", "3", "0.512", "1.25", "100", "edge"]
    assert peer.index("0.512") + len("0.512") == head.index("RTT ms") + len("RTT ms")  # right-aligned
    assert render("peers", []) == "no peers known yet"


def test_json_output_is_the_shells_line(node_answers, capsys):
    """`chimera X --json` wrote bytes as Python reprs ("b'\\x01\\xff'") with spaced separators, the
    shell's --json hex and compact: one writer for both now (errors too)."""
    from chimera.node import cli
    from chimera.node.shell import json_line

    answer = {"agents": [], "blob": b"\x01\xff"}
    node_answers["answers"] = [answer]
    assert cli.main(["agent", "list", "--json"]) == 0
    out = capsys.readouterr().out
    assert out == json_line({"ok": True, "result": answer}) + "\n" and '"blob":"01ff"' in out, out
    out = _chimera("propose", "", "--json", "--data-dir", "/nonexistent")
    assert out.returncode == 2 and out.stdout == json_line({"ok": False, "error": "the decision to propose is empty",
                                                            "code": 2}) + "\n", out.stdout


def test_resources_show_the_slots_placement_trusts_for_a_peer_that_refused_advertised_room():
    """A peer that refused room it advertised is counted on for fewer task slots until it
    recovers (PROTOCOL §18.4): the table says how many of how many; trusted peers show none."""
    from chimera.node.shell import resources_text

    res = {"peer_id": "me", "own": {"summary": "4 cpu"},
           "peers": {"liar": {"summary": "8 cpu", "breaker": "closed", "expires_in_s": 3.5,
                              "task_slots": 4, "task_slots_trusted": 1},
                     "honest": {"summary": "2 cpu", "breaker": "closed", "expires_in_s": 2.0,
                                "task_slots": 2, "task_slots_trusted": 2}}}
    lines = resources_text(res).splitlines()
    assert lines[0].split()[:7] == ["PEER", "ID", "BREAKER", "EXPIRES", "IN", "s", "SLOTS"]
    liar = next(line for line in lines if line.startswith("liar"))
    honest = next(line for line in lines if line.startswith("honest"))
    assert "1/4" in liar and "/" not in honest
