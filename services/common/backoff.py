"""Exponential backoff with jitter, capped: every retry loop in Shoal uses this."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays of initial * 2^n, capped, each drawn from [d/2, d] ("equal jitter")."""

    initial_s: float = 0.2
    cap_s: float = 10.0
    attempt: int = 0
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def next(self) -> float:
        """The delay before the next attempt."""
        ceiling = min(self.cap_s, self.initial_s * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return float(ceiling / 2 + self._random.uniform(0, ceiling / 2))

    def reset(self) -> None:
        """Start over after a success."""
        self.attempt = 0
