"""The building blocks in-process: per-RPC statistics, collectors and the metrics config."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.common import config as cfg
from services.common.config import ConfigError, MetricsConfig, parse_config
from services.common.metrics import (
    DURATION_BUCKETS,
    LoopCollector,
    RpcMetrics,
    new_registry,
)

NO_ENV: dict[str, str] = {}


def parse(data: dict[str, Any], env: dict[str, str] | None = None) -> cfg.ShoalConfig:
    base: dict[str, Any] = {"replication": {"hostname": "node-a"}}
    return parse_config({**base, **data}, env=env or NO_ENV, base_dir=Path("/tmp"))


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse(data)
    return err.value.problems


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def generate_latest_of(rpc: RpcMetrics) -> str:
    registry = new_registry("test")
    registry.register(rpc)
    return generate_latest(registry).decode()


# -- per-RPC statistics --------------------------------------------------------------------


def test_durations_land_in_cumulative_buckets_per_status() -> None:
    rpc = RpcMetrics()
    stats = rpc.method("/pkg.Service/Method")
    assert rpc.method("/pkg.Service/Method") is stats
    stats.started += 4
    stats.finish(grpc.StatusCode.OK, DURATION_BUCKETS[0])  # on a bound: that bucket (le)
    stats.finish(grpc.StatusCode.OK, 0.003)
    stats.finish(grpc.StatusCode.NOT_FOUND, 0.02)
    stats.finish(grpc.StatusCode.NOT_FOUND, 10_000.0)  # beyond the last bound: +Inf only
    values = samples(generate_latest_of(rpc))

    def bucket(status: str, le: str) -> float:
        labels = {"grpc_method": "pkg.Service/Method", "grpc_status": status, "le": le}
        return values[("grpc_server_call_duration_seconds_bucket", frozenset(labels.items()))]

    def series(name: str, status: str) -> float:
        labels = {"grpc_method": "pkg.Service/Method", "grpc_status": status}
        return values[(name, frozenset(labels.items()))]

    started = frozenset({("grpc_method", "pkg.Service/Method")})
    assert values[("grpc_server_call_started_total", started)] == 4
    assert bucket("OK", "0.0001") == 1
    assert bucket("OK", "0.001") == 1
    assert bucket("OK", "0.005") == 2
    assert bucket("OK", "+Inf") == 2
    assert bucket("NOT_FOUND", "0.01") == 0
    assert bucket("NOT_FOUND", "0.025") == 1
    assert bucket("NOT_FOUND", "100.0") == 1
    assert bucket("NOT_FOUND", "+Inf") == 2
    assert series("grpc_server_call_duration_seconds_count", "NOT_FOUND") == 2
    assert series("grpc_server_call_duration_seconds_sum", "NOT_FOUND") == pytest.approx(10_000.02)
    assert not [name for name, _ in values if name.endswith("_created")]


def test_a_method_with_no_finished_call_has_no_histogram() -> None:
    rpc = RpcMetrics()
    rpc.method("/pkg.Service/Stream").started += 1
    values = samples(generate_latest_of(rpc))
    assert (
        values[
            ("grpc_server_call_started_total", frozenset({("grpc_method", "pkg.Service/Stream")}))
        ]
        == 1
    )
    assert not [name for name, _ in values if name.startswith("grpc_server_call_duration")]


def test_build_info_names_version_and_service() -> None:
    values = samples(generate_latest(new_registry("storage")).decode())
    info = [labels for name, labels in values if name == "shoal_build_info"]
    assert len(info) == 1
    assert dict(info[0])["service"] == "storage"
    assert dict(info[0])["version"]


async def test_loop_collector_reads_on_the_loop_from_another_thread() -> None:
    loop = asyncio.get_running_loop()
    seen: list[asyncio.AbstractEventLoop] = []

    def source() -> list[Any]:
        seen.append(asyncio.get_running_loop())
        return list(RpcMetrics().collect())

    collector = LoopCollector(loop, [source], timeout_s=5)
    families = await asyncio.to_thread(collector.collect)
    assert seen == [loop]
    assert {f.name for f in families} == {
        "grpc_server_call_started",
        "grpc_server_call_duration_seconds",
    }


# -- configuration ---------------------------------------------------------------------------


def test_metrics_defaults() -> None:
    config = parse({})
    assert config.metrics == MetricsConfig(True, 9941, 9942, 9943)
    assert [config.metrics.port(s) for s in ("storage", "replicator", "admin")] == [
        9941,
        9942,
        9943,
    ]


def test_metrics_keys_and_environment() -> None:
    config = parse(
        {"metrics": {"storagePort": 9001, "replicatorPort": 9002, "adminPort": 9003}},
        env={"SHOAL_METRICS_ENABLED": "false"},
    )
    assert config.metrics == MetricsConfig(False, 9001, 9002, 9003)


def test_metrics_ports_must_differ_from_each_other_and_from_grpc_ports() -> None:
    assert problems_of({"metrics": {"storagePort": 9926}}) == [
        "metrics.storagePort: port 9926 is already used by storage.port"
    ]
    assert problems_of({"metrics": {"adminPort": 9942}}) == [
        "metrics.adminPort: port 9942 is already used by metrics.replicatorPort"
    ]
    assert problems_of({"metrics": {"replicatorPort": 9933}}) == [
        "metrics.replicatorPort: port 9933 is already used by replication.securePort"
    ]
    assert problems_of({"metrics": {"adminPort": 0, "bogus": 1}}) == [
        "metrics.adminPort: must be between 1 and 65535 (got 0)",
        "metrics.bogus: unknown key",
    ]


def test_disabled_metrics_claim_no_port() -> None:
    config = parse({"metrics": {"enabled": False, "storagePort": 9926}})
    assert config.metrics.enabled is False
