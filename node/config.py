"""Node configuration: defaults < profile < TOML file < environment < command-line flags.

The TOML file is ``DATA_DIR/config.toml`` unless ``--config`` names another;
environment variables are ``CHIMERA_<FIELD>`` in upper case (lists are comma
separated); flags are the named ones of ``chimera node`` plus ``--set FIELD=VALUE``.
Unknown keys and ill-typed values are errors with one clear line
(:class:`ConfigError`), never a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from chimera.consensus.reputation import ObservationKind, ReputationConfig
from chimera.protocol.errors import LocalProtocolError


class ConfigError(Exception):
    """A configuration value is unknown or ill-typed."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    # transport
    listen_host: str = "0.0.0.0"
    port: int = 7420
    advertise_hosts: tuple[str, ...] = ()  # empty: every non-loopback IPv4 (or 127.0.0.1)
    max_message_bytes: int = 1 << 20
    max_clock_skew_s: float = 30.0
    send_hwm: int = 1000
    recv_hwm: int = 10000
    rate_limit_msgs_per_s: float = 2000.0
    rate_limit_burst: int = 4000
    mailbox_size: int = 4096
    # discovery
    mdns: bool = True
    interfaces: tuple[str, ...] = ()  # IPv4 addresses or interface names; empty: all
    bootstrap: tuple[str, ...] = ()  # chm://PEER_ID@HOST:PORT?key=TRANSPORT_KEY
    # membership (SWIM + Lifeguard)
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 0.5
    indirect_checks: int = 3
    suspicion_alpha: float = 4.0
    suspicion_beta: float = 6.0
    sync_interval_s: float = 30.0
    reconnect_interval_s: float = 10.0
    # consensus (the BFT log; network-wide parameters travel in the join token)
    consensus: bool = True  # run the log when the network has genesis validators
    consensus_validator: bool = True  # ask to join the validator set
    consensus_propose_timeout_s: float = 3.0
    consensus_vote_timeout_s: float = 1.0  # prevote and precommit steps
    consensus_commit_wait_s: float = 1.0  # pause after a commit (CometBFT timeout_commit)
    consensus_max_batch: int = 64  # values per block
    consensus_empty_block_interval_s: float = 5.0  # idle: one empty block per interval; 0: every height
    test_equivocate: bool = False  # TEST HOOK: sign conflicting votes (tests only)
    # local reputation (consensus/reputation.py; PROTOCOL.md §14.13): what this node's
    # observations weigh; its opinions, and through them the committed weights, follow
    reputation_half_life_s: float = 3600.0  # old evidence counts half after this
    reputation_weights: tuple[str, ...] = ()  # "KIND=UNITS" overrides, e.g. "vote_ok=0.2"
    # federated training (node/training.py): this node's own data
    training_data: str = ""  # CSV or NPZ file (node/datasets.py); the label column below
    training_label_column: str = ""  # default "label" (CSV) or "y" (NPZ)
    training_test_data: str = ""  # held-out file for per-round accuracy (default: training_data)
    training_digits_shard: str = ""  # "k/n" or "genesis": shard of scikit-learn's digits (demo, tests)
    training_split: str = "dirichlet:0.5"  # digits split: "iid" or "dirichlet:ALPHA"
    training_split_seed: int = 1
    training_fetch_interval_s: float = 1.0  # re-request missing updates / certified models
    training_test_poison: str = ""  # TEST HOOK: "sign_flip:SCALE" sends poisoned updates (tests only)
    training_test_drop_updates_from: str = ""  # TEST HOOK: a peer id whose own fl_update envelopes are lost here
    # execution fabric: WASM agents and tasks (node/fabric.py, docs/AGENTS.md, PROTOCOL.md §18)
    fabric: bool = True
    fabric_task_slots: int = 2  # tasks run at once (worker threads); 4 per slot wait; more: refused "busy"
    fabric_capacity_interval_s: float = 5.0  # signed fabric_capacity advertisement period
    fabric_max_wasm_memory_bytes: int = 64 << 20  # linear memory per agent: advertised cap + wasmtime reservation
    fabric_probe_gpus: int = -1  # SIMULATION/TEST: >= 0 advertises this many simulated GPUs instead of NVML's
    fabric_test_wrong_results: bool = False  # TEST HOOK: return wrong task results (tests only)
    fabric_test_tamper_chunks: bool = False  # TEST HOOK: corrupt module chunks served to peers (tests only)
    # operation
    profile: str = "default"
    log_level: str = "info"
    log_json: bool = False
    drop_log_interval_s: float = 60.0
    metrics_port: int = -1  # Prometheus exporter: -1 off, 0 any free port
    metrics_host: str = "127.0.0.1"
    admin_listen: str = ""  # remote admin API "tcp://HOST:PORT" (CURVE, signed requests only); "": off

    def replace(self, **changes: object) -> "NodeConfig":
        return dataclasses.replace(self, **changes)


# Deployment profiles: defaults for the fields a profile changes, applied under
# anything set explicitly (file, environment, flags). "edge" is for 1-4 GB
# machines (Raspberry Pi and the like): smaller queues, fewer in-flight bytes,
# slower timers; peers see the profile in membership and can place less work there.
PROFILES: dict[str, dict[str, object]] = {
    "default": {},
    "edge": {
        "max_message_bytes": 256 * 1024,
        "send_hwm": 200,
        "recv_hwm": 1000,
        "mailbox_size": 512,
        "rate_limit_msgs_per_s": 500.0,
        "rate_limit_burst": 1000,
        "probe_interval_s": 2.0,
        "probe_timeout_s": 1.0,
        "sync_interval_s": 60.0,
        "reconnect_interval_s": 20.0,
        "fabric_task_slots": 1,
        "fabric_max_wasm_memory_bytes": 16 << 20,
    },
}

_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}
_HINTS = typing.get_type_hints(NodeConfig)


def _coerce(name: str, value: object, source: str) -> object:
    tp = _HINTS[name]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
        if typing.get_origin(tp) is tuple:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise ValueError("expected a list of strings")
    except ValueError as exc:
        raise ConfigError(f"{source}: {name}: {exc}") from None
    raise ConfigError(f"{source}: {name}: unsupported type")


def default_data_dir() -> Path:
    """``$CHIMERA_HOME`` or the platform's user data dir (platformdirs)."""
    env = os.environ.get("CHIMERA_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("chimera-mesh", appauthor=False))


def load_config(
    data_dir: Path,
    *,
    config_file: Path | None = None,
    environ: typing.Mapping[str, str] | None = None,
    overrides: typing.Mapping[str, object] | None = None,
) -> NodeConfig:
    """Merge defaults, the TOML file, ``CHIMERA_*`` variables and ``overrides``.

    Raises:
        ConfigError: unreadable TOML, an unknown key, or an ill-typed value.
    """
    values: dict[str, object] = {}
    path = config_file or data_dir / "config.toml"
    if config_file is not None and not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.exists():
        try:
            doc = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        table = doc.get("node", doc)
        for key, value in table.items():
            if key not in _FIELDS:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[key] = _coerce(key, value, str(path))
    env = os.environ if environ is None else environ
    for name in _FIELDS:
        var = "CHIMERA_" + name.upper()
        if var in env:
            values[name] = _coerce(name, env[var], var)
    for key, value in (overrides or {}).items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, value, "flag")
    profile = values.get("profile", "default")
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(sorted(PROFILES))}")
    values = {**PROFILES[profile], **values}
    try:
        config = NodeConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"port {config.port} outside 0..65535")
    if not -1 <= config.metrics_port <= 65535:
        raise ConfigError(f"metrics_port {config.metrics_port} outside -1..65535 (-1: off)")
    if config.probe_timeout_s >= config.probe_interval_s:
        raise ConfigError("probe_timeout_s must be smaller than probe_interval_s")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level {config.log_level!r}: use debug, info, warning or error")
    reputation_config(config)  # raises ConfigError naming the bad entry
    host, _, port = config.admin_listen.removeprefix("tcp://").rpartition(":")
    if config.admin_listen and not (config.admin_listen.startswith("tcp://") and host
                                    and port.isdigit() and int(port) <= 65535):
        raise ConfigError(f"admin_listen {config.admin_listen!r}: use tcp://HOST:PORT (or \"\" for off)")
    return config


def reputation_config(config: NodeConfig) -> ReputationConfig:
    """The local reputation settings of ``config``: ``reputation_half_life_s`` and the
    ``reputation_weights`` entries (``KIND=UNITS``: an observation kind of
    :class:`~chimera.consensus.reputation.ObservationKind` and the evidence units one
    observation adds, a finite number > 0) over the defaults.

    Raises:
        ConfigError: an entry that is not ``KIND=UNITS``, an unknown kind, a kind given
            twice, units that are not a finite number > 0, or a half-life that is not.
    """
    weights: dict[str, float] = {}
    for entry in config.reputation_weights:
        kind, sep, units = entry.partition("=")
        kind = kind.strip()
        if not sep or not kind:
            raise ConfigError(f"reputation_weights: {entry[:64]!r} is not KIND=UNITS")
        if kind in weights:
            raise ConfigError(f"reputation_weights: {kind[:32]!r} given twice")
        try:
            weights[kind] = float(units)
        except ValueError:
            raise ConfigError(f"reputation_weights: {kind[:32]}: {units.strip()[:32]!r} is not a number") from None
        if kind not in ObservationKind._value2member_map_:
            known = ", ".join(k.value for k in ObservationKind)
            raise ConfigError(f"reputation_weights: unknown observation kind {kind[:32]!r}; kinds: {known}")
    try:
        ReputationConfig(weights=weights)
    except LocalProtocolError as exc:
        raise ConfigError(f"reputation_weights: {exc}") from None
    try:
        return ReputationConfig(weights=weights, half_life_s=config.reputation_half_life_s)
    except LocalProtocolError as exc:
        raise ConfigError(f"reputation_half_life_s: {exc}") from None

