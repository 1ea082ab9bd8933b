"""The consensus log verified by a clean-room verifier written from docs/PROTOCOL.md alone.

Claim under test (§14.6, §14.10): any peer, including one that joins later, can verify a
commit from the certificate and the epoch's weight table alone. The verifier
(tests/independent_verifier.py) imports nothing from ``chimera``; it takes the join
token, derives every epoch's weight table itself from the verified commits (§15.3,
§15.4) and checks each certified commit of a real 4-validator network.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from tests import independent_verifier as iv

ROOT = Path(__file__).resolve().parent.parent

# --- §16 worked example, copied from docs/PROTOCOL.md ------------------------------------

SEED = bytes([1]) * 32
P = "rkeohxlubhyzl7ks3mwtzos5olfgocn7dwkbeg7toseadnapn5oa"
TOKEN = ("chm1_lgKnZXhhbXBsZcQgAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgKQkdk0cmtlb2h4bHViaHl6bDdr"
         "czNtd3R6b3M1b2xmZ29jbjdkd2tiZWc3dG9zZWFkbmFwbjVvYWQ")
NETWORK_ID = "f9ebc14caf54723ac3b1ea8443470ebb"
GENESIS_INPUT = ("93c410f9ebc14caf54723ac3b1ea8443470ebb91d934726b656f68786c75626879"
                 "7a6c376b73336d77747a6f73356f6c66676f636e3764776b62656737746f736561"
                 "646e61706e356f6164")
GENESIS_HASH = "03538cb0ae8dd591b84b678c0cc55cc75978d96215cff33fca33c9f2fdfa0d20"
DECISION_STATEMENT = ("6368696d6572612d6d6573682f766f74652f763100" "94" "a8" "6465636973696f6e"
                      "c410" "f9ebc14caf54723ac3b1ea8443470ebb" "00" "9207c4026869")
DECISION_VALUE = ("95a86465636973696f6ed934726b656f68786c756268797a6c376b73336d77747a"
                  "6f73356f6c66676f636e3764776b62656737746f736561646e61706e356f6107c4"
                  "026869c4404b086b5c5cda0fa488c67e9a4b57f0bb880d8dc3cf8030d95cc4dcb0"
                  "679b95956b929c99f84ce17027bd22c47ad84f7146591b134bb407bf9ae3d2babf"
                  "a7490f")
VALUE_HASH = "5239d2c64f34cccf29abe92f742de8be101627fffff52586f816884525e61f77"
BLOCK = ("85a668656967687401a565706f636800a870726f706f736572d934726b656f6878"
         "6c756268797a6c376b73336d77747a6f73356f6c66676f636e3764776b62656737"
         "746f736561646e61706e356f61ab706172656e745f68617368c42003538cb0ae8d"
         "d591b84b678c0cc55cc75978d96215cff33fca33c9f2fdfa0d20a676616c756573"
         "91c48795a86465636973696f6ed934726b656f68786c756268797a6c376b73336d"
         "77747a6f73356f6c66676f636e3764776b62656737746f736561646e61706e356f"
         "6107c4026869c4404b086b5c5cda0fa488c67e9a4b57f0bb880d8dc3cf8030d95c"
         "c4dcb0679b95956b929c99f84ce17027bd22c47ad84f7146591b134bb407bf9ae3"
         "d2babfa7490f")
BLOCK_HASH = "91be0b51e52c17eccc898410e3f215155e0b97843a386c946fda7cb9d46bfa67"
PROPOSAL_STATEMENT = ("6368696d6572612d6d6573682f766f74652f76310094a870726f706f73616cc410"
                      "f9ebc14caf54723ac3b1ea8443470ebb00940100c42091be0b51e52c17eccc8984"
                      "10e3f215155e0b97843a386c946fda7cb9d46bfa67c0")
PROPOSAL_SIGNATURE = ("acdc23053663fb8c3818fe81c75c29e96979d4f39fa8f76e8ddab83c90eeb39adb"
                      "1ac5e0647680dd74f7f7f921e55be1c10a10cfa43a4957c782a8f109e7ac05")
PRECOMMIT_STATEMENT = ("6368696d6572612d6d6573682f766f74652f76310094a9707265636f6d6d6974c4"
                       "10f9ebc14caf54723ac3b1ea8443470ebb00930100c42091be0b51e52c17eccc89"
                       "8410e3f215155e0b97843a386c946fda7cb9d46bfa67")
PRECOMMIT_SIGNATURE = ("bdde5f47aed14aa87deeb6751bdd874efc07ce1b83217f31e8034b80eb31537e45"
                       "b8b82446520231128c3d51c4b3433a1cc4921dee8489367c80da74ad01110f")
VOTE_BODY = ("81a4766f746585a9766f74655f74797065a9707265636f6d6d6974a66865696768"
             "7401a5726f756e6400aa626c6f636b5f68617368c42091be0b51e52c17eccc8984"
             "10e3f215155e0b97843a386c946fda7cb9d46bfa67a67369676e656482a5766f74"
             "6572d934726b656f68786c756268797a6c376b73336d77747a6f73356f6c66676f"
             "636e3764776b62656737746f736561646e61706e356f61a97369676e6174757265"
             "c440bdde5f47aed14aa87deeb6751bdd874efc07ce1b83217f31e8034b80eb3153"
             "7e45b8b82446520231128c3d51c4b3433a1cc4921dee8489367c80da74ad01110f")
COMMIT = ("83a5726f756e6400a5626c6f636b85a668656967687401a565706f636800a87072"
          "6f706f736572d934726b656f68786c756268797a6c376b73336d77747a6f73356f"
          "6c66676f636e3764776b62656737746f736561646e61706e356f61ab706172656e"
          "745f68617368c42003538cb0ae8dd591b84b678c0cc55cc75978d96215cff33fca"
          "33c9f2fdfa0d20a676616c75657391c48795a86465636973696f6ed934726b656f"
          "68786c756268797a6c376b73336d77747a6f73356f6c66676f636e3764776b6265"
          "6737746f736561646e61706e356f6107c4026869c4404b086b5c5cda0fa488c67e"
          "9a4b57f0bb880d8dc3cf8030d95cc4dcb0679b95956b929c99f84ce17027bd22c4"
          "7ad84f7146591b134bb407bf9ae3d2babfa7490fab636572746966696361746581"
          "a5766f7465739182a5766f746572d934726b656f68786c756268797a6c376b7333"
          "6d77747a6f73356f6c66676f636e3764776b62656737746f736561646e61706e35"
          "6f61a97369676e6174757265c440bdde5f47aed14aa87deeb6751bdd874efc07ce"
          "1b83217f31e8034b80eb31537e45b8b82446520231128c3d51c4b3433a1cc4921d"
          "ee8489367c80da74ad01110f")
JOIN_VALUE = ("94a46a6f696ed934726b656f68786c756268797a6c376b73336d77747a6f73356f"
              "6c66676f636e3764776b62656737746f736561646e61706e356f6103c44077b781"
              "1aacb971f300e8b3ffeeaea734f8518e017c74676d02cadfb0f9ce106f28ab3763"
              "0ad99b87f731b0a13cc13a502828d760d49acd2e632191f2ef68e307")
LEGACY_JOIN_VALUE = ("93a46a6f696ed934726b656f68786c756268797a6c376b73336d77747a6f73356f"
                     "6c66676f636e3764776b62656737746f736561646e61706e356f61c4409408885b"
                     "8d85263669d73fd64d9332bdf0b48081adb97853a9d591dae980b2faddf6668515"
                     "df68d0cbe94492a168050d6cda67457e353c47e16c0c3b9b9ab70a")
VECTOR = [GENESIS_INPUT, GENESIS_HASH, DECISION_VALUE, VALUE_HASH, BLOCK, BLOCK_HASH, PROPOSAL_STATEMENT,
          PROPOSAL_SIGNATURE, PRECOMMIT_STATEMENT, PRECOMMIT_SIGNATURE, VOTE_BODY, JOIN_VALUE,
          LEGACY_JOIN_VALUE, COMMIT, TOKEN, NETWORK_ID]


def _section_16() -> str:
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    start = text.index("## 16. Worked example: consensus log")
    return text[start:text.index("\n## 17.", start)]


def test_the_verifier_imports_nothing_of_chimera():
    tree = ast.parse((Path(iv.__file__)).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {n.split(".")[0] for n in names} <= {"__future__", "base64", "hashlib", "hmac", "dataclasses",
                                                 "msgpack", "nacl"}, names


def test_the_constants_are_the_ones_section_16_prints():
    flat = re.sub(r"\s+", "", _section_16())
    for const in VECTOR:
        assert const in flat, f"{const[:24]}... is no longer in PROTOCOL.md §16"


def test_section_16_reproduces_byte_for_byte():
    key = SigningKey(SEED)
    assert iv.peer_id_of(bytes(key.verify_key)) == P
    assert iv.public_key_of(P) == bytes(key.verify_key)
    token = iv.parse_token(TOKEN)
    assert (token.name, token.genesis, token.epoch_length, token.bootstrap) == ("example", (P,), 100, ())
    assert token.network_id.hex() == NETWORK_ID
    nid = token.network_id
    assert iv.canonical([nid, [P], 100]).hex() == GENESIS_INPUT and len(bytes.fromhex(GENESIS_INPUT)) == 75
    assert token.genesis_hash.hex() == GENESIS_HASH

    # the decision value: statement, signature, value bytes, value hash
    statement = iv.statement_bytes("decision", nid, 0, [7, b"hi"])
    assert statement.hex() == DECISION_STATEMENT and len(statement) == 56
    value = iv.canonical(["decision", P, 7, b"hi", key.sign(statement).signature])
    assert value.hex() == DECISION_VALUE and len(value) == 135
    assert iv.hashlib.sha256(value).hexdigest() == VALUE_HASH
    decoded = iv.decode_value(value)
    assert decoded[:4] == ("decision", P, 7, b"hi")
    assert iv.value_valid(decoded, nid, 0, 100)

    # block 1 and its hash
    block = iv.Block(1, 0, P, token.genesis_hash, (value,))
    assert block.encode().hex() == BLOCK and len(block.encode()) == 270
    assert block.hash().hex() == BLOCK_HASH

    # the proposal and the precommit: statement bytes and deterministic signatures
    proposal = iv.statement_bytes("proposal", nid, 0, [1, 0, block.hash(), None])
    assert proposal.hex() == PROPOSAL_STATEMENT and len(proposal) == 88
    assert key.sign(proposal).signature.hex() == PROPOSAL_SIGNATURE
    precommit = iv.statement_bytes("precommit", nid, 0, [1, 0, block.hash()])
    assert precommit.hex() == PRECOMMIT_STATEMENT and len(precommit) == 88
    signature = key.sign(precommit).signature
    assert signature.hex() == PRECOMMIT_SIGNATURE
    assert iv.signature_ok(P, signature, "precommit", nid, 0, [1, 0, block.hash()])
    assert not iv.signature_ok(P, signature, "prevote", nid, 0, [1, 0, block.hash()])  # purpose-bound
    assert not iv.signature_ok(P, signature, "precommit", nid, 1, [1, 0, block.hash()])  # epoch-bound
    body = iv.canonical({"vote": {"vote_type": "precommit", "height": 1, "round": 0,
                                  "block_hash": block.hash(), "signed": {"voter": P, "signature": signature}}})
    assert body.hex() == VOTE_BODY and len(body) == 231
    vote = iv.decode_vote(iv.unpack_one(body, max_bin=64, max_str=64, max_array=16, max_map=16)["vote"])
    assert vote.signed == iv.SignedVote(P, signature) and vote.block_hash == block.hash()

    # the certificate of this one precommit passes against {P: 1000}; the commit applies
    table = iv.genesis_table(token.genesis)
    assert table.weights == {P: 1000}
    commit = iv.CertifiedCommit(0, block, (iv.SignedVote(P, signature),))
    assert iv.verify_commit(commit, table, nid) == 1000
    assert commit.encode().hex() == COMMIT and len(commit.encode()) == 441
    assert iv.decode_certified_commit(commit.encode()) == commit
    verifier = iv.LogVerifier(token)
    assert verifier.feed(iv.decode_certified_commit(commit.encode())) == 1000
    assert [(d.height, d.index, d.author, d.nonce, d.data) for d in verifier.ledger.decisions] == [
        (1, 0, P, 7, b"hi")]

    # the join values
    join_sig = key.sign(iv.statement_bytes("validator_join", nid, 3, [P])).signature
    join = iv.canonical(["join", P, 3, join_sig])
    assert join.hex() == JOIN_VALUE and len(join) == 127
    assert iv.value_valid(iv.decode_value(join), nid, 3, 100)
    assert iv.value_valid(iv.decode_value(join), nid, 4, 100)
    assert not iv.value_valid(iv.decode_value(join), nid, 5, 100)  # window: 0 <= e - 3 <= 1
    legacy_sig = key.sign(iv.statement_bytes("validator_join", nid, 0, [P])).signature
    legacy = iv.canonical(["join", P, legacy_sig])
    assert legacy.hex() == LEGACY_JOIN_VALUE and len(legacy) == 126
    assert legacy_sig == key.sign(iv.statement_bytes("validator_join", nid, 0, [P])).signature
    assert iv.value_valid(iv.decode_value(legacy), nid, 50, 100)

    # the proposer sequence of a: 3, b: 2, c: 1
    abc = iv.WeightTable(0, {"a": 3, "b": 2, "c": 1})
    assert iv.proposer_sequence(abc) == list("abacba")
    assert [iv.proposer(abc, 1, h, 0) for h in range(1, 13)] == list("abacba" * 2)
    assert [iv.proposer(abc, 1, 5, r) for r in range(4)] == list("baab")


def test_the_vector_certificate_fails_when_tampered():
    key = SigningKey(SEED)
    token = iv.parse_token(TOKEN)
    nid, table = token.network_id, iv.genesis_table(token.genesis)
    block = iv.Block(1, 0, P, token.genesis_hash, (bytes.fromhex(DECISION_VALUE),))
    signature = bytes.fromhex(PRECOMMIT_SIGNATURE)
    good = iv.CertifiedCommit(0, block, (iv.SignedVote(P, signature),))
    iv.verify_commit(good, table, nid)
    with pytest.raises(iv.VerifyError) as err:
        iv.verify_commit(replace(good, votes=()), table, nid)
    assert err.value.reason == "no_quorum"
    with pytest.raises(iv.VerifyError) as err:
        iv.verify_commit(replace(good, round=1), table, nid)
    assert err.value.reason == "bad_signature"
    with pytest.raises(iv.VerifyError) as err:
        iv.verify_commit(replace(good, votes=good.votes * 2), table, nid)
    assert err.value.reason == "duplicate_voter"
    other = SigningKey(bytes([3]) * 32)
    stranger = iv.SignedVote(iv.peer_id_of(bytes(other.verify_key)), other.sign(
        iv.statement_bytes("precommit", nid, 0, [1, 0, block.hash()])).signature)
    with pytest.raises(iv.VerifyError) as err:
        iv.verify_commit(replace(good, votes=good.votes + (stranger,)), table, nid)
    assert err.value.reason == "unknown_voter"
    assert key  # (the seed above is the vector's)
    # §14.3's example: with 3 validators of weight 1000, 2 of them are not more than 2/3
    three = [SigningKey(bytes([0x20 + i]) * 32) for i in range(3)]
    table3 = iv.WeightTable(0, {iv.peer_id_of(bytes(k.verify_key)): 1000 for k in three})
    stmt = iv.statement_bytes("precommit", nid, 0, [1, 0, block.hash()])
    votes = tuple(iv.SignedVote(iv.peer_id_of(bytes(k.verify_key)), k.sign(stmt).signature) for k in three)
    assert iv.verify_commit(replace(good, votes=votes), table3, nid) == 3000
    with pytest.raises(iv.VerifyError) as err:
        iv.verify_commit(replace(good, votes=votes[:2]), table3, nid)
    assert err.value.reason == "no_quorum"


# --- a real network -----------------------------------------------------------------------

EPOCH_LENGTH = 8
SETTINGS = ["--set", "probe_interval_s=0.3", "--set", "probe_timeout_s=0.1",
            "--set", "consensus_commit_wait_s=0", "--set", "consensus_empty_block_interval_s=0.1",
            "--set", "consensus_propose_timeout_s=1", "--set", "consensus_vote_timeout_s=0.5",
            "--log-level", "warning"]


def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "chimera.node.cli", *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """What an operator or a joining peer can fetch from a running 4-validator network, after
    a few decisions and a few epochs: the join token, every certified commit (admin
    `certificate`, its `commit_hex`), the node's log and its weight tables (`reputation`)."""
    from chimera.node.launcher import LocalNetwork

    net = LocalNetwork(tmp_path_factory.mktemp("iv"), 4, extra_args=SETTINGS, epoch_length=EPOCH_LENGTH,
                       name="verifier")
    try:
        net.start()
        assert net.wait_for(net.full_mesh, timeout_s=60, interval_s=0.1), "no full mesh"
        proposed = [net.query(i, "propose", {"data": f"decision {i}", "timeout_s": 60}) for i in range(3)]

        def changed_weights() -> bool:  # an epoch whose table the committed opinions changed
            rep = net.query(1, "reputation")
            return rep["epoch"] >= 3 and any(set(e["weights"].values()) != {1000} for e in rep["epochs"])

        assert net.wait_for(changed_weights, timeout_s=60, interval_s=0.2), \
            "no epoch changed the weights within 60 s"
        data_dir = str(net.peers[3].data_dir)
        token = _cli("network", "token", "--data-dir", data_dir).strip()
        log = net.query(3, "log", {"limit": 1000, "from_height": 1})
        top = log["height"]  # its last committed height (the network goes on meanwhile)
        commits = {h: bytes.fromhex(net.query(3, "certificate", {"height": h})["commit_hex"])
                   for h in range(1, top + 1)}
        cli_cert = json.loads(_cli("certificate", str(top), "--json", "--data-dir", data_dir))["result"]
        reputation = net.query(3, "reputation")
    finally:
        net.stop()
    return {"token": token, "commits": commits, "cli_cert": cli_cert, "log": log,
            "reputation": reputation, "proposed": proposed}


@pytest.mark.slow
def test_a_late_joiner_verifies_every_commit_from_the_token_and_the_certificates(fetched):
    token = iv.parse_token(fetched["token"])
    assert token.epoch_length == EPOCH_LENGTH and len(token.genesis) == 4
    verifier = iv.LogVerifier(token)
    commits = fetched["commits"]
    assert len(commits) >= 3 * EPOCH_LENGTH, len(commits)
    for height, raw in sorted(commits.items()):
        commit = iv.decode_certified_commit(raw)
        assert commit.encode() == raw, f"height {height}: commit_hex is not the canonical encoding"
        table = verifier.table_for(height)
        weight = verifier.feed(commit)
        assert iv.is_quorum(weight, table.total)
        if commit.round == 0:  # honest proposers: a round-0 block is built by proposer(h, 0) (§14.6)
            first = (height - 1) // EPOCH_LENGTH * EPOCH_LENGTH + 1
            assert commit.block.proposer == iv.proposer(table, first, height, 0), height
    assert verifier.height == max(commits)
    # the CLI shows the same certificate as the admin API did
    top = fetched["cli_cert"]
    assert bytes.fromhex(top["commit_hex"]) == commits[top["height"]] and top["verified"]
    # the decisions the verifier's ledger recorded are the node's log, and what propose answered
    mine = [(d.height, d.index, d.author, d.nonce, d.data.decode()) for d in verifier.ledger.decisions]
    theirs = [(d["height"], d["index"], d["author"], d["nonce"], d["data_text"])
              for d in fetched["log"]["decisions"]]
    assert mine == theirs, (mine, theirs)
    assert [(p["height"], p["nonce"]) for p in fetched["proposed"]] == [(m[0], m[3]) for m in mine[:3]]
    for row in fetched["log"]["blocks"]:
        assert verifier.block_hashes[row["height"]].hex() == row["hash"], row


@pytest.mark.slow
def test_the_verifier_derives_the_nodes_weight_tables(fetched):
    """§15.4 recomputed from the committed opinions gives the tables the node uses, including
    at least one epoch whose weights the opinions changed."""
    verifier = iv.LogVerifier(iv.parse_token(fetched["token"]))
    for _, raw in sorted(fetched["commits"].items()):
        verifier.feed(iv.decode_certified_commit(raw))
    rep = fetched["reputation"]
    assert rep["epochs"], rep
    compared = 0
    for row in rep["epochs"]:
        if row["epoch"] > verifier.ledger.table.epoch:
            continue  # (an epoch that began after the last fetched commit)
        assert row["from_height"] == row["epoch"] * EPOCH_LENGTH + 1
        assert verifier.ledger.tables[row["epoch"]].weights == row["weights"], row["epoch"]
        compared += 1
    assert compared >= 2
    assert any(set(t.weights.values()) != {1000} for t in verifier.ledger.tables.values()), \
        "no committed opinion changed a weight: the comparison proves little"


def _minimal_quorum(commit: iv.CertifiedCommit, table: iv.WeightTable) -> iv.CertifiedCommit:
    """The certificate cut to its shortest prefix that still passes the quorum."""
    votes: list[iv.SignedVote] = []
    for vote in commit.votes:
        votes.append(vote)
        if iv.is_quorum(table.weight_of(v.voter for v in votes), table.total):
            break
    return replace(commit, votes=tuple(votes))


@pytest.mark.slow
def test_the_verifier_rejects_tampered_commits(fetched):
    token = iv.parse_token(fetched["token"])
    commits = {h: iv.decode_certified_commit(raw) for h, raw in fetched["commits"].items()}
    heights = sorted(commits)
    target = next(h for h in heights if commits[h].block.values)  # a block with a decision in it
    verifier = iv.LogVerifier(token)
    for h in heights:
        if h == target:
            break
        verifier.feed(commits[h])
    table, nid = verifier.table_for(target), token.network_id
    commit = commits[target]

    def rejected(bad: iv.CertifiedCommit) -> str:
        with pytest.raises(iv.VerifyError) as err:  # through the bytes, as fetched
            verifier.check(iv.decode_certified_commit(bad.encode()))
        return err.value.reason

    minimal = _minimal_quorum(commit, table)
    assert verifier.check(minimal) > 0  # the shortest passing certificate passes ...
    assert rejected(replace(minimal, votes=minimal.votes[:-1])) == "no_quorum"  # ... one less does not
    flipped = bytearray(commit.votes[0].signature)
    flipped[10] ^= 0x01
    bad_sig = replace(commit, votes=(iv.SignedVote(commit.votes[0].voter, bytes(flipped)),) + commit.votes[1:])
    assert rejected(bad_sig) == "bad_signature"
    outsider = SigningKey(bytes(range(32)))
    signed = outsider.sign(iv.statement_bytes("precommit", nid, table.epoch,
                                              [target, commit.round, commit.block.hash()])).signature
    assert rejected(replace(commit, votes=commit.votes + (
        iv.SignedVote(iv.peer_id_of(bytes(outsider.verify_key)), signed),))) == "unknown_voter"
    value = bytearray(commit.block.values[0])
    value[-1] ^= 0x01
    changed = replace(commit, block=replace(commit.block, values=(bytes(value),) + commit.block.values[1:]))
    assert rejected(changed) == "bad_signature"  # the precommits are over the original block hash
    assert rejected(replace(commit, block=replace(commit.block, epoch=commit.block.epoch + 1))) == "wrong_epoch"
    assert rejected(replace(commit, block=replace(commit.block, parent_hash=bytes(32)))) == "bad_parent"
    # a changed block cannot be slipped in either: its successor no longer chains to it
    assert verifier.feed(commit) > 0
    follower = commits[target + 1]
    assert rejected(replace(follower, block=replace(follower.block, parent_hash=changed.block.hash()))) \
        == "bad_parent"
    assert verifier.feed(follower) > 0


# --- the ledger rules (§15.3, §15.4) against the reference, on values no live run makes --------

def _keys(n: int, first: int) -> list[SigningKey]:
    return [SigningKey(bytes([first + i]) * 32) for i in range(n)]


def _pid(key: SigningKey) -> str:
    return iv.peer_id_of(bytes(key.verify_key))


def _sign(key: SigningKey, purpose: str, nid: bytes, epoch: int, statement: list) -> bytes:
    return key.sign(iv.statement_bytes(purpose, nid, epoch, statement)).signature


def _opinion(key: SigningKey, nid: bytes, epoch: int, scores: dict[str, int], reorder: bool = False) -> bytes:
    entries = sorted(scores.items())
    op = iv.Opinion(epoch, _pid(key), tuple(entries),
                    _sign(key, "reputation_opinion", nid, epoch, [list(e) for e in entries]))
    value = iv.encode_value(("opinion", op))
    if reorder:  # the same fields, signature first: decodes under §7, but is not canonical
        value[1] = {"signature": op.signature, **{k: v for k, v in value[1].items() if k != "signature"}}
    return iv.canonical(value)


def _join(key: SigningKey, nid: bytes, epoch: int | None) -> bytes:
    if epoch is None:
        return iv.canonical(["join", _pid(key), _sign(key, "validator_join", nid, 0, [_pid(key)])])
    return iv.canonical(["join", _pid(key), epoch, _sign(key, "validator_join", nid, epoch, [_pid(key)])])


def _decision(key: SigningKey, nid: bytes, epoch: int, data: bytes) -> bytes:
    nonce = (epoch << 32) | 12345
    return iv.canonical(["decision", _pid(key), nonce, data, _sign(key, "decision", nid, 0, [nonce, data])])


def _evidence(key: SigningKey, nid: bytes, epoch: int, height: int, omit_nil: bool = False,
              heights: tuple[int, int] | None = None) -> bytes:
    """Two conflicting precommits of ``key``; ``omit_nil``: the first is nil and its map leaves
    out ``block_hash`` (a default: decodes, not canonical); ``heights``: votes of two heights."""
    votes = []
    for block_hash, h in zip((None if omit_nil else bytes(32), b"\x01" * 32), heights or (height, height)):
        sig = _sign(key, "precommit", nid, epoch, [h, 0, block_hash])
        votes.append(iv.Vote("precommit", h, 0, block_hash, iv.SignedVote(_pid(key), sig)))
    value = iv.encode_value(("evidence", tuple(votes)))
    if omit_nil:
        del value[1]["first"]["block_hash"]
    return iv.canonical(value)


def test_the_ledger_rules_agree_with_the_reference_on_joins_opinions_and_evidence():
    """Blocks built here (joins within and over the epoch's limit, legacy joins, opinion parts,
    overlapping parts, opinions of outsiders and of other epochs, non-canonical values,
    decisions of a later epoch, evidence in its epoch and late) go through the independent
    ledger and the reference one; every epoch's table, the decisions and the number of
    ignored values must agree, and the opinions must change weights."""
    from chimera.consensus.bft import CertifiedCommit
    from chimera.consensus.ledger import Ledger
    from chimera.consensus.quorum import WeightTable
    from chimera.protocol.messages import decode_fields

    L = 3
    vals, newcomers = _keys(4, 0x40), _keys(14, 0x60)
    ids = sorted(_pid(k) for k in vals)
    secret = bytes([9]) * 32
    nid = iv.network_id_of(secret)
    mine = iv.Ledger(nid, L, iv.genesis_table(ids))
    ref = Ledger(nid, WeightTable(0, {p: 1000 for p in ids}), L)
    a, b, c, d = sorted(vals, key=_pid)
    everyone = [_pid(k) for k in vals]
    scores = lambda base: {p: base + 7 * i for i, p in enumerate(everyone)}  # noqa: E731

    blocks: list[list[bytes]] = [
        # epoch 0
        [_opinion(a, nid, 0, scores(900_000)), _opinion(b, nid, 0, scores(800_000)),
         _opinion(c, nid, 0, scores(950_000)), _join(newcomers[0], nid, 0),
         _decision(a, nid, 0, b"first"), _decision(b, nid, 5, b"not yet")],
        [_opinion(a, nid, 0, {_pid(newcomers[0]): 700_000}),           # a second, disjoint part
         _opinion(b, nid, 0, {_pid(c): 10, _pid(newcomers[0]): 10}),    # overlaps b's part: all ignored
         _opinion(newcomers[1], nid, 0, {_pid(a): 0}),                  # not a validator: ignored
         _opinion(d, nid, 0, scores(600_000), reorder=True),            # not canonical: ignored
         _join(newcomers[1], nid, None), _join(newcomers[2], nid, 1),   # legacy; next epoch's
         _evidence(d, nid, 0, 2), _evidence(a, nid, 0, 2, omit_nil=True)],  # not canonical
        [_join(newcomers[0], nid, 0), _opinion(d, nid, 1, scores(1)),  # repeated join; wrong epoch
         _evidence(b, nid, 0, 1, heights=(1, 2)),                       # votes of two heights
         _decision(c, nid, 0, b"third"), _evidence(d, nid, 0, 3)],      # d marked already
        # epoch 1: weights changed; c's epoch-0 equivocation arrives late (counts once), d's
        # again (marked in epoch 0 already: ignored); low scores: the members keep less than
        # the total, which bounds the newcomers (§15.4 step 7)
        [_evidence(c, nid, 0, 1), _evidence(d, nid, 0, 4), _opinion(a, nid, 1, scores(700_000))],
        [_evidence(c, nid, 0, 2), *[_join(k, nid, 1) for k in newcomers[3:]]],
        [_opinion(b, nid, 1, scores(690_000)), _opinion(c, nid, 1, scores(710_000)),
         _join(newcomers[2], nid, 3)],
        # epoch 2
        [_opinion(a, nid, 2, {**scores(999_000), **{_pid(k): 999_000 for k in newcomers}}),
         _opinion(b, nid, 2, {**scores(999_000), **{_pid(k): 50_000 for k in newcomers}})],
        [_opinion(c, nid, 2, {**scores(999_000), **{_pid(k): 999_000 for k in newcomers}}),
         _opinion(d, nid, 2, {**scores(999_000), **{_pid(k): 999_000 for k in newcomers}})],
        [_decision(d, nid, 2, b"last")],
    ]
    # §14.4: decoding does not compare the two votes of evidence; only the voter is checked
    # without state, the rest when applied (where this one is ignored)
    two_heights = _evidence(b, nid, 0, 1, heights=(1, 2))
    assert iv.value_valid(iv.decode_value(two_heights), nid, 0, L) and ref.validate_value(two_heights)
    parent = iv.genesis_hash(nid, ids, L)
    ignored_ref, decided_ref = 0, []
    for height, values in enumerate(blocks, start=1):
        values = sorted(values, key=lambda v: iv.hashlib.sha256(v).digest())
        block = iv.Block(height, (height - 1) // L, ids[0], parent, tuple(values))
        raw = iv.CertifiedCommit(0, block, ()).encode()
        commit = decode_fields(CertifiedCommit, iv.msgpack.unpackb(raw))
        mine.apply(block)
        outcome = ref.apply(commit)
        ignored_ref += len(outcome.ignored)
        decided_ref += [(x.height, x.index, x.data) for x in outcome.decisions]
        parent = block.hash()
        if height % L == 0:
            assert mine.table.weights == dict(ref.table.weights), f"epoch {mine.table.epoch} differs"
            assert mine.table.epoch == ref.table.epoch
    assert mine.ignored == ignored_ref
    tables = [t.weights for _, t in sorted(mine.tables.items())]
    assert len(tables[1]) == 6 and tables[1][_pid(d)] == 1  # 2 joins (one legacy); d punished
    assert 6 < len(tables[2]) < 6 + 11 and tables[2][_pid(c)] == 1  # the join limit; c's late evidence
    assert tables[3] != tables[2] and len(tables[3]) == len(tables[2]), tables  # the opinions of epoch 2
    decided = [(x.height, x.index, x.data) for x in mine.decisions]
    assert decided == decided_ref and [x[2] for x in decided] == [b"first", b"third", b"last"]
    assert any(index > 0 for _, index, _ in decided)  # (the index counts the block's other values)
