"""``chimera demo``: a local network of peer processes doing real work, then a report.

Steps: start N peers (one network, separate data dirs, CURVE-encrypted and
Ed25519-signed traffic; all N are the genesis validators of the consensus log),
watch the full mesh form, measure signed echo round trips between every pair,
commit decisions proposed at every peer through the BFT log, SIGKILL one peer
and time its detection by SWIM while the others keep committing, restart it
(same peer id) and watch it catch up to the identical log, show the
reputation-weighted voting weights of each epoch, train a model across the
peers by federated averaging on their own non-IID digits shards
(node/demo_training.py), run a real WASM agent as a replicas=3 task with a
vote certificate and two actor agents talking across peers
(node/demo_fabric.py), print a report, stop all gracefully.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .launcher import LocalNetwork

COMMIT_WAIT_S = 0.2  # pause after each commit (CometBFT timeout_commit): values arriving meanwhile share a block
FAST_TIMERS = ["--set", "probe_interval_s=0.5", "--set", "probe_timeout_s=0.2",
               "--set", "sync_interval_s=5", "--set", "reconnect_interval_s=1",
               "--set", f"consensus_commit_wait_s={COMMIT_WAIT_S}", "--set", "consensus_propose_timeout_s=1",
               "--set", "consensus_vote_timeout_s=0.5", "--set", "consensus_empty_block_interval_s=0.25"]
EPOCH_LENGTH = 8  # heights per epoch (about 2 s here): several epochs pass during the demo


PIPED_RULE_COLUMNS = 80
"""Width of a section rule when stdout is not a terminal (and COLUMNS is unset)."""
PIPED_MAX_COLUMNS = 1000
"""Lines up to this many characters are never wrapped when piped: each line and table is as
wide as its content (peer ids, contact URIs, data dirs, the commands to copy stay whole)."""


class _PipedConsole(Console):
    """A rich console for a pipe or a log file: no wrapping of lines or table cells below
    :data:`PIPED_MAX_COLUMNS`, and section rules of :data:`PIPED_RULE_COLUMNS` (a rule fills the
    console's width, which here is no terminal's)."""

    def rule(self, title: str | Text = "", **_: object) -> None:
        text = Text.from_markup(title).plain if isinstance(title, str) else title.plain
        head = f"── {text} " if text else ""
        self.print(head + "─" * max(3, PIPED_RULE_COLUMNS - len(head)), markup=False)


def demo_console(file=None) -> Console:
    """The demo's console on ``file`` (default stdout): a terminal's (or COLUMNS's) width when
    there is one; otherwise :class:`_PipedConsole` (rich would wrap at 80 columns, a fixed width
    pads rules and wide lines to it)."""
    stream = file if file is not None else sys.stdout
    if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()):
        return Console(highlight=False, file=file)
    return _PipedConsole(highlight=False, file=file, width=PIPED_MAX_COLUMNS)


def _propose_many(net: LocalNetwork, peers: list[int], texts: list[str]) -> list[tuple[dict, float]]:
    """Propose ``texts`` concurrently, round robin over ``peers``; (result, latency s) each."""
    def one(k: int):
        t0 = time.perf_counter()
        res = net.query(peers[k % len(peers)], "propose", {"data": texts[k], "timeout_s": 60})
        return res, time.perf_counter() - t0

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(len(texts))))


LOG_PAGE = 10_000  # the admin `log` command's largest page


def _log_digest(net: LocalNetwork, i: int) -> tuple[int, list]:
    """Peer ``i``'s committed height and every decision (height, index, author, nonce), paged."""
    rows: dict[tuple[int, int], tuple] = {}
    start, height = 1, 0
    while True:
        res = net.query(i, "log", {"from_height": start, "limit": LOG_PAGE})
        height = res["height"]
        page = res["decisions"]
        rows.update(((d["height"], d["index"]), (d["height"], d["index"], d["author"], d["nonce"])) for d in page)
        if len(page) < LOG_PAGE:
            return height, [rows[k] for k in sorted(rows)]
        start = page[-1]["height"]  # again from the last height: a page may end inside it


def _alive_view(net: LocalNetwork, i: int) -> dict[str, str]:
    return {r["peer_id"]: r["state"] for r in net.query(i, "peers")}


def _hold(net: LocalNetwork, console: Console) -> None:
    """Keep the demo network running until Ctrl-C, with the commands to attach to it."""
    console.rule("[bold]the network keeps running (--hold); Ctrl-C stops it")
    for p in net.peers:
        console.print(f"  peer {p.index}: chimera shell {p.data_dir}")
    console.print(f"  e.g. chimera shell {net.peers[0].data_dir} -c \"peers\"   or   "
                  f"chimera train status --data-dir {net.peers[0].data_dir}")
    def on_term(signum, frame):  # SIGTERM (e.g. from a service manager) stops as Ctrl-C does
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        while all(p.alive() for p in net.peers):
            time.sleep(0.5)
        console.print("[yellow]a peer exited; stopping the network[/yellow]")
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(peers: int = 4, workdir: Path | None = None, hold: bool = False) -> int:
    console = demo_console()
    if peers < 3:
        console.print("[red]the demo needs at least 3 peers[/red]")
        return 2
    keep = workdir is not None
    workdir = (workdir or Path(tempfile.mkdtemp(prefix="chimera-demo-"))).resolve()
    from .demo_training import TRAINING_ARGS, run_training_stage  # each peer's digits shard (node/demo_training.py)

    net = LocalNetwork(workdir, peers, extra_args=FAST_TIMERS + TRAINING_ARGS, name="demo",
                       epoch_length=EPOCH_LENGTH)
    report: dict[str, str] = {}
    code = 1
    console.rule("[bold]Chimera Mesh demo")
    console.print(f"network [cyan]{net.network.fingerprint()}[/cyan]: {peers} peer processes, "
                  f"data dirs under {workdir}")
    try:
        t0 = time.monotonic()
        net.start()
        started = time.monotonic() - t0
        for p in net.peers:
            console.print(f"  peer {p.index}  [green]{p.status['peer_id']}[/green]  pid {p.status['pid']}  "
                          f"{p.status['addresses'][0]}")
        console.print(f"all {peers} processes listening after {started:.2f} s; only peer 0's contact was "
                      "given to the others; the rest is peer exchange")

        # 1. mesh formation (timed from the launch of the first process)
        launched = t0
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < 60:
            counts = [sum(1 for s in _alive_view(net, i).values() if s == "alive") for i in range(peers)]
            if counts != last:
                console.print(f"  {time.monotonic() - t0:5.2f} s  members seen alive per peer: {counts}")
                last = counts
            if all(c == peers - 1 for c in counts):
                break
            time.sleep(0.05)
        else:
            console.print("[red]mesh did not form within 60 s[/red]")
            return 1
        mesh_s = time.monotonic() - launched
        report["full mesh formed"] = f"{mesh_s:.2f} s after launching the first process"
        console.print(f"[bold green]full mesh[/bold green]: {peers * (peers - 1)} verified directed links, "
                      f"{mesh_s:.2f} s after launching the first process")

        # 2. signed, encrypted echo round trips between every pair
        table = Table(title="signed echo round trip, median of 20 (ms)")
        table.add_column("from \\ to")
        for j in range(peers):
            table.add_column(f"peer {j}", justify="right")
        all_rtts = []
        for i in range(peers):
            row = [f"peer {i}"]
            for j in range(peers):
                if i == j:
                    row.append("-")
                    continue
                res = net.query(i, "ping", {"peer_id": net.peers[j].status["peer_id"], "count": 20})
                ok = [r for r in res["rtt_s"] if r is not None]
                all_rtts.extend(ok)
                row.append(f"{statistics.median(ok) * 1000:.2f}" if ok else "lost")
            table.add_row(*row)
        console.print(table)
        if all_rtts:
            report["echo round trip"] = (f"p50 {statistics.median(all_rtts) * 1000:.2f} ms over "
                                         f"{len(all_rtts)} signed request/reply pairs")

        # 3. the consensus log: decisions proposed at every peer, committed by all
        texts = [f"job {k}: assign shard {k % 7} to peer {k % peers}" for k in range(40)]
        t0 = time.perf_counter()
        results = _propose_many(net, list(range(peers)), texts)
        wall = time.perf_counter() - t0
        lat = sorted(x for _, x in results)
        heights = sorted({r["height"] for r, _ in results})
        console.print(f"[bold]consensus[/bold]: {len(texts)} decisions proposed at all {peers} peers, "
                      f"committed in {len(heights)} blocks (heights {heights[0]}..{heights[-1]}) "
                      f"in {wall:.2f} s; commit latency p50 {statistics.median(lat) * 1000:.0f} ms, "
                      f"max {lat[-1] * 1000:.0f} ms")
        tail = net.query(0, "log", {"limit": 3})["decisions"]
        for d in tail:
            console.print(f"  h={d['height']:<5} by {d['author'][:10]}...  {d['data_text']}")
        report["decisions committed"] = (f"{len(texts)} in {wall:.2f} s, p50 latency "
                                         f"{statistics.median(lat) * 1000:.0f} ms (BFT, >2/3 weight; "
                                         f"blocks at least {COMMIT_WAIT_S:g} s apart, "
                                         f"consensus_commit_wait_s)")

        # 4. failure detection, while the log goes on
        victim = net.peers[-1]
        vid = victim.status["peer_id"]
        console.print(f"SIGKILL peer {victim.index} ({vid[:10]}...): no goodbye, the others must notice")
        victim.kill()
        during = _propose_many(net, list(range(peers - 1)),
                               [f"decided while peer {victim.index} is down #{k}" for k in range(10)])
        console.print(f"  the {peers - 1} live peers (>2/3 of the weight) committed {len(during)} more "
                      f"decisions, up to height {max(r['height'] for r, _ in during)}")
        t0 = time.monotonic()
        seen_suspect = False
        others = range(peers - 1)
        while time.monotonic() - t0 < 60:
            views = [_alive_view(net, i).get(vid) for i in others]
            if not seen_suspect and "suspect" in views:
                seen_suspect = True
                console.print(f"  {time.monotonic() - t0:5.2f} s  suspected: {views}")
            if all(v == "dead" for v in views):
                break
            time.sleep(0.05)
        detect_s = time.monotonic() - t0
        console.print(f"  {detect_s:5.2f} s  every other peer marks it [red]dead[/red]")
        report["crash detected by all"] = f"{detect_s:.2f} s (probe interval 0.5 s)"

        # 5. restart: same identity, rejoins
        t0 = time.monotonic()
        status = net.restart(victim.index)
        same = status["peer_id"] == vid
        net.wait_for(net.full_mesh, timeout_s=60, interval_s=0.05)
        rejoin_s = time.monotonic() - t0
        console.print(f"restarted peer {victim.index}: same peer id: {same}, incarnation "
                      f"{status['incarnation']}; full mesh again after {rejoin_s:.2f} s")
        report["restart rejoined"] = f"{rejoin_s:.2f} s, same peer id: {same}"
        t0 = time.monotonic()
        target = net.query(0, "status")["consensus"]["height"]
        net.wait_for(lambda: net.query(victim.index, "status")["consensus"]["height"] >= target,
                     timeout_s=60, interval_s=0.05)
        digests = [_log_digest(net, i)[1] for i in range(peers)]
        identical = all(d == digests[0] for d in digests)
        console.print(f"  it caught up to height {target} from certified commits in "
                      f"{time.monotonic() - t0:.2f} s; decision logs identical on all peers: {identical} "
                      f"({len(digests[0])} decisions)")
        report["log after restart"] = f"identical on all {peers} peers: {identical} ({len(digests[0])} decisions)"

        # 6. reputation-weighted voting power, per epoch
        net.wait_for(lambda: len(net.query(0, "reputation")["epochs"]) >= 4, timeout_s=30, interval_s=0.2)
        rep = net.query(0, "reputation")
        ids = [p.status["peer_id"] for p in net.peers]
        wtable = Table(title=f"committed voting weights per epoch ({EPOCH_LENGTH} heights each)")
        wtable.add_column("epoch")
        wtable.add_column("from height", justify="right")
        for i in range(peers):
            wtable.add_column(f"peer {i}" + (" (killed)" if i == victim.index else ""), justify="right")
        for e in rep["epochs"]:
            wtable.add_row(str(e["epoch"]), str(e["from_height"]), *[str(e["weights"].get(p, "-")) for p in ids])
        if rep["epochs"]:
            console.print(wtable)
        else:
            console.print(f"epoch 0 still running (height {rep['height']}): genesis weights")
        console.print("  weights come from the peers' signed opinions (local Beta reputation of what each "
                      "saw), committed to the log; every peer computes the same table")
        identical = identical and len(digests[0]) == len(texts) + len(during)
        identical = run_training_stage(net, console, report) and identical  # 6a. federated training

        from .demo_fabric import run_fabric_stage  # 6b. WASM agents across the peers (node/demo_fabric.py)
        report.update(run_fabric_stage(net, console))

        # 7. counters
        stats = [net.query(i, "status") for i in range(peers)]
        accepted = sum(s["counters"].get("envelopes_accepted", 0) for s in stats)
        handshakes = sum(s["counters"].get("handshakes_admitted", 0) for s in stats)
        drops = {}
        for s in stats:
            for k, v in s["counters"].items():
                if k.startswith("drop_"):
                    drops[k[5:]] = drops.get(k[5:], 0) + v
        rss = [s["rss_bytes"] / 2**20 for s in stats]
        report["envelopes verified"] = f"{accepted} (Ed25519-signed, over {handshakes} CURVE handshakes)"
        report["drops"] = ", ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "none"
        report["peer RSS"] = f"{min(rss):.1f}-{max(rss):.1f} MiB"
        code = 0 if same and identical else 1
        if hold:
            summary = Table(title="report (before --hold)", show_header=False)
            for k, v in report.items():
                summary.add_row(k, v)
            console.print(summary)
            _hold(net, console)
    finally:
        codes = net.stop()
        report["graceful stop"] = f"exit codes {codes}"
        summary = Table(title="report", show_header=False)
        for k, v in report.items():
            summary.add_row(k, v)
        console.print(summary)
        if any(c not in (0, None) for c in codes):
            code = 1
        if keep:
            console.print(f"data dirs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code
