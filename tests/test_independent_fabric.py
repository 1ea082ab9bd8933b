"""Interop: the execution fabric written from docs/PROTOCOL.md §18 and docs/AGENTS.md alone
(tests/independent_fabric.py: the clean-room peer plus wasmtime, no ``chimera`` import)
against two real ``chimera node`` processes on loopback, mDNS off.

The network is made as an operator makes one for the fabric alone: ``chimera network init
--no-local-validator`` (no genesis validators: no consensus log, so §18.4 step 1 gives every
alive member with fresh capacity weight 1), node A started with ``chimera node``, node B
with ``chimera node --join TOKEN`` (the token ``chimera network token`` prints), and the
clean-room peer joining from the same token. Tasks are submitted with ``chimera task submit``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from tests.node_process import NodeProcess
from tests import independent_fabric as fx
from tests import independent_peer as ip
from tests.conftest import wait_until

CLI = [sys.executable, "-m", "chimera.node.cli"]
AGENTS = Path(__file__).resolve().parent.parent / "agents" / "wasm"
WORDFREQ = (AGENTS / "wordfreq.wasm").read_bytes()
TEXT = b"to be or not to be, that is the question"


def _cli(*args: str, timeout_s: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout_s)


class RealNode(NodeProcess):
    """One ``chimera node`` process started by the CLI; admin answers over its local socket."""

    def __init__(self, root: Path, name: str, extra: list[str]) -> None:
        super().__init__(root / name, root / f"{name}.log", extra)

    def call(self, command: str, **args):
        return super().call(command, args or None, timeout_s=30)

    def alive(self, peer_id: str) -> bool:
        return any(r["peer_id"] == peer_id and r["state"] == "alive" for r in self.call("peers"))


class Mesh:
    def __init__(self, a: RealNode, b: RealNode, token: str) -> None:
        self.a, self.b, self.token = a, b, token


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("fabric")
    out = _cli("network", "init", "--data-dir", str(root / "a"), "--name", "fabric", "--no-local-validator")
    assert out.returncode == 0, out.stderr
    a = RealNode(root, "a", [])
    out = _cli("network", "token", "--data-dir", str(a.data_dir))
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    b = RealNode(root, "b", ["--join", token])
    try:
        assert wait_until(lambda: a.alive(b.peer_id) and b.alive(a.peer_id), timeout_s=45), "A and B never met"
        yield Mesh(a, b, token)
    finally:
        codes = [b.stop(), a.stop()]
    assert codes == [0, 0], "a node did not stop cleanly on SIGTERM"


@pytest.fixture(scope="module")
def peer(mesh):
    network = ip.Network.from_token(mesh.token)
    assert network.genesis == (), "network init --no-local-validator: no consensus log"
    p = fx.FabricPeer(network, capacity_interval_ms=1000)
    p.join(network.bootstrap[0])
    try:
        assert p.wait_for(lambda: mesh.a.peer_id in p.members, 30), p.stats
        assert wait_until(lambda: mesh.a.alive(p.peer_id) and mesh.b.alive(p.peer_id), timeout_s=45), \
            "the nodes do not list the clean-room peer as alive"
        # B learns our contact by gossip and greets us; we need it verified to answer it.
        assert p.wait_for(lambda: mesh.b.peer_id in p.members, 30), p.stats
        yield p
    finally:
        p.close()


def _fresh_capacity(node: RealNode, peer: fx.FabricPeer) -> dict | None:
    return node.call("resources")["peers"].get(peer.peer_id)


def _submit(node: RealNode, wasm_path: Path, text: bytes, replicas: int, rule: str) -> dict:
    out = _cli("task", "submit", str(wasm_path), "--data-dir", str(node.data_dir), "--text", text.decode(),
               "--replicas", str(replicas), "--rule", rule, "--wait", "--wait-s", "60", "--json")
    assert out.stdout, out.stderr
    return json.loads(out.stdout)["result"] | {"_exit": out.returncode}


def _certificate_bytes(task: dict) -> bytes:
    return bytes.fromhex(task["certificate"]["encoded_hex"])


def test_the_fabric_module_imports_nothing_from_chimera():
    tree = ast.parse(Path(fx.__file__).read_text())
    imported = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] == "chimera"}, imported
    assert {m for m in imported if m.split(".")[0] == "tests"} <= {"tests", "tests.independent_peer"}, imported
    assert {m.split(".")[0] for m in imported} - set(sys.stdlib_module_names) <= \
        {"msgpack", "nacl", "zmq", "wasmtime", "tests"}, imported


def test_sandbox_limits_of_agents_md():
    """docs/AGENTS.md's limits in the clean-room sandbox, on the committed hostile builds."""
    sb = fx.Sandbox()
    try:
        ok = sb.run_task(WORDFREQ, b"b a b", 10**9, 64 * fx.MIB, 10_000)
        assert (ok.status, ok.exit_code, ok.stdout) == ("ok", 0, b"2 b\n1 a\n")
        assert ok.digest == hashlib.sha256(b"chimera-task-result/v1\x00" + b"\x00\x00\x00\x00" + ok.stdout).digest()
        loop = (AGENTS / "hostile_loop.wasm").read_bytes()
        assert (sb.run_task(loop, b"", 10**6, 64 * fx.MIB, 60_000).reason) == "fuel_exhausted"
        deadline = sb.run_task(loop, b"", 2**62, 64 * fx.MIB, 200)
        assert (deadline.status, deadline.reason) == ("refused", "deadline_exceeded")
        bomb = sb.run_task((AGENTS / "hostile_memory_bomb.wasm").read_bytes(), b"", 10**9, 4 * fx.MIB, 10_000)
        assert (bomb.status, bomb.reason) == ("error", "memory_limit")
        huge = sb.run_task((AGENTS / "hostile_huge_memory.wasm").read_bytes(), b"", 10**9, 64 * fx.MIB, 10_000)
        assert huge.reason == "memory_limit"
        assert sb.run_task((AGENTS / "hostile_unlinked_import.wasm").read_bytes(), b"", 10**9, 64 * fx.MIB,
                           10_000).reason == "module_rejected"
        assert sb.run_task((AGENTS / "hostile_output_flood.wasm").read_bytes(), b"", 10**9, 64 * fx.MIB,
                           10_000).reason == "output_limit"
        clock = sb.run_task((AGENTS / "hostile_read_clock.wasm").read_bytes(), b"", 10**9, 64 * fx.MIB, 10_000)
        assert b"errno=76" in clock.stdout
        assert sb.run_task(b"not wasm", b"", 10**9, 64 * fx.MIB, 10_000).reason == "module_rejected"
    finally:
        sb.close()


def test_1_capacity_advertised_and_listed_as_a_place_for_tasks(mesh, peer):
    # §18.3: the node keeps our latest fabric_capacity; `resources` shows exactly what we sent.
    assert wait_until(lambda: _fresh_capacity(mesh.a, peer) is not None, timeout_s=30)
    row = _fresh_capacity(mesh.a, peer)
    sent = peer.resources()
    assert {k: row[k] for k in sent} == sent, row
    assert row["breaker"] == "closed" and row["task_slots_trusted"] == peer.task_slots, row
    assert 0 < row["expires_in_s"] <= 3 * peer.capacity_interval_ms / 1000, row  # forgotten 3 x interval_ms after
    # The operator's `chimera peers` shows a resources summary for us; B holds our advert too.
    out = _cli("peers", "--data-dir", str(mesh.a.data_dir), "--json")
    rows = {r["peer_id"]: r for r in json.loads(out.stdout)["result"]}
    assert rows[peer.peer_id]["resources"], rows[peer.peer_id]
    assert wait_until(lambda: _fresh_capacity(mesh.b, peer) is not None, timeout_s=30)
    # The nodes' own adverts decode under our strict §18.2 codec (no drop on our side).
    assert peer.wait_for(lambda: {mesh.a.peer_id, mesh.b.peer_id} <= set(peer.capacities), 30)
    assert not peer.stats.drops, peer.stats.drops
    assert peer.capacities[mesh.a.peer_id]["interval_ms"] >= 100
    # Silence forgets the advert within 3 x interval_ms; the next advert restores it.
    peer.advertising.clear()
    try:
        assert wait_until(lambda: _fresh_capacity(mesh.a, peer) is None, timeout_s=30), \
            "the node kept a capacity advert past 3 x interval_ms"
    finally:
        peer.advertising.set()
    assert wait_until(lambda: _fresh_capacity(mesh.a, peer) is not None, timeout_s=30)


def test_2_redundant_task_placed_on_the_clean_room_peer(mesh, peer, tmp_path):
    assert wait_until(lambda: _fresh_capacity(mesh.a, peer) is not None and
                      _fresh_capacity(mesh.a, type("B", (), {"peer_id": mesh.b.peer_id})) is not None, 30)
    fetched_before = len(peer.module_requests_seen)
    # unanimous: the certificate needs every replica's vote, ours included
    task = _submit(mesh.a, AGENTS / "wordfreq.wasm", TEXT, replicas=3, rule="unanimous")
    assert task["state"] == "accepted" and task["_exit"] == 0, task
    assert {p["peer_id"] for p in task["placement"]} == {mesh.a.peer_id, mesh.b.peer_id, peer.peer_id}
    # Our side: the run arrived, the module came by §18.5 (digest checked), we ran it, reported, voted.
    run = next(r for r in peer.runs if r["task_id"] == task["task_id"])
    assert run["submitter"] == mesh.a.peer_id and run["module_sha256"] == hashlib.sha256(WORDFREQ).hexdigest()
    assert peer.modules[run["module_sha256"]] == WORDFREQ
    assert peer.stats.received["fabric_module_chunk"] >= 1 and peer.stats.sent["fabric_module_request"] >= 1
    assert len(peer.module_requests_seen) == fetched_before  # we fetched; nobody fetched from us
    ours = next(r for r in peer.sent_results if r["task_id"] == task["task_id"])
    sb = fx.Sandbox()
    try:
        expected = sb.run_task(WORDFREQ, TEXT, run["fuel"], run["memory_bytes"], run["wall_time_ms"])
    finally:
        sb.close()
    assert ours["status"] == "ok" and ours["stdout"] == expected.stdout and ours["digest"] == expected.digest
    assert run["fuel"] == 10**9 and run["memory_bytes"] == 64 * fx.MIB and run["wall_time_ms"] == 10_000
    assert peer.stats.sent["fabric_vote"] >= 1
    # The node's side: the result accepted, its digest ours, our vote in the certificate.
    assert task["result"]["digest"] == expected.digest.hex()
    assert task["result"]["stdout"].encode() == expected.stdout
    cert = task["certificate"]
    assert peer.peer_id in cert["voters"] and peer.peer_id in cert["agreeing"] and cert["verified"], cert
    obs = {(o["peer_id"], o["kind"]) for o in task["observations"]}
    assert (peer.peer_id, "task_agree") in obs
    # The certificate, checked by the clean-room code (§18.4 step 7) against the replica table.
    table = cert["replica_table"]["weights"]
    assert table == {mesh.a.peer_id: 1, mesh.b.peer_id: 1, peer.peer_id: 1}
    choice = fx.verify_task_certificate(_certificate_bytes(task), table, peer.network_id, task["task_id"],
                                        submitter=mesh.a.peer_id)
    assert choice == expected.digest
    # A certificate whose table is not the purpose's is refused.
    with pytest.raises(ip.ProtocolError):
        fx.verify_task_certificate(_certificate_bytes(task), {**table, peer.peer_id: 2}, peer.network_id,
                                   task["task_id"], submitter=mesh.a.peer_id)


def test_3_a_lying_replica_is_outvoted_and_blamed(mesh, peer):
    peer.lie = True
    try:
        task = _submit(mesh.a, AGENTS / "wordfreq.wasm", TEXT + b" again", replicas=3, rule="majority")
    finally:
        peer.lie = False
    assert {p["peer_id"] for p in task["placement"]} >= {peer.peer_id}, task["placement"]
    ours = next(r for r in peer.sent_results if r["task_id"] == task["task_id"])
    assert ours["stdout"].startswith(b"a lie: ")
    # §18.4 steps 7-8: the honest majority decides; we are disagreeing, observed task_disagree.
    assert task["state"] == "accepted", task
    assert task["result"]["digest"] != ours["digest"].hex()
    assert not task["result"]["stdout"].startswith("a lie")
    cert = task["certificate"]
    assert peer.peer_id in cert["disagreeing"] and peer.peer_id not in cert["voters"], cert
    assert set(cert["agreeing"]) == {mesh.a.peer_id, mesh.b.peer_id}
    obs = {(o["peer_id"], o["kind"]) for o in task["observations"]}
    assert (peer.peer_id, "task_disagree") in obs and (mesh.b.peer_id, "task_agree") in obs, obs
    fx.verify_task_certificate(_certificate_bytes(task), cert["replica_table"]["weights"], peer.network_id,
                               task["task_id"], submitter=mesh.a.peer_id)
    # Our result row shows what we claimed (a consistent digest: a wrong result, not a broken one).
    row = next(r for r in task["results"] if r["peer_id"] == peer.peer_id)
    assert row["digest"] == ours["digest"].hex() and row["status"] == "ok"


def test_3b_a_vote_for_another_digest_is_never_counted(mesh, peer):
    """§18.4 step 8: a validly signed vote whose choice is not the digest its voter reported
    is never counted and is an equivocation observation (once per task and voter)."""
    before = mesh.a.counter("fabric_observed_equivocation")
    peer.vote_choice = b"\x07" * 32
    try:
        task = _submit(mesh.a, AGENTS / "wordfreq.wasm", TEXT + b" twice", replicas=3, rule="unanimous")
    finally:
        peer.vote_choice = None
    ours = next(r for r in peer.sent_results if r["task_id"] == task["task_id"])
    assert ours["status"] == "ok"
    # Our signed vote never counts, so a unanimous ballot cannot be decided: vote_timeout.
    assert task["state"] == "failed" and task["failure"]["reason"] == "vote_timeout", task
    assert task["failure"]["agreed"] is False and "result" not in task or task.get("result") is None
    # §18.4 names the reference counter vote_not_reported_digest but not where to read it; the
    # node's status counters show the observation as fabric_observed_equivocation.
    assert mesh.a.counter("fabric_observed_equivocation") >= before + 1
    kinds = [o["kind"] for o in task["observations"] if o["peer_id"] == peer.peer_id]
    assert kinds.count("equivocation") == 1, task["observations"]
    assert peer.stats.sent["fabric_vote"] >= 2  # the request was repeated (vote_retry_s) and answered again


def test_3c_an_inconsistent_digest_is_a_failed_attempt_and_blamed(mesh, peer):
    """§18.4 steps 5 and 8: a digest that is not its own stdout's fails the attempt (retried on
    an untried peer: none is left of three) and is task_disagree."""
    peer.lie = "inconsistent"
    try:
        task = _submit(mesh.a, AGENTS / "wordfreq.wasm", TEXT + b" thrice", replicas=3, rule="majority")
    finally:
        peer.lie = False
    ours = next(r for r in peer.sent_results if r["task_id"] == task["task_id"])
    assert ours["digest"] != fx.result_digest(ours["exit_code"], ours["stdout"])
    assert task["state"] == "failed" and task["failure"]["reason"] == "retries_exhausted", task
    kinds = [o["kind"] for o in task["observations"] if o["peer_id"] == peer.peer_id]
    assert kinds == ["task_disagree"], task["observations"]


def test_4_peer_placed_task_and_module_served_by_the_peer(mesh, peer):
    # A module node A lacks (the same code under another SHA-256): A must fetch it from us.
    wasm = fx.with_custom_section(WORDFREQ, "clean-room", b"test 4")
    sha = hashlib.sha256(wasm).hexdigest()
    modules = mesh.a.call("modules_list")
    assert sha not in json.dumps(modules)
    task = peer.submit("cr-4", wasm, TEXT, [mesh.a.peer_id, peer.peer_id])
    assert peer.wait_for(lambda: len(task.results) == 2, 60), (task.results, peer.stats)
    served = [r for r in peer.module_requests_seen if r["module_sha256"] == sha]
    assert served and served[0]["offset"] == 0 and served[0]["sender"] == mesh.a.peer_id, served
    theirs, mine = task.results[mesh.a.peer_id], task.results[peer.peer_id]
    assert theirs["status"] == "ok" and theirs["consistent"], theirs
    assert theirs["digest"] == mine["digest"] and theirs["stdout"] == mine["stdout"]
    # §18.4 step 6: ask for votes; A signs our ballot; the tally (unanimous) accepts.
    ballot = peer.request_votes(task, rule="unanimous")
    assert peer.wait_for(lambda: mesh.a.peer_id in task.votes, 30), peer.stats
    assert fx.verify_ballot_vote(peer.network_id, ballot, task.votes[mesh.a.peer_id])
    assert fx.tally(ballot, list(task.votes.values()), task.table) == mine["digest"]
    votes_before = peer.stats.received["fabric_vote"]
    # Rule (b): a ballot naming another submitter is refused (counted), no vote.
    refused_before = mesh.a.counter("drop_fabric_vote_refused")
    forged = fx.make_ballot(0, fx.task_purpose(mesh.b.peer_id, "cr-4", "0" * 64))
    peer.send(mesh.a.peer_id, "fabric_vote_request", {"task_id": "cr-4", "ballot": forged, "digest": mine["digest"]})
    # Rule (a): a digest A did not compute is refused too.
    good = fx.make_ballot(0, fx.task_purpose(peer.peer_id, "cr-4", "1" * 64))
    peer.send(mesh.a.peer_id, "fabric_vote_request", {"task_id": "cr-4", "ballot": good, "digest": b"\x01" * 32})
    assert wait_until(lambda: mesh.a.counter("drop_fabric_vote_refused") >= refused_before + 2, timeout_s=30)
    assert peer.stats.received["fabric_vote"] == votes_before  # neither was answered


def test_4c_refusals_and_a_module_that_is_not_wasm(mesh, peer):
    # §18.5: fetched bytes without the \0asm v1 magic: error / module_rejected with its error digest.
    junk = b"#!/bin/sh\necho this is not webassembly\n"
    sha = peer.add_module(junk)
    peer.submitted["cr-4c"] = fx.SubmittedTask("cr-4c", sha, [mesh.a.peer_id])
    peer.send(mesh.a.peer_id, "fabric_task_run", _run_body("cr-4c", sha))
    assert peer.wait_for(lambda: mesh.a.peer_id in peer.submitted["cr-4c"].results, 30)
    r = peer.submitted["cr-4c"].results[mesh.a.peer_id]
    assert (r["status"], r["reason"], r["digest"]) == ("error", "module_rejected", fx.error_digest("module_rejected"))
    assert r["consistent"] and mesh.a.counter("fabric_module_not_wasm") >= 1
    # §18.2 over_capacity: memory above the advertised per-agent cap, a wall time above its maximum.
    cap = peer.capacities[mesh.a.peer_id]["resources"]
    for i, change in enumerate([{"memory_bytes": cap["max_wasm_memory_bytes"] + 65536},
                                {"wall_time_ms": cap["max_task_wall_time_ms"] + 1}]):
        tid = f"cr-4c-{i}"
        peer.submitted[tid] = fx.SubmittedTask(tid, hashlib.sha256(WORDFREQ).hexdigest(), [mesh.a.peer_id])
        peer.send(mesh.a.peer_id, "fabric_task_run", dict(_run_body(tid, hashlib.sha256(WORDFREQ).hexdigest()),
                                                          **change))
        assert peer.wait_for(lambda: mesh.a.peer_id in peer.submitted[tid].results, 30)
        r = peer.submitted[tid].results[mesh.a.peer_id]
        assert (r["status"], r["reason"], r["digest"]) == ("refused", "over_capacity", None), r


def test_4b_actor_messages_to_a_deployed_actor(mesh, peer):
    out = _cli("agent", "deploy", "counter@1", str(AGENTS / "counter.wasm"), "--kind", "actor",
               "--data-dir", str(mesh.a.data_dir))
    assert out.returncode == 0, out.stderr
    for text in (b"inc", b"inc", b"get", b"echo hello fabric"):
        peer.send_actor_message(mesh.a.peer_id, "counter", "probe", text)
    assert peer.wait_for(lambda: len(peer.mailboxes.get("probe", [])) >= 2, 30), (peer.mailboxes, peer.stats)
    replies = peer.mailboxes["probe"]
    assert replies[0] == (f"{mesh.a.peer_id}/counter", b"count 2"), replies
    assert replies[1] == (f"{mesh.a.peer_id}/counter", b"hello fabric"), replies
    # §18.6 drops: another peer's address as sender, an unknown agent, a local sink.
    before = {k: mesh.a.counter(k) for k in ("drop_fabric_bad_actor_sender", "drop_fabric_actor_undeliverable",
                                              "drop_fabric_actor_to_sink")}
    peer.send(mesh.a.peer_id, "fabric_actor_message",
              {"to_name": "counter", "from_address": f"{mesh.b.peer_id}/probe", "payload": b"inc"})
    peer.send_actor_message(mesh.a.peer_id, "nobody-here", "probe", b"get")
    peer.send_actor_message(mesh.a.peer_id, "admin", "probe", b"get")
    assert wait_until(lambda: all(mesh.a.counter(k) >= v + 1 for k, v in before.items()), timeout_s=30), \
        {k: mesh.a.counter(k) for k in before}
    peer.send_actor_message(mesh.a.peer_id, "counter", "probe", b"get")
    assert peer.wait_for(lambda: len(peer.mailboxes["probe"]) >= 3, 30)
    assert peer.mailboxes["probe"][2][1] == b"count 2", "the forged-sender inc was counted"


def _run_body(task_id: str, sha: str) -> dict:
    return {"task_id": task_id, "attempt": 1, "module_sha256": sha, "input": b"x y", "fuel": 10**9,
            "memory_bytes": 64 * fx.MIB, "wall_time_ms": 10_000, "gpu_indices": []}


def test_5_malformed_fabric_messages_are_counted_drops(mesh, peer):
    a = mesh.a
    # Wrong types and out-of-bounds fields: malformed.
    before = a.counter("drop_malformed")
    bad = [("fabric_task_run", dict(_run_body("cr-5a", "0" * 64), input="text, not bin")),
           ("fabric_capacity", dict(peer.capacity_body(), task_slots=True)),
           ("fabric_capacity", dict(peer.capacity_body(), unknown_field=1)),
           ("fabric_module_request", {"module_sha256": "AB" * 32, "offset": 0}),         # not lowercase hex
           ("fabric_module_chunk", {"module_sha256": "ab" * 32, "offset": 10, "total_bytes": 5, "data": b"x"}),
           ("fabric_actor_message", {"to_name": "counter", "from_address": f"{peer.peer_id}/p",
                                     "payload": b"x" * (256 * 1024 + 1)}),
           ("fabric_vote", {"task_id": "cr-5", "vote": {"ballot_id": b"x" * 31, "choice": b"c",
                                                        "voter": peer.peer_id, "signature": b"s" * 64}})]
    for kind, body in bad:
        peer.send(a.peer_id, kind, body)
    assert wait_until(lambda: a.counter("drop_malformed") >= before + len(bad), timeout_s=30), \
        (a.counter("drop_malformed") - before, len(bad))
    # Oversize: a frame over max_message_bytes (1 MiB) but under the ROUTER's MAXMSGSIZE.
    before = a.counter("drop_oversize")
    peer.send(a.peer_id, "fabric_actor_message", {"to_name": "counter", "from_address": f"{peer.peer_id}/p",
                                                  "payload": b"x" * (1024 * 1024 + 100)})
    assert wait_until(lambda: a.counter("drop_oversize") >= before + 1, timeout_s=30)
    # A vote whose voter is not the envelope sender (§18.2 MUST): the node counts drop_fabric_vote_not_own.
    before = a.counter("drop_fabric_vote_not_own")
    b = fx.make_ballot(0, fx.task_purpose(a.peer_id, "t999-x", "2" * 64))
    vote = fx.sign_ballot_vote(peer.signing_key, peer.network_id, b, b"\x01" * 32)
    peer.send(a.peer_id, "fabric_vote", {"task_id": "t999-x", "vote": dict(vote, voter=mesh.b.peer_id)})
    assert wait_until(lambda: a.counter("drop_fabric_vote_not_own") >= before + 1, timeout_s=30)
    # A result for a task the node never placed with us is ignored (counted fabric_result_ignored).
    before = a.counter("fabric_result_ignored")
    peer.send(a.peer_id, "fabric_task_result", {"task_id": "t999-x", "attempt": 1, "status": "ok",
                                                "digest": fx.result_digest(0, b"")})
    assert wait_until(lambda: a.counter("fabric_result_ignored") >= before + 1, timeout_s=30)
    # A chunk nobody asked for.
    before = a.counter("drop_fabric_unexpected_chunk")
    peer.send(a.peer_id, "fabric_module_chunk",
              {"module_sha256": "cd" * 32, "offset": 0, "total_bytes": 4, "data": b"\0asm", "error": ""})
    assert wait_until(lambda: a.counter("drop_fabric_unexpected_chunk") >= before + 1, timeout_s=30)

    # Module transfer from us with a bad digest: A fetches, the bytes do not hash to the name.
    results = peer.submitted
    wasm_b = fx.with_custom_section(WORDFREQ, "clean-room", b"bad digest")
    sha_b = peer.add_module(wasm_b)
    other = fx.with_custom_section(WORDFREQ, "clean-room", b"something else")  # same length, other bytes
    assert len(other) == len(wasm_b) + 4
    other = other[:len(wasm_b)]
    before = a.counter("drop_fabric_bad_module_hash")
    peer.submitted["cr-5b"] = fx.SubmittedTask("cr-5b", sha_b, [a.peer_id])
    peer.chunk_hook = lambda sender, c: dict(c, data=other[c["offset"]:c["offset"] + len(c["data"])]) \
        if c["module_sha256"] == sha_b else c
    peer.send(a.peer_id, "fabric_task_run", _run_body("cr-5b", sha_b))
    assert wait_until(lambda: a.counter("drop_fabric_bad_module_hash") >= before + 1, timeout_s=30)
    assert peer.wait_for(lambda: a.peer_id in results["cr-5b"].results, 30), "no answer to the run"
    r = results["cr-5b"].results[a.peer_id]
    assert (r["status"], r["reason"]) == ("refused", "module_unavailable"), r
    assert sha_b not in json.dumps(a.call("modules_list")), "a module that failed its hash was stored"

    # A chunk out of order: asked for offset 0, we answer offset 4096.
    wasm_c = fx.with_custom_section(WORDFREQ, "clean-room", b"out of order")
    sha_c = peer.add_module(wasm_c)
    counters_before = a.call("status")["counters"]
    peer.submitted["cr-5c"] = fx.SubmittedTask("cr-5c", sha_c, [a.peer_id])
    peer.chunk_hook = lambda sender, c: dict(c, offset=4096, data=wasm_c[4096:4096 + 8192]) \
        if c["module_sha256"] == sha_c else c
    peer.send(a.peer_id, "fabric_task_run", _run_body("cr-5c", sha_c))
    assert peer.wait_for(lambda: a.peer_id in results["cr-5c"].results, 40), "no answer to the run"
    r = results["cr-5c"].results[a.peer_id]
    counters_after = a.call("status")["counters"]
    moved = {k: counters_after.get(k, 0) - counters_before.get(k, 0) for k in counters_after
             if k.startswith("drop_") and counters_after.get(k, 0) != counters_before.get(k, 0)}
    assert (r["status"], r["reason"]) == ("refused", "module_unavailable"), r
    # The reference ends the fetch and counts drop_fabric_malformed (not drop_fabric_unexpected_chunk,
    # which is for a chunk of no fetch in progress from that peer).
    assert moved.get("drop_fabric_malformed", 0) >= 1 and "drop_fabric_unexpected_chunk" not in moved, moved
    peer.chunk_hook = None

    # The node keeps serving: a signed echo round trip and a task with our vote.
    nonce = 424242
    peer.send(a.peer_id, "echo_request", {"nonce": nonce, "payload": b"still there", "reply": True})
    assert peer.wait_for(lambda: nonce in peer.echo_replies, 30)
    assert a.proc.poll() is None and mesh.b.proc.poll() is None
    task = _submit(a, AGENTS / "wordfreq.wasm", b"after the noise", replicas=3, rule="unanimous")
    assert task["state"] == "accepted" and peer.peer_id in task["certificate"]["voters"], task


def _malformed_on_node(node: RealNode, peer: fx.FabricPeer, kind: str, body: dict) -> bool:
    """Send one body; True when the node counted it drop_malformed (an echo round trip after
    it marks that the node read it: one connection keeps the order)."""
    before = node.counter("drop_malformed")
    peer.send(node.peer_id, kind, body)
    nonce = int.from_bytes(hashlib.sha256(repr((kind, time.monotonic_ns())).encode()).digest()[:6], "big")
    peer.send(node.peer_id, "echo_request", {"nonce": nonce, "payload": b"", "reply": True})
    assert peer.wait_for(lambda: nonce in peer.echo_replies, 30)
    return wait_until(lambda: node.counter("drop_malformed") > before, timeout_s=1.0)


def _ballot_body(peer: fx.FabricPeer, **change) -> dict:
    b = fx.make_ballot(0, fx.task_purpose(peer.peer_id, "cr-6", "2" * 64))
    b.update(change)
    return {"task_id": "cr-6", "ballot": b, "digest": b"\x02" * 32}


def test_6_codec_edges_agree_with_the_node(mesh, peer):
    """Bodies the clean-room codec calls malformed (or not) are counted the same by the node."""
    cap = peer.capacity_body()
    res = cap["resources"]
    gpu = {"index": 0, "name": "g", "memory_total_bytes": 10, "memory_used_bytes": 1, "utilization_percent": 0}
    run = _run_body("cr-6", "e" * 64)
    cases = [
        ("fabric_capacity", dict(cap, resources=dict(res, gpus=[gpu, gpu]))),           # duplicate GPU index
        ("fabric_capacity", dict(cap, resources=dict(res, load_1m=-0.5))),
        ("fabric_capacity", dict(cap, resources=dict(res, load_1m=float("nan")))),
        ("fabric_capacity", dict(cap, resources=dict(res, load_1m=1))),                 # an int is a float
        ("fabric_capacity", dict(cap, interval_ms=99)),
        ("fabric_task_run", dict(run, task_id="has space")),
        ("fabric_task_run", dict(run, task_id="x" * 65)),
        ("fabric_task_run", dict(run, memory_bytes=65535)),
        ("fabric_task_run", dict(run, gpu_indices=[64])),
        ("fabric_task_result", {"task_id": "cr-6", "attempt": 1, "status": "refused", "reason": "busy",
                                "digest": b"\x00" * 32}),                               # digest on a refusal
        ("fabric_task_result", {"task_id": "cr-6", "attempt": 1, "status": "error", "digest": b"\x00" * 32}),
        ("fabric_task_result", {"task_id": "cr-6", "attempt": 1, "status": "done", "reason": "x"}),
        ("fabric_task_result", {"task_id": "cr-6", "attempt": 1, "status": "ok", "exit_code": -2**31,
                                "digest": b"\x00" * 32}),
        ("fabric_module_chunk", {"module_sha256": "ab" * 32, "offset": 0, "total_bytes": 9, "data": b"x",
                                 "error": "not_found"}),                                # error chunk with data
        ("fabric_module_request", {"module_sha256": "ab" * 32, "offset": 0, "max_chunk_bytes": 4095}),
        ("fabric_vote_request", _ballot_body(peer, ballot_id=b"\x00" * 32)),            # id does not match
        ("fabric_vote_request", _ballot_body(peer, threshold_num=1, threshold_den=3)),  # below 1/2
        ("fabric_vote_request", _ballot_body(peer, options=[b"a", b"a"])),
        ("fabric_actor_message", {"to_name": "x" * 65, "from_address": f"{peer.peer_id}/p", "payload": b""}),
    ]
    ours, theirs = [], []
    for kind, body in cases:
        try:
            fx.decode_fabric(kind, msgpack.unpackb(ip.packb(body), raw=False))
            mine = False
        except ip.ProtocolError:
            mine = True
        ours.append(mine)
        theirs.append(_malformed_on_node(mesh.a, peer, kind, body))
    differ = [(kind, body, mine, node) for (kind, body), mine, node in zip(cases, ours, theirs) if mine != node]
    assert not differ, differ
