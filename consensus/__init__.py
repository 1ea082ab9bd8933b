"""Consensus layer (reputation, BFT log, federated averaging); see DESIGN.md. Lands with issues 3 and 4."""
