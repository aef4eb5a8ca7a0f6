"""The harness's ``wait_for``: expected exceptions are retried until the deadline, any
other fails at once (tests/harness/wait.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from tests.harness.wait import GiveUp, WaitTimeout, wait_for


class Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


def failing(errors: list[BaseException], then: object = "done") -> Callable[[], object]:
    """A condition that raises each of ``errors`` in turn, then returns ``then``."""
    calls = iter(errors)

    def condition() -> object:
        error = next(calls, None)
        if error is not None:
            raise error
        return then

    return condition


@pytest.mark.parametrize(
    "error",
    [
        Unavailable(),
        AssertionError("not yet"),
        ConnectionRefusedError(),
        FileNotFoundError("no pid file yet"),
        KeyError("open"),
        IndexError("list index out of range"),
        ValueError("not enough values to unpack"),
    ],
)
def test_expected_exceptions_are_retried(error: BaseException) -> None:
    assert wait_for(failing([error, error]), timeout=5, interval=0.001) == "done"


@pytest.mark.parametrize(
    "error",
    [
        TypeError("'NoneType' object is not subscriptable"),
        AttributeError("no such attribute"),
        NameError("typo"),
        RuntimeError("already running"),
        GiveUp("the process exited"),
    ],
)
def test_other_exceptions_fail_at_once(error: BaseException) -> None:
    calls = 0

    def condition() -> None:
        nonlocal calls
        calls += 1
        raise error

    started = time.monotonic()
    with pytest.raises(type(error)):
        wait_for(condition, timeout=30, interval=0.001)
    assert calls == 1
    assert time.monotonic() - started < 5


def test_retry_on_adds_expected_exceptions() -> None:
    condition = failing([TypeError("once"), TypeError("twice")])
    assert wait_for(condition, timeout=5, interval=0.001, retry_on=(TypeError,)) == "done"


def test_a_timeout_reports_the_last_expected_error() -> None:
    def condition() -> None:
        raise KeyError("open")

    with pytest.raises(WaitTimeout, match=r"waiting for the streams \(last error: KeyError"):
        wait_for(condition, timeout=0.05, what="the streams", interval=0.001)


def test_falsy_values_are_waited_out() -> None:
    values: Iterator[object] = iter([None, 0, [], "ready"])
    assert wait_for(lambda: next(values), timeout=5, interval=0.001) == "ready"
