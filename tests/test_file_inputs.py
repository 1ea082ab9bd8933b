"""Files named on the command line are read only when they are regular files of bounded size:
``--config /dev/zero`` (or a FIFO) read without end and died with a MemoryError traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from chimera.node.config import ConfigError, load_config

CHIMERA = [sys.executable, "-m", "chimera.node.cli"]


@pytest.mark.parametrize("argv", [
    [*CHIMERA, "node", "--config", "/dev/zero"],
    [*CHIMERA, "train", "start", "/dev/zero"],
    [sys.executable, "-m", "chimera.simulations", "run", "/dev/zero"],
])
def test_a_device_given_as_a_file_is_a_usage_error(tmp_path, argv):
    out = subprocess.run([*argv, *(["--data-dir", str(tmp_path / "d")] if argv[0:3] == CHIMERA else [])],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2, (out.returncode, out.stderr[-500:])
    assert "/dev/zero" in out.stderr and "not a regular file" in out.stderr and "Traceback" not in out.stderr


def test_a_config_file_is_read_only_up_to_its_size_limit(tmp_path):
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 120_000)  # 1.2 MB of comments
    with pytest.raises(ConfigError, match=r"a config file is at most 1048576"):
        load_config(tmp_path, config_file=big)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):  # would block for ever on open()
        load_config(tmp_path, config_file=fifo)
