from pathlib import Path

import pytest

from chimera.consensus.reputation import DEFAULT_OBSERVATION_WEIGHTS, ObservationKind
from chimera.node.config import ConfigError, load_config, reputation_config


def test_precedence_defaults_file_env_flags(tmp_path: Path):
    assert load_config(tmp_path, environ={}).port == 7420
    (tmp_path / "config.toml").write_text("[node]\nport = 9000\nprobe_interval_s = 2.0\n"
                                          "bootstrap = ['chm://a@h:1?key=b']\n")
    cfg = load_config(tmp_path, environ={})
    assert cfg.port == 9000 and cfg.probe_interval_s == 2.0 and cfg.bootstrap == ("chm://a@h:1?key=b",)
    cfg = load_config(tmp_path, environ={"CHIMERA_PORT": "9100", "CHIMERA_MDNS": "off"})
    assert cfg.port == 9100 and cfg.mdns is False
    cfg = load_config(tmp_path, environ={"CHIMERA_PORT": "9100"}, overrides={"port": 9200})
    assert cfg.port == 9200


@pytest.mark.parametrize("text", ["port = 'x'", "nonsense = 1", "port = 70000", "[node\n",
                                  "probe_timeout_s = 5.0", "mdns = 'maybe'",
                                  "reputation_weights = ['vote_ok']", "reputation_weights = ['nope=1']",
                                  "reputation_weights = ['vote_ok=0']", "reputation_weights = ['vote_ok=nan']",
                                  "reputation_weights = ['vote_ok=1', 'vote_ok=2']",
                                  "reputation_half_life_s = 0.0", "reputation_half_life_s = -5.0"])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str):
    (tmp_path / "config.toml").write_text(text + "\n")
    with pytest.raises(ConfigError):
        load_config(tmp_path, environ={})


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
