"""What a peer can offer: the advertised resource record (pure data, no probing).

:class:`Resources` is what a peer advertises in membership and what the
placement core (:mod:`chimera.fabric.placement`) reads. It is a wire record
(``@record``): plain ints, floats and strings, units in the names, strict
decoding with bounds. Producing one is the job of :mod:`chimera.fabric.probes`.
"""

from __future__ import annotations

from typing import Annotated

from chimera.protocol.messages import MaxItems, MaxLen, Range, record

MAX_GPUS = 64
U63 = 2**63 - 1
MAX_TASK_WALL_TIME_MS = 86_400_000  # a day: the wire's bound on a task's wall time (FabricTaskRun.wall_time_ms)


@record
class GpuInfo:
    """One GPU as NVML reports it.

    Fields:
        index: NVML device index (0-based).
        name: product name, e.g. ``"NVIDIA H100 80GB HBM3"`` (<= 96 characters).
        memory_total_bytes, memory_used_bytes: device memory, bytes.
        utilization_percent: GPU busy fraction over NVML's last sample period, 0..100.
    """

    index: Annotated[int, Range(0, MAX_GPUS - 1)]
    name: Annotated[str, MaxLen(96)]
    memory_total_bytes: Annotated[int, Range(0, U63)]
    memory_used_bytes: Annotated[int, Range(0, U63)]
    utilization_percent: Annotated[int, Range(0, 100)] = 0

    @property
    def memory_free_bytes(self) -> int:
        return max(0, self.memory_total_bytes - self.memory_used_bytes)

    def describe(self) -> str:
        return (f"gpu{self.index} {self.name} {self.memory_used_bytes >> 20}/{self.memory_total_bytes >> 20} MiB "
                f"{self.utilization_percent}%")


@record
class Resources:
    """A peer's capacity at one moment.

    Fields:
        cpu_count: logical CPUs (>= 1).
        load_1m: 1-minute load average (runnable tasks; finite, >= 0).
        memory_total_bytes, memory_available_bytes: RAM, bytes.
        disk_total_bytes, disk_free_bytes: the data directory's file system, bytes.
        gpus: the NVIDIA GPUs (empty without a driver).
        max_wasm_memory_bytes: the most linear memory this peer gives one agent.
        max_task_wall_time_ms: the longest run (epoch deadline) this peer accepts for a
            task from anyone, milliseconds, 1 .. 86 400 000 (a day, the wire's limit and the
            default for peers that do not send it).
    """

    cpu_count: Annotated[int, Range(1, 1 << 16)]
    load_1m: float = 0.0
    memory_total_bytes: Annotated[int, Range(0, U63)]
    memory_available_bytes: Annotated[int, Range(0, U63)]
    disk_total_bytes: Annotated[int, Range(0, U63)] = 0
    disk_free_bytes: Annotated[int, Range(0, U63)] = 0
    gpus: Annotated[tuple[GpuInfo, ...], MaxItems(MAX_GPUS)] = ()
    max_wasm_memory_bytes: Annotated[int, Range(0, U63)] = 64 << 20
    max_task_wall_time_ms: Annotated[int, Range(1, MAX_TASK_WALL_TIME_MS)] = MAX_TASK_WALL_TIME_MS

    def __post_init__(self) -> None:
        if self.load_1m < 0:
            raise ValueError("load_1m must be >= 0")
        if len({g.index for g in self.gpus}) != len(self.gpus):
            raise ValueError("GPU indices must be distinct")

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    def describe(self) -> str:
        gpus = f", {self.gpu_count} GPU" if self.gpus else ""
        return (f"{self.cpu_count} cpu load {self.load_1m:.2f}, "
                f"{self.memory_available_bytes >> 20}/{self.memory_total_bytes >> 20} MiB free{gpus}")
