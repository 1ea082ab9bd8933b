"""Wire messages of the execution fabric (pure: no I/O, no clock), handled by the ``fabric`` actor.

Every message travels in a signed envelope (docs/PROTOCOL.md); the envelope
limit is 1 MiB by default, so every field here is bounded to fit with room to
spare. The protocol (who sends what when) is in docs/PROTOCOL.md §18:

* **Capacity** (:class:`FabricCapacity`): every ``fabric_capacity_interval_s``
  a peer tells each alive member what it can offer (a
  :class:`~chimera.fabric.resources.Resources` record plus its task slots).
* **Tasks**: the submitting peer's placement core sends :class:`FabricTaskRun`
  to each chosen replica; the replica answers :class:`FabricTaskResult`
  (``status`` ``ok``: ran, ``error``: a deterministic failure that is a result
  too, ``refused``: did not run). Once every replica has reported, the
  submitter asks each one to sign its own digest (:class:`FabricVoteRequest`
  carrying the :class:`~chimera.consensus.votes.Ballot`) and collects the
  :class:`FabricVote` replies into a vote certificate.
  :class:`FabricTaskCancel` withdraws an attempt.
* **Modules** (``.wasm`` bytes named by SHA-256, up to 16 MiB): a peer that
  lacks one asks the peer that named it, chunk by chunk
  (:class:`FabricModuleRequest` / :class:`FabricModuleChunk`, at most
  :data:`CHUNK_BYTES` each, in order); :class:`ModuleAssembler` checks
  offsets and the total and verifies the SHA-256 of the whole module at the end.
* **Actor messages** (:class:`FabricActorMessage`): an agent's
  ``chimera.send`` to an agent on another peer.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from chimera.consensus.votes import Ballot, BallotVote
from chimera.protocol.errors import MalformedError
from chimera.protocol.messages import Len, MaxItems, MaxLen, Range, message

from .modules import DEFAULT_MAX_MODULE_BYTES, ModuleIntegrityError, ModuleTooLarge
from .resources import MAX_GPUS, Resources

FABRIC_ACTOR = "fabric"
CHUNK_BYTES = 512 << 10            #: largest module chunk on the wire (bytes)
MIN_CHUNK_BYTES = 4 << 10          #: smallest chunk a fetcher may ask for
MAX_MODULE_BYTES = DEFAULT_MAX_MODULE_BYTES  #: 16 MiB
MAX_TASK_INPUT_BYTES = 512 << 10   #: task stdin carried in a FabricTaskRun
MAX_TASK_OUTPUT_BYTES = 512 << 10  #: task stdout carried back in a FabricTaskResult
MAX_ACTOR_PAYLOAD_BYTES = 256 << 10
MAX_TASK_ID_CHARS = 64
MAX_ADDRESS_CHARS = 160
RESULT_STATUSES = ("ok", "error", "refused")
U63 = 2**63 - 1

Sha256Hex = Annotated[str, MaxLen(64)]
TaskId = Annotated[str, MaxLen(MAX_TASK_ID_CHARS)]
Attempt = Annotated[int, Range(1, 2**31 - 1)]


def _check_sha(value: str) -> None:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("module_sha256 must be 64 lowercase hex characters")


def _check_task_id(value: str) -> None:
    if not 1 <= len(value) <= MAX_TASK_ID_CHARS or not all(c.isascii() and c.isprintable() and c != " "
                                                           for c in value):
        raise ValueError(f"task_id must be 1..{MAX_TASK_ID_CHARS} printable ASCII characters without spaces")


@message("fabric_capacity", actor=FABRIC_ACTOR)
class FabricCapacity:
    """What the sender can offer now.

    Fields:
        resources: CPU, load, memory, disk, GPUs, per-agent memory cap.
        task_slots: tasks it runs at once at most (1..1024); tasks_running: now (0..1024).
        interval_ms: when the next advertisement is due (receivers forget the
            peer's capacity after three missed intervals).
    """

    resources: Resources
    task_slots: Annotated[int, Range(1, 1024)]
    tasks_running: Annotated[int, Range(0, 1024)]
    interval_ms: Annotated[int, Range(100, 3_600_000)]

    def describe(self) -> str:
        return f"capacity {self.resources.describe()}, {self.tasks_running}/{self.task_slots} tasks"


@message("fabric_task_run", actor=FABRIC_ACTOR)
class FabricTaskRun:
    """Run attempt ``attempt`` of task ``task_id`` (the sender's id space) once.

    Fields:
        module_sha256: hex SHA-256 of the task agent (a WASI command); fetched
            from the sender when the receiver lacks it.
        input: the task's stdin (<= 512 KiB).
        fuel: fuel units (>= 1); memory_bytes: linear memory cap (>= 64 KiB);
        wall_time_ms: epoch deadline of the run (1 ms .. 1 day).
        gpu_indices: GPUs leased to this attempt by the submitter's placement core.
    """

    task_id: TaskId
    attempt: Attempt
    module_sha256: Sha256Hex
    input: Annotated[bytes, MaxLen(MAX_TASK_INPUT_BYTES)]
    fuel: Annotated[int, Range(1, U63)]
    memory_bytes: Annotated[int, Range(65536, 1 << 32)]
    wall_time_ms: Annotated[int, Range(1, 86_400_000)]
    gpu_indices: Annotated[tuple[Annotated[int, Range(0, MAX_GPUS - 1)], ...], MaxItems(MAX_GPUS)] = ()

    def __post_init__(self) -> None:
        _check_task_id(self.task_id)
        _check_sha(self.module_sha256)

    def describe(self) -> str:
        return (f"task-run {self.task_id}#{self.attempt} module {self.module_sha256[:12]} "
                f"input {len(self.input)} B fuel {self.fuel} wall {self.wall_time_ms} ms")


@message("fabric_task_result", actor=FABRIC_ACTOR)
class FabricTaskResult:
    """The outcome of one attempt, sent by the replica to the submitter.

    Fields:
        status: ``ok`` (ran; ``exit_code`` and ``stdout`` are the result),
            ``error`` (a deterministic failure such as ``fuel_exhausted``: a
            result too, ``reason`` names it) or ``refused`` (no result: ``busy``,
            ``gpu_unavailable``, ``over_capacity``, ``module_unavailable``,
            ``internal_error``, ``deadline_exceeded``; how the submitter scores each:
            :data:`~chimera.fabric.placement.REFUSALS_NOT_BLAMED`).
        digest: the result digest the replica will sign, 32 bytes; for ``ok``
            ``result_digest(exit_code, stdout)``, for ``error``
            ``error_digest(reason)`` (both in :mod:`chimera.fabric.sandbox`);
            absent for ``refused``. The submitter recomputes and checks it.
        stdout: <= 512 KiB; fuel_consumed: fuel units; elapsed_ms: wall time of the run.
    """

    task_id: TaskId
    attempt: Attempt
    status: Annotated[str, MaxLen(16)]
    exit_code: Annotated[int, Range(-(2**31), 2**31 - 1)] = 0
    stdout: Annotated[bytes, MaxLen(MAX_TASK_OUTPUT_BYTES)] = b""
    digest: Annotated[bytes, Len(32)] | None = None
    reason: Annotated[str, MaxLen(64)] = ""
    detail: Annotated[str, MaxLen(256)] = ""
    fuel_consumed: Annotated[int, Range(0, U63)] = 0
    elapsed_ms: Annotated[int, Range(0, U63)] = 0

    def __post_init__(self) -> None:
        _check_task_id(self.task_id)
        if self.status not in RESULT_STATUSES:
            raise ValueError(f"status must be one of {RESULT_STATUSES}")
        if (self.digest is None) != (self.status == "refused"):
            raise ValueError("a digest is present exactly when status is ok or error")
        if self.status != "ok" and not self.reason:
            raise ValueError("an error or refusal names its reason")

    def describe(self) -> str:
        what = f"exit {self.exit_code}, {len(self.stdout)} B" if self.status == "ok" else self.reason
        return f"task-result {self.task_id}#{self.attempt} {self.status} ({what})"


@message("fabric_task_cancel", actor=FABRIC_ACTOR)
class FabricTaskCancel:
    """The submitter no longer wants attempt ``attempt`` (timeout, task failed, cancelled)."""

    task_id: TaskId
    attempt: Attempt
    reason: Annotated[str, MaxLen(64)] = ""

    def __post_init__(self) -> None:
        _check_task_id(self.task_id)

    def describe(self) -> str:
        return f"task-cancel {self.task_id}#{self.attempt} {self.reason}"


@message("fabric_vote_request", actor=FABRIC_ACTOR)
class FabricVoteRequest:
    """Sign ``digest`` (the one you reported for ``task_id``) on ``ballot``.

    The ballot's purpose is ``"task <submitter> <task_id> replicas <replica table sha256>"``
    (:func:`~chimera.fabric.placement.task_ballot_purpose`); a replica signs
    only a digest it computed itself for that task from that submitter, on a
    ballot naming exactly that submitter (the envelope sender) and task id
    (:meth:`~chimera.fabric.placement.ExecutedDigests.vote_refusal`).
    """

    task_id: TaskId
    ballot: Ballot
    digest: Annotated[bytes, Len(32)]

    def __post_init__(self) -> None:
        _check_task_id(self.task_id)

    def describe(self) -> str:
        return f"vote-request {self.task_id} {self.digest[:4].hex()} on {self.ballot.describe()}"


@message("fabric_vote", actor=FABRIC_ACTOR)
class FabricVote:
    """A replica's signed vote (:class:`~chimera.consensus.votes.BallotVote`) for ``task_id``."""

    task_id: TaskId
    vote: BallotVote

    def __post_init__(self) -> None:
        _check_task_id(self.task_id)

    def describe(self) -> str:
        return f"vote {self.task_id}: {self.vote.describe()}"


@message("fabric_module_request", actor=FABRIC_ACTOR)
class FabricModuleRequest:
    """Send me the bytes of module ``module_sha256`` from ``offset`` (one chunk of at most
    ``max_chunk_bytes``: a peer with a small envelope limit, e.g. the edge profile, asks for less)."""

    module_sha256: Sha256Hex
    offset: Annotated[int, Range(0, MAX_MODULE_BYTES)]
    max_chunk_bytes: Annotated[int, Range(MIN_CHUNK_BYTES, CHUNK_BYTES)] = CHUNK_BYTES

    def __post_init__(self) -> None:
        _check_sha(self.module_sha256)

    def describe(self) -> str:
        return f"module-request {self.module_sha256[:12]} @{self.offset} <= {self.max_chunk_bytes} B"


@message("fabric_module_chunk", actor=FABRIC_ACTOR)
class FabricModuleChunk:
    """Bytes ``[offset, offset + len(data))`` of a module of ``total_bytes``.

    ``error`` non-empty (``not_found``, ``bad_offset``): the sender cannot
    serve it; ``data`` is then empty.
    """

    module_sha256: Sha256Hex
    offset: Annotated[int, Range(0, MAX_MODULE_BYTES)]
    total_bytes: Annotated[int, Range(0, MAX_MODULE_BYTES)]
    data: Annotated[bytes, MaxLen(CHUNK_BYTES)] = b""
    error: Annotated[str, MaxLen(32)] = ""

    def __post_init__(self) -> None:
        _check_sha(self.module_sha256)
        if self.error and self.data:
            raise ValueError("an error chunk carries no data")
        if self.offset + len(self.data) > self.total_bytes:
            raise ValueError("chunk runs past total_bytes")

    def describe(self) -> str:
        if self.error:
            return f"module-chunk {self.module_sha256[:12]} error {self.error}"
        return f"module-chunk {self.module_sha256[:12]} @{self.offset}+{len(self.data)}/{self.total_bytes}"


@message("fabric_actor_message", actor=FABRIC_ACTOR)
class FabricActorMessage:
    """An agent's message to agent ``to_name`` on the receiving peer.

    ``from_address`` is the sending agent's full address ``peer_id/name``; its
    peer id must be the envelope's sender (checked by the receiver).
    """

    to_name: Annotated[str, MaxLen(64)]
    from_address: Annotated[str, MaxLen(MAX_ADDRESS_CHARS)]
    payload: Annotated[bytes, MaxLen(MAX_ACTOR_PAYLOAD_BYTES)]

    def describe(self) -> str:
        return f"actor-message {self.from_address[:24]} -> {self.to_name} {len(self.payload)} B"


def module_chunks(wasm: bytes, sha256: str) -> list[FabricModuleChunk]:
    """All chunks of ``wasm`` in order (a 0-byte module is one empty chunk)."""
    total = len(wasm)
    return [FabricModuleChunk(module_sha256=sha256, offset=o, total_bytes=total, data=wasm[o:o + CHUNK_BYTES])
            for o in range(0, max(total, 1), CHUNK_BYTES)]


WASM_HEADER = b"\0asm\x01\x00\x00\x00"
"""The first 8 bytes of every binary WebAssembly core module: magic ``\\0asm`` and version 1."""


class NotWebAssembly(ValueError):
    """Fetched bytes that cannot be a WebAssembly core module (they do not start with
    :data:`WASM_HEADER`): every peer's sandbox rejects such a module (``module_rejected``),
    so no more of it needs to travel or be stored."""


class ModuleAssembler:
    """Reassembles one module from in-order chunks and verifies its SHA-256.

    Args:
        sha256: the module's name (64 lowercase hex); max_bytes: size limit.
    :meth:`add` returns the complete, verified bytes once the last chunk is in,
    otherwise None; :attr:`next_offset` is the offset to request next.
    Raises (from :meth:`add`):
        MalformedError: a chunk for another module, out of order, an empty
            non-final chunk, or a total that changes between chunks.
        ModuleTooLarge: the announced total exceeds ``max_bytes``.
        ModuleIntegrityError: the assembled bytes do not hash to ``sha256``.
        NotWebAssembly: the announced total is under 8 bytes or the first bytes are not
            :data:`WASM_HEADER` (checked as soon as they arrive, normally with the first chunk).
    """

    def __init__(self, sha256: str, max_bytes: int = MAX_MODULE_BYTES) -> None:
        _check_sha(sha256)
        self.sha256 = sha256
        self.max_bytes = max_bytes
        self.total: int | None = None
        self.parts: list[bytes] = []
        self.next_offset = 0
        self._hash = hashlib.sha256()

    def add(self, chunk: FabricModuleChunk) -> bytes | None:
        if chunk.module_sha256 != self.sha256:
            raise MalformedError("chunk of another module")
        if chunk.error:
            raise MalformedError(f"peer cannot serve the module: {chunk.error}")
        if chunk.total_bytes > self.max_bytes:
            raise ModuleTooLarge(f"module announced as {chunk.total_bytes} bytes; the limit is {self.max_bytes}")
        if self.total is None:
            self.total = chunk.total_bytes
        elif chunk.total_bytes != self.total:
            raise MalformedError("module total_bytes changed between chunks")
        if chunk.offset != self.next_offset:
            raise MalformedError(f"chunk at offset {chunk.offset}, expected {self.next_offset}")
        if not chunk.data and chunk.offset + len(chunk.data) < self.total:
            raise MalformedError("empty chunk before the end of the module")
        if self.next_offset < len(WASM_HEADER):
            head = (b"".join(self.parts) + chunk.data)[:len(WASM_HEADER)]
            if self.total < len(WASM_HEADER) or not WASM_HEADER.startswith(head):
                raise NotWebAssembly(f"module {self.sha256[:12]} is not valid WebAssembly: it does not start "
                                     f"with the binary module header (\\0asm, version 1)")
        self.parts.append(chunk.data)
        self._hash.update(chunk.data)
        self.next_offset += len(chunk.data)
        if self.next_offset < self.total:
            return None
        if self._hash.hexdigest() != self.sha256:
            raise ModuleIntegrityError(f"fetched module hashes to {self._hash.hexdigest()[:12]}, "
                                       f"not {self.sha256[:12]}")
        return b"".join(self.parts)
