"""The kinds of event a node records (admin ``events`` / ``events_follow``, logs, ``events.KIND`` counters).

Every event is a map ``{"kind", "peer_id", "at_ms", "priority", ...fields}``; ``peer_id``
is the peer the event is about (the node itself for its own state). The table below is
the complete list: :meth:`chimera.node.runtime.Node.emit_event` counts an unlisted kind
as ``events_unregistered`` (a bug: tests/test_events.py checks every emitting site), and
the admin API refuses a filter naming an unknown kind (a typo would otherwise match
nothing, forever, under ``events_follow``). docs/PROTOCOL.md §19.8 lists the same kinds
with their fields.
"""

from __future__ import annotations

EVENT_KINDS: dict[str, str] = {
    # membership (protocol/membership.py; peer_id: the member)
    "peer_joined": "a peer became a member",
    "peer_alive": "a member is alive again (refuted a suspicion, or rejoined)",
    "peer_suspected": "a member missed its probes and is suspected",
    "peer_failed": "a suspected member was declared failed",
    "peer_left": "a member left gracefully",
    # admission (node/admin_ops.py; peer_id: the admitted or revoked peer)
    "peer_admitted": "an admin admitted a peer (or lifted its revocation)",
    "peer_revoked": "an admin revoked a peer's membership",
    # consensus log (node/consensus.py)
    "decision_committed": "a submitted value was committed (peer_id: its author)",
    "validator_join_committed": "a validator join was committed (peer_id: the joining validator)",
    "evidence_committed": "equivocation evidence was committed (peer_id: the offender)",
    "equivocation_detected": "this node saw two conflicting signed votes (peer_id: the offender)",
    "reputation_changed": "an epoch's weight table was committed",
    "consensus_halted": "a durable write failed: this node stopped taking part in consensus until restarted",
    "sign_state_missing": "the sign state was lost or is older than the log: this validator skips "
                          "signing at the next height",
    "double_sign_risk": "a commit carries a precommit of this validator its sign state does not hold: "
                        "it signs nothing for a few heights",
    "store_behind_sign_state": "the store lost committed heights this node signed (fetched again from peers)",
    # federated training (node/training_service.py; the node itself)
    "job_committed": "a training job was committed to the log",
    "round_started": "a training round began",
    "round_committed": "a training round's inclusion was committed",
    "job_finished": "a training job ran its last round",
    "aggregate_mismatch": "this node's aggregate differs from the committed one",
    "model_fetched": "this node fetched a committed model from a peer",
    "local_failed": "local training of a round failed on this node",
    "waiting_weight_table": "a round waits for the weight table of its epoch",
    "sklearn_version_mismatch": "a screened job needs another scikit-learn version than this node's",
    "checkpoint_failed": "a round's checkpoint could not be written (kept in memory, retried)",
    # agent fabric (node/fabric.py)
    "task_dispatched": "a task attempt was sent to a peer (field to: the peer)",
    "task_completed": "a task was accepted or failed (state: done or failed)",
    "task_resumed": "a task running when this node stopped was placed again after the restart",
    "task_breaker_opened": "a peer's circuit breaker opened (peer_id: that peer)",
    "agent_swapped": "an agent was upgraded or rolled back (action: upgrade, rollback, auto_rollback)",
}
"""Kind -> one line on when it is emitted."""


def unknown_kinds(kinds: set[str]) -> list[str]:
    """The names in ``kinds`` that are not event kinds, sorted."""
    return sorted(k for k in kinds if k not in EVENT_KINDS)
