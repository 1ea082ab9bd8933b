"""Peers as real OS processes on loopback: mesh, crash detection, restart, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chimera.node import admin
from chimera.node.launcher import LocalNetwork
from tests.conftest import wait_until

FAST = ["--set", "probe_interval_s=0.3", "--set", "probe_timeout_s=0.1",
        "--set", "reconnect_interval_s=0.5", "--set", "sync_interval_s=2"]


def chimera(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chimera.node.cli", *args], capture_output=True,
                          text=True, timeout=60, **kw)


@pytest.mark.slow
def test_four_processes_mesh_detect_crash_and_rejoin(tmp_path: Path):
    net = LocalNetwork(tmp_path, 4, extra_args=FAST)
    try:
        net.start()
        assert wait_until(net.full_mesh, timeout_s=60), "no full mesh"
        victim = net.peers[3]
        vid = victim.status["peer_id"]
        old_incarnation = victim.status["incarnation"]
        victim.kill()  # SIGKILL: no leave message

        def all_see_dead() -> bool:
            return all({r["peer_id"]: r["state"] for r in net.query(i, "peers")}.get(vid) == "dead"
                       for i in range(3))

        # Configured detection time: a probe period per member plus the Lifeguard
        # suspicion maximum (beta * alpha * T = 6 * 4 * 0.3 s = 7.2 s); the deadline
        # is generous for a loaded machine.
        assert wait_until(all_see_dead, timeout_s=60), "crash not detected by every peer"
        assert net.full_mesh([0, 1, 2]), "a live peer was declared failed"
        status = net.restart(3)
        assert status["peer_id"] == vid, "restarted peer changed identity"
        assert status["incarnation"] > old_incarnation
        assert wait_until(net.full_mesh, timeout_s=60), "restarted peer did not rejoin"
        events = net.query(0, "events", {"limit": 500})
        kinds = [e["kind"] for e in events if e["peer_id"] == vid]
        assert "peer_failed" in kinds, kinds
        failed_at = len(kinds) - 1 - kinds[::-1].index("peer_failed")
        # The rejoin is one peer_joined after the failure. A loaded machine may make the
        # fresh process slow to answer its first probes (suspected, then refuted: alive),
        # but it must not be declared failed again.
        assert "peer_joined" in kinds[failed_at:], kinds
        assert {r["peer_id"]: r["state"] for r in net.query(0, "peers")}[vid] == "alive"
    finally:
        codes = net.stop()
    assert codes == [0, 0, 0, 0], f"graceful SIGTERM stop failed: {codes}"


@pytest.mark.slow
def test_cli_status_peers_and_graceful_leave(tmp_path: Path):
    net = LocalNetwork(tmp_path, 2, extra_args=FAST)
    try:
        net.start()
        assert wait_until(net.full_mesh, timeout_s=60)
        d0 = str(net.peers[0].data_dir)
        out = chimera("peers", "--data-dir", d0, "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["ok"] and doc["result"][0]["peer_id"] == net.peers[1].status["peer_id"]
        out = chimera("status", "--data-dir", d0)
        assert out.returncode == 0 and net.peers[0].status["peer_id"] in out.stdout
        assert "consensus    height" in out.stdout and "\n  dropped    " in out.stdout  # the core's drops
        out = chimera("ping", net.peers[1].status["peer_id"], "--count", "3", "--data-dir", d0)
        assert out.returncode == 0 and "3/3 answered" in out.stdout
        # graceful stop of peer 1 -> peer 0 sees "left" quickly (Leave message, no suspicion)
        assert net.peers[1].stop() == 0
        assert wait_until(lambda: net.query(0, "peers")[0]["state"] == "left", timeout_s=30)
    finally:
        net.stop()


def test_cli_errors_are_one_line_with_exit_codes(tmp_path: Path):
    out = chimera("status", "--data-dir", str(tmp_path / "none"))
    assert out.returncode == 3 and out.stderr.startswith("chimera: no node is running")
    assert "Traceback" not in out.stderr
    out = chimera("node", "--data-dir", str(tmp_path / "fresh"), "--no-mdns")
    assert out.returncode == 2 and "belongs to no network" in out.stderr
    out = chimera("node", "--data-dir", str(tmp_path / "fresh"), "--join", "chm1_garbage")
    assert out.returncode == 2 and "join token" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.toml").write_text("[node]\nprobe_interval_s = 'fast'\n")
    out = chimera("node", "--data-dir", str(tmp_path / "cfg"))
    assert out.returncode == 2 and "probe_interval_s" in out.stderr


def test_network_init_token_and_key_files(tmp_path: Path):
    d = tmp_path / "n"
    out = chimera("network", "init", "--data-dir", str(d), "--name", "lab")
    assert out.returncode == 0 and out.stdout.startswith("chm1_")
    token = out.stdout.strip()
    assert token not in out.stderr
    assert chimera("network", "init", "--data-dir", str(d)).returncode == 2  # no silent replace
    assert chimera("network", "token", "--data-dir", str(d)).stdout.strip() == token
    assert (os.stat(d / "network.token").st_mode & 0o777) == 0o600


@pytest.mark.slow
def test_up_keeps_the_others_running_reports_each_exit_and_restarts_a_crashed_peer(tmp_path: Path):
    """`chimera up`: one peer's death is reported (status, last log line) and the others keep
    running; with --restart on-failure a SIGKILLed peer comes back under its identity; a
    cleanly stopped one (SIGTERM, exit 0) is not restarted; when none is left, up ends."""
    import signal

    workdir = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, "-m", "chimera.node", "up", "--peers", "3", "--workdir", str(workdir),
                             "--restart", "on-failure", *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []

    def read_until(prefix: str) -> str:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                return line
        pytest.fail(f"up ended before {prefix!r}: {proc.wait()}\n" + "\n".join(lines) + proc.stderr.read())

    def status(i: int) -> dict:
        return admin.call(workdir / f"peer-{i}", "status", timeout_s=10)

    try:
        read_until("press Ctrl-C")
        victim = status(1)
        os.kill(victim["pid"], signal.SIGKILL)
        line = read_until("peer 1 exited")
        assert "(killed by SIGKILL)" in line and "restarting in 1 s" in line and "peer-1.log" in line, line
        assert read_until("2 of 3 peers running")
        assert read_until("peer 1 restarted")
        assert wait_until(lambda: _answers(workdir / "peer-1"), timeout_s=60)
        again = status(1)
        assert again["peer_id"] == victim["peer_id"] and again["pid"] != victim["pid"]
        for i in (0, 2, 1):  # clean stops: reported, never restarted
            os.kill(status(i)["pid"], signal.SIGTERM)
            assert "(exit code 0)" in read_until(f"peer {i} stopped")
        read_until("no peer is running")
        lines += [line.rstrip("\n") for line in proc.stdout]  # (communicate() would skip what is buffered)
        proc.wait(60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (lines, err)
    assert not any("restarted" in line for line in lines[lines.index("peer 1 restarted (pid "
                                                                     f"{again['pid']})") + 1:]), lines
    assert "stopped 3 peers (exit codes [0, 0, 0])" in lines[-1] and "Traceback" not in err, (lines, err)


def _answers(data_dir: Path) -> bool:
    try:
        admin.call(data_dir, "status", timeout_s=5)
        return True
    except admin.AdminError:
        return False


def test_up_reports_a_peer_that_cannot_start_in_one_line(tmp_path: Path):
    """A peer that exits while starting (here its metrics port is taken) was a traceback of
    `chimera up`; it is one line with the peer's own reason, exit 1."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        out = chimera("up", "--peers", "2", "--workdir", str(tmp_path / "w"),
                      "--set", f"metrics_port={taken.getsockname()[1]}")
    finally:
        taken.close()
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("chimera: peer 0 exited while starting (exit code 1): ") \
        and "Address already in use" in out.stderr and out.stderr.count("\n") == 1, out.stderr
