"""Execution fabric: sandboxed WebAssembly agents, placement across peers, resource probes.

* :mod:`.sandbox` -- the wasmtime host (fuel, epoch deadline, memory limit,
  no ambient authority, compile cache), task agents (WASI commands) and
  actor instances (reactors + ``chimera`` host functions).
* :mod:`.host` -- actor agents of one peer: bounded mailboxes, one message
  at a time, routing to local and remote agents, supervision, hot swap.
* :mod:`.modules` -- content-addressed ``.wasm`` store (SHA-256 names).
* :mod:`.deploy` -- ``name@version`` deployments, history port, automatic rollback.
* :mod:`.resources` / :mod:`.probes` -- advertised capacity; psutil and NVML probes.
* :mod:`.placement` -- pure placement core: requirements vs capacity by
  reputation, GPU leases, circuit breakers, retries, redundant results
  accepted by vote certificates.

The agent ABI is documented in docs/AGENTS.md; the layering in DESIGN.md
(this package may import ``chimera.protocol`` and ``chimera.consensus``, never
``chimera.node``; :mod:`.placement` and :mod:`.resources` stay pure).
"""
