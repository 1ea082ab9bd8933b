import dataclasses
import typing
from pathlib import Path

import pytest

from chimera.consensus.reputation import DEFAULT_OBSERVATION_WEIGHTS, ObservationKind
from chimera.node.config import (PROFILES, RANGES, ConfigError, NodeConfig, check_config, load_config,
                                 reputation_config)
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.network import format_contact_uri

_HINTS = typing.get_type_hints(NodeConfig)
NUMERIC = [name for name, tp in _HINTS.items() if tp in (int, float)]


CONTACT = format_contact_uri(SigningIdentity(bytes(32)).peer_id, "10.0.0.1", 7420, bytes(range(32)))


def test_precedence_defaults_file_env_flags(tmp_path: Path):
    assert load_config(tmp_path, environ={}).port == 7420
    (tmp_path / "config.toml").write_text("[node]\nport = 9000\nprobe_interval_s = 2.0\n"
                                          f"bootstrap = ['{CONTACT}']\n")
    cfg = load_config(tmp_path, environ={})
    assert cfg.port == 9000 and cfg.probe_interval_s == 2.0 and cfg.bootstrap == (CONTACT,)
    cfg = load_config(tmp_path, environ={"CHIMERA_PORT": "9100", "CHIMERA_MDNS": "off"})
    assert cfg.port == 9100 and cfg.mdns is False
    cfg = load_config(tmp_path, environ={"CHIMERA_PORT": "9100"}, overrides={"port": 9200})
    assert cfg.port == 9200


@pytest.mark.parametrize("text", ["port = 'x'", "nonsense = 1", "port = 70000", "[node\n",
                                  "probe_timeout_s = 5.0", "mdns = 'maybe'",
                                  "reputation_weights = ['vote_ok']", "reputation_weights = ['nope=1']",
                                  "reputation_weights = ['vote_ok=0']", "reputation_weights = ['vote_ok=nan']",
                                  "reputation_weights = ['vote_ok=1', 'vote_ok=2']",
                                  "reputation_half_life_s = 0.0", "reputation_half_life_s = -5.0",
                                  # the document's shape
                                  "node = 5", "node = 'x'", "node = [1]", "[node]\nport = 1\n[other]\nx = 1",
                                  "port = 1\n[node]\nmdns = false", "[node.sub]\nx = 1", "[other]\nx = 1",
                                  # wrong TOML types
                                  "mailbox_size = {a = 1}", "mailbox_size = [1]", "mailbox_size = true",
                                  "mailbox_size = 1979-05-27", "port = 7420.5", "port = '7420.5'",
                                  "probe_interval_s = {a = 1}", "probe_interval_s = [1.0]",
                                  "probe_interval_s = true", "probe_interval_s = 'fast'", "mdns = 1",
                                  "mdns = {a = 1}", "listen_host = 5", "log_level = ['info']",
                                  "bootstrap = 'a'\nbootstrap = 'b'", "bootstrap = [1]",
                                  "interfaces = {a = 'b'}", "reputation_weights = [['vote_ok=1']]",
                                  # not finite
                                  "probe_interval_s = nan", "probe_interval_s = inf", "max_clock_skew_s = nan",
                                  "max_clock_skew_s = -inf", "rate_limit_msgs_per_s = inf",
                                  "suspicion_alpha = nan", "consensus_commit_wait_s = nan",
                                  "consensus_empty_block_interval_s = inf", "drop_log_interval_s = -nan",
                                  "reputation_half_life_s = inf", "training_fetch_interval_s = nan",
                                  "probe_interval_s = 1e400",
                                  # out of range
                                  "reconnect_interval_s = -1.0", "reconnect_interval_s = 0.0",
                                  "send_hwm = -1", "send_hwm = 0", "recv_hwm = 0", "max_message_bytes = 0",
                                  "max_message_bytes = 65536", "max_message_bytes = 4294967296",
                                  "indirect_checks = -3", "indirect_checks = 1000", "consensus_max_batch = 0",
                                  "consensus_max_batch = 257", "probe_interval_s = 0.0", "probe_interval_s = -1.0",
                                  "sync_interval_s = 0.0", "consensus_propose_timeout_s = 0.0",
                                  "consensus_vote_timeout_s = -0.5", "consensus_commit_wait_s = -1.0",
                                  "consensus_empty_block_interval_s = -1.0", "rate_limit_msgs_per_s = 0.0",
                                  "rate_limit_msgs_per_s = -5.0", "rate_limit_burst = 0", "mailbox_size = 0",
                                  "mailbox_size = -1", "fabric_task_slots = 0", "fabric_capacity_interval_s = 0.0",
                                  "fabric_max_wasm_memory_bytes = 0", "fabric_probe_gpus = -2",
                                  "fabric_probe_gpus = 65", "drop_log_interval_s = -1.0", "metrics_port = -2",
                                  "metrics_port = 65536", "port = -1", "max_clock_skew_s = 0.0",
                                  "suspicion_alpha = 0.0", "suspicion_beta = 0.5", "training_split_seed = -1",
                                  "training_split_seed = 4294967296", "training_fetch_interval_s = 0.0",
                                  "probe_interval_s = 0.4\nprobe_timeout_s = 0.4",
                                  "max_message_bytes = 99999999999999999"])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str):
    (tmp_path / "config.toml").write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, environ={})
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize("text, names", [
    ("mailbox_size = {a = 1}", "mailbox_size: expected an integer, got a table"),
    ("port = 7420.5", "port: expected an integer"),
    ("probe_interval_s = nan", "probe_interval_s: not a finite number"),
    ("reconnect_interval_s = -1.0", "reconnect_interval_s: -1.0 is outside 0.01..86400"),
    ("send_hwm = -1", "send_hwm: -1 is outside 1..1000000"),
    ("max_message_bytes = 0", "max_message_bytes: 0 is outside 262144..1073741824"),
    ("node = 5", "node: expected a [node] table, got an integer"),
    ("[node]\nport = 1\n[other]\nx = 1", "unknown top-level key 'other'"),
    ("bootstrap = ['a', 2]", "bootstrap: expected a list of strings; entry 1 is an integer"),
    ('port = "7420"', "port: expected a number, got a string '7420' (write it without quotes)"),
    ('mdns = "no"', "mdns: expected true or false, got a string 'no'"),
    ('probe_interval_s = "1.5"', "probe_interval_s: expected a number, got a string"),
])
def test_errors_name_the_field(tmp_path: Path, text: str, names: str):
    (tmp_path / "config.toml").write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, environ={})
    assert str(info.value).startswith(str(tmp_path)) and names in str(info.value)


@pytest.mark.parametrize("name, value", [("probe_interval_s", "nan"), ("probe_interval_s", "inf"),
                                         ("max_clock_skew_s", "-inf"), ("max_clock_skew_s", "NaN"),
                                         ("suspicion_beta", "infinity"), ("send_hwm", "-1"),
                                         ("mailbox_size", "0"), ("port", "1.5"), ("port", "x"),
                                         ("indirect_checks", "-3"), ("consensus_max_batch", "0"),
                                         ("reconnect_interval_s", "-1"), ("mdns", "maybe"),
                                         ("max_message_bytes", "1e400")])
def test_bad_environment_and_flag_values_are_clear_errors(tmp_path: Path, name: str, value: str):
    var = "CHIMERA_" + name.upper()
    with pytest.raises(ConfigError, match=f"^{var}: {name}: "):
        load_config(tmp_path, environ={var: value})
    with pytest.raises(ConfigError, match=f"^flag: {name}: "):
        load_config(tmp_path, environ={}, overrides={name: value})


@pytest.mark.parametrize("text", ["consensus_empty_block_interval_s = 0.0", "consensus_commit_wait_s = 0",
                                  "drop_log_interval_s = 0.0", "metrics_port = -1", "metrics_port = 0",
                                  "port = 0", "fabric_probe_gpus = -1", "fabric_probe_gpus = 64",
                                  "indirect_checks = 0", "max_message_bytes = 262144",
                                  "max_message_bytes = 1e6", "suspicion_beta = 1.0", "mailbox_size = 1",
                                  "probe_interval_s = 1\nprobe_timeout_s = 0.25", "training_split_seed = 0",
                                  "training_split_seed = 4294967295", "rate_limit_msgs_per_s = 500",
                                  "[node]\nport = 9000", "port = 9000"])
def test_edge_values_that_make_sense_load(tmp_path: Path, text: str):
    (tmp_path / "config.toml").write_text(text + "\n")
    load_config(tmp_path, environ={})


def test_every_numeric_field_has_a_declared_range():
    assert NUMERIC, "NodeConfig lost its numeric fields?"
    missing = [name for name in NUMERIC if name not in RANGES]
    assert not missing, f"declare the allowed range of {missing} in chimera.node.config.RANGES"
    assert set(RANGES) <= set(NUMERIC), set(RANGES) - set(NUMERIC)
    for name, allowed in RANGES.items():
        assert allowed.lo <= allowed.hi, name


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_defaults_and_every_profile_load(tmp_path: Path, profile: str):
    assert set(PROFILES[profile]) <= set(_HINTS), "a profile names an unknown field"
    cfg = load_config(tmp_path, environ={}, overrides={"profile": profile})
    for key, value in PROFILES[profile].items():
        assert getattr(cfg, key) == value
    check_config(cfg)
    for name in NUMERIC:
        assert getattr(cfg, name) in RANGES[name], name
    # every value round-trips through the file, the environment and flags unchanged
    lines = ["[node]"]
    for f in dataclasses.fields(NodeConfig):
        value = getattr(cfg, f.name)
        lines.append(f"{f.name} = " + (repr(list(value)) if isinstance(value, tuple) else
                                       str(value).lower() if isinstance(value, bool) else repr(value)))
    (tmp_path / "config.toml").write_text("\n".join(lines) + "\n")
    assert load_config(tmp_path, environ={}) == cfg
    (tmp_path / "config.toml").unlink()
    env = {"CHIMERA_" + f.name.upper(): ",".join(v) if isinstance(v := getattr(cfg, f.name), tuple) else str(v)
           for f in dataclasses.fields(NodeConfig)}
    assert load_config(tmp_path, environ=env) == cfg
    flags = {f.name: str(getattr(cfg, f.name)) for f in dataclasses.fields(NodeConfig)
             if not isinstance(getattr(cfg, f.name), tuple)}
    assert load_config(tmp_path, environ={}, overrides=flags) == cfg


def test_default_nodeconfig_passes_the_checks():
    check_config(NodeConfig())


def test_a_profile_value_of_the_wrong_type_or_range_is_caught(monkeypatch):
    monkeypatch.setitem(PROFILES, "broken", {"mailbox_size": 0})
    with pytest.raises(ConfigError, match="^profile broken: mailbox_size: 0 is outside"):
        load_config(Path("/nonexistent-chimera-dir"), environ={}, overrides={"profile": "broken"})
    monkeypatch.setitem(PROFILES, "broken", {"mailbox_size": 512.0})
    with pytest.raises(ConfigError, match="mailbox_size: 512.0 is a float, not of type int"):
        load_config(Path("/nonexistent-chimera-dir"), environ={}, overrides={"profile": "broken"})


def test_an_unreadable_config_file_is_a_clear_error(tmp_path: Path):
    (tmp_path / "config.toml").mkdir()
    with pytest.raises(ConfigError, match="config.toml"):
        load_config(tmp_path, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path, environ={}, config_file=tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_bytes(b"port = '\xff'\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(tmp_path, environ={}, config_file=tmp_path / "bad.toml")


def test_reputation_weights_override_the_defaults_per_kind(tmp_path: Path):
    (tmp_path / "config.toml").write_text("[node]\nreputation_weights = ['vote_ok=0.2', ' equivocation = 300']\n"
                                          "reputation_half_life_s = 600.0\n")
    rep = reputation_config(load_config(tmp_path, environ={}))
    assert rep.weights[ObservationKind.VOTE_OK] == 0.2 and rep.weights[ObservationKind.EQUIVOCATION] == 300.0
    assert rep.weights[ObservationKind.VOTE_FAULT] == DEFAULT_OBSERVATION_WEIGHTS[ObservationKind.VOTE_FAULT]
    assert rep.half_life_s == 600.0
    env = load_config(tmp_path, environ={"CHIMERA_REPUTATION_WEIGHTS": "task_agree=3,task_disagree=9"})
    assert reputation_config(env).weights[ObservationKind.TASK_DISAGREE] == 9.0
    with pytest.raises(ConfigError, match="kinds: valid_envelope"):
        load_config(tmp_path, environ={}, overrides={"reputation_weights": "votes_ok=1"})


@pytest.mark.parametrize("uri", ["garbage", "chm://a@h:1?key=b", "tcp://10.0.0.1:7420"])
def test_a_bootstrap_contact_that_cannot_be_dialled_is_a_usage_error(tmp_path: Path, uri: str):
    with pytest.raises(ConfigError, match="bootstrap.*not a contact URI"):
        load_config(tmp_path, environ={}, overrides={"bootstrap": (uri,)})
    assert load_config(tmp_path, environ={}, overrides={"bootstrap": (CONTACT,)}).bootstrap == (CONTACT,)


def test_the_batch_bound_is_the_cores_and_reading_config_does_not_load_the_core():
    import subprocess
    import sys

    from chimera.consensus.bft import MAX_BLOCK_VALUES
    from chimera.node.config import MAX_BATCH_VALUES

    assert MAX_BATCH_VALUES == MAX_BLOCK_VALUES and RANGES["consensus_max_batch"].hi == MAX_BLOCK_VALUES
    loaded = subprocess.run([sys.executable, "-c", "import sys, chimera.node.config; "
                             "print(sorted(m for m in sys.modules if m.startswith('chimera.consensus')))"],
                            capture_output=True, text=True, timeout=60).stdout
    assert loaded.strip() == "[]", loaded


@pytest.mark.parametrize("hosts, problem", [
    (("myhost.local",), "is not an IPv4 address"),   # was: mDNS off ("illegal IP address string")
    (("::1",), "is not an IPv4 address"),            # was: advertised as tcp://::1:PORT
    (("10.0.0.1", "1"), "is not an IPv4 address"),   # inet_aton's shorthand for 0.0.0.1
    (tuple(f"10.0.0.{i}" for i in range(1, 10)), "9 hosts; a contact holds at most 8"),
])
def test_advertise_hosts_must_be_at_most_8_ipv4_addresses(tmp_path: Path, hosts: tuple, problem: str):
    with pytest.raises(ConfigError, match="advertise_hosts") as info:
        load_config(tmp_path, environ={}, overrides={"advertise_hosts": hosts})
    assert problem in str(info.value)
    ok = tuple(f"192.168.1.{i}" for i in range(1, 9))
    assert load_config(tmp_path, environ={}, overrides={"advertise_hosts": ok}).advertise_hosts == ok
