"""The command-line entry shared by every service: `python -m services.<name> --config F`.

Loads and validates the config (exit 2 with every problem listed), sets up logging, runs
the service's event loop, and turns a ShoalError that stops the service (a taken port,
data owned by another node) into one line on stderr and exit 1. A service that was asked
to restart (``services.common.lifecycle``) starts anew in place once it has stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from services.common.config import ConfigError, ShoalConfig, load_config
from services.common.errors import ShoalError
from services.common.lifecycle import exec_self
from services.common.logs import setup_logging


def service_main(
    name: str,
    description: str | None,
    run: Callable[[ShoalConfig], Coroutine[Any, Any, bool]],
    argv: list[str] | None = None,
) -> int:
    """Run one service until it is signalled to stop; returns the exit code."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}", description=description)
    parser.add_argument("--config", required=True, help="path to shoal.yaml")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    setup_logging(name, config.logging.level, config.logging.format)
    try:
        restart = asyncio.run(run(config))
    except ShoalError as exc:
        print(f"{name}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        logging.shutdown()
    if restart:
        exec_self()
    return 0
