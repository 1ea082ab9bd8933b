"""The consensus log inside real nodes: in-process peers and peer processes on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest

from chimera.node import admin
from chimera.node.config import NodeConfig
from chimera.node.keys import load_or_create_identity
from chimera.node.launcher import LocalNetwork
from chimera.protocol.errors import LocalProtocolError
from chimera.protocol.network import Network
from tests.conftest import FAST, async_wait_until, wait_until

CONSENSUS_FAST = dict(consensus_commit_wait_s=0.05, consensus_propose_timeout_s=1.0,
                      consensus_vote_timeout_s=0.5, consensus_empty_block_interval_s=0.2)
PROCESS_FAST = ["--set", "probe_interval_s=0.3", "--set", "probe_timeout_s=0.1",
                "--set", "reconnect_interval_s=0.5", "--set", "sync_interval_s=2",
                "--set", "consensus_commit_wait_s=0.05", "--set", "consensus_propose_timeout_s=1",
                "--set", "consensus_vote_timeout_s=0.5", "--set", "consensus_empty_block_interval_s=0.2"]


def _decisions(net: LocalNetwork, i: int) -> list[tuple]:
    res = net.query(i, "log", {"from_height": 1, "limit": 10_000})
    return [(d["height"], d["index"], d["author"], d["nonce"], d["data_text"]) for d in res["decisions"]]


def _lone_validator(tmp_path: Path) -> tuple[Path, Network, NodeConfig]:
    """A data dir whose peer is the only genesis validator of a fresh network, and a fast config."""
    data_dir = tmp_path / "n0"
    me = load_or_create_identity(data_dir).peer_id
    return data_dir, Network.create("t", genesis=[me], epoch_length=100), NodeConfig(**FAST, **CONSENSUS_FAST)


async def test_in_process_validators_commit_identical_logs_and_an_observer_joins(tmp_path: Path):
    from chimera.node.runtime import Node

    ids = [load_or_create_identity(tmp_path / f"n{i}").peer_id for i in range(3)]
    net = Network.create("t", genesis=ids, epoch_length=8)
    config = NodeConfig(**FAST, **CONSENSUS_FAST)
    nodes = []
    try:
        for i in range(4):  # n3 is not in the genesis: it starts as an observer
            node = Node(tmp_path / f"n{i}", config, net)
            await node.start()
            nodes.append(node)
        for node in nodes[1:]:
            node.add_contact_uri(nodes[0].contact_uri, static=True)
            node.run_membership_actions()
        assert nodes[3].consensus.status()["role"] == "observer"
        results = await asyncio.gather(*(nodes[i % 4].consensus.propose(f"value {i}".encode(), 60)
                                         for i in range(40)))
        assert len({r["value_hash"] for r in results}) == 40
        top = max(r["height"] for r in results)
        assert await async_wait_until(lambda: all(n.consensus.height >= top for n in nodes), 60)
        logs = [[(d["height"], d["index"], d["data"]) for d in n.store.decisions(1, 1000)] for n in nodes]
        assert all(log == logs[0] for log in logs) and len(logs[0]) == 40
        # every certificate, in every epoch, re-verifies against that epoch's committed table
        for h in range(1, top + 1):
            doc = nodes[3].consensus.certificate_doc(h)
            assert doc["verified"], (h, doc["error"])
            assert 3 * doc["signed_weight"] > 2 * doc["total_weight"]
        assert {nodes[3].consensus.certificate_doc(h)["epoch"] for h in range(1, top + 1)} != {0}
        from chimera.node.cli import main as cli_main
        code = await asyncio.to_thread(cli_main, ["certificate", str(top), "--json", "--data-dir",
                                                  str(nodes[1].data_dir)])
        assert code == 0
        assert sorted(d for _, _, d in logs[0]) == sorted(f"value {i}".encode() for i in range(40))
        # each fresh valid vote is a vote_ok observation (0.5 each, sampled every second): two
        # votes per height and validator dwarf the valid-envelope and heartbeat credit
        import time as _time
        rep = nodes[0].consensus.reputation
        assert await async_wait_until(lambda: rep.evidence(ids[1], _time.monotonic())[0] >= 0.4 * top, 10), \
            (rep.evidence(ids[1], _time.monotonic()), top)
        # The observer asked to join; it becomes a validator (newcomer weight) at an epoch boundary.
        assert await async_wait_until(lambda: all(nodes[3].peer_id in n.consensus.core.table.weights
                                                  for n in nodes), 90), "observer never became a validator"
        # the table it joined in (under load the epoch after it may be in force by now, and raise
        # it at the capped growth rate: 200 seen once)
        tables = [dict(msgpack.unpackb(w, raw=False)) for _, _, w in nodes[0].store.epoch_tables()]
        joined = next(t for t in tables if nodes[3].peer_id in t)
        assert joined[nodes[3].peer_id] <= 100 < min(joined[p] for p in ids)  # newcomer bound
        kinds = [e["kind"] for e in nodes[0].events]
        assert "validator_join_committed" in kinds and "reputation_changed" in kinds
        assert {n.consensus.core.table.digest() for n in nodes} == {nodes[0].consensus.core.table.digest()}
    finally:
        for node in nodes:
            await node.stop()


class _Validators:
    """In-process genesis validators ``n0`` … in ``tmp_path`` (fast timers, epoch length 1000):
    ``await start(i)`` starts node i (a new one on the same data dir after a stop), joined to
    node 0; ``nodes`` holds them by index; ``stop_all()`` stops every one started."""

    def __init__(self, tmp_path: Path, count: int):
        ids = [load_or_create_identity(tmp_path / f"n{i}").peer_id for i in range(count)]
        self.tmp_path, self.net = tmp_path, Network.create("t", genesis=ids, epoch_length=1000)
        self.config = NodeConfig(**FAST, **CONSENSUS_FAST)
        self.nodes: list = [None] * count

    async def start(self, i: int, config: NodeConfig | None = None):
        from chimera.node.runtime import Node

        node = Node(self.tmp_path / f"n{i}", config or self.config, self.net)
        await node.start()
        if i:
            node.add_contact_uri(self.nodes[0].contact_uri, static=True)
            node.run_membership_actions()
        self.nodes[i] = node
        return node

    async def start_committing(self, count: int, label: str) -> None:
        """Start nodes 0 … count - 1; each proposes the value ``f"{label} {i}"`` and waits for its commit."""
        for i in range(count):
            await self.start(i)
        for i in range(count):
            await self.nodes[i].consensus.propose(f"{label} {i}".encode(), 60)

    async def stop_all(self) -> None:
        for node in self.nodes:
            if node is not None:
                await node.stop()


async def test_a_validator_that_lost_its_log_and_sign_state_sits_out_what_it_may_have_signed(tmp_path: Path):
    """The disk of a validator is replaced and its key restored (log and sign state gone): it
    signs nothing at its stale height 1 (it waits to hear the network), catches up from
    certified commits, finds its own precommits in them and signs nothing up to 2 + the
    margin heights past the last of them (PROTOCOL.md §14.12, event ``double_sign_risk``),
    while the other three go on committing; then it signs again."""
    validators = _Validators(tmp_path, 4)
    nodes, start = validators.nodes, validators.start
    try:
        await validators.start_committing(4, "before")
        lost = nodes[3]
        assert await async_wait_until(lambda: lost.consensus.height >= nodes[0].consensus.height, 30)
        await lost.stop()
        stopped_at = max(n.consensus.height for n in nodes[:3])  # later heights: decided without it
        for name in ("node.sqlite3", "node.sqlite3-wal", "node.sqlite3-shm", "bft_sign_state.bin"):
            (lost.data_dir / name).unlink(missing_ok=True)
        lost = await start(3)
        assert lost.consensus.height == 0
        assert await async_wait_until(lambda: any(e["kind"] == "double_sign_risk" for e in lost.events), 60), \
            [e["kind"] for e in lost.events]
        floor = lost.consensus.core.sign_from_height
        assert floor >= 4  # past the first commit of the old life (height 1 or 2) + 2 + the margin
        # the other three decide meanwhile; it follows from certified commits, then signs again
        assert await async_wait_until(lambda: lost.consensus.core._sign_state is not None, 60)
        assert lost.consensus.core._sign_state.height >= floor  # (a certificate may lack its precommit:
        # the others' are enough and may come first)
        done = await asyncio.gather(*(nodes[k].consensus.propose(f"after {k}".encode(), 60) for k in range(4)))
        top = max(r["height"] for r in done)
        assert await async_wait_until(lambda: all(n.consensus.height >= top for n in nodes), 60)
        logs = [[(d["height"], d["index"], d["data"]) for d in n.store.decisions(1, 1000)] for n in nodes]
        assert all(log == logs[0] for log in logs) and len(logs[0]) == 8
        # no precommit of the new life below the floor: heights decided after its stop carry none
        for h in range(stopped_at + 1, min(floor, top + 1)):
            assert lost.peer_id not in [v["voter"] for v in nodes[0].consensus.certificate_doc(h)["precommits"]]
        assert not any(n.counters["consensus_evidence"] for n in nodes)  # nobody saw it equivocate
    finally:
        await validators.stop_all()


async def test_a_genesis_validator_started_late_asks_back_its_votes_finds_none_and_votes(tmp_path: Path):
    """Three of four genesis validators commit without the fourth; it starts later with an empty
    data dir (as after a lost disk: it cannot tell). It waits to hear the network, catches up,
    asks the validators for votes of its own at the height they are deciding
    (bft_own_votes_request, PROTOCOL.md §14.12; again at the next height if that one commits
    meanwhile), gets none, and signs with no height sat out."""
    validators = _Validators(tmp_path, 4)
    nodes, start = validators.nodes, validators.start
    try:
        await validators.start_committing(3, "without it")
        late = await start(3)
        assert await async_wait_until(lambda: late.counters["consensus_events.own_votes_recovered"] >= 1, 60), \
            str({k: v for k, v in late.counters.items() if k.startswith("consensus")})
        assert late.consensus.height >= 1 and late.consensus.core.sign_from_height == 1  # no height sat out
        assert await async_wait_until(lambda: late.consensus.core._sign_state is not None, 60)
        done = await late.consensus.propose(b"from the late one", 60)
        assert await async_wait_until(lambda: all(n.consensus.height >= done["height"] for n in nodes), 60)
        logs = [[d["data"] for d in n.store.decisions(1, 1000)] for n in nodes]
        assert all(log == logs[0] for log in logs) and b"from the late one" in logs[0]
        assert not any(n.counters["consensus_evidence"] for n in nodes)
    finally:
        await validators.stop_all()


async def test_a_needed_validator_sitting_a_height_out_stops_the_log_until_told_it_signed_nothing(tmp_path: Path):
    """Three equal validators (every commit needs all three). One loses its sign state (the log
    survives): it sits the next height out (PROTOCOL.md §14.12), which cannot commit without it,
    so the log stops and a value proposed meanwhile times out. Restarted with
    ``consensus_double_sign_check = false`` (its operator knows the key signed nothing it lost),
    it signs at once: the log goes on, the pooled value commits, the three logs are equal."""
    validators = _Validators(tmp_path, 3)
    nodes, start, config = validators.nodes, validators.start, validators.config
    try:
        await validators.start_committing(3, "before")
        await nodes[2].stop()
        (nodes[2].data_dir / "bft_sign_state.bin").unlink()
        await start(2)
        stored = nodes[2].consensus.height
        assert nodes[2].consensus.status()["signs_from_height"] == stored + 2
        assert any(e["kind"] == "sign_state_missing" for e in nodes[2].events)
        with pytest.raises(LocalProtocolError, match="not committed within"):
            await nodes[0].consensus.propose(b"while it sits out", 3)
        assert max(n.consensus.height for n in nodes) <= stored  # (none has the height it sits out)
        await nodes[2].stop()
        await start(2, config.replace(consensus_double_sign_check=False))
        assert nodes[2].consensus.status()["signs_from_height"] is None
        assert not nodes[2].consensus.status()["awaiting_network"]
        done = await nodes[1].consensus.propose(b"after the override", 60)
        assert await async_wait_until(lambda: all(n.consensus.height >= done["height"] for n in nodes), 60)
        logs = [[d["data"] for d in n.store.decisions(1, 1000)] for n in nodes]
        assert all(log == logs[0] for log in logs)
        assert b"while it sits out" in logs[0]
        assert not any(n.counters["consensus_evidence"] for n in nodes)
    finally:
        await validators.stop_all()


async def test_propose_without_genesis_is_a_clear_admin_error(node_factory):
    node = await node_factory("a")
    assert node.consensus is None
    with pytest.raises(admin.AdminError, match="no consensus log"):
        await asyncio.to_thread(admin.call, node.data_dir, "propose", {"data": "x"})


@pytest.mark.slow
def test_four_processes_commit_100_values_through_a_sigkill_and_restart(tmp_path: Path):
    net = LocalNetwork(tmp_path, 4, extra_args=PROCESS_FAST, epoch_length=10)
    try:
        net.start()
        assert wait_until(net.full_mesh, timeout_s=60), "no full mesh"

        def propose(args):
            i, k = args
            return net.query(i, "propose", {"data": f"v{k}", "timeout_s": 60})

        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(propose, [(k % 4, k) for k in range(50)]))
            victim = net.peers[3]
            victim.kill()  # SIGKILL in the middle: no goodbye, no flush
            second = list(pool.map(propose, [(k % 3, k) for k in range(50, 100)]))
        assert len(first) + len(second) == 100
        net.restart(3)
        top = net.query(0, "status")["consensus"]["height"]
        assert wait_until(lambda: net.query(3, "status")["consensus"]["height"] >= top, 90), \
            "restarted peer did not catch up"
        logs = [_decisions(net, i) for i in range(4)]
        assert len(logs[0]) == 100 and {d[4] for d in logs[0]} == {f"v{k}" for k in range(100)}
        assert all(log == logs[0] for log in logs), "logs differ between peers"
        blocks = [net.query(i, "log", {"from_height": 1, "limit": 10_000})["blocks"] for i in range(4)]
        upto = min(len(b) for b in blocks)
        assert all([x["hash"] for x in b[:upto]] == [x["hash"] for x in blocks[0][:upto]] for b in blocks)
        out = subprocess.run([sys.executable, "-m", "chimera.node.cli", "log", "--data-dir",
                              str(net.peers[3].data_dir), "--limit", "5"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and "v" in out.stdout
    finally:
        codes = net.stop()
    assert codes == [0, 0, 0, 0], codes


@pytest.mark.slow
def test_equivocating_peer_is_caught_its_evidence_committed_and_its_weight_cut(tmp_path: Path):
    net = LocalNetwork(tmp_path, 4, extra_args=PROCESS_FAST, epoch_length=6)
    net.peers[3].args += ["--set", "test_equivocate=true"]
    try:
        net.start()
        cheater = net.peers[3].status["peer_id"]
        assert wait_until(net.full_mesh, timeout_s=60), "no full mesh"

        def cut() -> bool:
            rep = net.query(0, "reputation")
            return any(e["weights"].get(cheater) == 1 for e in rep["epochs"])

        assert wait_until(cut, timeout_s=120), "equivocator's weight was not cut"
        events = net.query(0, "events", {"limit": 500})
        assert any(e["kind"] == "evidence_committed" and e["peer_id"] == cheater for e in events)
        rep = net.query(1, "reputation")
        assert any(e["weights"].get(cheater) == 1 for e in rep["epochs"])  # every peer agrees
        local = {r["peer_id"]: r["local_score"] for r in rep["peers"]}
        assert local[cheater] < min(v for p, v in local.items() if p != cheater)
        net.query(0, "propose", {"data": "still live", "timeout_s": 60})  # honest 3/4 keep committing
    finally:
        net.stop()


def test_sign_state_file_survives_a_torn_write_and_refuses_a_corrupt_file(tmp_path: Path):
    from chimera.node.store import SignStateError, SignStateFile

    path = tmp_path / "bft_sign_state.bin"
    f = SignStateFile(path)
    assert f.load() is None and path.stat().st_mode & 0o777 == 0o600
    f.save(b"state 1")
    f.save(b"state 2")  # slot 0 (seq 2); slot 1 holds seq 1
    f.close()
    assert SignStateFile(path).load() == b"state 2"
    # a power loss in the middle of the next write (seq 3, slot 1): half a slot on disk
    raw = bytearray(path.read_bytes())
    raw[SignStateFile.SLOT_BYTES:SignStateFile.SLOT_BYTES + 200] = bytes(range(200))
    path.write_bytes(bytes(raw))
    reopened = SignStateFile(path)
    assert reopened.load() == b"state 2"  # the write that never completed is not taken
    reopened.save(b"state 3")
    reopened.close()
    assert SignStateFile(path).load() == b"state 3"
    with pytest.raises(ValueError):
        SignStateFile(path).save(bytes(SignStateFile.MAX_PAYLOAD_BYTES + 1))
    # both slots damaged: the node must not guess what it signed last
    path.write_bytes(b"\x07" * 2 * SignStateFile.SLOT_BYTES)
    with pytest.raises(SignStateError):
        SignStateFile(path)


def test_sign_state_file_keeps_the_extra_record_of_the_state_a_torn_write_falls_back_to(tmp_path: Path):
    """The locked block is stored beside the sign state (PersistVote.locked_block): a new
    write never overwrites the extra record of the last complete state, so a write torn by
    a power loss falls back to a state whose block is intact; files of older releases (no
    locator in the slot) read with no extra record."""
    import hashlib
    import struct

    from chimera.node.store import SignStateFile

    path = tmp_path / "bft_sign_state.bin"
    f = SignStateFile(path)
    f.save(b"state 1", b"A" * 5000)
    f.save(b"state 2", b"B" * 7000)  # must not land on A's bytes (slot 1's record)
    f.save(b"state 3")  # no lock: no extra record
    assert f.load_extra() is None
    f.save(b"state 4", b"D" * 300)
    f.close()
    reopened = SignStateFile(path)
    assert (reopened.load(), reopened.load_extra()) == (b"state 4", b"D" * 300)
    reopened.save(b"state 5", b"E" * 9000)  # seq 5 -> slot 1; slot 0 (seq 4) keeps D
    reopened.close()
    raw = bytearray(path.read_bytes())
    raw[SignStateFile.SLOT_BYTES + 20:SignStateFile.SLOT_BYTES + 60] = bytes(40)  # seq 5's slot torn
    path.write_bytes(bytes(raw))
    fallen_back = SignStateFile(path)
    assert (fallen_back.load(), fallen_back.load_extra()) == (b"state 4", b"D" * 300)
    # power loss the other way round: the new slot reached the disk, its extra record did not
    # (one fdatasync orders nothing between them). The sync never completed, so what state 5
    # signed never left: the slot does not count, state 4 (with its record) is resumed.
    fallen_back.save(b"state 5", b"F" * 6000)
    offset, size, _ = fallen_back._extra_at
    fallen_back.close()
    raw = bytearray(path.read_bytes())
    raw[offset:offset + size] = bytes(size)
    path.write_bytes(bytes(raw))
    lost_extra = SignStateFile(path)
    assert (lost_extra.load(), lost_extra.load_extra()) == (b"state 4", b"D" * 300)
    # the same record again (a later round, still locked on the same block): not written again
    size_before = path.stat().st_size
    lost_extra.save(b"state 6", b"D" * 300)
    lost_extra.save(b"state 7", b"D" * 300)
    assert path.stat().st_size == size_before
    lost_extra.close()
    assert (SignStateFile(path).load(), SignStateFile(path).load_extra()) == (b"state 7", b"D" * 300)
    # a slot as releases before the locator wrote it: head, payload, zero padding, digest
    legacy = tmp_path / "legacy.bin"
    body = struct.pack(">4sQH", b"CMSS", 1, 7) + b"state 1"
    body += bytes(SignStateFile.SLOT_BYTES - 16 - len(body))
    legacy.write_bytes(body + hashlib.blake2b(body, digest_size=16).digest() + bytes(SignStateFile.SLOT_BYTES))
    old = SignStateFile(legacy)
    assert (old.load(), old.load_extra()) == (b"state 1", None)
    old.close()


async def test_a_lone_validator_commits_again_after_a_commit_that_could_not_be_stored(tmp_path: Path):
    """The disk fills up between a lone validator's precommit (sign state with its lock,
    durable) and the commit: the node halts. Before, after the disk was fixed and the node
    restarted, it was locked on a block it no longer had, no peer could send it, and it
    refused every other block: the log never committed again. The locked block is now
    persisted with the lock, and the restarted node commits it, then goes on."""
    from chimera.node.runtime import Node
    from chimera.protocol.errors import LocalProtocolError

    data_dir, net, config = _lone_validator(tmp_path)
    node = Node(data_dir, config, net)
    await node.start()
    try:
        first = await node.consensus.propose(b"stored", 30)
        pages = node.store.db.execute("PRAGMA page_count").fetchone()[0]
        node.store.db.execute(f"PRAGMA max_page_count={pages}")  # SQLITE_FULL from the next new page
        with pytest.raises(LocalProtocolError, match="halted"):
            for k in range(100):
                await node.consensus.propose(b"x" * 2000 + bytes([k]), 30)
        halted_at = node.consensus.height
    finally:
        await node.stop()
    node = Node(data_dir, config, net)
    await node.start()
    try:
        again = await node.consensus.propose(b"after the restart", 30)
        assert again["height"] > halted_at + 1 > first["height"]  # the locked block was committed first
        rows = node.store.decisions(1, 1000)
        assert rows[0]["data"] == b"stored" and rows[-1]["data"] == b"after the restart"
        locked = [r for r in rows if r["height"] == halted_at + 1]  # the block the node was locked on
        assert locked and all(r["data"].startswith(b"x" * 2000) for r in locked), locked
    finally:
        await node.stop()


async def test_sign_state_moves_from_the_sqlite_row_of_older_releases(tmp_path: Path):
    import msgpack

    from chimera.consensus.bft import SignState
    from chimera.node.consensus import SIGN_STATE_FILE, SIGN_STATE_KEY
    from chimera.node.runtime import Node
    from chimera.node.store import SignStateFile, Store
    from chimera.protocol.messages import encode_fields

    ids = [load_or_create_identity(tmp_path / f"n{i}").peer_id for i in range(1)]
    net = Network.create("t", genesis=ids, epoch_length=100)
    data_dir = tmp_path / "n0"
    data_dir.mkdir(exist_ok=True)
    legacy = SignState(height=7, round=2, step="precommit", block_hash=bytes(32))
    store = Store(data_dir)
    store.set_blob(SIGN_STATE_KEY, msgpack.packb(encode_fields(legacy), use_bin_type=True))
    store.close()
    node = Node(data_dir, NodeConfig(**FAST, **CONSENSUS_FAST), net)
    await node.start()
    try:
        assert node.consensus.core._sign_state == legacy  # taken over from the old row...
        assert node.store.get_blob(SIGN_STATE_KEY) is None  # ...which is gone
    finally:
        await node.stop()
    f = SignStateFile(data_dir / SIGN_STATE_FILE)
    assert msgpack.unpackb(f.load(), raw=False) == encode_fields(legacy)
    f.close()


async def test_a_sign_state_write_failure_halts_consensus_and_keeps_the_log(tmp_path: Path):
    """Fail-stop: when the sign state cannot be stored (here its file descriptor is gone,
    a real EBADF from the real write), nothing of that batch is sent, the node stops
    taking part in consensus and says why, and after a restart the log is intact."""
    import os

    from chimera.node.runtime import Node
    from chimera.protocol.errors import LocalProtocolError

    data_dir, net, config = _lone_validator(tmp_path)
    node = Node(data_dir, config, net)
    await node.start()
    try:
        first = await node.consensus.propose(b"stored before the failure", 30)
        os.close(node.consensus.sign_state_file._fd)  # the disk goes away under the node
        with pytest.raises(LocalProtocolError, match="consensus is halted: PersistVote could not be stored"):
            await node.consensus.propose(b"never signed", 60)  # the waiter fails with the halt, not the timeout
        status = node.consensus.status()
        assert status["halted"] and "could not be stored" in status["halted"]
        assert any(e["kind"] == "consensus_halted" for e in node.events)
        with pytest.raises(LocalProtocolError, match="halted"):
            await node.consensus.propose(b"refused at once", 3)
        import contextlib
        import io

        from chimera.node.cli import main as cli_main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = await asyncio.to_thread(cli_main, ["status", "--data-dir", str(data_dir)])
        assert code == 0 and "CONSENSUS HALTED" in out.getvalue(), out.getvalue()
        assert status["height"] == first["height"]  # the commit decided in the failed batch is not stored
    finally:
        await node.stop()
    node = Node(data_dir, config, net)
    await node.start()
    try:
        assert [d["data"] for d in node.store.decisions(1, 10)] == [b"stored before the failure"]
        again = await node.consensus.propose(b"after the restart", 30)
        assert again["height"] > first["height"] and node.consensus.status()["halted"] is None
    finally:
        await node.stop()


async def test_a_corrupt_or_lost_store_is_a_clear_error_or_a_reported_gap_never_silent(tmp_path: Path):
    """A damaged commit row or an unreadable database stops the start with one line naming
    the file (no traceback, nothing half-started); a store that lost committed heights the
    node signed for (a zero-length or older copy) starts, says so, and signs nothing below
    its sign state."""
    import sqlite3

    from chimera.node.runtime import Node, NodeStartError

    data_dir, net, config = _lone_validator(tmp_path)
    node = Node(data_dir, config, net)
    await node.start()
    try:
        await node.consensus.propose(b"v0", 30)
    finally:
        await node.stop()
    early_sign_state = (data_dir / "bft_sign_state.bin").read_bytes()  # an old backup of it
    node = Node(data_dir, config, net)
    await node.start()
    try:
        top = max([(await node.consensus.propose(f"v{k}".encode(), 30))["height"] for k in range(1, 3)])
        assert node.consensus.status()["signs_from_height"] is None  # (a clean restart sits out nothing)
    finally:
        await node.stop()
    db = data_dir / "node.sqlite3"
    pristine = db.read_bytes()  # stopped cleanly: the WAL is checkpointed into the file
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE blocks SET commit_blob = x'00ff' WHERE height = ?", (top,))
    conn.close()
    with pytest.raises(NodeStartError, match="node.sqlite3.*do not decode.*restore it from a backup"):
        await Node(data_dir, config, net).start()
    for suffix in ("-wal", "-shm"):
        (data_dir / f"node.sqlite3{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"\x00garbage" * 512)
    with pytest.raises(NodeStartError, match="cannot be read"):
        await Node(data_dir, config, net).start()
    db.write_bytes(pristine)  # a table of ours with a foreign schema: one line, not a traceback
    conn = sqlite3.connect(db)  # (the peers table was read only after the transport had started)
    with conn:
        conn.execute("DROP TABLE peers")
        conn.execute("CREATE TABLE peers(x)")
    conn.close()
    with pytest.raises(NodeStartError, match="table peers lacks column.*contact"):
        await Node(data_dir, config, net).start()
    for suffix in ("-wal", "-shm"):
        (data_dir / f"node.sqlite3{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"\x00garbage" * 512)
    from chimera.node.keys import save_network

    save_network(data_dir, net)
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "chimera.node", "node", "--data-dir", str(data_dir),
                         "--port", "0", "--no-mdns"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "cannot start" in proc.stderr, proc.stderr
    db.write_bytes(b"")  # zero length: SQLite sees a new, empty database
    node = Node(data_dir, config, net)
    await node.start()
    try:
        status = node.consensus.status()
        signed = node.consensus.core._sign_state.height  # our last signature (at or after `top`)
        assert status["height"] == 0 and signed >= top and status["store_gap"] == [1, signed - 1]
        assert any(e["kind"] == "store_behind_sign_state" for e in node.events)
        assert node.consensus.core.height == 1  # it waits for the commits; its votes start at `signed`
    finally:
        await node.stop()
    db.write_bytes(pristine)
    node = Node(data_dir, config, net)
    await node.start()
    try:
        assert node.consensus.status()["height"] == top and node.consensus.status()["store_gap"] is None
        assert node.consensus.status()["signs_from_height"] is None
    finally:
        await node.stop()
    # the other way round: the log survives, the sign state is lost (an empty file). The
    # validator cannot know what it signed after its last commit, so it signs nothing at the
    # next height; alone in its network it therefore stops, and says why.
    (data_dir / "bft_sign_state.bin").write_bytes(b"")
    node = Node(data_dir, config, net)
    await node.start()
    try:
        height = node.consensus.height
        assert node.consensus.status()["signs_from_height"] == height + 2
        assert any(e["kind"] == "sign_state_missing" for e in node.events)
        assert await async_wait_until(lambda: node.counters["consensus_events.sign_refused"] >= 1, 30)
        assert node.consensus.core._sign_state is None and node.consensus.height == height
    finally:
        await node.stop()
    # an older copy of the sign state (restored from a backup) is as blind about the next
    # height as none: the store knows the file's write count at its last commit
    (data_dir / "bft_sign_state.bin").write_bytes(early_sign_state)
    node = Node(data_dir, config, net)
    await node.start()
    try:
        height = node.consensus.height
        assert node.consensus.status()["signs_from_height"] == height + 2
        event = [e for e in node.events if e["kind"] == "sign_state_missing"][-1]
        assert event["signed_height"] is not None and event["signed_height"] < height
        assert await async_wait_until(lambda: node.counters["consensus_events.sign_refused"] >= 1, 30)
        assert node.consensus.height == height
    finally:
        await node.stop()


def test_a_second_node_on_the_same_data_directory_is_refused(tmp_path: Path):
    """Two processes with one identity and one sign state could equivocate: the second start
    fails with one line naming the first one's pid, and the first keeps its admin socket."""
    net = LocalNetwork(tmp_path, 1, extra_args=PROCESS_FAST)
    try:
        net.start()
        data_dir = net.peers[0].data_dir
        first_pid = net.peers[0].proc.pid
        proc = subprocess.run([sys.executable, "-m", "chimera.node", "node", "--data-dir", str(data_dir),
                               "--port", "0", "--no-mdns"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"a node (pid {first_pid}) is already running" in proc.stderr
        assert net.query(0, "status")["pid"] == first_pid  # still answering on its socket
    finally:
        net.stop()
    proc = subprocess.Popen([sys.executable, "-m", "chimera.node", "node", "--data-dir", str(data_dir),
                             "--port", "0", "--no-mdns"], stdout=subprocess.PIPE, text=True)
    try:  # after a stop (or a SIGKILL: flock dies with its process) the directory is free again
        assert proc.stdout.readline().startswith("listening")
    finally:
        proc.terminate()
        proc.wait(30)


class _DriverNode:
    """The parts of a Node a ConsensusService uses, around a real Store (no transport)."""

    def __init__(self, data_dir: Path, network: Network, identity) -> None:
        import types
        from collections import Counter

        from chimera.consensus.reputation import LocalReputation
        from chimera.node.store import Store

        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir, self.network, self.identity, self.peer_id = data_dir, network, identity, identity.peer_id
        self.store = Store(data_dir)
        self.reputation = LocalReputation()
        self.counters: Counter = Counter()
        self.config = NodeConfig()
        self.membership = types.SimpleNamespace(members={})
        self.events: list = []
        self.sent: list = []

    def emit_event(self, kind, peer_id, **fields) -> None:
        self.events.append(kind)

    def send(self, peer_id, message) -> bool:
        self.sent.append((peer_id, message))
        return True

    def broadcast(self, peers, message) -> int:
        self.sent.append((None, message))
        return 1


def _certified_chain(network: Network, validators: list, length: int) -> tuple[list, list[bytes]]:
    """``length`` certified empty commits signed by ``validators`` (the genesis), and the
    snapshot of a reference ledger after each height."""
    from chimera.consensus.bft import PRECOMMIT, Block, CertifiedCommit, block_hash
    from chimera.consensus.ledger import Ledger
    from chimera.consensus.quorum import QuorumCertificate, WeightTable, sign_vote

    ledger = Ledger(network.network_id, WeightTable(epoch=0, weights={v.peer_id: 1000 for v in validators}),
                    network.epoch_length)
    parent, commits, snapshots = network.genesis_hash(), [], []
    for height in range(1, length + 1):
        table = ledger.table
        block = Block(height=height, epoch=table.epoch, proposer=validators[0].peer_id, parent_hash=parent)
        digest = block_hash(block)
        votes = sorted((sign_vote(v, PRECOMMIT, network.network_id, table.epoch, [height, 0, digest])
                        for v in validators), key=lambda s: s.voter)
        commit = CertifiedCommit(round=0, block=block, certificate=QuorumCertificate(votes=tuple(votes)))
        ledger.apply(commit)
        commits.append(commit)
        snapshots.append(ledger.snapshot())
        parent = digest
    return commits, snapshots


def test_a_catch_up_across_an_epoch_boundary_stores_the_boundary_snapshot_and_survives_a_crash(tmp_path, caplog):
    """The core applies a whole commit response (the ledger too) before the driver stores
    its first commit: the snapshot stored with an epoch's last height must be the ledger at
    that height, not after the response (a node that failed after storing the boundary then
    held a snapshot ahead of its log and could never start again: TypeError at every start).
    Here the real store turns read-only right after the boundary height 4 is stored: the node
    halts, restarts from the same data dir at height 4 and catches up. A store damaged by the
    older release (snapshot at 4 holding height 8) starts too: the snapshot is skipped."""
    import hashlib
    import logging

    import msgpack

    from chimera.consensus.bft import BftCommitResponse, BftConfig
    from chimera.node.consensus import ConsensusService
    from chimera.protocol.envelope import Envelope
    from chimera.protocol.identity import SigningIdentity

    validators = [SigningIdentity(hashlib.sha256(b"snap-val-%d" % i).digest()) for i in range(4)]
    me = SigningIdentity(hashlib.sha256(b"snap-observer").digest())
    net = Network.create("t", genesis=[v.peer_id for v in validators], epoch_length=4)
    commits, snapshots = _certified_chain(net, validators, 8)

    def response(first: int) -> Envelope:
        msg = BftCommitResponse(commits=tuple(commits[first - 1:]), latest_height=8)
        return Envelope(version=1, kind=msg.KIND, sender=validators[1].peer_id, recipient=None, seq=1,
                        sent_at_ms=0, message=msg, size_bytes=0)

    data_dir = tmp_path / "observer"
    node = _DriverNode(data_dir, net, me)
    service = ConsensusService(node, BftConfig())
    store = node.store
    save_commit = store.save_commit

    def save_then_fail(**row) -> None:
        save_commit(**row)
        if row["height"] == 4:  # the disk fails right after the boundary height is durable
            store.db.execute("PRAGMA query_only = 1")

    store.save_commit = save_then_fail
    service.on_envelope(response(1))
    assert service.halted and "could not be stored" in service.halted
    assert store.last_height() == 4
    row_height, blob = store.latest_snapshot()
    assert (row_height, blob) == (4, snapshots[3])  # the ledger at height 4, epoch 1 in force
    assert msgpack.unpackb(blob)["height"] == 4
    service.close()
    store.close()

    node = _DriverNode(data_dir, net, me)  # restart from the same data dir
    service = ConsensusService(node, BftConfig())
    assert (service.height, service.core.height, service.ledger.table.epoch) == (4, 5, 1)
    service.on_envelope(response(5))
    assert service.halted is None and service.height == node.store.last_height() == 8
    assert service.ledger.snapshot() == snapshots[7] and node.store.latest_snapshot() == (8, snapshots[7])
    service.close()
    node.store.close()

    # a store written by the older release: the snapshot stored with height 4 holds height 8
    damaged = tmp_path / "damaged"
    node = _DriverNode(damaged, net, me)
    service = ConsensusService(node, BftConfig())
    service.on_envelope(response(1))
    service.close()
    node.store.db.execute("DELETE FROM blocks WHERE height > 4")
    node.store.db.execute("DELETE FROM ledger_snapshots")
    node.store.db.execute("INSERT INTO ledger_snapshots(height, snapshot) VALUES(4, ?)", (snapshots[7],))
    node.store.close()
    with caplog.at_level(logging.WARNING, logger="chimera.consensus"):
        node = _DriverNode(damaged, net, me)
        service = ConsensusService(node, BftConfig())
    assert "holds height 8, but the log ends at height 4: skipped" in caplog.text
    assert node.counters["consensus_snapshots_skipped"] == 1
    assert (service.height, service.core.height, service.ledger.snapshot()) == (4, 5, snapshots[3])
    service.on_envelope(response(5))
    assert service.height == 8 and service.ledger.snapshot() == snapshots[7]
    service.close()
    node.store.close()
