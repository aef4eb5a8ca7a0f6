"""Jobs: starting an operation as a job, ``get_job`` and ``search_jobs_by_start_date``
(services/admin/jobs.py keeps them)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.admin.jobs import Job, Work
from services.admin.operations.body import Body, Json
from services.admin.operations.execute import Execute
from services.common.errors import InvalidArgument


def start(ex: Execute, kind: str, work: Work) -> Json:
    """Start ``work`` as a job of the caller; Harper's answer naming it."""
    job = ex.node.jobs.start(kind, ex.caller.identity.name, work)
    return {"message": f"Starting job with id {job.id}", "job_id": job.id}


def _visible(ex: Execute, job: Job) -> bool:
    """A super user sees every job, another user their own."""
    return ex.caller.identity.super_user or job.user == ex.caller.identity.name


def parse_get_job(body: Body) -> str:
    return body.text("id")


async def get_job(ex: Execute, job_id: str) -> Json:
    """Harper's answer: a list holding the job (empty when there is no such job, or it
    is another user's)."""
    job = ex.node.jobs.get(job_id)
    return [job.json()] if job is not None and _visible(ex, job) else []


@dataclass(frozen=True)
class StartDates:
    start_ms: int
    end_ms: int


def _date_ms(body: Body, name: str) -> int:
    """A date as Harper's job search takes it: ISO 8601 (``2021-01-25T22:05:27.464+0000``
    too) or Unix milliseconds."""
    value = body.value(name)
    if value is None:
        raise InvalidArgument(f"{body.operation}: '{name}' is required")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return body.millis(value, name)
    if isinstance(value, str):
        text = value.replace("Z", "+00:00")
        if len(text) > 5 and text[-5] in "+-" and text[-4:].isdigit():
            text = text[:-2] + ":" + text[-2:]  # +0000 -> +00:00
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            return int(moment.timestamp() * 1000)
    raise InvalidArgument(
        f"{body.operation}: '{name}' must be a date (ISO 8601, e.g."
        f" 2021-01-25T22:05:27.464+0000, or Unix milliseconds)"
    )


def parse_search_jobs_by_start_date(body: Body) -> StartDates:
    return StartDates(_date_ms(body, "from_date"), _date_ms(body, "to_date"))


async def search_jobs_by_start_date(ex: Execute, dates: StartDates) -> Json:
    """Super user only: every job started in the window, oldest first."""
    return [j.json() for j in ex.node.jobs.started_between(dates.start_ms, dates.end_ms)]
