"""The HTTP layer: the FastAPI app over the registry of policies (start reading at app.py)."""
