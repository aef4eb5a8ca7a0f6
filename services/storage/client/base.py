"""What the handlers of every area of StorageService share: the open engine and the
node's own clients and workers built on it."""

from __future__ import annotations

from services.storage.analytics import AnalyticsTables
from services.storage.confirmation import ReplicatorClient
from services.storage.engine import Engine
from services.storage.readthrough import ResidentReads
from services.storage.repair import ResidencyWorker


class ClientHandlers:
    """The state of the client servicer; each area's handlers are a subclass of it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.users = engine.users
        self.analytics = AnalyticsTables(engine)
        self.replicator = ReplicatorClient(engine.config, engine.node_secret)
        self.reads = ResidentReads(engine, self.replicator)
        self.residency = ResidencyWorker(engine, self.replicator)
