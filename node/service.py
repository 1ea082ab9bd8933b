"""systemd unit for running a peer as a service (``chimera service unit|install``).

The unit runs the node as its own system user with its data dir under
``/var/lib/chimera`` (``StateDirectory=``), restarts it on failure and logs JSON
lines to the journal. It is hardened with systemd's sandboxing options but
deliberately leaves out ``MemoryDenyWriteExecute=`` and address-space limits
(``LimitAS=``): wasmtime's JIT needs writable-then-executable memory and
reserves large virtual address ranges for WASM linear memories. It caps the
memory the node may use instead (``MemoryMax=``, cgroup: resident memory, not
reservations; default 75 % of the machine's): libzmq holds a whole multipart
message before the node can refuse it (PROTOCOL.md §5.4), so a peer could
otherwise make the machine swap; at the cap the kernel kills the node and
systemd restarts it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .config import PROFILES, ConfigError

UNIT_NAME = "chimera-node.service"
DEFAULT_MEMORY_MAX = "75%"

UNIT_TEMPLATE = """\
[Unit]
Description=Chimera Mesh peer
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
Group={user}
StateDirectory=chimera
StateDirectoryMode=0700
Environment=CHIMERA_HOME=/var/lib/chimera
Environment=PYTHONUNBUFFERED=1
ExecStart={chimera} node --log-json{extra_args}
Restart=on-failure
RestartSec=2s
TimeoutStopSec=20s
KillSignal=SIGTERM
# Memory the node may use at most (a peer can make libzmq buffer a whole multipart
# message before the node sees it): past it the node is killed and restarted.
MemoryMax={memory_max}
# Hardening. Not used on purpose: MemoryDenyWriteExecute= and LimitAS= (they
# break wasmtime's JIT and its virtual memory reservations).
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy=multi-user.target
"""


class UnitError(ConfigError, ValueError):
    """A unit parameter is unusable (the CLI reports it as a usage error, exit 2)."""


class InstallError(OSError):
    """Installing went wrong after the unit file was written: creating the system user or
    reloading systemd failed (the CLI reports it as a runtime failure, exit 1)."""


# What a unit's ExecStart= can hold as is: systemd would split on spaces and expand $, % and \.
_EXEC_RE = re.compile(r"/[\w/.+,:@~=-]*")
# useradd's default NAME_REGEX, at most 32 characters
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,30}\$?")


def render_unit(chimera: str, user: str = "chimera", profile: str | None = None,
                memory_max: str = DEFAULT_MEMORY_MAX) -> str:
    """The unit text for the ``chimera`` executable at ``chimera`` (an absolute path).

    ``memory_max``: systemd's ``MemoryMax=``: a percentage of the machine's memory (1-100 %),
    or bytes with an optional K, M, G or T suffix (at least 64M), or ``infinity``.

    Raises:
        UnitError (a ValueError): ``chimera`` is not an absolute path a unit line can hold,
            ``user`` is no valid system user name, ``profile`` is no profile of
            node/config.py's PROFILES, or ``memory_max`` is none of the forms above.
    """
    if not os.path.isabs(chimera):
        raise UnitError(f"the chimera executable must be an absolute path, got {chimera!r}")
    if not _EXEC_RE.fullmatch(chimera):
        raise UnitError(f"the chimera executable {chimera!r} has characters a unit's ExecStart= "
                        "cannot hold as is (space, quote, $, %, \\, control)")
    if not _USER_RE.fullmatch(user):
        raise UnitError(f"{user!r} is no valid system user name (lower-case letters, digits, _ and -, "
                        "at most 32)")
    if profile is not None and profile not in PROFILES:
        raise UnitError(f"unknown profile {profile!r}; known: {', '.join(sorted(PROFILES))}")
    _check_memory_max(memory_max)
    extra = f" --profile {profile}" if profile else ""
    return UNIT_TEMPLATE.format(user=user, chimera=chimera, extra_args=extra, memory_max=memory_max)


def _check_memory_max(value: str) -> None:
    if value == "infinity":
        return
    percent = re.fullmatch(r"(\d{1,3})%", value)
    if percent:
        if not 1 <= int(percent.group(1)) <= 100:
            raise UnitError(f"memory max {value!r}: a percentage is 1% .. 100%")
        return
    size = re.fullmatch(r"(\d{1,15})([KMGT]?)", value)
    if size is None:
        raise UnitError(f"memory max {value!r}: give a percentage (75%), bytes with K/M/G/T (2G) or infinity")
    if int(size.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[size.group(2)] < 64 << 20:
        raise UnitError(f"memory max {value!r} is below 64M: the node would not start")


def default_executable() -> str:
    found = shutil.which("chimera") or str(Path(sys.executable).with_name("chimera"))
    return str(Path(found).resolve()) if Path(found).exists() else found


def _run(argv: list[str], what: str, done: str, check: bool = True) -> int:
    """Run ``argv``; its exit status. InstallError (one line, with its stderr) when it cannot
    run, or with ``check`` when it exits non-zero; ``done`` says what was done before."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{what} failed: {exc}; {done}") from None
    if check and out.returncode != 0:
        detail = " ".join((out.stderr or out.stdout or "").split()) or "no message"
        raise InstallError(f"{what} failed (exit {out.returncode}): {detail}; {done}")
    return out.returncode


def install(unit_text: str, *, root: Path = Path("/"), user: str = "chimera",
            activate: bool = True) -> list[str]:
    """Write the unit under ``root`` and, when ``activate``, create the system user and
    reload systemd. Returns what was done, one line per step.

    ``getent``, ``useradd`` and ``systemctl`` are looked up on ``PATH`` (tests point it at stand-ins
    and ``root`` at a temporary directory).

    Raises:
        PermissionError: not allowed to write the unit file (run as root).
        InstallError (an OSError): the unit is written but ``useradd`` or ``systemctl
            daemon-reload`` failed; the message says which, with its stderr.
    """
    steps = []
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    path.write_text(unit_text)
    path.chmod(0o644)
    steps.append(f"wrote {path}")
    if activate:
        done = f"wrote {path}"
        getent = shutil.which("getent")
        if getent and _run([getent, "passwd", user], f"getent passwd {user}", done, check=False) != 0:
            useradd = shutil.which("useradd")
            if useradd is None:
                raise InstallError(f"no system user {user} and no useradd to create it; {done}")
            _run([useradd, "--system", "--no-create-home", "--home-dir", "/var/lib/chimera",
                  "--shell", "/usr/sbin/nologin", user], f"useradd {user}", done)
            steps.append(f"created system user {user}")
            done += f" and created system user {user}"
        systemctl = shutil.which("systemctl")
        if systemctl is None:
            steps.append("no systemctl on PATH: systemd was not reloaded")
        else:
            _run([systemctl, "daemon-reload"], "systemctl daemon-reload", done)
            steps.append("ran systemctl daemon-reload")
        steps.append(f"next: chimera network init --data-dir /var/lib/chimera (or put a join token in "
                     f"/var/lib/chimera/network.token, mode 600, owned by the service user), then "
                     f"systemctl enable --now {UNIT_NAME}")
    return steps
