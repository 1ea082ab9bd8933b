"""Placement core: properties (hypothesis) and a redundant run accepted by a vote certificate."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chimera.consensus.quorum import CertificateError, WeightTable
from chimera.consensus.reputation import LocalReputation, ObservationKind
from chimera.consensus.votes import BallotVote
from chimera.fabric.placement import (
    BreakerOpened,
    BreakerState,
    Cancel,
    Dispatch,
    Observe,
    Placement,
    PlacementConfig,
    RequestVote,
    TaskAccepted,
    TaskFailed,
    TaskRequirements,
    verify_task_certificate,
    wire_wall_time_ms,
)
from chimera.fabric.resources import GpuInfo, Resources
from chimera.fabric.sandbox import FabricError, Limits, SandboxEngine, error_digest
from chimera.protocol.identity import SigningIdentity
from fabric_helpers import reference_wordfreq, wasm

NETWORK_ID = b"\x07" * 16
SUBMITTER = "S" * 52  # the peer id the cores submit for (named in task ballots)
GIB = 1 << 30


def peer_ids(n: int) -> list[str]:
    return [f"peer{i:02d}" for i in range(n)]


def inventory(gpus: int, mem_gib: int = 8) -> Resources:
    return Resources(cpu_count=4, load_1m=0.5, memory_total_bytes=mem_gib * GIB,
                     memory_available_bytes=mem_gib * GIB,
                     gpus=tuple(GpuInfo(index=i, name="Test GPU", memory_total_bytes=16 * GIB,
                                        memory_used_bytes=GIB) for i in range(gpus)),
                     max_wasm_memory_bytes=GIB)


def make_core(gpu_counts: list[int], seed: int = 0, **config) -> Placement:
    core = Placement(PlacementConfig(**config), network_id=NETWORK_ID, submitter=SUBMITTER, rng=random.Random(seed))
    ids = peer_ids(len(gpu_counts))
    core.set_weights(WeightTable(3, {p: 1 + i % 3 for i, p in enumerate(ids)}))
    for peer, gpus in zip(ids, gpu_counts):
        core.update_peer(peer, inventory(gpus))
    return core


def check_invariants(core: Placement, dispatches: dict) -> None:
    for peer, leases in core.gpu_leases.items():
        res = core.peers.get(peer)
        if res is not None:
            assert set(leases) <= {g.index for g in res.gpus}, "leased a GPU the peer does not have"
        assert len(leases) == len(set(leases))
    for task in core.tasks.values():
        running = [a.peer_id for a in task.attempts.values()]
        assert len(running) == len(set(running)), "two attempts of one task on one peer"
        assert not set(running) & set(task.results)
        assert len(task.results) <= task.req.replicas


ops = st.lists(st.tuples(st.sampled_from(["submit", "result", "fail", "tick"]), st.integers(0, 3),
                         st.integers(1, 3), st.integers(0, 2)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gpu_counts=st.lists(st.integers(0, 2), min_size=1, max_size=6), script=ops, seed=st.integers(0, 2**16))
def test_never_oversubscribes_gpus_and_replicas_distinct(gpu_counts, script, seed):
    core = make_core(gpu_counts, seed, max_retries=2, breaker_failures=2)
    now = 0.0
    in_flight: list[Dispatch] = []
    n_tasks = 0
    for op, gpus, replicas, pick in script:
        now += 0.5
        if op == "submit":
            n_tasks += 1
            req = TaskRequirements(fuel=1000, memory_bytes=1 << 20, wall_time_s=5.0, gpus=gpus % 3,
                                   replicas=replicas)
            actions = core.submit(f"t{n_tasks}", req, now)
        elif op in ("result", "fail") and in_flight:
            d = in_flight.pop(pick % len(in_flight))
            actions = (core.on_result(d.task_id, d.attempt, d.peer_id, b"\x01" * 32, now) if op == "result"
                       else core.on_failure(d.task_id, d.attempt, d.peer_id, "crashed", now))
        else:
            now += 3.0
            actions = core.tick(now)
        for a in actions:
            if isinstance(a, Dispatch):
                task = core.tasks[a.task_id]
                res = core.peers[a.peer_id]
                # a GPU task only goes where the peer has that many GPUs, each one free
                assert len(a.gpu_indices) == task.req.gpus
                assert set(a.gpu_indices) <= {g.index for g in res.gpus}
                leases = core.gpu_leases[a.peer_id]
                assert all(leases[i] == (a.task_id, a.attempt) for i in a.gpu_indices)
                in_flight.append(a)
            elif isinstance(a, Cancel):
                in_flight[:] = [d for d in in_flight if not (d.task_id == a.task_id and d.attempt == a.attempt)]
        # at every step: each GPU leased at most once
        seen = set()
        for d in in_flight:
            for i in d.gpu_indices:
                assert (d.peer_id, i) not in seen, "GPU oversubscribed"
                seen.add((d.peer_id, i))
        check_invariants(core, {})


@settings(max_examples=40, deadline=None)
@given(gpu_counts=st.lists(st.integers(0, 2), min_size=1, max_size=6), gpus=st.integers(1, 2),
       replicas=st.integers(1, 4), seed=st.integers(0, 1000))
def test_gpu_task_only_on_peers_with_free_gpu(gpu_counts, gpus, replicas, seed):
    core = make_core(gpu_counts, seed)
    actions = core.submit("t", TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1, gpus=gpus,
                                                replicas=replicas), 0.0)
    dispatched = [a for a in actions if isinstance(a, Dispatch)]
    capable = [p for p, n in zip(peer_ids(len(gpu_counts)), gpu_counts) if n >= gpus]
    if len(capable) < replicas:
        assert actions == [TaskFailed("t", "unsatisfiable", actions[0].detail)]
    else:
        assert len(dispatched) == replicas
        assert len({d.peer_id for d in dispatched}) == replicas  # k distinct peers
        assert all(d.peer_id in capable and len(d.gpu_indices) == gpus for d in dispatched)


def test_breaker_opens_after_failures_and_half_opens():
    core = make_core([0], breaker_failures=2, breaker_open_s=5.0, max_retries=10, queue_timeout_s=100)
    peer = peer_ids(1)[0]
    req = TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1.0)
    opened = []
    for n in range(2):  # (submitting t1 also ends t0, which has no untried peer left)
        (d,) = [a for a in core.submit(f"t{n}", req, float(n)) if isinstance(a, Dispatch)]
        opened += [a for a in core.on_failure(d.task_id, d.attempt, peer, "crashed", float(n))
                   if isinstance(a, BreakerOpened)]
    assert opened == [BreakerOpened(peer, 5.0, 2)]  # announced once, when it opens
    assert core.breaker(peer).current(2.0) is BreakerState.OPEN
    assert core.candidates(req, 2.0) == []  # open: no work for it
    actions = core.submit("t9", req, 2.0)
    assert not [a for a in actions if isinstance(a, Dispatch)]  # queued, waiting for capacity
    assert core.next_deadline() is not None and core.next_deadline() <= 7.0
    (trial,) = [a for a in core.tick(7.5) if isinstance(a, Dispatch) and a.task_id == "t9"]
    assert core.breaker(peer).current(7.5) is BreakerState.HALF_OPEN and core.candidates(req, 7.5) == []
    again = core.on_failure("t9", trial.attempt, peer, "crashed", 7.6)   # trial failed: open again, twice as long
    assert [a for a in again if isinstance(a, BreakerOpened)] == [BreakerOpened(peer, 10.0, 3)]
    assert core.breaker(peer).current(7.6) is BreakerState.OPEN and core.breaker(peer).open_for_s == 10.0
    assert core.candidates(req, 17.0) == []
    # each peer runs one attempt of a task at most, so t9 has no peer left; a new task gets the trial
    (retry,) = [a for a in core.submit("t10", req, 18.0) if isinstance(a, Dispatch)]
    core.on_result("t10", retry.attempt, peer, b"\x02" * 32, 18.1)
    assert core.breaker(peer).current(18.1) is BreakerState.CLOSED


def test_timeout_retries_elsewhere_with_backoff():
    core = make_core([0, 0, 0], seed=3, max_retries=1)
    (d,) = core.submit("t", TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1.0), 0.0)
    assert d.deadline == pytest.approx(3.0)
    actions = core.tick(3.0)
    assert [type(a) for a in actions] == [Cancel]      # no reputation observation for a timeout
    retry_at = core.next_deadline()
    assert 3.0 < retry_at <= 3.0 + 0.2 * 1.5
    (again,) = core.tick(retry_at)
    assert isinstance(again, Dispatch) and again.peer_id != d.peer_id
    final = core.tick(again.deadline)
    assert isinstance(final[-1], TaskFailed) and final[-1].reason == "retries_exhausted"
    assert core.next_deadline() is None


# ------------------------------------------------------------ redundant run


class Peer:
    """An in-process stand-in for a peer: its identity, its sandbox, a test hook to lie."""

    def __init__(self, sandbox: SandboxEngine, wrong: bool = False) -> None:
        self.identity = SigningIdentity.generate()
        self.sandbox = sandbox
        self.wrong = wrong
        self.digests: dict[str, bytes] = {}

    def execute(self, task_id: str, module, stdin: bytes, limits: Limits) -> bytes:
        try:
            result = self.sandbox.run_task(module, stdin, limits=limits)
            digest = result.digest()
        except FabricError as exc:
            digest = error_digest(exc.reason)
        if self.wrong:  # test hook: this peer returns a wrong result
            digest = bytes(32)
        self.digests[task_id] = digest
        return digest

    def vote(self, req: RequestVote) -> BallotVote:
        assert req.digest == self.digests[req.task_id]  # a peer signs only what it computed
        return BallotVote.sign(self.identity, req.ballot, req.digest, NETWORK_ID)


def test_redundant_run_accepts_right_result_with_certificate(tmp_path):
    with SandboxEngine(tmp_path / "cache") as sandbox:
        peers = [Peer(sandbox), Peer(sandbox, wrong=True), Peer(sandbox)]
        by_id = {p.identity.peer_id: p for p in peers}
        core = Placement(PlacementConfig(), network_id=NETWORK_ID, submitter=SUBMITTER, rng=random.Random(11))
        core.set_weights(WeightTable(4, {pid: 2 for pid in by_id}))
        for pid in by_id:
            core.update_peer(pid, inventory(0))
        module = sandbox.compile(wasm("wordfreq"))
        text = b"to be or not to be that is the question"
        req = TaskRequirements(fuel=50_000_000, memory_bytes=16 << 20, wall_time_s=10, replicas=3, rule="majority")
        limits = Limits(fuel=req.fuel, memory_bytes=req.memory_bytes, wall_time_s=req.wall_time_s)
        reputation = LocalReputation()
        outcome: list = []
        queue = list(core.submit("wf-1", req, 0.0))
        now = 0.0
        while queue:
            action = queue.pop(0)
            now += 0.01
            if isinstance(action, Dispatch):
                digest = by_id[action.peer_id].execute(action.task_id, module, text, limits)
                queue += core.on_result(action.task_id, action.attempt, action.peer_id, digest, now)
            elif isinstance(action, RequestVote):
                queue += core.on_vote(action.task_id, by_id[action.peer_id].vote(action), now)
            elif isinstance(action, Observe):
                reputation.observe(action.peer_id, action.kind, now)
                outcome.append(action)
            elif isinstance(action, (TaskAccepted, TaskFailed)):
                outcome.append(action)
        accepted = [a for a in outcome if isinstance(a, TaskAccepted)]
        assert len(accepted) == 1
        acc = accepted[0]
        wrong_id = peers[1].identity.peer_id
        right = sandbox.run_task(module, text)
        assert right.stdout == reference_wordfreq(text)
        assert acc.digest == right.digest()
        assert acc.disagreeing == (wrong_id,) and len(acc.agreeing) == 2
        verify_task_certificate(acc.certificate, acc.table, NETWORK_ID, "wf-1", submitter=SUBMITTER)
        assert set(acc.certificate.voters()) <= set(acc.agreeing)
        with pytest.raises(CertificateError):
            verify_task_certificate(acc.certificate, acc.table, NETWORK_ID, "another-task", submitter=SUBMITTER)
        with pytest.raises(CertificateError):  # the same task id of another submitter
            verify_task_certificate(acc.certificate, acc.table, NETWORK_ID, "wf-1", submitter="T" * 52)
        assert acc.certificate.ballot.purpose.startswith(f"task {SUBMITTER} wf-1 replicas ")
        observed = {(o.peer_id, o.kind) for o in outcome if isinstance(o, Observe)}
        assert (wrong_id, ObservationKind.TASK_DISAGREE) in observed
        assert all((pid, ObservationKind.TASK_AGREE) in observed for pid in acc.agreeing)
        assert reputation.score(wrong_id, now) < reputation.score(acc.agreeing[0], now)


def test_a_vote_for_a_digest_the_voter_did_not_report_is_refused_and_observed():
    core = make_core([0, 0, 0])
    idents = [SigningIdentity.generate() for _ in range(3)]
    core = Placement(PlacementConfig(), network_id=NETWORK_ID, submitter=SUBMITTER, rng=random.Random(2))
    core.set_weights(WeightTable(1, {i.peer_id: 1 for i in idents}))
    for i in idents:
        core.update_peer(i.peer_id, inventory(0))
    by_id = {i.peer_id: i for i in idents}
    dispatches = core.submit("t", TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1, replicas=3), 0.0)
    votes = []
    for d in dispatches:
        votes += core.on_result("t", d.attempt, d.peer_id, b"\x05" * 32, 0.1)
    liar = votes[0]
    # a vote for a digest it never reported: not counted, an equivocation (its signed result and its
    # signed vote conflict), observed once however often it is sent
    other = BallotVote.sign(by_id[liar.peer_id], liar.ballot, b"\x06" * 32, NETWORK_ID)
    actions = core.on_vote("t", other, 0.2) + core.on_vote("t", other, 0.2)
    assert actions == [Observe(liar.peer_id, ObservationKind.EQUIVOCATION, "t",
                               "voted for a digest other than the one it reported")]
    assert core.tasks["t"].tally.voters() == frozenset() and core.counters["vote_not_reported_digest"] == 2
    # a forged one (bad signature) is no evidence against the peer it names
    forged = BallotVote(ballot_id=other.ballot_id, choice=b"\x07" * 32, voter=liar.peer_id, signature=b"\0" * 64)
    assert not any(isinstance(a, Observe) for a in core.on_vote("t", forged, 0.2))
    # its vote for the digest it reported still counts
    core.on_vote("t", BallotVote.sign(by_id[liar.peer_id], liar.ballot, b"\x05" * 32, NETWORK_ID), 0.2)
    assert core.tasks["t"].tally.voters() == {liar.peer_id}


def test_lost_vote_requests_are_repeated_and_finished_tasks_leave_the_core():
    idents = [SigningIdentity.generate() for _ in range(3)]
    core = Placement(PlacementConfig(vote_retry_s=1.0, vote_timeout_s=10.0, finished_kept=2),
                     network_id=NETWORK_ID, submitter=SUBMITTER, rng=random.Random(3))
    core.set_weights(WeightTable(1, {i.peer_id: 1 for i in idents}))
    for i in idents:
        core.update_peer(i.peer_id, inventory(0))
    by_id = {i.peer_id: i for i in idents}
    req = TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1, replicas=3)
    requests = []
    for d in core.submit("t", req, 0.0):
        requests += core.on_result("t", d.attempt, d.peer_id, b"\x05" * 32, 0.1)
    assert len(requests) == 3 and core.next_deadline() == pytest.approx(1.1)
    first = requests[0]  # only this replica's request (and vote) got through
    assert core.on_vote("t", BallotVote.sign(by_id[first.peer_id], first.ballot, b"\x05" * 32, NETWORK_ID), 0.2) == []
    again = core.tick(1.2)
    assert sorted(a.peer_id for a in again) == sorted(r.peer_id for r in requests[1:])
    assert all(isinstance(a, RequestVote) and a.ballot == first.ballot for a in again)
    assert core.tick(1.5) == []  # not before another vote_retry_s
    done = core.on_vote("t", BallotVote.sign(by_id[again[0].peer_id], again[0].ballot, b"\x05" * 32, NETWORK_ID),
                        1.6)
    assert any(isinstance(a, TaskAccepted) for a in done)
    assert "t" not in core.tasks and core.view("t").state == "done" and core.next_deadline() is None
    assert core.on_vote("t", BallotVote.sign(by_id[again[1].peer_id], again[1].ballot, b"\x05" * 32,
                                             NETWORK_ID), 1.7) == []  # late: ignored, counted
    with pytest.raises(Exception):
        core.submit("t", req, 2.0)  # a finished id is still known
    for k in range(3):  # only the last finished_kept views stay
        core.submit(f"u{k}", TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1, replicas=4), 2.0)
    assert list(core.finished) == ["u1", "u2"] and not core.tasks
    with pytest.raises(KeyError):
        core.view("t")


def test_placement_core_is_pure():
    """fabric/placement.py and fabric/resources.py follow DESIGN.md's pure-core rules."""
    import ast
    from pathlib import Path

    banned = {"os", "time", "asyncio", "zmq", "psutil", "pynvml", "wasmtime", "socket", "sqlite3", "threading",
              "subprocess", "pathlib"}
    root = Path(__file__).resolve().parent.parent / "fabric"
    for name in ("placement.py", "resources.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & banned, f"{name} imports {banned}"
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] not in banned, f"{name} imports {node.module}"
                assert not node.module.startswith(("chimera.fabric.probes", "chimera.fabric.sandbox"))
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module in ("resources",), f"{name} imports .{node.module}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "random":
                raise AssertionError(f"{name}:{node.lineno} uses module-level random")


# ------------------------------------------------------------ thresholds, slots, refusals, deadlines


def test_a_threshold_the_rule_does_not_allow_is_refused_when_the_task_is_described():
    from fractions import Fraction

    from chimera.consensus.votes import Ballot
    from chimera.fabric.placement import check_threshold
    from chimera.protocol.errors import LocalProtocolError

    base = dict(fuel=1, memory_bytes=1 << 20, wall_time_s=1.0)
    for rule, bad in (("majority", Fraction(1, 3)), ("weighted", Fraction(1)), ("quorum", Fraction(1)),
                      ("unanimous", Fraction(1, 2)), ("majority", Fraction(0)), ("majority", 0.75),
                      ("quorum", Fraction(2**33 - 1, 2**33))):
        with pytest.raises(LocalProtocolError) as err:
            TaskRequirements(**base, rule=rule, threshold=bad)
        assert rule in str(err.value) or "fraction" in str(err.value) or "2**32" in str(err.value)
    for rule, good in (("majority", Fraction(1, 2)), ("quorum", Fraction(2, 3)), ("weighted", Fraction(9, 10)),
                       ("unanimous", Fraction(1)), ("unanimous", 1), ("quorum", None)):
        TaskRequirements(**base, rule=rule, threshold=good)
        # the same rule as the ballot's own
        assert check_threshold(rule, good) == Ballot.create(epoch=0, purpose="", rule=rule, threshold=good).threshold


def test_a_ballot_that_cannot_open_fails_the_task_instead_of_leaving_it_running():
    from fractions import Fraction

    core = make_core([0])
    req = TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1.0, rule="majority")
    object.__setattr__(req, "threshold", Fraction(1, 3))  # past the check (defence in depth)
    (d,) = core.submit("t", req, 0.0)
    actions = core.on_result("t", d.attempt, d.peer_id, b"\x01" * 32, 0.5)
    (failed,) = [a for a in actions if isinstance(a, TaskFailed)]
    assert failed.reason == "invalid_ballot" and "threshold" in failed.detail
    assert "t" not in core.tasks and core.view("t").state == "failed" and core.next_deadline() is None


def slot_core(n: int, slots: int, seed: int = 0, **config) -> Placement:
    core = Placement(PlacementConfig(**config), network_id=NETWORK_ID, submitter=SUBMITTER, rng=random.Random(seed))
    ids = peer_ids(n)
    core.set_weights(WeightTable(1, {p: 1 for p in ids}))
    for p in ids:
        core.update_peer(p, inventory(0, mem_gib=64), task_slots=slots, tasks_running=0)
    return core


def test_a_burst_waits_for_free_slots_instead_of_over_dispatching():
    core = slot_core(3, slots=2, queue_timeout_s=5.0)
    req = TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=10.0)
    dispatched: list[Dispatch] = []
    for i in range(20):
        dispatched += [a for a in core.submit(f"t{i:02d}", req, 0.0) if isinstance(a, Dispatch)]
    per_peer = {p: sum(1 for d in dispatched if d.peer_id == p) for p in peer_ids(3)}
    assert per_peer == {p: 2 for p in peer_ids(3)}  # 6 slots, 14 tasks wait here
    assert [d.task_id for d in dispatched] == [f"t{i:02d}" for i in range(6)]
    # the peer's next advertisement counts this core's own attempts: no room appears twice
    core.update_peer("peer00", inventory(0, mem_gib=64), task_slots=2, tasks_running=2)
    assert core.free_slots("peer00") == 0 and not [a for a in core.tick(0.1) if isinstance(a, Dispatch)]
    # a result frees the slot: the oldest waiting task takes it at once
    first = next(d for d in dispatched if d.peer_id == "peer00")
    nxt = [a for a in core.on_result(first.task_id, first.attempt, "peer00", b"\x01" * 32, 1.0)
           if isinstance(a, Dispatch)]
    assert [(a.task_id, a.peer_id) for a in nxt] == [("t06", "peer00")]
    # another submitter's attempts fill the slots it advertises
    core.update_peer("peer01", inventory(0, mem_gib=64), task_slots=4, tasks_running=4)  # 2 of them ours
    assert core.free_slots("peer01") == 0
    # no room within queue_timeout_s: the waiting tasks fail, the running ones go on
    out = core.tick(6.0)
    assert sorted(a.task_id for a in out if isinstance(a, TaskFailed) and a.reason == "no_capacity") == \
        [f"t{i:02d}" for i in range(7, 20)]
    assert not [a for a in out if not isinstance(a, (TaskFailed, RequestVote))] and len(core.tasks) == 7  # t00 votes


def test_refusals_that_are_not_the_replicas_fault_are_retried_without_blame():
    core = slot_core(3, slots=2, max_retries=10)
    req = TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1.0)
    for n, reason in enumerate(["busy"] * 5 + ["gpu_unavailable"] * 5):
        (d,) = [a for a in core.submit(f"b{n}", req, float(n)) if isinstance(a, Dispatch)]
        actions = core.on_failure(d.task_id, d.attempt, d.peer_id, reason, float(n))
        assert not [a for a in actions if isinstance(a, (Observe, BreakerOpened))], reason
        assert core.breaker(d.peer_id).failures == 0
        if reason == "busy":  # its slots are full until it advertises again
            assert core.free_slots(d.peer_id) == 0
            # its advertisement says it was full (other submitters' attempts): an honest refusal
            core.update_peer(d.peer_id, inventory(0, mem_gib=64), task_slots=2, tasks_running=2)
            assert core.trusted_slots(d.peer_id) == 2
        (retry,) = [a for a in core.tick(float(n) + 0.5) if isinstance(a, Dispatch) and a.task_id == f"b{n}"]
        assert retry.peer_id != d.peer_id  # retried elsewhere
        core.on_result(retry.task_id, retry.attempt, retry.peer_id, b"\x01" * 32, float(n) + 0.6)
        core.update_peer(d.peer_id, inventory(0, mem_gib=64), task_slots=2, tasks_running=0)  # room again
    assert core.counters["attempt_busy"] == 5 and core.counters["attempt_gpu_unavailable"] == 5


def test_refusals_for_room_use_no_retry_and_the_peer_is_tried_again():
    """Busy peers (another submitter's attempts in their slots) used up the task's retries and,
    counted as tried, its peers: with 2 peers and max_retries=1 the third busy refusal failed
    the task ``retries_exhausted`` though nobody had done anything wrong."""
    core = slot_core(2, slots=1, max_retries=1, queue_timeout_s=60.0)
    req = TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1.0)
    (d,) = [a for a in core.submit("t", req, 0.0) if isinstance(a, Dispatch)]
    now, refused_by = 0.0, []
    for _ in range(6):  # both peers refuse, alternately, three times each
        refused_by.append(d.peer_id)
        assert not [a for a in core.on_failure("t", d.attempt, d.peer_id, "busy", now) if isinstance(a, TaskFailed)]
        # it advertises that it was full (an honest refusal), then room again
        core.update_peer(d.peer_id, inventory(0, mem_gib=64), task_slots=1, tasks_running=1)
        core.update_peer(d.peer_id, inventory(0, mem_gib=64), task_slots=1, tasks_running=0)
        now = core.next_deadline()
        (d,) = [a for a in core.tick(now) if isinstance(a, Dispatch)]
        assert d.peer_id != refused_by[-1] or len(set(refused_by)) == 2  # another peer first
    assert set(refused_by) == set(peer_ids(2)) and core.counters["attempt_busy"] == 6
    done = core.on_result("t", d.attempt, d.peer_id, b"\x01" * 32, now)
    assert [a for a in done if isinstance(a, RequestVote)] and not core.breaker(d.peer_id).failures
    # the one GPU peer's GPUs are leased by another submitter: the task waits for them
    gpu = slot_core(1, slots=4, max_retries=0, queue_timeout_s=30.0)
    gpu.update_peer(peer_ids(1)[0], inventory(1, mem_gib=64), task_slots=4, tasks_running=0)
    (g,) = [a for a in gpu.submit("g", TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1.0, gpus=1),
                                  0.0) if isinstance(a, Dispatch)]
    assert not gpu.on_failure("g", g.attempt, g.peer_id, "gpu_unavailable", 0.1)  # was: failed at once
    (g2,) = [a for a in gpu.tick(gpu.next_deadline()) if isinstance(a, Dispatch)]
    assert g2.peer_id == g.peer_id and g2.attempt == g.attempt + 1
    # a peer that keeps refusing: the wait ends at queue_timeout_s after submission
    t = 0.1
    while "g" in gpu.tasks:
        acts = gpu.on_failure("g", g2.attempt, g2.peer_id, "gpu_unavailable", t)
        while "g" in gpu.tasks and not [a for a in acts if isinstance(a, Dispatch)]:
            t = gpu.next_deadline()
            acts = gpu.tick(t)
        failed = [a for a in acts if isinstance(a, TaskFailed)]
        if failed:
            assert failed[0].reason == "no_capacity" and 30.0 <= t <= 41.0, (failed, t)
            break
        (g2,) = [a for a in acts if isinstance(a, Dispatch)]
    assert "g" not in gpu.tasks


@pytest.mark.parametrize("reason, after_s, blamed, counted", [
    ("busy", 0.5, False, False),                # room taken by other submitters
    ("gpu_unavailable", 0.5, False, False),
    ("over_capacity", 0.5, False, True),        # was task_disagree: a capacity refusal, not a wrong result
    ("module_unavailable", 0.5, False, True),
    ("internal_error", 0.5, False, True),       # was task_disagree: its host failed, it computed nothing
    ("deadline_exceeded", 1.0, False, False),   # was counted: the task's own wall time ran out there
    ("deadline_exceeded", 0.99, False, False),  # within the tolerance (whole ms on the wire, clock rates)
    ("deadline_exceeded", 0.5, False, True),    # sooner than the wall time allows: cannot be true
    ("inconsistent_digest", 0.5, True, True),   # its digest does not match its own result
    ("crashed", 0.5, True, True),               # a reason no honest peer sends
])
def test_each_refusal_costs_reputation_only_for_a_wrong_answer_and_counts_as_the_table_says(
        reason, after_s, blamed, counted):
    core = slot_core(1, slots=8, breaker_failures=1, max_retries=0)
    (d,) = core.submit("t", TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1.0), 0.0)
    acts = core.on_failure("t", d.attempt, d.peer_id, reason, after_s)
    observed = [a for a in acts if isinstance(a, Observe)]
    assert observed == ([Observe(d.peer_id, ObservationKind.TASK_DISAGREE, "t", f"failed: {reason}")]
                        if blamed else [])
    assert bool([a for a in acts if isinstance(a, BreakerOpened)]) is counted
    assert (core.breaker(d.peer_id).current(after_s) is BreakerState.OPEN) is counted


def run_until_finished(core: Placement, task_id: str, first: list, outcome, now: float) -> tuple[list, float]:
    """Answer every attempt of ``task_id`` with ``outcome(dispatch)`` -> (reason, seconds after
    dispatch); tick through the backoffs until the task ends. Returns (all actions, now)."""
    seen, pending = list(first), [a for a in first if isinstance(a, Dispatch) and a.task_id == task_id]
    while task_id in core.tasks:
        if pending:
            d = pending.pop(0)
            reason, after_s = outcome(d)
            now = max(now, d.deadline - d.timeout_s + after_s)
            acts = core.on_failure(task_id, d.attempt, d.peer_id, reason, now)
        else:
            now = core.next_deadline()
            acts = core.tick(now)
        seen += acts
        pending += [a for a in acts if isinstance(a, Dispatch) and a.task_id == task_id]
    return seen, now


@pytest.mark.parametrize("peers", [2, 6])  # out of peers first / out of retries first
def test_a_task_that_always_runs_past_its_deadline_fails_deadline_exceeded_and_opens_no_breaker(peers):
    """A module that loops is the user's bug: every replica reports ``deadline_exceeded`` after the
    task's wall time. Was: each report counted for the peer's breaker, so a few such tasks opened
    the breaker of every peer they ran on, and the task failed ``retries_exhausted``."""
    core = slot_core(peers, slots=8, breaker_failures=2, max_retries=3)
    req = TaskRequirements(fuel=10**9, memory_bytes=1 << 20, wall_time_s=2.0)
    everything, now = [], 0.0
    for n in range(4):
        first = core.submit(f"loop{n}", req, now)
        seen, now = run_until_finished(core, f"loop{n}", first, lambda d: ("deadline_exceeded", 2.0 + 0.01), now)
        everything += seen
        failed = [a for a in seen if isinstance(a, TaskFailed)]
        assert [a.reason for a in failed] == ["deadline_exceeded"], failed
        tried = min(peers, 4)  # each peer once; at most max_retries + 1 attempts
        assert failed[0].detail.startswith(f"{tried} of {tried} failed attempts ran past the task's wall time (2 s)")
    assert not [a for a in everything if isinstance(a, (BreakerOpened, Observe))]
    assert all(b.current(now) is BreakerState.CLOSED and b.failures == 0 for b in core.breakers.values())
    # the peers still take work at once
    assert len([a for a in core.submit("ok", req, now) if isinstance(a, Dispatch)]) == 1


def test_a_task_whose_failures_are_mostly_not_deadlines_fails_retries_exhausted():
    core = slot_core(4, slots=8, max_retries=2)
    req = TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=2.0)
    reasons = iter(["deadline_exceeded", "internal_error", "module_unavailable"])
    seen, _ = run_until_finished(core, "t", core.submit("t", req, 0.0), lambda d: (next(reasons), 2.0), 0.0)
    assert [(a.reason, a.detail) for a in seen if isinstance(a, TaskFailed)] == \
        [("retries_exhausted", "3 failed attempts, last: module_unavailable")]


def test_a_peer_that_never_answers_still_opens_its_breaker():
    """Unlike a reported deadline, no answer at all within wall time + slack is the peer's
    (or its link's) failure: it counts for the breaker (and costs no reputation by default)."""
    core = slot_core(1, slots=8, breaker_failures=2, max_retries=0)
    req = TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1.0)
    opened = []
    for n in range(2):
        # 20 s apart: a timeout also leaves the peer trusted with no slot for slot_trust_recovery_s
        (d,) = [a for a in core.submit(f"t{n}", req, 20.0 * n) if isinstance(a, Dispatch)]
        acts = core.tick(d.deadline)
        assert [a.reason for a in acts if isinstance(a, TaskFailed)] == ["retries_exhausted"]
        assert not [a for a in acts if isinstance(a, Observe)]
        opened += [a for a in acts if isinstance(a, BreakerOpened)]
    assert opened == [BreakerOpened("peer00", 5.0, 2)]


@pytest.mark.parametrize("end", ["busy", "deadline_exceeded", "cancel"])
def test_a_half_open_trial_that_ends_uncounted_lets_the_next_call_through(end):
    """Was: the breaker waited for its trial forever when the trial ended with an outcome it does
    not count (a ``busy`` refusal, the task's own deadline, a cancel): no work reached the peer again."""
    core = slot_core(1, slots=8, breaker_failures=1, breaker_open_s=5.0, max_retries=0)
    req = TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1.0)
    (d,) = core.submit("x", req, 0.0)
    core.on_failure("x", d.attempt, d.peer_id, "crashed", 0.5)   # opens the breaker
    assert core.submit("t", req, 1.0) == []                       # waits for the peer
    (trial,) = [a for a in core.tick(6.0) if isinstance(a, Dispatch)]
    assert core.breaker("peer00").trial_in_flight and core.candidates(req, 6.0) == []
    if end == "cancel":
        core.cancel("t", 7.0)
    else:
        core.on_failure("t", trial.attempt, "peer00", end, 7.0)
    if end == "busy":  # its slots count as full until it advertises again (full: an honest refusal)
        core.update_peer("peer00", inventory(0, mem_gib=64), task_slots=8, tasks_running=8)
        core.update_peer("peer00", inventory(0, mem_gib=64), task_slots=8, tasks_running=0)
    assert core.breaker("peer00").current(7.0) is BreakerState.HALF_OPEN
    assert core.candidates(req, 7.0) == ["peer00"]  # the next call is the trial
    (nxt,) = [a for a in core.submit("u", req, 7.0) if isinstance(a, Dispatch)]
    core.on_result("u", nxt.attempt, "peer00", b"\x01" * 32, 7.5)
    assert core.breaker("peer00").current(7.5) is BreakerState.CLOSED


def test_next_deadline_is_not_in_the_past_while_a_replica_waits_with_another_in_flight():
    """Audit r1: a 2-replica task, one attempt in flight, no room for the other: the queue
    timeout is not reported once past (tick does nothing about it while an attempt runs)."""
    core = Placement(PlacementConfig(), network_id=NETWORK_ID, submitter=SUBMITTER, rng=random.Random(1))
    core.set_weights(WeightTable(1, {"a": 1, "b": 1}))
    core.update_peer("a", inventory(0))
    core.update_peer("b", Resources(cpu_count=4, memory_total_bytes=8 * GIB, memory_available_bytes=0,
                                    max_wasm_memory_bytes=GIB))
    (d,) = core.submit("t1", TaskRequirements(fuel=10, memory_bytes=64 << 20, wall_time_s=600, replicas=2), 0.0)
    assert core.next_deadline() == d.deadline  # 602: the attempt's timeout
    for now in (31.0, 31.005):
        assert core.tick(now) == [] and core.next_deadline() > now
    # the attempt ends: now the queue timeout applies (it is past: the task fails)
    out = core.on_result("t1", d.attempt, "a", b"\x01" * 32, 40.0)
    assert [a.reason for a in out if isinstance(a, TaskFailed)] == ["no_capacity"]


def test_a_removed_peers_breaker_is_forgotten_and_reopen_times_are_current():
    """Audit r2: an open breaker of a removed peer kept reporting a past reopen time."""
    core = Placement(PlacementConfig(max_retries=10), network_id=NETWORK_ID, submitter=SUBMITTER, rng=random.Random(1))
    core.set_weights(WeightTable(1, {"a": 1, "b": 1}))
    core.update_peer("b", inventory(0))
    req = TaskRequirements(fuel=10, memory_bytes=1 << 20, wall_time_s=1)
    for i in range(3):
        (d,) = [a for a in core.submit(f"x{i}", req, 0.0) if isinstance(a, Dispatch)]
        core.on_failure(d.task_id, d.attempt, "b", "crashed", 0.0)
        core.cancel(d.task_id, 0.0)
    assert core.breaker("b").current(0.0) is BreakerState.OPEN and core.breaker("b").reopens_at() == 5.0
    assert core.breaker("b").reopens_at(6.0) is None  # with now: half-open by then
    core.update_peer("b", inventory(0))
    core.breaker("b").on_failure(6.0)   # the half-open trial failed: open again
    core.remove_peer("b", 6.0)
    assert "b" not in core.breakers
    core.update_peer("a", Resources(cpu_count=4, memory_total_bytes=8 * GIB, memory_available_bytes=0,
                                    max_wasm_memory_bytes=GIB))  # a has no room now: the task waits
    assert core.submit("t", req, 100.0) == []
    assert core.next_deadline() == pytest.approx(130.0)
    assert core.tick(100.01) == [] and core.next_deadline() == pytest.approx(130.0)


REASONS = ["crashed", "busy", "gpu_unavailable", "module_unavailable", "deadline_exceeded", "inconsistent_digest",
           "over_capacity", "internal_error"]
deadline_ops = st.lists(st.tuples(
    st.sampled_from(["submit", "result", "fail", "tick", "advertise", "remove", "readd"]),
    st.integers(0, 7), st.integers(1, 3), st.floats(0.0, 40.0)), min_size=1, max_size=50)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=deadline_ops, seed=st.integers(0, 2**16))
def test_after_a_tick_the_next_deadline_is_never_in_the_past_and_slots_are_respected(script, seed):
    ids = peer_ids(4)
    core = Placement(PlacementConfig(max_retries=3, breaker_failures=2, queue_timeout_s=20.0, vote_timeout_s=5.0),
                     network_id=NETWORK_ID, submitter=SUBMITTER, rng=random.Random(seed))
    core.set_weights(WeightTable(1, {p: 1 for p in ids}))
    for p in ids:
        core.update_peer(p, inventory(1, mem_gib=1 if p == ids[3] else 8), task_slots=2, tasks_running=0)
    now, n, in_flight = 0.0, 0, []
    for op, k, replicas, dt in script:
        peer = ids[k % 4]
        if op == "submit":
            n += 1
            actions = core.submit(f"t{n}", TaskRequirements(fuel=1, memory_bytes=512 << 20, wall_time_s=2.0,
                                                            gpus=k % 2, replicas=replicas), now)
        elif op in ("result", "fail") and in_flight:
            d = in_flight.pop(k % len(in_flight))
            actions = (core.on_result(d.task_id, d.attempt, d.peer_id, bytes([k]) * 32, now) if op == "result"
                       else core.on_failure(d.task_id, d.attempt, d.peer_id, REASONS[k], now))
        elif op == "advertise" and peer in core.peers:
            core.update_peer(peer, inventory(1), task_slots=replicas, tasks_running=k)
            actions = []
        elif op == "remove":
            actions = core.remove_peer(peer, now)
        elif op == "readd":
            core.update_peer(peer, inventory(1), task_slots=2, tasks_running=0)
            actions = []
        else:
            now += dt
            actions = core.tick(now)
            nd = core.next_deadline()
            assert nd is None or nd > now, f"next_deadline {nd} <= now {now} after a tick"
        sent = {}
        for a in actions:
            if isinstance(a, Dispatch):
                in_flight.append(a)
                sent[a.peer_id] = sent.get(a.peer_id, 0) + 1
            elif isinstance(a, Cancel):
                in_flight[:] = [d for d in in_flight if not (d.task_id == a.task_id and d.attempt == a.attempt)]
        in_flight[:] = [d for d in in_flight if d.task_id in core.tasks and d.attempt in core.tasks[d.task_id].attempts]
        for p in sent:  # a peer got work only into free slots
            slots = core.slots.get(p)
            assert slots is None or slots.others + core.in_flight[p] <= slots.task_slots
        for p in core.peers:  # the core's own count of its attempts per peer stays exact
            assert core.in_flight.get(p, 0) == sum(1 for t in core.tasks.values()
                                                   for a in t.attempts.values() if a.peer_id == p)
        assert set(core.breakers) == set(core.peers)


def test_two_attempts_timing_out_in_one_tick_fail_the_task_once():
    core = make_core([0, 0, 0], max_retries=0)
    sent = core.submit("t", TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1.0, replicas=2), 0.0)
    assert len(sent) == 2
    out = core.tick(5.0)
    assert [a.reason for a in out if isinstance(a, TaskFailed)] == ["retries_exhausted"]
    assert sorted((a.attempt, a.reason) for a in out if isinstance(a, Cancel)) in (
        [(1, "timeout"), (2, "task_failed")], [(1, "task_failed"), (2, "timeout")])
    assert core.in_flight == {p: 0 for p in core.in_flight} and not core.committed_memory.get("peer00")


def test_peers_get_no_task_longer_than_the_wall_time_they_advertise():
    """A replica ran any wall time a submitter asked for (up to a day, a slot held that long):
    peers advertise ``max_task_wall_time_ms`` (their ``fabric_max_task_wall_s``) and only peers
    that accept the task's wall time are candidates; a peer that does not send it accepts a day."""
    core = Placement(PlacementConfig(), network_id=NETWORK_ID, submitter=SUBMITTER, rng=random.Random(3))
    core.set_weights(WeightTable(1, {"short": 1, "long": 1, "old": 1}))
    core.update_peer("short", replace(inventory(0), max_task_wall_time_ms=600_000))
    core.update_peer("long", replace(inventory(0), max_task_wall_time_ms=3_600_000))
    core.update_peer("old", inventory(0))  # no cap sent: the wire's day
    assert inventory(0).max_task_wall_time_ms == 86_400_000
    hour = TaskRequirements(fuel=10, memory_bytes=1 << 20, wall_time_s=3600, replicas=2)
    chosen = {a.peer_id for a in core.submit("hour", hour, 0.0) if isinstance(a, Dispatch)}
    assert chosen == {"long", "old"}
    # exactly at the cap fits (whole milliseconds, as the wire carries them); a day fits only "old"
    ten_min = TaskRequirements(fuel=10, memory_bytes=1 << 20, wall_time_s=600.0009)
    assert wire_wall_time_ms(600.0009) == 600_000
    assert core._could_ever_fit("short", ten_min)
    day = TaskRequirements(fuel=10, memory_bytes=1 << 20, wall_time_s=86_400)
    assert [a.peer_id for a in core.submit("day", day, 0.0) if isinstance(a, Dispatch)] == ["old"]
    two_days_worth = TaskRequirements(fuel=10, memory_bytes=1 << 20, wall_time_s=86_400, replicas=2)
    assert [a.reason for a in core.submit("day2", two_days_worth, 0.0) if isinstance(a, TaskFailed)] \
        == ["unsatisfiable"]  # one peer could ever run it: too few for two replicas


def run_with_a_liar(core: Placement, until_s: float, step_s: float = 0.5) -> Counter:
    """peer00 advertises 4 slots and runs 1 attempt at once (refuses the rest ``busy``); peer01
    advertises 2 and runs what it advertises. A task every ``step_s``, runs take 1 s, both advertise
    every 5 s (their true ``tasks_running``). Counts what each peer did."""
    req = TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=2.0)
    running: dict[str, list[tuple[float, str, int]]] = {p: [] for p in peer_ids(2)}
    seen: Counter = Counter()
    pending = []

    def handle(actions, now):
        for a in actions:
            if isinstance(a, Dispatch):
                pending.append(a)
        while pending:
            d = pending.pop(0)
            if d.peer_id == "peer00" and running["peer00"]:
                seen["liar_busy"] += 1
                handle(core.on_failure(d.task_id, d.attempt, d.peer_id, "busy", now), now)
            else:
                seen[f"{d.peer_id}_ran"] += 1
                running[d.peer_id].append((now + 1.0, d.task_id, d.attempt))

    t, n = 0.0, 0
    while t < until_s:
        if abs(t / 5.0 - round(t / 5.0)) < 1e-9:
            core.update_peer("peer00", inventory(0, mem_gib=64), task_slots=4, tasks_running=len(running["peer00"]))
            core.update_peer("peer01", inventory(0, mem_gib=64), task_slots=2, tasks_running=len(running["peer01"]))
        for peer, runs in running.items():
            for end, task_id, attempt in [r for r in runs if r[0] <= t]:
                runs.remove((end, task_id, attempt))
                handle(core.on_result(task_id, attempt, peer, b"\x01" * 32, t), t)
        handle(core.submit(f"t{n}", req, t), t)
        handle(core.tick(t), t)
        t, n = t + step_s, n + 1
    return seen


def test_a_peer_refusing_the_slots_it_advertises_is_trusted_with_what_it_takes():
    """A peer advertising 4 free slots that runs 1 attempt at once got up to 3 attempts it refused
    ``busy`` after each of its advertisements (busy neither opens the breaker nor outlasts the next
    advertisement), each a task's backoff, and then no attempt until its next advertisement. Now its
    trusted slots drop to what it held when it refused, and grow back by one per
    slot_trust_recovery_s: fewer refusals, and it runs more of the work it can take."""
    core = slot_core(2, slots=2, queue_timeout_s=60.0)
    seen = run_with_a_liar(core, 60.0, step_s=0.25)  # 4 tasks/s for 3 slots that are real
    assert seen["liar_busy"] <= 8, seen  # was 34
    assert seen["peer00_ran"] >= 30 and seen["peer01_ran"] >= 100, seen  # was 12 and 120
    assert core.counters["slots_unhonoured"] == seen["liar_busy"]
    assert core.trusted_slots("peer00") <= 2 and core.trusted_slots("peer01") == 2
    # grows back by one per slot_trust_recovery_s (10 s) with no new refusal, up to what it advertises
    trust = core.slot_trust["peer00"]
    assert core.trusted_slots("peer00", trust.since + 10.0) == trust.slots + 1
    assert core.trusted_slots("peer00", trust.since + 100.0) == 4
    # an advertisement that admits it is full makes its refusals honest ones: trusted as advertised
    core.update_peer("peer00", inventory(0, mem_gib=64), task_slots=4, tasks_running=4)
    assert core.trusted_slots("peer00") == 4 and "peer00" not in core.slot_trust


def test_a_peer_that_takes_attempts_and_never_answers_gets_fewer():
    core = slot_core(1, slots=4, breaker_failures=100, max_retries=10, queue_timeout_s=60.0)
    req = TaskRequirements(fuel=1, memory_bytes=1 << 20, wall_time_s=1.0)
    first = [a for i in range(4) for a in core.submit(f"t{i}", req, 0.0) if isinstance(a, Dispatch)]
    assert len(first) == 4
    core.tick(first[0].deadline)  # all four time out
    assert core.counters["slots_unhonoured"] == 4 and core.trusted_slots("peer00") == 0
    core.update_peer("peer00", inventory(0, mem_gib=64), task_slots=4, tasks_running=0)  # "all free"
    now = first[0].deadline + 1.0
    assert core.free_slots("peer00", now) == 0  # was: 4 more attempts to lose
    core.tick(now)  # the four tasks are out of peers: failed
    assert [a for i in range(4) for a in core.submit(f"u{i}", req, now) if isinstance(a, Dispatch)] == []
    later = first[0].deadline + 10.0
    assert core.next_deadline() == later  # waiting tasks are placed when a slot grows back
    assert len([a for a in core.tick(later) if isinstance(a, Dispatch)]) == 1
