"""Peer-to-peer benchmark: the real node runtime against ceilings measured in the same run.

(a) ceilings (benchmarks.ceilings): Ed25519 verifications/s, plain CURVE
    DEALER->ROUTER msgs/s and round trip, the simplest honest signed loop;
(b) two real peers (``chimera.node.runtime.Node``, full transport, admission,
    strict decode, replay checks, actors) in two OS processes on loopback:
    one-way signed-envelope throughput (``echo_request`` without reply) and
    p50/p99 round trip of ``echo_request``/``echo_reply``;
(c) ratios. Targets: throughput >= 0.70 of the simplest signed loop; p50 round
    trip <= 1.5x the simplest signed loop's.

Nothing here asserts on time; it prints figures and whether targets are met.
Run: ``python -m benchmarks.bench_transport [--json] [--messages N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import ceilings

PAYLOAD_BYTES = 100
THROUGHPUT_TARGET = 0.70
RTT_TARGET = 1.5


def _config():
    from chimera.node.config import NodeConfig

    # Benchmark settings: loopback, no mDNS, per-connection rate limit and
    # queues opened up so the test measures the pipeline, not the throttle.
    return NodeConfig(listen_host="127.0.0.1", port=0, mdns=False, rate_limit_msgs_per_s=1e9,
                      rate_limit_burst=1_000_000, send_hwm=1_000_000, recv_hwm=1_000_000,
                      mailbox_size=1_000_000, probe_interval_s=1.0, probe_timeout_s=0.5)


def _peer(role: str, token: str, data_dir: str, conn, n_messages: int, rtt_samples: int) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)  # the flood may delay probes; keep output clean
    from chimera.node.runtime import Node
    from chimera.protocol.diagnostics import EchoRequest
    from chimera.protocol.network import Network

    async def main() -> None:
        node = Node(Path(data_dir), _config(), Network.from_token(token))
        await node.start()
        try:
            if role == "receiver":
                conn.send(node.contact_uri)
                # wait for the sender to verify us, then count arrivals
                deadline = time.monotonic() + 120
                first = last = None
                while time.monotonic() < deadline:
                    count = node.counters["echo_requests_received"]
                    if count and first is None:
                        first = (time.perf_counter(), count)
                    if count >= n_messages:
                        last = (time.perf_counter(), count)
                        break
                    await asyncio.sleep(0.0005)
                msgs_per_s = None
                if first and last and last[1] > first[1]:
                    msgs_per_s = (last[1] - first[1]) / (last[0] - first[0])
                conn.send({"msgs_per_s": msgs_per_s, "received": node.counters["echo_requests_received"],
                           "drops": {k: v for k, v in node.counters.items() if k.startswith("drop_")}})
                while not conn.poll():  # keep serving echo replies until the parent says done
                    await asyncio.sleep(0.05)
                conn.recv()
            else:
                contact = conn.recv()
                node.add_contact_uri(contact, static=True)
                node.run_membership_actions()
                target = contact.split("//", 1)[1].split("@", 1)[0]
                deadline = time.monotonic() + 60
                while target not in node.routes and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                if target not in node.routes:
                    raise RuntimeError("receiver never verified")
                payload = b"\x00" * PAYLOAD_BYTES
                await node.ping(target, count=50)  # warm-up
                for i in range(n_messages):
                    node.send(target, EchoRequest(nonce=i, payload=payload, reply=False))
                    if i % 64 == 63:
                        await asyncio.sleep(0)
                conn.send("sent")
                rtts = [r for r in await node.ping(target, count=rtt_samples, payload_bytes=PAYLOAD_BYTES)
                        if r is not None]
                conn.send({"rtts_s": rtts, "sender_drops": {k: v for k, v in node.counters.items()
                                                             if k.startswith("drop_")}})
        finally:
            await node.stop()

    asyncio.run(main())


def measure_runtime(n_messages: int = 10000, rtt_samples: int = 2000) -> dict:
    from chimera.protocol.network import Network

    ctx = multiprocessing.get_context("spawn")
    token = Network.create(name="bench").token()
    with tempfile.TemporaryDirectory() as tmp:
        rx_parent, rx_child = ctx.Pipe()
        tx_parent, tx_child = ctx.Pipe()
        rx = ctx.Process(target=_peer, args=("receiver", token, f"{tmp}/rx", rx_child, n_messages, rtt_samples))
        tx = ctx.Process(target=_peer, args=("sender", token, f"{tmp}/tx", tx_child, n_messages, rtt_samples))
        rx.start()
        tx.start()
        try:
            if not rx_parent.poll(60):
                raise RuntimeError("receiver did not start")
            tx_parent.send(rx_parent.recv())
            if not rx_parent.poll(180):
                raise RuntimeError("receiver did not report")
            received = rx_parent.recv()
            if not tx_parent.poll(180) or tx_parent.recv() != "sent" or not tx_parent.poll(180):
                raise RuntimeError("sender did not report")
            sent = tx_parent.recv()
            rx_parent.send("done")
        finally:
            for p in (tx, rx):
                p.join(30)
                if p.is_alive():
                    p.terminate()
                    p.join(5)
    ms = np.array(sent["rtts_s"]) * 1000
    return {"msgs_per_s": received["msgs_per_s"], "received": received["received"],
            "rtt_p50_ms": float(np.percentile(ms, 50)), "rtt_p99_ms": float(np.percentile(ms, 99)),
            "drops": {**received["drops"], **{f"sender_{k}": v for k, v in sent["sender_drops"].items()}}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--rtt-samples", type=int, default=2000)
    args = parser.parse_args(argv)
    verify = ceilings.ed25519_verify_per_s()
    transport = ceilings.zmq_curve_dealer_router()
    loop = ceilings.simplest_signed_loop(n_messages=args.messages, rtt_samples=args.rtt_samples)
    runtime = measure_runtime(args.messages, args.rtt_samples)
    ratios = {
        "throughput_vs_signed_loop": runtime["msgs_per_s"] / loop["msgs_per_s"],
        "rtt_p50_vs_signed_loop": runtime["rtt_p50_ms"] / loop["rtt_p50_ms"],
        "throughput_vs_verify": runtime["msgs_per_s"] / verify,
    }
    verdict = {
        "throughput_target_met": ratios["throughput_vs_signed_loop"] >= THROUGHPUT_TARGET,
        "rtt_target_met": ratios["rtt_p50_vs_signed_loop"] <= RTT_TARGET,
    }
    result = {"ceilings": {"ed25519_verify_per_s": verify, "zmq_curve_dealer_router": transport,
                           "simplest_signed_loop": loop},
              "runtime": runtime, "ratios": ratios, "targets": verdict}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("ceilings (same run, same machine)")
    print(f"  Ed25519 verify            {verify:10.0f} /s")
    print(f"  CURVE DEALER->ROUTER      {transport['msgs_per_s']:10.0f} msgs/s   RTT p50 "
          f"{transport['rtt_p50_ms']:.3f} ms  p99 {transport['rtt_p99_ms']:.3f} ms")
    print(f"  simplest signed loop      {loop['msgs_per_s']:10.0f} msgs/s   RTT p50 "
          f"{loop['rtt_p50_ms']:.3f} ms  p99 {loop['rtt_p99_ms']:.3f} ms")
    print("node runtime, peer -> peer (2 processes, loopback)")
    print(f"  signed envelopes          {runtime['msgs_per_s']:10.0f} msgs/s   RTT p50 "
          f"{runtime['rtt_p50_ms']:.3f} ms  p99 {runtime['rtt_p99_ms']:.3f} ms")
    print(f"  received {runtime['received']}, drops {runtime['drops'] or 'none'}")
    print("ratios")
    print(f"  throughput / signed loop  {ratios['throughput_vs_signed_loop']:.2f}  "
          f"(target >= {THROUGHPUT_TARGET}: {'met' if verdict['throughput_target_met'] else 'NOT met'})")
    print(f"  RTT p50 / signed loop     {ratios['rtt_p50_vs_signed_loop']:.2f}  "
          f"(target <= {RTT_TARGET}: {'met' if verdict['rtt_target_met'] else 'NOT met'})")
    print(f"  throughput / verify       {ratios['throughput_vs_verify']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
