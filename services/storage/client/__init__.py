"""The handlers of StorageService, the client port, one module per area of the contract;
``services/storage/server.py`` composes them into the one servicer."""
