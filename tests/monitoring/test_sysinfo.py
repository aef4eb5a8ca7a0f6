"""system_information(): every section, sane values, attribute selection, and a real
node's processes found by its config path."""

from __future__ import annotations

import json
import os
import platform
import socket
from pathlib import Path

import pytest

from services.common.config import load_config
from services.common.errors import InvalidArgument
from services.common.sysinfo import SECTIONS, directory_size, system_information
from tests.conftest import MakeNode


def test_every_section_is_present_and_json_able(tmp_path: Path) -> None:
    info = system_information(data_path=tmp_path, pids=[os.getpid()])
    assert list(info) == list(SECTIONS)
    assert json.loads(json.dumps(info)) == info


def test_attributes_select_sections_in_the_order_asked() -> None:
    info = system_information(["memory", "cpu", "memory"])
    assert list(info) == ["memory", "cpu"]
    assert list(system_information([])) == list(SECTIONS)


def test_an_unknown_attribute_is_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        system_information(["cpu", "table_size"])
    assert "'table_size'" in err.value.message
    assert "processes" in err.value.message


def test_system_section() -> None:
    system = system_information(["system"])["system"]
    assert system["hostname"] == socket.gethostname()
    assert system["python_version"] == platform.python_version()
    assert system["platform"] and system["arch"]
    assert system["uptime"] > 0
    assert system["boot_time"] < system["time"]


def test_cpu_and_memory_sections() -> None:
    info = system_information(["cpu", "memory"])
    cpu, memory = info["cpu"], info["memory"]
    assert cpu["cores"] >= 1
    assert 0 <= cpu["usage_percent"] <= 100
    assert len(cpu["per_cpu_usage_percent"]) == cpu["cores"]
    assert len(cpu["load_average"]) == 3 and all(x >= 0 for x in cpu["load_average"])
    assert memory["total"] > 0
    assert 0 < memory["available"] <= memory["total"]
    assert 0 <= memory["used"] <= memory["total"]
    assert 0 <= memory["percent"] <= 100
    assert memory["swap_used"] <= memory["swap_total"] or memory["swap_total"] == 0


def test_disk_section_measures_the_data_directory(tmp_path: Path) -> None:
    (tmp_path / "nested").mkdir()
    (tmp_path / "a.sst").write_bytes(b"x" * 1000)
    (tmp_path / "nested" / "b.log").write_bytes(b"y" * 2345)
    assert directory_size(tmp_path) == 3345
    disk = system_information(["disk"], data_path=tmp_path)["disk"]
    assert disk["data"]["path"] == str(tmp_path)
    assert disk["data"]["size"] == 3345
    filesystem = disk["data"]["filesystem"]
    assert filesystem["total"] >= filesystem["used"] > 0
    assert filesystem["total"] >= filesystem["free"] > 0
    assert all(fs["mountpoint"] and fs["total"] >= 0 for fs in disk["filesystems"])
    if disk["io"] is not None:
        assert disk["io"]["read_bytes"] >= 0 and disk["io"]["write_bytes"] >= 0
    assert system_information(["disk"])["disk"]["data"] is None


def test_network_section_lists_interfaces_and_counters() -> None:
    network = system_information(["network"])["network"]
    addresses = {a["address"] for i in network["interfaces"] for a in i["addresses"]}
    assert "127.0.0.1" in addresses
    names = [i["name"] for i in network["interfaces"]]
    assert names == sorted(names)
    assert network["io"]["bytes_recv"] >= 0 and network["io"]["bytes_sent"] >= 0


def test_processes_by_pid() -> None:
    [me] = system_information(["processes"], pids=[os.getpid()])["processes"]
    assert me["pid"] == os.getpid()
    assert me["rss"] > 0 and me["threads"] >= 1
    assert me["cpu_percent"] >= 0
    assert system_information(["processes"], pids=[2**22 + 12345])["processes"] == []
    assert system_information(["processes"])["processes"] == []


def test_a_nodes_processes_are_found_by_its_config_path(make_node: MakeNode) -> None:
    node = make_node()
    config = load_config(node.config_path)
    info = system_information(["system", "disk", "processes"], config=config)
    [storage] = info["processes"]
    assert storage["pid"] == node.processes["storage"].pid
    assert storage["service"] == "storage"
    assert storage["rss"] > 0
    assert info["system"]["node_name"] == node.name
    assert info["disk"]["data"]["path"] == str(config.storage_path)
    assert info["disk"]["data"]["size"] > 0
    # A second reading reports the CPU used since the first.
    [again] = system_information(["processes"], config_path=node.config_path)["processes"]
    assert again["pid"] == storage["pid"] and again["cpu_percent"] >= 0
