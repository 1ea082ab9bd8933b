"""The execution fabric (docs/PROTOCOL.md §18, docs/AGENTS.md) written from the spec alone (clean room).

It builds on the clean-room peer of tests/independent_peer.py (envelopes, join, membership)
and adds, with wasmtime (an external library) as the sandbox and nothing from ``chimera``:

* the §18.1/§18.2 codec of every ``fabric_*`` body (strict: unknown fields, bounds and
  invariants are ``malformed``) and the Resources / Ballot / BallotVote records;
* §18.3 capacity advertisement (``fabric_capacity`` to every alive verified member);
* §18.4 the replica side (runs, refusals, result digests, vote requests answered only
  under rules (a)–(c)) and a minimal submitter (one run per replica, digest checked,
  ballot and vote requests, the tally);
* §18.5 module transfer both ways (serving chunks; fetching one chunk at a time with the
  offset / total / magic / SHA-256 checks and the 10 s chunk timeout);
* §18.6 actor messages (sending, and a mailbox per local name);
* docs/AGENTS.md's task sandbox: fuel, an epoch deadline ticked every 5 ms, the linear
  memory cap, no preopens / env / args, clocks answering ENOTCAPABLE, bounded stdout.

A replica can be told to lie (``lie = True``): it reports a different stdout with the
digest of that stdout (a consistent, wrong result) and signs that digest when asked; with
``lie = "inconsistent"`` it reports the true stdout with a digest that is not its digest.

Times: wall-clock milliseconds on the wire (§1); sizes in bytes.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import nacl.exceptions
import nacl.signing
import wasmtime

from tests import independent_peer as ip
from tests.independent_peer import F, ProtocolError

KIB = 1024
MIB = 1024 * 1024
I31_MAX = 2**31 - 1
I63_MAX = 2**63 - 1
MAX_MODULE_BYTES = 16 * MIB                       # §18.5
MAX_IO_BYTES = 512 * KIB                          # §18.2 input / stdout on the wire
MAX_CHUNK_BYTES = 512 * KIB                       # §18.2 max_chunk_bytes
CHUNK_TIMEOUT_S = 10.0                            # §18.5
WASM_MAGIC = b"\x00asm\x01\x00\x00\x00"           # §18.5
VOTE_DOMAIN = b"chimera-mesh/vote/v1\x00"         # §14.2
BALLOT_DOMAIN = b"chimera-mesh/ballot/v1\x00"     # §18.1
RESULT_DOMAIN = b"chimera-task-result/v1\x00"     # §18.2
ERROR_DOMAIN = b"chimera-task-error/v1\x00"       # §18.2
DEFAULT_THRESHOLDS = {"majority": (1, 2), "weighted": (1, 2), "unanimous": (1, 1), "quorum": (2, 3)}
ERROR_REASONS = frozenset({"fuel_exhausted", "memory_limit", "output_limit", "trap", "guest_fault",
                           "module_rejected", "input_too_large"})
REFUSAL_REASONS = frozenset({"deadline_exceeded", "busy", "gpu_unavailable", "over_capacity",
                             "module_unavailable", "internal_error"})
ENOTCAPABLE = 76                                  # AGENTS.md: clocks without the grant
EPOCH_TICK_S = 0.005                              # AGENTS.md: engine ticker every 5 ms
WASM_PAGE = 65536


# ---------------------------------------------------------------------------------------
# §18.1, §18.2 codec

_TASK_ID_RE = re.compile(r"[\x21-\x7e]{1,64}")
_SHA_HEX_RE = re.compile(r"[0-9a-f]{64}")
_AGENT_NAME_RE = re.compile(r"[a-z0-9_.-]{1,64}")


def _task_id(v: Any) -> str:
    if not isinstance(v, str) or not _TASK_ID_RE.fullmatch(v):
        raise ProtocolError("malformed", "TaskId: 1..64 printable ASCII, no space")
    return v


def _sha_hex(v: Any) -> str:
    if not isinstance(v, str) or not _SHA_HEX_RE.fullmatch(v):
        raise ProtocolError("malformed", "Sha256Hex: 64 lowercase hex digits")
    return v


def _float_nonneg(v: Any) -> float:
    """§7 float: float32/64 finite, or an int with |v| < 2^53; here also ≥ 0."""
    if type(v) is int and abs(v) < 2**53:
        v = float(v)
    if type(v) is not float or not math.isfinite(v) or v < 0:
        raise ProtocolError("malformed", "finite float ≥ 0 expected")
    return v


def _sint(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise ProtocolError("malformed", f"int in {lo}..{hi} expected")
        return v
    return check


def _distinct(key: Callable[[Any], Any], check: Callable[[Any], tuple]) -> Callable[[Any], tuple]:
    def run(v: Any) -> tuple:
        items = check(v)
        keys = [key(i) for i in items]
        if len(set(keys)) != len(keys):
            raise ProtocolError("malformed", "items are not distinct")
        return items
    return run


GPU_INFO = ip._record({
    "index": F(ip._int(0, 63)),
    "name": F(ip._str(96)),
    "memory_total_bytes": F(ip._int(0, I63_MAX)),
    "memory_used_bytes": F(ip._int(0, I63_MAX)),
    "utilization_percent": F(ip._int(0, 100), False, 0),
})

RESOURCES = ip._record({
    "cpu_count": F(ip._int(1, 65536)),
    "load_1m": F(_float_nonneg, False, 0.0),
    "memory_total_bytes": F(ip._int(0, I63_MAX)),
    "memory_available_bytes": F(ip._int(0, I63_MAX)),
    "disk_total_bytes": F(ip._int(0, I63_MAX), False, 0),
    "disk_free_bytes": F(ip._int(0, I63_MAX), False, 0),
    "gpus": F(_distinct(lambda g: g["index"], ip._array(GPU_INFO, 64)), False, ()),
    "max_wasm_memory_bytes": F(ip._int(0, I63_MAX), False, 64 * MIB),
    "max_task_wall_time_ms": F(ip._int(1, 86_400_000), False, 86_400_000),
})

RULES = frozenset(DEFAULT_THRESHOLDS)


def ballot_id_of(epoch: int, purpose: str, options: list[bytes], rule: str, threshold_num: int,
                 threshold_den: int, deadline_ms: int | None) -> bytes:
    """§18.1: SHA-256(BALLOT_DOMAIN ‖ msgpack([epoch, purpose, options, rule, num, den, deadline_ms]))."""
    return hashlib.sha256(BALLOT_DOMAIN + ip.packb(
        [epoch, purpose, list(options), rule, threshold_num, threshold_den, deadline_ms])).digest()


def _threshold_allowed(rule: str, num: int, den: int) -> bool:
    """§18.1: a reduced fraction, exactly 1/1 for unanimous, else in [1/2, 1)."""
    if math.gcd(num, den) != 1:
        return False
    if rule == "unanimous":
        return num == 1 and den == 1
    return 2 * num >= den and num < den


def _ballot(v: Any) -> dict:
    b = ip._record({
        "ballot_id": F(ip._bin(exact=32)),
        "epoch": F(ip._int(0, I63_MAX)),
        "purpose": F(ip._str(256)),
        "options": F(_distinct(lambda o: o, ip._array(ip._bin(64), 64)), False, ()),
        "rule": F(ip._str(16, RULES)),
        "threshold_num": F(ip._int(0, 2**32)),
        "threshold_den": F(ip._int(1, 2**32)),
        "deadline_ms": F(ip._optional(ip._int()), False, None),
    })(v)
    if any(len(o) < 1 for o in b["options"]):
        raise ProtocolError("malformed", "an option is 1..64 bytes")
    if not _threshold_allowed(b["rule"], b["threshold_num"], b["threshold_den"]):
        raise ProtocolError("malformed", "threshold not allowed for the rule")
    if b["ballot_id"] != ballot_id_of(b["epoch"], b["purpose"], list(b["options"]), b["rule"],
                                      b["threshold_num"], b["threshold_den"], b["deadline_ms"]):
        raise ProtocolError("malformed", "ballot_id does not match the ballot")
    return b


def _choice(v: Any) -> bytes:
    if not isinstance(v, bytes) or not 1 <= len(v) <= 64:
        raise ProtocolError("malformed", "choice: bin 1..64")
    return v


BALLOT_VOTE = ip._record({
    "ballot_id": F(ip._bin(exact=32)),
    "choice": F(_choice),
    "voter": F(ip._peer_id),
    "signature": F(ip._bin(exact=64)),
})


def _task_result(v: Any) -> dict:
    r = ip._record({
        "task_id": F(_task_id),
        "attempt": F(ip._int(1, I31_MAX)),
        "status": F(ip._str(8, frozenset({"ok", "error", "refused"}))),
        "exit_code": F(_sint(-2**31, I31_MAX), False, 0),
        "stdout": F(ip._bin(MAX_IO_BYTES), False, b""),
        "digest": F(ip._optional(ip._bin(exact=32)), False, None),
        "reason": F(ip._str(64), False, ""),
        "detail": F(ip._str(256), False, ""),
        "fuel_consumed": F(ip._int(0, I63_MAX), False, 0),
        "elapsed_ms": F(ip._int(0, I63_MAX), False, 0),
    })(v)
    if (r["digest"] is not None) != (r["status"] in ("ok", "error")):
        raise ProtocolError("malformed", "digest present exactly when status is ok or error")
    if r["status"] != "ok" and not r["reason"]:
        raise ProtocolError("malformed", "reason required unless ok")
    return r


def _module_chunk(v: Any) -> dict:
    c = ip._record({
        "module_sha256": F(_sha_hex),
        "offset": F(ip._int(0, MAX_MODULE_BYTES)),
        "total_bytes": F(ip._int(0, MAX_MODULE_BYTES)),
        "data": F(ip._bin(MAX_CHUNK_BYTES), False, b""),
        "error": F(ip._str(32), False, ""),
    })(v)
    if c["offset"] + len(c["data"]) > c["total_bytes"]:
        raise ProtocolError("malformed", "offset + len(data) > total_bytes")
    if c["error"] and c["data"]:
        raise ProtocolError("malformed", "an error chunk carries no data")
    return c


FABRIC_BODIES: dict[str, Callable[[Any], dict]] = {
    "fabric_capacity": ip._record({
        "resources": F(RESOURCES),
        "task_slots": F(ip._int(1, 1024)),
        "tasks_running": F(ip._int(0, 1024)),
        "interval_ms": F(ip._int(100, 3_600_000)),
    }),
    "fabric_task_run": ip._record({
        "task_id": F(_task_id),
        "attempt": F(ip._int(1, I31_MAX)),
        "module_sha256": F(_sha_hex),
        "input": F(ip._bin(MAX_IO_BYTES)),
        "fuel": F(ip._int(1, I63_MAX)),
        "memory_bytes": F(ip._int(65536, 2**32)),
        "wall_time_ms": F(ip._int(1, 86_400_000)),
        "gpu_indices": F(ip._array(ip._int(0, 63), 64), False, ()),
    }),
    "fabric_task_result": _task_result,
    "fabric_task_cancel": ip._record({
        "task_id": F(_task_id), "attempt": F(ip._int(1, I31_MAX)), "reason": F(ip._str(64), False, "")}),
    "fabric_vote_request": ip._record({
        "task_id": F(_task_id), "ballot": F(_ballot), "digest": F(ip._bin(exact=32))}),
    "fabric_vote": ip._record({"task_id": F(_task_id), "vote": F(BALLOT_VOTE)}),
    "fabric_module_request": ip._record({
        "module_sha256": F(_sha_hex),
        "offset": F(ip._int(0, MAX_MODULE_BYTES)),
        "max_chunk_bytes": F(ip._int(4096, MAX_CHUNK_BYTES), False, MAX_CHUNK_BYTES),
    }),
    "fabric_module_chunk": _module_chunk,
    "fabric_actor_message": ip._record({
        "to_name": F(ip._str(64)), "from_address": F(ip._str(160)), "payload": F(ip._bin(256 * KIB))}),
}


def decode_fabric(kind: str, body: Any) -> dict:
    """Decode one fabric body strictly (§7, §18.2). Raises ProtocolError('malformed')."""
    return FABRIC_BODIES[kind](body)


# ---------------------------------------------------------------------------------------
# digests and signatures (§18.2, §14.2, §18.4)

def result_digest(exit_code: int, stdout: bytes) -> bytes:
    """§18.2 ``ok`` digest: sha256(domain ‖ exit_code as 4-byte signed big-endian ‖ stdout)."""
    return hashlib.sha256(RESULT_DOMAIN + struct.pack(">i", exit_code) + stdout).digest()


def error_digest(reason: str) -> bytes:
    """§18.2 ``error`` digest: sha256(domain ‖ reason)."""
    return hashlib.sha256(ERROR_DOMAIN + reason.encode("utf-8")).digest()


def statement_bytes(purpose: str, network_id: bytes, epoch: int, statement: list) -> bytes:
    """§14.2: VOTE_DOMAIN ‖ msgpack([purpose, network_id, epoch, statement])."""
    return VOTE_DOMAIN + ip.packb([purpose, network_id, epoch, statement])


def sign_ballot_vote(key: nacl.signing.SigningKey, network_id: bytes, ballot: dict, choice: bytes) -> dict:
    """A BallotVote (§18.1): purpose ``ballot``, the ballot's epoch, statement [ballot_id, choice]."""
    sig = key.sign(statement_bytes("ballot", network_id, ballot["epoch"], [ballot["ballot_id"], choice])).signature
    return {"ballot_id": ballot["ballot_id"], "choice": choice,
            "voter": ip.peer_id_of(bytes(key.verify_key)), "signature": sig}


def verify_ballot_vote(network_id: bytes, ballot: dict, vote: dict) -> bool:
    if vote["ballot_id"] != ballot["ballot_id"]:
        return False
    try:
        nacl.signing.VerifyKey(ip.public_key_of(vote["voter"])).verify(
            statement_bytes("ballot", network_id, ballot["epoch"], [ballot["ballot_id"], vote["choice"]]),
            vote["signature"])
        return True
    except (nacl.exceptions.BadSignatureError, ProtocolError, ValueError):
        return False


def make_ballot(epoch: int, purpose: str, rule: str = "majority", threshold: tuple[int, int] | None = None,
                options: list[bytes] | None = None, deadline_ms: int | None = None) -> dict:
    num, den = threshold or DEFAULT_THRESHOLDS[rule]
    opts = list(options or [])
    return {"ballot_id": ballot_id_of(epoch, purpose, opts, rule, num, den, deadline_ms), "epoch": epoch,
            "purpose": purpose, "options": opts, "rule": rule, "threshold_num": num, "threshold_den": den,
            "deadline_ms": deadline_ms}


_PURPOSE_RE = re.compile(r"task (\S+) (\S+) replicas ([0-9a-f]{64})")


def task_purpose(submitter: str, task_id: str, table_sha256_hex: str) -> str:
    """§18.4 step 6: ``task <submitter> <task_id> replicas <hex>``, single spaces."""
    return f"task {submitter} {task_id} replicas {table_sha256_hex}"


def replica_table_hex(table: dict[str, int], epoch: int = 0) -> str:
    """The hex SHA-256 of a replica table (§18.4 step 6). The spec does not say how the
    table is encoded for this hash; the reference's purposes match
    SHA-256(msgpack([epoch, [[peer_id, weight], ...] in peer id order])) (found by trying
    encodings against a real node's certificate, see tests/test_independent_fabric.py)."""
    return hashlib.sha256(ip.packb([epoch, [[p, w] for p, w in sorted(table.items())]])).hexdigest()


def tally(ballot: dict, votes: list[dict], table: dict[str, int]) -> bytes | None:
    """Return the choice the rule accepts, or None. Weight per distinct voter in ``table``.

    ``majority``/``quorum``/``unanimous`` count voters, ``weighted`` their weights; a choice
    passes when its share is more than the threshold (for 1/1: all). §18.1 does not define
    the comparison (> or ≥); this uses > except for unanimous."""
    seen: dict[str, bytes] = {}
    for v in votes:
        if v["voter"] in table and v["voter"] not in seen:
            seen[v["voter"]] = v["choice"]
    weight = (lambda p: table[p]) if ballot["rule"] == "weighted" else (lambda p: 1)
    total = sum(weight(p) for p in table)
    num, den = ballot["threshold_num"], ballot["threshold_den"]
    for choice in set(seen.values()):
        w = sum(weight(p) for p, c in seen.items() if c == choice)
        if (w * den >= num * total) if num == den else (w * den > num * total):
            return choice
    return None


def verify_task_certificate(encoded: bytes, table: dict[str, int], network_id: bytes, task_id: str,
                            submitter: str, epoch: int = 0) -> bytes:
    """Check a task's vote certificate (§18.4 step 7) and return the decided digest.

    ``encoded`` is the certificate as the reference shows it (``encoded_hex``): §18.1 names
    the VoteCertificate record but gives no fields; the reference's is the map
    ``{ballot: Ballot, choice: bin, votes: [{voter: PeerId, signature: bin[64]}, ...]}``.
    Raises ProtocolError('malformed') when anything does not hold: the purpose must name the
    submitter, the task and the table's digest, every vote verify (purpose ``ballot``), no
    voter repeat or fall outside ``table``, and the ballot's rule accept the choice."""
    import msgpack
    try:
        value = msgpack.unpackb(encoded, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise ProtocolError("malformed", f"certificate: {exc}") from None
    cert = ip._record({
        "ballot": F(_ballot),
        "choice": F(_choice),
        "votes": F(ip._array(ip._record({"voter": F(ip._peer_id), "signature": F(ip._bin(exact=64))}), 1024)),
    })(value)
    ballot = cert["ballot"]
    if ballot["purpose"] != task_purpose(submitter, task_id, replica_table_hex(table, epoch)) or ballot["epoch"] != epoch:
        raise ProtocolError("malformed", "the purpose does not name this submitter, task and replica table")
    voters = [v["voter"] for v in cert["votes"]]
    if len(set(voters)) != len(voters) or not set(voters) <= set(table):
        raise ProtocolError("malformed", "a voter repeats or is not a replica")
    votes = [dict(v, ballot_id=ballot["ballot_id"], choice=cert["choice"]) for v in cert["votes"]]
    if not all(verify_ballot_vote(network_id, ballot, v) for v in votes):
        raise ProtocolError("malformed", "a vote signature does not verify")
    if tally(ballot, votes, table) != cert["choice"]:
        raise ProtocolError("malformed", "the votes do not meet the ballot's rule")
    return cert["choice"]


# ---------------------------------------------------------------------------------------
# the sandbox (docs/AGENTS.md)

@dataclass
class RunOutcome:
    status: str            # ok | error | refused
    exit_code: int = 0
    stdout: bytes = b""
    reason: str = ""
    detail: str = ""
    fuel_consumed: int = 0
    elapsed_ms: int = 0

    @property
    def digest(self) -> bytes | None:
        if self.status == "ok":
            return result_digest(self.exit_code, self.stdout)
        if self.status == "error":
            return error_digest(self.reason)
        return None


class Sandbox:
    """One wasmtime engine with the settings of docs/AGENTS.md and its epoch ticker."""

    def __init__(self) -> None:
        cfg = wasmtime.Config()
        cfg.consume_fuel = True
        cfg.epoch_interruption = True
        cfg.max_wasm_stack = 512 * KIB
        cfg.cranelift_nan_canonicalization = True
        cfg.wasm_relaxed_simd_deterministic = True
        for feature in ("wasm_gc", "wasm_function_references", "wasm_exceptions", "wasm_tail_call",
                        "wasm_wide_arithmetic", "wasm_memory64", "wasm_multi_memory", "wasm_threads",
                        "wasm_custom_page_sizes", "wasm_stack_switching"):
            try:
                setattr(cfg, feature, False)
            except (AttributeError, wasmtime.WasmtimeError):
                pass
        self.engine = wasmtime.Engine(cfg)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="epoch-ticker")
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(EPOCH_TICK_S):
            self.engine.increment_epoch()

    def close(self) -> None:
        self._stop.set()
        self._ticker.join(2)

    def check_task_module(self, wasm: bytes) -> wasmtime.Module:
        """Compile and check a task agent: ``_start`` () -> (), no ``chimera`` import. Raises
        ValueError('module_rejected ...')."""
        if len(wasm) > MAX_MODULE_BYTES or not wasm.startswith(WASM_MAGIC):
            raise ValueError("module_rejected: not binary WebAssembly version 1")
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise ValueError(f"module_rejected: {str(exc).splitlines()[0][:120]}") from None
        for imp in module.imports:
            if imp.module != "wasi_snapshot_preview1" or not isinstance(imp.type, wasmtime.FuncType):
                raise ValueError(f"module_rejected: import {imp.module}.{imp.name}")
        start = [e for e in module.exports if e.name == "_start"]
        if (not start or not isinstance(start[0].type, wasmtime.FuncType)
                or list(start[0].type.params) or list(start[0].type.results)):
            raise ValueError("module_rejected: no _start () -> ()")
        return module

    def run_task(self, wasm: bytes, stdin: bytes, fuel: int, memory_bytes: int, wall_time_ms: int,
                 stdout_limit_bytes: int = MAX_IO_BYTES) -> RunOutcome:
        """Run one task: a fresh store, fuel, an epoch deadline of ``wall_time_ms``, memory cap."""
        started = time.monotonic()

        def done(outcome: RunOutcome) -> RunOutcome:
            outcome.elapsed_ms = int((time.monotonic() - started) * 1000)
            return outcome

        if len(stdin) > 4 * MIB:
            return done(RunOutcome("error", reason="input_too_large"))
        try:
            module = self.check_task_module(wasm)
        except ValueError as exc:
            return done(RunOutcome("error", reason="module_rejected", detail=str(exc)[:256]))
        for e in module.exports:
            if isinstance(e.type, wasmtime.MemoryType) and e.type.limits.min * WASM_PAGE > memory_bytes:
                return done(RunOutcome("error", reason="memory_limit", detail="declared minimum over the cap"))
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=memory_bytes)
        store.set_fuel(fuel)
        ticks = math.ceil(wall_time_ms / 1000 / EPOCH_TICK_S) + 1
        store.set_epoch_deadline(ticks)
        out = bytearray()
        flooded = [False]

        def on_stdout(data: bytes) -> int | None:
            if flooded[0] or len(out) + len(data) > stdout_limit_bytes:
                flooded[0] = True
                return -32  # EPIPE: the read end is closed
            out.extend(data)
            return None

        with tempfile.NamedTemporaryFile(prefix="chimera-clean-stdin-") as f:
            f.write(stdin)
            f.flush()
            wasi = wasmtime.WasiConfig()
            wasi.stdin_file = f.name
            wasi.stdout_custom = on_stdout
            wasi.stderr_custom = lambda data: None
            store.set_wasi(wasi)
            linker = wasmtime.Linker(self.engine)
            linker.define_wasi()
            linker.allow_shadowing = True
            i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
            linker.define_func("wasi_snapshot_preview1", "clock_time_get",
                               wasmtime.FuncType([i32, i64, i32], [i32]), lambda *a: ENOTCAPABLE)
            linker.define_func("wasi_snapshot_preview1", "clock_res_get",
                               wasmtime.FuncType([i32, i32], [i32]), lambda *a: ENOTCAPABLE)
            linker.define_func("wasi_snapshot_preview1", "poll_oneoff",
                               wasmtime.FuncType([i32, i32, i32, i32], [i32]), lambda *a: ENOTCAPABLE)
            exit_code, failure = 0, None
            instance = None
            try:
                instance = linker.instantiate(store, module)
                instance.exports(store)["_start"](store)
            except wasmtime.ExitTrap as exc:
                exit_code = exc.code
            except wasmtime.Trap as exc:
                code = exc.trap_code
                failure = {wasmtime.TrapCode.OUT_OF_FUEL: "fuel_exhausted",
                           wasmtime.TrapCode.INTERRUPT: "deadline_exceeded"}.get(code, "trap")
            except wasmtime.WasmtimeError as exc:
                text = str(exc)
                failure = ("fuel_exhausted" if "fuel" in text else
                           "deadline_exceeded" if "interrupt" in text else
                           "memory_limit" if "memory" in text and "limit" in text else "trap")
        consumed = fuel - store.get_fuel()
        if flooded[0]:
            return done(RunOutcome("error", reason="output_limit", fuel_consumed=consumed))
        if failure == "deadline_exceeded":
            return done(RunOutcome("refused", reason="deadline_exceeded", fuel_consumed=consumed))
        if failure == "fuel_exhausted":
            return done(RunOutcome("error", reason="fuel_exhausted", fuel_consumed=consumed))
        near_limit = False
        if instance is not None:
            mem = instance.exports(store).get("memory")
            if isinstance(mem, wasmtime.Memory):
                near_limit = mem.data_len(store) + WASM_PAGE > memory_bytes
        if failure is not None or exit_code != 0:
            if near_limit:
                return done(RunOutcome("error", reason="memory_limit", fuel_consumed=consumed))
            if failure is not None:
                return done(RunOutcome("error", reason=failure, fuel_consumed=consumed))
        return done(RunOutcome("ok", exit_code=exit_code, stdout=bytes(out), fuel_consumed=consumed))


# ---------------------------------------------------------------------------------------
# module transfer (§18.5)

@dataclass
class Fetch:
    """One fetch, keyed by (module, source)."""

    sha256_hex: str
    source: str
    offset: int = 0
    total_bytes: int | None = None
    data: bytearray = field(default_factory=bytearray)
    deadline: float = 0.0
    waiters: list[dict] = field(default_factory=list)   # fabric_task_run bodies


@dataclass
class SubmittedTask:
    """A task this peer placed itself (test 4): one attempt per replica."""

    task_id: str
    module_sha256: str
    replicas: list[str]
    results: dict[str, dict] = field(default_factory=dict)
    votes: dict[str, dict] = field(default_factory=dict)
    ballot: dict | None = None
    table: dict[str, int] = field(default_factory=dict)


class FabricPeer(ip.IndependentPeer):
    """The clean-room peer plus the execution fabric (§18)."""

    CAPABILITIES = ["membership", "echo"]

    def __init__(self, network: ip.Network, host: str = "127.0.0.1", *, task_slots: int = 2,
                 capacity_interval_ms: int = 1000, max_wasm_memory_bytes: int = 64 * MIB,
                 lie: bool | str = False) -> None:
        self.fabric_drops: dict[str, int] = {}
        self.sandbox = Sandbox()
        self.modules: dict[str, bytes] = {}                  # sha hex -> wasm bytes
        self.fetches: dict[tuple[str, str], Fetch] = {}
        self.reported: dict[tuple[str, str], bytes] = {}     # (submitter, task_id) -> digest reported
        self.runs: list[dict] = []                           # every fabric_task_run accepted (with sender)
        self.sent_results: list[dict] = []
        self.capacities: dict[str, dict] = {}                # sender -> latest fabric_capacity
        self.mailboxes: dict[str, list[tuple[str, bytes]]] = {}
        self.submitted: dict[str, SubmittedTask] = {}
        self.module_requests_served = 0
        self.module_requests_seen: list[dict] = []
        self.chunk_hook: Callable[[str, dict], dict | None] | None = None  # tests: rewrite served chunks
        self.vote_choice: bytes | None = None   # tests: sign this instead of the reported digest (equivocate)
        self.lie = lie
        self.task_slots = task_slots
        self.capacity_interval_ms = capacity_interval_ms
        self.max_wasm_memory_bytes = max_wasm_memory_bytes
        self.max_task_wall_time_ms = 600_000
        self._running = 0
        self.advertising = threading.Event()   # cleared: no fabric_capacity is sent
        self.advertising.set()
        super().__init__(network, host)
        self._fabric_threads = [threading.Thread(target=self._advertise_loop, daemon=True, name="capacity"),
                                threading.Thread(target=self._fetch_timeouts, daemon=True, name="fetches")]
        for t in self._fabric_threads:
            t.start()

    # -- counters ----------------------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        with self._lock:
            self.stats.drops[reason] += 1
            self._changed.notify_all()

    # -- §18.3 ----------------------------------------------------------------------------------

    def resources(self) -> dict:
        """The Resources record we advertise (§18.1), fields in table order."""
        return {"cpu_count": 2, "load_1m": 0.25, "memory_total_bytes": 8 * 1024 * MIB,
                "memory_available_bytes": 4 * 1024 * MIB, "disk_total_bytes": 100 * 1024 * MIB,
                "disk_free_bytes": 50 * 1024 * MIB, "gpus": [], "max_wasm_memory_bytes": self.max_wasm_memory_bytes,
                "max_task_wall_time_ms": self.max_task_wall_time_ms}

    def capacity_body(self) -> dict:
        with self._lock:
            running = self._running
        return {"resources": self.resources(), "task_slots": self.task_slots,
                "tasks_running": min(running, 1024), "interval_ms": self.capacity_interval_ms}

    def advertise(self) -> None:
        """Send ``fabric_capacity`` to every alive verified member."""
        body = self.capacity_body()
        with self._lock:
            targets = [m.peer_id for m in self.members.values() if m.state == "alive"]
        for pid in targets:
            try:
                self.send(pid, "fabric_capacity", body)
            except (KeyError, OSError):
                self._drop("unroutable")

    def _advertise_loop(self) -> None:
        known: set[str] = set()
        last = 0.0
        while not self._stop.wait(0.1):
            if not self.advertising.is_set():
                continue
            with self._lock:
                alive = {m.peer_id for m in self.members.values() if m.state == "alive"}
            # a member that turned alive since the last round gets one within a second
            if alive - known or time.monotonic() - last >= self.capacity_interval_ms / 1000:
                self.advertise()
                known, last = alive, time.monotonic()

    # -- dispatch ----------------------------------------------------------------------------

    def _handle(self, env: ip.Envelope, frame: bytes) -> None:
        if not env.kind.startswith("fabric_"):
            return super()._handle(env, frame)
        sender = env.sender_id
        with self._lock:
            member = self.members.get(sender)
        if member is None:
            with self._lock:
                self.stats.ignored[f"{env.kind} from a non-member"] += 1
            return
        try:
            body = decode_fabric(env.kind, env.body)
        except ProtocolError as exc:
            self._drop(exc.reason)
            return
        handler = getattr(self, "_on_" + env.kind[len("fabric_"):])
        try:
            handler(sender, body)
        except ProtocolError as exc:
            self._drop(exc.reason)

    def _on_capacity(self, sender: str, body: dict) -> None:
        with self._lock:
            self.capacities[sender] = dict(body, received_at=time.monotonic())
            self._changed.notify_all()

    # -- §18.4 executing side ---------------------------------------------------------------

    def _reply_result(self, submitter: str, run: dict, outcome: RunOutcome) -> None:
        digest = outcome.digest
        stdout = outcome.stdout if outcome.status == "ok" else b""
        exit_code = outcome.exit_code if outcome.status == "ok" else 0
        if self.lie == "inconsistent" and outcome.status == "ok":
            digest = hashlib.sha256(b"not the digest of this stdout").digest()
        elif self.lie and outcome.status == "ok":
            stdout = b"a lie: " + stdout[:64]
            digest = result_digest(exit_code, stdout)   # consistent, but not what the module said
        body = {"task_id": run["task_id"], "attempt": run["attempt"], "status": outcome.status,
                "exit_code": exit_code, "stdout": stdout, "digest": digest, "reason": outcome.reason,
                "detail": outcome.detail, "fuel_consumed": outcome.fuel_consumed, "elapsed_ms": outcome.elapsed_ms}
        if digest is not None:
            with self._lock:
                self.reported[(submitter, run["task_id"])] = digest
        self.send(submitter, "fabric_task_result", body)
        with self._lock:
            self.sent_results.append(dict(body, submitter=submitter))
            self._changed.notify_all()

    def _refuse(self, submitter: str, run: dict, reason: str, detail: str = "") -> None:
        self._reply_result(submitter, run, RunOutcome("refused", reason=reason, detail=detail))

    def _on_task_run(self, sender: str, run: dict) -> None:
        with self._lock:
            self.runs.append(dict(run, submitter=sender))
            busy = self._running >= self.task_slots * 5
        if busy:
            return self._refuse(sender, run, "busy")
        if run["gpu_indices"]:
            return self._refuse(sender, run, "gpu_unavailable", "this peer has no GPUs")
        if run["memory_bytes"] > self.max_wasm_memory_bytes or run["wall_time_ms"] > self.max_task_wall_time_ms:
            return self._refuse(sender, run, "over_capacity")
        with self._lock:
            self._running += 1
            wasm = self.modules.get(run["module_sha256"])
            if wasm is None:
                key = (run["module_sha256"], sender)
                fetch = self.fetches.get(key)
                first = fetch is None
                if first:
                    fetch = self.fetches[key] = Fetch(run["module_sha256"], sender,
                                                      deadline=time.monotonic() + CHUNK_TIMEOUT_S)
                fetch.waiters.append(run)
        if wasm is not None:
            self._start(sender, run, wasm)
        elif first:
            self.send(sender, "fabric_module_request",
                      {"module_sha256": run["module_sha256"], "offset": 0, "max_chunk_bytes": MAX_CHUNK_BYTES})

    def _start(self, submitter: str, run: dict, wasm: bytes) -> None:
        def work() -> None:
            try:
                outcome = self.sandbox.run_task(wasm, run["input"], run["fuel"], run["memory_bytes"],
                                                run["wall_time_ms"])
            except Exception as exc:  # the host failed outside the task
                outcome = RunOutcome("refused", reason="internal_error", detail=str(exc)[:256])
            with self._lock:
                self._running -= 1
            try:
                self._reply_result(submitter, run, outcome)
            except (KeyError, OSError):
                self._drop("unroutable")
        threading.Thread(target=work, daemon=True, name=f"task-{run['task_id']}").start()

    def _on_task_cancel(self, sender: str, body: dict) -> None:
        pass  # runs start at once here: a started attempt still answers nothing more

    def _on_vote_request(self, sender: str, body: dict) -> None:
        """§18.4 step 6: sign only (a) our own digest for that task from that submitter, (b) a
        ballot naming that submitter and task, (c) epoch 0 here (no consensus log)."""
        ballot, task_id = body["ballot"], body["task_id"]
        with self._lock:
            reported = self.reported.get((sender, task_id))
        m = _PURPOSE_RE.fullmatch(ballot["purpose"])
        if (reported is None or reported != body["digest"] or m is None or m.group(1) != sender
                or m.group(2) != task_id or ballot["epoch"] != 0):
            self._drop("fabric_vote_refused")
            return
        choice = reported if self.vote_choice is None else self.vote_choice
        self.send(sender, "fabric_vote",
                  {"task_id": task_id, "vote": sign_ballot_vote(self.signing_key, self.network_id, ballot, choice)})

    # -- §18.5 both sides ------------------------------------------------------------------

    def _on_module_request(self, sender: str, req: dict) -> None:
        with self._lock:
            self.module_requests_seen.append(dict(req, sender=sender))
            wasm = self.modules.get(req["module_sha256"])
        if wasm is None or req["offset"] > len(wasm):
            # error chunks: offset 0, total_bytes 0 (what the reference sends, whatever was asked)
            chunk = {"module_sha256": req["module_sha256"], "offset": 0, "total_bytes": 0,
                     "data": b"", "error": "not_found" if wasm is None else "bad_offset"}
        else:
            data = wasm[req["offset"]:req["offset"] + req["max_chunk_bytes"]]
            chunk = {"module_sha256": req["module_sha256"], "offset": req["offset"], "total_bytes": len(wasm),
                     "data": data, "error": ""}
        if self.chunk_hook is not None:
            chunk = self.chunk_hook(sender, chunk)
            if chunk is None:
                return
        self.send(sender, "fabric_module_chunk", chunk)
        with self._lock:
            self.module_requests_served += 1
            self._changed.notify_all()

    def _end_fetch(self, fetch: Fetch, reason: str | None) -> None:
        """Answer every waiting attempt (``reason`` None: the module is stored, run them)."""
        with self._lock:
            self.fetches.pop((fetch.sha256_hex, fetch.source), None)
            waiters = list(fetch.waiters)
            if reason is not None:
                self._running -= len(waiters)
        for run in waiters:
            if reason is None:
                self._start(fetch.source, run, self.modules[fetch.sha256_hex])
            elif reason == "module_rejected":
                self._reply_result(fetch.source, run, RunOutcome("error", reason="module_rejected"))
            else:
                self._refuse(fetch.source, run, "module_unavailable", reason)

    def _on_module_chunk(self, sender: str, c: dict) -> None:
        with self._lock:
            fetch = self.fetches.get((c["module_sha256"], sender))
        if fetch is None:
            self._drop("fabric_unexpected_chunk")
            return
        if c["error"]:  # an error chunk carries offset 0 and total_bytes 0 whatever was asked
            self._drop("fabric_module_" + c["error"])
            return self._end_fetch(fetch, c["error"])
        if c["offset"] != fetch.offset:  # a failed check ends the fetch (the reference: malformed)
            self._drop("fabric_malformed")
            return self._end_fetch(fetch, f"chunk at offset {c['offset']}, expected {fetch.offset}")
        if fetch.total_bytes is None:
            fetch.total_bytes = c["total_bytes"]
        if c["total_bytes"] != fetch.total_bytes or not c["data"] and c["offset"] < c["total_bytes"]:
            self._drop("fabric_malformed")
            return self._end_fetch(fetch, "malformed chunk")
        fetch.data += c["data"]
        fetch.offset += len(c["data"])
        if len(fetch.data) >= 8 and fetch.offset == len(fetch.data) and not bytes(fetch.data[:8]) == WASM_MAGIC \
                or fetch.total_bytes < 8:
            self._drop("fabric_module_not_wasm")
            return self._end_fetch(fetch, "module_rejected")
        if fetch.offset < fetch.total_bytes:
            fetch.deadline = time.monotonic() + CHUNK_TIMEOUT_S
            self.send(sender, "fabric_module_request",
                      {"module_sha256": fetch.sha256_hex, "offset": fetch.offset, "max_chunk_bytes": MAX_CHUNK_BYTES})
            return
        wasm = bytes(fetch.data)
        if hashlib.sha256(wasm).hexdigest() != fetch.sha256_hex:
            self._drop("fabric_bad_module_hash")
            return self._end_fetch(fetch, "bad module hash")
        with self._lock:
            self.modules[fetch.sha256_hex] = wasm
        self._end_fetch(fetch, None)

    def _fetch_timeouts(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self._lock:
                expired = [f for f in self.fetches.values() if f.deadline < now]
            for f in expired:
                self._drop("fabric_chunk_timeout")
                self._end_fetch(f, "no chunk within 10 s")

    # -- §18.4 submitting side (a minimal submitter) ----------------------------------------

    def add_module(self, wasm: bytes) -> str:
        sha = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            self.modules[sha] = wasm
        return sha

    def submit(self, task_id: str, wasm: bytes, stdin: bytes, replicas: list[str], *, fuel: int = 10**9,
               memory_bytes: int = 64 * MIB, wall_time_ms: int = 10_000) -> SubmittedTask:
        """Send one ``fabric_task_run`` (attempt 1) to each replica; our own id runs here."""
        sha = self.add_module(wasm)
        task = SubmittedTask(task_id, sha, list(replicas))
        with self._lock:
            self.submitted[task_id] = task
        run = {"task_id": task_id, "attempt": 1, "module_sha256": sha, "input": stdin, "fuel": fuel,
               "memory_bytes": memory_bytes, "wall_time_ms": wall_time_ms, "gpu_indices": []}
        for pid in replicas:
            if pid == self.peer_id:
                o = self.sandbox.run_task(wasm, stdin, fuel, memory_bytes, wall_time_ms)
                with self._lock:
                    task.results[pid] = {"task_id": task_id, "attempt": 1, "status": o.status,
                                         "exit_code": o.exit_code, "stdout": o.stdout, "digest": o.digest,
                                         "reason": o.reason, "detail": o.detail}
                    self.reported[(self.peer_id, task_id)] = o.digest
            else:
                self.send(pid, "fabric_task_run", run)
        return task

    def _on_task_result(self, sender: str, r: dict) -> None:
        with self._lock:
            task = self.submitted.get(r["task_id"])
            if task is None or sender not in task.replicas or sender in task.results or r["attempt"] != 1:
                self.stats.ignored["fabric_task_result not in flight"] += 1
                return
        # §18.4 step 5: recompute the digest
        if r["status"] == "ok":
            expected = result_digest(r["exit_code"], r["stdout"])
        elif r["status"] == "error":
            expected = error_digest(r["reason"])
        else:
            expected = None
        with self._lock:
            task.results[sender] = dict(r, consistent=(expected == r["digest"]))
            self._changed.notify_all()

    def request_votes(self, task: SubmittedTask, rule: str = "majority") -> dict:
        """Build the replica table and ballot (epoch 0) and ask every remote replica to sign."""
        task.table = {p: 1 for p in task.replicas}
        task.ballot = make_ballot(0, task_purpose(self.peer_id, task.task_id, replica_table_hex(task.table)), rule)
        for pid in task.replicas:
            digest = task.results[pid]["digest"]
            if pid == self.peer_id:
                task.votes[pid] = sign_ballot_vote(self.signing_key, self.network_id, task.ballot, digest)
            else:
                self.send(pid, "fabric_vote_request", {"task_id": task.task_id, "ballot": task.ballot,
                                                       "digest": digest})
        return task.ballot

    def _on_vote(self, sender: str, body: dict) -> None:
        vote = body["vote"]
        with self._lock:
            task = self.submitted.get(body["task_id"])
        if vote["voter"] != sender:
            self._drop("malformed")
            return
        if task is None or task.ballot is None or not verify_ballot_vote(self.network_id, task.ballot, vote):
            self._drop("fabric_bad_vote")
            return
        reported = task.results.get(sender, {}).get("digest")
        if vote["choice"] != reported:
            self._drop("vote_not_reported_digest")
            return
        with self._lock:
            task.votes[sender] = vote
            self._changed.notify_all()

    # -- §18.6 ------------------------------------------------------------------------------------

    def send_actor_message(self, peer_id: str, to_name: str, from_name: str, payload: bytes) -> None:
        if not _AGENT_NAME_RE.fullmatch(from_name) or not _AGENT_NAME_RE.fullmatch(to_name):
            raise ValueError("agent names are 1..64 of [a-z0-9_.-]")
        self.send(peer_id, "fabric_actor_message",
                  {"to_name": to_name, "from_address": f"{self.peer_id}/{from_name}", "payload": payload})

    def _on_actor_message(self, sender: str, m: dict) -> None:
        peer, _, _name = m["from_address"].partition("/")
        if peer != sender:
            self._drop("fabric_bad_actor_sender")
            return
        with self._lock:
            box = self.mailboxes.setdefault(m["to_name"], [])
            if len(box) >= 1024:
                self.stats.drops["fabric_actor_undeliverable"] += 1
                return
            box.append((m["from_address"], m["payload"]))
            self._changed.notify_all()

    def close(self) -> None:
        super().close()
        for t in self._fabric_threads:
            t.join(2)
        self.sandbox.close()


def with_custom_section(wasm: bytes, name: str, payload: bytes) -> bytes:
    """Append a custom section (id 0): the same code under another SHA-256."""
    def leb(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)
    content = leb(len(name.encode())) + name.encode() + payload
    return wasm + b"\x00" + leb(len(content)) + content


__all__ = ["FabricPeer", "Sandbox", "RunOutcome", "decode_fabric", "result_digest", "error_digest",
           "make_ballot", "ballot_id_of", "sign_ballot_vote", "verify_ballot_vote", "task_purpose",
           "replica_table_hex", "tally", "verify_task_certificate", "with_custom_section"]
