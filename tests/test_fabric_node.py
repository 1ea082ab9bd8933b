"""The fabric inside real nodes (in-process peers on loopback sockets, signed envelopes, admin socket).

* replicas=3 with majority while one peer lies (test hook): the right result is
  accepted with a vote certificate that verifies on its own, and the liar's
  reputation observation is recorded; the peers that lacked the module fetched
  it from the submitter and verified its SHA-256;
* GPU tasks only ever go to the peer with a free (simulated) GPU;
* actor agents on two peers play ping-pong through ``chimera.send``;
* a tampered module chunk is rejected (and, in the pure reassembler, every
  other kind of bad chunk too).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from chimera.consensus.quorum import WeightTable
from chimera.consensus.votes import Ballot, BallotVote, VoteCertificate
from chimera.fabric.modules import ModuleIntegrityError, ModuleTooLarge
from chimera.fabric.placement import TaskRequirements, verify_task_certificate
from chimera.fabric.wire import (
    CHUNK_BYTES,
    FabricModuleChunk,
    FabricTaskCancel,
    FabricTaskResult,
    FabricTaskRun,
    FabricVote,
    FabricVoteRequest,
    WASM_HEADER,
    ModuleAssembler,
    NotWebAssembly,
    module_chunks,
)
from chimera.node import admin
from chimera.node.config import NodeConfig
from chimera.node.keys import load_or_create_identity
from chimera.protocol.errors import MalformedError
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.messages import decode_fields, encode_fields
from chimera.protocol.network import Network
from conftest import FAST, async_wait_until
from fabric_helpers import reference_wordfreq, wasm

FABRIC_FAST = dict(FAST, fabric_capacity_interval_s=0.3, fabric_probe_gpus=0)
CONSENSUS_FAST = dict(consensus_commit_wait_s=0.05, consensus_propose_timeout_s=1.0,
                      consensus_vote_timeout_s=0.5, consensus_empty_block_interval_s=0.5)
TEXT = b"the quick brown fox jumps over the lazy dog; the dog sleeps, the fox runs. " * 20


def padded(module: bytes, pad_bytes: int) -> bytes:
    """``module`` plus a custom section of ``pad_bytes`` (still valid WebAssembly, another hash),
    so the module travels in several chunks."""
    name = b"chimera-test-padding"
    body = bytes([len(name)]) + name + b"\0" * pad_bytes
    size, leb = len(body), bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        leb.append(byte | (0x80 if size else 0))
        if not size:
            break
    return module + b"\0" + bytes(leb) + body


async def call(node, cmd: str, args: dict | None = None, timeout_s: float = 60.0):
    """The real admin socket, from a thread (the client is blocking)."""
    return await asyncio.to_thread(admin.call, node.data_dir, cmd, args or {}, timeout_s)


async def start_nodes(tmp_path: Path, configs: list[dict], *, genesis: bool) -> list:
    from chimera.node.runtime import Node

    ids = tuple(load_or_create_identity(tmp_path / f"n{i}").peer_id for i in range(len(configs))) if genesis else ()
    net = Network.create("fabric", genesis=ids, epoch_length=1000)
    nodes = []
    try:
        for i, extra in enumerate(configs):
            node = Node(tmp_path / f"n{i}", NodeConfig(**{**FABRIC_FAST, **(CONSENSUS_FAST if genesis else {}),
                                                          **extra}), net)
            await node.start()
            nodes.append(node)
        for node in nodes[1:]:
            node.add_contact_uri(nodes[0].contact_uri, static=True)
            node.run_membership_actions()
        others = {n.peer_id for n in nodes}
        assert await async_wait_until(
            lambda: all(others - {n.peer_id} <= set(n.fabric.capacity) for n in nodes), 60), \
            "capacity advertisements did not reach every peer"
    except BaseException:
        for node in nodes:
            await node.stop()
        raise
    return nodes


async def stop_all(nodes) -> None:
    for node in nodes:
        await node.stop()


async def test_replicas_majority_accepts_right_result_with_certificate(tmp_path):
    # peer 1 has the edge profile's 256 KiB envelope limit: it asks for smaller module chunks
    nodes = await start_nodes(tmp_path, [{}, {"max_message_bytes": 256 << 10}, {"fabric_test_wrong_results": True}],
                              genesis=True)
    try:
        liar = nodes[2].peer_id
        module = padded(wasm("wordfreq"), 2 * CHUNK_BYTES + 1000)  # three chunks on the wire
        sha = hashlib.sha256(module).hexdigest()
        assert not nodes[1].fabric.modules.has(sha) and not nodes[2].fabric.modules.has(sha)
        res = await call(nodes[0], "tasks_submit", {"module": module, "input": TEXT, "replicas": 3,
                                                    "rule": "majority", "fuel": 200_000_000, "wait": True,
                                                    "wait_s": 60})
        assert res["state"] == "accepted", res
        assert {d["peer_id"] for d in res["placement"]} == {n.peer_id for n in nodes}
        assert res["result"]["stdout"].encode() == reference_wordfreq(TEXT)
        cert_doc = res["certificate"]
        assert cert_doc["disagreeing"] == [liar] and len(cert_doc["agreeing"]) == 2
        # the certificate stands on its own: decode it and check it against the replica table
        cert = decode_fields(VoteCertificate, msgpack.unpackb(bytes.fromhex(cert_doc["encoded_hex"]), raw=False))
        table = WeightTable(cert_doc["replica_table"]["epoch"], cert_doc["replica_table"]["weights"])
        verify_task_certificate(cert, table, nodes[0].network.network_id, res["task_id"], submitter=nodes[0].peer_id)
        assert set(cert.voters()) <= set(cert_doc["agreeing"]) and liar not in cert.voters()
        assert cert.choice.hex() == res["result"]["digest"]
        # the liar's reputation observation went into the node's reputation (consensus LocalReputation)
        kinds = {(o["peer_id"], o["kind"]) for o in res["observations"]}
        assert (liar, "task_disagree") in kinds
        assert all((p, "task_agree") in kinds for p in cert_doc["agreeing"])
        rep = {r["peer_id"]: r for r in (await call(nodes[0], "reputation"))["peers"]}
        honest = next(p for p in cert_doc["agreeing"] if p != nodes[0].peer_id)
        assert rep[liar]["evidence_negative"] > 0 and rep[liar]["local_score"] < rep[honest]["local_score"]
        # the two other peers fetched the module from the submitter and verified its hash
        for node in nodes[1:]:
            assert node.fabric.modules.has(sha)
            assert node.counters["fabric_modules_fetched"] == 1
        edge_chunk = (256 << 10) - (16 << 10)
        assert nodes[0].counters["fabric_module_chunks_served"] == 3 + -(-len(module) // edge_chunk)
        kinds = [e["kind"] for e in nodes[0].events]
        assert kinds.count("task_dispatched") == 3 and "task_completed" in kinds
        status = await call(nodes[0], "tasks_status", {"task_id": res["task_id"]})
        assert status["state"] == "accepted"
        assert {m["sha256"] for m in (await call(nodes[1], "modules_list"))["modules"]} == {sha}
    finally:
        await stop_all(nodes)


async def test_gpu_tasks_only_placed_on_peer_with_free_gpu_and_actors_talk_across_peers(tmp_path):
    nodes = await start_nodes(tmp_path, [{}, {"fabric_probe_gpus": 1}, {}], genesis=False)
    try:
        gpu_peer = nodes[1].peer_id
        module = wasm("wordfreq")
        first = await call(nodes[0], "tasks_submit", {"module": module, "input": b"gpu 0", "gpus": 1})
        sha = first["module_sha256"]
        more = [await call(nodes[0], "tasks_submit", {"sha256": sha, "input": f"gpu {k}".encode(), "gpus": 1})
                for k in range(1, 4)]
        ids = [first["task_id"]] + [m["task_id"] for m in more]

        def done() -> bool:
            return all(nodes[0].fabric.tasks[t].state != "running" for t in ids)

        assert await async_wait_until(done, 60)
        for t in ids:
            view = await call(nodes[0], "tasks_status", {"task_id": t})
            assert view["state"] == "accepted", view
            assert [d["peer_id"] for d in view["placement"]] == [gpu_peer]
            assert view["placement"][0]["gpus"] == [0]
        # one GPU: never two attempts holding it at once (the executing peer's own lease table agrees)
        assert nodes[1].counters["fabric_refused_gpu_unavailable"] == 0
        gauges = {f.name: f for f in nodes[1].fabric.metric_families()}  # exported to Prometheus
        assert gauges["chimera_fabric_gpus"].samples[0].value == 1
        assert gauges["chimera_fabric_gpu_memory_total_bytes"].samples[0].labels == {"gpu": "0"}
        two = await call(nodes[0], "tasks_submit", {"sha256": sha, "input": b"x", "gpus": 2, "wait": True})
        assert two["state"] == "failed" and two["failure"]["reason"] == "unsatisfiable"
        assert not two["placement"]

        # actor agents on two peers exchange messages through chimera.send (signed envelopes between peers)
        counter = wasm("counter")
        await call(nodes[0], "agents_deploy", {"ref": "ping@1", "module": counter, "kind": "actor"})
        await call(nodes[2], "agents_deploy", {"ref": "pong@1", "module": counter, "kind": "actor"})
        target = f"{nodes[2].peer_id}/pong"
        res = await call(nodes[0], "agents_call", {"name": "ping", "input": f"fwd {target} ping 0 10".encode()})
        assert res["ok"] and res["replies"] == ["fwd-status 0"], res

        async def logs(node, name):
            rows = {r["name"]: r for r in (await call(node, "agents_list"))["agents"]}
            return rows[name]

        async def finished() -> bool:
            return any("done 10" in line for line in (await logs(nodes[0], "ping"))["logs"]
                       + (await logs(nodes[2], "pong"))["logs"])

        for _ in range(300):
            if await finished():
                break
            await asyncio.sleep(0.1)
        assert await finished()
        ping, pong = await logs(nodes[0], "ping"), await logs(nodes[2], "pong")
        assert ping["handled"] >= 6 and pong["handled"] >= 5  # "fwd" + pings 1,3,5,7,9 / pings 0,2,4,6,8 + done
        assert nodes[0].counters["fabric_actor_messages_sent"] >= 5
        assert nodes[2].counters["fabric_actor_messages_received"] >= 5
        got = await call(nodes[2], "agents_call", {"name": "pong", "input": b"get"})
        assert got["replies"] and got["replies"][0].startswith("count ")
    finally:
        await stop_all(nodes)


async def test_tampered_module_chunk_is_rejected(tmp_path):
    nodes = await start_nodes(tmp_path, [{"fabric_test_tamper_chunks": True}, {}], genesis=False)
    try:
        module = wasm("wordfreq")
        sha = hashlib.sha256(module).hexdigest()
        res = await call(nodes[0], "tasks_submit", {"module": module, "input": TEXT, "replicas": 2, "wait": True})
        assert res["state"] == "failed"
        refusal = next(r for r in res["results"] if r["peer_id"] == nodes[1].peer_id)
        assert refusal["status"] == "refused" and refusal["reason"] == "module_unavailable"
        assert "bad_module_hash" in refusal["detail"]
        assert nodes[1].counters["drop_fabric_bad_module_hash"] == 1
        assert not nodes[1].fabric.modules.has(sha)
    finally:
        await stop_all(nodes)


async def test_deployed_actor_survives_a_restart(node_factory):
    cfg = NodeConfig(**FABRIC_FAST)
    node = await node_factory("r", cfg)
    await call(node, "agents_deploy", {"ref": "ctr@1", "module": wasm("counter"), "kind": "actor"})
    await call(node, "agents_upgrade", {"ref": "ctr@2", "module": wasm("counter_v2")})
    await node.stop()
    again = await node_factory("r", cfg)  # same data dir: the history is replayed at start
    assert await async_wait_until(lambda: again.fabric._runtime is not None, 60)
    res = await call(again, "agents_call", {"name": "ctr", "input": b"get"})
    assert res["version"] == "2" and res["replies"] == ["count v2 0"]
    assert [e["action"] for e in (await call(again, "agents_list"))["history"]] == ["deploy", "upgrade"]
    assert any(e["kind"] == "agent_swapped" for e in node.events)


async def test_an_agent_that_cannot_be_restored_is_listed_failed_and_the_others_run(node_factory):
    cfg = NodeConfig(**FABRIC_FAST)
    node = await node_factory("rf", cfg)
    await call(node, "agents_deploy", {"ref": "a@1", "module": wasm("counter"), "kind": "actor"})
    await call(node, "agents_deploy", {"ref": "b@1", "module": wasm("counter_v2"), "kind": "actor"})
    await node.stop()
    (node.fabric.modules.root / f"{hashlib.sha256(wasm('counter')).hexdigest()}.wasm").unlink()
    again = await node_factory("rf", cfg)
    assert await async_wait_until(lambda: again.fabric._runtime is not None, 60)
    rows = {r["name"]: r for r in (await call(again, "agents_list"))["agents"]}
    assert rows["a"]["state"] == "failed" and rows["a"]["failure"]
    assert rows["b"]["state"] == "running" and rows["b"]["failure"] is None
    assert (await call(again, "agents_call", {"name": "b", "input": b"get"}))["replies"] == ["count v2 0"]
    assert again.counters["fabric_agents_restore_failed"] == 1


async def test_cli_agent_and_task_commands(node_factory, capsys):
    from chimera.node.cli import main
    from fabric_helpers import AGENTS

    node = await node_factory("c", NodeConfig(**FABRIC_FAST))
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    d = str(node.data_dir)

    async def chimera(*argv: str) -> tuple[int, str]:
        code = await asyncio.to_thread(main, [*argv, "--data-dir", d])
        return code, capsys.readouterr().out

    code, out = await chimera("agent", "deploy", "wf@1", str(AGENTS / "wordfreq.wasm"))
    assert code == 0 and out.startswith("deploy wf@1 (task")
    code, out = await chimera("agent", "call", "wf", "--text", "b a b")
    assert code == 0 and out.splitlines()[:2] == ["2 b", "1 a"]
    code, out = await chimera("task", "submit", str(AGENTS / "wordfreq.wasm"), "--text", "x y x", "--wait", "--json")
    doc = json.loads(out)["result"]
    assert code == 0 and doc["state"] == "accepted" and doc["result"]["stdout"] == "2 x\n1 y\n"
    code, out = await chimera("task", "status", doc["task_id"])
    assert code == 0 and "accepted" in out.splitlines()[0]
    code, out = await chimera("agent", "list")
    assert code == 0 and "wf" in out
    code, out = await chimera("agent", "remove", "wf")
    assert code == 0 and out.startswith("remove wf@1")
    code, out = await chimera("events", "--kind", "task_completed,agent_swapped", "--json")
    kinds = {e["kind"] for e in json.loads(out)["result"]}
    assert code == 0 and kinds and kinds <= {"task_completed", "agent_swapped"}
    # the advertised capacity, through the admin API (a remote shell has no local probe)
    res = await asyncio.to_thread(admin.call, node.data_dir, "resources")
    assert res["own"]["cpu_count"] >= 1 and res["own"]["summary"].startswith(f"{res['own']['cpu_count']} cpu")


async def test_agreed_error_is_reported_as_a_failure_not_a_success(tmp_path, capsys):
    """Replicas that agree on a deterministic failure (out of fuel, module rejected) decide the
    task's outcome with a certificate, but the task has failed: state, JSON and CLI say so."""
    from chimera.node.cli import main
    from fabric_helpers import AGENTS

    nodes = await start_nodes(tmp_path, [{}, {}], genesis=False)
    try:
        res = await call(nodes[0], "tasks_submit", {"module": wasm("hostile_loop"), "replicas": 2,
                                                    "fuel": 100_000, "wait": True, "wait_s": 60})
        assert res["state"] == "failed", res
        assert res["failure"] == {"reason": "fuel_exhausted", "detail": res["failure"]["detail"], "agreed": True}
        assert res["result"]["status"] == "error" and res["result"]["reason"] == "fuel_exhausted"
        assert res["result"]["exit_code"] is None and res["result"]["stdout"] == ""
        assert [r["exit_code"] for r in res["results"]] == [None, None]
        # the agreement itself is still certified
        cert_doc = res["certificate"]
        assert sorted(cert_doc["agreeing"]) == sorted(n.peer_id for n in nodes)
        cert = decode_fields(VoteCertificate, msgpack.unpackb(bytes.fromhex(cert_doc["encoded_hex"]), raw=False))
        table = WeightTable(cert_doc["replica_table"]["epoch"], cert_doc["replica_table"]["weights"])
        verify_task_certificate(cert, table, nodes[0].network.network_id, res["task_id"], submitter=nodes[0].peer_id)
        done = [e for e in nodes[0].events if e["kind"] == "task_completed"]
        assert done and done[-1]["state"] == "failed" and done[-1]["reason"] == "fuel_exhausted"

        d = str(nodes[0].data_dir)

        async def chimera(*argv: str, stdout_only: bool = False) -> tuple[int, str]:
            code = await asyncio.to_thread(main, [*argv, "--data-dir", d])
            out = capsys.readouterr()
            return code, out.out if stdout_only else out.out + out.err

        code, out = await chimera("task", "submit", str(AGENTS / "hostile_loop.wasm"), "--fuel", "100000",
                                  "--replicas", "2", "--wait")
        assert code == 1 and "fuel_exhausted" in out and "exit 0" not in out and "accepted" not in out, out
        corrupt = tmp_path / "corrupt.wasm"
        corrupt.write_bytes(b"\xff\xfe\x00 certainly not WebAssembly \x80\x81")
        code, out = await chimera("task", "submit", str(corrupt), "--replicas", "2", "--wait")
        assert code == 1 and "exit 0" not in out, out
        assert "module_rejected" in out and "not valid WebAssembly" in out and "utf-8" not in out, out
        # (--json: one document on stdout; "task ID submitted; waiting" may go to stderr)
        code, out = await chimera("task", "submit", str(corrupt), "--wait", "--json", stdout_only=True)
        doc = json.loads(out)["result"]
        assert code == 1 and doc["state"] == "failed" and doc["failure"]["reason"] == "module_rejected"
        code, out = await chimera("task", "status", doc["task_id"])  # the same verdict later
        assert code == 1 and "failed" in out, out
        code, out = await chimera("agent", "deploy", "bad@1", str(corrupt))
        assert code == 1 and "not valid WebAssembly" in out and "utf-8" not in out, out
        # a success is still a success
        code, out = await chimera("task", "submit", str(AGENTS / "wordfreq.wasm"), "--text", "a b a",
                                  "--replicas", "2", "--wait")
        assert code == 0 and "accepted digest" in out and "(exit 0)" in out and "2 a" in out, out
    finally:
        await stop_all(nodes)


async def test_upgrade_runs_the_deploy_checks_of_the_agents_kind(node_factory):
    node = await node_factory("u", NodeConfig(**FABRIC_FAST))
    await call(node, "agents_deploy", {"ref": "wf@1", "module": wasm("wordfreq"), "kind": "task"})
    with pytest.raises(admin.AdminError) as refused:  # an actor module has no _start: refused as by deploy
        await call(node, "agents_upgrade", {"ref": "wf@2", "module": wasm("counter")})
    assert refused.value.code == admin.EXIT_FAIL and "_start" in str(refused.value)
    with pytest.raises(admin.AdminError, match="_start"):
        await call(node, "agents_deploy", {"ref": "ctr@1", "module": wasm("counter"), "kind": "task"})
    # the old version keeps serving, and the history has no upgrade
    res = await call(node, "agents_call", {"name": "wf", "input": b"b a b"})
    assert res["version"] == "1" and res["exit_code"] == 0 and res["stdout"] == "2 b\n1 a\n"
    listing = await call(node, "agents_list")
    assert [(a["name"], a["version"]) for a in listing["agents"]] == [("wf", "1")]
    assert [e["action"] for e in listing["history"]] == ["deploy"]
    # an upgrade that passes the checks still works
    await call(node, "agents_upgrade", {"ref": "wf@2", "module": padded(wasm("wordfreq"), 16)})
    assert (await call(node, "agents_call", {"name": "wf", "input": b"x"}))["version"] == "2"


async def test_locally_deployed_agents_get_the_nodes_memory_cap(node_factory):
    """fabric_max_wasm_memory_bytes (the edge profile's 16 MiB) capped only tasks from other peers:
    an agent deployed on the node got 64 MiB, and the memory bomb grew past the reservation until
    its deadline (deadline_exceeded after 11 s) instead of failing at the cap."""
    cap = 16 << 20
    node = await node_factory("cap", NodeConfig(**FABRIC_FAST, fabric_max_wasm_memory_bytes=cap))
    await call(node, "agents_deploy", {"ref": "bomb@1", "module": wasm("hostile_memory_bomb"), "kind": "task"})
    with pytest.raises(admin.AdminError) as failed:
        await call(node, "agents_call", {"name": "bomb", "input": b""})
    assert failed.value.code == admin.EXIT_FAIL
    assert str(failed.value).startswith("memory_limit: ") and f"of {cap} bytes" in str(failed.value)
    await call(node, "agents_deploy", {"ref": "ctr@1", "module": wasm("counter"), "kind": "actor"})
    rt = node.fabric._runtime
    assert rt.deploy.limits.memory_bytes == cap and rt.host._get("ctr").limits.memory_bytes == cap
    assert rt.host.mailbox_max_bytes == 16 * node.config.max_message_bytes  # queued payload per agent


async def test_agent_admin_errors_are_plain_and_bad_arguments_are_usage_errors(node_factory):
    node = await node_factory("e", NodeConfig(**FABRIC_FAST))
    await call(node, "agents_deploy", {"ref": "wf@1", "module": wasm("wordfreq")})
    for cmd in ("agents_rollback", "agents_remove", "agents_call"):
        with pytest.raises(admin.AdminError) as err:
            await call(node, cmd, {"name": "nope"})
        assert str(err.value) == "agent 'nope' is not deployed" and err.value.code == admin.EXIT_FAIL, cmd
    for cmd, args in (("agents_deploy", {"ref": "Bad Name@1", "module": wasm("wordfreq")}),
                      ("agents_deploy", {"ref": "noversion", "module": wasm("wordfreq")}),
                      ("agents_deploy", {"ref": "ok@bad version", "module": wasm("wordfreq")}),
                      ("agents_deploy", {"ref": "ok@1", "module": wasm("wordfreq"), "kind": "daemon"}),
                      ("agents_upgrade", {"ref": "wf", "module": wasm("wordfreq")}),
                      ("agents_upgrade", {"ref": "w f@2", "module": wasm("wordfreq")}),
                      ("agents_rollback", {"name": "bad name"}), ("agents_remove", {"name": "../x"}),
                      ("agents_call", {"name": "Bad"})):
        with pytest.raises(admin.AdminError) as err:
            await call(node, cmd, args)
        assert err.value.code == admin.EXIT_USAGE, (cmd, args, str(err.value))
        assert "not deployed" not in str(err.value) and not str(err.value).startswith("not found")
    # state conflicts are failures at the node, not usage errors
    with pytest.raises(admin.AdminError) as err:
        await call(node, "agents_deploy", {"ref": "wf@9", "module": wasm("wordfreq")})
    assert err.value.code == admin.EXIT_FAIL and "deployed already" in str(err.value)
    with pytest.raises(admin.AdminError) as err:
        await call(node, "agents_rollback", {"name": "wf"})
    assert err.value.code == admin.EXIT_FAIL and "no previous version" in str(err.value)


async def test_tasks_status_honours_its_limit(node_factory):
    node = await node_factory("l", NodeConfig(**FABRIC_FAST))
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    first = await call(node, "tasks_submit", {"module": wasm("wordfreq"), "input": b"a", "wait": True})
    for k in range(3):
        res = await call(node, "tasks_submit", {"sha256": first["module_sha256"], "input": b"b %d" % k,
                                                "wait": True})
        assert res["state"] == "accepted"
    every = await call(node, "tasks_status", {})
    assert len(every["tasks"]) == 4 and len(every["observations"]) == 4
    for limit in (1, 2):
        res = await call(node, "tasks_status", {"limit": limit})
        assert len(res["tasks"]) == limit and len(res["observations"]) == limit
        assert res["tasks"][-1]["task_id"] == res["observations"][-1]["task_id"] == every["tasks"][-1]["task_id"]


async def test_a_threshold_the_rule_does_not_allow_is_a_usage_error_and_nothing_is_stored(node_factory):
    node = await node_factory("th", NodeConfig(**FABRIC_FAST))
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    for rule, threshold in (("majority", "1/3"), ("weighted", "1"), ("quorum", 1), ("unanimous", "1/2"),
                            ("quorum", "0.5/1")):
        with pytest.raises(admin.AdminError) as err:
            await call(node, "tasks_submit", {"module": wasm("wordfreq"), "input": b"a b", "rule": rule,
                                              "threshold": threshold})
        assert err.value.code == admin.EXIT_USAGE, (rule, threshold, str(err.value))
    assert (await call(node, "tasks_status", {}))["tasks"] == []
    assert (await call(node, "modules_list", {}))["modules"] == []  # checked before the module was stored
    ok = await call(node, "tasks_submit", {"module": wasm("wordfreq"), "input": b"a b a", "rule": "unanimous",
                                           "threshold": "1", "wait": True, "wait_s": 30})
    assert ok["state"] == "accepted" and ok["certificate"]["threshold"] == "1"


async def test_a_burst_on_a_one_slot_peer_waits_at_the_submitter_and_all_are_accepted(node_factory):
    """More tasks than the peer holds (1 slot + 4 queued): placement waits for its free slot
    instead of over-dispatching (was: 3 of 8 refused ``busy``, scored ``task_disagree``)."""
    node = await node_factory("burst", NodeConfig(**FABRIC_FAST, fabric_task_slots=1))
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    sha = (await call(node, "tasks_submit", {"module": wasm("wordfreq"), "input": b"x", "wait": True}))[
        "module_sha256"]
    req = TaskRequirements(fuel=10**9, memory_bytes=16 << 20, wall_time_s=10.0)
    ids = [node.fabric.submit(sha, b"a b %d" % k, req) for k in range(8)]  # at once: no await between them
    assert await async_wait_until(lambda: all(node.fabric.tasks[t].state != "running" for t in ids), 60)
    states = [node.fabric.tasks[t].state for t in ids]
    assert states == ["accepted"] * 8, [node.fabric.tasks[t].failure for t in ids]
    assert node.counters["fabric_refused_busy"] == 0
    assert not [o for o in node.fabric.observations if o["kind"] != "task_agree"]


async def test_a_peer_advertising_slots_it_does_not_honour_gets_what_it_takes(tmp_path):
    """The liar advertises 16 task slots and holds 5 places (1 slot, 4 queued; one submitter gets 4
    of them): after each advertisement the submitter sent it up to 16 attempts, the rest refused
    ``busy``. Now the submitter trusts it with the places it held when it refused (PROTOCOL.md
    §18.4 step 2), shown in tasks_status and the resources view."""
    nodes = await start_nodes(tmp_path, [{"fabric_task_slots": 1},
                                         {"fabric_task_slots": 1, "fabric_test_advertise_slots": 16}],
                              genesis=False)
    try:
        submitter, liar = nodes
        assert await async_wait_until(lambda: submitter.fabric.placement.free_slots(liar.peer_id) == 16, 30)
        sha = await asyncio.to_thread(submitter.fabric.modules.put, wasm("wordfreq"))
        req = TaskRequirements(fuel=10**9, memory_bytes=16 << 20, wall_time_s=10.0)
        ids = [submitter.fabric.submit(sha, b"a b %d" % k, req) for k in range(12)]  # one burst
        assert await async_wait_until(lambda: all(submitter.fabric.tasks[t].state != "running" for t in ids), 60)
        assert [submitter.fabric.tasks[t].state for t in ids] == ["accepted"] * 12, \
            [submitter.fabric.tasks[t].failure for t in ids]
        status = (await call(submitter, "tasks_status", {"limit": 1}))["fabric"]
        assert status["slots_unhonoured"] >= 1 and liar.counters["fabric_refused_busy"] >= 1
        assert status["slots_distrusted"][liar.peer_id]["advertised"] == 16
        assert status["slots_distrusted"][liar.peer_id]["trusted"] <= 5  # the places it really has
        peers = (await call(submitter, "resources"))["peers"]
        assert peers[liar.peer_id]["task_slots_trusted"] <= 5
        assert not [o for o in submitter.fabric.observations if o["kind"] != "task_agree"]  # no blame
    finally:
        await stop_all(nodes)


async def test_an_attempt_cancelled_while_it_waits_for_a_slot_is_never_run(node_factory):
    """PROTOCOL.md 18.2: the replica drops an attempt that has not started (was: run anyway)."""
    node = await node_factory("cq", NodeConfig(**FABRIC_FAST, fabric_task_slots=1))
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    svc = node.fabric
    sha = await asyncio.to_thread(svc.modules.put, wasm("hostile_loop"))
    started = []
    execute = svc._execute
    svc._execute = lambda msg, cancel=None: (started.append(msg.task_id), execute(msg, cancel))[1]
    submitter = "peer-that-is-not-here"  # its results are sent nowhere
    for task_id in ("first", "second"):
        svc._on_task_run(submitter, FabricTaskRun(task_id=task_id, attempt=1, module_sha256=sha, input=b"",
                                                  fuel=2**62, memory_bytes=1 << 20, wall_time_ms=1000))
    assert await async_wait_until(lambda: started == ["first"], 30)
    svc.running[(submitter, "second", 1)].cancel.set()  # what fabric_task_cancel does
    assert await async_wait_until(lambda: not svc.running, 30)  # the first ran out of wall time
    assert started == ["first"] and node.counters["fabric_cancelled_before_start"] == 1
    # a cancel that arrives before the run is handed to a worker is dropped the same way
    svc._on_task_run(submitter, FabricTaskRun(task_id="third", attempt=1, module_sha256="0" * 64, input=b"",
                                              fuel=1, memory_bytes=1 << 20, wall_time_ms=1000))
    svc.running[(submitter, "third", 1)].cancel.set()  # (it waits for its module)
    svc._start_run((submitter, "third", 1))  # the module came
    assert (submitter, "third", 1) not in svc.running and node.counters["fabric_cancelled_before_start"] == 2
    assert started == ["first"]


async def test_an_attempt_cancelled_while_it_runs_is_stopped_and_not_answered(node_factory):
    """PROTOCOL.md 18.2: a ``fabric_task_cancel`` for an attempt in progress stops its sandbox run
    (was: it ran on to its wall time, here 10 minutes, holding the slot); nothing is answered,
    and the freed slot runs the next attempt."""
    from types import SimpleNamespace

    node = await node_factory("cr", NodeConfig(**FABRIC_FAST, fabric_task_slots=1))
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    svc = node.fabric
    sha = await asyncio.to_thread(svc.modules.put, wasm("hostile_loop"))
    submitter = "peer-that-is-not-here"
    replies = []
    svc._reply = lambda to, result: replies.append((to, result))
    svc._on_task_run(submitter, FabricTaskRun(task_id="long", attempt=1, module_sha256=sha, input=b"",
                                              fuel=2**62, memory_bytes=1 << 20, wall_time_ms=600_000))
    assert await async_wait_until(lambda: svc.runtime().sandbox.calls_in_flight == 1, 30)
    await svc.on_envelope(SimpleNamespace(sender=submitter,
                                          message=FabricTaskCancel(task_id="long", attempt=1, reason="test")))
    assert await async_wait_until(lambda: not svc.running, 60), "the cancelled run kept its slot"
    assert node.counters["fabric_cancelled_running"] == 1 and replies == []
    assert svc.runtime().sandbox.calls_in_flight == 0
    # the slot is free: the next attempt runs (and, looping, ends by its own short wall time)
    svc._on_task_run(submitter, FabricTaskRun(task_id="next", attempt=1, module_sha256=sha, input=b"",
                                              fuel=2**62, memory_bytes=1 << 20, wall_time_ms=300))
    assert await async_wait_until(lambda: len(replies) == 1, 60)
    assert replies[0][1].task_id == "next" and replies[0][1].reason == "deadline_exceeded"


async def test_a_task_cancelled_by_its_submitter_ends_cancelled_and_its_replica_stops_running_it(tmp_path, capsys):
    """``tasks_cancel`` / ``chimera task cancel``: a running task (a loop with 10 minutes of wall
    time, placed on the other peer because the submitter's memory cap is below its needs) ends
    ``failed`` with reason ``cancelled``, its end is stored, and the replica stops the run (its
    sandbox has no call in flight; ``fabric_cancelled_running``) instead of running it to its wall
    time. Cancelling it again, or an unknown id, is a clear error."""
    from chimera.node.cli import main

    nodes = await start_nodes(tmp_path, [{"fabric_max_wasm_memory_bytes": 32 << 20}, {}], genesis=False)
    submitter, replica = nodes
    try:
        assert await async_wait_until(lambda: replica.peer_id in submitter.fabric.capacity, 30)
        sub = await call(submitter, "tasks_submit", {"module": wasm("hostile_loop"), "fuel": 2**62,
                                                     "timeout_s": 600})
        task_id = sub["task_id"]
        assert sub["state"] == "running", sub
        assert await async_wait_until(lambda: replica.fabric._runtime is not None
                                      and replica.fabric.runtime().sandbox.calls_in_flight == 1, 60)
        code = await asyncio.to_thread(main, ["task", "cancel", task_id, "--data-dir", str(submitter.data_dir)])
        shown = capsys.readouterr().out
        assert code == 0 and f"task {task_id}  failed" in shown and "cancelled" in shown, shown
        view = await call(submitter, "tasks_status", {"task_id": task_id})
        assert view["state"] == "failed" and view["failure"]["reason"] == "cancelled", view
        assert submitter.counters["fabric_tasks_cancelled"] == 1
        assert await async_wait_until(lambda: replica.fabric.runtime().sandbox.calls_in_flight == 0
                                      and not replica.fabric.running, 60), "the replica kept running it"
        assert replica.counters["fabric_cancelled_running"] == 1
        assert not replica.counters.get("fabric_tasks_refused")  # stopped, not answered
        with pytest.raises(admin.AdminError, match="already ended: failed"):
            await call(submitter, "tasks_cancel", {"task_id": task_id})
        with pytest.raises(admin.AdminError, match="no task 't9-nothere' was submitted here"):
            await call(submitter, "tasks_cancel", {"task_id": "t9-nothere"})
    finally:
        await stop_all(nodes)

    again = await _restarted(submitter)  # the end was stored: it shows the same after a restart
    try:
        assert (await call(again, "tasks_status", {"task_id": task_id}))["failure"]["reason"] == "cancelled"
    finally:
        await again.stop()


async def _restarted(node):
    from chimera.node.runtime import Node

    again = Node(node.data_dir, node.config.replace(port=node.port), node.network)
    await again.start()
    return again


async def test_a_task_that_loops_fails_deadline_exceeded_and_opens_no_breaker(node_factory):
    """A module that loops with fuel to spare runs into its epoch deadline: the replica (here the
    node itself) refuses ``deadline_exceeded``. The task fails with that reason, and the peer's
    breaker stays closed (was: three such tasks opened it; the tasks failed ``retries_exhausted``)."""
    node = await node_factory("loop", NodeConfig(**FABRIC_FAST))
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    for _ in range(3):  # breaker_failures (default 3) reports used to open the breaker
        res = await call(node, "tasks_submit", {"module": wasm("hostile_loop"), "fuel": 2**62, "timeout_s": 0.2,
                                                "wait": True, "wait_s": 30})
        assert res["state"] == "failed", res
        assert res["failure"]["reason"] == "deadline_exceeded" and not res["failure"]["agreed"], res
        assert [r["reason"] for r in res["results"]] == ["deadline_exceeded"]
    assert node.counters["fabric_breaker_opened"] == 0
    assert node.fabric.placement.breaker(node.peer_id).failures == 0
    assert not node.fabric.observations and not [e for e in node.events if e["kind"] == "task_breaker_opened"]


async def test_a_running_task_does_not_stop_older_finished_ones_from_being_evicted(node_factory):
    from chimera.node.fabric import MAX_TASKS_KEPT, _Submitted

    node = await node_factory("ev", NodeConfig(**FABRIC_FAST))
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    svc = node.fabric
    sha = await asyncio.to_thread(svc.modules.put, wasm("wordfreq"))
    req = TaskRequirements(fuel=10**9, memory_bytes=16 << 20, wall_time_s=10.0)
    svc.tasks["stuck"] = _Submitted("stuck", sha, b"", req, 0, 0.0)  # running (the oldest)
    for k in range(MAX_TASKS_KEPT):
        svc.tasks[f"old{k}"] = _Submitted(f"old{k}", sha, b"", req, 0, 0.0, state="accepted")
    new = svc.submit(sha, b"a", req)
    assert len(svc.tasks) == MAX_TASKS_KEPT and "stuck" in svc.tasks and new in svc.tasks
    assert "old0" not in svc.tasks and "old1" not in svc.tasks and "old2" in svc.tasks


def test_idle_node_does_not_load_wasmtime():
    """The fabric imports wasmtime only when the first agent or task runs (idle footprint)."""
    code = ("import sys; import chimera.node.runtime, chimera.node.fabric, chimera.node.cli_fabric; "
            "import chimera.fabric.wire, chimera.fabric.placement, chimera.fabric.probes; "
            "sys.exit('wasmtime' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# ------------------------------------------------------------------ pure wire checks


def test_module_assembler_verifies_hash_and_rejects_bad_chunks():
    wasm_bytes = WASM_HEADER + bytes(range(256)) * ((3 * CHUNK_BYTES) // 256 + 7)
    sha = hashlib.sha256(wasm_bytes).hexdigest()
    chunks = module_chunks(wasm_bytes, sha)
    assert len(chunks) == 4 and all(len(c.data) <= CHUNK_BYTES for c in chunks)
    asm = ModuleAssembler(sha)
    out = [asm.add(c) for c in chunks]
    assert out[:-1] == [None] * 3 and out[-1] == wasm_bytes
    # every chunk survives the strict wire codec
    for c in chunks:
        assert decode_fields(FabricModuleChunk, encode_fields(c)) == c
    tampered = FabricModuleChunk(module_sha256=sha, offset=chunks[1].offset, total_bytes=len(wasm_bytes),
                                 data=bytes([chunks[1].data[0] ^ 0xFF]) + chunks[1].data[1:])
    asm = ModuleAssembler(sha)
    asm.add(chunks[0])
    asm.add(tampered)
    asm.add(chunks[2])
    with pytest.raises(ModuleIntegrityError):
        asm.add(chunks[3])
    asm = ModuleAssembler(sha)
    with pytest.raises(MalformedError):
        asm.add(chunks[1])  # out of order
    with pytest.raises(ModuleTooLarge):
        ModuleAssembler(sha, max_bytes=1024).add(chunks[0])


def test_module_assembler_rejects_what_is_not_webassembly_at_the_first_bytes():
    for blob in (b"\x7fELF" + bytes(5000), b"\0asm\x02\0\0\0" + bytes(5000), b"\0asm\x01\0\0"):
        sha = hashlib.sha256(blob).hexdigest()
        with pytest.raises(NotWebAssembly, match="not valid WebAssembly"):
            ModuleAssembler(sha).add(module_chunks(blob, sha)[0])
    blob = WASM_HEADER + bytes(5000)  # a header split over two chunks is checked as it arrives
    sha = hashlib.sha256(blob).hexdigest()
    asm = ModuleAssembler(sha)
    assert asm.add(FabricModuleChunk(module_sha256=sha, offset=0, total_bytes=len(blob), data=blob[:3])) is None
    assert asm.add(FabricModuleChunk(module_sha256=sha, offset=3, total_bytes=len(blob), data=blob[3:])) == blob
    asm = ModuleAssembler(sha)
    asm.add(FabricModuleChunk(module_sha256=sha, offset=0, total_bytes=len(blob), data=blob[:3]))
    with pytest.raises(NotWebAssembly):
        asm.add(FabricModuleChunk(module_sha256=sha, offset=3, total_bytes=len(blob), data=b"xyz" + blob[6:]))


def test_wire_messages_decode_strictly():
    ok = FabricTaskResult(task_id="t1-ab", attempt=1, status="ok", stdout=b"1 a\n", digest=b"\x01" * 32)
    body = encode_fields(ok)
    assert decode_fields(FabricTaskResult, body) == ok
    for bad in ({**body, "extra": 1}, {**body, "status": "maybe"}, {**body, "digest": None},
                {**body, "attempt": 0}, {**body, "stdout": "text"}, {**body, "exit_code": 2**40}):
        with pytest.raises(MalformedError):
            decode_fields(FabricTaskResult, bad)
    run = encode_fields(FabricTaskRun(task_id="t1", attempt=1, module_sha256="a" * 64, input=b"", fuel=1,
                                      memory_bytes=1 << 20, wall_time_ms=1000))
    for bad in ({**run, "module_sha256": "../" + "a" * 61}, {**run, "input": b"x" * (512 << 10 + 1)},
                {**run, "task_id": "has space"}, {**run, "memory_bytes": 1}):
        with pytest.raises(MalformedError):
            decode_fields(FabricTaskRun, bad)
    # every message naming a task checks its id (1..64 printable ASCII, no spaces)
    cancel = encode_fields(FabricTaskCancel(task_id="t1", attempt=1))
    assert decode_fields(FabricTaskCancel, cancel).task_id == "t1"
    ballot = Ballot.create(epoch=0, purpose="task t1", rule="majority")
    vote = encode_fields(FabricVote(task_id="t1", vote=BallotVote.sign(
        SigningIdentity(bytes(32)), ballot, b"\x01" * 32, network_id=bytes(16))))
    request = encode_fields(FabricVoteRequest(task_id="t1", ballot=ballot, digest=b"\x01" * 32))
    for cls, body in ((FabricTaskCancel, cancel), (FabricVote, vote), (FabricVoteRequest, request)):
        for task_id in ("", "has space", "tab\there", "é", "x" * 65):
            with pytest.raises(MalformedError):
                decode_fields(cls, {**body, "task_id": task_id})


async def test_a_replica_refuses_runs_longer_than_its_fabric_max_task_wall_s(node_factory):
    """Any peer could make a replica run a task for up to a day (the wire's bound), holding a task
    slot that long and making shutdown end it one epoch tick at a time: the node advertises
    ``fabric_max_task_wall_s`` and refuses longer runs ``over_capacity``; its own placement
    finds no peer for a longer task."""
    node = await node_factory("wallcap", NodeConfig(**FABRIC_FAST, fabric_max_task_wall_s=2.0))
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    svc = node.fabric
    assert svc.own.max_task_wall_time_ms == 2000
    sha = await asyncio.to_thread(svc.modules.put, wasm("hostile_loop"))
    submitter = "peer-that-is-not-here"  # its results are sent nowhere
    svc._on_task_run(submitter, FabricTaskRun(task_id="long", attempt=1, module_sha256=sha, input=b"",
                                              fuel=2**62, memory_bytes=1 << 20, wall_time_ms=2001))
    assert node.counters["fabric_refused_over_capacity"] == 1 and not svc.running
    svc._on_task_run(submitter, FabricTaskRun(task_id="fits", attempt=1, module_sha256=sha, input=b"",
                                              fuel=2**62, memory_bytes=1 << 20, wall_time_ms=2000))
    assert (submitter, "fits", 1) in svc.running  # exactly the cap is accepted (it loops until its deadline)
    res = await call(node, "tasks_submit", {"sha256": sha, "timeout_s": 5, "wait": True, "wait_s": 30})
    assert res["state"] == "failed" and res["failure"]["reason"] == "unsatisfiable", res
    assert "wall time" in res["failure"]["detail"]
    assert await async_wait_until(lambda: not svc.running, 30)


async def test_one_submitter_cannot_take_every_place_of_a_replica(node_factory):
    """One member could fill all of a replica's slots and queue (slots x 5) with loops: every
    other submitter got `busy` until they ended. A submitter holds at most 4 places per slot;
    another submitter still gets in."""
    node = await node_factory("share", NodeConfig(**FABRIC_FAST, fabric_task_slots=1))
    assert await async_wait_until(lambda: node.fabric.own is not None, 30)
    svc = node.fabric
    sha = await asyncio.to_thread(svc.modules.put, wasm("hostile_loop"))

    def run(submitter: str, task_id: str) -> FabricTaskRun:
        return FabricTaskRun(task_id=task_id, attempt=1, module_sha256=sha, input=b"", fuel=2**62,
                             memory_bytes=1 << 20, wall_time_ms=1000)

    greedy, other = "peer-greedy-not-here", "peer-other-not-here"  # results are sent nowhere
    for k in range(6):
        svc._on_task_run(greedy, run(greedy, f"g{k}"))
    assert sum(1 for key in svc.running if key[0] == greedy) == 4  # 1 slot x 4: the 5th and 6th refused
    assert node.counters["fabric_refused_busy"] == 2
    svc._on_task_run(other, run(other, "o1"))
    assert (other, "o1", 1) in svc.running
    for key in list(svc.running):
        svc.running[key].cancel.set()
    assert await async_wait_until(lambda: not svc.running, 30)
