"""A clean-room consensus validator, written from docs/PROTOCOL.md §14-§15 alone.

It is the clean-room peer of tests/independent_peer.py (envelopes, admission, hello,
ping/ack) with a Tendermint validator on top, and it uses the clean-room verifier
(tests/independent_verifier.py) for the canonical encoding, signed statements, blocks,
certificates, value decoding, the ledger and the weight tables. It imports nothing from
``chimera``.

Sections implemented: §14.1 broadcast delivery; §14.5 the seven ``bft_*`` messages (strict
decoding, §7); §14.6 heights, rounds, idle wait, StartRound with round-robin pool
selection, proposer of (h, r); §14.7 accepting proposals and votes, counting, valid(B)
with "not yet", the rules L22-L65 and the late polka; §14.8 timeouts ``base + r·delta``;
§14.9 rebroadcast, value pool and value gossip; §14.10 catch-up triggers, holding the next
height, the commit poll with vote requests, fetching a decided block and a proposal more
than 1/3 voted for, serving commit/proposal/vote requests, receiving commit responses;
§14.12 the sign state (an fsync'ed JSON-lines file of its own, one line per signed
statement, the lock and the locked block with it) and the commit log; §15 value validity
(windows, "not yet"), applying blocks and epochs (the verifier's Ledger), and one signed
opinion per epoch (§15.5, informative) scoring the other validators by their share of the
certificates it saw.

Left out: the nudge of a silent proposer (§14.10, an optimisation), submitting
equivocation evidence (§14.11: detected and counted only), training values (``fl_*``,
§17: a block holding one gets a nil prevote here), restart at a sign state above the
store (§14.12 "At start": the sign state is reloaded and enforced, the store gap is not
fetched specially).

What the spec did not settle (found writing this; see the report and PROTOCOL §14.3):

* §14.3/L49: a certificate holds the precommits its decider held when deciding, so the
  real nodes' certificates for one height differ and ours is often missing (now stated).
* §14.6 idle wait: from which moment ``empty_block_interval_s`` counts (here: from when
  round 0 was due), and whether a pooled value that is no longer valid is "pending".
* §14.7 vs §14.10: "held from a validator of T" — envelope sender or signer, and T of h
  or of h + 1 at an epoch's last height (here: the envelope sender, in T of h).
* §14.7 valid(B) for ``fl_*`` values needs §17; what a validator that implements only
  §14-§15 must prevote for a block holding one is not said (here: nil).
* §14.5 ``bft_commit_response`` with non-consecutive heights: malformed as a whole, or
  applied up to the break (here: malformed).
* §14.12: a restart whose stored step is ``proposal`` — is the stored proposal re-sent
  like a stored vote? (here: the proposal is signed again only if identical.)
* §14.12 + §6.3: a restarted peer must continue its envelope sequence numbers, or every
  node drops it as ``replay`` (the base clean-room peer starts at 1; fixed here, now
  cross-referenced in §14.12).
* §15.5: what an opinion should score is informative only; here the share of the last 16
  certificates holding the peer's precommit.

Times are seconds (``time.monotonic``) unless a name says otherwise; sizes in bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import msgpack
import nacl.signing
import zmq

from tests import independent_peer as ip
from tests import independent_verifier as iv

STEPS = ("proposal", "prevote", "precommit")
MAX_FUTURE_ROUNDS = 4
MAX_HELD_PER_SENDER = 8
MAX_COMMIT_WAITERS = 64
MAX_FOLLOW_UPS = 32
MAX_RESPONSE_BYTES = 196_608
MAX_BLOCK_BYTES = 196_608
MAX_POOL = 10_000
MAX_POOL_PER_SENDER = 1024
FETCH_FROM = 2  # FETCH_DECIDED_FROM / the commit poll's 2 validators
CONSENSUS_KINDS = frozenset({"bft_proposal", "bft_vote", "bft_values", "bft_proposal_request",
                             "bft_vote_request", "bft_commit_request", "bft_commit_response"})


@dataclass
class Settings:
    """Local pacing (§14.8); every field is a local choice, peers SHOULD keep the defaults."""

    propose_timeout_s: float = 3.0
    propose_timeout_delta_s: float = 0.5
    prevote_timeout_s: float = 1.0
    prevote_timeout_delta_s: float = 0.5
    precommit_timeout_s: float = 1.0
    precommit_timeout_delta_s: float = 0.5
    commit_wait_s: float = 1.0
    empty_block_interval_s: float = 0.0
    not_ready_wait_s: float = 0.2
    rebroadcast_interval_s: float = 2.0
    value_regossip_interval_s: float = 5.0
    catchup_interval_s: float = 1.0
    proposal_fetch_delay_s: float = 0.1
    commit_poll_delay_s: float = 0.2
    max_batch: int = 64
    submit_opinions: bool = True


# --- §14.5 message bodies (strict, §7) -------------------------------------------------

def _commit_from_map(value: object) -> iv.CertifiedCommit:
    m = iv._record(value, "CertifiedCommit", ("round", "block", "certificate"))
    cert = iv._record(m["certificate"], "QuorumCertificate", ("votes",))
    votes = iv._array(cert["votes"], "votes", iv.MAX_VOTES)
    return iv.CertifiedCommit(iv._int(m["round"], "round", 0, iv.MAX_ROUND), iv.decode_block(m["block"]),
                              tuple(iv.decode_signed_vote(v) for v in votes))


def decode_body(kind: str, body: object) -> dict:
    """The decoded body of a ``bft_*`` envelope (§14.5). Raises iv.VerifyError('malformed')."""
    if kind == "bft_proposal":
        m = iv._record(body, kind, ("height", "round", "block", "signed"), {"valid_round": None})
        block = iv.decode_block(m["block"])
        height = iv._int(m["height"], "height", 1, iv.MAX_HEIGHT)
        round_ = iv._int(m["round"], "round", 0, iv.MAX_ROUND)
        vr = m["valid_round"]
        if vr is not None:
            vr = iv._int(vr, "valid_round", 0, iv.MAX_ROUND)
            if vr >= round_:
                raise iv.VerifyError("malformed", "valid_round must be below round")
        if height != block.height:
            raise iv.VerifyError("malformed", "height != block.height")
        return {"height": height, "round": round_, "block": block, "valid_round": vr,
                "signed": iv.decode_signed_vote(m["signed"])}
    if kind == "bft_vote":
        m = iv._record(body, kind, ("vote",))
        return {"vote": iv.decode_vote(m["vote"])}
    if kind == "bft_values":
        m = iv._record(body, kind, ("values",))
        return {"values": [iv._bin(v, "value", most=iv.MAX_VALUE_BYTES) for v in iv._array(m["values"], "values", 64)]}
    if kind == "bft_proposal_request":
        m = iv._record(body, kind, ("height", "round"))
        return {"height": iv._int(m["height"], "height", 1, iv.MAX_HEIGHT),
                "round": iv._int(m["round"], "round", 0, iv.MAX_ROUND)}
    if kind == "bft_vote_request":
        m = iv._record(body, kind, ("height", "round", "prevotes", "precommits"))
        return {"height": iv._int(m["height"], "height", 1, iv.MAX_HEIGHT),
                "round": iv._int(m["round"], "round", 0, iv.MAX_ROUND),
                "prevotes": iv._bin(m["prevotes"], "prevotes", most=128),
                "precommits": iv._bin(m["precommits"], "precommits", most=128)}
    if kind == "bft_commit_request":
        m = iv._record(body, kind, ("from_height",), {"max_count": 16})
        return {"from_height": iv._int(m["from_height"], "from_height", 1, iv.MAX_HEIGHT),
                "max_count": iv._int(m["max_count"], "max_count", 1, 16)}
    if kind == "bft_commit_response":
        m = iv._record(body, kind, ("commits", "latest_height"))
        commits = [_commit_from_map(c) for c in iv._array(m["commits"], "commits", 16)]
        if any(b.block.height != a.block.height + 1 for a, b in zip(commits, commits[1:])):
            raise iv.VerifyError("malformed", "commits are not consecutive ascending heights")
        return {"commits": commits, "latest_height": iv._int(m["latest_height"], "latest_height", 0, iv.MAX_HEIGHT)}
    raise iv.VerifyError("malformed", f"not a consensus kind: {kind}")


def vote_map(vote: iv.Vote) -> dict:
    return iv._vote_map(vote)


# --- §14.12 sign state ---------------------------------------------------------------------

def position(height: int, round_: int, step: str) -> tuple[int, int, int]:
    return (height, round_, STEPS.index(step))


class SignState:
    """The persisted sign state (§14.12): one fsync'ed JSON line per signed statement, in
    signing order; the last line is the state. ``allow`` is the rule that guards every
    signature; ``records`` is the whole history (a test checks it for double signing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records: list[dict] = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if line:
                        self.records.append(json.loads(line))

    @property
    def last(self) -> dict | None:
        return self.records[-1] if self.records else None

    def allow(self, height: int, round_: int, step: str, block_hash: bytes | None, valid_round: int | None) -> bool:
        last = self.last
        if last is None:
            return True
        here, stored = position(height, round_, step), position(last["height"], last["round"], last["step"])
        if here < stored:
            return False
        if here == stored:
            return (last["block_hash"], last["valid_round"]) == (block_hash.hex() if block_hash else None, valid_round)
        return True

    def store(self, record: dict) -> None:
        """Append and fdatasync before the signature leaves (raises OSError: fail-stop)."""
        line = json.dumps(record, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(record)


def check_sign_log(records: list[dict]) -> int:
    """Safety of a sign-state history; returns how many statements it holds. Raises
    AssertionError when it ever signed two different statements for one (height, round,
    step), went back in position, precommitted a block without locking on it in that round,
    prevoted another block than its lock without a polka of a round ≥ its lock (L22/L28),
    or moved its lock back to an earlier round within a height."""
    seen: dict[tuple, tuple] = {}
    last_pos = None
    lock_at: dict[int, tuple] = {}
    for rec in records:
        pos = position(rec["height"], rec["round"], rec["step"])
        what = (rec["block_hash"], rec["valid_round"])
        assert seen.setdefault(pos, what) == what, f"two different statements at {pos}: {seen[pos]} and {what}"
        assert last_pos is None or pos >= last_pos, f"signed {pos} after {last_pos}"
        last_pos = pos
        lr, lh = rec["locked_round"], rec["locked_hash"]
        prev = lock_at.get(rec["height"])
        if prev is not None and prev[0] is not None:
            assert lr is not None and lr >= prev[0], f"lock went back at {pos}: {prev} -> {(lr, lh)}"
        lock_at[rec["height"]] = (lr, lh)
        if rec["step"] == "precommit" and rec["block_hash"] is not None:
            assert (lr, lh) == (rec["round"], rec["block_hash"]), f"precommit at {pos} without its lock: {rec}"
        if rec["step"] == "prevote" and rec["block_hash"] is not None and lh is not None \
                and lh != rec["block_hash"]:
            pol = rec.get("pol_round")
            assert pol is not None and pol >= lr, f"prevote at {pos} against the lock {(lr, lh)}: {rec}"
    return len(records)


# --- the validator -----------------------------------------------------------------------

@dataclass
class Proposal:
    round: int
    block: iv.Block
    valid_round: int | None
    signed: iv.SignedVote
    block_hash: bytes


@dataclass
class HeightState:
    """Per-height state of Algorithm 1 (reset at each new height, §14.6)."""

    height: int
    round: int = 0
    step: str = "propose"
    started: bool = False
    round0_due: float = 0.0
    resume_round: int = 0
    locked_round: int | None = None
    locked_hash: bytes | None = None
    locked_block: iv.Block | None = None
    valid_round: int | None = None
    valid_block: iv.Block | None = None
    proposals: dict[int, Proposal] = field(default_factory=dict)
    extra_blocks: dict[int, int] = field(default_factory=Counter)
    blocks: dict[bytes, iv.Block] = field(default_factory=dict)
    first: dict[tuple[str, int], dict[str, bytes | None]] = field(default_factory=lambda: defaultdict(dict))
    votes_for: dict[tuple[str, int], dict] = field(default_factory=lambda: defaultdict(lambda: defaultdict(dict)))
    highest_round: dict[str, int] = field(default_factory=dict)
    fired: set = field(default_factory=set)
    not_ready_since: dict[int, float] = field(default_factory=dict)
    valid_cache: dict[bytes, str] = field(default_factory=dict)
    own: dict[tuple[str, int], iv.Vote] = field(default_factory=dict)
    own_proposal: dict[int, dict] = field(default_factory=dict)
    first_vote_at: float | None = None


class Validator(ip.IndependentPeer):
    """A consensus validator on the clean-room peer. Threads: the peer's receive and ZAP
    threads, plus one ticker (timeouts, rebroadcast, idle wait, polls) every 10 ms. All
    consensus state is under ``self.cs`` (an RLock); sends take the peer's lock after it.

    ``signing_seed``: the 32-byte Ed25519 seed of the identity (its peer id is in the
    token's genesis list). ``state_dir``: where the sign state and the commit log live."""

    CAPABILITIES = ["membership", "echo", "consensus"]

    def __init__(self, network: ip.Network, signing_seed: bytes, state_dir: str,
                 settings: Settings | None = None, host: str = "127.0.0.1", incarnation: int = 1) -> None:
        super().__init__(network, host, incarnation)
        self.signing_key = nacl.signing.SigningKey(signing_seed)
        self.public_key = bytes(self.signing_key.verify_key)
        self.peer_id = ip.peer_id_of(self.public_key)
        self.contact = ip.contact_body(self.peer_id, self.transport_public, [self.address], self.CAPABILITIES)
        self.settings = settings or Settings()
        # §6.3: never reuse a sequence number, not even after a restart: start above
        # wall-clock ms × 2^20 (a restarted peer at 1 is dropped as `replay` by every node)
        with self._lock:
            self._seq = max(self._seq, ip.now_ms() << 20)
        self.cs = threading.RLock()
        self.token = iv.Token(2, network.name, network.secret, network.bootstrap, network.genesis,
                              network.epoch_length)
        self.L = network.epoch_length
        self.ledger = iv.Ledger(self.network_id, self.L, iv.genesis_table(network.genesis))
        self.last_height = 0
        self.last_hash = network.genesis_hash
        self.commits: dict[int, iv.CertifiedCommit] = {}
        self.commit_source: dict[int, str] = {}          # height -> "voted" | "fetched"
        self.committed_values: dict[bytes, int] = {}     # value_hash -> height
        self.counters: Counter = Counter()
        self.errors: list[str] = []
        os.makedirs(state_dir, exist_ok=True)
        self.sign_state = SignState(os.path.join(state_dir, "sign_state.jsonl"))
        self.commit_log_path = os.path.join(state_dir, "commits.bin")
        self.pool: dict[bytes, tuple[bytes, str, int]] = {}   # value_hash -> (value, sender, arrival)
        self.own_values: dict[bytes, bytes] = {}
        self._arrival = 0
        self.opinions_sent: dict[int, bytes] = {}        # epoch -> opinion value
        self.paused = False
        self._timers: list[tuple[float, str, int, int]] = []
        self._held: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        self._waiters: dict[str, int] = {}
        self._served_at: dict[str, float] = {}
        self._last_sent_next: dict[str, int] = {}
        self._follow_ups: dict[str, list] = {}
        self._catchup_at = -1e9
        self._served_votes: set = set()
        self._served_proposals: set = set()
        self._requested: set = set()
        self._decided_heights: list[float] = []
        self._seq_cache: dict[int, list[str]] = {}
        self._next_rebroadcast = 0.0
        self._next_regossip = 0.0
        self.h = HeightState(1)
        self.h.round0_due = time.monotonic()
        self._load_commits()
        self._restore_lock()
        self._ticker = threading.Thread(target=self._tick_loop, daemon=True, name="consensus")
        self._ticker.start()

    # -- tables, proposers -----------------------------------------------------------------

    @property
    def table(self) -> iv.WeightTable:
        return self.ledger.table

    def first_height(self, epoch: int) -> int:
        return epoch * self.L + 1

    def proposer(self, height: int, round_: int) -> str:
        """§14.6 for a height of the current epoch."""
        t = self.table
        seq = self._seq_cache.get(t.epoch)
        if seq is None:
            seq = self._seq_cache[t.epoch] = iv.proposer_sequence(t)
        return seq[(height - self.first_height(t.epoch) + round_) % len(seq)]

    def _timeout(self, kind: str, round_: int) -> float:
        s = self.settings
        base, delta = {"propose": (s.propose_timeout_s, s.propose_timeout_delta_s),
                       "prevote": (s.prevote_timeout_s, s.prevote_timeout_delta_s),
                       "precommit": (s.precommit_timeout_s, s.precommit_timeout_delta_s)}[kind]
        return base + round_ * delta

    # -- sending ---------------------------------------------------------------------------

    def _send_frame_to(self, peer_id: str, frame: bytes, kind: str) -> None:
        with self._lock:
            member = self.members.get(peer_id)
        if member is None:
            self.counters["drop_unroutable"] += 1
            return
        try:
            self.send_frame(member.contact["transport_key"], member.contact["addresses"][0], frame)
            with self._lock:
                self.stats.sent[kind] += 1
        except zmq.ZMQError:
            self.counters["drop_send_error"] += 1

    def broadcast(self, kind: str, body: dict) -> None:
        """One envelope with a nil recipient to every validator of the table but us (§14.1)."""
        frame = self.seal(kind, None, body)
        for v in sorted(self.table.weights):
            if v != self.peer_id:
                self._send_frame_to(v, frame, kind)

    def unicast(self, peer_id: str, kind: str, body: dict) -> None:
        if peer_id == self.peer_id:
            return
        self._send_frame_to(peer_id, self.seal(kind, ip.public_key_of(peer_id), body), kind)

    def _sig(self, purpose: str, statement: list) -> bytes:
        return self.signing_key.sign(iv.statement_bytes(purpose, self.network_id, self.table.epoch,
                                                         statement)).signature

    def _sign_guarded(self, step: str, round_: int, block_hash: bytes | None, valid_round: int | None,
                      pol_round: int | None = None) -> bool:
        h = self.h
        if not self.sign_state.allow(h.height, round_, step, block_hash, valid_round):
            self.counters["sign_refused"] += 1
            return False
        last = self.sign_state.last
        if last is not None and position(h.height, round_, step) == position(last["height"], last["round"], last["step"]):
            return True  # the same statement again: the same signature
        self.sign_state.store({
            "height": h.height, "round": round_, "step": step,
            "block_hash": block_hash.hex() if block_hash else None, "valid_round": valid_round,
            "locked_round": h.locked_round, "locked_hash": h.locked_hash.hex() if h.locked_hash else None,
            "locked_block": h.locked_block.encode().hex() if h.locked_block is not None else None,
            "pol_round": pol_round, "epoch": self.table.epoch})
        return True

    # -- public ----------------------------------------------------------------------------

    def submit(self, value: bytes) -> bool:
        """Submit a value (§14.9): pooled here and broadcast at once. False if not valid now."""
        with self.cs:
            if self._value_check(value, self.ledger.epoch_of(self.h.height)) != "valid":
                return False
            vh = hashlib.sha256(value).digest()
            self.own_values[vh] = value
            self._pool_add(value, self.peer_id)
            self.broadcast("bft_values", {"values": [value]})
            self._maybe_start_round0(pending=True)
            self._run_rules()
            return True

    def pause(self) -> None:
        """Stop taking part in consensus (drop every bft_* envelope, send nothing, no timers);
        membership goes on. ``resume`` goes back to the log, which has moved on (§14.10)."""
        with self.cs:
            self.paused = True

    def resume(self) -> None:
        with self.cs:
            self.paused = False
            self._timers.clear()
            self.h.round0_due = time.monotonic()

    def snapshot(self) -> dict:
        with self.cs:
            return {"height": self.h.height, "round": self.h.round, "step": self.h.step,
                    "started": self.h.started, "last_height": self.last_height,
                    "epoch": self.table.epoch}

    # -- receive -----------------------------------------------------------------------------

    def _handle(self, env: ip.Envelope, frame: bytes) -> None:
        if env.kind not in CONSENSUS_KINDS:
            return super()._handle(env, frame)
        with self.cs:
            if self.paused:
                self.counters["paused_drop"] += 1
                return
            try:
                body = decode_body(env.kind, env.body)
            except iv.VerifyError:
                with self._lock:
                    self.stats.drops["malformed"] += 1
                return
            try:
                getattr(self, "_on_" + env.kind[4:])(body, env.sender_id)
                self._run_rules()
            except Exception as exc:  # a bug here must show, not kill the receive thread
                self.errors.append(f"{env.kind}: {exc!r}")
                import traceback
                self.errors.append(traceback.format_exc())

    def _other_height(self, height: int, sender: str, kind: str, body: dict) -> bool:
        """The triggers of §14.10; True when the message is not of our height."""
        h = self.h.height
        if height == h:
            return False
        if height > h:
            if height == h + 1 and sender in self.table.weights and kind in ("bft_proposal", "bft_vote"):
                held = self._held[sender]
                if len(held) < MAX_HELD_PER_SENDER and not (
                        kind == "bft_proposal" and any(k == kind for k, _ in held)):
                    held.append((kind, body))
                    self.counters["held_next_height"] += 1
                else:
                    self.counters["held_overflow"] += 1
            now = time.monotonic()
            if now - self._catchup_at >= self.settings.catchup_interval_s:
                self._catchup_at = now
                self.counters["catchup_request"] += 1
                self.unicast(sender, "bft_commit_request", {"from_height": h, "max_count": 16})
        else:
            self._push_commits(sender, height)
        self.counters["other_height"] += 1
        return True

    def _on_proposal(self, body: dict, sender: str) -> None:
        if self._other_height(body["height"], sender, "bft_proposal", body):
            return
        self._accept_proposal(body)

    def _accept_proposal(self, body: dict) -> None:
        h = self.h
        r = body["round"]
        if r > h.round + MAX_FUTURE_ROUNDS:
            self.counters["far_future_round"] += 1
            return
        signer = body["signed"].voter
        if signer != self.proposer(h.height, r):
            self.counters["rejected.wrong_proposer"] += 1
            return
        block = body["block"]
        bh = block.hash()
        if not iv.signature_ok(signer, body["signed"].signature, "proposal", self.network_id, self.table.epoch,
                               [h.height, r, bh, body["valid_round"]]):
            self.counters["rejected.bad_signature"] += 1
            return
        h.highest_round[signer] = max(h.highest_round.get(signer, 0), r)
        have = h.proposals.get(r)
        if have is not None:
            if have.block_hash == bh and have.valid_round == body["valid_round"]:
                self.counters["duplicate"] += 1
            else:
                self.counters["rejected.conflicting_proposal"] += 1
                if h.extra_blocks[r] < 2:
                    h.extra_blocks[r] += 1
                    h.blocks.setdefault(bh, block)
            return
        h.proposals[r] = Proposal(r, block, body["valid_round"], body["signed"], bh)
        h.blocks.setdefault(bh, block)
        self._maybe_start_round0(pending=False, message=True)

    def _on_vote(self, body: dict, sender: str) -> None:
        vote: iv.Vote = body["vote"]
        if self._other_height(vote.height, sender, "bft_vote", body):
            return
        self._accept_vote(vote)

    def _accept_vote(self, vote: iv.Vote) -> None:
        h = self.h
        voter = vote.signed.voter
        if voter not in self.table.weights:
            self.counters["rejected.unknown_voter"] += 1
            return
        if not iv.signature_ok(voter, vote.signed.signature, vote.vote_type, self.network_id, self.table.epoch,
                               [vote.height, vote.round, vote.block_hash]):
            self.counters["rejected.bad_signature"] += 1
            return
        h.highest_round[voter] = max(h.highest_round.get(voter, 0), vote.round)
        self._maybe_start_round0(pending=False, message=True)
        if vote.round > h.round + MAX_FUTURE_ROUNDS:
            self.counters["far_future_round"] += 1
            return
        key = (vote.vote_type, vote.round)
        first = h.first[key]
        if voter in first:
            if first[voter] == vote.block_hash or voter in h.votes_for[key][vote.block_hash]:
                self.counters["duplicate"] += 1
                return
            self.counters["equivocation"] += 1
            if vote.block_hash is not None and vote.block_hash not in h.blocks:
                self.counters["conflicting_vote"] += 1
                return
        else:
            first[voter] = vote.block_hash
        h.votes_for[key][vote.block_hash][voter] = vote

    def _on_values(self, body: dict, sender: str) -> None:
        epoch = self.ledger.epoch_of(self.h.height)
        invalid = False
        added = False
        for value in body["values"]:
            vh = hashlib.sha256(value).digest()
            if vh in self.pool or self._committed_recently(vh):
                self.counters["duplicate_value"] += 1
                continue
            if sum(1 for _, s, _ in self.pool.values() if s == sender) >= MAX_POOL_PER_SENDER:
                self.counters["pool_sender_full"] += 1
                continue
            if len(self.pool) >= MAX_POOL:
                self.counters["pool_full"] += 1
                continue
            check = self._value_check(value, epoch)
            if check == "invalid":
                invalid = True
                continue
            if check == "not_yet":
                self.counters["value_not_ready"] += 1
                continue
            self._pool_add(value, sender)
            added = True
        if invalid:
            self.counters["rejected.invalid_value"] += 1
        if added:
            self._maybe_start_round0(pending=True)

    def _on_proposal_request(self, body: dict, sender: str) -> None:
        h = self.h
        if self._other_height(body["height"], sender, "bft_proposal_request", body):
            return
        key = (sender, body["round"])
        p = h.proposals.get(body["round"])
        if sender not in self.table.weights or p is None or key in self._served_proposals:
            self.counters["proposal_request_unanswered"] += 1
            return
        self._served_proposals.add(key)
        self.unicast(sender, "bft_proposal", self._proposal_body(p))
        if p.valid_round is not None:
            for vote in self._polka(p.valid_round, p.block_hash):
                self.unicast(sender, "bft_vote", {"vote": vote_map(vote)})

    def _on_vote_request(self, body: dict, sender: str) -> None:
        h = self.h
        if self._other_height(body["height"], sender, "bft_vote_request", body):
            return
        ids = sorted(self.table.weights)
        size = (len(ids) + 7) // 8
        r = body["round"]
        holds = h.first.get(("prevote", r)) or h.first.get(("precommit", r))
        if sender not in self.table.weights or len(body["prevotes"]) != size or len(body["precommits"]) != size \
                or not holds or (sender, r) in self._served_votes:
            self.counters["vote_request_unanswered"] += 1
            return
        self._served_votes.add((sender, r))
        for vote_type, bitmap in (("prevote", body["prevotes"]), ("precommit", body["precommits"])):
            first = h.first.get((vote_type, r), {})
            for i, v in enumerate(ids):
                if v == sender or bitmap[i // 8] >> (i % 8) & 1 or v not in first:
                    continue
                vote = h.votes_for[(vote_type, r)][first[v]].get(v)
                if vote is not None:
                    self.unicast(sender, "bft_vote", {"vote": vote_map(vote)})

    def _on_commit_request(self, body: dict, sender: str) -> None:
        frm = body["from_height"]
        if frm == self.h.height:
            if sender in self._waiters or len(self._waiters) < MAX_COMMIT_WAITERS:
                self._waiters[sender] = frm
            return
        if frm > self.h.height:
            return
        now = time.monotonic()
        follow_up = frm >= self._last_sent_next.get(sender, 1 << 63)
        if now - self._served_at.get(sender, -1e9) < self.settings.catchup_interval_s:
            if not follow_up:
                self.counters["commit_request_limited"] += 1
                return
            start, count = self._follow_ups.get(sender, (now, 0))
            if now - start >= self.settings.catchup_interval_s:
                start, count = now, 0
            if count >= MAX_FOLLOW_UPS:
                self.counters["follow_up_limit"] += 1
                return
            self._follow_ups[sender] = (start, count + 1)
        self._serve_commits(sender, frm, body["max_count"])

    def _push_commits(self, peer: str, frm: int) -> None:
        now = time.monotonic()
        if now - self._served_at.get(peer, -1e9) < self.settings.catchup_interval_s:
            return
        self._serve_commits(peer, frm, 16)

    def _serve_commits(self, peer: str, frm: int, max_count: int) -> None:
        commits, size = [], 0
        for height in range(frm, min(self.last_height, frm + max_count - 1) + 1):
            c = self.commits.get(height)
            if c is None:
                break
            enc = len(c.encode())
            if commits and size + enc > MAX_RESPONSE_BYTES:
                break
            commits.append(c.as_map())
            size += enc
        if not commits:
            return
        self._served_at[peer] = time.monotonic()
        self._last_sent_next[peer] = frm + len(commits)
        self.counters["commits_served"] += len(commits)
        self.unicast(peer, "bft_commit_response", {"commits": commits, "latest_height": self.last_height})

    def _on_commit_response(self, body: dict, sender: str) -> None:
        applied = 0
        for commit in body["commits"]:
            height = commit.block.height
            if height < self.h.height:
                continue
            if height > self.h.height:
                if applied == 0:
                    self._other_height(height, sender, "bft_commit_response", body)
                break
            try:
                iv.verify_commit(commit, self.table, self.network_id)
            except iv.VerifyError:
                self.counters["rejected.bad_certificate"] += 1
                break
            if commit.block.parent_hash != self.last_hash:
                self.counters["rejected.bad_commit"] += 1
                break
            self._commit(commit, source="fetched")
            applied += 1
        if applied and body["latest_height"] >= self.h.height:
            self.unicast(sender, "bft_commit_request", {"from_height": self.h.height, "max_count": 16})

    # -- values --------------------------------------------------------------------------------

    def _value_check(self, value: bytes, epoch: int) -> str:
        """'valid', 'invalid' or 'not_yet' (§15.2 validity without state)."""
        if len(value) > iv.MAX_VALUE_BYTES:
            return "invalid"
        try:
            decoded = iv.decode_value(value)
        except iv.VerifyError:
            return "invalid"
        tag = decoded[0]
        if tag == "decision":
            _, author, nonce, payload, sig = decoded
            if not iv.signature_ok(author, sig, "decision", self.network_id, 0, [nonce, payload]):
                return "invalid"
            d = epoch - (nonce >> 32)
            w = iv.decision_window_epochs(self.L)
            return "valid" if 0 <= d <= w else "not_yet" if -w <= d < 0 else "invalid"
        if tag == "join" and not decoded[4]:
            _, peer, join_epoch, sig, _ = decoded
            if not iv.signature_ok(peer, sig, "validator_join", self.network_id, join_epoch, [peer]):
                return "invalid"
            d = epoch - join_epoch
            return "valid" if 0 <= d <= 1 else "not_yet" if d == -1 else "invalid"
        return "valid" if iv.value_valid(decoded, self.network_id, epoch, self.L) else "invalid"

    def dedupe_heights(self) -> int:
        return max(1000, (iv.decision_window_epochs(self.L) + 1) * self.L + 1)

    def _committed_recently(self, vh: bytes) -> bool:
        at = self.committed_values.get(vh)
        return at is not None and self.last_height - at < self.dedupe_heights()

    def _pool_add(self, value: bytes, sender: str) -> None:
        self._arrival += 1
        self.pool[hashlib.sha256(value).digest()] = (value, sender, self._arrival)

    def _pending(self) -> bool:
        return any(not self._committed_recently(vh) for vh in self.pool)

    def _build_block(self) -> iv.Block:
        """§14.6: round-robin by sender (local first, then senders by their oldest value)."""
        epoch = self.ledger.epoch_of(self.h.height)
        queues: dict[str, list] = defaultdict(list)
        for vh, (value, sender, arrival) in sorted(self.pool.items(), key=lambda kv: kv[1][2]):
            queues[sender].append((vh, value))
        order = ([self.peer_id] if self.peer_id in queues else []) + \
            [s for s in queues if s != self.peer_id]
        taken: list[bytes] = []
        size = 0
        while len(taken) < self.settings.max_batch and any(queues[s] for s in order):
            for s in order:
                while queues[s]:
                    vh, value = queues[s].pop(0)
                    if self._committed_recently(vh):
                        continue
                    check = self._value_check(value, epoch)
                    if check == "invalid":
                        self.pool.pop(vh, None)
                        self.counters["expired_value"] += 1
                        continue
                    if check == "not_yet" or size + len(value) > MAX_BLOCK_BYTES:
                        continue
                    taken.append(value)
                    size += len(value)
                    break
                if len(taken) >= self.settings.max_batch:
                    break
        values = tuple(sorted(taken, key=lambda v: hashlib.sha256(v).digest()))
        return iv.Block(self.h.height, self.table.epoch, self.peer_id, self.last_hash, values)

    def _valid(self, block: iv.Block, bh: bytes) -> str:
        """valid(B) of §14.7: 'valid', 'invalid' or 'not_yet'."""
        cached = self.h.valid_cache.get(bh)
        if cached in ("valid", "invalid"):
            return cached
        t = self.table
        result = "valid"
        if block.height != self.h.height or block.parent_hash != self.last_hash or block.epoch != t.epoch \
                or block.proposer not in t.weights or len(block.values) > self.settings.max_batch \
                or sum(len(v) for v in block.values) > MAX_BLOCK_BYTES:
            result = "invalid"
        else:
            hashes = [hashlib.sha256(v).digest() for v in block.values]
            if any(a >= b for a, b in zip(hashes, hashes[1:])) or any(self._committed_recently(x) for x in hashes):
                result = "invalid"
            else:
                for v in block.values:
                    check = self._value_check(v, t.epoch)
                    if check == "invalid":
                        result = "invalid"
                        break
                    if check == "not_yet":
                        result = "not_yet"
        self.h.valid_cache[bh] = result
        return result

    # -- signing actions ------------------------------------------------------------------

    def _proposal_body(self, p: Proposal) -> dict:
        return {"height": self.h.height, "round": p.round, "block": p.block.as_map(),
                "valid_round": p.valid_round, "signed": {"voter": p.signed.voter, "signature": p.signed.signature}}

    def _polka(self, round_: int, bh: bytes) -> list[iv.Vote]:
        votes = self.h.votes_for[("prevote", round_)].get(bh, {})
        return [votes[v] for v in sorted(votes)]

    def _propose(self, round_: int) -> None:
        h = self.h
        if h.valid_block is not None:
            block, vr = h.valid_block, h.valid_round
        elif h.locked_block is not None:  # a lock restored from the sign state (§14.12)
            block, vr = h.locked_block, None
        else:
            block, vr = self._build_block(), None
        bh = block.hash()
        if not self._sign_guarded("proposal", round_, bh, vr):
            return
        signed = iv.SignedVote(self.peer_id, self._sig("proposal", [h.height, round_, bh, vr]))
        p = Proposal(round_, block, vr, signed, bh)
        h.proposals[round_] = p
        h.blocks[bh] = block
        h.own_proposal[round_] = self._proposal_body(p)
        self.counters["proposals"] += 1
        self.broadcast("bft_proposal", h.own_proposal[round_])
        if vr is not None:
            for vote in self._polka(vr, bh):
                self.broadcast("bft_vote", {"vote": vote_map(vote)})

    def _vote(self, vote_type: str, block_hash: bytes | None, pol_round: int | None = None) -> bool:
        h = self.h
        if not self._sign_guarded(vote_type, h.round, block_hash, None, pol_round):
            return False
        sig = self._sig(vote_type, [h.height, h.round, block_hash])
        vote = iv.Vote(vote_type, h.height, h.round, block_hash, iv.SignedVote(self.peer_id, sig))
        h.own[(vote_type, h.round)] = vote
        self._accept_vote(vote)
        self.broadcast("bft_vote", {"vote": vote_map(vote)})
        self.counters[vote_type + "s"] += 1
        if h.first_vote_at is None:
            h.first_vote_at = time.monotonic()
        if ("poll", h.round) not in h.fired:
            h.fired.add(("poll", h.round))
            med = statistics.median(self._decided_heights[-15:]) if self._decided_heights else 0.0
            self._schedule(max(self.settings.commit_poll_delay_s, 2 * med), "poll", h.round)
        return True

    def _schedule(self, delay_s: float, kind: str, round_: int) -> None:
        self._timers.append((time.monotonic() + delay_s, kind, self.h.height, round_))

    # -- rounds -----------------------------------------------------------------------------

    def _maybe_start_round0(self, pending: bool, message: bool = False) -> None:
        h = self.h
        if h.started or self.paused or time.monotonic() < h.round0_due:
            return
        if pending or message:
            self._start_round(h.resume_round)

    def _start_round(self, round_: int) -> None:
        h = self.h
        h.started = True
        h.round = round_
        h.step = "propose"
        self.counters["new_round"] += 1
        if self.proposer(h.height, round_) == self.peer_id:
            self._propose(round_)
        else:
            self._schedule(self._timeout("propose", round_), "propose", round_)
        self._run_rules()

    def _weight(self, voters) -> int:
        return self.table.weight_of(voters)

    def _quorum(self, voters) -> bool:
        return iv.is_quorum(self._weight(voters), self.table.total)

    def _run_rules(self) -> None:
        for _ in range(64):
            if not self._step_rules():
                return

    def _step_rules(self) -> bool:
        """Fire one rule of §14.7; True when one fired."""
        h = self.h
        if self.paused:
            return False
        # L49 decide: any round
        for (vt, r2), by_hash in list(h.votes_for.items()):
            if vt != "precommit":
                continue
            for bh, votes in by_hash.items():
                if bh is None or not self._quorum(votes):
                    continue
                block = h.blocks.get(bh)
                if block is not None and block.height == h.height and block.parent_hash == self.last_hash:
                    cert = tuple(iv.SignedVote(v, votes[v].signed.signature) for v in sorted(votes))[:iv.MAX_VOTES]
                    self._commit(iv.CertifiedCommit(r2, block, cert), source="voted")
                    return True
                if block is None and ("fetch_commit", r2) not in h.fired:
                    h.fired.add(("fetch_commit", r2))
                    self.counters["fetch_commit"] += 1
                    for v in self._after_me([v for v in votes])[:FETCH_FROM]:
                        self.unicast(v, "bft_commit_request", {"from_height": h.height, "max_count": 16})
        if not h.started:
            return False
        # L55 round skip
        for r2 in sorted({x for x in h.highest_round.values() if x > h.round}, reverse=True):
            holders = [v for v, x in h.highest_round.items() if x >= r2]
            if 3 * self._weight(holders) > self.table.total:
                self.counters["round_skip"] += 1
                self._start_round(r2)
                return True
        r = h.round
        p = h.proposals.get(r)
        # L22 / L28
        if h.step == "propose" and p is not None:
            if p.valid_round is None or (p.valid_round < r and self._quorum(
                    h.votes_for[("prevote", p.valid_round)].get(p.block_hash, {}))):
                v = self._valid(p.block, p.block_hash)
                if v == "not_yet":
                    since = h.not_ready_since.setdefault(r, time.monotonic())
                    if time.monotonic() - since < min(self.settings.not_ready_wait_s, self._timeout("propose", r)):
                        if ("not_ready", r) not in h.fired:
                            h.fired.add(("not_ready", r))
                            self._schedule(self.settings.not_ready_wait_s, "not_ready", r)
                        return False
                    v = "invalid"
                vr = p.valid_round
                if vr is None:
                    ok = v == "valid" and (h.locked_round is None or h.locked_hash == p.block_hash)
                else:
                    ok = v == "valid" and (h.locked_round is None or h.locked_round <= vr
                                           or h.locked_hash == p.block_hash)
                h.step = "prevote"
                self._vote("prevote", p.block_hash if ok else None, pol_round=vr)
                return True
        # L34
        if h.step == "prevote" and ("L34", r) not in h.fired and self._quorum(h.first[("prevote", r)]):
            h.fired.add(("L34", r))
            self._schedule(self._timeout("prevote", r), "prevote", r)
            return True
        # L36
        if h.step in ("prevote", "precommit") and p is not None and ("L36", r) not in h.fired \
                and self._quorum(h.votes_for[("prevote", r)].get(p.block_hash, {})) \
                and self._valid(p.block, p.block_hash) == "valid":
            h.fired.add(("L36", r))
            if h.step == "prevote":
                h.locked_round, h.locked_hash, h.locked_block = r, p.block_hash, p.block
                self.counters["locked"] += 1
                h.step = "precommit"
                self._vote("precommit", p.block_hash)
            h.valid_round, h.valid_block = r, p.block
            return True
        # polka seen late
        for rr in range(r - 1, -1, -1):
            if h.valid_round is not None and rr <= h.valid_round:
                break
            for bh, votes in h.votes_for[("prevote", rr)].items():
                if bh is not None and bh in h.blocks and self._quorum(votes) \
                        and self._valid(h.blocks[bh], bh) == "valid":
                    h.valid_round, h.valid_block = rr, h.blocks[bh]
                    return True
        # L44
        if h.step == "prevote" and self._quorum(h.votes_for[("prevote", r)].get(None, {})):
            h.step = "precommit"
            self._vote("precommit", None)
            return True
        # L47
        if ("L47", r) not in h.fired and self._quorum(h.first[("precommit", r)]):
            h.fired.add(("L47", r))
            self._schedule(self._timeout("precommit", r), "precommit", r)
            return True
        # a block voted for by more than 1/3 that we never received (§14.10)
        if ("fetch_proposal", r) not in h.fired:
            for vt in ("precommit", "prevote"):
                for bh, votes in h.votes_for[(vt, r)].items():
                    if bh is not None and bh not in h.blocks and 3 * self._weight(votes) > self.table.total:
                        h.fired.add(("fetch_proposal", r))
                        self._schedule(self.settings.proposal_fetch_delay_s, "fetch_proposal", r)
                        return True
        return False

    def _after_me(self, peers: list[str]) -> list[str]:
        """``peers`` in peer-id order after us, cyclically (us left out)."""
        ordered = sorted(set(peers) - {self.peer_id})
        return [p for p in ordered if p > self.peer_id] + [p for p in ordered if p < self.peer_id]

    # -- timers --------------------------------------------------------------------------------

    def _on_timer(self, kind: str, round_: int) -> None:
        h = self.h
        if kind == "propose" and h.round == round_ and h.step == "propose":
            self.counters["timeout_propose"] += 1
            h.step = "prevote"
            self._vote("prevote", None)
        elif kind == "prevote" and h.round == round_ and h.step == "prevote":
            self.counters["timeout_prevote"] += 1
            h.step = "precommit"
            self._vote("precommit", None)
        elif kind == "precommit" and h.round == round_:
            self.counters["timeout_precommit"] += 1
            self._start_round(round_ + 1)
        elif kind == "fetch_proposal":
            for vt in ("precommit", "prevote"):
                for bh, votes in h.votes_for[(vt, round_)].items():
                    if bh is not None and bh not in h.blocks and 3 * self._weight(votes) > self.table.total:
                        self.counters["fetch_proposal"] += 1
                        for v in self._after_me(list(votes))[:FETCH_FROM]:
                            self.unicast(v, "bft_proposal_request", {"height": h.height, "round": round_})
                        return
        elif kind == "poll" and h.round == round_:
            if self._quorum(h.first[("precommit", round_)]):
                return
            if h.step == "prevote" and self._quorum(h.votes_for[("prevote", round_)].get(None, {})):
                return
            self.counters["commit_poll"] += 1
            ids = sorted(self.table.weights)
            up = {v for vt in ("prevote", "precommit") for v in h.first[(vt, round_)]}
            after = self._after_me(ids)
            targets = ([v for v in after if v in up] + [v for v in after if v not in up])[:FETCH_FROM]
            bitmaps = {}
            for vt in ("prevote", "precommit"):
                bits = bytearray((len(ids) + 7) // 8)
                for i, v in enumerate(ids):
                    if v in h.first[(vt, round_)]:
                        bits[i // 8] |= 1 << (i % 8)
                bitmaps[vt + "s"] = bytes(bits)
            for v in targets:
                self.unicast(v, "bft_commit_request", {"from_height": h.height, "max_count": 16})
                self.unicast(v, "bft_vote_request", {"height": h.height, "round": round_, **bitmaps})
        # "not_ready" timers only re-run the rules

    def _tick_loop(self) -> None:
        while not self._stop.is_set():
            time.sleep(0.01)
            with self.cs:
                try:
                    self._tick()
                except Exception as exc:
                    import traceback
                    self.errors.append(f"tick: {exc!r}\n{traceback.format_exc()}")

    def _tick(self) -> None:
        if self.paused:
            return
        now = time.monotonic()
        h = self.h
        if not h.started and now >= h.round0_due:
            held = any(h.first.values()) or h.proposals
            if held or self._pending() or now >= h.round0_due + self.settings.empty_block_interval_s:
                self._start_round(h.resume_round)
        due = [t for t in self._timers if t[0] <= now]
        if due:
            self._timers = [t for t in self._timers if t[0] > now]
            for _, kind, height, round_ in sorted(due):
                if height == self.h.height:
                    self._on_timer(kind, round_)
                    self._run_rules()
        if now >= self._next_rebroadcast:
            self._next_rebroadcast = now + self.settings.rebroadcast_interval_s
            if self.h.started:
                self._rebroadcast()
            if now >= self._next_regossip:
                self._next_regossip = now + self.settings.value_regossip_interval_s
                mine = [v for vh, v in self.own_values.items() if not self._committed_recently(vh)]
                for i in range(0, len(mine), 64):
                    self.broadcast("bft_values", {"values": mine[i:i + 64]})
        self._maybe_opinion()

    def _rebroadcast(self) -> None:
        h = self.h
        own = h.own_proposal.get(h.round)
        if own is not None:
            self.broadcast("bft_proposal", own)
            if own["valid_round"] is not None:
                for vote in self._polka(own["valid_round"], h.proposals[h.round].block_hash):
                    self.broadcast("bft_vote", {"vote": vote_map(vote)})
        p = h.proposals.get(h.round)
        rounds = [h.round, h.round - 1, h.valid_round, h.locked_round, p.valid_round if p else None]
        seen = []
        for r in rounds:
            if r is None or r < 0 or r in seen:
                continue
            seen.append(r)
        for vt in ("prevote", "precommit"):
            for r in seen:
                vote = h.own.get((vt, r))
                if vote is not None:
                    self.broadcast("bft_vote", {"vote": vote_map(vote)})

    # -- commits and epochs -------------------------------------------------------------------

    def _commit(self, commit: iv.CertifiedCommit, source: str) -> None:
        block = commit.block
        with open(self.commit_log_path, "ab") as f:  # §14.12: stored before anything later
            f.write(msgpack.packb(commit.encode(), use_bin_type=True))
            f.flush()
            os.fsync(f.fileno())
        if source == "voted" and self.h.first_vote_at is not None:
            self._decided_heights.append(time.monotonic() - self.h.first_vote_at)
        self.commits[block.height] = commit
        self.commit_source[block.height] = source
        self.ledger.apply(block)
        self.last_height = block.height
        self.last_hash = block.hash()
        for v in block.values:
            vh = hashlib.sha256(v).digest()
            self.committed_values[vh] = block.height
            self.pool.pop(vh, None)
            self.own_values.pop(vh, None)
        self.counters["commits_" + source] += 1
        held = self._held
        self._held = defaultdict(list)
        self.h = HeightState(block.height + 1, round0_due=time.monotonic() + self.settings.commit_wait_s)
        self._restore_lock()
        for peer, frm in list(self._waiters.items()):
            if frm == block.height:
                del self._waiters[peer]
                self.unicast(peer, "bft_commit_response", {"commits": [commit.as_map()],
                                                           "latest_height": self.last_height})
        for sender, messages in held.items():
            for kind, body in messages:
                if kind == "bft_proposal":
                    self._on_proposal(body, sender)
                else:
                    self._on_vote(body, sender)

    def _load_commits(self) -> None:
        """Replay the commit log (each commit verified again, as from a peer, §14.10)."""
        if not os.path.exists(self.commit_log_path):
            return
        with open(self.commit_log_path, "rb") as f:
            raw = f.read()
        unpacker = msgpack.Unpacker(raw=False, max_bin_len=1 << 22)
        unpacker.feed(raw)
        for encoded in unpacker:
            commit = iv.decode_certified_commit(encoded)
            if commit.block.height != self.last_height + 1 or commit.block.parent_hash != self.last_hash:
                raise iv.VerifyError("bad_commit", f"{self.commit_log_path}: height {commit.block.height} does not chain")
            iv.verify_commit(commit, self.table, self.network_id)
            self.commits[commit.block.height] = commit
            self.commit_source[commit.block.height] = "stored"
            self.ledger.apply(commit.block)
            self.last_height, self.last_hash = commit.block.height, commit.block.hash()
            for v in commit.block.values:
                self.committed_values[hashlib.sha256(v).digest()] = commit.block.height
        self.h = HeightState(self.last_height + 1, round0_due=time.monotonic())

    def _restore_lock(self) -> None:
        """§14.12: at the height of the stored sign state, resume its round and lock."""
        last = self.sign_state.last
        if last is None or last["height"] != self.h.height:
            return
        self.h.resume_round = last["round"]
        if last["locked_hash"] is not None and last.get("locked_block"):
            block = iv.decode_block(iv.unpack_one(bytes.fromhex(last["locked_block"]), max_bin=1 << 20,
                                                  max_str=1 << 20, max_array=4096, max_map=64))
            self.h.locked_round, self.h.locked_hash, self.h.locked_block = \
                last["locked_round"], bytes.fromhex(last["locked_hash"]), block
            self.h.blocks[block.hash()] = block

    def opinion_scores(self) -> dict[str, int]:
        """Local scores (ppm) of the other validators: their share of the certificates of the
        last 16 commits (a local policy; §15.5 leaves it open)."""
        heights = sorted(self.commits)[-16:]
        if not heights:
            return {}
        scores = {}
        for v in sorted(self.table.weights):
            if v == self.peer_id:
                continue
            n = sum(1 for x in heights if any(s.voter == v for s in self.commits[x].votes))
            scores[v] = n * iv.PPM // len(heights)
        return scores

    def _maybe_opinion(self) -> None:
        """One signed opinion per epoch at the height §15.5 names for the reference."""
        if not self.settings.submit_opinions or self.peer_id not in self.table.weights:
            return
        e = self.table.epoch
        due = e * self.L + 1 + min(self.L // 2, max(0, self.L - 2))
        if e in self.opinions_sent or self.h.height < due:
            return
        scores = self.opinion_scores()
        if not scores:
            return
        entries = sorted(scores.items())
        sig = self.signing_key.sign(iv.statement_bytes("reputation_opinion", self.network_id, e,
                                                       [list(x) for x in entries])).signature
        value = iv.canonical(iv.encode_value(("opinion", iv.Opinion(e, self.peer_id, tuple(entries), sig))))
        self.opinions_sent[e] = value
        self.counters["opinions_submitted"] += 1
        self.submit(value)

    def close(self) -> None:
        super().close()
        self._ticker.join(5)
