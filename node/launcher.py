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

MAX_LOCAL_PEERS = 64  # `chimera up --peers N` / `chimera demo --peers N`: N in 1..64


class LaunchError(ConfigError, ValueError):
    """The local network cannot be laid out as asked (the CLI reports a usage error, exit 2)."""


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

    def start(self) -> None:
        self.term_sent = False
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
        """Wait until the node answers ``status``; returns it. RuntimeError on failure."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"peer {self.index} exited; see {self.log_path}:\n"
                                   + self.log_path.read_text()[-2000:])
            try:
                self.status = admin.call(self.data_dir, "status", timeout_s=2.0)
                return self.status
            except admin.AdminError:
                time.sleep(0.05)
        raise RuntimeError(f"peer {self.index} not ready after {timeout_s} s; see {self.log_path}")

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

    def stop(self) -> list[int | None]:
        for p in self.peers:
            p.terminate()
        return [p.stop() for p in self.peers]
