"""Jobs: operations Harper runs in the background (CSV loads, deleting old audit logs).

The operation answers at once with ``{"message": "Starting job with id <id>", "job_id"}``;
``get_job`` and ``search_jobs_by_start_date`` show the job: its status (IN_PROGRESS,
COMPLETE or ERROR), its times and its message.

Jobs live in this admin process, bounded: at most ``MAX_RUNNING`` run at once (another
is refused with RESOURCE_EXHAUSTED, nothing started) and the ``MAX_KEPT`` newest are
kept (the oldest finished job is forgotten first). They do not survive a restart of the
admin service: a job's work is in storage, whose own log says what it wrote, and a load
cut short by a restart is run again by its caller; keeping jobs in storage would make
every job a replicated or node-local write for what is a status display.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.common.errors import ResourceExhausted, ShoalError

log = logging.getLogger("shoal.admin.jobs")

MAX_RUNNING = 4
MAX_KEPT = 1000
IN_PROGRESS, COMPLETE, ERROR = "IN_PROGRESS", "COMPLETE", "ERROR"


def _now_ms() -> int:
    return int(time.time() * 1000)


def iso_ms(ms: int) -> str:
    """Harper's ``*_converted`` form of a time: ISO 8601 in UTC with milliseconds."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@dataclass
class Job:
    """One job, as ``get_job`` shows it (Harper's fields, plus ``result``)."""

    id: str
    type: str
    user: str
    created_ms: int
    status: str = IN_PROGRESS
    start_ms: int = 0
    end_ms: int = 0
    message: str = ""
    result: Any = None  # what the operation would have answered (Shoal's addition)
    updated_ms: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def progress(self, message: str) -> None:
        """What a running job has done so far (its message until it ends)."""
        self.message = message
        self.updated_ms = _now_ms()

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "__createdtime__": self.created_ms,
            "__updatedtime__": self.updated_ms or self.created_ms,
            "created_datetime": self.created_ms,
            "end_datetime": self.end_ms or None,
            "id": self.id,
            "job_body": None,
            "message": self.message,
            "start_datetime": self.start_ms,
            "status": self.status,
            "type": self.type,
            "user": self.user,
            "start_datetime_converted": iso_ms(self.start_ms),
            "end_datetime_converted": iso_ms(self.end_ms) if self.end_ms else None,
        }
        if self.result is not None:
            out["result"] = self.result
        return out


# The work of a job, given the job to report progress on -> (message, result).
Work = Callable[[Job], Awaitable[tuple[str, Any]]]


class Jobs:
    """The jobs of this admin process (bounded; see the module docstring)."""

    def __init__(self, max_running: int = MAX_RUNNING, max_kept: int = MAX_KEPT) -> None:
        self.max_running = max_running
        self.max_kept = max_kept
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def running(self) -> int:
        return sum(1 for j in self._jobs.values() if j.status == IN_PROGRESS)

    def start(self, kind: str, user: str, work: Work) -> Job:
        """Start ``work`` as a job of ``kind`` for ``user``; RESOURCE_EXHAUSTED when
        ``max_running`` jobs run already."""
        if self.running() >= self.max_running:
            raise ResourceExhausted(
                f"{self.max_running} jobs are running on this node, the most it runs at once:"
                " start this one when one of them has finished (get_job shows them)",
                reason="TOO_MANY_JOBS",
            )
        now = _now_ms()
        job = Job(id=str(uuid.uuid4()), type=kind, user=user, created_ms=now, start_ms=now)
        self._jobs[job.id] = job
        self._forget_oldest()
        job.task = asyncio.get_running_loop().create_task(self._run(job, work))
        return job

    async def _run(self, job: Job, work: Work) -> None:
        try:
            job.message, job.result = await work(job)
            job.status = COMPLETE
        except ShoalError as exc:
            job.message, job.status = exc.message, ERROR
        except Exception as exc:  # a job's failure is its status, never the process's
            log.exception("job %s (%s) failed", job.id, job.type)
            job.message, job.status = f"the job failed: {exc}", ERROR
        finally:
            job.end_ms = job.updated_ms = _now_ms()
            job.task = None

    def _forget_oldest(self) -> None:
        while len(self._jobs) > self.max_kept:
            oldest = next(
                (i for i, j in self._jobs.items() if j.status != IN_PROGRESS),
                None,
            )
            if oldest is None:
                return
            del self._jobs[oldest]

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def started_between(self, start_ms: int, end_ms: int) -> list[Job]:
        """Jobs started in [start_ms, end_ms], oldest first."""
        return [j for j in self._jobs.values() if start_ms <= j.start_ms <= end_ms]
