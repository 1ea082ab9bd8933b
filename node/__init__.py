"""The real peer: asyncio runtime, ZeroMQ transport, zeroconf discovery, SQLite store, CLI."""
