"""The ``chimera`` command's argument checks and exit codes (README: 0 success, 1 runtime failure,
2 usage or configuration error, 3 no node answered; errors one line on stderr, never a traceback).

Most checks need no node: argparse (or the command, before anything is created) rejects first.
Node answers are stood in for by replacing ``cli._call``; systemd by scripts on ``PATH``.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chimera.node import cli, cli_fabric, cli_train, service
from chimera.node.launcher import MAX_LOCAL_PEERS, LaunchError, LocalNetwork, weight_quorum_warning


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_node(monkeypatch):
    """Fail the test if a command got as far as asking a node."""

    def call(*a, **kw):
        raise AssertionError(f"reached the node: {a[1:]}")

    monkeypatch.setattr(cli, "_call", call)


@pytest.fixture
def wasm(tmp_path: Path) -> Path:
    path = tmp_path / "m.wasm"
    path.write_bytes(b"\0asm\1\0\0\0")
    (tmp_path / "in.txt").write_text("hi")
    return path


HUGE = "99999999999999999999999"
BAD_ARGS = [
    *[["task", "submit", "{wasm}", "--wait", "--wait-s", v] for v in ("nan", "inf", "-inf", "0", "-1", "3601", "x")],
    *[["task", "submit", "{wasm}", "--fuel", v] for v in (HUGE, "0", "-5", "1.5", "9" * 5000)],
    *[["task", "submit", "{wasm}", "--replicas", v] for v in ("0", "65", HUGE)],
    ["task", "submit", "{wasm}", "--gpus", "-1"],
    ["task", "submit", "{wasm}", "--gpus", "65"],
    ["task", "submit", "{wasm}", "--memory-mib", "0"],
    ["task", "submit", "{wasm}", "--memory-mib", HUGE],
    ["task", "submit", "{wasm}", "--timeout-s", "nan"],
    ["task", "submit", "{wasm}", "--timeout-s", "0"],
    ["task", "submit", "{wasm}", "--input", "{tmp}/in.txt", "--text", "T"],
    *[["task", "status", "--limit", v] for v in (HUGE, "0", "-1", "257", "abc")],
    *[["train", "status", "--follow", "--interval", v] for v in ("-1", "0", "0.1", "nan", "inf")],
    ["train", "start", "job.toml", "--timeout", "inf"],
    ["train", "start", "job.toml", "--timeout", "0"],
    ["agent", "call", "x", "--reply-wait-s", "-1"],
    ["agent", "call", "x", "--reply-wait-s", "nan"],
]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=lambda a: " ".join(x[:12] for x in a))
def test_bad_arguments_are_usage_errors(argv, tmp_path, wasm, capsys, no_node):
    argv = [a.format(wasm=wasm, tmp=tmp_path) for a in argv] + ["--data-dir", tmp_path / "dd"]
    code, out, err = run_cli(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    assert err.count("\n") == 1 and err.startswith(f"chimera {argv[0]} {argv[1]}: argument "), err  # one line
    assert not (tmp_path / "dd").exists()


def test_input_and_text_are_exclusive_and_each_alone_accepted(wasm, tmp_path):
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["task", "submit", str(wasm), "--input", "f", "--text", "t"])
    assert parser.parse_args(["task", "submit", str(wasm), "--text", "t"]).text == "t"
    assert parser.parse_args(["task", "submit", str(wasm), "--input", "f"]).input == "f"


def test_bounds_themselves_are_accepted(wasm):
    parser = cli.build_parser()
    args = parser.parse_args(["task", "submit", str(wasm), "--wait-s", "0.1", "--fuel", str(2**62),
                              "--replicas", "64", "--gpus", "0", "--memory-mib", "4096", "--timeout-s", "86400"])
    assert (args.wait_s, args.fuel, args.replicas, args.memory_mib, args.timeout_s) == (0.1, 2**62, 64, 4096, 86400.0)
    assert parser.parse_args(["task", "status", "--limit", "256"]).limit == 256
    assert parser.parse_args(["train", "status", "--follow", "--interval", "0.2"]).interval == 0.2
    assert parser.parse_args(["train", "status"]).interval == 0.5


@pytest.mark.parametrize("command", ["up", "demo"])
def test_workdir_that_is_a_file_is_a_usage_error(command, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for value in (str(afile), ""):
        code, out, err = run_cli([command, "--workdir", value], capsys)
        assert code == 2, err
        assert out == "" and err.count("\n") == 1 and err.startswith(f"chimera {command}: argument --workdir"), err
    assert afile.read_text() == "x"
    assert cli.build_parser().parse_args([command, "--workdir", str(tmp_path / "new")]).workdir == str(tmp_path / "new")


def test_cli_bounds_match_the_nodes():
    from chimera.node import fabric

    assert cli_fabric.MAX_TASKS_KEPT == fabric.MAX_TASKS_KEPT


@pytest.mark.parametrize("argv", [
    ["task", "submit", "m.wasm", "--wait", "--wait-s", "nan"],
    ["task", "submit", "m.wasm", "--fuel", HUGE],
    ["task", "status", "--limit", HUGE],
    ["train", "status", "--follow", "--interval", "-1"],
    ["up", "--peers", "0", "--workdir", "w"],
    ["up", "--peers", "-1", "--workdir", "w"],
    ["service", "unit", "--executable", "relative/path"],
    ["service", "unit", "--profile", "bogus"],
], ids=" ".join)
def test_reported_cases_through_the_real_command(argv, tmp_path):
    out = subprocess.run([sys.executable, "-m", "chimera.node", *argv], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, CHIMERA_HOME=str(tmp_path / "home")))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert out.stderr.splitlines()[-1].startswith("chimera"), out.stderr
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------ chimera up


@pytest.mark.parametrize("peers", ["0", "-1", str(MAX_LOCAL_PEERS + 1)])
def test_up_rejects_a_peer_count_outside_the_bounds(peers, tmp_path, capsys):
    code, out, err = run_cli(["up", "--peers", peers, "--workdir", tmp_path / "w"], capsys)
    assert code == 2 and out == ""
    assert err == f"chimera up: argument --peers: must be in 1..{MAX_LOCAL_PEERS}, got '{peers}' (see `chimera up --help`)\n"
    assert not (tmp_path / "w").exists()


def test_up_bounds_are_usable(tmp_path):
    assert len(LocalNetwork(tmp_path / "a", MAX_LOCAL_PEERS).peers) == MAX_LOCAL_PEERS
    with pytest.raises(ValueError):
        LocalNetwork(tmp_path / "b", 0)
    assert issubclass(LaunchError, ValueError)


def test_up_with_one_peer_starts_and_stops_on_ctrl_c(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "chimera.node", "up", "--peers", "1", "--workdir",
                             str(tmp_path / "w")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("press Ctrl-C"):
                break
        else:
            pytest.fail(f"up exited early: {proc.wait()} {proc.stderr.read()}")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # 130: the Ctrl-C came before cmd_up installed its handler (it prints the prompt first);
    # the peers are stopped either way
    assert proc.returncode in (0, 130), err
    assert "stopped 1 peers (exit codes [0])" in out and "Traceback" not in err


# ------------------------------------------------------------------ chimera train status --follow


def job(state="running", rnd=1, done=0, error=None, total=3) -> dict:
    rounds = [{"round": n, "accuracy": 0.5 + n / 10, "loss": 1.0 / n, "participants": 1, "round_s": 1.0,
               "fit_s": 0.1, "bytes_sent": 10, "digest": "ab" * 32} for n in range(1, done + 1)]
    return {"job_id": "f0" * 32, "name": "digits", "state": state, "participant": True, "round": rnd,
            "model_round": done, "rounds_total": total, "rule": "fedavg", "participants": 1, "quorum": 1,
            "last_error": error, "rounds": rounds}


def test_follow_without_a_job_says_so_and_exits_1(node_answers, capsys):
    node_answers["answers"] = [{"jobs": []}]
    code, out, err = run_cli(["train", "status", "--follow"], capsys)
    assert code == 1 and out == ""
    assert err == f"chimera: {cli_train.NO_JOB}\n" and "no training job" in err
    assert node_answers["polls"] == 1


def test_follow_prints_a_stuck_job_once_and_every_change(node_answers, capsys):
    node_answers["answers"] = [{"jobs": [job()]}] * 4 + [{"jobs": [job(error="no quorum")]}] * 3
    code, out, err = run_cli(["train", "status", "--follow", "--interval", "0.25"], capsys)
    assert code == 130, err  # the stand-in's Ctrl-C after the last answer
    assert out.splitlines() == [
        f"{'f0' * 8} digits: running, round 1, 0/3 rounds committed",
        f"{'f0' * 8} digits: running, round 1, 0/3 rounds committed, last error: no quorum"]
    assert node_answers["sleeps"] == [0.25] * 7


def test_follow_prints_rounds_and_stops_when_finished(node_answers, capsys):
    node_answers["answers"] = [{"jobs": [job()]}, {"jobs": [job(rnd=2, done=1)]},
                               {"jobs": [job(state="finished", rnd=3, done=3)]}]
    code, out, err = run_cli(["train", "status", "--follow"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    # a poll with new rounds of a job prints those, not its state too
    assert [l.split(": ", 1)[1].split(" accuracy")[0] for l in lines] == [
        "running, round 1, 0/3 rounds committed", "round 1/3", "round 2/3", "round 3/3"]
    assert node_answers["polls"] == 3 and node_answers["sleeps"] == [0.5, 0.5]


def test_follow_prints_a_state_change_without_new_rounds(node_answers, capsys):
    node_answers["answers"] = [{"jobs": [job(rnd=2, done=1)]}, {"jobs": [job(rnd=3, done=1)]},
                               {"jobs": [job(state="finished", rnd=3, done=3)]}]
    code, out, err = run_cli(["train", "status", "--follow"], capsys)
    assert code == 0, err
    assert [l.split(": ", 1)[1].split(" accuracy")[0] for l in out.splitlines()] == [
        "round 1/3", "running, round 3, 1/3 rounds committed", "round 2/3", "round 3/3"]


def test_follow_json_has_one_document_per_change(node_answers, capsys):
    import json

    node_answers["answers"] = [{"jobs": [job()]}, {"jobs": [job(state="finished", rnd=1, done=1, total=1)]}]
    code, out, err = run_cli(["train", "status", "--follow", "--json"], capsys)
    docs = [json.loads(l) for l in out.splitlines()]
    assert code == 0 and all(d["ok"] for d in docs)
    assert [(d["result"]["event"], d["result"].get("state"), d["result"]["round"]) for d in docs] == [
        ("state", "running", 1), ("round", None, 1)]
    assert docs[0]["result"]["job_id"] == docs[1]["result"]["job_id"] == "f0" * 32


def test_follow_json_keeps_the_audit_failure_of_the_replies(node_answers, capsys, monkeypatch):
    """A reply whose audit row the node could not write (a full disk) is still shown; the
    --json document says so, as every other --json printer does (PROTOCOL §19.6)."""
    import json

    from chimera.node import admin

    monkeypatch.setattr(admin, "_audit_warned", set())
    monkeypatch.setattr(admin, "_audit_noted", [])
    replies = [{"ok": True, "result": {"jobs": [job(state="finished", rnd=1, done=1, total=1)]},
                "audit_failure": "OperationalError: database or disk is full"}]
    node_answers["answers"] = [admin._result(r) for r in replies]
    code, out, err = run_cli(["train", "status", "--follow", "--json"], capsys)
    docs = [json.loads(l) for l in out.splitlines()]
    assert code == 0 and docs and docs[0]["audit_failure"] == "OperationalError: database or disk is full", docs
    assert "could not record this request in its audit log" in err


# ------------------------------------------------------------------ chimera task status


FABRIC = {"task_slots": 2, "tasks_running": 0, "peers_with_capacity": []}


def test_task_status_without_tasks_says_so(node_answers, capsys):
    node_answers["answers"] = [{"fabric": FABRIC, "observations": [], "tasks": []}]
    code, out, err = run_cli(["task", "status"], capsys)
    assert code == 0, err
    assert out.splitlines() == ["no tasks yet", "0/2 task slots busy here; 0 peers advertise capacity"]


def test_task_status_limit_applies_to_observations(node_answers, capsys):
    import json

    task = {"task_id": "t1", "state": "accepted", "requirements": {"replicas": 1}, "placement": []}
    node_answers["answers"] = [{"fabric": FABRIC, "observations": [{"n": i} for i in range(50)],
                                "tasks": [dict(task, task_id=f"t{i}") for i in range(5)]}]
    code, out, err = run_cli(["task", "status", "--limit", "3", "--json"], capsys)
    res = json.loads(out)["result"]
    assert code == 0, err
    assert res["observations"] == [{"n": 47}, {"n": 48}, {"n": 49}]
    assert [t["task_id"] for t in res["tasks"]] == ["t2", "t3", "t4"]


# ------------------------------------------------------------------ chimera service


@pytest.mark.parametrize("argv, message", [
    (["unit", "--executable", "relative/path"], "must be an absolute path"),
    (["unit", "--executable", "/opt/my dir/chimera"], "cannot hold"),
    (["unit", "--profile", "bogus"], "invalid choice: 'bogus' (choose from 'default', 'edge')"),
    (["unit", "--user", "a\nExecStartPre=/bin/sh"], "no valid system user name"),
    (["install", "--root", "{tmp}/root", "--profile", "bogus"], "invalid choice: 'bogus'"),
])
def test_service_rejects_bad_unit_parameters(argv, message, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, out, err = run_cli(["service", *argv, *([] if "--executable" in argv else
                                                  ["--executable", "/usr/bin/chimera"])], capsys)
    assert code == 2 and out == ""
    assert err.startswith("chimera") and message in err and err.count("\n") == 1
    assert not (tmp_path / "root").exists()


def test_service_unit_accepts_every_profile(capsys):
    from chimera.node.config import PROFILES

    for profile in PROFILES:
        code, out, _ = run_cli(["service", "unit", "--executable", "/usr/bin/chimera", "--profile", profile],
                               capsys)
        assert code == 0 and f"ExecStart=/usr/bin/chimera node --log-json --profile {profile}\n" in out


@pytest.fixture
def fake_system(tmp_path: Path, monkeypatch):
    """``PATH`` holds only stand-ins for getent, useradd and systemctl (nothing on this machine
    can be changed); ``make(name, code, stderr)`` writes one. ``install`` activates even
    below a staging root."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def make(name: str, code: int, stderr: str = "") -> None:
        path = bin_dir / name  # builtins only: PATH has nothing else
        path.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {shlex.quote(str(tmp_path / 'ran'))}\n"
                        f"printf '%s' {shlex.quote(stderr)} >&2\nexit {code}\n")
        path.chmod(0o755)

    monkeypatch.setenv("PATH", str(bin_dir))
    real_install = service.install
    monkeypatch.setattr(service, "install", lambda unit, **kw: real_install(unit, **{**kw, "activate": True}))
    return make


def ran(tmp_path: Path) -> list[str]:
    path = tmp_path / "ran"
    return [Path(l.split()[0]).name + " " + " ".join(l.split()[1:]) for l in path.read_text().splitlines()] \
        if path.exists() else []


def install_argv(tmp_path: Path) -> list:
    return ["service", "install", "--root", tmp_path / "root", "--executable", "/usr/bin/chimera"]


def test_service_install_reports_a_failed_daemon_reload(fake_system, tmp_path, capsys):
    fake_system("getent", 0)
    fake_system("systemctl", 1, "System has not been booted with systemd as init system (PID 1).\nCan't operate.")
    code, out, err = run_cli(install_argv(tmp_path), capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("chimera: systemctl daemon-reload failed (exit 1): System has not been booted "
                          "with systemd as init system (PID 1). Can't operate.; wrote ")
    assert (tmp_path / "root/etc/systemd/system/chimera-node.service").exists()
    assert ran(tmp_path) == ["getent passwd chimera", "systemctl daemon-reload"]


def test_service_install_reports_a_failed_useradd(fake_system, tmp_path, capsys):
    fake_system("getent", 2)
    fake_system("useradd", 1, "useradd: cannot lock /etc/passwd")
    fake_system("systemctl", 0)
    code, out, err = run_cli(install_argv(tmp_path), capsys)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("chimera: useradd chimera failed (exit 1): useradd: cannot lock /etc/passwd; wrote ")
    assert [r.split()[0] for r in ran(tmp_path)] == ["getent", "useradd"]


def test_service_install_steps_when_everything_works(fake_system, tmp_path, capsys):
    fake_system("getent", 2)
    fake_system("useradd", 0)
    fake_system("systemctl", 0)
    code, out, err = run_cli(install_argv(tmp_path), capsys)
    assert code == 0, err
    assert out.splitlines()[1:3] == ["created system user chimera", "ran systemctl daemon-reload"]
    assert ran(tmp_path)[-1] == "systemctl daemon-reload"


def test_service_install_without_systemctl_says_so(fake_system, tmp_path, capsys):
    fake_system("getent", 0)
    code, out, err = run_cli(install_argv(tmp_path), capsys)
    assert code == 0, err
    assert "no systemctl on PATH: systemd was not reloaded" in out.splitlines()


# ------------------------------------------------- second pass: paths, names, endpoints


def test_train_export_to_a_directory_or_nothing_is_a_usage_error(tmp_path, capsys):
    """A directory as the path wrote DIR.npz next to the directory, outside it."""
    for path in (str(tmp_path), f"{tmp_path}/", ""):
        code, out, err = run_cli(["train", "export", path, "--data-dir", tmp_path / "dd"], capsys)
        assert code == 2 and out == "" and ("is a directory" in err or "empty" in err), err
    assert not (tmp_path.parent / f"{tmp_path.name}.npz").exists()


def test_network_init_refuses_a_name_its_token_cannot_carry(tmp_path, capsys):
    """A 65-character name made a data dir whose token no command could read."""
    for name in ("x" * 65, "two\nlines", ""):
        code, out, err = run_cli(["network", "init", "--name", name, "--data-dir", tmp_path / "n"], capsys)
        assert code == 2 and "network name" in err and not (tmp_path / "n" / "network.token").exists(), err
    code, _, _ = run_cli(["network", "init", "--name", "y" * 64, "--data-dir", tmp_path / "n"], capsys)
    assert code == 0
    code, out, _ = run_cli(["network", "token", "--data-dir", tmp_path / "n"], capsys)
    assert code == 0 and out.startswith("chm1_")


def test_simulate_into_an_unusable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "chimera.node", "simulate", "run", "commit_latency",
                           "--out", str(blocker)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "File exists" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_a_remote_shell_target_with_an_impossible_port_is_refused_at_once(tmp_path, capsys):
    from chimera.node.admin_keys import generate_key, write_key_file

    key = tmp_path / "k.pem"
    write_key_file(key, generate_key())
    code, out, _ = run_cli(["shell", "tcp://127.0.0.1:99999", "--key", key, "--server-key", "a" * 52,
                            "-c", "whoami", "--json"], capsys)
    assert code == 2 and '"code":2' in out and "port 1..65535" in out, out  # the shell's own --json line


def test_unknown_scenario_and_unwritable_key_file_say_what_the_user_gave(tmp_path, capsys):
    from chimera.simulations.cli import main as simulate

    assert simulate(["run", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: nosuch: no such file; shipped scenarios:") and "field" not in err
    (tmp_path / "dd").mkdir()
    code, out, _ = run_cli(["admin", "key", "create", "k", "--out", "/proc/nope.pem", "--json",
                            "--data-dir", tmp_path / "dd"], capsys)
    assert code == 1 and "/proc/nope.pem" in out and ".tmp" not in out, out


def test_a_local_network_token_is_never_readable_by_others(tmp_path, monkeypatch):
    """`chimera up` wrote network.token under the umask and chmod-ed it after (0644 for a
    moment, in a 0755 workdir): another local user could read the network's secret."""
    import os
    import stat

    from chimera.node.launcher import LocalNetwork

    seen: list[int] = []
    real_chmod = os.chmod

    def spy(path, mode, *args, **kwargs):  # every mode the file has before it is final
        if str(path).endswith("network.token") and os.path.exists(path):
            seen.append(stat.S_IMODE(os.stat(path).st_mode))
        return real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", spy)
    old_umask = os.umask(0)
    try:
        LocalNetwork(tmp_path / "lab", 2)
    finally:
        os.umask(old_umask)
    token = tmp_path / "lab" / "network.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "lab").stat().st_mode) == 0o700
    assert all(mode & 0o077 == 0 for mode in seen), [oct(m) for m in seen]


@pytest.mark.parametrize("where", ["data_dir", "workdir"])
def test_a_join_token_readable_by_others_is_refused_like_a_key(tmp_path, capsys, where):
    """identity.key with mode 0644 was refused, the network's token (its admission secret) was not."""
    from chimera.node.keys import save_network
    from chimera.protocol.network import Network

    network = Network.create(name="t")
    if where == "data_dir":
        save_network(tmp_path / "d", network)
        token, argv = tmp_path / "d" / "network.token", ["network", "token", "--data-dir", str(tmp_path / "d")]
    else:
        (tmp_path / "lab").mkdir()
        token = tmp_path / "lab" / "network.token"
        token.write_text(network.token() + "\n")
        argv = ["up", "--peers", "1", "--workdir", str(tmp_path / "lab")]
    token.chmod(0o644)
    code, _, err = run_cli(argv, capsys)
    assert code != 0 and f"{token} is readable by others (mode 644); chmod 600 it" in err


@pytest.mark.parametrize("command", ["status", "peers", "log", "reputation"])
def test_a_data_directory_given_as_a_word_says_how_to_give_it(command, tmp_path, capsys, no_node):
    """``chimera status DIR`` (the shell takes its target that way) is refused with the
    option to use; a word that is no directory gets the plain message."""
    code, _, err = run_cli([command, tmp_path], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"unrecognized arguments: {tmp_path}; a node's data directory is given as --data-dir {tmp_path}" in err
    code, _, err = run_cli([command, tmp_path / "missing"], capsys)
    assert code == 2 and "--data-dir" not in err and "unrecognized arguments" in err


def test_the_up_quorum_warning_counts_committed_weight_not_heads():
    """Reputation-weighted epochs: 3 of 4 validators running is no quorum when the one down holds
    more than 1/3 of the weight, and 3 of 4 is safe from one more crash only when no running
    validator's weight would take the rest to 2/3 or below (docs/PROTOCOL.md §14.3)."""
    weights = {"a": 5000, "b": 1000, "c": 1000, "d": 1000}
    assert weight_quorum_warning(weights, {"b", "c", "d"}, 3) == (
        "3 of the network's 4 validators run, with 3000 of the 8000 voting weight of epoch 3: the log "
        "commits nothing until more of them run (a quorum needs more than 2/3 of it: 5334)")
    assert "one more crash stops the log" in weight_quorum_warning(weights, {"a", "b", "c"}, 3)
    assert weight_quorum_warning(weights, set(weights), 3) is None
    even = {"a": 1000, "b": 1000, "c": 1000, "d": 1000, "e": 1000, "f": 1000, "g": 1000}
    assert weight_quorum_warning(even, set("abcdef"), 0) is None  # 6/7 minus one is still > 2/3
    assert "one more crash" in weight_quorum_warning(even, set("abcde"), 0)  # 5/7, 4/7 after a crash
    assert "commits nothing" in weight_quorum_warning(even, set("abcd"), 0)


def test_the_genesis_quorum_warning_matches_the_weighted_rule_with_equal_weights(tmp_path):
    """The start-up warning (genesis count) and the committed-weight one share one rule."""
    for validators in range(1, 11):
        net = LocalNetwork(tmp_path / f"n{validators}", validators)
        genesis = list(net.network.genesis)
        for running in range(validators + 1):
            counted = net.quorum_warning(running)
            weighted = weight_quorum_warning(dict.fromkeys(genesis, 1), set(genesis[:running]), 0)
            assert (counted is None) == (weighted is None), (validators, running)
            if counted:
                assert counted.split(": ")[1].split(" (")[0] == weighted.split(": ")[1].split(" (")[0]


def test_a_stop_request_ends_supervise_without_asking_a_hung_peer(tmp_path):
    """`chimera up` supervised on its only thread: each question to a hung peer (stopped,
    its admin socket accepting but never answering) took up to 1 s, so Ctrl-C waited that
    long per hung peer. A stop request (set by up's signal handler) now ends supervise before
    it asks anyone anything more."""
    import socket
    import threading

    from chimera.node.admin import SOCKET_NAME
    from tests.conftest import wait_until

    net = LocalNetwork(tmp_path / "lab", 2)
    accepted: list = []
    servers = []
    for p in net.peers:  # a hung peer: the socket is there, nobody answers
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(p.data_dir / SOCKET_NAME))
        server.listen(8)
        servers.append(server)
        threading.Thread(target=lambda s=server: [accepted.append(s.accept()) for _ in range(8)],
                         daemon=True).start()
        p.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        p.answered = True
    try:
        assert net.weighted_quorum_warning(timeout_s=0.2) is None  # asked (and timed out), both run
        assert wait_until(lambda: len(accepted) >= 2, timeout_s=30)
        net.peers[0].proc.kill()
        net.peers[0].proc.wait(30)
        net.stop_requested = True
        asked = len(accepted)
        assert net.supervise(0.0) == [] and net.weighted_quorum_warning(timeout_s=0.2) is None
        net.peers[1].answered = False  # (a restarted peer is asked for its status)
        assert net.supervise(0.0) == []
        assert len(accepted) == asked  # nobody was asked anything more
        net.stop_requested = False
        lines = net.supervise(0.0)  # without the request: the exit is reported, peer 1 asked
        assert lines and lines[0].startswith("peer 0 exited (killed by SIGKILL)")
        assert wait_until(lambda: len(accepted) > asked, timeout_s=30)
    finally:
        for p in net.peers:
            p.proc.kill()
            p.proc.wait(30)
        for server in servers:
            server.close()


def test_network_init_refuses_an_epoch_of_one_height(tmp_path, capsys):
    """With epoch_length 1 a validator's opinion reaches the epoch's only proposer too late
    (PROTOCOL.md §15.5): the weights would never move. A token may still say 1."""
    code, _, err = run_cli(["network", "init", "--data-dir", tmp_path / "d", "--epoch-length", "1"], capsys)
    assert code == 2 and "--epoch-length" in err and "2" in err, err
    code, _, _ = run_cli(["network", "init", "--data-dir", tmp_path / "d", "--epoch-length", "2"], capsys)
    assert code == 0


def test_network_id_prints_the_peer_id_a_creator_names_with_validator(tmp_path, capsys):
    """A network with genesis validators on several machines needs their peer ids before any of
    them runs: `network id` creates the keys as the first start would and prints the id, and
    the node started later on that data dir is that validator."""
    other = tmp_path / "other-machine"
    code, out, _ = run_cli(["network", "id", "--data-dir", other], capsys)
    peer_id = out.strip()
    assert code == 0 and len(peer_id) == 52
    code, again, _ = run_cli(["network", "id", "--data-dir", other, "--json"], capsys)
    assert code == 0 and '"peer_id":"%s"' % peer_id in again  # the same keys, kept
    assert oct((other / "identity.key").stat().st_mode & 0o777) == "0o600"
    code, token, err = run_cli(["network", "init", "--data-dir", tmp_path / "creator", "--validator", peer_id],
                               capsys)
    assert code == 0 and peer_id in err
    code, _, _ = run_cli(["network", "init", "--data-dir", other, "--no-local-validator"], capsys)
    from chimera.node.keys import load_or_create_identity
    from chimera.protocol.network import Network

    assert load_or_create_identity(other).peer_id == peer_id  # what `chimera node` will load
    assert peer_id in Network.from_token(token.strip()).genesis
