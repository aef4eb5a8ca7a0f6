"""Relay: a node passes on what it received from one peer to the others that do not
receive that origin directly, and never back to where it came from."""

from __future__ import annotations

from tests.unit.replicator.nodes import Link, Node, batches, connect, origins, until


def three(nodes: list[Node], mesh: bool = False) -> tuple[Node, Node, Node]:
    """a - b - c, and with ``mesh`` a - c too (routes only: tests connect them). Each
    already holds a write of its own to ``app``, so they subscribe to each other's logs
    (nobody copies)."""
    a = Node.make("a", ["b", "c"] if mesh else ["b"])
    b = Node.make("b", ["a", "c"])
    c = Node.make("c", ["a", "b"] if mesh else ["b"])
    nodes += [a, b, c]
    for node in (a, b, c):
        node.storage.write("app", f"{node.name}0")
    return a, b, c


async def subscribed(node: Node, peer: str, excluded: list[str]) -> None:
    """Wait until ``node`` subscribes to ``peer`` with these exclusions."""
    await until(
        lambda: node.connected(peer) and node.session(peer).inbound.excluded == excluded,
        f"{node.name} to subscribe to {peer} excluding {excluded}",
    )


async def test_a_node_in_the_middle_relays_each_origin_to_the_other_side(
    nodes: list[Node],
) -> None:
    a, b, c = three(nodes)
    to_a = await connect(b, a)
    to_c = await connect(c, b)
    await subscribed(c, "b", ["c"])  # "c" has no direct link to "a": a's data may come by b
    await subscribed(b, "a", ["b", "c"])
    await subscribed(b, "c", ["a", "b"])

    written = a.storage.write("app", "k1")[0]
    await until(lambda: c.storage.holds("app", "a", written.version), "a's write to reach c")
    assert ("app", "a", written.version) in c.storage.applied_transactions()
    # It came from "b" (the only connection "c" has), and never went back to "a".
    assert ("app", "a", written.version) in origins(to_c.listener.sent)
    assert all(origin != "a" for _, origin, _ in origins(to_a.dialer.sent))
    # The other way too: c's write reaches "a" through "b".
    back = c.storage.write("app", "k2")[0]
    await until(lambda: a.storage.holds("app", "c", back.version), "c's write to reach a")
    assert ("app", "c", back.version) in origins(to_a.dialer.sent)


async def test_a_full_mesh_relays_nothing_until_a_direct_link_fails(nodes: list[Node]) -> None:
    a, b, c = three(nodes, mesh=True)
    links: dict[str, Link] = {}
    links["ab"] = await connect(b, a)
    links["bc"] = await connect(c, b)
    links["ac"] = await connect(a, c)
    await subscribed(c, "b", ["a", "c"])
    await subscribed(b, "c", ["a", "b"])
    # b may still be sending the generations c subscribed with before it excluded "a"
    # (c drops them); what b sends for the newest one is what counts.
    newest = c.session("b").inbound.generation
    await until(
        lambda: b.session("c").outbound.generation == newest,
        "b to serve c's newest subscription",
    )

    sent_before = len(links["bc"].listener.sent)
    written = a.storage.write("app", "k1")[0]
    await until(lambda: c.storage.holds("app", "a", written.version), "a's write to reach c")
    relayed = [
        t.origin
        for batch in batches(links["bc"].listener.sent[sent_before:])
        if batch.generation == newest
        for t in batch.transactions
    ]
    assert "a" not in relayed  # it came directly only

    # The direct link a - c fails: c's next subscription to b stops excluding "a", and
    # what "a" writes now reaches "c" through "b".
    links["ac"].cut()
    await subscribed(c, "b", ["c"])
    later = a.storage.write("app", "k2")[0]
    await until(lambda: c.storage.holds("app", "a", later.version), "a's write to reach c")
    assert ("app", "a", later.version) in origins(links["bc"].listener.sent)
