"""Harper's JSON operations API, over the Execute RPC.

Each operation name maps to one parser and one handler in ``registry.OPERATIONS``; the
handlers live in one module per area (data, schema, users, cluster, logs, backups,
system). Field names are Harper's, including its older aliases (`schema` for
`database`, `hash_attribute` for `primary_key`, `hash_values` for `ids`,
`search_attribute` / `search_value` for `attribute` / `value`). Handlers call the same
code as the typed RPCs (services/admin/cluster.py, storage's RPCs), and failures become
`{"error": "..."}` with the gRPC code the typed path would have returned.
"""

from services.admin.operations.body import Body
from services.admin.operations.execute import Execute, deadline_of
from services.admin.operations.registry import OPERATIONS, Operation, answer, run

__all__ = ["OPERATIONS", "Body", "Execute", "Operation", "answer", "deadline_of", "run"]
