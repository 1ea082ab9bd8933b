"""Node-side admin commands added by the admin API: config, log level, metrics,
filtered and live events, and network admission (revoke / admit a peer id).

:func:`build_admin_server` composes these with the runtime's own handlers
(``Node._admin_handlers``) into the node's :class:`~.admin.AdminServer`.

Runtime-changeable config (``config_set``; lasts until the node restarts):
:data:`RUNTIME_FIELDS`. Peer revocation is persisted in the store table
``revoked_peers``: a revoked peer id's envelopes are dropped right after the
signature check (counter ``drop_revoked``), it is removed from membership and
routes at once, and nothing is sent to it until it is admitted again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, AsyncIterator

from chimera.protocol.identity import fingerprint, public_key_from_peer_id
from chimera.protocol.membership import Connect, MemberEvent, Send
from chimera.protocol.network import parse_contact_uri

from . import admin as admin_api
from .admin import EXIT_USAGE, AdminError, float_arg, int_arg, str_arg
from .actors import wait_event
from .config import RANGES, ConfigError, NodeConfig, _coerce
from .events import EVENT_KINDS, unknown_kinds

if TYPE_CHECKING:
    from .runtime import Node

log = logging.getLogger("chimera.admin")

PRIORITIES = {"debug": 0, "info": 1, "notice": 2, "warning": 3, "error": 4, "critical": 5}
MAX_FOLLOW_EVENTS = 1_000_000
MAX_FOLLOW_S = 86_400.0

_REVOKED_SCHEMA = """
CREATE TABLE IF NOT EXISTS revoked_peers (
    peer_id TEXT PRIMARY KEY,
    revoked_ms INTEGER NOT NULL,
    reason TEXT NOT NULL
);
"""


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


# ------------------------------------------------------------------ events


class EventFeed(deque):
    """The node's bounded event deque that also wakes live followers."""

    def __init__(self, items=(), maxlen: int | None = 500) -> None:
        super().__init__(items, maxlen)
        self.total = len(self)
        self.waiters: set[asyncio.Event] = set()

    def append(self, item) -> None:
        super().append(item)
        self.total += 1
        for waiter in self.waiters:
            waiter.set()


def _event_filter(args: dict):
    kinds = args.get("kind")
    if kinds is not None:
        if isinstance(kinds, str) and len(kinds) <= 4096:
            kinds = {k.strip() for k in kinds.split(",") if k.strip()}
        elif isinstance(kinds, (list, tuple)) and len(kinds) <= 256 and all(isinstance(k, str) for k in kinds):
            kinds = set(kinds)
        else:
            raise AdminError("kind is a name or a comma-separated list of names", EXIT_USAGE)
        if not kinds:
            raise AdminError("kind names no event kind; kinds: " + ", ".join(sorted(EVENT_KINDS)), EXIT_USAGE)
        unknown = unknown_kinds(kinds)
        if unknown:
            raise AdminError(f"unknown event kind {', '.join(map(repr, unknown[:5]))[:300]}; kinds: "
                             + ", ".join(sorted(EVENT_KINDS)), EXIT_USAGE)
    floor = str_arg(args, "min_priority", "debug", choices=tuple(PRIORITIES))
    floor_rank = PRIORITIES[floor]

    def match(event: dict) -> bool:
        return (kinds is None or event.get("kind") in kinds) \
            and PRIORITIES.get(event.get("priority", "info"), 1) >= floor_rank
    return match


# ------------------------------------------------------------------ config

def _set_log_level(node: "Node", value: str) -> None:
    logging.getLogger().setLevel(value.upper())


def _set_rate(node: "Node", value: float) -> None:
    for bucket in node._buckets.values():
        bucket.rate = value


def _set_burst(node: "Node", value: int) -> None:
    for bucket in node._buckets.values():
        bucket.burst = float(value)


def _set_drop_interval(node: "Node", value: float) -> None:
    node.drops.interval_s = value


def _set_skew(node: "Node", value: float) -> None:
    node.opener.max_clock_skew_ms = int(value * 1000)


# field -> how to apply it to the running node; values are checked as config.toml's are
# (config.RANGES; log_level against LOG_LEVELS)
RUNTIME_FIELDS = {
    "log_level": _set_log_level,
    "rate_limit_msgs_per_s": _set_rate,
    "rate_limit_burst": _set_burst,
    "drop_log_interval_s": _set_drop_interval,
    "max_clock_skew_s": _set_skew,
}
LOG_LEVELS = ("debug", "info", "warning", "error")


def set_config(node: "Node", field: str, value: object) -> dict:
    """Change one runtime-changeable field; returns old and new values.

    Raises:
        AdminError: not a runtime-changeable field, or a bad value (code 2).
    """
    if field not in RUNTIME_FIELDS:
        raise AdminError(f"{field!r} cannot be changed at runtime; changeable: "
                         f"{', '.join(RUNTIME_FIELDS)} (others: edit config.toml and restart)", EXIT_USAGE)
    try:
        new = _coerce(field, value, "config_set")
    except ConfigError as exc:
        raise AdminError(str(exc), EXIT_USAGE) from None
    apply = RUNTIME_FIELDS[field]
    if field == "log_level":
        new = str(new).lower()
        if new not in LOG_LEVELS:
            raise AdminError(f"log_level must be one of {', '.join(LOG_LEVELS)}", EXIT_USAGE)
    elif new not in RANGES[field]:
        raise AdminError(f"{field} must be in {RANGES[field]}", EXIT_USAGE)
    old = getattr(node.config, field)
    node.config = node.config.replace(**{field: new})
    apply(node, new)
    log.info("config %s changed from %r to %r by an admin", field, old, new)
    return {"field": field, "old": old, "new": new}


# --------------------------------------------------------------- admission


def load_revoked(store) -> set[str]:
    """The persisted revoked peer ids (creates the table on first use)."""
    store.db.executescript(_REVOKED_SCHEMA)
    return {pid for (pid,) in store.db.execute("SELECT peer_id FROM revoked_peers")}


def blocked_action(node: "Node", action: object) -> bool:
    """True for a membership action addressed to a revoked peer (it is skipped)."""
    if not node.revoked:
        return False
    if isinstance(action, (Send, MemberEvent)):
        return action.peer_id in node.revoked
    if isinstance(action, Connect):
        return action.contact.peer_id in node.revoked
    return False


def revoke_peer(node: "Node", peer_id: str, reason: str) -> dict:
    public_key_from_peer_id(peer_id)
    if peer_id == node.peer_id:
        raise AdminError("a node cannot revoke itself", EXIT_USAGE)
    node.store.db.execute("INSERT INTO revoked_peers(peer_id, revoked_ms, reason) VALUES(?,?,?) "
                          "ON CONFLICT(peer_id) DO UPDATE SET revoked_ms=excluded.revoked_ms, "
                          "reason=excluded.reason", (peer_id, _wall_ms(), reason[:200]))
    node.store.db.execute("DELETE FROM peers WHERE peer_id=?", (peer_id,))
    node.revoked.add(peer_id)
    membership = node.membership
    was_member = membership.members.pop(peer_id, None) is not None
    membership.candidates.pop(peer_id, None)
    membership._gossip.pop(peer_id, None)  # never spread news of a revoked peer
    contact = node.routes.pop(peer_id, None)
    if contact is not None:
        for endpoint in contact.addresses:
            node.transport.disconnect(contact.transport_key, endpoint)
    for conn, owner in list(node._conn_owner.items()):
        if owner == peer_id:
            del node._conn_owner[conn]
    node.emit_event("peer_revoked", peer_id, priority="warning", reason=reason[:200])
    return {"peer_id": peer_id, "revoked": True, "was_member": was_member}


def admit_peer(node: "Node", peer_id: str, uri: str | None) -> dict:
    public_key_from_peer_id(peer_id)
    if uri is not None:
        pid, _, _ = parse_contact_uri(uri)
        if pid != peer_id:
            raise AdminError("the contact URI names another peer id", EXIT_USAGE)
    cur = node.store.db.execute("DELETE FROM revoked_peers WHERE peer_id=?", (peer_id,))
    was_revoked = peer_id in node.revoked or cur.rowcount > 0
    node.revoked.discard(peer_id)
    if uri is not None:
        node.add_contact_uri(uri, static=True)
        node.run_membership_actions()
    if was_revoked:
        node.emit_event("peer_admitted", peer_id)
    return {"peer_id": peer_id, "admitted": True, "was_revoked": was_revoked}


# ---------------------------------------------------------------- handlers


def node_handlers(node: "Node") -> tuple[dict, dict]:
    """(handlers, streams) this module adds to the node's admin API."""

    async def events(args: dict) -> list:
        limit = int_arg(args, "limit", 100, 1, 10_000)
        match = _event_filter(args)
        return [e for e in node.events if match(e)][-limit:]

    def events_follow(args: dict) -> AsyncIterator[dict]:
        match = _event_filter(args)
        max_events = int_arg(args, "max_events", MAX_FOLLOW_EVENTS, 1, MAX_FOLLOW_EVENTS)
        duration_s = float_arg(args, "duration_s", MAX_FOLLOW_S, 0.1, MAX_FOLLOW_S)
        feed: EventFeed = node.events

        async def gen() -> AsyncIterator[dict]:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + duration_s
            cursor, sent = feed.total, 0
            wake = asyncio.Event()
            feed.waiters.add(wake)
            try:
                while sent < max_events:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return
                    if not await wait_event(wake, remaining):
                        return
                    wake.clear()
                    new, cursor = feed.total - cursor, feed.total
                    for event in list(feed)[-min(new, len(feed)):]:
                        if match(event):
                            yield event
                            sent += 1
                            if sent >= max_events:
                                return
            finally:
                feed.waiters.discard(wake)
        return gen()

    async def config_get(args: dict) -> dict:
        values = {name: getattr(node.config, name) for name in NodeConfig.__dataclass_fields__}
        field = str_arg(args, "field", None, max_len=64)
        if field is not None:
            if field not in values:
                raise AdminError(f"unknown config field {str(field)[:40]!r}", EXIT_USAGE)
            return {"field": field, "value": values[field], "runtime_changeable": field in RUNTIME_FIELDS}
        return {"values": values, "runtime_changeable": list(RUNTIME_FIELDS)}

    async def config_set(args: dict) -> dict:
        if args.get("value") is None:
            raise AdminError("missing argument 'value'", EXIT_USAGE)
        return set_config(node, str_arg(args, "field", max_len=64), args["value"])

    async def log_level(args: dict) -> dict:
        return set_config(node, "log_level", str_arg(args, "level", max_len=16))

    async def metrics(args: dict) -> dict:
        if node.metrics_server is not None:
            from prometheus_client import CollectorRegistry, generate_latest

            from .metrics import NodeCollector

            registry = CollectorRegistry(auto_describe=False)
            registry.register(NodeCollector(node))
            text = await asyncio.to_thread(generate_latest, registry)
            return {"format": "prometheus", "text": text.decode()}
        status = node.status()
        return {"format": "summary", "note": "the Prometheus exporter is off (--metrics-port)",
                "members": status["members"], "uptime_s": status["uptime_s"],
                "rss_bytes": status["rss_bytes"], "counters": status["counters"]}

    async def revoke(args: dict) -> dict:
        return revoke_peer(node, str_arg(args, "peer_id", max_len=64),
                           str_arg(args, "reason", "revoked by an admin", max_len=1000))

    async def admit(args: dict) -> dict:
        return admit_peer(node, str_arg(args, "peer_id", max_len=64), str_arg(args, "uri", None, max_len=4096))

    async def revoked(args: dict) -> list:
        return [{"peer_id": p, "revoked_ms": t, "reason": r} for p, t, r in node.store.db.execute(
            "SELECT peer_id, revoked_ms, reason FROM revoked_peers ORDER BY revoked_ms")]

    handlers = {"events": events, "config_get": config_get, "config_set": config_set,
                "log_level": log_level, "metrics": metrics, "revoke_peer": revoke, "admit": admit,
                "revoked_peers": revoked}
    return handlers, {"events_follow": events_follow}


def build_admin_server(node: "Node") -> admin_api.AdminServer:
    """The node's admin server: runtime handlers, these, keys, audit, optional remote API."""
    if not isinstance(node.events, EventFeed):
        node.events = EventFeed(node.events, node.events.maxlen)
    handlers = node._admin_handlers()
    extra, streams = node_handlers(node)
    handlers["events"] = extra.pop("events")  # the filtered version replaces the plain one
    for name, fn in extra.items():
        handlers.setdefault(name, fn)
    server = admin_api.AdminServer(
        node.data_dir / admin_api.SOCKET_NAME, handlers, streams=streams, db=node.store.db,
        node_fingerprint=fingerprint(node.transport_keys.public),
        remote_endpoint=node.config.admin_listen or None,
        transport_keys=(node.transport_keys.secret, node.transport_keys.public), counters=node.counters)

    async def whoami(args: dict) -> dict:
        p = server._principal
        remote = None
        if server.remote is not None:
            remote = f"{node.config.admin_listen.rsplit(':', 1)[0]}:{server.remote.port}"
        return {"who": p.who if p else "?", "role": p.role if p else "?",
                "transport": p.transport if p else "?", "peer_id": node.peer_id,
                "node": fingerprint(node.transport_keys.public), "remote_admin": remote,
                "server_key": node.contact_uri.rsplit("key=", 1)[1]}

    server.handlers["whoami"] = whoami
    return server
