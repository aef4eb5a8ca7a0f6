"""The clone's configuration and what it waits for (services/clone.py): the shard is the
new node's own, and the source's sharded databases are waited for only when both nodes
are of the same shard (the replicator's rule for what flows)."""

from __future__ import annotations

from typing import Any

from services import clone

SOURCE: dict[str, Any] = {
    "rootPath": "/srv/one",
    "replication": {
        "hostname": "one",
        "shard": 1,
        "routes": ["two"],
        "databases": ["*", {"name": "metrics", "sharded": True}, {"name": "app", "replicateTo": 2}],
    },
}


def test_the_shard_is_the_new_nodes_own() -> None:
    config = clone.clone_config(SOURCE, "one", "three")
    assert "shard" not in config["replication"]
    assert config["replication"]["routes"] == ["one"]
    assert config["replication"]["databases"] == SOURCE["replication"]["databases"]
    assert clone.clone_config(SOURCE, "one", "three", 2)["replication"]["shard"] == 2
    assert clone.clone_config(SOURCE, "one", "three", 0)["replication"]["shard"] == 0


def test_sharded_databases_are_waited_for_only_within_the_same_shard() -> None:
    assert clone.sharded(SOURCE) == {"metrics"}
    same = clone.clone_config(SOURCE, "one", "three", 1)
    other = clone.clone_config(SOURCE, "one", "three", 2)
    none = clone.clone_config(SOURCE, "one", "three")
    assert clone.withheld(SOURCE, same) == set()
    assert clone.withheld(SOURCE, other) == {"metrics"}
    assert clone.withheld(SOURCE, none) == {"metrics"}
    unsharded_source = {**SOURCE, "replication": {**SOURCE["replication"], "shard": None}}
    assert clone.withheld(unsharded_source, clone.clone_config(SOURCE, "one", "t")) == {"metrics"}
    assert clone.withheld({"replication": {"databases": "*"}}, none) == {"metrics"}
