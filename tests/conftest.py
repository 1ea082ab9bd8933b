"""Shared helpers: condition waits with generous deadlines (never fixed sleeps)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from chimera.node.config import NodeConfig
from chimera.protocol.network import Network


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


async def async_wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval_s)
    return bool(predicate())


FAST = dict(listen_host="127.0.0.1", port=0, mdns=False, probe_interval_s=0.3,
            probe_timeout_s=0.1, reconnect_interval_s=0.5, sync_interval_s=2.0)


@pytest.fixture
def network() -> Network:
    return Network.create(name="test")


@pytest.fixture
def fast_config() -> NodeConfig:
    return NodeConfig(**FAST)


@pytest.fixture
async def node_factory(tmp_path: Path, network: Network):
    """Start in-process nodes; all are stopped at teardown."""
    from chimera.node.runtime import Node

    nodes: list[Node] = []

    async def make(name: str, config: NodeConfig | None = None, net: Network | None = None) -> Node:
        node = Node(tmp_path / name, config or NodeConfig(**FAST), net or network)
        await node.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.stop()


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite the golden transcripts under tests/testdata/")


@pytest.fixture
def golden(request):
    """Compare text with ``tests/testdata/NAME`` (rewritten with --update-golden)."""
    update = request.config.getoption("--update-golden")

    def check(name: str, text: str) -> None:
        path = Path(__file__).parent / "testdata" / name
        if update or not path.exists():
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            if not update:
                pytest.fail(f"golden file {path} was missing and has been written; re-run")
        assert text == path.read_text(), f"transcript differs from {path} (--update-golden rewrites it)"

    return check


@pytest.fixture
def node_answers(monkeypatch):
    """``set(answers)``: the node's train_status/tasks_status answers, one per call; ``polls``
    counts calls, ``sleeps`` the follow intervals. Past the last answer, Ctrl-C."""
    from chimera.node import cli, cli_train

    state = {"answers": [], "polls": 0, "sleeps": []}

    def call(args, cmd, cargs=None, timeout_s=10.0):
        state["polls"] += 1
        if not state["answers"]:
            raise KeyboardInterrupt
        return state["answers"].pop(0)

    monkeypatch.setattr(cli, "_call", call)
    monkeypatch.setattr(cli_train.time, "sleep", lambda s: state["sleeps"].append(s))
    return state
