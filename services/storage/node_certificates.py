"""At start, storage records the node's TLS certificates in ``system.hdb_certificate``.

With ``tls.*`` configured, the node's certificate (the first of its chain) becomes the row
named after the node, and each certificate of ``tls.certificateAuthority`` a row named by
its common name. Rows are written as attribute merges in one local transaction, only when
they differ from what the table holds, so a restart with the same files writes nothing
and replacing the files (rotation) updates the rows on the next start; the rows then
replicate like any other. Private keys never reach the table: a row names the key file.
"""

from __future__ import annotations

import logging

import orjson

from services.common import certificate_table as table
from services.common.auth import INTERNAL_USER_PREFIX
from services.common.config import ShoalConfig
from services.storage import keys
from services.storage.engine import Engine
from services.storage.search import Reader

log = logging.getLogger("shoal.storage")


def record_node_certificates(engine: Engine, config: ShoalConfig) -> list[str]:
    """Write this node's certificate rows that differ from the table's; the names written.
    A certificate file that cannot be read is logged and recorded nothing (the
    replicator, which needs the files, reports it too)."""
    try:
        rows = table.node_certificate_rows(config)
    except (OSError, ValueError) as exc:
        log.error("cannot record this node's certificates in %s: %s", table.TABLE, exc)
        return []
    if not rows:
        return []
    hdb = engine.catalog.table(table.DATABASE, table.TABLE)
    reader = Reader(engine, hdb)
    current = {
        encoded: state.doc
        for encoded, state in reader.by_ids([keys.encode_key(r[table.PRIMARY_KEY]) for r in rows])
    }
    changed = [r for r in rows if current.get(keys.encode_key(r[table.PRIMARY_KEY])) != r]
    if not changed:
        return []
    txn = engine.transaction(table.DATABASE, INTERNAL_USER_PREFIX + engine.node_name, internal=True)
    txn.merge_upsert(hdb, [orjson.dumps(r) for r in changed])
    txn.commit()
    names = [str(r[table.PRIMARY_KEY]) for r in changed]
    log.info("recorded certificates %s in %s.%s", ", ".join(names), table.DATABASE, table.TABLE)
    return names
