"""`shoal node clone` reports the rows it copied even when no poll saw a copy running
(cluster_status shows a copy only while it runs; a small one is over between polls)."""

from __future__ import annotations

from services import clone


def test_progress_of_a_finished_copy_shows_no_rows_but_held_rows_counts_them() -> None:
    status = {
        "connections": [
            {
                "name": "source",
                "connected": True,
                "database_sockets": [
                    {"database": "dev", "copy": None, "backlog": {"transactions": 0}},
                ],
            }
        ]
    }
    state = clone.progress(status, "source")
    assert state.ready({"dev"}) and state.rows == 0  # what the bar showed: "0 rows"
    described = {
        "dev": {"dog": {"record_count": 4}, "cat": {"record_count": 2}},
        "other": {"t": {"record_count": 9}},
    }
    assert clone.held_rows(described, {"dev"}) == 6
    assert clone.held_rows({}, {"dev"}) == 0
