"""Resource probes: what this machine has, as a :class:`~chimera.fabric.resources.Resources`.

* :class:`SystemProbe` reads the host with psutil (logical CPU count,
  1-minute load average, virtual memory total/available, the data
  directory's disk usage) and the NVIDIA GPUs with NVML through ``pynvml``
  (the ``nvidia-ml-py`` package): device count, names, memory total/used and
  utilization. A machine without an NVIDIA driver (``libnvidia-ml.so`` not
  found, ``nvmlInit`` failing, any ``pynvml.NVMLError``) reports zero GPUs and
  carries on; a GPU that fails to answer is left out and counted in
  ``SystemProbe.gpu_errors``.
* :class:`StaticProbe` returns a fixed inventory (tests, simulations, a
  node told by configuration what it may offer).

Both satisfy the :class:`Probe` protocol, which is all the node needs.

Sources: psutil docs (``cpu_count``, ``getloadavg``, ``virtual_memory``,
``disk_usage``); NVML API reference (``nvmlDeviceGetCount``,
``nvmlDeviceGetMemoryInfo``, ``nvmlDeviceGetUtilizationRates``).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import psutil

from .resources import MAX_GPUS, GpuInfo, Resources

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


class SystemProbe:
    """psutil + NVML probe of this machine.

    Args:
        data_dir: directory whose file system is reported as disk (default: cwd).
        max_wasm_memory_bytes: advertised per-agent linear memory cap.
        nvml: False skips NVML entirely (reports no GPUs).
    NVML is initialised once, lazily; :meth:`close` shuts it down.
    """

    def __init__(self, data_dir: Path | str | None = None, *, max_wasm_memory_bytes: int = 64 << 20,
                 nvml: bool = True) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else Path.cwd()
        self.max_wasm_memory_bytes = max_wasm_memory_bytes
        self._nvml_wanted = nvml
        self._nvml_ready: bool | None = None  # None: not tried yet
        self.nvml_error: str | None = None
        self.gpu_errors = 0
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

    def gpus(self) -> tuple[GpuInfo, ...]:
        """The GPUs NVML sees (empty without a driver)."""
        with self._lock:
            if not self._init_nvml():
                return ()
            import pynvml

            try:
                count = min(int(pynvml.nvmlDeviceGetCount()), MAX_GPUS)
            except pynvml.NVMLError as exc:
                self.gpu_errors += 1
                self.nvml_error = str(exc)
                return ()
            found = []
            for index in range(count):
                try:
                    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                    name = pynvml.nvmlDeviceGetName(handle)
                    if isinstance(name, bytes):
                        name = name.decode("utf-8", errors="replace")
                    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                    try:
                        util = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                    except pynvml.NVMLError:
                        util = 0  # not supported on some devices / MIG instances
                    found.append(GpuInfo(index=index, name=str(name)[:96], memory_total_bytes=int(mem.total),
                                         memory_used_bytes=min(int(mem.used), int(mem.total)),
                                         utilization_percent=max(0, min(100, util))))
                except pynvml.NVMLError as exc:
                    self.gpu_errors += 1
                    log.warning("GPU %d did not answer NVML: %s", index, exc)
            return tuple(found)

    def resources(self) -> Resources:
        """Probe now: CPU, load, memory, disk (psutil) and GPUs (NVML)."""
        try:
            load_1m = float(os.getloadavg()[0])
        except (OSError, AttributeError):
            load_1m = float(psutil.getloadavg()[0])
        vm = psutil.virtual_memory()
        try:
            disk = psutil.disk_usage(str(self.data_dir))
            disk_total, disk_free = int(disk.total), int(disk.free)
        except OSError:
            disk_total = disk_free = 0
        return Resources(cpu_count=max(1, psutil.cpu_count(logical=True) or 1), load_1m=max(0.0, load_1m),
                         memory_total_bytes=int(vm.total), memory_available_bytes=int(vm.available),
                         disk_total_bytes=disk_total, disk_free_bytes=disk_free, gpus=self.gpus(),
                         max_wasm_memory_bytes=self.max_wasm_memory_bytes)

    def close(self) -> None:
        with self._lock:
            if self._nvml_ready:
                try:
                    import pynvml

                    pynvml.nvmlShutdown()
                except Exception:  # noqa: BLE001
                    pass
            self._nvml_ready = None
