"""Run test processes on a private, emulated LAN made of Linux network namespaces.

Purpose
-------
Chimera peers find each other with mDNS (python-zeroconf, multicast
224.0.0.251:5353).  Processes that share one network namespace all see each
other on ``lo``, which hides real-LAN problems (wrong interface chosen,
multicast not routed, addresses announced that peers cannot reach).  This
module builds a small, fully isolated LAN instead::

        switch namespace  "<prefix>-<pid>-<n>-sw"
        +-----------------------------------------+
        |  br0 (bridge, multicast_snooping = 0)   |
        |   |-- p0      |-- p1      |-- p2  ...   |
        +---|-----------|-----------|-------------+
            | veth      | veth      | veth
        +---|---+   +---|---+   +---|---+
        | lan0  |   | lan0  |   | lan0  |      host namespaces
        | .1/24 |   | .2/24 |   | .3/24 |      "<prefix>-<pid>-<n>-h<i>"
        +-------+   +-------+   +-------+

* The bridge lives in its own "switch" namespace, so nothing at all is
  created in (or routed from) the root namespace: deleting the namespaces
  deletes every interface.
* Every host namespace gets ``lo`` up, the veth end ``lan0`` with address
  ``10.77.<subnet>.<i+1>/24`` and a multicast route ``224.0.0.0/4 dev lan0``
  (there is no default route; without the multicast route, joining
  224.0.0.251 on INADDR_ANY fails with ENODEV, e.g.
  ``Zeroconf(interfaces=InterfaceChoice.Default)``).
  The 10.77/16 addresses exist only inside these namespaces.
* IMPORTANT: mDNS is only reliably carried across the Linux bridge with
  IGMP/MLD snooping off, so we set ``multicast_snooping`` to 0
  (``ip link add br0 type bridge mcast_snooping 0``; the same as
  ``echo 0 > /sys/class/net/br0/bridge/multicast_snooping``).  The bridge
  then floods multicast to every port like a dumb switch, whatever IGMP/MLD
  reports it has or has not seen.  (On kernel 6.18 IPv4 mDNS also crossed
  with snooping on, as 224.0.0.0/24 groups are not snooped there, but
  ff02::fb is subject to MLD snooping and behaviour depends on kernel and
  querier state, so do not rely on it.  The value is checked after creation.)
* IPv6 stays on by default (lan0 gets an fe80:: address, as on a real LAN)
  with duplicate address detection off, so the link-local address is usable
  at once; otherwise it is "tentative" for ~1-2 s and a zeroconf started in
  that window silently gets no IPv6 mDNS.

Usage
-----
::

    from tests.netns import LanBridge, netns_available

    ok, why = netns_available()
    if not ok:
        pytest.skip(why)

    with LanBridge(3) as lan:
        procs = [lan.popen(i, [sys.executable, "node_main.py", "--ip", h.ip],
                           stdout=subprocess.PIPE, text=True)
                 for i, h in enumerate(lan.hosts)]
        ...
    # on exit: every process started in the namespaces is killed (and their
    # pipes closed: read their output before leaving the block), then all
    # namespaces (and with them the bridge and veths) are deleted.

``LanBridge.hosts[i]`` is a :class:`Host` with ``netns``, ``ip``, ``ifname``,
``cidr``.  ``disconnect(i)`` / ``reconnect(i)`` take a host's switch port down
or up (for partition / failure-detection tests).

Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN) and ``ip`` from iproute2; use
:func:`netns_available` to skip otherwise.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "Host",
    "LanBridge",
    "NetnsError",
    "cleanup_stale",
    "ip_binary",
    "netns_available",
]

SUBNET_PREFIX = "10.77"
HOST_IFNAME = "lan0"
BRIDGE_IFNAME = "br0"
MCAST_ROUTE = "224.0.0.0/4"

_counter = itertools.count()
_counter_lock = threading.Lock()
_live: "set[LanBridge]" = set()
_live_lock = threading.Lock()


class NetnsError(RuntimeError):
    """An ``ip`` command failed while building or using the emulated LAN."""


@functools.lru_cache(maxsize=1)
def ip_binary() -> str | None:
    """Path of iproute2's ``ip`` (looks in PATH and the usual sbin dirs)."""
    found = shutil.which("ip")
    if found:
        return found
    for cand in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"):
        if os.access(cand, os.X_OK):
            return cand
    return None


def _ip(*args: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    ipb = ip_binary()
    if ipb is None:
        raise NetnsError("iproute2 'ip' binary not found")
    cmd = [ipb, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}"
        )
    return proc


def _next_id() -> int:
    with _counter_lock:
        return next(_counter)


def _netns_list() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    # lines look like "name" or "name (id: 3)"
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_netns_pids(ns: str, grace: float = 2.0) -> None:
    """SIGTERM then SIGKILL every process still living in namespace ``ns``."""
    def pids() -> list[int]:
        out = _ip("netns", "pids", ns, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]

    victims = pids()
    if not victims:
        return
    for pid in victims:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        victims = pids()
        if not victims:
            return
        time.sleep(0.05)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _delete_netns(ns: str) -> None:
    _kill_netns_pids(ns)
    _ip("netns", "del", ns, check=False)


@functools.lru_cache(maxsize=1)
def netns_available() -> tuple[bool, str]:
    """Can this process build a :class:`LanBridge`?

    Returns ``(True, "")`` or ``(False, reason)``; the reason is meant for
    ``pytest.skip``.  The probe really creates a namespace with a bridge and a
    veth pair (and deletes it), so missing kernel modules are caught too.
    The result is cached.
    """
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux (platform is {sys.platform})"
    if os.geteuid() != 0:
        return False, "network namespace tests need root (CAP_NET_ADMIN/CAP_SYS_ADMIN)"
    if ip_binary() is None:
        return False, "iproute2 'ip' not found (apt-get install iproute2)"
    ns = f"chmprobe-{os.getpid()}-{_next_id()}"
    try:
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "add", "pbr0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", ns, "link", "add", "pv0", "type", "veth", "peer", "name", "pv1")
        _ip("-n", ns, "link", "set", "pv0", "master", "pbr0")
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return False, f"cannot create network namespace/bridge/veth: {exc}".strip()
    finally:
        _ip("netns", "del", ns, check=False)
    return True, ""


def cleanup_stale(prefix: str = "chm") -> list[str]:
    """Delete namespaces left by LanBridge runs of processes that are gone.

    Only names matching ``<prefix>-<pid>-<n>-(sw|h<i>)`` whose ``pid`` is no
    longer alive are touched.  Returns the deleted names.
    """
    pat = re.compile(rf"^{re.escape(prefix)}-(\d+)-\d+-(?:sw|h\d+)$")
    removed = []
    for ns in _netns_list():
        m = pat.match(ns)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # owner still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _delete_netns(ns)
        removed.append(ns)
    return removed


@dataclass(frozen=True)
class Host:
    """One emulated machine on the LAN."""

    index: int
    netns: str  #: network namespace name (for ``ip netns exec``)
    ip: str  #: IPv4 address of ``ifname``, e.g. "10.77.3.1"
    ifname: str  #: interface name inside the namespace ("lan0")
    cidr: str  #: address with prefix length, e.g. "10.77.3.1/24"
    port: str  #: name of this host's port on the bridge (in the switch ns)


class LanBridge:
    """Context manager: ``n_hosts`` namespaces on one bridge with mDNS working.

    Parameters
    ----------
    n_hosts:
        number of host namespaces (1..250).
    prefix:
        namespace name prefix; names are ``<prefix>-<pid>-<n>-h<i>`` and
        ``<prefix>-<pid>-<n>-sw`` so parallel and leftover runs never collide.
    subnet:
        third octet X of ``10.77.X.0/24``; default derived from the instance
        counter.  (The namespaces are isolated, so clashes would be harmless.)
    disable_ipv6:
        turn IPv6 off in the host namespaces (default False: lan0 then also
        has an fe80:: address, as on a real LAN).
    clean_stale:
        first delete leftover namespaces of dead processes with the same prefix.
    """

    def __init__(
        self,
        n_hosts: int,
        prefix: str = "chm",
        *,
        subnet: int | None = None,
        disable_ipv6: bool = False,
        clean_stale: bool = True,
    ) -> None:
        if not 1 <= n_hosts <= 250:
            raise ValueError("n_hosts must be between 1 and 250")
        if not re.fullmatch(r"[A-Za-z0-9_.]+", prefix):
            raise ValueError("prefix must be alphanumeric ([A-Za-z0-9_.]+)")
        self.n_hosts = n_hosts
        self.prefix = prefix
        self.id = _next_id()
        self.subnet = (self.id % 250) + 1 if subnet is None else subnet
        if not 0 <= self.subnet <= 255:
            raise ValueError("subnet must be 0..255")
        self.disable_ipv6 = disable_ipv6
        self.clean_stale = clean_stale
        base = f"{prefix}-{os.getpid()}-{self.id}"
        self.switch_netns = f"{base}-sw"
        self.bridge = BRIDGE_IFNAME
        self.hosts: list[Host] = [
            Host(
                index=i,
                netns=f"{base}-h{i}",
                ip=f"{SUBNET_PREFIX}.{self.subnet}.{i + 1}",
                ifname=HOST_IFNAME,
                cidr=f"{SUBNET_PREFIX}.{self.subnet}.{i + 1}/24",
                port=f"p{i}",
            )
            for i in range(n_hosts)
        ]
        self._created: list[str] = []  # namespaces actually created, for teardown
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._up = False

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> "LanBridge":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "LanBridge":
        if self._up:
            return self
        if self.clean_stale:
            cleanup_stale(self.prefix)
        with _live_lock:
            _live.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self._up = True
        return self

    def _add_netns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        sw = self.switch_netns
        self._add_netns(sw)
        # Bridge without STP (ports forward at once) and without IGMP snooping
        # (otherwise mDNS multicast is not flooded between ports).
        _ip("-n", sw, "link", "add", self.bridge, "type", "bridge",
            "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")
        self._check_snooping_off()
        _ip("-n", sw, "link", "set", self.bridge, "up")

        for h in self.hosts:
            self._add_netns(h.netns)
            if self.disable_ipv6:
                self._sysctl(h.netns, "net/ipv6/conf/all/disable_ipv6", 1)
                self._sysctl(h.netns, "net/ipv6/conf/default/disable_ipv6", 1)
            else:
                # No duplicate address detection: otherwise lan0's fe80::
                # address stays "tentative" ~1-2 s after link-up, and a
                # zeroconf started in that window silently gets no IPv6 mDNS.
                self._sysctl(h.netns, "net/ipv6/conf/all/accept_dad", 0)
                self._sysctl(h.netns, "net/ipv6/conf/default/accept_dad", 0)
            # veth pair born in the switch ns; its peer goes straight into
            # the host ns, so the root namespace never sees either end.
            _ip("-n", sw, "link", "add", h.port, "type", "veth",
                "peer", "name", h.ifname, "netns", h.netns)
            _ip("-n", sw, "link", "set", h.port, "master", self.bridge)
            _ip("-n", sw, "link", "set", h.port, "up")
            _ip("-n", h.netns, "addr", "add", h.cidr, "dev", h.ifname)
            _ip("-n", h.netns, "link", "set", h.ifname, "up")
            # Multicast route: lets zeroconf join/send 224.0.0.251 without a
            # default route.  (No default route: nothing can leave the LAN.)
            _ip("-n", h.netns, "route", "add", MCAST_ROUTE, "dev", h.ifname)

        self._wait_links_up()

    def _sysctl(self, ns: str, key: str, value: int | str) -> None:
        path = "/proc/sys/" + key.replace(".", "/").lstrip("/")
        self.run_in_netns(ns, ["sh", "-c", f"echo {value} > {path}"], check=True)

    def _check_snooping_off(self) -> None:
        path = f"/sys/class/net/{self.bridge}/bridge/multicast_snooping"
        val = self.run_in_netns(self.switch_netns, ["cat", path]).stdout.strip()
        if val != "0":
            # Older iproute2 without mcast_snooping: write sysfs directly.
            self.run_in_netns(self.switch_netns, ["sh", "-c", f"echo 0 > {path}"], check=True)
            val = self.run_in_netns(self.switch_netns, ["cat", path]).stdout.strip()
        if val != "0":
            raise NetnsError(f"could not disable multicast snooping on {self.bridge}: {val!r}")

    def _wait_links_up(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.hosts)
        while pending:
            still = []
            for h in pending:
                out = _ip("-n", h.netns, "-o", "link", "show", h.ifname, check=False).stdout
                if "LOWER_UP" not in out:
                    still.append(h)
                elif not self.disable_ipv6:
                    # IPv6 link-local present and usable (not tentative)?
                    v6 = _ip("-n", h.netns, "-o", "-6", "addr", "show", "dev", h.ifname,
                             "scope", "link", check=False).stdout
                    if "fe80::" not in v6 or "tentative" in v6:
                        still.append(h)
            pending = still
            if not pending:
                return
            if time.monotonic() > deadline:
                raise NetnsError(f"links not up after {timeout}s: {[h.netns for h in pending]}")
            time.sleep(0.02)

    # --------------------------------------------------------------- teardown
    def close(self) -> None:
        """Kill processes started here, then delete every namespace created.

        Safe to call more than once and after a partial setup.
        """
        with self._lock:
            procs, self._procs = self._procs, []
        _terminate_all(procs)
        for ns in reversed(self._created):
            _delete_netns(ns)
        self._created.clear()
        self._up = False
        with _live_lock:
            _live.discard(self)

    # -------------------------------------------------------------- processes
    def _host(self, host: int | Host) -> Host:
        return host if isinstance(host, Host) else self.hosts[host]

    def exec_argv(self, host: int | Host, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside ``host``'s namespace."""
        return [ip_binary() or "ip", "netns", "exec", self._host(host).netns, *map(str, argv)]

    def popen(self, host: int | Host, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside host ``host``'s namespace; returns the Popen.

        ``kwargs`` go to :class:`subprocess.Popen`.  The process gets its own
        session (process group) unless ``start_new_session`` is given, so that
        cleanup can kill its children too.  Everything started here is killed
        by :meth:`close` (SIGTERM, then SIGKILL after ``grace``); anything else
        still running in the namespaces is killed as well.
        ``ip netns exec`` execs the program, so ``proc.pid`` is the program.
        """
        if not self._up:
            raise NetnsError("LanBridge is not started")
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.exec_argv(host, argv), **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def run(self, host: int | Host, argv: Sequence[str], *, check: bool = False,
            timeout: float = 30.0, **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion inside host ``host`` (text, captured output)."""
        return self.run_in_netns(self._host(host).netns, argv, check=check,
                                 timeout=timeout, **kwargs)

    @staticmethod
    def run_in_netns(ns: str, argv: Sequence[str], *, check: bool = False,
                     timeout: float = 30.0, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        cmd = [ip_binary() or "ip", "netns", "exec", ns, *map(str, argv)]
        proc = subprocess.run(cmd, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise NetnsError(f"command failed ({proc.returncode}) in {ns}: {argv}\n{proc.stderr}")
        return proc

    def terminate(self, proc: subprocess.Popen, grace: float = 3.0) -> int | None:
        """Stop one process started with :meth:`popen` (TERM, then KILL)."""
        _terminate_all([proc], grace)
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)
        return proc.returncode

    # -------------------------------------------------------------- topology
    def disconnect(self, host: int | Host) -> None:
        """Unplug a host: its switch port goes down (its own lan0 goes NO-CARRIER)."""
        _ip("-n", self.switch_netns, "link", "set", self._host(host).port, "down")

    def reconnect(self, host: int | Host) -> None:
        """Plug a host back in."""
        _ip("-n", self.switch_netns, "link", "set", self._host(host).port, "up")

    def __repr__(self) -> str:
        return (f"LanBridge(switch={self.switch_netns!r}, "
                f"hosts={[(h.netns, h.ip) for h in self.hosts]!r}, up={self._up})")


def _terminate_all(procs: Sequence[subprocess.Popen], grace: float = 3.0) -> None:
    def signal_proc(p: subprocess.Popen, sig: int) -> None:
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)  # own process group (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass

    live = [p for p in procs if p.poll() is None]
    for p in live:
        signal_proc(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_proc(p, signal.SIGKILL)
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
    for p in procs:  # close pipes so no ResourceWarning
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


@atexit.register
def _cleanup_at_exit() -> None:
    with _live_lock:
        live = list(_live)
    for lan in live:
        try:
            lan.close()
        except Exception:
            pass
