"""system_information through Execute in Harper's form: every Harper section, in Harper's
order, with Harper's keys and types; the `attributes` filter (`time` alone works, Harper's
`database_metrics` names `metrics`); Shoal's own keys after Harper's."""

from __future__ import annotations

import re
import time

from tests.conftest import MakeNode

HARPER_SECTIONS = [
    "system",
    "time",
    "cpu",
    "memory",
    "disk",
    "network",
    "harperdb_processes",
    "table_size",
    "metrics",
    "threads",
    "replication",
]
INVALID_ARGUMENT = 3


def test_system_information_answers_every_harper_section(make_node: MakeNode) -> None:
    node = make_node(services=("storage", "replicator", "admin"))
    admin = node.admin()
    admin.ok({"operation": "create_table", "database": "dev", "table": "cat"})
    admin.ok({"operation": "insert", "database": "dev", "table": "cat", "records": [{"id": 1}]})

    everything = admin.ok({"operation": "system_information"})
    assert list(everything) == HARPER_SECTIONS

    # time: systeminformation's time(), alone (it failed the whole operation before).
    only_time = admin.ok({"operation": "system_information", "attributes": ["time"]})
    assert list(only_time) == ["time"]
    now = only_time["time"]
    assert set(now) == {"current", "uptime", "timezone", "timezoneName"}
    assert isinstance(now["current"], int) and abs(now["current"] - time.time() * 1000) < 60_000
    assert now["uptime"] > 0 and re.fullmatch(r"GMT([+-]\d{4})?", now["timezone"])

    system = everything["system"]
    for key in ("platform", "distro", "release", "codename", "kernel", "arch", "hostname"):
        assert isinstance(system[key], str), key
    cpu = everything["cpu"]
    assert isinstance(cpu["brand"], str) and cpu["cores"] >= 1
    assert {"min", "max", "avg", "cores"} <= set(cpu["cpu_speed"])
    load = cpu["current_load"]
    assert isinstance(load["currentLoad"], float) and isinstance(load["avgLoad"], float)
    assert len(load["cpus"]) == cpu["cores"] and "load" in load["cpus"][0]
    memory = everything["memory"]
    for key in ("total", "free", "used", "active", "available", "swaptotal", "swapused"):
        assert isinstance(memory[key], int), key
    assert memory["rss"] > 0
    disk = everything["disk"]
    assert {"io", "read_write", "size"} <= set(disk)
    assert all(
        {"fs", "type", "size", "used", "available", "use", "mount"} <= set(f) for f in disk["size"]
    )
    network = everything["network"]
    assert {"default_interface", "latency", "interfaces", "stats", "connections"} <= set(network)
    loopback = [i for i in network["interfaces"] if i["ip4"] == "127.0.0.1"]
    assert loopback and loopback[0]["iface"] == loopback[0]["name"]
    assert all({"iface", "rx_bytes", "tx_bytes"} <= set(s) for s in network["stats"])

    processes = everything["harperdb_processes"]
    assert set(processes) == {"core", "clustering"}
    core = {p["pid"] for p in processes["core"]}
    assert {node.processes["storage"].pid, node.processes["admin"].pid} <= core
    [replicator] = processes["clustering"]
    assert replicator["pid"] == node.processes["replicator"].pid
    kinds = {"pid": int, "parentPid": int, "name": str, "cpu": float, "mem": float}
    kinds |= {"memRss": int, "started": str, "command": str}
    for key, kind in kinds.items():
        assert isinstance(replicator[key], kind), key

    assert {
        "schema": "dev",
        "table": "cat",
        "record_count": 1,
        "database": "dev",
    } in everything["table_size"]
    assert everything["metrics"]["dev"]["tables"]["cat"]["entryCount"] == 1
    threads = everything["threads"]
    assert {t["name"] for t in threads} == {"storage", "replicator", "admin"}
    assert all(isinstance(t["threadId"], int) for t in threads)
    assert everything["replication"]["node_name"] == node.name

    # The filter: in the order asked, Harper's alias of metrics, Shoal's own processes.
    some = admin.ok(
        {"operation": "system_information", "attributes": ["threads", "database_metrics", "cpu"]}
    )
    assert list(some) == ["threads", "metrics", "cpu"]
    shoal = admin.ok({"operation": "system_information", "attributes": ["processes"]})
    assert {p["service"] for p in shoal["processes"]} == {"storage", "replicator", "admin"}
    _, code = admin.execute({"operation": "system_information", "attributes": ["gpu"]})
    assert code == INVALID_ARGUMENT
