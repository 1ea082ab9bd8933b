"""Edge deployment: profile limits applied and visible, optional extras reported, service unit."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chimera.node import service
from chimera.node.config import PROFILES, ConfigError, load_config
from tests.conftest import FAST, async_wait_until


def test_edge_profile_under_explicit_settings(tmp_path: Path):
    cfg = load_config(tmp_path, environ={}, overrides={"profile": "edge"})
    for key, value in PROFILES["edge"].items():
        assert getattr(cfg, key) == value
    (tmp_path / "config.toml").write_text("[node]\nprofile = 'edge'\nmailbox_size = 2048\n")
    cfg = load_config(tmp_path, environ={"CHIMERA_PROBE_INTERVAL_S": "3.0"})
    assert cfg.mailbox_size == 2048 and cfg.probe_interval_s == 3.0 and cfg.recv_hwm == 1000
    with pytest.raises(ConfigError):
        load_config(tmp_path, environ={}, overrides={"profile": "tiny"})


async def test_edge_limits_visible_in_status_and_advertised(tmp_path, network):
    from chimera.node.config import NodeConfig
    from chimera.node.runtime import Node

    edge = load_config(tmp_path / "e", environ={}, overrides={**FAST, "profile": "edge",
                                                              "probe_interval_s": 0.3, "probe_timeout_s": 0.1})
    a = Node(tmp_path / "a", NodeConfig(**FAST), network)
    e = Node(tmp_path / "e", edge, network)
    await a.start()
    await e.start()
    try:
        e.add_contact_uri(a.contact_uri, static=True)
        e.run_membership_actions()
        assert await async_wait_until(lambda: e.peer_id in {m for m in a.membership.members}, 30)
        status = e.status()
        assert status["profile"] == "edge"
        assert status["limits"]["mailbox_size"] == 512 and status["limits"]["recv_hwm"] == 1000
        assert e.transport.router.getsockopt(__import__("zmq").RCVHWM) == 1000
        assert e.supervisor.get("membership").mailbox.maxsize == 512
        assert a.membership.members[e.peer_id].contact.profile == "edge"  # advertised in membership
        # WASM limits and agent concurrency: through the admin API, and advertised to placement
        from chimera.node import admin

        limits = (await asyncio.to_thread(admin.call, e.data_dir, "status"))["limits"]
        assert limits["fabric_task_slots"] == 1 and limits["fabric_max_wasm_memory_bytes"] == 16 << 20
        assert limits["fabric_max_task_wall_s"] == 600.0
        assert await async_wait_until(lambda: e.peer_id in a.fabric.capacity, 30)
        advert, _ = a.fabric.capacity[e.peer_id]
        assert advert.max_wasm_memory_bytes == 16 << 20 and advert.max_task_wall_time_ms == 600_000
    finally:
        await e.stop()
        await a.stop()


def test_optional_extras_reported_not_crashing(tmp_path: Path):
    from chimera.node import features

    report = features.report()
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    assert report["fast_event_loop"]["available"] == has_uvloop
    if not has_uvloop:
        assert "pip install 'chimera-mesh[fast]'" in report["fast_event_loop"]["detail"]


def test_service_unit_is_hardened_and_installs_to_a_staging_root(tmp_path: Path):
    unit = service.render_unit("/opt/chimera/venv/bin/chimera", profile="edge")
    for line in ("User=chimera", "StateDirectory=chimera", "Environment=CHIMERA_HOME=/var/lib/chimera",
                 "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ExecStart=/opt/chimera/venv/bin/chimera node --log-json --profile edge",
                 "MemoryMax=75%"):  # libzmq may buffer a whole multipart message: a cap, then a restart
        assert line in unit.splitlines(), line
    assert "MemoryMax=2G" in service.render_unit("/c", memory_max="2G").splitlines()
    assert "MemoryMax=infinity" in service.render_unit("/c", memory_max="infinity").splitlines()
    for bad in ("0%", "101%", "1K", "63M", "2 G", "lots", "75%\nUser=root"):
        with pytest.raises(service.UnitError):
            service.render_unit("/c", memory_max=bad)
    active = [l for l in unit.splitlines() if not l.startswith("#")]
    assert not any(l.startswith(("MemoryDenyWriteExecute", "LimitAS")) for l in active)
    with pytest.raises(ValueError):
        service.render_unit("chimera")
    real = str(Path(sys.executable).with_name("chimera"))  # verify checks that it exists
    out = subprocess.run([sys.executable, "-m", "chimera.node.cli", "service", "install", "--root",
                          str(tmp_path), "--executable", real],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "etc/systemd/system/chimera-node.service"
    assert path.read_text().startswith("[Unit]")
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
