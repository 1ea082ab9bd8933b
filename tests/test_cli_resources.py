"""`chimera resources`: the machine's capacity as a peer would advertise it (real psutil, real NVML probe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _resources(data_dir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chimera.node.cli", "resources", *extra,
                           "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60)


def test_resources_json_reports_real_capacity_and_no_crash_without_nvml(tmp_path):
    out = _resources(tmp_path, "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)["result"]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= res["cpu_count"] <= usable  # the CPUs this process may use (affinity, cgroup quota)
    assert res["max_wasm_memory_bytes"] == 64 << 20  # the default configuration
    assert res["max_task_wall_time_ms"] == 3_600_000
    assert 0 < res["memory_available_bytes"] <= res["memory_total_bytes"]
    assert 0 < res["disk_free_bytes"] <= res["disk_total_bytes"]
    if res["nvml"] != "ok":  # no NVIDIA driver here: zero GPUs, and the reason is reported
        assert res["gpus"] == []
    for gpu in res["gpus"]:
        assert gpu["memory_used_bytes"] <= gpu["memory_total_bytes"] and 0 <= gpu["utilization_percent"] <= 100


def test_resources_uses_the_data_dirs_config_as_the_node_does(tmp_path):
    (tmp_path / "config.toml").write_text("fabric_max_wasm_memory_bytes = 33554432\nfabric_probe_gpus = 2\n")
    out = _resources(tmp_path, "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)["result"]
    assert res["max_wasm_memory_bytes"] == 32 << 20
    assert [g["name"] for g in res["gpus"]] == ["Simulated GPU (fabric_probe_gpus)"] * 2
    assert [g["index"] for g in res["gpus"]] == [0, 1] and "fabric_probe_gpus" in res["nvml"]
    # the edge profile (chosen in the config file) lowers the advertised per-agent cap, as on a node
    (tmp_path / "config.toml").write_text('profile = "edge"\n')
    text = _resources(tmp_path)
    assert text.returncode == 0, text.stderr
    assert "16 MiB linear memory per agent, tasks up to 600 s" in text.stdout
    # a broken config is a usage error naming the field, not a silently default advertisement
    (tmp_path / "config.toml").write_text("fabric_max_wasm_memory_bytes = 1\n")
    bad = _resources(tmp_path)
    assert bad.returncode == 2 and "fabric_max_wasm_memory_bytes" in bad.stderr
