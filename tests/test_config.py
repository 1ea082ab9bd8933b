from pathlib import Path

import pytest

from chimera.node.config import ConfigError, load_config


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
                                  "probe_timeout_s = 5.0", "mdns = 'maybe'"])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str):
    (tmp_path / "config.toml").write_text(text + "\n")
    with pytest.raises(ConfigError):
        load_config(tmp_path, environ={})
