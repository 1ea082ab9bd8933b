"""Consensus layer (pure cores, see DESIGN.md).

* :mod:`.quorum`: weight tables, domain-separated signed votes, quorum certificates.
* :mod:`.reputation`: Beta local reputation, signed opinions, per-epoch weight tables.
* :mod:`.votes`: application ballots (majority, weighted, unanimous, quorum) with certificates.
* :mod:`.bft`: the Tendermint-style replicated log (when present).

Not yet wired into the node runtime; see the open consensus issue.
"""
