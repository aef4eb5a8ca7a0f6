"""Fixtures of the replicator's fast tier: nodes made in a test are always stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.unit.replicator.nodes import Node


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    """A list a test adds its nodes to; each is stopped after the test."""
    made: list[Node] = []
    try:
        yield made
    finally:
        for node in made:
            await node.stop()
