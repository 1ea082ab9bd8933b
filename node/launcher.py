"""Launch and watch local peer processes (``chimera up`` and ``chimera demo``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from chimera.protocol.errors import InvalidTokenError
from chimera.protocol.network import Network

from . import admin
from .config import ConfigError
from .keys import atomic_write, check_private, load_or_create_identity, save_network
from .logs import printable

MAX_LOCAL_PEERS = 64  # `chimera up --peers N` / `chimera demo --peers N`: N in 1..64
RESTART_FIRST_DELAY_S = 1.0  # `chimera up --restart on-failure`: the first restart's delay,
RESTART_MAX_DELAY_S = 30.0  # doubled for each crash in a row up to this,
STABLE_UPTIME_S = 60.0  # and back to the first delay once a peer has run this long


class LaunchError(ConfigError, ValueError):
    """The local network cannot be laid out as asked (the CLI reports a usage error, exit 2)."""


class PeerStartError(RuntimeError):
    """A peer process exited before it answered, or did not answer in time (the CLI reports
    a runtime failure, exit 1, with the peer's last log line)."""


@dataclass
class PeerProcess:
    index: int
    data_dir: Path
    args: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    status: dict = field(default_factory=dict)
    term_sent: bool = False
    python: str = sys.executable  # the interpreter (and so the installation) the peer runs in
    started_s: float = 0.0  # time.monotonic() of the last start
    exit_seen: bool = False  # its exit since the last start was reported (LocalNetwork.supervise)
    crashes_in_row: int = 0  # exits other than a clean stop without STABLE_UPTIME_S between them
    restart_at_s: float | None = None  # time.monotonic() of a scheduled restart

    def start(self) -> None:
        self.term_sent = False
        self.exit_seen = False
        self.restart_at_s = None
        self.started_s = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [self.python, "-m", "chimera.node.cli", "node", "--data-dir", str(self.data_dir),
             *self.args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 30.0) -> dict:
        """Wait until the node answers ``status``; returns it.

        Raises:
            PeerStartError: the process exited first (the message gives its exit status and
                last log line), or it did not answer within ``timeout_s`` seconds.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc is not None else None
                how = "" if code is None else f" ({exit_text(code)})"
                last = last_log_line(self.log_path)
                raise PeerStartError(f"peer {self.index} exited while starting{how}"
                                     + (f": {last}" if last else "") + f"; log: {self.log_path}")
            try:
                self.status = admin.call(self.data_dir, "status", timeout_s=2.0)
                return self.status
            except admin.AdminError:
                time.sleep(0.05)
        raise PeerStartError(f"peer {self.index} did not answer within {timeout_s:g} s of its start; "
                             f"log: {self.log_path}")

    def terminate(self) -> None:
        """Send SIGTERM once (the node stops gracefully)."""
        if self.alive() and not self.term_sent:
            self.term_sent = True
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if not self.term_sent:
                self.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class LocalNetwork:
    """N peers on this machine, one network, separate data dirs under ``workdir``.

    Peer 0 starts first; the others get its contact URI as bootstrap and learn
    each other by peer exchange (and mDNS when ``mdns`` is true). With
    ``genesis`` (default) every peer's identity is created up front and all N
    are the genesis validators of the network's consensus log.

    Raises:
        LaunchError (a ValueError): ``peers`` is not in 1..MAX_LOCAL_PEERS (checked before
            anything is created under ``workdir``).
    """

    def __init__(self, workdir: Path, peers: int, *, mdns: bool = False,
                 extra_args: list[str] | None = None, name: str = "local",
                 genesis: bool = True, epoch_length: int = 100) -> None:
        if type(peers) is not int or not 1 <= peers <= MAX_LOCAL_PEERS:
            raise LaunchError(f"the number of peers must be in 1..{MAX_LOCAL_PEERS}, not {peers!r}")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)  # holds the token and every key
        self.extra = list(extra_args or [])
        if not mdns:
            self.extra.append("--no-mdns")
        token_file = workdir / "network.token"
        if token_file.exists():
            check_private(token_file)
            try:
                self.network = Network.from_token(token_file.read_text().strip())
            except UnicodeDecodeError:
                raise InvalidTokenError(f"{token_file}: not a join token (not UTF-8 text)") from None
        else:
            ids = ()
            if genesis:
                ids = tuple(load_or_create_identity(self._data_dir(i)).peer_id for i in range(peers))
            self.network = Network.create(name=name, genesis=ids, epoch_length=epoch_length)
            # created 0600 (write_text then chmod left it readable under the umask for a moment)
            atomic_write(token_file, (self.network.token() + "\n").encode())
        self.peers = [self._make(i) for i in range(peers)]

    def _data_dir(self, i: int) -> Path:
        data_dir = self.workdir / f"peer-{i}"
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return data_dir

    def _make(self, i: int) -> PeerProcess:
        data_dir = self._data_dir(i)
        save_network(data_dir, self.network)
        return PeerProcess(i, data_dir, ["--listen", "127.0.0.1", "--port", "0", *self.extra],
                           self.workdir / "logs" / f"peer-{i}.log")

    def start(self, timeout_s: float = 60.0) -> None:
        first = self.peers[0]
        first.start()
        contact = first.wait_ready(timeout_s)["contact"]
        for p in self.peers[1:]:
            p.args += ["--bootstrap", contact]
            p.start()
        for p in self.peers[1:]:
            p.wait_ready(timeout_s)

    def restart(self, i: int, timeout_s: float = 60.0) -> dict:
        p = self.peers[i]
        p.stop()
        p.start()
        return p.wait_ready(timeout_s)

    def query(self, i: int, cmd: str, args: dict | None = None):
        return admin.call(self.peers[i].data_dir, cmd, args, timeout_s=10.0)

    def full_mesh(self, indices: list[int] | None = None) -> bool:
        """True when each listed peer sees every other listed peer alive."""
        idx = list(range(len(self.peers))) if indices is None else indices
        ids = {i: self.peers[i].status.get("peer_id") for i in idx}
        for i in idx:
            try:
                rows = self.query(i, "peers")
            except admin.AdminError:
                return False
            alive = {r["peer_id"] for r in rows if r["state"] == "alive"}
            if not all(ids[j] in alive for j in idx if j != i):
                return False
        return True

    def wait_for(self, predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval_s)
        return predicate()

    def quorum_warning(self, running: int) -> str | None:
        """What ``running`` peers mean for the log when every peer is a genesis validator of
        equal weight: None when a crash more is still tolerated, else one line."""
        validators = len(self.network.genesis)
        if validators == 0 or running >= validators:
            return None
        quorum = validators * 2 // 3 + 1
        what = ("the log commits nothing until more of them run" if running < quorum
                else "one more crash stops the log" if running == quorum else None)
        if what is None:
            return None
        return f"{running} of the network's {validators} genesis validators run: {what} " \
               f"(a quorum needs {quorum} of equal weight)"

    def running(self) -> int:
        return sum(p.alive() for p in self.peers)

    def supervise(self, now_s: float, restart_on_failure: bool = False) -> list[str]:
        """Look at every peer once (``chimera up`` calls it each second); returns lines to show.

        A peer that exited is reported once, with its exit status, uptime and last log
        line; the others keep running. With ``restart_on_failure``, a peer that did not
        stop cleanly (a non-zero exit code or a signal; `chimera stop` exits 0) is started
        again after RESTART_FIRST_DELAY_S, doubled for each crash in a row up to
        RESTART_MAX_DELAY_S (a run of STABLE_UPTIME_S resets it).

        Args:
            now_s: ``time.monotonic()``.
        """
        lines = []
        for p in self.peers:
            if p.proc is None:
                continue
            if p.restart_at_s is not None:
                if now_s >= p.restart_at_s:
                    p.start()
                    lines.append(f"peer {p.index} restarted (pid {p.proc.pid})")
                continue
            code = p.proc.poll()
            if code is None or p.exit_seen:
                continue
            p.exit_seen = True
            uptime_s = max(0.0, now_s - p.started_s)
            if uptime_s >= STABLE_UPTIME_S:
                p.crashes_in_row = 0
            failed = code != 0
            line = f"peer {p.index} {'exited' if failed else 'stopped'} ({exit_text(code)}) after {uptime_s:.0f} s"
            if failed:
                last = last_log_line(p.log_path)
                line += (f"; last log line: {last}" if last else "") + f"; log: {p.log_path}"
            if failed and restart_on_failure:
                delay_s = min(RESTART_MAX_DELAY_S, RESTART_FIRST_DELAY_S * 2 ** p.crashes_in_row)
                p.crashes_in_row += 1
                p.restart_at_s = now_s + delay_s
                line += f"; restarting in {delay_s:g} s"
            lines.append(line)
            running = self.running()
            lines.append(f"{running} of {len(self.peers)} peers running")
            warning = self.quorum_warning(running)
            if warning and not (failed and restart_on_failure):
                lines.append(f"warning: {warning}")
        return lines

    def waiting_restarts(self) -> int:
        return sum(p.restart_at_s is not None for p in self.peers)

    def stop(self) -> list[int | None]:
        for p in self.peers:
            p.restart_at_s = None
            p.terminate()
        return [p.stop() for p in self.peers]


def exit_text(returncode: int) -> str:
    """``exit code N``, or ``killed by SIGNAME`` for a negative ``Popen.returncode``."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def last_log_line(path: Path, tail_bytes: int = 4096) -> str:
    """The last non-empty line of a peer's log (at most 200 printable characters; '' if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return printable(lines[-1])[:200] if lines else ""
