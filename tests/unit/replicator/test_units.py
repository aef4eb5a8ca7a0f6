"""Pure pieces of the replicator: backoff, the window, flow agreement, handshake checks."""

from __future__ import annotations

import asyncio
import random

import pytest
from shoal.replicator.v1 import replicator_pb2 as rpb

from services.common.backoff import Backoff
from services.replicator.handshake import Refused, check_dialer, choose_version
from services.replicator.session import flows
from services.replicator.window import Window


def test_backoff_grows_with_jitter_to_a_cap_and_resets() -> None:
    backoff = Backoff(initial_s=0.1, cap_s=2.0, _random=random.Random(1))
    delays = [backoff.next() for _ in range(10)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(d <= 2.0 for d in delays)
    assert delays[-1] >= 1.0  # reached the cap's range
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next() <= 0.1


async def test_window_blocks_when_full_and_releases_on_ack() -> None:
    window = Window(max_batches=2, max_bytes=1000)
    await window.acquire(1, 100, 5)
    await window.acquire(2, 100, 5)
    assert window.used_percent == 100.0 and window.transactions == 10
    third = asyncio.create_task(window.acquire(3, 100, 5))
    await asyncio.sleep(0.05)
    assert not third.done()
    await window.release_through(1)
    await asyncio.wait_for(third, 1)
    await window.release_through(3)
    assert window.used_percent == 0.0 and window.transactions == 0


async def test_window_bounds_bytes_but_lets_one_large_batch_through() -> None:
    window = Window(max_batches=10, max_bytes=100)
    await window.acquire(1, 500, 1)  # alone: allowed although larger than the window
    blocked = asyncio.create_task(window.acquire(2, 10, 1))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    await window.reset()
    await asyncio.wait_for(blocked, 1)


def _hello(**kwargs: object) -> rpb.Hello:
    base: dict[str, object] = {"all_databases": True, "sends": True, "receives": True}
    base.update(kwargs)
    return rpb.Hello(**base)  # type: ignore[arg-type]


def test_flows_agree_on_directions_and_databases() -> None:
    mine = _hello(sends=False, receives=True, all_databases=False, databases=["a", "b"])
    theirs = _hello(databases=[], all_databases=True)
    f = flows(mine, theirs)
    assert (f.sends, f.receives) == (False, True)
    assert not f.all_databases and f.databases == {"a", "b"}
    g = flows(theirs, mine)  # the peer computes the mirror image
    assert (g.sends, g.receives) == (True, False) and g.databases == {"a", "b"}
    both = flows(
        _hello(all_databases=False, databases=["a", "b"]),
        _hello(all_databases=False, databases=["b", "c"]),
    )
    assert both.databases == {"b"} and both.covers("b") and not both.covers("a")


def test_handshake_refusals_name_the_reason() -> None:
    with pytest.raises(Refused) as err:
        check_dialer("n1", _hello(node_name="n1"), None)
    assert err.value.code == rpb.GOODBYE_CODE_SELF_CONNECTION
    with pytest.raises(Refused) as err:
        check_dialer("n1", _hello(node_name="n2", expected_name="n9"), None)
    assert err.value.code == rpb.GOODBYE_CODE_NAME_MISMATCH and "n9" in err.value.reason
    with pytest.raises(Refused) as err:
        check_dialer("n1", _hello(node_name="n2", expected_name="n1"), {"n3"})
    assert err.value.code == rpb.GOODBYE_CODE_UNAUTHORIZED and "n3" in err.value.reason
    check_dialer("n1", _hello(node_name="n2", expected_name="n1"), {"n2"})
    assert choose_version(_hello(protocol_min=1, protocol_max=7)) == 1
    with pytest.raises(Refused) as err:
        choose_version(_hello(protocol_min=2, protocol_max=3))
    assert err.value.code == rpb.GOODBYE_CODE_PROTOCOL
