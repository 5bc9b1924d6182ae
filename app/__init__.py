"""The device dashboard: FastAPI app, control page and the ``deeplens-dashboard`` command."""
