"""The admission policy of the replicator: known identities, joins, source addresses."""

from __future__ import annotations

import ipaddress

import pytest
from shoal.replicator.v1 import replicator_pb2 as rpb

from services.common.sources import source_address
from services.replicator.admission import Admission, KnownAddresses, joined_row
from services.replicator.handshake import Refused

ME = "10.9.0.1"


def _hello(name: str, join: str | None = None) -> rpb.Hello:
    return rpb.Hello(node_name=name, join=rpb.Join(url=join) if join is not None else None)


def test_source_addresses_of_grpc_peer_strings() -> None:
    assert source_address("ipv4:127.200.0.3:41234") == ipaddress.ip_address("127.200.0.3")
    assert source_address("ipv6:[::1]:5000") == ipaddress.ip_address("::1")
    assert source_address("ipv6:%5B::1%5D:5000") == ipaddress.ip_address("::1")
    assert source_address("ipv6:[::ffff:10.0.0.7]:5000") == ipaddress.ip_address("10.0.0.7")
    assert source_address("ipv6:[fe80::1%25eth0]:5000") == ipaddress.ip_address("fe80::1")
    assert source_address("unix:/tmp/socket") is None
    assert source_address("ipv4:not-an-address:1") is None


def test_routes_and_members_are_admitted_without_a_join() -> None:
    admission = Admission(ME)
    assert admission.check_identity(_hello("10.9.0.2"), {"10.9.0.2"}, secure=True) is False
    assert admission.check_identity(_hello("10.9.0.2", ""), {"10.9.0.2"}, secure=False) is False


def test_an_unknown_node_is_refused_with_what_to_do() -> None:
    admission = Admission(ME)
    with pytest.raises(Refused) as refused:
        admission.check_identity(_hello("10.9.0.3"), {"10.9.0.2"}, secure=True)
    assert refused.value.code == rpb.GOODBYE_CODE_UNAUTHORIZED
    assert "10.9.0.3 is not a member of this cluster" in refused.value.reason
    assert '"operation": "add_node", "hostname": "10.9.0.3"' in refused.value.reason


def test_a_join_admits_and_asks_to_record() -> None:
    admission = Admission(ME)
    hello = _hello("10.9.0.3", "shoals://10.9.0.3:9933")
    assert admission.check_identity(hello, set(), secure=True) is True
    assert joined_row(hello) == {"name": "10.9.0.3", "url": "shoals://10.9.0.3:9933"}
    assert joined_row(_hello("10.9.0.3", "")) == {"name": "10.9.0.3"}


@pytest.mark.parametrize("url", ["shoals://10.9.0.4:9933", "ftp://10.9.0.3", "bad host!"])
def test_a_join_with_an_unusable_url_is_refused(url: str) -> None:
    with pytest.raises(Refused) as refused:
        Admission(ME).check_identity(_hello("10.9.0.3", url), set(), secure=True)
    assert refused.value.code == rpb.GOODBYE_CODE_PROTOCOL_ERROR
    assert "unusable url" in refused.value.reason


async def test_a_known_name_must_come_from_its_own_address() -> None:
    admission = Admission(ME)
    known = {"10.9.0.2", "10.9.0.5"}
    await admission.check_address("ipv4:10.9.0.2:5000", "10.9.0.2", known, ())
    # This node's own address is no credential, nor another member's.
    for source in ("10.9.0.1", "10.9.0.5", "127.0.0.1", "10.9.0.66"):
        with pytest.raises(Refused) as refused:
            await admission.check_address(f"ipv4:{source}:5000", "10.9.0.2", known, ())
        assert refused.value.code == rpb.GOODBYE_CODE_UNAUTHORIZED
        assert f"connection from {source} saying it is 10.9.0.2" in refused.value.reason
        assert f"{source} is not an address of 10.9.0.2" in refused.value.reason
    with pytest.raises(Refused):
        await admission.check_address("unix:/tmp/socket", "10.9.0.2", known, ())


async def test_allowed_sources_speak_for_any_name_and_strangers_need_them() -> None:
    admission = Admission(ME)
    allowed = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.8.0.0/16"))
    await admission.check_address("ipv4:127.0.0.1:5000", "10.9.0.2", {"10.9.0.2"}, allowed)
    await admission.check_address("ipv4:10.8.3.4:5000", "10.9.0.7", set(), allowed)
    with pytest.raises(Refused) as refused:
        await admission.check_address("ipv4:10.9.0.7:5000", "10.9.0.7", set(), ())
    assert "10.9.0.7 is not a route or member" in refused.value.reason
    assert "replication.allowedSources" in refused.value.reason


async def test_host_names_are_resolved() -> None:
    known = KnownAddresses()
    assert ipaddress.ip_address("127.0.0.1") in await known.resolve("localhost")
    assert await known.resolve("no-such-host.invalid") == frozenset()
