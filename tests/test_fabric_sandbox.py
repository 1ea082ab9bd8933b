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
