"""The port conformance suite (tests/port_conformance.py) against the simulator's in-memory ports."""

from __future__ import annotations

import pytest

from chimera.simulations.engine import Simulator
from chimera.simulations.network import Latency, LinkSpec, SimNetwork
from chimera.simulations.ports import SimClock, SimDisk, SimTransport
from tests.port_conformance import ClockConformance, StoreConformance, TransportConformance


class SimHarness:
    """Ports on one simulator; time is virtual (``timeout_s`` in virtual seconds)."""

    def __init__(self, offset_s: float = 0.0, drift_ppm: float = 0.0, latency: Latency | None = None) -> None:
        self.sim = Simulator(seed=11)
        self.network = SimNetwork(self.sim, LinkSpec(latency=latency or Latency.uniform(0.001, 0.02)),
                                  bandwidth_bytes_per_s=10e6)
        self.disk = SimDisk()
        self.offset_s, self.drift_ppm = offset_s, drift_ppm
        self._count = 0

    def clock(self):
        return SimClock(self.sim, "h", self.network, offset_s=self.offset_s, drift_ppm=self.drift_ppm)

    def transports(self, count):
        out = []
        for _ in range(count):
            self._count += 1
            out.append(SimTransport(self.network, f"h{self._count}", f"tcp://10.0.0.{self._count}:7420"))
        return out

    def open_store(self, name):
        return self.disk.open(name)

    def crash_and_reopen(self, store, name):
        del store
        return self.disk.open(name)

    def run_until(self, predicate, timeout_s):
        self.sim.run(self.sim.now + timeout_s, predicate)
        return predicate()

    def settle(self, duration_s):
        self.sim.run(self.sim.now + duration_s)


@pytest.fixture(params=["plain", "skewed"])
def port_harness(request):
    if request.param == "plain":
        return SimHarness()
    # a peer whose clock is 40 s ahead and runs 500 ppm fast, on a heavy-tailed network
    return SimHarness(offset_s=40.0, drift_ppm=500.0, latency=Latency.lognormal(0.02, 1.0))


class TestSimClock(ClockConformance):
    pass


class TestSimTransport(TransportConformance):
    pass


class TestSimStore(StoreConformance):
    pass


def test_skewed_clock_maps_local_deadlines_to_virtual_time():
    harness = SimHarness(offset_s=5.0, drift_ppm=1000.0)
    clock = harness.clock()
    fired = []
    clock.call_at(10.0, lambda: fired.append((clock.now(), harness.sim.now)))
    harness.settle(10.0)
    local, virtual = fired[0]
    assert local >= 10.0 and virtual == pytest.approx(5.0 / 1.001)


def test_stalled_host_defers_frames_and_timers():
    harness = SimHarness(latency=Latency.constant(0.01))
    a, b = harness.transports(2)
    harness.network.add_stall(b.host, 0.0, 2.0)
    got = []
    b.set_handler(lambda frame: got.append(harness.sim.now))
    a.send(b.address, b"x")
    clock = SimClock(harness.sim, b.host, harness.network)
    ran = []
    clock.call_at(0.5, lambda: ran.append(harness.sim.now))
    harness.settle(3.0)
    assert got == [2.0] and ran == [2.0]
