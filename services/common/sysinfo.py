"""Host and process information for the admin service's ``system_information`` operation.

Harper's ``system_information``: one JSON-able dict with a section per attribute
(``system``, ``time``, ``cpu``, ``memory``, ``disk``, ``network``, ``harperdb_processes``;
the admin service adds the node's own), each with Harper's keys (those of the
``systeminformation`` package Harper reads) and then Shoal's; ``processes`` is Shoal's
list of the node's processes, given when asked for. Pass ``attributes`` to compute only
some of them. Everything comes from psutil and the standard library (no parsing of
/proc). Shoal's sizes are bytes, times seconds (Unix time for points in time),
percentages 0..100; Harper's keys keep Harper's units (``time.current`` in milliseconds,
CPU speeds in GHz, ``memRss`` in KiB).

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

# Harper's sections, in Harper's order (the default), then Shoal's own (given when asked).
SECTIONS = ("system", "time", "cpu", "memory", "disk", "network", "harperdb_processes")
SHOAL_SECTIONS = ("processes",)
# harperdb_processes: Harper's `clustering` processes are Shoal's replicators.
CLUSTERING_SERVICES = frozenset({"replicator"})
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
    unknown = [a for a in wanted if a not in SECTIONS + SHOAL_SECTIONS]
    if unknown:
        raise InvalidArgument(
            f"unknown system_information attribute(s) {', '.join(map(repr, unknown))};"
            f" choose from {', '.join(SECTIONS + SHOAL_SECTIONS)}",
            reason="UNKNOWN_ATTRIBUTE",
        )
    if config is not None:
        config_path = config_path or config.source
        data_path = data_path or config.storage_path

    def processes() -> list[dict[str, Any]]:
        return processes_section(
            Path(config_path) if config_path else None, None if pids is None else list(pids)
        )

    builders: dict[str, Callable[[], Any]] = {
        "system": lambda: system_section(config.node_name if config else None),
        "time": time_section,
        "cpu": cpu_section,
        "memory": memory_section,
        "disk": lambda: disk_section(Path(data_path) if data_path else None),
        "network": network_section,
        "harperdb_processes": lambda: harperdb_processes_section(processes()),
        "processes": processes,
    }
    return {name: builders[name]() for name in (wanted or SECTIONS)}


# -- system ----------------------------------------------------------------------------


def _os_release() -> dict[str, str]:
    try:
        return platform.freedesktop_os_release()
    except OSError:
        return {}


def system_section(node_name: str | None = None) -> dict[str, Any]:
    boot = psutil.boot_time()
    release = _os_release()
    return {
        # Harper's (systeminformation's osInfo).
        "distro": release.get("NAME", ""),
        "codename": release.get("VERSION_CODENAME", ""),
        "fqdn": socket.getfqdn(),
        # Shoal's.
        "platform": sys.platform,
        "system": platform.system(),
        "distribution": release.get("PRETTY_NAME") or release.get("NAME", ""),
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


# -- time --------------------------------------------------------------------------------


def _utc_offset() -> str:
    """``GMT+0100``, as Harper shows the timezone."""
    offset = time.strftime("%z")
    return f"GMT{offset}" if offset else "GMT"


def time_section() -> dict[str, Any]:
    """Harper's ``time`` (systeminformation's ``time()``): the time in Unix
    milliseconds, the machine's uptime in seconds, the timezone and its name."""
    return {
        "current": time.time_ns() // 1_000_000,
        "uptime": max(0.0, time.time() - psutil.boot_time()),
        "timezone": _utc_offset(),
        "timezoneName": time.tzname[time.localtime().tm_isdst > 0],
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
    usage = psutil.cpu_percent(interval=None)
    per_cpu = psutil.cpu_percent(interval=None, percpu=True)
    times = psutil.cpu_times_percent(interval=None)
    ghz = round(frequency.current / 1000, 2) if frequency else None
    per_core_ghz: list[float] = []
    with contextlib.suppress(OSError, NotImplementedError):
        per_core_ghz = [round(f.current / 1000, 2) for f in psutil.cpu_freq(percpu=True)]
    return {
        # Harper's (systeminformation's cpu, cpuCurrentSpeed and currentLoad).
        "manufacturer": "",
        "brand": _cpu_model(),
        "speed": ghz,
        "physicalCores": psutil.cpu_count(logical=False),
        "processors": 1,
        "cpu_speed": {
            "min": min(per_core_ghz, default=ghz),
            "max": max(per_core_ghz, default=ghz),
            "avg": round(sum(per_core_ghz) / len(per_core_ghz), 2) if per_core_ghz else ghz,
            "cores": per_core_ghz,
        },
        "current_load": {
            "avgLoad": load[0] if load else 0.0,
            "currentLoad": usage,
            "currentLoadUser": getattr(times, "user", 0.0),
            "currentLoadSystem": getattr(times, "system", 0.0),
            "currentLoadNice": getattr(times, "nice", 0.0),
            "currentLoadIdle": getattr(times, "idle", 0.0),
            "currentLoadIrq": getattr(times, "irq", 0.0),
            "cpus": [{"load": p} for p in per_cpu],
        },
        # Shoal's.
        "cores": psutil.cpu_count(logical=True) or 0,
        "physical_cores": psutil.cpu_count(logical=False),
        "model": _cpu_model(),
        "speed_mhz": frequency.current if frequency else None,
        "load_average": load,
        # Since the previous call in this process (or since psutil was imported).
        "usage_percent": usage,
        "per_cpu_usage_percent": per_cpu,
    }


# -- memory ------------------------------------------------------------------------------


def memory_section() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    own = psutil.Process().memory_info()
    return {
        # Harper's (systeminformation's mem, and the answering process's memory).
        "active": getattr(memory, "active", memory.used),
        "swaptotal": swap.total,
        "swapused": swap.used,
        "swapfree": swap.free,
        "rss": own.rss,
        # Shoal's.
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
    sizes = []
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
            sizes.append(
                {
                    "fs": partition.device,
                    "type": partition.fstype,
                    "size": usage["total"],
                    "used": usage["used"],
                    "available": usage["free"],
                    "use": usage["percent"],
                    "mount": partition.mountpoint,
                    "rw": "rw" in partition.opts.split(","),
                }
            )
    if io is not None and counters is not None:
        # Harper's names of the same counters (systeminformation's disksIO).
        io = {
            "rIO": counters.read_count,
            "wIO": counters.write_count,
            "tIO": counters.read_count + counters.write_count,
            **io,
        }
    read_write = None
    if counters is not None:
        read_write = {
            "rx": counters.read_bytes,
            "wx": counters.write_bytes,
            "tx": counters.read_bytes + counters.write_bytes,
        }
    return {
        # Harper's (io above, fsStats, fsSize).
        "io": io,
        "read_write": read_write,
        "size": sizes,
        # Shoal's.
        "data": data,
        "filesystems": filesystems,
    }


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
        found = addresses.get(name, [])
        ip4 = [a for a in found if a.family == socket.AF_INET]
        ip6 = [a for a in found if a.family == socket.AF_INET6]
        mac = [a for a in found if a.family == psutil.AF_LINK]
        interfaces.append(
            {
                # Harper's (systeminformation's networkInterfaces).
                "iface": name,
                "ip4": ip4[0].address if ip4 else "",
                "ip4subnet": (ip4[0].netmask or "") if ip4 else "",
                "ip6": ip6[0].address.split("%")[0] if ip6 else "",
                "ip6subnet": (ip6[0].netmask or "") if ip6 else "",
                "mac": mac[0].address if mac else "",
                "operstate": ("up" if stat.isup else "down") if stat else "unknown",
                "speed": stat.speed if stat else None,
                # Shoal's.
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
    up = [
        name
        for name in sorted(set(addresses) | set(stats))
        if stats.get(name) is not None and stats[name].isup and not name.startswith("lo")
    ]
    stats_list = [
        {
            "iface": name,
            "operstate": "up" if stats.get(name) and stats[name].isup else "down",
            "rx_bytes": c.bytes_recv,
            "rx_dropped": c.dropin,
            "rx_errors": c.errin,
            "tx_bytes": c.bytes_sent,
            "tx_dropped": c.dropout,
            "tx_errors": c.errout,
        }
        for name, c in sorted(per_nic.items())
    ]
    return {
        # Harper's (systeminformation's networkInterfaceDefault and networkStats; the
        # interfaces carry its keys too). No latency check is made: it would reach out
        # to a site on the internet.
        "default_interface": up[0] if up else None,
        "latency": {},
        "interfaces": interfaces,
        "stats": stats_list,
        "connections": [],
        # Shoal's.
        "io": _io(total) if total else None,
    }


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
            started = process.create_time()
            return {
                # Harper's (systeminformation's processes).
                "parentPid": process.ppid(),
                "cpu": process.cpu_percent(interval=None),
                "mem": round(process.memory_percent(), 3),
                "memRss": memory.rss // 1024,
                "memVsz": memory.vms // 1024,
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                "state": process.status(),
                "command": cmdline[0] if cmdline else "",
                "params": " ".join(cmdline[1:]),
                # Shoal's.
                "pid": pid,
                "service": _service_of(cmdline),
                "name": process.name(),
                "status": process.status(),
                "started_at": started,
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


def harperdb_processes_section(processes: list[dict[str, Any]]) -> dict[str, Any]:
    """Harper's ``harperdb_processes``: ``core`` (storage and admin) and ``clustering``
    (the replicator)."""
    return {
        "core": [p for p in processes if p["service"] not in CLUSTERING_SERVICES],
        "clustering": [p for p in processes if p["service"] in CLUSTERING_SERVICES],
    }
