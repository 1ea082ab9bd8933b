"""Execution fabric (WASM agents, placement, resource probes); see DESIGN.md. Lands with issue 5."""
