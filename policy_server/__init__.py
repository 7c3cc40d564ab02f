"""Policy Server: a trained RL policy plus one schema.yaml, served as a typed REST API."""

__version__ = "0.1.0"
