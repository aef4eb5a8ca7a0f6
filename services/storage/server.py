"""The StorageService servicer (the client port): the handlers of each area of the
contract (``client/``) composed into the one servicer that is registered. Each handler
checks the caller's permission (``permissions``), validates, calls the engine, and builds
the response; the request handling it shares with the node-internal servicer is in
``rpc.py``; authentication and error mapping happen once, in ``common.interceptor``.
"""

from __future__ import annotations

from shoal.storage.v1 import storage_pb2_grpc

from services.storage.client.csv_load import CsvHandlers
from services.storage.client.logs import LogHandlers
from services.storage.client.residency import ResidencyHandlers
from services.storage.client.schema import SchemaHandlers
from services.storage.client.searches import SearchHandlers
from services.storage.client.users import UserHandlers
from services.storage.client.writes import WriteHandlers


class StorageServicer(
    SchemaHandlers,
    WriteHandlers,
    CsvHandlers,
    SearchHandlers,
    LogHandlers,
    UserHandlers,
    ResidencyHandlers,
    storage_pb2_grpc.StorageServiceServicer,
):
    """gRPC handlers over one Engine (state in ``client/base.py``)."""
