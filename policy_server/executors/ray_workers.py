"""Several API processes in front of one Ray and one Serve application per policy (`generate.py serve --workers N`).

The supervising process starts Ray (or joins RAY_ADDRESS) before uvicorn starts its workers, and
hands them its address (RAY_ADDRESS) and a folder for lock files (POLICY_SERVER_RAY_SHARED_DIR).
Each worker runs its executors as usual, except that deploying and switching an application
happen under that application's file lock, and only if the application does not run that
version already (the folder records which one it runs): the first worker deploys, the others
find it running; when a new version appears, the first worker whose watcher sees it rolls the
application onto it, the others find it done. Workers never delete a shared application: once
they all ended, the supervisor shuts down the Ray it started, or deletes the applications the
workers deployed on a cluster it joined.
"""

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from policy_server.loading import SCHEMA_FILE, ModelVersion
from policy_server.settings import Settings

logger = logging.getLogger("policy_server")

SHARED_DIR_ENV = "POLICY_SERVER_RAY_SHARED_DIR"


@contextmanager
def shared_ray(settings: Settings) -> Iterator[None]:
    """For the supervisor, around the workers' lives: Ray started or joined, its address and a
    lock folder in the environment the workers inherit; after them, Ray cleaned up once."""
    import ray  # imported only when Ray is to be used: it takes seconds
    from ray import serve
    from ray.serve.config import ProxyLocation

    from policy_server.executors.ray import RayMode, connect, shut_down_ray

    folder = Path(tempfile.mkdtemp(prefix="policy-server-ray-"))
    mode = connect(settings)
    try:
        serve.start(proxy_location=ProxyLocation.Disabled)
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        os.environ[SHARED_DIR_ENV] = str(folder)
        logger.info("Ray %s for the workers at %s", mode.value, os.environ["RAY_ADDRESS"])
        yield
    finally:
        if mode is not RayMode.STARTED:
            for record in folder.glob("*.version"):
                serve.delete(record.stem)
        shut_down_ray(mode)
        shutil.rmtree(folder, ignore_errors=True)


def shared_dir() -> Path | None:
    """The lock folder, in a worker of `generate.py serve --workers N`; None in a lone server."""
    value = os.environ.get(SHARED_DIR_ENV)
    return Path(value) if value else None


@contextmanager
def application_lock(folder: Path, app_name: str) -> Iterator[None]:
    """Held by one worker at a time, across processes, while it deploys or rolls `app_name`."""
    with (folder / f"{app_name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def version_key(version: ModelVersion) -> str:
    """What identifies a version: its label and its files as they are (a version may be replaced in place)."""
    stamps = [path.stat() for path in (version.model_file, version.folder / SCHEMA_FILE) if path.exists()]
    return " ".join([version.label, *(f"{stat.st_size}:{stat.st_mtime_ns}" for stat in stamps)])


def runs(folder: Path, app_name: str, version: ModelVersion) -> bool:
    """Whether the shared application runs `version` (as the worker that rolled it recorded). Hold the lock."""
    record = folder / f"{app_name}.version"
    return record.exists() and record.read_text() == version_key(version)


def record(folder: Path, app_name: str, version: ModelVersion) -> None:
    """The shared application runs `version` now. Hold the lock."""
    (folder / f"{app_name}.version").write_text(version_key(version))
