"""Reputation opinions commit in their own epoch when epochs are short (PROTOCOL.md §15.3, §15.5).

A validator submits its opinion of epoch ``e`` once the height in progress reaches
``e·L + 1 + (L div 2)``; the ledger counts it only if it is committed by the epoch's last
height. Until 2026-12 the node looked for that height only once per second (its reputation
sampling timer): with 0.1 s blocks and ``epoch_length`` 4 an epoch lasts about 0.4 s, so
most epochs passed unseen, and the opinions it did send were often made at the epoch's last
height and committed in the next epoch, where they are ignored. Measured on a real 4-peer
network over 20 s (47 epochs): 0 to 2 of the 4 opinions of an epoch committed in it, never
enough for the weights to move (every table stayed at 1000). Now the height reached by a
commit triggers it.
"""

from __future__ import annotations

import collections

import msgpack
import pytest

from chimera.consensus.bft import CertifiedCommit
from chimera.consensus.ledger import decode_value
from chimera.consensus.reputation import Opinion
from chimera.node.consensus import opinion_height
from chimera.protocol.messages import decode_fields

EPOCH_LENGTH = 4
EPOCHS_CHECKED = 8  # consecutive epochs in which every validator's opinion must commit
SETTINGS = ["--set", "probe_interval_s=0.3", "--set", "probe_timeout_s=0.1",
            "--set", "consensus_commit_wait_s=0", "--set", "consensus_empty_block_interval_s=0.1",
            "--set", "consensus_propose_timeout_s=1", "--set", "consensus_vote_timeout_s=0.5",
            "--log-level", "warning"]


def test_opinion_height_is_half_way_and_leaves_two_heights_when_it_can():
    # L >= 3: half way through (the rule of releases before 2026-12 for every L >= 3)
    assert [opinion_height(0, L) for L in (3, 4, 5, 8, 100)] == [2, 3, 3, 5, 51]
    assert opinion_height(7, 100) == 7 * 100 + 1 + 50
    # L = 2: the epoch's first height (half way is its last: only that height's proposer
    # could include an opinion in time); L = 1: its only height
    assert [opinion_height(e, 2) for e in (0, 1, 5)] == [1, 3, 11]
    assert [opinion_height(e, 1) for e in (0, 1, 5)] == [1, 2, 6]
    for L in range(1, 40):  # always inside the epoch, and never later than half way
        for e in (0, 1, 9):
            h = opinion_height(e, L)
            assert e * L + 1 <= h <= e * L + 1 + L // 2


def _enough_evidence(net, ids: list[str]) -> bool:
    """Every peer holds enough local evidence (min_opinion_evidence, 1.0) about every other
    validator to score it in an opinion."""
    for i, me in enumerate(ids):
        rows = {r["peer_id"]: r for r in net.query(i, "reputation")["peers"]}
        for p in ids:
            if p != me and (p not in rows or rows[p]["evidence_positive"] + rows[p]["evidence_negative"] < 1.0):
                return False
    return True


@pytest.mark.slow
def test_every_validators_opinion_commits_in_its_epoch_with_short_epochs(tmp_path):
    from chimera.node.launcher import LocalNetwork

    L = EPOCH_LENGTH
    net = LocalNetwork(tmp_path / "net", 4, extra_args=SETTINGS, epoch_length=L, name="opinions")
    try:
        net.start()
        assert net.wait_for(net.full_mesh, timeout_s=60, interval_s=0.1), "no full mesh"
        ids = [p.peer_id for p in net.peers]
        # early in the network's life a peer may lack evidence about another one, and then
        # rightly leaves it out (PROTOCOL §15.5): the check starts after every peer has it
        assert net.wait_for(lambda: _enough_evidence(net, ids), timeout_s=60, interval_s=0.2), \
            "the peers gathered no local evidence about each other within 60 s"
        first = net.query(0, "status")["consensus"]["height"] // L + 2  # the next full epoch, and one more
        last = first + EPOCHS_CHECKED - 1
        assert net.wait_for(lambda: net.query(0, "status")["consensus"]["height"] >= (last + 2) * L,
                            timeout_s=120, interval_s=0.2), "the log did not reach the epochs checked"
        reputations = [net.query(i, "reputation") for i in range(4)]  # (the last 10 tables)
        top = (last + 2) * L
        commits = {h: decode_fields(CertifiedCommit, msgpack.unpackb(bytes.fromhex(
            net.query(0, "certificate", {"height": h})["commit_hex"]), raw=False), "commit")
            for h in range(first * L + 1, top + 1)}
    finally:
        net.stop()

    in_epoch: dict[int, set[str]] = collections.defaultdict(set)
    late = []
    for height, commit in sorted(commits.items()):
        block_epoch = (height - 1) // L
        for value in commit.block.values:
            item = decode_value(value)
            if isinstance(item, Opinion):
                if item.epoch == block_epoch:
                    in_epoch[item.epoch].add(item.author)
                    assert len(item.entries) == 3  # the three other validators, all scored
                elif item.epoch >= first:
                    late.append((item.epoch, height, item.author[:10]))
    missing = {e: sorted(p[:10] for p in set(ids) - in_epoch[e]) for e in range(first, last + 1)
               if in_epoch[e] != set(ids)}
    assert not missing and not late, \
        f"opinions missing from their epoch: {missing}; committed after it: {late}"

    # what `chimera reputation` shows: every peer derived the same tables, and they moved from
    # the genesis weight (1000) to what the validators observed of each other (honest: 1000
    # times a local score near 1)
    tables = [{e["epoch"]: e["weights"] for e in rep["epochs"]} for rep in reputations]
    common = set.intersection(*(set(t) for t in tables))
    checked = [e for e in common if first + 1 <= e <= last + 1]
    assert checked, (sorted(common), first, last)
    for epoch in checked:
        weights = tables[0][epoch]
        assert all(t[epoch] == weights for t in tables), epoch
        assert set(weights) == set(ids)
        # (early, with little evidence, a Beta score is lower: 8 good observations give 0.9;
        # a peer nobody has evidence about scores 0.5)
        assert all(500 < w < 1000 for w in weights.values()), (epoch, weights)
    for rep, me in zip(reputations, ids):
        scores = {r["peer_id"]: r["local_score"] for r in rep["peers"] if not r["me"]}
        assert set(scores) == set(ids) - {me} and all(s > 0.9 for s in scores.values()), scores
