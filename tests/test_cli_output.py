"""What `chimera` prints and returns when the node reports an error, with and without --json,
and that text from peers reaches the operator's terminal escaped."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from chimera.node.cli import main
from chimera.node.config import NodeConfig
from chimera.node.keys import load_or_create_identity
from chimera.node.runtime import Node
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.network import Network
from tests.conftest import FAST
from tests.test_consensus_node import CONSENSUS_FAST


async def test_node_errors_keep_their_exit_code_and_json_reports_them_on_stdout(tmp_path: Path, capsys):
    data_dir = tmp_path / "n0"
    me = load_or_create_identity(data_dir).peer_id
    node = Node(data_dir, NodeConfig(**FAST, **CONSENSUS_FAST), Network.create("t", genesis=[me]))
    await node.start()
    try:
        async def chimera(*argv: str) -> tuple[int, str, str]:
            code = await asyncio.to_thread(main, [*argv, "--data-dir", str(data_dir)])
            captured = capsys.readouterr()
            return code, captured.out, captured.err

        # a usage error found by the node is 2 (it was 3, "no node", for every node error)
        code, out, err = await chimera("ping", "not-a-peer")
        assert code == 2 and out == "" and err.startswith("chimera: ") and err.count("\n") == 1
        code, out, err = await chimera("ping", "not-a-peer", "--json")
        doc = json.loads(out)
        assert code == 2 and err == "" and doc["ok"] is False and doc["code"] == 2 and doc["error"]
        # nobody answers: a failure (1), and --json says so instead of "ok": true
        stranger = SigningIdentity(bytes(32)).peer_id
        code, out, _ = await chimera("ping", stranger, "--count", "1", "--json")
        assert code == 1 and json.loads(out)["ok"] is False
        # a decision is any peer's bytes: control characters never reach the terminal raw
        forged = "line1\nFAKE   99.0   evilpeer  injected\x1b[31mRED\u202e"
        code, out, _ = await chimera("propose", forged)
        assert code == 0
        code, out, _ = await chimera("log")
        assert code == 0 and "\x1b" not in out and "\u202e" not in out and "FAKE" in out
        assert [line for line in out.splitlines() if "FAKE" in line] == \
            [line for line in out.splitlines() if "line1" in line]  # one line: the newline is escaped
        assert "line1\\nFAKE" in out and "\\x1b[31mRED\\u202e" in out
        code, out, _ = await chimera("log", "--json")
        text = json.loads(out)["result"]["decisions"][-1]["data_text"]  # escaped at the source
        assert text.startswith("line1\\nFAKE") and "\x1b" not in text
    finally:
        await node.stop()
    code = await asyncio.to_thread(main, ["status", "--data-dir", str(data_dir), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 3 and doc == {"ok": False, "error": doc["error"], "code": 3}
