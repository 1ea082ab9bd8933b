"""A ``chimera node`` process started by the CLI as an operator starts one, for the interop
tests of the clean-room implementations (tests/test_independent_*.py).

The clean-room modules (tests/independent_*.py) import nothing from ``chimera``; this harness
only starts the real node, learns its contact URI from its ``listening chm://...`` line and
asks it over its admin socket (``chimera.node.admin``), as an operator's tools do.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chimera.node import admin

CLI = [sys.executable, "-m", "chimera.node.cli"]


def cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """``chimera ARGS...`` to completion (text output)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout_s)


class NodeProcess:
    """``chimera node --data-dir DATA_DIR --no-mdns --listen 127.0.0.1 --port 0 EXTRA...``, its
    stderr in ``log_path``. With ``wait`` (default) the constructor returns once the node printed
    its contact URI (:meth:`wait_listening`); else call that later (to start several at once)."""

    def __init__(self, data_dir: Path, log_path: Path, extra: list[str] | tuple[str, ...] = (), *,
                 wait: bool = True, listen_timeout_s: float = 60) -> None:
        self.data_dir, self.log_path = data_dir, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [*CLI, "node", "--data-dir", str(data_dir), "--no-mdns", "--listen", "127.0.0.1", "--port", "0",
             *extra], stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.contact_uri = ""
        self.peer_id = ""
        if wait:
            self.wait_listening(listen_timeout_s)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def wait_listening(self, timeout_s: float = 60) -> str:
        """The node's contact URI, from its ``listening chm://...`` line; fails the test (with the
        node's log) when the node exits or prints none within ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while not self.contact_uri:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                pytest.fail(f"{self.data_dir.name} printed no 'listening chm://...' line:\n"
                            + self.log_path.read_text())
            if line.startswith("listening chm://"):
                self.contact_uri = line.split(" ", 1)[1]
                self.peer_id = self.contact_uri.removeprefix("chm://").split("@", 1)[0]
        return self.contact_uri

    def call(self, command: str, args: dict | None = None, timeout_s: float = 10):
        """One admin command over the node's local socket (raises ``admin.AdminError``)."""
        return admin.call(self.data_dir, command, args or None, timeout_s=timeout_s)

    def status(self) -> dict:
        return self.call("status")

    def counter(self, name: str) -> int:
        """A ``status`` counter (0 when not shown)."""
        return int(self.status()["counters"].get(name, 0))

    def peers(self) -> list[dict]:
        return self.call("peers")

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM (after SIGCONT: a test may have stopped it), SIGKILL after ``timeout_s``
        seconds; returns the exit status."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
        return self.proc.returncode
