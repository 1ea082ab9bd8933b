"""Resource probes: what this machine has, as a :class:`~chimera.fabric.resources.Resources`.

* :class:`SystemProbe` reads the host with psutil (1-minute load average,
  virtual memory total/available, the data directory's disk usage), honours
  the container limits of this process (CPU affinity, the cgroup's CPU quota
  and memory limit: :func:`read_cgroup_limits`) and reads the NVIDIA GPUs with
  NVML through ``pynvml`` (the ``nvidia-ml-py`` package): device count, names,
  memory total/used and utilization. A machine without an NVIDIA driver
  (``libnvidia-ml.so`` not found, ``nvmlInit`` failing, any
  ``pynvml.NVMLError``) reports zero GPUs and carries on.
* :class:`StaticProbe` returns a fixed inventory (tests, simulations, a
  node told by configuration what it may offer).
* :class:`SimulatedGpuProbe` is :class:`SystemProbe` without NVML that
  advertises N simulated GPUs (the node's ``fabric_probe_gpus = N``);
  :func:`probe_for` picks between the two from the node's settings.

Both satisfy the :class:`Probe` protocol, which is all the node needs.

**CPUs** = the CPUs this process may run on (``os.sched_getaffinity``; the
logical CPU count where that does not exist), capped by the cgroup's CPU
quota rounded up (``ceil(quota / period)`` from cgroup v2 ``cpu.max`` or v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, the smallest over the process's
cgroup and its ancestors). **Memory**: total = min(host total, the cgroup's
limit: v2 ``memory.max``, v1 ``memory.limit_in_bytes``, "unlimited" ignored);
available = min(host available, limit - working set), the working set being
the cgroup's usage (v2 ``memory.current``, v1 ``memory.usage_in_bytes``) less
its inactive page cache (``inactive_file`` in ``memory.stat``, as the kubelet
counts it), again the smallest over the cgroup and its ancestors. The
process's cgroup comes from ``/proc/self/cgroup``; the cgroup file system root
(default ``/sys/fs/cgroup``) is a parameter.

**GPUs.** Each GPU is one leasable unit, advertised under its NVML index. A
GPU in MIG mode (``nvmlDeviceGetMigMode`` current mode
``NVML_DEVICE_MIG_ENABLE``) is not advertised itself (CUDA work runs in its
MIG devices, and an unprivileged caller may not read the parent's memory);
each of its MIG devices (``nvmlDeviceGetMigDeviceHandleByIndex`` for slot
0 .. ``nvmlDeviceGetMaxMigDeviceCount`` - 1; ``NVML_ERROR_NOT_FOUND`` for an
empty slot) is a unit of its own, with its own memory, a name saying ``MIG``
and ``(GPU i MIG j)``, and an index above the NVML device indices: the units
of the first MIG GPU take ``count .. count + max_slots - 1`` (``count`` the
NVML device count, one index per slot, filled or not, so the indices stay put
while MIG devices come and go), the next MIG GPU the indices after those;
units that would get an index above 63 are left out (logged once). A GPU
(or MIG device) that fails to answer, with any exception, is left out of
this probe, logged once at WARNING (not on every probe), counted in
``SystemProbe.gpu_errors`` per probe, and named in ``SystemProbe.nvml_error``
until it answers again (then the error is cleared and its recovery logged).
An unreadable name does not drop a GPU (it is advertised as ``NVIDIA GPU``).

Sources: psutil docs (``getloadavg``, ``virtual_memory``, ``disk_usage``);
Linux ``sched_getaffinity(2)``, ``cgroups(7)`` and the kernel's cgroup v1
and v2 documents (``cpu.max``, ``memory.max``, ``memory.current``,
``memory.stat``, ``cpu.cfs_quota_us``, ``memory.limit_in_bytes``); NVML API
reference (``nvmlDeviceGetCount``, ``nvmlDeviceGetMemoryInfo``,
``nvmlDeviceGetUtilizationRates``, ``nvmlDeviceGetMigMode``,
``nvmlDeviceGetMaxMigDeviceCount``, ``nvmlDeviceGetMigDeviceHandleByIndex``)
and nvidia-ml-py 13.615.71's ``pynvml.py`` for the Python shapes
(``nvmlDeviceGetMigMode`` returns ``[current, pending]``).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import psutil

from .resources import MAX_GPUS, MAX_TASK_WALL_TIME_MS, GpuInfo, Resources

log = logging.getLogger("chimera.fabric.probes")


class Probe(Protocol):
    """Port: produce the current :class:`Resources` (may block briefly; call off the event loop)."""

    def resources(self) -> Resources: ...


class StaticProbe:
    """A probe that always reports ``inventory``."""

    def __init__(self, inventory: Resources) -> None:
        self.inventory = inventory

    def resources(self) -> Resources:
        return self.inventory


SIM_GPU_NAME = "Simulated GPU (fabric_probe_gpus)"
SIM_GPU_MEMORY_BYTES = 16 << 30


class SimulatedGpuProbe:
    """This machine as :class:`SystemProbe` sees it (CPU, load, memory, disk probed anew on
    every call; NVML not used), advertising ``gpu_count`` simulated GPUs (each
    :data:`SIM_GPU_NAME`, :data:`SIM_GPU_MEMORY_BYTES`, idle) instead of real ones: the
    node's test/simulation option ``fabric_probe_gpus = N`` (N in 0 … 64)."""

    def __init__(self, data_dir: Path | str | None, gpu_count: int, *, max_wasm_memory_bytes: int = 64 << 20,
                 max_task_wall_time_ms: int = MAX_TASK_WALL_TIME_MS) -> None:
        self.system = SystemProbe(data_dir, nvml=False, max_wasm_memory_bytes=max_wasm_memory_bytes,
                                  max_task_wall_time_ms=max_task_wall_time_ms)
        self.gpus = tuple(GpuInfo(index=i, name=SIM_GPU_NAME, memory_total_bytes=SIM_GPU_MEMORY_BYTES,
                                  memory_used_bytes=0) for i in range(min(max(gpu_count, 0), 64)))
        self.nvml_error: str | None = None

    def resources(self) -> Resources:
        return replace(self.system.resources(), gpus=self.gpus)

    def close(self) -> None:
        self.system.close()


def probe_for(data_dir: Path | str | None, *, probe_gpus: int, max_wasm_memory_bytes: int,
              max_task_wall_time_ms: int = MAX_TASK_WALL_TIME_MS) -> SystemProbe | SimulatedGpuProbe:
    """The probe a node with these settings advertises from (the node and ``chimera resources``
    both use it): ``probe_gpus < 0`` the real machine (NVML), else :class:`SimulatedGpuProbe`
    with ``probe_gpus`` simulated GPUs."""
    caps = dict(max_wasm_memory_bytes=max_wasm_memory_bytes, max_task_wall_time_ms=max_task_wall_time_ms)
    if probe_gpus < 0:
        return SystemProbe(data_dir, **caps)
    return SimulatedGpuProbe(data_dir, probe_gpus, **caps)


DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PROC_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 says "no limit" with a huge page-rounded number (0x7FFFFFFFFFFFF000 on x86-64)
UNLIMITED_BYTES = 1 << 62
NVIDIA_GPU_NAME = "NVIDIA GPU"  # advertised when NVML cannot give a GPU's name


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    """The limits the cgroups of this process set (None: no limit found).

    Attributes:
        cpu_quota_cpus: CPU time per period as CPUs (quota / period), the smallest found.
        memory_limit_bytes: the smallest memory limit, bytes.
        memory_available_bytes: the smallest ``limit - working set`` over the
            limited cgroups, bytes (>= 0).
    """

    cpu_quota_cpus: float | None = None
    memory_limit_bytes: int | None = None
    memory_available_bytes: int | None = None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _stat_value(path: Path, keys: tuple[str, ...]) -> int:
    """The first of ``keys`` in a ``memory.stat`` file (0 if absent)."""
    text = _read(path) or ""
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    for key in keys:
        if key in values:
            return values[key]
    return 0


def _levels(base: Path, cgroup_path: str) -> list[Path]:
    """``base/<cgroup_path>`` and each ancestor up to ``base``, those that exist (leaf first).

    A path that does not exist under ``base`` (a container whose cgroup
    namespace shows the host's path) falls back to the ancestors that do, down
    to ``base`` itself: the container's own cgroup mounted there.
    """
    parts = [p for p in cgroup_path.strip().split("/") if p and p not in (".", "..")]
    out = []
    for n in range(len(parts), -1, -1):
        level = base.joinpath(*parts[:n])
        if level.is_dir():
            out.append(level)
    return out


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return None


def read_cgroup_limits(cgroup_root: Path | str = DEFAULT_CGROUP_ROOT,
                       proc_cgroup: Path | str = DEFAULT_PROC_CGROUP) -> CgroupLimits:
    """Read the CPU quota and memory limit of this process's cgroups (v2, v1 or both); never raises.

    Args:
        cgroup_root: where the cgroup file systems are mounted: cgroup v2 at
            the root itself (it holds ``cgroup.controllers``) or at
            ``unified/`` (hybrid); v1 controllers at ``cpu/``, ``cpu,cpuacct/``,
            ``memory/``.
        proc_cgroup: the ``/proc/<pid>/cgroup`` file naming this process's cgroups.
    """
    root = Path(cgroup_root)
    text = _read(Path(proc_cgroup)) or ""
    cpu: list[float] = []
    mem_limit: list[int] = []
    mem_avail: list[int] = []

    def memory_level(limit: int | None, usage: int | None, inactive_file: int) -> None:
        if limit is None or limit >= UNLIMITED_BYTES or limit < 0:
            return
        mem_limit.append(limit)
        if usage is not None:
            mem_avail.append(max(0, limit - max(0, usage - inactive_file)))

    for line in text.splitlines():
        hierarchy, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not sep or not sep2:
            continue
        if hierarchy == "0" and controllers == "":  # cgroup v2 (unified)
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            for level in _levels(base, path):
                cpu_max = (_read(level / "cpu.max") or "").split()
                if len(cpu_max) == 2 and cpu_max[0] != "max":
                    quota, period = _int_or_none(cpu_max[0]), _int_or_none(cpu_max[1])
                    if quota and period and quota > 0 and period > 0:
                        cpu.append(quota / period)
                raw = (_read(level / "memory.max") or "").strip()
                if raw and raw != "max":
                    memory_level(_int_or_none(raw), _int_or_none(_read(level / "memory.current")),
                                 _stat_value(level / "memory.stat", ("inactive_file",)))
            continue
        names = controllers.split(",")
        if "cpu" in names:
            for mount in dict.fromkeys((controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu")):
                if (root / mount).is_dir():
                    for level in _levels(root / mount, path):
                        quota = _int_or_none(_read(level / "cpu.cfs_quota_us"))
                        period = _int_or_none(_read(level / "cpu.cfs_period_us"))
                        if quota and period and quota > 0 and period > 0:
                            cpu.append(quota / period)
                    break
        if "memory" in names:
            for mount in dict.fromkeys((controllers, "memory")):
                if (root / mount).is_dir():
                    for level in _levels(root / mount, path):
                        memory_level(_int_or_none(_read(level / "memory.limit_in_bytes")),
                                     _int_or_none(_read(level / "memory.usage_in_bytes")),
                                     _stat_value(level / "memory.stat", ("total_inactive_file", "inactive_file")))
                    break
    return CgroupLimits(cpu_quota_cpus=min(cpu) if cpu else None,
                        memory_limit_bytes=min(mem_limit) if mem_limit else None,
                        memory_available_bytes=min(mem_avail) if mem_avail else None)


def usable_cpu_count(limits: CgroupLimits) -> int:
    """CPUs this process may use: its affinity set, capped by the cgroup quota rounded up (>= 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = psutil.cpu_count(logical=True) or 1
    if limits.cpu_quota_cpus is not None:
        cpus = min(cpus, math.ceil(limits.cpu_quota_cpus))
    return max(1, cpus)


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


class SystemProbe:
    """psutil + cgroup + NVML probe of this machine.

    Args:
        data_dir: directory whose file system is reported as disk (default: cwd).
        max_wasm_memory_bytes: advertised per-agent linear memory cap.
        max_task_wall_time_ms: advertised longest task run accepted, milliseconds (1 .. a day).
        nvml: False skips NVML entirely (reports no GPUs).
        cgroup_root: where the cgroup file systems are mounted (None: ignore cgroups).
        proc_cgroup: the file naming this process's cgroups.
    NVML is initialised once, lazily; :meth:`close` shuts it down.

    Attributes:
        nvml_error: why NVML gives no GPUs (it could not start), or which
            GPUs failed to answer on the last probe; None when all answered.
        gpu_errors: failed GPU answers, counted on every probe.
    """

    def __init__(self, data_dir: Path | str | None = None, *, max_wasm_memory_bytes: int = 64 << 20,
                 max_task_wall_time_ms: int = MAX_TASK_WALL_TIME_MS,
                 nvml: bool = True, cgroup_root: Path | str | None = DEFAULT_CGROUP_ROOT,
                 proc_cgroup: Path | str = DEFAULT_PROC_CGROUP) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else Path.cwd()
        self.max_wasm_memory_bytes = max_wasm_memory_bytes
        self.max_task_wall_time_ms = max_task_wall_time_ms
        self.cgroup_root = Path(cgroup_root) if cgroup_root is not None else None
        self.proc_cgroup = Path(proc_cgroup)
        self._nvml_wanted = nvml
        self._nvml_ready: bool | None = None  # None: not tried yet
        self.nvml_error: str | None = None
        self.gpu_errors = 0
        self._failing: dict[str, str] = {}  # GPU unit -> why it did not answer (logged when it started failing)
        self._noted: set[str] = set()  # informational conditions logged once
        self._lock = threading.Lock()

    def _init_nvml(self) -> bool:
        if self._nvml_ready is not None:
            return self._nvml_ready
        self._nvml_ready = False
        if not self._nvml_wanted:
            return False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml_ready = True
        except ImportError as exc:
            self.nvml_error = f"pynvml not installed: {exc}"
        except Exception as exc:  # noqa: BLE001 - NVMLError (LibraryNotFound, DriverNotLoaded...) or OSError
            self.nvml_error = f"{type(exc).__name__}: {exc}"
            log.info("no NVIDIA GPUs: %s", self.nvml_error)
        return self._nvml_ready

    def _note_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._noted:
            self._noted.add(key)
            log.info(message, *args)

    def gpus(self) -> tuple[GpuInfo, ...]:
        """The GPUs NVML sees, MIG devices as units of their own (empty without a driver); never raises."""
        with self._lock:
            if not self._init_nvml():
                return ()
            failures: dict[str, str] = {}
            try:
                import pynvml

                found = self._probe_gpus(pynvml, failures)
            except Exception as exc:  # noqa: BLE001 - a probe must never drop the whole advertisement
                failures["NVML"] = _describe_error(exc)
                found = []
            self._settle(failures)
            return tuple(found)

    def _settle(self, failures: dict[str, str]) -> None:
        """Log new failures and recoveries once; set ``nvml_error``; count."""
        self.gpu_errors += len(failures)
        if "GPU count" in failures or "NVML" in failures:
            failures = {**self._failing, **failures}  # no per-GPU answers this time: keep their state
        for key, why in sorted(failures.items()):
            if key not in self._failing:
                log.warning("%s did not answer NVML: %s (left out of the advertisement until it answers)",
                            key, why)
        for key in sorted(self._failing.keys() - failures.keys()):
            log.info("%s answers NVML again", key)
        self._failing = failures
        self.nvml_error = "; ".join(f"{k}: {v}" for k, v in sorted(failures.items()))[:512] or None

    def _probe_gpus(self, pynvml, failures: dict[str, str]) -> list[GpuInfo]:
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        except Exception as exc:  # noqa: BLE001
            failures["GPU count"] = _describe_error(exc)
            return []
        if count > MAX_GPUS:
            self._note_once("count", "NVML reports %d GPUs; the first %d are advertised", count, MAX_GPUS)
        count = max(0, min(count, MAX_GPUS))
        found: list[GpuInfo] = []
        next_mig_index = count  # MIG units take the indices after the NVML device indices
        for index in range(count):
            key = f"GPU {index}"
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = self._name(pynvml, handle, key)
                slots = _mig_slots(pynvml, handle)
                if slots is None:
                    found.append(_unit(pynvml, handle, index, name))
                    continue
            except Exception as exc:  # noqa: BLE001 - NVMLError or anything else: this GPU only
                failures[key] = _describe_error(exc)
                continue
            first_index, next_mig_index = next_mig_index, next_mig_index + slots
            units = 0
            for slot in range(slots):
                unit_index = first_index + slot
                mig_key = f"GPU {index} MIG {slot}"
                try:
                    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                except pynvml.NVMLError as exc:
                    if getattr(exc, "value", None) != getattr(pynvml, "NVML_ERROR_NOT_FOUND", 6):
                        failures[mig_key] = _describe_error(exc)
                    continue  # NOT_FOUND: no MIG device in this slot
                except Exception as exc:  # noqa: BLE001
                    failures[mig_key] = _describe_error(exc)
                    continue
                if unit_index >= MAX_GPUS:
                    self._note_once(f"over {mig_key}", "%s is left out: GPU units are numbered 0..%d",
                                    mig_key, MAX_GPUS - 1)
                    continue
                try:
                    mig_name = self._name(pynvml, mig, mig_key)
                    if "MIG" not in mig_name:
                        mig_name = f"{mig_name} MIG"
                    suffix = f" (GPU {index} MIG {slot})"
                    found.append(_unit(pynvml, mig, unit_index, mig_name[:96 - len(suffix)] + suffix))
                    units += 1
                except Exception as exc:  # noqa: BLE001
                    failures[mig_key] = _describe_error(exc)
            if units == 0 and not any(k.startswith(f"{key} MIG ") for k in failures):
                self._note_once(f"nomig {key}", "%s (%s) is in MIG mode with no MIG device: nothing to advertise",
                                key, name)
        return found

    def _name(self, pynvml, handle, key: str) -> str:
        try:
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode("utf-8", errors="replace")
            name = str(name).strip()
            if name:
                return name
        except Exception as exc:  # noqa: BLE001 - e.g. the binding's strict UTF-8 decode of the name
            self._note_once(f"name {key}", "%s: NVML gives no readable name (%s); advertised as %r", key,
                            _describe_error(exc), NVIDIA_GPU_NAME)
        return NVIDIA_GPU_NAME

    def resources(self) -> Resources:
        """Probe now: CPU, load, memory, disk (psutil, within this process's cgroup limits) and GPUs (NVML)."""
        try:
            load_1m = float(os.getloadavg()[0])
        except (OSError, AttributeError):
            load_1m = float(psutil.getloadavg()[0])
        limits = (read_cgroup_limits(self.cgroup_root, self.proc_cgroup) if self.cgroup_root is not None
                  else CgroupLimits())
        vm = psutil.virtual_memory()
        memory_total_bytes, memory_available_bytes = int(vm.total), int(vm.available)
        if limits.memory_limit_bytes is not None:
            memory_total_bytes = min(memory_total_bytes, limits.memory_limit_bytes)
        if limits.memory_available_bytes is not None:
            memory_available_bytes = min(memory_available_bytes, limits.memory_available_bytes)
        memory_available_bytes = max(0, min(memory_available_bytes, memory_total_bytes))
        try:
            disk = psutil.disk_usage(str(self.data_dir))
            disk_total, disk_free = int(disk.total), int(disk.free)
        except OSError:
            disk_total = disk_free = 0
        return Resources(cpu_count=min(usable_cpu_count(limits), 1 << 16), load_1m=max(0.0, load_1m),
                         memory_total_bytes=memory_total_bytes, memory_available_bytes=memory_available_bytes,
                         disk_total_bytes=disk_total, disk_free_bytes=disk_free, gpus=self.gpus(),
                         max_wasm_memory_bytes=self.max_wasm_memory_bytes,
                         max_task_wall_time_ms=self.max_task_wall_time_ms)

    def close(self) -> None:
        with self._lock:
            if self._nvml_ready:
                try:
                    import pynvml

                    pynvml.nvmlShutdown()
                except Exception:  # noqa: BLE001
                    pass
            self._nvml_ready = None


def _mig_slots(pynvml, handle) -> int | None:
    """None: the GPU is not in MIG mode (or cannot be); else its number of MIG device slots."""
    get_mode = getattr(pynvml, "nvmlDeviceGetMigMode", None)
    if get_mode is None:
        return None
    try:
        current, _pending = get_mode(handle)
    except Exception:  # noqa: BLE001 - NVML_ERROR_NOT_SUPPORTED: a GPU without MIG
        return None
    if current != getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1):
        return None
    return max(0, int(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)))


def _unit(pynvml, handle, index: int, name: str) -> GpuInfo:
    """One advertised GPU unit (a whole GPU or a MIG device); raises what NVML raises for its memory."""
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    total, used = int(mem.total), int(mem.used)
    try:
        util = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # noqa: BLE001 - NOT_SUPPORTED on MIG devices and some boards
        util = 0
    return GpuInfo(index=index, name=name[:96], memory_total_bytes=max(0, total),
                   memory_used_bytes=max(0, min(used, total)), utilization_percent=max(0, min(100, util)))
