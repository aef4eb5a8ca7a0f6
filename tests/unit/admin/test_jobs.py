"""The admin process's jobs: statuses, and the bounds on running and kept jobs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.admin.jobs import COMPLETE, ERROR, IN_PROGRESS, Job, Jobs, iso_ms
from services.common.errors import NotFound, ResourceExhausted


async def _done(*started: Job) -> None:
    await asyncio.gather(*(j.task for j in started if j.task is not None))


async def test_a_job_completes_or_fails_with_its_message() -> None:
    jobs = Jobs()

    async def works(job: Job) -> tuple[str, Any]:
        job.progress("halfway")
        await asyncio.sleep(0)
        assert job.json()["message"] == "halfway" and job.status == IN_PROGRESS
        return "loaded 2 of 2", {"rows": 2}

    async def fails(job: Job) -> tuple[str, Any]:
        raise NotFound("table dev.cat does not exist")

    async def breaks(job: Job) -> tuple[str, Any]:
        raise RuntimeError("boom")

    ok, failed, broken = (
        jobs.start(t, "ann", w) for t, w in (("a", works), ("b", fails), ("c", breaks))
    )
    assert ok.status == IN_PROGRESS and ok.json()["end_datetime"] is None
    await _done(ok, failed, broken)
    assert (ok.status, ok.message, ok.result) == (COMPLETE, "loaded 2 of 2", {"rows": 2})
    assert (failed.status, failed.message) == (ERROR, "table dev.cat does not exist")
    assert broken.status == ERROR and "boom" in broken.message
    shown = ok.json()
    assert shown["end_datetime"] >= shown["start_datetime"] and shown["user"] == "ann"
    assert shown["result"] == {"rows": 2} and "result" not in failed.json()
    assert jobs.get(ok.id) is ok and jobs.get("nope") is None
    assert jobs.started_between(ok.start_ms, ok.start_ms + 60_000)[0] is ok


async def test_running_and_kept_jobs_are_bounded() -> None:
    jobs = Jobs(max_running=2, max_kept=3)
    release = asyncio.Event()

    async def waits(job: Job) -> tuple[str, Any]:
        await release.wait()
        return "done", None

    first = jobs.start("t", "u", waits)
    second = jobs.start("t", "u", waits)
    with pytest.raises(ResourceExhausted) as refused:
        jobs.start("t", "u", waits)
    assert refused.value.reason == "TOO_MANY_JOBS"
    release.set()
    await _done(first, second)
    for _ in range(3):
        await _done(jobs.start("t", "u", waits))
    assert jobs.get(first.id) is None  # the oldest finished job is forgotten first
    assert len(jobs.started_between(0, 2**62)) == 3


def test_converted_times_are_iso_with_milliseconds() -> None:
    assert iso_ms(1611615798805) == "2021-01-25T23:03:18.805Z"
