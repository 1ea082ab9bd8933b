"""Launch and watch local peer processes (``chimera up`` and ``chimera demo``)."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from chimera.protocol.errors import InvalidTokenError, MalformedError
from chimera.protocol.network import Network, parse_contact_uri

from . import admin
from .config import ConfigError, tcp_endpoint_port
from .keys import atomic_write, check_private, load_or_create_identity, save_network
from .logs import printable

MAX_LOCAL_PEERS = 64  # `chimera up --peers N` / `chimera demo --peers N`: N in 1..64
RESTART_FIRST_DELAY_S = 1.0  # `chimera up --restart on-failure`: the first restart's delay,
RESTART_MAX_DELAY_S = 30.0  # doubled for each crash in a row up to this,
STABLE_UPTIME_S = 60.0  # and back to the first delay once a peer has run this long
UP_LOCK_FILE = "up.lock"  # WORKDIR/up.lock: held by the `chimera up` running there
LOCAL_HOST = "127.0.0.1"  # where local peers listen


class LaunchError(ConfigError, ValueError):
    """The local network cannot be laid out as asked (the CLI reports a usage error, exit 2)."""


class PeerStartError(RuntimeError):
    """A peer process exited before it answered, or did not answer in time (the CLI reports
    a runtime failure, exit 1, with the peer's last log line)."""


class WorkdirBusyError(RuntimeError):
    """Another process (a `chimera up`) holds the workdir's lock (the CLI reports a runtime
    failure, exit 1, naming its pid)."""


def lock_workdir(workdir: Path) -> int:
    """Hold ``WORKDIR/up.lock`` (an exclusive ``flock``, released when the returned descriptor
    is closed or the process dies; peer processes do not inherit it) and write our pid into
    it. Two `chimera up` on one workdir would start every peer twice: the second's peers
    exit "already running" and append to the first's logs. Creates ``workdir`` (mode 700)
    if missing.

    Raises:
        WorkdirBusyError: another process holds the lock (the message names its pid).
        OSError: the folder or the lock file cannot be created or opened.
    """
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = workdir / UP_LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = printable(os.pread(fd, 32, 0).decode(errors="replace").strip())[:20] or "?"
        os.close(fd)
        raise WorkdirBusyError(f"a chimera up or demo (pid {holder}) is already running in {workdir} "
                               f"(its lock: {path})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def leftover_peers(workdir: Path) -> list[tuple[int, str]]:
    """``(peer index, pid)`` of each ``WORKDIR/peer-N`` whose ``node.lock`` another process
    holds now: a node still running there (e.g. from a `chimera up` that was SIGKILLed: its
    peers, in their own sessions, live on). Starting that peer again would only exit
    "already running"."""
    from .runtime import LOCK_FILE

    held = []
    for data_dir in workdir.glob("peer-*"):
        index = data_dir.name[len("peer-"):]
        if not index.isdigit():
            continue
        try:
            fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = printable(os.pread(fd, 32, 0).decode(errors="replace").strip())[:20] or "?"
            held.append((int(index), pid))
        finally:
            os.close(fd)  # (releases our shared lock if we took it)
    return sorted(held)


def contact_port(contact: str) -> int:
    """The TCP port of a contact URI (``chm://PEER_ID@HOST:PORT?key=...``); 0 if it has none
    that parses."""
    try:
        return tcp_endpoint_port(parse_contact_uri(contact)[1]) or 0
    except MalformedError:
        return 0


def release_taken_port(p: "PeerProcess") -> int:
    """Before (re)starting ``p``: if another process holds the port it had, forget that port
    (``p.port`` = 0: the next start takes any free one) and return it; else 0."""
    taken = p.port if p.port and port_taken(LOCAL_HOST, p.port) else 0
    if taken:
        p.port = 0
    return taken


def port_taken(host: str, port: int) -> bool:
    """True when a TCP listener cannot bind ``host:port`` now (someone else holds it); 1..65535."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq's listener does
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


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
    peer_id: str = ""  # its identity (the data dir's key; created by LocalNetwork if missing)
    port: int = 0  # --port of the next start: 0 (any free port) until it answered on one
    bootstrap: str | None = None  # --bootstrap of the next start (a contact URI)
    answered: bool = False  # it answered `status` since its last start
    started_s: float = 0.0  # time.monotonic() of the last start
    exit_seen: bool = False  # its exit since the last start was reported (LocalNetwork.supervise)
    crashes_in_row: int = 0  # exits other than a clean stop without STABLE_UPTIME_S between them
    restart_at_s: float | None = None  # time.monotonic() of a scheduled restart

    def start(self) -> None:
        self.term_sent = False
        self.exit_seen = False
        self.restart_at_s = None
        self.answered = False
        self.started_s = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [self.python, "-m", "chimera.node.cli", "node", "--data-dir", str(self.data_dir),
             "--listen", LOCAL_HOST, "--port", str(self.port), *self.args,
             *(["--bootstrap", self.bootstrap] if self.bootstrap else [])],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def learn(self, status: dict) -> None:
        """Keep a ``status`` answer; its contact's port is the next start's ``--port`` (so a
        restarted peer keeps the contact others and the operator have)."""
        self.status = status
        self.answered = True
        self.port = contact_port(status.get("contact", "")) or self.port

    def wait_ready(self, timeout_s: float = 30.0) -> dict:
        """Wait until the node answers ``status``; returns it (and keeps it, :meth:`learn`).

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
                self.learn(admin.call(self.data_dir, "status", timeout_s=2.0))
                return self.status
            except admin.AdminError:
                time.sleep(0.05)
        raise PeerStartError(f"peer {self.index} did not answer within {timeout_s:g} s of its start; "
                             f"log: {self.log_path}")

    def terminate(self) -> None:
        """Send SIGTERM once (the node stops gracefully), then SIGCONT: a stopped peer
        (SIGSTOP, Ctrl-Z) handles it too, as after a shell's ``kill``."""
        if self.alive() and not self.term_sent:
            self.term_sent = True
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (SIGKILL after ``timeout_s`` seconds) and wait; returns the exit status of
        the last process started (``Popen.returncode``: negative for a signal), also when it
        had exited before; None if it was never started."""
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
        # set (from a signal handler) when the peers are about to be stopped: supervise and its
        # admin calls (1 s each to a hung peer) end early instead of delaying Ctrl-C
        self.stop_requested = False

    def _data_dir(self, i: int) -> Path:
        data_dir = self.workdir / f"peer-{i}"
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return data_dir

    def _make(self, i: int) -> PeerProcess:
        data_dir = self._data_dir(i)
        save_network(data_dir, self.network)
        peer_id = load_or_create_identity(data_dir).peer_id  # (what the node would create)
        return PeerProcess(i, data_dir, list(self.extra), self.workdir / "logs" / f"peer-{i}.log",
                           peer_id=peer_id)

    def start(self, timeout_s: float = 60.0) -> None:
        first = self.peers[0]
        first.start()
        contact = first.wait_ready(timeout_s)["contact"]
        for p in self.peers[1:]:
            p.bootstrap = contact
            p.start()
        for p in self.peers[1:]:
            p.wait_ready(timeout_s)

    def _refresh_bootstrap(self, p: PeerProcess) -> None:
        """A peer other than 0 starts again with peer 0's latest contact."""
        contact = self.peers[0].status.get("contact")
        if p.index != 0 and contact:
            p.bootstrap = contact

    def restart(self, i: int, timeout_s: float = 60.0) -> dict:
        """Stop peer ``i`` (SIGTERM) and start it again on the port it had (on a new one if
        another process took that port meanwhile); returns its first ``status``.

        Raises:
            PeerStartError: as :meth:`PeerProcess.wait_ready`.
        """
        p = self.peers[i]
        p.stop()
        release_taken_port(p)
        self._refresh_bootstrap(p)
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

    def validators(self, *, running: bool = True) -> int:
        """How many of our peers are genesis validators of the network (their peer id is in
        its token's genesis list), counting only running ones unless ``running`` is false.
        A workdir reused with another ``--peers`` has more or fewer peers than validators."""
        genesis = set(self.network.genesis)
        return sum(p.peer_id in genesis and (p.alive() or not running) for p in self.peers)

    def quorum_warning(self, running: int) -> str | None:
        """What ``running`` genesis validators (of equal weight, :meth:`validators`) mean for
        the log: None when all run or a crash more is still tolerated, else one line. (The
        epoch-0 set: validators that joined at a later epoch are not counted; see
        :meth:`weighted_quorum_warning` for the committed table.)"""
        validators = len(self.network.genesis)
        if validators == 0 or running >= validators:
            return None
        what = quorum_shortfall([1] * running, validators)
        if what is None:
            return None
        return f"{running} of the network's {validators} genesis validators run: {what} " \
               f"(a quorum needs {validators * 2 // 3 + 1} of equal weight)"

    def weighted_quorum_warning(self, timeout_s: float = 1.0) -> str | None:
        """The quorum warning over the voting weights the log has committed for the current
        epoch (validators that joined later and reputation-weighted shares included), asked of
        one running peer (``reputation`` and ``peers``, ``timeout_s`` seconds each).

        A validator of this workdir counts as running while its process runs; one from
        elsewhere (it joined over the LAN) while the answering peer sees it alive. Returns None
        when the running weight is more than 2/3 of the total and stays so after the crash of
        the heaviest running validator, else one line; when no peer answers, the genesis count
        (:meth:`quorum_warning`).
        """
        ours = {p.peer_id: p.alive() for p in self.peers if p.peer_id}
        for p in self.peers:
            if self.stop_requested:
                return None  # all of them are being stopped: nothing to warn about
            if not (p.alive() and p.answered):
                continue
            try:
                table = admin.call(p.data_dir, "reputation", timeout_s=timeout_s)
                members = admin.call(p.data_dir, "peers", timeout_s=timeout_s)
                weights = {r["peer_id"]: int(r["weight"]) for r in table["peers"] if int(r["weight"]) > 0}
                alive = {r["peer_id"] for r in members if r.get("state") == "alive"}
                epoch = int(table["epoch"])
            except (admin.AdminError, AttributeError, KeyError, TypeError, ValueError):
                continue  # stopping meanwhile, or an answer of another release: ask the next
            break
        else:
            return self.quorum_warning(self.validators())
        return weight_quorum_warning(weights, {v for v in weights if (ours[v] if v in ours else v in alive)},
                                     epoch)

    def running(self) -> int:
        return sum(p.alive() for p in self.peers)

    def supervise(self, now_s: float, restart_on_failure: bool = False) -> list[str]:
        """Look at every peer once (``chimera up`` calls it each second); returns lines to show.

        A peer that exited is reported once, with its exit status, uptime and last log
        line; the others keep running. Then the number of peers running, and a warning
        when the running validators' committed voting weight is below the log's quorum or
        one crash from it (:meth:`weighted_quorum_warning`, with the restarts pending). With ``restart_on_failure``, a peer that exited
        with a non-zero exit code or by a signal other than a clean stop is started again
        after RESTART_FIRST_DELAY_S, doubled for each crash in a row up to
        RESTART_MAX_DELAY_S (a run of STABLE_UPTIME_S resets it). A peer that exits 0
        stopped cleanly (SIGTERM, or the shell's ``stop``) and is not restarted. A
        restarted peer listens on the port it had, so its contact stays valid; if that port
        is taken when it exits, it restarts on a new one (said in the exit report), and its
        new contact is shown once it answers. Peers other than 0 restart with peer 0's
        latest contact as bootstrap.

        Once :attr:`stop_requested` is set it returns at the next peer (and asks no peer
        anything more), so a hung peer cannot delay the stop.

        Args:
            now_s: ``time.monotonic()``.
        """
        lines = []
        for p in self.peers:
            if self.stop_requested:
                break
            if p.proc is None:
                continue
            if p.restart_at_s is not None:
                if now_s >= p.restart_at_s:
                    self._refresh_bootstrap(p)
                    taken = release_taken_port(p)  # taken during the delay: a new port, not a crash
                    try:
                        p.start()
                    except OSError as exc:  # its log cannot be opened, no process can be made
                        p.restart_at_s = None
                        lines.append(f"peer {p.index} cannot be restarted: {exc}")
                        continue
                    lines.append(f"peer {p.index} restarted (pid {p.proc.pid}"
                                 + (f", port {p.port})" if p.port else
                                    f", a new port: its port {taken} was taken)" if taken else ", a new port)"))
                continue
            if not p.answered and p.alive():
                lines += self._learn_restarted(p)
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
                taken = release_taken_port(p)  # (checked again when the delay is over)
                line += (f" on a new port (its port {taken} is taken)" if taken
                         else f" on port {p.port}" if p.port else "")
            lines.append(line)
            lines.append(f"{self.running()} of {len(self.peers)} peers running")
            warning = self.weighted_quorum_warning()
            if warning:
                pending = self.waiting_restarts()
                if pending:
                    warning += f"; {pending} restart{'s' if pending > 1 else ''} pending"
                lines.append(f"warning: {warning}")
        return lines

    def _learn_restarted(self, p: PeerProcess) -> list[str]:
        """Ask a (re)started peer that has not answered yet for its status (1 s at most); a
        contact other than its last one is a line to show."""
        before = p.status.get("contact")
        if self.stop_requested:
            return []
        try:
            status = admin.call(p.data_dir, "status", timeout_s=1.0)
        except admin.AdminError:
            return []  # still starting (or gone: its exit is reported by the caller)
        p.learn(status)
        contact = status.get("contact")
        if before and contact and contact != before:
            return [f"peer {p.index} has a new contact: {printable(contact)}"]
        return []

    def waiting_restarts(self) -> int:
        return sum(p.restart_at_s is not None for p in self.peers)

    def stop(self, timeout_s: float = 10.0) -> list[int | None]:
        """SIGTERM every peer, wait ``timeout_s`` seconds in all (not per peer) and SIGKILL
        those still running; returns their exit statuses (:meth:`PeerProcess.stop`)."""
        deadline_s = time.monotonic() + timeout_s
        for p in self.peers:
            p.restart_at_s = None
            p.terminate()
        return [p.stop(max(0.0, deadline_s - time.monotonic())) for p in self.peers]


def weight_quorum_warning(weights: dict[str, int], running: set[str], epoch: int) -> str | None:
    """The quorum warning for validators of ``weights`` (peer id -> voting weight of ``epoch``)
    of which ``running`` run: None when the running weight is more than 2/3 of the total and
    stays so after the crash of the heaviest running validator (or every validator runs), else
    one line (the log's quorum: more than 2/3 of the weight, docs/PROTOCOL.md §14.3)."""
    total = sum(weights.values())
    up = [w for v, w in weights.items() if v in running]
    if total == 0 or len(up) == len(weights):
        return None
    what = quorum_shortfall(up, total)
    if what is None:
        return None
    return (f"{len(up)} of the network's {len(weights)} validators run, with {sum(up)} of the {total} "
            f"voting weight of epoch {epoch}: {what} (a quorum needs more than 2/3 of it: {2 * total // 3 + 1})")


def quorum_shortfall(up: list[int], total: int) -> str | None:
    """What running voting weights ``up`` (one entry per running validator) of ``total`` > 0
    mean for the log, whose quorum is more than 2/3 of the weight (docs/PROTOCOL.md §14.3):
    "the log commits nothing until more of them run", "one more crash stops the log" (the
    heaviest running one), or None."""
    if 3 * sum(up) <= 2 * total:
        return "the log commits nothing until more of them run"
    if 3 * (sum(up) - max(up)) <= 2 * total:
        return "one more crash stops the log"
    return None


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
