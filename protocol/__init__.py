"""Pure protocol cores: identity, envelope codec, typed messages, membership.

Nothing in this package reads a clock, sleeps, opens a socket, touches disk or
imports asyncio/zmq/zeroconf (enforced by ``tests/test_layering.py``).
"""

PROTOCOL_VERSION = 1
