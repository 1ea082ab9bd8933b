"""Sandbox: hostile modules are stopped or denied, the host keeps serving, tasks compute correctly."""

from __future__ import annotations

import os
import random

import pytest

from chimera.fabric.sandbox import (
    AgentDiscarded,
    AgentTrap,
    ActorInstance,
    DeadlineExceeded,
    FuelExhausted,
    Grants,
    InputTooLarge,
    Limits,
    MemoryLimitExceeded,
    ModuleRejected,
    OutputLimitExceeded,
    Preopen,
    SandboxEngine,
    result_digest,
)
from fabric_helpers import reference_wordfreq, wasm

SAMPLE = b"The quick brown fox jumps over the lazy dog. THE DOG sleeps; the fox runs! 42 42 x"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with SandboxEngine(tmp_path_factory.mktemp("wasm-cache")) as engine:
        yield engine


def assert_still_serving(sandbox: SandboxEngine) -> None:
    result = sandbox.run_task(sandbox.compile(wasm("wordfreq")), SAMPLE)
    assert result.exit_code == 0 and result.stdout == reference_wordfreq(SAMPLE)


def test_task_agent_matches_python_reference(sandbox):
    module = sandbox.compile(wasm("wordfreq"))
    rng = random.Random(7)
    vocab = [b"alpha", b"Beta", b"gamma", b"DELTA", b"e", b"x" * 70, b"caf\xc3\xa9", b"a1b2"]
    for _ in range(3):
        text = b" ".join(rng.choice(vocab) + rng.choice([b"", b",", b".", b"\n"]) for _ in range(rng.randint(0, 400)))
        result = sandbox.run_task(module, text)
        assert result.exit_code == 0
        assert result.stdout == reference_wordfreq(text)
        assert result.fuel_consumed > 0
        assert result.digest() == result_digest(0, reference_wordfreq(text))


def test_infinite_loop_stopped_by_fuel(sandbox):
    module = sandbox.compile(wasm("hostile_loop"))
    with pytest.raises(FuelExhausted) as info:
        sandbox.run_task(module, b"", limits=Limits(fuel=5_000_000, wall_time_s=60))
    assert info.value.reason == "fuel_exhausted" and "fuel" in str(info.value)
    assert_still_serving(sandbox)


def test_infinite_loop_stopped_by_epoch_deadline(sandbox):
    module = sandbox.compile(wasm("hostile_loop"))
    with pytest.raises(DeadlineExceeded) as info:
        sandbox.run_task(module, b"", limits=Limits(fuel=2**62, wall_time_s=0.3))
    assert info.value.reason == "deadline_exceeded"
    assert_still_serving(sandbox)


def test_memory_bomb_hits_the_limit(sandbox):
    module = sandbox.compile(wasm("hostile_memory_bomb"))
    limit = 4 << 20
    with pytest.raises(MemoryLimitExceeded) as info:
        sandbox.run_task(module, b"", limits=Limits(memory_bytes=limit))
    assert str(limit) in str(info.value)
    # a module whose declared minimum exceeds the limit cannot even start
    with pytest.raises(MemoryLimitExceeded):
        sandbox.run_task(sandbox.compile(wasm("hostile_huge_memory")), b"", limits=Limits(memory_bytes=limit))
    assert_still_serving(sandbox)


def test_file_open_denied(sandbox, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret 1234")
    result = sandbox.run_task(sandbox.compile(wasm("hostile_open_file")), str(secret).encode())
    assert result.exit_code == 1
    assert b"top secret" not in result.stdout and result.stdout.startswith(b"denied errno=")
    # granted explicitly (read-only preopen), the same agent can read it
    granted = Grants(preopens=(Preopen(host_path=str(tmp_path), guest_path="/data"),))
    result = sandbox.run_task(sandbox.compile(wasm("hostile_open_file")), b"/data/secret.txt", grants=granted)
    assert result.exit_code == 0 and result.stdout == b"top secret 1234"
    assert_still_serving(sandbox)


def test_environment_read_denied(sandbox, monkeypatch):
    monkeypatch.setenv("CHIMERA_TEST_SECRET", "hunter2")
    result = sandbox.run_task(sandbox.compile(wasm("hostile_read_env")), b"")
    assert result.exit_code == 0
    assert b"hunter2" not in result.stdout and result.stdout == b"env count 0\n"
    granted = sandbox.run_task(sandbox.compile(wasm("hostile_read_env")), b"", grants=Grants(env=(("MODE", "demo"),)))
    assert granted.stdout == b"MODE=demo\nenv count 1\n"
    assert_still_serving(sandbox)


def test_clock_denied_unless_granted(sandbox):
    module = sandbox.compile(wasm("hostile_read_clock"))
    denied = sandbox.run_task(module, b"")
    assert denied.exit_code == 1 and denied.stdout == b"clock denied errno=76\n"
    allowed = sandbox.run_task(module, b"", grants=Grants(clock=True))
    assert allowed.exit_code == 0 and int(allowed.stdout.split()[1]) > 1_600_000_000


def test_unlinked_import_rejected(sandbox):
    with pytest.raises(ModuleRejected, match="evil.syscall"):
        sandbox.compile(wasm("hostile_unlinked_import"))
    with pytest.raises(ModuleRejected, match="not valid WebAssembly"):
        sandbox.compile(b"\x00asm\x01\x00\x00\x00garbage")
    with pytest.raises(ModuleRejected):
        sandbox.compile(b"x" * (sandbox.max_module_bytes + 1))
    # without the binary header wasmtime would parse the bytes as WAT text ("not valid utf-8")
    for not_binary in (b"(module)", b"\xff\xfe garbage", b""):
        with pytest.raises(ModuleRejected, match="binary module header"):
            sandbox.compile(not_binary)
    assert_still_serving(sandbox)


def test_output_flood_bounded(sandbox):
    with pytest.raises(OutputLimitExceeded):
        sandbox.run_task(sandbox.compile(wasm("hostile_output_flood")), b"",
                         limits=Limits(max_output_bytes=256 << 10, wall_time_s=30))
    with pytest.raises(InputTooLarge):
        sandbox.run_task(sandbox.compile(wasm("wordfreq")), b"x" * 2048, limits=Limits(max_input_bytes=1024))
    assert_still_serving(sandbox)


def test_actor_trap_discards_instance(sandbox):
    sent = []
    actor = ActorInstance(sandbox, sandbox.compile(wasm("counter")), name="c",
                          on_send=lambda target, payload: sent.append((target, payload)) or 0)
    assert actor.handle("p/x", b"inc") == 0
    with pytest.raises(AgentTrap):
        actor.handle("p/x", b"trap")
    assert not actor.alive
    with pytest.raises(AgentDiscarded):
        actor.handle("p/x", b"get")
    fresh = ActorInstance(sandbox, sandbox.compile(wasm("counter")), name="c",
                          on_send=lambda target, payload: sent.append((target, payload)) or 0)
    assert fresh.handle("p/x", b"get") == 0 and sent[-1] == ("p/x", b"count 0")


def test_actor_loop_stopped_by_fuel_and_deadline(sandbox):
    # the counter's "ping" with a huge limit replies once per message; a tiny fuel budget traps its handler
    actor = ActorInstance(sandbox, sandbox.compile(wasm("counter")), name="c", limits=Limits(fuel=2_000))
    with pytest.raises(FuelExhausted):
        actor.handle("p/x", b"ping 1 2")


def test_compile_cache_reused_from_disk(tmp_path):
    with SandboxEngine(tmp_path / "cache") as first:
        first.compile(wasm("wordfreq"))
        assert first.counters["compiled"] == 1
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].name.endswith(".cwasm")
    assert oct(files[0].stat().st_mode & 0o777) == "0o600"
    with SandboxEngine(tmp_path / "cache") as second:
        module = second.compile(wasm("wordfreq"))
        assert second.counters["compiled"] == 0 and second.counters["cache_hits_disk"] == 1
        assert second.run_task(module, SAMPLE).stdout == reference_wordfreq(SAMPLE)
    # a damaged artefact is discarded and recompiled, never trusted
    files[0].write_bytes(os.urandom(256))
    with SandboxEngine(tmp_path / "cache") as third:
        third.compile(wasm("wordfreq"))
        assert third.counters["cache_rejected"] == 1 and third.counters["compiled"] == 1


# ---------------------------------------------------------------- export and import types

_MEM = '(memory (export "memory") 1)'
_ALLOC = '(func (export "alloc") (param i32) (result i32) (i32.const 16))'
_HANDLE = '(func (export "handle") (param i32 i32 i32 i32) (result i32) (i32.const 0))'
_V128 = '(v128.const i64x2 0 0)'
#: modules whose exports or imports do not have the ABI's exact types (docs/AGENTS.md)
WRONG_TYPES = {
    "handle_v128_param": f'(module {_MEM} {_ALLOC} (func (export "handle") (param v128 i32 i32 i32) (result i32) (i32.const 0)))',
    "alloc_v128_result": f'(module {_MEM} (func (export "alloc") (param i32) (result v128) {_V128}) {_HANDLE})',
    "start_v128_result": f'(module {_MEM} (func (export "_start") (result v128) {_V128}))',
    "initialize_v128_param": f'(module {_MEM} {_ALLOC} {_HANDLE} (func (export "_initialize") (param v128)))',
    "handle_three_params": f'(module {_MEM} {_ALLOC} (func (export "handle") (param i32 i32 i32) (result i32) (i32.const 0)))',
    "alloc_i64": f'(module {_MEM} (func (export "alloc") (param i64) (result i64) (i64.const 16)) {_HANDLE})',
    "start_with_result": f'(module {_MEM} (func (export "_start") (result i32) (i32.const 0)))',
    "alloc_not_a_function": f'(module {_MEM} (global (export "alloc") i32 (i32.const 0)) {_HANDLE})',
    "memory_not_a_memory": '(module (global (export "memory") i32 (i32.const 0)) (func (export "_start")))',
    "chimera_import_v128": f'(module (import "chimera" "log" (func (param v128 i32))) {_MEM} {_ALLOC} {_HANDLE})',
    "wasi_import_v128": f'(module (import "wasi_snapshot_preview1" "fd_write" (func (param v128) (result i32))) {_MEM} (func (export "_start")))',
    "wasi_import_wrong_width": f'(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i64) (result i32))) {_MEM} (func (export "_start")))',
}

_TYPES_SCRIPT = r'''
import json, sys, wasmtime
from chimera.fabric.host import AgentHost
from chimera.fabric.sandbox import ActorInstance, ModuleRejected, SandboxEngine
cases, valid = json.loads(sys.argv[1]), sys.argv[2]
with SandboxEngine() as eng:
    host = AgentHost(eng, peer_id="me")
    for label, wat in cases.items():
        try:
            compiled = eng.compile(wasmtime.wat2wasm(wat))
        except ModuleRejected as exc:
            print(label, "REJECTED", exc, flush=True)
            continue
        print(label, "ACCEPTED", flush=True)
        try:  # what a node would do next (with v128 this aborted the whole process)
            if compiled.is_actor:
                host.start_agent(label.replace("_", "-"), compiled)
                print(label, "handled", host.call(label.replace("_", "-"), b"msg").reason, flush=True)
            else:
                print(label, "ran", eng.run_task(compiled, b""), flush=True)
        except Exception as exc:
            print(label, "raised", type(exc).__name__, exc, flush=True)
    ok = eng.compile(wasmtime.wat2wasm(valid))
    host.start_agent("ok", ok)
    print("valid handled", host.call("ok", b"msg").reason, flush=True)
    actor = ActorInstance(eng, ok, name="ok")
    try:
        actor.call("simd", 0)
    except ModuleRejected as exc:
        print("simd refused", actor.alive, exc, flush=True)
    host.close()
print("done", flush=True)
'''


def test_exports_and_imports_must_have_the_exact_abi_types_and_v128_never_reaches_the_host():
    """wasmtime-py aborts the process (SIGABRT, "support for v128 is not implemented") when the host
    calls a function whose type has a v128, so every type is checked at compile time from the module
    bytes. Run in a subprocess: an abort fails this test instead of killing pytest."""
    import json
    import subprocess
    import sys

    # a valid actor may export other functions with v128 and a v128 global: it runs; the host
    # refuses to call such a function itself
    valid = (f'(module {_MEM} {_ALLOC} {_HANDLE} (func (export "simd") (param v128) (result v128) (local.get 0))'
             f' (global (export "g") v128 {_V128}))')
    proc = subprocess.run([sys.executable, "-c", _TYPES_SCRIPT, json.dumps(WRONG_TYPES), valid],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = {line.split(" ", 1)[0]: line for line in proc.stdout.splitlines()}
    for label in WRONG_TYPES:
        assert lines[label].startswith(f"{label} REJECTED module "), proc.stdout
    assert "the host calls handle as a function of type (i32, i32, i32, i32) -> (i32)" in lines["handle_v128_param"]
    assert "alloc as (i32) -> (v128)" in lines["alloc_v128_result"]
    assert "exports alloc as a global" in lines["alloc_not_a_function"]
    assert "chimera.log with type (v128, i32) -> (); it must be (i32, i32) -> ()" in lines["chimera_import_v128"]
    assert "wasi_snapshot_preview1.fd_write with type (i32, i32, i32, i64) -> (i32)" in lines["wasi_import_wrong_width"]
    assert lines["valid"] == "valid handled ok"
    assert lines["simd"].startswith("simd refused True ") and "(v128) -> (v128)" in lines["simd"]
    assert lines["done"] == "done"


# ---------------------------------------------------------------- engine settings

#: one module per proposal the engine disables (sandbox.ENGINE_SETTINGS)
DISABLED_PROPOSALS = {
    # a GC array is a second heap beside the capped linear memory (about twice the memory cap)
    "gc": '''(module (type $a (array (mut i8))) (global $keep (mut (ref null $a)) (ref.null $a))
               (memory (export "memory") 1)
               (func (export "_start") (global.set $keep (array.new $a (i32.const 1) (i32.const 62914560)))))''',
    "externref": '(module (memory (export "memory") 1) (table 1 externref) (func (export "_start")))',
    "function_references": '''(module (type $t (func)) (func $f (type $t)) (elem declare func $f)
               (memory (export "memory") 1) (func (export "_start") (call_ref $t (ref.func $f))))''',
    "exceptions": '(module (tag $e) (memory (export "memory") 1) (func (export "_start") (throw $e)))',
    "tail_call": '(module (func $f) (memory (export "memory") 1) (func (export "_start") (return_call $f)))',
    "memory64": '(module (memory (export "memory") i64 1) (func (export "_start")))',
    "multi_memory": '(module (memory (export "memory") 1) (memory 1) (func (export "_start")))',
    "shared_memory": '(module (memory (export "memory") 1 1 shared) (func (export "_start")))',
    "custom_page_sizes": '(module (memory (export "memory") 1 (pagesize 1)) (func (export "_start")))',
    "wide_arithmetic": '''(module (memory (export "memory") 1) (func (export "_start")
               (drop (drop (i64.add128 (i64.const 1) (i64.const 0) (i64.const 2) (i64.const 0))))))''',
    "stack_switching": '(module (type $f (func)) (type $c (cont $f)) (memory (export "memory") 1) (func (export "_start")))',
}


@pytest.mark.parametrize("proposal", sorted(DISABLED_PROPOSALS))
def test_proposals_the_agent_abi_does_not_need_are_refused_at_compile_time(sandbox, proposal):
    import wasmtime

    with pytest.raises(ModuleRejected, match="not valid WebAssembly") as info:
        sandbox.compile(wasmtime.wat2wasm(DISABLED_PROPOSALS[proposal]))
    assert info.value.reason == "module_rejected"


def test_engine_settings_are_in_the_compiled_module_cache_fingerprint(monkeypatch):
    from chimera.fabric import sandbox as sandbox_module

    settings = dict(sandbox_module.ENGINE_SETTINGS)
    assert settings["wasm_gc"] is False and settings["gc_support"] is False
    assert settings["cranelift_nan_canonicalization"] is True
    assert settings["wasm_relaxed_simd_deterministic"] is True
    with SandboxEngine() as engine:
        fingerprint = engine.fingerprint
    flipped = tuple((k, not v) if k == "cranelift_nan_canonicalization" else (k, v)
                    for k, v in sandbox_module.ENGINE_SETTINGS)
    monkeypatch.setattr(sandbox_module, "ENGINE_SETTINGS", flipped)
    with SandboxEngine() as engine:
        assert engine.fingerprint != fingerprint  # an artefact compiled otherwise is never reused


#: a task whose output depended on the CPU: the NaN bits of 0/0 (x86 gives 0xffc00000) and
#: relaxed SIMD's multiply-add (fused with FMA, not without)
NONDETERMINISTIC = r'''
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $z f32)
    (i32.store (i32.const 100) (i32.reinterpret_f32 (f32.div (local.get $z) (local.get $z))))
    (v128.store (i32.const 112)
      (f32x4.relaxed_madd (f32x4.splat (f32.const 0x1.001p+0)) (f32x4.splat (f32.const 0x1.001p+0))
                          (f32x4.splat (f32.const -0x1.002p+0))))
    (i32.store (i32.const 104) (i32.load (i32.const 112)))
    (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 8))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))'''


def test_honest_replicas_on_different_cpus_get_the_same_result_digest(monkeypatch):
    import struct

    import wasmtime

    module = wasmtime.wat2wasm(NONDETERMINISTIC)
    with SandboxEngine() as engine:
        here = engine.run_task(engine.compile(module), b"")
    assert here.exit_code == 0
    assert struct.unpack("<I", here.stdout[:4])[0] == 0x7FC00000  # the canonical NaN
    assert struct.unpack("<f", here.stdout[4:8])[0] == 2.0 ** -24  # fused: (1+2^-12)^2 - (1+2^-11)

    real_engine = wasmtime.Engine

    def engine_without_fma(config):  # the code cranelift emits for a CPU without FMA
        config.cranelift_flag_set("has_fma", "false")
        return real_engine(config)

    monkeypatch.setattr(wasmtime, "Engine", engine_without_fma)
    with SandboxEngine() as other_cpu:
        there = other_cpu.run_task(other_cpu.compile(module), b"")
    assert there.stdout == here.stdout and there.digest() == here.digest()


# ---------------------------------------------------------------- closing the engine

_LOOPING_ACTOR = ('(module (import "chimera" "log" (func $log (param i32 i32))) (memory (export "memory") 1)'
                  ' (data (i32.const 0) "looping") (func (export "alloc") (param i32) (result i32) (i32.const 16))'
                  ' (func (export "handle") (param i32 i32 i32 i32) (result i32)'
                  ' (call $log (i32.const 0) (i32.const 7)) (loop (br 0)) (i32.const 0)))')


def _wait_for(predicate, timeout_s: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_close_ends_every_running_call_with_deadline_exceeded():
    """close() used to stop the epoch ticker under running calls: a task with fuel to spare never
    ended (and a node's shutdown hung on its worker thread)."""
    import threading

    import wasmtime

    from chimera.fabric.sandbox import EngineClosed

    engine = SandboxEngine()
    long = Limits(fuel=2**62, wall_time_s=600.0)
    task = engine.compile(wasm("hostile_loop"))
    in_handle = threading.Event()
    actor = ActorInstance(engine, engine.compile(wasmtime.wat2wasm(_LOOPING_ACTOR)), name="spin", limits=long,
                          on_log=lambda line: in_handle.set())
    outcomes: dict[str, BaseException] = {}

    def run(label, fn):
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
            outcomes[label] = exc

    threads = [threading.Thread(target=run, args=("task", lambda: engine.run_task(task, b"", limits=long)), daemon=True),
               threading.Thread(target=run, args=("actor", lambda: actor.handle("p/x", b"go")), daemon=True)]
    for t in threads:
        t.start()
    assert in_handle.wait(30) and _wait_for(lambda: engine.calls_in_flight == 2)
    engine.close(timeout_s=60)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a call kept running after close()"
    assert isinstance(outcomes["task"], DeadlineExceeded) and isinstance(outcomes["actor"], DeadlineExceeded)
    assert engine.calls_in_flight == 0 and not actor.alive
    assert _wait_for(lambda: not engine._ticker.is_alive())
    with pytest.raises(EngineClosed):  # nothing starts any more
        engine.run_task(task, b"")


_EXIT_SCRIPT = r'''
from concurrent.futures import ThreadPoolExecutor
from chimera.fabric.sandbox import Limits, SandboxEngine
import sys
engine = SandboxEngine()
loop = engine.compile(open(sys.argv[1], "rb").read())
pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fabric-task")
future = pool.submit(engine.run_task, loop, b"", limits=Limits(fuel=2**62, wall_time_s=600.0))
while engine.calls_in_flight == 0:
    pass
pool.shutdown(wait=False, cancel_futures=True)  # what FabricService.close() does
engine.close()
print(type(future.exception(timeout=60)).__name__, flush=True)
'''


def test_a_process_that_closes_the_engine_under_a_running_task_exits():
    import subprocess
    import sys

    from fabric_helpers import AGENTS

    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(AGENTS / "hostile_loop.wasm")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "DeadlineExceeded"


def test_a_cancel_stops_a_running_task_and_leaves_the_others_running():
    """A task's ``cancel`` event ends that run (TaskCancelled) at its next check, also inside an
    endless computation with fuel and wall time to spare; a second task running beside it in the
    same engine is not touched and still ends by its own deadline. Before, a cancelled attempt
    ran to its wall time (up to an hour on a replica)."""
    import threading

    from chimera.fabric.sandbox import TaskCancelled

    engine = SandboxEngine()
    try:
        loop = engine.compile(wasm("hostile_loop"))
        long = Limits(fuel=2**62, wall_time_s=600.0)
        cancel, never = threading.Event(), threading.Event()
        outcomes: dict[str, BaseException] = {}

        def run(label, limits, event):
            try:
                engine.run_task(loop, b"", limits=limits, cancel=event)
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
                outcomes[label] = exc

        cancelled = threading.Thread(target=run, args=("cancelled", long, cancel), daemon=True)
        other = threading.Thread(target=run, args=("other", Limits(fuel=2**62, wall_time_s=1.5), never),
                                 daemon=True)
        cancelled.start()
        other.start()
        assert _wait_for(lambda: engine.calls_in_flight == 2)
        cancel.set()
        cancelled.join(60)
        assert not cancelled.is_alive(), "the cancelled task kept running"
        assert isinstance(outcomes["cancelled"], TaskCancelled), outcomes
        assert outcomes["cancelled"].reason == "cancelled"
        other.join(60)
        assert isinstance(outcomes["other"], DeadlineExceeded), outcomes  # its own wall time, not the cancel
        # a cancel set before the run starts ends it at the first check; the engine serves on
        with pytest.raises(TaskCancelled):
            engine.run_task(loop, b"", limits=long, cancel=cancel)
        result = engine.run_task(engine.compile(wasm("wordfreq")), SAMPLE, cancel=never)
        assert result.exit_code == 0 and result.stdout == reference_wordfreq(SAMPLE)
    finally:
        engine.close()


def test_a_deadline_far_beyond_the_check_interval_is_kept_across_checks(sandbox):
    """The deadline callback extends a call slice by slice: a run needing many slices ends with
    its result (not cut at the first check), and a loop ends at its own wall time."""
    from chimera.fabric.sandbox import CHECK_INTERVAL_S

    text = b"word " * 20000
    result = sandbox.run_task(sandbox.compile(wasm("wordfreq")), text, limits=Limits(wall_time_s=60.0))
    assert result.stdout == reference_wordfreq(text)
    loop = sandbox.compile(wasm("hostile_loop"))
    with pytest.raises(DeadlineExceeded) as info:
        sandbox.run_task(loop, b"", limits=Limits(fuel=2**62, wall_time_s=5 * CHECK_INTERVAL_S))
    assert "deadline" in str(info.value)
