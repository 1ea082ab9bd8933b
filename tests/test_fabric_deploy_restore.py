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
