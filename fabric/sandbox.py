"""The WebAssembly host: strict wasmtime sandboxes for task and actor agents.

Everything an agent runs goes through one :class:`SandboxEngine` (one
``wasmtime.Engine`` per node). It is strict by default:

* **Fuel.** ``Config.consume_fuel``: every call starts with exactly
  ``Limits.fuel`` units (wasmtime charges about one unit per executed
  instruction); running out traps with :class:`FuelExhausted`. The store is
  refuelled before *every* call, so the budget never carries over.
* **Epoch deadline.** ``Config.epoch_interruption``: a ticker thread owned by
  the engine calls ``Engine.increment_epoch()`` every ``epoch_tick_s``; before
  every call the store's deadline is set to ``ceil(wall_time_s / tick) + 1``
  ticks ahead, so an agent that computes past ``Limits.wall_time_s`` traps with
  :class:`DeadlineExceeded`. The deadline must be set again before each call:
  an expired deadline would trap every later call at once. Precision is one
  tick (default 5 ms). The store does not trap at once: its deadline is a
  slice of at most ``CHECK_INTERVAL_S`` (0.1 s), and at each slice's end an
  epoch-deadline callback (``Store::epoch_deadline_callback``) ends the call
  when its wall time is up, the engine is closing, or its caller's ``cancel``
  event is set (:class:`TaskCancelled`: a cancelled task stops within about
  0.1 s instead of running to its end), else extends it by another slice.
  :meth:`SandboxEngine.close` keeps this working for the calls still running:
  it advances the epoch past their deadlines, so each ends with
  :class:`DeadlineExceeded` instead of running on without a ticker.
  Time spent inside a host function (a WASI read, our
  ``chimera.send``) is not interrupted, which is why every host function here
  is bounded and the clock-based WASI calls (``poll_oneoff`` can sleep) are
  denied unless granted.
* **Memory.** ``Store.set_limits(memory_size=Limits.memory_bytes)``. Note the
  wasmtime semantics: past the limit ``memory.grow`` *returns -1* (C's
  ``malloc`` returns NULL) instead of trapping, and instantiating a module whose
  declared minimum exceeds the limit fails. A trap or a non-zero exit while the
  linear memory is within one 64 KiB page of the limit is reported as
  :class:`MemoryLimitExceeded`; so is a module that cannot be instantiated
  within the limit.
* **Bounded reservation.** By default wasmtime reserves 4 GiB of virtual
  address space plus guard pages per linear memory; small machines (and
  ``ulimit -v``) run out after a few instances. The engine reserves
  ``memory_reservation_bytes`` (default 64 MiB) with a 64 KiB guard and lets
  memories move when they grow past it (``Config.memory_reservation``,
  ``memory_guard_size``, ``memory_reservation_for_growth``); the compiler then
  emits explicit bounds checks, a small cost for a bounded footprint.
* **No ambient authority.** WASI gets no preopened directories, no
  environment, no arguments, and (unless :attr:`Grants.clock`) the clock
  functions ``clock_time_get``, ``clock_res_get`` and ``poll_oneoff`` answer
  ``ENOTCAPABLE`` (errno 76). WASI preview 1 has no way to open sockets; there
  is no network. A module may import only ``wasi_snapshot_preview1`` functions
  and, for actors, the ``chimera`` host functions, each of exactly its type;
  anything else (an unlinked import) is refused by
  :meth:`SandboxEngine.compile` with :class:`ModuleRejected`.
* **Exact export types.** The exports the host calls (``_start``,
  ``_initialize``, ``alloc``, ``handle``: :data:`ABI_EXPORTS`) must have
  exactly their documented types, checked at compile time from the module
  bytes; wasmtime-py aborts the whole process when it meets a ``v128`` in a
  function type, so the host never calls a function with one.
* **Only what agents need, deterministically.** :data:`ENGINE_SETTINGS`: the
  proposals the agent ABI does not need (GC, exceptions, function references,
  tail calls, 64-bit or multiple memories...) are off, NaNs are canonical and
  relaxed SIMD is deterministic, so replicas on different CPUs agree.
* **Discard after a trap.** Any trap marks the instance dead
  (:class:`AgentDiscarded` on later calls); its state is never reused.

Compiled modules are cached by the SHA-256 of the ``.wasm`` bytes, in memory
and on the node's own disk (``Module.serialize`` / ``Module.deserialize``,
written atomically with mode 0600 in a 0700 directory). Deserializing runs
native code without validation, so the cache only ever holds artefacts this
engine compiled from bytes it was given; no API takes precompiled bytes. The
file name carries a fingerprint of the wasmtime version, engine settings and
CPU architecture, and an artefact that fails to deserialize is recompiled.

Task agents are WASI commands: input on stdin, result on stdout, the exit
status (see :meth:`SandboxEngine.run_task`). Actor agents are WASI reactors
driven message by message (:class:`ActorInstance`). The exact ABI is in
docs/AGENTS.md.

Errors: every failure an agent or its module can cause is a
:class:`FabricError` with a stable ``reason`` token (for drop counters and
reputation); misuse of this API raises ``ValueError``/``TypeError``.

Sources: wasmtime ``Config``/``Store`` documentation
(https://docs.wasmtime.dev/api/wasmtime/struct.Config.html, ``Store::set_fuel``,
``Store::set_epoch_deadline``, ``StoreLimits``), the WASI preview 1 spec
(https://github.com/WebAssembly/WASI/blob/main/legacy/preview1/docs.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import selectors
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import wasmtime
from wasmtime import _bindings as _ffi  # the C API bindings: the epoch-deadline callback has no wrapper

from .digests import error_digest, result_digest  # noqa: F401 (re-exported)
from .modules import write_atomic

WASM_MAGIC = b"\0asm"  # every binary WebAssembly module starts with it (text format is not accepted)

WASI_MODULE = "wasi_snapshot_preview1"
HOST_MODULE = "chimera"
PAGE_BYTES = 65536
WASI_ERRNO_NOTCAPABLE = 76
SHA256_HEX_CHARS = 64

#: wasi_snapshot_preview1 functions (the frozen preview 1 ABI) and their types, as
#: ``name params results`` with ``i`` = i32, ``I`` = i64, ``-`` = none (what wasmtime's linker defines).
_WASI_TABLE = """
args_get ii i  args_sizes_get ii i  clock_res_get ii i  clock_time_get iIi i  environ_get ii i
environ_sizes_get ii i  fd_advise iIIi i  fd_allocate iII i  fd_close i i  fd_datasync i i
fd_fdstat_get ii i  fd_fdstat_set_flags ii i  fd_fdstat_set_rights iII i  fd_filestat_get ii i
fd_filestat_set_size iI i  fd_filestat_set_times iIIi i  fd_pread iiiIi i  fd_prestat_dir_name iii i
fd_prestat_get ii i  fd_pwrite iiiIi i  fd_read iiii i  fd_readdir iiiIi i  fd_renumber ii i
fd_seek iIii i  fd_sync i i  fd_tell ii i  fd_write iiii i  path_create_directory iii i
path_filestat_get iiiii i  path_filestat_set_times iiiiIIi i  path_link iiiiiii i
path_open iiiiiIIii i  path_readlink iiiiii i  path_remove_directory iii i  path_rename iiiiii i
path_symlink iiiii i  path_unlink_file iii i  poll_oneoff iiii i  proc_exit i -  proc_raise i i
random_get ii i  sched_yield - i  sock_accept iii i  sock_recv iiiiii i  sock_send iiiii i
sock_shutdown ii i
"""


def _wasi_types(code: str) -> tuple[str, ...]:
    return tuple({"i": "i32", "I": "i64"}[c] for c in code if c != "-")


_WASI_WORDS = _WASI_TABLE.split()
WASI_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    _WASI_WORDS[k]: (_wasi_types(_WASI_WORDS[k + 1]), _wasi_types(_WASI_WORDS[k + 2]))
    for k in range(0, len(_WASI_WORDS), 3)
}
WASI_FUNCTIONS = frozenset(WASI_SIGNATURES)

_I32 = wasmtime.ValType.i32()
_I64 = wasmtime.ValType.i64()
#: A function type as value type names: ``(params, results)``, e.g. ``(("i32",), ("i32",))``.
Signature = tuple[tuple[str, ...], tuple[str, ...]]
#: The ``chimera`` host functions: name -> (param types, result types); see docs/AGENTS.md.
HOST_FUNCTIONS: dict[str, Signature] = {
    "send": (("i32", "i32", "i32", "i32"), ("i32",)),
    "log": (("i32", "i32"), ()),
    "now_ms": ((), ("i64",)),
}
#: The exports the host calls, with the only type each may have (docs/AGENTS.md). A module that
#: exports one of these names with another type (or not as a function) is refused at compile time.
ABI_EXPORTS: dict[str, Signature] = {
    "_start": ((), ()),
    "_initialize": ((), ()),
    "alloc": (("i32",), ("i32",)),
    "handle": (("i32", "i32", "i32", "i32"), ("i32",)),
}
#: Value types the host can pass to or take from a guest function (wasmtime-py aborts the process
#: on v128 and cannot convert references here), so :meth:`ActorInstance.call` only calls these.
HOST_CALLABLE_TYPES = frozenset({"i32", "i64", "f32", "f64"})
_CLOCK_DENIED = {
    "clock_time_get": ((_I32, _I64, _I32), (_I32,)),
    "clock_res_get": ((_I32, _I32), (_I32,)),
    "poll_oneoff": ((_I32, _I32, _I32, _I32), (_I32,)),
}

# chimera.send return codes (negative: not sent)
SEND_OK = 0
SEND_BAD_ADDRESS = -1   # target not valid UTF-8 / not an address, or pointers out of bounds
SEND_REFUSED = -2       # unknown target, its mailbox is full, or no route to its peer
SEND_TOO_LARGE = -3     # message or address over the limits
SEND_QUOTA = -4         # more than Limits.max_sends_per_call sends in this call
SEND_FAILED = -5        # the router failed (counted, logged by the host)

_EPOCH_BURST = 4096  # epoch increments per burst while closing (the lock is let go between bursts)
#: Longest a call runs between two checks of its wall time, the engine's closing and its cancel
#: event (the epoch-deadline callback's slice, seconds): a cancel takes effect within about this.
CHECK_INTERVAL_S = 0.1
# wasmtime_store_epoch_deadline_callback(store, callback, data, finalizer); the callback is
# (context, data, *delta ticks, *update kind) -> wasmtime_error_t* (NULL: continue, delta more ticks)
try:
    _DEADLINE_CALLBACK = _ffi._wasmtime_store_epoch_deadline_callback.argtypes[1]
    _NO_FINALIZER = ctypes.cast(0, _ffi._wasmtime_store_epoch_deadline_callback.argtypes[3])
except AttributeError as _exc:  # (every wasmtime-py this project supports has it)
    raise ImportError("this wasmtime-py lacks wasmtime_store_epoch_deadline_callback, which the sandbox "
                      "needs (install a current wasmtime)") from _exc
_UPDATE_DEADLINE_CONTINUE = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE

MAX_ADDRESS_BYTES = 160


# ---------------------------------------------------------------------- errors


class FabricError(Exception):
    """Base of every failure an agent, a module or a peer's input can cause.

    Attributes:
        reason: stable snake_case token for counters and logs.
    """

    reason = "fabric_error"


class ModuleRejected(FabricError):
    """The bytes are not an acceptable module: too large, invalid WebAssembly,
    an import the host does not provide, or a missing required export."""

    reason = "module_rejected"


class InputTooLarge(FabricError):
    """Task input or actor message over :class:`Limits`."""

    reason = "input_too_large"


class OutputLimitExceeded(FabricError):
    """A task wrote more than ``Limits.max_output_bytes`` to stdout."""

    reason = "output_limit"


class AgentDiscarded(FabricError):
    """The instance trapped earlier and was discarded; create a new one."""

    reason = "discarded"


class AgentTrap(FabricError):
    """The agent trapped (unreachable, out-of-bounds access, stack overflow...).

    Attributes:
        agent: the agent's name; export: the export that was running;
        trap_code: wasmtime's trap code name or None; fuel_consumed: units used.
    """

    reason = "trap"

    def __init__(self, message: str, *, agent: str = "", export: str = "",
                 trap_code: str | None = None, fuel_consumed: int = 0) -> None:
        super().__init__(message)
        self.agent, self.export, self.trap_code = agent, export, trap_code
        self.fuel_consumed = fuel_consumed


class FuelExhausted(AgentTrap):
    """The call used all of ``Limits.fuel``."""

    reason = "fuel_exhausted"


class DeadlineExceeded(AgentTrap):
    """The call ran past ``Limits.wall_time_s`` (epoch deadline)."""

    reason = "deadline_exceeded"


class TaskCancelled(AgentTrap):
    """The caller's ``cancel`` event was set while the call ran (or before it started): it was
    stopped at its next check (within about :data:`CHECK_INTERVAL_S`). Not a result of the
    agent: nothing it computed is reported."""

    reason = "cancelled"


class MemoryLimitExceeded(AgentTrap):
    """The agent failed at ``Limits.memory_bytes`` (memory.grow returned -1 and it
    trapped or exited non-zero), or its module needs more than the limit."""

    reason = "memory_limit"


class EngineClosed(FabricError):
    """The :class:`SandboxEngine` was closed (the node is shutting down): no agent code starts."""

    reason = "engine_closed"


class GuestFault(AgentTrap):
    """The agent broke the host ABI (e.g. ``alloc`` returned an out-of-bounds pointer)."""

    reason = "guest_fault"


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-call resource limits of one agent (all checked, all bounded).

    Attributes:
        fuel: fuel units per call (about one per instruction), 1..2**63-1.
        wall_time_s: wall-clock seconds per call (epoch deadline), > 0.
        memory_bytes: linear memory cap in bytes (>= one 64 KiB page).
        max_input_bytes: task stdin size cap.
        max_output_bytes: task stdout cap (more is :class:`OutputLimitExceeded`).
        max_stderr_bytes: task stderr kept (the rest is discarded, not an error).
        max_message_bytes: actor message size cap, in and out.
        max_sends_per_call: ``chimera.send`` calls allowed per handled message.
        max_log_bytes: a ``chimera.log`` line is cut to this many bytes.
        max_logs_per_call: further ``chimera.log`` calls in one message are ignored.
        table_elements: cap on table elements (function pointers) per store.
    Raises:
        ValueError: a value outside its range.
    """

    fuel: int = 2_000_000_000
    wall_time_s: float = 10.0
    memory_bytes: int = 64 << 20
    max_input_bytes: int = 4 << 20
    max_output_bytes: int = 4 << 20
    max_stderr_bytes: int = 16 << 10
    max_message_bytes: int = 256 << 10
    max_sends_per_call: int = 64
    max_log_bytes: int = 1024
    max_logs_per_call: int = 64
    table_elements: int = 100_000

    def __post_init__(self) -> None:
        if not (isinstance(self.fuel, int) and 1 <= self.fuel < 2**63):
            raise ValueError("fuel must be an int in 1..2**63-1")
        if not (isinstance(self.wall_time_s, (int, float)) and 0 < self.wall_time_s <= 86_400):
            raise ValueError("wall_time_s must be in (0, 86400]")
        if not (isinstance(self.memory_bytes, int) and PAGE_BYTES <= self.memory_bytes <= 1 << 32):
            raise ValueError("memory_bytes must be between 64 KiB and 4 GiB")
        for name in ("max_input_bytes", "max_output_bytes", "max_stderr_bytes", "max_message_bytes",
                     "max_sends_per_call", "max_log_bytes", "max_logs_per_call", "table_elements"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 0 <= value < 2**31):
                raise ValueError(f"{name} must be an int in 0..2**31-1")


@dataclass(frozen=True, slots=True, kw_only=True)
class Preopen:
    """A host directory granted to an agent as ``guest_path`` (read-only unless ``writable``)."""

    host_path: str
    guest_path: str
    writable: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Grants:
    """Capabilities beyond the strict default (which is: nothing).

    Attributes:
        clock: WASI clocks and ``poll_oneoff`` work, and ``chimera.now_ms``
            returns the time (else -1).
        env: environment variables ``(name, value)`` the agent sees.
        args: ``argv`` (``argv[0]`` included) the agent sees.
        preopens: directories the agent may open files under.
    There is no network grant: WASI preview 1 cannot open sockets.
    """

    clock: bool = False
    env: tuple[tuple[str, str], ...] = ()
    args: tuple[str, ...] = ()
    preopens: tuple[Preopen, ...] = ()


NO_GRANTS = Grants()
DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class CompiledModule:
    """A validated, compiled module (owned by one :class:`SandboxEngine`).

    Attributes:
        sha256: hex SHA-256 of the ``.wasm`` bytes (its content address).
        module: the compiled ``wasmtime.Module``.
        size_bytes: size of the ``.wasm`` bytes.
        imports: ``(module, name)`` pairs it imports.
        exports: names it exports.
        functions: ``(name, (params, results))`` of each exported function, value
            types as text (``"i32"``, ``"v128"``...), read from the module bytes.
    """

    sha256: str
    module: wasmtime.Module = field(repr=False)
    size_bytes: int
    imports: tuple[tuple[str, str], ...]
    exports: frozenset[str]
    functions: tuple[tuple[str, Signature], ...] = ()

    @property
    def is_actor(self) -> bool:
        return {"handle", "alloc", "memory"} <= self.exports

    @property
    def is_task(self) -> bool:
        return "_start" in self.exports

    def signature(self, export: str) -> Signature | None:
        """``(params, results)`` of an exported function (value type names), None if there is none."""
        for name, sig in self.functions:
            if name == export:
                return sig
        return None


@dataclass(frozen=True, slots=True)
class TaskResult:
    """What a task agent produced.

    Attributes:
        exit_code: WASI exit status (0 when ``_start`` returned normally).
        stdout: everything written to stdout (<= ``Limits.max_output_bytes``).
        stderr: the first ``Limits.max_stderr_bytes`` written to stderr.
        fuel_consumed: fuel units used.
        memory_bytes: linear memory size at exit, bytes.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes
    fuel_consumed: int
    memory_bytes: int

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def digest(self) -> bytes:
        """32-byte SHA-256 of ``exit_code || stdout`` (what redundant replicas vote on)."""
        return result_digest(self.exit_code, self.stdout)


# ----------------------------------------------------------------------- engine

#: ``wasmtime.Config`` settings of every engine (part of the compiled-module cache fingerprint).
#: Proposals the agent ABI does not need are off, so a module using them is refused at compile
#: time (``ModuleRejected``): the GC proposal (its heap would be a second memory beside the capped
#: linear memory; ``gc_support`` off also drops ``externref``), typed function references,
#: exceptions, stack switching, tail calls, wide arithmetic, 64-bit, multiple, shared or
#: custom-page-size memories, threads. Determinism, so that honest replicas of a task agree on its
#: result digest: every NaN a float operation produces is the canonical NaN
#: (``cranelift_nan_canonicalization``), and relaxed SIMD gives the same answer on every CPU
#: (``wasm_relaxed_simd_deterministic``: e.g. ``relaxed_madd`` is always fused, with or without FMA).
ENGINE_SETTINGS: tuple[tuple[str, bool], ...] = (
    ("wasm_gc", False),
    ("gc_support", False),
    ("wasm_function_references", False),
    ("wasm_exceptions", False),
    ("wasm_stack_switching", False),
    ("wasm_tail_call", False),
    ("wasm_wide_arithmetic", False),
    ("wasm_memory64", False),
    ("wasm_multi_memory", False),
    ("wasm_custom_page_sizes", False),
    ("wasm_threads", False),
    ("shared_memory", False),
    ("wasm_component_model", False),
    ("cranelift_nan_canonicalization", True),
    ("wasm_relaxed_simd_deterministic", True),
)


class SandboxEngine:
    """One wasmtime engine with its epoch ticker and compile cache.

    Args:
        cache_dir: directory for compiled artefacts (created 0700); None keeps
            the cache in memory only.
        epoch_tick_s: seconds between epoch increments (deadline precision), 0.001..1.
        memory_reservation_bytes: virtual address space reserved per linear memory.
        max_module_bytes: largest accepted ``.wasm``.
        max_wasm_stack_bytes: wasm stack cap (stack overflow traps).
        memory_cache_entries: compiled modules kept in memory (LRU).
        cache_max_bytes: size bound of ``cache_dir`` (None: unbounded); beyond it the artefacts
            used least recently (file mtime, refreshed on each load) are removed (``cache_evicted``).
    Use as a context manager or call :meth:`close` (stops the ticker thread).
    """

    def __init__(self, cache_dir: Path | str | None = None, *, epoch_tick_s: float = 0.005,
                 memory_reservation_bytes: int = 64 << 20, max_module_bytes: int = 16 << 20,
                 max_wasm_stack_bytes: int = 512 << 10, memory_cache_entries: int = 64,
                 cache_max_bytes: int | None = None) -> None:
        if not 0.001 <= epoch_tick_s <= 1.0:
            raise ValueError("epoch_tick_s must be in [0.001, 1]")
        self.epoch_tick_s = float(epoch_tick_s)
        self._check_ticks = max(1, round(CHECK_INTERVAL_S / self.epoch_tick_s))
        self.max_module_bytes = int(max_module_bytes)
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        config.memory_reservation = int(memory_reservation_bytes)
        config.memory_guard_size = PAGE_BYTES
        config.memory_reservation_for_growth = 0
        config.max_wasm_stack = int(max_wasm_stack_bytes)
        config.parallel_compilation = False
        for attr, value in ENGINE_SETTINGS:
            if not hasattr(wasmtime.Config, attr):  # setting an unknown attribute would silently do nothing
                raise RuntimeError(f"this wasmtime ({_wasmtime_version()}) has no Config.{attr}; "
                                   "the sandbox needs it")
            setattr(config, attr, value)
        self.engine = wasmtime.Engine(config)
        settings = (wasmtime.__name__, _wasmtime_version(), platform.machine(), os.name,
                    memory_reservation_bytes, max_wasm_stack_bytes, "fuel", "epoch", ENGINE_SETTINGS, "v2")
        self.fingerprint = hashlib.sha256(repr(settings).encode()).hexdigest()[:16]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_max_bytes = cache_max_bytes
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.cache_dir.chmod(0o700)
        self._memory_cache: OrderedDict[str, CompiledModule] = OrderedDict()
        self._memory_cache_entries = memory_cache_entries
        self._cache_lock = threading.Lock()
        self._linkers: dict[bool, wasmtime.Linker] = {}
        self._tmp_root = Path(tempfile.mkdtemp(prefix="chimera-wasm-"))
        self.counters = {"compiled": 0, "cache_hits_memory": 0, "cache_hits_disk": 0,
                         "cache_rejected": 0, "cache_evicted": 0, "tasks_run": 0}
        # Calls running guest code (instantiation included): token -> the epoch its deadline falls
        # on. The epoch is only advanced with _lock held, so _epoch is the engine's epoch there.
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._in_flight: dict[object, int] = {}
        self._epoch = 0
        self._closing = False
        self._wake = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
        self._ticker.start()

    # --------------------------------------------------------------- lifecycle

    def _tick(self) -> None:
        """Advance the epoch every tick. Once closing: jump the epoch past the deadline of every call
        still running (each then traps with DeadlineExceeded at its next epoch check), keep ticking
        until none is left, then remove the temporary files and end."""
        try:
            while True:
                with self._lock:
                    if self._closing:
                        if not self._in_flight:
                            return
                        behind = max(self._in_flight.values()) - self._epoch
                        if behind > 0:
                            step = min(behind, _EPOCH_BURST)  # then let go of the lock a moment
                            for _ in range(step):
                                self.engine.increment_epoch()
                            self._epoch += step
                            continue
                if self._closing:
                    time.sleep(self.epoch_tick_s)
                else:
                    self._wake.wait(self.epoch_tick_s)
                with self._lock:
                    self.engine.increment_epoch()
                    self._epoch += 1
        finally:
            shutil.rmtree(self._tmp_root, ignore_errors=True)

    def close(self, timeout_s: float = 5.0) -> None:
        """Close the engine: no more agent code starts (:class:`EngineClosed`), and every call still
        running ends with :class:`DeadlineExceeded` at its next epoch check (the epoch jumps past its
        deadline; a re-armed call gets a deadline that has passed). Waits up to ``timeout_s`` for
        them to end, then for the ticker, which removes the temporary files. A call that is still
        running then (inside a host function) keeps the ticker going until it ends."""
        with self._lock:
            self._closing = True
        self._wake.set()
        with self._lock:
            drained = self._drained.wait_for(lambda: not self._in_flight, timeout=timeout_s)
        if drained and self._ticker.is_alive() and self._ticker is not threading.current_thread():
            self._ticker.join(timeout=5)

    @property
    def calls_in_flight(self) -> int:
        """Calls running guest code now (instantiations included)."""
        with self._lock:
            return len(self._in_flight)

    @contextmanager
    def _guest_call(self) -> Iterator[object]:
        """Bracket code that runs guest instructions; yields the token :meth:`_arm` records the
        deadline under, so :meth:`close` can end the call.

        Raises:
            EngineClosed: the engine is closed (nothing runs).
        """
        token = object()
        with self._lock:
            if self._closing:
                raise EngineClosed("the sandbox engine is closed: no agent code starts")
            self._in_flight[token] = self._epoch
        try:
            yield token
        finally:
            with self._lock:
                del self._in_flight[token]
                if not self._in_flight:
                    self._drained.notify_all()

    def __enter__(self) -> "SandboxEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ended_early(self, store: "_Store", limits: Limits, agent: str, export: str) -> FabricError | None:
        """The error of a call its clock ended (wall time, closing, cancel), or None: the failure
        was the agent's own. wasmtime reports the callback's refusal as a plain error (not a
        trap), also during instantiation, so this is asked before any other reading of it."""
        why = store.clock.ended_by
        if why is None:
            return None
        try:
            fuel_consumed = limits.fuel - store.get_fuel()
        except wasmtime.WasmtimeError:
            fuel_consumed = 0
        kw = dict(agent=agent, export=export, trap_code=None, fuel_consumed=fuel_consumed)
        if why == "cancelled":
            return TaskCancelled(f"{agent}: {export} was cancelled", **kw)
        if why == "closing":
            return DeadlineExceeded(f"{agent}: {export} was stopped: the sandbox engine closed", **kw)
        return DeadlineExceeded(f"{agent}: {export} ran past its {limits.wall_time_s} s deadline", **kw)

    def deadline_ticks(self, wall_time_s: float) -> int:
        """Epoch ticks for ``wall_time_s`` (rounded up, plus one for the tick in progress)."""
        return math.ceil(wall_time_s / self.epoch_tick_s) + 1

    # ----------------------------------------------------------------- compile

    def compile(self, wasm: bytes) -> CompiledModule:
        """Validate and compile ``wasm`` (or fetch it from the cache).

        Raises:
            ModuleRejected: not bytes, larger than ``max_module_bytes``, invalid
                WebAssembly (including a proposal the engine disables), an import
                other than a WASI preview 1 function or a ``chimera`` host function
                of exactly its type, or an export named like one the host calls
                (:data:`ABI_EXPORTS`, ``memory``) that does not have exactly its type.
        """
        if not isinstance(wasm, (bytes, bytearray, memoryview)):
            raise ModuleRejected(f"module must be bytes, not {type(wasm).__name__}")
        wasm = bytes(wasm)
        if len(wasm) > self.max_module_bytes:
            raise ModuleRejected(f"module is {len(wasm)} bytes; the limit is {self.max_module_bytes}")
        sha = hashlib.sha256(wasm).hexdigest()
        if not wasm.startswith(WASM_MAGIC):  # wasmtime would parse anything else as WAT text
            raise ModuleRejected(f"module {sha[:12]} is not valid WebAssembly: it does not start with the "
                                 f"binary module header (\\0asm)")
        with self._cache_lock:
            cached = self._memory_cache.get(sha)
            if cached is not None:
                self._memory_cache.move_to_end(sha)
                self.counters["cache_hits_memory"] += 1
                return cached
        module = self._load_artefact(sha)
        if module is None:
            try:
                module = wasmtime.Module(self.engine, wasm)
            except wasmtime.WasmtimeError as exc:
                raise ModuleRejected(f"module {sha[:12]} is not valid WebAssembly: {_error_summary(exc)}") from None
            self.counters["compiled"] += 1
            imports, exports = _check_interface(wasm, sha)
            self._store_artefact(sha, module)
        else:
            imports, exports = _check_interface(wasm, sha)
        compiled = CompiledModule(sha256=sha, module=module, size_bytes=len(wasm),
                                  imports=tuple((mod, name) for mod, name, _ in imports),
                                  exports=frozenset(exports),
                                  functions=tuple((name, sig) for name, (_, sig) in exports.items()
                                                  if sig is not None))
        with self._cache_lock:
            self._memory_cache[sha] = compiled
            while len(self._memory_cache) > self._memory_cache_entries:
                self._memory_cache.popitem(last=False)
        return compiled

    def _artefact_path(self, sha: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{sha}.{self.fingerprint}.cwasm"

    def _load_artefact(self, sha: str) -> wasmtime.Module | None:
        path = self._artefact_path(sha)
        if path is None or not path.is_file():
            return None
        try:
            module = wasmtime.Module.deserialize(self.engine, path.read_bytes())
        except (wasmtime.WasmtimeError, OSError):
            self.counters["cache_rejected"] += 1
            path.unlink(missing_ok=True)
            return None
        self.counters["cache_hits_disk"] += 1
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used (the disk cache's LRU order)
        return module

    def _store_artefact(self, sha: str, module: wasmtime.Module) -> None:
        path = self._artefact_path(sha)
        if path is None:
            return
        try:
            write_atomic(path, bytes(module.serialize()), sync_dir=False)
        except OSError:  # a cache write failure only costs a recompile
            return
        self._trim_disk_cache(keep=path)

    def _trim_disk_cache(self, keep: Path) -> None:
        """Remove the least recently used artefacts (mtime) until the cache fits ``cache_max_bytes``."""
        if self.cache_max_bytes is None or self.cache_dir is None:
            return
        files = []
        for p in self.cache_dir.glob("*.cwasm"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime_ns, p, st.st_size))
        total = sum(f[2] for f in files)
        for _, p, size in sorted(files, key=lambda f: f[0]):
            if total <= self.cache_max_bytes:
                break
            if p == keep:
                continue
            with contextlib.suppress(OSError):
                p.unlink()
                total -= size
                self.counters["cache_evicted"] += 1

    # ---------------------------------------------------------- instantiation

    def _new_store(self, limits: Limits) -> "_Store":
        store = _Store(self.engine)
        store.set_limits(memory_size=limits.memory_bytes, table_elements=limits.table_elements,
                         instances=4, tables=4, memories=1)
        store.clock = _CallClock(self)
        _ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), store.clock.callback, None, _NO_FINALIZER)
        return store

    def _arm(self, store: "_Store", limits: Limits, token: object | None = None,
             cancel: threading.Event | None = None) -> None:
        """Refuel and set the epoch deadline: required before *every* call. ``token`` (from
        :meth:`_guest_call`) records the deadline for :meth:`close`; while closing, the deadline
        is the current epoch, so the call ends at its first epoch check. ``cancel``: an event
        that ends the call (:class:`TaskCancelled`) at its next check once set."""
        store.set_fuel(limits.fuel)
        ticks = self.deadline_ticks(limits.wall_time_s)
        clock = store.clock
        with self._lock:
            if self._closing:
                ticks = 0
            clock.end_epoch, clock.cancel, clock.ended_by = self._epoch + ticks, cancel, None
            store.set_epoch_deadline(min(ticks, self._check_ticks))
            if token is not None and token in self._in_flight:
                self._in_flight[token] = self._epoch + ticks

    def _base_linker(self, clock: bool) -> wasmtime.Linker:
        """A linker with WASI and, unless ``clock``, the clock functions denied (cached)."""
        linker = self._linkers.get(clock)
        if linker is None:
            linker = wasmtime.Linker(self.engine)
            _define_wasi(linker, clock)
            self._linkers[clock] = linker
        return linker

    def _wasi_config(self, grants: Grants) -> wasmtime.WasiConfig:
        wasi = wasmtime.WasiConfig()
        if grants.args:
            wasi.argv = list(grants.args)
        if grants.env:
            wasi.env = [list(pair) for pair in grants.env]
        for pre in grants.preopens:
            wasi.preopen_dir(pre.host_path, pre.guest_path, pre.writable)
        return wasi

    # -------------------------------------------------------------------- tasks

    def run_task(self, compiled: CompiledModule, stdin: bytes, *, limits: Limits = DEFAULT_LIMITS,
                 grants: Grants = NO_GRANTS, name: str = "task",
                 cancel: threading.Event | None = None) -> TaskResult:
        """Run a WASI command once: ``stdin`` in, stdout/exit status out.

        A fresh store and instance per run (nothing survives between runs).
        stdin is a private temporary file; stdout and stderr are FIFOs drained
        by a collector thread into bounded buffers (``stdout_file`` and
        ``stderr_file``, never custom callbacks), so a flood never touches the
        disk: past ``max_output_bytes`` the read end is closed and the agent's
        further writes fail with EPIPE.

        Returns:
            :class:`TaskResult` (a non-zero exit status is a result, not an error).
        Raises:
            ModuleRejected: not a command (no ``_start``), or imports ``chimera``
                host functions (those are for actors), or cannot be linked.
            InputTooLarge: ``len(stdin) > limits.max_input_bytes``.
            FuelExhausted, DeadlineExceeded, MemoryLimitExceeded, AgentTrap: the run trapped
                (DeadlineExceeded also when the engine was closed under it).
            TaskCancelled: ``cancel`` was set before the run ended (it stops within about
                :data:`CHECK_INTERVAL_S` of the set, also inside a long computation).
            OutputLimitExceeded: stdout went past ``limits.max_output_bytes``.
            EngineClosed: the engine is closed.
        """
        check_task_module(compiled)
        if len(stdin) > limits.max_input_bytes:
            raise InputTooLarge(f"task input is {len(stdin)} bytes; the limit is {limits.max_input_bytes}")
        with self._guest_call() as token:
            return self._run_task(compiled, stdin, limits, grants, name, token, cancel)

    def _run_task(self, compiled: CompiledModule, stdin: bytes, limits: Limits, grants: Grants, name: str,
                  token: object, cancel: threading.Event | None) -> TaskResult:
        self.counters["tasks_run"] += 1
        workdir = Path(tempfile.mkdtemp(dir=self._tmp_root))
        collector: _OutputCollector | None = None
        store = self._new_store(limits)
        try:
            stdin_path = workdir / "stdin"
            stdin_path.write_bytes(stdin)
            collector = _OutputCollector(workdir, limits.max_output_bytes, limits.max_stderr_bytes)
            wasi = self._wasi_config(grants)
            wasi.stdin_file = str(stdin_path)
            wasi.stdout_file = str(collector.stdout_path)
            wasi.stderr_file = str(collector.stderr_path)
            store.set_wasi(wasi)
            self._arm(store, limits, token, cancel)
            memory = None
            try:
                instance = self._base_linker(grants.clock).instantiate(store, compiled.module)
            except wasmtime.Trap as exc:
                raise self._ended_early(store, limits, name, "(start)") or _classify(
                    exc, store, None, limits, name, "(start)") from None
            except wasmtime.WasmtimeError as exc:
                raise self._ended_early(store, limits, name, "(start)") or _instantiate_error(
                    exc, compiled, limits) from None
            exports = instance.exports(store)
            memory = exports.get("memory") if "memory" in compiled.exports else None
            start = exports["_start"]
            if not isinstance(start, wasmtime.Func):
                raise ModuleRejected(f"task module {compiled.sha256[:12]}: _start is not a function")
            self._arm(store, limits, token, cancel)
            exit_code = 0
            try:
                start(store)
            except wasmtime.ExitTrap as exc:
                exit_code = exc.code
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                raise self._ended_early(store, limits, name, "_start") or _classify(
                    exc, store, memory, limits, name, "_start") from None
            memory_bytes = memory.data_len(store) if isinstance(memory, wasmtime.Memory) else 0
            fuel_consumed = limits.fuel - store.get_fuel()
            if exit_code != 0 and memory_bytes + PAGE_BYTES > limits.memory_bytes:
                raise MemoryLimitExceeded(
                    f"{name}: exited with status {exit_code} at the memory limit "
                    f"({memory_bytes} of {limits.memory_bytes} bytes)",
                    agent=name, export="_start", fuel_consumed=fuel_consumed)
        finally:
            store.close()  # drops the WASI context: wasmtime's ends of the FIFOs close here
            if collector is not None:
                collector.finish()
            shutil.rmtree(workdir, ignore_errors=True)
        if collector.overflow:
            raise OutputLimitExceeded(f"{name}: stdout exceeded {limits.max_output_bytes} bytes")
        return TaskResult(exit_code=exit_code, stdout=bytes(collector.stdout),
                          stderr=bytes(collector.stderr), fuel_consumed=fuel_consumed,
                          memory_bytes=memory_bytes)


def _wasmtime_version() -> str:
    try:
        from importlib.metadata import version

        return version("wasmtime")
    except Exception:  # noqa: BLE001 - only feeds the cache fingerprint
        return "unknown"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("wasm trap:") or line.startswith("Caused by"):
            continue
        if line:
            return line[:200]
    return text[:200]


def _error_summary(exc: BaseException) -> str:
    """First line of a wasmtime error plus its innermost cause (e.g. which proposal is disabled)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    first, last = lines[0], lines[-1]
    if len(lines) > 1 and last != first and not last.startswith("Caused by"):
        head, sep, rest = last.partition(": ")
        if sep and head.isdigit():
            last = rest
        return f"{first}: {last}"[:300]
    return first[:300]


def _trap_cause(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("wasm trap:"):
            return line[len("wasm trap:"):].strip()
    return _first_line(exc)


# ------------------------------------------------------------ module interface

#: Value type encodings (WebAssembly binary format, section 5.3). The engine disables the GC and
#: function-references proposals, so a validated module has no other value types.
_VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128", 0x70: "funcref",
             0x6F: "externref"}
_EXTERN_KINDS = {0: "function", 1: "table", 2: "memory", 3: "global", 4: "tag"}


class _Reader:
    """Bounds-checked reader of WebAssembly binary encodings (LEB128, names, value types)."""

    def __init__(self, data: bytes, pos: int, end: int, sha: str) -> None:
        self.data, self.pos, self.end, self.sha = data, pos, end, sha

    def fail(self, what: str) -> ModuleRejected:
        return ModuleRejected(f"module {self.sha[:12]}: cannot read its {what} (offset {self.pos})")

    def byte(self) -> int:
        if self.pos >= self.end:
            raise self.fail("encoding")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def u32(self) -> int:
        result = shift = 0
        for _ in range(5):
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
        raise self.fail("integer encoding")

    def name(self) -> str:
        n = self.u32()
        if self.pos + n > self.end:
            raise self.fail("names")
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("names") from None

    def valtypes(self) -> tuple[str, ...]:
        out = []
        for _ in range(self.u32()):
            code = self.byte()
            if code not in _VALTYPES:
                raise ModuleRejected(f"module {self.sha[:12]} uses the value type 0x{code:02x}, which the "
                                     "agent ABI does not allow")
            out.append(_VALTYPES[code])
        return tuple(out)


def _module_interface(wasm: bytes, sha: str) -> tuple[list[tuple[str, str, Signature]],
                                                          dict[str, tuple[str, Signature | None]]]:
    """The function imports ``(module, name, signature)`` and the exports ``name -> (kind, signature)``
    of a module wasmtime has validated, read from its bytes.

    wasmtime-py reads types through the wasm C API, which aborts the process on ``v128``
    ("support for v128 is not implemented"), so the host never asks wasmtime for them.

    Raises:
        ModuleRejected: an import that is not a function, or an encoding this reader does not know.
    """
    sections: dict[int, tuple[int, int]] = {}
    r = _Reader(wasm, 8, len(wasm), sha)
    while r.pos < r.end:
        sid = r.byte()
        size = r.u32()
        if r.pos + size > r.end:
            raise r.fail("sections")
        if sid in (1, 2, 3, 7):
            sections[sid] = (r.pos, r.pos + size)
        r.pos += size

    types: list[Signature] = []
    if 1 in sections:
        t = _Reader(wasm, *sections[1], sha)
        for _ in range(t.u32()):
            form = t.byte()
            if form != 0x60:
                raise ModuleRejected(f"module {sha[:12]} declares a type of form 0x{form:02x}; only function "
                                     "types are allowed (the GC proposal is disabled)")
            types.append((t.valtypes(), t.valtypes()))

    def func_type(index: int, reader: _Reader) -> Signature:
        if index >= len(types):
            raise reader.fail("type indices")
        return types[index]

    imports: list[tuple[str, str, Signature]] = []
    if 2 in sections:
        i = _Reader(wasm, *sections[2], sha)
        for _ in range(i.u32()):
            module, name = i.name(), i.name()
            kind = i.byte()
            if kind != 0:
                raise ModuleRejected(f"module {sha[:12]} imports {module}.{name}, which is not a function "
                                     f"(a {_EXTERN_KINDS.get(kind, 'thing')}); only functions can be imported")
            imports.append((module, name, func_type(i.u32(), i)))

    functions: list[Signature] = [sig for _, _, sig in imports]
    if 3 in sections:
        f = _Reader(wasm, *sections[3], sha)
        for _ in range(f.u32()):
            functions.append(func_type(f.u32(), f))

    exports: dict[str, tuple[str, Signature | None]] = {}
    if 7 in sections:
        e = _Reader(wasm, *sections[7], sha)
        for _ in range(e.u32()):
            name = e.name()
            kind, index = e.byte(), e.u32()
            sig = None
            if kind == 0:
                if index >= len(functions):
                    raise e.fail("function indices")
                sig = functions[index]
            exports[name] = (_EXTERN_KINDS.get(kind, "unknown"), sig)
    return imports, exports


def _show(sig: Signature) -> str:
    return f"({', '.join(sig[0])}) -> ({', '.join(sig[1])})"


def _check_interface(wasm: bytes, sha: str) -> tuple[list[tuple[str, str, Signature]],
                                                         dict[str, tuple[str, Signature | None]]]:
    """Imports: only WASI preview 1 and ``chimera`` functions, each with its exact type. Exports: the
    names the host calls (:data:`ABI_EXPORTS`) only as functions of exactly their type, ``memory``
    only as a memory. Returns what :func:`_module_interface` read.

    Raises:
        ModuleRejected: anything else, with what was expected.
    """
    imports, exports = _module_interface(wasm, sha)
    for module, name, sig in imports:
        where = f"{module}.{name}"
        if module == WASI_MODULE:
            expected = WASI_SIGNATURES.get(name)
            if expected is None:
                raise ModuleRejected(f"module {sha[:12]} imports {where}, which WASI preview 1 does not define")
        elif module == HOST_MODULE:
            expected = HOST_FUNCTIONS.get(name)
            if expected is None:
                raise ModuleRejected(f"module {sha[:12]} imports {where}; the chimera host functions are "
                                     f"{', '.join(sorted(HOST_FUNCTIONS))}")
        else:
            raise ModuleRejected(f"module {sha[:12]} imports {where}, which the host does not provide "
                                 f"(only {WASI_MODULE} and {HOST_MODULE})")
        if sig != expected:
            raise ModuleRejected(f"module {sha[:12]} imports {where} with type {_show(sig)}; "
                                 f"it must be {_show(expected)}")
    for name, (kind, sig) in exports.items():
        expected = ABI_EXPORTS.get(name)
        if expected is not None and sig != expected:
            got = _show(sig) if sig is not None else f"a {kind}"
            raise ModuleRejected(f"module {sha[:12]} exports {name} as {got}; the host calls {name} "
                                 f"as a function of type {_show(expected)}")
        if name == "memory" and kind != "memory":
            raise ModuleRejected(f"module {sha[:12]} exports memory as a {kind}; it must be its linear memory")
    return imports, exports


def check_task_module(compiled: CompiledModule) -> None:
    """A task agent (WASI command): exports ``_start`` of type ``() -> ()`` and imports no
    ``chimera`` host functions (those are for actors). Deploy, upgrade and every run check it.

    Raises:
        ModuleRejected: it can never run as a task.
    """
    if compiled.signature("_start") is None:
        raise ModuleRejected(f"task module {compiled.sha256[:12]} does not export _start (a WASI command's "
                             "entry point); it cannot be a task agent")
    host_imports = sorted(name for mod, name in compiled.imports if mod == HOST_MODULE)
    if host_imports:
        raise ModuleRejected(f"task module {compiled.sha256[:12]} imports chimera host functions "
                             f"({', '.join(host_imports)}); only actor agents get them")


def check_actor_module(compiled: CompiledModule) -> None:
    """An actor agent (WASI reactor): exports ``memory``, ``alloc`` and ``handle`` (their types, and
    ``_initialize``'s, are checked by :meth:`SandboxEngine.compile`).

    Raises:
        ModuleRejected: one of them is missing.
    """
    missing = {"memory", "alloc", "handle"} - compiled.exports
    if missing:
        raise ModuleRejected(f"actor module {compiled.sha256[:12]} lacks exports {sorted(missing)}")


def _define_wasi(linker: wasmtime.Linker, clock: bool) -> None:
    linker.define_wasi()
    if not clock:
        linker.allow_shadowing = True
        for fname, (params, results) in _CLOCK_DENIED.items():
            linker.define_func(WASI_MODULE, fname, wasmtime.FuncType(list(params), list(results)),
                               _deny)
        linker.allow_shadowing = False


def _deny(*_args: object) -> int:
    return WASI_ERRNO_NOTCAPABLE


class _Store(wasmtime.Store):
    """A store with its :class:`_CallClock` (which must live as long as the store: wasmtime
    holds a pointer to its callback)."""

    clock: "_CallClock"


class _CallClock:
    """The epoch-deadline callback of one store (wasmtime ``Store::epoch_deadline_callback``).

    wasmtime calls it on the thread running the guest whenever the engine's epoch reaches the
    store's deadline, which :meth:`SandboxEngine._arm` sets at most ``CHECK_INTERVAL_S`` ahead.
    It ends the call (a returned error; ``ended_by`` says why: ``deadline``, ``closing`` or
    ``cancelled``) when the call's wall time is up (``end_epoch``), the engine is closing, or
    ``cancel`` is set; else it extends the deadline by another slice. It never raises (an
    exception cannot cross into wasmtime: one would end the call as past its deadline)."""

    __slots__ = ("engine", "end_epoch", "cancel", "ended_by", "callback")

    def __init__(self, engine: SandboxEngine) -> None:
        self.engine = engine
        self.end_epoch = 0
        self.cancel: threading.Event | None = None
        self.ended_by: str | None = None
        self.callback = _DEADLINE_CALLBACK(self._on_deadline)

    def _on_deadline(self, _context: object, _data: object, delta: object, kind: object) -> int:
        try:
            engine = self.engine
            epoch = engine._epoch  # (an int read; at most one tick behind the engine's own)
            if engine._closing:
                why = "closing"
            elif self.cancel is not None and self.cancel.is_set():
                why = "cancelled"
            elif epoch >= self.end_epoch:
                why = "deadline"
            else:
                delta[0] = min(engine._check_ticks, self.end_epoch - epoch)
                kind[0] = _UPDATE_DEADLINE_CONTINUE
                return 0
        except BaseException:  # noqa: BLE001 - see the class docstring
            why = "deadline"
        self.ended_by = why
        error = _ffi.wasmtime_error_new(f"chimera: call ended ({why})".encode())
        return ctypes.cast(error, ctypes.c_void_p).value or 0


def _instantiate_error(exc: wasmtime.WasmtimeError, compiled: CompiledModule, limits: Limits) -> FabricError:
    text = str(exc)
    if "memory" in text and ("limit" in text or "exceeds" in text):
        return MemoryLimitExceeded(f"module {compiled.sha256[:12]} needs more memory than the limit of "
                                   f"{limits.memory_bytes} bytes: {_first_line(exc)}")
    return ModuleRejected(f"module {compiled.sha256[:12]} cannot be instantiated: {_first_line(exc)}")


def _classify(exc: BaseException, store: wasmtime.Store, memory: object, limits: Limits,
              agent: str, export: str) -> FabricError:
    """Turn a wasmtime trap/error into the matching :class:`AgentTrap` subclass."""
    if isinstance(exc, FabricError):
        return exc
    try:
        fuel_consumed = limits.fuel - store.get_fuel()
    except wasmtime.WasmtimeError:
        fuel_consumed = 0
    code = exc.trap_code if isinstance(exc, wasmtime.Trap) else None
    kw = dict(agent=agent, export=export, trap_code=code.name if code is not None else None,
              fuel_consumed=fuel_consumed)
    if code is wasmtime.TrapCode.OUT_OF_FUEL:
        return FuelExhausted(f"{agent}: {export} used all of its {limits.fuel} fuel units", **kw)
    if code is wasmtime.TrapCode.INTERRUPT:
        return DeadlineExceeded(f"{agent}: {export} ran past its {limits.wall_time_s} s deadline", **kw)
    if isinstance(memory, wasmtime.Memory):
        try:
            size = memory.data_len(store)
        except wasmtime.WasmtimeError:
            size = 0
        if size + PAGE_BYTES > limits.memory_bytes:
            return MemoryLimitExceeded(f"{agent}: {export} trapped at the memory limit ({size} of "
                                       f"{limits.memory_bytes} bytes): {_trap_cause(exc)}", **kw)
    return AgentTrap(f"{agent}: {export} trapped: {_trap_cause(exc)}", **kw)


# ----------------------------------------------------------------- task output


class _OutputCollector:
    """Drains a task's stdout/stderr FIFOs into bounded buffers on one thread.

    Ordering: the read ends are opened non-blocking first and a placeholder
    write end is held open, so wasmtime's blocking open of the write end
    succeeds at once and reads never see a spurious end-of-file before the
    agent starts. :meth:`finish` (after the store is closed) drops the
    placeholder; the thread then reads to end-of-file and exits.
    """

    def __init__(self, workdir: Path, max_stdout: int, max_stderr: int) -> None:
        self.stdout_path = workdir / "stdout"
        self.stderr_path = workdir / "stderr"
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.overflow = False
        self._limits = {"stdout": max_stdout, "stderr": max_stderr}
        self._fds: dict[str, int] = {}
        self._placeholders: list[int] = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            os.mkfifo(path, 0o600)
            self._fds[label] = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            self._placeholders.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        self._thread = threading.Thread(target=self._run, name="wasm-task-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            for label, fd in self._fds.items():
                sel.register(fd, selectors.EVENT_READ, label)
            open_count = len(self._fds)
            while open_count:
                for key, _ in sel.select(timeout=1.0):
                    label = key.data
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fd)
                        self._close(label)
                        open_count -= 1
                        continue
                    buf = self.stdout if label == "stdout" else self.stderr
                    room = self._limits[label] - len(buf)
                    if len(chunk) > room:
                        buf.extend(chunk[:max(room, 0)])
                        if label == "stdout":
                            self.overflow = True
                            sel.unregister(key.fd)  # no reader left: the agent's writes fail (EPIPE)
                            self._close(label)
                            open_count -= 1
                    else:
                        buf.extend(chunk)
        finally:
            sel.close()
            for label in list(self._fds):
                self._close(label)

    def _close(self, label: str) -> None:
        fd = self._fds.pop(label, None)
        if fd is not None:
            os.close(fd)

    def finish(self, timeout_s: float = 30.0) -> None:
        for fd in self._placeholders:
            os.close(fd)
        self._placeholders.clear()
        self._thread.join(timeout_s)


# ----------------------------------------------------------------------- actors


SendFn = Callable[[str, bytes], int]
LogFn = Callable[[str], None]


class ActorInstance:
    """One live instance of an actor (WASI reactor) module.

    Not thread-safe: the owner (:class:`~chimera.fabric.host.AgentHost`) runs
    one call at a time. ``_initialize`` is called once (if exported) under the
    same limits as a message. After any trap the instance is dead.

    Args:
        sandbox: the engine.
        compiled: a module exporting ``memory``, ``alloc`` and ``handle``.
        name: the agent's name (for messages and logs).
        address: the agent's full address (``peer_id/name``); what it sees as its own.
        limits, grants: see :class:`Limits`, :class:`Grants`.
        on_send: ``on_send(target, payload) -> code`` routes a message; returns
            one of the ``SEND_*`` codes. Exceptions are caught (``SEND_FAILED``).
        on_log: receives each log line (decoded UTF-8, errors replaced).
        clock_ms: wall-clock milliseconds for ``chimera.now_ms`` (only with ``grants.clock``).
    Raises:
        ModuleRejected: missing exports or cannot be linked.
        MemoryLimitExceeded, AgentTrap, FuelExhausted, DeadlineExceeded: from instantiation or ``_initialize``.
    """

    def __init__(self, sandbox: SandboxEngine, compiled: CompiledModule, *, name: str,
                 address: str | None = None, limits: Limits = DEFAULT_LIMITS, grants: Grants = NO_GRANTS,
                 on_send: SendFn | None = None, on_log: LogFn | None = None,
                 clock_ms: Callable[[], int] | None = None) -> None:
        check_actor_module(compiled)
        self.sandbox, self.compiled, self.name = sandbox, compiled, name
        self._signatures = dict(compiled.functions)
        self.address = address or name
        self.limits, self.grants = limits, grants
        self._on_send = on_send
        self._on_log = on_log
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._sends = 0
        self._logs = 0
        self.alive = False
        self.counters = {"send_errors": 0, "logs_dropped": 0}
        self.store = sandbox._new_store(limits)
        self.store.set_wasi(sandbox._wasi_config(grants))
        linker = wasmtime.Linker(sandbox.engine)
        _define_wasi(linker, grants.clock)
        self._define_host(linker)
        self._memory: wasmtime.Memory | None = None
        with sandbox._guest_call() as token:
            sandbox._arm(self.store, limits, token)
            try:
                instance = linker.instantiate(self.store, compiled.module)
            except wasmtime.Trap as exc:
                raise sandbox._ended_early(self.store, limits, name, "(start)") or _classify(
                    exc, self.store, None, limits, name, "(start)") from None
            except wasmtime.WasmtimeError as exc:
                raise sandbox._ended_early(self.store, limits, name, "(start)") or _instantiate_error(
                    exc, compiled, limits) from None
        exports = instance.exports(self.store)
        memory, alloc, handle = exports["memory"], exports["alloc"], exports["handle"]
        if not (isinstance(memory, wasmtime.Memory) and isinstance(alloc, wasmtime.Func)
                and isinstance(handle, wasmtime.Func)):
            raise ModuleRejected(f"actor module {compiled.sha256[:12]}: memory/alloc/handle have the wrong kinds")
        self._memory, self._alloc, self._handle = memory, alloc, handle
        self._exports = exports
        self.alive = True
        if "_initialize" in compiled.exports:
            self.call("_initialize")

    # --------------------------------------------------------- host functions

    def _define_host(self, linker: wasmtime.Linker) -> None:
        i32, i64 = _I32, _I64
        linker.define_func(HOST_MODULE, "send", wasmtime.FuncType([i32, i32, i32, i32], [i32]), self._host_send)
        linker.define_func(HOST_MODULE, "log", wasmtime.FuncType([i32, i32], []), self._host_log)
        linker.define_func(HOST_MODULE, "now_ms", wasmtime.FuncType([], [i64]), self._host_now_ms)

    def _guest_bytes(self, ptr: int, length: int) -> bytes | None:
        """Copy ``length`` bytes at ``ptr`` out of guest memory; None if out of bounds."""
        memory = self._memory
        if memory is None:
            return None
        ptr &= 0xFFFFFFFF
        length &= 0xFFFFFFFF
        size = memory.data_len(self.store)
        if ptr + length > size:
            return None
        if length == 0:
            return b""
        return ctypes.string_at(ctypes.addressof(memory.data_ptr(self.store).contents) + ptr, length)

    def _host_send(self, to_ptr: int, to_len: int, msg_ptr: int, msg_len: int) -> int:
        if self._sends >= self.limits.max_sends_per_call:
            self.counters["send_errors"] += 1
            return SEND_QUOTA
        self._sends += 1
        if (to_len & 0xFFFFFFFF) > MAX_ADDRESS_BYTES or (msg_len & 0xFFFFFFFF) > self.limits.max_message_bytes:
            self.counters["send_errors"] += 1
            return SEND_TOO_LARGE
        target_raw = self._guest_bytes(to_ptr, to_len)
        payload = self._guest_bytes(msg_ptr, msg_len)
        if target_raw is None or payload is None:
            self.counters["send_errors"] += 1
            return SEND_BAD_ADDRESS
        try:
            target = target_raw.decode("utf-8")
        except UnicodeDecodeError:
            self.counters["send_errors"] += 1
            return SEND_BAD_ADDRESS
        if not target or any(ord(c) < 0x21 for c in target):
            self.counters["send_errors"] += 1
            return SEND_BAD_ADDRESS
        if self._on_send is None:
            return SEND_REFUSED
        try:
            code = int(self._on_send(target, payload))
        except Exception:  # noqa: BLE001 - a router bug must not become a guest trap
            self.counters["send_errors"] += 1
            return SEND_FAILED
        if code != SEND_OK:
            self.counters["send_errors"] += 1
        return code

    def _host_log(self, ptr: int, length: int) -> None:
        if self._logs >= self.limits.max_logs_per_call:
            self.counters["logs_dropped"] += 1
            return
        self._logs += 1
        raw = self._guest_bytes(ptr, min(length & 0xFFFFFFFF, self.limits.max_log_bytes))
        if raw is None:
            self.counters["logs_dropped"] += 1
            return
        if self._on_log is not None:
            try:
                self._on_log(raw.decode("utf-8", errors="replace"))
            except Exception:  # noqa: BLE001
                self.counters["logs_dropped"] += 1

    def _host_now_ms(self) -> int:
        if not self.grants.clock:
            return -1
        return int(self._clock_ms())

    # ------------------------------------------------------------------ calls

    def call(self, export: str, *args: int | float) -> object:
        """Call an exported function under the limits (refuel + deadline first).

        Raises:
            AgentDiscarded: the instance trapped before.
            ModuleRejected: no such exported function, or one whose type has a value the host
                cannot pass (anything but i32, i64, f32, f64; the instance is unharmed).
            AgentTrap (and subclasses): the call trapped; the instance is now dead.
            EngineClosed: the engine is closed (the instance is unharmed; nothing ran).
        """
        if not self.alive:
            raise AgentDiscarded(f"{self.name}: instance was discarded after a trap")
        func = self._exports.get(export)
        sig = self._signatures.get(export)
        if not isinstance(func, wasmtime.Func) or sig is None:
            raise ModuleRejected(f"{self.name}: no exported function {export!r}")
        if not HOST_CALLABLE_TYPES.issuperset(sig[0] + sig[1]):
            raise ModuleRejected(f"{self.name}: {export} has type {_show(sig)}; the host only calls functions "
                                 f"of {', '.join(sorted(HOST_CALLABLE_TYPES))}")
        store = self.store
        with self.sandbox._guest_call() as token:
            self.sandbox._arm(store, self.limits, token)
            self._sends = self._logs = 0
            try:
                return func(store, *args)
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                self.alive = False
                raise self.sandbox._ended_early(store, self.limits, self.name, export) or _classify(
                    exc, store, self._memory, self.limits, self.name, export) from None

    def handle(self, sender: str, payload: bytes) -> int:
        """Deliver one message: ``alloc(len(sender) + len(payload))``, copy both in,
        then ``handle(from_ptr, from_len, msg_ptr, msg_len)``.

        Returns:
            the handler's status (0 = handled; anything else is a handler error).
        Raises:
            InputTooLarge: ``payload`` over ``limits.max_message_bytes`` (instance unharmed).
            GuestFault: ``alloc`` returned 0 or an out-of-bounds pointer (instance discarded).
            AgentDiscarded, AgentTrap (and subclasses): as :meth:`call`.
        """
        if len(payload) > self.limits.max_message_bytes:
            raise InputTooLarge(f"{self.name}: message of {len(payload)} bytes; the limit is "
                                f"{self.limits.max_message_bytes}")
        sender_raw = sender.encode("utf-8")
        total = len(sender_raw) + len(payload)
        ptr = self.call("alloc", total)
        ptr = int(ptr) & 0xFFFFFFFF if isinstance(ptr, int) else 0
        memory = self._memory
        assert memory is not None
        store = self.store
        if ptr == 0 or ptr + total > memory.data_len(store):
            self.alive = False
            raise GuestFault(f"{self.name}: alloc({total}) returned an unusable pointer {ptr:#x}",
                             agent=self.name, export="alloc")
        if total:
            ctypes.memmove(ctypes.addressof(memory.data_ptr(store).contents) + ptr, sender_raw + payload, total)
        status = self.call("handle", ptr, len(sender_raw), ptr + len(sender_raw), len(payload))
        return int(status) if isinstance(status, int) else -1

    def memory_bytes(self) -> int:
        """Current linear memory size in bytes (0 once closed)."""
        if self._memory is None or not self.alive:
            return 0
        return self._memory.data_len(self.store)

    def close(self) -> None:
        """Release the store (the instance cannot be used afterwards)."""
        self.alive = False
        self._memory = None
        self._exports = {}
        try:
            self.store.close()
        except Exception:  # noqa: BLE001 - closing twice is harmless
            pass
