"""``replication.databases`` entries (names, '*', ``{name, sharded, replicateTo}``) and
``replication.shard``."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.config import ReplicatedDatabase
from tests.unit.common.test_config import one_problem, parse, problems_of


def databases(value: Any) -> tuple[ReplicatedDatabase, ...] | None:
    return parse({"replication": {"databases": value}}).replication.databases


def test_plain_names_and_star_keep_working() -> None:
    assert databases(["dev", "data"]) == (ReplicatedDatabase("dev"), ReplicatedDatabase("data"))
    assert databases("*") is None
    assert parse({}).replication.database_names is None
    assert parse({"replication": {"databases": ["dev"]}}).replication.database_names == ("dev",)


def test_entries_as_objects() -> None:
    config = parse(
        {
            "replication": {
                "shard": 2,
                "databases": ["dev", {"name": "metrics", "sharded": True}, {"name": "logs"}],
            }
        }
    ).replication
    assert config.databases == (
        ReplicatedDatabase("dev"),
        ReplicatedDatabase("metrics", sharded=True),
        ReplicatedDatabase("logs"),
    )
    assert config.database_names == ("dev", "metrics", "logs")
    assert config.sharded_databases == ("metrics",)
    assert config.shard == 2


def test_star_in_a_list_means_every_database_with_sharded_entries() -> None:
    config = parse(
        {"replication": {"databases": ["*", {"name": "metrics", "sharded": True}]}}
    ).replication
    assert config.database_names is None
    assert config.sharded_databases == ("metrics",)


def test_entries_from_the_environment() -> None:
    env = {"SHOAL_REPLICATION_DATABASES": "[{name: metrics, sharded: true}, dev]"}
    config = parse({}, env=env).replication
    assert config.sharded_databases == ("metrics",)
    assert config.database_names == ("metrics", "dev")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            [{"name": "metrics", "shardd": True}],
            "replication.databases[0].shardd: unknown key",
        ),
        (
            [{"name": "metrics", "sharded": "yes"}],
            "replication.databases[0].sharded: expected true or false (got 'yes')",
        ),
        ([{"sharded": True}], "replication.databases[0].name: a database name is required"),
        (
            ["dev", {"name": "bad name"}],
            "replication.databases[1].name: a database name is required (got 'bad name')",
        ),
        (
            [7],
            "replication.databases[0]: expected a database name or"
            " {name, sharded, replicateTo} (got 7)",
        ),
        (
            [{"name": "*", "sharded": True}],
            "replication.databases[0].sharded: '*' cannot be sharded",
        ),
        (
            [{"name": "system", "sharded": True}],
            "replication.databases[0].sharded: the system database always replicates",
        ),
        (["dev", {"name": "dev", "sharded": True}], "replication.databases: the same database"),
        ({"name": "dev"}, "replication.databases: expected '*' or a list"),
    ],
)
def test_bad_entries_name_the_key(value: Any, expected: str) -> None:
    assert one_problem({"replication": {"databases": value}}).startswith(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (-1, "replication.shard: must be between 0 and 1000000 (got -1)"),
        ("one", "replication.shard: expected a whole number (got 'one')"),
        (True, "replication.shard: expected a whole number (got True)"),
    ],
)
def test_bad_shard(value: Any, expected: str) -> None:
    assert one_problem({"replication": {"shard": value}}) == expected


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({"name": "*", "replicateTo": 2}, "replication.databases[0].replicateTo"),
        ({"name": "system", "replicateTo": 2}, "replication.databases[0].replicateTo"),
        ({"name": "dev", "replicateTo": 0}, "replication.databases[0].replicateTo"),
    ],
)
def test_replicate_to_is_checked_with_the_entry(entry: dict[str, object], key: str) -> None:
    problems = problems_of({"replication": {"databases": [entry]}})
    assert len(problems) == 1 and problems[0].startswith(f"{key}: "), problems


def test_replicate_to_needs_gossip() -> None:
    """Residency needs a full mesh: a relay never passes a record whole to its residents."""
    problem = one_problem(
        {
            "replication": {
                "gossip": False,
                "databases": [{"name": "dev", "replicateTo": 2}, {"name": "ops", "replicateTo": 1}],
            }
        }
    )
    assert problem.startswith("replication.gossip: dev, ops have replicateTo"), problem
    assert "keep replication.gossip true" in problem
    assert parse({"replication": {"databases": [{"name": "dev", "replicateTo": 2}]}})
