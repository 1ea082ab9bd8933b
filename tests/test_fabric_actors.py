"""Actor agents: messages between two peers through host functions, hot swap, rollback, history store."""

from __future__ import annotations

import struct
import threading

import pytest

from chimera.fabric.deploy import (
    DeploymentEvent,
    DeploymentManager,
    MemoryDeploymentStore,
    RollbackPolicy,
    current_deployments,
    parse_ref,
)
from chimera.fabric.host import AgentHost
from chimera.fabric.modules import ModuleStore
from chimera.fabric.sandbox import Grants, SandboxEngine
from chimera.node.agent_store import SqliteDeploymentStore
from conftest import wait_until
from fabric_helpers import wasm

PEER_A = "peera"
PEER_B = "peerb"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with SandboxEngine(tmp_path_factory.mktemp("wasm-cache")) as engine:
        yield engine


class Sink:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, sender: str, payload: bytes) -> None:
        with self.lock:
            self.items.append((sender, payload))

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [p for _, p in self.items]


def two_peers(sandbox):
    """Two hosts standing in for two peers; the router callback plays the signed-envelope transport."""
    hosts: dict[str, AgentHost] = {}
    routed = []

    def router_from(origin: str):
        def remote_send(peer: str, name: str, sender: str, payload: bytes) -> bool:
            routed.append((origin, peer, name))
            target = hosts.get(peer)
            return target is not None and target.deliver(name, sender, payload)
        return remote_send

    hosts[PEER_A] = AgentHost(sandbox, peer_id=PEER_A, remote_send=router_from(PEER_A))
    hosts[PEER_B] = AgentHost(sandbox, peer_id=PEER_B, remote_send=router_from(PEER_B))
    return hosts[PEER_A], hosts[PEER_B], routed


def test_actors_on_two_peers_exchange_messages(sandbox):
    a, b, routed = two_peers(sandbox)
    counter = sandbox.compile(wasm("counter"))
    a.start_agent("ping", counter, grants=Grants(clock=True))
    b.start_agent("pong", counter)
    sink = Sink()
    sink_addr = a.add_sink("sink", sink)
    # the exchange: A's agent gets "ping 0 10" as if sent by B's agent; they reply to each other
    assert a.deliver("ping", f"{PEER_B}/pong", b"ping 0 10")
    a.start(workers=1)
    b.start(workers=1)
    try:
        assert wait_until(lambda: any("done 10" in line for line in a.logs("ping") + b.logs("pong")), 30)
        assert a.wait_idle() and b.wait_idle()
        # counts: "ping 0,2,4,6,8,10" handled on A, "ping 1,...,9" + "done 10" on B
        a.send(sink_addr, "ping", b"get")                  # local: A's sink to A's agent
        b.send(sink_addr, f"{PEER_B}/pong", b"get")        # B's agent answers A's sink across the router
        assert wait_until(lambda: len(sink.payloads()) >= 2, 30)
        assert a.info("ping").errors == 0 and b.info("pong").errors == 0
    finally:
        a.close()
        b.close()
    assert sorted(sink.payloads()) == [b"count 6", b"count 6"]
    assert sum(1 for origin, _, _ in routed if origin == PEER_A) >= 5
    assert sum(1 for origin, _, _ in routed if origin == PEER_B) >= 5


def test_send_errors_are_codes_not_crashes(sandbox):
    host = AgentHost(sandbox, peer_id=PEER_A)
    host.start_agent("c", sandbox.compile(wasm("counter")))
    sink = Sink()
    me = host.add_sink("me", sink)
    for target in ("nobody", "otherpeer/x", "a/b/c", "c"):
        host.deliver("c", me, b"fwd " + target.encode() + b" hello")
    host.deliver("c", me, b"unknown-command")
    host.pump()
    codes = [p for p in sink.payloads() if p.startswith(b"fwd-status")]
    assert codes == [b"fwd-status -2", b"fwd-status -2", b"fwd-status -1", b"fwd-status 0"]
    info = host.info("c")
    assert info.errors == 2 and info.crashes == 0  # "hello" (sent to itself) and "unknown-command" are handler errors
    host.close()


def test_wat_actor_computes_vector_stats(sandbox):
    host = AgentHost(sandbox, peer_id=PEER_A)
    host.start_agent("stats", sandbox.compile(wasm("vecstats")))
    sink = Sink()
    me = host.add_sink("me", sink)
    values = [3.5, -1.25, 10.0, 0.0]
    assert host.call("stats", struct.pack(f"<{len(values)}d", *values), sender=me).ok
    assert struct.unpack("<3d", sink.payloads()[-1]) == (sum(values), min(values), max(values))
    assert host.call("stats", b"\x00" * 7, sender=me).reason == "handler_error"
    host.close()


def test_poison_message_dropped_after_two_crashes(sandbox):
    host = AgentHost(sandbox, peer_id=PEER_A)
    host.start_agent("c", sandbox.compile(wasm("counter")))
    sink = Sink()
    me = host.add_sink("me", sink)
    for payload in (b"inc", b"trap", b"inc", b"get"):
        host.deliver("c", me, payload)
    assert host.pump() == 4
    info = host.info("c")
    assert info.crashes == 2 and host.counters["drop_poison"] == 1
    assert sink.payloads() == [b"count 1"]  # restarted instance: state after the crash is fresh
    host.close()


def test_mailbox_bounded(sandbox):
    host = AgentHost(sandbox, peer_id=PEER_A, mailbox_size=3)
    host.start_agent("c", sandbox.compile(wasm("counter")))
    assert [host.deliver("c", "x/y", b"inc") for _ in range(5)] == [True, True, True, False, False]
    assert host.counters["drop_mailbox_full"] == 2
    assert not host.deliver("nobody", "x/y", b"inc") and host.counters["drop_unknown_agent"] == 1
    host.close()


def test_mailbox_bounded_in_bytes(sandbox):
    """A mailbox was bounded by count only: 1024 queued messages of 256 KiB (the wire's payload
    limit) held 256 MiB per agent. Queued payload bytes are bounded too; handling a message frees
    its bytes, and stopping the agent frees all of them."""
    host = AgentHost(sandbox, peer_id=PEER_A, mailbox_max_bytes=10_000)
    host.start_agent("c", sandbox.compile(wasm("counter")))
    big = b"inc" + b" " * 3997  # 4000 bytes
    assert [host.deliver("c", "x/y", big) for _ in range(3)] == [True, True, False]
    assert host.counters["drop_mailbox_bytes"] == 1 and host.counters["drop_mailbox_full"] == 0
    assert host.deliver("c", "x/y", b"inc" + b" " * 1997)  # 2000 more: exactly 10 000 queued
    assert not host.deliver("c", "x/y", b"i")
    assert host.pump("c") == 3  # handled: their bytes are free again
    assert [host.deliver("c", "x/y", big) for _ in range(3)] == [True, True, False]
    assert host.stop_agent("c") == 2
    host.start_agent("c", sandbox.compile(wasm("counter")))
    assert host.deliver("c", "x/y", big)
    with pytest.raises(ValueError):
        AgentHost(sandbox, mailbox_max_bytes=0)
    host.close()


def manager_for(sandbox, tmp_path, store=None, policy=None):
    host = AgentHost(sandbox, peer_id=PEER_A, mailbox_size=100_000)
    modules = ModuleStore(tmp_path / "modules")
    manager = DeploymentManager(sandbox, modules, host, store or MemoryDeploymentStore(),
                                policy=policy or RollbackPolicy(window=20, min_samples=10, max_error_rate=0.5),
                                clock_ms=lambda: 1_700_000_000_000)
    return host, manager


def test_hot_swap_under_load_loses_no_message(sandbox, tmp_path):
    host, manager = manager_for(sandbox, tmp_path)
    manager.deploy("echo@1", wasm("counter"))
    sink = Sink()
    me = host.add_sink("me", sink)
    total = 600
    host.start(workers=2)
    sent = []

    def produce():
        for i in range(total):
            while not host.deliver("echo", me, b"echo %d" % i):
                pass  # never happens with this mailbox size; a refusal would be retried, not lost
            sent.append(i)

    producer = threading.Thread(target=produce)
    producer.start()
    assert wait_until(lambda: len(sink.payloads()) >= 50, 30)
    manager.upgrade("echo@2", wasm("counter_v2"))  # swap while messages are queued and arriving
    producer.join(30)
    assert wait_until(lambda: len(sink.payloads()) >= total, 60)
    host.wait_idle()
    host.close()
    got = sorted(int(p.split()[0]) for p in sink.payloads())
    assert got == list(range(total))  # every message handled exactly once, none lost
    assert manager.get("echo").version == "2"
    assert [e.action for e in manager.history("echo")] == ["deploy", "upgrade"]


def test_bad_version_rolled_back_automatically(sandbox, tmp_path):
    events = []
    host, manager = manager_for(sandbox, tmp_path)
    manager.on_event = events.append
    manager.deploy("svc@1.0", wasm("counter"))
    manager.upgrade("svc@2.0", wasm("counter_broken"))  # traps on every "inc"
    sink = Sink()
    me = host.add_sink("me", sink)
    for _ in range(40):
        host.deliver("svc", me, b"inc")
    host.start(workers=1)
    assert wait_until(lambda: manager.get("svc").version == "1.0", 30)
    host.deliver("svc", me, b"get")
    assert wait_until(lambda: any(p.startswith(b"count ") for p in sink.payloads()), 30)
    host.close()
    actions = [e.action for e in manager.history("svc")]
    assert actions == ["deploy", "upgrade", "auto_rollback"]
    assert "error rate" in manager.history("svc")[-1].reason
    assert events[-1].action == "auto_rollback"
    # the messages after the rollback ran on the good version
    assert [p for p in sink.payloads() if p.startswith(b"count")][0].startswith(b"count ")
    assert not [p for p in sink.payloads() if p.startswith(b"count v2")]


def test_task_agent_deploy_and_manual_rollback(sandbox, tmp_path):
    host, manager = manager_for(sandbox, tmp_path)
    manager.deploy("wf@1", wasm("wordfreq"), kind="task")
    assert manager.run_task("wf", b"a b a").stdout == b"2 a\n1 b\n"
    sha_v1 = manager.get("wf").module_sha256
    manager.upgrade("wf@2", wasm("hostile_read_env"))
    assert manager.run_task("wf", b"").stdout == b"env count 0\n"
    manager.rollback("wf")
    assert manager.get("wf").module_sha256 == sha_v1 and manager.get("wf").version == "1"
    manager.remove("wf")
    assert "wf" not in manager.current()
    with pytest.raises(ValueError):
        parse_ref("Bad Name@1")
    host.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_deployment_store_conformance(kind, tmp_path, sandbox):
    store = MemoryDeploymentStore() if kind == "memory" else SqliteDeploymentStore(tmp_path / "agents.sqlite3")
    sha = "ab" * 32
    first = store.append(DeploymentEvent(name="a", version="1", action="deploy", kind="actor", module_sha256=sha,
                                         at_ms=5))
    store.append(DeploymentEvent(name="b", version="1", action="deploy", kind="task", module_sha256=sha, at_ms=6))
    store.append(DeploymentEvent(name="a", version="2", action="upgrade", kind="actor", module_sha256="cd" * 32,
                                 at_ms=7))
    last = store.append(DeploymentEvent(name="a", version="1", action="auto_rollback", kind="actor",
                                        module_sha256=sha, at_ms=8, reason="error rate 0.90"))
    assert first.seq == 1 and last.seq == 4
    assert [e.seq for e in store.events()] == [1, 2, 3, 4]
    assert [e.version for e in store.events("a")] == ["1", "2", "1"]
    state = current_deployments(store.events())
    assert state["a"].version == "1" and state["a"].previous is None and state["b"].kind == "task"
    if kind == "sqlite":
        store.close()
        reopened = SqliteDeploymentStore(tmp_path / "agents.sqlite3")
        assert reopened.events() == store_events_snapshot(reopened)
        assert [e.describe() for e in reopened.events()][-1].startswith("#4 auto_rollback actor a@1")
        # a restarted node redeploys what its history says
        host, manager = manager_for(sandbox, tmp_path, store=reopened)
        modules = manager.modules
        sha_counter = modules.put(wasm("counter"))
        reopened.append(DeploymentEvent(name="c", version="9", action="deploy", kind="actor",
                                        module_sha256=sha_counter, at_ms=9))
        manager.remove("a")
        manager.remove("b")
        assert manager.restore() == ["c@9"] and host.version("c") == "9"
        host.close()
        reopened.close()


def store_events_snapshot(store):
    return list(store.events())
