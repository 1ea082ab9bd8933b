"""DESIGN.md layering: imports only go down; pure cores do no I/O and read no clock."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["protocol", "consensus", "fabric", "node"]  # lowest first
PURE = ["protocol", "consensus"]
BANNED_IN_PURE = {"asyncio", "zmq", "zeroconf", "socket", "sqlite3", "subprocess", "threading",
                  "uvloop", "psutil", "os", "pathlib"}
BANNED_CALLS = {("time", "time"), ("time", "monotonic"), ("time", "perf_counter"),
                ("time", "sleep"), ("time", "time_ns"), ("time", "monotonic_ns")}
RANDOM_MODULE_CALLS = {"random", "randint", "choice", "shuffle", "getrandbits", "uniform", "sample"}


def _modules(layer: str):
    for path in sorted((ROOT / layer).rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_imports_only_go_down():
    for rank, layer in enumerate(LAYERS):
        higher = {f"chimera.{up}" for up in LAYERS[rank + 1:]} | {"chimera.simulations"}
        for path, tree in _modules(layer):
            for name in _imports(tree):
                assert not any(name == h or name.startswith(h + ".") for h in higher), \
                    f"{path.relative_to(ROOT)} imports {name} from a higher layer"


def test_pure_cores_do_no_io_and_read_no_clock():
    for layer in PURE:
        for path, tree in _modules(layer):
            rel = path.relative_to(ROOT)
            for name in _imports(tree):
                assert name.split(".")[0] not in BANNED_IN_PURE, f"{rel} imports {name}"
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and isinstance(node.func.value, ast.Name):
                    pair = (node.func.value.id, node.func.attr)
                    assert pair not in BANNED_CALLS, f"{rel}:{node.lineno} calls {pair[0]}.{pair[1]}"
                    assert not (node.func.value.id == "random" and node.func.attr in RANDOM_MODULE_CALLS), \
                        f"{rel}:{node.lineno} uses module-level random; inject random.Random"
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                        and node.func.id in ("open", "eval", "exec"):
                    raise AssertionError(f"{rel}:{node.lineno} calls {node.func.id}()")


def test_simulator_and_node_never_import_each_other():
    for layer, other in (("simulations", "chimera.node"), ("node", "chimera.simulations")):
        for path, tree in _modules(layer):
            for name in _imports(tree):
                assert not (name == other or name.startswith(other + ".")), \
                    f"{path.relative_to(ROOT)} imports {name}"
