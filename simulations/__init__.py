"""Chimera Mesh simulator: a second driver of the pure cores (virtual clock, simulated network)."""
