"""Token bucket rate limiter (pure: the time is passed in)."""

from __future__ import annotations


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; ``now`` is passed in (seconds, any clock
    that the caller uses throughout; a clock stepped back refills nothing)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate_per_s, float(burst)
        self.tokens, self.stamp = float(burst), now

    def ready(self, now: float) -> bool:
        """Refill up to ``now``; whether a token is there (none is taken: see :meth:`spend`)."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens >= 1.0

    def spend(self) -> None:
        """Take one token (after :meth:`ready` said there is one)."""
        self.tokens -= 1.0

    def take(self, now: float) -> bool:
        """Take a token if there is one at ``now``."""
        if self.ready(now):
            self.tokens -= 1.0
            return True
        return False
