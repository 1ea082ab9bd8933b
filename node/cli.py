"""``chimera``: the command line.

Exit codes: 0 success; 1 runtime failure; 2 usage or configuration error;
3 no running node answered (wrong ``--data-dir``?).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, NoReturn

from chimera.protocol.errors import InvalidTokenError, LocalProtocolError
from chimera.protocol.identity import fingerprint
from chimera.protocol.network import MAX_EPOCH_LENGTH, Network

from . import admin
from .cli_fabric import bounded_int, finite_float, folder_path, old_spelling
from .config import PROFILES, ConfigError, default_data_dir, load_config
from .keys import KeyFileError, load_network, load_or_create_identity, load_or_create_transport_keys, save_network
from .launcher import MAX_LOCAL_PEERS
from .logs import setup_logging

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_NODE = 0, 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()


# ------------------------------------------------------------------ commands


def cmd_network_init(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    if load_network(data_dir) is not None and not args.force:
        raise CliError(f"{data_dir} already belongs to a network; `chimera network token` "
                       "prints its token (--force replaces it)")
    genesis = list(args.validator or [])
    if not args.no_local_validator:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        genesis.append(load_or_create_identity(data_dir).peer_id)
    try:
        network = Network.create(name=args.name, genesis=tuple(genesis), epoch_length=args.epoch_length)
    except LocalProtocolError as exc:
        raise CliError(str(exc)) from None
    save_network(data_dir, network)
    print(f"created network {network.name!r} ({network.fingerprint()}) in {data_dir}", file=sys.stderr)
    if network.genesis:
        print(f"genesis validators ({len(network.genesis)}): " + ", ".join(network.genesis), file=sys.stderr)
    else:
        print("no genesis validators: this network runs membership only (no consensus log)", file=sys.stderr)
    print("join token (secret: share only with peers you admit):", file=sys.stderr)
    print(network.token())
    return EXIT_OK


def cmd_network_id(args: argparse.Namespace) -> int:
    """`chimera network id`: this data dir's peer id, its keys created as the node would at its
    first start, so that a network's creator can name it with ``--validator`` before it runs."""
    data_dir = _data_dir(args)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    peer_id = load_or_create_identity(data_dir).peer_id
    transport_key = load_or_create_transport_keys(data_dir).public
    _print(args, {"peer_id": peer_id, "transport_key_fingerprint": fingerprint(transport_key)}, peer_id)
    return EXIT_OK


def cmd_network_token(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    network = load_network(data_dir)
    if network is None:
        raise CliError(f"{data_dir} belongs to no network; run `chimera network init` first")
    try:  # a running node adds itself as a bootstrap contact for joiners
        contact = admin.call(data_dir, "status", timeout_s=2.0)["contact"]
        network = network.with_bootstrap((contact,))
    except admin.AdminError:
        pass
    print(network.token())
    return EXIT_OK


def _set_items(items: list[str] | None) -> dict:
    """``--set FIELD=VALUE`` items as ``{field: value text}``; CliError for an item without ``=``."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--set expects FIELD=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def _overrides(args: argparse.Namespace) -> dict:
    out = _set_items(args.set)
    if args.port is not None:
        out["port"] = args.port
    if args.listen is not None:
        out["listen_host"] = args.listen
    if args.bootstrap:
        out["bootstrap"] = tuple(args.bootstrap)
    if args.interface:
        out["interfaces"] = tuple(args.interface)
    if args.advertise:
        out["advertise_hosts"] = tuple(args.advertise)
    if args.no_mdns:
        out["mdns"] = False
    if args.profile:
        out["profile"] = args.profile
    if args.metrics_port is not None:
        out["metrics_port"] = args.metrics_port
    if args.log_json:
        out["log_json"] = True
    if args.log_level:
        out["log_level"] = args.log_level
    return out


def cmd_node(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = load_config(data_dir, config_file=Path(args.config) if args.config else None,
                         overrides=_overrides(args))
    setup_logging(config.log_level, config.log_json)
    network = load_network(data_dir)
    if args.join:
        joined = Network.from_token(args.join)
        if network is not None and network.network_id != joined.network_id:
            raise CliError(f"{data_dir} already belongs to network {network.fingerprint()}; "
                           "use another --data-dir to join a different network")
        network = joined
        save_network(data_dir, network)
    if network is None:
        raise CliError(f"{data_dir} belongs to no network: run `chimera network init` "
                       "or pass --join TOKEN")
    from .runtime import Node, NodeStartError

    async def main() -> None:
        node = Node(data_dir, config, network)
        await node.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(node.stop()))
        print(f"listening {node.contact_uri}", flush=True)
        await node.wait_stopped()
        # asyncio restores the default handlers when the loop closes; a second
        # SIGTERM during interpreter teardown must not turn a clean stop into -15.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)

    import zmq

    try:
        _run(main())
    except NodeStartError as exc:
        raise CliError(f"cannot start: {exc}", EXIT_FAIL) from None
    except zmq.ZMQError as exc:  # e.g. listen_host is no address of this machine
        raise CliError(f"cannot listen on {config.listen_host}:{config.port}: {exc}", EXIT_FAIL) from None
    return EXIT_OK


def _run(coro) -> None:
    try:
        import uvloop  # optional extra [fast]
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _print(args: argparse.Namespace, value, text: str) -> None:
    """``--json``: ``{"ok": true, "result": value}`` as the shell's ``--json`` writes it (one
    line, bytes as hex; plus ``"audit_failure"`` when a reply carried one); else ``text``."""
    if args.json:
        from .shell import json_line, with_audit_failure

        print(json_line(with_audit_failure({"ok": True, "result": value})))
    else:
        print(text)


def _call(args: argparse.Namespace, cmd: str, cargs: dict | None = None, timeout_s: float = 10.0):
    try:
        return admin.call(_data_dir(args), cmd, cargs, timeout_s=timeout_s)
    except admin.AdminError as exc:  # the node's own code (usage, refused, ...) or 3: no node
        raise CliError(str(exc), exc.code) from None


def _show(args: argparse.Namespace, cmd: str, res, extra: dict | None = None) -> None:
    """Print an admin answer: ``--json`` as is, else the text the shell shows for ``cmd``
    (:func:`chimera.node.shell.render`: the same columns and headers in both)."""
    if args.json:
        _print(args, res, "")
    else:
        from .shell import render

        print(render(cmd, res, extra))


def cmd_status(args: argparse.Namespace) -> int:
    _show(args, "status", _call(args, "status"))
    return EXIT_OK


def cmd_peers(args: argparse.Namespace) -> int:
    rows = _call(args, "peers")
    extra = None
    if not args.json:  # the members view: this peer too, with its weights (as the shell's)
        from .shell import peers_extra

        extra = peers_extra(lambda cmd: admin.call(_data_dir(args), cmd, timeout_s=3.0))
    _show(args, "peers", rows, extra)
    return EXIT_OK


def cmd_ping(args: argparse.Namespace) -> int:
    res = _call(args, "ping", {"peer_id": args.peer_id, "count": args.count},
                timeout_s=5 + 2.5 * args.count)
    if not any(r is not None for r in res["rtt_s"]):
        raise CliError(f"no answer from {args.peer_id} ({len(res['rtt_s'])} pings)", EXIT_FAIL)
    _show(args, "ping", res)
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    cargs = {"limit": args.limit, "min_priority": args.min_priority}
    if args.kind:
        cargs["kind"] = args.kind
    _show(args, "events", _call(args, "events", cargs))
    return EXIT_OK


def cmd_propose(args: argparse.Namespace) -> int:
    if not args.data:
        raise CliError("the decision to propose is empty", EXIT_USAGE)
    res = _call(args, "propose", {"data": args.data, "timeout_s": args.timeout_s},
                timeout_s=args.timeout_s + 5)
    _show(args, "propose", res)
    return EXIT_OK


def cmd_certificate(args: argparse.Namespace) -> int:
    res = _call(args, "certificate", {} if args.height is None else {"height": args.height})
    _show(args, "certificate", res)
    return EXIT_OK if res["verified"] else EXIT_FAIL


def cmd_log(args: argparse.Namespace) -> int:
    cargs = {"limit": args.limit}
    if args.from_height is not None:
        cargs["from_height"] = args.from_height
    _show(args, "log", _call(args, "log", cargs))
    return EXIT_OK


def cmd_reputation(args: argparse.Namespace) -> int:
    _show(args, "reputation", _call(args, "reputation"))
    return EXIT_OK


def cmd_resources(args: argparse.Namespace) -> int:
    """This machine's capacity as a peer advertises it (psutil, NVML; no node needed), with the
    settings of the data dir's configuration that shape the advertisement (as the node's probe)."""
    from chimera.fabric.placement import wire_wall_time_ms
    from chimera.fabric.probes import probe_for
    from chimera.protocol.messages import encode_fields

    data_dir = _data_dir(args)
    config = load_config(data_dir)  # config.toml there, CHIMERA_* variables: what `chimera node` would use
    probe = probe_for(data_dir if data_dir.exists() else None, probe_gpus=config.fabric_probe_gpus,
                      max_wasm_memory_bytes=config.fabric_max_wasm_memory_bytes,
                      max_task_wall_time_ms=wire_wall_time_ms(config.fabric_max_task_wall_s))
    try:
        res = probe.resources()
    finally:
        probe.close()
    nvml = probe.nvml_error or "ok"
    if config.fabric_probe_gpus >= 0:
        nvml = f"not used: fabric_probe_gpus = {config.fabric_probe_gpus} advertises simulated GPUs"
    doc = encode_fields(res)
    doc["gpus"] = [encode_fields(g) for g in res.gpus]
    doc["nvml"] = nvml
    lines = [f"cpu      {res.cpu_count} usable (affinity, cgroup quota), load {res.load_1m:.2f} (1 min)",
             f"memory   {res.memory_available_bytes / 2**30:.1f} GiB free of {res.memory_total_bytes / 2**30:.1f} GiB",
             f"disk     {res.disk_free_bytes / 2**30:.1f} GiB free of {res.disk_total_bytes / 2**30:.1f} GiB",
             f"wasm     {res.max_wasm_memory_bytes >> 20} MiB linear memory per agent, "
             f"tasks up to {res.max_task_wall_time_ms / 1000:g} s"]
    lines += [f"gpu {g.index}    {g.name}: {g.memory_used_bytes >> 20}/{g.memory_total_bytes >> 20} MiB used, "
              f"{g.utilization_percent}% busy" for g in res.gpus]
    if not res.gpus:
        lines.append(f"gpus     none ({nvml if nvml != 'ok' else 'NVML reports no device'})")
    _print(args, doc, "\n".join(lines))
    return EXIT_OK


def cmd_up(args: argparse.Namespace) -> int:
    overrides = _set_items(args.set)  # checked here, once, not by each peer's exit
    extra = [arg for item in args.set or [] for arg in ("--set", item)]
    if overrides:
        load_config(Path(tempfile.gettempdir()) / "chimera-up-check-none", environ={}, overrides=overrides)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="chimera-up-"))
    with _launcher_workdir(workdir.resolve()):  # held until up ends (its peers stopped)
        return _up(args, workdir, extra)


@contextlib.contextmanager
def _launcher_workdir(workdir: Path) -> Iterator[None]:
    """Hold ``workdir``'s launcher lock (``up.lock``: one `chimera up` or demo per workdir) for
    the block. CliError (exit 1) when another launcher holds it, or when peers of ``workdir``
    still run from an earlier one that was SIGKILLed (its peers, in their own sessions,
    outlive it; starting them again would only make them exit "already running")."""
    from .launcher import WorkdirBusyError, leftover_peers, lock_workdir

    try:
        lock_fd = lock_workdir(workdir)
    except WorkdirBusyError as exc:
        raise CliError(str(exc), EXIT_FAIL) from None
    except OSError as exc:
        raise CliError(f"cannot lock {workdir}: {exc.strerror or exc}", EXIT_FAIL) from None
    try:
        held = leftover_peers(workdir)
        if held:
            pids = " ".join(pid for _, pid in held)
            raise CliError(f"{len(held)} peer(s) of {workdir} still run from an earlier run ("
                           + ", ".join(f"peer {i}: pid {pid}" for i, pid in held)
                           + f"); stop them (kill {pids}) or use another --workdir", EXIT_FAIL)
        yield
    finally:
        os.close(lock_fd)


def _up(args: argparse.Namespace, workdir: Path, extra: list[str]) -> int:
    """`chimera up` once ``workdir`` is locked: start, supervise until Ctrl-C or no peer is
    left, stop; returns the exit code."""
    from .launcher import LocalNetwork, PeerStartError

    net = LocalNetwork(workdir.resolve(), args.peers, mdns=args.mdns, extra_args=extra)
    print(f"starting {args.peers} peers in {workdir} (network {net.network.fingerprint()})")
    warning = net.quorum_warning(net.validators(running=False))
    if warning:
        print(f"warning: {warning}")
    restart = args.restart == "on-failure"
    all_down = False
    old_handlers: dict = {}
    try:
        try:
            net.start()
        except PeerStartError as exc:
            raise CliError(str(exc), EXIT_FAIL) from None
        for p in net.peers:
            print(f"  peer {p.index}: {p.status['peer_id']}\n"
                  f"          contact  {p.status['contact']}\n"
                  f"          data dir {p.data_dir}   (chimera peers --data-dir {p.data_dir})")
        print(f"join token: {workdir / 'network.token'}")
        ok = net.wait_for(net.full_mesh, timeout_s=30)
        print("full mesh formed" if ok else "mesh still forming (see `chimera peers`)")
        # Ctrl-C / SIGTERM set net.stop_requested at once, even while supervise waits for a
        # hung peer's answer (it then stops asking); the wakeup fd ends the 1 s pause early
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        old_wakeup_fd = signal.set_wakeup_fd(wake_w)
        old_handlers = {sig: signal.signal(sig, lambda *_: setattr(net, "stop_requested", True))
                        for sig in (signal.SIGINT, signal.SIGTERM)}  # (kept until the peers stopped)
        try:
            print("press Ctrl-C to stop all peers", flush=True)
            while not net.stop_requested:
                for line in net.supervise(time.monotonic(), restart_on_failure=restart):
                    print(line, flush=True)
                if net.running() == 0 and net.waiting_restarts() == 0:
                    all_down = True
                    print("no peer is running", flush=True)
                    break
                if not net.stop_requested:
                    select.select([wake_r], [], [], 1.0)
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
        finally:
            signal.set_wakeup_fd(old_wakeup_fd)
            os.close(wake_r)
            os.close(wake_w)
    finally:
        # a second Ctrl-C while the peers stop only sets the flag again: it cannot cut the stop
        # short (hung peers left running, the workdir lock released under them)
        codes = net.stop()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        print(f"stopped {len(codes)} peers (exit codes {codes})")
    return EXIT_FAIL if all_down and any(code != 0 for code in codes) else EXIT_OK


def cmd_service(args: argparse.Namespace) -> int:
    from . import service

    unit = service.render_unit(args.executable or service.default_executable(), user=args.user,
                               profile=args.profile, memory_max=args.memory_max)
    if args.service_command == "unit":
        print(unit, end="")
        return EXIT_OK
    try:
        steps = service.install(unit, root=Path(args.root), user=args.user,
                                activate=Path(args.root) == Path("/"))
    except PermissionError as exc:
        raise CliError(f"{exc.filename}: permission denied (run as root)", EXIT_FAIL) from None
    print("\n".join(steps))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .launcher import PeerStartError

    workdir = Path(args.workdir).resolve() if args.workdir else None
    # as `chimera up`: one launcher per workdir (a temporary workdir is the demo's own)
    with _launcher_workdir(workdir) if workdir is not None else contextlib.nullcontext():
        try:
            return run_demo(peers=args.peers, workdir=workdir, hold=args.hold)
        except PeerStartError as exc:  # (the demo's report is printed; the cause in one line)
            raise CliError(str(exc), EXIT_FAIL) from None


# -------------------------------------------------------------------- parser


class _HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help unless the help already says its default or
    there is none to say (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is None \
                or action.default is False or action.default == argparse.SUPPRESS \
                or isinstance(action.default, (list, tuple)) and not action.default:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: a usage error is one line on stderr
    (``chimera CMD: MESSAGE (see chimera CMD --help)``) and exit code 2."""

    def __init__(self, *args, **kwargs) -> None:
        # every option with a help text says its default (`--fuel`, `--timeout`, ...)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            message = f"unrecognized arguments: {' '.join(extras)}"
            # `chimera status DIR` (the shell takes its target that way): say how to give it
            folder = next((e for e in extras if not e.startswith("-") and os.path.isdir(e)), None)
            if folder is not None and getattr(parsed, "data_dir", False) is None:
                message += f"; a node's data directory is given as --data-dir {folder}"
            self.error(message)
        return parsed


def build_parser(plugins: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="chimera", description="Chimera Mesh peer")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, ep in sorted((plugins or {}).items()):
        # listed for --help only: main() hands these to the plugin before parsing
        sub.add_parser(name, help=f"see `chimera {name} --help` (from {ep.value})")

    def data_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="node data directory (default: $CHIMERA_HOME or "
                                          "the platform user data dir)")

    def json_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output")

    net = sub.add_parser("network", help="create a network or print its join token")
    net_sub = net.add_subparsers(dest="network_command", required=True)
    p = net_sub.add_parser("init", help="create a new network and print its join token")
    data_dir_arg(p)
    p.add_argument("--name", default="chimera")
    p.add_argument("--force", action="store_true")
    p.add_argument("--validator", action="append", metavar="PEER_ID",
                   help="another genesis validator of the consensus log (repeatable)")
    p.add_argument("--no-local-validator", action="store_true",
                   help="do not make this data dir's peer a genesis validator")
    # (a token may say 1, but then opinions can rarely commit in their epoch: PROTOCOL.md §15.5)
    p.add_argument("--epoch-length", type=bounded_int(2, MAX_EPOCH_LENGTH), default=100,
                   help="heights per consensus epoch; at least 2, so that each epoch's reputation "
                        "opinions can commit in it")
    p.set_defaults(func=cmd_network_init)
    p = net_sub.add_parser("token", help="print the join token of this data dir's network")
    data_dir_arg(p)
    p.set_defaults(func=cmd_network_token)
    p = net_sub.add_parser("id", help="print this data dir's peer id (its keys are created if missing, as "
                                      "the node does at first start): give it to `network init --validator`")
    data_dir_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_network_id)

    p = sub.add_parser("node", help="run one peer")
    data_dir_arg(p)
    p.add_argument("--join", metavar="TOKEN", help="join the network of this token")
    p.add_argument("--config", help="TOML config file (default DATA_DIR/config.toml)")
    p.add_argument("--listen", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=bounded_int(0, 65535), help="TCP port (default 7420; 0 = any free port)")
    p.add_argument("--advertise", action="append", help="address peers should dial (repeatable)")
    p.add_argument("--bootstrap", action="append", metavar="CONTACT",
                   help="contact URI chm://PEER_ID@HOST:PORT?key=KEY (repeatable)")
    p.add_argument("--interface", action="append", help="mDNS interface name or IPv4 (repeatable)")
    p.add_argument("--no-mdns", action="store_true", help="disable zeroconf discovery")
    p.add_argument("--profile", help="deployment profile: default or edge (1-4 GB machines); "
                                     "advertised to peers")
    p.add_argument("--metrics-port", type=bounded_int(-1, 65535), help="serve Prometheus /metrics on metrics_host "
                                                     "(127.0.0.1) at this port (needs [metrics])")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="any config field")
    p.add_argument("--log-json", action="store_true", help="JSON log lines")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_node)

    for name, func, help_ in (("status", cmd_status, "status of the local node"),
                              ("peers", cmd_peers, "members as the local node sees them")):
        p = sub.add_parser(name, help=help_)
        data_dir_arg(p)
        json_arg(p)
        p.set_defaults(func=func)
    p = sub.add_parser("ping", help="round-trip signed echo requests to a peer")
    data_dir_arg(p)
    json_arg(p)
    p.add_argument("peer_id")
    p.add_argument("--count", type=bounded_int(1, 1000), default=5)
    p.set_defaults(func=cmd_ping)
    p = sub.add_parser("events", help="recent events of the local node (membership, consensus)")
    data_dir_arg(p)
    json_arg(p)
    p.add_argument("--limit", type=bounded_int(1, 10_000), default=50)
    p.add_argument("--kind", help="only these kinds (comma-separated, e.g. peer_failed,decision_committed); "
                   "an unknown kind is an error that lists them all (docs/PROTOCOL.md §19.8)")
    p.add_argument("--min-priority", default="debug", choices=("debug", "info", "notice", "warning", "error", "critical"),
                   help="only events at or above this priority")
    p.set_defaults(func=cmd_events)
    p = sub.add_parser("propose", help="commit a decision to the consensus log and wait for it")
    data_dir_arg(p)
    json_arg(p)
    p.add_argument("data", metavar="DATA", help="the decision (text, at most 2048 bytes UTF-8)")
    p.add_argument("--timeout-s", type=finite_float(0.1, 3600.0), default=30.0,
                   help="seconds to wait for the commit")
    old_spelling(p, "--timeout", "--timeout-s")
    p.set_defaults(func=cmd_propose)
    p = sub.add_parser("log", help="the committed decisions of the consensus log")
    data_dir_arg(p)
    json_arg(p)
    p.add_argument("--limit", type=bounded_int(1, 10_000), default=20)
    p.add_argument("--from-height", type=bounded_int(1, 2**63 - 1), help="start here (default: the latest decisions)")
    p.set_defaults(func=cmd_log)
    p = sub.add_parser("certificate", help="the quorum certificate of a committed height (default: the last)")
    data_dir_arg(p)
    json_arg(p)
    p.add_argument("height", type=bounded_int(1, 2**63 - 1), nargs="?")
    p.set_defaults(func=cmd_certificate)
    p = sub.add_parser("reputation", help="committed voting weights and this node's local scores")
    data_dir_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_reputation)

    p = sub.add_parser("resources", help="this machine's CPU, memory, disk and NVIDIA GPUs (psutil, NVML) "
                                         "as a peer with this data dir's config advertises them")
    data_dir_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_resources)

    p = sub.add_parser("up", help="launch N peer processes on this machine")
    p.add_argument("--peers", type=bounded_int(1, MAX_LOCAL_PEERS), default=4, help="peer processes to start")
    p.add_argument("--workdir", type=folder_path, help="keep each peer's data dir under this folder")
    p.add_argument("--mdns", action="store_true", help="also discover by mDNS (default: bootstrap + peer exchange)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="a config field for every peer (e.g. training_digits_shard=genesis)")
    p.add_argument("--restart", choices=("no", "on-failure"), default="no",
                   help="on-failure: start a peer again, on its port, when it exits with a code other "
                        "than 0 or is killed (SIGKILL, a crash), after 1 s, doubled per crash in a row "
                        "up to 30 s; a peer that exits 0 (SIGTERM, the shell's `stop`) stopped cleanly "
                        "and is not restarted; either way the other peers keep running when one exits")
    p.set_defaults(func=cmd_up)

    svc = sub.add_parser("service", help="systemd unit: print it or install it")
    svc_sub = svc.add_subparsers(dest="service_command", required=True)
    for name, help_ in (("unit", "print the hardened systemd unit"),
                        ("install", "install the unit (and the system user) as root")):
        p = svc_sub.add_parser(name, help=help_)
        p.add_argument("--executable", help="absolute path of chimera (default: this one)")
        p.add_argument("--user", default="chimera", help="system user to run as")
        p.add_argument("--profile", choices=sorted(PROFILES), help="e.g. edge for 1-4 GB machines")
        p.add_argument("--memory-max", default="75%", metavar="SIZE",
                       help="MemoryMax= of the unit: a percentage of RAM, bytes with K/M/G/T, or infinity "
                            "(default 75%%; past it the node is killed and restarted)")
        if name == "install":
            p.add_argument("--root", default="/", help="install below this root (staging; "
                                                       "no user creation, no systemctl)")
        p.set_defaults(func=cmd_service)

    p = sub.add_parser("demo", help="bring up a local network, show it working, stop")
    p.add_argument("--peers", type=bounded_int(1, MAX_LOCAL_PEERS), default=4, help="peer processes to start")
    p.add_argument("--workdir", type=folder_path, help="keep the peers' data dirs and logs here")
    p.add_argument("--hold", action="store_true",
                   help="after the report, keep the network running (attach `chimera shell DATA_DIR`) "
                        "until Ctrl-C")
    p.set_defaults(func=cmd_demo)
    from .cli_train import register as register_train_commands

    register_train_commands(sub)
    from .cli_admin import register as register_admin_commands  # shell, admin key ..., audit

    register_admin_commands(sub)
    from .cli_fabric import register as register_fabric_commands  # agent ..., task ...

    register_fabric_commands(sub)
    parser.command_names = frozenset(sub.choices)  # built-ins (and plugins given), for main()
    return parser


PLUGIN_GROUP = "chimera.commands"


def plugin_commands() -> dict[str, Any]:
    """Subcommands other installed parts register under the entry-point group ``chimera.commands``.

    Each entry point names a ``main(argv: list[str]) -> int``; ``chimera NAME ARGS...`` calls it
    with ARGS. The simulator registers ``simulate`` this way, so the node never imports it (the
    layering of ../shared/DESIGN.md: node and simulations are two drivers of the same cores).
    """
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a tool killed by a closed pipe exits with


def stdout_closed() -> int:
    """The reader of our stdout went away (``chimera log | head``): point stdout at /dev/null so
    that the interpreter's final flush does not fail again with a traceback; returns
    :data:`EXIT_BROKEN_PIPE`."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            code = _main(argv)
        except SystemExit:  # --help, a usage error: argparse printed and exits
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # (a closed pipe shows here, not at exit)
        return code
    except BrokenPipeError:
        return stdout_closed()


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in parser.command_names:
        # help, a plugin command or a typo: only then scan the entry points (~70 ms, which
        # every `chimera node` start would otherwise pay)
        plugins = plugin_commands()
        if argv and argv[0] in plugins:
            try:
                plugin_main = plugins[argv[0]].load()
            except ImportError as exc:
                print(f"chimera: {argv[0]} is unavailable: {exc} (install the extra that provides it)",
                      file=sys.stderr)
                return EXIT_FAIL
            return int(plugin_main(argv[1:]) or 0)
        parser = build_parser(plugins)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        return _fail(args, str(exc), exc.code)
    except (ConfigError, KeyFileError, InvalidTokenError) as exc:
        return _fail(args, str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise
    except OSError as exc:
        return _fail(args, str(exc), EXIT_FAIL)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Report a failure: one line on stderr, or with ``--json`` the ``{"ok": false, "error",
    "code"}`` document on stdout (what the admin API, `chimera shell --json` and the admin
    commands print); returns ``code``."""
    if getattr(args, "json", False):
        from .shell import json_line, with_audit_failure

        print(json_line(with_audit_failure({"ok": False, "error": message, "code": code})))
    else:
        print(f"chimera: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
