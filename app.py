"""`uvicorn app:app` serves schema.yaml + models/ of the working directory (or POLICY_SERVER_DIR)."""

from policy_server.server import app_from_environment

app = app_from_environment()
