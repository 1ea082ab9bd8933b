"""Node configuration: defaults < profile < TOML file < environment < command-line flags.

The TOML file is ``DATA_DIR/config.toml`` unless ``--config`` names another;
environment variables are ``CHIMERA_<FIELD>`` in upper case (lists are comma
separated); flags are the named ones of ``chimera node`` plus ``--set FIELD=VALUE``.
Unknown keys, ill-typed values and numbers outside their field's range
(:data:`RANGES`; floats must be finite) are errors with one clear line
(:class:`ConfigError`), never a traceback.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import math
import os
import stat
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from chimera.protocol.errors import LocalProtocolError, RemoteProtocolError
from chimera.protocol.network import parse_contact_uri

if typing.TYPE_CHECKING:
    from chimera.consensus.reputation import ReputationConfig


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
    send_queue_max_bytes: int = 64 << 20  # bytes queued for sending, all peers together
    rate_limit_msgs_per_s: float = 2000.0
    rate_limit_burst: int = 4000
    new_senders_per_address_per_s: float = 16.0  # new sender identities one IP address may introduce
    new_senders_burst: int = 256  # ... at once, before that rate applies
    mailbox_size: int = 4096
    # discovery
    mdns: bool = True
    interfaces: tuple[str, ...] = ()  # IPv4 addresses or interface names; empty: all
    mdns_interface_poll_s: float = 10.0  # re-read interfaces/addresses, re-advertise on a change; 0: never
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
    # false: this validator trusts that its key signed nothing it lost with its sign state (or
    # log): no height sat out, no wait to hear the network, no floor from certificates
    # (PROTOCOL.md §14.12; CometBFT's double_sign_check_height = 0). Only to restart a log that
    # stopped because it needs this validator while it sits a height out; wrong, it equivocates.
    consensus_double_sign_check: bool = True
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
    fabric_max_task_wall_s: float = 3600.0  # longest task run accepted from anyone (advertised; longer: over_capacity)
    fabric_fetched_modules_max_bytes: int = 256 << 20  # modules fetched from peers kept on disk (LRU beyond)
    fabric_compiled_cache_max_bytes: int = 1 << 30  # compiled-artefact disk cache (LRU beyond)
    fabric_module_requests_per_s: float = 200.0  # module chunk requests served per peer and second (more: dropped)
    fabric_module_request_burst: int = 400  # requests one peer may send at once before that rate applies
    # a task still running when this node stopped or crashed is placed again at the restart when
    # it was submitted at most this long before (older: failed "interrupted"); 0: never resumed
    fabric_resume_max_age_s: float = 3600.0
    fabric_probe_gpus: int = -1  # SIMULATION/TEST: >= 0 advertises this many simulated GPUs instead of NVML's
    fabric_test_wrong_results: bool = False  # TEST HOOK: return wrong task results (tests only)
    fabric_test_tamper_chunks: bool = False  # TEST HOOK: corrupt module chunks served to peers (tests only)
    fabric_test_advertise_slots: int = 0  # TEST HOOK: > 0 advertises this many task slots, a lie (tests only)
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


class Range(typing.NamedTuple):
    """The values a numeric field may take: ``lo..hi`` (``lo`` itself excluded when
    ``lo_open``); floats must also be finite."""

    lo: float
    hi: float
    lo_open: bool = False
    note: str = ""

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return (self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi

    def __str__(self) -> str:
        text = f"{self.lo:g} < x <= {self.hi:g}" if self.lo_open else f"{self.lo:g}..{self.hi:g}"
        if isinstance(self.lo, int) and isinstance(self.hi, int):
            text = f"{self.lo}..{self.hi}"
        return f"{text} ({self.note})" if self.note else text


# consensus.bft.MAX_BLOCK_VALUES, written out so that reading the config (every `chimera`
# command does) does not import the consensus core; tests/test_config.py checks they agree
MAX_BATCH_VALUES = 256
MAX_CONFIG_BYTES = 1 << 20  # config.toml and --config files
_DAY_S = 86_400.0
_TIMER = Range(0.01, _DAY_S)  # timeouts and intervals: > 0 (tiny ones busy-loop), at most a day

# Every int and float field of NodeConfig and its allowed values, checked by load_config
# after merging (a NodeConfig built directly, as tests do, is not checked). The fields
# that admin config_set changes at runtime (node/admin_ops.py) have the same bounds there.
RANGES: dict[str, Range] = {
    # transport
    "port": Range(0, 65535, note="0: any free port"),
    # bft proposals and commit responses (192 KiB) and fl_part messages (192 KiB + 64 KiB)
    # must fit one envelope: the edge profile's 256 KiB is the smallest that works
    "max_message_bytes": Range(256 << 10, 1 << 30, note="256 KiB..1 GiB"),
    "max_clock_skew_s": Range(1.0, 3600.0),
    "send_hwm": Range(1, 1_000_000),  # ZMQ: 0 would be unbounded, < 0 an error
    "recv_hwm": Range(1, 1_000_000),
    "send_queue_max_bytes": Range(1 << 20, 1 << 40, note="1 MiB..1 TiB"),
    "rate_limit_msgs_per_s": Range(1.0, 1e6),
    "rate_limit_burst": Range(1, 1_000_000),
    "new_senders_per_address_per_s": Range(0.01, 1e6),
    "new_senders_burst": Range(1, 1_000_000),
    "mailbox_size": Range(1, 1_000_000),  # asyncio.Queue: <= 0 would be unbounded
    # discovery
    "mdns_interface_poll_s": Range(0.0, _DAY_S, note="0: interfaces read once at start"),
    # membership
    "probe_interval_s": _TIMER,
    "probe_timeout_s": _TIMER,  # and < probe_interval_s
    "indirect_checks": Range(0, 32, note="0: no indirect probes"),
    "suspicion_alpha": Range(0.0, 100.0, lo_open=True),
    "suspicion_beta": Range(1.0, 100.0, note="1: no Lifeguard stretch"),  # max = beta * min timeout
    "sync_interval_s": _TIMER,
    "reconnect_interval_s": _TIMER,
    # consensus
    "consensus_propose_timeout_s": _TIMER,
    "consensus_vote_timeout_s": _TIMER,
    "consensus_commit_wait_s": Range(0.0, _DAY_S),
    "consensus_max_batch": Range(1, MAX_BATCH_VALUES),
    "consensus_empty_block_interval_s": Range(0.0, _DAY_S, note="0: a block every height"),
    "reputation_half_life_s": Range(1.0, 3650 * _DAY_S, note="1 s..10 years"),
    # training
    "training_split_seed": Range(0, 2**32 - 1),
    "training_fetch_interval_s": _TIMER,
    # fabric
    "fabric_task_slots": Range(1, 256),
    "fabric_capacity_interval_s": Range(0.1, _DAY_S),
    "fabric_max_wasm_memory_bytes": Range(64 << 10, 4 << 30, note="64 KiB..4 GiB"),
    "fabric_max_task_wall_s": Range(0.001, _DAY_S, note="1 ms..1 day"),
    "fabric_fetched_modules_max_bytes": Range(16 << 20, 1 << 40, note="16 MiB..1 TiB"),
    "fabric_compiled_cache_max_bytes": Range(16 << 20, 1 << 40, note="16 MiB..1 TiB"),
    "fabric_module_requests_per_s": Range(1.0, 1e6),
    "fabric_module_request_burst": Range(1, 1_000_000),
    "fabric_resume_max_age_s": Range(0.0, 7 * _DAY_S, note="0: a running task is never resumed"),
    "fabric_probe_gpus": Range(-1, 64, note="-1: real GPUs (NVML)"),
    "fabric_test_advertise_slots": Range(0, 1024, note="0: the true fabric_task_slots"),
    # operation
    "drop_log_interval_s": Range(0.0, _DAY_S, note="0: log every drop"),
    "metrics_port": Range(-1, 65535, note="-1: off, 0: any free port"),
}


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
        "send_queue_max_bytes": 16 << 20,
        "mailbox_size": 512,
        "rate_limit_msgs_per_s": 500.0,
        "rate_limit_burst": 1000,
        "probe_interval_s": 2.0,
        "probe_timeout_s": 1.0,
        "sync_interval_s": 60.0,
        "reconnect_interval_s": 20.0,
        "fabric_task_slots": 1,
        "fabric_max_wasm_memory_bytes": 16 << 20,
        "fabric_max_task_wall_s": 600.0,
        "fabric_fetched_modules_max_bytes": 64 << 20,
        "fabric_compiled_cache_max_bytes": 256 << 20,
        "fabric_module_requests_per_s": 50.0,
        "fabric_module_request_burst": 100,
    },
}

_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}
_HINTS = typing.get_type_hints(NodeConfig)


def _kind(value: object) -> str:
    """What ``value`` is, in TOML's words (for error messages)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date/time"
    return type(value).__name__


def _show(value: object) -> str:
    """``repr(value)`` cut to one short line."""
    text = repr(value)
    return text if len(text) <= 64 else text[:60] + "..."


def _has_type(value: object, tp: object) -> bool:
    """``value`` is a ``tp`` (bool is no int; an int is a float; tuples hold strings)."""
    if typing.get_origin(tp) is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if isinstance(value, bool):
        return tp is bool
    if tp is float:
        return isinstance(value, (int, float))
    return isinstance(value, tp)  # type: ignore[arg-type]


def _coerce(name: str, value: object, source: str, *, typed: bool = False) -> object:
    """``value`` (from TOML, or a string from the environment or ``--set``) as field
    ``name``'s type. Ranges are checked later, on the merged config (:func:`check_config`).
    ``typed`` (TOML): a boolean or number must be one, not a string (``port = "7420"``).

    Raises:
        ConfigError: one line naming ``source`` and ``name``.
    """
    tp = _HINTS[name]
    try:
        if typed and tp in (bool, int, float) and isinstance(value, str):
            raise ValueError(f"expected {'true or false' if tp is bool else 'a number'}, got a string "
                             f"{_show(value)} (write it without quotes)")
        if tp is bool:
            if isinstance(value, bool):
                return value
            if not isinstance(value, str):
                raise ValueError(f"expected true or false, got {_kind(value)}")
            text = value.strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {_show(value)}")
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    raise ValueError(f"not an integer: {_show(value)}") from None
            raise ValueError(f"expected an integer, got {_kind(value)}"
                             + (f" {_show(value)}" if isinstance(value, float) else ""))
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):
                try:
                    number = float(value.strip())
                except ValueError:
                    raise ValueError(f"not a number: {_show(value)}") from None
            else:
                raise ValueError(f"expected a number, got {_kind(value)}")
            if not math.isfinite(number):
                raise ValueError(f"not a finite number: {_show(value)}")
            return number
        if tp is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {_kind(value)}")
            return value
        if typing.get_origin(tp) is tuple:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if isinstance(value, (list, tuple)):
                for index, item in enumerate(value):
                    if not isinstance(item, str):
                        raise ValueError(f"expected a list of strings; entry {index} is {_kind(item)}")
                return tuple(value)
            raise ValueError(f"expected a list of strings, got {_kind(value)}")
    except (ValueError, OverflowError) as exc:
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
    """Merge defaults, the profile, the TOML file, ``CHIMERA_*`` variables and
    ``overrides``, then check the result (:func:`check_config`).

    Raises:
        ConfigError: unreadable TOML, an unknown key, an ill-typed value, or a value
            outside its range (:data:`RANGES`); one line naming the field.
    """
    values: dict[str, object] = {}
    sources: dict[str, str] = {}  # field -> where its value came from, for range errors
    path = config_file or data_dir / "config.toml"
    try:
        info = path.stat()  # a device or FIFO (--config /dev/zero) would read without end
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {info.st_size} bytes; a config file is at most {MAX_CONFIG_BYTES}")
        text: str | None = path.read_text()
    except FileNotFoundError:
        if config_file is not None:
            raise ConfigError(f"config file {path} does not exist") from None
        text = None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    if text is not None:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        table = doc
        if "node" in doc:  # a [node] table holds every setting; nothing else is allowed beside it
            table = doc["node"]
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: node: expected a [node] table, got {_kind(table)}")
            for key in doc:
                if key != "node":
                    raise ConfigError(f"{path}: unknown top-level key {key[:64]!r} "
                                      "(settings belong in the [node] table)")
        for key, value in table.items():
            if key not in _FIELDS:
                raise ConfigError(f"{path}: unknown setting {key[:64]!r}")
            values[key] = _coerce(key, value, str(path), typed=True)
            sources[key] = str(path)
    env = os.environ if environ is None else environ
    for name in _FIELDS:
        var = "CHIMERA_" + name.upper()
        if var in env:
            values[name] = _coerce(name, env[var], var)
            sources[name] = var
    for key, value in (overrides or {}).items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {str(key)[:64]!r}")
        values[key] = _coerce(key, value, "flag")
        sources[key] = "flag"
    profile = values.get("profile", "default")
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {_show(profile)}; known: {', '.join(sorted(PROFILES))}")
    sources = {**{key: f"profile {profile}" for key in PROFILES[profile]}, **sources}
    values = {**PROFILES[profile], **values}
    try:
        config = NodeConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    check_config(config, sources)
    return config


MAX_ADVERTISE_HOSTS = 8
"""Addresses a contact carries (protocol ``MAX_CONTACT_ADDRESSES``)."""


def check_config(config: NodeConfig, sources: typing.Mapping[str, str] | None = None) -> None:
    """Check the merged ``config``: every numeric field within its :data:`RANGES` entry
    (floats finite), ``probe_timeout_s < probe_interval_s``, ``log_level``,
    ``reputation_weights``/``reputation_half_life_s``, ``bootstrap`` contact URIs,
    ``advertise_hosts`` (at most 8 IPv4 addresses) and ``admin_listen``.

    Raises:
        ConfigError: one line naming the first bad field (after ``sources[field]``, where
            its value came from, when given).
    """
    def where(name: str) -> str:
        source = (sources or {}).get(name)
        return f"{source}: {name}" if source else name

    for name, tp in _HINTS.items():  # a profile's values skip _coerce
        value = getattr(config, name)
        if not _has_type(value, tp):
            raise ConfigError(f"{where(name)}: {_show(value)} is {_kind(value)}, not of type {tp.__name__}")
    for name, allowed in RANGES.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ConfigError(f"{where(name)}: {_show(value)} is outside {allowed}")
    if config.probe_timeout_s >= config.probe_interval_s:
        raise ConfigError(f"probe_timeout_s ({config.probe_timeout_s:g}) must be smaller than "
                          f"probe_interval_s ({config.probe_interval_s:g})")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level {_show(config.log_level)}: use debug, info, warning or error")
    reputation_config(config)  # raises ConfigError naming the bad entry
    for uri in config.bootstrap:  # a contact that can never be dialled is a mistake, not a hint
        try:
            parse_contact_uri(uri)
        except RemoteProtocolError as exc:
            raise ConfigError(f"{where('bootstrap')}: {_show(uri)} is not a contact URI "
                              f"(chm://PEER_ID@HOST:PORT?key=TRANSPORT_KEY): {exc}") from None
    if len(config.advertise_hosts) > MAX_ADVERTISE_HOSTS:
        raise ConfigError(f"{where('advertise_hosts')}: {len(config.advertise_hosts)} hosts; a contact "
                          f"holds at most {MAX_ADVERTISE_HOSTS}")
    for host in config.advertise_hosts:  # peers dial tcp://HOST:PORT and mDNS publishes A records
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"{where('advertise_hosts')}: {_show(host)} is not an IPv4 address "
                              "(dotted quad, e.g. 192.168.1.20)") from None
    if config.admin_listen and tcp_endpoint_port(config.admin_listen) is None:
        raise ConfigError(f"admin_listen {_show(config.admin_listen)}: use tcp://HOST:PORT (or \"\" for off)")


def tcp_endpoint_port(endpoint: str) -> int | None:
    """The port (0..65535) of a ``tcp://HOST:PORT`` endpoint (``admin_listen``, a remote admin
    target); None when ``endpoint`` is not of that form."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not endpoint.startswith("tcp://") or not host or not port.isdigit() or int(port) > 65535:
        return None
    return int(port)


def reputation_config(config: NodeConfig) -> ReputationConfig:
    """The local reputation settings of ``config``: ``reputation_half_life_s`` and the
    ``reputation_weights`` entries (``KIND=UNITS``: an observation kind of
    :class:`~chimera.consensus.reputation.ObservationKind` and the evidence units one
    observation adds, a finite number > 0) over the defaults.

    Raises:
        ConfigError: an entry that is not ``KIND=UNITS``, an unknown kind, a kind given
            twice, units that are not a finite number > 0, or a half-life that is not.
    """
    # imported here: every `chimera` command reads config.py, few need the consensus package
    from chimera.consensus.reputation import ObservationKind, ReputationConfig

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

