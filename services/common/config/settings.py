"""Settings written once, on the dataclass field: each field of a section names its key,
its default and its bounds in its metadata (``integer("maxRows", 10_000, 1, 1_000_000)``),
and ``read_section`` reads every such field of a section with the one ``Reader``, which
records each problem under its dotted key and the value it got."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ENV_PREFIX = "SHOAL_"
SETTING = "shoal.setting"  # the key of a field's metadata that holds its Setting

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

T = TypeVar("T", bound="DataclassInstance")


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid {source}:\n{lines}")


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string like ``100ms``, ``60s``, ``5m``, ``3d``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError("expected a duration such as 60, '500ms', '60s', '5m' or '3d'")


class Reader:
    """Reads one mapping section, recording problems under dotted key names."""

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        problems: list[str],
        env: Mapping[str, str],
        trace: set[str] | None = None,
    ) -> None:
        self._data = data
        self._path = path
        self.problems = problems
        self.env = env
        self._seen: set[str] = set()
        self.trace = trace
        self._sections: dict[str, Reader] = {}

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def problem(self, name: str, value: object, why: str) -> None:
        self.problems.append(f"{self.key(name)}: {why} (got {value!r})")

    def raw(self, name: str) -> tuple[bool, Any]:
        """(present, value), with the environment override taking precedence."""
        self._seen.add(name)
        if self.trace is not None:
            self.trace.add(self.key(name))
        env_name = ENV_PREFIX + self.key(name).replace(".", "_").upper()
        if env_name in self.env:
            try:
                return True, yaml.safe_load(self.env[env_name])
            except yaml.YAMLError as exc:
                self.problems.append(f"{env_name}: not valid YAML ({exc})")
                return False, None
        if name in self._data:
            return True, self._data[name]
        return False, None

    def string(self, name: str, default: str) -> str:
        present, value = self.raw(name)
        if not present or value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.problem(name, value, "expected a string")
            return default
        return str(value)

    def optional_string(self, name: str) -> str | None:
        present, value = self.raw(name)
        if not present or value is None:
            return None
        if not isinstance(value, str | int):
            self.problem(name, value, "expected a string")
            return None
        return str(value)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        present, value = self.raw(name)
        if not present or value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(name, value, "expected a whole number")
            return default
        if not low <= value <= high:
            self.problem(name, value, f"must be between {low} and {high}")
            return default
        return value

    def optional_integer(self, name: str, low: int, high: int) -> int | None:
        present, value = self.raw(name)
        if not present or value is None:
            return None
        return self.integer(name, low, low, high)

    def port(self, name: str, default: int) -> int:
        return self.integer(name, default, 1, 65535)

    def nullable_port(self, name: str, default: int) -> int | None:
        """A port that is ``default`` when the key is absent and closed (None) when it is
        set to null."""
        present, value = self.raw(name)
        if not present:
            return default
        if value is None:
            return None
        return self.port(name, default)

    def boolean(self, name: str, default: bool) -> bool:
        present, value = self.raw(name)
        if not present or value is None:
            return default
        if not isinstance(value, bool):
            self.problem(name, value, "expected true or false")
            return default
        return value

    def duration(self, name: str, default: float) -> float:
        present, value = self.raw(name)
        if not present or value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.problem(name, value, str(exc))
            return default

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(name, default).lower()
        if value not in choices:
            self.problem(name, value, f"must be one of {', '.join(choices)}")
            return default
        return value

    def optional_path(self, name: str) -> Path | None:
        text = self.optional_string(name)
        return Path(text) if text else None

    def paths(self, name: str) -> tuple[Path, ...]:
        """A path or a list of paths (empty when absent)."""
        present, value = self.raw(name)
        if not present or value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(item, str) and item for item in items):
            self.problem(name, value, "expected a path or a list of paths")
            return ()
        return tuple(Path(item) for item in items)

    def section(self, name: str) -> Reader:
        """The reader of the mapping under ``name`` (the same one each time it is asked)."""
        if name in self._sections:
            return self._sections[name]
        present, value = self.raw(name)
        if present and value is not None and not isinstance(value, Mapping):
            self.problem(name, value, "expected a mapping")
            value = {}
        reader = Reader(value or {}, self.key(name), self.problems, self.env, self.trace)
        self._sections[name] = reader
        return reader

    def item(self, name: str, data: Mapping[str, Any]) -> Reader:
        """The reader of a mapping inside a list (``routes[0]``): its keys have no
        environment overrides and are not traced."""
        return Reader(data, self.key(name), self.problems, {})

    def finish(self) -> None:
        for name in sorted(set(self._data) - self._seen):
            self.problems.append(f"{self.key(str(name))}: unknown key")


# -- settings on fields ----------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """How one field is read: its key (dotted: inside a sub-mapping of the section), the
    reader's method, and its bounds or choices."""

    key: str
    kind: str
    low: int = 0
    high: int = 0
    choices: tuple[str, ...] = ()

    def read(self, section: Reader, default: Any) -> Any:
        *within, name = self.key.split(".")
        reader = section
        for part in within:
            reader = reader.section(part)
        return _READS[self.kind](reader, name, default, self)


_READS: dict[str, Callable[[Reader, str, Any, Setting], Any]] = {
    "string": lambda r, name, default, s: r.string(name, default),
    "optional_string": lambda r, name, default, s: r.optional_string(name),
    "integer": lambda r, name, default, s: r.integer(name, default, s.low, s.high),
    "optional_integer": lambda r, name, default, s: r.optional_integer(name, s.low, s.high),
    "port": lambda r, name, default, s: r.port(name, default),
    "nullable_port": lambda r, name, default, s: r.nullable_port(name, default),
    "boolean": lambda r, name, default, s: r.boolean(name, default),
    "duration": lambda r, name, default, s: r.duration(name, default),
    "choice": lambda r, name, default, s: r.choice(name, default, s.choices),
    "path": lambda r, name, default, s: Path(r.string(name, str(default))),
    "optional_path": lambda r, name, default, s: r.optional_path(name),
    "paths": lambda r, name, default, s: r.paths(name),
}


def _field(default: Any, setting: Setting) -> Any:
    return field(default=default, metadata={SETTING: setting})


def string(key: str, default: str) -> Any:
    return _field(default, Setting(key, "string"))


def optional_string(key: str) -> Any:
    return _field(None, Setting(key, "optional_string"))


def integer(key: str, default: int, low: int, high: int) -> Any:
    return _field(default, Setting(key, "integer", low, high))


def optional_integer(key: str, low: int, high: int) -> Any:
    return _field(None, Setting(key, "optional_integer", low, high))


def port(key: str, default: int) -> Any:
    return _field(default, Setting(key, "port"))


def nullable_port(key: str, default: int) -> Any:
    """A port open by default, closed when set to null."""
    return _field(default, Setting(key, "nullable_port"))


def boolean(key: str, default: bool) -> Any:
    return _field(default, Setting(key, "boolean"))


def duration(key: str, default: float) -> Any:
    """Seconds, written as a number or as ``500ms``, ``60s``, ``5m``, ``3d``."""
    return _field(default, Setting(key, "duration"))


def choice(key: str, default: str, choices: tuple[str, ...]) -> Any:
    return _field(default, Setting(key, "choice", choices=choices))


def path(key: str, default: str) -> Any:
    return _field(Path(default), Setting(key, "path"))


def optional_path(key: str) -> Any:
    return _field(None, Setting(key, "optional_path"))


def paths(key: str) -> Any:
    """A path or a list of paths."""
    return _field((), Setting(key, "paths"))


class Later:
    """A field's value computed in its turn among the settings ``read_section`` reads, so
    that problems stay in the order of the fields."""

    def __init__(self, compute: Callable[[], Any]) -> None:
        self.compute = compute


def read_section(cls: type[T], reader: Reader, **given: Any) -> T:
    """An instance of the dataclass ``cls``: each field with a setting read from ``reader``
    in the order of the fields, unless ``given`` (a value, or ``Later``); the fields with
    neither keep their defaults."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in given:
            value = given[f.name]
            values[f.name] = value.compute() if isinstance(value, Later) else value
        elif SETTING in f.metadata:
            default = None if f.default is MISSING else f.default
            values[f.name] = f.metadata[SETTING].read(reader, default)
    return cls(**values)
