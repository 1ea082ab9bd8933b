"""`chimera resources`: the machine's capacity as a peer would advertise it (real psutil, real NVML probe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_resources_json_reports_real_capacity_and_no_crash_without_nvml(tmp_path):
    out = subprocess.run([sys.executable, "-m", "chimera.node.cli", "resources", "--json",
                          "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)["result"]
    assert res["cpu_count"] == os.cpu_count()
    assert 0 < res["memory_available_bytes"] <= res["memory_total_bytes"]
    assert 0 < res["disk_free_bytes"] <= res["disk_total_bytes"]
    if res["nvml"] != "ok":  # no NVIDIA driver here: zero GPUs, and the reason is reported
        assert res["gpus"] == []
    for gpu in res["gpus"]:
        assert gpu["memory_used_bytes"] <= gpu["memory_total_bytes"] and 0 <= gpu["utilization_percent"] <= 100
