"""Scenario files (TOML, read with :mod:`tomllib`) and their strict validation.

Every field is checked when the file is loaded; an unknown field or a bad
value raises :class:`ScenarioError` naming the file and the dotted field
(``network.loss``, ``churn[2].action`` ...). Every number has an upper bound
(times up to :data:`MAX_TIME_S`, delays and clock offsets up to
:data:`MAX_DELAY_MS`, config fields up to :data:`MAX_CONFIG_INT` /
:data:`MAX_CONFIG_FLOAT`, ...). For ``kind = "bft"`` the byzantine peers must
hold less than 1/3 of the weight whichever validators the seed picks
(``"random"`` weights: checked per sweep point before the first run,
``runner.check_layout``). The format, with units::

    [scenario]
    name = "commit-latency"          # required
    kind = "bft"                     # "bft" | "membership" | "training" | "fabric" (required)
    description = "..."
    seed = 1                         # int >= 0
    peers = 4                        # int >= 1
    duration_s = 120.0               # virtual seconds, upper bound of one run

    [sweep]                          # optional: one run per combination
    "scenario.peers" = [4, 7, 10]    # dotted field -> list of values
    "network.loss" = [0.0, 0.1]

    [network]
    latency = { kind = "lognormal", median_ms = 20.0, sigma = 0.5 }
    #         { kind = "constant", ms = 5 } | { kind = "uniform", min_ms = 1, max_ms = 20 }
    loss = 0.0                       # probability per frame
    duplicate = 0.0                  # probability per frame
    reorder = 0.0                    # probability of an extra delay
    reorder_delay_ms = 0.0           # extra delay, uniform in [0, this]
    bandwidth_bytes_per_s = 12500000 # uplink per peer (omit: infinite)
    regions = ["eu", "us"]           # peers assigned round-robin (optional)
    [[network.links]]                # per-link overrides between regions
    between = ["eu", "us"]
    latency = { kind = "constant", ms = 80 }
    loss = 0.01

    [clock]
    max_offset_ms = 0.0              # per-peer offset uniform in +-this
    max_drift_ppm = 0.0              # per-peer drift uniform in +-this

    [stalls]                         # slow peers (Lifeguard's "slow processing")
    fraction = 0.1                   # share of peers that stall
    every_s = 20.0                   # mean gap between stalls (exponential)
    duration_s = 2.0                 # each stall, virtual seconds

    [slow]                           # overloaded peers: every inbound frame handled late
    fraction = 0.1                   # share of peers that are slow
    delay_ms = 800.0                 # inbound processing delay

    [[partitions]]
    start_s = 5.0
    end_s = 15.0                     # the heal
    split = 0.5                      # share of peers on side A (chosen by the seed)
    # or: groups = [[0, 1], [2, 3]]  # peer indices
    flap_s = 0.0                     # >= 0.001: alternate cut / healed windows of this length,
                                     # each cut with a fresh random split (needs split)

    [[churn]]
    at_s = 10.0
    action = "crash"                 # crash | restart | join | leave
    peers = [3]                      # indices, or: count = 2 (random live honest peers)

    [byzantine]
    strategies = ["equivocate"]      # one per byzantine peer (silent, equivocate, badsig, flood, sybil)

    [bft]
    target_heights = 20              # honest validators must all commit this many
    values_per_s = 5.0               # Poisson value load (virtual seconds)
    weights = "equal"                # "equal" | "random" (1..4) | [w0, w1, ...] (0: an observer)
    validators = 0                   # 0: every peer; k: peers 0..k-1 validate, the others are
                                     # observers that follow the log by fetching certified commits
    epoch_heights = 0                # reputation epochs (0: fixed weights; else >= 36)
    [bft.config]                     # any chimera.consensus.bft.BftConfig field
    propose_timeout_s = 1.0

    [membership]
    warm_start = true                # start converged (else join via peer 0)
    lifeguard = true                 # false: classic SWIM (no LHM, fixed suspicion timeout)
    [membership.config]              # any chimera.protocol.membership.MembershipConfig field
    probe_interval_s = 1.0

    [training]                       # kind = "training" (simulations/training_world.py)
    log = "ideal"                    # "ideal" (simulated total-order log) | "bft" (real BftCores)
    rule = "fedavg"                  # fedavg | median | trimmed_mean | krum | multi_krum |
                                     # reputation_clipped; "<rule>+detect" also runs the detector
    detect = false                   # anomaly detector (IsolationForest + robust z) first
    byzantine_f = 3                  # f the rule assumes (default: the number of attackers)
    rounds = 20                      # federated rounds (>= 1)
    local_epochs = 2                 # local SGD passes per round
    learning_rate = 0.1              # SGD step (constant)
    l2 = 1e-4                        # L2 strength
    quorum = 7                       # updates needed after the deadline (default max(rule min, ceil(2n/3)))
    round_deadline_s = 10.0          # virtual seconds after a round starts
    max_update_norm = 1e6            # L2 bound of an update's delta (validation by every peer)
    jobs = 1                         # concurrent jobs (peers round-robin; <= 64 participants each)
    split = "iid"                    # "iid" | "dirichlet" (label skew)
    alpha = 0.5                      # Dirichlet concentration (> 0)
    test_fraction = 0.2              # held-out test set of load_digits (0.05..0.5)
    data_seed = 0                    # split seed
    job_seed = 7                     # the job's training seed
    fit_s_per_epoch_per_100 = 0.05   # virtual seconds of local training per epoch per 100 samples
    commit_latency_s = 0.05          # ideal log: submit -> commit (> 0)
    fetch_interval_s = 1.0           # core's re-request pacing
    attack = "none"                  # none | gaussian | sign_flip | alie | silent | late
    attackers = 3                    # peers running the attack (chosen by the seed)
    attack_scale = 10.0              # sign_flip: delta * -scale
    noise_std = 200.0                # gaussian: std of the noise per coordinate
    alie_z = 0.52                    # alie: override z (default: Baruch et al.'s formula for n, f)
    late_s = 30.0                    # late: extra virtual seconds before the update leaves

    [fabric]                         # kind = "fabric" (simulations/fabric_world.py)
    tasks = 300                      # tasks submitted in all
    tasks_per_s = 5.0                # Poisson arrivals over all submitters (virtual seconds)
    submitters = 3                   # peers 0..submitters-1 submit (always honest)
    replicas = 3                     # distinct peers per task
    rule = "majority"                # ballot rule: majority | weighted | quorum | unanimous
    threshold = "1/2"                # optional: the rule's threshold as a fraction string
    input_words_min = 50             # words per task input (uniform in min..max)
    input_words_max = 400
    wall_time_s = 5.0                # a run's wall time; the attempt times out 2 s (slack) later
    exec_base_s = 0.05               # modelled run time: (base + per_kib * input KiB) * peer speed
    exec_s_per_kib = 0.1             #   (speed uniform in [0.5, 2] per peer, by the seed)
    task_slots = 2                   # attempts a peer runs at once (4 per slot may wait)
    capacity_interval_s = 5.0        # between capacity advertisements
    sample_interval_s = 5.0          # between reputation samples
    wrong_peers = 3                  # peers running "wrong_result" (chosen by the seed, never submitters)
    wrong_probability = 1.0          # chance that one result of a wrong peer is wrong
    wrong_collude = true             # every liar tells the same lie (else: a fresh random one each)
    [fabric.placement]               # any chimera.fabric.placement.PlacementConfig field
    max_retries = 3

    [output]
    trace = true                     # write trace-<run>.txt (default: peers <= 64)
    [[output.plots]]
    kind = "runs"                    # "runs": x and y are metric columns, one point per run;
                                     # "rounds": x is the round, y a per-round series
                                     # (accuracy, loss, included, flagged_byzantine, ...);
                                     # "time" (fabric): x is t_s, y a sampled series
                                     # (honest_score_mean, byzantine_score_mean, tasks_accepted, ...)
    x = "peers"
    y = ["commit_latency_p50_s"]
    series = "network.loss"          # optional: one line per value of this field
    facet = "training.attack"        # optional ("rounds"): one panel per value of this field
    title = "Commit latency vs validators"
    file = "latency.png"             # a plain name in the output folder; not one the report
                                     # writes (metrics.csv/json, reputation.png, trace-*) or
                                     # another plot's or table's. x, y, series, facet must name
                                     # metrics the runs produce (checked after the runs: exit 2)
    [[output.tables]]                # a pivot table of one metric (Markdown + CSV)
    rows = "training.rule"
    columns = "training.attack"
    value = "final_accuracy"
    file = "final_accuracy.md"       # .md; a .csv of the same name is written too
    title = "Accuracy after R rounds"
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import stat
import tomllib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from chimera.consensus.bft import BftConfig
from chimera.protocol.membership import MembershipConfig

from chimera.consensus.aggregation import RULES, AggregationConfig
from chimera.consensus.votes import RULES as BALLOT_RULES
from chimera.fabric.placement import PlacementConfig

from .behaviours import BEHAVIOURS, BYZANTINE_STRATEGIES, MODEL_ATTACKS, alie_z
from .fabric_world import FabricSetup
from .network import Latency, LinkSpec
from .training_world import LOGS, SPLITS, TrainingSetup, default_quorum

KINDS = ("bft", "membership", "training", "fabric")
ATTACKS = ("none",) + MODEL_ATTACKS
PLOT_KINDS = ("runs", "rounds", "time")
MAX_TRAINING_PEERS = 1000
MAX_SCENARIO_BYTES = 1 << 20  # a scenario file
CHURN_ACTIONS = ("crash", "restart", "join", "leave")
MAX_SEED = 2**63 - 1
MAX_TIME_S = 1e9          # any virtual time or duration in seconds (~32 years)
MAX_DELAY_MS = 1e12       # any delay or clock offset in milliseconds (the same 1e9 s)
MIN_FLAP_S = 1e-3         # shortest flapping window
MAX_STALLS = 1_000_000    # stall windows a run may generate (expected count checked at load)
MAX_WEIGHT = 10**9          # a bft.weights entry
MAX_CONFIG_INT = 2**31 - 1  # any integer field of [bft.config], [membership.config], [fabric.placement]
MAX_CONFIG_FLOAT = 1e9      # any float field of those tables
SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"


class ScenarioError(ValueError):
    """A scenario file is unreadable or a field is wrong; the message names the field."""

    def __init__(self, source: str, field_name: str, problem: str) -> None:
        self.source, self.field, self.problem = source, field_name, problem
        # "-": about the file itself, not one of its fields
        super().__init__(f"{source}: {problem}" if field_name == "-" else f"{source}: field '{field_name}': {problem}")


class _Reader:
    """Typed, strict access to one TOML table, tracking the dotted path."""

    def __init__(self, source: str, table: dict, path: str) -> None:
        self.source, self.table, self.path = source, table, path
        self.used: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, problem: str) -> ScenarioError:
        return ScenarioError(self.source, self._name(key), problem)

    def has(self, key: str) -> bool:
        return key in self.table

    def raw(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.table.get(key, default)

    def number(self, key: str, default: float | None = None, *, lo: float = -math.inf, hi: float = math.inf,
               required: bool = False, integer: bool = False) -> Any:
        if key not in self.table:
            if required:
                raise self.error(key, "is required")
            self.used.add(key)
            return default
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (integer and not isinstance(value, int)):
            raise self.error(key, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
        if not (lo <= value <= hi) or (isinstance(value, float) and not math.isfinite(value)):
            raise self.error(key, f"must be in [{lo:g}, {hi:g}], got {value!r}")
        return value

    def string(self, key: str, default: str | None = None, *, choices: tuple[str, ...] | None = None,
               required: bool = False) -> Any:
        if key not in self.table:
            if required:
                raise self.error(key, "is required")
            self.used.add(key)
            return default
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool | None = None) -> Any:
        if key not in self.table:
            self.used.add(key)
            return default
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def sub(self, key: str) -> "_Reader":
        value = self.raw(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "must be a table")
        return _Reader(self.source, value, self._name(key))

    def subs(self, key: str) -> list["_Reader"]:
        value = self.raw(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, "must be an array of tables ([[...]])")
        return [_Reader(self.source, v, f"{self._name(key)}[{i}]") for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown field")


def _latency(r: _Reader, key: str, default: Latency) -> Latency:
    if not r.has(key):
        r.used.add(key)
        return default
    lat = r.sub(key)
    kind = lat.string("kind", required=True, choices=("constant", "uniform", "lognormal"))
    if kind == "constant":
        out = Latency.constant(lat.number("ms", required=True, lo=0, hi=MAX_DELAY_MS) / 1e3)
    elif kind == "uniform":
        lo = lat.number("min_ms", required=True, lo=0, hi=MAX_DELAY_MS)
        hi = lat.number("max_ms", required=True, lo=lo, hi=MAX_DELAY_MS)
        out = Latency.uniform(lo / 1e3, hi / 1e3)
    else:
        out = Latency.lognormal(lat.number("median_ms", required=True, lo=1e-6, hi=MAX_DELAY_MS) / 1e3,
                                lat.number("sigma", 0.5, lo=0, hi=5))
    lat.done()
    return out


def _link(r: _Reader, base: LinkSpec) -> LinkSpec:
    return LinkSpec(
        latency=_latency(r, "latency", base.latency),
        loss=r.number("loss", base.loss, lo=0, hi=1),
        duplicate=r.number("duplicate", base.duplicate, lo=0, hi=1),
        reorder=r.number("reorder", base.reorder, lo=0, hi=1),
        reorder_delay_s=r.number("reorder_delay_ms", base.reorder_delay_s * 1e3, lo=0, hi=MAX_DELAY_MS) / 1e3,
    )


@dataclass(frozen=True)
class PartitionSpec:
    start_s: float
    end_s: float
    split: float | None
    groups: tuple[tuple[int, ...], ...] | None
    flap_s: float = 0.0


@dataclass(frozen=True)
class ChurnSpec:
    at_s: float
    action: str
    peers: tuple[int, ...] | None
    count: int | None


@dataclass(frozen=True)
class PlotSpec:
    x: str
    y: tuple[str, ...]
    series: str | None
    title: str
    file: str
    kind: str = "runs"
    facet: str | None = None


@dataclass(frozen=True)
class TableSpec:
    """A pivot of metric ``value``: one row per value of ``rows``, a column per value of ``columns``."""

    rows: str
    columns: str
    value: str
    title: str
    file: str


@dataclass(frozen=True)
class TrainingSpec:
    """``[training]``: the federation (:class:`~chimera.simulations.training_world.TrainingSetup`)
    and the attack: ``attackers`` peers (chosen by the seed) run strategy ``attack``
    with tunables ``attack_params`` (names of the behaviour's ``params``)."""

    setup: TrainingSetup
    attack: str
    attackers: int
    attack_params: tuple[tuple[str, object], ...]


@dataclass(frozen=True)
class FabricSpec:
    """``[fabric]``: the load (:class:`~chimera.simulations.fabric_world.FabricSetup`) and
    ``wrong_peers`` peers running ``wrong_result`` with tunables ``wrong_params``
    (names of the behaviour's ``params``), placed by the seed among the non-submitters."""

    setup: FabricSetup
    wrong_peers: int
    wrong_params: tuple[tuple[str, object], ...]


@dataclass(frozen=True)
class Scenario:
    """A validated scenario (one sweep point). Times in virtual seconds."""

    source: str
    name: str
    kind: str
    description: str
    seed: int
    peers: int
    duration_s: float
    link: LinkSpec
    links: tuple[tuple[str, str, LinkSpec], ...]
    regions: tuple[str, ...]
    bandwidth_bytes_per_s: float | None
    max_offset_s: float
    max_drift_ppm: float
    stall_fraction: float
    stall_every_s: float
    stall_duration_s: float
    slow_fraction: float
    slow_delay_s: float
    partitions: tuple[PartitionSpec, ...]
    churn: tuple[ChurnSpec, ...]
    byzantine: tuple[str, ...]
    bft_target_heights: int
    bft_values_per_s: float
    bft_weights: Any
    bft_epoch_heights: int
    bft_validators: int  # 0: every peer; else peers k.. follow the log as observers
    bft_config: BftConfig
    warm_start: bool
    lifeguard: bool
    membership_config: MembershipConfig
    trace: bool
    plots: tuple[PlotSpec, ...]
    sweep_values: dict = field(default_factory=dict)
    training: TrainingSpec | None = None
    tables: tuple[TableSpec, ...] = ()
    fabric: FabricSpec | None = None

    def disruption_end_s(self) -> float:
        """Virtual time after which no partition, churn or stall is scheduled."""
        ends = [p.end_s for p in self.partitions] + [c.at_s for c in self.churn]
        return max(ends, default=0.0)


REPORT_FILES = ("metrics.csv", "metrics.json", "reputation.png", "violation.json")
"""Files the report and search mode write next to plots and tables (and ``trace-*.txt``)."""


def _output_file(r: _Reader, default: str, suffixes: tuple[str, ...], taken: dict[str, str]) -> str:
    """``file`` of a plot or table: a plain name in the output folder ending in ``suffixes[0]``;
    with the other suffixes it writes too, it must not collide with :data:`REPORT_FILES`
    or another plot or table."""
    name = r.string("file", default)
    stem = name[:-len(suffixes[0])] if name.endswith(suffixes[0]) else ""
    if not stem:
        raise r.error("file", f"must be a file name ending with {suffixes[0]}, got {name!r}")
    if any(c in name for c in "/\\\0:") or name.startswith(".") or not name.isprintable():
        raise r.error("file", f"must be a plain file name in the output folder (no path), got {name!r}")
    for written in (stem + suffix for suffix in suffixes):
        key = written.lower()
        if key in REPORT_FILES or key.startswith("trace-"):
            raise r.error("file", f"{name!r} would overwrite the report's own {written}")
        if key in taken:
            raise r.error("file", f"{name!r} would overwrite {taken[key]}")
        taken[key] = f"{written} of {r._name('file')}"
    return name


def _config(r: _Reader, cls: type, source_defaults: dict | None = None) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(source_defaults or {})
    for key in list(r.table):
        if key not in names:
            raise r.error(key, f"unknown field of {cls.__name__}")
        default = getattr(cls(), key)
        if isinstance(default, bool):
            values[key] = r.boolean(key)
        elif isinstance(default, int):
            values[key] = r.number(key, integer=True, lo=0, hi=MAX_CONFIG_INT)
        else:
            values[key] = float(r.number(key, lo=0, hi=MAX_CONFIG_FLOAT))
    try:
        return cls(**values)
    except Exception as exc:  # the config's own checks (LocalProtocolError)
        raise ScenarioError(r.source, r.path, str(exc)) from None


SIM_BFT_DEFAULTS = dict(propose_timeout_s=1.0, propose_timeout_delta_s=0.25, prevote_timeout_s=0.5,
                        prevote_timeout_delta_s=0.25, precommit_timeout_s=0.5, precommit_timeout_delta_s=0.25,
                        commit_wait_s=0.05, rebroadcast_interval_s=1.0, catchup_interval_s=0.5, max_batch=16)
"""BFT timeouts used by scenarios unless ``[bft.config]`` overrides them (LAN-like values)."""


def _parse(doc: dict, source: str, overrides: dict) -> Scenario:
    doc = copy.deepcopy(doc)
    for dotted, value in overrides.items():
        table = doc
        parts = dotted.split(".")
        for part in parts[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ScenarioError(source, dotted, "is not inside a table")
        table[parts[-1]] = value
    root = _Reader(source, doc, "")
    sc = root.sub("scenario")
    name = sc.string("name", required=True)
    kind = sc.string("kind", required=True, choices=KINDS)
    description = sc.string("description", "")
    seed = sc.number("seed", 1, lo=0, hi=MAX_SEED, integer=True)
    peers = sc.number("peers", 4, lo=1, hi=100_000, integer=True)
    duration = float(sc.number("duration_s", 60.0, lo=1e-3, hi=MAX_TIME_S))
    sc.done()
    root.raw("sweep")  # validated by load_scenarios

    net = root.sub("network")
    link = _link(net, LinkSpec())
    regions_raw = net.raw("regions", [])
    if not isinstance(regions_raw, list) or not all(isinstance(x, str) for x in regions_raw):
        raise net.error("regions", "must be a list of region names")
    regions = tuple(regions_raw)
    bandwidth = net.number("bandwidth_bytes_per_s", None, lo=1, hi=1e15)
    links = []
    for lr in net.subs("links"):
        between = lr.raw("between")
        if not (isinstance(between, list) and len(between) == 2 and all(b in regions for b in between)):
            raise lr.error("between", f"must name two regions of network.regions {list(regions)}")
        links.append((between[0], between[1], _link(lr, link)))
        lr.done()
    net.done()

    clock = root.sub("clock")
    max_offset = clock.number("max_offset_ms", 0.0, lo=0, hi=MAX_DELAY_MS) / 1e3
    max_drift = clock.number("max_drift_ppm", 0.0, lo=0, hi=100_000)
    clock.done()

    st = root.sub("stalls")
    stall_fraction = st.number("fraction", 0.0, lo=0, hi=1)
    stall_every = st.number("every_s", 30.0, lo=1e-3, hi=MAX_TIME_S)
    stall_duration = st.number("duration_s", 1.0, lo=0, hi=MAX_TIME_S)
    st.done()
    if stall_fraction and stall_duration:
        expected = round(stall_fraction * peers) * duration / (stall_every + stall_duration)
        if expected > MAX_STALLS / 2:
            raise st.error("every_s", f"about {expected:.3g} stall windows in a run (round(fraction x peers) x "
                                      f"scenario.duration_s / (every_s + duration_s)); at most {MAX_STALLS // 2}")
    sl = root.sub("slow")
    slow_fraction = sl.number("fraction", 0.0, lo=0, hi=1)
    slow_delay = sl.number("delay_ms", 0.0, lo=0, hi=MAX_DELAY_MS) / 1e3
    sl.done()

    partitions = []
    for pr in root.subs("partitions"):
        start = pr.number("start_s", required=True, lo=0, hi=MAX_TIME_S)
        end = pr.number("end_s", required=True, lo=0, hi=MAX_TIME_S)
        if end <= start:
            raise pr.error("end_s", f"must be after start_s ({start})")
        split = pr.number("split", None, lo=0, hi=1)
        groups_raw = pr.raw("groups")
        groups = None
        if groups_raw is not None:
            if not (isinstance(groups_raw, list) and all(isinstance(g, list) and all(
                    isinstance(i, int) and 0 <= i < peers for i in g) for g in groups_raw)):
                raise pr.error("groups", f"must be lists of peer indices in 0..{peers - 1}")
            groups = tuple(tuple(g) for g in groups_raw)
        if (split is None) == (groups is None):
            raise pr.error("split", "give exactly one of split or groups")
        flap = pr.number("flap_s", 0.0, lo=0, hi=MAX_TIME_S)
        if flap and flap < MIN_FLAP_S:
            raise pr.error("flap_s", f"must be 0 (no flapping) or >= {MIN_FLAP_S:g} s, got {flap!r}")
        if flap and split is None:
            raise pr.error("flap_s", "needs split (each cut draws a fresh random split)")
        partitions.append(PartitionSpec(float(start), float(end), split, groups, float(flap)))
        pr.done()

    churn = []
    for cr in root.subs("churn"):
        at = cr.number("at_s", required=True, lo=0, hi=MAX_TIME_S)
        action = cr.string("action", required=True, choices=CHURN_ACTIONS)
        peers_raw = cr.raw("peers")
        count = cr.number("count", None, lo=1, hi=100_000, integer=True)
        idx = None
        if peers_raw is not None:
            if not (isinstance(peers_raw, list) and all(isinstance(i, int) and 0 <= i < peers for i in peers_raw)):
                raise cr.error("peers", f"must be a list of peer indices in 0..{peers - 1}")
            idx = tuple(peers_raw)
        if action != "join" and (idx is None) == (count is None):
            raise cr.error("peers", "give exactly one of peers or count")
        if kind in ("training", "fabric") and action not in ("crash", "restart"):
            raise cr.error("action", f"{kind} scenarios support crash and restart")
        churn.append(ChurnSpec(float(at), action, idx, count))
        cr.done()

    byz = root.sub("byzantine")
    strategies = byz.raw("strategies", [])
    if not isinstance(strategies, list) or not all(isinstance(s, str) and s in BEHAVIOURS for s in strategies):
        raise byz.error("strategies", f"must be a list of strategy names ({', '.join(BYZANTINE_STRATEGIES)})")
    if len(strategies) >= peers:
        raise byz.error("strategies", f"{len(strategies)} byzantine peers of {peers}: at least one must be honest")
    byz.done()

    bft = root.sub("bft")
    target = bft.number("target_heights", 10, lo=1, hi=1_000_000, integer=True)
    vps = bft.number("values_per_s", 5.0, lo=0, hi=10_000)
    weights = bft.raw("weights", "equal")
    if weights not in ("equal", "random") and not (
            isinstance(weights, list) and len(weights) == peers and all(
                isinstance(w, int) and not isinstance(w, bool) and 0 <= w <= MAX_WEIGHT for w in weights)
            and any(w >= 1 for w in weights)):
        raise bft.error("weights", f'must be "equal", "random" or {peers} integers in 0..{MAX_WEIGHT} '
                                   "(0: an observer), at least one >= 1")
    validators = bft.number("validators", 0, lo=0, integer=True)
    if validators > peers:
        raise bft.error("validators", f"must be at most scenario.peers ({peers}); 0 means all")
    if validators and isinstance(weights, list):
        raise bft.error("validators", "give either validators or a weights list (0 marks an observer)")
    n_validators = validators or (sum(1 for w in weights if w) if isinstance(weights, list) else peers)
    if len(strategies) >= n_validators and kind == "bft":
        raise bft.error("validators", f"{len(strategies)} byzantine peers need more than {n_validators} validators")
    if kind == "bft" and strategies and weights != "random":
        # the seed picks which validators are byzantine: every pick must hold < 1/3
        # ("random" weights are drawn by the seed too: runner.check_layout, before the first run)
        ws = [100] * n_validators if weights == "equal" else [w for w in weights if w > 0]
        heaviest = sum(sorted(ws, reverse=True)[:len(strategies)])
        if 3 * heaviest >= sum(ws):
            raise ScenarioError(source, "byzantine.strategies",
                                f"{len(strategies)} byzantine peers may hold {heaviest} of {sum(ws)} weight "
                                f"({'the heaviest validators, ' if weights != 'equal' else ''}"
                                f"drawn by the seed among {len(ws)} validators): BFT safety needs "
                                f"strictly less than 1/3")
    epoch_heights = bft.number("epoch_heights", 0, lo=0, hi=1_000_000, integer=True)
    if epoch_heights and epoch_heights < 36:
        raise bft.error("epoch_heights", "must be 0 (fixed weights) or >= 36")
    if epoch_heights and n_validators < peers:
        raise bft.error("epoch_heights", "reputation epochs need every peer to be a validator (no observers)")
    if epoch_heights and kind == "bft" and peers > 50:
        raise bft.error("epoch_heights", "reputation epochs support at most 50 validators "
                                         "(an opinion must fit in one 4096-byte value)")
    bft_config = _config(bft.sub("config"), BftConfig, SIM_BFT_DEFAULTS)
    bft.done()

    training = _training(root, kind, peers, len(strategies)) if kind == "training" else None
    if kind != "training" and root.has("training"):
        raise root.error("training", 'only for kind = "training"')
    fabric = _fabric(root, peers, len(strategies)) if kind == "fabric" else None
    if kind != "fabric" and root.has("fabric"):
        raise root.error("fabric", 'only for kind = "fabric"')

    mem = root.sub("membership")
    warm = mem.boolean("warm_start", True)
    lifeguard = mem.boolean("lifeguard", True)
    base = {} if lifeguard else {"max_local_health": 0, "suspicion_beta": 1.0}
    mcfg = _config(mem.sub("config"), MembershipConfig, base)
    if not lifeguard:
        mcfg = dataclasses.replace(mcfg, max_local_health=0, suspicion_beta=1.0)
    if kind == "membership" and warm and peers - 1 > mcfg.max_members:
        # a warm start holds every peer's full table (about 140 bytes x peers^2)
        raise mem.error("warm_start", f"a warm start of {peers} peers needs [membership.config] max_members >= "
                                      f"{peers - 1} (it is {mcfg.max_members}); set warm_start = false or "
                                      "raise max_members")
    mem.done()

    out = root.sub("output")
    trace = out.boolean("trace", peers <= 64)
    plots = []
    taken: dict[str, str] = {}  # lower-case output file name -> "<name> of <field>" that writes it
    for pl in out.subs("plots"):
        plot_kind = pl.string("kind", "runs", choices=PLOT_KINDS)
        x = pl.string("x", {"rounds": "round", "time": "t_s"}.get(plot_kind), required=plot_kind == "runs")
        y = pl.raw("y")
        if isinstance(y, str):
            y = [y]
        if not (isinstance(y, list) and y and all(isinstance(v, str) for v in y)):
            raise pl.error("y", "must be a metric name or a list of them")
        plots.append(PlotSpec(x, tuple(y), pl.string("series", None), pl.string("title", name),
                              _output_file(pl, f"plot{len(plots)}.png", (".png",), taken), plot_kind,
                              pl.string("facet", None)))
        if plot_kind == "rounds" and kind != "training":
            raise pl.error("kind", 'per-round plots need kind = "training"')
        if plot_kind == "time" and kind != "fabric":
            raise pl.error("kind", 'time-series plots need kind = "fabric"')
        pl.done()
    tables = []
    for tb in out.subs("tables"):
        spec = TableSpec(tb.string("rows", required=True), tb.string("columns", required=True),
                         tb.string("value", required=True), tb.string("title", name),
                         _output_file(tb, f"table{len(tables)}.md", (".md", ".csv"), taken))
        tables.append(spec)
        tb.done()
    out.done()
    root.done()

    return Scenario(source=source, name=name, kind=kind, description=description, seed=seed, peers=peers,
                    duration_s=duration, link=link, links=tuple(links), regions=regions,
                    bandwidth_bytes_per_s=bandwidth, max_offset_s=max_offset, max_drift_ppm=max_drift,
                    stall_fraction=stall_fraction, stall_every_s=stall_every, stall_duration_s=stall_duration,
                    slow_fraction=slow_fraction, slow_delay_s=slow_delay,
                    partitions=tuple(partitions), churn=tuple(churn), byzantine=tuple(strategies),
                    bft_target_heights=target, bft_values_per_s=vps, bft_weights=weights, bft_validators=validators,
                    bft_epoch_heights=epoch_heights, bft_config=bft_config, warm_start=warm,
                    lifeguard=lifeguard, membership_config=mcfg, trace=trace, plots=tuple(plots),
                    training=training, tables=tuple(tables), fabric=fabric)


def _fabric(root: _Reader, peers: int, other_byzantine: int) -> FabricSpec:
    """The ``[fabric]`` table (module docstring); every error names its field."""
    fr = root.sub("fabric")
    tasks = fr.number("tasks", 300, lo=1, hi=1_000_000, integer=True)
    submitters = fr.number("submitters", 3, lo=1, hi=peers, integer=True)
    replicas = fr.number("replicas", 3, lo=1, hi=min(64, peers), integer=True)
    rule = fr.string("rule", "majority", choices=BALLOT_RULES)
    threshold_raw = fr.raw("threshold")
    threshold = None
    if threshold_raw is not None:
        try:
            if not isinstance(threshold_raw, str):
                raise ValueError
            threshold = Fraction(threshold_raw)
        except (ValueError, ZeroDivisionError):
            raise fr.error("threshold", f'must be a fraction string such as "2/3", got {threshold_raw!r}') from None
        if rule == "unanimous" and threshold != 1:
            raise fr.error("threshold", "a unanimous ballot has threshold 1")
        if rule != "unanimous" and not Fraction(1, 2) <= threshold < 1:
            raise fr.error("threshold", f"must be in [1/2, 1) for rule {rule}, got {threshold}")
    words_min = fr.number("input_words_min", 50, lo=1, hi=50_000, integer=True)
    words_max = fr.number("input_words_max", max(400, words_min), lo=words_min, hi=50_000, integer=True)
    wrong_peers = fr.number("wrong_peers", 0, lo=0, hi=peers, integer=True)
    if wrong_peers + other_byzantine > peers - submitters:
        raise fr.error("wrong_peers", f"{wrong_peers + other_byzantine} byzantine peers do not fit beside "
                                      f"{submitters} honest submitters among {peers} peers")
    params: dict[str, object] = {}
    probability = fr.number("wrong_probability", None, lo=0, hi=1)
    if probability is not None:
        params["probability"] = float(probability)
    collude = fr.boolean("wrong_collude", None)
    if collude is not None:
        params["collude"] = collude
    if params and not wrong_peers:
        raise fr.error("wrong_peers", "wrong_probability/wrong_collude need wrong_peers >= 1")
    placement = _config(fr.sub("placement"), PlacementConfig)
    try:
        setup = FabricSetup(
            tasks=tasks, tasks_per_s=float(fr.number("tasks_per_s", 5.0, lo=1e-6, hi=1e6)),
            submitters=submitters, replicas=replicas, rule=rule, threshold=threshold,
            input_words_min=words_min, input_words_max=words_max,
            wall_time_s=float(fr.number("wall_time_s", 5.0, lo=1e-3, hi=86_400)),
            exec_base_s=float(fr.number("exec_base_s", 0.05, lo=0, hi=86_400)),
            exec_s_per_kib=float(fr.number("exec_s_per_kib", 0.1, lo=0, hi=86_400)),
            task_slots=fr.number("task_slots", 2, lo=1, hi=1024, integer=True),
            capacity_interval_s=float(fr.number("capacity_interval_s", 5.0, lo=0.1, hi=3600)),
            sample_interval_s=float(fr.number("sample_interval_s", 5.0, lo=1e-3, hi=MAX_TIME_S)),
            placement=placement)
    except ValueError as exc:
        raise ScenarioError(root.source, "fabric", str(exc)) from None
    fr.done()
    return FabricSpec(setup=setup, wrong_peers=wrong_peers,
                      wrong_params=tuple(sorted(params.items())) if wrong_peers else ())


def _training(root: _Reader, kind: str, peers: int, other_byzantine: int) -> TrainingSpec:
    """The ``[training]`` table (module docstring); every error names its field."""
    tr = root.sub("training")
    if peers > MAX_TRAINING_PEERS:
        raise ScenarioError(root.source, "scenario.peers", f"training scenarios support at most "
                                                           f"{MAX_TRAINING_PEERS} peers, got {peers}")
    log = tr.string("log", "ideal", choices=LOGS)
    rule_raw = tr.string("rule", "fedavg")
    rule, plus, suffix = rule_raw.partition("+")
    if rule not in RULES or (plus and suffix != "detect"):
        raise tr.error("rule", f"must be one of {', '.join(RULES)}, optionally with '+detect', got {rule_raw!r}")
    detect = tr.boolean("detect", False) or bool(plus)
    jobs = tr.number("jobs", 1, lo=1, hi=peers, integer=True)
    n_job = peers // jobs  # the smallest job
    if -(-peers // jobs) > 64:
        raise tr.error("jobs", f"{peers} peers in {jobs} job(s) exceed 64 participants per job")
    attack = tr.string("attack", "none", choices=ATTACKS)
    attackers = tr.number("attackers", 0, lo=0, hi=peers, integer=True)
    if attack == "none":
        attackers_effective = 0
    else:
        if attackers < 1:
            raise tr.error("attackers", f'attack "{attack}" needs attackers >= 1')
        attackers_effective = attackers
    if attackers_effective + other_byzantine >= peers:
        raise tr.error("attackers", f"{attackers_effective + other_byzantine} byzantine peers of {peers}: "
                                    f"at least one must be honest")
    if log == "bft" and 3 * (attackers_effective + other_byzantine) >= peers:
        raise tr.error("attackers", "over the BFT log, byzantine peers must be fewer than 1/3")
    byz_f = tr.number("byzantine_f", None, lo=0, hi=64, integer=True)
    f_eff = byz_f if byz_f is not None else -(-(attackers_effective + other_byzantine) // jobs)
    agg = AggregationConfig(rule=rule, f=f_eff, detect=detect)
    if agg.min_updates() > n_job:
        raise tr.error("byzantine_f", f"rule {rule} with f={f_eff} needs {agg.min_updates()} updates; "
                                      f"a job has {n_job} participants")
    quorum = tr.number("quorum", None, lo=1, hi=64, integer=True)
    if quorum is not None and not agg.min_updates() <= quorum <= n_job:
        raise tr.error("quorum", f"must be in {agg.min_updates()}..{n_job} (rule minimum..participants)")
    if quorum is None:
        default_quorum(n_job, agg)  # always valid: min(n, max(rule minimum, ceil(2n/3)))
    split = tr.string("split", "iid", choices=SPLITS)
    params = {}
    scale = tr.number("attack_scale", None, lo=0, hi=1e12)
    std = tr.number("noise_std", None, lo=0, hi=1e12)
    z = tr.number("alie_z", None, lo=-10, hi=10)
    late = tr.number("late_s", None, lo=0, hi=MAX_TIME_S)
    if attack == "alie" and z is None:
        try:
            alie_z(n_job, max(1, -(-attackers_effective // jobs)))
        except ValueError as exc:
            raise tr.error("attackers", str(exc)) from None
    for key, value in (("scale", scale), ("std", std), ("z", z), ("delay_s", late)):
        if value is not None:
            params[key] = float(value)
    setup = TrainingSetup(
        log=log, rule=rule, detect=detect, byzantine_f=byz_f,
        rounds=tr.number("rounds", 20, lo=1, hi=10_000, integer=True),
        local_epochs=tr.number("local_epochs", 2, lo=1, hi=1000, integer=True),
        learning_rate=float(tr.number("learning_rate", 0.1, lo=1e-9, hi=100)),
        l2=float(tr.number("l2", 1e-4, lo=0, hi=100)),
        quorum=quorum,
        round_deadline_s=float(tr.number("round_deadline_s", 10.0, lo=1e-3, hi=MAX_TIME_S)),
        max_update_norm=float(tr.number("max_update_norm", 1e6, lo=1e-9, hi=1e12)),
        jobs=jobs, split=split,
        alpha=float(tr.number("alpha", 0.5, lo=1e-3, hi=1e6)),
        test_fraction=float(tr.number("test_fraction", 0.2, lo=0.05, hi=0.5)),
        data_seed=tr.number("data_seed", 0, lo=0, hi=2**31, integer=True),
        job_seed=tr.number("job_seed", 7, lo=0, hi=2**32 - 1, integer=True),
        fit_s_per_epoch_per_100=float(tr.number("fit_s_per_epoch_per_100", 0.05, lo=0, hi=MAX_TIME_S)),
        commit_latency_s=float(tr.number("commit_latency_s", 0.05, lo=1e-6, hi=MAX_TIME_S)),
        fetch_interval_s=float(tr.number("fetch_interval_s", 1.0, lo=1e-3, hi=MAX_TIME_S)))
    if peers > int(1797 * (1 - setup.test_fraction)):
        raise ScenarioError(root.source, "scenario.peers", f"more peers than training samples "
                                                           f"({int(1797 * (1 - setup.test_fraction))})")
    tr.done()
    return TrainingSpec(setup=setup, attack=attack, attackers=attackers_effective,
                        attack_params=tuple(sorted(params.items())))


def shipped_name(path: Path) -> str:
    """The name of a shipped scenario file: its stem with ``-`` for ``_`` (``commit_latency.toml`` is
    ``commit-latency``, the ``scenario.name`` inside it, ``list``'s name and its output folder)."""
    return path.stem.replace("_", "-")


def shipped_names() -> list[str]:
    """The names of the shipped scenarios (``commit-latency``, ...), sorted."""
    return sorted(shipped_name(p) for p in SCENARIO_DIR.glob("*.toml"))


def resolve_path(name: str | Path) -> Path:
    """A scenario file: a path, or the name of a shipped one, spelt with ``-`` or ``_``
    (``commit-latency``, ``commit_latency``, with or without ``.toml``).

    Raises:
        ScenarioError: neither a file nor a shipped name (the message lists the shipped names).
    """
    path = Path(name)
    if path.exists() and not path.is_dir():
        return path
    stem = path.name[:-len(".toml")] if path.name.endswith(".toml") else path.name
    shipped = SCENARIO_DIR / f"{stem.replace('-', '_')}.toml"
    if stem and shipped.is_file():
        return shipped
    if path.is_dir():
        raise ScenarioError(str(name), "-", "is a directory; give a scenario file (.toml) or a shipped name")
    raise ScenarioError(str(name), "-", f"no such file; shipped scenarios: {', '.join(shipped_names())}")


def load_scenarios(name: str | Path, overrides: dict | None = None) -> list[Scenario]:
    """Every sweep point of a scenario file, in sweep order.

    Args:
        name: file path or shipped scenario name.
        overrides: dotted field -> value applied before validation (e.g. the
            CLI's ``--seed``/``--peers``); an overridden field is removed from
            the sweep.
    Raises:
        ScenarioError: unreadable TOML or any invalid field (named).
    """
    path = resolve_path(name)
    source = path.name
    try:
        info = path.stat()  # a device or FIFO would read without end
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SCENARIO_BYTES:
            raise ScenarioError(str(name), "-", f"not a regular file of at most {MAX_SCENARIO_BYTES} bytes")
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(source, "-", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(source, "-", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise ScenarioError(str(name), "-", f"cannot read: {exc.strerror or exc}") from None
    overrides = dict(overrides or {})
    sweep = overrides.pop("sweep") if "sweep" in overrides else doc.get("sweep", {})  # --set sweep={}
    if not isinstance(sweep, dict):
        raise ScenarioError(source, "sweep", "must be a table of dotted field = [values]")
    # --set sweep.FIELD=[...] (quoted or not) sets one axis of the sweep; it used to land in the
    # document after the sweep was expanded, and was ignored without a word
    axes = {k: overrides.pop(k) for k in [k for k in overrides if k.startswith("sweep.")]}
    if axes:
        sweep = dict(sweep)
        for key, values in axes.items():
            sweep[key[len("sweep."):].strip('"')] = values
    keys = []
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ScenarioError(source, f"sweep.{key}", "must be a non-empty list of values")
        if key not in overrides:
            keys.append(key)
    points = list(itertools.product(*(sweep[k] for k in keys))) if keys else [()]
    out = []
    for point in points:
        values = dict(zip(keys, point))
        try:
            scenario = _parse(doc, source, {**values, **overrides})
        except ScenarioError as exc:
            if not values:
                raise
            at = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ScenarioError(exc.source, exc.field, f"{exc.problem} (sweep point {at})") from None
        out.append(dataclasses.replace(scenario, sweep_values=values))
    return out
