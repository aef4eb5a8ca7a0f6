"""Host and process information for the admin service's ``system_information`` operation.

Shaped like Harper's ``system_information``: one JSON-able dict with a section per
attribute (``system``, ``cpu``, ``memory``, ``disk``, ``network``, ``processes``); pass
``attributes`` to compute only some of them. Everything comes from psutil and the standard
library (no parsing of /proc). Sizes are bytes, times seconds (Unix time for points in
time), percentages 0..100.

The calls block (they read the kernel's counters and, for ``disk``, walk the data
directory): an event loop should run them in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from services.common.config import ShoalConfig
from services.common.errors import InvalidArgument
from services.common.metrics import shoal_version

SECTIONS = ("system", "cpu", "memory", "disk", "network", "processes")
SERVICE_MODULES = {
    "services.storage": "storage",
    "services.replicator": "replicator",
    "services.admin": "admin",
}

# psutil measures CPU usage between two calls: keep one Process object per pid so each
# call reports the usage since the previous one (the first reports 0).
_processes: dict[int, psutil.Process] = {}
_processes_lock = threading.Lock()


def system_information(
    attributes: Iterable[str] | None = None,
    *,
    config: ShoalConfig | None = None,
    config_path: Path | str | None = None,
    data_path: Path | str | None = None,
    pids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """The requested sections (all when ``attributes`` is None or empty).

    ``config`` supplies the node's config file (to find its processes), its data
    directory (for ``disk``) and its name; ``config_path`` and ``data_path`` override
    them. ``processes`` lists ``pids`` when given, else every process whose command line
    names the node's config file (``--config``), else nothing.
    Raises ``InvalidArgument`` for an unknown attribute.
    """
    wanted = list(dict.fromkeys(attributes or ()))
    unknown = [a for a in wanted if a not in SECTIONS]
    if unknown:
        raise InvalidArgument(
            f"unknown system_information attribute(s) {', '.join(map(repr, unknown))};"
            f" choose from {', '.join(SECTIONS)}",
            reason="UNKNOWN_ATTRIBUTE",
        )
    if config is not None:
        config_path = config_path or config.source
        data_path = data_path or config.storage_path
    builders: dict[str, Callable[[], Any]] = {
        "system": lambda: system_section(config.node_name if config else None),
        "cpu": cpu_section,
        "memory": memory_section,
        "disk": lambda: disk_section(Path(data_path) if data_path else None),
        "network": network_section,
        "processes": lambda: processes_section(
            Path(config_path) if config_path else None, None if pids is None else list(pids)
        ),
    }
    return {name: builders[name]() for name in (wanted or SECTIONS)}


# -- system ----------------------------------------------------------------------------


def _distribution() -> str:
    try:
        release = platform.freedesktop_os_release()
    except OSError:
        return ""
    return release.get("PRETTY_NAME") or release.get("NAME", "")


def system_section(node_name: str | None = None) -> dict[str, Any]:
    boot = psutil.boot_time()
    return {
        "platform": sys.platform,
        "system": platform.system(),
        "distribution": _distribution(),
        "release": platform.release(),
        "kernel": platform.version(),
        "arch": platform.machine(),
        "hostname": socket.gethostname(),
        "node_name": node_name,
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "shoal_version": shoal_version(),
        "psutil_version": psutil.__version__,
        "boot_time": boot,
        "uptime": max(0.0, time.time() - boot),
        "time": time.time(),
        "timezone": time.strftime("%z"),
        "timezone_name": time.tzname[time.localtime().tm_isdst > 0],
    }


# -- cpu ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    """Best effort: psutil does not report the model name, the platform module may."""
    return platform.processor() or platform.machine()


def cpu_section() -> dict[str, Any]:
    frequency = None
    with contextlib.suppress(OSError, NotImplementedError):
        frequency = psutil.cpu_freq()
    try:
        load = [round(x, 3) for x in psutil.getloadavg()]
    except OSError:
        load = []
    return {
        "cores": psutil.cpu_count(logical=True) or 0,
        "physical_cores": psutil.cpu_count(logical=False),
        "model": _cpu_model(),
        "speed_mhz": frequency.current if frequency else None,
        "load_average": load,
        # Since the previous call in this process (or since psutil was imported).
        "usage_percent": psutil.cpu_percent(interval=None),
        "per_cpu_usage_percent": psutil.cpu_percent(interval=None, percpu=True),
    }


# -- memory ------------------------------------------------------------------------------


def memory_section() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    return {
        "total": memory.total,
        "available": memory.available,
        "used": memory.used,
        "free": memory.free,
        "percent": memory.percent,
        "swap_total": swap.total,
        "swap_used": swap.used,
        "swap_free": swap.free,
        "swap_percent": swap.percent,
    }


# -- disk --------------------------------------------------------------------------------


def directory_size(path: Path) -> int:
    """Bytes of the files under ``path`` (files vanishing meanwhile are skipped)."""
    total = 0
    pending = [str(path)]
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    return total


def _usage(path: str) -> dict[str, Any] | None:
    try:
        usage = psutil.disk_usage(path)
    except OSError:
        return None
    return {"total": usage.total, "used": usage.used, "free": usage.free, "percent": usage.percent}


def disk_section(data_path: Path | None = None) -> dict[str, Any]:
    """The data directory's size and filesystem, disk I/O counters, and the mounted
    filesystems. Without ``data_path`` the ``data`` entry is None."""
    data: dict[str, Any] | None = None
    if data_path is not None:
        data = {
            "path": str(data_path),
            "size": directory_size(data_path),
            "filesystem": _usage(str(data_path)),
        }
    try:
        counters = psutil.disk_io_counters()
    except (OSError, RuntimeError):
        counters = None
    io = None
    if counters is not None:
        io = {
            "read_count": counters.read_count,
            "write_count": counters.write_count,
            "read_bytes": counters.read_bytes,
            "write_bytes": counters.write_bytes,
            "read_time": counters.read_time / 1000,
            "write_time": counters.write_time / 1000,
        }
    filesystems = []
    for partition in psutil.disk_partitions(all=False):
        usage = _usage(partition.mountpoint)
        if usage is not None:
            filesystems.append(
                {
                    "device": partition.device,
                    "mountpoint": partition.mountpoint,
                    "type": partition.fstype,
                    **usage,
                }
            )
    return {"data": data, "io": io, "filesystems": filesystems}


# -- network -----------------------------------------------------------------------------


def _family(family: int) -> str:
    if family == socket.AF_INET:
        return "ipv4"
    if family == socket.AF_INET6:
        return "ipv6"
    if family == psutil.AF_LINK:
        return "mac"
    return str(family)


def _io(counters: Any) -> dict[str, int]:
    return {
        "bytes_sent": counters.bytes_sent,
        "bytes_recv": counters.bytes_recv,
        "packets_sent": counters.packets_sent,
        "packets_recv": counters.packets_recv,
        "errors_in": counters.errin,
        "errors_out": counters.errout,
        "drops_in": counters.dropin,
        "drops_out": counters.dropout,
    }


def network_section() -> dict[str, Any]:
    addresses = psutil.net_if_addrs()
    stats = psutil.net_if_stats()
    per_nic = psutil.net_io_counters(pernic=True)
    interfaces = []
    for name in sorted(set(addresses) | set(stats)):
        stat = stats.get(name)
        counters = per_nic.get(name)
        interfaces.append(
            {
                "name": name,
                "is_up": stat.isup if stat else None,
                "speed_mbps": stat.speed if stat else None,
                "mtu": stat.mtu if stat else None,
                "addresses": [
                    {
                        "family": _family(a.family),
                        "address": a.address,
                        "netmask": a.netmask,
                        "broadcast": a.broadcast,
                    }
                    for a in addresses.get(name, [])
                ],
                "io": _io(counters) if counters else None,
            }
        )
    total = psutil.net_io_counters()
    return {"interfaces": interfaces, "io": _io(total) if total else None}


# -- processes ---------------------------------------------------------------------------


def _config_argument(cmdline: list[str]) -> str | None:
    for i, arg in enumerate(cmdline):
        if arg == "--config" and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _service_of(cmdline: list[str]) -> str:
    for i, arg in enumerate(cmdline[:-1]):
        if arg == "-m":
            return SERVICE_MODULES.get(cmdline[i + 1], cmdline[i + 1])
    return Path(cmdline[0]).name if cmdline else ""


def find_processes(config_path: Path) -> list[int]:
    """Pids of the processes started with ``--config`` naming ``config_path``."""
    target = config_path.resolve()
    found: list[int] = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        argument = _config_argument(cmdline)
        if argument is None or Path(argument).name != target.name:
            continue
        path = Path(argument)
        try:
            if not path.is_absolute():
                path = Path(process.cwd()) / path
        except (psutil.Error, OSError):
            continue
        if path.resolve() == target:
            found.append(process.pid)
    return sorted(found)


def _process(pid: int) -> psutil.Process:
    with _processes_lock:
        process = _processes.get(pid)
        if process is None or not process.is_running():
            process = _processes[pid] = psutil.Process(pid)
        for gone in [p for p, proc in _processes.items() if not proc.is_running()]:
            del _processes[gone]
        return process


def process_info(pid: int) -> dict[str, Any] | None:
    """One process (None when it does not exist or cannot be read)."""
    try:
        process = _process(pid)
        with process.oneshot():
            cmdline = process.cmdline()
            memory = process.memory_info()
            return {
                "pid": pid,
                "service": _service_of(cmdline),
                "name": process.name(),
                "status": process.status(),
                "started": process.create_time(),
                "cpu_percent": process.cpu_percent(interval=None),
                "rss": memory.rss,
                "vms": memory.vms,
                "memory_percent": round(process.memory_percent(), 3),
                "threads": process.num_threads(),
            }
    except psutil.Error:
        return None


def processes_section(
    config_path: Path | None = None, pids: list[int] | None = None
) -> list[dict[str, Any]]:
    if pids is None:
        pids = find_processes(config_path) if config_path is not None else []
    return [info for info in map(process_info, pids) if info is not None]
