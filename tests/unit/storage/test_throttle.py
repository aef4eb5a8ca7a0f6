"""Sign-in throttling rules, on a clock the test moves: backoff per (name, source) and per
source, forgetting, and a bounded table that never evicts a blocked entry."""

from __future__ import annotations

import pytest

from services.common.errors import ResourceExhausted
from services.storage.throttle import SignInThrottle, ThrottleSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, **settings: object) -> SignInThrottle:
    base: dict[str, object] = {"attempts": 3, "source_attempts": 10, "max_backoff_s": 60.0}
    return SignInThrottle(ThrottleSettings(**{**base, **settings}), clock)  # type: ignore[arg-type]


def fail(t: SignInThrottle, name: str, source: str) -> None:
    t.ended(t.begin(name, source), failed=True)


def wait_of(t: SignInThrottle, name: str, source: str) -> float | None:
    try:
        t.check(name, source, new=True)
    except ResourceExhausted as exc:
        assert exc.reason == "SIGN_IN_THROTTLED"
        return exc.retry_after_s
    return None


def test_backoff_doubles_per_name_and_source_up_to_the_cap() -> None:
    clock = Clock()
    t = throttle(clock)
    for _ in range(3):
        assert wait_of(t, "admin", "10.0.0.1") is None
        fail(t, "admin", "10.0.0.1")
    waits = []
    for _ in range(8):
        wait = wait_of(t, "admin", "10.0.0.1")
        assert wait is not None
        waits.append(wait)
        clock.now += wait
        fail(t, "admin", "10.0.0.1")
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    # Another address, and another name from the same address, are not slowed down.
    assert wait_of(t, "admin", "10.0.0.2") is None
    assert wait_of(t, "bob", "10.0.0.1") is None
    # A success from the other address does not clear the blocked pair.
    t.ended(t.begin("admin", "10.0.0.2"), failed=False)
    assert wait_of(t, "admin", "10.0.0.1") == 60.0


def test_a_success_clears_the_pair_and_idle_failures_are_forgotten() -> None:
    clock = Clock()
    t = throttle(clock)
    for _ in range(2):
        fail(t, "admin", "10.0.0.1")
    t.ended(t.begin("admin", "10.0.0.1"), failed=False)
    for _ in range(2):
        fail(t, "admin", "10.0.0.1")
    assert wait_of(t, "admin", "10.0.0.1") is None  # 2 < 3: the success cleared the count
    clock.now += 61  # longer than max_backoff_s without a failure
    fail(t, "admin", "10.0.0.1")
    fail(t, "admin", "10.0.0.1")
    assert wait_of(t, "admin", "10.0.0.1") is None


def test_spraying_names_from_one_source_is_slowed_down() -> None:
    clock = Clock()
    t = throttle(clock)
    for i in range(10):
        fail(t, f"user-{i}", "10.0.0.1")
    assert wait_of(t, "someone-new", "10.0.0.1") == 1.0
    assert wait_of(t, "someone-new", "10.0.0.2") is None


def test_guesses_in_flight_count_as_failures() -> None:
    clock = Clock()
    t = throttle(clock)
    attempts = [t.begin("admin", "10.0.0.1") for _ in range(3)]
    assert wait_of(t, "admin", "10.0.0.1") is not None  # a fourth at once: refused
    t.check("admin", "10.0.0.1")  # ...though one sharing a verification may wait for it
    for attempt in attempts:
        t.ended(attempt, failed=None)  # not checked (no scrypt slot): not counted
    assert wait_of(t, "admin", "10.0.0.1") is None
    assert len(t) == 0


def test_the_table_is_bounded_and_never_evicts_a_blocked_entry() -> None:
    clock = Clock()
    t = throttle(clock, capacity=100, source_attempts=0)
    # 50 names blocked from one address: 50 pair entries (per-source counting is off).
    for i in range(50):
        for _ in range(3):
            fail(t, f"victim-{i}", "10.6.6.6")
    # Spraying new pairs from elsewhere fills the rest and keeps evicting unblocked ones...
    for i in range(500):
        fail(t, "admin", f"10.1.{i // 250}.{i % 250}")
        assert len(t) <= 100
    # ...never a blocked one.
    for i in range(50):
        assert wait_of(t, f"victim-{i}", "10.6.6.6") is not None
    # When every entry is blocked, a sign-in needing a new one is refused until the
    # first block ends, and the table is not scanned again meanwhile.
    for i in range(50):
        for _ in range(3):
            fail(t, f"other-{i}", "10.7.7.7")
    assert len(t) == 100
    with pytest.raises(ResourceExhausted, match="too many failed sign-ins on this node") as info:
        t.begin("admin", "10.8.8.8")
    assert info.value.retry_after_s is not None and 0 < info.value.retry_after_s <= 1.0
    clock.now += 1.01
    t.ended(t.begin("admin", "10.8.8.8"), failed=False)


def test_forgetting_a_name_clears_its_entries() -> None:
    clock = Clock()
    t = throttle(clock)
    for source in ("10.0.0.1", "10.0.0.2"):
        for _ in range(3):
            fail(t, "bob", source)
    t.forget_name("bob")
    assert wait_of(t, "bob", "10.0.0.1") is None
    assert wait_of(t, "bob", "10.0.0.2") is None
