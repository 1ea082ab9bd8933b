"""Optional parts of a peer and whether this installation has them.

``pip install chimera-mesh`` gives a complete peer; extras only add speed or
later capabilities. A missing extra is reported here (and in ``chimera status``)
with the reason and the install hint, never as an import error. Detection uses
``importlib.util.find_spec``: nothing heavy is imported to find out.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    extra: str
    module: str
    provides: str

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


FEATURES = (
    Feature("fast_event_loop", "fast", "uvloop", "uvloop event loop (faster asyncio on Linux/macOS)"),
    Feature("prometheus_metrics", "metrics", "prometheus_client", "Prometheus /metrics exporter"),
    Feature("federated_training", "learn", "sklearn",
            "federated training jobs (scikit-learn models, IsolationForest update screening)"),
    Feature("simulator_plots", "sim", "matplotlib", "PNG plots of `chimera simulate` runs"),
)


def report() -> dict[str, dict]:
    """``{name: {"available": bool, "detail": str}}`` for every optional feature."""
    out = {}
    for f in FEATURES:
        if f.available():
            out[f.name] = {"available": True, "detail": f.provides}
        else:
            out[f.name] = {"available": False,
                           "detail": f"{f.provides}: not installed "
                                     f"(pip install 'chimera-mesh[{f.extra}]')"}
    return out
