"""The admin service's memory budget on real processes: the worst Execute an
authenticated user can send (16 MiB of empty records, which once took the admin service
to 22 GB) is refused with RESOURCE_EXHAUSTED before it is parsed; a large request that
fits stays within its estimate; concurrent large requests share the process budget; and
an answer too large for one Execute is refused without being gathered whole.

A watcher samples the processes' memory while each request runs and stops a process that
goes far past its bound, so a regression fails the test instead of eating the machine."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import orjson
import psutil
import pytest
from shoal.admin.v1 import admin_pb2 as apb

from services.admin.budget import estimate
from tests.conftest import MakeNode
from tests.harness.node import Node
from tests.harness.status import retry_delay_s

MIB = 1024 * 1024
MAX_MESSAGE = 16 * MIB
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
SERVICES = ("storage", "admin")


class Watch:
    """Peak resident memory of a node's processes above where they started; a process
    past ``kill_above`` bytes of growth is stopped (SIGKILL) and named in ``killed``."""

    def __init__(self, node: Node, kill_above: int) -> None:
        self.processes = {s: psutil.Process(node.processes[s].pid) for s in SERVICES}
        self.base = {s: p.memory_info().rss for s, p in self.processes.items()}
        self.peak = dict(self.base)
        self.killed: list[str] = []
        self._kill_above = kill_above
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for service, process in self.processes.items():
                rss = process.memory_info().rss
                self.peak[service] = max(self.peak[service], rss)
                if rss - self.base[service] > self._kill_above and service not in self.killed:
                    self.killed.append(service)
                    process.send_signal(signal.SIGKILL)

    def growth(self, service: str) -> int:
        return self.peak[service] - self.base[service]


@contextmanager
def watching(node: Node, kill_above: int = 2048 * MIB) -> Iterator[Watch]:
    watch = Watch(node, kill_above)
    watch._thread.start()
    try:
        yield watch
    finally:
        watch._stop.set()
        watch._thread.join()
    assert not watch.killed, f"{watch.killed} went {kill_above / MIB:.0f} MiB past where it was"


def _execute(node: Node, raw: bytes, timeout: float = 120) -> tuple[Any, int]:
    admin = node.admin()
    reply = admin.stub.Execute(
        apb.ExecuteRequest(operation=raw), metadata=admin.metadata, timeout=timeout
    )
    return orjson.loads(reply.result), reply.code


def _refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == EXHAUSTED, info.value
    return info.value


def _worst_request() -> bytes:
    """The most JSON values 16 MiB of Execute can hold: empty records."""
    head = b'{"operation": "insert", "database": "dev", "table": "dog", "records": ['
    count = (MAX_MESSAGE - 1024 - len(head)) // 3
    return head + b",".join([b"{}"] * count) + b"]}"


def test_the_worst_request_is_refused_before_it_is_parsed(make_node: MakeNode) -> None:
    node = make_node(services=SERVICES)
    node.admin().ok({"operation": "create_table", "database": "dev", "table": "dog"})
    raw = _worst_request()
    assert len(raw) > 15 * MIB
    with watching(node) as watch:
        error = _refused(lambda: _execute(node, raw))
    details = str(error.details())
    assert "operationsApi.maxRequestMemory" in details and "send fewer" in details
    assert retry_delay_s(error) is None  # the same request would be refused again
    # Documented bound for a refused request: the copies of its bytes that gRPC and the
    # handler hold (about five), nothing parsed. Storage never saw it.
    assert watch.growth("admin") < 6 * len(raw), watch.growth("admin") / MIB
    assert watch.growth("storage") < 16 * MIB
    # The node goes on serving.
    assert node.admin().ok({"operation": "describe_table", "database": "dev", "table": "dog"})


def test_a_large_request_that_fits_stays_within_its_estimate(make_node: MakeNode) -> None:
    node = make_node(services=SERVICES)
    node.admin().ok({"operation": "create_table", "database": "dev", "table": "dog"})
    records = [{"id": i, "name": f"dog {i}", "age": i % 20} for i in range(90_000)]
    raw = orjson.dumps(
        {"operation": "insert", "database": "dev", "table": "dog", "records": records}
    )
    bound = estimate(raw)
    assert bound < 384 * MIB  # operationsApi.maxRequestMemory
    with watching(node) as watch:
        result, code = _execute(node, raw)
    assert code == 0, result
    assert len(result["inserted_hashes"]) == 90_000
    assert watch.growth("admin") < bound, (watch.growth("admin") / MIB, bound / MIB)
    assert watch.growth("storage") < 256 * MIB


def test_concurrent_large_requests_share_the_process_budget(make_node: MakeNode) -> None:
    node = make_node(
        services=SERVICES,
        config={"operationsApi": {"maxRequestMemory": 96 * MIB, "maxMemory": 96 * MIB}},
    )
    node.admin().ok({"operation": "create_table", "database": "dev", "table": "dog"})

    def request(n: int) -> bytes:
        records = [{"id": n * 100_000 + i, "name": f"dog {i}"} for i in range(60_000)]
        return orjson.dumps(
            {"operation": "insert", "database": "dev", "table": "dog", "records": records}
        )

    raws = [request(n) for n in range(4)]
    assert all(48 * MIB < estimate(raw) <= 96 * MIB for raw in raws)  # one at a time fits
    outcomes: list[Any] = []
    with watching(node) as watch, ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(_execute, node, raw) for raw in raws]:
            try:
                outcomes.append(future.result()[1])
            except grpc.RpcError as refused:
                outcomes.append(refused)
    busy = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert outcomes.count(0) >= 1 and busy, outcomes
    for refusal in busy:
        assert refusal.code() == EXHAUSTED
        assert "operationsApi.maxMemory" in str(refusal.details())
        assert retry_delay_s(refusal) == 1.0
    # maxMemory, plus the bytes of the requests being received or refused.
    assert watch.growth("admin") < 96 * MIB + 4 * 6 * max(map(len, raws))


def test_an_answer_too_large_for_execute_is_refused(make_node: MakeNode) -> None:
    node = make_node(services=SERVICES)
    client = node.client()
    client.create_table("dev", "wide")
    for start in range(0, 100_000, 10_000):
        client.insert(
            "dev", "wide", [{"id": i, "pad": "x" * 180} for i in range(start, start + 10_000)]
        )
    search = {"operation": "search_by_value", "database": "dev", "table": "wide",
              "search_attribute": "id", "search_value": "*"}  # fmt: skip
    with watching(node) as watch:
        result, code = _execute(node, orjson.dumps(search))
    assert code == EXHAUSTED.value[0], result
    assert "an Execute answer carries (storage.maxMessageBytes)" in result["error"]
    assert watch.growth("admin") < 128 * MIB
    # With a limit it fits, and the records come back as stored.
    result, code = _execute(node, orjson.dumps({**search, "limit": 1000}))
    assert code == 0 and len(result) == 1000
    assert result[0] == {"id": 0, "pad": "x" * 180}
