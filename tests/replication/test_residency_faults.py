"""Residency under faults, on real processes (TLS): writers on every node keep setting
attributes while the membership changes under them (a member added and a rebalance, a
member removed, a resident stopped longer than ``residencyRepairAfter`` and brought back).
Afterwards every acknowledged attribute is on the record's current residents and every
node reads it (services/storage/DESIGN.md, "Handovers")."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import grpc
import pytest
from shoal.storage.v1 import storage_pb2 as pb

from tests.conftest import MakeCluster
from tests.harness.cluster import Cluster
from tests.harness.node import Node
from tests.harness.wait import wait_for
from tests.replication.test_residency import DB, TABLE, _record, _states, _whole

pytestmark = pytest.mark.cluster

RECORDS = 40  # few keys, so that writes and re-homings of one record meet often
CONFIG = {
    "replication": {
        "databases": [{"name": DB, "replicateTo": 2}],
        "residencyRepairAfter": "3s",
    }
}


class Writer(threading.Thread):
    """Sets a fresh attribute on a random record of one node, again and again, and keeps
    every write its node acknowledged."""

    def __init__(self, node: Node, index: int, seed: int) -> None:
        super().__init__(name=f"writer {node.name}", daemon=True)
        self.node, self.index = node, index
        self.random = random.Random(seed)
        self.acknowledged: list[tuple[int, str, int]] = []  # (id, attribute, value)
        self.stopping = threading.Event()
        self.sequence = 0

    def run(self) -> None:
        client = self.node.client()
        while not self.stopping.is_set():
            pk = self.random.randrange(RECORDS)
            self.sequence += 1
            attribute = f"w{self.index}_{self.sequence}"
            try:
                client.call(
                    "Update",
                    pb.UpdateRequest(
                        database=DB,
                        table=TABLE,
                        records=[f'{{"id":{pk},"{attribute}":{self.sequence}}}'.encode()],
                    ),
                    timeout=5,
                )
            except grpc.RpcError:
                self.stopping.wait(0.05)  # its node is stopping or stopped: not acknowledged
                continue
            self.acknowledged.append((pk, attribute, self.sequence))

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        assert not self.is_alive(), f"{self.name} did not stop"


class Writers:
    def __init__(self) -> None:
        self.running: dict[str, Writer] = {}
        self.done: list[Writer] = []
        self.count = 0

    def start(self, node: Node) -> None:
        self.count += 1
        writer = Writer(node, self.count, seed=self.count)
        self.running[node.name] = writer
        writer.start()

    def stop(self, node: Node) -> None:
        writer = self.running.pop(node.name)
        writer.stop()
        self.done.append(writer)

    def acknowledged(self) -> int:
        return sum(len(w.acknowledged) for w in [*self.running.values(), *self.done])

    def more(self, writes: int, what: str) -> None:
        """Wait until the writers have had ``writes`` more writes acknowledged."""
        target = self.acknowledged() + writes
        wait_for(lambda: self.acknowledged() >= target, 120, f"{writes} more writes {what}")

    def expected(self) -> dict[int, dict[str, int]]:
        every: dict[int, dict[str, int]] = {pk: {} for pk in range(RECORDS)}
        for writer in [*self.running.values(), *self.done]:
            for pk, attribute, value in writer.acknowledged:
                every[pk][attribute] = value
        return every


@contextmanager
def writing() -> Iterator[Writers]:
    writers = Writers()
    try:
        yield writers
    finally:
        for node in list(writers.running):
            writers.running[node].stopping.set()
        for writer in writers.running.values():
            writer.join(timeout=30)


def _members(node: Node) -> set[str]:
    rows = node.internal_client().all_records("system", "hdb_nodes", "name")
    return {r["name"] for r in rows}


def _lists(node: Node, names: set[str]) -> bool:
    return _members(node) >= names


def _counts(node: Node) -> bool:
    return len(_states(node)) == RECORDS


def _holds_writes_of(node: Node, origin: str, version: int) -> bool:
    return _position(node, origin) >= version


def _position(node: Node, origin: str) -> int:
    reply = node.internal_client().call("GetPositions", pb.GetPositionsRequest(database=DB))
    return max((p.version for p in reply.positions if p.origin == origin), default=0)


def _rebalanced(node: Node) -> bool:
    status = node.admin().ok({"operation": "cluster_status"})["residency"]["rebalance"]
    return bool(status["passes"]) and not status["running"]


def _residents(node: Node) -> dict[Any, tuple[str, ...]]:
    return {pk: tuple(state[5][2]) for pk, state in _states(node).items()}


def _complete(live: list[Node], expected: dict[int, dict[str, int]]) -> str | None:
    """None when every record is whole, with every acknowledged attribute, on exactly its
    residents (which every node agrees on), and every node reads it; else what is not."""
    views = {node.name: _states(node) for node in live}
    for pk, attributes in expected.items():
        listed = {tuple(views[n][pk][5][2]) for n in views if pk in views[n]}
        if len(listed) != 1:
            return f"record {pk}: nodes disagree on its residents: {listed}"
        [residents] = listed
        for node in live:
            state = views[node.name].get(pk)
            whole = state is not None and _whole(node, state)
            if whole != (node.name in residents):
                return f"record {pk}: {node.name} whole={whole}, residents {residents}"
            if whole and state is not None:
                missing = {a for a, v in attributes.items() if state[3].get(a) != v}
                if missing:
                    return f"record {pk}: resident {node.name} lacks {sorted(missing)[:5]}"
    for node in live:
        for record in node.client().get(DB, TABLE, list(range(RECORDS))):
            missing = {a for a, v in expected[record["id"]].items() if record.get(a) != v}
            if missing:
                return f"record {record['id']} read on {node.name} lacks {sorted(missing)[:5]}"
    return None


def test_no_acknowledged_attribute_is_lost_while_membership_changes(
    make_cluster: MakeCluster,
) -> None:
    cluster: Cluster = make_cluster(
        start=False, size=5, config=CONFIG, services=("storage", "replicator", "admin")
    )
    first, late = cluster.nodes[:4], cluster[4]
    for node in first:
        node.start()
    names = {n.name for n in first}
    for node in first:
        wait_for(partial(_lists, node, names), 30, f"{node.name}'s members")
    admin = cluster[0].admin()
    cluster[0].client().create_table(DB, TABLE, indexed=["color"])
    cluster[0].client().insert(DB, TABLE, [_record(i) for i in range(RECORDS)])
    for node in first:
        wait_for(partial(_counts, node), 60, f"{node.name}'s records")

    with writing() as writers:
        for node in first:
            writers.start(node)
        writers.more(200, "before any change")

        # A member joins, then a rebalance moves records to it while every node writes.
        late.start()
        everyone = names | {late.name}
        for node in cluster:
            wait_for(partial(_lists, node, everyone), 60, f"{node.name}'s members")
        writers.start(late)
        admin.ok({"operation": "rebalance", "database": DB})
        for node in cluster:
            wait_for(partial(_rebalanced, node), 60, f"the rebalance on {node.name}")
        writers.more(200, "after the rebalance")

        # A member leaves: once its writes have reached the others, it stops for good
        # and is removed, and its records are re-homed while the others write.
        leaving = cluster[1]
        writers.stop(leaving)
        stays = [n for n in cluster if n is not leaving]
        sent = _position(leaving, leaving.name)
        for node in stays:
            wait_for(
                partial(_holds_writes_of, node, leaving.name, sent),
                60,
                f"{node.name} to hold every write of {leaving.name}",
            )
        leaving.stop("admin", "replicator", "storage")
        admin.ok({"operation": "remove_node", "hostname": leaving.name})
        wait_for(
            lambda: not any(leaving.name in r for r in _residents(cluster[0]).values()),
            90,
            f"the records of {leaving.name} to be re-homed",
        )
        writers.more(200, "after the removal")

        # A resident stops for longer than residencyRepairAfter: its records are re-homed
        # while it is away; it comes back and writes again.
        away = cluster[2]
        writers.stop(away)
        away.stop("admin", "replicator", "storage")
        wait_for(
            lambda: not any(away.name in r for r in _residents(cluster[0]).values()),
            90,
            f"the records of {away.name} to be re-homed while it is away",
        )
        writers.more(200, f"while {away.name} is away")
        away.start()
        writers.start(away)
        writers.more(200, f"after {away.name} came back")

        for name in list(writers.running):
            writers.stop(next(n for n in cluster if n.name == name))
        expected = writers.expected()

    live = [n for n in cluster if n is not leaving]
    problem: list[str | None] = [None]

    def complete() -> bool:
        problem[0] = _complete(live, expected)
        return problem[0] is None

    try:
        wait_for(complete, 120, "every acknowledged attribute on every record's residents")
    except Exception as exc:
        raise AssertionError(f"{exc}: {problem[0]}") from exc
    assert writers.acknowledged() >= 1000
