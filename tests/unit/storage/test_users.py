"""The user store's sign-in: lockout, shared verifications and cache invalidation, on a
real RocksDB in a temporary folder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.auth import acting_for_metadata, basic_metadata
from services.common.errors import FailedPrecondition, ResourceExhausted, Unauthenticated
from services.common.sources import forwarded_for_metadata
from services.storage.db import Store
from services.storage.permissions import UserIdentity
from services.storage.throttle import ThrottleSettings
from services.storage.users import UserStore

FAILED = "Login failed"
THROTTLED = "throttled"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "db", sync_writes=False)
    try:
        yield store
    finally:
        store.close()


def users(store: Store, tmp_path: Path, attempts: int = 5, duration: float = 300.0) -> UserStore:
    settings = ThrottleSettings(
        attempts=attempts, initial_backoff_s=duration, max_backoff_s=duration
    )
    result = UserStore(store, "node-a", "secret", settings)
    result.bootstrap("admin", "admin-password", tmp_path)
    return result


async def sign_in(
    users: UserStore, name: str, password: str, source: str = ""
) -> UserIdentity | str:
    metadata = basic_metadata(name, password)
    if source:
        metadata += forwarded_for_metadata("secret", source)
    try:
        who = await users.authenticate(metadata)
    except Unauthenticated as exc:
        return exc.message
    except ResourceExhausted as exc:
        assert exc.retry_after_s is not None and exc.retry_after_s > 0
        return THROTTLED
    assert isinstance(who, UserIdentity)
    return who


async def test_concurrent_sign_ins_with_the_same_credentials_share_one_check(
    store: Store, tmp_path: Path
) -> None:
    # With a lockout after one failure, concurrent first sign-ins must not count as guesses.
    user_store = users(store, tmp_path, attempts=1)
    results = await asyncio.gather(
        *(sign_in(user_store, "admin", "admin-password") for _ in range(8))
    )
    assert all(isinstance(r, UserIdentity) and r.super_user for r in results)
    assert len({id(r) for r in results}) == 1


async def test_concurrent_guesses_cannot_pass_the_lockout(store: Store, tmp_path: Path) -> None:
    user_store = users(store, tmp_path, attempts=3)
    guesses = [f"guess-{i}" for i in range(10)] + ["admin-password"]
    results = await asyncio.gather(*(sign_in(user_store, "admin", g) for g in guesses))
    # Only the first three guesses were checked: the right password, sent along with them,
    # was refused unchecked like the rest, and the name is now throttled from here.
    assert results == [FAILED] * 3 + [THROTTLED] * 8
    assert await sign_in(user_store, "admin", "admin-password") == THROTTLED
    # From another address, the right password works.
    who = await sign_in(user_store, "admin", "admin-password", source="10.9.8.7")
    assert isinstance(who, UserIdentity)


async def test_lock_expires_and_unknown_names_lock_alike(store: Store, tmp_path: Path) -> None:
    user_store = users(store, tmp_path, attempts=2, duration=2.0)
    for name in ("admin", "mallory"):
        results = [await sign_in(user_store, name, "wrong") for _ in range(3)]
        assert results == [FAILED, FAILED, THROTTLED]
    assert await sign_in(user_store, "admin", "admin-password") == THROTTLED
    deadline = asyncio.get_running_loop().time() + 10
    while isinstance(await sign_in(user_store, "admin", "admin-password"), str):
        assert asyncio.get_running_loop().time() < deadline, "the lock never expired"
        await asyncio.sleep(0.05)


async def test_a_forged_forwarded_address_is_refused(store: Store, tmp_path: Path) -> None:
    user_store = users(store, tmp_path)
    forged = (*basic_metadata("admin", "admin-password"), ("shoal-forwarded-for", "10.0.0.1 00"))
    with pytest.raises(Unauthenticated, match="shoal-forwarded-for is only for this node"):
        await user_store.authenticate(forged)


async def test_changes_forget_cached_sign_ins(store: Store, tmp_path: Path) -> None:
    user_store = users(store, tmp_path)
    user_store.add_role("reader", b'{"dev": {"tables": {"dog": {"read": true}}}}')
    await user_store.add_user("bob", "pw", "reader", True)
    first = await sign_in(user_store, "bob", "pw")
    assert isinstance(first, UserIdentity)
    assert first.permission.allows("read", "dev", "dog")
    assert await sign_in(user_store, "bob", "pw") is first  # cached
    user_store.alter_role("reader", b'{"dev": {"tables": {"cat": {"read": true}}}}')
    second = await sign_in(user_store, "bob", "pw")
    assert isinstance(second, UserIdentity)
    assert not second.permission.allows("read", "dev", "dog")
    assert second.permission.allows("read", "dev", "cat")
    await user_store.alter_user("bob", "new", None, None)
    assert await sign_in(user_store, "bob", "pw") == FAILED
    assert isinstance(await sign_in(user_store, "bob", "new"), UserIdentity)
    user_store.drop_user("bob")
    assert await sign_in(user_store, "bob", "new") == FAILED
    with pytest.raises(FailedPrecondition, match="without an active super user"):
        user_store.drop_user("admin")
    # Roles are read back from disk by a new store.
    assert [name for name, _ in UserStore(store, "node-a", "secret").roles()] == [
        "cluster_user",
        "reader",
        "super_user",
    ]


async def test_a_certificate_user_and_the_node_acting_for_a_user(
    store: Store, tmp_path: Path
) -> None:
    store_users = users(store, tmp_path)
    await store_users.add_user("ann", "pw-ann", "super_user", True)
    await store_users.add_user("bob", "pw-bob", "super_user", False)

    who = await store_users.authenticate((), certificate_user="ann")
    assert isinstance(who, UserIdentity) and who.name == "ann" and who.super_user
    # The header wins over the certificate, and is checked as always.
    who = await store_users.authenticate(basic_metadata("admin", "admin-password"), "ann")
    assert who.name == "admin"
    with pytest.raises(Unauthenticated, match="Login failed"):
        await store_users.authenticate(basic_metadata("ann", "wrong"), "ann")
    with pytest.raises(Unauthenticated, match="no user 'nobody'"):
        await store_users.authenticate((), certificate_user="nobody")
    with pytest.raises(Unauthenticated, match=r"'bob' .* is not active"):
        await store_users.authenticate((), certificate_user="bob")

    # The node secret may act for a user (named percent-encoded); nobody else may.
    who = await store_users.authenticate(acting_for_metadata("secret", "ann"))
    assert who.name == "ann" and not who.internal
    with pytest.raises(Unauthenticated, match="is not active"):
        await store_users.authenticate(acting_for_metadata("secret", "bob"))
    with pytest.raises(Unauthenticated, match="Login failed"):
        await store_users.authenticate(acting_for_metadata("not-the-secret", "ann"))
    forged = (*basic_metadata("ann", "pw-ann"), ("shoal-acting-for", "admin"))
    with pytest.raises(Unauthenticated, match="only for this node's own services"):
        await store_users.authenticate(forged)
