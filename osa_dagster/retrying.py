"""One retry policy for every remote service the project talks to: S3, upstream HTTP APIs
and the Kubernetes API. A leaf module, like atomic_files."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# Answers that say "try again later": throttling, and a server or gateway in trouble.
TRANSIENT_HTTP_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried.

    `attempts` counts the first try. The wait before retry n is drawn from [d/2, d] with
    d = min(max_delay, base_delay * 2**(n-1)): the jitter keeps many workers that failed
    together from retrying together, and the lower half-bound makes the whole wait
    predictable.
    """

    attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, not {self.attempts}")
        # `not <=` also refuses NaN, which sleep() would take.
        if not (0 <= self.base_delay < math.inf and 0 <= self.max_delay < math.inf):
            raise ValueError(
                "RetryPolicy delays must be finite numbers of seconds >= 0, not "
                f"base_delay={self.base_delay}, max_delay={self.max_delay}"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 for the first try)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)
