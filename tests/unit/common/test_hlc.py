"""The hybrid logical clock, driven by a fake physical clock."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common import hlc
from services.common.hlc import LOGICAL_BITS, LOGICAL_MASK, HybridClock

T0 = 1_700_000_000_000  # a Unix time in ms


class FakeClock:
    """A physical clock the test moves by hand (also backwards)."""

    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def v(ms: int, counter: int = 0) -> int:
    return (ms << LOGICAL_BITS) | counter


def test_now_follows_the_physical_clock() -> None:
    physical = FakeClock()
    clock = HybridClock(physical)
    assert clock.now() == v(T0)
    physical.ms += 5
    assert clock.now() == v(T0 + 5)
    assert hlc.version_ms(clock.last) == T0 + 5


def test_now_ticks_the_counter_within_one_millisecond() -> None:
    clock = HybridClock(FakeClock())
    issued = [clock.now() for _ in range(5)]
    assert issued == [v(T0, i) for i in range(5)]
    assert hlc.format_version(issued[3]) == f"{T0}.3"


def test_now_is_monotonic_when_the_physical_clock_goes_backwards() -> None:
    physical = FakeClock()
    clock = HybridClock(physical)
    first = clock.now()
    physical.ms -= 10_000
    second = clock.now()
    assert second == first + 1
    physical.ms = T0 + 1
    assert clock.now() == v(T0 + 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-1000, 1000), st.integers(0, 2**50)), max_size=50))
def test_versions_strictly_increase_whatever_the_clock_does(steps: list[int]) -> None:
    physical = FakeClock()
    clock = HybridClock(physical)
    previous = clock.now()
    for step in steps:
        if step > 1000:  # a remote version
            got = clock.observe(v(T0) + step)
            assert got > v(T0) + step
        else:
            physical.ms += step
            got = clock.now()
        assert got > previous
        assert got >= physical.ms << LOGICAL_BITS
        assert clock.last == got
        previous = got


def test_observe_moves_past_a_remote_version_ahead_of_us() -> None:
    physical = FakeClock()
    clock = HybridClock(physical)
    remote = v(T0 + 2000, 7)
    assert clock.observe(remote) == remote + 1
    # Local events stay ahead of it even though the physical clock has not caught up.
    assert clock.now() == remote + 2
    physical.ms = T0 + 3000
    assert clock.now() == v(T0 + 3000)


def test_observe_an_old_remote_version_just_ticks() -> None:
    physical = FakeClock()
    clock = HybridClock(physical)
    local = clock.now()
    assert clock.observe(v(T0 - 50)) == local + 1
    physical.ms += 1
    assert clock.observe(v(T0 - 50)) == v(T0 + 1)


def test_logical_overflow_carries_into_milliseconds() -> None:
    clock = HybridClock(FakeClock(), last=v(T0, LOGICAL_MASK))
    carried = clock.now()
    assert carried == v(T0 + 1, 0)
    assert hlc.version_ms(carried) == T0 + 1
    assert hlc.format_version(carried) == f"{T0 + 1}.0"
    observed = HybridClock(FakeClock()).observe(v(T0 + 9, LOGICAL_MASK))
    assert observed == v(T0 + 10, 0)


def test_restart_from_a_stored_last_never_goes_backwards() -> None:
    before = HybridClock(FakeClock(T0 + 60_000))
    issued = [before.now() for _ in range(3)]
    stored = before.last
    # Restart with a physical clock a minute behind: versions continue after the stored one.
    physical = FakeClock(T0)
    after = HybridClock(physical, last=stored)
    assert after.last == stored
    resumed = after.now()
    assert resumed == stored + 1
    assert resumed > max(issued)
    assert after.observe(v(T0)) == stored + 2
    assert after.peek() == stored + 2


def test_restart_with_the_clock_ahead_uses_the_clock() -> None:
    clock = HybridClock(FakeClock(T0 + 1), last=v(T0, 40))
    assert clock.now() == v(T0 + 1)


def test_peek_does_not_advance() -> None:
    physical = FakeClock()
    clock = HybridClock(physical)
    assert clock.peek() == v(T0)
    assert clock.peek() == v(T0)
    assert clock.last == 0
    issued = clock.now()
    assert clock.peek() == issued
    assert clock.peek() == issued
    assert clock.now() == issued + 1
    physical.ms += 3
    assert clock.peek() == v(T0 + 3)
    assert clock.last == issued + 1


def test_ahead_ms() -> None:
    physical = FakeClock()
    clock = HybridClock(physical)
    assert clock.ahead_ms(v(T0)) == 0
    assert clock.ahead_ms(v(T0 + 1500, 99)) == 1500
    assert clock.ahead_ms(v(T0 - 20)) == -20
    physical.ms += 1500
    assert clock.ahead_ms(v(T0 + 1500, 99)) == 0
    assert clock.physical_ms() == T0 + 1500


def test_version_helpers() -> None:
    assert hlc.version_from_ms(T0) == v(T0)
    assert hlc.version_from_ms(-5) == 0
    assert hlc.version_ms(v(T0, 123)) == T0
    assert hlc.format_version(v(T0, 123)) == f"{T0}.123"
    assert hlc.version_from_ms(T0) < v(T0, 1) < hlc.version_from_ms(T0 + 1)
    assert v(2**48 - 1, LOGICAL_MASK) == hlc.MAX_VERSION


def test_wall_clock_ms_applies_the_offset() -> None:
    plain = hlc.wall_clock_ms()
    ahead = hlc.wall_clock_ms(10_000)
    before = time.time_ns() // 1_000_000
    a = plain()
    b = ahead()
    after = time.time_ns() // 1_000_000
    assert before <= a <= after
    assert before + 10_000 <= b <= after + 10_000
    clock = HybridClock(hlc.wall_clock_ms())
    assert hlc.version_ms(clock.now()) >= before
