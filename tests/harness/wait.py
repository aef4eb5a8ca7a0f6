"""Waiting on conditions with a deadline (never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import grpc

T = TypeVar("T")

# What a condition may raise while what it waits for is not there yet (see ``wait_for``).
NOT_YET: tuple[type[BaseException], ...] = (
    grpc.RpcError,
    AssertionError,
    OSError,
    LookupError,
    ValueError,
)


class WaitTimeout(AssertionError):
    """A condition did not become true in time."""


class GiveUp(AssertionError):
    """Raised by a condition that can never become true (a process it waits on exited):
    ``wait_for`` fails at once with it instead of waiting out its deadline."""


def wait_for(
    condition: Callable[[], T | None],
    timeout: float = 30.0,
    what: str = "condition",
    interval: float = 0.02,
    retry_on: tuple[type[BaseException], ...] = (),
    max_interval: float = 0.5,
) -> T:
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout`` seconds.

    A condition may raise while what it waits for is not there yet. These exceptions
    count as "not yet" and are retried until the deadline, the last one reported:

    - ``grpc.RpcError``, whatever its code: services start, restart and converge
      (UNAVAILABLE while a process starts or restarts, NOT_FOUND until a database or
      table replicates, PERMISSION_DENIED until a user's role arrives, DEADLINE_EXCEEDED);
    - ``AssertionError``: conditions that assert, ``expect_error`` while the call still
      succeeds, a nested ``wait_for`` that timed out;
    - ``OSError``: a file, socket or port that is not there yet, a refused connection;
    - ``LookupError`` (``KeyError``, ``IndexError``) and ``ValueError`` (``[row] = rows``
      on no rows yet, a JSON file half written): data that has not arrived yet;
    - whatever ``retry_on`` adds, for one wait.

    Any other exception (``TypeError``, ``AttributeError``, ``NameError``,
    ``RuntimeError``, ...) is a bug in the condition or the harness, not a state to wait
    out: it propagates at once, so the test fails now instead of after the whole
    timeout. So does ``GiveUp``, which a condition raises when it knows it can never
    become true (the process it waits on has exited).
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    delay = interval
    expected = NOT_YET + retry_on
    while True:
        try:
            value = condition()
            if value:
                return value
        except GiveUp:
            raise
        except expected as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(delay)
        delay = min(delay * 1.5, max_interval)
