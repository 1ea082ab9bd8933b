"""Every event a node emits is a registered kind (node/events.py), so the admin API can
refuse a misspelt ``kind`` filter instead of matching nothing."""

from __future__ import annotations

import ast
from pathlib import Path

from chimera.node.events import EVENT_KINDS, unknown_kinds
from chimera.node.training_service import EVENT_KINDS as TRAINING_EVENT_KINDS

ROOT = Path(__file__).resolve().parent.parent


def _string_kinds(path: Path, call_names: set[str]) -> list[tuple[int, str]]:
    """(line, kind) of every call ``X.name("kind", ...)`` / ``name("kind", ...)`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        first = node.args[0]
        if name in call_names and isinstance(first, ast.Constant) and isinstance(first.value, str):
            found.append((node.lineno, first.value))
    return found


def test_every_emitted_kind_is_registered():
    emitted = {}
    for path in sorted((ROOT / "node").glob("*.py")):
        for line, kind in _string_kinds(path, {"emit_event"}):
            emitted[kind] = f"{path.name}:{line}"
    assert len(emitted) >= 15, emitted  # the scan finds the emitting sites
    assert not unknown_kinds(set(emitted)), {k: emitted[k] for k in unknown_kinds(set(emitted))}
    # forwarded by kind from the training core, and the membership core's events
    assert not unknown_kinds(set(TRAINING_EVENT_KINDS))
    membership = ROOT / "protocol" / "membership.py"
    member_kinds = {kind for _, kind in _string_kinds(membership, {"_emit"})}
    tree = ast.parse(membership.read_text())  # and the state -> kind table
    member_kinds |= {v.value for d in ast.walk(tree) if isinstance(d, ast.Dict) for v in d.values
                     if isinstance(v, ast.Constant) and isinstance(v.value, str) and v.value.startswith("peer_")}
    assert {"peer_joined", "peer_failed", "peer_left"} <= member_kinds
    assert not unknown_kinds(member_kinds), unknown_kinds(member_kinds)


def test_the_registry_is_documented():
    protocol = (ROOT / "docs" / "PROTOCOL.md").read_text()
    section = protocol.split("### 19.8 Event kinds", 1)[1].split("\n### ", 1)[0]
    missing = [k for k in EVENT_KINDS if f"`{k}`" not in section]
    assert not missing, missing
