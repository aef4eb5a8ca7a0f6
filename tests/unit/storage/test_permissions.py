"""Role permissions in Harper's format: validation, normalization and the checks."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from services.common.auth import Identity
from services.common.errors import InvalidArgument, PermissionDenied
from services.storage.permissions import (
    SUPER_USER_PERMISSION,
    UserIdentity,
    can,
    parse_permission,
    permission_from_json,
    require,
    require_reads_in,
    require_super_user,
)


def user(permission: dict[str, Any], name: str = "bob") -> UserIdentity:
    parsed = permission_from_json(permission)
    return UserIdentity(name=name, super_user=parsed.super_user, role="r", permission=parsed)


def test_a_valid_permission_is_normalized() -> None:
    parsed = parse_permission(
        orjson.dumps(
            {
                "dev": {
                    "tables": {
                        "dog": {"read": True, "insert": False, "attribute_permissions": []},
                        "cat": {"delete": True},
                    }
                },
                "super_user": False,
                "empty": {"tables": {}},
                "bare": {},
            }
        )
    )
    assert parsed.super_user is False
    assert orjson.loads(parsed.json) == {
        "super_user": False,
        "dev": {
            "tables": {
                "cat": {"read": False, "insert": False, "update": False, "delete": True},
                "dog": {"read": True, "insert": False, "update": False, "delete": False},
            }
        },
        "empty": {"tables": {}},
        "bare": {"tables": {}},
    }
    assert list(orjson.loads(parsed.json)) == sorted(orjson.loads(parsed.json))
    assert dict(parsed.grants) == {
        ("dev", "dog"): frozenset({"read"}),
        ("dev", "cat"): frozenset({"delete"}),
    }
    assert orjson.loads(parse_permission(b"{}").json) == {"super_user": False}
    assert parse_permission(b'{"super_user": true}').super_user is True
    assert parse_permission(b'{"super_user": true}').json == SUPER_USER_PERMISSION.json


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"", "permission is required"),
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'"super_user"', "JSON object"),
        (b'{"super_user": 1}', "'super_user'"),
        (b'{"super_user": null}', "'super_user'"),
        (b'{"dev": true}', "'dev'"),
        (b'{"dev": []}', "'dev'"),
        (b'{"-dev": {}}', "'-dev'"),
        (b'{"cluster_user": 1}', "'cluster_user'"),
        (b'{"structure_user": "dev"}', "'structure_user'"),
        (b'{"structure_user": ["-dev"]}', "'structure_user'"),
        (b'{"dev": {"tables": {}, "x": 1}}', "'dev.x'"),
        (b'{"dev": {"tables": null}}', "'dev.tables'"),
        (b'{"dev": {"tables": {"dog": true}}}', "'dev.tables.dog'"),
        (b'{"dev": {"tables": {"a b": {}}}}', "'dev.tables.a b'"),
        (b'{"dev": {"tables": {"dog": {"write": true}}}}', "'dev.tables.dog.write'"),
        (b'{"dev": {"tables": {"dog": {"read": "true"}}}}', "'dev.tables.dog.read'"),
        (b'{"dev": {"tables": {"dog": {"delete": null}}}}', "'dev.tables.dog.delete'"),
        (
            b'{"dev": {"tables": {"dog": {"attribute_permissions": [{"attribute_name": "a"}]}}}}',
            "'dev.tables.dog.attribute_permissions'",
        ),
        (
            b'{"dev": {"tables": {"dog": {"attribute_permissions": {}}}}}',
            "'dev.tables.dog.attribute_permissions'",
        ),
    ],
)
def test_an_invalid_permission_names_the_bad_key(raw: bytes, words: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_permission(raw)
    assert words in error.value.message


def test_node_identity_and_super_users_may_do_anything() -> None:
    for who in (
        Identity(name="node:a", super_user=True, internal=True),
        user({"super_user": True}, "root"),
    ):
        for action in ("read", "insert", "update", "upsert", "delete"):
            assert can(who, action, "any", "table")
            require(who, action, "any", "table")
        require_super_user(who, "add users")
        require_reads_in(who, "any")


def test_table_permissions() -> None:
    bob = user(
        {
            "dev": {
                "tables": {
                    "dog": {"read": True, "insert": True},
                    "cat": {"insert": True, "update": True, "delete": True},
                }
            },
            "other": {"tables": {"bird": {"update": True}}},
        }
    )
    allowed = {
        (action, table)
        for action in ("read", "insert", "update", "upsert", "delete")
        for table in ("dog", "cat", "ghost")
        if can(bob, action, "dev", table)
    }
    assert allowed == {
        ("read", "dog"),
        ("insert", "dog"),
        ("insert", "cat"),
        ("update", "cat"),
        ("upsert", "cat"),
        ("delete", "cat"),
    }
    assert not can(bob, "read", "other", "dog")
    assert not can(bob, "update", "dev", "bird")
    require(bob, "read", "dev", "dog")
    with pytest.raises(PermissionDenied) as error:
        require(bob, "upsert", "dev", "dog")
    assert error.value.message == (
        "user 'bob' may not upsert into table dev.dog (it needs insert and update)"
    )
    assert error.value.metadata == {
        "user": "bob",
        "action": "upsert",
        "database": "dev",
        "table": "dog",
    }
    with pytest.raises(PermissionDenied, match=r"user 'bob' may not delete from table dev\.dog"):
        require(bob, "delete", "dev", "dog")
    with pytest.raises(PermissionDenied, match=r"user 'bob' may not read table dev\.cat"):
        require(bob, "read", "dev", "cat")
    require_reads_in(bob, "dev")
    with pytest.raises(PermissionDenied, match="may not describe database other"):
        require_reads_in(bob, "other")
    with pytest.raises(PermissionDenied, match=r"user 'bob' may not add users: .*super user"):
        require_super_user(bob, "add users")


def test_an_identity_without_a_role_may_do_nothing() -> None:
    plain = Identity(name="someone")
    assert not can(plain, "read", "dev", "dog")
    with pytest.raises(PermissionDenied):
        require(plain, "read", "dev", "dog")
    with pytest.raises(PermissionDenied):
        require_super_user(plain, "list roles")
