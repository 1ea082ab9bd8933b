"""DeploymentManager.restore(): one agent that cannot be restored does not keep the others down."""

from __future__ import annotations

import logging

import pytest

from chimera.fabric.deploy import DeploymentManager, MemoryDeploymentStore
from chimera.fabric.host import AgentHost
from chimera.fabric.modules import ModuleStore
from chimera.fabric.sandbox import SandboxEngine
from fabric_helpers import wasm


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with SandboxEngine(tmp_path_factory.mktemp("wasm-cache")) as engine:
        yield engine


def test_restore_starts_every_agent_it_can_and_reports_the_others(sandbox, tmp_path, caplog):
    modules = ModuleStore(tmp_path / "modules")
    store = MemoryDeploymentStore()
    first = DeploymentManager(sandbox, modules, AgentHost(sandbox), store)
    first.deploy("alpha@1", wasm("counter_v2"), kind="actor")
    first.deploy("beta@1", wasm("counter"), kind="actor")
    first.deploy("gamma@1", wasm("vecstats"), kind="actor")
    first.deploy("wf@1", wasm("wordfreq"), kind="task")
    first.deploy("delta@1", wasm("hostile_read_env"), kind="task")
    first.host.close()
    # alpha's module file is lost, delta's is damaged (the store re-verifies hashes)
    (tmp_path / "modules" / f"{first.get('alpha').module_sha256}.wasm").unlink()
    (tmp_path / "modules" / f"{first.get('delta').module_sha256}.wasm").write_bytes(b"damaged")

    host = AgentHost(sandbox)
    manager = DeploymentManager(sandbox, modules, host, store)
    with caplog.at_level(logging.ERROR, logger="chimera.fabric.deploy"):
        restored = manager.restore()
    assert sorted(restored) == ["beta@1", "gamma@1", "wf@1"]
    assert sorted(a.name for a in host.agents()) == ["beta", "gamma"]
    assert sorted(manager.current()) == ["alpha", "beta", "delta", "gamma", "wf"]  # still deployed
    assert set(manager.restore_failures) == {"alpha", "delta"}
    state, why = manager.state("alpha")
    assert state == "failed" and "not stored" in why and first.get("alpha").module_sha256[:12] in why
    assert manager.state("delta")[0] == "failed"
    assert manager.state("beta") == ("running", "") and manager.state("wf") == ("ready", "")
    assert manager.counters["agents_restore_failed"] == 2 and manager.counters["agents_restored"] == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and any("alpha@1" in r.getMessage() for r in errors)

    # a second restore retries the failed ones only: no second log line, no second count
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="chimera.fabric.deploy"):
        assert manager.restore() == []
    assert not caplog.records and manager.counters["agents_restore_failed"] == 2

    # deploy says why the name is taken; upgrade starts the failed actor afresh, remove forgets one
    with pytest.raises(ValueError, match="not running"):
        manager.deploy("alpha@1", wasm("counter_v2"))
    manager.upgrade("alpha@2", wasm("counter"))
    assert manager.state("alpha") == ("running", "") and host.version("alpha") == "2"
    assert "alpha" not in manager.restore_failures
    manager.remove("delta")
    assert "delta" not in manager.current() and not manager.restore_failures
    host.close()


def test_rollback_starts_an_actor_that_could_not_be_restored(sandbox, tmp_path):
    modules = ModuleStore(tmp_path / "modules")
    store = MemoryDeploymentStore()
    first = DeploymentManager(sandbox, modules, AgentHost(sandbox), store)
    first.deploy("svc@1", wasm("counter"), kind="actor")
    first.upgrade("svc@2", wasm("counter_v2"))
    first.host.close()
    (tmp_path / "modules" / f"{first.get('svc').module_sha256}.wasm").unlink()  # v2 lost

    host = AgentHost(sandbox)
    manager = DeploymentManager(sandbox, modules, host, store)
    assert manager.restore() == [] and manager.state("svc")[0] == "failed"
    manager.rollback("svc")
    assert manager.state("svc") == ("running", "") and host.version("svc") == "1"
    host.close()


# a task module that can never run: run_task refuses chimera imports (they are for actors)
TASK_IMPORTS_CHIMERA = ('(module (import "chimera" "log" (func (param i32 i32))) (memory (export "memory") 1)'
                        ' (func (export "_start")))')


def test_a_task_module_that_can_never_run_is_refused_by_deploy_upgrade_and_restore(sandbox, tmp_path):
    """deploy/upgrade of a task checked only for _start; the chimera-import check was run_task's alone,
    so an upgrade was acknowledged to a version every call of which failed."""
    import wasmtime

    from chimera.fabric.deploy import DeploymentEvent
    from chimera.fabric.sandbox import ModuleRejected

    modules = ModuleStore(tmp_path / "modules")
    manager = DeploymentManager(sandbox, modules, AgentHost(sandbox), MemoryDeploymentStore())
    imports_chimera = wasmtime.wat2wasm(TASK_IMPORTS_CHIMERA)
    refused = ((imports_chimera, "imports chimera host functions"), (wasm("counter"), "does not export _start"))
    for module, why in refused:
        with pytest.raises(ModuleRejected, match=why):
            manager.deploy("t@1", module, kind="task")
    assert manager.current() == {} and manager.history() == []

    manager.deploy("t@1", wasm("wordfreq"), kind="task")
    for module, why in refused:
        with pytest.raises(ModuleRejected, match=why):
            manager.upgrade("t@2", module)
    # the current version keeps serving and the history has no upgrade (PROTOCOL §18.7)
    assert manager.get("t").version == "1" and [e.action for e in manager.history()] == ["deploy"]
    assert manager.run_task("t", b"b a b").stdout == b"2 b\n1 a\n"

    # a history that names such a module (written before this check) is restored as failed
    store = MemoryDeploymentStore()
    store.append(DeploymentEvent(name="old", version="1", action="deploy", kind="task",
                                 module_sha256=modules.put(imports_chimera), at_ms=1))
    restored = DeploymentManager(sandbox, modules, AgentHost(sandbox), store)
    assert restored.restore() == []
    state, why = restored.state("old")
    assert state == "failed" and "ModuleRejected" in why and "chimera" in why


def test_agents_without_their_own_limits_get_the_managers(sandbox, tmp_path):
    """A node passes Limits(memory_bytes=fabric_max_wasm_memory_bytes): its agents used to get the
    64 MiB default whatever the node's cap (an edge node: 16 MiB)."""
    from chimera.fabric.sandbox import Limits, MemoryLimitExceeded

    cap = 4 << 20
    store = MemoryDeploymentStore()
    manager = DeploymentManager(sandbox, ModuleStore(tmp_path / "modules"), AgentHost(sandbox), store,
                                limits=Limits(memory_bytes=cap))
    manager.deploy("bomb@1", wasm("hostile_memory_bomb"), kind="task")
    with pytest.raises(MemoryLimitExceeded, match=f"of {cap} bytes"):
        manager.run_task("bomb", b"")
    manager.deploy("ctr@1", wasm("counter"), kind="actor")
    assert manager.host._get("ctr").limits.memory_bytes == cap
    # after a restart the restored agents get them too
    again = DeploymentManager(sandbox, ModuleStore(tmp_path / "modules"), AgentHost(sandbox), store,
                              limits=Limits(memory_bytes=cap))
    assert sorted(again.restore()) == ["bomb@1", "ctr@1"]
    assert again.host._get("ctr").limits.memory_bytes == cap
    with pytest.raises(MemoryLimitExceeded, match=f"of {cap} bytes"):
        again.run_task("bomb", b"")
    manager.host.close()
    again.host.close()
