"""WASM fabric benchmark: the fabric's costs against baselines measured in the same run.

(a) export call: ``vecstats.sum_f64(ptr, n)`` (agents/src/vecstats.wat) called
    with plain wasmtime-py (``Func.__call__`` on a store with fuel and epoch
    interruption enabled but armed once) vs the same call through the fabric
    (:meth:`ActorInstance.call`: refuel + epoch deadline + trap
    classification on every call). Target: fabric <= 1.5x raw.
(b) message delivery: raw wasmtime-py ``alloc`` + copy + ``handle`` (host
    ``send`` a no-op) vs :meth:`AgentHost.call` (the fabric's local agent
    call: per-agent lock, limits armed per call, routing of the reply to a
    sink, outcome listeners). Target: <= 1.5x raw.
(c) task: one WASI command invocation of ``wordfreq`` (fresh store, stdin
    file, stdout/stderr FIFOs) vs a native subprocess doing the same work (the
    same C source compiled natively when a C compiler is present, otherwise
    the Python reference in a subprocess; the table says which).

Figures are medians of repeated batches (``time.perf_counter``); nothing
here asserts on time. Run: ``python -m benchmarks.bench_wasm [--json]``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import wasmtime

ROOT = Path(__file__).resolve().parent.parent
AGENTS = ROOT / "agents"
CALL_TARGET = 1.5


def _median_per_op(fn, ops_per_batch: int, batches: int) -> float:
    """Median seconds per operation over ``batches`` batches of ``ops_per_batch`` calls."""
    for _ in range(max(1, ops_per_batch // 10)):
        fn()
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(ops_per_batch):
            fn()
        samples.append((time.perf_counter() - t0) / ops_per_batch)
    return statistics.median(samples)


def bench_calls(n_values: int = 64, ops: int = 2000, batches: int = 7) -> dict:
    from chimera.fabric.host import AgentHost
    from chimera.fabric.sandbox import ActorInstance, Limits, SandboxEngine

    wasm = (AGENTS / "wasm" / "vecstats.wasm").read_bytes()
    vector = struct.pack(f"<{n_values}d", *[float(i) for i in range(n_values)])
    results: dict = {}
    with SandboxEngine() as sandbox:
        compiled = sandbox.compile(wasm)
        limits = Limits(fuel=10_000_000, wall_time_s=5.0)

        # raw wasmtime-py on the same engine (fuel + epochs on), armed once up front
        store = wasmtime.Store(sandbox.engine)
        store.set_fuel(2**62)
        store.set_epoch_deadline(2**40)
        linker = wasmtime.Linker(sandbox.engine)
        i32 = wasmtime.ValType.i32()
        linker.define_func("chimera", "send", wasmtime.FuncType([i32] * 4, [i32]), lambda *a: 0)
        exports = linker.instantiate(store, compiled.module).exports(store)
        raw_sum, raw_alloc, raw_handle, raw_mem = exports["sum_f64"], exports["alloc"], exports["handle"], exports["memory"]
        ptr = raw_alloc(store, len(vector))
        raw_mem.write(store, vector, ptr)
        expected = float(sum(range(n_values)))
        assert raw_sum(store, ptr, n_values) == expected

        actor = ActorInstance(sandbox, compiled, name="bench", limits=limits, on_send=lambda t, p: 0)
        fptr = actor.call("alloc", len(vector))
        actor._memory.write(actor.store, vector, fptr)
        assert actor.call("sum_f64", fptr, n_values) == expected

        raw_call = _median_per_op(lambda: raw_sum(store, ptr, n_values), ops, batches)
        fabric_call = _median_per_op(lambda: actor.call("sum_f64", fptr, n_values), ops, batches)
        results["export_call"] = {"raw_us": raw_call * 1e6, "fabric_us": fabric_call * 1e6,
                                  "ratio": fabric_call / raw_call, "target": CALL_TARGET}

        sender = b"bench/caller"

        def raw_message() -> None:
            total = len(sender) + len(vector)
            p = raw_alloc(store, total)
            base = ctypes.addressof(raw_mem.data_ptr(store).contents)
            ctypes.memmove(base + p, sender + vector, total)
            raw_handle(store, p, len(sender), p + len(sender), len(vector))

        host = AgentHost(sandbox, peer_id="bench")
        host.start_agent("stats", compiled, limits=limits)
        replies = []
        sink = host.add_sink("caller", lambda s, p: replies.append(p) if len(replies) < 1 else None)
        assert host.call("stats", vector, sender=sink).ok and replies

        raw_msg = _median_per_op(raw_message, ops, batches)
        fabric_msg = _median_per_op(lambda: host.call("stats", vector, sender=sink), ops, batches)
        results["message"] = {"raw_us": raw_msg * 1e6, "fabric_us": fabric_msg * 1e6,
                              "ratio": fabric_msg / raw_msg, "target": CALL_TARGET}
        host.close()
        actor.close()
    return results


def _native_wordfreq(workdir: Path) -> tuple[list[str], str]:
    cc = shutil.which("cc") or shutil.which("clang") or shutil.which("gcc")
    if cc:
        exe = workdir / "wordfreq-native"
        built = subprocess.run([cc, "-O2", "-o", str(exe), str(AGENTS / "src" / "wordfreq.c")],
                               capture_output=True, timeout=120)
        if built.returncode == 0:
            return [str(exe)], f"native C ({Path(cc).name} -O2)"
    code = ("import sys,re,collections;t=sys.stdin.buffer.read();"
            "c=collections.Counter(w.lower()[:64] for w in re.findall(rb'[A-Za-z0-9]+',t));"
            "sys.stdout.buffer.write(b''.join(b'%d %s\\n'%(n,w) for w,n in sorted(c.items(),key=lambda x:(-x[1],x[0]))))")
    return [sys.executable, "-c", code], "Python reference subprocess (no C compiler found)"


def bench_task(text_bytes: int = 64 << 10, runs: int = 30) -> dict:
    from chimera.fabric.sandbox import SandboxEngine

    words = (b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
             b"labore et dolore magna aliqua ").split()
    text = b" ".join(words[(i * 7) % len(words)] for i in range(text_bytes // 6))[:text_bytes]
    with tempfile.TemporaryDirectory() as tmp, SandboxEngine() as sandbox:
        module = sandbox.compile((AGENTS / "wasm" / "wordfreq.wasm").read_bytes())
        reference = sandbox.run_task(module, text).stdout
        cmd, native_kind = _native_wordfreq(Path(tmp))
        native_out = subprocess.run(cmd, input=text, capture_output=True, timeout=60).stdout
        assert native_out == reference, "native and WASM results differ"
        wasm_s = _median_per_op(lambda: sandbox.run_task(module, text), 1, runs)
        native_s = _median_per_op(lambda: subprocess.run(cmd, input=text, capture_output=True, timeout=60), 1, runs)
        empty_s = _median_per_op(lambda: sandbox.run_task(module, b""), 1, runs)
    return {"input_bytes": len(text), "wasm_task_ms": wasm_s * 1e3, "wasm_empty_task_ms": empty_s * 1e3,
            "native_subprocess_ms": native_s * 1e3, "ratio": wasm_s / native_s, "native": native_kind}


def measure_all() -> dict:
    started = time.perf_counter()
    results = bench_calls()
    results["task"] = bench_task()
    results["env"] = {"machine": platform.machine(), "cpu_count": os.cpu_count(),
                      "python": platform.python_version(), "wasmtime": _version("wasmtime"),
                      "wall_s": time.perf_counter() - started}
    return results


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _table(r: dict) -> str:
    lines = ["measure                          raw / baseline     fabric     ratio  target",
             "-" * 78]
    for key, label in (("export_call", "export call sum_f64(64 f64)"), ("message", "actor message (512 B)")):
        m = r[key]
        ok = "met" if m["ratio"] <= m["target"] else "NOT met"
        lines.append(f"{label:<32} {m['raw_us']:>9.2f} us {m['fabric_us']:>9.2f} us {m['ratio']:>7.2f}x "
                     f"<= {m['target']}x {ok}")
    t = r["task"]
    lines.append(f"{'wordfreq task (' + str(t['input_bytes'] >> 10) + ' KiB)':<32} "
                 f"{t['native_subprocess_ms']:>9.2f} ms {t['wasm_task_ms']:>9.2f} ms {t['ratio']:>7.2f}x  (vs {t['native']})")
    lines.append(f"{'empty task (instantiate+FIFOs)':<32} {'':>12} {t['wasm_empty_task_ms']:>9.2f} ms")
    env = r["env"]
    lines.append(f"({env['machine']}, {env['cpu_count']} cpus, Python {env['python']}, wasmtime {env['wasmtime']}; "
                 f"{env['wall_s']:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    results = measure_all()
    print(json.dumps(results, indent=2, sort_keys=True) if args.json else _table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
