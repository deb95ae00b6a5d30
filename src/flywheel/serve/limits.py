"""Request rate limits: a token bucket per key (a user, a client address), answered with 429 and `Retry-After`.

    limiter = RateLimiter(per_minute=60)
    wait = limiter.take("user:3")      # 0.0: go ahead; > 0: seconds until the next request would be allowed
    limiter.check("addr:10.0.0.7")     # the wait without taking a request (is this key blocked now?)

A bucket holds up to `per_minute` requests and refills at `per_minute / 60` per second, so a caller may burst a
minute's worth and then goes at the steady rate. Buckets live in this process's memory (one server process).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from flywheel.serve.errors import ApiError


class RateLimiter:
    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        if per_minute < 0:
            raise ValueError("per_minute must be >= 0 (0 = no limit)")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # requests per second
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (requests left, when last refilled)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def _level(self, key: str, now: float) -> float:
        left, then = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, left + (now - then) * self.rate)

    def check(self, key: str) -> float:
        """Seconds until `key` may make a request (0.0 = now), without taking one."""
        if not self.enabled:
            return 0.0
        with self._lock:
            left = self._level(key, self.clock())
        return 0.0 if left >= 1.0 else (1.0 - left) / self.rate

    def take(self, key: str) -> float:
        """Take one request for `key` if its bucket allows: 0.0, else the seconds to wait (nothing is taken)."""
        if not self.enabled:
            return 0.0
        with self._lock:
            now = self.clock()
            left = self._level(key, now)
            if left < 1.0:
                self._buckets[key] = (left, now)
                return (1.0 - left) / self.rate
            self._buckets[key] = (left - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        """Forget the keys whose buckets are full again (they behave exactly like unseen keys)."""
        for key in [k for k in self._buckets if self._level(k, now) >= self.capacity]:
            del self._buckets[key]


def retry_after(wait: float) -> str:
    """The `Retry-After` header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait)))


class RateLimited(ApiError):
    """429 `rate_limit_exceeded` with the `Retry-After` header OpenAI clients honour."""

    def __init__(self, wait: float, message: str):
        super().__init__(429, f"{message}; retry after {retry_after(wait)} s", code="rate_limit_exceeded")
        self.wait = wait

    def response(self) -> JSONResponse:
        response = super().response()
        response.headers["Retry-After"] = retry_after(self.wait)
        return response


@dataclass
class Limits:
    """The server's three limiters (flags of `flywheel serve`)."""

    per_user: RateLimiter  # requests of one user, whatever token or address they come with
    per_address: RateLimiter  # requests without a user token, per client address
    auth_failures: RateLimiter  # rejected tokens per client address (beyond: 429 for any request with a token)

    @classmethod
    def of(cls, rate_limit: int, rate_limit_anonymous: int, auth_failure_limit: int) -> Limits:
        return cls(RateLimiter(rate_limit), RateLimiter(rate_limit_anonymous), RateLimiter(auth_failure_limit))
