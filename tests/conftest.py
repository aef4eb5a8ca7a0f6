"""Shared fixtures: nodes as real processes that are always shut down."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.client import StorageClient
from tests.harness.cluster import Cluster
from tests.harness.node import Node

MakeNode = Callable[..., Node]
MakeCluster = Callable[..., Cluster]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def make_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeNode]:
    """Factory for started nodes; every node is stopped after the test, logs shown on failure."""
    nodes: list[Node] = []

    def make(start: bool = True, **kwargs: Any) -> Node:
        node = Node(tmp_path, **kwargs)
        nodes.append(node)
        if start:
            node.start()
        return node

    try:
        yield make
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.close()
        if _failed(request):
            _print_logs(nodes)


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"report_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


def _print_logs(nodes: list[Node], lines: int = 80) -> None:
    """Show each stopped node's service logs in the failing test's report."""
    for node in nodes:
        for service in node.processes:
            print(f"--- {node.name} {service} log ---")
            print(node.log_tail(service, lines))


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeCluster]:
    """Factory for started clusters; every process is stopped after the test."""
    clusters: list[Cluster] = []

    def make(start: bool = True, **kwargs: Any) -> Cluster:
        cluster = Cluster(tmp_path, **kwargs)
        clusters.append(cluster)
        if start:
            cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.close()
        if _failed(request):
            _print_logs([node for cluster in clusters for node in cluster.nodes], 60)


@pytest.fixture
def node(make_node: MakeNode) -> Node:
    """One started storage node."""
    return make_node()


@pytest.fixture
def client(node: Node) -> StorageClient:
    """A super-user client of ``node``."""
    return node.client()
