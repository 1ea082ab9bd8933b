"""systemd unit for running a peer as a service (``chimera service unit|install``).

The unit runs the node as its own system user with its data dir under
``/var/lib/chimera`` (``StateDirectory=``), restarts it on failure and logs JSON
lines to the journal. It is hardened with systemd's sandboxing options but
deliberately leaves out ``MemoryDenyWriteExecute=`` and address-space limits
(``LimitAS=``): wasmtime's JIT needs writable-then-executable memory and
reserves large virtual address ranges for WASM linear memories.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

UNIT_NAME = "chimera-node.service"

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


def render_unit(chimera: str, user: str = "chimera", profile: str | None = None) -> str:
    """The unit text for the ``chimera`` executable at ``chimera`` (an absolute path)."""
    if not os.path.isabs(chimera):
        raise ValueError(f"the chimera executable must be an absolute path, got {chimera!r}")
    extra = f" --profile {profile}" if profile else ""
    return UNIT_TEMPLATE.format(user=user, chimera=chimera, extra_args=extra)


def default_executable() -> str:
    found = shutil.which("chimera") or str(Path(sys.executable).with_name("chimera"))
    return str(Path(found).resolve()) if Path(found).exists() else found


def install(unit_text: str, *, root: Path = Path("/"), user: str = "chimera",
            activate: bool = True) -> list[str]:
    """Write the unit under ``root`` and, when ``activate``, create the system user and
    reload systemd. Returns what was done, one line per step.

    Raises:
        PermissionError: not allowed to write the unit file (run as root).
    """
    steps = []
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    path.write_text(unit_text)
    path.chmod(0o644)
    steps.append(f"wrote {path}")
    if activate:
        if shutil.which("getent") and subprocess.run(["getent", "passwd", user],
                                                     capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/var/lib/chimera",
                            "--shell", "/usr/sbin/nologin", user], check=True)
            steps.append(f"created system user {user}")
        if shutil.which("systemctl"):
            subprocess.run(["systemctl", "daemon-reload"], check=False)
            steps.append("ran systemctl daemon-reload")
        steps.append(f"next: chimera network init --data-dir /var/lib/chimera (or put a join token in "
                     f"/var/lib/chimera/network.token), then systemctl enable --now {UNIT_NAME}")
    return steps
