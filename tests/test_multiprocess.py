"""Peers as real OS processes on loopback: mesh, crash detection, restart, CLI."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chimera.node import admin
from chimera.node.launcher import LocalNetwork, contact_port, leftover_peers, lock_workdir
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
        old_contact = victim.status["contact"]
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
        assert status["contact"] == old_contact, "restarted on another port"
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
        # its DEALER, reconnecting with libzmq's backoff while it was gone, was replaced at its
        # Hello, so our answers reached it at once (they waited up to 5 s: ~3 s to rejoin)
        assert net.query(0, "status")["counters"].get("dealers_renewed", 0) >= 1
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
        # a stopped (SIGSTOP, Ctrl-Z) peer stops gracefully too: it was SIGKILLed after 10 s
        net.peers[0].proc.send_signal(signal.SIGSTOP)
        assert net.stop() == [0, 0]
    finally:
        net.stop()


def test_cli_errors_are_one_line_with_exit_codes(tmp_path: Path):
    out = chimera("status", "--data-dir", str(tmp_path / "none"))
    assert out.returncode == 3 and out.stderr.startswith("chimera: no node is running")
    assert out.stderr.rstrip().endswith("there is no such directory")  # (a typo, not a stopped node)
    (tmp_path / "stopped").mkdir()
    out = chimera("status", "--data-dir", str(tmp_path / "stopped"))
    assert out.returncode == 3 and out.stderr == f"chimera: no node is running with data dir {tmp_path / 'stopped'}\n"
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


class _Output:
    """A process's stdout, read on a thread: each wait has a deadline, so a regression fails
    the test with what was read instead of hanging it (no pytest-timeout here)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next(self, timeout_s: float = 120.0, waiting_for: str = "a line") -> str:
        try:
            line = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            pytest.fail(f"no {waiting_for} within {timeout_s:g} s; read so far:\n" + "\n".join(self.lines))
        if line is None:
            self._queue.put(None)  # (the end, for the next wait too)
            pytest.fail(f"up ended (exit {self.proc.wait(60)}) before {waiting_for}; read:\n"
                        + "\n".join(self.lines) + "\n" + self.proc.stderr.read())
        self.lines.append(line)
        return line

    def until(self, prefix: str, timeout_s: float = 120.0) -> str:
        """The next line that starts with ``prefix`` (within ``timeout_s`` seconds in all)."""
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.next(max(0.0, deadline - time.monotonic()), f"line starting {prefix!r}")
            if line.startswith(prefix):
                return line

    def rest(self, timeout_s: float = 120.0) -> list[str]:
        """The lines up to the end of the output."""
        deadline, rest = time.monotonic() + timeout_s, []
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("output did not end; read:\n" + "\n".join(self.lines + rest))
            if line is None:
                self._queue.put(None)
                self.lines += rest
                return rest
            rest.append(line)


def _up(workdir: Path, *args: str) -> tuple[subprocess.Popen, _Output]:
    proc = subprocess.Popen([sys.executable, "-m", "chimera.node", "up", "--workdir", str(workdir), *args, *FAST],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, _Output(proc)


def _end(proc: subprocess.Popen) -> None:
    """Stop a `chimera up` left running by a failed test: SIGTERM stops its peers (SIGKILL
    would leave them running: they are in their own sessions)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_up_keeps_the_others_running_reports_each_exit_and_restarts_a_crashed_peer(tmp_path: Path):
    """`chimera up`: one peer's death is reported (status, last log line) and the others keep
    running, with a quorum warning even while its restart is pending; with --restart
    on-failure a SIGKILLed peer comes back under its identity on its port (its contact as
    printed stays valid); a cleanly stopped one (SIGTERM, exit 0) is not restarted; when
    none is left, up ends."""
    workdir = tmp_path / "w"
    proc, out = _up(workdir, "--peers", "3", "--restart", "on-failure")

    def status(i: int) -> dict:
        return admin.call(workdir / f"peer-{i}", "status", timeout_s=10)

    try:
        out.until("press Ctrl-C")
        victim = status(1)
        assert f"contact  {victim['contact']}" in "\n".join(out.lines)
        port = contact_port(victim["contact"])
        os.kill(victim["pid"], signal.SIGKILL)
        line = out.until("peer 1 exited")
        assert "(killed by SIGKILL)" in line and f"restarting in 1 s on port {port}" in line \
            and "peer-1.log" in line, line
        assert out.next() == "2 of 3 peers running"
        assert out.next(30, "the quorum warning") == (
            "warning: 2 of the network's 3 validators run, with 2000 of the 3000 voting weight of epoch 0: "
            "the log commits nothing until more of them run (a quorum needs more than 2/3 of it: 2001); "
            "1 restart pending"), out.lines
        restarted = out.until("peer 1 restarted")
        assert wait_until(lambda: _answers(workdir / "peer-1"), timeout_s=60)
        again = status(1)
        assert restarted == f"peer 1 restarted (pid {again['pid']}, port {port})", restarted
        assert again["peer_id"] == victim["peer_id"] and again["pid"] != victim["pid"]
        assert again["contact"] == victim["contact"], "the restarted peer's contact changed"
        for i in (0, 2, 1):  # clean stops: reported, never restarted
            os.kill(status(i)["pid"], signal.SIGTERM)
            assert "(exit code 0)" in out.until(f"peer {i} stopped")
        out.until("no peer is running")
        out.rest()
        proc.wait(60)
        err = proc.stderr.read()
    finally:
        _end(proc)
    lines = out.lines
    assert proc.returncode == 0, (lines, err)
    assert not any("restarted" in line or "new contact" in line for line in lines[lines.index(restarted) + 1:]), lines
    assert "stopped 3 peers (exit codes [0, 0, 0])" in lines[-1] and "Traceback" not in err, (lines, err)


@pytest.mark.slow
def test_up_counts_genesis_validators_refuses_a_second_up_and_reports_last_exit_codes(tmp_path: Path):
    """A workdir laid out for 2 peers (2 genesis validators) run with --peers 3: the third is no
    validator, so one validator's crash leaves 1 of 2 (the log stops) and is said (it was
    counted as 2 of 3 running, no warning). A second `up` on the running workdir is refused
    in one line naming the first one's pid (it started every peer again: they exited
    "already running" and wrote to the first run's logs). The final line gives each peer's
    last exit status (-9 for the one killed and not restarted)."""
    workdir = tmp_path / "w"
    LocalNetwork(workdir, 2)  # what `chimera up --peers 2 --workdir w` leaves: peers 0 and 1 validate
    proc, out = _up(workdir, "--peers", "3")
    try:
        out.until("press Ctrl-C")
        assert not any(line.startswith("warning") for line in out.lines), out.lines  # 2 of 2 run
        logs = {p: p.stat().st_size for p in (workdir / "logs").iterdir()}
        second = chimera("up", "--peers", "3", "--workdir", str(workdir))
        assert second.returncode == 1 and second.stdout == "", (second.stdout, second.stderr)
        assert second.stderr == (f"chimera: a chimera up or demo (pid {proc.pid}) is already running in {workdir} "
                                 f"(its lock: {workdir / 'up.lock'})\n"), second.stderr
        assert {p: p.stat().st_size for p in (workdir / "logs").iterdir()} == logs
        victim = admin.call(workdir / "peer-1", "status", timeout_s=10)
        os.kill(victim["pid"], signal.SIGKILL)
        assert "(killed by SIGKILL)" in out.until("peer 1 exited")
        assert out.next() == "2 of 3 peers running", out.lines
        assert out.next(30, "the quorum warning") == (
            "warning: 1 of the network's 2 validators run, with 1000 of the 2000 voting weight of epoch 0: "
            "the log commits nothing until more of them run (a quorum needs more than 2/3 of it: 1334)"), out.lines
        proc.send_signal(signal.SIGINT)
        last = out.rest()[-1]
        proc.wait(60)
    finally:
        _end(proc)
    assert last == "stopped 3 peers (exit codes [0, -9, 0])", out.lines
    assert proc.returncode == 0
    os.close(lock_workdir(workdir))  # the lock went with the first run: a new `up` may start here


@pytest.mark.slow
def test_up_restarts_a_peer_on_a_new_port_when_its_own_was_taken(tmp_path: Path):
    """A crashed peer restarts on its port; when another process took that port meanwhile, the
    exit report says it restarts on a new one, and its new contact is shown once it answers."""
    workdir = tmp_path / "w"
    proc, out = _up(workdir, "--peers", "1", "--restart", "on-failure")
    taken = socket.socket()
    try:
        out.until("press Ctrl-C")
        first = admin.call(workdir / "peer-0", "status", timeout_s=10)
        port = contact_port(first["contact"])
        os.kill(first["pid"], signal.SIGKILL)

        def take() -> bool:
            try:
                taken.bind(("127.0.0.1", port))
                return True
            except OSError:  # (the killed process may hold it a moment longer)
                return False

        assert wait_until(take, timeout_s=30), f"port {port} not free after the kill"
        taken.listen()
        line = out.until("peer 0 exited")
        if "on a new port" not in line:  # (up looked before the port was taken: that start fails)
            assert f"on port {port}" in line, line
            line = out.until("peer 0 exited")
            assert "Address already in use" in line, line
        assert f"on a new port (its port {port} is taken)" in line, line
        assert out.until("peer 0 restarted").endswith(", a new port)")
        contact = out.until("peer 0 has a new contact: ").split(": ", 1)[1]
        now = admin.call(workdir / "peer-0", "status", timeout_s=10)
        assert now["contact"] == contact and contact_port(contact) not in (0, port)
        assert now["peer_id"] == first["peer_id"]
        proc.send_signal(signal.SIGINT)
        assert out.rest()[-1] == "stopped 1 peers (exit codes [0])", out.lines
        proc.wait(60)
    finally:
        taken.close()
        _end(proc)


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


@pytest.mark.slow
def test_up_refuses_a_workdir_whose_peers_outlived_a_killed_up(tmp_path: Path):
    """`chimera up` SIGKILLed: its peers (own sessions) live on and its lock is gone. A new `up`
    there started every peer again; each exited "already running". It now refuses in one line
    naming the pids to stop."""
    workdir = tmp_path / "w"
    proc, out = _up(workdir, "--peers", "2")
    pids: list[int] = []
    try:
        out.until("press Ctrl-C")
        pids = [admin.call(workdir / f"peer-{i}", "status", timeout_s=10)["pid"] for i in range(2)]
        proc.kill()
        proc.wait(60)
        again = chimera("up", "--peers", "2", "--workdir", str(workdir))
        assert again.returncode == 1 and again.stdout == "", (again.stdout, again.stderr)
        assert again.stderr == (f"chimera: 2 peer(s) of {workdir} still run from an earlier run (peer 0: pid "
                                f"{pids[0]}, peer 1: pid {pids[1]}); stop them (kill {pids[0]} {pids[1]}) or "
                                "use another --workdir\n"), again.stderr
    finally:
        _end(proc)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    # stopped (their locks go when the processes have exited): a new `up` may start here
    assert wait_until(lambda: leftover_peers(workdir) == [], timeout_s=60)


def test_demo_with_a_workdir_takes_the_launchers_lock(tmp_path: Path):
    """`chimera demo --workdir W` on a workdir a `chimera up` runs in started every peer a second
    time (each exited "already running"); it is refused as a second `up` is."""
    workdir = tmp_path / "w"
    fd = lock_workdir(workdir)  # a running `chimera up` (this process) holds it
    try:
        out = chimera("demo", "--workdir", str(workdir))
    finally:
        os.close(fd)
    assert out.returncode == 1 and out.stderr == (
        f"chimera: a chimera up or demo (pid {os.getpid()}) is already running in {workdir} "
        f"(its lock: {workdir / 'up.lock'})\n"), out.stderr
