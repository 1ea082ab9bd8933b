"""A clean-room consensus validator (tests/independent_validator.py, written from
docs/PROTOCOL.md §14-§15 alone, no ``chimera`` import) as the 4th genesis validator of a
network of 3 real ``chimera node`` processes.

Set up as an operator would: the two other real nodes' identity keys and the clean-room
validator's key are made first (§2: raw 32-byte seeds), ``chimera network init
--validator ...`` names all four as genesis validators, the real nodes start with
``chimera node`` (mDNS off, short timeouts via ``--set``), and the clean-room validator
joins from the printed token. The tests run in order on one module-scoped network:
commits with our precommits and our proposals; a stopped node (our votes are needed for
every commit); rounds ≥ 1 by timeouts; catch-up after a pause; epochs and opinions.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.node_process import NodeProcess
from tests import independent_validator as ivd
from tests import independent_verifier as iv
from tests import independent_peer as ip
from tests.conftest import wait_until

CLI = [sys.executable, "-m", "chimera.node.cli"]
EPOCH_LENGTH = 4
# PROTOCOL §14.8 names these NodeConfig fields; README: `--set FIELD=VALUE`.
NODE_SETTINGS = ["--set", "probe_interval_s=0.3", "--set", "probe_timeout_s=0.1",
                 "--set", "consensus_commit_wait_s=0", "--set", "consensus_empty_block_interval_s=0.3",
                 "--set", "consensus_propose_timeout_s=1", "--set", "consensus_vote_timeout_s=0.5",
                 "--log-level", "warning"]
OURS = ivd.Settings(propose_timeout_s=1.0, prevote_timeout_s=0.5, precommit_timeout_s=0.5, commit_wait_s=0.0,
                    empty_block_interval_s=0.3, rebroadcast_interval_s=1.0)


def _cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout_s)


class RealNode(NodeProcess):
    """A real validator (NODE_SETTINGS), started without waiting (:meth:`wait_listening`)."""

    def __init__(self, data_dir: Path, log_path: Path, extra: list[str]) -> None:
        super().__init__(data_dir, log_path, [*NODE_SETTINGS, *extra], wait=False)

    def height(self) -> int:
        return int(self.call("status")["consensus"]["height"])

    def commit(self, height: int) -> iv.CertifiedCommit:
        return iv.decode_certified_commit(bytes.fromhex(self.call("certificate", {"height": height})["commit_hex"]))


def _identity(data_dir: Path) -> str:
    """§2: the identity key is a raw 32-byte Ed25519 seed in DATA_DIR/identity.key (mode 600)."""
    data_dir.mkdir(mode=0o700, parents=True)
    seed = secrets.token_bytes(32)
    fd = os.open(data_dir / "identity.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, seed)
    os.close(fd)
    return ip.peer_id_of(bytes(ip.nacl.signing.SigningKey(seed).verify_key))


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("validator")
    seed = secrets.token_bytes(32)
    ours = ip.peer_id_of(bytes(ip.nacl.signing.SigningKey(seed).verify_key))
    b_id, c_id = _identity(root / "b"), _identity(root / "c")
    out = _cli("network", "init", "--data-dir", str(root / "a"), "--name", "validator", "--epoch-length",
               str(EPOCH_LENGTH), "--validator", b_id, "--validator", c_id, "--validator", ours)
    assert out.returncode == 0, out.stderr
    nodes = [RealNode(root / "a", root / "a.log", [])]
    validator = None
    try:
        nodes[0].wait_listening()
        token_out = _cli("network", "token", "--data-dir", str(root / "a"))
        assert token_out.returncode == 0, token_out.stderr
        token = token_out.stdout.strip()
        nodes += [RealNode(root / n, root / f"{n}.log", ["--join", token]) for n in "bc"]
        for n in nodes:
            n.wait_listening()
        network = ip.Network.from_token(token)
        assert set(network.genesis) == {nodes[0].peer_id, b_id, c_id, ours}
        validator = ivd.Validator(network, seed, str(root / "ours"), OURS)
        for n in nodes:
            validator.join(n.contact_uri)
        assert wait_until(lambda: all(n.peer_id in validator.members for n in nodes), timeout_s=60), \
            "no hello from the real nodes"
        state = {"nodes": nodes, "validator": validator, "root": root, "token": token, "seed": seed,
                 "network": network}
        yield state
        validator = state["validator"]
    finally:
        for n in nodes:
            n.stop()
        if validator is not None:
            validator.close()


def _voted_heights(v: ivd.Validator) -> list[int]:
    with v.cs:
        return sorted(h for h, s in v.commit_source.items() if s == "voted")


def _mine(commit: iv.CertifiedCommit, peer_id: str) -> bool:
    return any(s.voter == peer_id for s in commit.votes)


def test_the_validator_imports_nothing_from_chimera():
    tree = ast.parse(Path(ivd.__file__).read_text())
    imported = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] == "chimera"}, imported
    assert {m.split(".")[0] for m in imported} - set(sys.stdlib_module_names) <= {"msgpack", "nacl", "zmq", "tests"}


def test_commits_carry_our_precommits_and_our_proposals(net):
    v: ivd.Validator = net["validator"]
    a, b, c = net["nodes"]
    # catch-up to the log the three real nodes made alone (3 of 4 is a quorum), then voting
    assert wait_until(lambda: len(_voted_heights(v)) >= 6, timeout_s=60), (v.snapshot(), v.counters, v.errors)
    assert not v.errors, v.errors
    # a value submitted with `chimera propose` on a real node
    out = _cli("propose", "from the cli", "--json", "--timeout-s", "60", "--data-dir", str(a.data_dir))
    assert out.returncode == 0, out.stderr
    decided = json.loads(out.stdout)["result"]
    commit = a.commit(decided["height"])
    assert any(iv.decode_value(x)[3] == b"from the cli" for x in commit.block.values)
    # a value gossiped to us at a height whose round-0 proposer we are: our block carries it
    # (the value must reach us within the idle wait before our proposal: under a heavily loaded
    # machine 4 tries all missed it, twice in a day; each try is one turn of ours as proposer)
    for attempt in range(10):
        assert wait_until(lambda: (lambda s: not s["started"] and v.proposer(s["height"], 0) == v.peer_id)(
            v.snapshot()), timeout_s=30), v.snapshot()
        answer = a.call("propose", {"data": f"gossiped {attempt}", "timeout_s": 60}, timeout_s=70)
        gossiped = a.commit(answer["height"])
        if gossiped.block.proposer == v.peer_id and gossiped.round == 0:
            break
    else:
        pytest.fail("no gossiped value landed in our block in 10 tries")
    assert any(iv.decode_value(x)[1] == a.peer_id for x in gossiped.block.values)
    assert not any(x in v.own_values or iv.decode_value(x)[1] == v.peer_id for x in gossiped.block.values)
    # every commit, checked by the verifier from the token; ours in the certificates
    assert wait_until(lambda: v.snapshot()["last_height"] >= answer["height"], timeout_s=30)
    top = answer["height"]
    verifier = iv.LogVerifier(iv.parse_token(net["token"]))
    ours_proposed, ours_signed = 0, 0
    first_voted = _voted_heights(v)[0]
    for height in range(1, top + 1):
        commit = a.commit(height)
        table = verifier.table_for(height)
        verifier.feed(commit)
        assert v.commits[height].block.hash() == commit.block.hash(), height
        if height >= first_voted:
            ours_signed += _mine(commit, v.peer_id)
        if commit.round == 0:
            first = (height - 1) // EPOCH_LENGTH * EPOCH_LENGTH + 1
            expected = iv.proposer(table, first, height, 0)
            assert commit.block.proposer == expected, height
            ours_proposed += expected == v.peer_id and height >= first_voted
    # a certificate holds the precommits its decider had when it decided (§14.7 L49): with 3 of
    # 4 a quorum, ours is often a few ms too late for the real nodes' certificates (2 of 14 once in a
    # loaded full suite; the SIGSTOP part below shows every commit carrying it when it is needed)
    print(f"ours in {ours_signed} of {top - first_voted + 1} certificates; {ours_proposed} blocks proposed by us; "
          f"{dict(v.counters)}")
    assert ours_proposed >= 1 and ours_signed >= 1, (ours_proposed, ours_signed)
    assert not v.errors, v.errors


def test_with_one_node_stopped_our_votes_make_the_quorum_and_rounds_move_on(net):
    v: ivd.Validator = net["validator"]
    a, b, c = net["nodes"]
    os.kill(c.proc.pid, signal.SIGSTOP)
    try:
        start = a.height()
        timeouts_before = v.counters["timeout_propose"]
        # wait for a height whose round-0 proposer is the stopped node to commit (round >= 1)
        def rounds_moved() -> bool:
            return any(v.commits[h].round >= 1 for h in range(start + 1, v.snapshot()["last_height"] + 1))
        decided = a.call("propose", {"data": "while c is stopped", "timeout_s": 60}, timeout_s=70)
        assert wait_until(rounds_moved, timeout_s=40), (v.snapshot(), v.counters)
        assert wait_until(lambda: a.height() >= start + 6, timeout_s=40), (a.height(), v.snapshot())
        end = a.height()
        late = 0
        for height in range(start + 1, end + 1):
            commit = a.commit(height)
            with v.cs:
                table = v.ledger.tables[(height - 1) // EPOCH_LENGTH]
            voters = {s.voter for s in commit.votes}
            if commit.round >= 1:
                late += 1
                first = (height - 1) // EPOCH_LENGTH * EPOCH_LENGTH + 1
                assert iv.proposer(table, first, height, 0) == c.peer_id, height
            if height == start + 1:
                continue  # (it may have been decided with c's precommit, sent before the SIGSTOP)
            assert c.peer_id not in voters
            assert v.peer_id in voters, height
            # without our precommit the others are not more than 2/3: our vote counts
            assert not iv.is_quorum(table.weight_of(voters - {v.peer_id}), table.total), (height, table)
        assert late >= 1
        # our own record of a late height: no proposal came in round 0, so the propose timeout
        # made us prevote nil there (§14.7 L57), and we signed again in a later round
        late_heights = [h for h in range(start + 1, end + 1) if v.commits[h].round >= 1]
        signed = {(r["height"], r["round"], r["step"], r["block_hash"]) for r in v.sign_state.records}
        assert any((h, 0, "prevote", None) in signed and any(x[0] == h and x[1] >= 1 for x in signed)
                   for h in late_heights), late_heights
        print(f"stopped: heights {start + 1}..{end}, {late} in round >= 1; {dict(v.counters)}")
        assert v.counters["timeout_propose"] > timeouts_before
        assert decided["height"] > start
    finally:
        os.kill(c.proc.pid, signal.SIGCONT)
    # locking and no double signing, from our own sign-state log (§14.12)
    assert ivd.check_sign_log(v.sign_state.records) > 10
    assert not v.errors, v.errors


def test_catch_up_after_a_pause_and_voting_again(net):
    v: ivd.Validator = net["validator"]
    a, b, c = net["nodes"]
    assert wait_until(lambda: c.height() >= a.height() - 1, timeout_s=40), "the stopped node did not catch up"
    v.pause()
    paused_at = v.snapshot()["last_height"]
    fetched_before = v.counters["commits_fetched"]
    assert wait_until(lambda: a.height() >= paused_at + 6, timeout_s=40), a.height()
    v.resume()
    target = a.height()
    assert wait_until(lambda: v.snapshot()["last_height"] >= target, timeout_s=40), (v.snapshot(), v.counters)
    assert v.counters["commits_fetched"] - fetched_before >= 4, v.counters
    resumed = v.snapshot()["last_height"]
    # and votes again: our precommits in later certificates
    assert wait_until(lambda: any(_mine(a.commit(h), v.peer_id) for h in range(resumed + 1, a.height() + 1)),
                      timeout_s=30)
    assert ivd.check_sign_log(v.sign_state.records) > 0
    print("after catch-up:", dict(v.counters))
    assert not v.errors, v.errors


def test_epochs_weight_tables_agree_and_our_opinions_commit(net):
    v: ivd.Validator = net["validator"]
    a, b, c = net["nodes"]
    assert wait_until(lambda: v.snapshot()["epoch"] >= 3, timeout_s=40)
    compared = 0
    for node in (a, b, c):
        if node is a:  # as an operator reads it
            out = _cli("reputation", "--json", "--data-dir", str(a.data_dir))
            assert out.returncode == 0, out.stderr
            rep = json.loads(out.stdout)["result"]
        else:
            rep = node.call("reputation")
        with v.cs:
            tables = dict(v.ledger.tables)
        for row in rep["epochs"]:
            if row["epoch"] in tables:
                assert tables[row["epoch"]].weights == row["weights"], (row, tables[row["epoch"]])
                compared += 1
    assert compared >= 6
    print("tables:", {e: sorted(t.weights.values()) for e, t in tables.items()})
    # our opinions: committed in their epoch (§15.3: a later one is ignored)
    with v.cs:
        sent = dict(v.opinions_sent)
        where = {x: h for h, cm in v.commits.items() for x in cm.block.values}
    in_epoch = [e for e, value in sent.items() if value in where and (where[value] - 1) // EPOCH_LENGTH == e]
    assert len(in_epoch) >= 2, (sent.keys(), {e: where.get(val) for e, val in sent.items()})
    assert not v.errors, v.errors


def test_the_real_nodes_agree_with_us_and_reject_nothing_of_ours(net):
    """Every height the same block at the three real nodes and here; no node counted a
    rejected consensus input (§14.13: each names a faulty peer, and only ours is new)."""
    v: ivd.Validator = net["validator"]
    nodes = net["nodes"]
    top = min(min(n.height() for n in nodes), v.snapshot()["last_height"])
    differing = 0
    for height in range(max(1, top - 30), top + 1):
        commits = [n.commit(height) for n in nodes]
        assert {c.block.hash() for c in commits} == {v.commits[height].block.hash()}, height
        differing += len({frozenset(s.voter for s in c.votes) for c in commits}) > 1
    print(f"heights whose certificates differ between the real nodes: {differing} of {min(31, top)}")
    for n in nodes:
        status = n.call("status")
        print(n.data_dir.name, "drops:", status["consensus"].get("drops"))
        counters = status["counters"]
        rejected = {k: x for k, x in counters.items() if "rejected" in k and x}
        assert not rejected, (n.data_dir.name, rejected)


def test_restart_from_the_sign_state_and_commit_log(net):
    """§14.12: a validator that stops and starts again from its files reloads its commits
    (verified again), never signs below its stored position, catches up and votes."""
    old: ivd.Validator = net["validator"]
    a, b, c = net["nodes"]
    old.close()
    records_before = len(old.sign_state.records)
    last_before = old.sign_state.last
    stopped_at = old.snapshot()["last_height"]
    incarnation = old.incarnation + 1  # §10.4: one more per restart (our refutations raised it)
    assert wait_until(lambda: a.height() >= stopped_at + 4, timeout_s=40)
    v = ivd.Validator(net["network"], net["seed"], str(net["root"] / "ours"), OURS, incarnation=incarnation)
    net["validator"] = v
    assert v.snapshot()["last_height"] >= stopped_at and len(v.sign_state.records) == records_before
    assert sorted(h for h, src in v.commit_source.items() if src == "stored") == list(range(1, v.last_height + 1))
    for n in net["nodes"]:
        v.join(n.contact_uri)
    target = a.height()
    assert wait_until(lambda: v.snapshot()["last_height"] >= target, timeout_s=40), (
        v.snapshot(), v.counters, v.stats, [r for r in a.call("peers") if r["peer_id"] == v.peer_id], incarnation)
    assert v.counters["commits_fetched"] >= 1, v.counters
    assert wait_until(lambda: v.counters["commits_voted"] >= 2, timeout_s=30), v.counters
    new = v.sign_state.records[records_before:]
    assert new and ivd.position(new[0]["height"], new[0]["round"], new[0]["step"]) > \
        ivd.position(last_before["height"], last_before["round"], last_before["step"])
    ivd.check_sign_log(v.sign_state.records)
    assert not v.errors, v.errors


# --- the voting rules on one validator, with the other three validators' keys here ----------

def _offline(tmp_path) -> tuple[ivd.Validator, list[ip.nacl.signing.SigningKey], list[str]]:
    keys = [ip.nacl.signing.SigningKey.generate() for _ in range(4)]
    keys.sort(key=lambda k: ip.peer_id_of(bytes(k.verify_key)))
    ids = [ip.peer_id_of(bytes(k.verify_key)) for k in keys]
    network = ip.Network("offline", secrets.token_bytes(32), (), tuple(ids), EPOCH_LENGTH)
    slow = ivd.Settings(propose_timeout_s=600, prevote_timeout_s=600, precommit_timeout_s=600, commit_wait_s=0,
                        rebroadcast_interval_s=600, submit_opinions=False)
    v = ivd.Validator(network, bytes(keys[3]), str(tmp_path / "offline"), slow)  # the last in id order
    return v, keys, ids


def _vote(v: ivd.Validator, key, vote_type: str, round_: int, block_hash: bytes | None) -> None:
    voter = ip.peer_id_of(bytes(key.verify_key))
    sig = key.sign(iv.statement_bytes(vote_type, v.network_id, 0, [1, round_, block_hash])).signature
    v._on_vote({"vote": iv.Vote(vote_type, 1, round_, block_hash, iv.SignedVote(voter, sig))}, voter)
    v._run_rules()


def _proposal(v: ivd.Validator, key, round_: int, block: iv.Block, valid_round: int | None) -> None:
    voter = ip.peer_id_of(bytes(key.verify_key))
    sig = key.sign(iv.statement_bytes("proposal", v.network_id, 0, [1, round_, block.hash(), valid_round])).signature
    v._on_proposal({"height": 1, "round": round_, "block": block, "valid_round": valid_round,
                    "signed": iv.SignedVote(voter, sig)}, voter)
    v._run_rules()


def test_locking_l22_l28_and_round_skip_on_one_validator(tmp_path):
    v, keys, ids = _offline(tmp_path)
    try:
        assert wait_until(lambda: v.snapshot()["started"], timeout_s=10)
        genesis_hash = v.network.genesis_hash
        b0 = iv.Block(1, 0, ids[0], genesis_hash, ())
        b1 = iv.Block(1, 0, ids[1], genesis_hash, ())
        with v.cs:
            assert [v.proposer(1, r) for r in range(4)] == ids  # equal weights: id order (§14.6)
            # round 0: B0 proposed, a polka for it: we prevote it, lock on it, precommit it
            _proposal(v, keys[0], 0, b0, None)
            assert v.h.own[("prevote", 0)].block_hash == b0.hash()
            _vote(v, keys[0], "prevote", 0, b0.hash())
            _vote(v, keys[1], "prevote", 0, b0.hash())
            assert (v.h.locked_round, v.h.locked_hash) == (0, b0.hash())
            assert v.h.own[("precommit", 0)].block_hash == b0.hash()
            # round skip (L55): two validators (> 1/3) prevote in round 1
            _vote(v, keys[0], "prevote", 1, None)
            assert v.h.round == 0
            _vote(v, keys[1], "prevote", 1, None)
            assert v.h.round == 1 and v.counters["round_skip"] == 1
            # round 1: another block with no valid round: locked on B0, we prevote nil (L22)
            _proposal(v, keys[1], 1, b1, None)
            assert v.h.own[("prevote", 1)].block_hash is None
            # to round 2, then a polka of round 1 for B1 seen late, and B1 re-proposed with
            # valid_round 1: locked_round 0 <= 1, so we prevote B1 against our lock (L28)
            _vote(v, keys[0], "prevote", 2, None)
            _vote(v, keys[1], "prevote", 2, None)
            assert v.h.round == 2
            for k in keys[:3]:
                _vote(v, k, "prevote", 1, b1.hash())
            assert (v.h.valid_round, v.h.valid_block) == (1, b1)  # the late polka rule
            _proposal(v, keys[2], 2, b1, 1)
            assert v.h.own[("prevote", 2)].block_hash == b1.hash()
            # a second, different prevote of round 2 is refused by the sign state (§14.12)
            refused = v.counters["sign_refused"]
            assert not v._vote("prevote", b0.hash())
            assert v.counters["sign_refused"] == refused + 1
            records = list(v.sign_state.records)
        # (round 1: our nil prevote made 3 nil prevotes with the two that skipped: L44 precommit nil)
        assert [(r["round"], r["step"], r["block_hash"], r["locked_round"], r.get("pol_round")) for r in records] == [
            (0, "prevote", b0.hash().hex(), None, None), (0, "precommit", b0.hash().hex(), 0, None),
            (1, "prevote", None, 0, None), (1, "precommit", None, 0, None), (2, "prevote", b1.hash().hex(), 0, 1)]
        assert ivd.check_sign_log(records) == 5
    finally:
        v.close()


def test_the_sign_log_check_catches_double_signing_and_broken_locks():
    base = {"height": 5, "round": 0, "valid_round": None, "locked_round": None, "locked_hash": None}
    x, y = "aa" * 32, "bb" * 32
    good = [{**base, "step": "prevote", "block_hash": x},
            {**base, "step": "precommit", "block_hash": x, "locked_round": 0, "locked_hash": x},
            {**base, "round": 1, "step": "prevote", "block_hash": y, "locked_round": 0, "locked_hash": x,
             "pol_round": 0}]
    assert ivd.check_sign_log(good) == 3
    with pytest.raises(AssertionError, match="two different"):
        ivd.check_sign_log(good + [{**good[2], "block_hash": x}])
    with pytest.raises(AssertionError, match="without its lock"):
        ivd.check_sign_log([good[0], {**good[1], "locked_round": None, "locked_hash": None}])
    with pytest.raises(AssertionError, match="against the lock"):
        ivd.check_sign_log(good[:2] + [{**good[2], "pol_round": None}])
    with pytest.raises(AssertionError, match="after"):
        ivd.check_sign_log([good[1], good[0]])
