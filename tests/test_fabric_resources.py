"""Resource probes (psutil, cgroup limits, NVML with MIG) and the content-addressed module store."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import msgpack
import psutil
import pytest

from chimera.fabric.modules import ModuleIntegrityError, ModuleNotFound, ModuleStore, ModuleTooLarge, module_hash
from chimera.fabric.probes import CgroupLimits, StaticProbe, SystemProbe, read_cgroup_limits, usable_cpu_count
from chimera.fabric.resources import GpuInfo, Resources
from chimera.protocol.errors import MalformedError
from chimera.protocol.messages import decode_fields, encode_fields
from fabric_helpers import wasm


def test_system_probe_reports_sane_values(tmp_path):
    probe = SystemProbe(tmp_path)
    res = probe.resources()
    assert 1 <= res.cpu_count <= (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    assert res.load_1m >= 0
    assert 0 < res.memory_available_bytes <= res.memory_total_bytes
    assert 0 < res.disk_free_bytes <= res.disk_total_bytes
    assert res.gpu_count == len(res.gpus) >= 0
    for gpu in res.gpus:  # only where an NVIDIA driver exists
        assert gpu.memory_total_bytes > 0 and 0 <= gpu.memory_used_bytes <= gpu.memory_total_bytes
        assert 0 <= gpu.utilization_percent <= 100 and gpu.name
    # advertised as a wire record: encodes and decodes back to the same value
    wire = msgpack.packb(encode_fields(res), use_bin_type=True)
    assert decode_fields(Resources, msgpack.unpackb(wire, raw=False)) == res
    probe.close()


def test_no_nvidia_driver_means_zero_gpus(tmp_path, monkeypatch):
    import pynvml

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    probe = SystemProbe(tmp_path)
    res = probe.resources()
    assert res.gpus == () and res.gpu_count == 0 and probe.nvml_error
    assert probe.resources().cpu_count >= 1  # carries on, and does not retry NVML every time


def test_static_probe_and_strict_decoding():
    inv = Resources(cpu_count=8, memory_total_bytes=1 << 34, memory_available_bytes=1 << 33,
                    gpus=(GpuInfo(index=0, name="H100", memory_total_bytes=80 << 30, memory_used_bytes=0),))
    assert StaticProbe(inv).resources() is inv and "1 GPU" in inv.describe()
    body = encode_fields(inv)
    body["gpus"][0]["utilization_percent"] = 101
    with pytest.raises(MalformedError):
        decode_fields(Resources, body)
    with pytest.raises(MalformedError):
        decode_fields(Resources, {**encode_fields(inv), "secret_field": 1})


def test_module_store_verifies_hashes(tmp_path):
    store = ModuleStore(tmp_path / "modules", max_module_bytes=1 << 20)
    data = wasm("wordfreq")
    sha = store.put(data)
    assert sha == module_hash(data) and store.has(sha) and store.list() == [sha]
    assert store.get(sha) == data
    assert oct((tmp_path / "modules" / f"{sha}.wasm").stat().st_mode & 0o777) == "0o600"
    other = wasm("counter")
    with pytest.raises(ModuleIntegrityError):
        store.accept_fetched(sha, other)  # a peer sent bytes that are not what we asked for
    assert store.accept_fetched(module_hash(other), other) == module_hash(other)
    with pytest.raises(ModuleTooLarge):
        store.accept_fetched("0" * 64, b"x" * ((1 << 20) + 1))
    with pytest.raises(ValueError):
        store.get("../../etc/passwd")
    with pytest.raises(ModuleNotFound):
        store.get("f" * 64)
    (tmp_path / "modules" / f"{sha}.wasm").write_bytes(b"damaged")
    with pytest.raises(ModuleIntegrityError):
        store.get(sha)
    assert not store.has(sha)


# ---------------------------------------------------------------- container limits (cgroup v1/v2, affinity)

MIB = 1 << 20


def _files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_cgroup_v2_quota_and_memory_limit_bound_the_inventory(tmp_path):
    root = tmp_path / "cgroup"
    _files(root, {
        "cgroup.controllers": "cpuset cpu io memory pids\n",
        # the parent: 1.5 CPUs, 1 GiB of which 900 MiB are in use (no inactive cache)
        "kubepods/cpu.max": "150000 100000\n", "kubepods/memory.max": f"{1024 * MIB}\n",
        "kubepods/memory.current": f"{900 * MIB}\n", "kubepods/memory.stat": "anon 1\ninactive_file 0\n",
        # this process's cgroup: no CPU quota, 512 MiB, 300 MiB used of which 100 MiB inactive page cache
        "kubepods/pod1/cpu.max": "max 100000\n", "kubepods/pod1/memory.max": f"{512 * MIB}\n",
        "kubepods/pod1/memory.current": f"{300 * MIB}\n",
        "kubepods/pod1/memory.stat": f"anon {200 * MIB}\nfile {100 * MIB}\ninactive_file {100 * MIB}\n",
    })
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    limits = read_cgroup_limits(root, proc)
    assert limits == CgroupLimits(cpu_quota_cpus=1.5, memory_limit_bytes=512 * MIB,
                                  memory_available_bytes=124 * MIB)  # the parent's 1024 - 900 is the least
    res = SystemProbe(tmp_path, nvml=False, cgroup_root=root, proc_cgroup=proc).resources()
    assert res.cpu_count == min(_affinity(), 2)  # ceil(1.5)
    assert res.memory_total_bytes == 512 * MIB and res.memory_available_bytes == 124 * MIB


def test_cgroup_v1_limits_and_the_unlimited_value(tmp_path):
    root = tmp_path / "cgroup"
    _files(root, {
        # the container sees its own cgroup at the mount root (its path in /proc is the host's)
        "cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "memory/memory.limit_in_bytes": f"{256 * MIB}\n", "memory/memory.usage_in_bytes": f"{200 * MIB}\n",
        "memory/memory.stat": f"cache {50 * MIB}\ntotal_inactive_file {40 * MIB}\n",
    })
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n"
                    "1:name=systemd:/docker/abc\n")
    limits = read_cgroup_limits(root, proc)
    assert limits == CgroupLimits(cpu_quota_cpus=0.5, memory_limit_bytes=256 * MIB,
                                  memory_available_bytes=96 * MIB)
    res = SystemProbe(tmp_path, nvml=False, cgroup_root=root, proc_cgroup=proc).resources()
    assert res.cpu_count == 1 and res.memory_total_bytes == 256 * MIB and res.memory_available_bytes == 96 * MIB
    # no limit: v1 "unlimited" (a huge page-rounded number) and quota -1 leave the host's values
    _files(root, {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "memory/memory.limit_in_bytes": "9223372036854771712\n"})
    assert read_cgroup_limits(root, proc) == CgroupLimits()
    res = SystemProbe(tmp_path, nvml=False, cgroup_root=root, proc_cgroup=proc).resources()
    assert res.cpu_count == _affinity() and res.memory_total_bytes == psutil.virtual_memory().total


def test_cgroup_files_missing_or_garbled_mean_no_limit(tmp_path):
    root = tmp_path / "cgroup"
    _files(root, {"cgroup.controllers": "cpu memory\n", "cpu.max": "garbage\n", "memory.max": "max\n"})
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/\n")
    assert read_cgroup_limits(root, proc) == CgroupLimits()
    assert read_cgroup_limits(tmp_path / "nowhere", tmp_path / "no_such_file") == CgroupLimits()
    assert usable_cpu_count(CgroupLimits(cpu_quota_cpus=0.01)) == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_cpu_count_is_the_affinity_set_not_the_host(tmp_path):
    """A process pinned to one CPU (taskset, Docker --cpuset-cpus) advertises one CPU."""
    cpu = min(os.sched_getaffinity(0))
    code = ("import os, sys; from chimera.fabric.probes import SystemProbe; "
            f"os.sched_setaffinity(0, {{{cpu}}}); "
            f"print(SystemProbe({str(tmp_path)!r}, nvml=False).resources().cpu_count)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


# ---------------------------------------------------------------- NVML: MIG, failures (a stand-in for pynvml)


class FakeNvml(types.ModuleType):
    """Stands in for ``pynvml`` where no NVIDIA GPU exists (CI): the real module's error classes and
    constants and the calls the probe makes, with the real signatures and return shapes
    (ctypes ``c_nvmlMemory_t`` / ``c_nvmlUtilization_t``, ``[current, pending]`` MIG mode), answered
    from a table of devices. A value that is an exception instance is raised instead."""

    CALLS = ("nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName",
             "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMigMode",
             "nvmlDeviceGetMaxMigDeviceCount", "nvmlDeviceGetMigDeviceHandleByIndex")

    def __init__(self, devices: list[dict]) -> None:
        import pynvml

        super().__init__("pynvml")
        self.real = pynvml
        for name in dir(pynvml):  # errors (NVMLError and its subclasses) and NVML_* constants
            if name.startswith(("NVML_", "NVMLError")):
                setattr(self, name, getattr(pynvml, name))
        self.devices = devices

    def err(self, code: int):
        return self.real.NVMLError(code)

    @staticmethod
    def _answer(value):
        if isinstance(value, BaseException):
            raise value
        return value

    def nvmlInit(self):
        return None

    def nvmlShutdown(self):
        return None

    def nvmlDeviceGetCount(self):
        return self._answer(len(self.devices) if not isinstance(self.devices, BaseException) else self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def _dev(self, handle) -> dict:
        if handle[0] == "gpu":
            return self.devices[handle[1]]
        return self.devices[handle[1]]["mig"]["devices"][handle[2]]

    def nvmlDeviceGetName(self, handle):
        return self._answer(self._dev(handle).get("name", "NVIDIA H200"))

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        total, used = self._answer(self._dev(handle).get("memory", (141 << 30, 1 << 30)))
        return self.real.c_nvmlMemory_t(total=total, free=total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return self.real.c_nvmlUtilization_t(gpu=self._answer(self._dev(handle).get("util", 37)), memory=5)

    def nvmlDeviceGetMigMode(self, device):
        dev = self._dev(device)
        if "mig" not in dev:
            raise self.err(self.real.NVML_ERROR_NOT_SUPPORTED)
        return [self.real.NVML_DEVICE_MIG_ENABLE if dev["mig"].get("enabled", True) else 0, 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, device):
        return self._dev(device)["mig"]["max"]

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device, index):
        if index not in self._dev(device)["mig"]["devices"]:
            raise self.err(self.real.NVML_ERROR_NOT_FOUND)
        return ("mig", device[1], index)


def test_fake_nvml_has_the_real_bindings_interface():
    import inspect

    import pynvml

    fake = FakeNvml([])
    for name in FakeNvml.CALLS:
        real = inspect.signature(getattr(pynvml, name))
        assert inspect.signature(getattr(fake, name)).parameters.keys() == real.parameters.keys(), name


@pytest.fixture
def fake_nvml(monkeypatch):
    def install(devices):
        fake = FakeNvml(devices)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake
    return install


def test_mig_devices_are_advertised_as_separate_units(tmp_path, fake_nvml):
    nvml = fake_nvml([])
    no_permission = nvml.err(nvml.NVML_ERROR_NO_PERMISSION)
    not_supported = nvml.err(nvml.NVML_ERROR_NOT_SUPPORTED)
    nvml.devices += [
        {"name": "NVIDIA H200"},
        # MIG parent: its memory is NO_PERMISSION for an unprivileged caller; two MIG devices in 7 slots
        {"name": "NVIDIA H200", "memory": no_permission, "util": not_supported,
         "mig": {"max": 7, "devices": {0: {"name": "NVIDIA H200 MIG 1g.18gb", "memory": (18 << 30, 0),
                                           "util": not_supported},
                                       2: {"name": b"NVIDIA H200", "memory": (35 << 30, 1 << 30),
                                           "util": not_supported}}}},
        {"name": "NVIDIA H200", "mig": {"enabled": False, "max": 7, "devices": {}}},  # MIG-capable, off
    ]
    probe = SystemProbe(tmp_path, cgroup_root=None)
    res = probe.resources()
    by_index = {g.index: g for g in res.gpus}
    assert sorted(by_index) == [0, 2, 3, 5]  # GPU 1's slots take 3..9 (after the 3 NVML indices)
    assert by_index[0].name == by_index[2].name == "NVIDIA H200" and by_index[0].utilization_percent == 37
    assert by_index[3].name == "NVIDIA H200 MIG 1g.18gb (GPU 1 MIG 0)"
    assert by_index[3].memory_total_bytes == 18 << 30 and by_index[3].utilization_percent == 0
    assert by_index[5].name == "NVIDIA H200 MIG (GPU 1 MIG 2)" and by_index[5].memory_used_bytes == 1 << 30
    assert probe.nvml_error is None and probe.gpu_errors == 0
    wire = msgpack.packb(encode_fields(res), use_bin_type=True)
    assert decode_fields(Resources, msgpack.unpackb(wire, raw=False)) == res


def test_mig_units_beyond_index_63_are_left_out(tmp_path, fake_nvml):
    full = {"mig": {"max": 7, "devices": {i: {"name": "A100 MIG 1g.5gb", "memory": (5 << 30, 0)} for i in range(7)}}}
    fake_nvml([full for _ in range(10)])  # 10 GPUs x 7 MIG devices = 70 units
    res = SystemProbe(tmp_path, cgroup_root=None).resources()
    assert [g.index for g in res.gpus] == list(range(10, 64)) and all("MIG" in g.name for g in res.gpus)


def test_a_failing_gpu_is_logged_once_and_its_error_cleared_when_it_recovers(tmp_path, fake_nvml, caplog):
    nvml = fake_nvml([])
    nvml.devices += [{}, {"memory": nvml.err(nvml.NVML_ERROR_NO_PERMISSION)}, {}]
    probe = SystemProbe(tmp_path, cgroup_root=None)
    with caplog.at_level(logging.INFO, logger="chimera.fabric.probes"):
        for _ in range(3):
            assert [g.index for g in probe.resources().gpus] == [0, 2]
        assert "GPU 1" in probe.nvml_error and "Insufficient Permissions" in probe.nvml_error
        assert probe.gpu_errors == 3
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "GPU 1" in warnings[0].getMessage()
        nvml.devices[1] = {}  # it answers again
        assert [g.index for g in probe.resources().gpus] == [0, 1, 2]
    assert probe.nvml_error is None and probe.gpu_errors == 3
    assert any("GPU 1 answers NVML again" in r.getMessage() for r in caplog.records)


def test_any_exception_from_one_gpu_cannot_drop_the_advertisement(tmp_path, fake_nvml):
    nvml = fake_nvml([])
    nvml.devices += [
        {"name": UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")},  # the binding's strict decode
        {"memory": RuntimeError("driver went away")},
        {"mig": {"max": 2, "devices": {0: {"memory": ValueError("odd")}}}},
        {},
    ]
    probe = SystemProbe(tmp_path, cgroup_root=None)
    res = probe.resources()  # does not raise
    assert [(g.index, g.name) for g in res.gpus] == [(0, "NVIDIA GPU"), (3, "NVIDIA H200")]
    assert "GPU 1: RuntimeError" in probe.nvml_error and "GPU 2 MIG 0: ValueError" in probe.nvml_error
    nvml.devices = nvml.err(nvml.NVML_ERROR_GPU_IS_LOST)  # the count itself fails: no GPUs, still an advert
    assert probe.resources().gpus == () and "GPU count" in probe.nvml_error


def test_simulated_gpus_ride_on_a_fresh_probe_of_the_machine(tmp_path, monkeypatch):
    """fabric_probe_gpus = N: N simulated GPUs, and the CPU/memory/load part is probed anew on
    every call (it was taken once at start and advertised unchanged for the node's lifetime)."""
    from dataclasses import replace

    from chimera.fabric.probes import SIM_GPU_NAME, SimulatedGpuProbe, SystemProbe, probe_for

    probe = probe_for(tmp_path, probe_gpus=3, max_wasm_memory_bytes=16 << 20)
    assert isinstance(probe, SimulatedGpuProbe) and isinstance(probe_for(tmp_path, probe_gpus=-1,
                                                                         max_wasm_memory_bytes=1 << 20), SystemProbe)
    first = probe.resources()
    assert [g.name for g in first.gpus] == [SIM_GPU_NAME] * 3 and [g.index for g in first.gpus] == [0, 1, 2]
    assert first.max_wasm_memory_bytes == 16 << 20
    real = probe.system.resources
    monkeypatch.setattr(probe.system, "resources", lambda: replace(real(), memory_available_bytes=12345))
    assert probe.resources().memory_available_bytes == 12345 and len(probe.resources().gpus) == 3
    probe.close()

