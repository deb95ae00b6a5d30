"""The token bucket behind the server's rate limits, on a fake clock, against a brute-force replay."""

from __future__ import annotations

import random

import pytest


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_steady_rate_and_exact_waits():
    from flywheel.serve.limits import RateLimiter, retry_after

    clock = Clock()
    limiter = RateLimiter(per_minute=6, clock=clock)  # 6 at once, then one per 10 s
    assert [limiter.take("a") for _ in range(6)] == [0.0] * 6
    assert limiter.take("a") == pytest.approx(10.0) and retry_after(limiter.take("a")) == "10"
    assert limiter.take("b") == 0.0  # keys are independent
    clock.now = 4.0
    assert limiter.check("a") == pytest.approx(6.0) and limiter.take("a") == pytest.approx(6.0)
    clock.now = 10.0
    assert limiter.take("a") == 0.0 and limiter.take("a") == pytest.approx(10.0)
    clock.now = 1000.0  # refills to the burst size, never beyond
    assert [limiter.take("a") for _ in range(7)].count(0.0) == 6
    assert retry_after(0.01) == "1"


def test_matches_a_brute_force_replay():
    """Random arrivals: the limiter admits exactly the requests a float64 replay of the bucket admits."""
    from flywheel.serve.limits import RateLimiter

    rng = random.Random(0)
    clock = Clock()
    per_minute = 30
    limiter = RateLimiter(per_minute, clock=clock)
    level, last, admitted, expected = float(per_minute), 0.0, [], []
    for _ in range(2000):
        clock.now += rng.expovariate(1.0)  # about 60 arrivals a minute: twice the limit
        level = min(per_minute, level + (clock.now - last) * per_minute / 60)
        last = clock.now
        ok = level >= 1.0
        level -= 1.0 if ok else 0.0
        expected.append(ok)
        admitted.append(limiter.take("k") == 0.0)
    assert admitted == expected
    assert 0.4 < sum(admitted) / len(admitted) < 0.6


def test_off_and_pruning():
    from flywheel.serve.limits import RateLimiter

    assert RateLimiter(0).take("x") == 0.0 and not RateLimiter(0).enabled
    with pytest.raises(ValueError):
        RateLimiter(-1)
    clock = Clock()
    limiter = RateLimiter(60, clock=clock, max_keys=10)
    for i in range(10):
        limiter.take(f"k{i}")
    clock.now = 120.0  # every bucket is full again
    limiter.take("new")
    assert set(limiter._buckets) == {"new"}
