"""Ceilings: what this machine can do at best, measured in the same run.

The project reports its own throughput and latency as *ratios* against these
ceilings ("the node runtime reaches 0.8x of the simplest signed loop"), so a
number measured on a fast laptop and one measured on a slow CI box can be
compared. Each ceiling is a denominator; none of them is a pass/fail test and
nothing here asserts on time. Run::

    python -m benchmarks.ceilings          # small table
    python -m benchmarks.ceilings --json   # the same figures as JSON

The three ceilings, from the innermost cost outwards:

1. :func:`ed25519_verify_per_s` -- Ed25519 verifications per second of a
   200-byte message with libsodium (PyNaCl, the library the node uses), on one
   core. Every envelope a node accepts costs one verification, so no receive
   path can open more envelopes per second than this per core: it is the
   ceiling for anything CPU-bound in the receive path.

2. :func:`zmq_curve_dealer_router` -- plain ``zmq.asyncio`` DEALER -> ROUTER
   over loopback TCP with CURVE on, no signatures, no msgpack: one-way
   throughput of 200-byte messages between two OS processes, and the round trip
   of a ping echoed by the ROUTER back to the same DEALER. This is what the
   transport (libzmq + CurveZMQ + the pyzmq asyncio integration + the event
   loop) costs with nothing of ours on top: the ceiling for anything that
   moves bytes between peers.

3. :func:`simplest_signed_loop` -- "the simplest honest signed loop": two bare
   OS processes that do exactly what a peer must do and nothing else. The
   sender packs a msgpack list ``[seq, body]`` (``body`` ~100 bytes), signs the
   packed bytes with Ed25519 and appends the 64-byte signature (the project's
   wire frame, ``payload || signature``), and sends it over zmq.asyncio DEALER
   -> ROUTER with CURVE. The receiver splits the signature off, unpacks and
   verifies. Each process binds its own ROUTER and connects its own DEALER to
   the other's ROUTER, as real peers do, so the round trip is A sign+send ->
   B receive+verify -> B sign+send on *its own* DEALER -> A receive+verify.
   This is the ceiling for the node runtime: everything the runtime adds
   (envelope checks, replay windows, dispatch, membership, logging) shows up as
   the ratio runtime / simplest-signed-loop.

All receives are bounded (a non-blocking receive first, then an awaited
receive bounded by ``RCVTIMEO``; see :func:`_recv` for why not ``poll``),
sends carry ``SNDTIMEO``, child processes are started with the
'spawn' context and always joined or terminated, so a broken run fails with an
error instead of hanging. Timing uses :func:`time.perf_counter`; throughput is
counted at the receiver from the first to the last message, so process start
and the CURVE handshake are never inside the timed window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import sys
import time
import traceback
from typing import Any, Callable

import msgpack
import zmq
import zmq.asyncio
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair

__all__ = [
    "ed25519_verify_per_s",
    "zmq_curve_dealer_router",
    "simplest_signed_loop",
    "measure_all",
]

PAYLOAD_BYTES = 200  # transport ceiling message size
BODY_BYTES = 100  # signed-loop body size (frame is ~105 + 64 bytes)
SIGNATURE_BYTES = 64
HWM = 10_000  # send/receive high-water marks (messages)
RECV_TIMEOUT_MS = 5_000  # bound on any single receive once running
SEND_TIMEOUT_MS = 5_000  # SNDTIMEO: bound on a send blocked by the HWM
STARTUP_TIMEOUT_S = 20.0  # spawn + imports + bind + CURVE handshake
PAIR_TIMEOUT_S = 60.0  # hard bound on one two-process measurement
RTT_WARMUP = 200  # round trips discarded before the samples

_HELLO = b"HELLO"
_READY = b"READY"
_DONE = b"DONE"


# --------------------------------------------------------------------------- 1


def ed25519_verify_per_s(duration_s: float = 1.0) -> float:
    """Ed25519 verifications per second (one core, libsodium through PyNaCl, the call the
    node makes: ``crypto_sign_open`` of signature + message).

    Verifies one 200-byte message and its signature repeatedly for about
    ``duration_s`` seconds.
    """
    public_key, secret = crypto_sign_seed_keypair(os.urandom(32))
    message = os.urandom(200)
    signed = crypto_sign(message, secret)[:SIGNATURE_BYTES] + message
    for _ in range(200):  # warm-up
        crypto_sign_open(signed, public_key)
    batch = 100
    count = 0
    start = time.perf_counter()
    deadline = start + duration_s
    while True:
        for _ in range(batch):
            crypto_sign_open(signed, public_key)
        count += batch
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


# ------------------------------------------------------------- shared helpers


def _socket(ctx: zmq.asyncio.Context, kind: int) -> zmq.asyncio.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    return sock


def _curve_router(ctx: zmq.asyncio.Context, public: bytes, secret: bytes) -> tuple[zmq.asyncio.Socket, int]:
    router = _socket(ctx, zmq.ROUTER)
    router.curve_secretkey = secret
    router.curve_publickey = public
    router.curve_server = True
    port = router.bind_to_random_port("tcp://127.0.0.1")
    return router, port


def _curve_dealer(
    ctx: zmq.asyncio.Context, public: bytes, secret: bytes, server_public: bytes, port: int
) -> zmq.asyncio.Socket:
    dealer = _socket(ctx, zmq.DEALER)
    dealer.curve_secretkey = secret
    dealer.curve_publickey = public
    dealer.curve_serverkey = server_public
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return dealer


async def _recv(sock: zmq.asyncio.Socket, timeout_ms: int | None = None) -> list[bytes]:
    """Receive one multipart message; raise :class:`TimeoutError` if none comes.

    The wait is bounded by the socket's ``RCVTIMEO`` (``RECV_TIMEOUT_MS``, set
    in :func:`_socket`; pyzmq's asyncio socket fails the pending receive with
    ``zmq.Again`` when it expires), or by ``timeout_ms`` for the one-off waits
    at start-up. A non-blocking receive is tried first, so a message already
    queued costs neither a loop timer nor a trip through the event loop.

    Why not ``await sock.poll(timeout)`` before every receive: measured here,
    polling before each receive cut the transport throughput from ~100k to
    ~15k msgs/s, and waiting through ``poll`` instead of a plain awaited
    receive added ~0.05-0.1 ms to every round trip (a poller and two futures
    per wait), which would make these ceilings lower than a runtime written
    the ordinary way.
    """
    try:
        return await sock.recv_multipart(zmq.NOBLOCK)
    except zmq.Again:
        pass
    if timeout_ms is not None:
        sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    try:
        return await sock.recv_multipart()
    except zmq.Again:
        raise TimeoutError(f"no message within {timeout_ms or sock.getsockopt(zmq.RCVTIMEO)} ms") from None
    finally:
        if timeout_ms is not None:
            sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)


def _await_peer_port(conn: multiprocessing.connection.Connection) -> int | None:
    if not conn.poll(STARTUP_TIMEOUT_S):
        raise TimeoutError("parent never sent the peer port")
    tag, port = conn.recv()
    assert tag == "peer_port", tag
    return port


def _child_main(conn: multiprocessing.connection.Connection, coro_fn: Callable, *args: Any) -> None:
    """Run one child coroutine; report ("result", x) or ("error", traceback)."""
    try:
        result = asyncio.run(coro_fn(conn, *args))
        conn.send(("result", result))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()


def _run_pair(
    a: tuple[Callable, tuple], b: tuple[Callable, tuple], timeout_s: float = PAIR_TIMEOUT_S
) -> tuple[Any, Any]:
    """Run two child coroutines in two 'spawn' processes; return their results.

    Protocol over each pipe: the child sends ("port", port-or-None) once it has
    bound; the parent answers ("peer_port", the other child's port); the child
    ends with ("result", value) or ("error", traceback).
    """
    mp = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    conns: list[multiprocessing.connection.Connection] = []
    finished = False
    try:
        for coro_fn, args in (a, b):
            parent_end, child_end = mp.Pipe(duplex=True)
            proc = mp.Process(target=_child_main, args=(child_end, coro_fn, *args), daemon=True)
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)

        deadline = time.monotonic() + timeout_s
        ports: list[int | None] = []
        for conn in conns:
            ports.append(_expect(conn, "port", deadline))
        conns[0].send(("peer_port", ports[1]))
        conns[1].send(("peer_port", ports[0]))

        results: list[Any] = [None, None]
        pending = {0, 1}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"benchmark pair did not finish within {timeout_s} s")
            ready = multiprocessing.connection.wait(
                [conns[i] for i in pending] + [procs[i].sentinel for i in pending], remaining
            )
            for i in list(pending):
                if conns[i] in ready or conns[i].poll():
                    results[i] = _expect(conns[i], "result", deadline)
                    pending.discard(i)
                elif procs[i].sentinel in ready:
                    raise RuntimeError(f"benchmark child exited with code {procs[i].exitcode} before reporting")
        finished = True
        return results[0], results[1]
    finally:
        for conn in conns:
            conn.close()
        # Children that reported exit at once; on any failure, stop them now.
        grace_until = time.monotonic() + (5.0 if finished else 0.0)
        for proc in procs:
            proc.join(timeout=max(0.0, grace_until - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2.0)


def _expect(conn: multiprocessing.connection.Connection, want: str, deadline: float) -> Any:
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise TimeoutError(f"benchmark child sent no {want!r} in time")
    try:
        tag, value = conn.recv()
    except EOFError:
        raise RuntimeError(f"benchmark child died before sending {want!r}") from None
    if tag == "error":
        raise RuntimeError(f"benchmark child failed:\n{value}")
    if tag != want:
        raise RuntimeError(f"benchmark child sent {tag!r}, expected {want!r}")
    return value


def _rtt_summary(rtts_s: list[float]) -> tuple[float, float]:
    import numpy as np  # only the parent needs numpy

    ms = np.asarray(rtts_s, dtype=np.float64) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


# --------------------------------------------------------------------------- 2


async def _transport_receiver(conn, public: bytes, secret: bytes, n_messages: int, rtt_total: int) -> dict:
    ctx = zmq.asyncio.Context()
    try:
        router, port = _curve_router(ctx, public, secret)
        conn.send(("port", port))
        _await_peer_port(conn)
        ident, hello = await _recv(router, int(STARTUP_TIMEOUT_S * 1000))
        assert hello == _HELLO
        await router.send_multipart([ident, _READY])

        # one-way throughput, counted from the first to the last message
        await _recv(router)
        t_first = time.perf_counter()
        for _ in range(n_messages - 1):
            await _recv(router)
        t_last = time.perf_counter()
        await router.send_multipart([ident, _DONE])

        # echo for the round trips
        for _ in range(rtt_total):
            frames = await _recv(router)
            await router.send_multipart(frames)
        return {"msgs_per_s": (n_messages - 1) / (t_last - t_first)}
    finally:
        ctx.destroy(linger=0)


async def _transport_sender(
    conn, public: bytes, secret: bytes, server_public: bytes, n_messages: int, rtt_total: int
) -> dict:
    ctx = zmq.asyncio.Context()
    try:
        conn.send(("port", None))
        port = _await_peer_port(conn)
        dealer = _curve_dealer(ctx, public, secret, server_public, port)
        await dealer.send(_HELLO)
        (ready,) = await _recv(dealer, int(STARTUP_TIMEOUT_S * 1000))
        assert ready == _READY

        payload = os.urandom(PAYLOAD_BYTES)
        send = dealer.send
        for _ in range(n_messages):
            await send(payload)
        (done,) = await _recv(dealer, 30_000)
        assert done == _DONE

        rtts = []
        perf = time.perf_counter
        for _ in range(rtt_total):
            t0 = perf()
            await send(payload)
            await _recv(dealer)
            rtts.append(perf() - t0)
        return {"rtts_s": rtts[RTT_WARMUP:]}
    finally:
        ctx.destroy(linger=0)


def zmq_curve_dealer_router(n_messages: int = 20000, rtt_samples: int = 2000) -> dict:
    """Transport ceiling: zmq.asyncio DEALER -> ROUTER, CURVE on, loopback TCP.

    Two spawned processes. Returns ``{"msgs_per_s", "rtt_p50_ms",
    "rtt_p99_ms"}``: one-way throughput of 200-byte messages counted at the
    receiver, and the round trip DEALER -> ROUTER -> (routing id) -> DEALER.
    """
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    rtt_total = RTT_WARMUP + rtt_samples
    receiver, sender = _run_pair(
        (_transport_receiver, (server_public, server_secret, n_messages, rtt_total)),
        (_transport_sender, (client_public, client_secret, server_public, n_messages, rtt_total)),
    )
    p50, p99 = _rtt_summary(sender["rtts_s"])
    return {"msgs_per_s": receiver["msgs_per_s"], "rtt_p50_ms": p50, "rtt_p99_ms": p99}


# --------------------------------------------------------------------------- 3


class _SignedPeer:
    """The bare minimum a peer does: seal = pack+sign+append, open = split+unpack+verify."""

    def __init__(self, ed_seed: bytes, peer_ed_public_raw: bytes) -> None:
        _, self._secret = crypto_sign_seed_keypair(ed_seed)
        self._peer_public = peer_ed_public_raw
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
        self.body = os.urandom(BODY_BYTES)

    def seal(self, seq: int) -> bytes:
        payload = self._pack([seq, self.body])
        return payload + crypto_sign(payload, self._secret)[:SIGNATURE_BYTES]

    def open(self, frame: bytes) -> list:
        payload = frame[:-SIGNATURE_BYTES]
        signature = frame[-SIGNATURE_BYTES:]
        obj = msgpack.unpackb(payload, raw=False)
        crypto_sign_open(signature + payload, self._peer_public)  # raises BadSignatureError
        return obj


async def _signed_setup(conn, ctx, curve_public, curve_secret, peer_curve_public):
    router, port = _curve_router(ctx, curve_public, curve_secret)
    conn.send(("port", port))
    peer_port = _await_peer_port(conn)
    dealer = _curve_dealer(ctx, curve_public, curve_secret, peer_curve_public, peer_port)
    return router, dealer


async def _signed_node_a(
    conn, curve_public, curve_secret, peer_curve_public, ed_secret, peer_ed_public, n_messages, rtt_total
) -> dict:
    """Initiator: streams signed messages to B, then pings B for round trips."""
    ctx = zmq.asyncio.Context()
    try:
        router, dealer = await _signed_setup(conn, ctx, curve_public, curve_secret, peer_curve_public)
        peer = _SignedPeer(ed_secret, peer_ed_public)
        await dealer.send(_HELLO)
        _, ready = await _recv(router, int(STARTUP_TIMEOUT_S * 1000))
        assert ready == _READY

        send, seal, open_ = dealer.send, peer.seal, peer.open
        for seq in range(1, n_messages + 1):
            await send(seal(seq))
        _, done = await _recv(router, 30_000)
        assert done == _DONE

        rtts = []
        perf = time.perf_counter
        seq = n_messages
        for _ in range(rtt_total):
            seq += 1
            t0 = perf()
            await send(seal(seq))
            _, frame = await _recv(router)
            open_(frame)
            rtts.append(perf() - t0)
        return {"rtts_s": rtts[RTT_WARMUP:]}
    finally:
        ctx.destroy(linger=0)


async def _signed_node_b(
    conn, curve_public, curve_secret, peer_curve_public, ed_secret, peer_ed_public, n_messages, rtt_total
) -> dict:
    """Responder: verifies A's stream (timed), then answers each ping on its own DEALER."""
    ctx = zmq.asyncio.Context()
    try:
        router, dealer = await _signed_setup(conn, ctx, curve_public, curve_secret, peer_curve_public)
        peer = _SignedPeer(ed_secret, peer_ed_public)
        _, hello = await _recv(router, int(STARTUP_TIMEOUT_S * 1000))
        assert hello == _HELLO
        await dealer.send(_READY)

        open_, seal, send = peer.open, peer.seal, dealer.send
        _, frame = await _recv(router)
        open_(frame)
        t_first = time.perf_counter()
        for _ in range(n_messages - 1):
            _, frame = await _recv(router)
            open_(frame)
        t_last = time.perf_counter()
        await send(_DONE)

        seq = 0
        for _ in range(rtt_total):
            _, frame = await _recv(router)
            open_(frame)
            seq += 1
            await send(seal(seq))
        return {"msgs_per_s": (n_messages - 1) / (t_last - t_first)}
    finally:
        ctx.destroy(linger=0)


def simplest_signed_loop(n_messages: int = 10000, rtt_samples: int = 2000) -> dict:
    """Runtime ceiling: the simplest honest signed loop between two processes.

    Returns ``{"msgs_per_s", "rtt_p50_ms", "rtt_p99_ms"}``: messages verified
    per second at the receiver (first to last), and the signed round trip
    A -> B's ROUTER, B -> A's ROUTER through B's own DEALER.
    """
    curve_a, curve_b = zmq.curve_keypair(), zmq.curve_keypair()
    ed_a_secret, ed_b_secret = os.urandom(32), os.urandom(32)  # RFC 8032 seeds
    ed_a_public, ed_b_public = crypto_sign_seed_keypair(ed_a_secret)[0], crypto_sign_seed_keypair(ed_b_secret)[0]
    rtt_total = RTT_WARMUP + rtt_samples
    node_a, node_b = _run_pair(
        (_signed_node_a, (curve_a[0], curve_a[1], curve_b[0], ed_a_secret, ed_b_public, n_messages, rtt_total)),
        (_signed_node_b, (curve_b[0], curve_b[1], curve_a[0], ed_b_secret, ed_a_public, n_messages, rtt_total)),
    )
    p50, p99 = _rtt_summary(node_a["rtts_s"])
    return {"msgs_per_s": node_b["msgs_per_s"], "rtt_p50_ms": p50, "rtt_p99_ms": p99}


# --------------------------------------------------------------------------- 4


def _environment() -> dict:
    import nacl
    import numpy

    return {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "pynacl": nacl.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "numpy": numpy.__version__,
    }


def measure_all() -> dict:
    """Run the three ceilings; returns a JSON-serialisable dict."""
    started = time.perf_counter()
    results = {
        "ed25519_verify_per_s": ed25519_verify_per_s(),
        "zmq_curve_dealer_router": zmq_curve_dealer_router(),
        "simplest_signed_loop": simplest_signed_loop(),
    }
    results["env"] = _environment()
    results["env"]["wall_s"] = time.perf_counter() - started
    return results


def _table(results: dict) -> str:
    rows = [("ceiling", "msgs/s", "rtt p50 ms", "rtt p99 ms")]
    rows.append(("ed25519 verify (1 core)", f"{results['ed25519_verify_per_s']:,.0f}", "-", "-"))
    for key, label in (
        ("zmq_curve_dealer_router", "zmq CURVE dealer->router"),
        ("simplest_signed_loop", "simplest signed loop"),
    ):
        r = results[key]
        rows.append((label, f"{r['msgs_per_s']:,.0f}", f"{r['rtt_p50_ms']:.3f}", f"{r['rtt_p99_ms']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    env = results["env"]
    lines.append(
        f"({env['machine']}, {env['cpu_count']} cpus, Python {env['python']}, pyzmq {env['pyzmq']}, "
        f"libzmq {env['libzmq']}, pynacl {env['pynacl']}; {env['wall_s']:.1f} s)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    results = measure_all()
    print(json.dumps(results, indent=2, sort_keys=True) if args.json else _table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
